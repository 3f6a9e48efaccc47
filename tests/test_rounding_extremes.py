"""Certificates at both ends of the model's dtype: values that may overflow are never
certified, and rounding in the subnormal range (absolute, not relative) is accounted for."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, vmap

import nonsingular as ns
from nonsingular.certificates import METHODS

from .test_certificates import sample_inputs, sample_parameters

DTYPES = [torch.float16, torch.float32, torch.float64]
FAST = ["closed-form", "recursive", "ibp", "crown"]
GRAPHS = ["ibp", "crown", "alpha-crown", "bab"]  # the methods that bound any graph


def dense(weight, bias, dtype):
    """A Linear layer holding exactly ``weight`` and ``bias`` (given in float64) in ``dtype``."""
    layer = nn.Linear(len(weight[0]), len(weight)).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float64).to(dtype))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64).to(dtype))
    return nn.Sequential(layer).eval()


def big(dtype):
    """Logits ``(0.59 x, 0.88 x) * finfo.max``: class 1 wins by ``0.29 x max`` in exact
    arithmetic, but from ``x = 1.14`` on the model computes ``inf`` for both."""
    top = torch.finfo(dtype).max
    return dense([[0.59 * top], [0.88 * top]], [0.0, 0.0], dtype)


def tiny(dtype):
    """Weights at the smallest subnormal ``s``: in exact arithmetic class 0 wins at
    ``(0.45, 0.49)`` by ``0.04 s``, but the products round to ``(0, s)``: the model's own
    logits rank it wrong (or tie)."""
    info = torch.finfo(dtype)
    s = info.smallest_normal * info.eps  # 2^-24, 2^-149, 2^-1074
    return dense([[s, s], [2 * s, 0.0]], [0.0, 0.0], dtype)


def certify(model, x, y, threat, method, dtype=torch.float64):
    result = ns.certify(model, x, y, threat, method, dtype=dtype, time_limit=0.5)
    assert not bool(result.lower.isnan().any()), f"{method}: a NaN bound"
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_values_that_overflow_are_never_certified(dtype, method):
    model = big(dtype)
    x, y = torch.tensor([[1.0]], dtype=dtype), torch.tensor([1])
    assert bool(model(x * 1.8).isinf().all())  # the model itself overflows in the threat
    threat = ns.Threat(eps_x=0.8, bounds=None)
    for bound_dtype in (torch.float64, torch.float32):
        result = certify(model, x, y, threat, method, bound_dtype)
        assert not bool(result.certified.any()), f"{method} certified an overflowing model"
        assert result.worst.item() == float("-inf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_subnormal_margins_are_never_certified(dtype, method):
    model = tiny(dtype)
    x, y = torch.tensor([[0.45, 0.49]], dtype=dtype), torch.tensor([0])
    logits = model(x)
    assert logits[0, 0] <= logits[0, 1]  # the model as it runs does not rank class 0 first
    for bound_dtype in (torch.float64, torch.float32):
        result = certify(model, x, y, ns.Threat(), method, bound_dtype)
        assert not bool(result.certified.any()), f"{method} certified a subnormal margin"


@pytest.mark.parametrize("method", METHODS)
def test_an_overflowing_example_leaves_the_others_of_its_batch_certified(method):
    model = big(torch.float32)
    x, y = torch.tensor([[1e-3], [1.2]]), torch.tensor([1, 1])
    assert bool(model(x)[0].isfinite().all()) and bool(model(x)[1].isinf().any())
    result = certify(model, x, y, ns.Threat(eps_x=5e-4, bounds=None), method)
    assert result.certified.tolist() == [True, False]
    assert result.worst[1].item() == float("-inf")


def test_float32_bounds_of_a_float64_model_near_1e300_are_not_trusted():
    model = dense([[1e300], [2e300]], [0.0, 0.0], torch.float64)
    x, y = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([1])
    threat = ns.Threat(eps_x=0.1, bounds=None)
    for method in FAST:
        assert bool(certify(model, x, y, threat, method).certified.all())  # float64 bounds
        result = certify(model, x, y, threat, method, torch.float32)  # 1e300 is inf there
        assert result.worst.item() == float("-inf")


class ConstantsAsTheModelComputesThem(nn.Module):
    """Logits ``fc(x) + k (a / b - c) e_0`` with ``fc`` zero but its bias, ``a = 1`` (a
    parameter, so that the graph computes the constant), buffers ``b = 25`` and
    ``c = fl32(0.04)``: float32 divides ``1 / 25`` to ``c`` exactly, so the model computes a
    tie (class 0 does not win); in float64 ``a / b - c = 8.9e-10`` and ``k = 2**20`` makes it a
    margin of 9e-4. ``scale`` multiplies the logits by a Python number as the model's kernel
    holds it (``2**128`` is float32's ``inf``)."""

    def __init__(self, scale: float = 1.0, bias: tuple[float, float] = (1e-10, 1e-10)) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor(bias))
        self.a = nn.Parameter(torch.tensor(1.0))  # a parameter: the graph computes with it
        for name, value in (("b", 25.0), ("c", 0.04), ("e", [1.0, 0.0])):
            self.register_buffer(name, torch.tensor(value))
        self.scale = scale

    def forward(self, x):
        logits = self.fc(x) + (self.a / self.b - self.c) * 2.0**20 * self.e
        return logits * self.scale if self.scale != 1.0 else logits


