"""``evaluate``: clean, attacked and certified accuracy over a grid of joint budgets, on the
whole data set, shared among the processes of a torch.distributed group, checked like
AutoAttack checks its evaluations (``table.check``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attacks import AttackOptions, AttackResult
from ..attacks import attack as run_attack
from ..certificates import CertifyOptions
from ..certificates import certify as run_certify
from ..certificates.options import check_method
from ..checks import MAX_BATCH, integer
from ..data import Dataset, Examples, examples
from ..distributed import dealt, ranks, summed
from ..distributed import total as distributed_total
from ..errors import ConfigError, InputError
from ..model.select import Selector, selecting
from ..model.verify import with_gradients
from ..threat import Threat
from .outcomes import Outcomes
from .table import EvaluationTable, Row, check

OnAttack = Callable[[Threat, Tensor, Tensor, AttackResult], None]
DEFAULT_ATTACK = AttackOptions()


def _tensors(data: Examples) -> tuple[Tensor, Tensor]:
    """A nonsingular Dataset's test split; every other form of data whole."""
    if isinstance(data, Dataset):
        return data.x_test, data.y_test
    return examples(data)


def _batches(n: int, size: int) -> Iterable[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


@dataclass(frozen=True)
class _Plan:
    """What to do at every grid point: attack with ``attack`` (None: not at all), certify
    with each of ``methods`` and ``options``; ``on_attack`` sees every attack's result."""

    attack: AttackOptions | None
    methods: list[str]
    options: CertifyOptions
    on_attack: OnAttack | None = None
    progress: bool = False  # certify's own bar over the examples of each batch

    @property
    def columns(self) -> list[str]:
        return (["attacked"] if self.attack is not None else []) + self.methods


def _plan(
    attack: object,
    certify: Sequence[str],
    options: object,
    on_attack: OnAttack | None,
    progress: bool = False,
) -> _Plan:
    if attack is not None and not isinstance(attack, AttackOptions):
        raise ConfigError(
            f"attack must be AttackOptions (or None: certify only), got {type(attack).__name__}"
        )
    methods = [check_method(m) for m in dict.fromkeys(certify)]
    if attack is None and not methods:
        raise ConfigError("nothing to evaluate: attack=None and no certificate method")
    if on_attack is not None and not callable(on_attack):
        raise ConfigError(f"on_attack must be callable, got {type(on_attack).__name__}")
    options = CertifyOptions.of(options)  # type: ignore[arg-type]
    return _Plan(attack, methods, options, on_attack, progress)  # type: ignore[arg-type]


@with_gradients
def evaluate(
    model: nn.Module,
    data: Examples,
    grid: Sequence[Threat],
    attack: AttackOptions | None = DEFAULT_ATTACK,
    *,
    certify: Sequence[str] = (),
    certify_options: CertifyOptions | None = None,
    batch_size: int = 1000,
    progress: bool = True,
    on_attack: OnAttack | None = None,
    logits: Selector | None = None,
) -> EvaluationTable:
    """Clean, attacked and certified accuracy of ``model`` at every threat of ``grid``.

    data: a Dataset (its test split), ``(x, y)`` tensors, a ``torch.utils.data.Dataset`` or a
    ``DataLoader`` (read once, whole). attack: the attack's options (None: do
    not attack). certify: methods of ``nonsingular.certify`` to run too (``"ibp"``,
    ``"crown"``, ...), with ``certify_options``. Shared-scope points attack the whole data set
    as one batch, so one weight perturbation serves every example. In a torch.distributed
    process group, each process takes its share of the examples (a shared-scope point, all of
    them) and every process returns the whole table: the numbers are those of one process.
    ``on_attack(threat, positions, y, result)`` sees each attacked batch (``positions``: its
    examples' places in the data set), in this process (``ExampleSaver`` keeps examples).
    ``logits``: for a model returning a dict or tuple, the key or index of its logits (or a
    function of its output returning them).
    """
    grid = list(grid)
    if not grid or not all(isinstance(t, Threat) for t in grid):
        raise ConfigError("grid must be a non-empty list of Threat (see nonsingular.grid)")
    integer("batch_size", batch_size, 1, MAX_BATCH)
    plan = _plan(attack, certify, certify_options, on_attack, progress and ranks().lead)
    model = selecting(model, logits)
    x, y = _tensors(data)
    if len(x) == 0:
        raise InputError("data holds no examples")
    where = ranks()
    local = _points(model, x, y, grid, plan, batch_size, progress and where.lead)
    # one exchange at the end: no process waits for the others point by point
    rows = [
        counts.row(threat, len(x), moved_needed=plan.attack is not None)
        for counts, threat in zip(Counts.total(local), grid, strict=True)
    ]
    table = EvaluationTable(rows, plan.attack)
    table.warnings = check(table)
    return table


def _points(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    grid: list[Threat],
    plan: _Plan,
    batch_size: int,
    progress: bool,
) -> list[Counts]:
    """This process's counts at every grid point, with a progress bar (running accuracy in
    one process). Points are taken in order of budget, and the lead process attacks every
    shared-scope point, so that each continues from the results at budgets within its own
    (``_start``), with the numbers of one process."""
    where = ranks()
    share = dealt(len(x), where)  # this process's examples (all of them in one process)
    positions = torch.arange(len(x))
    bar = tqdm(total=len(grid), disable=None if progress else True, unit="point", desc="evaluate")
    local: dict[int, Counts] = {}
    shared: list[AttackResult] = []  # this process's shared-scope results so far
    for i in sorted(range(len(grid)), key=lambda k: (grid[k].eps_x, grid[k].eps_w)):
        threat = grid[i]
        if threat.scope == "shared":  # one perturbation for every example: one process's work
            if where.lead:  # all shared points in one place: each continues from the others
                args = (x, y, positions, threat, len(x), len(x), plan, _start(shared, threat))
                local[i], found = _evaluate_point(model, *args)
                shared += [found] if found is not None else []
            else:  # nothing here: the sum over processes is the owner's
                local[i] = Counts.none(len(x), plan)
        else:
            args = (x[share], y[share], positions[share], threat, batch_size, len(x), plan)
            local[i], _ = _evaluate_point(model, *args)
        bar.update(1)
        if not where.many:  # the running accuracy, where this process holds all of it
            row = local[i].row(threat, len(x), moved_needed=plan.attack is not None)
            bar.set_postfix({c: f"{row.value(c):.1%}" for c in plan.columns})
    bar.close()
    return [local[i] for i in range(len(grid))]


def _start(done: list[AttackResult], threat: Threat) -> AttackResult | None:
    """Of the shared-scope results ``done``, the one the attack at ``threat`` continues from:
    the same threat at budgets no larger, with the fewest examples surviving (None: none)."""
    within = [
        r
        for r in done
        if r.threat.replace(eps_x=threat.eps_x, eps_w=threat.eps_w) == threat
        and r.threat.eps_x <= threat.eps_x
        and r.threat.eps_w <= threat.eps_w
    ]
    return min(within, key=lambda r: r.robust_accuracy, default=None)


@dataclass
class Counts:
    """What one process found at one grid point: per example and column (``clean``,
    ``attacked``, each certificate method), 1 where the example is classified right, survives
    the attack, or is certified (``total`` sums the processes' shares into whole vectors)."""

    hits: dict[str, Tensor]
    seconds: dict[str, float]
    moved: bool = False
    unknown: dict[str, float] = field(default_factory=dict)  # per method: not reached in time

    @classmethod
    def none(cls, n: int, plan: _Plan) -> Counts:
        """Nothing found yet for ``n`` examples, with the keys ``_evaluate_point`` fills."""
        attacked = ["attack"] if plan.attack is not None else []
        return cls(
            hits={c: torch.zeros(n, dtype=torch.int32) for c in ["clean", *plan.columns]},
            seconds=dict.fromkeys(attacked + plan.methods, 0.0),
            unknown=dict.fromkeys(plan.methods, 0.0),
        )

    @staticmethod
    def total(points: list[Counts]) -> list[Counts]:
        """Every point summed over the processes, in two exchanges for the whole grid (the loss
        moved if it moved anywhere)."""
        if not points:
            return []
        hits = summed(torch.stack([torch.stack(list(c.hits.values())) for c in points]))
        values: list[float] = []
        for c in points:  # the same keys in the same order on every process
            values += [float(c.moved), *c.seconds.values(), *c.unknown.values()]
        numbers = iter(distributed_total(values))
        out = []
        for c, found in zip(points, hits, strict=True):
            moved = next(numbers) > 0
            seconds = {k: next(numbers) for k in c.seconds}
            unknown = {k: next(numbers) for k in c.unknown}
            out.append(Counts(dict(zip(c.hits, found, strict=True)), seconds, moved, unknown))
        return out

    def row(self, threat: Threat, n: int, moved_needed: bool) -> Row:
        perturbs = threat.eps_x > 0 or threat.eps_w > 0
        methods = [c for c in self.hits if c not in ("clean", "attacked")]
        found = {c: v > 0 for c, v in self.hits.items()}
        broken = ~found["attacked"] if "attacked" in found else None
        return Row(
            threat,
            n,
            int(self.hits["clean"].sum()) / n,
            int(self.hits["attacked"].sum()) / n if "attacked" in self.hits else None,
            {m: int(self.hits[m].sum()) / n for m in methods},
            self.moved or not perturbs or not moved_needed,
            {m: 0 if broken is None else int((found[m] & broken).sum()) for m in methods},
            dict(self.seconds),
            {c: Outcomes.of(v) for c, v in found.items()},
            {m: int(v) for m, v in self.unknown.items()},
        )


def _evaluate_point(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    positions: Tensor,
    threat: Threat,
    size: int,
    n: int,
    plan: _Plan,
    start: AttackResult | None = None,
) -> tuple[Counts, AttackResult | None]:
    """Attack and certify ``x`` in batches of ``size`` (``positions``: each example's place in
    the data set of ``n``, which seeds its random draws and says where its outcome goes).
    ``start``: a shared attack's result to continue from. Returns the counts and the last
    batch's attack result (a shared point's only one)."""
    counts = Counts.none(n, plan)
    res = None
    if plan.attack is None or plan.attack.method == "noise":
        start = None
    for batch in _batches(len(x), size):
        where = positions[batch]  # the examples' places in the data set
        if plan.attack is not None:
            began = time.perf_counter()
            # an example counts as broken once misclassified: attacking it on is wasted work
            res = run_attack(
                model,
                x[batch],
                y[batch],
                threat,
                plan.attack,
                positions=where,
                until_broken=True,
                start=start,
            )
            counts.seconds["attack"] += time.perf_counter() - began
            if plan.on_attack is not None:
                plan.on_attack(threat, where, y[batch], res)
            counts.hits["clean"][where] = (res.clean_margins > 0).int().cpu()
            counts.hits["attacked"][where] = (~res.success).int().cpu()
            trace = res.loss_trace
            counts.moved |= bool(trace.numel() > 1 and trace.max() > trace.min())
        for method in plan.methods:
            began = time.perf_counter()
            cert = run_certify(
                model, x[batch], y[batch], threat, method, plan.options, progress=plan.progress
            )
            counts.seconds[method] += time.perf_counter() - began
            counts.hits[method][where] = cert.certified.int().cpu()
            if cert.finished is not None:
                counts.unknown[method] += int((~cert.finished).sum())
            if plan.attack is None and method == plan.methods[0]:  # no attack: clean from bounds
                counts.hits["clean"][where] = (cert.clean_margins > 0).int().cpu()
    return counts, res
