"""Any model, read as it runs: the reading equals the model, attacks materialize and replay
exactly, certificates are sound, on each kind of model users bring and on random graphs."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nonsingular as ns
from nonsingular import Threat, ThreatError, UnsupportedLayerError
from nonsingular.attacks import margins
from nonsingular.model import read_model
from nonsingular.model.catalog import MODULES

from .conftest import assert_state_equal, state_copy
from .test_attacks import in_ball
from .test_certificates import TOL, check_sound, random_margins
from .zoo import NEVER_MOVED, OTHER_WEIGHTS, ZOO

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


KIND_THREATS = (  # what every kind of the zoo is certified under
    Threat(eps_x=0.02, eps_w=0.005),
    Threat(eps_x=0.1, x_norm="l2", eps_w=0.02, w_mode="relative"),
)


@pytest.mark.parametrize("kind", list(ZOO))
def test_certificates_are_sound_on_every_kind(kind):
    model, x = ZOO[kind]()
    y = labels(model, x)
    for threat in KIND_THREATS:
        check_sound(model, x, y, threat, ["ibp", "crown", "alpha-crown"])


# ------------------------------------------------------------- weights outside Linear/Conv
WEIGHT_THREATS = {
    "absolute": Threat(eps_x=0.03, eps_w=0.05),
    "relative-l2": Threat(eps_w=0.2, w_norm="l2", w_mode="relative"),
    "bias": Threat(eps_w=0.05, bias=True),
    "shared": Threat(eps_x=0.03, eps_w=0.05, scope="shared"),
}


def is_bias(name):
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("bias") or leaf in ("in_proj_bias", "b3")


@pytest.mark.parametrize("threat", list(WEIGHT_THREATS))
@pytest.mark.parametrize("kind", list(OTHER_WEIGHTS))
def test_every_parameter_is_moved_or_listed_with_why(kind, threat):
    """Every parameter is either perturbed (its materialized delta nonzero where the example
    is attacked, inside the ball, replayed exactly through the unmodified model) or listed as
    untouched with a reason."""
    model, x = OTHER_WEIGHTS[kind]()
    y = labels(model, x)
    threat = WEIGHT_THREATS[threat]
    before = state_copy(model)
    res = ns.attack(model, x, y, threat, steps=6, loss="margin")
    assert_state_equal(model, before)
    params = {n: p.detach() for n, p in model.named_parameters()}
    left = NEVER_MOVED[kind] | (set() if threat.bias else {n for n in params if is_bias(n)})
    assert set(res.untouched) == left
    assert all(isinstance(why, str) and why for why in res.untouched.values())
    for i in range(len(x)):
        deltas = res.weight_deltas(i)
        assert set(deltas) == set(params) - left
        for name, delta in deltas.items():
            assert delta.shape == params[name].shape
            if res.clean_margins[i] > 0:  # an example already broken is not attacked
                assert float(delta.abs().max()) > 0, name
            assert in_ball(threat, params[name], delta), name
        replayed = margins(res.replay(model, i), y[i : i + 1])
        assert abs(float(replayed) - float(res.margins[i])) < 1e-4
    assert bool((res.margins < res.clean_margins - 1e-6).any())


def test_weights_of_attention_and_recurrent_layers_move_the_logits():
    """A weight-only attack restricted to the attention or recurrent weights (no Linear
    around them moved) still lowers margins: those weights are really perturbed."""
    for kind, layers in (
        ("transformer-encoder", ["encoder.layers.0.self_attn"]),  # in_proj and out_proj
        ("multihead-attention", ["attn"]),
        ("lstm", ["rnn"]),
        ("gru", ["rnn.weight_hh_l1"]),
        ("einsum-matmul", ["W1", "W2"]),
    ):
        model, x = OTHER_WEIGHTS[kind]()
        y = labels(model, x)
        res = ns.attack(model, x, y, Threat(eps_w=0.1, layers=layers), steps=6, loss="margin")
        moved = set(res.weight_deltas(0))
        assert moved and all(any(n == m or n.startswith(m + ".") for m in layers) for n in moved)
        if kind == "transformer-encoder":  # a module name selects every weight inside it
            assert {n.rsplit(".", 1)[-1] for n in moved} == {"in_proj_weight", "weight"}
        assert bool((res.margins < res.clean_margins - 1e-6).any()), kind
    assert torch.backends.mha.get_fastpath_enabled()  # turned off inside vmap only, restored


class MixedLayers(nn.Module):
    """Dense steps each written one way: ``nn.Linear``, ``h @ W``, ``einsum``, ``F.linear``
    with a transposed parameter, a Linear whose weight is also read by a matmul, or a
    LayerNorm (no linear weight)."""

    def __init__(self, kinds, widths):
        super().__init__()
        self.kinds = kinds
        self.steps = nn.ModuleList()
        self.raw = nn.ParameterList()
        for kind, (a, b) in zip(kinds, zip(widths, widths[1:], strict=False), strict=True):
            self.steps.append(nn.Linear(a, b) if kind in ("linear", "tied") else nn.LayerNorm(a))
            self.raw.append(nn.Parameter(torch.randn(a, b) * 0.5))

    def forward(self, x):
        h = x
        for kind, step, w in zip(self.kinds, self.steps, self.raw, strict=True):
            if kind == "linear":
                h = step(h)
            elif kind == "matmul":
                h = h @ w
            elif kind == "einsum":
                h = torch.einsum("bi,ij->bj", h, w)
            elif kind == "transposed":
                h = F.linear(h, w.t())
            elif kind == "tied":
                h = step(h) + 0.5 * (h @ step.weight.T)
            else:  # layernorm, then the raw matmul so that the width moves on
                h = step(h) @ w
            h = torch.tanh(h)
        return h


@settings(max_examples=15, deadline=None)
@given(
    kinds=st.lists(
        st.sampled_from(["linear", "matmul", "einsum", "transposed", "tied", "layernorm"]),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
    threat=st.sampled_from(list(WEIGHT_THREATS.values())),
)
def test_moved_and_untouched_split_the_parameters_and_replay_exactly(kinds, seed, threat):
    """Whatever way each layer is written, the parameters split into moved (materialized,
    replayed exactly) and untouched (each with a reason), and ``weight_coverage`` says the
    same as the attack."""
    torch.manual_seed(seed)
    widths = [5] + [int(w) for w in torch.randint(3, 7, (len(kinds),))]
    model = MixedLayers(kinds, widths).eval()
    x = torch.rand(3, 5, generator=torch.Generator().manual_seed(seed))
    y = labels(model, x)
    names = {n for n, _ in model.named_parameters()}
    try:
        covered = ns.weight_coverage(model, x, threat)
    except ThreatError as exc:  # only when nothing in it is a linear map's weight
        assert "moves no parameter" in str(exc)
        return
    res = ns.attack(model, x, y, threat, steps=3)
    assert set(covered.moved) | set(covered.untouched) == names
    assert not set(covered.moved) & set(covered.untouched)
    assert covered.untouched == res.untouched
    for i in range(len(x)):
        assert sorted(res.weight_deltas(i)) == list(covered.moved)
        replayed = margins(res.replay(model, i), y[i : i + 1])
        assert abs(float(replayed) - float(res.margins[i])) < 1e-4
    for i, kind in enumerate(kinds):  # independent of the library: what each way must give
        raw = f"raw.{i}"
        assert (raw in covered.moved) == (kind != "linear" and kind != "tied"), (kind, raw)
        if kind in ("linear", "tied"):
            assert f"steps.{i}.weight" in covered.moved
        if kind == "layernorm":
            assert f"steps.{i}.weight" in covered.untouched


def test_a_weight_threat_that_moves_nothing_is_an_error():
    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(6)
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return (self.norm(x) * self.scale)[:, :3]

    x = torch.rand(4, 6)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ThreatError, match="eps_w=0.01 moves no parameter of Scales.*norm.weight"):
        ns.attack(Scales(), x, y, Threat(eps_w=0.01))
    with pytest.raises(ThreatError, match="moves no parameter"):
        ns.certify(Scales(), x, y, Threat(eps_w=0.01), "ibp")
    assert ns.attack(Scales(), x, y, Threat(eps_x=0.01)).untouched == {}  # no weight budget
    model, x = OTHER_WEIGHTS["einsum-matmul"]()  # biases only, and bias=False: nothing
    y = labels(model, x)
    with pytest.raises(ThreatError, match="movable weights: W1, W2, W3"):
        ns.attack(model, x, y, Threat(eps_w=0.01, layers=["shift"]))


def test_layers_naming_a_parameter_no_threat_moves_lists_the_movable_ones():
    model, x = OTHER_WEIGHTS["transformer-encoder"]()
    y = labels(model, x)
    name = "encoder.layers.0.norm1.weight"
    with pytest.raises(ThreatError, match=f"'{name}', which no weight threat moves.*LayerNorm"):
        ns.attack(model, x, y, Threat(eps_w=0.01, layers=[name]))
    with pytest.raises(ThreatError, match="movable weights: embed.weight, encoder.layers.0"):
        ns.attack(model, x, y, Threat(eps_w=0.01, layers=[name]))
    with pytest.raises(ThreatError, match="not a weight of this model"):
        ns.attack(model, x, y, Threat(eps_w=0.01, layers=["encoder.nope"]))


@pytest.mark.parametrize("kind", list(OTHER_WEIGHTS))
def test_certificates_refuse_what_they_cannot_bound_with_a_typed_error(kind):
    """Bounds never ignore a moved parameter or an operation they cannot follow: an RNN's or
    attention's tuple output is bounded as a value (never fixed at the input's centre)."""
    model, x = OTHER_WEIGHTS[kind]()
    y = labels(model, x)
    for threat in (Threat(eps_x=0.01, eps_w=0.01), Threat(eps_x=0.01)):
        for method in ("ibp", "crown"):
            with pytest.raises(UnsupportedLayerError):
                ns.certify(model, x, y, threat, method)


class ShapeReads(nn.Module):
    """A Linear whose weight's shape (not values) the forward also reads."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x.view(-1, self.fc.weight.shape[1]))
        return self.head(torch.relu(h).reshape(x.size(0), self.fc.weight.size(0)))


