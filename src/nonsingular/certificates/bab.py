"""Branch and bound over unstable ReLUs, for joint input and weight threats.

Each example is first attacked (a strong PGD: an example it breaks is *broken*, and the attack
holds the counterexample: an input and per-example weights that replay on the unmodified
model) and bounded by CROWN. For an example neither settles, the input space is split into
domains by the sign of an unstable ReLU's input, the neuron whose relaxation costs the worst
margin's bound most (BaBSR's intercept score). A domain starts from its parent: its boxes
(later nodes bounded by IBP within them), its ReLU slopes and split multipliers (a few
projected gradient steps on from there: alpha- and beta-CROWN), and its margin bounds (only
those not yet proved are bounded again). The open domains of every example wait in one queue,
and each bound pass takes the worst-bounded of every open example alike (one pass for many
domains, of many examples: large enough for a GPU). An example is *certified* when none of
its domains is left, *unknown* at its time limit (its share of the passes' time) or where a
domain has no unstable neuron left to split (a few multiplier steps need not reach the exact
bound of a fully split domain).

Soundness: every domain's bound is CROWN's over boxes that hold every point of the domain, for
slopes in [0, 1] and multipliers >= 0; a parent's bound holds in its children; and the domains
of a split cover the parent (a value is <= 0 or >= 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..attacks import AttackResult, attack
from ..attacks.space import check_domain
from ..checks import integer, number
from ..model.graph import Graph
from ..model.lemma import LayerBudget, nonnegative_nodes, perturbed_layers
from ..model.operators.base import Box
from ..model.verify import read_batch, with_gradients
from ..threat import Threat
from .crown import crown_bounds, crown_slopes, is_relu, optimized_bound, split_box
from .crown_engine import Bounds, margin_matrix
from .options import BAB_SECONDS
from .region import InputRegion
from .rounding import certificate_unit, check_bound_dtype, exact_products

STATUSES = CERTIFIED, BROKEN, UNKNOWN = ("certified", "broken", "unknown")
ROOT_STEPS = 20  # gradient steps on the example's own slopes before any split
OPTIMIZE_STEPS = 3  # gradient steps on each batch of domains' slopes and multipliers
LEAF_STEPS = 200  # gradient steps on the multipliers of a domain with nothing left to split


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
        return torch.tensor([s == CERTIFIED for s in self.status], dtype=torch.bool)

    @property
    def broken(self) -> Tensor:
        return torch.tensor([s == BROKEN for s in self.status], dtype=torch.bool)

    @property
    def certified_accuracy(self) -> float:
        return float(self.certified.float().mean()) if self.status else 0.0


def _relu_inputs(graph: Graph) -> dict[int, int]:
    """Every ReLU node whose value reaches the output, with the node it reads: where domains
    are split (a ReLU read only for its shape costs the bound nothing)."""
    return {
        node.index: node.box_refs[0]
        for node in graph.nodes
        if is_relu(node) and node.index in graph.valued
    }


@dataclass
class _Open:
    """Open domains, one row each: the example it is a part of, the sign each split node's
    values are held to, the boxes known for the split nodes, the warm starts of the ReLU slopes
    and split multipliers (one per margin), the margins' lower bounds (+inf for the label's
    own), and each neuron's branching score (flat, over the split nodes in order)."""

    example: Tensor
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
            self.example[index],
            {k: v[index] for k, v in self.splits.items()},
            {k: Box(b.lower[index], b.upper[index]) for k, b in self.boxes.items()},
            {k: v[index] for k, v in self.slopes.items()},
            {k: v[index] for k, v in self.betas.items()},
            self.lower[index],
            self.scores[index],
        )

    def cat(self, other: _Open) -> _Open:
        return _Open.join([self, other])

    @staticmethod
    def join(parts: list[_Open]) -> _Open:
        """The rows of every part, in order, in one copy."""
        first = parts[0]
        return _Open(
            torch.cat([p.example for p in parts]),
            {k: torch.cat([p.splits[k] for p in parts]) for k in first.splits},
            {
                k: Box(
                    torch.cat([p.boxes[k].lower for p in parts]),
                    torch.cat([p.boxes[k].upper for p in parts]),
                )
                for k in first.boxes
            },
            {k: torch.cat([p.slopes[k] for p in parts]) for k in first.slopes},
            {k: torch.cat([p.betas[k] for p in parts]) for k in first.betas},
            torch.cat([p.lower for p in parts]),
            torch.cat([p.scores for p in parts]),
        )


