import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nonsingular as ns
from nonsingular import Threat, ThreatError, grid


def test_defaults_are_the_paper_threat():
    t = Threat(eps_x=0.1, eps_w=0.002)
    assert (t.x_norm, t.w_mode, t.w_norm, t.scope) == ("linf", "absolute", "linf", "per-example")
    assert t.bounds == (0.0, 1.0) and t.layers is None and t.bias is False
    assert t.perturbs_input and t.perturbs_weights
    assert "eps_x=0.1" in t.describe() and "eps_w=0.002" in t.describe()
    assert Threat().describe() == "no perturbation"


def test_threat_is_immutable():
    t = Threat(eps_x=0.1)
    with pytest.raises(AttributeError):
        t.eps_x = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps_x": -0.1},
        {"eps_w": -1e-3},
        {"eps_x": math.nan},
        {"eps_w": math.inf},
        {"eps_x": "0.1"},
        {"x_norm": "l1"},
        {"w_mode": "multiplicative"},
        {"w_norm": "l1"},
        {"scope": "global"},
        {"w_norm": "l2", "w_mode": "layer"},
        {"layers": "0.weight"},
        {"layers": []},
        {"bounds": (1.0, 0.0)},
        {"bounds": (0.0, math.nan)},
        {"bias": "yes"},
    ],
)
def test_invalid_threats_raise_a_value_error_naming_the_field(kwargs):
    with pytest.raises(ThreatError) as info:
        Threat(**kwargs)
    assert isinstance(info.value, ValueError)
    assert next(iter(kwargs)) in str(info.value)


@given(
    eps_x=st.floats(0, 10, allow_nan=False),
    eps_w=st.floats(0, 10, allow_nan=False),
    x_norm=st.sampled_from(["linf", "l2"]),
    w_mode=st.sampled_from(["absolute", "relative"]),
    w_norm=st.sampled_from(["linf", "l2"]),
    scope=st.sampled_from(["per-example", "shared"]),
    bias=st.booleans(),
)
def test_round_trip_through_dict(eps_x, eps_w, x_norm, w_mode, w_norm, scope, bias):
    t = Threat(eps_x, eps_w, x_norm, w_mode, w_norm, scope, ("0.weight",), bias)
    assert Threat.from_dict(t.to_dict()) == t
    assert t.replace(eps_x=0.0).eps_x == 0.0 and t.replace(eps_x=0.0).eps_w == t.eps_w


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ThreatError, match="unknown threat fields: epsilon"):
        Threat.from_dict({"epsilon": 0.1})


def test_grid_is_the_product_with_eps_x_slowest():
    g = grid(eps_x=[0, 0.1], eps_w=[0, 1e-3, 2e-3], scope="shared")
    assert [(t.eps_x, t.eps_w) for t in g] == [
        (0, 0),
        (0, 1e-3),
        (0, 2e-3),
        (0.1, 0),
        (0.1, 1e-3),
        (0.1, 2e-3),
    ]
    assert all(t.scope == "shared" for t in g)
    with pytest.raises(ThreatError):
        grid(eps_x=[], eps_w=[0])
    with pytest.raises(ThreatError):
        grid(eps_x=[-1], eps_w=[0])


def _rescaled(model: torch.nn.Sequential, c: float) -> torch.nn.Sequential:
    """The same function with the first layer (weight and bias) times ``c`` and the second
    layer's weight divided by it: ReLU is positively homogeneous, so nothing the model
    computes changes, only how its weights are spread between the layers."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(c)
        other[0].bias.mul_(c)
        other[2].weight.div_(c)
    return other


@pytest.mark.parametrize("c", [0.25, 8.0])
def test_relative_and_layer_budgets_are_scale_invariant_and_absolute_ones_are_not(c):
    """The experiment's scale-invariant weight view: rescaling consecutive ReLU layers (which
    leaves the function unchanged) leaves attacks and certificates under relative and layer
    budgets unchanged, while the absolute budget's results move (it is not scale-invariant,
    so the weight-relative family sits beside the weight-absolute one)."""

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4)
    ).double()
    other = _rescaled(model, c)
    x = torch.rand(16, 6, dtype=torch.float64)
    y = model(x).argmax(1)
    assert torch.allclose(model(x), other(x), atol=1e-12)  # the same function
    options = {"steps": 20, "restarts": 1, "loss": "margin"}
    for threat in (
        Threat(eps_x=0.05, eps_w=0.05, w_mode="relative"),
        Threat(eps_w=0.05, w_mode="layer"),
    ):
        a, b = ns.attack(model, x, y, threat, **options), ns.attack(other, x, y, threat, **options)
        assert torch.allclose(a.margins, b.margins, atol=1e-9), threat.describe()
        for method in ("ibp", "crown"):
            ca, cb = (
                ns.certify(model, x, y, threat, method),
                ns.certify(other, x, y, threat, method),
            )
            assert torch.allclose(ca.worst, cb.worst, rtol=1e-6, atol=1e-9), (threat, method)
    absolute = Threat(eps_w=0.05)
    a, b = ns.attack(model, x, y, absolute, **options), ns.attack(other, x, y, absolute, **options)
    assert (a.margins - b.margins).abs().max() > 1e-3
    ca, cb = ns.certify(model, x, y, absolute, "crown"), ns.certify(other, x, y, absolute, "crown")
    assert (ca.worst - cb.worst).abs().max() > 1e-3
