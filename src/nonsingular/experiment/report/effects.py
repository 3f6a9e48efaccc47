"""The report's sections on effects: each claim's difference per budget (table and forest
plot) beside its averaged verdict, and every method's single-threat effects apart from the
joint claim."""

from __future__ import annotations

from ..effects import EQUIVALENCE, FLOOR_RULE, LEVEL, VIEWS, ViewEffect
from ..results import Results
from ..verdicts import Verdict
from .summary import pct


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def points(d: float | None, interval: list[float] | tuple[float, float] | None) -> str:
    """A difference in points with its interval: ``+1.8 [+0.8, +2.8]``."""
    if d is None:
        return "-"
    if interval is None:
        return f"{100 * d:+.1f}"
    return f"{100 * d:+.1f} [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"


def per_budget_section(
    results: Results, claims: list[Verdict], labels: dict[str, str], figure: dict[str, str]
) -> list[str]:
    """Per claim: its forest plot and a row per budget, beside the averaged verdict."""
    out = [
        "## Effects per budget",
        "",
        "Each claim's difference (model - standard, points) at every budget it is about, with "
        f"its {100 * LEVEL:.0f}% t interval over seeds, beside the averaged verdict. "
        f"{FLOOR_RULE} The band in the plots is ±{100 * EQUIVALENCE:g} points, the margin "
        "within which an interval shows no difference.",
        "",
    ]
    for i, c in enumerate(claims):
        if not c.per_cell:
            continue
        out += [
            f"### Claim {c.claim}, {labels[c.family]}: {c.verdict}",
            "",
            f"![claim {c.claim}, {c.family}]({figure[f'forest-{i}']})",
            "",
            f"*{c.seeds} seed{'s' if c.seeds != 1 else ''}; averaged over {len(c.cells)} "
            f"budget{'s' if len(c.cells) != 1 else ''}: {points(c.difference, c.interval)} "
            f"points.*",
            "",
        ]
        rows = [
            [
                f"{row['eps_x']:g}",
                f"{row['eps_w']:g}",
                pct(row["model"]),
                pct(row["standard"]),
                points(row["difference"], row["interval"]),
                "**floor: left out**" if row["floor"] else "",
            ]
            for row in c.per_cell
        ]
        head = ["eps_x", "eps_w", c.model, "standard", "difference [95% interval]", "floor"]
        out += [_table(head, rows), ""]
    return out


def single_threat_section(results: Results, effects: list[ViewEffect]) -> list[str]:
    """Every method against standard on single threats and on the strictly joint cells."""
    if not effects:
        return []
    methods = list(dict.fromkeys(e.method for e in effects))
    found = {(e.method, e.view): e for e in effects}

    def entry(e: ViewEffect) -> str:
        p = "" if e.p is None else f"; p {e.p:.2g}"
        return points(e.difference, e.interval) + p

    head = ["model", *[view for _, _, view in VIEWS]]
    rows = [[m, *[entry(found[(m, view)]) for _, _, view in VIEWS]] for m in methods]
    return [
        "## Single-threat effects",
        "",
        "Every model minus standard (points, mean over seeds, "
        f"[{100 * LEVEL:.0f}% t interval over seeds]; p: t-test over seeds, unadjusted) on "
        "each single threat and on the joint grid's parts apart: the joint claim averages "
        "only the strictly joint cells, so what a method does to one threat alone is "
        "shown here, not mixed into it. These are descriptions, not claims: not "
        "Holm-adjusted, no verdicts. Floor cells are left out as above.",
        "",
        _table(head, rows),
        "",
    ]
