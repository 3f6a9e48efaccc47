"""What an evaluation found: one ``Row`` per grid point, gathered in an ``EvaluationTable``
that prints as text, Markdown or JSON and reads back from JSON; ``check`` looks for the signs
of a broken evaluation."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..attacks import AttackOptions
from ..errors import InputError
from ..files import write_json
from ..threat import Threat
from .outcomes import Outcomes


@dataclass
class Row:
    """One grid point: accuracies as fractions of ``n`` examples.

    ``certified`` maps a certificate method to its certified accuracy; ``unsound`` counts,
    per method, examples it certified that the attack broke (always 0 unless there is a bug).
    ``outcomes``: per column (``clean``, ``attacked``, each method), the examples one by one
    (``Outcomes``): what paired comparisons of two models need. ``unknown``: per method, the
    examples its ``time_limit`` left unbounded (counted as not certified).
    """

    threat: Threat
    n: int
    clean: float
    attacked: float | None = None
    certified: dict[str, float] = field(default_factory=dict)
    loss_moved: bool = True
    unsound: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, Outcomes] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)  # not reached in the time limit

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
            "loss_moved": self.loss_moved,
            "unsound": dict(self.unsound),
            "outcomes": {c: v.bits for c, v in self.outcomes.items()},
            "unknown": dict(self.unknown),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """The row ``to_dict`` wrote (rows written before ``loss_moved`` and ``unsound`` were
        recorded read as moved and sound)."""
        try:
            return cls(
                threat=Threat.from_dict(data["threat"]),
                n=int(data["n"]),
                clean=float(data["clean"]),
                attacked=None if data["attacked"] is None else float(data["attacked"]),
                certified={k: float(v) for k, v in data["certified"].items()},
                loss_moved=bool(data.get("loss_moved", True)),
                unsound={k: int(v) for k, v in data.get("unsound", {}).items()},
                seconds={k: float(v) for k, v in data["seconds"].items()},
                outcomes={k: Outcomes(v) for k, v in data["outcomes"].items()},
                unknown={k: int(v) for k, v in data.get("unknown", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not an evaluation row: {exc!r}"[:200]) from None


@dataclass
class EvaluationTable:
    """Rows of an evaluation, the attack options used, and the warnings of the checks."""

    rows: list[Row]
    attack: AttackOptions | None  # None: not attacked
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
            "attack": None if self.attack is None else self.attack.to_dict(),
            "certify": self.methods,
            "warnings": self.warnings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationTable:
        """The table ``to_dict`` (or ``save``) wrote."""
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise InputError("not an evaluation table: no list of rows")
        attack = data.get("attack")
        return cls(
            rows=[Row.from_dict(r) for r in data["rows"]],
            attack=None if attack is None else AttackOptions.from_dict(attack),
            warnings=[str(w) for w in data.get("warnings", [])],
        )

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
            done.append("attack: " + ", ".join(f"{k}={v}" for k, v in self.attack.key().items()))
        if self.methods:
            done.append("certified by " + ", ".join(self.methods))
        out.append(f"{n} examples; " + "; ".join(done))
        out += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(out)


def _label(column: str) -> str:
    return column if column == "attacked" else f"cert:{column}"


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
        for method, count in r.unknown.items():
            if count:
                found.append(
                    f"{count} of {r.n} examples were not reached by {method} within its time "
                    f"limit {where}: counted as not certified (unknown)"
                )
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
