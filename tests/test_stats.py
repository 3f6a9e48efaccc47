"""Paired tests and Holm's correction: known values, calibration under the null, power where
pairing matters, and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from nonsingular.errors import ConfigError
from nonsingular.experiment.stats import bootstrap_p, holm, seeds_t_p


def test_holm_matches_a_worked_example():
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


@given(st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=8))
def test_holm_never_lowers_a_p_value_and_keeps_their_order(ps):
    adjusted = holm(ps)
    assert all(a >= p - 1e-15 and a <= 1.0 for a, p in zip(adjusted, ps, strict=True))
    for i in range(len(ps)):
        for j in range(len(ps)):
            if ps[i] < ps[j]:
                assert adjusted[i] <= adjusted[j]


def test_t_test_over_seeds_matches_a_table_value_and_scipy():
    # [1, 2, 3]: mean 2, sd 1, t = 2 sqrt(3) = 3.464 with 2 df: two-sided p = 0.0742 (tables)
    assert seeds_t_p([1.0, 2.0, 3.0]) == pytest.approx(0.0742, abs=5e-4)
    rng = np.random.default_rng(3)
    for _ in range(20):
        values = rng.normal(0.3, 1.0, size=int(rng.integers(2, 9)))
        expected = scipy_stats.ttest_1samp(values, 0.0).pvalue
        assert seeds_t_p(values) == pytest.approx(expected, rel=1e-9)


def test_t_test_needs_two_seeds_and_handles_identical_differences():
    with pytest.raises(ConfigError, match="two or more"):
        seeds_t_p([0.1])
    assert seeds_t_p([0.0, 0.0, 0.0]) == 1.0
    assert seeds_t_p([0.02, 0.02]) == 0.0


def test_bootstrap_is_calibrated_under_the_null():
    """Differences centred on zero: about 5% of p-values fall below 0.05."""
    rng = np.random.default_rng(0)
    below = 0
    runs = 200
    for i in range(runs):
        # per-example differences of two models' 0/1 outcomes: -1, 0, +1, symmetric
        d = rng.choice([-1.0, 0.0, 1.0], p=[0.1, 0.8, 0.1], size=(1, 300))
        below += bootstrap_p(d, draws=400, seed=i) < 0.05
    assert 0.01 <= below / runs <= 0.10


def test_pairing_finds_a_small_consistent_difference_that_unpaired_errors_hide():
    """Model A is right wherever B is, and on 4% more of 1,000 examples (B at 50%): the
    unpaired two-binomial 2-se margin is 2 sqrt(2 * 0.25 / 1000) = 4.5 points, so the old rule
    calls +4 points inconclusive; the paired differences (40 of +1, the rest 0) make it plain."""
    d = np.zeros((1, 1000))
    d[0, :40] = 1.0
    unpaired_margin = 2 * np.sqrt((0.54 * 0.46 + 0.5 * 0.5) / 1000)
    assert d.mean() < unpaired_margin
    assert bootstrap_p(d) < 0.001


def test_bootstrap_over_seeds_sees_a_difference_that_changes_sign_between_seeds():
    """Each seed alone shows a clear difference, but of opposite signs: with the seeds resampled
    the mean difference is not significant."""
    d = np.zeros((3, 500))
    d[0, :100] = 1.0  # seed 0: +20 points
    d[1, :100] = -1.0  # seed 1: -20 points
    d[2, :10] = 1.0  # seed 2: +2 points
    assert bootstrap_p(d[:1]) < 0.001
    assert bootstrap_p(d) > 0.2


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(2, 40))
def test_bootstrap_p_is_a_probability_and_symmetric_in_sign(seed, seeds, examples):
    d = np.random.default_rng(seed).normal(size=(seeds, examples))
    p = bootstrap_p(d, draws=200)
    assert 0.0 < p <= 1.0
    assert bootstrap_p(-d, draws=200) == pytest.approx(p)


def test_bootstrap_refuses_what_it_cannot_test():
    for bad in ([[0.1]], [0.1, 0.2], [[float("nan"), 0.0]]):
        with pytest.raises(ConfigError):
            bootstrap_p(bad)
