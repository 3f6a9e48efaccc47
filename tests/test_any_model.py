"""Any model, read as it runs: the reading equals the model, attacks materialize and replay
exactly, certificates are sound, on each kind of model users bring and on random graphs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nonsingular as ns
from nonsingular import Threat
from nonsingular.attacks import margins
from nonsingular.model import read_model
from nonsingular.model.catalog import MODULES

from .conftest import assert_state_equal, state_copy
from .test_attacks import in_ball
from .test_certificates import check_sound
from .zoo import ZOO

THREATS = {
    "absolute": Threat(eps_x=0.03, eps_w=0.01),
    "relative": Threat(eps_x=0.03, eps_w=0.05, w_mode="relative"),
    "layer": Threat(eps_w=0.02, w_mode="layer"),
    "l2": Threat(eps_x=0.2, x_norm="l2", eps_w=0.1, w_norm="l2"),
    "l2-relative": Threat(eps_w=0.05, w_norm="l2", w_mode="relative"),
    "bias": Threat(eps_x=0.03, eps_w=0.01, bias=True),
    "shared": Threat(eps_x=0.03, eps_w=0.01, scope="shared"),
}


def labels(model, x):
    """Labels the model gets right for most examples, wrong for one (both cases matter)."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[-1] = (y[-1] + 1) % model(x).shape[1]
    return y


@pytest.mark.parametrize("kind", list(ZOO))
def test_the_reading_computes_the_model(kind):
    model, x = ZOO[kind]()
    graph = read_model(model, x)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-6, atol=1e-6)


def test_reused_modules_are_read_as_two_nodes():
    model, x = ZOO["reused-relu"]()
    graph = read_model(model, x)
    relus = [n for n in graph.nodes if n.label.endswith("(ReLU)")]
    assert len(relus) == 2  # named_children lists the shared ReLU once; the graph runs it twice
    model, x = ZOO["tied-linear"]()
    graph = read_model(model, x)
    uses = [n for n in graph.affine_nodes if n.op.weight_name == "shared.weight"]
    assert len(uses) == 2


@pytest.mark.parametrize("threat", list(THREATS))
@pytest.mark.parametrize("kind", list(ZOO))
def test_attacks_materialize_in_the_ball_and_replay_exactly(kind, threat):
    model, x = ZOO[kind]()
    y = labels(model, x)
    threat = THREATS[threat]
    before = state_copy(model)
    res = ns.attack(model, x, y, threat, steps=8, loss="margin")
    assert_state_equal(model, before)
    params = dict(model.named_parameters())
    weights = {n.op.weight_name for n in read_model(model, x).affine_nodes if n.op.weight_name}
    for i in range(len(x)):
        deltas = res.weight_deltas(i)
        expected = weights | (
            {n.replace("weight", "bias") for n in weights} if threat.bias else set()
        )
        expected &= params.keys()
        assert set(deltas) == (expected if threat.eps_w > 0 else set())
        for name, delta in deltas.items():
            assert delta.shape == params[name].shape
            assert in_ball(threat, params[name].detach(), delta), name
        replayed = margins(res.replay(model, i), y[i : i + 1])
        assert abs(float(replayed) - float(res.margins[i])) < 1e-4
    if threat.eps_w > 0 or threat.eps_x > 0:
        assert bool((res.margins < res.clean_margins - 1e-6).any())  # the attack moved something


@pytest.mark.parametrize("kind", list(ZOO))
def test_certificates_are_sound_on_every_kind(kind):
    model, x = ZOO[kind]()
    y = labels(model, x)
    for threat in (
        Threat(eps_x=0.02, eps_w=0.005),
        Threat(eps_x=0.1, x_norm="l2", eps_w=0.02, w_mode="relative"),
    ):
        check_sound(model, x, y, threat, ["ibp", "crown", "alpha-crown"])


# ------------------------------------------------------------------------------ random graphs
ACTIVATIONS = [
    nn.ReLU(),
    nn.LeakyReLU(0.2),
    nn.ELU(),
    nn.GELU(),
    nn.GELU("tanh"),
    nn.SiLU(),
    nn.Tanh(),
    nn.Sigmoid(),
    nn.Softplus(),
    nn.Hardtanh(),
    nn.ReLU6(),
]