def test_reading_a_weights_shape_keeps_its_layer_bounded():
    """``W.shape``/``W.size()`` do not move with ``W``: the layer keeps the lemma and bounds."""
    torch.manual_seed(17)
    model, x = ShapeReads().eval(), torch.rand(4, 6, generator=torch.Generator().manual_seed(17))
    y = labels(model, x)
    threat = Threat(eps_x=0.02, eps_w=0.01)
    check_sound(model, x, y, threat, ["ibp", "crown"])
    assert set(ns.attack(model, x, y, threat, steps=3).weight_deltas(0)) == {
        "fc.weight",
        "head.weight",
    }


class TupleOutputs(nn.Module):
    """An operation returning a tuple of values of the input, then one of its items."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if self.how == "chunk":
            a, b = x.chunk(2, dim=1)
        elif self.how == "split":
            a, b = torch.split(x, 3, dim=1)
        elif self.how == "unbind":
            a, b = x.view(-1, 2, 3).unbind(1)
        else:  # max over a dimension: (values, indices)
            a, b = x.view(-1, 2, 3).max(dim=1).values, x[:, 3:]
        return self.fc(a - b)


@pytest.mark.parametrize("how", ["chunk", "split", "unbind", "max"])
def test_a_tuple_of_input_values_is_never_fixed_at_the_centre(how):
    """Regression: such a node was read as a shape (like ``x.size(0)``) and bounds took its
    value at the centre of the input box, certifying examples the attack breaks."""
    torch.manual_seed(0)
    model, x = TupleOutputs(how).eval(), torch.rand(8, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = Threat(eps_x=0.3)
    res = ns.attack(model, x, y, threat, steps=30)
    assert bool(res.success.any())  # the budget is large enough to break some
    for method in ("ibp", "crown"):
        try:
            cert = ns.certify(model, x, y, threat, method)
        except UnsupportedLayerError:
            continue
        assert not bool((cert.certified & res.success).any()), method


class ComputedWeight(nn.Module):
    """A Linear layer, then ``F.linear`` with a weight computed from a parameter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(3, 8) * 0.3)

    def forward(self, x):
        return F.linear(torch.relu(self.fc(x)), self.w * 2.0)


