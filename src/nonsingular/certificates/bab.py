"""Branch and bound over unstable ReLUs, for joint input and weight threats.

Each example is first attacked (a strong PGD: an example it breaks is *broken*, and the attack
holds the counterexample: an input and per-example weights that replay on the unmodified
model) and bounded by CROWN. For an example neither settles, the input space is split into
domains by the sign of an unstable ReLU's input: in each domain that neuron is linear, the
later bounds tighten, and a domain whose every margin bound is positive is proved. Domains
are kept in a queue, the worst bound first, and bounded in batches (one bound pass for many
domains). The example is *certified* when no domain is left, *unknown* at its time limit or
where a domain has no unstable neuron left to split (with weights perturbed the network is not
piecewise linear, so splitting every ReLU need not close the gap).

Soundness: every domain's bound is CROWN's over the domain's boxes, which hold every point of
the domain, and the domains of a split cover the parent (a value is <= 0 or >= 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attacks import AttackResult, attack
from ..attacks.space import check_domain
from ..checks import integer, number
from ..model.graph import Graph
from ..model.lemma import LayerBudget, perturbed_layers
from ..model.operators.base import Box
from ..model.verify import read_batch
from ..threat import Threat
from .crown import crown_bounds, is_relu, optimized_bound, relu_slopes
from .linear import Bounds, margin_matrix
from .region import InputRegion
from .rounding import certificate_unit, exact_products

STATUSES = ("certified", "broken", "unknown")
OPTIMIZE_STEPS = 10  # gradient steps on each batch of domains' slopes and multipliers


def _optimized(
    graph: Graph,
    region: InputRegion,
    bounds: Bounds,
    c: Tensor,
    splits: dict[int, Tensor],
    steps: int,
) -> Tensor:
    """The domains' margin bounds ``(D, K)``, optimized over the ReLU lower slopes
    (alpha-CROWN) and the split constraints' multipliers (beta-CROWN)."""
    slopes = relu_slopes(graph, bounds, c.shape[1], graph.output)
    betas = {
        k: (c.new_zeros(v.shape[0], c.shape[1], *v.shape[1:]).requires_grad_(True), v)
        for k, v in splits.items()
        if bool((v != 0).any())
    }
    return optimized_bound(graph, region, bounds, c, slopes, betas, steps)


@dataclass
class BabResult:
    """Per example: ``status`` (certified, broken or unknown), the domains bounded, and the
    attack that ran first (``attack.replay(model, i)`` reproduces a broken example's
    counterexample on the unmodified model)."""

    status: list[str]
    domains: Tensor
    seconds: Tensor
    attack: AttackResult
    threat: Threat

    @property
    def certified(self) -> Tensor:
        return torch.tensor([s == "certified" for s in self.status], dtype=torch.bool)

    @property
    def broken(self) -> Tensor:
        return torch.tensor([s == "broken" for s in self.status], dtype=torch.bool)

    @property
    def certified_accuracy(self) -> float:
        return float(self.certified.float().mean()) if self.status else 0.0


def _relu_inputs(graph: Graph) -> list[int]:
    """The nodes read by a ReLU: where domains are split."""
    found = []
    for node in graph.nodes:
        if is_relu(node):
            found += [r for r in node.box_refs if r not in found]
    return found


