"""Activation relaxations: soundness against torch's own functions, and tightness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nonsingular.errors import InputError, UnsupportedLayerError
from nonsingular.model.operators import relaxations as rel
from nonsingular.model.operators import smooth
from nonsingular.model.reader import read_model

Activation = rel.Activation
F = torch.nn.functional
f64 = torch.float64

ACTIVATIONS = [
    Activation("relu"),
    Activation("leaky_relu", alpha=0.01),
    Activation("leaky_relu", alpha=0.2),
    Activation("leaky_relu", alpha=1.5),
    Activation("leaky_relu", alpha=-0.3),
    Activation("elu", alpha=0.5),
    Activation("elu", alpha=1.0),
    Activation("elu", alpha=2.0),
    Activation("elu", alpha=-1.0),
    Activation("gelu"),
    Activation("gelu", approximate="tanh"),
    Activation("silu"),
    Activation("tanh"),
    Activation("sigmoid"),
    Activation("softplus"),
    Activation("softplus", beta=2.0),
    Activation("softplus", threshold=1.0),
    Activation("softplus", beta=2.0, threshold=1.0),
    Activation("hardtanh"),
    Activation("hardtanh", min_val=-0.5, max_val=2.0),
    Activation("relu6"),
]
SMOOTH = [a for a in ACTIVATIONS if not a.piecewise_linear]


def name(act: Activation) -> str:
    opts = {
        "leaky_relu": f"{act.alpha}",
        "elu": f"{act.alpha}",
        "gelu": act.approximate,
        "softplus": f"{act.beta}-{act.threshold}",
        "hardtanh": f"{act.min_val}-{act.max_val}",
    }
    return f"{act.kind}[{opts.get(act.kind, '')}]"


def torch_reference(act: Activation, x: torch.Tensor) -> torch.Tensor:
    """The torch.nn.functional function the activation stands for, called directly."""
    return {
        "relu": lambda: F.relu(x),
        "leaky_relu": lambda: F.leaky_relu(x, negative_slope=act.alpha),
        "elu": lambda: F.elu(x, alpha=act.alpha),
        "gelu": lambda: F.gelu(x, approximate=act.approximate),
        "silu": lambda: F.silu(x),
        "tanh": lambda: torch.tanh(x),
        "sigmoid": lambda: torch.sigmoid(x),
        "softplus": lambda: F.softplus(x, beta=act.beta, threshold=act.threshold),
        "hardtanh": lambda: F.hardtanh(x, min_val=act.min_val, max_val=act.max_val),
        "relu6": lambda: F.relu6(x),
    }[act.kind]()


# Points where extremes sit: kinks, corners, and the minimisers of GELU, GELU-tanh and SiLU.
SPECIAL = [
    0.0,
    -1.0,
    1.0,
    -0.5,
    2.0,
    6.0,
    -0.7517915246935645,
    -0.7524614220710162,
    -1.278464542761074,
]


def sample(act: Activation, l: torch.Tensor, u: torch.Tensor, n: int = 2000) -> torch.Tensor:
    """(intervals, n + a few) points of each interval, in its dtype: both ends, a grid, random
    points, the special points inside and, for softplus, the floats around its switch point."""
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([torch.linspace(0, 1, n // 2, dtype=f64), torch.rand(n - n // 2, generator=gen)])
    x = l[:, None] + (u - l)[:, None] * t.to(l.dtype)
    extra = torch.tensor(SPECIAL, dtype=l.dtype)
    if act.kind == "softplus":
        s = torch.tensor(act.threshold / act.beta, dtype=l.dtype)
        ulp = torch.finfo(l.dtype).eps * (1 + s.abs())
        around = [s + k * ulp for k in range(-4, 5)]
        around += [torch.nextafter(s, s + 1), torch.nextafter(s, s - 1), s + 1e-9, s - 1e-9]
        extra = torch.cat([extra, torch.stack(around).to(l.dtype)])
    x = torch.cat([x, extra.expand(len(l), -1)], dim=1)
    x = torch.minimum(torch.maximum(x, l[:, None]), u[:, None])
    x[:, 0], x[:, 1] = l, u
    return x


def minimum_over(fn, l: torch.Tensor, u: torch.Tensor, rounds: int = 4) -> torch.Tensor:
    """min of fn over each [l, u] (fn elementwise, vectorised over intervals), by a grid
    refined around its best point a few times."""
    lo, hi = l.clone(), u.clone()
    t = torch.linspace(0, 1, 2001, dtype=l.dtype)
    best = torch.full_like(l, math.inf)
    for _ in range(rounds):
        x = lo[:, None] + (hi - lo)[:, None] * t
        x = torch.minimum(torch.maximum(x, l[:, None]), u[:, None])
        v = fn(x)
        best = torch.minimum(best, v.min(1).values)
        i = v.argmin(1)
        step = (hi - lo) / 2000
        centre = x.gather(1, i[:, None])[:, 0]
        lo, hi = centre - 2 * step, centre + 2 * step
    return best


def assert_sound(act: Activation, l: torch.Tensor, u: torch.Tensor, n: int = 2000) -> None:
    """Linear bounds with the promised float64 margin, and the interval, on sampled points."""
    a_l, b_l, a_u, b_u = act.linear_bounds(l, u)
    lo, hi = act.interval(l, u)
    for t in (a_l, b_l, a_u, b_u, lo, hi):
        assert t.dtype == l.dtype and t.shape == l.shape
        assert torch.isfinite(t).all()
    x = sample(act, l, u, n)
    fx = torch_reference(act, x)
    # float64: the promised margin of 1e-12 (1 + |f|); float32: none beyond soundness
    margin = 1e-12 * (1 + fx.abs()) if l.dtype == f64 else 0.0
    low = a_l[:, None] * x + b_l[:, None]
    up = a_u[:, None] * x + b_u[:, None]
    bad_l = low > fx - margin
    bad_u = up < fx + margin
    assert not bad_l.any(), f"{name(act)} lower line above f at {x[bad_l][:5]}"
    assert not bad_u.any(), f"{name(act)} upper line below f at {x[bad_u][:5]}"
    assert (lo[:, None] <= fx).all() and (fx <= hi[:, None]).all(), f"{name(act)} interval"


def random_intervals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=gen, dtype=f64) * 16 - 8
    w = torch.rand(n, generator=gen, dtype=f64) * 10
    w[: n // 8] = 0.0
    w[n // 8 : n // 4] = 10.0 ** -torch.randint(1, 15, (n // 4 - n // 8,), generator=gen).to(f64)
    l, u = c - w / 2, c + w / 2
    special = torch.tensor(
        [[-1e3, 1e3], [-1e6, 1e6], [1e6, 1e6], [-1e6, -1e6], [-1e6, -1e6 + 1.0], [0.0, 0.0]],
        dtype=f64,
    )
    return torch.cat([l, special[:, 0]]), torch.cat([u, special[:, 1]])


# ---------------------------------------------------------------------------------- soundness


@pytest.mark.parametrize("act", ACTIVATIONS, ids=name)
def test_sound_on_many_random_intervals(act: Activation) -> None:
    l, u = random_intervals(400, seed=1)
    assert_sound(act, l, u, n=2000)


finite = st.floats(-8.0, 8.0, allow_nan=False)
width = st.one_of(
    st.just(0.0), st.floats(0.0, 10.0), st.floats(1e-12, 1e-3), st.sampled_from([1e-300, 5e-324])
)
intervals = st.one_of(
    st.tuples(finite, width).map(lambda cw: (cw[0], cw[0] + cw[1])),
    st.sampled_from([(-1e3, 1e3), (-1e6, 1e6), (1e6, 1e6), (-20.0, 20.0), (-1e6, -999999.0)]),
)


@given(st.lists(intervals, min_size=1, max_size=6))
@pytest.mark.parametrize("act", ACTIVATIONS, ids=name)
def test_sound_hypothesis(act: Activation, ivs: list[tuple[float, float]]) -> None:
    l = torch.tensor([iv[0] for iv in ivs], dtype=f64)
    u = torch.tensor([iv[1] for iv in ivs], dtype=f64)
    assert_sound(act, l, u)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=name)
def test_sound_in_float32(act: Activation) -> None:
    l, u = random_intervals(200, seed=2)
    l32, u32 = l.float(), u.float()
    assert_sound(act, l32, u32, n=500)


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a.kind == "softplus"], ids=name)
def test_softplus_switch_is_covered(act: Activation) -> None:
    """Intervals around threshold / beta, where torch drops from the curve to the identity."""
    t = act.threshold / act.beta
    offsets = torch.tensor([0.0, 1e-15, 1e-9, 1e-3, 0.1, 1.0], dtype=f64)
    l = torch.cat([t - offsets, t - offsets, torch.full_like(offsets, t)])
    u = torch.cat([t + offsets, torch.full_like(offsets, t), t + offsets])
    assert_sound(act, l, u)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=name)
def test_no_nan_or_inf_up_to_1e6(act: Activation) -> None:
    ends = torch.tensor([-1e6, -1e6 + 1, -1.0, 0.0, 1.0, 1e6 - 1, 1e6], dtype=f64)
    l, u = torch.meshgrid(ends, ends, indexing="ij")
    keep = l <= u
    l, u = l[keep], u[keep]
    for t in (*act.linear_bounds(l, u), *act.interval(l, u)):
        assert torch.isfinite(t).all()
    assert_sound(act, l, u, n=200)


@pytest.mark.parametrize("act", SMOOTH, ids=name)
def test_derivative_is_monotone_on_each_piece(act: Activation) -> None:
    """The premise of the smooth method: f' is monotone (as declared) between breakpoints."""
    for piece in act._smooth.pieces:
        if piece.shape == 0:
            continue
        lo, hi = max(piece.start, -30.0), min(piece.end, 30.0)
        x = torch.linspace(lo, hi, 20001, dtype=f64, requires_grad=True)
        (d,) = torch.autograd.grad(act(x).sum(), x)
        steps = torch.diff(d) * piece.shape
        assert (steps >= -1e-15).all(), name(act)