def test_certificates_on_weights_they_follow_are_sound_against_the_full_attack():
    """Bounds refuse a threat moving ``w`` (computed weight); restricted to ``fc`` they answer,
    soundly against attacks and random materialized perturbations, and the attack moving
    ``w`` as well never ends above the certified margin of the restricted threat by more than
    the extra budget allows (it only adds freedom: its margins are lower or equal)."""
    torch.manual_seed(16)
    model, x = (
        ComputedWeight().eval(),
        torch.rand(4, 6, generator=torch.Generator().manual_seed(16)),
    )
    y = labels(model, x)
    full = Threat(eps_x=0.02, eps_w=0.01)
    with pytest.raises(UnsupportedLayerError, match="moves 'w'"):
        ns.certify(model, x, y, full, "crown")
    part = full.replace(layers=("fc",))
    check_sound(model, x, y, part, ["ibp", "crown", "alpha-crown"])
    bound = ns.certify(model, x, y, part, "crown").worst.float()
    res = ns.attack(model, x, y, full, steps=20, loss="margin")
    assert set(res.weight_deltas(0)) == {"fc.weight", "w"}
    for i in range(len(x)):
        replayed = margins(res.replay(model, i), y[i : i + 1])
        assert abs(float(replayed) - float(res.margins[i])) < 1e-5
    restricted = ns.attack(model, x, y, part, steps=20, loss="margin")
    assert bool((bound <= restricted.margins + TOL).all())


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
    # switch points and option constants that float32 does not hold exactly
    nn.Softplus(beta=3, threshold=1),
    nn.Hardtanh(0.1, 0.7),
    nn.LeakyReLU(0.1),
    nn.ELU(0.3),
]


