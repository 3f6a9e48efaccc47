"""Bound passes over a read graph: the values of every node (Boxes for the ones that depend on
the input), and backward linear bound propagation with weight perturbations as additive sets.

``backward`` runs ``lam`` from one node back to the input in reverse topological order: every
operator contributes its own linear bound (``model/operators``), coefficients reaching a node
along several paths (a residual block) are summed, and every perturbed affine node subtracts
the support of its output-change set (``model/lemma.py``), sized by the bounds on its input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..model.graph import CONSTANT, SHAPE, Graph, Node
from ..model.lemma import LayerBudget, OutputSet, chord
from ..model.operators.base import Box, constant_min, largest_of, tiny_of
from ..model.operators.elementwise import Elementwise, relu_backward
from ..model.operators.linear import Arithmetic, Identity
from ..model.operators.normalization import BatchNorm
from .region import InputRegion


@dataclass
class Bounds:
    """What a bound pass knows about every node.

    values:   a Box for the input and every node that depends on it, the value otherwise;
    concrete: the same with lower bounds in place of Boxes (shape nodes, like ``x.size(0)``,
              are computed from them);
    added:    what moves each node's output beyond its operator's function: the threat's
              weight perturbation and the rounding of the model's own arithmetic, as an
              elementwise box radius (0: nothing) and, for dense layers with Frobenius
              budgets, the lemma's l2 ball (None: none); both already included in its Box,
              and taken off in every backward pass without being recomputed;
    unit:     the unit roundoff the rounding radii are computed with (0: exact arithmetic);
    linear:   the perturbed affine nodes whose weight term a backward pass takes from the
              coefficients rather than from ``added`` (which then holds the rest), with that
              term's box: dense layers on one vector with linf weights, linearly in their input
              (``LayerBudget.weight_terms``; ``added`` keeps the bias term), and weights shared
              across positions, jointly over them (``LayerBudget.coupled_support``, weight and
              bias);
    overflow: (B,) bool, the examples where some value the model computes may overflow (its
              bound reaches ``largest_of(unit)``, or is not a number): their bounds are
              ``-inf`` (``trusted``); None: nothing is watched.
    chords:   per ``linear`` dense node, the line above ``|h|`` over its input's box and the
              Box it was made for (``chord``): the passes over the same bounds (alpha-crown's
              and bab's steps) take it again instead of making it again.
    """

    values: list[Any]
    concrete: list[Any]
    added: list[tuple[Tensor | float, Tensor | None]]
    unit: float
    linear: dict[int, tuple[LayerBudget, Tensor]] = field(default_factory=dict)
    overflow: Tensor | None = None
    chords: dict[int, tuple[Box, tuple[Tensor, Tensor]]] = field(default_factory=dict)

    @classmethod
    def start(cls, graph: Graph, region: InputRegion, unit: float) -> Bounds:
        n = len(graph.nodes)
        bounds = cls([None] * n, [None] * n, [(0.0, None)] * n, unit)
        bounds.overflow = torch.zeros(len(region.lower), dtype=torch.bool, device=region.x.device)
        bounds.set(0, Box(region.lower, region.upper))
        return bounds

    def watch(self, box: Box) -> None:
        """Flag the examples whose ``box`` reaches the overflow limit (NaN counts)."""
        limit = largest_of(self.unit)
        if self.overflow is None or limit == math.inf:
            return
        beyond = ~(box.magnitude() < limit)
        self.overflow |= beyond.reshape(beyond.shape[0], -1).any(1).expand_as(self.overflow)

    def chord(self, index: int, h: Box) -> tuple[Tensor, Tensor]:
        """Slope and offset of the line above ``|h|`` on ``h`` (``lemma.chord``), for the input
        box ``h`` of the dense node ``index``: made once per Box (a box made again, or one
        that carries gradients, gets its own)."""
        known = self.chords.get(index)
        if known is not None and known[0] is h:
            return known[1]
        line = chord(h, self.unit)
        if not (h.lower.requires_grad or h.upper.requires_grad):
            self.chords[index] = (h, line)
        return line

    def trusted(self, lower: Tensor) -> Tensor:
        """``lower (B, K)``, or ``-inf`` where it is not a finite number or its example may
        overflow: a bound computed through an overflow is no bound."""
        if self.overflow is None:
            return lower
        return trusted(lower, self.overflow[:, None])

    def fixed(self, graph: Graph, node: Node) -> bool:
        """Fill in a constant or shape node; False for nodes that need a Box."""
        if node.kind == CONSTANT and node.index in graph.constants:  # as the model has it
            self.values[node.index] = self.concrete[node.index] = graph.constants[node.index]
            return True
        if node.kind == CONSTANT:
            args, kwargs = node.fill(self.values, graph.tensors)
        elif node.kind == SHAPE:
            args, kwargs = node.fill(self.concrete, graph.tensors)
        else:
            return False
        self.values[node.index] = self.concrete[node.index] = node.op.forward(*args, **kwargs)
        return True

    def everything_added(self, index: int) -> tuple[Tensor | float, Tensor | None]:
        """``added`` with the weight term of a ``linear`` node put back in as a box: what
        interval-style passes take off."""
        radius, ball = self.added[index]
        if index in self.linear:
            radius = radius + self.linear[index][1]
        return radius, ball

    def set(self, index: int, box: Box) -> None:
        """Node ``index``'s Box, watched for overflow."""
        self.values[index] = box
        self.concrete[index] = box.lower
        self.watch(box)

    def copy_node(self, other: Bounds, index: int, rows: Tensor) -> None:
        """Node ``index`` as ``other`` bounded it, for its examples at ``rows`` (branch and
        bound's domains, before any split, each a copy of its example)."""

        def picked(t: Any, ndim: int) -> Any:
            if not isinstance(t, Tensor) or t.dim() != ndim:
                return t
            if t.shape[0] == 1:
                return t.expand(len(rows), *t.shape[1:])
            return t[rows]

        box: Box = other.values[index]
        ndim = box.lower.dim()
        if self.overflow is not None and other.overflow is not None:
            self.overflow |= picked(other.overflow, 1)
        self.set(index, Box(picked(box.lower, ndim), picked(box.upper, ndim)))
        radius, ball = other.added[index]
        self.added[index] = (picked(radius, ndim), picked(ball, 1))
        if index in other.linear:
            budget, weight_box = other.linear[index]
            self.linear[index] = (budget, picked(weight_box, ndim))


def trusted(lower: Tensor, flagged: Tensor | None = None) -> Tensor:
    """``lower`` with ``-inf`` wherever it is not a finite number (an overflow or NaN in the
    bound computation: NaN would compare as not certified, ``inf`` as certified) or
    ``flagged`` (broadcastable to it)."""
    bad = ~torch.isfinite(lower)
    if flagged is not None:
        bad = bad | flagged
    return lower.masked_fill(bad, -math.inf)


# whether backward passes bound a weight shared across positions jointly over them
# (``LayerBudget.coupled_support``); False restores the position-by-position box (benchmarks)
COUPLED = True


def perturbation_set(budget: LayerBudget, box: Box) -> OutputSet:
    """The output-change set of a perturbed node whose input lies in ``box``."""
    return budget.output_set(box.magnitude())


def node_box(graph: Graph, budgets: dict[int, LayerBudget], index: int, bounds: Bounds) -> Box:
    """The Box of node ``index`` from the bounds of the nodes before it: the operator's interval,
    widened by the threat's weight perturbation and the node's own rounding (both recorded)."""
    node = graph.nodes[index]
    args, kwargs = node.fill(bounds.values, graph.tensors)
    box = node.op.interval(*args, **kwargs)
    added: Tensor | float = 0.0
    ball = None
    weight_box: Tensor | float = 0.0  # the weight term, where backward passes take it linearly
    if index in budgets:
        budget = budgets[index]
        moved = perturbation_set(budget, args[0])
        added, ball = (0.0 if moved.box is None else moved.box), moved.ball
        kwargs = {**kwargs, "perturbation": moved.radius()}
        if tiny_of(bounds.unit) > 0:  # what flushed inputs leave out: at |h| = 1
            ones = torch.ones_like(args[0].lower[:1])
            kwargs["perturbation_sum"] = perturbation_set(budget, Box(ones, ones)).radius()
        if budget.linear_in_input(args[0].lower):
            added = budget.bias_radius_box()
            weight_box = budget.weight_radius_box(args[0].magnitude())
            bounds.linear[index] = (budget, weight_box)
        elif COUPLED and budget.shares_weight(args[0].lower) and moved.ball is None:
            added, weight_box = 0.0, moved.radius()  # weight and bias, taken jointly
            bounds.linear[index] = (budget, weight_box)
    if bounds.unit > 0:  # 0: exact arithmetic (the training losses)
        added = added + node.op.rounding(bounds.unit, *args, **kwargs)
    bounds.added[index] = (added, ball)
    widen = added + weight_box
    if ball is not None:
        widen = widen + ball.reshape(-1, 1)  # the ball's box, for the interval
    return box.widen(widen) if isinstance(widen, Tensor) or widen > 0 else box


def box_support(lam: Tensor, radius: Tensor | float, magnitude: Tensor | None = None) -> Tensor:
    """``max over |d| <= radius of lam . d``: ``(B, K)``; ``magnitude``: ``|lam|`` if known."""
    if not isinstance(radius, Tensor):
        if magnitude is None:  # one fused pass, no |lam| in memory
            return torch.linalg.vector_norm(lam.flatten(2), 1, dim=-1) * radius
        return magnitude.flatten(2).sum(-1) * radius
    magnitude = (lam.abs() if magnitude is None else magnitude).flatten(2)
    if radius.dim() == lam.dim() - 1 and radius.shape[0] == lam.shape[0]:
        full = radius.expand(lam.shape[0], *lam.shape[2:]).reshape(lam.shape[0], -1, 1)
        return torch.bmm(magnitude, full).squeeze(-1)  # no (B, K, N) product in memory
    return (magnitude.reshape(lam.shape) * radius.unsqueeze(1)).flatten(2).sum(-1)


def _weight_term(
    bounds: Bounds, index: int, lam: Tensor, h: Box, into: Tensor, first: bool, magnitude: Tensor
) -> Tensor:
    """A lower bound ``(B, K)`` on the weight term of a ``linear`` node for ``lam``: the dense
    layer's chord, linear in its input (its part on the input added to ``into``), or, for a
    weight shared across positions, the smaller of the joint support and the box's. Where
    every row of ``lam`` holds one output value (``first``: may, and then checked), both are
    the same: the box's is taken (a tightening's rows, up to the first convolution on their
    way back). ``magnitude``: ``|lam|``."""
    budget, box = bounds.linear[index]
    if budget.linear_in_input(h.lower):
        return budget.weight_terms(lam, bounds.chord(index, h), into=into)
    separate = box_support(lam, box, magnitude)
    if first and one_value_rows(magnitude):
        return -separate
    return -torch.minimum(budget.coupled_support(lam, h, bounds.unit, magnitude), separate)


def one_value_rows(magnitude: Tensor) -> bool:
    """Whether every row of ``magnitude (B, K, ...)`` (a ``|lam|``) holds at most one value
    that counts: its sum equals its largest entry (exactly so where one is nonzero; a second
    one only passes where rounding absorbs it). Two cheap reductions, where counting the
    nonzeros took 20 times as long."""
    flat = magnitude.flatten(2)
    if flat.shape[-1] == 0:
        return True
    return bool((flat.sum(-1) <= flat.amax(-1)).all())


def added_support(
    lam: Tensor, added: tuple[Tensor | float, Tensor | None], magnitude: Tensor | None = None
) -> Tensor | float:
    """``max of lam . d`` over what moves a node's output (``Bounds.added``); ``magnitude``:
    ``|lam|`` if known."""
    radius, ball = added
    total: Tensor | float = 0.0
    if _has_box(added):
        total = box_support(lam, radius, magnitude)
    if ball is not None:
        total = total + lam.flatten(2).norm(dim=-1) * ball.reshape(-1, 1)
    return total


def backward(
    graph: Graph,
    region: InputRegion,
    bounds: Bounds,
    lam: Tensor,
    start: int,
    *,
    relax: bool = True,
    slopes: dict[int, Tensor] | None = None,
    betas: dict[int, tuple[Tensor, Tensor]] | None = None,
    record: dict[int, Tensor] | None = None,
) -> Tensor:
    """A lower bound ``(B, K)`` of ``lam . value(start)`` over the joint threat, as the model
    computes it (each node's weight perturbation and rounding are taken off as recorded by
    the pass that made ``bounds``); ``-inf`` where a value may overflow (``Bounds.trusted``).

    relax: use every operator's linear relaxation; False stops at each operator that is not
    affine and concretizes over its box instead (IBP with the affine tail folded in).
    slopes: per ReLU node, the lower lines' slopes to use (``(B, K, *shape)`` in [0, 1]:
    alpha-CROWN's), instead of CROWN's adaptive ones.
    betas: per split node of a branch-and-bound domain, ``(beta, signs)``: multipliers
    ``beta >= 0`` ``(B, K, *shape)`` of the domain's constraints ``signs * value >= 0``
    (``signs`` in {-1, 0, 1}, ``(B, *shape)``). Each adds ``-beta signs . value``, which is
    <= 0 inside the domain, so the bound holds over the domain (beta-CROWN's Lagrangian).
    record: filled with the coefficients ``(B, K, *shape)`` reaching every node that is not
    affine and every ``linear`` perturbed node (branch and bound reads what each ReLU's
    relaxation and each weight term's chord cost the bound).
    """
    values = bounds.values
    pending: dict[int, Tensor] = {start: lam}
    single = {start}  # nodes whose rows may hold one value each (``_pass_on``)
    const = lam.new_zeros(lam.shape[:2])
    for node in reversed(graph.nodes[1 : start + 1]):
        lam = pending.pop(node.index, None)
        if betas is not None and node.index in betas:
            beta, signs = betas[node.index]
            term = -beta * signs[:, None].to(beta.dtype)
            lam = term if lam is None else lam + term
        if lam is None:
            continue
        if record is not None and (not node.op.linear or node.index in bounds.linear):
            record[node.index] = lam
        if not relax and not node.op.linear:
            const = const + constant_min(lam, values[node.index])
            continue
        args, kwargs = node.fill(values, graph.tensors)
        if slopes is not None and node.index in slopes:
            lams, c = relu_backward(lam, args[0], slopes[node.index])
        else:
            lams, c = node.op.backward(lam, *args, **kwargs)
        one = node.index in single
        const = const + c - _moved(bounds, node.index, lam, args[0], lams, relax, one)
        for ref, part in zip(node.box_refs, lams, strict=True):
            if part is not None:
                _pass_on(pending, single, ref, part, one and isinstance(node.op, _PER_VALUE))
    if 0 in pending:
        const = const + region.minimum(pending.pop(0))
    return bounds.trusted(const)


# operators whose backward step maps each output value's coefficient to the same position of
# its input (times a factor): a row holding one value keeps holding one
_PER_VALUE = (BatchNorm, Elementwise, Identity, Arithmetic)


def _pass_on(
    pending: dict[int, Tensor], single: set[int], ref: int, part: Tensor, one_value: bool
) -> None:
    """Add ``part`` to the coefficients reaching node ``ref``. ``single`` holds the nodes whose
    rows may hold one value each: reached once, from such a node through a ``_PER_VALUE``
    operator (the tightening's rows start as one neuron each); a second path clears it. Only
    a hint for ``_weight_term``, which checks it."""
    if ref in pending:
        pending[ref] = pending[ref] + part
        single.discard(ref)
        return
    pending[ref] = part
    if one_value:
        single.add(ref)


def _moved(
    bounds: Bounds, index: int, lam: Tensor, h: Any, lams: list, relax: bool, one: bool
) -> Tensor | float:
    """What ``backward`` takes off at node ``index`` for what moves its output beyond its
    operator (``Bounds.added``; a ``linear`` node's weight term from the coefficients, part
    of it added to ``lams[0]``); ``|lam|`` is computed at most once for all of it. ``one``:
    the rows of ``lam`` may hold one value each (checked before it is relied on)."""
    added = bounds.added[index] if relax else bounds.everything_added(index)
    weighted = relax and index in bounds.linear
    # |lam| in memory only where a radius per value or the weight term reads it
    magnitude = lam.abs() if weighted or isinstance(added[0], Tensor) else None
    total = added_support(lam, added, magnitude)
    if weighted:
        total = total - _weight_term(bounds, index, lam, h, lams[0], one, magnitude)
    return total


def _has_box(added: tuple[Tensor | float, Tensor | None]) -> bool:
    """Whether ``added`` has a box part (not the number 0)."""
    radius = added[0]
    return isinstance(radius, Tensor) or radius > 0


def margin_matrix(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``C: (B, classes, classes)`` with rows ``e_y - e_j``: margins in one linear map."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    return eye[y][:, None, :] - eye[None, :, :]
