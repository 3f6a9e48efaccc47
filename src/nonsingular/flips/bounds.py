"""Certified lower bounds on the margins of a quantized MLP under at most k bit flips, joint
with an input box (docs/quantization.md).

Each weight's flips are known in advance: flipping bit b moves ``W[j, i]`` to
``dequantize(q + change_b)``, a change ``D[j, i, b]`` computed exactly (two dtype values
subtracted in float64). A flip's effect on its neuron is at most ``D * max|h_i|`` over the
layer input's box. IBP widens each neuron's box by the sum of the k largest such effects in its
row; CROWN (backward linear bounds) prices every flip by ``|lambda_j| * D * max|h_i|``, with
``lambda`` the coefficient of its neuron, and subtracts the k largest over all layers: the k
budget is shared. Every box allows k flips upstream, so both are sound for any set of at most k
flips, per example (hence for a shared set too). The model's own rounding is a box per neuron
(``gamma(n + 1) (|W'| |h| + |b|)``, Higham 3.1, with ``|W'|`` allowing the flips), the bound
computation's covered by adding its unit roundoff. Conv2d layers (IBP only): ``conv.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import UnsupportedLayerError
from .conv import Conv, check_conv, conv_box, conv_terms
from .grid import bit_changes, dequantize
from .space import FlipSpace

PASSIVE = (nn.Flatten, nn.Identity, nn.Dropout)


@dataclass
class Dense:
    """One Linear layer of the chain, in float64.

    flips: ``(n_out, n_in, kk)`` the ``kk = min(k, bits)`` largest weight changes a flip of
           one of its allowed bits makes, per weight (None: the layer is not flipped).
    """

    name: str
    weight: Tensor
    bias: Tensor
    flips: Tensor | None

    @property
    def fan_in(self) -> int:
        return self.weight.shape[1]


Layer = Dense | Conv


def _modules(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return [m for child in model for m in _modules(child)]
    return [model]


def read_chain(
    model: nn.Module, space: FlipSpace, k: int, in_shape: tuple[int, ...] | None = None
) -> list[Layer]:
    """``model`` as ``Layer (ReLU Layer)*`` ending in Linear (Flatten, Identity, Dropout pass
    through), or UnsupportedLayerError. A layer is Linear, or Conv2d when the example shape
    ``in_shape`` is given (interval bounds only)."""
    names = {id(m): n for n, m in model.named_modules()}
    chain: list[Layer] = []
    relu_next = False
    shape = None if in_shape is None else tuple(in_shape)
    for module in _modules(model):
        name = names.get(id(module), "?")
        if isinstance(module, PASSIVE):
            shape = _passive(module, shape)
            continue
        if isinstance(module, nn.ReLU) and chain and not relu_next:
            relu_next = True
            continue
        if chain and not relu_next:
            raise UnsupportedLayerError(_unsupported(module, name, shape is not None))
        if isinstance(module, nn.Conv2d) and shape is not None and len(shape) == 3:
            check_conv(module, name)
            layer = _conv(module, name, space, k, shape)
            shape = (layer.weight.shape[0], *_out_hw(layer))
        elif isinstance(module, nn.Linear) and (shape is None or len(shape) == 1):
            layer = _dense(module, name, space, k)
            shape = None if shape is None else (layer.weight.shape[0],)
        else:
            raise UnsupportedLayerError(_unsupported(module, name, shape is not None))
        chain.append(layer)
        relu_next = False
    if not chain or relu_next or not isinstance(chain[-1], Dense):
        raise UnsupportedLayerError("flip certificates need a model that ends in a Linear layer")
    return chain


def _unsupported(module: nn.Module, name: str, conv: bool) -> str:
    what = type(module).__name__
    if conv:
        return (
            f"ibp flip certificates cover Conv2d/Linear/ReLU chains (Flatten before Linear); "
            f"got {what} at {name!r}"
        )
    return (
        f"flip certificates cover Linear/ReLU chains (an MLP, Flatten allowed) for crown and "
        f"bab; method='ibp' covers Conv2d too; got {what} at {name!r}"
    )


def _passive(module: nn.Module, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if shape is None or not isinstance(module, nn.Flatten):
        return shape
    if module.start_dim != 1 or module.end_dim != -1:
        raise UnsupportedLayerError("flip certificates cover Flatten() of the whole example")
    return (math.prod(shape),)


def _out_hw(layer: Conv) -> tuple[int, ...]:
    m, zeros = layer.module, layer.weight.new_zeros(1, *layer.in_shape)
    return tuple(F.conv2d(zeros, layer.weight, None, m.stride, m.padding, m.dilation).shape[2:])


def weight_changes(space: FlipSpace, name: str, q: Tensor, weight: Tensor) -> Tensor:
    """``(*weight.shape, n_allowed)`` the change each allowed flip makes to each element of the
    weight ``name`` (integers ``q``, values ``weight``), exactly: the float64 difference of
    the two values the model would hold."""
    change = bit_changes(q, space.bits)[..., space.allowed]
    new = dequantize(q[..., None] + change, space.quantization.scales[name][..., None])
    return new.double() - weight.double()[..., None]


def _flip_sizes(weight: Tensor, name: str, space: FlipSpace, k: int) -> Tensor | None:
    """``(*weight.shape, kk)`` the kk largest changes a flip makes to each element, or None."""
    if name not in space.names:
        return None
    d = weight_changes(space, name, space.integers[name], weight).abs()  # exact for float32
    if weight.dtype == torch.float64:  # one rounding in the subtraction
        d = d * (1 + 2 * torch.finfo(torch.float64).eps)
    return d.topk(min(k, d.shape[-1]), dim=-1).values


def _parts(module: nn.Linear | nn.Conv2d, prefix: str) -> tuple[str, Tensor, Tensor]:
    """A layer's weight name, weight and bias (zeros without one), detached."""
    w = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else w.new_zeros(w.shape[0])
    return (f"{prefix}.weight" if prefix else "weight"), w, bias