def switch_points(act: nn.Module) -> list[float]:
    """Where a piecewise activation changes its formula (as PyTorch writes it)."""
    if isinstance(act, nn.Softplus):
        return [act.threshold / act.beta]
    if isinstance(act, nn.ReLU6):
        return [0.0, 6.0]
    if isinstance(act, nn.Hardtanh):
        return [act.min_val, act.max_val]
    if isinstance(act, (nn.ReLU, nn.LeakyReLU, nn.ELU)):
        return [0.0]
    return []


MAPS = {  # linear maps of one value (width kept), with the parameter the strategy draws
    "flip": lambda h, _: h.flip(1),
    "permute": lambda h, order: h[:, order],
    "shift": lambda h, _: F.pad(h[:, 1:], (0, 1)),
    "centre": lambda h, _: h - h.mean(1, keepdim=True),
    "scale": lambda h, factor: h * factor,
}


class RandomGraph(nn.Module):
    """A plan of steps over earlier values: dense layers with activations, skips, concatenations
    and layer norms after an optional convolutional stem (dilated or not, zero, reflect or
    circular padding, max or average pooling, a residual convolution); in-place steps that
    write into a value other steps also read (``relu_`` on its own line, an ``inplace=True``
    ReLU kept beside its input, ``+=``); linear maps of a value (``MAPS``: flips, a fixed
    permutation, a shift with zero padding, centring, scaling)."""

    def __init__(self, plan, stem, width, classes):
        super().__init__()
        self.plan = plan
        self.stem = stem
        self.layers = nn.ModuleList()
        self.inplace = nn.ReLU(inplace=True)
        widths = [width]
        for step in plan:
            kind, a = step[0], step[1]
            if kind == "dense":
                self.layers.append(nn.Sequential(nn.Linear(widths[a], step[2]), step[3]))
                widths.append(step[2])
            elif kind == "cat":
                self.layers.append(nn.Identity())
                widths.append(widths[a] + widths[step[2]])
            elif kind == "layernorm":
                self.layers.append(nn.LayerNorm(widths[a]))
                widths.append(widths[a])
            else:  # add, relu_, skip-relu, iadd: the width of value a
                self.layers.append(nn.Identity())
                widths.append(widths[a])
        self.head = nn.Linear(widths[-1], classes)
        self.up = self.down = 1.0  # scales around the head (1: none)

    def forward(self, x):
        return self.run(x)

    def last(self, x):
        """The head's input."""
        return self.run(x, head=False)

    def run(self, x, tune=None, head=True):
        """The forward; ``tune`` (an example) shifts the bias of every dense step marked
        ``near`` so that its first neuron's pre-activation at that example sits on a switch
        point of its activation, as float32 computes it."""
        values = [torch.flatten(self.stem(x), 1) if self.stem is not None else x]
        for step, layer in zip(self.plan, self.layers, strict=True):
            kind, a = step[0], step[1]
            if kind == "add":
                values.append(values[a] + 0.5 * values[step[2]])
            elif kind == "cat":
                values.append(torch.cat([values[a], values[step[2]]], dim=1))
            elif kind == "relu_":
                values[a].relu_()  # on its own line: every name of values[a] changes
                values.append(values[a])
            elif kind == "skip-relu":
                values.append(self.inplace(values[a]))  # values[a] is overwritten too
            elif kind == "iadd":
                h = values[a]
                h += 0.5 * values[step[2]]
                values.append(h)
            elif kind in MAPS:
                values.append(MAPS[kind](values[a], step[2]))
            else:
                if tune is not None and kind == "dense" and step[4] is not None:
                    linear = layer[0]
                    with torch.no_grad():  # a few corrections: float32 rounds each
                        for _ in range(3):
                            z = linear(values[a][tune : tune + 1])[0, 0]
                            linear.bias[0] += step[4] - z
                values.append(layer(values[a]))
        if not head:
            return values[-1]
        h = values[-1] * self.up if self.up != 1.0 else values[-1]
        return self.head(h) * self.down if self.down != 1.0 else self.head(h)


