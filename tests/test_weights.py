"""The key lemma: per-example weight perturbations of a dense layer are activation boxes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nonsingular import Threat, ThreatError
from nonsingular.balls import make_ball
from nonsingular.layers import Affine
from nonsingular.network import Network
from nonsingular.weights import LayerBudget, perturbed_layers, weight_variables

MODES = [
    ("absolute", "linf"),
    ("relative", "linf"),
    ("layer", "linf"),
    ("absolute", "l2"),
    ("relative", "l2"),
]


def dense(n_out, n_in, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    return Affine("fc", w, b), g


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
    budget = LayerBudget.from_threat(layer, threat)
    h = torch.randn(n_in, generator=g)
    if sparse:  # ReLU outputs have exact zeros
        h = h.clamp_min(0)
    t = make_ball(mode[1], 1.0, batch_dims=1).random(torch.empty(1, n_out), g)[0]
    deltas = budget.materialize_lemma(h, t)
    assert in_parameter_ball(budget, deltas["fc.weight"], "weight")
    moved = F.linear(h, layer.weight + deltas["fc.weight"], layer.bias + deltas.get("fc.bias", 0))
    expected = layer.forward(h[None])[0] + budget.lemma_radius(h[None])[0] * t
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-5)
    if bias:
        assert in_parameter_ball(budget, deltas["fc.bias"], "bias")


@given(
    n_out=st.integers(1, 10),
    n_in=st.integers(1, 10),
    seed=st.integers(0, 9999),
    mode=st.sampled_from(MODES),
)
def test_no_weight_perturbation_moves_a_dense_output_beyond_the_lemma_box(n_out, n_in, seed, mode):
    layer, g = dense(n_out, n_in, seed)
    budget = LayerBudget.from_threat(layer, Threat(eps_w=0.1, w_mode=mode[0], w_norm=mode[1]))
    h = torch.randn(16, n_in, generator=g)
    ball = budget.parameter_balls(batch_dims=1)["weight"]
    deltas = ball.random(torch.empty(16, n_out, n_in), g)
    corners = ball.project(torch.randn(16, n_out, n_in, generator=g) * 100)  # on the boundary
    radius = budget.activation_radius(h.abs())
    for d in (deltas, corners):
        moved = torch.bmm(d, h[:, :, None])[..., 0]
        assert torch.all(moved.abs() <= radius * (1 + 1e-5) + 1e-6)


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
    kernel = torch.randn(4, 4 // groups, 3, 3, generator=g)
    conv = {
        "stride": (stride, stride),
        "padding": (padding, padding),
        "dilation": (1, 1),
        "groups": groups,
    }
    layer = Affine("conv", kernel, torch.randn(4, generator=g), conv)
    budget = LayerBudget.from_threat(
        layer, Threat(eps_w=0.1, w_mode=mode[0], w_norm=mode[1], bias=bias)
    )
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
        budget = LayerBudget.from_threat(layer, Threat(eps_w=0.01, w_mode=mode))
        h = torch.randn(3, 7, generator=g)
        r = budget.lemma_radius(h).expand(3, 5)
        torch.testing.assert_close(r, budget.activation_radius(h.abs()).expand(3, 5))
        expected = {
            "absolute": 0.01 * h.abs().sum(1, keepdim=True).expand(3, 5),
            "relative": 0.01 * h.abs() @ layer.weight.abs().T,
            "layer": 0.01 * layer.weight.abs().max() * h.abs().sum(1, keepdim=True),
        }
        torch.testing.assert_close(r, expected[mode].expand(3, 5))


def model_net():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)
    )
    return Network.from_module(model)


def test_layer_selection_by_module_or_weight_name():
    net = model_net()
    assert [k for k, _ in perturbed_layers(net, Threat(eps_w=0.1))] == [0, 3]
    assert [k for k, _ in perturbed_layers(net, Threat(eps_w=0.1, layers=["3"]))] == [3]
    assert [k for k, _ in perturbed_layers(net, Threat(eps_w=0.1, layers=["0.weight"]))] == [0]
    assert perturbed_layers(net, Threat(eps_x=0.1)) == []
    with pytest.raises(ThreatError, match="not a weight of this model.*0.weight, 3.weight"):
        perturbed_layers(net, Threat(eps_w=0.1, layers=["5.weight"]))
    with pytest.raises(ThreatError, match="bias=True"):
        perturbed_layers(net, Threat(eps_w=0.1, layers=["3.bias"]))


def test_parametrization_follows_scope_and_layer_type():
    net = model_net()
    per_example = weight_variables(net, Threat(eps_w=0.1))
    assert type(per_example[0]).__name__ == "ParameterVariables" and per_example[0].batched
    assert type(per_example[3]).__name__ == "ActivationVariables"  # the lemma: no weight copy
    assert per_example[3].shapes(7) == {"t": (7, 3)}
    shared = weight_variables(net, Threat(eps_w=0.1, scope="shared", bias=True))
    assert all(not v.batched for v in shared.values())
    assert shared[3].shapes(7) == {"weight": (3, 32), "bias": (3,)}
