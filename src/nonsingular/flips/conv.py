"""Interval (IBP) flip bounds through Conv2d layers (docs/quantization.md).

A flip of kernel entry ``(o, i, a, b)`` moves every output position of channel ``o`` at once
(weight sharing), so flips are never priced as independent entries of a dense matrix across
neurons. Each output neuron ``(o, p)`` is bounded alone: any k flips of the layer move it by at
most the sum of the k largest, over the kernel entries of channel ``o`` and their bits, of
``|dw| * max|x|`` over the input element the entry meets there (the unfolded box). Each layer
gets the whole budget k. Rounding is the Dense form with ``fan_in = C_in * kh * kw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import UnsupportedLayerError

if TYPE_CHECKING:
    from .bounds import LayerTerms


@dataclass
class Conv:
    """One Conv2d layer of the chain, in float64, on flat ``(B, C*H*W)`` boxes.

    flips: ``(C_out, C_in*kh*kw, kk)`` the ``kk = min(k, bits)`` largest weight changes a flip
           of one allowed bit makes, per kernel entry (None: the layer is not flipped).
    """

    name: str
    weight: Tensor  # (C_out, C_in, kh, kw)
    bias: Tensor
    flips: Tensor | None
    module: nn.Conv2d
    in_shape: tuple[int, int, int]

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def _conv(self, h: Tensor, weight: Tensor) -> Tensor:
        m = self.module
        img = h.view(len(h), *self.in_shape)
        return F.conv2d(img, weight, None, m.stride, m.padding, m.dilation).flatten(1)

    def forward(self, h: Tensor) -> Tensor:
        """The layer on flat inputs ``(B, C*H*W)``, in float64."""
        out = self._conv(h, self.weight)
        return out + self.bias.repeat_interleave(out.shape[1] // self.weight.shape[0])

    def flip_row(self, h_abs: Tensor, k: int) -> Tensor:
        """``(B, C_out*L, k)`` the k largest flip effects into each output neuron."""
        batch, c_out = len(h_abs), self.weight.shape[0]
        m = self.module
        img = h_abs.view(batch, *self.in_shape)
        kernel = self.weight.shape[2:]
        if self.flips is None:  # no flips: zeros, one row per output neuron
            length = self._conv(h_abs[:1], self.weight).shape[1] // c_out
            return h_abs.new_zeros(batch, c_out * length, k)
        cols = F.unfold(img, kernel, m.dilation, m.padding, m.stride)  # (B, CKK, L)
        length = cols.shape[-1]
        effects = self.flips[None, :, :, None, :] * cols[:, None, :, :, None]
        effects = effects.permute(0, 1, 3, 2, 4).reshape(batch, c_out * length, -1)
        row = effects.topk(min(k, effects.shape[-1]), dim=-1).values
        if row.shape[-1] < k:
            row = torch.cat([row, row.new_zeros(batch, row.shape[1], k - row.shape[-1])], -1)
        return row


def check_conv(module: nn.Module, name: str) -> None:
    """UnsupportedLayerError unless ``module`` is a plain Conv2d the bounds cover."""
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise UnsupportedLayerError(
            f"flip certificates cover Conv2d with groups=1, numeric zero padding; got {name!r}"
        )


def conv_terms(layer: Conv, h_abs: Tensor, k: int, unit: float, tiny: float) -> LayerTerms:
    """Flip effects and rounding of ``layer`` for inputs with ``|h| <= h_abs`` ``(B, n_in)``:
    ``gamma(fan_in + 1) (|W| |h| + flips + |b|)`` per output, as for a Dense layer."""
    from .bounds import LayerTerms, gamma  # bounds imports this module

    row = layer.flip_row(h_abs, k)
    bias = layer.bias.abs().repeat_interleave(row.shape[1] // layer.weight.shape[0])
    through = layer._conv(h_abs, layer.weight.abs()) + row.sum(-1) + bias
    err = gamma(layer.fan_in + 1, unit) * through + (layer.fan_in + 2) * tiny
    return LayerTerms(row, err)


def conv_box(
    layer: Conv, lo: Tensor, hi: Tensor, row: Tensor, err: Tensor
) -> tuple[Tensor, Tensor]:
    """The pre-activation box of ``layer`` over the input box, its rounding and k flips."""
    centre = layer.forward((hi + lo) / 2)
    radius = layer._conv((hi - lo) / 2, layer.weight.abs()) + err + row.sum(-1)
    return centre - radius, centre + radius
