"""The calculus behind the smooth activations' relaxations (``relaxations.py``): derivatives,
inflection points and minimisers solved once at import in float64, closed-form and tabulated
inverses of the derivative, the monotone pieces of ``f'``, and the rigorous error bound of a
root guess. See the docstring of ``relaxations.py`` for the method."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

_ROOT_TOLERANCE = 1e-15  # accepted error of a root guess's tangent bound, relative to 1 + |x|
_NEWTON_STEPS = 2  # after the table look-up
_MAX_BISECTIONS = 120  # enough to shrink [-1e6, 1e6] to adjacent floats
_TABLE_SIZE = 2048

_SQRT2 = math.sqrt(2.0)
_INV_SQRT2 = 1.0 / _SQRT2
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_K = math.sqrt(2.0 / math.pi)  # torch's constant for approximate="tanh"
_GELU_C = 0.044715


# --------------------------------------------------------------------------------------------
# Constants derived once, at import, in float64
# --------------------------------------------------------------------------------------------


def _bisect_scalar(fn: Callable[[float], float], lo: float, hi: float) -> float:
    """Root of ``fn`` on ``[lo, hi]`` (where ``fn`` changes sign), to full float64 precision."""
    f_lo = fn(lo)
    if f_lo * fn(hi) > 0:
        raise ArithmeticError("no sign change")
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if (fn(mid) < 0) == (f_lo < 0):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _py_sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _py_d_gelu(x: float) -> float:
    return 0.5 * math.erfc(-x * _INV_SQRT2) + x * math.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _py_d_gelu_tanh(x: float) -> float:
    u = _GELU_K * (x + _GELU_C * x**3)
    du = _GELU_K * (1.0 + 3.0 * _GELU_C * x * x)
    return _py_sigmoid(2.0 * u) * (1.0 + 2.0 * x * du * _py_sigmoid(-2.0 * u))


def _py_dd_gelu_tanh_sign(x: float) -> float:
    """A positive multiple of the GELU-tanh second derivative: u' - x T u'^2 + x u'' / 2."""
    u = _GELU_K * (x + _GELU_C * x**3)
    du = _GELU_K * (1.0 + 3.0 * _GELU_C * x * x)
    ddu = 6.0 * _GELU_K * _GELU_C * x
    return du - x * math.tanh(u) * du * du + 0.5 * x * ddu


def _py_d_silu(x: float) -> float:
    return _py_sigmoid(x) * (1.0 + x * _py_sigmoid(-x))


# Inflection points (f'' changes sign there; f'' is even for all three, so they come as +-x).
# GELU: f'' = phi(x) (2 - x^2). SiLU: f'' = s (1 - s) (2 - x tanh(x / 2)) with s = sigmoid(x).
# GELU-tanh: f = x (1 + tanh(u)) / 2 with u = k (x + c x^3) gives
# f'' = (1 - tanh(u)^2) (u' - x tanh(u) u'^2 + x u'' / 2); the bracket factor is solved for.
GELU_INFLECTION = _SQRT2
GELU_TANH_INFLECTION = _bisect_scalar(_py_dd_gelu_tanh_sign, 0.5, 3.0)
SILU_INFLECTION = _bisect_scalar(lambda x: 2.0 - x * math.tanh(0.5 * x), 0.5, 4.0)
# Global minimisers: f' = 0, with f' increasing between the inflection points.
GELU_ARGMIN = _bisect_scalar(_py_d_gelu, -GELU_INFLECTION, 0.0)
GELU_TANH_ARGMIN = _bisect_scalar(_py_d_gelu_tanh, -GELU_TANH_INFLECTION, 0.0)
SILU_ARGMIN = _bisect_scalar(_py_d_silu, -SILU_INFLECTION, 0.0)
# sup |f'| is f' at the right inflection point (f'(x) + f'(-x) = 1 for all three), rounded up.
GELU_LIPSCHITZ = _py_d_gelu(GELU_INFLECTION) + 1e-12
GELU_TANH_LIPSCHITZ = _py_d_gelu_tanh(GELU_TANH_INFLECTION) + 1e-12
SILU_LIPSCHITZ = _py_d_silu(SILU_INFLECTION) + 1e-12


# --------------------------------------------------------------------------------------------
# Derivatives (float64 tensors, accurate in the tails) and roots of f'(x) = a
# --------------------------------------------------------------------------------------------


def d_tanh(x: Tensor) -> Tensor:
    return torch.cosh(x).square().reciprocal()


def d_sigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(x) * torch.sigmoid(-x)


def _d_gelu(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-_INV_SQRT2 * x) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _d12_gelu(x: Tensor) -> tuple[Tensor, Tensor]:
    """f' and f'' of GELU, sharing phi(x)."""
    phi = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return 0.5 * torch.erfc(-_INV_SQRT2 * x) + x * phi, phi * (2.0 - x * x)