def _relu_scores(lower: Tensor, upper: Tensor, lam: Tensor) -> Tensor:
    """What a ReLU's upper line costs the bound on the worst margin, per neuron (``lam``: the
    coefficients reaching the ReLU on that margin's row): ``-lam u (-l) / (u - l)`` where
    ``lam < 0`` (BaBSR's intercept score), plus a small share of the relaxation's area as a
    tie-break."""
    area = -lower * upper / (upper - lower).clamp_min(1e-30)
    return (-lam).clamp(min=0) * area + 1e-4 * lam.abs() * area


def _chord_scores(lower: Tensor, upper: Tensor, budget: LayerBudget, lam: Tensor) -> Tensor:
    """What the chord above ``|h|`` costs the bound on the worst margin, per input of a
    perturbed dense layer (``lam``: the coefficients reaching the layer's output on that row):
    ``g_j (-2 l u / (u - l))``, the chord's offset at 0 times ``g = |lam| R`` (the weight
    term, ``LayerBudget.weight_terms``), which a split of the input at 0 removes."""
    radius = budget.weight_radius
    if radius.dim() == 0:
        g = radius * lam.abs().sum(-1, keepdim=True)
    else:
        g = lam.abs() @ radius.expand_as(budget.weight)
    return g * 2 * (-lower * upper / (upper - lower).clamp_min(1e-30))


def _branch_scores(
    nodes: list[int],
    relus: dict[int, int],
    weighted: dict[int, int],
    budgets: dict[int, LayerBudget],
    boxes: dict[int, Box],
    splits: dict[int, Tensor],
    lams: dict[int, Tensor],
    row: Tensor,
) -> Tensor:
    """Per domain and free value of a split node (an unstable ReLU's input, or an input of
    both signs of a perturbed dense layer, ``weighted``: layer -> input), what its relaxation
    costs the bound on the worst margin (``row``): the larger of the two where a value is
    both; -1 where nothing is left to split. Flat over ``nodes`` in order."""
    every = torch.arange(len(row), device=row.device)
    found = {}
    for k in nodes:
        lower, upper = boxes[k].lower.flatten(1), boxes[k].upper.flatten(1)
        free = (splits[k].flatten(1) == 0) & (lower < 0) & (upper > 0)
        found[k] = torch.where(free, 0.0, -1.0).to(lower.dtype)
    for relu, k in relus.items():
        lam = lams[relu][every, row].flatten(1)
        found[k] = torch.where(found[k] >= 0, _relu_scores(*_flat(boxes[k]), lam), found[k])
    for layer, k in weighted.items():
        lam = lams[layer][every, row].flatten(1)
        score = _chord_scores(*_flat(boxes[k]), budgets[layer], lam)
        found[k] = torch.where(found[k] >= 0, torch.maximum(found[k], score), found[k])
    if not nodes:
        return row.new_zeros(len(row), 0, dtype=torch.float)
    return torch.cat([found[k] for k in nodes], 1)


def _flat(box: Box) -> tuple[Tensor, Tensor]:
    return box.lower.flatten(1), box.upper.flatten(1)