def _dense(module: nn.Linear, prefix: str, space: FlipSpace, k: int) -> Dense:
    name, w, bias = _parts(module, prefix)
    return Dense(name, w.double(), bias.double(), _flip_sizes(w, name, space, k))


def _conv(module: nn.Conv2d, prefix: str, space: FlipSpace, k: int, shape: tuple) -> Conv:
    name, w, bias = _parts(module, prefix)
    flips = _flip_sizes(w, name, space, k)
    if flips is not None:
        flips = flips.flatten(1, 3)
    if shape[0] != w.shape[1]:
        raise UnsupportedLayerError(f"{prefix!r} expects {w.shape[1]} channels, got {shape[0]}")
    return Conv(name, w.double(), bias.double(), flips, module, shape)


def gamma(n: int, unit: float) -> float:
    return n * unit / (1 - n * unit)


@dataclass
class LayerTerms:
    """What one layer contributes for a batch: ``row`` ``(B, n_out, k)`` the k largest flip
    effects into each neuron (zeros when not flipped), and ``err`` ``(B, n_out)`` the
    rounding box of its outputs."""

    row: Tensor
    err: Tensor


def layer_terms(layer: Dense, h_abs: Tensor, k: int, unit: float, tiny: float) -> LayerTerms:
    """Flip effects and rounding of ``layer`` for inputs with ``|h| <= h_abs`` ``(B, n_in)``."""
    batch, (n_out, n_in) = h_abs.shape[0], layer.weight.shape
    if layer.flips is None:
        row = h_abs.new_zeros(batch, n_out, k)
    else:
        effects = layer.flips[None] * h_abs[:, None, :, None]  # (B, n_out, n_in, kk)
        effects = effects.flatten(2)
        row = effects.topk(min(k, effects.shape[-1]), dim=-1).values
        if row.shape[-1] < k:
            row = torch.cat([row, row.new_zeros(batch, n_out, k - row.shape[-1])], -1)
    through = h_abs @ layer.weight.abs().T + row.sum(-1) + layer.bias.abs()
    err = gamma(n_in + 1, unit) * through + (n_in + 2) * tiny
    return LayerTerms(row, err)


