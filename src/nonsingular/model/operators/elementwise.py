"""Elementwise activations (ReLU, LeakyReLU, ELU, GELU, SiLU, Tanh, Sigmoid, Softplus, Hardtanh,
ReLU6): intervals and CROWN's linear relaxations from ``relaxations.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Box, Operator, dot, tiny_of
from .relaxations import Activation

# error of PyTorch's transcendental kernels, in units of roundoff (SLEEF and libm promise a few)
TRANSCENDENTAL_ULPS = 16


@dataclass
class Elementwise(Operator):
    """``act(h)``, elementwise. Its bounds are those of ``act`` as torch runs it in
    ``model_dtype`` (set when the model is read; None: the dtype of the bounds)."""

    act: Activation
    label: str = "relu"
    model_dtype: torch.dtype | None = None

    def forward(self, h: Tensor) -> Tensor:
        return self.act(h)

    def interval(self, h: Box) -> Box:
        if self.act.kind == "relu":
            return Box(h.lower.clamp(min=0), h.upper.clamp(min=0))
        return Box(*self.act.interval(h.lower, h.upper, self.model_dtype))

    def backward(self, lam: Tensor, h: Box) -> tuple[list[Tensor | None], Tensor]:
        if self.act.kind == "relu":
            return relu_backward(lam, h)
        a_low, b_low, a_up, b_up = self.act.linear_bounds(h.lower, h.upper, self.model_dtype)
        positive, negative = lam.clamp(min=0), lam.clamp(max=0)
        lam_in = positive * a_low.unsqueeze(1) + negative * a_up.unsqueeze(1)
        const = dot(positive, b_low.unsqueeze(1)) + dot(negative, b_up.unsqueeze(1))
        return [lam_in], const

    def needs_tightening(self, box: Box) -> Tensor | None:
        if self.act.kind in ("relu", "leaky_relu"):
            return (box.lower < 0) & (box.upper > 0)
        if self.act.kind in ("hardtanh", "relu6"):
            low, high = (
                (0.0, 6.0) if self.act.kind == "relu6" else (self.act.min_val, self.act.max_val)
            )
            lo, up = box.lower, box.upper
            return ((lo < low) & (up > low)) | ((lo < high) & (up > high))
        return box.upper > box.lower  # smooth: every neuron's relaxation depends on its bounds

    def rounding(self, unit: float, h: Box) -> Tensor | float:
        """Clamps are exact (their bounds, which the bounds use, rounded as the model rounds
        them); a leaky product of the rounded slope rounds at most twice (in float32, then to a
        half type); transcendental kernels promise a few ulps of ``|f|`` plus, where they
        cancel (GELU's ``1 + erf`` for negative inputs), of ``|h|``. Near zero each is off by
        as many ``tiny``, and by ``tiny`` times its largest slope (GELU's and SiLU's reach 1.13;
        ELU's and leaky ReLU's ``|alpha|``) where its input is flushed."""
        tiny = tiny_of(unit)
        flushed = tiny * max(1.25, abs(self.act.alpha))
        kind = self.act.kind
        if kind in ("relu", "relu6", "hardtanh"):
            return flushed
        if kind == "leaky_relu":
            slope = self.act.running_in(self.model_dtype or h.lower.dtype).alpha
            return 2.0 * unit * abs(slope) * h.magnitude() + tiny + flushed
        out = self.interval(h).magnitude()
        return TRANSCENDENTAL_ULPS * (unit * (out + h.magnitude()) + tiny) + flushed


def relu_lower_slopes(h: Box) -> Tensor:
    """CROWN's adaptive lower line for each neuron of a ReLU: slope 1 where ``u > -l``, else
    0 (where the neuron is stable the slope is not used)."""
    return (h.upper > -h.lower).to(h.lower.dtype)


def relu_backward(
    lam: Tensor, h: Box, lower_slopes: Tensor | None = None
) -> tuple[list[Tensor | None], Tensor]:
    """CROWN's ReLU relaxation: the chord above, a line through 0 below. ``lower_slopes``
    (broadcastable to ``lam``, in [0, 1]; alpha-CROWN optimizes them) are its slopes on the
    unstable neurons; any value in [0, 1] is sound, as ``a x <= relu(x)`` there. By default
    CROWN's adaptive choice (``relu_lower_slopes``)."""
    lower, upper = h.lower[:, None], h.upper[:, None]
    active = (lower >= 0).to(lam.dtype)
    unstable = ((lower < 0) & (upper > 0)).to(lam.dtype)
    slope = upper / (upper - lower).clamp_min(1e-30) * unstable
    if lower_slopes is None:
        lower_slopes = (upper > -lower).to(lam.dtype)
    below = active + lower_slopes * unstable  # slope of the lower line
    negative = lam.clamp(max=0)
    # lam+ below + lam- (active + slope), in three passes over lam (one of the two terms is 0);
    # in place where nothing asks for gradients (alpha-CROWN's slopes do)
    positive = lam.clamp(min=0)
    if torch.is_grad_enabled() and (lam.requires_grad or below.requires_grad):
        lam_in = torch.addcmul(positive * below, negative, active + slope)
    else:
        lam_in = positive.mul_(below).addcmul_(negative, active + slope)
    offset = (-slope * lower).flatten(2).transpose(1, 2)  # (B, N, 1): the chord's intercept
    return [lam_in], torch.bmm(negative.flatten(2), offset).squeeze(-1)
