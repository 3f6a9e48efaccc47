"""A method's effect on robust accuracy against the standard model, per budget and averaged,
with training seeds as the unit of replication.

A claim about a training method is a claim about what the method does to any model it trains,
so its replicates are trained models (seeds), not test examples: the examples of one run share
that run's weights, and many examples of a few runs say little about the next run. Per seed,
the two models trained with that seed are compared on the same examples (paired); the per-seed
differences are summarized by their mean, a Student-t 95% interval and a t-test
(``stats.seeds_t_p``).

A *cell* is one budget of a family ``(eps_x, eps_w)``. A *floor cell* is one where both models
sit at the floor in every seed (see ``FLOOR_RULE``): it carries no information about the
difference, so it is marked and left out of averages.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import JOINT, Experiment
from .results import Measured, Results
from .stats import seeds_t_interval, seeds_t_p

LEVEL = 0.95  # the intervals' coverage
# "no difference shown" needs the 95% interval inside +-EQUIVALENCE (2 points): about one
# binomial standard error of one model's accuracy on 500 attacked examples
# (sqrt(0.5 * 0.5 / 500) = 2.2 points), below what the test set resolves for one model, and a
# tenth of the gaps of tens of points the paper's claims describe
EQUIVALENCE = 0.02
# times 1 / classes: the floor of results made by the earlier shared attack
# (``Results.shared_attack == "single-class"``), whose loss was satisfied by mapping every example
# to one class; that leaves the class's share of the attacked examples (8.6% to 11.0% among
# mnist5k's 500 attacked digits), and 1.2 / classes (12% for 10 classes) covers every such
# collapse with a little room. The strong shared attack (loss clipped at broken examples,
# class-permutation runs) goes below it, so its results' floor is 0% as for the other threats.
SHARED_FLOOR = 1.2

FLOOR_RULE = (
    "A floor cell is a budget at which both models, in every seed, are at 0% (for runs made "
    "with the earlier shared attack, which stopped where every example fell into one class: "
    f"at most {SHARED_FLOOR:g} / classes under one shared perturbation): such a cell cannot "
    "show a difference, so it is marked and left out of every average."
)


def shared_floor(classes: int) -> float:
    """The accuracy the earlier shared attack's collapse to one class leaves, with room for
    unequal class shares (``SHARED_FLOOR`` / classes)."""
    return SHARED_FLOOR / classes


@dataclass(frozen=True)
class Cell:
    """One budget of a family: its input and weight parts (the other 0 in one-axis ones)."""

    eps_x: float
    eps_w: float

    def label(self) -> str:
        return f"eps_x={self.eps_x:g}, eps_w={self.eps_w:g}"

    def to_dict(self) -> dict[str, float]:
        return {"eps_x": self.eps_x, "eps_w": self.eps_w}


def cells(exp: Experiment, family: str) -> list[Cell]:
    """Every budget of ``family`` in outcome order (the joint grid's eps_x slowest)."""
    if family == JOINT:
        return [Cell(x, w) for x in exp.joint_eps_x for w in exp.joint_eps_w]
    fam = exp.family(family)
    return [Cell(b, 0.0) if fam.axis == "eps_x" else Cell(0.0, b) for b in fam.budgets]


def strictly_joint(cell: Cell) -> bool:
    return cell.eps_x > 0 and cell.eps_w > 0


def input_only(cell: Cell) -> bool:
    return cell.eps_x > 0 and cell.eps_w == 0


def weights_only(cell: Cell) -> bool:
    return cell.eps_x == 0 and cell.eps_w > 0


def perturbs(cell: Cell) -> bool:
    return cell.eps_x > 0 or cell.eps_w > 0


def claim_cells(family: str) -> Callable[[Cell], bool]:
    """The budgets a claim about ``family`` averages: the joint family's strictly joint ones
    (both parts nonzero), any other family's nonzero ones."""
    return strictly_joint if family == JOINT else perturbs


@dataclass(frozen=True)
class CellEffect:
    """Both models' accuracy at one cell (means over seeds), their difference with its
    interval over seeds, and whether it is a floor cell."""

    cell: Cell
    model: float
    standard: float
    difference: float
    interval: tuple[float, float] | None  # None with fewer than two seeds
    floor: bool

    def to_dict(self) -> dict[str, Any]:
        out = {**self.cell.to_dict(), "model": self.model, "standard": self.standard}
        interval = None if self.interval is None else list(self.interval)
        return {**out, "difference": self.difference, "interval": interval, "floor": self.floor}


@dataclass(frozen=True)
class Effect:
    """A method minus standard over a set of cells: per cell, and averaged over the cells that
    are not floor cells (``cells``), per seed and over seeds."""

    per_cell: tuple[CellEffect, ...]
    per_seed: tuple[float, ...]  # per seed: mean over ``cells`` of the difference
    metric_model: float | None  # mean over seeds and ``cells``
    metric_standard: float | None
    difference: float | None
    interval: tuple[float, float] | None
    p: float | None  # t-test over seeds, unadjusted (None with fewer than two seeds)

    @property
    def cells(self) -> list[Cell]:
        return [c.cell for c in self.per_cell if not c.floor]

    @property
    def floor_cells(self) -> list[Cell]:
        return [c.cell for c in self.per_cell if c.floor]

    @property
    def seeds(self) -> int:
        return len(self.per_seed)


def pairs(results: Results, method: str, recipe: str | None) -> list[tuple[Measured, Measured]]:
    """``method``'s models with the standard model of the same seed, by seed."""
    standard = {s.seed: s for s in results.of("standard", recipe)}
    return [(m, standard[m.seed]) for m in results.of(method, recipe) if m.seed in standard]


def rates(model: Measured, family: str, attack: str | None = None) -> list[float]:
    """``model``'s robust accuracy per budget of ``family``; with ``attack`` (``"default"`` or
    ``"stronger"``), at the family's key budget alone under that attack."""
    if attack is not None:
        return [getattr(model.stronger[family], attack).rate]
    return [o.rate for o in model.outcomes[family]]


def family_cells(results: Results, family: str, attack: str | None = None) -> list[Cell]:
    """The cells ``rates`` returns, in the same order."""
    found = cells(results.experiment, family)
    return [found[results.experiment.key_index(family)]] if attack is not None else found


def floor_of(results: Results, family: str) -> float:
    """The accuracy at or below which a cell of ``family`` is at the floor: 0%, but for a
    shared family measured by the earlier shared attack (``FLOOR_RULE``)."""
    return shared_floor(results.data.classes) if single_class(results, family) else 0.0


def single_class(results: Results, family: str) -> bool:
    """Whether ``family``'s numbers come from the earlier shared attack, which stopped where
    every example fell into one class (so near chance is as low as they go)."""
    return results.shared_attack == "single-class" and results.experiment.shared(family)


def t_summary(values: Sequence[float]) -> tuple[float, tuple[float, float] | None, float | None]:
    """Mean, 95% t interval and t-test p over seeds (no interval nor p with one seed)."""
    if len(values) < 2:
        return statistics.fmean(values), None, None
    return statistics.fmean(values), seeds_t_interval(values, LEVEL), seeds_t_p(values)


def effect(
    results: Results,
    method: str,
    family: str,
    select: Callable[[Cell], bool],
    recipe: str | None = None,
    attack: str | None = None,
) -> Effect:
    """``method`` minus standard on the cells of ``family`` that ``select`` keeps (all of them
    with ``attack``: the key budget), per cell and averaged over the non-floor ones."""
    paired = pairs(results, method, recipe)
    a = [rates(m, family, attack) for m, _ in paired]
    b = [rates(s, family, attack) for _, s in paired]
    floor = floor_of(results, family)
    per_cell, used = [], []
    for i, cell in enumerate(family_cells(results, family, attack)):
        if attack is None and not select(cell):
            continue
        x, z = [row[i] for row in a], [row[i] for row in b]
        mean, interval, _ = t_summary([p - q for p, q in zip(x, z, strict=True)])
        low = all(p <= floor and q <= floor for p, q in zip(x, z, strict=True))
        per_cell.append(
            CellEffect(cell, statistics.fmean(x), statistics.fmean(z), mean, interval, low)
        )
        used += [] if low else [i]
    if not used:
        return Effect(tuple(per_cell), (), None, None, None, None, None)
    per_seed = [statistics.fmean(x[i] - z[i] for i in used) for x, z in zip(a, b, strict=True)]
    difference, interval, p = t_summary(per_seed)
    model = statistics.fmean(x[i] for x in a for i in used)
    standard = statistics.fmean(z[i] for z in b for i in used)
    return Effect(tuple(per_cell), tuple(per_seed), model, standard, difference, interval, p)


def within(interval: tuple[float, float] | None, margin: float = EQUIVALENCE) -> bool:
    """Whether ``interval`` lies inside [-margin, +margin]."""
    return interval is not None and -margin <= interval[0] and interval[1] <= margin


# every method's effect on single threats and on the joint one, shown apart (descriptive: not
# claims, so not Holm-adjusted): (family, which of its cells, what the report calls them)
VIEWS: tuple[tuple[str, Callable[[Cell], bool], str], ...] = (
    ("input", perturbs, "input only (its family)"),
    ("weight-absolute", perturbs, "weights only, absolute (its family)"),
    (JOINT, input_only, "joint grid: input-only column (eps_w = 0)"),
    (JOINT, weights_only, "joint grid: weight-only row (eps_x = 0)"),
    (JOINT, strictly_joint, "joint grid: strictly joint cells"),
)


@dataclass(frozen=True)
class ViewEffect:
    """One method's ``Effect`` on one of ``VIEWS``, as ``results.json`` records it."""

    method: str
    view: str
    family: str
    seeds: int
    difference: float | None
    interval: tuple[float, float] | None
    p: float | None  # t-test over seeds, unadjusted: descriptive
    cells: tuple[Cell, ...]
    floor_cells: tuple[Cell, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "view": self.view,
            "family": self.family,
            "seeds": self.seeds,
            "difference": self.difference,
            "interval": None if self.interval is None else list(self.interval),
            "p": self.p,
            "cells": [c.to_dict() for c in self.cells],
            "floor_cells": [c.to_dict() for c in self.floor_cells],
        }


def single_threat(results: Results) -> list[ViewEffect]:
    """Every method but standard (the default recipe) against standard on each of ``VIEWS``."""
    out = []
    for method in results.methods():
        if method == "standard" or not pairs(results, method, None):
            continue
        for family, select, view in VIEWS:
            found = effect(results, method, family, select)
            out.append(
                ViewEffect(
                    method,
                    view,
                    family,
                    len(pairs(results, method, None)),
                    found.difference,
                    found.interval,
                    found.p,
                    tuple(found.cells),
                    tuple(found.floor_cells),
                )
            )
    return out
