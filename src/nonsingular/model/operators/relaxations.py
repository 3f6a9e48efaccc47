"""Sound elementwise bounds for scalar activation functions over input intervals.

An :class:`Activation` names one scalar activation (with its PyTorch options) and gives, for
elementwise input intervals ``[lower, upper]``:

* :meth:`Activation.interval`: the range ``[min f, max f]`` (interval bound propagation);
* :meth:`Activation.linear_bounds`: lines ``a_l x + b_l <= f(x) <= a_u x + b_u`` valid on the
  whole interval (CROWN-style bound propagation: Zhang et al. 2018, auto_LiRPA).

"Sound" is meant against the function PyTorch actually computes (``torch.nn.functional``) in
the dtype the model runs it in (``model_dtype``; by default the dtype of the bounds), including
its rounding of the options and softplus's switch to the identity above ``threshold / beta``.

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
chord-slope lines through the extreme points of ``f - a x``. Where an interval meets softplus's
switch window (below), the lines take the smooth curve's chord slope and offsets valid for both
branches: the smooth curve on ``[l, min(u, t_hi)]`` and the identity on ``[max(l, t_lo), u]``.

:meth:`Activation.interval` takes the minimum and maximum of ``f`` at the ends, at the kinks of
non-monotone kinds (LeakyReLU/ELU with ``alpha < 0``) and, for GELU and SiLU, at their global
minimiser (solved at import) clamped into the interval; where the interval meets softplus's
switch window, the range of both branches over the same two parts. The result is clipped to the
function's known global range (rounded outwards to the output dtype).

The model's dtype
-----------------
Torch rounds the options to the dtype its kernel computes in (``at::opmath_type``: float32 for
bfloat16 and float16, else the tensor's dtype): leaky_relu's negative_slope, elu's alpha,
softplus's beta and threshold; hardtanh's (and relu6's) bounds go through
``Scalar.to<scalar_t>``, i.e. float32 then the tensor's dtype. :meth:`Activation.running_in`
makes those rounded options, and every bound is of the function with them (so leaky_relu with
slope 0.01 in float32 is bounded with ``fl(0.01)``, clamp(x, 0.1) with ``fl(0.1)``).

Branches: relu, leaky_relu, elu and hardtanh compare the input itself with 0 or a rounded bound,
which is exact, and are continuous there; max pooling picks one of equal values on ties. GELU
(tanh form too) has no branch; its float32 constants ``fl(sqrt(2/pi))`` and ``fl(0.044715)``
move ``0.5 x (1 + tanh(z))`` by at most ``0.5 |x| sech^2(z) |z| 2u <= 0.45 u |x|`` (``u`` the
unit roundoff; ``|z| sech^2(z) <= 0.45``), inside the ulps of ``|x|`` that
``Elementwise.rounding`` allows transcendental kernels. Softplus alone decides on a rounded
product: torch returns ``x`` where ``fl(x * beta) > threshold`` (beta, threshold rounded as
above, the product rounded in the kernel's dtype, with unit ``u`` and smallest normal ``tiny``).
With ``p = x * beta`` exact, ``|fl(p) - p| <= u |p| + tiny`` (gradual underflow or flushing to
zero: so ``beta * x`` underflowing to 0 near a threshold of 0 is included). Hence the identity
is certain when ``p - threshold > u |p| + tiny``, the smooth curve when
``threshold - p >= u |p| + tiny``, and either may be taken only where
``|p - threshold| < (u |threshold| + tiny) / (1 - u) <= 2 (u |threshold| + tiny)``. In ``x`` that
is the window ``|x - t| <= w`` around ``t = threshold / beta`` with
``w = 2 (u |threshold| + tiny) / beta + tiny`` (the last ``tiny`` for inputs flushed to zero),
widened by ``4 eps64 (|t| + w)`` for its own float64 arithmetic. Outside the window the branch
is the one float64 takes too (float64's own window lies inside it), so ``f`` is evaluated there
in float64 as usual; an interval that meets the window gets both branches.

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
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import InputError, UnsupportedLayerError
from .base import opmath_dtype
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
_EPS64 = torch.finfo(torch.float64).eps


def _round_to(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to nearest in ``dtype`` (kept as it is where that overflows)."""
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype).item()
    return rounded if math.isfinite(rounded) else value


