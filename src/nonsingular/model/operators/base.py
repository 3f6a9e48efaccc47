"""What every operation of a read model knows: how it computes, and how it is bounded.

An operator is called like the function it stands for: ``forward(*args, **kwargs)`` with the
node's arguments filled in (tensors, constants, values of other nodes). The bound passes call
``interval`` and ``backward`` with the same arguments, except that every argument that depends
on the model's input is a ``Box`` (its elementwise bounds) instead of a tensor.

``backward(lam, *args, **kwargs)`` returns ``(lams, const)`` such that, for every value of the
Box arguments inside their boxes, ``lam . op(args) >= sum_i lams[i] . box_arg_i + const``;
``lam: (B, K, *out)``, ``lams[i]: (B, K, *in_i)`` (None: no dependence), ``const: (B, K)``. The
list ``lams`` follows the Box arguments in the order they appear in ``args`` then ``kwargs``
(``boxes_of`` lists them). ``rounding`` bounds the floating-point error the model's own
arithmetic adds at this operation, for inputs inside the Boxes: by backward error analysis the
computed output is the exact output of slightly perturbed arithmetic, so the bound passes carry
it as one more small additive box per node (see ``certificates/rounding.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import UnsupportedLayerError


@dataclass
class Box:
    """Elementwise bounds ``lower <= h <= upper`` on a value of shape (B, ...)."""

    lower: Tensor
    upper: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape

    @property
    def center(self) -> Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) / 2

    def magnitude(self) -> Tensor:
        """``max |h|`` over the box."""
        return torch.maximum(self.lower.abs(), self.upper.abs())

    def widen(self, radius: Tensor) -> Box:
        return Box(self.lower - radius, self.upper + radius)


def boxes_of(args: tuple, kwargs: dict[str, Any]) -> list[Box]:
    """The Box arguments of a call, in the order ``backward`` returns their coefficients."""
    return [a for a in _leaves((args, kwargs)) if isinstance(a, Box)]


def _leaves(value: Any) -> Iterator[Any]:
    # Not fx's map_aggregate: that also walks into slices, and a slice is one leaf here.
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def dot(lam: Tensor, value: Tensor) -> Tensor:
    """``(B, K)``: ``lam (B, K, *s)`` times ``value`` (broadcastable to it), summed over ``s``.

    A value constant along trailing dimensions (a per-channel bias ``(C, 1, 1)``) is applied
    after summing ``lam`` over them, never as a product the size of ``lam``."""
    trailing = 0
    while trailing < value.dim() - 1 and value.shape[value.dim() - 1 - trailing] == 1:
        trailing += 1
    if trailing and value.dim() <= lam.dim() - 2:
        lam = lam.sum(dim=tuple(range(lam.dim() - trailing, lam.dim())))
        value = value.reshape(value.shape[: value.dim() - trailing])
    return (lam * value).flatten(2).sum(-1)


def reduce_to(lam: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Sum ``lam (B, K, *out)`` over the dimensions a value of ``shape (B, *in)`` was broadcast
    along to make the output: the adjoint of broadcasting."""
    target = (lam.shape[0], lam.shape[1], *shape[1:])
    if tuple(lam.shape) == target:
        return lam
    extra = lam.dim() - len(target)
    if extra > 0:
        lam = lam.sum(dim=tuple(range(2, 2 + extra)))
    dims = tuple(i for i in range(2, lam.dim()) if target[i] == 1 and lam.shape[i] != 1)
    return lam.sum(dim=dims, keepdim=True) if dims else lam


def constant_min(lam: Tensor, box: Box) -> Tensor:
    """``min over the box of lam . h``: ``(B, K)``."""
    flat = lam.flatten(2)
    return (flat * box.center.flatten(1)[:, None]).sum(-1) - (
        flat.abs() * box.radius.flatten(1)[:, None]
    ).sum(-1)


