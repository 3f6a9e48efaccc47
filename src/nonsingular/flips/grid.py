"""Symmetric integer grids for weights: ``W = scale * q``, ``q`` a ``bits``-bit two's complement
integer, and what flipping one bit of ``q`` does (docs/quantization.md).

A quantized model is an ordinary float model whose Linear/Conv weights lie exactly on such a
grid; ``quantize`` returns a copy carrying a ``Quantization`` (bits and scales) as the
attribute ``nonsingular_quantization``, read back with ``quantized(model)``. Biases stay float,
as in integer inference engines. The integers are always recomputed from the weights and checked
(``Quantization.integers``), so a copy edited after quantizing is never silently trusted.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import choice, integer
from ..errors import QuantizationError

ATTRIBUTE = "nonsingular_quantization"
GRANULARITIES = ("channel", "tensor")
QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
MAX_BITS = 16


@dataclass(frozen=True)
class Quantization:
    """The grid of a quantized model.

    bits:   width of every integer (two's complement, range ``[-2^(bits-1), 2^(bits-1) - 1]``).
    scales: ``{weight name: scale}``, each broadcastable to its weight (``(out, 1, ...)`` per
            output channel, 0-dim per tensor), in the weight's dtype; ``W = q * scale`` exactly.
    """

    bits: int
    scales: dict[str, Tensor]
    granularity: str = "channel"

    @property
    def names(self) -> list[str]:
        return list(self.scales)

    def integers(self, model: nn.Module) -> dict[str, Tensor]:
        """``{weight name: q}`` (int64, the weight's shape), checked to give the weights back
        exactly; QuantizationError naming the first weight off its grid."""
        params = dict(model.named_parameters())
        found = {}
        for name, scale in self.scales.items():
            if name not in params:
                raise QuantizationError(f"the model has no parameter {name!r} to quantize")
            found[name] = on_grid(name, params[name].detach(), scale, self.bits)
        return found

    def to_dict(self) -> dict[str, object]:
        return {"bits": self.bits, "granularity": self.granularity, "weights": self.names}


def lowest(bits: int) -> int:
    return -(1 << (bits - 1))


def highest(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` in the scale's dtype: the one formula every quantized weight comes from
    (quantize, flips, checkpoints), so that each reproduces the others bit for bit."""
    return q.to(scale.dtype) * scale


def on_grid(name: str, weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """The integers of ``weight`` on the grid ``scale`` (int64), or QuantizationError."""
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        raise QuantizationError(f"the scale of {name} must be a floating-point tensor")
    try:
        torch.broadcast_shapes(scale.shape, weight.shape)
    except RuntimeError:
        raise QuantizationError(
            f"the scale of {name} has shape {tuple(scale.shape)}, which does not broadcast to "
            f"the weight's {tuple(weight.shape)}; expected () or ({weight.shape[0]}, 1, ...)"
        ) from None
    scale = scale.to(weight.dtype)
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise QuantizationError(f"the scales of {name} must be finite and > 0")
    q = torch.round(weight / scale)
    bad = (q < lowest(bits)) | (q > highest(bits)) | (dequantize(q, scale) != weight)
    if bool(bad.any()):
        where = int(bad.flatten().nonzero()[0])
        raise QuantizationError(
            f"{name} is not on its {bits}-bit grid: element {where} is "
            f"{float(weight.flatten()[where]):.9g}, expected an integer in "
            f"[{lowest(bits)}, {highest(bits)}] times its scale"
        )
    return q.long()


def symmetric_scale(weight: Tensor, bits: int, granularity: str) -> Tensor:
    """``max|W| / (2^(bits-1) - 1)`` per output channel (``(out, 1, ...)``) or per tensor,
    at least the dtype's epsilon (PyTorch's observers' floor, for an all-zero channel)."""
    w = weight.detach().abs()
    if granularity == "channel":
        top = w.flatten(1).amax(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        top = w.amax()
    return (top / highest(bits)).clamp_min(torch.finfo(weight.dtype).eps)


def quantizable(model: nn.Module) -> list[str]:
    """Names of the weights ``quantize`` puts on a grid: every Linear/Conv1d/Conv2d weight."""
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZED_LAYERS)
    ]


def quantize(
    model: nn.Module,
    bits: int = 8,
    granularity: str = "channel",
    *,
    scales: dict[str, Tensor] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose Linear/Conv weights lie exactly on a symmetric integer grid.

    Without ``scales``: ``scale = max|W| / (2^(bits-1) - 1)`` per output channel (or per tensor)
    and ``q = round(W / scale)``, PyTorch's symmetric observers; the copy's weights are
    ``q * scale``. With ``scales`` (``{weight name: scale}``): the weights must already lie on
    that grid (a model quantized elsewhere), which is checked, not rounded to. Biases stay
    float. The copy carries its ``Quantization`` (``quantized(copy)``); ``model`` is untouched.
    """
    integer("bits", bits, 2, MAX_BITS, QuantizationError)
    choice("granularity", granularity, GRANULARITIES, QuantizationError)
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    copy = deepcopy(model)
    params = dict(copy.named_parameters())
    if scales is None:
        names = quantizable(copy)
        if not names:
            raise QuantizationError("the model has no Linear or Conv layer to quantize")
        found = {n: symmetric_scale(params[n], bits, granularity) for n in names}
    else:
        if not isinstance(scales, dict) or not scales:
            raise QuantizationError("scales must be a non-empty {weight name: scale} dict")
        found = {}
        for name, scale in scales.items():
            if name not in params:
                raise QuantizationError(f"scales names {name!r}, not a parameter of the model")
            on_grid(name, params[name].detach(), scale, bits)
            found[name] = scale.detach().to(params[name].dtype).clone()
    with torch.no_grad():
        for name, scale in found.items():
            weight = params[name]
            q = torch.round(weight / scale).clamp(lowest(bits), highest(bits))
            weight.copy_(dequantize(q, scale))
    setattr(copy, ATTRIBUTE, Quantization(bits, found, granularity))
    return copy


def quantized(model: nn.Module) -> Quantization:
    """The ``Quantization`` a model from ``quantize`` (or a quantized checkpoint) carries:
    bits and scales; ``.integers(model)`` gives the integers. QuantizationError otherwise."""
    found = getattr(model, ATTRIBUTE, None)
    if not isinstance(found, Quantization):
        raise QuantizationError(
            "the model is not quantized: bit flips act on the integers of a quantized model; "
            "pass nonsingular.quantize(model) (or quantize(model, scales=...) for a model "
            "quantized elsewhere)"
        )
    return found


Flip = tuple[str, int, int]  # (weight name, flat index into the weight, bit position)


def bit_weights(bits: int) -> Tensor:
    """``(bits,)`` what each bit is worth in a two's complement integer: ``2^b``, and
    ``-2^(bits-1)`` for the sign bit."""
    worth = 1 << torch.arange(bits, dtype=torch.long)
    worth[-1] = -worth[-1]
    return worth


def bit_changes(q: Tensor, bits: int) -> Tensor:
    """``(*q.shape, bits)``: how flipping each bit changes ``q`` (``+-2^b``; the sign bit
    ``-+2^(bits-1)``). Flips of several bits add up exactly."""
    set_ = ((q[..., None] >> torch.arange(bits, device=q.device)) & 1).bool()
    worth = bit_weights(bits).to(q.device)
    return torch.where(set_, -worth, worth)


def flip_integers(q: Tensor, index: Tensor, bit: Tensor, bits: int) -> Tensor:
    """A copy of the integers ``q`` with bit ``bit[n]`` of flat element ``index[n]`` flipped
    for every n (a bit flipped twice is back)."""
    flat = q.flatten().clone()
    for i, b in zip(index.tolist(), bit.tolist(), strict=True):
        flat[i] += int(bit_changes(flat[i : i + 1], bits)[0, b])
    return flat.view_as(q)


def flipped_weights(
    quantization: Quantization, integers: dict[str, Tensor], flips: list[Flip]
) -> dict[str, Tensor]:
    """``{weight name: new weight}`` for the weights ``flips`` touch: the integers flipped and
    turned back into weights by ``dequantize``, exactly as the model holds its own."""
    out: dict[str, Tensor] = {}
    for name in dict.fromkeys(n for n, _, _ in flips):
        mine = [(i, b) for n, i, b in flips if n == name]
        index = torch.tensor([i for i, _ in mine], dtype=torch.long)
        bit = torch.tensor([b for _, b in mine], dtype=torch.long)
        q = flip_integers(integers[name].cpu(), index, bit, quantization.bits)
        scale = quantization.scales[name]
        out[name] = dequantize(q.to(scale.device), scale)
    return out


SCALE_SUFFIX = "#scale"  # no module attribute can hold '#': never a state_dict key


def checkpoint_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, object] | None:
    """For a quantized ``model``: replace its quantized weights in ``tensors`` (a state_dict)
    by their integers (int8 up to 8 bits, else int16) and add each scale as ``NAME#scale``;
    returns the sidecar's description of the grid (None for a float model)."""
    found = getattr(model, ATTRIBUTE, None)
    if not isinstance(found, Quantization):
        return None
    dtype = torch.int8 if found.bits <= 8 else torch.int16
    for name, q in found.integers(model).items():
        tensors[name] = q.to(dtype).cpu().contiguous()
        tensors[name + SCALE_SUFFIX] = found.scales[name].detach().cpu().contiguous()
    return found.to_dict()


def from_checkpoint(tensors: dict[str, Tensor], info: dict[str, object]) -> Quantization:
    """Turn the integers of a quantized checkpoint back into weights in ``tensors`` (in
    place, bit-exact: ``dequantize``) and return the grid."""
    bits, granularity, names = info.get("bits"), info.get("granularity"), info.get("weights")
    if not isinstance(bits, int) or not isinstance(names, list):
        raise QuantizationError(f"malformed quantization description {info!r}")
    scales = {}
    for name in names:
        scale = tensors.pop(name + SCALE_SUFFIX, None)
        q = tensors.get(name)
        if scale is None or q is None or q.is_floating_point():
            raise QuantizationError(f"the checkpoint lacks the integers or the scale of {name}")
        if int(q.min()) < lowest(bits) or int(q.max()) > highest(bits):
            raise QuantizationError(f"the integers of {name} do not fit in {bits} bits")
        tensors[name] = dequantize(q.long(), scale)
        scales[name] = scale
    return Quantization(bits, scales, str(granularity))