@lru_cache(maxsize=512)
def _running_in(act: Activation, dtype: torch.dtype) -> Activation:
    """``act.running_in(dtype)`` (cached: its copies keep their solved tables)."""
    if not dtype.is_floating_point:
        dtype = torch.float64
    op = opmath_dtype(dtype)

    def clamp(v: float) -> float:  # hardtanh's bounds: Scalar.to<scalar_t>, via float
        return _round_to(_round_to(v, op), dtype)

    return replace(
        act,
        alpha=_round_to(act.alpha, op),
        beta=_round_to(act.beta, op),
        threshold=_round_to(act.threshold, op),
        min_val=clamp(act.min_val),
        max_val=clamp(act.max_val),
        run_dtype=dtype,
    )


def _rounded_outward(value: float, dtype: torch.dtype, direction: float) -> float:
    """``value`` in ``dtype``, rounded towards ``direction`` (-inf: down, inf: up)."""
    exact = torch.tensor(value, dtype=torch.float64)
    near = exact.to(dtype)
    if (near.to(torch.float64) - exact) * direction < 0:
        near = torch.nextafter(near, near.new_tensor(direction))
    return near.item()


@dataclass(frozen=True)
class Activation:
    """One scalar activation with its options.

    ``kind`` is one of relu, leaky_relu, elu, gelu, silu, tanh, sigmoid, softplus, hardtanh,
    relu6; the other fields are the PyTorch options of that kind (``alpha``: leaky_relu's
    negative_slope and elu's alpha; ``beta``/``threshold``: softplus; ``approximate``: gelu;
    ``min_val``/``max_val``: hardtanh). Fields that do not concern the kind are ignored.
    ``run_dtype``: the dtype torch runs it in, whose rounding the bounds follow (None: the
    dtype of the bounds they are given; :meth:`running_in` sets it).
    """

    kind: str
    alpha: float = 0.0
    beta: float = 1.0
    threshold: float = 20.0
    approximate: str = "none"
    min_val: float = -1.0
    max_val: float = 1.0
    run_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UnsupportedLayerError(
                f"unknown activation kind {self.kind!r}; expected one of {_KINDS}"
            )
        if self.approximate not in ("none", "tanh"):
            raise UnsupportedLayerError(
                f"gelu approximate={self.approximate!r}; expected 'none' or 'tanh'"
            )
        for name in ("alpha", "beta", "threshold", "min_val", "max_val"):
            if not math.isfinite(getattr(self, name)):
                raise UnsupportedLayerError(
                    f"{self.kind} option {name}={getattr(self, name)}; expected a finite value"
                )
        if self.kind == "softplus" and not self.beta > 0:
            raise UnsupportedLayerError(f"softplus beta={self.beta}; expected beta > 0")
        if self.kind == "hardtanh" and self.min_val > self.max_val:
            raise UnsupportedLayerError(
                f"hardtanh min_val={self.min_val} > max_val={self.max_val}; "
                "expected min_val <= max_val"
            )

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

    def running_in(self, dtype: torch.dtype) -> Activation:
        """This activation as torch runs it on ``dtype`` tensors: its options rounded as torch
        rounds them (see the module docstring) and ``run_dtype`` set to ``dtype``."""
        return _running_in(self, dtype)

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

    def interval(
        self, lower: Tensor, upper: Tensor, model_dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """``[min f, max f]`` over ``[lower, upper]``, elementwise (exact up to the slack).

        ``f`` is the function as torch runs it on ``model_dtype`` tensors (default: the dtype
        of the bounds; see :meth:`running_in`). Candidates: both ends, and where f is not
        monotone its kink or global minimiser clamped into the interval; near softplus's switch
        both branches.
        """
        l, u, dtype = self._prepare(lower, upper)
        return self.running_in(model_dtype or self.run_dtype or dtype)._interval(l, u, dtype)

    def _interval(self, l: Tensor, u: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        crit = self._critical
        if crit:
            xs = torch.stack([l, u] + [torch.clamp(l.new_tensor(c), l, u) for c in crit])
            lo, hi = torch.aminmax(self(xs), dim=0)
        else:  # nondecreasing
            lo, hi = self(l), self(u)
        if self.kind == "softplus":
            near = self._switch_near(l, u)
            if bool(near.any()):
                s_lo, s_hi = self._softplus_switch_interval(l, u)
                lo, hi = torch.where(near, s_lo, lo), torch.where(near, s_hi, hi)
        mag = torch.maximum(lo.abs(), hi.abs())
        slack = (_MARGIN + _ROUNDING_EPS * torch.finfo(dtype).eps) * (1.0 + mag)
        lo, hi = (lo - slack).to(dtype), (hi + slack).to(dtype)
        r_lo, r_hi = self._range  # clipped to in dtype, rounded outwards (0.1 is not a float)
        if r_lo is not None:
            lo = lo.clamp_min(_rounded_outward(r_lo, dtype, -math.inf))
        if r_hi is not None:
            hi = hi.clamp_max(_rounded_outward(r_hi, dtype, math.inf))
        return lo, hi

    # ---------------------------------------------------------------- linear bounds

    def linear_bounds(
        self, lower: Tensor, upper: Tensor, model_dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a_l, b_l, a_u, b_u)`` with ``a_l x + b_l <= f(x) <= a_u x + b_u`` on the interval.

        ``f`` is the function as torch runs it on ``model_dtype`` tensors (default: the dtype
        of the bounds; see :meth:`running_in`). Piecewise-linear kinds use CROWN's closed forms;
        smooth kinds two lines parallel to the chord through the exact extremes of
        ``f(x) - a x`` (see the module docstring).
        """
        l, u, dtype = self._prepare(lower, upper)
        return self.running_in(model_dtype or self.run_dtype or dtype)._linear_bounds(l, u, dtype)

    def _linear_bounds(
        self, l: Tensor, u: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
                raise InputError(
                    "activation bounds with a non-finite end or lower > upper; "
                    "expected finite ends with lower <= upper"
                )
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

    def _switch_window(self) -> tuple[float, float]:
        """``[t_lo, t_hi]``: outside it torch's softplus takes the smooth curve below ``t_lo``
        and the identity above ``t_hi`` whatever its rounding of ``beta * x`` (derivation in
        the module docstring). Needs ``run_dtype``."""
        info = torch.finfo(opmath_dtype(self.run_dtype or torch.float64))
        t = self.threshold / self.beta
        w = 2.0 * (info.eps / 2 * abs(self.threshold) + info.tiny) / self.beta + info.tiny
        w += 4.0 * _EPS64 * (abs(t) + w)  # this float64 arithmetic's own rounding
        return t - w, t + w

    def _switch_near(self, l: Tensor, u: Tensor) -> Tensor:
        """Where ``[l, u]`` meets softplus's switch window: there f may be either branch."""
        t_lo, t_hi = self._switch_window()
        return (l <= t_hi) & (u >= t_lo)

    def _softplus_switch_interval(self, l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``[min f, max f]`` where the box meets the switch window: both branches, the smooth
        curve on ``[l, min(u, t_hi)]`` and the identity on ``[max(l, t_lo), u]``."""
        t_lo, t_hi = self._switch_window()
        lo = torch.minimum(self._softplus_smooth(l), l.clamp_min(t_lo))
        hi = torch.maximum(self._softplus_smooth(u.clamp_max(t_hi)), u)
        return lo, hi

    def _softplus_switch_offsets(
        self, l: Tensor, u: Tensor, a: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(min h, max h, max |f|)`` for ``h = f - a x`` where the box meets the switch window,
        over both branches: the smooth curve on ``[l, s]``, ``s = min(u, t_hi)``, and the
        identity on ``[max(l, t_lo), u]``. The smooth ``h`` is convex: its maximum is at
        ``l`` or ``s``, and so is its minimum unless ``h'`` changes sign on ``[l, s]``; then it
        is at least the tangent's at the closed-form root ``r`` of ``sigmoid(beta x) = a``
        (clamped into ``[l, s]``), ``h(r) - |h'(r)| (s - l)``."""
        t_lo, t_hi = self._switch_window()
        s, q = u.clamp_max(t_hi), l.clamp_min(t_lo)
        f_l, f_s = self._softplus_smooth(l), self._softplus_smooth(s)
        ac = a.detach().clamp(0.0, 1.0)  # any r in [l, s] is sound: no gradient through it
        r = torch.nan_to_num((torch.log(ac) - torch.log1p(-ac)) / self.beta, nan=0.0)
        r = torch.minimum(torch.maximum(r, l), s)
        f_r = self._softplus_smooth(r)
        tangent = f_r - a * r - (torch.sigmoid(self.beta * r) - a).abs() * (s - l)
        inside = (torch.sigmoid(self.beta * l) < a) & (torch.sigmoid(self.beta * s) > a)
        ends = torch.stack([f_l - a * l, f_s - a * s, q - a * q, u - a * u])
        h_min = torch.where(inside, torch.minimum(ends.amin(dim=0), tangent), ends.amin(dim=0))
        mag = torch.stack([f_l, f_s, f_r, q, u]).abs().amax(dim=0)
        return h_min, ends.amax(dim=0), mag

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
        shape = l.shape
        l, u = l.reshape(-1), u.reshape(-1)
        x_mag = torch.maximum(l.abs(), u.abs())
        rows_x, rows_f, rows_d = self._candidates(l, u)
        xs, fx = torch.stack(rows_x), torch.stack(rows_f)
        near = self._switch_near(l, u) if self.kind == "softplus" else None
        a = self._chord_slope(l, u, fx, near, dtype)
        h_min, h_max, mag_f = self._piece_extremes(xs, fx, rows_d, a)
        if near is not None and bool(near.any()):  # both branches of softplus
            s_min, s_max, s_mag = self._softplus_switch_offsets(l, u, a)
            h_min, h_max = torch.where(near, s_min, h_min), torch.where(near, s_max, h_max)
            mag_f = torch.where(near, torch.maximum(mag_f, s_mag), mag_f)

        b_mag = torch.maximum(h_min.abs(), h_max.abs())
        slack = self._slack(mag_f, a.abs(), x_mag, b_mag, dtype)
        b_l, b_u = h_min - slack, h_max + slack
        a = a.to(dtype).reshape(shape)
        return a, b_l.to(dtype).reshape(shape), a.clone(), b_u.to(dtype).reshape(shape)

    def _chord_slope(
        self, l: Tensor, u: Tensor, fx: Tensor, near: Tensor | None, dtype: torch.dtype
    ) -> Tensor:
        """The lines' slope, rounded to the output dtype: the chord's (where softplus may
        switch, the smooth curve's: torch's chord is steep across the drop), or the derivative
        at the midpoint on narrow intervals."""
        rise = fx[1] - fx[0]
        width = u - l
        mid = l + 0.5 * width
        if near is not None:
            rise = torch.where(near, self._softplus_smooth(u) - self._softplus_smooth(l), rise)
        narrow = width <= _CHORD_MIN_WIDTH * (1.0 + torch.maximum(l.abs(), u.abs()))
        a = rise / torch.where(narrow, 1.0, width)
        idx = narrow.nonzero().squeeze(1)
        if idx.numel() > 0:
            a = a.index_put((idx,), self._smooth.df(mid[idx]))
            if near is not None:
                a = torch.where(near & narrow, torch.sigmoid(self.beta * mid), a)
        return a.to(dtype).to(torch.float64)  # the slope returned; the offsets are made for it

    def _piece_extremes(
        self, xs: Tensor, fx: Tensor, rows_d: list[Tensor], a: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(min h, max h, max |f|)`` for ``h = f - a x`` over the candidate rows ``xs`` (f at
        them: ``fx``) and the roots of ``f' = a`` on the pieces where ``h`` is convex or
        concave (see the module docstring)."""
        spec = self._smooth
        h_min, h_max = torch.aminmax(fx - a * xs, dim=0)
        mag_f = fx.abs().amax(dim=0)  # ends and breakpoints inside, e.g. GELU's dip below f(l)
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
        return h_min, h_max, mag_f