def _gelu_tanh_u(x: Tensor) -> tuple[Tensor, Tensor]:
    """u = k (x + c x^3) and u' for GELU-tanh."""
    x2 = x * x
    return _GELU_K * x * (1.0 + _GELU_C * x2), _GELU_K * (1.0 + 3.0 * _GELU_C * x2)


def _d_gelu_tanh(x: Tensor) -> Tensor:
    # (1 + tanh u) / 2 = sigmoid(2u) and (1 - tanh(u)^2) / 2 = 2 sigmoid(2u) sigmoid(-2u)
    u, du = _gelu_tanh_u(x)
    return torch.sigmoid(2.0 * u) * (1.0 + 2.0 * x * du * torch.sigmoid(-2.0 * u))


def _d12_gelu_tanh(x: Tensor) -> tuple[Tensor, Tensor]:
    """f' and f'' of GELU-tanh: with s = sigmoid(2u), t = sigmoid(-2u), tanh(u) = s - t."""
    u, du = _gelu_tanh_u(x)
    s, t = torch.sigmoid(2.0 * u), torch.sigmoid(-2.0 * u)
    xdu = x * du
    d1 = s * (1.0 + 2.0 * xdu * t)
    d2 = 4.0 * s * t * (du - xdu * du * (s - t) + (3.0 * _GELU_K * _GELU_C) * x * x)
    return d1, d2


def _d_silu(x: Tensor) -> Tensor:
    return torch.sigmoid(x) * (1.0 + x * torch.sigmoid(-x))


def _d12_silu(x: Tensor) -> tuple[Tensor, Tensor]:
    """f' and f'' of SiLU: s (1 + x t) and s t (2 - x (s - t)), s = sigmoid(x), t = 1 - s."""
    s, t = torch.sigmoid(x), torch.sigmoid(-x)
    return s * (1.0 + x * t), s * t * (2.0 - x * (s - t))


def root_tanh_right(a: Tensor) -> Tensor:
    """x >= 0 with 1 - tanh(x)^2 = a: x = atanh(s) with s = sqrt(1 - a), written as
    (log(1 + s) - log(1 - s)) / 2 with 1 - s = a / (1 + s), which keeps small a accurate."""
    a = a.clamp(0.0, 1.0)
    s = torch.sqrt(1.0 - a)
    return 0.5 * (torch.log1p(s) - torch.log(a / (1.0 + s)))


def root_tanh_left(a: Tensor) -> Tensor:
    return -root_tanh_right(a)


def root_sigmoid_left(a: Tensor) -> Tensor:
    """x <= 0 with s(x)(1 - s(x)) = a, through s = 2a / (1 + sqrt(1 - 4a)) (no cancellation)."""
    a = a.clamp(0.0, 0.25)
    s = 2.0 * a / (1.0 + torch.sqrt(1.0 - 4.0 * a))
    return torch.log(s) - torch.log1p(-s)


def root_sigmoid_right(a: Tensor) -> Tensor:
    return -root_sigmoid_left(a)


