"""Branch and bound over unstable ReLUs, for joint input and weight threats.

Each example is first attacked (a strong PGD: an example it breaks is *broken*, and the attack
holds the counterexample: an input and per-example weights that replay on the unmodified
model) and bounded by CROWN. For an example neither settles, the input space is split into
domains by the sign of an unstable ReLU's input, the neuron whose relaxation costs the worst
margin's bound most (BaBSR's intercept score). A domain starts from its parent: its boxes
(later nodes bounded by IBP within them), its ReLU slopes and split multipliers (a few
projected gradient steps on from there: alpha- and beta-CROWN), and its margin bounds (only
those not yet proved are bounded again). Domains are kept in a queue, the worst bound first,
and bounded in batches (one bound pass for many domains). The example is *certified* when no
domain is left, *unknown* at its time limit or where a domain has no unstable neuron left to
split (a few multiplier steps need not reach the exact bound of a fully split domain).

Soundness: every domain's bound is CROWN's over boxes that hold every point of the domain, for
slopes in [0, 1] and multipliers >= 0; a parent's bound holds in its children; and the domains
of a split cover the parent (a value is <= 0 or >= 0).
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
from ..model.operators.elementwise import relu_lower_slopes
from ..model.verify import read_batch
from ..threat import Threat
from .crown import crown_bounds, is_relu, optimized_bound
from .linear import Bounds, margin_matrix
from .region import InputRegion
from .rounding import certificate_unit, check_bound_dtype, exact_products

STATUSES = ("certified", "broken", "unknown")
ROOT_STEPS = 20  # gradient steps on the example's own slopes before any split
OPTIMIZE_STEPS = 3  # gradient steps on each batch of domains' slopes and multipliers


@dataclass
class BabResult:
    """Per example: ``status`` (certified, broken or unknown); ``lower`` ``(B, classes)``, a
    lower bound on every margin (``+inf`` at the label; the worst over the domains, or
    CROWN's where no branching ran: positive everywhere exactly where certified); the domains
    bounded, the seconds spent, and the attack that ran first (``attack.replay(model, i)``
    reproduces a broken example's counterexample on the unmodified model)."""

    status: list[str]
    lower: Tensor
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


def _relu_inputs(graph: Graph) -> dict[int, int]:
    """Every ReLU node, with the node it reads: where domains are split."""
    return {node.index: node.box_refs[0] for node in graph.nodes if is_relu(node)}


@dataclass
class _Open:
    """Open domains of one example, one row each: the sign each split node's values are held
    to, the boxes known for the split nodes, the warm starts of the ReLU slopes and split
    multipliers (one per margin), the margins' lower bounds (+inf for the label's own), and
    each neuron's branching score (flat, over the split nodes in order)."""

    splits: dict[int, Tensor]
    boxes: dict[int, Box]
    slopes: dict[int, Tensor]
    betas: dict[int, Tensor]
    lower: Tensor
    scores: Tensor

    @property
    def worst(self) -> Tensor:
        """Each domain's worst margin bound: it is proved when this is positive."""
        return self.lower.min(1).values

    def rows(self, index: Tensor) -> _Open:
        return _Open(
            {k: v[index] for k, v in self.splits.items()},
            {k: Box(b.lower[index], b.upper[index]) for k, b in self.boxes.items()},
            {k: v[index] for k, v in self.slopes.items()},
            {k: v[index] for k, v in self.betas.items()},
            self.lower[index],
            self.scores[index],
        )

    def cat(self, other: _Open) -> _Open:
        return _Open(
            {k: torch.cat([v, other.splits[k]]) for k, v in self.splits.items()},
            {
                k: Box(
                    torch.cat([b.lower, other.boxes[k].lower]),
                    torch.cat([b.upper, other.boxes[k].upper]),
                )
                for k, b in self.boxes.items()
            },
            {k: torch.cat([v, other.slopes[k]]) for k, v in self.slopes.items()},
            {k: torch.cat([v, other.betas[k]]) for k, v in self.betas.items()},
            torch.cat([self.lower, other.lower]),
            torch.cat([self.scores, other.scores]),
        )


def _intercept_scores(
    relus: dict[int, int],
    boxes: dict[int, Box],
    splits: dict[int, Tensor],
    lams: dict[int, Tensor],
    row: Tensor,
) -> Tensor:
    """Per domain and free unstable neuron, what its ReLU's upper line costs the bound on the
    worst margin (``row``): ``-lam u (-l) / (u - l)`` where ``lam < 0`` (BaBSR's intercept
    score), plus a small share of the relaxation's area as a tie-break; -1 where nothing is
    left to split. Flat over the split nodes in order."""
    scores = []
    for relu, k in relus.items():
        lower, upper = boxes[k].lower.flatten(1), boxes[k].upper.flatten(1)
        free = (splits[k].flatten(1) == 0) & (lower < 0) & (upper > 0)
        area = -lower * upper / (upper - lower).clamp_min(1e-30)
        lam = lams[relu][torch.arange(len(row)), row].flatten(1)
        score = (-lam).clamp(min=0) * area + 1e-4 * lam.abs() * area
        scores.append(torch.where(free, score, -1.0))
    return torch.cat(scores, 1) if scores else row.new_zeros(len(row), 0, dtype=torch.float)


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
        self.relus = _relu_inputs(graph)
        self.nodes = list(self.relus.values())
        self.bounded = 0
        self.root = Bounds.start(graph, InputRegion.from_threat(x, threat), unit)  # by start()

    def bound(self, domains: _Open, steps: int) -> _Open:
        """The domains bounded again: their boxes (within the given ones), and the margins
        they have not yet proved, by slopes and multipliers optimized from the given ones (a
        parent's bound holds in its children, so the better of the two is kept)."""
        count = domains.lower.shape[0]
        xs = self.x.expand(count, *self.x.shape[1:])
        region = InputRegion.from_threat(xs, self.threat)
        splits = domains.splits
        # every node before the first split holds as at the root; later ones by IBP
        first = min(
            (k for k in self.nodes if bool((splits[k] != 0).any())), default=self.graph.output
        )
        bounds = crown_bounds(
            self.graph,
            self.budgets,
            region,
            "ibp",
            self.unit,
            splits,
            (self.root, first),
            domains.boxes,
        )
        todo = domains.lower <= 0
        m = max(1, int(todo.sum(1).max()))  # at least one row: shapes stay whole
        rows = torch.argsort(todo.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
        valid = todo.gather(1, rows)
        c = margin_matrix(self.y.expand(count), self.classes, xs.dtype)

        def picked(t: Tensor) -> Tensor:
            index = rows.reshape(*rows.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])
            return t.gather(1, index)

        slopes = {k: picked(v).requires_grad_(True) for k, v in domains.slopes.items()}
        betas = {k: (picked(domains.betas[k]).requires_grad_(True), v) for k, v in splits.items()}
        record: dict[int, Tensor] = {}
        found = optimized_bound(
            self.graph, region, bounds, picked(c), slopes, betas, steps, record=record
        )
        found = torch.where(valid, found, -float("inf"))
        lower = domains.lower.scatter_reduce(1, rows, found, reduce="amax")
        boxes = {k: bounds.values[k] for k in self.nodes}
        for box in boxes.values():  # an empty domain proves every margin
            empty = (box.lower > box.upper).flatten(1).any(1)
            lower = torch.where(empty[:, None], float("inf"), lower)
        self.bounded += count

        def put(t: Tensor, new: Tensor) -> Tensor:
            index = rows.reshape(*rows.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])
            return t.scatter(1, index, new.detach())

        worst_row = torch.where(valid, found, float("inf")).argmin(1)
        return _Open(
            splits,
            boxes,
            {k: put(v, slopes[k]) for k, v in domains.slopes.items()},
            {k: put(v, betas[k][0]) for k, v in domains.betas.items()},
            lower,
            _intercept_scores(self.relus, boxes, splits, record, worst_row),
        )

    def start(self, known: Tensor) -> _Open:
        """The example as one domain, bounded with ``ROOT_STEPS`` from CROWN's slopes, where
        ``known`` ``(K,)`` (its margins' lower bounds so far, ``+inf`` at the label) is not
        positive."""
        region = InputRegion.from_threat(self.x, self.threat)
        bounds = crown_bounds(self.graph, self.budgets, region, "crown", self.unit)
        self.root = bounds
        k = self.classes
        splits, slopes, betas = {}, {}, {}
        for relu, n in self.relus.items():
            box = bounds.values[n]
            splits[n] = torch.zeros(box.shape, dtype=torch.int8, device=self.x.device)
            slopes[relu] = relu_lower_slopes(box)[:, None].expand(-1, k, *box.shape[1:])
            betas[n] = self.x.new_zeros(1, k, *box.shape[1:])
        lower = known.to(self.x.dtype).reshape(1, k)
        one = _Open(splits, {}, slopes, betas, lower, self.x.new_zeros(1, 1))
        return self.bound(one, ROOT_STEPS)

    def children(self, parents: _Open) -> _Open | None:
        """Each domain split in two at its best-scored neuron: the <= 0 halves, then the >= 0;
        None where a domain has nothing left to split."""
        if parents.scores.shape[1] == 0:
            return None  # no ReLU to split
        best, chosen = parents.scores.max(1)
        if bool((best < 0).any()):
            return None
        both = parents.cat(parents)
        rows = torch.arange(len(chosen), device=chosen.device)
        offset = 0
        for k in self.nodes:
            signs = parents.splits[k].flatten(1)
            size = signs.shape[1]
            here = (chosen >= offset) & (chosen < offset + size)
            low, high = signs.clone(), signs.clone()
            column = (chosen - offset)[here]
            low[rows[here], column] = -1
            high[rows[here], column] = 1
            both.splits[k] = torch.cat([low, high]).reshape(-1, *parents.splits[k].shape[1:])
            offset += size
        return both

    def solve(self, known: Tensor, deadline: float, batch: int) -> tuple[str, Tensor]:
        """certified, or unknown at ``deadline`` (``time.perf_counter``) or when stuck; with a
        lower bound ``(K,)`` on every margin over the whole example, at least ``known``: the
        worst over its domains, proved and open."""
        domains = self.start(known)
        floor = domains.lower.new_full(domains.lower.shape[1:], float("inf"))
        while True:
            open_ = domains.worst <= 0
            if not bool(open_.all()):
                floor = torch.minimum(floor, domains.lower[~open_].amin(0))
            if not bool(open_.any()):
                return "certified", floor
            domains = domains.rows(open_.nonzero().flatten())
            if time.perf_counter() > deadline:
                return "unknown", torch.minimum(floor, domains.lower.amin(0))
            order = torch.argsort(domains.worst)  # the worst bound first
            take, rest = order[:batch], order[batch:]
            made = self.children(domains.rows(take))
            if made is None:  # a domain with no unstable neuron left and a margin <= 0
                return "unknown", torch.minimum(floor, domains.lower.amin(0))
            domains = domains.rows(rest).cat(self.bound(made, OPTIMIZE_STEPS))


def bab(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    time_limit: float = 5.0,
    batch: int = 256,
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
    check_bound_dtype(dtype)
    from . import certify  # the package's entry point, which imports this module

    found = attack(model, x, y, threat, steps=steps, restarts=restarts, loss="both", seed=seed)
    graph, x, y, logits = read_batch(model, x, y)
    check_domain(x, threat)
    classes = logits.shape[1]
    bound_graph = graph.cast(dtype)
    unit = certificate_unit(logits.dtype, x.device, dtype)
    budgets = {b.index: b for b in perturbed_layers(bound_graph, threat)}
    root = certify(model, x, y, threat, "crown", dtype=dtype)
    lower = root.lower.clone()
    status, domains, seconds = [], [], []
    for i in range(len(x)):
        start = time.perf_counter()
        if float(found.margins[i]) <= 0 or bool(root.certified[i]):
            status.append("broken" if float(found.margins[i]) <= 0 else "certified")
            domains.append(0)
        else:
            one = _Domains(
                bound_graph, budgets, x[i : i + 1].to(dtype), y[i : i + 1], threat, unit, classes
            )
            with torch.no_grad(), exact_products():
                outcome, bound = one.solve(lower[i], start + time_limit, batch)
            status.append(outcome)
            lower[i] = bound.to(lower.dtype)
            domains.append(one.bounded)
        seconds.append(time.perf_counter() - start)
    return BabResult(status, lower, torch.tensor(domains), torch.tensor(seconds), found, threat)
