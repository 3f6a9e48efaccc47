"""Robust accuracy over a grid of joint budgets, with the sanity checks of an honest evaluation.

``evaluate`` attacks every grid point on the whole data set and returns a tidy table. Like
AutoAttack's checks, it looks for signs of a broken evaluation (attacked above clean, an
attack loss that never moved, accuracy rising with the budget) and reports them in the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from .attacks import attack
from .data import Dataset
from .errors import ConfigError, InputError
from .files import write_json
from .threat import Threat

Data = Dataset | tuple[Tensor, Tensor]


@dataclass
class Row:
    """One grid point: accuracies as fractions of ``n`` examples."""

    threat: Threat
    n: int
    clean: float
    attacked: float
    loss_moved: bool = True

    @property
    def eps_x(self) -> float:
        return self.threat.eps_x

    @property
    def eps_w(self) -> float:
        return self.threat.eps_w

    def to_dict(self) -> dict[str, Any]:
        return {
            "eps_x": self.eps_x,
            "eps_w": self.eps_w,
            "n": self.n,
            "clean": self.clean,
            "attacked": self.attacked,
            "threat": self.threat.to_dict(),
        }


@dataclass
class EvaluationTable:
    """Rows of an evaluation, the attack options used, and the warnings of the checks."""

    rows: list[Row]
    attack: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def accuracy(self, eps_x: float, eps_w: float) -> float:
        """Attacked accuracy at one grid point."""
        for row in self.rows:
            if row.eps_x == eps_x and row.eps_w == eps_w:
                return row.attacked
        raise KeyError(f"no grid point eps_x={eps_x}, eps_w={eps_w}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "attack": self.attack,
            "warnings": self.warnings,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table as JSON (atomically)."""
        write_json(path, self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def matrix(self) -> tuple[list[float], list[float], list[list[float | None]]]:
        """Attacked accuracy as a matrix: rows eps_x, columns eps_w (None where absent)."""
        xs = sorted({r.eps_x for r in self.rows})
        ws = sorted({r.eps_w for r in self.rows})
        cells: list[list[float | None]] = [[None] * len(ws) for _ in xs]
        for r in self.rows:
            cells[xs.index(r.eps_x)][ws.index(r.eps_w)] = r.attacked
        return xs, ws, cells

    def matrix_text(self) -> str:
        """The matrix as aligned text: what a person reads first."""
        xs, ws, cells = self.matrix()
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
        lines = ["| eps_x | eps_w | threat | clean | attacked |", "|---:|---:|---|---:|---:|"]
        for r in self.rows:
            lines.append(
                f"| {r.eps_x:g} | {r.eps_w:g} | {r.threat.describe()} | "
                f"{r.clean:.1%} | {r.attacked:.1%} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        header = ("eps_x", "eps_w", "clean", "attacked", "threat")
        body = [
            (
                f"{r.eps_x:g}",
                f"{r.eps_w:g}",
                f"{r.clean:.1%}",
                f"{r.attacked:.1%}",
                r.threat.describe(),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths[:-1]) + "  {}"
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*row) for row in body]
        n = self.rows[0].n if self.rows else 0
        out.append(
            f"{n} examples; attack: " + ", ".join(f"{k}={v}" for k, v in self.attack.items())
        )
        out += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(out)


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


def evaluate(
    model: nn.Module,
    data: Data,
    grid: Sequence[Threat],
    attack_kwargs: dict[str, Any] | None = None,
    *,
    batch_size: int = 1000,
    progress: bool = True,
) -> EvaluationTable:
    """Clean and attacked accuracy of ``model`` at every threat of ``grid``.

    data: a Dataset (its test split) or ``(x, y)``. attack_kwargs: options of ``attack``
    (steps, restarts, loss, method, ...). Shared-scope points attack the whole data set as
    one batch, so one weight perturbation serves every example.
    """
    grid = list(grid)
    if not grid or not all(isinstance(t, Threat) for t in grid):
        raise ConfigError("grid must be a non-empty list of Threat (see nonsingular.grid)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    options = {"method": "pgd", "steps": 50, "restarts": 1, "loss": "ce", **(attack_kwargs or {})}
    x, y = _tensors(data)
    if len(x) == 0:
        raise InputError("data holds no examples")
    rows: list[Row] = []
    bar = tqdm(
        total=len(grid) * len(x), disable=None if progress else True, unit="ex", desc="evaluate"
    )
    for threat in grid:
        size = len(x) if threat.scope == "shared" else batch_size
        clean = attacked = 0
        moved = False
        for part in _batches(len(x), size):
            res = attack(model, x[part], y[part], threat, **options)
            clean += int((res.clean_margins > 0).sum())
            attacked += int((~res.success).sum())
            moved |= bool(
                res.loss_trace.numel() > 1 and res.loss_trace.max() > res.loss_trace.min()
            )
            bar.update(part.stop - part.start)
        perturbs = threat.eps_x > 0 or threat.eps_w > 0
        rows.append(Row(threat, len(x), clean / len(x), attacked / len(x), moved or not perturbs))
        bar.set_postfix(attacked=f"{attacked / len(x):.1%}")
    bar.close()
    table = EvaluationTable(rows, options)
    table.warnings = check(table)
    return table


def _same_family(a: Threat, b: Threat) -> bool:
    return a.replace(eps_x=0.0, eps_w=0.0) == b.replace(eps_x=0.0, eps_w=0.0)


def check(table: EvaluationTable) -> list[str]:
    """Signs of a broken evaluation, as sentences (empty when all is well)."""
    found = []
    for r in table.rows:
        where = f"at eps_x={r.eps_x:g}, eps_w={r.eps_w:g}"
        if r.attacked > r.clean + 1e-12:
            found.append(
                f"attacked accuracy {r.attacked:.1%} above clean {r.clean:.1%} {where}: "
                "a bug, please report it"
            )
        if not r.loss_moved and r.attacked == r.clean:
            found.append(f"the attack loss never moved {where}: gradients may be zero or masked")
    for a in table.rows:
        for b in table.rows:
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