class RandomGraph(nn.Module):
    """A plan of steps over earlier values: dense layers with activations, skips, concatenations
    and layer norms after an optional convolutional stem (max or average pooling, a residual
    convolution)."""

    def __init__(self, plan, stem, width, classes):
        super().__init__()
        self.plan = plan
        self.stem = stem
        self.layers = nn.ModuleList()
        widths = [width]
        for step in plan:
            kind, a = step[0], step[1]
            if kind == "dense":
                self.layers.append(nn.Sequential(nn.Linear(widths[a], step[2]), step[3]))
                widths.append(step[2])
            elif kind == "add":
                self.layers.append(nn.Identity())
                widths.append(widths[a])
            elif kind == "cat":
                self.layers.append(nn.Identity())
                widths.append(widths[a] + widths[step[2]])
            else:  # layernorm
                self.layers.append(nn.LayerNorm(widths[a]))
                widths.append(widths[a])
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        values = [torch.flatten(self.stem(x), 1) if self.stem is not None else x]
        for step, layer in zip(self.plan, self.layers, strict=True):
            kind, a = step[0], step[1]
            if kind == "add":
                values.append(values[a] + 0.5 * values[step[2]])
            elif kind == "cat":
                values.append(torch.cat([values[a], values[step[2]]], dim=1))
            else:
                values.append(layer(values[a]))
        return self.head(values[-1])


class Stem(nn.Module):
    def __init__(self, pool, residual, act):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.pool = pool
        self.res = nn.Conv2d(3, 3, 3, padding=1) if residual else None
        self.act = act

    def forward(self, x):
        h = self.pool(self.act(self.conv(x)))
        return h + F.relu(self.res(h)) if self.res is not None else h


@st.composite
def random_graphs(draw):
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    image = draw(st.booleans())
    stem, width = None, 5
    if image:
        pool = draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, 2, 1)]))
        stem = Stem(pool, draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS)))
        width = 3 * 3 * 3  # every pooling drawn takes 6x6 to 3x3
    widths = [width]
    plan = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["dense", "dense", "add", "cat", "layernorm"]))
        a = draw(st.integers(0, len(widths) - 1))
        if kind == "dense":
            out = draw(st.integers(2, 8))
            plan.append(("dense", a, out, draw(st.sampled_from(ACTIVATIONS))))
            widths.append(out)
        elif kind == "add":
            same = [i for i, w in enumerate(widths) if w == widths[a]]
            plan.append(("add", a, draw(st.sampled_from(same))))
            widths.append(widths[a])
        elif kind == "cat":
            b = draw(st.integers(0, len(widths) - 1))
            plan.append(("cat", a, b))
            widths.append(widths[a] + widths[b])
        else:
            plan.append(("layernorm", a))
            widths.append(widths[a])
    classes = draw(st.integers(2, 4))
    model = RandomGraph(plan, stem, width, classes).eval()
    for p in model.parameters():
        p.data.mul_(draw(st.sampled_from([1.0, 2.0])))
    shape = (2, 6, 6) if image else (5,)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, classes, (3,), generator=torch.Generator().manual_seed(seed + 1))
    return model, x, y


@st.composite
def graph_threats(draw):
    w_mode, w_norm = draw(
        st.sampled_from([("absolute", "linf"), ("relative", "linf"), ("absolute", "l2")])
    )
    x_norm = draw(st.sampled_from(["linf", "l2"]))
    eps_x = draw(st.sampled_from([0.0, 0.02, 0.1]))
    return Threat(
        eps_x=eps_x * (3 if x_norm == "l2" else 1),
        eps_w=draw(st.sampled_from([0.0, 0.01, 0.05])),
        x_norm=x_norm,
        w_mode=w_mode,
        w_norm=w_norm,
        bias=draw(st.booleans()),
    )


@settings(max_examples=30)
@given(case=random_graphs(), threat=graph_threats())
def test_ibp_and_crown_are_sound_on_random_graphs(case, threat):
    model, x, y = case
    check_sound(model, x, y, threat, ["ibp", "crown", "alpha-crown"])


@settings(max_examples=30)
@given(case=random_graphs(), threat=graph_threats())
def test_random_graph_attacks_replay_on_the_unmodified_model(case, threat):
    model, x, y = case
    res = ns.attack(model, x, y, threat, steps=3)
    for i in range(len(x)):
        replayed = margins(res.replay(model, i), y[i : i + 1])
        assert abs(float(replayed) - float(res.margins[i])) < 1e-4


def test_the_operations_table_lists_every_module_the_catalog_knows():
    text = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    table = text.split("## Supported operations")[1].split("\n## ")[0]
    missing = [m.__name__ for m in MODULES if m.__name__ not in table]
    assert not missing, f"docs/models.md does not list {missing}"
