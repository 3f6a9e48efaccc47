"""B2, joint interval bound propagation: boxes through every node in topological order, each
perturbed affine node's box widened by the lemma's output set; the affine tail before the
output folded into the margin matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.graph import Graph
from ..model.lemma import LayerBudget
from ..model.operators.affine import Affine
from ..model.operators.base import Box
from .crown_engine import Bounds, added_support, backward, margin_matrix, node_box
from .region import InputRegion


def interval_bounds(
    graph: Graph, budgets: dict[int, LayerBudget], region: InputRegion, unit: float
) -> Bounds:
    """Every node's Box (or value), its rounding included, in one forward pass."""
    bounds = Bounds.start(graph, region, unit)
    for node in graph.nodes[1:]:
        if not bounds.fixed(graph, node):
            bounds.set(node.index, node_box(graph, budgets, node.index, bounds))
    return bounds


def ibp_margins(
    graph: Graph,
    budgets: dict[int, LayerBudget],
    region: InputRegion,
    y: Tensor,
    classes: int,
    bounds: Bounds,
) -> Tensor:
    """Lower bounds ``(B, classes)`` of the margins ``z_y - z_j`` by IBP, in margin form (the
    affine tail is folded into the class differences, never bounded logit by logit), from the
    boxes of ``interval_bounds``."""
    out = graph.output
    c = margin_matrix(y, classes, region.x.dtype)
    node = graph.nodes[out]
    args, _ = node.fill(bounds.values, graph.tensors)
    fast = (
        isinstance(node.op, Affine)
        and isinstance(args[0], Box)
        and node.op.one_vector(args[0].lower)
        and classes**2 * args[1].shape[1] <= 1 << 22
        and not (node.box_refs == (0,) and region.l2_radius is not None)  # the input ball
    )
    if not fast:
        return backward(graph, region, bounds, c, out, relax=False)
    # the same bound as ``backward``, without (B, classes, n) tensors: with m, r the centre and
    # radius of the last layer's input box, lower_j = (W m)_y - (W m)_j - |w_y - w_j| . r
    box, weight, bias = args[0], args[1], args[2]
    z = node.op.forward(box.center, weight, bias)
    pairs = (weight[:, None, :] - weight[None, :, :]).abs()  # (K, K, n)
    spread = (box.radius @ pairs.reshape(classes * classes, -1).T).reshape(-1, classes, classes)
    bound = z.gather(1, y[:, None]) - z - spread[torch.arange(len(y)), y]
    return bounds.trusted(bound - added_support(c, bounds.everything_added(out)))
