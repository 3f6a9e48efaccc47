"""Operations that are linear in the values they bound: reshapes and selections, concatenation,
padding, average pooling, means and sums; arithmetic with constants; sums of two values.

A ``LinearMap`` has coefficients of one sign, so boxes map through it directly (its lower bound
is the map of the lower bound); its CROWN step is its adjoint, taken by autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    Box,
    Operator,
    as_kernel_number,
    boxes_of,
    dot,
    gamma,
    guarded,
    reduce_to,
    tiny_of,
)


def substitute(template: Any, values: Iterator[Any]) -> Any:
    """``template`` with its Box leaves replaced, in order, by the next ``values``."""
    # Not fx's map_aggregate: it returns immutable_list/immutable_dict for lists and dicts and
    # a plain tuple for torch.Size; this keeps each container's own type (dicts become dict).
    if isinstance(template, Box):
        return next(values)
    if isinstance(template, (tuple, list)):
        return type(template)(substitute(v, values) for v in template)
    if isinstance(template, dict):
        return {k: substitute(v, values) for k, v in template.items()}
    return template


def _at(args: tuple, kwargs: dict[str, Any], values: list[Tensor]) -> tuple[tuple, dict]:
    it = iter(values)
    return substitute(args, it), substitute(kwargs, it)


@dataclass
class LinearMap(Operator):
    """``fn(*args)``, linear in its Box arguments with coefficients of sign ``sign``.

    reshape: it only reshapes its one input (its adjoint is a reshape back).
    offset:  ``fn(0) != 0`` (padding with a non-zero value): the constant enters the bounds.
    terms:   the most input values summed into one output (rounding of pooling and means);
             -1: derived from the shapes (a reduction or an adaptive pooling).
    """

    fn: Callable[..., Tensor]
    label: str
    sign: int = 1
    reshape: bool = False
    offset: bool = False
    terms: int = 1
    linear = True

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)

    def _map(self, args: tuple, kwargs: dict[str, Any], values: list[Tensor]) -> Tensor:
        a, k = _at(args, kwargs, values)
        return self.fn(*a, **k)

    def interval(self, *args: Any, **kwargs: Any) -> Box:
        boxes = boxes_of(args, kwargs)
        low = self._map(args, kwargs, [b.lower for b in boxes])
        high = self._map(args, kwargs, [b.upper for b in boxes])
        return Box(low, high) if self.sign > 0 else Box(high, low)

    def backward(
        self, lam: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[list[Tensor | None], Tensor]:
        boxes = boxes_of(args, kwargs)
        const = lam.new_zeros(lam.shape[:2])
        if self.reshape:
            return [lam.reshape(*lam.shape[:2], *boxes[0].shape[1:])], const
        with torch.enable_grad():
            _, pullback = torch.func.vjp(
                lambda *vals: self._map(args, kwargs, list(vals)), *[b.lower for b in boxes]
            )
            lams = torch.func.vmap(pullback, in_dims=1, out_dims=1)(lam)
        if self.offset:
            const = dot(lam, self._map(args, kwargs, [b.lower * 0 for b in boxes]).unsqueeze(1))
        # not detached: the slopes', multipliers' and training's gradients pass through
        return list(lams), const

    def rounding(self, unit: float, *args: Any, **kwargs: Any) -> Tensor | float:
        """Copies are exact; a pooling or reduction of ``k`` values rounds like a sum of ``k``
        terms and one division: ``(gamma(k) + u)`` times the map of ``|h|``, plus ``2 tiny``
        per operation near zero; ``inf`` where the sum before the division may overflow."""
        if self.terms == 1:
            return 0.0
        boxes = boxes_of(args, kwargs)
        sizes = [b.magnitude() for b in boxes]
        out = self._map(args, kwargs, sizes).abs()
        terms = self.terms
        if terms < 0:  # windows of ceil(in/out) values per output, overlapping by one per side
            terms = 4 * math.ceil(boxes[0].lower[0].numel() / max(1, out[0].numel()))
        error = (gamma(terms, unit) + unit) * out + 2 * (terms + 1) * tiny_of(unit)
        return guarded(error, terms * out, unit)


@dataclass
class Identity(Operator):
    """Identity (and Dropout, whose deployed function is the identity)."""

    label: str = "identity"
    p: float = 0.0  # Dropout's probability in training mode
    linear = True

    def forward(self, h: Tensor) -> Tensor:
        return h

    def forward_train(self, h: Tensor) -> Tensor:
        return F.dropout(h, self.p, training=True) if self.p > 0 else h

    def interval(self, h: Box) -> Box:
        return h

    def backward(self, lam: Tensor, h: Box) -> tuple[list[Tensor | None], Tensor]:
        return [lam], lam.new_zeros(lam.shape[:2])

    def rounding(self, unit: float, h: Box) -> float:
        return 0.0


def _scaled(term: Any, scale: float) -> Any:
    if isinstance(term, Box):
        low, high = term.lower * scale, term.upper * scale
        return Box(low, high) if scale >= 0 else Box(high, low)
    return term * scale


def _size(term: Any) -> Tensor | float:
    return term.magnitude() if isinstance(term, Box) else abs(term)


@dataclass
class Arithmetic(Operator):
    """``a + alpha * b`` (``add``; ``sub`` is ``alpha = -1``), ``a * b`` and ``a / b`` with one side
    constant, ``-a``. Constants are tensors or numbers broadcast against the values."""

    kind: str
    label: str
    alpha: float = 1.0
    linear = True

    def forward(self, a: Any, b: Any = None) -> Tensor:
        if self.kind == "add":
            return a + b if self.alpha == 1 else torch.add(a, b, alpha=self.alpha)
        if self.kind == "sub":
            return a - b if self.alpha == 1 else torch.sub(a, b, alpha=self.alpha)
        if self.kind == "mul":
            return a * b
        if self.kind == "div":
            return a / b
        return -a

    def _coefficient(self) -> float:
        return self.alpha if self.kind == "add" else -self.alpha

    def _as_run(self, a: Any, b: Any) -> tuple[Any, Any]:
        """The operands as the model's kernel holds them: a Python number is rounded to the
        dtype the kernel computes in (``0.1`` is float32's ``0.1`` in a float32 model, ``2**128``
        its ``inf``); tensors are the model's own already."""
        return as_kernel_number(a, self.model_dtype), as_kernel_number(b, self.model_dtype)

    def _check(self, a: Any, b: Any) -> None:
        if self.kind == "mul" and isinstance(a, Box) and isinstance(b, Box):
            raise self.unsupported("bounds for a product of two values that depend on the input;")
        if self.kind == "div" and isinstance(b, Box):
            raise self.unsupported("bounds for a division by a value that depends on the input;")

    def interval(self, a: Any, b: Any = None) -> Box:
        self._check(a, b)
        a, b = self._as_run(a, b)
        if self.kind == "neg":
            return Box(-a.upper, -a.lower)
        if self.kind in ("add", "sub"):
            first, second = _scaled(a, 1.0), _scaled(b, self._coefficient())
            low = (first.lower if isinstance(first, Box) else first) + (
                second.lower if isinstance(second, Box) else second
            )
            high = (first.upper if isinstance(first, Box) else first) + (
                second.upper if isinstance(second, Box) else second
            )
            return Box(low, high)
        box, factor = (a, b) if isinstance(a, Box) else (b, a)
        if self.kind == "div":
            factor = 1 / factor
        center = box.center * factor
        radius = box.radius * (factor.abs() if isinstance(factor, Tensor) else abs(factor))
        return Box(center - radius, center + radius)

    def backward(self, lam: Tensor, a: Any, b: Any = None) -> tuple[list[Tensor | None], Tensor]:
        self._check(a, b)
        a, b = self._as_run(a, b)
        const = lam.new_zeros(lam.shape[:2])
        if self.kind == "neg":
            return [-lam], const
        if self.kind in ("add", "sub"):
            lams: list[Tensor | None] = []
            for term, scale in ((a, 1.0), (b, self._coefficient())):
                if isinstance(term, Box):  # a sum passes ``lam`` itself on (no product by 1)
                    lams.append(reduce_to(lam if scale == 1.0 else lam * scale, term.shape))
                else:
                    const = const + _dot_constant(lam, term * scale)
            return lams, const
        box, factor = (a, b) if isinstance(a, Box) else (b, a)
        if self.kind == "div":
            return [reduce_to(lam / factor, box.shape)], const
        return [reduce_to(lam * factor, box.shape)], const

    def rounding(self, unit: float, a: Any, b: Any = None) -> Tensor | float:
        """One rounding of the result (three when ``alpha``, itself rounded, scales the second
        term; two for a division, which CUDA makes a product with the rounded reciprocal of a
        number); near zero ``tiny`` per rounding and per operand that may be flushed (times what
        multiplies it). Dividing by a constant that may be flushed to zero may overflow:
        ``inf``."""
        tiny = tiny_of(unit)
        a, b = self._as_run(a, b)
        if self.kind == "neg":
            return 0.0
        if self.kind in ("add", "sub"):
            roundings = 1 if self.alpha == 1 else 3
            size = _size(a) + abs(self.alpha) * _size(b)
            error = roundings * unit * size + tiny * (roundings + 1 + abs(self.alpha))
            return error if tiny == 0 else guarded(torch.as_tensor(error), size, unit)
        box, factor = (a, b) if isinstance(a, Box) else (b, a)
        scale = factor.abs() if isinstance(factor, Tensor) else abs(factor)
        if self.kind == "div":
            if tiny > 0 and bool((torch.as_tensor(scale) < tiny).any()):
                return math.inf  # a subnormal divisor, flushed, divides by zero
            scale = 1 / scale
        magnitude = box.magnitude()
        roundings = 2 if self.kind == "div" else 1
        # the result flushed, the box's value flushed (times the factor), the constant flushed
        return roundings * unit * scale * magnitude + tiny * (1 + scale + magnitude)


def _dot_constant(lam: Tensor, value: Any) -> Tensor:
    """``lam . value`` for a constant broadcast against the output (a tensor or a number)."""
    if isinstance(value, Tensor):
        return dot(lam, value)
    return lam.flatten(2).sum(-1) * float(value)


@dataclass
class Fill(Operator):
    """A value that depends on the input's shape only (``zeros_like(x)``, ``x.new_ones(...)``):
    a constant for the bounds."""

    fn: Callable[..., Tensor]
    label: str
    linear = True

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)

    def _value(self, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        boxes = boxes_of(args, kwargs)
        a, k = _at(args, kwargs, [b.lower for b in boxes])
        return self.fn(*a, **k)

    def interval(self, *args: Any, **kwargs: Any) -> Box:
        value = self._value(args, kwargs)
        return Box(value, value)

    def backward(
        self, lam: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[list[Tensor | None], Tensor]:
        boxes = boxes_of(args, kwargs)
        return [None] * len(boxes), dot(lam, self._value(args, kwargs).unsqueeze(1))

    def rounding(self, unit: float, *args: Any, **kwargs: Any) -> float:
        return 0.0
