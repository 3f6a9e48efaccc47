"""The verdicts' statistics: training seeds replicate a claim about a training method; the joint
claim is decided on strictly joint budgets; floor cells are left out; an undecided claim says
whether its interval shows no difference or is too wide to say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nonsingular import Outcomes
from nonsingular.experiment import AtKeyBudget, DataInfo, Experiment, Measured, Results
from nonsingular.experiment.effects import EQUIVALENCE, single_threat
from nonsingular.experiment.report.effects import per_budget_section, single_threat_section
from nonsingular.experiment.report.forest import forest_figures
from nonsingular.experiment.stats import seeds_t_interval
from nonsingular.experiment.verdicts import verdicts

ROOT = Path(__file__).parent.parent
N = 1000  # examples: one example is 0.1 points
BUDGETS = (0.0, 0.1, 0.2)
T_975_2 = 4.302653  # Student's t, 97.5% quantile, 2 degrees of freedom (a printed table's)
FAMILIES = ("input", "weight-absolute", "weight-relative", "weight-shared")


def flat(rate: float) -> dict[str, list[float]]:
    """``rate`` at every nonzero budget of every family (the joint grid too), 100% at 0."""
    out = {f: [1.0] + [rate] * (len(BUDGETS) - 1) for f in FAMILIES}
    out["joint"] = [1.0 if i == 0 else rate for i in range(len(BUDGETS) ** 2)]
    return out


def build(
    rates: dict[str, list[dict[str, list[float]]]],
    classes: int = 10,
    shared_attack: str = "strong",
) -> Results:
    """Results from per method, per seed, per family (joint: the grid, eps_x slowest) robust
    accuracies: the first ``rate * N`` examples survive each budget."""
    exp = Experiment(
        methods=("standard", "pgd-at", "awp", "bound-reg"),
        **{name: BUDGETS for name in ("eps_x", "eps_w_absolute", "eps_w_relative")},
        eps_w_shared=BUDGETS,
        joint_eps_x=BUDGETS,
        joint_eps_w=BUDGETS,
    )
    models = []
    for method, seeds in rates.items():
        for seed, families in enumerate(seeds):
            outcomes = {
                f: [Outcomes.of(i < round(r * N) for i in range(N)) for r in values]
                for f, values in families.items()
            }
            key = {f: AtKeyBudget(o[1], o[1]) for f, o in outcomes.items()}
            models.append(
                Measured(
                    method=method,
                    seed=seed,
                    recipe=None,
                    clean=1.0,
                    clean_full_test=1.0,
                    train_seconds=1.0,
                    run_dir="",
                    checkpoint_sha256="",
                    reused=False,
                    accuracy={f: v for f, v in families.items() if f != "joint"},
                    joint=[families["joint"][i : i + 3] for i in (0, 3, 6)],
                    outcomes=outcomes,
                    stronger=key,
                )
            )
    data = DataInfo("fake", N, N, (1,), classes)
    return Results(exp, data, models, shared_attack=shared_attack)


def claim(results: Results, model: str, family: str):
    return next(v for v in verdicts(results) if v.model == model and v.family == family)


def shifted(base: dict[str, list[float]], family: str, points: float) -> dict[str, list[float]]:
    """``base`` with ``points`` added at every nonzero budget of ``family``."""
    out = {f: list(v) for f, v in base.items()}
    out[family] = [v if i == 0 else v + points / 100 for i, v in enumerate(out[family])]
    return out


def test_seeds_that_disagree_do_not_decide_a_claim_on_examples_alone():
    """As on the CNN: pgd-at above standard by 3.8, 5.4 and 1.5 points in three seeds. Over
    3,000 paired examples the bootstrap calls it clear; over three trained models it is not:
    the verdict is underpowered, with the t interval of a printed t table."""
    per_seed = (3.8, 5.4, 1.5)
    results = build(
        {
            "standard": [flat(0.5)] * 3,
            "pgd-at": [shifted(flat(0.5), "weight-absolute", d) for d in per_seed],
        }
    )
    v = claim(results, "pgd-at", "weight-absolute")
    assert v.p_examples < 0.01  # examples as replicates: "contradicted"
    assert v.verdict == "underpowered" and v.p > 0.05 and v.p_holm > 0.05
    assert v.unit == "seeds" and v.seeds == 3
    assert [100 * d for d in v.per_seed_differences] == pytest.approx(per_seed)
    mean, sd = np.mean(per_seed), np.std(per_seed, ddof=1)
    half = T_975_2 * sd / math.sqrt(3)
    assert [100 * b for b in v.interval] == pytest.approx([mean - half, mean + half], abs=1e-3)
    assert "-1.3 to +8.4 points, wider than ±2" in v.reason
    # one trained model per method: no claim about the method at all, however many examples
    one = build({"standard": [flat(0.5)], "pgd-at": [shifted(flat(0.5), "weight-absolute", 5)]})
    alone = claim(one, "pgd-at", "weight-absolute")
    assert alone.verdict == "needs seeds" and "3 seeds" in alone.reason and alone.p is None
    assert alone.p_examples < 0.01
    # seeds that agree decide it: pgd-at more robust, against the claim
    steady = build(
        {
            "standard": [flat(0.5)] * 3,
            "pgd-at": [shifted(flat(0.5), "weight-absolute", d) for d in (3.8, 4.0, 3.6)],
        }
    )
    assert claim(steady, "pgd-at", "weight-absolute").verdict == "contradicted"


def joint_grid(weights_only: float, inputs_only: float, joint: float) -> list[float]:
    """The 3 x 3 grid (eps_x slowest) around 50%: the weight-only row, the input-only column
    and the strictly joint cells shifted by the given points."""
    out = []
    for x in BUDGETS:
        for w in BUDGETS:
            shift = joint if x and w else weights_only if w else inputs_only if x else None
            out.append(1.0 if shift is None else 0.5 + shift / 100)
    return out


def test_the_joint_claim_averages_only_strictly_joint_cells():
    """bound-reg 20 points below standard on the weight-only row, 10 above on the input-only
    column, about 2 above on the four strictly joint cells: the claim is decided on those
    four (+2, supported); the single threats are reported apart."""
    standard = {**flat(0.5), "joint": joint_grid(0, 0, 0)}
    bound = [{**flat(0.5), "joint": joint_grid(-20, 10, d)} for d in (2.0, 2.2, 1.8)]
    results = build({"standard": [standard] * 3, "pgd-at": [standard] * 3, "bound-reg": bound})
    v = claim(results, "bound-reg", "joint")
    expected = [{"eps_x": x, "eps_w": w} for x in (0.1, 0.2) for w in (0.1, 0.2)]
    assert v.cells == expected and not v.floor_cells
    assert [(c["eps_x"], c["eps_w"]) for c in v.per_cell] == [
        (x, w) for x in BUDGETS[1:] for w in BUDGETS[1:]
    ]
    assert v.difference == pytest.approx(0.02)  # all nine cells: (8 - 40 + 20) / 8 = -1.5
    assert v.verdict == "supported"
    effects = {(e.method, e.view): e for e in single_threat(results)}
    row = effects[("bound-reg", "joint grid: weight-only row (eps_x = 0)")]
    column = effects[("bound-reg", "joint grid: input-only column (eps_w = 0)")]
    assert row.difference == pytest.approx(-0.20) and column.difference == pytest.approx(0.10)
    assert all(c.eps_x == 0 and c.eps_w > 0 for c in row.cells)
    text = "\n".join(single_threat_section(results, list(effects.values())))
    assert "| bound-reg |" in text and "-20.0 [-20.0, -20.0]" in text and "not claims" in text


@pytest.mark.parametrize("folder", ["docs/results", "docs/results-cnn"])
def test_no_shipped_joint_verdict_averages_a_single_threat_cell(folder):
    document = json.loads((ROOT / folder / "results.json").read_text())
    for c in document["claims"]:
        if c["family"] == "joint":
            assert all(cell["eps_x"] > 0 and cell["eps_w"] > 0 for cell in c["cells"]), c
            assert all(cell["eps_x"] > 0 and cell["eps_w"] > 0 for cell in c["per_cell"])
        if c["verdict"] in ("not run", "needs seeds"):
            continue
        assert c["seeds"] >= 3 and c["interval"] is not None
        if c["family"] == "bit-flips":  # flips to collapse: a count per seed, no budgets
            counts = (c["per_seed_model"], c["per_seed_standard"])
            assert not c["cells"] and all(len(v) == c["seeds"] for v in counts)
        else:
            assert c["cells"]


def test_floor_cells_are_marked_and_left_out_of_averages():
    """At eps_w = 0.2 both models are at 0% in every seed: the cell cannot show a difference,
    so the claim averages eps_w = 0.1 alone (-4 points, not -2). A cell at 0% in one seed
    only is kept; one shared perturbation's floor is a single class's share."""
    standard = {**flat(0.5), "weight-absolute": [1.0, 0.5, 0.0]}
    pgd = [{**flat(0.5), "weight-absolute": [1.0, 0.5 - d, 0.0]} for d in (0.04, 0.05, 0.03)]
    results = build({"standard": [standard] * 3, "pgd-at": pgd})
    v = claim(results, "pgd-at", "weight-absolute")
    assert v.cells == [{"eps_x": 0.0, "eps_w": 0.1}]
    assert v.floor_cells == [{"eps_x": 0.0, "eps_w": 0.2}]
    assert [c["floor"] for c in v.per_cell] == [False, True]
    assert v.difference == pytest.approx(-0.04) and v.metric_standard == pytest.approx(0.5)
    # one seed above 0 at eps_w = 0.2: not a floor cell
    pgd[1] = {**flat(0.5), "weight-absolute": [1.0, 0.45, 0.01]}
    assert not claim(
        build({"standard": [standard] * 3, "pgd-at": pgd}), "pgd-at", "weight-absolute"
    ).floor_cells
    # shared, by the earlier attack (stopped at a collapse to one class): 9% and 11% (two
    # single-class collapses) are the floor; 13% is not. By the strong shared attack, which
    # goes below one class's share, only 0% is
    low = {**flat(0.5), "weight-shared": [1.0, 0.5, 0.09]}
    for attack, other, floor in (
        ("single-class", 0.11, True),
        ("single-class", 0.13, False),
        ("strong", 0.11, False),
    ):
        high = {**flat(0.5), "weight-shared": [1.0, 0.46, other]}
        found = build({"standard": [low] * 3, "pgd-at": [high] * 3}, shared_attack=attack)
        v = claim(found, "pgd-at", "weight-shared")
        assert [c["floor"] for c in v.per_cell] == [False, floor]
        assert v.difference == pytest.approx(-0.04 if floor else (-0.04 + other - 0.09) / 2)
    zero = {**flat(0.5), "weight-shared": [1.0, 0.5, 0.0]}
    v = claim(build({"standard": [zero] * 3, "pgd-at": [zero] * 3}), "pgd-at", "weight-shared")
    assert [c["floor"] for c in v.per_cell] == [False, True]
    # every budget at the floor: nothing to decide on (with three seeds; with one, too few)
    floored = {**flat(0.5), "weight-shared": [1.0, 0.09, 0.09]}
    old = {"shared_attack": "single-class"}
    v = claim(
        build({"standard": [floored] * 3, "pgd-at": [floored] * 3}, **old),
        "pgd-at",
        "weight-shared",
    )
    assert v.verdict == "excluded" and "floor" in v.reason and v.difference is None
    v = claim(build({"standard": [floored], "pgd-at": [floored]}, **old), "pgd-at", "weight-shared")
    assert v.verdict == "needs seeds" and len(v.floor_cells) == 2


def test_an_undecided_claim_says_whether_its_interval_rules_out_a_difference():
    """Per-seed differences +0.5, -0.3, +0.2 points: interval about -0.9 to +1.1, inside
    ±2: no difference shown. 3.8 / 5.4 / 1.5 (above): underpowered."""
    assert EQUIVALENCE == 0.02  # the margin the docs and the report state
    results = build(
        {
            "standard": [flat(0.5)] * 3,
            "pgd-at": [shifted(flat(0.5), "weight-absolute", d) for d in (0.5, -0.3, 0.2)],
        }
    )
    v = claim(results, "pgd-at", "weight-absolute")
    assert v.verdict == "no difference shown" and v.p_holm > 0.05
    assert -0.02 < v.interval[0] < 0 < v.interval[1] < 0.02
    assert "-0.9 to +1.1 points, within ±2" in v.reason
    others = claim(results, "pgd-at", "weight-relative")  # identical models: 0 exactly
    assert others.verdict == "no difference shown" and others.interval == (0.0, 0.0)


def test_the_t_interval_over_seeds_matches_a_t_table_and_covers_95_percent():
    lo, hi = seeds_t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - T_975_2 / math.sqrt(3), 2 + T_975_2 / math.sqrt(3)))
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        lo, hi = seeds_t_interval(rng.normal(0.3, 1.0, size=3))
        covered += lo <= 0.3 <= hi
    assert 0.93 < covered / 2000 < 0.97


def test_each_claim_gets_a_forest_plot_and_a_per_budget_table(tmp_path):
    standard = {**flat(0.5), "weight-absolute": [1.0, 0.5, 0.0]}
    pgd = [{**flat(0.5), "weight-absolute": [1.0, 0.5 - d, 0.0]} for d in (0.04, 0.05, 0.03)]
    results = build({"standard": [standard] * 3, "pgd-at": pgd})
    claims = verdicts(results)
    paths = forest_figures(results, claims, tmp_path / "figures")
    measured = [i for i, c in enumerate(claims) if c.per_cell]
    assert (
        sorted(paths) == sorted(f"forest-{i}" for i in measured) and len(measured) == 3
    )  # pgd-at's three views
    for path in paths.values():
        assert (tmp_path / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = results.experiment.labels()
    text = "\n".join(per_budget_section(results, claims, labels, paths))
    assert "| 0 | 0.2 | 0.0% | 0.0% | +0.0 [+0.0, +0.0] | **floor: left out** |" in text
    assert "| 0 | 0.1 | 46.0% | 50.0% | -4.0 [-6.5, -1.5] |  |" in text
    assert "A floor cell is" in text and "forest_claim1_weight-absolute.png" in text


def test_results_say_which_shared_attack_made_them():
    """The shared attack is recorded and read back; files from before it was recorded read as
    the strong attack's; anything else is refused, never guessed."""
    from nonsingular.errors import ConfigError

    found = build({"standard": [flat(0.5)] * 3}, shared_attack="single-class")
    document = found.to_dict()
    assert Results.from_dict(document).shared_attack == "single-class"
    del document["shared_attack"]
    assert Results.from_dict(document).shared_attack == "strong"
    with pytest.raises(ConfigError, match="shared_attack must be one of strong, single-class"):
        Results.from_dict({**document, "shared_attack": "weak"})


def test_figure_bands_are_95_percent_t_intervals_of_the_mean_over_seeds():
    """A line's band at a budget is mean +- t(0.975, n - 1) sd / sqrt(n): with 3 seeds at
    10%, 20% and 30% (sd 10 points), t = 4.303 (a printed t table) gives 20 +- 24.84 points,
    not the +-10 of one sd."""
    from nonsingular.experiment.report.figures import _plot_lines
    from nonsingular.experiment.results import spread

    class Axes:
        def __init__(self):
            self.bands = []

        def plot(self, *args, **kwargs):
            pass

        def fill_between(self, x, low, high, **kwargs):
            self.bands.append((list(low), list(high)))

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    ax = Axes()
    _plot_lines(ax, (0.0, 0.1), {"standard": spread([[1.0, 0.1], [1.0, 0.2], [1.0, 0.3]])}, "", 3)
    ((low, high),) = ax.bands
    assert low[1] == pytest.approx(20 - 24.84, abs=0.01) and high[1] == pytest.approx(
        44.84, abs=0.01
    )
    assert low[0] == pytest.approx(100) and high[0] == pytest.approx(100)
