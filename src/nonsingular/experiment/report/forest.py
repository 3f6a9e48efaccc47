"""A forest plot per claim: the difference from standard at every budget the claim is about,
with its 95% interval over seeds, floor cells marked, and the averaged difference below."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..effects import EQUIVALENCE, LEVEL
from ..results import Results
from ..verdicts import Verdict
from .figures import save_figure
from .summary import caption, style

FLOOR_COLOR = "#999999"


def forest_figures(results: Results, claims: list[Verdict], folder: Path) -> dict[str, str]:
    """One forest plot per claim with measured cells; each one's path by ``forest-{index}``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        f"forest-{i}": forest_figure(results, c, folder) for i, c in enumerate(claims) if c.per_cell
    }


def _point(ax: Any, y: float, d: float, interval: list[float] | None, **kw: Any) -> None:
    """A difference (points) at height ``y``, with its interval as a horizontal bar."""
    if interval is None:
        ax.plot([d], [y], **kw)
        return
    bar = [[d - interval[0]], [interval[1] - d]]
    ax.errorbar([d], [y], xerr=bar, capsize=3, **kw)


def forest_figure(results: Results, claim: Verdict, folder: Path) -> str:
    """The claim's per-budget differences (model - standard, points) with 95% t intervals
    over seeds, floor cells hollow and grey, and the averaged difference as a diamond."""
    rows = claim.per_cell
    fig = Figure(figsize=(7.5, 1.5 + 0.38 * (len(rows) + 1)))
    ax = fig.subplots()
    color, _ = style(claim.model)
    labels = []
    for y, row in enumerate(rows):
        d = 100 * row["difference"]
        interval = None if row["interval"] is None else [100 * b for b in row["interval"]]
        if row["floor"]:
            _point(ax, y, d, interval, marker="o", mfc="white", color=FLOOR_COLOR)
        else:
            _point(ax, y, d, interval, marker="o", color=color)
        name = f"eps_x={row['eps_x']:g}, eps_w={row['eps_w']:g}"
        labels.append(name + (" (floor, left out)" if row["floor"] else ""))
    y = len(rows) + 0.4
    if claim.difference is not None:
        interval = None if claim.interval is None else [100 * b for b in claim.interval]
        _point(ax, y, 100 * claim.difference, interval, marker="D", ms=8, color="black")
    labels.append(f"averaged ({len(claim.cells)} cells): {claim.verdict}")
    ax.axvline(0, color="black", lw=0.8)
    margin = 100 * EQUIVALENCE
    ax.axvspan(-margin, margin, color="#4c72b0", alpha=0.12, lw=0)
    ax.set_yticks([*range(len(rows)), y], labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(
        f"{claim.model} - standard, robust accuracy (points)\nbars: {100 * LEVEL:.0f}% "
        f"t interval over seeds; band: ±{margin:g} points (no difference shown within it)",
        fontsize=8,
    )
    ax.set_title(f"Claim {claim.claim}: {claim.model} vs standard, {claim.family}", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    path = folder / f"forest_claim{claim.claim}_{claim.family}.png"
    return save_figure(fig, path, caption(results, bands=False))