class Stem(nn.Module):
    def __init__(self, pool, residual, act, dilation=1, padding_mode="zeros"):
        super().__init__()
        # 6x6 stays 6x6 whatever the dilation; the kernel serves every position
        self.conv = nn.Conv2d(
            2, 3, 3, padding=dilation, dilation=dilation, padding_mode=padding_mode
        )
        self.pool = pool
        self.res = nn.Conv2d(3, 3, 3, padding=1) if residual else None
        self.act = act

    def forward(self, x):
        h = self.pool(self.act(self.conv(x)))
        return h + F.relu(self.res(h)) if self.res is not None else h


# float32's edges, reached by scaling around the head by powers of two (exact on their own):
# "up" puts the head's input's largest value there (near float32's largest finite value, 2**128,
# a dot product over it may overflow to inf), "down" the largest logit (past 2**128 it is inf:
# two such logits tie, and argmax breaks the tie by position; at a few units of the smallest
# subnormal, 2**-149, every rounding is absolute)
EDGES = [
    ("down", 8 * 2.0**-149),
    ("down", 3.0 * 2.0**128),
    ("down", 2 * 2.0**-149),
    ("up", 0.2 * 2.0**128),
    ("down", 64 * 2.0**-149),
    ("down", 0.6 * 2.0**128),
    ("up", 0.9 * 2.0**128),
    ("down", 16 * 2.0**-149),
]


