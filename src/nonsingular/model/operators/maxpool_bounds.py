"""Sound bounds for max pooling (``F.max_pool1d`` / ``F.max_pool2d``), for IBP and CROWN.

Every function takes elementwise bounds ``lower <= upper`` of shape ``(B, *in)`` on the input
of the operation. ``*_interval`` returns elementwise bounds on its output; ``*_backward``
takes ``lam: (B, K, *out)`` and returns ``(lam_in, const)`` with ``lam_in: (B, K, *in)`` and
``const: (B, K)`` such that, for every ``h`` in the box,

    sum(lam * op(h)) >= sum(lam_in * h) + const      (per example b and objective k),

a lower bound of ``lam . op(h)`` (upper bounds come from negating ``lam``). Vectorized, device
and dtype agnostic; sound in exact arithmetic (the model's rounding is added by the operator).

Each window is relaxed below by the input with the largest lower bound (as DeepPoly /
auto_LiRPA), above by the chord of ``t -> max(t, U)`` in the input with the largest upper
bound, which is never looser than the usual constant ``max_j u_j`` and is exact when one input
dominates the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import BoundError

IntOrSeq = int | Sequence[int]

__all__ = ["maxpool_backward", "maxpool_interval"]


def _tuple(value: IntOrSeq, dims: int, name: str) -> tuple[int, ...]:
    """``value`` as one int per spatial dimension (an int is repeated, as torch does)."""
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    if len(out) == 1:
        return out * dims
    if len(out) != dims:
        raise BoundError(f"{name} needs {dims} value(s), got {value!r}")
    return out


def _pool_options(
    dims: int,
    kernel_size: IntOrSeq,
    stride: IntOrSeq | None,
    padding: IntOrSeq,
    dilation: IntOrSeq,
) -> tuple[tuple[int, ...], ...]:
    if dims not in (1, 2):
        raise BoundError(f"dims must be 1 or 2, got {dims}")
    kernel = _tuple(kernel_size, dims, "kernel_size")
    empty = stride is None or (not isinstance(stride, int) and len(stride) == 0)
    strides = kernel if empty else _tuple(stride, dims, "stride")  # type: ignore[arg-type]
    return kernel, strides, _tuple(padding, dims, "padding"), _tuple(dilation, dims, "dilation")


def _torch_pool(x: Tensor, dims: int, **options) -> Tensor:
    pool = F.max_pool1d if dims == 1 else F.max_pool2d
    return pool(x, **options)


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Output length of one pooled dimension, as ``torch`` computes it."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside
        out -= 1
    return out


def _windows(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    ceil_mode: bool,
    device: torch.device,
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Flat input positions of every window element, by index arithmetic.

    Returns ``index: (O, W)`` (int64, positions into the flattened spatial input, 0 where
    padded), ``valid: (O, W)`` (False at padded positions, which hold -inf) and the output
    spatial shape, where ``O`` is the number of windows and ``W`` the kernel volume.
    """
    index: Tensor | None = None
    valid: Tensor | None = None
    out_shape = []
    for size, k, s, p, d in zip(spatial, kernel, strides, padding, dilation, strict=True):
        out = _out_size(size, k, s, p, d, ceil_mode)
        out_shape.append(out)
        pos = (
            torch.arange(out, device=device)[:, None] * s
            - p
            + torch.arange(k, device=device)[None, :] * d
        )  # (out, k)
        ok = (pos >= 0) & (pos < size)
        pos = pos.clamp(0, size - 1)
        if index is None or valid is None:
            index, valid = pos, ok
        else:  # combine (o1, k1) with (o2, k2) into (o1, o2, k1, k2), row-major positions
            index = index[:, None, :, None] * size + pos[None, :, None, :]
            valid = valid[:, None, :, None] & ok[None, :, None, :]
    assert index is not None and valid is not None
    if len(spatial) == 2:
        o1, o2, k1, k2 = index.shape
        index, valid = index.reshape(o1 * o2, k1 * k2), valid.reshape(o1 * o2, k1 * k2)
    return index, valid, tuple(out_shape)


