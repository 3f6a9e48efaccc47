"""The supported layer types. Each owns its forward pass, its interval (IBP) bound and its
backward linear (CROWN) bound, so the bound drivers dispatch here and never branch on types.

Every layer computes the deployed (eval-mode) function. ``backward(lam, lower, upper)`` returns
``(lam_in, const)`` such that ``lam . layer(h) >= lam_in . h + const`` for every input ``h`` in
``[lower, upper]``, with ``lam: (B, K, *out)``, ``lam_in: (B, K, *in)``, ``const: (B, K)``.
Weight perturbations are not a layer's business: the drivers add them (``weights.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor


def _dot(lam: Tensor, v: Tensor) -> Tensor:
    """``sum over output dims of lam * v``: ``lam (B, K, *s)``, ``v`` broadcast to it."""
    return (lam * v).flatten(2).sum(-1)


def _batched(lam: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """``(B, K, *s) -> (B*K, *s)`` and the ``(B, K)`` to undo it."""
    return lam.reshape(-1, *lam.shape[2:]), (lam.shape[0], lam.shape[1])


class Layer:
    """One step of the network; ``name`` is its qualified module name in the model."""

    name: str

    def forward(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Elementwise bounds of the output for inputs in ``[lower, upper]``."""
        return self.forward(lower), self.forward(upper)  # right for monotone maps

    def backward(self, lam: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def cast(self, dtype: torch.dtype) -> Layer:
        """A copy whose tensors have ``dtype`` (certificates run in float64)."""
        tensors = {
            f.name: getattr(self, f.name).to(dtype)
            for f in fields(self)  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **tensors)  # type: ignore[type-var]


@dataclass
class Affine(Layer):
    """Linear or Conv2d: ``z = op(h, weight) + bias``. The only layers a threat can perturb."""

    name: str
    weight: Tensor
    bias: Tensor | None
    conv: dict[str, object] | None = None  # stride, padding, dilation, groups for Conv2d

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias" if self.name else "bias"

    @property
    def is_conv(self) -> bool:
        return self.conv is not None

    def linear(self, h: Tensor, weight: Tensor) -> Tensor:
        """The linear part with another weight (no bias): the map perturbations go through."""
        if self.conv is None:
            return F.linear(h, weight)
        return F.conv2d(h, weight, None, **self.conv)  # type: ignore[arg-type]

    def add_bias(self, z: Tensor, bias: Tensor | None) -> Tensor:
        """``z + bias`` with ``bias`` of shape (C,) or (B, C), broadcast over positions."""
        if bias is None:
            return z
        return z + bias.reshape(bias.shape + (1,) * (z.dim() - 2))

    def forward(
        self, h: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else bias
        if self.conv is None:
            return F.linear(h, w, b)  # one fused kernel (addmm)
        return F.conv2d(h, w, b, **self.conv)  # type: ignore[arg-type]

    def forward_per_example(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``h: (B, ...)`` through per-example ``weight: (B, *W.shape)`` and ``bias: (B, C)``."""
        batch = h.shape[0]
        if self.conv is None:
            z = torch.bmm(weight, h.unsqueeze(-1)).squeeze(-1)
        else:  # one grouped convolution runs every example through its own kernel
            conv = dict(self.conv)
            conv["groups"] = batch * int(conv["groups"])  # type: ignore[call-overload]
            z = F.conv2d(
                h.reshape(1, -1, *h.shape[2:]), weight.reshape(-1, *weight.shape[2:]), None, **conv
            )
            z = z.reshape(batch, -1, *z.shape[2:])
        return self.add_bias(z, bias)

    def interval(
        self, lower: Tensor, upper: Tensor, extra: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Bounds of the output; ``extra`` widens them (a weight perturbation's radius)."""
        mid = torch.add(upper, lower).mul_(0.5)  # few passes over the widest tensor (the input)
        center = self.forward(mid)
        radius = self.linear(upper - mid, self.weight.abs())
        if extra is not None:
            radius = radius + extra
        return center - radius, center + radius

    def transpose(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        """``lam W``: ``(B, K, *out) -> (B, K, *in_shape)``."""
        if self.conv is None:
            return lam @ self.weight
        flat, (b, k) = _batched(lam)
        grad = torch.nn.grad.conv2d_input(
            (flat.shape[0], *in_shape),
            self.weight,
            flat,
            **self.conv,  # type: ignore[arg-type]
        )
        return grad.reshape(b, k, *in_shape)

    def backward(self, lam: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        if self.bias is None:
            const = lam.new_zeros(lam.shape[:2])
        else:
            const = _dot(lam, self.bias.reshape(self.bias.shape + (1,) * (lam.dim() - 3)))
        return self.transpose(lam, tuple(lower.shape[1:])), const


@dataclass
class ChannelAffine(Layer):
    """Eval-mode BatchNorm: ``h * scale + shift`` per channel (dimension 1); exact in bounds."""

    name: str
    scale: Tensor
    shift: Tensor

    def _view(self, t: Tensor, dims: int) -> Tensor:
        return t.reshape((-1,) + (1,) * (dims - 2))

    def forward(self, h: Tensor) -> Tensor:
        return h * self._view(self.scale, h.dim()) + self._view(self.shift, h.dim())

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        center = self.forward((upper + lower) / 2)
        radius = (upper - lower) / 2 * self._view(self.scale.abs(), lower.dim())
        return center - radius, center + radius

    def backward(self, lam: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        scale = self._view(self.scale, lam.dim() - 1)
        return lam * scale, _dot(lam, self._view(self.shift, lam.dim() - 1))


@dataclass
class ReLU(Layer):
    """``max(h, 0)``; its backward bound is CROWN's linear relaxation."""

    name: str

    def forward(self, h: Tensor) -> Tensor:
        return F.relu(h)

    def backward(self, lam: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = lower[:, None], upper[:, None]
        active = (lower >= 0).to(lam.dtype)
        unstable = ((lower < 0) & (upper > 0)).to(lam.dtype)
        slope = upper / (upper - lower).clamp_min(1e-30) * unstable  # chord above the ReLU
        lower_slope = (upper > -lower).to(lam.dtype) * unstable  # CROWN's adaptive lower line
        positive, negative = lam.clamp(min=0), lam.clamp(max=0)
        lam_in = positive * (active + lower_slope) + negative * (active + slope)
        return lam_in, _dot(negative, -slope * lower)


@dataclass
class Flatten(Layer):
    name: str
    start_dim: int = 1
    end_dim: int = -1

    def forward(self, h: Tensor) -> Tensor:
        return h.flatten(self.start_dim, self.end_dim)

    def backward(self, lam: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return lam.reshape(*lam.shape[:2], *lower.shape[1:]), lam.new_zeros(lam.shape[:2])


@dataclass
class AvgPool(Layer):
    """AvgPool2d: linear with non-negative weights, so intervals map through directly."""

    name: str
    options: dict[str, object] = field(default_factory=dict)

    def forward(self, h: Tensor) -> Tensor:
        return F.avg_pool2d(h, **self.options)  # type: ignore[arg-type]

    def backward(self, lam: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        flat, (b, k) = _batched(lam)
        with torch.enable_grad():
            probe = lower.new_zeros((flat.shape[0], *lower.shape[1:]), requires_grad=True)
            (grad,) = torch.autograd.grad(self.forward(probe), probe, flat)
        return grad.reshape(b, k, *lower.shape[1:]), lam.new_zeros(lam.shape[:2])


@dataclass
class Identity(Layer):
    """Identity and Dropout (the deployed function has no dropout)."""

    name: str

    def forward(self, h: Tensor) -> Tensor:
        return h

    def backward(self, lam: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return lam, lam.new_zeros(lam.shape[:2])
