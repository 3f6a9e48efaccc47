"""Sound bounds for layer normalization (``F.layer_norm``), for IBP and CROWN.

Every function takes elementwise bounds ``lower <= upper`` of shape ``(B, *in)`` on the input
of the operation. ``*_interval`` returns elementwise bounds on its output; ``*_backward``
takes ``lam: (B, K, *out)`` and returns ``(lam_in, const)`` with ``lam_in: (B, K, *in)`` and
``const: (B, K)`` such that, for every ``h`` in the box,

    sum(lam * op(h)) >= sum(lam_in * h) + const      (per example b and objective k),

a lower bound of ``lam . op(h)`` (upper bounds come from negating ``lam``). Vectorized, device
and dtype agnostic; sound in exact arithmetic (the model's rounding is added by the operator).

Bounded through ``c = x - mean(x)`` and ``z_i = c_i / sqrt(mean(c^2) + eps)``. Interval: for
fixed ``a_i = sum_{j != i} c_j^2 / n + eps``, ``z_i = c_i / sqrt(c_i^2 / n + a_i)`` is
increasing in ``c_i`` and monotone in ``a_i`` (in the direction given by the sign of ``c_i``),
so its range over a box of ``(c_i, a_i)`` is found at corners. Backward: per normalized row and
objective, the best (on the box) of the constant bound, per-coordinate lines in ``c_i`` with
exact offsets, and two McCormick planes of ``sum_i w_i z_i = rho * (w . c)`` with
``rho = (mean(c^2) + eps)^{-1/2}`` (first-order exact, so tight for narrow boxes), mapped back
to ``x`` through the centering matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ...errors import BoundError

IntOrSeq = int | Sequence[int]

__all__ = ["layernorm_backward", "layernorm_interval"]


def _layernorm_setup(
    lower: Tensor,
    normalized_shape: IntOrSeq,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[tuple[int, ...], int, Tensor, Tensor]:
    """Normalized shape as a tuple, its size ``n`` and the flat ``(n,)`` weight and bias."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(lower.shape[lower.dim() - len(shape) :]) != shape or lower.dim() < len(shape) + 1:
        raise BoundError(f"input {tuple(lower.shape)} does not end with {shape} after a batch")
    if not eps > 0:
        raise BoundError(f"eps must be positive for sound bounds, got {eps}")
    n = math.prod(shape)
    one = lower.new_ones(n)
    g = one if weight is None else weight.reshape(n).to(lower)
    b = torch.zeros_like(one) if bias is None else bias.reshape(n).to(lower)
    return shape, n, g, b


def _exclusive_sum(v: Tensor) -> Tensor:
    """``sum_{j != i} v_j`` over the last dim, by prefix and suffix sums (no cancellation)."""
    zero = torch.zeros_like(v[..., :1])
    before = torch.cat([zero, v.cumsum(-1)[..., :-1]], dim=-1)
    after = torch.cat([v.flip(-1).cumsum(-1).flip(-1)[..., 1:], zero], dim=-1)
    return before + after


def _normalized(c: Tensor, a: Tensor, n: int) -> Tensor:
    """``f(c, a) = c / sqrt(c^2 / n + a)`` (``a > 0``): ``z_i`` with ``a_i`` held fixed."""
    return c / torch.sqrt(c * c / n + a)