# ---------------------------------------------------------------------------------- tightness


def test_relu_is_crown() -> None:
    act = Activation("relu")
    l = torch.tensor([-1.0, -3.0, -2.0, 0.5, -4.0, 0.0], dtype=f64)
    u = torch.tensor([3.0, 1.0, 2.0, 2.0, -1.0, 0.0], dtype=f64)
    a_l, b_l, a_u, b_u = act.linear_bounds(l, u)
    # unstable: the upper line passes through (l, 0) and (u, u)
    for i in range(3):
        assert abs(a_u[i] * l[i] + b_u[i]) < 1e-9
        assert abs(a_u[i] * u[i] + b_u[i] - u[i]) < 1e-9
    assert a_l.tolist()[:3] == [1.0, 0.0, 0.0]  # slope 1 iff u > -l
    assert torch.allclose(b_l, torch.zeros_like(b_l), atol=1e-9)
    # stable: exact
    assert a_l[3] == a_u[3] == 1.0 and a_l[4] == a_u[4] == 0.0
    assert torch.allclose(b_u[3:], torch.zeros(3, dtype=f64), atol=1e-9)


@pytest.mark.parametrize("alpha", [0.01, 0.2, 1.5, -0.3])
def test_leaky_relu_is_crown(alpha: float) -> None:
    act = Activation("leaky_relu", alpha=alpha)
    l = torch.tensor([-1.0, -3.0, 1.0, -3.0], dtype=f64)
    u = torch.tensor([3.0, 1.0, 2.0, -1.0], dtype=f64)
    a_l, b_l, a_u, b_u = act.linear_bounds(l, u)
    chord = (a_u, b_u) if alpha <= 1 else (a_l, b_l)
    kink = (a_l, b_l) if alpha <= 1 else (a_u, b_u)
    for i in range(2):
        assert abs(chord[0][i] * l[i] + chord[1][i] - alpha * l[i]) < 1e-9
        assert abs(chord[0][i] * u[i] + chord[1][i] - u[i]) < 1e-9
    assert kink[0].tolist()[:2] == [1.0, alpha] and kink[1].abs().max() < 1e-9
    for a, b in ((a_l, b_l), (a_u, b_u)):  # stable intervals are exact
        assert abs(a[2] - 1) < 1e-12 and abs(a[3] - alpha) < 1e-12
        assert b[2:].abs().max() < 1e-9