class Operator:
    """One operation of the graph (see the module docstring for the calling conventions).

    label:       what a user reads in messages, e.g. ``torch.nn.functional.gelu``.
    linear:      affine in its Box arguments: bound passes never lose anything here, and the IBP
                 margin pass goes through it rather than stopping at its box.
    model_dtype: the dtype of its value as the model runs (set when the model is read; the
                 bound passes run a cast copy of the graph, whose operators keep it).
    """

    label: str
    linear: bool = False
    model_dtype: torch.dtype | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_train(self, *args: Any, **kwargs: Any) -> Any:
        """The training-mode function (BatchNorm's batch statistics, Dropout); default: eval's."""
        return self.forward(*args, **kwargs)

    def interval(self, *args: Any, **kwargs: Any) -> Box:
        raise self.unsupported("interval bounds")

    def backward(
        self, lam: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[list[Tensor | None], Tensor]:
        raise self.unsupported("linear bounds")

    def rounding(self, unit: float, *args: Any, **kwargs: Any) -> Tensor | float:
        """Elementwise bound on ``|fl(op(h)) - op(h)|`` for every ``h`` in the Box arguments:
        the error this operation's own arithmetic adds, with unit roundoff ``unit``."""
        raise self.unsupported("a floating-point error bound")

    def needs_tightening(self, box: Box) -> Tensor | None:
        """Mask of the input neurons whose bounds change the relaxation (None: none do)."""
        return None

    def unsupported(self, what: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"operation {self.label} has no {what}: certificates (ibp, crown) cannot bound it; "
            "attacks work on it (docs/models.md, 'Supported operations': what certificates bound)"
        )


def gamma(n: int | float, unit: float) -> float:
    """``n u / (1 - n u)``: the relative error bound of a sum or dot product of ``n`` terms
    in any summation order (Higham, Accuracy and Stability, section 3.1)."""
    nu = n * unit
    return nu / (1 - nu) if nu < 0.5 else float("inf")


TF32_UNIT = 2.0**-11  # TF32 keeps 10 explicit significand bits


class Unit(float):
    """A unit roundoff (it is the float) that also says whether the model's matrix products
    (``matmul_tf32``: Linear) or convolutions (``conv_tf32``) round their inputs to TF32
    before accumulating in float32, as PyTorch lets CUDA do; ``tiny``, the absolute error one
    rounding may add near zero (underflow, flushed denormals); and ``largest``, the magnitude
    from which a value may overflow (``certificates/rounding.py`` derives both from dtypes)."""

    matmul_tf32: bool
    conv_tf32: bool
    tiny: float
    largest: float

    def __new__(
        cls,
        value: float,
        matmul_tf32: bool = False,
        conv_tf32: bool = False,
        tiny: float = 0.0,
        largest: float = math.inf,
    ) -> Unit:
        made = super().__new__(cls, value)
        made.matmul_tf32, made.conv_tf32 = matmul_tf32, conv_tf32
        made.tiny, made.largest = tiny, largest
        return made


def tiny_of(unit: float) -> float:
    """The absolute error of one rounding near zero (0 for a plain float: no underflow)."""
    return getattr(unit, "tiny", 0.0)


def largest_of(unit: float) -> float:
    """The magnitude from which a value may overflow (inf for a plain float: never)."""
    return getattr(unit, "largest", math.inf)


def guarded(error: Tensor, size: Tensor | float, unit: float) -> Tensor:
    """``error`` where ``size`` (a bound on the magnitude of every value computed along the
    way, broadcastable to ``error``) stays below the overflow limit, ``inf`` elsewhere (a
    NaN ``size`` counts as beyond it): the bound passes then flag those examples."""
    limit = largest_of(unit)
    if limit == math.inf:
        return error
    size = torch.as_tensor(size, dtype=error.dtype, device=error.device)
    return torch.where(size < limit, error, math.inf)


def dot_gamma(n: int, unit: float, conv: bool = False) -> float:
    """The relative error bound of a dot product of ``n`` terms as the model computes it:
    ``gamma(n)``, or with TF32 inputs ``(1 + 2^-11)^2 (1 + gamma(n)) - 1`` (each product's
    two inputs rounded to TF32, then exact in float32, then summed in float32)."""
    tf32 = getattr(unit, "conv_tf32" if conv else "matmul_tf32", False)
    base = gamma(n, unit)
    return (1 + TF32_UNIT) ** 2 * (1 + base) - 1 if tf32 else base


HALF_DTYPES = (torch.bfloat16, torch.float16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's elementwise kernels compute in for ``dtype`` tensors (float32 for the
    half types: ``at::opmath_type``); number operands and options are rounded to it."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def as_kernel_number(value: Any, dtype: torch.dtype | None) -> Any:
    """A Python number operand as a kernel on ``dtype`` tensors holds it: rounded to
    ``opmath_dtype`` (``inf`` where it overflows there). Anything else is returned as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if dtype is None or not dtype.is_floating_point:
        return value
    return torch.tensor(float(value), dtype=torch.float64).to(opmath_dtype(dtype)).item()
