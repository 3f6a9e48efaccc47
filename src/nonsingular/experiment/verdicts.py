"""The paper's claims, decided from the measured numbers by one stated rule.

Each claim compares a model A against the standard model under one family of threats. The
metric is a model's robust accuracy averaged over the family's nonzero budgets (the area under
its accuracy curve); the claim is directional ("A is less robust than standard", or "more").

Both models are attacked on the same test examples, so the comparison is paired, and the unit
of replication depends on the threat:

- per-example threats (input, per-example weights, joint): each example is attacked on its
  own. Its score is the share of the family's budgets it survives; the per-example
  differences A - standard, over examples and seeds, are tested by a paired bootstrap
  (``stats.bootstrap_p``: examples and, with several seeds, seeds resampled).
- one shared weight perturbation: it hits every example at once, so one run's examples are
  not independent and only seeds replicate. The per-seed differences are tested by a t-test
  (``stats.seeds_t_p``), which needs ``MIN_SHARED_SEEDS`` seeds; with fewer the verdict says
  so rather than guess.

A claim whose model or standard model falls below the experiment's ``min_clean`` accuracy is
*excluded* (an undertrained model says nothing about robustness). The p-values of all tested
claims are adjusted together by Holm's method. A claim is
*supported* when its adjusted p is below ``ALPHA`` and the difference lies in the claimed
direction, *contradicted* when below ``ALPHA`` the other way, and *inconclusive* otherwise.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from ..evaluation import Outcomes
from .results import Measured, Results
from .stats import bootstrap_p, holm, seeds_t_p

ALPHA = 0.05
MIN_SHARED_SEEDS = 3

RULE = (
    "The metric is robust accuracy averaged over a threat family's nonzero budgets; d is its "
    "difference A - standard, averaged over seeds. Both models are attacked on the same "
    "examples, so the tests are paired. Per-example threats: each example's share of budgets "
    "survived, differenced between the models, tested by a paired bootstrap over examples "
    "and seeds. One shared perturbation: only seeds replicate (its examples are hit "
    f"together), so the per-seed differences are tested by a t-test, which needs "
    f"{MIN_SHARED_SEEDS} seeds or more. A claim whose model (or the standard one) is below "
    "the stated clean accuracy is excluded. The p-values of all claims tested are "
    "Holm-adjusted together; "
    f"supported: adjusted p < {ALPHA} in the claimed direction; contradicted: adjusted "
    f"p < {ALPHA} the other way; inconclusive otherwise."
)

# (id, statement, model A, threat family, +1: A more robust than standard, -1: less robust)
CLAIMS: list[tuple[str, str, str, str, int]] = [
    (
        "1",
        "input-adversarially trained (pgd-at) is less robust to weight perturbations than standard",
        "pgd-at",
        "weight-absolute",
        -1,
    ),
    (
        "1",
        "input-adversarially trained (pgd-at) is less robust to weight perturbations than standard",
        "pgd-at",
        "weight-relative",
        -1,
    ),
    (
        "1",
        "input-adversarially trained (pgd-at) is less robust to weight perturbations than standard",
        "pgd-at",
        "weight-shared",
        -1,
    ),
    (
        "2",
        "weight-adversarially trained (awp) is less robust to input perturbations than standard",
        "awp",
        "input",
        -1,
    ),
    (
        "3",
        "the bound regularizer (bound-reg) is more robust to joint perturbations than standard",
        "bound-reg",
        "joint",
        +1,
    ),
]


@dataclass
class Verdict:
    """One claim decided: the numbers behind it and the verdict."""

    claim: str
    statement: str
    model: str
    family: str
    direction: str  # "more robust" or "less robust"
    verdict: str  # supported, contradicted, inconclusive, not run, needs seeds, excluded
    reason: str = ""
    unit: str = ""  # what replicates: "examples", "examples and seeds" or "seeds"
    seeds: int = 0
    metric_model: float | None = None
    metric_standard: float | None = None
    difference: float | None = None
    per_seed_differences: tuple[float, ...] = ()
    p: float | None = None
    p_holm: float | None = None
    # the difference of robust accuracy as a share of clean accuracy (metric / clean), which
    # does not reward a model for being right on fewer examples to begin with
    difference_clean_adjusted: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_seed_differences"] = list(self.per_seed_differences)
        return out


def _budget_outcomes(
    results: Results, family: str, model: Measured, attack: str | None
) -> list[Outcomes]:
    """The per-example outcomes the metric averages: at every nonzero budget of ``family``
    or, with ``attack`` (``"default"`` or ``"stronger"``), at its key budget alone under
    that attack (``Measured.stronger``)."""
    if attack is not None:
        return [getattr(model.stronger[family], attack)]
    zero = results.experiment.zero_budgets(family)
    return [bits for bits, z in zip(model.outcomes[family], zero, strict=True) if not z]


def scores(
    results: Results, family: str, model: Measured, attack: str | None = None
) -> list[float]:
    """Per example, the share of ``family``'s budgets (see ``_budget_outcomes``) it survives."""
    found = _budget_outcomes(results, family, model, attack)
    return [sum(o[i] for o in found) / len(found) for i in range(len(found[0]))]


