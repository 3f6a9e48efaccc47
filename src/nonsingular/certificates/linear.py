"""Bound passes over a read graph: the values of every node (Boxes for the ones that depend on
the input), and backward linear bound propagation with weight perturbations as additive sets.

``backward`` runs ``lam`` from one node back to the input in reverse topological order: every
operator contributes its own linear bound (``model/operators``), coefficients reaching a node
along several paths (a residual block) are summed, and every perturbed affine node subtracts
the support of its output-change set (``model/lemma.py``), sized by the bounds on its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..model.graph import CONSTANT, SHAPE, Graph, Node
from ..model.lemma import LayerBudget, OutputSet
from ..model.operators.base import Box, constant_min
from .region import InputRegion


@dataclass
class Bounds:
    """What a bound pass knows about every node.

    values:   a Box for the input and every node that depends on it, the value otherwise;
    concrete: the same with lower bounds in place of Boxes (shape nodes, like ``x.size(0)``,
              are computed from them);
    rounding: the radius of the error the model's own arithmetic adds at the node (0: exact),
              already included in its Box;
    unit:     the unit roundoff those radii are computed with.
    """

    values: list[Any]
    concrete: list[Any]
    rounding: list[Tensor | float]
    unit: float

    @classmethod
    def start(cls, graph: Graph, region: InputRegion, unit: float) -> Bounds:
        n = len(graph.nodes)
        bounds = cls([None] * n, [None] * n, [0.0] * n, unit)
        bounds.values[0] = Box(region.lower, region.upper)
        bounds.concrete[0] = region.lower
        return bounds

    def fixed(self, graph: Graph, node: Node) -> bool:
        """Fill in a constant or shape node; False for nodes that need a Box."""
        if node.kind == CONSTANT:
            args, kwargs = node.fill(self.values, graph.tensors)
        elif node.kind == SHAPE:
            args, kwargs = node.fill(self.concrete, graph.tensors)
        else:
            return False
        self.values[node.index] = self.concrete[node.index] = node.op.forward(*args, **kwargs)
        return True

    def set(self, index: int, box: Box) -> None:
        self.values[index] = box
        self.concrete[index] = box.lower


def perturbation_set(budget: LayerBudget, box: Box) -> OutputSet:
    """The output-change set of a perturbed node whose input lies in ``box``."""
    return budget.output_set(box.magnitude())


def node_box(graph: Graph, budgets: dict[int, LayerBudget], index: int, bounds: Bounds) -> Box:
    """The Box of node ``index`` from the bounds of the nodes before it: the operator's interval,
    widened by the threat's weight perturbation and by the node's own rounding (recorded)."""
    node = graph.nodes[index]
    args, kwargs = node.fill(bounds.values, graph.tensors)
    box = node.op.interval(*args, **kwargs)
    if index in budgets:
        moved = perturbation_set(budgets[index], args[0]).radius()
        box = box.widen(moved)
        kwargs = {**kwargs, "perturbation": moved}
    if bounds.unit == 0:
        return box  # exact arithmetic (the training losses)
    radius = node.op.rounding(bounds.unit, *args, **kwargs)
    bounds.rounding[index] = radius
    return box.widen(radius) if isinstance(radius, Tensor) or radius > 0 else box


def box_support(lam: Tensor, radius: Tensor | float) -> Tensor:
    """``max over |d| <= radius of lam . d``: ``(B, K)``."""
    if isinstance(radius, Tensor):
        return (lam.abs() * radius.unsqueeze(1)).flatten(2).sum(-1)
    return lam.abs().flatten(2).sum(-1) * radius


def backward(
    graph: Graph,
    budgets: dict[int, LayerBudget],
    region: InputRegion,
    bounds: Bounds,
    lam: Tensor,
    start: int,
    *,
    relax: bool = True,
) -> Tensor:
    """A lower bound ``(B, K)`` of ``lam . value(start)`` over the joint threat, as the model
    computes it (each node's rounding box is taken off like a perturbation).

    relax: use every operator's linear relaxation; False stops at each operator that is not
    affine and concretizes over its box instead (IBP with the affine tail folded in).
    """
    values = bounds.values
    pending: dict[int, Tensor] = {start: lam}
    const = lam.new_zeros(lam.shape[:2])
    for node in reversed(graph.nodes[1 : start + 1]):
        lam = pending.pop(node.index, None)
        if lam is None:
            continue
        if not relax and not node.op.linear:
            const = const + constant_min(lam, values[node.index])
            continue
        args, kwargs = node.fill(values, graph.tensors)
        radius = bounds.rounding[node.index]
        if isinstance(radius, Tensor) or radius > 0:
            const = const - box_support(lam, radius)
        if node.index in budgets:
            const = const - perturbation_set(budgets[node.index], args[0]).support(lam)
        lams, c = node.op.backward(lam, *args, **kwargs)
        const = const + c
        for ref, part in zip(node.box_refs, lams, strict=True):
            if part is not None:
                pending[ref] = pending[ref] + part if ref in pending else part
    if 0 in pending:
        const = const + region.minimum(pending.pop(0))
    return const


def margin_matrix(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``C: (B, classes, classes)`` with rows ``e_y - e_j``: margins in one linear map."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    return eye[y][:, None, :] - eye[None, :, :]
