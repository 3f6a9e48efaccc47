"""The report's bit-flip section (only for runs that measured the family): accuracy against
flips per method, the shared search beside random faults, flips to collapse per method over
seeds, and what ``results.json`` records of it (``flip_summary``)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..config import FLIP_BITS, FLIP_GRANULARITY
from ..effects import LEVEL
from ..results import Results, Spread, spread
from ..stats import t_half_width
from .figures import panels, save_figure
from .summary import caption, pct, style


@dataclass(frozen=True)
class FlipSummary:
    """One method's bit-flip family over its seeds (the default recipe's models).

    collapse: flips to collapse per seed (None where the search's limit was reached first);
    median, low, high: over the seeds that collapsed (None when none did). search and faults:
    per flip count, mean and sd over seeds of the search's accuracy and of the random draws'
    mean accuracy; fault_low, fault_high: the lowest and highest accuracy of any draw of any
    seed. clean, clean_float: the quantized and float models' clean accuracy, means."""

    method: str
    seeds: tuple[int, ...]
    collapse: tuple[int | None, ...]
    median: float | None
    low: int | None
    high: int | None
    search: Spread
    faults: Spread
    fault_low: tuple[float, ...]
    fault_high: tuple[float, ...]
    clean: float
    clean_float: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flip_summary(results: Results) -> list[FlipSummary]:
    """Per method with the family (the experiment's order), its summary over seeds."""
    out = []
    for method in results.methods():
        models = [m for m in results.of(method) if m.bit_flips is not None]
        if not models:
            continue
        families = [m.bit_flips for m in models if m.bit_flips is not None]
        counts = tuple(f.collapse for f in families)
        done = [c for c in counts if c is not None]
        out.append(
            FlipSummary(
                method=method,
                seeds=tuple(m.seed for m in models),
                collapse=counts,
                median=statistics.median(done) if done else None,
                low=min(done) if done else None,
                high=max(done) if done else None,
                search=spread([list(f.search) for f in families]),
                faults=spread([list(f.fault_mean) for f in families]),
                fault_low=tuple(map(min, zip(*(f.fault_low for f in families), strict=True))),
                fault_high=tuple(map(max, zip(*(f.fault_high for f in families), strict=True))),
                clean=statistics.fmean(f.clean for f in families),
                clean_float=statistics.fmean(m.clean for m in models),
            )
        )
    return out


def flip_figure(results: Results, summary: list[FlipSummary], folder: Path) -> str:
    """A panel per method: the shared search's accuracy against flips (mean over seeds, its
    95% t band; solid), random faults' mean (dashed) and the band from the lowest to the
    highest draw of any seed (hatched)."""
    first = next(m.bit_flips for m in results.models if m.bit_flips is not None)
    counts, target = first.counts, first.target
    fig = Figure(figsize=(4.2 * 3, 3.4 * -(-len(summary) // 3)))
    for ax, entry in zip(panels(fig, len(summary)), summary, strict=True):
        color, marker = style(entry.method)
        seeds = len(entry.seeds)
        _line(ax, counts, entry.search, seeds, color, marker, "shared bit search")
        _line(ax, counts, entry.faults, seeds, color, "x", "random flips (mean)", "--")
        ax.fill_between(
            counts,
            [100 * v for v in entry.fault_low],
            [100 * v for v in entry.fault_high],
            color=color,
            alpha=0.1,
            hatch="//",
            label="random flips (lowest to highest draw)",
        )
        ax.axhline(100 * target, color="black", lw=0.8, ls=":")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(counts[0], counts[-1] * 1.1)
        ax.set_xticks(counts, [str(k) for k in counts], fontsize=7)
        ax.set_xlabel("bits flipped")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(entry.method, fontsize=10)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Bit flips in {FLIP_BITS}-bit per-{FLIP_GRANULARITY} weights: the shared bit search and "
        f"random flips (dotted: collapse target {pct(target)})"
    )
    return save_figure(fig, folder / "accuracy_vs_flips.png", caption(results))


def _line(
    ax: Any,
    counts: tuple[int, ...],
    entry: Spread,
    seeds: int,
    color: str,
    marker: str,
    label: str,
    ls: str = "-",
) -> None:
    ax.plot(
        counts, [100 * v for v in entry.mean], color=color, marker=marker, ms=4, ls=ls, label=label
    )
    if entry.sd is not None and seeds > 1:
        half = [t_half_width(s, seeds, LEVEL) for s in entry.sd]
        low = [100 * (m - h) for m, h in zip(entry.mean, half, strict=True)]
        high = [100 * (m + h) for m, h in zip(entry.mean, half, strict=True)]
        ax.fill_between(counts, low, high, color=color, alpha=0.15)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _collapse_rows(summary: list[FlipSummary], limit: int) -> list[list[str]]:
    rows = []
    for e in summary:
        seeds = ", ".join(f">{limit}" if c is None else str(c) for c in e.collapse)
        median = "-" if e.median is None else f"{e.median:g}"
        spread = "-" if e.low is None else f"{e.low}-{e.high}"
        rows.append([e.method, pct(e.clean_float), pct(e.clean), median, spread, seeds])
    return rows


def _spread(entry: Spread, i: int) -> str:
    mean, sd = entry.at(i).mean, entry.at(i).sd
    return pct(mean) if sd is None else f"{pct(mean)} ± {100 * sd:.1f}"


def flip_section(results: Results, summary: list[FlipSummary], figure: dict[str, str]) -> list[str]:
    """The report's "Bit flips" section (nothing for a run without the family)."""
    if not summary:
        return []
    first = next(m.bit_flips for m in results.models if m.bit_flips is not None)
    counts = first.counts
    out = [
        "## Bit flips",
        "",
        f"Every model of the default recipe quantized to {FLIP_BITS}-bit integers per output "
        f"{FLIP_GRANULARITY} (`ns.quantize`), then attacked on the {results.data.test_examples} "
        "test examples by the shared progressive bit search (one set of flipped bits for every "
        "example; at each count, the best prefix of at most that many of its flips) and by "
        f"{first.draws} draws of random flips per count (the fault-injection baseline; the "
        "same fault positions for every method of a seed). Flips to collapse: the search's "
        f"flips that bring accuracy to {pct(first.target)} (chance + 1 point) or below, "
        f"counted by replay (searched up to {first.limit} flips). Every flip set is in "
        "`results.json` (`bit_flips` of each model: weight, flat index, bit) and replays on "
        "the unmodified quantized model.",
        "",
    ]
    added = (results.run or {}).get("bit_flips")
    if added:
        out += [
            f"The family was added to this run's trained models later, by `{added['command']}` "
            f"on {added['date']} (nonsingular {added['nonsingular']}); every other number is "
            "the run's own.",
            "",
        ]
    out += [
        f"![accuracy vs flips]({figure['flips']})",
        "",
        f"*{caption(results)}. Solid: the shared bit search (its band: over seeds); dashed: "
        "random flips' mean, hatched from the lowest to the highest draw of any seed.*",
        "",
    ]
    head = ["model", "clean (float)", "clean (int8)", "flips to collapse: median", "range"]
    out += ["Flips to collapse, over seeds:", ""]
    out += [_table([*head, "per seed"], _collapse_rows(summary, first.limit)), ""]
    out += ["Accuracy under the shared bit search (mean ± sd over seeds):", ""]
    rows = [[e.method] + [_spread(e.search, i) for i in range(len(counts))] for e in summary]
    out += [_table(["model"] + [_flips(k) for k in counts], rows), ""]
    out += ["Random flips: mean accuracy over draws (mean over seeds); lowest draw of any seed:"]
    out += [""]
    rows = [[e.method] + [_fault(e, i, k) for i, k in enumerate(counts)] for e in summary]
    out += [_table(["model"] + [_flips(k) for k in counts], rows), ""]
    return out


def _flips(k: int) -> str:
    return f"{k} flip" + ("" if k == 1 else "s")


def _fault(entry: FlipSummary, i: int, k: int) -> str:
    """Random flips at the ``i``-th count ``k``: the mean, and the lowest draw (none at 0)."""
    mean = pct(entry.faults.at(i).mean)
    return mean if k == 0 else f"{mean} (lowest {pct(entry.fault_low[i])})"
