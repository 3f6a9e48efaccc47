"""Piecewise activations are bounded as the model's dtype decides their branch and rounds their
options (issue 24): near every switch point, torch's own value in that dtype lies inside the
bounds; far from them, the bounds are what they were."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nonsingular as ns
from nonsingular.model.operators.base import Box
from nonsingular.model.operators.elementwise import Elementwise
from nonsingular.model.operators.relaxations import Activation
from nonsingular.model.reader import read_model

f64 = torch.float64
MODEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
METHODS = ("ibp", "crown", "alpha-crown", "bab")


class SP(nn.Module):
    """Softplus(beta=3, threshold=1) then a margin of 0.4 - softplus(x): at x = fl32(1/3)
    float32 computes ``3 x`` as exactly 1.0 (smooth branch, 0.4378, margin -0.038) where float64
    takes the identity (0.3333, margin +0.067)."""

    def __init__(self) -> None:
        super().__init__()
        self.sp = nn.Softplus(beta=3, threshold=1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0], [0.0]]))
            self.fc.bias.copy_(torch.tensor([0.4, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.sp(x))


class WideSP(nn.Module):
    """Three softplus neurons of which only the last sits at the switch point 1/3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(1, 3)
        self.sp = nn.Softplus(beta=3, threshold=1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc0.weight.fill_(1.0)
            self.fc0.bias.copy_(torch.tensor([5.0, -5.0, 0.0]))
            self.fc.weight.copy_(torch.tensor([[0.1, 0.2, -1.0], [0.0, 0.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.4, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.sp(self.fc0(x)))


def _certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str):
    extra = {"time_limit": 1.0} if method == "bab" else {}
    return ns.certify(model, x, y, ns.Threat(eps_x=eps, bounds=None), method, **extra)


def test_the_example_is_misclassified_as_it_runs() -> None:
    x = torch.tensor([[1 / 3]], dtype=torch.float32)
    with torch.no_grad():
        logits = SP()(x)
    assert (3 * x).item() == 1.0  # float32 rounds 3 * fl32(1/3) to 1: the smooth branch
    assert logits[0, 0] - logits[0, 1] < -0.03


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps", [0.0, 1e-7, 1e-4])
def test_softplus_switch_example_is_not_certified(method: str, eps: float) -> None:
    x, y = torch.tensor([[1 / 3]], dtype=torch.float32), torch.tensor([0])
    result = _certify(SP(), x, y, eps, method)
    assert result.clean_margins[0] < 0
    assert result.lower[0, 1] <= result.clean_margins[0]  # x itself is in every box
    assert not bool(result.certified[0])


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_boxes_partly_across_the_switch(method: str) -> None:
    """(2, 3) softplus boxes of which one column straddles the switch (IBP raised IndexError,
    indexing them as if flat); the bound stays below the clean margins."""
    x, y = torch.full((2, 1), 1 / 3), torch.tensor([0, 1])
    result = _certify(WideSP(), x, y, 1e-3, method)
    lower = result.lower.gather(1, (1 - y)[:, None]).squeeze(1)
    assert torch.isfinite(lower).all()
    assert (lower <= result.clean_margins.to(lower.dtype)).all()


# -------------------------------------------------------------- near every switch point

# (module, its switch points in exact arithmetic)
CASES = [
    (nn.Softplus(beta=3, threshold=1), [1 / 3]),
    (nn.Softplus(beta=1, threshold=20), [20.0]),
    (nn.Softplus(beta=2, threshold=1), [0.5]),
    (nn.Softplus(beta=0.7, threshold=0.3), [0.3 / 0.7]),
    (nn.Softplus(beta=0.5, threshold=0.0), [0.0]),  # beta x underflows to 0 next to 0
    (nn.Softplus(beta=10, threshold=1e-3), [1e-4]),
    (nn.Hardtanh(0.1, 0.7), [0.1, 0.7]),
    (nn.Hardtanh(-1 / 3, 1.3), [-1 / 3, 1.3]),
    (nn.ReLU6(), [0.0, 6.0]),
    (nn.ReLU(), [0.0]),
    (nn.LeakyReLU(0.01), [0.0]),
    (nn.LeakyReLU(-0.3), [0.0]),
    (nn.LeakyReLU(1.7), [0.0]),
    (nn.ELU(1.0), [0.0]),
    (nn.ELU(0.1), [0.0]),
    (nn.GELU(approximate="tanh"), [0.0, -0.7517915246935645]),
]
STEPS = 8  # boxes start at each of the floats within STEPS ulps of a switch point


def _elementwise(module: nn.Module, dtype: torch.dtype) -> Elementwise:
    """The operator the reader makes of ``module`` run on ``dtype`` inputs."""
    graph = read_model(nn.Sequential(module), torch.zeros(1, 1, dtype=dtype))
    ops = [n.op for n in graph.nodes if isinstance(n.op, Elementwise)]
    assert len(ops) == 1 and ops[0].model_dtype == dtype
    return ops[0]


def _floats_around(point: float, dtype: torch.dtype, steps: int) -> torch.Tensor:
    """The ``2 steps + 1`` consecutive floats of ``dtype`` centred on ``point`` rounded."""
    centre = torch.tensor(point, dtype=f64).to(dtype)
    up, down = [centre], [centre]
    for _ in range(steps):
        up.append(torch.nextafter(up[-1], up[-1].new_tensor(math.inf)))
        down.append(torch.nextafter(down[-1], down[-1].new_tensor(-math.inf)))
    return torch.stack(down[:0:-1] + up)


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: repr(CASES[i][0]))
@settings(max_examples=6, deadline=None)
@given(
    which=st.integers(0, 1),
    width=st.integers(0, 4),
    bound_dtype=st.sampled_from([f64, torch.float32]),
)
def test_model_dtype_value_is_inside_the_bounds_near_switches(
    case: int, dtype: torch.dtype, which: int, width: int, bound_dtype: torch.dtype
) -> None:
    """Boxes of ``width`` ulps (0: a single float) starting at every float near a switch point:
    torch's value in the model's dtype at every float of the box lies inside the interval and
    between the lines, up to the operator's own rounding allowance."""
    module, points = CASES[case]
    if dtype == f64:
        bound_dtype = f64  # float32 bounds cannot hold float64 inputs exactly
    op = _elementwise(module, dtype)
    xs = _floats_around(points[which % len(points)], dtype, STEPS + width)
    starts = xs[: len(xs) - width]
    boxes = torch.stack([xs[k : k + width + 1] for k in range(len(starts))])  # (n, width + 1)
    box = Box(boxes[:, 0].to(bound_dtype), boxes[:, -1].to(bound_dtype))
    unit = torch.finfo(dtype).eps / 2 + torch.finfo(bound_dtype).eps / 2
    slack = torch.as_tensor(op.rounding(unit, box), dtype=f64)
    slack = slack.expand(len(starts))[:, None]
    out = op.interval(box)
    lo, hi = out.lower.to(f64)[:, None], out.upper.to(f64)[:, None]
    a_l, b_l, a_u, b_u = (
        t.to(f64)[:, None] for t in op.act.linear_bounds(box.lower, box.upper, op.model_dtype)
    )
    with torch.no_grad():
        value = module(boxes).to(f64)  # torch, in the model's dtype, at every float of each box
    z = boxes.to(f64)
    assert (value >= lo - slack).all() and (value <= hi + slack).all()
    assert (value >= a_l * z + b_l - slack).all() and (value <= a_u * z + b_u + slack).all()


def test_the_operator_passes_its_dtype_to_the_lines() -> None:
    """``Elementwise.backward`` uses the lines of the model's dtype: at the float32 example,
    lam = -1 bounds softplus above by at least torch's float32 value (the smooth branch, where
    float64 takes the identity, 1/3)."""
    op = _elementwise(nn.Softplus(beta=3, threshold=1), torch.float32)
    x = torch.tensor([[1 / 3]], dtype=torch.float32)
    value = nn.Softplus(beta=3, threshold=1)(x).item()
    assert value > 0.43
    lam = -torch.ones(1, 1, 1, dtype=f64)
    lams, const = op.backward(lam, Box(x.to(f64), x.to(f64)))
    upper = -(lams[0][0, 0] * x.to(f64)[0] + const[0]).item()  # -lam . f >= lam_in x + const
    assert upper >= value


# -------------------------------------------------------------- far from every switch point

FAR = [
    Activation("softplus", beta=3.0, threshold=1.0),
    Activation("softplus"),
    Activation("hardtanh", min_val=-0.5, max_val=2.0),
    Activation("relu6"),
    Activation("leaky_relu", alpha=0.25),
    Activation("elu", alpha=1.0),
    Activation("gelu", approximate="tanh"),
    Activation("relu"),
]


@pytest.mark.parametrize("act", FAR, ids=lambda a: a.kind)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bounds_far_from_switches_are_unchanged(act: Activation, dtype: torch.dtype) -> None:
    """With options every dtype holds exactly, on boxes at least 1e-3 away from every switch
    point, the model's dtype changes nothing: the bounds are those of the bounds' own dtype
    (float64: the function torch computes in float64, as before)."""
    gen = torch.Generator().manual_seed(1)
    centre = torch.randn(4000, generator=gen, dtype=f64) * 4
    radius = torch.rand(4000, generator=gen, dtype=f64) * 0.5
    l, u = centre - radius, centre + radius
    switches = {
        "softplus": [act.threshold / act.beta],
        "hardtanh": [act.min_val, act.max_val],
        "relu6": [0.0, 6.0],
    }.get(act.kind, [0.0])
    far = torch.ones_like(l, dtype=torch.bool)
    for t in switches:
        far &= (u < t - 1e-3) | (l > t + 1e-3)
    l, u = l[far], u[far]
    for before, after in zip(act.interval(l, u), act.interval(l, u, dtype), strict=True):
        assert torch.equal(before, after)
    before_lines = act.linear_bounds(l, u)
    after_lines = act.linear_bounds(l, u, dtype)
    for before, after in zip(before_lines, after_lines, strict=True):
        assert torch.equal(before, after)


def test_options_are_rounded_as_torch_rounds_them() -> None:
    """clamp(x, 0.1) returns float32's 0.1 below it, which float64's 0.1 would exclude."""
    x = torch.tensor([0.05], dtype=torch.float32)
    value = nn.Hardtanh(0.1, 0.7)(x).to(f64)
    act = Activation("hardtanh", min_val=0.1, max_val=0.7)
    lo, hi = act.interval(x.to(f64), x.to(f64), torch.float32)
    assert value.item() != 0.1 and lo.item() <= value.item() <= hi.item()
    lo64, hi64 = act.interval(x.to(f64), x.to(f64))
    assert not (lo64.item() <= value.item() <= hi64.item())  # float64's own function


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
def test_max_pool_ties_need_no_window(dtype: torch.dtype) -> None:
    """A max picks one of equal values: on windows of ties and of neighbouring floats, the
    interval at a single point is torch's own output in the model's dtype, exactly."""
    xs = _floats_around(1 / 3, dtype, 3)  # 7 consecutive floats
    x = torch.stack([xs[:4], xs[:4].flip(0), xs[3:], xs[[3, 3, 3, 3]]]).reshape(1, 1, 4, 4)
    graph = read_model(nn.Sequential(nn.MaxPool2d(2)), x)
    (op,) = [n.op for n in graph.nodes[1:]]
    out = op.interval(Box(x.to(f64), x.to(f64)))
    with torch.no_grad():
        value = nn.MaxPool2d(2)(x).to(f64)
    assert torch.equal(out.lower, value) and torch.equal(out.upper, value)