class _InverseDerivative:
    """Approximate solutions of ``df(x) = a`` on ``[x0, x1]``, where ``df`` is monotone.

    Linear interpolation in a table of the inverse of ``df`` (built at first use by bisection)
    on a uniform grid of a key that makes the inverse nearly linear, then Newton steps. At an
    inflection end ``df`` has an extremum, so ``x`` goes like the square root of ``a``'s
    distance to it; in a tail ``df`` tends to ``asymptote`` exponentially or like a Gaussian.
    Between two inflections the key is ``asin`` of ``a`` rescaled to ``[-1, 1]``; from an
    inflection ``x0`` into a tail it is ``sqrt(log|df(x0) - asymptote| - log|a - asymptote|)``.
    Only a starting guess: :func:`root_bound` bounds its error or replaces it.
    """

    def __init__(
        self,
        df: Callable[[Tensor], Tensor],
        d12: Callable[[Tensor], tuple[Tensor, Tensor]],
        x0: float,
        x1: float,
        asymptote: float | None = None,
    ) -> None:
        self.df, self.d12, self.x0, self.x1, self.asymptote = df, d12, x0, x1, asymptote
        self._ends = (0.0, 1.0)  # df at the ends (between inflections); df at the inflection
        self._table: tuple[float, float, Tensor] | None = None

    def _key(self, a: Tensor) -> Tensor:
        if self.asymptote is None:
            a0, a1 = self._ends
            return torch.asin(((a - a0) * (2.0 / (a1 - a0)) - 1.0).clamp(-1.0, 1.0))
        log_gap = torch.log((a - self.asymptote).abs())
        return torch.sqrt((self._ends[0] - log_gap).clamp_min(0.0))

    def _build(self) -> tuple[float, float, Tensor]:
        if self.asymptote is not None:
            self._trim_tail()
        ends = torch.tensor([self.x0, self.x1], dtype=torch.float64)
        d0, d1 = self.df(ends).tolist()
        if self.asymptote is None:
            self._ends = (d0, d1)
        else:  # the inflection is the end nearer 0
            d_inflection = d0 if abs(self.x0) < abs(self.x1) else d1
            self._ends = (math.log(abs(d_inflection - self.asymptote)), 0.0)
        k0, k1 = self._key(torch.tensor([d0, d1], dtype=torch.float64)).tolist()
        if not (math.isfinite(k0) and math.isfinite(k1) and k0 != k1):
            raise ArithmeticError("degenerate root table")  # pragma: no cover
        keys = torch.linspace(k0, k1, _TABLE_SIZE + 1, dtype=torch.float64)
        lo = torch.full_like(keys, self.x0)
        hi = torch.full_like(keys, self.x1)
        for _ in range(200):  # the key is monotone in x: bisect for all grid values at once
            mid = 0.5 * (lo + hi)
            right = (self._key(self.df(mid)) < keys) == (k1 > k0)
            lo = torch.where(right, mid, lo)
            hi = torch.where(right, hi, mid)
        xs = 0.5 * (lo + hi)
        xs[0], xs[-1] = self.x0, self.x1
        return k0, (k1 - k0) / _TABLE_SIZE, xs

    def _trim_tail(self) -> None:
        """Pull the tail end (the one farther from 0) in to where ``|df - asymptote|`` still
        exceeds the rounding in computing it (e.g. ``f' - 1`` evaluates to 0 far out)."""
        assert self.asymptote is not None
        asymptote = self.asymptote
        tail_first = abs(self.x0) > abs(self.x1)
        outer, inner = (self.x0, self.x1) if tail_first else (self.x1, self.x0)
        floor = 64.0 * torch.finfo(torch.float64).eps * abs(asymptote)

        def excess(x: float) -> float:
            d = self.df(torch.tensor([x], dtype=torch.float64)).item()
            return abs(d - asymptote) - floor

        if not excess(outer) > 0:
            outer = _bisect_scalar(excess, inner, outer)
        self.x0, self.x1 = (outer, inner) if tail_first else (inner, outer)

    def __call__(self, a: Tensor) -> Tensor:
        if self._table is None:
            self._table = self._build()
        k0, dk, xs = self._table
        if xs.device != a.device:
            xs = xs.to(a.device)
        t = torch.nan_to_num((self._key(a) - k0) / dk, nan=0.0).clamp(0.0, float(_TABLE_SIZE))
        j = t.floor().clamp_max(_TABLE_SIZE - 1)
        frac = t - j
        j = j.long()
        x0, x1 = xs[j], xs[j + 1]
        x = x0 + frac * (x1 - x0)
        for _ in range(_NEWTON_STEPS):
            d1, d2 = self.d12(x)
            step = (d1 - a) / d2
            x = torch.where(torch.isfinite(step), x - step, x).clamp(self.x0, self.x1)
        return x


# --------------------------------------------------------------------------------------------
# Piece descriptions of the smooth kinds, and the root bound
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A stretch ``[start, end]`` of the real line on which ``f'`` is monotone."""

    start: float
    end: float
    shape: int  # +1: f' nondecreasing (f convex); -1: nonincreasing (concave); 0: f affine
    df: Callable[[Tensor], Tensor] | None = None
    root: Callable[[Tensor], Tensor] | None = None  # a guess at x with df(x) = a


