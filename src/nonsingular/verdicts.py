"""The paper's claims, decided from the measured numbers by one stated rule.

Each claim compares a model A against the standard model B under one family of threats. The
metric is a model's robust accuracy averaged over the family's nonzero budgets (the area under
its accuracy curve); the claim is directional ("A is less robust than B", or "more robust").

Rule: ``d`` is the mean over seeds of ``metric(A) - metric(B)``. Its uncertainty ``se``
combines the spread over seeds (``sd(d_seed) / sqrt(N)``, when N >= 2) and the sampling error
of the test set (binomial, ``sqrt((p_A (1 - p_A) + p_B (1 - p_B)) / (n N))``). A claim is
*supported* when ``d`` lies beyond ``2 se`` in the claimed direction, *contradicted* when it
lies beyond ``2 se`` in the other, and *inconclusive* otherwise.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

RULE = (
    "The metric is robust accuracy averaged over a threat family's nonzero budgets. d = mean "
    "over seeds of metric(A) - metric(standard); se = sqrt(se_seeds^2 + se_test^2) with "
    "se_seeds = sd of the per-seed differences / sqrt(N) (0 for a single seed) and se_test = "
    "sqrt((pA(1-pA) + pB(1-pB)) / (n N)) the binomial error of n test examples. Supported: "
    "d beyond 2 se in the claimed direction; contradicted: beyond 2 se the other way; "
    "inconclusive: within 2 se."
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


def family_metric(results: dict[str, Any], family: str, method: str, seed: str) -> float:
    """Robust accuracy of ``method`` averaged over the nonzero budgets of ``family``."""
    if family == "joint":
        cells = results["joint"]["accuracy"][method][seed]
        values = [c for i, row in enumerate(cells) for j, c in enumerate(row) if i or j]
    else:
        accuracy = results["views"][family]["accuracy"][method][seed]
        budgets = results["views"][family]["budgets"]
        values = [a for a, b in zip(accuracy, budgets, strict=True) if b > 0]
    return sum(values) / len(values)


def decide(d: float, se: float, direction: int) -> str:
    if d * direction > 2 * se:
        return "supported"
    if d * direction < -2 * se:
        return "contradicted"
    return "inconclusive"


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim with the numbers behind its verdict."""
    n = results["data"]["test_examples"]
    out = []
    for claim_id, statement, model, family, direction in CLAIMS:
        base = {
            "claim": claim_id,
            "statement": statement,
            "model": model,
            "family": family,
            "direction": "more robust" if direction > 0 else "less robust",
        }
        if model not in results["models"]:
            out.append(
                {**base, "verdict": "not run", "reason": f"no {model} model in this experiment"}
            )
            continue
        seeds = sorted(results["models"][model])
        a = [family_metric(results, family, model, s) for s in seeds]
        b = [family_metric(results, family, "standard", s) for s in seeds]
        diffs = [x - z for x, z in zip(a, b, strict=True)]
        count = len(seeds)
        d = statistics.fmean(diffs)
        se_seeds = statistics.stdev(diffs) / math.sqrt(count) if count >= 2 else 0.0
        pa, pb = statistics.fmean(a), statistics.fmean(b)
        se_test = math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / (n * count))
        se = math.sqrt(se_seeds**2 + se_test**2)
        out.append(
            {
                **base,
                "metric_model": pa,
                "metric_standard": pb,
                "difference": d,
                "per_seed_differences": diffs,
                "se": se,
                "margin": 2 * se,
                "verdict": decide(d, se, direction),
            }
        )
    return out