class _Domains:
    """Branch-and-bound for one example: its graph, threat and the queue of open domains."""

    def __init__(
        self,
        graph: Graph,
        budgets: dict[int, LayerBudget],
        x: Tensor,
        y: Tensor,
        threat: Threat,
        unit: float,
        classes: int,
    ) -> None:
        self.graph, self.budgets, self.x, self.y = graph, budgets, x, y
        self.threat, self.unit, self.classes = threat, unit, classes
        self.nodes = _relu_inputs(graph)
        self.bounded = 0
        self.root: Bounds | None = None  # the unsplit example's bounds

    def bound(self, splits: dict[int, Tensor]) -> tuple[Tensor, dict[int, Box]]:
        """The worst margin bound of each domain (+inf for an empty one), and its boxes at the
        split nodes."""
        count = next(iter(splits.values())).shape[0]
        xs = self.x.expand(count, *self.x.shape[1:])
        region = InputRegion.from_threat(xs, self.threat)
        reuse = None
        if self.root is not None:  # every node before the first split holds as at the root
            first = min(
                (k for k in self.nodes if bool((splits[k] != 0).any())), default=self.graph.output
            )
            reuse = (self.root, first)
        bounds = crown_bounds(self.graph, self.budgets, region, "crown", self.unit, splits, reuse)
        if self.root is None:
            self.root = bounds
        ys = self.y.expand(count)
        c = margin_matrix(ys, self.classes, xs.dtype)
        lower = _optimized(self.graph, region, bounds, c, splits, OPTIMIZE_STEPS)
        lower = lower.scatter(1, ys[:, None], float("inf"))
        worst = lower.min(1).values
        boxes = {k: bounds.values[k] for k in self.nodes}
        empty = torch.zeros(count, dtype=torch.bool, device=xs.device)
        for box in boxes.values():
            empty |= (box.lower > box.upper).flatten(1).any(1)
        self.bounded += count
        return torch.where(empty, float("inf"), worst), boxes

    def branch(self, splits: dict[int, Tensor], boxes: dict[int, Box]) -> Tensor:
        """For each domain, the flat index (over the split nodes, in order) of the unstable
        free neuron with the largest relaxation area ``-l u / (u - l)``; -1 where none is."""
        scores = []
        for k in self.nodes:
            box = boxes[k]
            lower, upper = box.lower.flatten(1), box.upper.flatten(1)
            free = (splits[k].flatten(1) == 0) & (lower < 0) & (upper > 0)
            area = -lower * upper / (upper - lower).clamp_min(1e-30)
            scores.append(torch.where(free, area, -1.0))
        flat = torch.cat(scores, 1)
        best, where = flat.max(1)
        return torch.where(best > 0, where, -1)

    def children(self, splits: dict[int, Tensor], chosen: Tensor) -> dict[int, Tensor]:
        """Each domain split in two at its chosen neuron: the <= 0 halves, then the >= 0."""
        out = {}
        offset = 0
        rows = torch.arange(len(chosen), device=chosen.device)
        for k in self.nodes:
            signs = splits[k].flatten(1)
            size = signs.shape[1]
            here = (chosen >= offset) & (chosen < offset + size)
            low, high = signs.clone(), signs.clone()
            column = (chosen - offset).clamp(0, size - 1)
            low[rows[here], column[here]] = -1
            high[rows[here], column[here]] = 1
            out[k] = torch.cat([low, high]).reshape(-1, *splits[k].shape[1:])
            offset += size
        return out

    def solve(self, deadline: float, batch: int) -> str:
        """certified, or unknown at ``deadline`` (``time.perf_counter``) or when stuck."""
        with torch.no_grad():
            values = self.graph.values(self.x)
        splits = {k: torch.zeros_like(values[k], dtype=torch.int8) for k in self.nodes}
        worst, boxes = self.bound(splits)
        while True:
            open_ = worst <= 0
            if not bool(open_.any()):
                return "certified"
            if time.perf_counter() > deadline:
                return "unknown"
            splits, boxes, worst = _rows(splits, open_), _box_rows(boxes, open_), worst[open_]
            order = torch.argsort(worst)  # the worst bound first
            take, rest = order[:batch], order[batch:]
            chosen = self.branch(_rows(splits, take), _box_rows(boxes, take))
            if bool((chosen < 0).any()):
                return "unknown"  # a domain with no unstable neuron left and a margin <= 0
            made = self.children(_rows(splits, take), chosen)
            new_worst, new_boxes = self.bound(made)
            splits = {k: torch.cat([v[rest], made[k]]) for k, v in splits.items()}
            boxes = {
                k: Box(
                    torch.cat([b.lower[rest], new_boxes[k].lower]),
                    torch.cat([b.upper[rest], new_boxes[k].upper]),
                )
                for k, b in boxes.items()
            }
            worst = torch.cat([worst[rest], new_worst])


def _rows(splits: dict[int, Tensor], index: Tensor) -> dict[int, Tensor]:
    """The split signs of the domains at ``index``."""
    return {k: v[index] for k, v in splits.items()}


def _box_rows(boxes: dict[int, Box], index: Tensor) -> dict[int, Box]:
    """The boxes of the domains at ``index``."""
    return {k: Box(b.lower[index], b.upper[index]) for k, b in boxes.items()}


def bab(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    time_limit: float = 5.0,
    batch: int = 64,
    steps: int = 100,
    restarts: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> BabResult:
    """Branch and bound on every example of ``(x, y)``: certified, broken (with the attack's
    counterexample) or unknown after ``time_limit`` seconds of its own. ``batch``: domains
    bounded together; ``steps``, ``restarts``: the PGD attack that runs first (per loss, cross
    entropy and margin)."""
    number("time_limit", time_limit, 0.0, 1e9)
    integer("batch", batch, 1, 1 << 20)
    from . import certify  # the package's entry point, which imports this module

    found = attack(model, x, y, threat, steps=steps, restarts=restarts, loss="both", seed=seed)
    graph, x, y, logits = read_batch(model, x, y)
    check_domain(x, threat)
    classes = logits.shape[1]
    bound_graph = graph.cast(dtype)
    unit = certificate_unit(logits.dtype, x.device, dtype)
    budgets = {b.index: b for b in perturbed_layers(bound_graph, threat)}
    proved = certify(model, x, y, threat, "crown", dtype=dtype).certified  # the root bound
    status, domains, seconds = [], [], []
    for i in range(len(x)):
        start = time.perf_counter()
        if float(found.margins[i]) <= 0 or bool(proved[i]):
            status.append("broken" if float(found.margins[i]) <= 0 else "certified")
            domains.append(0)
        else:
            one = _Domains(
                bound_graph, budgets, x[i : i + 1].to(dtype), y[i : i + 1], threat, unit, classes
            )
            with torch.no_grad(), exact_products():
                status.append(one.solve(start + time_limit, batch))
            domains.append(one.bounded)
        seconds.append(time.perf_counter() - start)
    return BabResult(status, torch.tensor(domains), torch.tensor(seconds), found, threat)