def _gather_windows(x: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """``x: (B, C, N)`` flattened -> ``(B, C, O, W)`` window values, -inf where padded."""
    values = x[:, :, index]
    return values.masked_fill(~valid, float("-inf"))


def maxpool_interval(
    lower: Tensor,
    upper: Tensor,
    *,
    dims: int,
    kernel_size: IntOrSeq,
    stride: IntOrSeq | None,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    ceil_mode: bool,
) -> tuple[Tensor, Tensor]:
    """Exact elementwise bounds ``(B, C, *out)`` of max pooling over the box ``[lower, upper]``.

    ``lower, upper: (B, C, L)`` for ``dims=1`` or ``(B, C, H, W)`` for ``dims=2``. The max is
    monotone in every input, so pooling the lower and upper corners gives its exact range.
    """
    kernel, strides, pads, dil = _pool_options(dims, kernel_size, stride, padding, dilation)
    options = dict(
        kernel_size=kernel, stride=strides, padding=pads, dilation=dil, ceil_mode=ceil_mode
    )
    return _torch_pool(lower, dims, **options), _torch_pool(upper, dims, **options)


def _checked_windows(
    lam: Tensor,
    lower: Tensor,
    upper: Tensor,
    dims: int,
    options: tuple[tuple[int, ...], ...],
    ceil_mode: bool,
) -> tuple[Tensor, Tensor]:
    """``maxpool_backward``'s argument checks; the windows' ``(index, valid)`` (``_windows``).
    ``options``: kernel, strides, padding and dilation as ``_pool_options`` gives them."""
    kernel, strides, pads, dil = options
    if lower.dim() != dims + 2 or lower.shape != upper.shape:
        raise BoundError(f"lower/upper must be (B, C, *{dims} spatial dims) and equal shapes")
    batch, channels, *spatial = lower.shape
    expected = _torch_pool(  # torch validates the options and gives the output shape
        lower[:1, :1],
        dims,
        kernel_size=kernel,
        stride=strides,
        padding=pads,
        dilation=dil,
        ceil_mode=ceil_mode,
    ).shape[2:]
    index, valid, out_shape = _windows(
        tuple(spatial), kernel, strides, pads, dil, ceil_mode, lower.device
    )
    if tuple(expected) != out_shape:  # pragma: no cover - guards the index arithmetic
        raise BoundError(f"pooling output shape {out_shape} != torch's {tuple(expected)}")
    if not bool(valid.any(-1).all()):  # e.g. L=1, kernel 2, dilation 2, padding 1
        raise BoundError("a pooling window holds only padding: its output is -inf")
    k = lam.shape[1]
    if lam.shape != (batch, k, channels, *out_shape):
        raise BoundError(f"lam shape {tuple(lam.shape)} != (B, K, C, *out) = {out_shape}")
    return index, valid


def _upper_chord(lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Upper relaxation of each window's max (see ``maxpool_backward``): ``(q, slope, offset)``
    with ``q: (B, C, O, 1)`` the argmax of the upper bounds and ``y <= slope x_q + offset``."""
    # chord of max(x_q, U) in x_q, q = argmax of the upper bounds
    q = up.argmax(dim=-1, keepdim=True)
    u_q = up.gather(-1, q).squeeze(-1)
    l_q = lo.gather(-1, q).squeeze(-1)
    others = up.scatter(-1, q, float("-inf")).amax(dim=-1)  # U, -inf for one-element windows
    exact = l_q >= others
    gap = torch.where(exact, torch.ones_like(u_q), u_q - l_q)  # > 0 where not exact
    slope = torch.where(exact, torch.ones_like(u_q), (u_q - others) / gap)
    offset = torch.where(exact, torch.zeros_like(u_q), others - slope * l_q)
    return q, slope, offset


def maxpool_backward(
    lam: Tensor,
    lower: Tensor,
    upper: Tensor,
    *,
    dims: int,
    kernel_size: IntOrSeq,
    stride: IntOrSeq | None,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    ceil_mode: bool,
) -> tuple[Tensor, Tensor]:
    """Backward linear bound of max pooling: ``(lam_in: (B, K, C, *in), const: (B, K))``.

    ``lam: (B, K, C, *out)``; ``lower, upper: (B, C, *in)`` with ``*in`` of length ``dims``.
    Per window (padded positions are -inf and never chosen), with ``y = max_j x_j``:

    * lower bound (used where ``lam > 0``): ``y >= x_p`` with ``p = argmax_j l_j``;
    * upper bound (used where ``lam < 0``): with ``q = argmax_j u_j`` and
      ``U = max_{j != q} u_j``, ``y <= max(x_q, U)``, and that convex function of ``x_q`` lies
      below its chord on ``[l_q, u_q]``: ``y <= U + a (x_q - l_q)`` with
      ``a = (u_q - U) / (u_q - l_q)`` when ``l_q < U``, and ``y <= x_q`` (exact) when
      ``l_q >= U`` (then ``x_q >= U >= x_j`` for every ``j``). The chord is below the constant
      ``u_q = max_j u_j`` on the whole interval, so it is never looser than DeepPoly's bound.

    Windows overlap when ``stride < kernel``: their contributions to one input add up.
    """
    options = _pool_options(dims, kernel_size, stride, padding, dilation)
    index, valid = _checked_windows(lam, lower, upper, dims, options, ceil_mode)
    batch, channels, *spatial = lower.shape
    k = lam.shape[1]

    n = math.prod(spatial)
    lo = _gather_windows(lower.reshape(batch, channels, n), index, valid)  # (B, C, O, W)
    up = _gather_windows(upper.reshape(batch, channels, n), index, valid)

    # lower relaxation: y >= x_p, p = argmax of the lower bounds
    p = lo.argmax(dim=-1, keepdim=True)  # (B, C, O, 1)
    q, slope, offset = _upper_chord(lo, up)

    # flat input positions of the chosen inputs: (B, C, O)
    pos_p = index.expand(batch, channels, -1, -1).gather(-1, p).squeeze(-1)
    pos_q = index.expand(batch, channels, -1, -1).gather(-1, q).squeeze(-1)

    lam_flat = lam.reshape(batch, k, channels, -1)  # (B, K, C, O)
    pos_part, neg_part = lam_flat.clamp(min=0), lam_flat.clamp(max=0)
    lam_in = lam_flat.new_zeros(batch, k, channels, n)
    shape = (batch, k, channels, pos_p.shape[-1])
    lam_in.scatter_add_(-1, pos_p[:, None].expand(shape), pos_part)
    lam_in.scatter_add_(-1, pos_q[:, None].expand(shape), neg_part * slope[:, None])
    const = (neg_part * offset[:, None]).sum(dim=(2, 3))
    return lam_in.reshape(batch, k, channels, *spatial), const