def test_hardtanh_corners() -> None:
    act = Activation("hardtanh")
    l = torch.tensor([-3.0, -0.5, -2.0, -1.0, -0.5], dtype=f64)
    u = torch.tensor([0.5, 3.0, 3.0, 0.0, 0.5], dtype=f64)
    a_l, b_l, a_u, b_u = act.linear_bounds(l, u)
    # lower corner only: the upper line is the chord from (l, -1) to (u, u)
    assert abs(a_u[0] * -3 + b_u[0] + 1) < 1e-9 and abs(a_u[0] * 0.5 + b_u[0] - 0.5) < 1e-9
    # upper corner only: the lower line is the chord from (l, l) to (u, 1)
    assert abs(a_l[1] * -0.5 + b_l[1] + 0.5) < 1e-9 and abs(a_l[1] * 3 + b_l[1] - 1) < 1e-9
    # both corners, midpoint 0.5 in (-1, 1): line through (l, -1), (1, 1) and (-1, -1), (u, 1)
    assert abs(a_u[2] * -2 + b_u[2] + 1) < 1e-9 and abs(a_u[2] + b_u[2] - 1) < 1e-9
    assert abs(a_l[2] * -1 + b_l[2] + 1) < 1e-9 and abs(a_l[2] * 3 + b_l[2] - 1) < 1e-9
    # identity part: exact
    assert a_l[3] == a_u[3] == a_l[4] == a_u[4] == 1.0
    assert b_l[3:].abs().max() < 1e-9 and b_u[3:].abs().max() < 1e-9