@pytest.mark.parametrize("method", GRAPHS)
def test_constants_are_computed_in_the_model_dtype(method):
    model = ConstantsAsTheModelComputesThem()
    x, y = torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    logits = model(x)
    assert logits[0, 0] <= logits[0, 1]  # a tie as the model runs
    assert not bool(certify(model, x, y, ns.Threat(), method).certified.any())


@pytest.mark.parametrize("method", GRAPHS)
def test_number_operands_are_rounded_as_the_kernel_holds_them(method):
    # logits (1e-10, 2e-10) 2**128: 3.4e28 and 6.8e28 in float64, inf and inf in float32
    model = ConstantsAsTheModelComputesThem(scale=2.0**128, bias=(1e-10, 2e-10))
    x, y = torch.tensor([[0.5, 0.5]]), torch.tensor([1])
    assert not bool(model(x).isfinite().any())  # inf against inf: class 0 first
    assert not bool(certify(model, x, y, ns.Threat(), method).certified.any())


def random_margins(model, x, y, threat, n):
    """(n, B, K) margins ``z_y - z_j`` of the model's own logits (subtracted exactly, in
    float64) under n random joint perturbations per example, each run through the unmodified
    model with its weights materialized."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(len(x)):
        params = sample_parameters(model, x[i : i + 1], threat, n, g)
        xs = sample_inputs(x[i], threat, n, g)
        logits = vmap(lambda p, xi: functional_call(model, p, (xi[None],))[0])(params, xs)
        logits = logits.detach().double()
        out.append(logits[:, y[i] : y[i] + 1] - logits)
    return torch.stack(out, dim=1)


@st.composite
def scaled_networks(draw):
    """A small float32 ReLU MLP whose last layer is scaled by ``2^k`` with ``k`` near either
    end of float32's range (or its first layer, so that every value is scaled), and a batch."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    width, hidden, classes = draw(st.integers(1, 4)), draw(st.integers(1, 6)), 3
    model = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes)).eval()
    scale = 2.0 ** draw(st.sampled_from([118, 122, 125, -120, -130, -140]))
    layer = model[draw(st.sampled_from([0, 2]))]
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.mul_(scale)
    x = torch.rand(4, width, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, classes, (4,), generator=torch.Generator().manual_seed(seed + 1))
    return model, x, y


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=scaled_networks(),
    eps=st.sampled_from([(0.0, 0.0), (0.02, 0.0), (0.02, 0.01)]),
)
def test_certificates_hold_for_the_model_as_it_runs_near_both_ends(case, eps):
    """Every certified lower bound is below the margin of every materialized perturbation
    (inputs in the box, its corners, relative weight moves within the budget, run through the
    unmodified float32 model), and no certified example has a non-finite logit there."""
    model, x, y = case
    threat = ns.Threat(eps_x=eps[0], eps_w=eps[1], w_mode="relative")
    samples = random_margins(model, x, y, threat, n=64)  # (n, B, K)
    for method in FAST:
        for bound_dtype in (torch.float64, torch.float32):
            result = certify(model, x, y, threat, method, bound_dtype)
            for i in result.certified.nonzero().flatten().tolist():
                seen = samples[:, i]
                assert bool(seen.isfinite().all()), f"{method}: certified, the model overflows"
                lower = result.lower[i].double().nan_to_num(posinf=float("-inf"))  # skip j = y
                assert bool((seen >= lower).all()), f"{method}: a perturbation went below"