def _split_region(region: InputRegion, splits: dict[int, Tensor]) -> InputRegion:
    """``region`` within a domain's splits of the model's input (node 0): its box narrowed
    to the signs held (``split_box``); the l2 ball, if any, is kept (it holds the domain)."""
    if 0 not in splits:
        return region
    box = split_box(Box(region.lower, region.upper), splits[0])
    return replace(region, lower=box.lower, upper=box.upper)


def _weight_inputs(
    graph: Graph, budgets: dict[int, LayerBudget], root: Bounds, threat: Threat
) -> dict[int, int]:
    """The perturbed dense layers whose weight term a backward pass takes linearly in their
    input (linf, one vector) with an input of both signs somewhere at the root, other than
    values the graph alone shows to be >= 0 (a ReLU's output, whose box may reach below 0 by
    a rounding term): layer -> input node (0: the model's input, split by narrowing the input
    region, ``_split_region``). Their chord above ``|h|`` is the weight term's relaxation,
    exact once the input's sign is split."""
    found = {}
    signed = threat.bounds is None or threat.bounds[0] < 0
    nonnegative = nonnegative_nodes(graph, not signed)
    for layer in root.linear:
        if layer not in graph.valued:  # read only for its shape: its weight term costs nothing
            continue
        budget = budgets[layer]
        (k, *_) = graph.nodes[layer].box_refs
        box = root.values[k]
        if k in nonnegative or not budget.linear_in_input(box.lower):
            continue
        if bool(((box.lower < 0) & (box.upper > 0)).any()):
            found[layer] = k
    return found