@st.composite
def random_graphs(draw, inplace=False, magnitudes=False, maps=False):
    """A random graph, an input batch and labels. ``inplace``: in-place steps may be drawn, and
    dense steps may put a neuron on its activation's switch point at the first example, in a
    float32 or a float64 model; ``magnitudes``: the values around the head are scaled to an
    edge of float32 (``EDGES``); ``maps``: linear maps of a value may be drawn (``MAPS``)."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    image = draw(st.booleans())
    stem, width = None, 5
    if image:
        pool = draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, 2, 1)]))
        stem = Stem(
            pool,
            draw(st.booleans()),
            draw(st.sampled_from(ACTIVATIONS)),
            draw(st.sampled_from([1, 2])),
            draw(st.sampled_from(["zeros", "reflect", "circular"])),
        )
        width = 3 * 3 * 3  # every pooling drawn takes 6x6 to 3x3
    widths = [width]
    plan = []
    kinds = ["dense", "dense", "add", "cat", "layernorm"]
    if inplace:
        kinds += ["relu_", "skip-relu", "iadd"] * 2
    if maps:
        kinds += list(MAPS)
    for _ in range(draw(st.integers(1, 5 if inplace else 4))):
        kind = draw(st.sampled_from(kinds))
        # in-place steps write into a value a step made, never into the model's input
        a = draw(
            st.integers(
                1 if kind in ("relu_", "skip-relu", "iadd") and plan else 0, len(widths) - 1
            )
        )
        if kind in ("relu_", "skip-relu", "iadd") and a == 0:
            kind = "dense"
        if kind == "dense":
            out, near = draw(st.integers(2, 8)), None
            if inplace and draw(st.booleans()):  # on a switch point, as float32 computes it
                act = draw(st.sampled_from([a for a in ACTIVATIONS if switch_points(a)]))
                near = draw(st.sampled_from(switch_points(act)))
            else:
                act = draw(st.sampled_from(ACTIVATIONS))
            plan.append(("dense", a, out, act, near))
            widths.append(out)
        elif kind in ("add", "iadd"):
            same = [i for i, w in enumerate(widths) if w == widths[a]]
            plan.append((kind, a, draw(st.sampled_from(same))))
            widths.append(widths[a])
        elif kind == "cat":
            b = draw(st.integers(0, len(widths) - 1))
            plan.append(("cat", a, b))
            widths.append(widths[a] + widths[b])
        elif kind in MAPS:
            if kind == "permute":
                parameter = draw(st.permutations(range(widths[a])))
            else:
                parameter = draw(st.sampled_from([-1.5, 0.5, 3.0])) if kind == "scale" else None
            plan.append((kind, a, parameter))
            widths.append(widths[a])
        else:  # layernorm, relu_, skip-relu
            plan.append((kind, a))
            widths.append(widths[a])
    classes = draw(st.integers(2, 4))
    model = RandomGraph(plan, stem, width, classes).eval()
    for p in model.parameters():
        p.data.mul_(draw(st.sampled_from([1.0, 2.0])))
    dtype = draw(st.sampled_from([torch.float32, torch.float64])) if inplace else torch.float32
    model = model.to(dtype)
    shape = (2, 6, 6) if image else (5,)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    y = torch.randint(0, classes, (3,), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        model.run(x.clone(), tune=0)
    if magnitudes:
        where, target = draw(st.sampled_from(EDGES))
        with torch.no_grad():
            logits = model(x)
            largest = float(model.last(x).abs().max() if where == "up" else logits.abs().max())
        if largest > 0:  # a power of two float32 holds (2**127 at most), the head the rest
            k = math.floor(math.log2(target / largest))
            setattr(model, where, 2.0 ** min(127, k))
            for p in model.head.parameters():
                p.data.mul_(2.0 ** max(0, k - 127))
    return model, x, y


@st.composite
def graph_threats(draw, inputs=(0.0, 0.02, 0.1), weights=(0.0, 0.01, 0.05)):
    w_mode, w_norm = draw(
        st.sampled_from([("absolute", "linf"), ("relative", "linf"), ("absolute", "l2")])
    )
    x_norm = draw(st.sampled_from(["linf", "l2"]))
    eps_x = draw(st.sampled_from(inputs))
    return Threat(
        eps_x=eps_x * (3 if x_norm == "l2" else 1),
        eps_w=draw(st.sampled_from(weights)),
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


def check_sound_as_it_runs(model, x, y, threat, methods, device="cpu"):
    """No certificate where the model, run as it is on a materialized perturbation (random ones,
    the corners, the attack's), ranks a wrong class at or above the label, and no bound above
    any margin it computes. Non-finite logits count as misclassified (inf against inf is a
    tie that ``argmax`` breaks by position). ``device``: the model runs, is attacked and is
    bounded there (a copy: the user's model stays where it is)."""
    runs = model if device == "cpu" else copy.deepcopy(model).to(device)
    xs, ys = x.to(device), y.to(device)
    samples = random_margins(model, x, y, threat, n=100, device=device)
    samples = samples.double().nan_to_num(nan=float("-inf"))
    res = ns.attack(runs, xs, ys, threat, steps=20, restarts=1, loss="both", seed=1)
    for i in range(len(x)):
        logits = res.replay(runs, i)[0].double().cpu()
        margin = (logits[y[i]] - logits).nan_to_num(nan=float("-inf"))
        samples = torch.cat([samples, margin[None, None].expand(1, len(x), -1).clone()])
        samples[-1, [j for j in range(len(x)) if j != i]] = float("inf")
    worst = samples.scatter(2, y[None, :, None].expand(len(samples), -1, 1), float("inf"))
    worst = worst.min(2).values.min(0).values  # (B,) the lowest margin the model computed
    for method in methods:
        cert = ns.certify(runs, xs, ys, threat, method, time_limit=0.3)
        assert cert.lower.device.type == torch.device(device).type, method
        broken = cert.certified.cpu() & (worst <= 0)
        assert not bool(broken.any()), f"{method} certifies examples {broken.nonzero()}"
        lower = cert.lower.double().cpu()
        finite = torch.isfinite(lower)[None] & torch.isfinite(samples)
        gap = torch.where(finite, lower[None] - samples - TOL * (1 + samples.abs()), -1.0)
        assert float(gap.max()) <= 0, f"{method}: a perturbation went {gap.max()} below"


@settings(max_examples=30)
@given(case=random_graphs(inplace=True), threat=graph_threats((0.0, 0.0, 0.02), (0.0, 0.01)))
def test_certificates_are_sound_on_random_graphs_with_aliasing_and_switch_points(case, threat):
    model, x, y = case
    check_sound_as_it_runs(model, x, y, threat, ["ibp", "crown", "alpha-crown", "bab"])


@settings(max_examples=30)
@given(case=random_graphs(maps=True), threat=graph_threats((0.0, 0.0, 0.02), (0.0, 0.01)))
def test_certificates_are_sound_on_random_graphs_with_linear_maps(case, threat):
    """Flips, permutations, shifts with zero padding, centring and scaling between the layers:
    their backward steps carry the coefficients (and the multipliers' gradients) exactly."""
    model, x, y = case
    check_sound_as_it_runs(model, x, y, threat, ["ibp", "crown", "alpha-crown", "bab"])


@settings(max_examples=30)
@given(
    case=random_graphs(magnitudes=True),
    threat=graph_threats(inputs=(0.0, 1e-3, 0.01), weights=(0.0, 1e-4, 1e-3)),
)
def test_certificates_are_sound_on_random_graphs_at_the_edges_of_float32(case, threat):
    model, x, y = case
    check_sound_as_it_runs(model, x, y, threat, ["ibp", "crown", "alpha-crown", "bab"])


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