CONVEX = [
    (Activation("sigmoid"), -4.0, -0.5),
    (Activation("tanh"), -3.0, -0.2),
    (Activation("softplus"), -3.0, 4.0),
    (Activation("softplus", beta=2.0, threshold=1.0), -3.0, 0.4),
    (Activation("elu", alpha=1.0), -3.0, 2.0),
    (Activation("elu", alpha=0.5), -2.0, 1.0),
    (Activation("gelu"), -1.2, 1.3),
    (Activation("gelu", approximate="tanh"), -1.2, 1.3),
    (Activation("silu"), -2.0, 2.3),
]
CONCAVE = [
    (Activation("sigmoid"), 0.5, 4.0),
    (Activation("tanh"), 0.2, 3.0),
    (Activation("gelu"), 1.5, 4.0),
    (Activation("gelu", approximate="tanh"), 1.5, 4.0),
    (Activation("silu"), 2.5, 6.0),
    (Activation("elu", alpha=-1.0), -4.0, -0.5),
]


def ident(v: object) -> str:
    return name(v) if isinstance(v, Activation) else str(v)


@pytest.mark.parametrize(("act", "lo", "hi"), CONVEX, ids=ident)
def test_convex_region_chord_and_tangent(act: Activation, lo: float, hi: float) -> None:
    l, u = torch.tensor([lo], dtype=f64), torch.tensor([hi], dtype=f64)
    a_l, b_l, a_u, b_u = act.linear_bounds(l, u)
    for x in (l, u):  # the upper line is the chord
        assert abs(a_u * x + b_u - act(x)).item() < 1e-9
    x = torch.linspace(lo, hi, 200001, dtype=f64)
    gap = act(x) - (a_l * x + b_l)
    assert gap.min().item() < 1e-9  # the lower line touches f (a tangent)
    assert a_l.item() == pytest.approx(((act(u) - act(l)) / (u - l)).item(), abs=1e-12)


@pytest.mark.parametrize(("act", "lo", "hi"), CONCAVE, ids=ident)
def test_concave_region_chord_and_tangent(act: Activation, lo: float, hi: float) -> None:
    l, u = torch.tensor([lo], dtype=f64), torch.tensor([hi], dtype=f64)
    a_l, b_l, a_u, b_u = act.linear_bounds(l, u)
    for x in (l, u):  # the lower line is the chord
        assert abs(a_l * x + b_l - act(x)).item() < 1e-9
    x = torch.linspace(lo, hi, 200001, dtype=f64)
    assert ((a_u * x + b_u) - act(x)).min().item() < 1e-9  # the upper line touches f


@pytest.mark.parametrize("act", SMOOTH, ids=name)
def test_offsets_are_the_exact_extremes(act: Activation) -> None:
    """Across inflections too, each line touches f (up to the slack) somewhere on [l, u]."""
    l, u = random_intervals(80, seed=3)
    l, u = l[20:], u[20:]
    a_l, b_l, a_u, b_u = act.linear_bounds(l, u)
    gap_l = minimum_over(lambda x: act(x) - (a_l[:, None] * x + b_l[:, None]), l, u)
    gap_u = minimum_over(lambda x: (a_u[:, None] * x + b_u[:, None]) - act(x), l, u)
    fx = act(sample(act, l, u, n=100))
    tol = 1e-9 * (1 + fx.abs().amax(1) + a_l.abs() * torch.maximum(l.abs(), u.abs()))
    if act.kind == "softplus":  # at the switch point the extremes are only approached
        near = (l <= act.threshold / act.beta) & (u >= act.threshold / act.beta)
        tol = torch.where(near, tol + 1e-8 * (u - l), tol)
    assert (gap_l < tol).all() and (gap_u < tol).all()


