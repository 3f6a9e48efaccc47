"""Linear (any leading dimensions), Conv1d and Conv2d: ``z = op(h, weight) + bias``.

The only operations a threat perturbs. Besides the function itself, an ``Affine`` knows its
linear part with any other weight (``apply``: the map weight perturbations go through), its
per-example form (one weight per example), and its transpose (CROWN's backward step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Box, Operator, dot, dot_gamma, guarded, tiny_of

_CONV = {"conv1d": F.conv1d, "conv2d": F.conv2d}
_CONV_TRANSPOSE = {"conv1d": F.conv_transpose1d, "conv2d": F.conv_transpose2d}
# a conv2d whose weight rows hold at most this many values is transposed by a matrix product
# and col2im (``Affine._adjoint``): measured 3x faster than a transposed convolution on the
# built-in ResNet's stem (one input channel, fan-in 9) and 1x1 skip (fan-in 16), 2x slower
# at fan-in 144
FOLD_FAN_IN = 32


@dataclass
class Affine(Operator):
    """``kind``: ``linear``, ``conv1d`` or ``conv2d``; ``conv``: stride, padding (numbers),
    dilation, groups; ``pad``: an explicit ``F.pad`` before the convolution (``pad_mode`` other
    than zeros, or the asymmetric side of ``padding="same"``). ``weight_name``/``bias_name``:
    the model's parameters this operation reads (None when it computes them)."""

    kind: str
    label: str = "linear"
    conv: dict[str, Any] = field(default_factory=dict)
    pad: tuple[int, ...] | None = None
    pad_mode: str = "constant"
    weight_name: str | None = None
    bias_name: str | None = None
    linear = True

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    def one_vector(self, h: Tensor) -> bool:
        """A dense layer meeting one vector per example (``h: (B, n_in)``): where the lemma is
        exact, for attacks and bounds alike."""
        return self.kind == "linear" and h.dim() == 2

    def _padded(self, h: Tensor) -> Tensor:
        return h if self.pad is None else F.pad(h, self.pad, mode=self.pad_mode)

    def apply(self, h: Tensor, weight: Tensor) -> Tensor:
        """The linear part with any weight (no bias)."""
        if self.kind == "linear":
            return F.linear(h, weight)
        return _CONV[self.kind](self._padded(h), weight, None, **self.conv)

    def forward(self, h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.kind == "linear":
            return F.linear(h, weight, bias)  # one fused kernel (addmm)
        return _CONV[self.kind](self._padded(h), weight, bias, **self.conv)

    def bias_view(self, bias: Tensor, dims: int) -> Tensor:
        """``bias: (C,)`` or per-example ``(B, C)``, shaped to broadcast against an output with
        ``dims`` dimensions (batch first): the last dimension for linear, channels for conv."""
        if self.kind == "linear":
            return bias if bias.dim() == 1 else bias.reshape(bias.shape[0], *[1] * (dims - 2), -1)
        lead = bias.shape if bias.dim() == 2 else (1, bias.shape[0])
        return bias.reshape(*lead, *[1] * (dims - 2))

    def forward_per_example(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``h: (B, ...)`` through per-example ``weight: (B, *W.shape)`` and ``bias: (B, C)``
        (or a shared ``(C,)``)."""
        batch = h.shape[0]
        if self.kind == "linear":
            flat = h.reshape(batch, -1, h.shape[-1])
            z = torch.bmm(flat, weight.transpose(1, 2)).reshape(*h.shape[:-1], weight.shape[1])
        else:  # one grouped convolution runs every example through its own kernel
            conv = dict(self.conv)
            conv["groups"] = batch * int(conv["groups"])
            padded = self._padded(h)
            z = _CONV[self.kind](
                padded.reshape(1, -1, *padded.shape[2:]),
                weight.reshape(-1, *weight.shape[2:]),
                None,
                **conv,
            )
            z = z.reshape(batch, -1, *z.shape[2:])
        return z if bias is None else z + self.bias_view(bias, z.dim())

    def input_columns(self, h: Tensor, weight: Tensor) -> Tensor:
        """The input vectors the weight meets, one column per output position: ``h (B, ...) ->
        (B, groups, J, P)`` with ``J`` the weight's fan-in (its flattened rows' order) and ``P``
        the positions (im2col; a Linear's leading dimensions), so that the output at position
        ``p`` of channel ``o`` of group ``g`` is ``weight_rows[g, o] . columns[:, g, :, p]``."""
        batch = h.shape[0]
        if self.kind == "linear":
            return h.reshape(batch, -1, h.shape[-1]).transpose(1, 2).unsqueeze(1)
        padded = self._padded(h)
        kernel, conv = tuple(weight.shape[2:]), self.conv
        stride, padding, dilation = conv["stride"], conv["padding"], conv["dilation"]
        if self.kind == "conv1d":  # as a conv2d over a height of 1
            padded, kernel = padded.unsqueeze(2), (1, *kernel)
            stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
        cols = F.unfold(padded, kernel, dilation=dilation, padding=padding, stride=stride)
        groups = int(conv["groups"])
        return cols.reshape(batch, groups, -1, cols.shape[-1])

    def output_columns(self, lam: Tensor, weight: Tensor) -> Tensor:
        """Coefficients on the output ``lam (B, K, *out) -> (B, K, groups, O, P)``, the positions
        last, matching ``input_columns`` and ``weight_rows``."""
        b, k = lam.shape[:2]
        if self.kind == "linear":
            return lam.reshape(b, k, -1, lam.shape[-1]).transpose(2, 3).unsqueeze(2)
        groups = int(self.conv["groups"])
        return lam.reshape(b, k, groups, weight.shape[0] // groups, -1)

    def weight_rows(self, weight: Tensor) -> Tensor:
        """``weight`` (or anything shaped like it) as ``(groups, O, J)``."""
        groups = 1 if self.kind == "linear" else int(self.conv["groups"])
        return weight.reshape(groups, weight.shape[0] // groups, -1)

    def fan_in(self, weight: Tensor) -> int:
        """Terms summed per output (the bias not counted)."""
        return int(weight[0].numel())

    def ones_through(self, h_abs: Tensor, weight: Tensor) -> Tensor:
        """``1 |h|`` through the layer: the sum of ``|h|`` over each output's receptive field."""
        if self.kind == "linear":
            return h_abs.sum(dim=-1, keepdim=True)
        shape = weight.shape if int(self.conv["groups"]) != 1 else (1, *weight.shape[1:])
        ones = torch.ones(shape, dtype=weight.dtype, device=weight.device)
        return self.apply(h_abs, ones)

    def interval(self, h: Box, weight: Tensor, bias: Tensor | None = None) -> Box:
        mid = torch.add(h.upper, h.lower).mul_(0.5)  # few passes over the widest tensor
        center = self.forward(mid, weight, bias)
        radius = self.apply(h.upper - mid, weight.abs())
        return Box(center - radius, center + radius)

    def transpose(self, lam: Tensor, in_shape: tuple[int, ...], weight: Tensor) -> Tensor:
        """``lam W``: ``(B, K, *out) -> (B, K, *in_shape)``."""
        if self.kind == "linear":
            return lam @ weight
        b, k = lam.shape[:2]
        flat = lam.reshape(b * k, *lam.shape[2:])
        if self.pad is None:
            return self._adjoint(flat, in_shape, weight).reshape(b, k, *in_shape)
        with torch.enable_grad():  # the adjoint of the explicit padding, by autograd
            probe = flat.new_zeros((b * k, *in_shape), requires_grad=True)
            padded = self._padded(probe)
            grad = self._adjoint(flat, tuple(padded.shape[1:]), weight)
            (back,) = torch.autograd.grad(padded, probe, grad)
        return back.reshape(b, k, *in_shape)

    def _adjoint(self, grad: Tensor, in_shape: tuple[int, ...], weight: Tensor) -> Tensor:
        """The convolution's transpose on ``grad (N, O, *out)``, shaped ``(N, *in_shape)``.

        A conv2d whose weight rows are short (fan-in at most ``FOLD_FAN_IN``: a 1x1 kernel,
        a one-channel input) takes a matrix product onto the input's columns and col2im
        (``F.fold``, which sums overlapping windows); any other a transposed convolution,
        its output padding giving back the rows and columns the stride left unread
        (``(size + 2 padding - dilation (kernel - 1) - 1) mod stride``, below the stride).
        Both are the same linear map as ``convolution_backward``'s, which is slower on the
        CPU (docs/benchmarks.md)."""
        conv = self.conv
        if self.kind == "conv2d" and self.fan_in(weight) <= FOLD_FAN_IN:
            rows = self.weight_rows(weight)  # (g, O, J)
            n, groups, outs = grad.shape[0], rows.shape[0], rows.shape[1]
            cols = torch.matmul(rows.transpose(1, 2), grad.reshape(n, groups, outs, -1))
            return F.fold(
                cols.reshape(n, -1, cols.shape[-1]),
                tuple(in_shape[1:]),
                tuple(weight.shape[2:]),
                dilation=conv["dilation"],
                padding=conv["padding"],
                stride=conv["stride"],
            )
        extra = tuple(
            n - ((o - 1) * s - 2 * p + d * (kernel - 1) + 1)
            for n, o, s, p, d, kernel in zip(
                in_shape[1:],
                grad.shape[2:],
                conv["stride"],
                conv["padding"],
                conv["dilation"],
                weight.shape[2:],
                strict=True,
            )
        )
        return _CONV_TRANSPOSE[self.kind](
            grad,
            weight,
            None,
            conv["stride"],
            conv["padding"],
            extra,
            conv["groups"],
            conv["dilation"],
        )

    def backward(
        self, lam: Tensor, h: Box, weight: Tensor, bias: Tensor | None = None
    ) -> tuple[list[Tensor | None], Tensor]:
        const = (
            lam.new_zeros(lam.shape[:2]) if bias is None else dot(lam, self._bias_out(bias, lam))
        )
        return [self.transpose(lam, tuple(h.shape[1:]), weight)], const

    def _bias_out(self, bias: Tensor, lam: Tensor) -> Tensor:
        """The bias broadcast against ``lam (B, K, *out)`` without its K dimension."""
        view = self.bias_view(bias, lam.dim() - 1)
        return view if self.kind == "linear" else view.squeeze(0)

    def rounding(
        self,
        unit: float,
        h: Box,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        perturbation: Tensor | None = None,
        perturbation_sum: Tensor | None = None,
    ) -> Tensor:
        """``gamma(fan_in + 1) (|W| max|h| + |b|)``: a computed dot product plus bias is the exact
        one with every term perturbed by at most ``gamma`` relatively, in any summation order.
        ``perturbation`` bounds ``|Delta W| max|h| + |Delta b|`` when the weights are moved,
        ``perturbation_sum`` ``|Delta W| 1 + |Delta b|``. With TF32 products (``Unit``), each
        term is also off by its inputs' TF32 rounding. Near zero (``tiny_of(unit)``), each
        product is off by ``tiny`` (its result flushed) plus ``tiny`` times its other factor (a
        flushed operand), each addition by ``2 tiny``. ``inf`` where a partial sum, bounded by
        the same ``|W| |h| + |b|``, may overflow."""
        h_abs = h.magnitude()
        through = self.apply(h_abs, weight.abs())
        if bias is not None:
            through = through + self.bias_view(bias.abs(), through.dim())
        if perturbation is not None:
            through = through + perturbation
        n = self.fan_in(weight)
        error = dot_gamma(n + 1, unit, conv=self.is_conv) * through
        tiny = tiny_of(unit)
        if tiny > 0:
            largest_h = h_abs.flatten(1).amax(1).reshape(-1, *[1] * (through.dim() - 1))
            operands = self.apply(torch.ones_like(h_abs[:1]), weight.abs()) + n * largest_h
            if perturbation_sum is not None:
                operands = operands + perturbation_sum
            error = error + tiny * (3 * (n + 1) + operands)
        return guarded(error, through, unit)
