"""Paired tests for comparing two models measured on the same examples, and Holm's correction.

Two models evaluated on the same test examples are paired: an example hard for one is often
hard for the other, so the difference of their accuracies varies far less than two independent
binomials suggest. Each test here takes per-unit differences ``a - b`` (per example, per seed)
and returns a two-sided p-value for "the mean difference is zero".

- ``seeds_t_p``: a one-sample t-test on per-seed differences: what the verdicts use, since a
  claim about a training method is replicated by training runs (seeds), not by the examples
  one run is tested on (see ``verdicts``).
- ``seeds_t_interval``: the Student-t confidence interval of the mean per-seed difference.
- ``bootstrap_p``: paired bootstrap over examples and, with several seeds, over seeds too (a
  two-way resampling). It treats the examples as replicates, so the verdicts show it only
  as a secondary number.
- ``holm``: Holm's step-down adjustment of several p-values, controlling the chance of any
  false claim at the chosen level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

BOOTSTRAP_DRAWS = 4000


def bootstrap_p(
    differences: Sequence[Sequence[float]], draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> float:
    """Two-sided p-value of mean difference 0, by a paired bootstrap.

    differences: one row per seed, one column per example (the same examples in every row):
    ``a_i - b_i`` for example ``i``. Each draw resamples the examples (the same ones for both
    models: the pairing) and, with several seeds, the seeds, and recentres on the observed mean
    (the null). The p-value is the share of draws at least as far from 0 as the observed mean,
    counting the observed one (never 0)."""
    d = _matrix(differences)
    seeds, examples = d.shape
    rng = np.random.default_rng(seed)
    observed = d.mean()
    centred = d - observed
    far = 0
    for _ in range(draws):
        rows = rng.integers(0, seeds, seeds) if seeds > 1 else np.zeros(1, dtype=np.int64)
        cols = rng.integers(0, examples, examples)
        mean = centred[np.ix_(rows, cols)].mean()
        far += abs(mean) >= abs(observed) - 1e-12
    return (far + 1) / (draws + 1)


def seeds_t_p(per_seed: Sequence[float]) -> float:
    """Two-sided p-value of a one-sample t-test that the per-seed differences have mean 0
    (needs two seeds at least; identical differences give 0 or 1)."""
    values = _seeds(per_seed)
    mean, sd = values.mean(), values.std(ddof=1)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(len(values)))
    return float(_t_two_sided(abs(t), len(values) - 1))


def seeds_t_interval(per_seed: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The two-sided ``level`` Student-t confidence interval of the mean of the per-seed
    differences (needs two seeds at least): mean +- t(level, n - 1) * sd / sqrt(n)."""
    values = _seeds(per_seed)
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half = t_half_width(sd, len(values), level)
    return mean - half, mean + half


def t_half_width(sd: float, n: int, level: float = 0.95) -> float:
    """Half the width of the ``level`` Student-t interval of a mean of ``n`` values with
    sample sd ``sd``: t(level, n - 1) * sd / sqrt(n) (the figures' bands, the intervals)."""
    from scipy.special import stdtrit  # the inverse of Student's t distribution function

    if not 0 < level < 1:
        raise ConfigError(f"a confidence level is between 0 and 1, got {level!r}")
    if n < 2:
        raise ConfigError(f"an interval over seeds needs 2 seeds at least, got {n}")
    return float(stdtrit(n - 1, 0.5 + level / 2)) * sd / math.sqrt(n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's adjusted p-values, in the input order: the k-th smallest is multiplied by
    ``m - k + 1`` (k from 1), made non-decreasing, and capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _seeds(per_seed: Sequence[float]) -> np.ndarray:
    values = np.asarray(per_seed, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2 or not np.isfinite(values).all():
        raise ConfigError("a t-test over seeds needs two or more finite per-seed differences")
    return values


def _matrix(differences: Sequence[Sequence[float]]) -> np.ndarray:
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 2 or not np.isfinite(d).all():
        raise ConfigError(
            "a paired bootstrap needs a finite seeds x examples matrix with two examples or more"
        )
    return d


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| >= t) for Student's t with ``df`` degrees of freedom, through the regularized
    incomplete beta function: I_x(df/2, 1/2) with x = df / (df + t^2)."""
    from scipy.special import betainc  # a declared dependency (pyproject.toml), imported late

    return float(betainc(df / 2, 0.5, df / (df + t * t)))
