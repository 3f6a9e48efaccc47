"""BatchNorm (eval: a per-channel affine map, exact in bounds; training: batch statistics) and
LayerNorm (its relaxation in ``layernorm_bounds.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Box, Operator, dot, gamma, guarded, tiny_of
from .layernorm_bounds import layernorm_backward, layernorm_interval

# roundings in one eval-mode batch-norm output: subtract, rsqrt, two products, add (and slack)
_BATCH_NORM_ROUNDINGS = 8


@dataclass
class BatchNorm(Operator):
    """``F.batch_norm`` with running statistics: ``h * scale + shift`` per channel (dim 1)."""

    label: str
    eps: float
    momentum: float | None
    linear = True

    def forward(
        self,
        h: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        count: Tensor | None = None,
    ) -> Tensor:
        return F.batch_norm(h, mean, var, weight, bias, False, 0.0, self.eps)

    def forward_train(
        self,
        h: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        count: Tensor | None = None,
    ) -> Tensor:
        """Batch statistics, updating the running ones in place (as the module does)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if count is not None:
            with torch.no_grad():
                count.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(count)
        return F.batch_norm(h, mean, var, weight, bias, True, factor, self.eps)

    def _affine(
        self, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, dims: int
    ) -> tuple[Tensor, Tensor]:
        scale = torch.rsqrt(var + self.eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        view = (-1,) + (1,) * (dims - 2)
        return scale.reshape(view), shift.reshape(view)

    def interval(
        self, h: Box, mean: Tensor, var: Tensor, weight: Any, bias: Any, *rest: Any
    ) -> Box:
        scale, shift = self._affine(mean, var, weight, bias, h.lower.dim())
        center = h.center * scale + shift
        radius = h.radius * scale.abs()
        return Box(center - radius, center + radius)

    def backward(
        self, lam: Tensor, h: Box, mean: Tensor, var: Tensor, weight: Any, bias: Any, *rest: Any
    ) -> tuple[list[Tensor | None], Tensor]:
        scale, shift = self._affine(mean, var, weight, bias, h.lower.dim())
        return [lam * scale], dot(lam, shift)

    def rounding(
        self, unit: float, h: Box, mean: Tensor, var: Tensor, weight: Any, bias: Any, *rest: Any
    ) -> Tensor:
        """``(h - mean) * rsqrt(var + eps) * w + b`` in any association: a handful of roundings
        of terms no larger than ``|scale| (|h| + |mean|) + |b|``, near zero as many of ``tiny``
        (times each factor, for flushed operands); ``inf`` where a term of any association,
        up to ``rsqrt(var + eps) max(1, |w|) (|h| + |mean|) + |b|``, may overflow."""
        scale, _ = self._affine(mean, var, weight, bias, h.lower.dim())
        view = scale.shape
        centred = h.magnitude() + mean.abs().reshape(view)
        size = scale.abs() * centred
        largest = torch.rsqrt(var + self.eps).reshape(view) * centred
        if weight is not None:
            largest = largest * weight.abs().reshape(view).clamp(min=1)
        if bias is not None:
            size = size + bias.abs().reshape(view)
            largest = largest + bias.abs().reshape(view)
        operands = 1 + centred + scale.abs()
        error = _BATCH_NORM_ROUNDINGS * (unit * size + tiny_of(unit) * operands)
        return guarded(error, largest, unit)


@dataclass
class LayerNorm(Operator):
    """``F.layer_norm`` over the last ``len(shape)`` dimensions."""

    label: str
    shape: tuple[int, ...]
    eps: float

    def forward(
        self, h: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        return F.layer_norm(h, self.shape, weight, bias, self.eps)

    def _options(self, weight: Any, bias: Any) -> dict[str, Any]:
        return {"normalized_shape": self.shape, "weight": weight, "bias": bias, "eps": self.eps}

    def interval(self, h: Box, weight: Any = None, bias: Any = None) -> Box:
        return Box(*layernorm_interval(h.lower, h.upper, **self._options(weight, bias)))

    def backward(
        self, lam: Tensor, h: Box, weight: Any = None, bias: Any = None
    ) -> tuple[list[Tensor | None], Tensor]:
        lam_in, const = layernorm_backward(lam, h.lower, h.upper, **self._options(weight, bias))
        return [lam_in], const

    def needs_tightening(self, box: Box) -> Tensor | None:
        return box.upper > box.lower

    def rounding(self, unit: float, h: Box, weight: Any = None, bias: Any = None) -> Tensor:
        """The mean is off by ``gamma_n M`` and each centred value by ``u`` more; the variance
        by ``gamma_(n+1)`` relatively, its root by ``u``; so ``c r`` is off by at most
        ``r_max 2 (gamma_n + u) M + sqrt(n) (gamma_(n+1) + 3u)``, with ``|c r| <= sqrt(n)``,
        ``M`` the group's largest magnitude and ``r_max`` from the smallest variance the box
        allows. Two more roundings for the scale and the shift. Near zero (``_underflow``) the
        centred values and the variance are also off absolutely. ``inf`` where the sum of
        squares, up to ``n (2M)^2``, may overflow."""
        dims = tuple(range(h.lower.dim() - len(self.shape), h.lower.dim()))
        n = math.prod(self.shape)
        floor = _variance_floor(h, dims)
        r_max = torch.rsqrt(floor + self.eps)
        size = h.magnitude().amax(dim=dims, keepdim=True)
        root = math.sqrt(n)
        normalized = r_max * 2 * (gamma(n, unit) + unit) * size + root * (
            gamma(n + 1, unit) + 3 * unit
        )
        tiny = tiny_of(unit)
        if tiny > 0:
            normalized = normalized + self._underflow(tiny, floor, size)
        scale = weight.abs() if weight is not None else 1.0
        out = scale * (normalized + 2 * unit * root) + 3 * tiny * (1 + root)
        if bias is not None:
            out = out + 2 * unit * bias.abs()
        return guarded(out, n * (2 * size) ** 2 + n * size, unit).expand_as(h.lower)

    def _underflow(self, tiny: float, floor: Tensor, size: Tensor) -> Tensor:
        """The error of ``c r`` near zero: each centred value ``c`` is off by ``4 tiny`` (a
        flushed input, the mean's sum and the subtraction), so the variance by ``A = tiny
        (16 M + 4)`` (the squares and their sum flushed too), and ``r`` by at most
        ``A / 2 (v - A + eps)^(-3/2)`` (the derivative of ``rsqrt`` at the lowest variance)."""
        shift = tiny * (16 * size + 4)
        r_low = torch.rsqrt((floor - shift).clamp(min=0) + self.eps)
        return size * shift * r_low**3 + 4 * tiny * r_low  # |c| <= 2M, times A / 2 ...


def _variance_floor(box: Box, dims: tuple[int, ...]) -> Tensor:
    """A lower bound of ``mean((h - mean h)^2)`` over the box, per normalized group."""
    n = math.prod(box.lower.shape[d] for d in dims)
    center, radius = box.center, box.radius
    c_center = center - center.mean(dim=dims, keepdim=True)
    c_radius = radius * (1 - 2 / n) + radius.sum(dim=dims, keepdim=True) / n
    low, high = c_center - c_radius, c_center + c_radius
    nearest = torch.where(
        (low <= 0) & (high >= 0), torch.zeros_like(low), low.abs().minimum(high.abs())
    )
    return nearest.square().mean(dim=dims, keepdim=True)
