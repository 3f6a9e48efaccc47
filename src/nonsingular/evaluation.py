"""Robust accuracy over a grid of joint budgets, with the sanity checks of an honest evaluation.

``evaluate`` attacks every grid point on the whole data set and returns a tidy table. Like
AutoAttack's checks, it looks for signs of a broken evaluation (attacked above clean, an
attack loss that never moved, accuracy rising with the budget, an example certified that the
attack broke) and reports them in the table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attacks import attack as run_attack
from .certificates import METHODS as CERTIFY_METHODS
from .certificates import certify as run_certify
from .checks import MAX_BATCH, integer, keywords
from .data import Dataset
from .distributed import dealt, ranks, summed
from .distributed import total as distributed_total
from .errors import ConfigError, InputError
from .files import write_json
from .model.verify import with_gradients
from .threat import Threat

_SET_HERE = ("model", "x", "y", "threat", "positions")  # evaluate passes these itself

Data = Dataset | tuple[Tensor, Tensor]


@dataclass
class Row:
    """One grid point: accuracies as fractions of ``n`` examples.

    ``certified`` maps a certificate method to its certified accuracy; ``unsound`` counts,
    per method, examples it certified that the attack broke (always 0 unless there is a bug).
    ``outcomes`` holds the examples one by one, in data-set order: per column (``clean``,
    ``attacked``, each method), True where the example is right, survives, or is certified;
    what paired comparisons of two models need. JSON writes each as a string of 0 and 1.
    """

    threat: Threat
    n: int
    clean: float
    attacked: float | None = None
    certified: dict[str, float] = field(default_factory=dict)
    loss_moved: bool = True
    unsound: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, Tensor] = field(default_factory=dict)

    @property
    def eps_x(self) -> float:
        return self.threat.eps_x

    @property
    def eps_w(self) -> float:
        return self.threat.eps_w

    def value(self, column: str) -> float | None:
        """``"clean"``, ``"attacked"`` or a certificate method's certified accuracy."""
        if column in ("clean", "attacked"):
            return getattr(self, column)
        return self.certified.get(column)

    def to_dict(self) -> dict[str, Any]:
        return {
            "eps_x": self.eps_x,
            "eps_w": self.eps_w,
            "n": self.n,
            "clean": self.clean,
            "attacked": self.attacked,
            "certified": dict(self.certified),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "threat": self.threat.to_dict(),
            "outcomes": {c: bits(v) for c, v in self.outcomes.items()},
        }


def bits(outcomes: Tensor) -> str:
    """Per-example outcomes as text, one ``0`` or ``1`` per example (compact, readable JSON)."""
    return "".join("1" if v else "0" for v in outcomes.tolist())


def unbits(text: str) -> list[bool]:
    """The outcomes ``bits`` wrote."""
    if set(text) - {"0", "1"}:
        raise InputError("per-example outcomes must be a string of 0 and 1")
    return [c == "1" for c in text]