def _fair_share(worst: Tensor, example: Tensor, batch: int) -> Tensor:
    """Which domains to split next (positions in ``worst``, ``example``): about ``batch`` of
    them, each example's worst-bounded first, as many per example (at least one) so that every
    open example moves on."""
    order = torch.argsort(worst, stable=True)
    example = example[order]
    grouped = torch.argsort(example, stable=True)  # by example, each the worst first
    counts = torch.bincount(example)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(grouped)
    rank[grouped] = torch.arange(len(grouped), device=grouped.device) - first[example[grouped]]
    share = max(1, batch // int((counts > 0).sum()))
    return order[rank < share]


class _Queue:
    """The open domains, kept as the chunks the bound passes made, with the rows already taken
    marked: taking a few domains copies those, never the whole queue."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.chunks: list[_Open] = []
        self.alive: list[Tensor] = []

    def add(self, domains: _Open) -> None:
        if len(domains.example):
            self.chunks.append(domains)
            self.alive.append(torch.ones_like(domains.example, dtype=torch.bool))

    def summary(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every row's worst bound, example and whether it is still in the queue."""
        if not self.chunks:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty.float(), empty, empty.bool()
        return (
            torch.cat([c.worst for c in self.chunks]),
            torch.cat([c.example for c in self.chunks]),
            torch.cat(self.alive),
        )

    def take(self, index: Tensor) -> _Open:
        """The rows at ``index`` (positions in ``summary``, at least one), out of the queue."""
        parts = []
        start = 0
        for chunk, alive in zip(self.chunks, self.alive, strict=True):
            size = len(chunk.example)
            mine = index[(index >= start) & (index < start + size)] - start
            if len(mine):
                parts.append(chunk.rows(mine))
                alive[mine] = False
            start += size
        return _Open.join(parts)

    def compact(self, most: int = 64) -> None:
        """Chunks with no row left go; beyond ``most`` chunks, the smaller half of them (by
        rows left) become one."""
        kept = [i for i, alive in enumerate(self.alive) if bool(alive.any())]
        self.chunks = [self.chunks[i] for i in kept]
        self.alive = [self.alive[i] for i in kept]
        if len(self.chunks) > most:
            sizes = [int(alive.sum()) for alive in self.alive]
            small = sorted(range(len(sizes)), key=sizes.__getitem__)[: len(sizes) // 2]
            merged = _Open.join(
                [self.chunks[i].rows(self.alive[i].nonzero().flatten()) for i in small]
            )
            rest = [i for i in range(len(sizes)) if i not in set(small)]
            self.chunks = [self.chunks[i] for i in rest] + [merged]
            self.alive = [self.alive[i] for i in rest] + [
                torch.ones_like(merged.example, dtype=torch.bool)
            ]


class _Domains:
    """Branch-and-bound for a batch of examples: the graph, threat, and every example's open
    domains, bounded together (one bound pass for domains of many examples)."""

    def __init__(
        self,
        graph: Graph,
        budgets: dict[int, LayerBudget],
        x: Tensor,
        y: Tensor,
        threat: Threat,
        unit: float,
        classes: int,
        weight_splits: bool = True,
    ) -> None:
        self.graph, self.budgets, self.x, self.y = graph, budgets, x, y
        self.threat, self.unit, self.classes = threat, unit, classes
        self.weight_splits = weight_splits
        self.relus = _relu_inputs(graph)
        self.weighted: dict[int, int] = {}  # layer -> input split at 0 (set by start())
        self.nodes = list(self.relus.values())  # every split node, in graph order
        self.bounded = torch.zeros(len(x), dtype=torch.long, device=x.device)  # per example
        self.spent = torch.zeros(len(x), dtype=torch.float64)  # seconds, per example
        self.root: Bounds  # the bounds at the root, set by start()

    def bound(self, domains: _Open, steps: int) -> _Open:
        """The domains bounded again: their boxes (within the given ones), and the margins
        they have not yet proved, by slopes and multipliers optimized from the given ones (a
        parent's bound holds in its children, so the better of the two is kept)."""
        xs = self.x[domains.example]
        region = _split_region(InputRegion.from_threat(xs, self.threat), domains.splits)
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
            (self.root, first, domains.example),
            domains.boxes,
        )
        todo = domains.lower <= 0
        m = max(1, int(todo.sum(1).max()))  # at least one row: shapes stay whole
        rows = torch.argsort(todo.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
        valid = todo.gather(1, rows)
        c = margin_matrix(self.y[domains.example], self.classes, xs.dtype)

        def at_rows(t: Tensor) -> Tensor:  # ``rows`` as an index into dim 1 of ``t``
            return rows.reshape(*rows.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])

        def picked(t: Tensor) -> Tensor:
            return t.gather(1, at_rows(t))

        slopes = {k: picked(v).requires_grad_(True) for k, v in domains.slopes.items()}
        betas = {k: (picked(v).requires_grad_(True), splits[k]) for k, v in domains.betas.items()}
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
        self.bounded += torch.bincount(domains.example, minlength=len(self.x))

        def put(t: Tensor, new: Tensor) -> Tensor:
            return t.scatter(1, at_rows(t), new.detach())

        worst_row = torch.where(valid, found, float("inf")).argmin(1)
        return _Open(
            domains.example,
            splits,
            boxes,
            {k: put(v, slopes[k]) for k, v in domains.slopes.items()},
            {k: put(v, betas[k][0]) for k, v in domains.betas.items()},
            lower,
            self.scores(boxes, splits, record, worst_row),
        )

    def scores(
        self, boxes: dict[int, Box], splits: dict[int, Tensor], lams: dict[int, Tensor], row: Tensor
    ) -> Tensor:
        """Every domain's branching scores (``_branch_scores``) over this pool's split nodes."""
        return _branch_scores(
            self.nodes, self.relus, self.weighted, self.budgets, boxes, splits, lams, row
        )

    def bound_alike(self, domains: _Open, steps: int) -> _Open:
        """``bound``, one pass for the domains with about as many margins left to prove (1, 2,
        3-4, 5-8, ...): a pass bounds as many margins for each of its domains as the one with
        the most needs."""
        todo = (domains.lower <= 0).sum(1).clamp(min=1)
        group = torch.ceil(torch.log2(todo.double())).long()
        parts = [
            self.bound(domains.rows((group == g).nonzero().flatten()), steps)
            for g in torch.unique(group).tolist()
        ]
        return _Open.join(parts)

    def start(self, known: Tensor) -> _Open:
        """Each example as one domain, bounded with ``ROOT_STEPS`` from CROWN's slopes, where
        ``known`` ``(B, K)`` (its margins' lower bounds so far, ``+inf`` at the label) is not
        positive."""
        region = InputRegion.from_threat(self.x, self.threat)
        bounds = crown_bounds(self.graph, self.budgets, region, "crown", self.unit)
        self.root = bounds
        if self.weight_splits:
            self.weighted = _weight_inputs(self.graph, self.budgets, bounds, self.threat)
            self.nodes = sorted(set(self.relus.values()) | set(self.weighted.values()))
        k = self.classes
        splits, betas = {}, {}
        for n in self.nodes:
            box = bounds.values[n]
            splits[n] = torch.zeros(box.shape, dtype=torch.int8, device=self.x.device)
            if n != 0:  # the input's splits narrow the region itself: no multiplier
                betas[n] = self.x.new_zeros(len(self.x), k, *box.shape[1:])
        slopes = {relu: crown_slopes(bounds.values[n], k) for relu, n in self.relus.items()}
        every = torch.arange(len(self.x), device=self.x.device)
        lower = known.to(self.x.dtype).reshape(len(self.x), k)
        one = _Open(every, splits, {}, slopes, betas, lower, self.x.new_zeros(len(self.x), 1))
        return self.bound(one, ROOT_STEPS)

    def leaves(self, made: _Open) -> _Open:
        """``made`` with its unproved domains that have nothing left to split bounded again
        with ``LEAF_STEPS`` multiplier steps from where they are: with every ReLU fixed and
        every weight term's input of one sign, the domain is a linear program (linf dense
        layers), whose Lagrangian bound these steps approach."""
        leaf = (made.worst <= 0) & ~_splittable(made)
        if not bool(leaf.any()):
            return made
        rest = made.rows((~leaf).nonzero().flatten())
        return rest.cat(self.bound_alike(made.rows(leaf.nonzero().flatten()), LEAF_STEPS))

    def children(self, parents: _Open) -> _Open:
        """Each domain split in two at its best-scored neuron (every one must have one): the
        <= 0 halves, then the >= 0."""
        chosen = parents.scores.argmax(1)
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

    def solve(self, known: Tensor, time_limit: float, batch: int) -> tuple[list[str], Tensor]:
        """Per example: certified, or unknown after ``time_limit`` seconds (each round's time
        shared among its examples by their domains) or when a domain is stuck; with a lower
        bound ``(B, K)`` on every margin, at least ``known``: the worst over its domains."""
        count = len(self.x)
        status = [UNKNOWN] * count
        active = torch.ones(count, dtype=torch.bool, device=self.x.device)
        floor = known.new_full((count, self.classes), float("inf")).to(self.x.dtype)
        queue = _Queue(self.x.device)

        def settle(made: _Open) -> None:  # proved rows leave, a stuck one ends its example
            nonlocal floor
            made = self.leaves(made)
            proved = made.worst > 0
            floor = _fold(floor, made.rows(proved.nonzero().flatten()))
            stuck = ~proved & ~_splittable(made)
            active[made.example[stuck]] = False
            queue.add(made.rows((~proved).nonzero().flatten()))

        started = time.perf_counter()
        settle(self.start(known))
        self.spent += (time.perf_counter() - started) / count
        while True:
            started = time.perf_counter()
            worst, example, alive = queue.summary()
            left = torch.bincount(example[alive], minlength=count) > 0
            for i in (active & ~left).nonzero().flatten().tolist():
                status[i] = CERTIFIED
            active &= left & (self.spent <= time_limit).to(active.device)
            gone = alive & ~active[example]
            if bool(gone.any()):
                floor = _fold(floor, queue.take(gone.nonzero().flatten()))
            if not bool(active.any()):
                return status, floor
            open_ = (alive & ~gone).nonzero().flatten()
            take = open_[_fair_share(worst[open_], example[open_], batch)]
            settle(self.bound_alike(self.children(queue.take(take)), OPTIMIZE_STEPS))
            queue.compact()
            share = torch.bincount(example[take], minlength=count).double().cpu()
            self.spent += (time.perf_counter() - started) * share / share.sum()


def _splittable(domains: _Open) -> Tensor:
    """(D,) bool: whether a free value is left to split in each domain."""
    padded = torch.cat([domains.scores, domains.scores.new_full((len(domains.worst), 1), -1.0)], 1)
    return padded.amax(1) >= 0


def _fold(floor: Tensor, domains: _Open) -> Tensor:
    """``floor`` (B, K) lowered to each of ``domains``' margin bounds, at its example."""
    if len(domains.example) == 0:
        return floor
    index = domains.example[:, None].expand_as(domains.lower)
    return floor.scatter_reduce(0, index, domains.lower, reduce="amin")


@with_gradients
def bab(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    time_limit: float = BAB_SECONDS,
    batch: int = 1024,
    steps: int = 100,
    restarts: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    weight_splits: bool = True,
) -> BabResult:
    """Branch and bound on every example of ``(x, y)``: certified, broken (with the attack's
    counterexample) or unknown after ``time_limit`` seconds of its own. ``batch``: domains
    bounded together, shared among the examples still open; ``steps``, ``restarts``: the PGD
    attack that runs first (per loss, cross entropy and margin). An example whose values may
    overflow (CROWN's bound ``-inf``) is unknown at once. ``weight_splits``: also split inputs
    of both signs of perturbed dense layers (their weight term's chord); False: ReLUs only."""
    number("time_limit", time_limit, 0.0, 1e9)
    integer("batch", batch, 1, 1 << 20)
    check_bound_dtype(dtype)
    if isinstance(threat, Threat) and threat.flips:  # bit flips: enumerate the single flips
        from ..flips.certify import flip_bab

        return flip_bab(model, x, y, threat, time_limit=time_limit)
    from . import certify  # the package's entry point, which imports this module

    found = attack(model, x, y, threat, steps=steps, restarts=restarts, loss="both", seed=seed)
    graph, x, y, logits = read_batch(model, x, y)
    check_domain(x, threat)
    classes = logits.shape[1]
    bound_graph = graph.cast(dtype)
    unit = certificate_unit(logits.dtype, x.device, dtype)
    budgets = {b.index: b for b in perturbed_layers(bound_graph, threat)}
    root = certify(model, x, y, threat, "crown", dtype=dtype)
    broken = found.margins.to(root.worst.device) <= 0
    status = [
        BROKEN if b else CERTIFIED if c else UNKNOWN
        for b, c in zip(broken.tolist(), root.certified.tolist(), strict=True)
    ]
    lower = root.lower.clone()
    domains = torch.zeros(len(x), dtype=torch.long)
    seconds = torch.zeros(len(x), dtype=torch.float64)
    # CROWN's bound is -inf only where a value may overflow: no split can help there
    open_ = ~broken & ~root.certified & (root.worst > -float("inf"))
    hard = open_.nonzero().flatten()
    if len(hard):
        xs, pick = x[hard].to(dtype), (threat, unit, classes, weight_splits)
        pool = _Domains(bound_graph, budgets, xs, y[hard], *pick)
        with torch.no_grad(), exact_products():
            settled, bound = pool.solve(lower[hard], time_limit, batch)
        for i, outcome in zip(hard.tolist(), settled, strict=True):
            status[i] = outcome
        lower[hard] = bound.to(lower.dtype)
        domains[hard.cpu()] = pool.bounded.cpu()
        seconds[hard.cpu()] = pool.spent
    return BabResult(status, lower, domains, seconds, found, threat)
