"""B3, joint CROWN: backward linear bounds through every operator's relaxation; each perturbed
affine node enters as an additive output set whose size comes from intermediate bounds (IBP,
tightened by CROWN itself at the inputs of relaxed operators)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..model.graph import VARIABLE, Graph, Node
from ..model.lemma import LayerBudget
from ..model.operators.affine import Affine
from ..model.operators.base import Box
from ..model.operators.elementwise import Elementwise, relu_lower_slopes
from ..model.operators.linear import LinearMap
from .crown_engine import Bounds, backward, node_box
from .forward import ForwardPass, uses_forward
from .region import InputRegion

INTERMEDIATE = ("crown", "ibp")
ALPHA_STEPS = 20  # alpha-CROWN's gradient steps on the slopes
ALPHA_LR = 0.2
# whether CROWN's own intermediate bounds start from forward linear bounds (``forward.py``) on
# graphs with convolutions, tightening only the neurons those leave unstable; False: from the
# interval boxes alone (the benchmark's "before")
FIRST_PASS = True
# the most coefficients (``B rows n``, ``n`` the widest node on the way back) one backward pass
# of the tightening carries: its rows go in passes of this size, whose tensors stay small
# enough for the allocator to reuse (larger ones are mapped and faulted in afresh each time)
# and for the cache; measured 5-8% less CPU time on the built-in ResNet than one pass
ROW_ELEMENTS = 1 << 21


def _exact_nodes(graph: Graph, region: InputRegion) -> set[int]:
    """Nodes whose IBP box is already exact: reached from a box-shaped input region through
    operators that move or rescale values one by one and at most one map that mixes them
    (an affine node, a pooling or a reduction)."""
    if region.l2_radius is not None:
        return set()  # the box around an l2 ball is not the ball: CROWN can do better
    mixing: dict[int, int] = {0: 0}
    for node in graph.nodes[1:]:
        if node.kind != VARIABLE or len(node.box_refs) != 1 or not node.op.linear:
            continue
        (source,) = node.box_refs
        if source not in mixing:
            continue
        mixes = isinstance(node.op, Affine) or (
            isinstance(node.op, LinearMap) and node.op.terms != 1
        )
        count = mixing[source] + mixes
        if count <= 1:
            mixing[node.index] = count
    return set(mixing)


def _relaxed_inputs(graph: Graph) -> dict[int, list[int]]:
    """For every node, the relaxed (non-affine) operators that read it."""
    found: dict[int, list[int]] = {}
    for node in graph.nodes:
        if node.kind == VARIABLE and not node.op.linear:
            for ref in node.box_refs:
                found.setdefault(ref, []).append(node.index)
    return found


def _rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each example's neurons in ``mask (B, N)`` first, padded to the largest count in the
    batch: ``(order, valid)``, both ``(B, m)``; ``valid`` is 0 on the padding."""
    m = int(mask.sum(1).max()) if mask.numel() else 0
    order = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
    return order, mask.gather(1, order)