@dataclass
class EvaluationTable:
    """Rows of an evaluation, the attack options used, and the warnings of the checks."""

    rows: list[Row]
    attack: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        """The certificate methods evaluated, in order."""
        return list(self.rows[0].certified) if self.rows else []

    def columns(self) -> list[str]:
        return (["attacked"] if self.attack is not None else []) + self.methods

    def accuracy(self, eps_x: float, eps_w: float, column: str = "attacked") -> float:
        """Attacked (or a method's certified) accuracy at one grid point."""
        for row in self.rows:
            if row.eps_x == eps_x and row.eps_w == eps_w:
                value = row.value(column)
                if value is None:
                    raise KeyError(f"no column {column!r} in this evaluation")
                return value
        raise KeyError(f"no grid point eps_x={eps_x}, eps_w={eps_w}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "attack": self.attack,
            "certify": self.methods,
            "warnings": self.warnings,
        }

    def save(self, path: str | os.PathLike[str], **about: Any) -> None:
        """Write the table as JSON (atomically), with ``about`` (e.g. ``world_size``) beside."""
        write_json(path, {**self.to_dict(), **about})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def matrix(self, column: str = "attacked") -> tuple[list[float], list[float], list[list]]:
        """One column as a matrix: rows eps_x, columns eps_w (None where absent)."""
        xs = sorted({r.eps_x for r in self.rows})
        ws = sorted({r.eps_w for r in self.rows})
        cells: list[list[float | None]] = [[None] * len(ws) for _ in xs]
        for r in self.rows:
            cells[xs.index(r.eps_x)][ws.index(r.eps_w)] = r.value(column)
        return xs, ws, cells

    def matrix_text(self, column: str = "attacked") -> str:
        """The matrix as aligned text: what a person reads first."""
        xs, ws, cells = self.matrix(column)
        head = ["eps_x \\ eps_w"] + [f"{w:g}" for w in ws]
        body = [
            [f"{x:g}"] + ["-" if c is None else f"{c:.1%}" for c in row]
            for x, row in zip(xs, cells, strict=True)
        ]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body]
        )

    def to_markdown(self) -> str:
        cols = self.columns()
        lines = [
            "| eps_x | eps_w | threat | clean | " + " | ".join(_label(c) for c in cols) + " |",
            "|---:|---:|---|---:|" + "---:|" * len(cols),
        ]
        for r in self.rows:
            cells = " | ".join(f"{r.value(c):.1%}" for c in cols)
            lines.append(
                f"| {r.eps_x:g} | {r.eps_w:g} | {r.threat.describe()} | {r.clean:.1%} | {cells} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        cols = self.columns()
        header = ("eps_x", "eps_w", "clean", *(_label(c) for c in cols), "threat")
        body = [
            (
                f"{r.eps_x:g}",
                f"{r.eps_w:g}",
                f"{r.clean:.1%}",
                *(f"{r.value(c):.1%}" for c in cols),
                r.threat.describe(),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths[:-1]) + "  {}"
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*row) for row in body]
        n = self.rows[0].n if self.rows else 0
        done = []
        if self.attack is not None:
            done.append("attack: " + ", ".join(f"{k}={v}" for k, v in self.attack.items()))
        if self.methods:
            done.append("certified by " + ", ".join(self.methods))
        out.append(f"{n} examples; " + "; ".join(done))
        out += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(out)


def _label(column: str) -> str:
    return column if column == "attacked" else f"cert:{column}"


def _tensors(data: Data) -> tuple[Tensor, Tensor]:
    if isinstance(data, Dataset):
        return data.x_test, data.y_test
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise InputError(
        f"data must be a nonsingular Dataset or an (x, y) pair of tensors, "
        f"got {type(data).__name__}"
    )


