"""Sound elementwise bounds for scalar activation functions over input intervals.

An :class:`Activation` names one scalar activation (with its PyTorch options) and gives, for
elementwise input intervals ``[lower, upper]``:

* :meth:`Activation.interval`: the range ``[min f, max f]`` (interval bound propagation);
* :meth:`Activation.linear_bounds`: lines ``a_l x + b_l <= f(x) <= a_u x + b_u`` valid on the
  whole interval (CROWN-style bound propagation: Zhang et al. 2018, auto_LiRPA).

"Sound" is meant against the function PyTorch actually computes (``torch.nn.functional``) in
the dtype given, including its rounding and softplus's switch to the identity above
``threshold / beta``.

Method
------
Piecewise-linear kinds (relu, leaky_relu, hardtanh, relu6) use the closed forms of CROWN:
exact lines on stable intervals; across a convex kink the upper line is the chord and the lower
line is the supporting line through the kink with the larger area under it (ReLU: slope 1 if
``u > -l`` else 0; LeakyReLU: 1 or ``alpha``); concave kinks (LeakyReLU with ``alpha > 1``,
hardtanh's upper corner) are mirrored. Hardtanh across both corners takes, for each side, the
line through its two outer corner points or the constant level, whichever encloses less area.

Smooth kinds (elu, gelu, silu, tanh, sigmoid, softplus) use one slope ``a`` for both lines,
the chord slope ``(f(u) - f(l)) / (u - l)`` (the derivative at the midpoint when the interval
is narrower than ``1e-8 (1 + max(|l|, |u|))``), and as offsets the exact maximum and minimum
of ``h(x) = f(x) - a x`` over ``[l, u]``. The real line is cut at known breakpoints into pieces
on which ``f'`` is monotone: tanh and sigmoid at 0; GELU at ``+-sqrt(2)`` (there
``f'' = phi(x) (2 - x^2)`` changes sign); GELU-tanh and SiLU at their inflection points, solved
to full float64 precision at import; ELU at its kink 0; softplus at its switch point
``threshold / beta``. Where ``f'`` increases, ``h`` is convex: its maximum over the piece is at
the piece's ends and its minimum at the root of ``f'(x) = a``; mirrored where ``f'``
decreases. So the candidates are the interval's ends, the breakpoints inside it and one root per
piece (only where ``f' - a`` changes sign on the piece). Root guesses ``r`` come from closed
forms (tanh, sigmoid, softplus, ELU) or, for GELU and SiLU, from interpolation in a table of the
inverse of ``f'`` (built at first use) refined by two Newton steps. No guess is trusted: on a
piece where ``h`` is convex its tangent at ``r`` lies below it on the whole piece, so
``min h >= h(r) - |h'(r)| d`` with ``d`` the distance from ``r`` to the piece's end the tangent
tilts down towards (mirrored for a maximum where ``h`` is concave); that amount is added, and
it is about ``f'' (r - root) d``, below 1e-15 for a good guess. Where it is larger the root is
bracketed by vectorised bisection instead, and for a bracket ``[A, B]`` holding it
``|h(root) - h(mid)| <= max(|f'(A) - a|, |f'(B) - a|) (B - A) / 2`` because ``f' - a`` is
monotone on it, and that amount is added. Where the interval lies in one convex stretch this
yields the chord as upper line and the tangent parallel to it as lower line (mirrored where
concave); across inflections (tanh and sigmoid around 0, GELU, SiLU) it yields the two parallel
chord-slope lines through the extreme points of ``f - a x``. Softplus additionally gets, when
its switch point ``t`` lies in the interval, both one-sided limits there (``softplus(t)`` and
``t``) as candidates, because torch drops from the smooth curve to the identity at ``t``.

:meth:`Activation.interval` takes the minimum and maximum of ``f`` at the ends, at the kinks of
non-monotone kinds (LeakyReLU/ELU with ``alpha < 0``) and, for GELU and SiLU, at their global
minimiser (solved at import) clamped into the interval; softplus also gets both sides of its
switch point. The result is clipped to the function's known global range.

Rounding
--------
All bound arithmetic is done in float64. Every offset is then widened by
``1e-12 (1 + F) + 64 eps (1 + F + |a| X + |b|)``, where ``F`` is the largest ``|f|`` among the
candidates, ``X = max(|l|, |u|)``, ``b`` the offset and ``eps`` the machine epsilon of the
requested dtype (interval ends likewise by ``1e-12 (1 + F) + 64 eps (1 + F)``, then clipped to
the function's exact global range where it has one, e.g. ``[0, 1]`` for sigmoid). So in float64
the lines keep a margin of at least ``1e-12 (1 + |f(x)|)`` from torch's ``f(x)`` at every ``x``
of the interval, on top of a ``64 eps`` allowance for rounding in the bound computation, in
torch's own evaluation of ``f`` and in evaluating ``a x + b``. (In float32 the ``64 eps`` term,
about ``8e-6`` relative, is the one that matters.) Root finding adds its own rigorous error
bound (see above) on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from .smooth import (
    GELU_ARGMIN,
    GELU_LIPSCHITZ,
    GELU_TANH_ARGMIN,
    GELU_TANH_LIPSCHITZ,
    SILU_ARGMIN,
    SILU_LIPSCHITZ,
    Piece,
    Smooth,
    d_sigmoid,
    d_tanh,
    non_monotone_spec,
    root_bound,
    root_sigmoid_left,
    root_sigmoid_right,
    root_tanh_left,
    root_tanh_right,
)

__all__ = ["Activation"]

_KINDS = (
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "softplus",
    "hardtanh",
    "relu6",
)
_PIECEWISE_LINEAR = frozenset({"relu", "leaky_relu", "hardtanh", "relu6"})

# Widening of every bound: a margin of _MARGIN * (1 + |f|) plus _ROUNDING_EPS machine epsilons of
# the output dtype times the magnitudes involved (see the module docstring).
_MARGIN = 1e-12
_ROUNDING_EPS = 64.0
_CHORD_MIN_WIDTH = 1e-8  # narrower intervals (relative to 1 + |x|) use the derivative as slope


@dataclass(frozen=True)
class Activation:
    """One scalar activation with its options.

    ``kind`` is one of relu, leaky_relu, elu, gelu, silu, tanh, sigmoid, softplus, hardtanh,
    relu6; the other fields are the PyTorch options of that kind (``alpha``: leaky_relu's
    negative_slope and elu's alpha; ``beta``/``threshold``: softplus; ``approximate``: gelu;
    ``min_val``/``max_val``: hardtanh). Fields that do not concern the kind are ignored.
    """

    kind: str
    alpha: float = 0.0
    beta: float = 1.0
    threshold: float = 20.0
    approximate: str = "none"
    min_val: float = -1.0
    max_val: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}; expected one of {_KINDS}")
        if self.approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', not {self.approximate!r}")
        for name in ("alpha", "beta", "threshold", "min_val", "max_val"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if self.kind == "softplus" and not self.beta > 0:
            raise ValueError("softplus needs beta > 0")
        if self.kind == "hardtanh" and self.min_val > self.max_val:
            raise ValueError("hardtanh needs min_val <= max_val")

    # ---------------------------------------------------------------- the function itself

    def __call__(self, x: Tensor) -> Tensor:
        """The exact PyTorch function with these options."""
        k = self.kind
        if k == "relu":
            return F.relu(x)
        if k == "leaky_relu":
            return F.leaky_relu(x, self.alpha)
        if k == "elu":
            return F.elu(x, self.alpha)
        if k == "gelu":
            return F.gelu(x, approximate=self.approximate)
        if k == "silu":
            return F.silu(x)
        if k == "tanh":
            return torch.tanh(x)
        if k == "sigmoid":
            return torch.sigmoid(x)
        if k == "softplus":
            return F.softplus(x, self.beta, self.threshold)
        if k == "hardtanh":
            return F.hardtanh(x, self.min_val, self.max_val)
        return F.relu6(x)

    # ---------------------------------------------------------------- properties

    @property
    def lipschitz(self) -> float:
        """sup |f'| over the real line: a sound global Lipschitz constant.

        For softplus this is the constant of the mathematical function (1): torch's switch to
        the identity above ``threshold / beta`` adds a jump of ``log1p(exp(-threshold)) / beta``
        (about 2e-9 / beta at the default threshold) that no Lipschitz constant covers.
        """
        k = self.kind
        if k in ("relu", "relu6", "tanh", "softplus"):
            return 1.0
        if k in ("leaky_relu", "elu"):
            return max(1.0, abs(self.alpha))
        if k == "hardtanh":
            return 1.0 if self.max_val > self.min_val else 0.0
        if k == "sigmoid":
            return 0.25
        if k == "silu":
            return SILU_LIPSCHITZ
        return GELU_TANH_LIPSCHITZ if self.approximate == "tanh" else GELU_LIPSCHITZ

    @property
    def nonnegative(self) -> bool:
        """Whether f(x) >= 0 for every x (relu, relu6, sigmoid, softplus; some option cases)."""
        k = self.kind
        if k in ("relu", "relu6", "sigmoid"):
            return True
        if k == "softplus":
            return self.threshold >= 0  # above a negative threshold torch returns x, maybe < 0
        if k in ("leaky_relu", "elu"):
            return self.alpha <= 0.0  # alpha x and alpha (exp(x) - 1) are >= 0 for x < 0
        if k == "hardtanh":
            return self.min_val >= 0
        return False

    @property
    def piecewise_linear(self) -> bool:
        """Whether the kind is piecewise linear (relu, leaky_relu, hardtanh, relu6)."""
        return self.kind in _PIECEWISE_LINEAR

    # ---------------------------------------------------------------- interval bounds

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """``[min f, max f]`` over ``[lower, upper]``, elementwise (exact up to the slack).

        Candidates: both ends, and where f is not monotone its kink or global minimiser clamped
        into the interval; softplus also gets both sides of its switch point.
        """
        l, u, dtype = self._prepare(lower, upper)
        crit = self._critical
        if crit:
            xs = torch.stack([l, u] + [torch.clamp(l.new_tensor(c), l, u) for c in crit])
            lo, hi = torch.aminmax(self(xs), dim=0)
        else:  # nondecreasing
            lo, hi = self(l), self(u)
        if self.kind == "softplus":
            near = self._softplus_near(l, u, dtype).nonzero().squeeze(1)
            if near.numel() > 0:
                tc = torch.clamp(l.new_tensor(self.threshold / self.beta), l[near], u[near])
                smooth_t = self._softplus_smooth(tc)
                lo = lo.index_put((near,), torch.minimum(lo[near], torch.minimum(tc, smooth_t)))
                hi = hi.index_put((near,), torch.maximum(hi[near], torch.maximum(tc, smooth_t)))
        mag = torch.maximum(lo.abs(), hi.abs())
        slack = (_MARGIN + _ROUNDING_EPS * torch.finfo(dtype).eps) * (1.0 + mag)
        lo, hi = lo - slack, hi + slack
        r_lo, r_hi = self._range
        if r_lo is not None:
            lo = lo.clamp_min(r_lo)
        if r_hi is not None:
            hi = hi.clamp_max(r_hi)
        return lo.to(dtype), hi.to(dtype)

    # ---------------------------------------------------------------- linear bounds

    def linear_bounds(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a_l, b_l, a_u, b_u)`` with ``a_l x + b_l <= f(x) <= a_u x + b_u`` on the interval.

        Piecewise-linear kinds use CROWN's closed forms; smooth kinds two lines parallel to the
        chord through the exact extremes of ``f(x) - a x`` (see the module docstring).
        """
        l, u, dtype = self._prepare(lower, upper)
        k = self.kind
        if k in ("relu", "leaky_relu"):
            a_l, b_l, a_u, b_u = self._leaky_bounds(l, u, self.alpha if k == "leaky_relu" else 0.0)
            f0 = 0.0
        elif k in ("hardtanh", "relu6"):
            m, M = (0.0, 6.0) if k == "relu6" else (self.min_val, self.max_val)
            a_l, b_l, a_u, b_u = self._hardtanh_bounds(l, u, m, M)
            f0 = abs(min(max(0.0, m), M))
        else:
            return self._smooth_bounds(l, u, dtype)
        # Slack from magnitude bounds that hold for these kinds without evaluating anything:
        # with L the Lipschitz constant, X = max(|l|, |u|) and f0 = |f(0)|, |f| <= f0 + L X on
        # the interval, |a| <= L and |b| = |f(p) - a p| <= f0 + 2 L X for the point p the line
        # passes through. (The slopes are rounded to the output dtype below; the slack's rounding
        # term covers that.)
        lip = self.lipschitz
        x_mag = torch.maximum(-l, u)  # = max(|l|, |u|) as l <= u
        mag_f = f0 + lip * x_mag
        slack = self._slack(mag_f, lip, x_mag, f0 + 2.0 * lip * x_mag, dtype)
        return a_l.to(dtype), (b_l - slack).to(dtype), a_u.to(dtype), (b_u + slack).to(dtype)

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _prepare(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
        """Broadcast, check (finite, lower <= upper) and promote to float64; also the out dtype."""
        lower, upper = torch.as_tensor(lower), torch.as_tensor(upper)
        dtype = torch.promote_types(lower.dtype, upper.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        l, u = torch.broadcast_tensors(lower.to(torch.float64), upper.to(torch.float64))
        if l.numel() > 0:
            # u - l is NaN or +inf whenever an end is infinite or NaN.
            d_min, d_max = torch.aminmax(u - l)
            if not (d_min.item() >= 0 and d_max.item() < math.inf):
                raise ValueError("interval ends must be finite with lower <= upper")
        return l, u, dtype

    @staticmethod
    def _slack(
        mag_f: Tensor, a_mag: Tensor | float, x_mag: Tensor, b_mag: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """How far offsets are widened: the margin plus a rounding allowance (see docstring);
        arguments are bounds on |f|, |a|, |x| and |b|."""
        rounding = _ROUNDING_EPS * torch.finfo(dtype).eps
        return (_MARGIN + rounding) * (1.0 + mag_f) + rounding * (a_mag * x_mag + b_mag)

    @cached_property
    def _critical(self) -> tuple[float, ...]:
        """Points besides the ends where the extremes of f over an interval may sit."""
        k = self.kind
        if k in ("leaky_relu", "elu") and self.alpha < 0:
            return (0.0,)
        if k == "silu":
            return (SILU_ARGMIN,)
        if k == "gelu":
            return (GELU_TANH_ARGMIN if self.approximate == "tanh" else GELU_ARGMIN,)
        return ()

    @cached_property
    def _range(self) -> tuple[float | None, float | None]:
        """Known global bounds of torch's f (used to clip ``interval``)."""
        k = self.kind
        if k == "relu":
            return (0.0, None)
        if k == "relu6":
            return (0.0, 6.0)
        if k == "hardtanh":
            return (self.min_val, self.max_val)
        if k == "sigmoid":
            return (0.0, 1.0)
        if k == "tanh":
            return (-1.0, 1.0)
        if k == "softplus" and self.threshold >= 0:
            return (0.0, None)
        if k == "elu" and self.alpha >= 0:
            return (-self.alpha, None)
        return (None, None)

    @cached_property
    def _smooth(self) -> Smooth:
        """Pieces with monotone f' and their root guesses, for the smooth kinds."""
        inf = math.inf
        k = self.kind
        if k == "tanh":
            pieces = (
                Piece(-inf, 0.0, 1, d_tanh, root_tanh_left),
                Piece(0.0, inf, -1, d_tanh, root_tanh_right),
            )
            return Smooth(pieces, d_tanh, continuous=True)
        if k == "sigmoid":
            pieces = (
                Piece(-inf, 0.0, 1, d_sigmoid, root_sigmoid_left),
                Piece(0.0, inf, -1, d_sigmoid, root_sigmoid_right),
            )
            return Smooth(pieces, d_sigmoid, continuous=True)
        if k == "silu":
            return non_monotone_spec("silu")
        if k == "gelu":
            return non_monotone_spec("gelu_tanh" if self.approximate == "tanh" else "gelu")
        if k == "elu":
            alpha = self.alpha

            def d_left(x: Tensor) -> Tensor:
                return alpha * torch.exp(torch.clamp_max(x, 0.0))

            def root_left(a: Tensor) -> Tensor:
                return torch.log((a / alpha).clamp(0.0, 1.0))

            def d_any(x: Tensor) -> Tensor:
                return torch.where(x > 0, torch.ones_like(x), d_left(x))

            shape = (alpha > 0) - (alpha < 0)
            pieces = (Piece(-inf, 0.0, shape, d_left, root_left), Piece(0.0, inf, 0))
            return Smooth(pieces, d_any, continuous=False)
        if k == "softplus":
            beta, threshold = self.beta, self.threshold

            def d_smooth(x: Tensor) -> Tensor:
                return torch.sigmoid(beta * x)

            def root_smooth(a: Tensor) -> Tensor:
                a = a.clamp(0.0, 1.0)
                return (torch.log(a) - torch.log1p(-a)) / beta

            def d_any(x: Tensor) -> Tensor:
                return torch.where(beta * x > threshold, torch.ones_like(x), d_smooth(x))

            t = threshold / beta
            pieces = (Piece(-inf, t, 1, d_smooth, root_smooth), Piece(t, inf, 0))
            return Smooth(pieces, d_any, continuous=False)
        raise AssertionError(k)  # pragma: no cover

    def _softplus_smooth(self, x: Tensor) -> Tensor:
        """log(1 + exp(beta x)) / beta without torch's switch, computed without overflow."""
        bx = self.beta * x
        return (torch.relu(bx) + torch.log1p(torch.exp(-bx.abs()))) / self.beta

    def _softplus_near(self, l: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
        """Where softplus's switch point t = threshold / beta may lie in the interval.

        There both one-sided limits at t (the smooth value and the identity) are candidates.
        The mask is a few ulps of the output dtype generous: the float at which torch switches
        depends on its rounding of ``beta * x``.
        """
        t = self.threshold / self.beta
        delta = 4.0 * torch.finfo(dtype).eps * (1.0 + abs(t))
        return (l <= t + delta) & (u >= t - delta)

    @staticmethod
    def _leaky_bounds(l: Tensor, u: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CROWN relaxation of x -> x (x >= 0), alpha x (x < 0), for any alpha (0: ReLU).

        The chord (exact on stable intervals) is the upper line if ``alpha <= 1`` (convex), the
        lower one otherwise; the other line passes through the kink with slope 1 if
        ``u > -l`` and ``alpha`` otherwise (the larger area under a convex f, the smaller above
        a concave one; also exact on stable intervals).
        """
        pos = torch.clamp_min(u, 0.0) - torch.clamp_min(l, 0.0)
        neg = torch.clamp_max(u, 0.0) - torch.clamp_max(l, 0.0)
        width = (u - l).clamp_min(torch.finfo(torch.float64).tiny)
        chord_a = pos / width + alpha * (neg / width) if alpha != 0.0 else pos / width
        chord_b = alpha * torch.clamp_max(l, 0.0) + torch.clamp_min(l, 0.0) - chord_a * l
        right = (u + l > 0).to(torch.float64)
        kink_a = alpha + (1.0 - alpha) * right
        kink_b = torch.zeros_like(l)
        if alpha <= 1.0:
            return kink_a, kink_b, chord_a, chord_b
        return chord_a, chord_b, kink_a, kink_b

    @staticmethod
    def _hardtanh_bounds(
        l: Tensor, u: Tensor, m: float, M: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Relaxation of clamp(x, m, M).

        Upper line: if the midpoint is below M, the line through (l, f(l)) and (q, f(q)) with
        q = min(u, M) (the chord when u <= M, which is exact on stable intervals and CROWN's
        chord across the lower corner; y = x or the line to the corner (M, M) otherwise); else
        the constant M. The lower line mirrors it. The midpoint test picks whichever of the two
        sound lines encloses less area.
        """
        tiny = torch.finfo(torch.float64).tiny
        c = 0.5 * (l + u)
        f_l, f_u = l.clamp(m, M), u.clamp(m, M)
        q = torch.clamp_max(u, M)
        slope_u = (q.clamp(m, M) - f_l) / (q - l).clamp_min(tiny)
        use_u = (c < M).to(torch.float64)
        a_u = use_u * slope_u
        b_u = use_u * (f_l - slope_u * l) + (1.0 - use_u) * M
        p = torch.clamp_min(l, m)
        slope_l = (f_u - p.clamp(m, M)) / (u - p).clamp_min(tiny)
        use_l = (c > m).to(torch.float64)
        a_l = use_l * slope_l
        b_l = use_l * (f_u - slope_l * u) + (1.0 - use_l) * m
        return a_l, b_l, a_u, b_u

    def _candidates(self, l: Tensor, u: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Candidate rows x, f(x) and f'(x) (empty where f' jumps): l, u and each breakpoint
        clamped into [l, u]. f (and f' where it is continuous) at a clamped breakpoint is
        f(l), f(u) or one constant: no evaluation."""
        spec = self._smooth
        ends = torch.stack([l, u])
        f_ends = self(ends)
        d_ends = spec.df(ends) if spec.continuous else None
        rows_x, rows_f, rows_d = [l, u], [f_ends[0], f_ends[1]], []
        if d_ends is not None:
            rows_d = [d_ends[0], d_ends[1]]
        for b in spec.breaks:
            bt = l.new_tensor(b)
            below, above = b < l, b > u
            rows_x.append(torch.clamp(bt, l, u))
            rows_f.append(torch.where(below, f_ends[0], torch.where(above, f_ends[1], self(bt))))
            if d_ends is not None:
                d_b = torch.where(above, d_ends[1], spec.df(bt))
                rows_d.append(torch.where(below, d_ends[0], d_b))
        return rows_x, rows_f, rows_d

    def _smooth_bounds(
        self, l: Tensor, u: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Parallel lines with the chord slope through the exact extremes of f(x) - a x."""
        spec = self._smooth
        shape = l.shape
        l, u = l.reshape(-1), u.reshape(-1)
        x_mag = torch.maximum(l.abs(), u.abs())
        rows_x, rows_f, rows_d = self._candidates(l, u)
        f_ends = (rows_f[0], rows_f[1])
        xs, fx = torch.stack(rows_x), torch.stack(rows_f)

        rise = fx[1] - fx[0]
        near = None
        if self.kind == "softplus":
            near = self._softplus_near(l, u, dtype).nonzero().squeeze(1)
            if near.numel() > 0:  # across the drop, the smooth curve's chord (torch's is steep)
                rise = rise.index_put(
                    (near,), self._softplus_smooth(u[near]) - self._softplus_smooth(l[near])
                )
        width = u - l
        narrow = width <= _CHORD_MIN_WIDTH * (1.0 + x_mag)
        a = rise / torch.where(narrow, 1.0, width)
        idx = narrow.nonzero().squeeze(1)
        if idx.numel() > 0:
            a = a.index_put((idx,), spec.df(l[idx] + 0.5 * width[idx]))
        a = a.to(dtype).to(torch.float64)  # the slope returned; the offsets are made for it

        h_min, h_max = torch.aminmax(fx - a * xs, dim=0)
        mag_f = torch.maximum(f_ends[0].abs(), f_ends[1].abs())
        last = len(spec.pieces) - 1
        for i, piece in enumerate(spec.pieces):
            if piece.shape == 0:
                continue
            assert piece.df is not None
            lo_row, hi_row = (0 if i == 0 else 1 + i), (1 if i == last else 2 + i)
            lo, hi = xs[lo_row], xs[hi_row]
            if rows_d:
                d_lo, d_hi = rows_d[lo_row], rows_d[hi_row]
            else:
                d_lo, d_hi = piece.df(torch.stack([lo, hi]))
            g_lo, g_hi = d_lo - a, d_hi - a
            need = (g_lo < 0) & (g_hi > 0) if piece.shape > 0 else (g_lo > 0) & (g_hi < 0)
            idx = need.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            sa = a[idx]
            r, err = root_bound(piece, sa, lo[idx], hi[idx], g_lo[idx], g_hi[idx])
            fr = self(r)
            hr = fr - sa * r
            if piece.shape > 0:  # h convex on the piece: its minimum is at the root
                h_min = h_min.index_put((idx,), torch.minimum(h_min[idx], hr - err))
            else:  # h concave: its maximum is at the root
                h_max = h_max.index_put((idx,), torch.maximum(h_max[idx], hr + err))
            mag_f = mag_f.index_put((idx,), torch.maximum(mag_f[idx], fr.abs()))
        if near is not None and near.numel() > 0:
            # both one-sided limits at the switch point t: the smooth value and t itself
            tc = torch.clamp(l.new_tensor(self.threshold / self.beta), l[near], u[near])
            sa = a[near]
            for v in (tc, self._softplus_smooth(tc)):
                h_max = h_max.index_put((near,), torch.maximum(h_max[near], v - sa * tc))
                h_min = h_min.index_put((near,), torch.minimum(h_min[near], v - sa * tc))
                mag_f = mag_f.index_put((near,), torch.maximum(mag_f[near], v.abs()))
        for k in range(2, len(rows_f)):  # f at breakpoints inside, e.g. GELU's dip below f(l)
            mag_f = torch.maximum(mag_f, rows_f[k].abs())

        b_mag = torch.maximum(h_min.abs(), h_max.abs())
        slack = self._slack(mag_f, a.abs(), x_mag, b_mag, dtype)
        b_l, b_u = h_min - slack, h_max + slack
        a = a.to(dtype).reshape(shape)
        return a, b_l.to(dtype).reshape(shape), a.clone(), b_u.to(dtype).reshape(shape)
