"""Forward linear bounds: every node's value between two linear functions of the input, in
one pass over the graph (the forward mode of linear bound propagation, DeepPoly-style).

Each node's bounds are kept as a centre ``M x + m`` and a half-width ``D x + d`` (``x`` the
input, flattened): ``M x + m - (D x + d) <= value <= M x + m + (D x + d)`` over the input
region. An affine map ``A`` takes them to ``A M x + A m`` and ``|A| D x + |A| d`` (its
positive part meets the lower bound, its negative part the upper one), a ReLU to CROWN's
lines (the chord above, ``alpha z`` below, from its input's box), and what moves a node
beyond its operator (the threat's weight term and the model's rounding, as ``Bounds.added``
records them for the interval pass) widens ``d``. Any other operator restarts from its box.

Concretized over the region, these bounds hold for every neuron of a layer at the price of
one pass with ``n_x`` coefficient rows, where a backward pass needs two rows per neuron: the
cheap first pass that picks the neurons CROWN still has to tighten (``crown.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..model.graph import Graph, Node
from ..model.operators.affine import Affine
from ..model.operators.base import Box
from ..model.operators.elementwise import Elementwise
from ..model.operators.linear import Arithmetic, Identity, LinearMap
from ..model.operators.normalization import BatchNorm
from .crown_engine import Bounds
from .region import InputRegion


@dataclass
class Linear:
    """``M x + m`` (``mid``, ``mid_const``) and ``D x + d`` (``rad``, ``rad_const``).

    Coefficients are ``(B, n_x, *shape)`` (None: zero); constants ``(B, *shape)``."""

    mid: Tensor | None
    mid_const: Tensor
    rad: Tensor | None
    rad_const: Tensor

    @classmethod
    def of_box(cls, box: Box) -> Linear:
        """A value known only by its box: constant bounds."""
        return cls(None, box.center, None, box.radius)

    def lower_upper(self) -> tuple[tuple[Tensor | None, Tensor], tuple[Tensor | None, Tensor]]:
        """``(L, l), (U, u)``: the lower and upper linear functions."""
        return (
            (_combine(self.mid, self.rad, -1.0), self.mid_const - self.rad_const),
            (_combine(self.mid, self.rad, 1.0), self.mid_const + self.rad_const),
        )


def _combine(a: Tensor | None, b: Tensor | None, sign: float) -> Tensor | None:
    """``a + sign b`` where None is zero; ``sign`` is 1 or -1 (no product formed)."""
    if b is None:
        return a
    if a is None:
        return b if sign > 0 else -b
    return a + b if sign > 0 else a - b


def concretize(lin: Linear, region: InputRegion) -> Box:
    """The box the bounds give over the input region (``-inf``/``inf`` where not finite)."""
    (low_c, low), (high_c, high) = lin.lower_upper()
    fresh = lin.mid is not None and lin.rad is not None  # both new tensors of lower_upper
    lower = low + _extreme(low_c, region, low.shape, -1.0, fresh)
    upper = high + _extreme(high_c, region, low.shape, 1.0, fresh)
    lower = torch.where(torch.isnan(lower), -torch.inf, lower)
    upper = torch.where(torch.isnan(upper), torch.inf, upper)
    return Box(lower, upper)


def _extreme(
    coeff: Tensor | None, region: InputRegion, shape: torch.Size, sign: float, fresh: bool
) -> Tensor:
    """``min`` (``sign`` -1) or ``max`` (1) over the region of ``coeff . x`` for every output,
    shaped ``shape`` (``(B, *out)``); over a box as two batched products with its centre and
    radius, ``c . coeff + sign r . |coeff|`` (the coefficients stay ``(B, n_x, N)``).
    ``fresh``: ``coeff`` is a temporary, overwritten by its magnitude."""
    if coeff is None:
        return region.lower.new_zeros(())
    batch, n = coeff.shape[:2]
    flat = coeff.reshape(batch, n, -1)
    if region.l2_radius is not None:  # the ball too: the general form
        lam = (flat * -sign).transpose(1, 2).reshape(batch, -1, *region.lower.shape[1:])
        return (region.minimum(lam) * -sign).reshape(shape)
    center = ((region.upper + region.lower) / 2).reshape(batch, 1, n)
    radius = ((region.upper - region.lower) / 2).reshape(batch, 1, n)
    moved = torch.bmm(center, flat)
    magnitude = flat.abs_() if fresh else flat.abs()
    return torch.baddbmm(moved, radius, magnitude, alpha=sign).reshape(shape)


def start(region: InputRegion) -> Linear:
    """The input: ``x`` itself (identity coefficients)."""
    x = region.lower
    batch, n = x.shape[0], x[0].numel()
    eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape(1, n, *x.shape[1:])
    zero = torch.zeros_like(x)
    return Linear(eye.expand(batch, *eye.shape[1:]), zero, None, zero)


def _per_coefficient(fn: Any, coeff: Tensor) -> Tensor:
    """``fn`` (a map on ``(B, *shape)`` values) on every coefficient row of ``coeff``."""
    batch, n = coeff.shape[:2]
    return torch.func.vmap(fn, in_dims=1, out_dims=1)(coeff) if n else coeff


def _affine_step(node: Node, lin: Linear, args: tuple, kwargs: dict) -> Linear | None:
    """An ``Affine`` node: ``W`` on the centre (with the bias), ``|W|`` on the half-width."""
    op: Affine = node.op  # type: ignore[assignment]
    weight, bias = args[1], args[2] if len(args) > 2 else kwargs.get("bias")
    magnitude = weight.abs()

    def through(t: Tensor, w: Tensor) -> Tensor:
        if op.kind == "linear":
            return op.apply(t, w)
        batch, n = t.shape[:2]
        out = op.apply(t.reshape(batch * n, *t.shape[2:]), w)
        return out.reshape(batch, n, *out.shape[1:])

    mid_const = op.forward(lin.mid_const, weight, bias)
    rad_const = op.apply(lin.rad_const, magnitude)
    mid = None if lin.mid is None else through(lin.mid, weight)
    rad = None if lin.rad is None else through(lin.rad, magnitude)
    return Linear(mid, mid_const, rad, rad_const)


def _scale_step(lin: Linear, scale: Tensor | float, shift: Tensor | float) -> Linear:
    """``scale * value + shift``, elementwise (``scale`` broadcast against ``(B, *shape)``
    values; a per-example scale must be ``(B, *shape)``-shaped)."""
    factor = (
        scale.unsqueeze(1)
        if isinstance(scale, Tensor) and scale.dim() == lin.mid_const.dim()
        else scale
    )
    size = abs(factor) if not isinstance(factor, Tensor) else factor.abs()
    plain = abs(scale) if not isinstance(scale, Tensor) else scale.abs()
    return Linear(
        None if lin.mid is None else lin.mid * factor,
        lin.mid_const * scale + shift,
        None if lin.rad is None else lin.rad * size,
        lin.rad_const * plain,
    )


def _arithmetic_step(node: Node, lins: list[Linear], args: tuple) -> Linear | None:
    """``a + alpha b``, ``-a``, and products or quotients with a constant."""
    op: Arithmetic = node.op  # type: ignore[assignment]
    a, b = op._as_run(args[0], args[1] if len(args) > 1 else None)
    if op.kind == "neg":
        return _scale_step(lins[0], -1.0, 0.0)
    if op.kind in ("mul", "div"):
        factor = b if isinstance(a, Box) else a
        if isinstance(factor, Box):
            return None
        factor = 1 / factor if op.kind == "div" else factor
        return _scale_step(lins[0], factor, 0.0)
    alpha = op._coefficient()
    terms = [(a, 1.0), (b, alpha)]
    boxed = [
        (lin, scale)
        for lin, (term, scale) in zip(
            lins, [t for t in terms if isinstance(t[0], Box)], strict=True
        )
    ]
    if len({tuple(lin.mid_const.shape) for lin, _ in boxed}) != 1:
        return None  # broadcasting between two values: restart from the box
    const = sum((term * scale for term, scale in terms if not isinstance(term, Box)), 0.0)
    parts = [lin if scale == 1.0 else _scale_step(lin, scale, 0.0) for lin, scale in boxed]
    total = parts[0]
    for part in parts[1:]:
        total = Linear(
            _combine(total.mid, part.mid, 1.0),
            total.mid_const + part.mid_const,
            _combine(total.rad, part.rad, 1.0),
            total.rad_const + part.rad_const,
        )
    return Linear(total.mid, total.mid_const + const, total.rad, total.rad_const)


def _map_step(node: Node, lins: list[Linear], args: tuple, kwargs: dict) -> Linear:
    """A ``LinearMap`` (coefficients of one sign): the map on every coefficient row."""
    op: LinearMap = node.op  # type: ignore[assignment]

    def fn(*values: Tensor) -> Tensor:
        return op._map(args, kwargs, list(values))

    offset = fn(*[torch.zeros_like(lin.mid_const) for lin in lins]) if op.offset else 0.0

    def rows(coeffs: list[Tensor | None], like: Linear) -> Tensor | None:
        if all(c is None for c in coeffs):
            return None
        n = next(c for c in coeffs if c is not None).shape[1]
        full = [
            c
            if c is not None
            else lin.mid_const.new_zeros(()).expand(
                lin.mid_const.shape[0], n, *lin.mid_const.shape[1:]
            )
            for c, lin in zip(coeffs, lins, strict=True)
        ]
        out = torch.func.vmap(fn, in_dims=1, out_dims=1)(*full)
        return out - offset.unsqueeze(1) if isinstance(offset, Tensor) else out

    mid = rows([lin.mid for lin in lins], lins[0])
    rad = rows([lin.rad for lin in lins], lins[0])
    rad_const = fn(*[lin.rad_const for lin in lins]) - offset
    return Linear(
        mid,
        fn(*[lin.mid_const for lin in lins]),
        None if rad is None else rad * op.sign,
        rad_const * op.sign,
    )


def _relu_step(lin: Linear, box: Box) -> Linear:
    """CROWN's lines for a ReLU whose input lies in ``box``: the chord ``s z + t`` above,
    ``a z`` below (``a`` 1 where ``u > -l``, else 0), exact where the neuron is stable. With
    ``p = (s + a) / 2`` and ``q = (s - a) / 2`` the centre becomes ``p M + q D + t / 2`` and
    the half-width ``q M + p D + t / 2``."""
    lower, upper = box.lower, box.upper
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    chord = torch.where(unstable, upper / (upper - lower).clamp_min(1e-30), active.to(lower.dtype))
    below = (active | (unstable & (upper > -lower))).to(lower.dtype)
    half = torch.where(unstable, -chord * lower, 0.0) / 2
    p, q = (chord + below) / 2, (chord - below) / 2

    def mix(a: Tensor | None, b: Tensor | None, c: Tensor, d: Tensor) -> Tensor | None:
        if a is None:  # a c + b d, None standing for zero
            return None if b is None else b * d
        return a * c if b is None else torch.addcmul(a * c, b, d)

    p1, q1 = p.unsqueeze(1), q.unsqueeze(1)
    mid, rad = mix(lin.mid, lin.rad, p1, q1), mix(lin.mid, lin.rad, q1, p1)
    return Linear(
        mid,
        lin.mid_const * p + lin.rad_const * q + half,
        rad,
        lin.mid_const * q + lin.rad_const * p + half,
    )


def uses_forward(graph: Graph) -> bool:
    """Whether the first pass pays: graphs with convolutions, whose layers have thousands of
    neurons a backward pass would take two rows each for."""
    return any(isinstance(n.op, Affine) and n.op.is_conv for n in graph.nodes)


# the most coefficients (``B n_x`` per value) one node's bounds may hold; past it the pass
# stops and the nodes after it keep their boxes alone
FORWARD_ELEMENTS = 1 << 25


class ForwardPass:
    """Forward linear bounds of every node, made node by node alongside a bound pass (each
    ReLU relaxed over its input's box as that pass left it); a node's bounds are dropped once
    its last reader is done."""

    def __init__(self, graph: Graph, region: InputRegion) -> None:
        self.graph, self.region = graph, region
        self.inputs = region.lower[0].numel()
        self.lins: dict[int, Linear] = {0: start(region)}
        self.last: dict[int, int] = {}
        for node in graph.nodes:
            for ref in node.box_refs:
                self.last[ref] = node.index

    def _of(self, bounds: Bounds, ref: int) -> Linear:
        found = self.lins.get(ref)
        return found if found is not None else Linear.of_box(bounds.values[ref])

    def step(self, bounds: Bounds, index: int, box_wanted: bool) -> Box | None:
        """Node ``index``'s forward bounds (its Box in ``bounds`` already made, with what moves
        it recorded), concretized where ``box_wanted``: a box that holds it (else None)."""
        node = self.graph.nodes[index]
        if bounds.values[index].lower.numel() * self.inputs > FORWARD_ELEMENTS:
            self.lins.clear()  # too large to hold: what was made so far restarts from boxes
            return None
        lins = [self._of(bounds, ref) for ref in node.box_refs]
        args, kwargs = node.fill(bounds.values, self.graph.tensors)
        lin = _step(node, lins, args, kwargs, bounds)
        box: Box = bounds.values[index]
        if lin is None or tuple(lin.mid_const.shape) != tuple(box.shape):
            lin = Linear.of_box(box)
        else:
            radius, ball = bounds.everything_added(index)
            widen = radius if ball is None else radius + ball.reshape(-1, 1)
            lin = Linear(lin.mid, lin.mid_const, lin.rad, lin.rad_const + widen)
        self.lins[index] = lin
        for ref in node.box_refs:
            if self.last.get(ref) == index:
                self.lins.pop(ref, None)
        return concretize(lin, self.region) if box_wanted else None


def _step(
    node: Node, lins: list[Linear], args: tuple, kwargs: dict, bounds: Bounds
) -> Linear | None:
    """The node's forward bounds from its inputs' (None: not an operator handled here)."""
    op = node.op
    if len(lins) == 0:
        return None
    if isinstance(op, Affine) and len(lins) == 1 and isinstance(args[0], Box):
        return _affine_step(node, lins[0], args, kwargs)
    if isinstance(op, BatchNorm) and len(lins) == 1:
        scale, shift = op._affine(*args[1:5], lins[0].mid_const.dim())
        return _scale_step(lins[0], scale, shift)
    if isinstance(op, Identity):
        return lins[0]
    if isinstance(op, Arithmetic):
        return _arithmetic_step(node, lins, args)
    if isinstance(op, LinearMap):
        return _map_step(node, lins, args, kwargs)
    if isinstance(op, Elementwise) and op.act.kind == "relu":
        return _relu_step(lins[0], bounds.values[node.box_refs[0]])
    return None