@dataclass(frozen=True)
class Smooth:
    pieces: tuple[Piece, ...]
    df: Callable[[Tensor], Tensor]  # derivative anywhere (either side at a kink)
    continuous: bool  # every piece's df is df itself (f' continuous at the breakpoints)

    @property
    def breaks(self) -> list[float]:
        return [p.start for p in self.pieces[1:]]


def _three_pieces(
    x0: float,
    df: Callable[[Tensor], Tensor],
    d12: Callable[[Tensor], tuple[Tensor, Tensor]],
    tail: float,
) -> Smooth:
    """Concave, convex, concave around the inflection points -x0, x0 (GELU, SiLU); f' tends to
    0 at -inf and 1 at +inf; ``tail`` is where the root tables stop."""
    inf = math.inf
    return Smooth(
        pieces=(
            Piece(-inf, -x0, -1, df, _InverseDerivative(df, d12, -tail, -x0, 0.0)),
            Piece(-x0, x0, 1, df, _InverseDerivative(df, d12, -x0, x0)),
            Piece(x0, inf, -1, df, _InverseDerivative(df, d12, x0, tail, 1.0)),
        ),
        df=df,
        continuous=True,
    )


@cache
def non_monotone_spec(kind: str) -> Smooth:
    """The shared piece description (with its root tables) of gelu, gelu_tanh or silu."""
    if kind == "silu":
        return _three_pieces(SILU_INFLECTION, _d_silu, _d12_silu, 60.0)
    if kind == "gelu_tanh":
        return _three_pieces(GELU_TANH_INFLECTION, _d_gelu_tanh, _d12_gelu_tanh, 12.0)
    return _three_pieces(GELU_INFLECTION, _d_gelu, _d12_gelu, 12.0)


def root_bound(
    piece: Piece, a: Tensor, lo: Tensor, hi: Tensor, g_lo: Tensor, g_hi: Tensor
) -> tuple[Tensor, Tensor]:
    """A point ``r`` and ``err`` bounding the extreme of ``h = f - a x`` on ``[lo, hi]``.

    ``h`` is convex (``piece.shape > 0``; then ``min h >= h(r) - err``) or concave (then
    ``max h <= h(r) + err``) on ``[lo, hi]``, where ``g = h' = f' - a`` changes sign strictly
    from ``g_lo`` to ``g_hi``. First ``r`` is the piece's root guess and ``err`` comes from the
    tangent of ``h`` at ``r``, which bounds a convex ``h`` from below (a concave one from above)
    on the whole of ``[lo, hi]``: ``err = |g(r)|`` times the distance from ``r`` to the end the
    tangent tilts towards. Where that is not small (a poor guess), bisection on ``g`` instead
    brackets the root in ``[A, B]`` and ``err = max(|g(A)|, |g(B)|) (B - A) / 2``.
    1-D tensors of one length.
    """
    assert piece.df is not None
    df, shape = piece.df, piece.shape
    r = lo + 0.5 * (hi - lo)
    if piece.root is not None:
        r = torch.minimum(torch.maximum(torch.nan_to_num(piece.root(a), nan=0.0), lo), hi)
    g = df(r) - a
    err = g.abs() * torch.where(g * shape > 0, r - lo, hi - r)
    tol = _ROOT_TOLERANCE * (1.0 + lo.abs() + hi.abs())
    bad = (err > tol).nonzero().squeeze(1)
    if bad.numel() > 0:
        A, B, gA, gB, sa, s_tol = lo[bad], hi[bad], g_lo[bad], g_hi[bad], a[bad], tol[bad]
        for step in range(1, _MAX_BISECTIONS + 1):
            mid = A + 0.5 * (B - A)
            g_mid = df(mid) - sa
            right = g_mid * shape < 0  # the root lies right of mid
            A, gA = torch.where(right, mid, A), torch.where(right, g_mid, gA)
            B, gB = torch.where(right, B, mid), torch.where(right, gB, g_mid)
            if step % 8 == 0:
                bracket_err = torch.maximum(gA.abs(), gB.abs()) * (B - A)
                if bool((bracket_err <= s_tol).all()):
                    break
        mid = A + 0.5 * (B - A)
        r = r.index_put((bad,), mid)
        err = err.index_put(
            (bad,), torch.maximum(gA.abs(), gB.abs()) * torch.maximum(mid - A, B - mid)
        )
    return r, err


# --------------------------------------------------------------------------------------------
# The public class
# --------------------------------------------------------------------------------------------