def test_tanh_small_interval_gap() -> None:
    act = Activation("tanh")
    l, u = torch.tensor([-0.1], dtype=f64), torch.tensor([0.1], dtype=f64)
    a_l, b_l, a_u, b_u = act.linear_bounds(l, u)
    x = torch.linspace(-0.1, 0.1, 10001, dtype=f64)
    assert ((a_u * x + b_u) - act(x)).max().item() < 1e-3
    assert (act(x) - (a_l * x + b_l)).max().item() < 1e-3


@pytest.mark.parametrize(
    "act", [a for a in SMOOTH if a.kind != "elu" and a.threshold > 1], ids=name
)
def test_narrow_intervals_are_tight(act: Activation) -> None:
    """For width w the parallel lines are at most about max|f''| w^2 / 4 apart."""
    c = torch.linspace(-6, 6, 101, dtype=f64) + 1e-3
    for w in (1e-2, 1e-4, 1e-7, 0.0):
        a_l, b_l, a_u, b_u = act.linear_bounds(c - w / 2, c + w / 2)
        gap = (b_u - b_l).max().item()
        assert gap < 0.5 * w * w + 1e-10, (w, gap)


def global_min(act: Activation, lo: float, hi: float) -> float:
    """min f over [lo, hi] by a fine grid refined twice."""
    for _ in range(3):
        x = torch.linspace(lo, hi, 100001, dtype=f64)
        i = int(act(x).argmin())
        step = (hi - lo) / 100000
        lo, hi = x[max(i - 1, 0)].item() - step, x[min(i + 1, 100000)].item() + step
    return act(x).min().item()


@pytest.mark.parametrize(
    "act",
    [Activation("gelu"), Activation("gelu", approximate="tanh"), Activation("silu")],
    ids=name,
)
def test_interval_includes_the_global_minimum(act: Activation) -> None:
    true_min = global_min(act, -3.0, 3.0)
    lo, hi = act.interval(torch.tensor([-3.0], dtype=f64), torch.tensor([3.0], dtype=f64))
    assert lo.item() <= true_min and true_min - lo.item() < 1e-6
    assert hi.item() == pytest.approx(act(torch.tensor(3.0, dtype=f64)).item(), abs=1e-9)
    # an interval not containing the minimiser is the range of its ends
    lo, hi = act.interval(torch.tensor([0.5], dtype=f64), torch.tensor([2.0], dtype=f64))
    ends = act(torch.tensor([0.5, 2.0], dtype=f64))
    assert lo.item() == pytest.approx(ends[0].item(), abs=1e-9)
    assert hi.item() == pytest.approx(ends[1].item(), abs=1e-9)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=name)
def test_interval_is_exact_range(act: Activation) -> None:
    l, u = random_intervals(100, seed=4)
    lo, hi = act.interval(l, u)
    fx = act(sample(act, l, u, n=4001))
    tol = 1e-9 * (1 + fx.abs().amax(1))
    assert ((fx.amin(1) - lo) < tol).all() and ((hi - fx.amax(1)) < tol).all()


# ------------------------------------------------------------------------- API and properties


@pytest.mark.parametrize("act", ACTIVATIONS, ids=name)
def test_call_is_the_torch_function(act: Activation) -> None:
    x = torch.linspace(-30, 30, 10001, dtype=f64)
    assert torch.equal(act(x), torch_reference(act, x))


GRID = torch.linspace(-10, 10, 20001, dtype=f64)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=name)
def test_properties(act: Activation) -> None:
    x = torch.linspace(-40, 40, 400001, dtype=f64, requires_grad=True)
    fx = act(x)
    (d,) = torch.autograd.grad(fx.sum(), x)
    lip = act.lipschitz
    assert d.abs().max().item() <= lip
    assert d.abs().max().item() > lip - 1e-6
    assert act.nonnegative == bool((fx >= 0).all())
    slopes = torch.diff(act(GRID)) / torch.diff(GRID)
    bends = int((torch.diff(slopes).abs() > 1e-9).sum())  # a kink bends one or two intervals
    assert act.piecewise_linear == (bends <= 4), bends


