"""Soundness and tightness of the max-pool and layer-norm bounds (interval and backward).

Soundness is checked against the real ``torch.nn.functional`` operations at many points of
each box (random interior points and random corners): the interval must contain the output,
and ``sum(lam * op(h)) >= sum(lam_in * h) + const`` must hold for random ``lam`` of both signs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from nonsingular.errors import BoundError
from nonsingular.model.operators.layernorm_bounds import (
    _Centered,
    _product_planes,
    layernorm_backward,
    layernorm_interval,
)
from nonsingular.model.operators.maxpool_bounds import maxpool_backward, maxpool_interval

DT = torch.float64
SAMPLES = 48  # half interior points, half corners


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box(shape, seed: int, width: float, constant_rows: bool = False, ties: bool = False):
    """Random ``lower <= upper`` of ``shape``; ``constant_rows``: all centers (nearly) equal."""
    g = generator(seed)
    if constant_rows:
        center = torch.randn((), generator=g, dtype=DT) + 1e-7 * torch.randn(
            shape, generator=g, dtype=DT
        )
    else:
        center = torch.randn(shape, generator=g, dtype=DT)
        if ties:  # equal lower bounds / upper bounds inside windows
            center = center.round()
    radius = torch.rand(shape, generator=g, dtype=DT) * width
    if ties:
        radius = torch.full(shape, width, dtype=DT)
    return center - radius, center + radius


def points(lower, upper, seed: int, count: int = SAMPLES):
    """``(count, *shape)`` points of the box: random interior points, then random corners."""
    g = generator(seed)
    shape = (count // 2, *lower.shape)
    u = torch.rand(shape, generator=g, dtype=lower.dtype)
    inner = (lower + (upper - lower) * u).clamp(lower, upper)
    corner = torch.where(torch.rand(shape, generator=g, dtype=lower.dtype) < 0.5, lower, upper)
    return torch.cat([inner, corner])


def apply(op, h):
    """``op`` on ``(S, B, *in)`` points at once (stacked into one batch)."""
    s, b = h.shape[:2]
    y = op(h.reshape(s * b, *h.shape[2:]))
    return y.reshape(s, b, *y.shape[1:])


def linear_value(lam, h):
    """``sum(lam * h)`` per ``(s, b, k)``: ``lam: (B, K, *shape)``, ``h: (S, B, *shape)``."""
    return (lam[None] * h[:, :, None]).flatten(3).sum(-1)


def box_minimum(lam_in, const, lower, upper):
    """``min over the box of lam_in . h + const``: ``(B, K)``."""
    lo, hi = lower[:, None], upper[:, None]
    return (lam_in.clamp(min=0) * lo + lam_in.clamp(max=0) * hi).flatten(2).sum(-1) + const


def assert_backward_sound(op, lam, lam_in, const, h, rtol=1e-9):
    y = apply(op, h)
    lhs = linear_value(lam, y)
    rhs = linear_value(lam_in, h) + const
    scale = (1 + lam.abs().flatten(1).sum(-1).max()) * (1 + h.abs().max() + y.abs().max())
    assert torch.all(lhs >= rhs - rtol * scale), float((rhs - lhs).max())


# ---------------------------------------------------------------------------------- max pool


pool_options = st.fixed_dictionaries(
    {
        "dims": st.sampled_from([1, 2]),
        "kernel_size": st.integers(1, 3),
        "stride": st.integers(1, 3) | st.none(),
        "dilation": st.integers(1, 2),
        "ceil_mode": st.booleans(),
        "pad_fraction": st.integers(0, 1),
    }
)


def pool_setup(options, sizes):
    opts = dict(options)
    opts["padding"] = opts.pop("pad_fraction") * (opts["kernel_size"] // 2)
    dims = opts["dims"]
    pool = F.max_pool1d if dims == 1 else F.max_pool2d
    torch_opts = {key: value for key, value in opts.items() if key != "dims"}

    def op(x):
        return pool(x, **torch_opts)

    return opts, op, tuple(sizes[:dims])


@given(
    options=pool_options,
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=2),
    batch=st.integers(1, 2),
    channels=st.integers(1, 2),
    width=st.sampled_from([0.0, 1e-3, 0.3, 3.0]),
    ties=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_maxpool_bounds_are_sound(options, sizes, batch, channels, width, ties, seed):
    opts, op, spatial = pool_setup(options, sizes)
    lower, upper = box((batch, channels, *spatial), seed, width, ties=ties)
    try:
        y_lo_true, y_hi_true = op(lower), op(upper)
    except RuntimeError:
        assume(False)  # torch rejects these options for this input size
    assume(bool(torch.isfinite(y_lo_true).all()))  # a window of padding only (tested below)
    y_lo, y_hi = maxpool_interval(lower, upper, **opts)
    assert torch.equal(y_lo, y_lo_true) and torch.equal(y_hi, y_hi_true)  # monotone: exact

    lam = torch.randn((batch, 3, *y_lo.shape[1:]), generator=generator(seed + 1), dtype=DT)
    lam_in, const = maxpool_backward(lam, lower, upper, **opts)
    assert lam_in.shape == (batch, 3, *lower.shape[1:]) and const.shape == (batch, 3)
    h = points(lower, upper, seed + 2)
    y = apply(op, h)
    assert torch.all((y >= y_lo) & (y <= y_hi))
    assert_backward_sound(op, lam, lam_in, const, h)
    # the lower relaxation of every window puts its whole weight on one real input
    positive = lam.clamp(min=0)
    lam_in_pos, _ = maxpool_backward(positive, lower, upper, **opts)
    torch.testing.assert_close(lam_in_pos.flatten(2).sum(-1), positive.flatten(2).sum(-1))
    # the chord never loses to the constant upper bound max_j u_j on the box
    negative = lam.clamp(max=0)
    lam_in_neg, const_neg = maxpool_backward(negative, lower, upper, **opts)
    constant = (negative * y_hi[:, None]).flatten(2).sum(-1)
    assert torch.all(box_minimum(lam_in_neg, const_neg, lower, upper) >= constant - 1e-12)


@given(
    options=pool_options,
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=2),
    seed=st.integers(0, 10_000),
)
def test_maxpool_relaxation_is_exact_when_every_window_is_dominated(options, sizes, seed):
    opts, op, spatial = pool_setup(options, sizes)
    g = generator(seed)
    n = math.prod(spatial)
    rank = torch.randperm(n, generator=g).to(DT).reshape(spatial)  # distinct levels, 10 apart
    center = 10 * rank + torch.randn((2, 2, *spatial), generator=g, dtype=DT)
    radius = 0.4 * torch.rand((2, 2, *spatial), generator=g, dtype=DT)
    lower, upper = center - radius, center + radius
    try:
        out = op(lower)
    except RuntimeError:
        assume(False)
    assume(bool(torch.isfinite(out).all()))
    lam = torch.randn((2, 4, *out.shape[1:]), generator=g, dtype=DT)
    lam_in, const = maxpool_backward(lam, lower, upper, **opts)
    h = points(lower, upper, seed + 1)
    torch.testing.assert_close(
        linear_value(lam_in, h) + const, linear_value(lam, apply(op, h)), rtol=0, atol=1e-9
    )
    assert torch.all(const == 0)


def test_maxpool_upper_relaxation_is_the_chord():
    """Window {x1 in [0, 2], x2 in [1, 1.5]}: max <= 1.5 + 0.25 x1, below the constant 2."""
    lower = torch.tensor([[[0.0, 1.0]]], dtype=DT)
    upper = torch.tensor([[[2.0, 1.5]]], dtype=DT)
    opts = dict(dims=1, kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode=False)
    lam = torch.tensor([[[[-1.0]], [[1.0]]]], dtype=DT)  # (B=1, K=2, C=1, L=1)
    lam_in, const = maxpool_backward(lam, lower, upper, **opts)
    torch.testing.assert_close(lam_in, torch.tensor([[[[-0.25, 0.0]], [[0.0, 1.0]]]], dtype=DT))
    torch.testing.assert_close(const, torch.tensor([[-1.5, 0.0]], dtype=DT))


def test_maxpool_never_selects_padding():
    """All inputs negative: implicit padding is -inf, not 0, so a real input is chosen."""
    lower = -torch.tensor([[[3.0, 2.0, 5.0]]], dtype=DT)
    upper = lower + 0.5
    opts = dict(dims=1, kernel_size=3, stride=1, padding=1, dilation=1, ceil_mode=True)
    y_lo, y_hi = maxpool_interval(lower, upper, **opts)
    torch.testing.assert_close(y_lo, torch.tensor([[[-2.0, -2.0, -2.0]]], dtype=DT))
    lam = torch.tensor([[[[1.0, -2.0, 3.0]]]], dtype=DT)
    lam_in, const = maxpool_backward(lam, lower, upper, **opts)
    # x2 dominates every window: the bound is exact and puts all weight on x2
    torch.testing.assert_close(lam_in, torch.tensor([[[[0.0, 2.0, 0.0]]]], dtype=DT))
    assert float(const.abs().max()) == 0.0


def test_maxpool_rejects_windows_of_padding_only_and_bad_shapes():
    x = torch.zeros(1, 1, 1, dtype=DT)
    with pytest.raises(BoundError, match="only padding"):
        maxpool_backward(
            torch.zeros(1, 1, 1, 1, dtype=DT),
            x,
            x,
            dims=1,
            kernel_size=2,
            stride=1,
            padding=1,
            dilation=2,
            ceil_mode=False,
        )
    with pytest.raises(BoundError, match="lam shape"):
        maxpool_backward(
            torch.zeros(1, 1, 1, 5, dtype=DT),
            torch.zeros(1, 1, 4, dtype=DT),
            torch.zeros(1, 1, 4, dtype=DT),
            dims=1,
            kernel_size=2,
            stride=None,
            padding=0,
            dilation=1,
            ceil_mode=False,
        )


# -------------------------------------------------------------------------------- layer norm


def layernorm_setup(normalized, affine, seed):
    g = generator(seed)
    weight = torch.randn(normalized, generator=g, dtype=DT) if affine in ("w", "wb") else None
    bias = torch.randn(normalized, generator=g, dtype=DT) if affine in ("b", "wb") else None
    return weight, bias


layernorm_cases = st.fixed_dictionaries(
    {
        "normalized": st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
        "lead": st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
        "affine": st.sampled_from(["none", "w", "b", "wb"]),
        "eps": st.sampled_from([1e-5, 1e-2]),
        "width": st.sampled_from([0.0, 1e-6, 1e-3, 0.3, 3.0, 100.0]),
        "constant_rows": st.booleans(),
        "seed": st.integers(0, 10_000),
    }
)


@given(case=layernorm_cases, relaxation=st.sampled_from(["best", "linear", "constant"]))
def test_layernorm_bounds_are_sound(case, relaxation):
    normalized, seed, eps = case["normalized"], case["seed"], case["eps"]
    shape = case["lead"] + normalized
    weight, bias = layernorm_setup(normalized, case["affine"], seed)
    lower, upper = box(shape, seed + 1, case["width"], case["constant_rows"])
    opts = dict(normalized_shape=normalized, weight=weight, bias=bias, eps=eps)

    def op(x):
        return F.layer_norm(x, normalized, weight, bias, eps)

    y_lo, y_hi = layernorm_interval(lower, upper, **opts)
    h = points(lower, upper, seed + 2)
    y = apply(op, h)
    tol = 1e-9 * (1 + h.abs().max() + y.abs().max())
    assert torch.all((y >= y_lo - tol) & (y <= y_hi + tol))

    lam = torch.randn((shape[0], 3, *shape[1:]), generator=generator(seed + 3), dtype=DT)
    lam_in, const = layernorm_backward(lam, lower, upper, relaxation=relaxation, **opts)
    assert lam_in.shape == lam.shape and const.shape == (shape[0], 3)
    assert_backward_sound(op, lam, lam_in, const, h)
    if relaxation == "best":  # never looser than the constant relaxation on the box
        lam_c, const_c = layernorm_backward(lam, lower, upper, relaxation="constant", **opts)
        assert torch.all(lam_c == 0)
        best = box_minimum(lam_in, const, lower, upper)
        assert torch.all(best >= box_minimum(lam_c, const_c, lower, upper) - 1e-9 * (1 + tol))


@given(case=layernorm_cases)
def test_layernorm_relaxation_candidates_are_each_sound(case):
    """The backward bound picks one candidate per row, so each must be sound on its own:
    the per-coordinate lines around every ``z_i`` and both McCormick planes of every row."""
    normalized, seed, eps = case["normalized"], case["seed"], case["eps"]
    n = math.prod(normalized)
    shape = (math.prod(case["lead"]), n)
    lower, upper = box(shape, seed + 1, case["width"], case["constant_rows"])
    h = points(lower, upper, seed + 2, 4 * SAMPLES)  # (S, M, n)
    c = h - h.mean(-1, keepdim=True)
    z = F.layer_norm(h, (n,), eps=eps)
    tol = 1e-9 * (1 + h.abs().max() + z.abs().max())
    rows = _Centered(lower, upper, n, eps)
    s_lo, t_lo, s_hi, t_hi = rows.lines()
    assert torch.all(s_lo * c + t_lo <= z + tol) and torch.all(z <= s_hi * c + t_hi + tol)
    z_lo, z_hi = rows.z_bounds()
    assert torch.all((z >= z_lo - tol) & (z <= z_hi + tol))

    batched = _Centered(lower[None], upper[None], n, eps)  # B = 1, M rows
    w = torch.randn((1, 3, *shape), generator=generator(seed + 3), dtype=DT)
    objective = (w[None] * z[:, None, None]).sum(-1)  # (S, 1, K, M)
    for alpha, beta in _product_planes(batched, w, lower[None, None], upper[None, None]):
        plane = (alpha[None] * c[:, None, None]).sum(-1) + beta[None]
        scale = 1 + alpha.abs().sum(-1).max() * (1 + h.abs().max()) + beta.abs().max()
        assert torch.all(plane <= objective + 1e-9 * scale * (1 + objective.abs().max()))


@given(case=layernorm_cases)
def test_layernorm_is_exact_on_a_zero_width_box(case):
    normalized, seed, eps = case["normalized"], case["seed"], case["eps"]
    shape = case["lead"] + normalized
    weight, bias = layernorm_setup(normalized, case["affine"], seed)
    x, _ = box(shape, seed + 1, 0.0, case["constant_rows"])
    opts = dict(normalized_shape=normalized, weight=weight, bias=bias, eps=eps)
    y = F.layer_norm(x, normalized, weight, bias, eps)
    y_lo, y_hi = layernorm_interval(x, x, **opts)
    torch.testing.assert_close(y_lo, y, rtol=0, atol=1e-9)
    torch.testing.assert_close(y_hi, y, rtol=0, atol=1e-9)
    lam = torch.randn((shape[0], 2, *shape[1:]), generator=generator(seed + 2), dtype=DT)
    expected = linear_value(lam, y[None])[0]
    for relaxation in ("best", "linear", "constant"):
        lam_in, const = layernorm_backward(lam, x, x, relaxation=relaxation, **opts)
        value = linear_value(lam_in, x[None])[0] + const
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-9)


@given(
    normalized=st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple),
    affine=st.sampled_from(["none", "w", "wb"]),
    seed=st.integers(0, 10_000),
)
def test_layernorm_interval_is_bounded_for_very_wide_boxes(normalized, affine, seed):
    """``|z_i| < sqrt(n - 1) <= sqrt(n)`` always, so ``|y - b| <= sqrt(n - 1) |g|``."""
    weight, bias = layernorm_setup(normalized, affine, seed)
    lower, upper = box((3, *normalized), seed + 1, 1e6)
    y_lo, y_hi = layernorm_interval(
        lower, upper, normalized_shape=normalized, weight=weight, bias=bias, eps=1e-5
    )
    n = math.prod(normalized)
    g = torch.ones(normalized, dtype=DT) if weight is None else weight
    b = torch.zeros(normalized, dtype=DT) if bias is None else bias
    cap = math.sqrt(n - 1) * g.abs() + 1e-9
    assert torch.all((y_lo - b).abs() <= cap) and torch.all((y_hi - b).abs() <= cap)
    assert torch.all(cap <= math.sqrt(n) * g.abs() + b.abs() + 1e-9)
    if n > 1:  # and the cap is nearly reached: such boxes hold nearly one-hot rows
        assert torch.all((y_hi - y_lo) >= 1.99 * math.sqrt(n - 1) * g.abs() * 0.99)


def test_layernorm_interval_is_close_to_first_order_for_narrow_boxes():
    """Width of the interval vs the linearized range ``sum_j |J_ij| r_j`` (r = 1e-6)."""
    n, r = 8, 1e-6
    center = torch.randn(4, n, generator=generator(0), dtype=DT)
    lower, upper = center - r, center + r
    y_lo, y_hi = layernorm_interval(
        lower, upper, normalized_shape=(n,), weight=None, bias=None, eps=1e-5
    )
    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda x: F.layer_norm(x, (n,)), c) for c in center]
    )
    linear_range = 2 * r * jac.abs().sum(-1)  # (4, n)
    ratio = (y_hi - y_lo) / linear_range
    assert torch.all(ratio >= 1 - 1e-6)  # sound
    assert float(ratio.max()) < 3.0  # and not lazy


def test_layernorm_linear_relaxation_beats_the_constant_one_on_narrow_boxes():
    """On narrow boxes the backward bound is first-order exact; the constant one is not."""
    n, r = 4, 1e-3
    g = generator(1)
    center = torch.randn(6, n, generator=g, dtype=DT)
    lower, upper = center - r, center + r
    weight = torch.randn(n, generator=g, dtype=DT)
    opts = dict(normalized_shape=(n,), weight=weight, bias=None, eps=1e-5)
    lam = torch.randn(6, 5, n, generator=g, dtype=DT)
    corners = torch.tensor(
        [[(i >> j) & 1 for j in range(n)] for i in range(2**n)], dtype=DT
    )  # all 16 corners, plus interior points
    h = torch.cat([lower + (upper - lower) * corners[:, None], points(lower, upper, 2, 200)])
    sampled_min = linear_value(lam, F.layer_norm(h, (n,), weight, None, 1e-5)).amin(0)
    gaps = {}
    for relaxation in ("constant", "linear", "best"):
        lam_in, const = layernorm_backward(lam, lower, upper, relaxation=relaxation, **opts)
        bound = box_minimum(lam_in, const, lower, upper)
        assert torch.all(bound <= sampled_min + 1e-12)
        gaps[relaxation] = sampled_min - bound
    assert torch.all(gaps["linear"] < 0.05 * gaps["constant"])
    assert torch.all(gaps["best"] <= gaps["linear"] + 1e-12)


def test_layernorm_rejects_bad_arguments():
    x = torch.zeros(2, 3, dtype=DT)
    with pytest.raises(BoundError, match="eps"):
        layernorm_interval(x, x, normalized_shape=3, weight=None, bias=None, eps=0.0)
    with pytest.raises(BoundError, match="does not end"):
        layernorm_interval(x, x, normalized_shape=(4,), weight=None, bias=None, eps=1e-5)
    with pytest.raises(BoundError, match="lam"):
        layernorm_backward(
            torch.zeros(2, 1, 4, dtype=DT),
            x,
            x,
            normalized_shape=3,
            weight=None,
            bias=None,
            eps=1e-5,
        )


# ----------------------------------------------------------------------- dtypes and devices

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_devices(device, dtype):
    lower, upper = (t.to(device, dtype) for t in box((2, 3, 6, 5), 7, 0.5))
    pool = dict(dims=2, kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=True)
    y_lo, y_hi = maxpool_interval(lower, upper, **pool)
    lam = torch.randn((2, 4, *y_lo.shape[1:]), generator=generator(8), dtype=DT).to(device, dtype)
    lam_in, const = maxpool_backward(lam, lower, upper, **pool)
    assert lam_in.dtype == const.dtype == dtype and lam_in.device.type == device
    rtol = 1e-5 if dtype == torch.float32 else 1e-9

    def op(x):
        return F.max_pool2d(x, 3, 2, 1, ceil_mode=True)

    h = points(lower, upper, 9)
    assert_backward_sound(op, lam, lam_in, const, h, rtol=rtol)

    weight = torch.randn(6, 5, generator=generator(10), dtype=DT).to(device, dtype)
    opts = dict(normalized_shape=(6, 5), weight=weight, bias=None, eps=1e-5)
    y_lo, y_hi = layernorm_interval(lower, upper, **opts)
    lam = torch.randn((2, 4, 3, 6, 5), generator=generator(11), dtype=DT).to(device, dtype)
    lam_in, const = layernorm_backward(lam, lower, upper, **opts)
    assert y_lo.dtype == lam_in.dtype == const.dtype == dtype and const.device.type == device

    def ln(x):
        return F.layer_norm(x, (6, 5), weight, None, 1e-5)

    y = apply(ln, h)
    slack = rtol * (1 + float(y.abs().max()))
    assert torch.all((y >= y_lo - slack) & (y <= y_hi + slack))
    assert_backward_sound(ln, lam, lam_in, const, h, rtol=rtol)
