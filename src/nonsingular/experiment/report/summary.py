"""What every table and figure of the report shows: means and spreads over seeds, and how
numbers, methods and losses are written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ...training import METHODS
from ..results import Measured, Results, Spread

LOSS_NAMES = {
    "ce": "cross-entropy",
    "margin": "margin (CW) loss",
    "dlr": "DLR loss",
    "both": "cross-entropy then margin (CW) loss",
}


def _loss(name: str) -> str:
    return LOSS_NAMES.get(name, name)


BAND = "95% t interval of the mean over seeds"


def caption(results: Results, certified: bool = False, bands: bool = True) -> str:
    """What a figure shows: examples, seeds and, for line plots, what the bands are."""
    data = results.data
    n = data.certified_examples if certified else data.test_examples
    seeds = results.seeds
    text = f"{n} {data.name} test examples, {seeds} seed{'s' if seeds != 1 else ''}"
    if seeds > 1:
        text += "; mean over seeds" + (f"; bands: {BAND}" if bands else "")
    return text


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


@dataclass
class Summary:
    """Means and spreads over seeds of everything the report's tables and figures show (the
    default recipe's models), per method."""

    clean: dict[str, Spread]
    families: dict[str, dict[str, Spread]]  # per one-axis family: per budget
    joint: dict[str, Spread]  # joint-grid matrices
    certified: dict[str, dict[str, Spread]]  # per certificate: joint-grid matrices
    certified_attacked: dict[str, Spread]  # the attack on the certified examples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Results) -> Summary:
    """Every number the report shows, as mean and sd over seeds (``spread``, the one helper)."""
    methods = results.methods()

    def per_method(value: Callable[[Measured], Any]) -> dict[str, Spread]:
        return {m: results.over_seeds(m, value) for m in methods}

    return Summary(
        clean=per_method(lambda r: r.clean),
        families={
            f.name: per_method(lambda r, name=f.name: r.accuracy[name])
            for f in results.experiment.families()
        },
        joint=per_method(lambda r: r.joint),
        certified={
            c: per_method(lambda r, c=c: r.certified[c]) for c in results.experiment.certify
        },
        certified_attacked=per_method(lambda r: r.certified_attacked),
    )


def cell(entry: Spread, *index: int) -> str:
    """``mean`` (``± sd`` when there are several seeds) of one entry of a summary."""
    mean, sd = entry.at(*index).mean, entry.at(*index).sd
    return pct(mean) if sd is None else f"{pct(mean)} ± {100 * sd:.1f}"


def style(method: str) -> tuple[str, str]:
    """The colour and marker of ``method``'s lines: its registry entry's."""
    return METHODS[method].color, METHODS[method].marker