def test_the_measured_properties_cover_every_kind() -> None:
    """``test_properties`` measures lipschitz, nonnegative and piecewise_linear on every
    activation of ``ACTIVATIONS``: it must hold every kind, with its default options too."""
    assert {a.kind for a in ACTIVATIONS} == set(rel._KINDS)
    defaults = {"relu", "gelu", "silu", "tanh", "sigmoid", "softplus", "hardtanh", "relu6"}
    assert defaults <= {a.kind for a in ACTIVATIONS if a == Activation(a.kind)}


def test_shapes_broadcast_and_dtypes() -> None:
    act = Activation("gelu")
    l = torch.full((2, 3, 4), -1.0, dtype=f64)
    u = torch.tensor(2.0, dtype=f64)
    for t in (*act.linear_bounds(l, u), *act.interval(l, u)):
        assert t.shape == (2, 3, 4) and t.dtype == f64
    for t in Activation("relu").linear_bounds(l.float(), u.float()):
        assert t.dtype == torch.float32
    empty = torch.empty(0, 5, dtype=f64)
    assert Activation("tanh").linear_bounds(empty, empty)[0].shape == (0, 5)


def test_rejects_bad_input() -> None:
    act = Activation("sigmoid")
    with pytest.raises(InputError, match="lower <= upper"):
        act.linear_bounds(torch.tensor([1.0]), torch.tensor([0.0]))
    with pytest.raises(InputError, match="finite"):
        act.interval(torch.tensor([float("nan")]), torch.tensor([0.0]))
    with pytest.raises(InputError, match="finite"):
        act.interval(torch.tensor([-math.inf]), torch.tensor([0.0]))
    with pytest.raises(UnsupportedLayerError, match="swish"):
        Activation("swish")
    with pytest.raises(UnsupportedLayerError, match="'erf'"):
        Activation("gelu", approximate="erf")
    with pytest.raises(UnsupportedLayerError, match="beta=-1.0; expected beta > 0"):
        Activation("softplus", beta=-1.0)
    with pytest.raises(UnsupportedLayerError, match="min_val <= max_val"):
        Activation("hardtanh", min_val=1.0, max_val=0.0)
    with pytest.raises(UnsupportedLayerError, match="alpha=inf"):
        Activation("leaky_relu", alpha=math.inf)


def test_bad_activation_in_a_model_is_an_unsupported_layer() -> None:
    """A model whose activation option cannot be bounded fails reading with a typed error."""

    class Softplus(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.softplus(x, beta=-1.0)

    with pytest.raises(UnsupportedLayerError, match="softplus beta"):
        read_model(Softplus().eval(), torch.zeros(1, 3))


def test_derived_constants() -> None:
    """Inflection points (f'' = 0) and minimisers (f' = 0) solved at import."""
    cases = [
        (Activation("gelu"), smooth.GELU_INFLECTION, smooth.GELU_ARGMIN),
        (
            Activation("gelu", approximate="tanh"),
            smooth.GELU_TANH_INFLECTION,
            smooth.GELU_TANH_ARGMIN,
        ),
        (Activation("silu"), smooth.SILU_INFLECTION, smooth.SILU_ARGMIN),
    ]
    for act, inflection, argmin in cases:
        x = torch.tensor([inflection, -inflection, argmin], dtype=f64, requires_grad=True)
        (d1,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x)
        assert d2[:2].abs().max() < 1e-12 and abs(d1[2]) < 1e-12
        assert act.lipschitz >= d1.detach().abs().max().item()


@pytest.mark.parametrize(
    "act", [Activation("relu"), Activation("gelu"), Activation("softplus", threshold=1.0)], ids=name
)
def test_inputs_that_require_grad(act: Activation) -> None:
    """Bounds stay differentiable in the interval ends (no in-place updates of the graph)."""
    l = torch.linspace(-4, 3, 50, dtype=f64, requires_grad=True)
    u = l + 1.5
    total = sum(t.sum() for t in (*act.linear_bounds(l, u), *act.interval(l, u)))
    total.backward()
    assert l.grad is not None and torch.isfinite(l.grad).all()


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    l, u = random_intervals(200, seed=5)
    for act in ACTIVATIONS:
        on_gpu = act.linear_bounds(l.cuda(), u.cuda())
        for cpu, gpu in zip(act.linear_bounds(l, u), on_gpu, strict=True):
            assert gpu.device.type == "cuda"
            assert torch.allclose(cpu, gpu.cpu(), rtol=1e-9, atol=1e-9), name(act)
        lo, hi = act.interval(l.cuda(), u.cuda())
        assert lo.device.type == "cuda" and hi.device.type == "cuda"