class _Centered:
    """Interval analysis of ``c = x - mean(x)`` and ``a_i = sum_{j != i} c_j^2 / n + eps``.

    ``lower, upper: (..., n)``: the input flattened to rows of the normalized size ``n``;
    per-entry results are ``(..., n)``, per-row ones (``s_lo, s_hi``) ``(...)``.
    """

    def __init__(self, lower: Tensor, upper: Tensor, n: int, eps: float) -> None:
        mid, rad = (lower + upper) / 2, (upper - lower) / 2
        center = mid - mid.mean(-1, keepdim=True)
        # |c_i - center_i| <= (1 - 1/n) r_i + (1/n) sum_{j != i} r_j
        radius = (1 - 1 / n) * rad + _exclusive_sum(rad) / n
        self.lo, self.hi = center - radius, center + radius
        straddles = (self.lo < 0) & (self.hi > 0)
        sq_lo, sq_hi = self.lo.square(), self.hi.square()
        min_sq = torch.where(straddles, torch.zeros_like(sq_lo), torch.minimum(sq_lo, sq_hi))
        max_sq = torch.maximum(sq_lo, sq_hi)
        self.rest_lo = _exclusive_sum(min_sq)  # bounds of sum_{j != i} c_j^2
        self.rest_hi = _exclusive_sum(max_sq)
        self.a_lo = self.rest_lo / n + eps
        self.a_hi = self.rest_hi / n + eps
        self.center = center
        self.s_lo = min_sq.mean(-1)  # bounds of s = mean(c^2), (M,)
        self.s_hi = max_sq.mean(-1)
        self.n = n
        self.eps = eps

    def z_bounds(self) -> tuple[Tensor, Tensor]:
        """Bounds of ``z = c / sqrt(mean(c^2) + eps)``, elementwise ``(..., n)``.

        ``f(c, a)`` is increasing in ``c`` and, at fixed ``c``, decreasing in ``a`` when
        ``c > 0`` (increasing when ``c < 0``), so the extremes are at corners of the box of
        ``(c_i, a_i)``. Since ``sum c = 0``, ``c_i^2 <= (n - 1) sum_{j != i} c_j^2``: at
        ``c_i = t`` the rest is at least ``t^2 / (n - 1)``, which keeps ``|z_i| < sqrt(n - 1)``
        (and ``z = 0`` when ``n = 1``).
        """
        n, eps = self.n, self.eps
        if n == 1:
            zero = torch.zeros_like(self.lo)
            return zero, zero
        hi, lo = self.hi, self.lo
        # upper: at c = hi, with the smallest a allowed there (largest a if hi < 0)
        rest_at_hi = torch.maximum(self.rest_lo, hi.square() / (n - 1))
        a_up = torch.where(hi >= 0, rest_at_hi / n + eps, self.a_hi)
        z_hi = _normalized(hi, a_up, n)
        rest_at_lo = torch.maximum(self.rest_lo, lo.square() / (n - 1))
        a_down = torch.where(lo >= 0, self.a_hi, rest_at_lo / n + eps)
        z_lo = _normalized(lo, a_down, n)
        cap = math.sqrt(n - 1)
        return z_lo.clamp(-cap, cap), z_hi.clamp(-cap, cap)

    def lines(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Lines in ``c_i``: ``s_lo c_i + t_lo <= z_i <= s_hi c_i + t_hi`` on the box.

        ``z_i`` lies between ``F_lo(c_i)`` (``f(c, a_hi)`` for ``c >= 0``, ``f(c, a_lo)`` for
        ``c < 0``) and ``F_hi(c_i)`` (``a_lo`` and ``a_hi`` swapped). Both are convex for
        ``c <= 0`` and concave for ``c >= 0`` (``f''`` has the sign of ``-c``; the kink at 0
        keeps each piece so). The slope of each line is its function's chord on
        ``[lo, hi]``; its offset is the exact extreme of ``F - s c``, found among ``lo``,
        ``hi``, 0 and the stationary point of the piece where ``F - s c`` is convex (for the
        minimum) or concave (for the maximum): ``f'(c) = a / (c^2/n + a)^{3/2} = s`` at
        ``|c| = sqrt(n ((a / s)^{2/3} - a))``. Returns ``(s_lo, t_lo, s_hi, t_hi)``.
        """
        n = self.n
        lo, hi, a_lo, a_hi = self.lo, self.hi, self.a_lo, self.a_hi

        def f_lo(c: Tensor) -> Tensor:
            return _normalized(c, torch.where(c >= 0, a_hi, a_lo), n)

        def f_hi(c: Tensor) -> Tensor:
            return _normalized(c, torch.where(c >= 0, a_lo, a_hi), n)

        def derivative(c: Tensor, a: Tensor) -> Tensor:
            return a / (c * c / n + a).pow(1.5)

        def stationary(a: Tensor, s: Tensor) -> Tensor:
            """``|c|`` where ``f'(c) = s`` (0 if ``s >= f'(0)``, +inf if ``s <= 0``)."""
            safe = torch.where(s > 0, s, torch.ones_like(s))
            root = torch.sqrt(n * ((a / safe).pow(2 / 3) - a).clamp(min=0))
            return torch.where(s > 0, root, torch.full_like(s, float("inf")))

        width = hi - lo
        mid = (lo + hi) / 2
        zero = torch.zeros_like(lo).clamp(lo, hi)  # 0 clamped into [lo, hi]

        def chord(f_left: Tensor, f_right: Tensor, a_mid: Tensor) -> Tensor:
            positive = width > 0
            safe = torch.where(positive, width, torch.ones_like(width))
            return torch.where(positive, (f_right - f_left) / safe, derivative(mid, a_mid))

        left, right = f_lo(lo), f_lo(hi)
        s_lo = chord(left, right, torch.where(mid >= 0, a_hi, a_lo))
        c_star = (-stationary(a_lo, s_lo)).clamp(lo, hi)  # on the convex piece c <= 0
        candidates = torch.stack([lo, hi, zero, c_star])
        t_lo = (f_lo(candidates) - s_lo * candidates).amin(0)

        left, right = f_hi(lo), f_hi(hi)
        s_hi = chord(left, right, torch.where(mid >= 0, a_lo, a_hi))
        c_star = stationary(a_lo, s_hi).clamp(lo, hi)  # on the concave piece c >= 0
        candidates = torch.stack([lo, hi, zero, c_star])
        t_hi = (f_hi(candidates) - s_hi * candidates).amax(0)

        # where the constant bound beats the line at the center of [lo, hi], take it instead
        z_lo, z_hi = self.z_bounds()
        flat_lo = s_lo * mid + t_lo < z_lo
        s_lo, t_lo = torch.where(flat_lo, 0.0, s_lo), torch.where(flat_lo, z_lo, t_lo)
        flat_hi = s_hi * mid + t_hi > z_hi
        s_hi, t_hi = torch.where(flat_hi, 0.0, s_hi), torch.where(flat_hi, z_hi, t_hi)
        return s_lo, t_lo, s_hi, t_hi


def layernorm_interval(
    lower: Tensor,
    upper: Tensor,
    *,
    normalized_shape: IntOrSeq,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Elementwise bounds ``(B, *in)`` of ``F.layer_norm`` over the box ``[lower, upper]``.

    ``lower, upper: (B, *in)`` with ``in`` ending in ``normalized_shape``. The centered input
    ``c = x - mean(x)`` is bounded exactly (center/radius through the centering matrix);
    ``z_i = c_i / sqrt(mean(c^2) + eps)`` from corners of ``(c_i, sum_{j != i} c_j^2)``,
    treated as independent (a superset, so sound) and capped by ``|z_i| < sqrt(n - 1)``;
    ``y = weight * z + bias`` with the sign of the weight. Zero-width boxes give the exact
    value; very wide ones at most ``sqrt(n - 1) |weight| + |bias|``.
    """
    shape, n, g, b = _layernorm_setup(lower, normalized_shape, weight, bias, eps)
    flat = (-1, n)
    box = _Centered(lower.reshape(flat), upper.reshape(flat), n, eps)
    z_lo, z_hi = box.z_bounds()
    g_pos, g_neg = g.clamp(min=0), g.clamp(max=0)
    y_lo = g_pos * z_lo + g_neg * z_hi + b
    y_hi = g_pos * z_hi + g_neg * z_lo + b
    return y_lo.reshape(lower.shape), y_hi.reshape(lower.shape)