def verdicts(
    results: Results, recipe: str | None = None, attack: str | None = None
) -> list[Verdict]:
    """Every claim with the numbers behind its verdict (p-values Holm-adjusted together), on
    the models of ``recipe`` (None: the default one); with ``attack``, decided at the key
    budgets alone under the ``"default"`` or the ``"stronger"`` attack, so that a verdict that
    moves between the two moved because the attack got stronger."""
    floor = results.experiment.min_clean
    methods = results.methods(recipe)
    out = []
    for claim_id, statement, model, family, direction in CLAIMS:
        base = Verdict(
            claim_id,
            statement,
            model,
            family,
            "more robust" if direction > 0 else "less robust",
            "inconclusive",
        )
        if model not in methods:
            base.verdict, base.reason = "not run", f"no {model} model in this experiment"
            out.append(base)
            continue
        out.append(_measure(results, base, recipe, attack))
        clean = {m: results.over_seeds(m, _clean, recipe).mean for m in (model, "standard")}
        low = [m for m, c in clean.items() if c < floor]
        if low:
            base.verdict = "excluded"
            base.reason = ", ".join(
                f"{m}'s clean accuracy {100 * clean[m]:.1f}% is below {100 * floor:.0f}%"
                for m in low
            )
            base.p = None
    tested = [v for v in out if v.p is not None]
    for v, adjusted in zip(tested, holm([v.p for v in tested]), strict=True):
        v.p_holm = adjusted
        sign = 1 if v.direction == "more robust" else -1
        if adjusted < ALPHA:
            v.verdict = "supported" if v.difference * sign > 0 else "contradicted"
    return out


def _clean(model: Measured) -> float:
    return model.clean


def _measure(results: Results, v: Verdict, recipe: str | None, attack: str | None) -> Verdict:
    """The claim's numbers and its raw p-value (None where it cannot be tested)."""
    standard = {s.seed: s for s in results.of("standard", recipe)}  # paired by seed
    pairs = [(m, standard[m.seed]) for m in results.of(v.model, recipe) if m.seed in standard]
    a = [scores(results, v.family, m, attack) for m, _ in pairs]
    b = [scores(results, v.family, s, attack) for _, s in pairs]
    per_seed = [statistics.fmean(x) - statistics.fmean(z) for x, z in zip(a, b, strict=True)]
    v.seeds = len(pairs)
    v.metric_model = statistics.fmean(statistics.fmean(x) for x in a)
    v.metric_standard = statistics.fmean(statistics.fmean(z) for z in b)
    v.difference = statistics.fmean(per_seed)
    v.per_seed_differences = tuple(per_seed)
    adjusted = [
        statistics.fmean(x) / m.clean - statistics.fmean(z) / s.clean
        for (m, s), x, z in zip(pairs, a, b, strict=True)
        if m.clean > 0 and s.clean > 0
    ]
    v.difference_clean_adjusted = statistics.fmean(adjusted) if adjusted else None
    if results.experiment.shared(v.family):
        v.unit = "seeds"
        if len(pairs) < MIN_SHARED_SEEDS:
            v.verdict = "needs seeds"
            v.reason = (
                f"one shared perturbation hits all examples at once, so only seeds replicate: "
                f"this needs {MIN_SHARED_SEEDS} seeds, the run has {len(pairs)}"
            )
            return v
        v.p = seeds_t_p(per_seed)
    else:
        v.unit = "examples and seeds" if len(pairs) > 1 else "examples"
        diffs = [[p - q for p, q in zip(x, z, strict=True)] for x, z in zip(a, b, strict=True)]
        v.p = bootstrap_p(diffs)
    return v