def _batches(n: int, size: int) -> Iterable[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


@with_gradients
def evaluate(
    model: nn.Module,
    data: Data,
    grid: Sequence[Threat],
    attack_kwargs: dict[str, Any] | None = None,
    *,
    certify: Sequence[str] = (),
    certify_kwargs: dict[str, Any] | None = None,
    attack: bool = True,
    batch_size: int = 1000,
    progress: bool = True,
) -> EvaluationTable:
    """Clean, attacked and certified accuracy of ``model`` at every threat of ``grid``.

    data: a Dataset (its test split) or ``(x, y)``. attack_kwargs: options of ``attack``
    (steps, restarts, loss, method, ...); ``attack=False`` skips attacking. certify: methods
    of ``nonsingular.certify`` to run too (``"ibp"``, ``"crown"``, ...), with ``certify_kwargs``
    (intermediate, dtype, batch_size). Shared-scope points attack the whole data set as one
    batch, so one weight perturbation serves every example. In a torch.distributed process
    group, each process takes its share of the examples (a shared-scope point, all of them)
    and every process returns the whole table: the numbers are those of one process.
    """
    grid = list(grid)
    if not grid or not all(isinstance(t, Threat) for t in grid):
        raise ConfigError("grid must be a non-empty list of Threat (see nonsingular.grid)")
    integer("batch_size", batch_size, 1, MAX_BATCH)
    methods = list(dict.fromkeys(certify))
    unknown = [m for m in methods if m not in CERTIFY_METHODS]
    if unknown:
        raise ConfigError(
            f"unknown certificate method {unknown[0]!r}; choose from {', '.join(CERTIFY_METHODS)}"
        )
    if not attack and not methods:
        raise ConfigError("nothing to evaluate: attack=False and no certificate method")
    chosen = keywords(run_attack, attack_kwargs, "attack", _SET_HERE)
    certify_kwargs = keywords(run_certify, certify_kwargs, "certify", ("method", *_SET_HERE))
    options = {"method": "pgd", "steps": 50, "restarts": 1, "loss": "ce", **chosen}
    x, y = _tensors(data)
    if len(x) == 0:
        raise InputError("data holds no examples")
    where = ranks()
    share = dealt(len(x), where)  # this process's examples (all of them in one process)
    positions = torch.arange(len(x))
    bar = tqdm(
        total=len(grid),
        disable=None if progress and where.lead else True,
        unit="point",
        desc="evaluate",
    )
    args = (options if attack else None, methods, certify_kwargs or {})
    local: list[Counts] = []
    for i, threat in enumerate(grid):
        if threat.scope == "shared":  # one perturbation for every example: one process's work
            if where.rank == i % where.world:
                local.append(_evaluate_point(model, x, y, positions, threat, len(x), len(x), *args))
            else:  # nothing here: the sum over processes is the owner's
                local.append(Counts.none(len(x), args[0], methods))
        else:
            local.append(
                _evaluate_point(
                    model, x[share], y[share], positions[share], threat, batch_size, len(x), *args
                )
            )
        bar.update(1)
        if not where.many:  # the running accuracy, where this process holds all of it
            row = local[-1].row(threat, len(x), moved_needed=attack)
            bar.set_postfix(
                {c: f"{row.value(c):.1%}" for c in ["attacked", *methods][not attack :]}
            )
    bar.close()
    # one exchange at the end: no process waits for the others point by point
    rows = [
        counts.row(threat, len(x), moved_needed=attack)
        for counts, threat in zip(Counts.total(local), grid, strict=True)
    ]
    table = EvaluationTable(rows, options if attack else None)
    table.warnings = check(table)
    return table


@dataclass
class Counts:
    """What one process found at one grid point: per example and column (``clean``,
    ``attacked``, each certificate method), 1 where the example is classified right, survives
    the attack, or is certified (``total`` sums the processes' shares into whole vectors)."""

    hits: dict[str, Tensor]
    seconds: dict[str, float]
    moved: bool = False

    @classmethod
    def none(cls, n: int, options: dict[str, Any] | None, methods: list[str]) -> Counts:
        """Nothing found yet for ``n`` examples, with the keys ``_evaluate_point`` fills."""
        attacked = ["attacked"] if options is not None else []
        return cls(
            hits={c: torch.zeros(n, dtype=torch.int32) for c in ["clean", *attacked, *methods]},
            seconds=dict.fromkeys((["attack"] if options is not None else []) + methods, 0.0),
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
            values += [float(c.moved), *c.seconds.values()]
        numbers = iter(distributed_total(values))
        out = []
        for c, found in zip(points, hits, strict=True):
            moved = next(numbers) > 0
            seconds = {k: next(numbers) for k in c.seconds}
            out.append(Counts(dict(zip(c.hits, found, strict=True)), seconds, moved))
        return out

    def row(self, threat: Threat, n: int, moved_needed: bool) -> Row:
        perturbs = threat.eps_x > 0 or threat.eps_w > 0
        methods = [c for c in self.hits if c not in ("clean", "attacked")]
        outcomes = {c: v > 0 for c, v in self.hits.items()}
        broken = ~outcomes["attacked"] if "attacked" in outcomes else None
        return Row(
            threat,
            n,
            int(self.hits["clean"].sum()) / n,
            int(self.hits["attacked"].sum()) / n if "attacked" in self.hits else None,
            {m: int(self.hits[m].sum()) / n for m in methods},
            self.moved or not perturbs or not moved_needed,
            {m: 0 if broken is None else int((outcomes[m] & broken).sum()) for m in methods},
            dict(self.seconds),
            outcomes,
        )


def _evaluate_point(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    positions: Tensor,
    threat: Threat,
    size: int,
    n: int,
    options: dict[str, Any] | None,
    methods: list[str],
    certify_kwargs: dict[str, Any],
) -> Counts:
    """Attack and certify ``x`` in batches of ``size`` (``positions``: each example's place in
    the data set of ``n``, which seeds its random draws and says where its outcome goes)."""
    counts = Counts.none(n, options, methods)
    for batch in _batches(len(x), size):
        where = positions[batch]  # the examples' places in the data set
        if options is not None:
            start = time.perf_counter()
            # an example counts as broken once misclassified: attacking it on is wasted work
            kwargs = {"until_broken": True, **options}
            res = run_attack(model, x[batch], y[batch], threat, positions=where, **kwargs)
            counts.seconds["attack"] += time.perf_counter() - start
            counts.hits["clean"][where] = (res.clean_margins > 0).int().cpu()
            counts.hits["attacked"][where] = (~res.success).int().cpu()
            trace = res.loss_trace
            counts.moved |= bool(trace.numel() > 1 and trace.max() > trace.min())
        for method in methods:
            start = time.perf_counter()
            cert = run_certify(model, x[batch], y[batch], threat, method, **certify_kwargs)
            counts.seconds[method] += time.perf_counter() - start
            counts.hits[method][where] = cert.certified.int().cpu()
            if options is None and method == methods[0]:  # no attack to tell the clean ones
                counts.hits["clean"][where] = (cert.clean_margins > 0).int().cpu()
    return counts


def _same_family(a: Threat, b: Threat) -> bool:
    return a.replace(eps_x=0.0, eps_w=0.0) == b.replace(eps_x=0.0, eps_w=0.0)


def check(table: EvaluationTable) -> list[str]:
    """Signs of a broken evaluation, as sentences (empty when all is well)."""
    found = []
    for r in table.rows:
        where = f"at eps_x={r.eps_x:g}, eps_w={r.eps_w:g}"
        if r.attacked is not None and r.attacked > r.clean + 1e-12:
            found.append(
                f"attacked accuracy {r.attacked:.1%} above clean {r.clean:.1%} {where}: "
                "a bug, please report it"
            )
        if not r.loss_moved and r.attacked == r.clean:
            found.append(f"the attack loss never moved {where}: gradients may be zero or masked")
        for method, count in r.unsound.items():
            if count:
                found.append(
                    f"{count} examples certified by {method} were broken by the attack {where}: "
                    "a soundness bug, please report it"
                )
    for a in table.rows:
        for b in table.rows:
            if a.attacked is None or b.attacked is None:
                continue
            bigger = b.eps_x >= a.eps_x and b.eps_w >= a.eps_w and b is not a
            slack = max(1, round(0.005 * a.n)) / a.n
            if bigger and _same_family(a.threat, b.threat) and b.attacked > a.attacked + slack:
                found.append(
                    f"attacked accuracy rose from {a.attacked:.1%} (eps_x={a.eps_x:g}, "
                    f"eps_w={a.eps_w:g}) to {b.attacked:.1%} (eps_x={b.eps_x:g}, "
                    f"eps_w={b.eps_w:g}): the attack is too weak at the larger budget "
                    "(try more steps or restarts)"
                )
    return found