def _box_min(alpha: Tensor, beta: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Minimum over the row box of ``alpha . c + beta`` with ``c = x - mean(x)``: ``(B, K, M)``.

    ``alpha: (B, K, M, n)``, ``beta: (B, K, M)``, ``lower, upper: (B, 1, M, n)``.
    """
    coef = alpha - alpha.mean(-1, keepdim=True)
    return (coef.clamp(min=0) * lower + coef.clamp(max=0) * upper).sum(-1) + beta


def _product_planes(
    box: _Centered, w: Tensor, lower: Tensor, upper: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """Two lower bounds ``alpha . c + beta`` of one row's ``sum_i w_i z_i``: ``(B, K, M, n)``,
    ``(B, K, M)`` each.

    ``sum_i w_i z_i = rho * T`` with ``T = w . c`` (linear, its exact range ``[T_lo, T_hi]``
    over the box) and ``rho = (s + eps)^{-1/2}``, ``s = mean(c^2) in [s_lo, s_hi]``. McCormick:
    ``rho T >= rho_lo T + T_lo rho - rho_lo T_lo`` and ``rho T >= rho_hi T + T_hi rho -
    rho_hi T_hi``. The ``kappa rho`` term (``kappa = T_lo`` or ``T_hi``) is bounded below,
    for ``kappa >= 0``, by the tangent of the convex ``rho`` at ``s0`` (slope < 0) and then
    ``s <= mean_j((lo_j + hi_j) c_j - lo_j hi_j)`` (chords of ``c_j^2``); for ``kappa < 0``,
    by the chord of ``rho`` on ``[s_lo, s_hi]`` (slope <= 0) and then ``s >= mean_j(2 m_j c_j
    - m_j^2)`` (tangents of ``c_j^2`` at the centers ``m_j``). Every step is an inequality
    used with the sign that keeps it a lower bound; errors are second order in the widths.
    """
    n, eps = box.n, box.eps
    lo, hi, mid = box.lo[:, None], box.hi[:, None], box.center[:, None]  # (B, 1, M, n)
    s_lo, s_hi = box.s_lo[:, None], box.s_hi[:, None]  # (B, 1, M)
    rho_hi, rho_lo = (s_lo + eps).rsqrt(), (s_hi + eps).rsqrt()
    # tangent of rho at s0: rho >= r0 + r1 s
    s0 = mid.square().mean(-1).clamp(s_lo, s_hi)
    r1 = -0.5 * (s0 + eps).pow(-1.5)
    r0 = (s0 + eps).rsqrt() - r1 * s0
    # chord of rho on [s_lo, s_hi]: rho <= q0 + q1 s (a single point: s is known there)
    span = s_hi - s_lo
    wide = span > 0
    q1 = torch.where(wide, (rho_lo - rho_hi) / torch.where(wide, span, 1.0), 0.0)
    q0 = rho_hi - q1 * s_lo
    # s <= up_coef . c + up_const and s >= down_coef . c + down_const
    up_coef, up_const = (lo + hi) / n, -(lo * hi).mean(-1)
    down_coef, down_const = 2 * mid / n, -mid.square().mean(-1)

    t_lo = _box_min(w, torch.zeros_like(w[..., 0]), lower, upper)
    t_hi = -_box_min(-w, torch.zeros_like(w[..., 0]), lower, upper)
    planes = []
    for rho_x, kappa in ((rho_lo, t_lo), (rho_hi, t_hi)):
        nonneg = (kappa >= 0)[..., None]
        k_pos, k_neg = kappa.clamp(min=0), kappa.clamp(max=0)
        alpha = rho_x[..., None] * w + torch.where(
            nonneg, (k_pos * r1)[..., None] * up_coef, (k_neg * q1)[..., None] * down_coef
        )
        beta = -rho_x * kappa + k_pos * (r0 + r1 * up_const) + k_neg * (q0 + q1 * down_const)
        planes.append((alpha, beta))
    return planes


def layernorm_backward(
    lam: Tensor,
    lower: Tensor,
    upper: Tensor,
    *,
    normalized_shape: IntOrSeq,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relaxation: Literal["best", "linear", "constant"] = "best",
) -> tuple[Tensor, Tensor]:
    """Backward linear bound of ``F.layer_norm``: ``(lam_in: (B, K, *in), const: (B, K))``.

    ``lam: (B, K, *in)``; ``lower, upper: (B, *in)``. With ``w = lam * weight``,
    ``sum(lam * y) = sum_rows sum_i w_i z_i + sum(lam * bias)``, and every normalized row
    (``n`` entries) gets its own lower bound, linear in its ``c = x - mean(x)``, chosen per
    ``(b, k, row)`` among candidates, each sound on its own (so any choice is):

    * constant: ``sum_i (w_i+ z_lo_i + w_i- z_hi_i)`` from :func:`layernorm_interval`;
    * per-coordinate lines ``z_i >= s_i c_i + t_i`` (or ``<=``, by the sign of ``w_i``)
      from ``_Centered.lines``;
    * two McCormick planes of ``rho * (w . c)`` (``_product_planes``), first-order exact.

    ``sum_i v_i c_i = sum_i (v_i - mean(v)) x_i`` maps a bound to the input. The candidate
    kept is the one with the largest minimum over the box ``[lower, upper]``; ``"linear"``
    leaves the constant out (for tests), ``"constant"`` uses only it (``lam_in = 0``).
    """
    if relaxation not in ("best", "linear", "constant"):
        raise BoundError(f"unknown relaxation {relaxation!r}")
    shape, n, g, b = _layernorm_setup(lower, normalized_shape, weight, bias, eps)
    batch, k = lam.shape[:2]
    if lam.shape[2:] != lower.shape[1:] or lam.shape[0] != lower.shape[0]:
        raise BoundError(f"lam {tuple(lam.shape)} is not (B, K, *in) for {tuple(lower.shape)}")
    lam_rows = lam.reshape(batch, k, -1, n)  # (B, K, M, n)
    box = _Centered(lower.reshape(batch, -1, n), upper.reshape(batch, -1, n), n, eps)
    bias_term = (lam_rows * b).sum(dim=(2, 3))
    w = lam_rows * g  # coefficient of z_i
    w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
    low = lower.reshape(batch, 1, -1, n)
    high = upper.reshape(batch, 1, -1, n)

    candidates: list[tuple[Tensor, Tensor]] = []  # (alpha on c: (B, K, M, n), beta: (B, K, M))
    if relaxation != "linear":
        z_lo, z_hi = (z[:, None] for z in box.z_bounds())
        candidates.append((torch.zeros_like(w), (w_pos * z_lo + w_neg * z_hi).sum(-1)))
    if relaxation != "constant":
        s_lo, t_lo, s_hi, t_hi = (v[:, None] for v in box.lines())
        candidates.append((w_pos * s_lo + w_neg * s_hi, (w_pos * t_lo + w_neg * t_hi).sum(-1)))
        candidates.extend(_product_planes(box, w, low, high))

    alpha, beta = candidates[0]
    best = _box_min(alpha, beta, low, high)
    for a_next, b_next in candidates[1:]:
        value = _box_min(a_next, b_next, low, high)
        better = value > best
        alpha = torch.where(better[..., None], a_next, alpha)
        beta = torch.where(better, b_next, beta)
        best = torch.maximum(best, value)
    lam_in = alpha - alpha.mean(-1, keepdim=True)
    return lam_in.reshape(lam.shape), beta.sum(-1) + bias_term