def relax(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU's linear bounds on ``[lo, hi]``: lower slope, upper slope and upper intercept."""
    unstable = (lo < 0) & (hi > 0)
    width = (hi - lo).clamp_min(torch.finfo(lo.dtype).tiny)
    upper = torch.where(unstable, hi / width, (lo >= 0).to(lo.dtype))
    intercept = torch.where(unstable, -lo * hi / width, torch.zeros_like(lo))
    lower = torch.where(unstable, (hi >= -lo).to(lo.dtype), (lo >= 0).to(lo.dtype))
    return lower, upper, intercept


@dataclass
class ChainBounds:
    """Boxes of a batch through the chain: ``h_lo[m], h_hi[m]`` the input box of layer m
    ``(B, n_in)``, ``pre[m]`` the pre-activation box of hidden layer m, ``terms[m]`` its flip
    effects and rounding."""

    h_lo: list[Tensor]
    h_hi: list[Tensor]
    pre: list[tuple[Tensor, Tensor]]
    terms: list[LayerTerms]


@dataclass
class Arithmetic:
    """The flip budget and the rounding a pass accounts for."""

    k: int
    unit: float
    tiny: float


def backward(
    chain: list[Dense], bounds: ChainBounds, m: int, c: Tensor, stop: int, budget: Arithmetic
) -> tuple[Tensor, list[Tensor]]:
    """A lower bound of ``c . z_m`` ``(B, K)`` for every input in the box and every set of at
    most k flips, by backward linear bounds from layer ``m`` down to the input box of layer
    ``stop`` (``stop = m``: interval arithmetic; 0: CROWN), the flip term excluded; and the
    k largest flip terms of each layer ``(B, K, k)`` (subtract the k largest of them all)."""
    lam, const, flips = c, c.new_zeros(c.shape[:2]), []
    for idx in range(m, stop - 1, -1):
        layer, terms = chain[idx], bounds.terms[idx]
        const = const + lam @ layer.bias - torch.bmm(lam.abs(), terms.err[:, :, None])[..., 0]
        effects = (lam.abs()[..., None] * terms.row[:, None]).flatten(2)
        flips.append(effects.topk(min(budget.k, effects.shape[-1]), dim=-1).values)
        a = lam @ layer.weight
        if idx == stop:
            lo, hi = bounds.h_lo[idx], bounds.h_hi[idx]
            centre, radius = (hi + lo) / 2, (hi - lo) / 2
            const = const + torch.bmm(a, centre[:, :, None])[..., 0]
            return const - torch.bmm(a.abs(), radius[:, :, None])[..., 0], flips
        lower, upper, intercept = relax(*bounds.pre[idx - 1])
        const = const + torch.bmm(a.clamp(max=0), intercept[:, :, None])[..., 0]
        lam = torch.where(a >= 0, a * lower[:, None], a * upper[:, None])
    raise AssertionError("stop must be at most m")


def largest(flips: list[Tensor], k: int) -> Tensor:
    """Sum of the k largest flip terms over every layer: ``(B, K)``."""
    every = torch.cat(flips, dim=-1)
    return every.topk(min(k, every.shape[-1]), dim=-1).values.sum(-1)


def bound(
    chain: list[Dense], bounds: ChainBounds, m: int, c: Tensor, crown: bool, budget: Arithmetic
) -> Tensor:
    """Lower bound of ``c . z_m`` over the threat: IBP's, and CROWN's where tighter."""
    const, flips = backward(chain, bounds, m, c, m, budget)
    low = const - largest(flips, budget.k)
    if crown and m > 0:
        const, flips = backward(chain, bounds, m, c, 0, budget)
        low = torch.maximum(low, const - largest(flips, budget.k))
    return low


def chain_bounds(
    chain: list[Layer], lo: Tensor, hi: Tensor, crown: bool, budget: Arithmetic
) -> ChainBounds:
    """Boxes of every layer for inputs in ``[lo, hi]`` ``(B, n)`` and at most k flips."""
    bounds = ChainBounds([lo], [hi], [], [])
    for m, layer in enumerate(chain):
        h_abs = torch.maximum(bounds.h_lo[m].abs(), bounds.h_hi[m].abs())
        if isinstance(layer, Conv):  # interval bounds only (certify refuses crown)
            terms = conv_terms(layer, h_abs, budget.k, budget.unit, budget.tiny)
            bounds.terms.append(terms)
            pre = conv_box(layer, bounds.h_lo[m], bounds.h_hi[m], terms.row, terms.err)
            bounds.pre.append(pre)
            bounds.h_lo.append(pre[0].clamp_min(0))
            bounds.h_hi.append(pre[1].clamp_min(0))
            continue
        bounds.terms.append(layer_terms(layer, h_abs, budget.k, budget.unit, budget.tiny))
        if m == len(chain) - 1:
            break
        n = layer.weight.shape[0]
        eye = torch.eye(n, dtype=lo.dtype, device=lo.device)
        c = torch.cat([eye, -eye]).expand(len(lo), 2 * n, n)
        low = bound(chain, bounds, m, c, crown, budget)
        bounds.pre.append((low[:, :n], -low[:, n:]))
        bounds.h_lo.append(low[:, :n].clamp_min(0))
        bounds.h_hi.append((-low[:, n:]).clamp_min(0))
    return bounds


def margin_matrix(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``(B, classes, classes)``: row j picks ``z_y - z_j`` (zero at j = y)."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    return eye[y][:, None, :] - eye[None]