def _tighten(
    graph: Graph,
    region: InputRegion,
    bounds: Bounds,
    k: int,
    low: Tensor,
    high: Tensor,
) -> Box:
    """CROWN lower bounds for the neurons ``low (B, N)`` of node ``k`` and upper bounds for
    ``high``, intersected with its box: one row of ``lam`` per bound, in backward passes of
    at most ``ROW_ELEMENTS`` coefficients each (the same bounds as one pass)."""
    box: Box = bounds.values[k]
    flat_lower, flat_upper = box.lower.flatten(1), box.upper.flatten(1)
    (low_order, low_valid), (high_order, high_valid) = _rows(low), _rows(high)
    m_low = low_order.shape[1]
    order = torch.cat([low_order, high_order], 1)
    signs = torch.cat([low_valid, high_valid], 1).to(flat_lower.dtype)
    signs[:, m_low:] *= -1
    if order.shape[1] == 0:
        return box
    batch, size = flat_lower.shape
    step = max(1, ROW_ELEMENTS // (batch * _widest(bounds, k)))
    parts = []
    for i in range(0, order.shape[1], step):
        rows = order[:, i : i + step]
        lam = flat_lower.new_zeros(batch, rows.shape[1], size)
        lam.scatter_(2, rows[:, :, None], signs[:, i : i + step, None])
        parts.append(backward(graph, region, bounds, lam.reshape(batch, -1, *box.shape[1:]), k))
    bound = torch.cat(parts, 1)
    lows = torch.where(low_valid, bound[:, :m_low], float("-inf"))
    highs = torch.where(high_valid, -bound[:, m_low:], float("inf"))
    flat_lower = flat_lower.scatter_reduce(1, low_order, lows, reduce="amax")
    flat_upper = flat_upper.scatter_reduce(1, high_order, highs, reduce="amin")
    return Box(flat_lower.reshape(box.shape), flat_upper.reshape(box.shape))


def _widest(bounds: Bounds, k: int) -> int:
    """The most values per example of a node a backward pass from node ``k`` goes through."""
    return max(v.lower[0].numel() for v in bounds.values[: k + 1] if isinstance(v, Box))


def _wanted(graph: Graph, readers: list[int], box: Box) -> Tensor | None:
    """``(B, N)``: the neurons whose bounds change a relaxation of a reader (None: none)."""
    masks = [graph.nodes[r].op.needs_tightening(box) for r in readers]
    masks = [mask for mask in masks if mask is not None]
    return torch.stack(masks).any(0).flatten(1) if masks else None


def intersect(box: Box, other: Box) -> Box:
    """The values both boxes hold (empty where ``lower > upper``)."""
    return Box(torch.maximum(box.lower, other.lower), torch.minimum(box.upper, other.upper))


def split_box(box: Box, signs: Tensor) -> Box:
    """``box`` within a branch-and-bound domain: where ``signs`` is +1 the value is >= 0, where
    -1 it is <= 0, where 0 it is free. An empty domain shows as ``lower > upper``."""
    lower = torch.where(signs > 0, box.lower.clamp(min=0), box.lower)
    upper = torch.where(signs < 0, box.upper.clamp(max=0), box.upper)
    return Box(lower, upper)


def crown_bounds(
    graph: Graph,
    budgets: dict[int, LayerBudget],
    region: InputRegion,
    intermediate: str,
    unit: float,
    splits: dict[int, Tensor] | None = None,
    reuse: tuple[Bounds, int, Tensor] | None = None,
    within: dict[int, Box] | None = None,
) -> Bounds:
    """Every node's Box: IBP, tightened by CROWN at the inputs of relaxed operators.
    ``splits``: per node, the sign each of its values is held to (``split_box``), the cases
    of a branch-and-bound domain. ``reuse``: the bounds of the unsplit examples, the last
    node they still hold for (every split is at or after it) and each domain's example: those
    nodes are copied instead of recomputed.
    ``within``: per node, a box known to hold it (a parent domain's), intersected with the
    one computed."""
    bounds = Bounds.start(graph, region, unit)
    exact = _exact_nodes(graph, region)
    readers = _relaxed_inputs(graph)
    splits, within = splits or {}, within or {}
    first = ForwardPass(graph, region) if intermediate == "crown" and FIRST_PASS else None
    if first is not None and not uses_forward(graph):
        first = None
    # the last node CROWN may tighten: the first pass has nothing to give after it
    last = max((i for i in readers if i not in exact), default=-1)

    def narrowed(index: int, box: Box) -> Box:
        if index in within:
            box = intersect(box, within[index])
        return split_box(box, splits[index]) if index in splits else box

    for node in graph.nodes[1:]:
        if bounds.fixed(graph, node):
            continue
        if reuse is not None and node.index <= reuse[1]:
            bounds.copy_node(reuse[0], node.index, reuse[2])
            bounds.set(node.index, narrowed(node.index, bounds.values[node.index]))
            continue
        box = narrowed(node.index, node_box(graph, budgets, node.index, bounds))
        bounds.set(node.index, box)
        relaxed = node.index in readers and node.index not in exact
        if first is not None and node.index <= last:  # CROWN only where it leaves work
            found = first.step(bounds, node.index, relaxed)
            if found is not None:
                box = narrowed(node.index, intersect(box, found))
                bounds.set(node.index, box)
        if intermediate == "crown" and relaxed:
            _tighten_node(
                graph, region, bounds, node.index, readers[node.index], first is not None, narrowed
            )
    return bounds


def _tighten_node(
    graph: Graph,
    region: InputRegion,
    bounds: Bounds,
    k: int,
    readers: list[int],
    one_side_first: bool,
    narrowed: Callable[[int, Box], Box],
) -> None:
    """CROWN bounds for the neurons of node ``k`` whose bounds change a relaxation of its
    ``readers``, its Box updated in ``bounds``. ``one_side_first``: first the bound on the side
    nearer zero (the one that may settle the neuron's sign), then the other side for the
    neurons still wanted; else both at once."""
    box: Box = bounds.values[k]
    wanted = _wanted(graph, readers, box)
    if wanted is None:
        return
    if not one_side_first:
        bounds.set(k, narrowed(k, _tighten(graph, region, bounds, k, wanted, wanted)))
        return
    lower_first = (-box.lower <= box.upper).flatten(1)
    box = narrowed(
        k, _tighten(graph, region, bounds, k, wanted & lower_first, wanted & ~lower_first)
    )
    bounds.set(k, box)
    still = _wanted(graph, readers, box)
    if still is not None:
        still = still & wanted
        box = narrowed(
            k, _tighten(graph, region, bounds, k, still & ~lower_first, still & lower_first)
        )
        bounds.set(k, box)


def crown_margins(
    graph: Graph,
    budgets: dict[int, LayerBudget],
    region: InputRegion,
    c: Tensor,
    intermediate: str,
    unit: float,
) -> tuple[Tensor, Tensor]:
    """``(CROWN, IBP)`` lower bounds ``(B, K)`` of ``c . logits`` (IBP in margin form comes
    almost free from the same boxes)."""
    bounds = crown_bounds(graph, budgets, region, intermediate, unit)
    out = graph.output
    crown = backward(graph, region, bounds, c, out)
    ibp = backward(graph, region, bounds, c, out, relax=False)
    return crown, ibp


def is_relu(node: Node) -> bool:
    """A ReLU of the model, whose slopes alpha-CROWN optimizes and whose input bab splits."""
    op = node.op
    return node.kind == VARIABLE and isinstance(op, Elementwise) and op.act.kind == "relu"


def crown_slopes(box: Box, k: int) -> Tensor:
    """CROWN's own lower slopes for a ReLU whose input lies in ``box``, one copy per output
    row: ``(B, k, *shape)``, where alpha-CROWN's optimization starts."""
    return relu_lower_slopes(box)[:, None].expand(-1, k, *box.shape[1:])


def relu_slopes(graph: Graph, bounds: Bounds, k: int, start: int) -> dict[int, Tensor]:
    """Trainable lower slopes, ``(B, K, *shape)`` from CROWN's choice, for every ReLU node
    before ``start`` with an unstable neuron."""
    slopes = {}
    for node in graph.nodes[1 : start + 1]:
        if not is_relu(node) or node.index not in graph.valued:
            continue
        (ref,) = node.box_refs
        box: Box = bounds.values[ref]
        if not ((box.lower < 0) & (box.upper > 0)).any():
            continue
        slopes[node.index] = crown_slopes(box, k).clone().requires_grad_(True)
    return slopes


def optimized_bound(
    graph: Graph,
    region: InputRegion,
    bounds: Bounds,
    c: Tensor,
    slopes: dict[int, Tensor],
    betas: dict[int, tuple[Tensor, Tensor]] | None = None,
    steps: int = ALPHA_STEPS,
    done: Callable[[Tensor], bool] | None = None,
    record: dict[int, Tensor] | None = None,
) -> Tensor:
    """The best lower bound ``(B, K)`` of ``c . logits`` over projected Adam steps on the ReLU
    lower ``slopes`` (kept in [0, 1]) and the split multipliers ``betas`` (kept >= 0), starting
    from their given values: any such values give a sound bound, so the best met at any step
    is kept. ``done(best)`` stops early; ``record`` is filled as ``backward`` fills it, at the
    last values evaluated. Both are updated in place."""
    out = graph.output
    params = list(slopes.values()) + [beta for beta, _ in (betas or {}).values()]
    if not params:
        return backward(graph, region, bounds, c, out, record=record)
    optimizer = torch.optim.Adam(params, lr=ALPHA_LR)
    best = None
    for step in range(steps + 1):
        with torch.enable_grad():
            bound = backward(
                graph, region, bounds, c, out, slopes=slopes, betas=betas, record=record
            )
            best = bound.detach() if best is None else torch.maximum(best, bound.detach())
            if step == steps or (done is not None and done(best)):
                break
            optimizer.zero_grad()
            (-bound.sum()).backward()
        optimizer.step()
        with torch.no_grad():
            for value in slopes.values():
                value.clamp_(0.0, 1.0)
            for beta, _ in (betas or {}).values():
                beta.clamp_(min=0.0)
    if record is not None:
        for key, value in record.items():
            record[key] = value.detach()
    return best  # type: ignore[return-value]


def alpha_crown_margins(
    graph: Graph,
    budgets: dict[int, LayerBudget],
    region: InputRegion,
    c: Tensor,
    intermediate: str,
    unit: float,
    steps: int = ALPHA_STEPS,
) -> tuple[Tensor, Tensor]:
    """``(alpha-CROWN, IBP)`` lower bounds ``(B, K)`` of ``c . logits``: CROWN whose ReLU
    lower slopes (one per neuron, per example and per output row) are optimized by projected
    gradient ascent on the bound itself (``optimized_bound``), until every margin is
    certified. Intermediate bounds are CROWN's (or IBP's), not optimized."""
    bounds = crown_bounds(graph, budgets, region, intermediate, unit)
    ibp = backward(graph, region, bounds, c, graph.output, relax=False)
    slopes = relu_slopes(graph, bounds, c.shape[1], graph.output)

    def certified(best: Tensor) -> bool:
        return bool((best.maximum(ibp) > 0).all())

    best = optimized_bound(graph, region, bounds, c, slopes, steps=steps, done=certified)
    return best, ibp
