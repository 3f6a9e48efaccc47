"""The key lemma: per-example weight perturbations of a dense layer are activation boxes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nonsingular import Threat, ThreatError
from nonsingular.attacks import JointSpace
from nonsingular.balls import make_ball
from nonsingular.model import LayerBudget, perturbed_layers, read_model

MODES = [
    ("absolute", "linf"),
    ("relative", "linf"),
    ("layer", "linf"),
    ("absolute", "l2"),
    ("relative", "l2"),
]


class Layer:
    """One affine layer read from a real module: its graph, node, weight and bias."""

    def __init__(self, module, x):
        self.module = module
        self.graph = read_model(module, x)
        (self.node,) = self.graph.affine_nodes
        self.weight = module.weight.detach()
        self.bias = None if module.bias is None else module.bias.detach()

    def budget(self, threat):
        return LayerBudget.from_threat(self.node, self.graph, threat)

    def forward(self, h, weight=None, bias=None):
        w = self.weight if weight is None else weight
        return self.node.op.forward(h, w, self.bias if bias is None else bias)


def dense(n_out, n_in, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    fc = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(n_out, n_in, generator=g))
        if bias:
            fc.bias.copy_(torch.randn(n_out, generator=g))
    return Layer(fc, torch.zeros(1, n_in)), g


def in_parameter_ball(budget, delta, name):
    radius = budget.weight_radius if name == "weight" else budget.bias_radius
    return make_ball(budget.norm, radius).contains(delta, rtol=1e-5)


@given(
    n_out=st.integers(1, 12),
    n_in=st.integers(1, 12),
    seed=st.integers(0, 9999),
    mode=st.sampled_from(MODES),
    bias=st.booleans(),
    sparse=st.booleans(),
)
def test_materialized_delta_is_in_the_ball_and_moves_the_output_by_radius_times_t(
    n_out, n_in, seed, mode, bias, sparse
):
    layer, g = dense(n_out, n_in, seed)
    threat = Threat(eps_w=0.05, w_mode=mode[0], w_norm=mode[1], bias=bias)
    budget = layer.budget(threat)
    h = torch.randn(n_in, generator=g)
    if sparse:  # ReLU outputs have exact zeros
        h = h.clamp_min(0)
    t = make_ball(mode[1], 1.0, batch_dims=1).random(torch.empty(1, n_out), g)[0]
    deltas = budget.materialize_lemma(h, t)
    assert in_parameter_ball(budget, deltas["weight"], "weight")
    moved = F.linear(h, layer.weight + deltas["weight"], layer.bias + deltas.get("bias", 0))
    expected = layer.forward(h[None])[0] + budget.lemma_radius(h[None])[0] * t
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-5)
    if bias:
        assert in_parameter_ball(budget, deltas["bias"], "bias")


def threat_radius(weight, eps, mode, norm):
    """The weight budget read from the threat's definition (docs/threat-model.md), not from
    the library: linf elementwise, l2 Frobenius."""
    if mode == "absolute":
        return torch.tensor(eps)
    if mode == "layer":
        return eps * weight.abs().max()
    return eps * (weight.abs() if norm == "linf" else weight.norm())


def weight_draws(weight, radius, norm, h, g):
    """``(draws, B, n_out, n_in)`` weight perturbations inside the threat's set, drawn by this
    test: uniform inside, on the boundary, and the ones that push each output furthest
    (linf: ``R sign(h)`` in every row; l2: ``R e_i h^T / |h|``, one per output ``i``)."""
    b, (n_out, n_in) = len(h), weight.shape
    if norm == "linf":
        inside = radius * (torch.rand(b, n_out, n_in, generator=g) * 2 - 1)
        edge = radius * torch.randn(b, n_out, n_in, generator=g).sign()
        furthest = (radius * h.sign()[:, None, :]).expand(b, n_out, n_in)
        return [inside, edge, furthest]
    direction = torch.randn(b, n_out, n_in, generator=g)
    edge = radius * direction / direction.flatten(1).norm(dim=1)[:, None, None]
    inside = edge * torch.rand(b, 1, 1, generator=g)
    unit_h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
    rows = torch.eye(n_out)[:, None, :, None] * unit_h[None, :, None, :]  # (n_out, B, ., .)
    return [inside, edge, *(radius * rows)]


@given(
    n_out=st.integers(1, 10),
    n_in=st.integers(1, 10),
    seed=st.integers(0, 9999),
    mode=st.sampled_from(MODES),
)
def test_the_lemma_box_holds_every_weight_perturbation_and_no_more(n_out, n_in, seed, mode):
    """Perturbations drawn from the threat's own definition (not the library's balls) never
    move an output beyond the box, and the furthest of them reach it: a wrong radius fails."""
    layer, g = dense(n_out, n_in, seed)
    budget = layer.budget(Threat(eps_w=0.1, w_mode=mode[0], w_norm=mode[1]))
    h = torch.randn(16, n_in, generator=g)
    radius = budget.activation_radius(h.abs()).expand(16, n_out)
    own = threat_radius(layer.weight, 0.1, *mode)
    reached = torch.zeros(16, n_out)
    for d in weight_draws(layer.weight, own, mode[1], h, g):
        moved = torch.bmm(d, h[:, :, None])[..., 0].abs()
        assert torch.all(moved <= radius * (1 + 1e-5) + 1e-6)
        reached = torch.maximum(reached, moved)
    torch.testing.assert_close(reached, radius, atol=1e-5, rtol=1e-5)


@given(
    seed=st.integers(0, 9999),
    mode=st.sampled_from(MODES),
    bias=st.booleans(),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    groups=st.sampled_from([1, 2]),
)
def test_conv_activation_box_is_sound(seed, mode, bias, stride, padding, groups):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(4, 4, 3, stride=stride, padding=padding, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(4, generator=g))
    layer = Layer(conv, torch.zeros(1, 4, 6, 6))
    kernel = layer.weight
    budget = layer.budget(Threat(eps_w=0.1, w_mode=mode[0], w_norm=mode[1], bias=bias))
    h = torch.randn(3, 4, 6, 6, generator=g)
    balls = budget.parameter_balls(batch_dims=0)
    radius = budget.activation_radius(h.abs())
    for _ in range(5):
        dk = balls["weight"].project(balls["weight"].random(kernel, g) * 3)
        db = balls["bias"].random(layer.bias, g) if bias else None
        moved = layer.forward(h, kernel + dk, None if db is None else layer.bias + db)
        assert torch.all((moved - layer.forward(h)).abs() <= radius * (1 + 1e-5) + 1e-5)


def test_dense_linf_box_is_exactly_the_lemma_radius():
    layer, g = dense(5, 7, 0)
    for mode in ("absolute", "relative", "layer"):
        budget = layer.budget(Threat(eps_w=0.01, w_mode=mode))
        h = torch.randn(3, 7, generator=g)
        r = budget.lemma_radius(h).expand(3, 5)
        torch.testing.assert_close(r, budget.activation_radius(h.abs()).expand(3, 5))
        expected = {
            "absolute": 0.01 * h.abs().sum(1, keepdim=True).expand(3, 5),
            "relative": 0.01 * h.abs() @ layer.weight.abs().T,
            "layer": 0.01 * layer.weight.abs().max() * h.abs().sum(1, keepdim=True),
        }
        torch.testing.assert_close(r, expected[mode].expand(3, 5))


def model_graph():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)
    )
    return read_model(model, torch.rand(1, 1, 6, 6))


def names(budgets):
    return [b.op.weight_name for b in budgets]


def test_layer_selection_by_module_or_weight_name():
    graph = model_graph()
    assert names(perturbed_layers(graph, Threat(eps_w=0.1))) == ["0.weight", "3.weight"]
    assert names(perturbed_layers(graph, Threat(eps_w=0.1, layers=["3"]))) == ["3.weight"]
    assert names(perturbed_layers(graph, Threat(eps_w=0.1, layers=["0.weight"]))) == ["0.weight"]
    assert perturbed_layers(graph, Threat(eps_x=0.1)) == []
    with pytest.raises(ThreatError, match="not a weight of this model.*0.weight, 3.weight"):
        perturbed_layers(graph, Threat(eps_w=0.1, layers=["5.weight"]))
    with pytest.raises(ThreatError, match="bias=True"):
        perturbed_layers(graph, Threat(eps_w=0.1, layers=["3.bias"]))


def test_parametrization_follows_scope_and_layer_type():
    graph = model_graph()
    x = torch.rand(7, 1, 6, 6)
    per_example = JointSpace(graph, Threat(eps_w=0.1), x)
    # the dense layer goes through the lemma: no weight copy
    assert {str(k): v for k, v in per_example.batched.items()} == {
        "w:0.weight": True,
        "t:3.weight": True,
    }
    assert {str(k): tuple(v.shape) for k, v in per_example.zeros(x).items()} == {
        "w:0.weight": (7, 2, 1, 3, 3),
        "t:3.weight": (7, 3),
    }
    shared = JointSpace(graph, Threat(eps_w=0.1, scope="shared", bias=True), x)
    assert not any(shared.batched.values())
    assert {str(k): tuple(v.shape) for k, v in shared.zeros(x).items()} == {
        "w:0.weight": (2, 1, 3, 3),
        "w:0.bias": (2,),
        "w:3.weight": (3, 32),
        "w:3.bias": (3,),
    }
