"""``nonsingular reproduce``: report, figures and JSON agree; verdicts come from the numbers."""

import json
import re
import struct

import pytest

from nonsingular import ConfigError, experiment
from nonsingular.experiment import Experiment, run_experiment
from nonsingular.report import cell, pct, write_report
from nonsingular.training import loop
from nonsingular.verdicts import CLAIMS, decide, verdicts

TINY = {
    "epochs": 1,
    "eval_size": 60,
    "cert_size": 12,
    "attack_steps": 3,
    "eps_x": (0.0, 0.05, 0.2),
    "eps_w_absolute": (0.0, 1e-3, 4e-3),
    "eps_w_relative": (0.0, 0.05, 0.2),
    "eps_w_shared": (0.0, 1e-2, 4e-2),
    "joint_eps_x": (0.0, 0.05),
    "joint_eps_w": (0.0, 1e-3),
}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    results = run_experiment(Experiment.quick(**TINY), out, say=lambda text: None)
    write_report(results, out, "nonsingular reproduce --quick (test)", "2026-11-25T00:00")
    return out, json.loads((out / "results.json").read_text())


def table_rows(report: str, heading: str, keys: int = 1) -> dict:
    """The rows of the first Markdown table after ``heading``, by their first ``keys`` cells."""
    section = report.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| model") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0] if keys == 1 else tuple(cells[:keys])] = cells[keys:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_report_figures_and_json_exist_and_agree(reproduced):
    out, results = reproduced
    report = (out / "report.md").read_text()
    for name in [
        "accuracy_vs_eps_x.png",
        "accuracy_vs_eps_w.png",
        "heatmaps.png",
        "attacked_vs_certified.png",
        *[f"heatmap_{m}.png" for m in experiment.COMPARISON],
    ]:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 250
        assert f"(figures/{name})" in report, name  # embedded or linked
    summary = results["summary"]
    for name, view in results["views"].items():
        rows = table_rows(report, f"## {view['label'][0].upper() + view['label'][1:]}")
        assert set(rows) == set(experiment.COMPARISON)
        for method, cells in rows.items():
            expected = [cell(summary["views"][name][method], i) for i in range(len(cells))]
            assert cells == expected, (name, method)
            raw = view["accuracy"][method]["0"]
            assert cells == [pct(v) for v in raw]  # one seed: the raw numbers themselves
    joint = table_rows(report, "Robust accuracy under joint attacks:", keys=2)
    assert len(joint) == len(experiment.COMPARISON) * len(results["joint"]["eps_x"])
    for (method, eps_x), cells in joint.items():
        i = [f"{x:g}" for x in results["joint"]["eps_x"]].index(eps_x)
        assert cells == [pct(v) for v in results["joint"]["accuracy"][method]["0"][i]]
    for c in results["certified"]["methods"]:
        certified = table_rows(report, f"Certified by {c}, on the first", keys=2)
        for (method, eps_x), cells in certified.items():
            i = [f"{x:g}" for x in results["certified"]["eps_x"]].index(eps_x)
            assert cells == [pct(v) for v in results["certified"]["accuracy"][c][method]["0"][i]]
    clean = table_rows(report, "## Clean accuracy")
    assert {m: c[0] for m, c in clean.items()} == {
        m: pct(results["models"][m]["0"]["clean"]) for m in experiment.COMPARISON
    }


def test_verdicts_in_the_report_are_those_computed_from_the_json(reproduced):
    out, results = reproduced
    report = (out / "report.md").read_text()
    recomputed = verdicts(results)
    assert [c["verdict"] for c in recomputed] == [c["verdict"] for c in results["claims"]]
    shown = re.findall(r"\*\*(supported|contradicted|inconclusive)\*\*", report)
    assert shown == [c["verdict"] for c in results["claims"]]
    assert len(shown) == len(CLAIMS) == 5
    assert "Rule:" in report and "2 se" in report
    for c in results["claims"]:
        assert f"{100 * c['difference']:+.1f}" in report


def test_certificates_sit_under_the_attack_on_the_same_examples(reproduced):
    _, results = reproduced
    certified = results["certified"]
    for method in experiment.COMPARISON:
        attacked = certified["attacked"][method]["0"]
        for c in certified["methods"]:
            for row_c, row_a in zip(certified["accuracy"][c][method]["0"], attacked, strict=True):
                assert all(cv <= av + 1e-12 for cv, av in zip(row_c, row_a, strict=True))
    assert not [w for w in results["warnings"] if "soundness" in w]


def test_rerun_reuses_models_and_evaluations(reproduced, monkeypatch):
    out, results = reproduced
    messages = []

    class NoTraining:
        def prepare(self, *args):
            return None  # checking that a model can be trained is not training it

        def loss(self, *args):
            raise AssertionError("a finished model was trained again")

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished evaluation was computed again")

    monkeypatch.setattr(loop, "make_method", lambda config: NoTraining())  # used by any step
    monkeypatch.setattr(experiment, "evaluate", no_evaluation)
    again = run_experiment(Experiment.quick(**TINY), out, say=messages.append)
    assert sum("reusing" in m for m in messages) == len(experiment.COMPARISON)
    assert again["views"] == results["views"] and again["joint"] == results["joint"]
    assert again["reused"] == {"models": 6, "of_models": 6, "evaluations": 36, "of_evaluations": 36}


def test_a_model_trained_with_other_options_is_not_silently_reused(reproduced):
    out, _ = reproduced
    with pytest.raises(ConfigError, match="other options"):
        run_experiment(Experiment.quick(**{**TINY, "epochs": 2}), out, say=lambda text: None)


def test_the_decision_rule():
    assert decide(-0.05, 0.01, -1) == "supported"
    assert decide(0.05, 0.01, -1) == "contradicted"
    assert decide(0.015, 0.01, -1) == "inconclusive"
    assert decide(0.03, 0.01, +1) == "supported"

    def fake(per_seed_pgd, per_seed_std, n=1000):
        budgets = [0.0, 1.0]
        views = {
            name: {
                "budgets": budgets,
                "accuracy": {
                    "pgd-at": {s: [1.0, a] for s, a in enumerate(per_seed_pgd)},
                    "standard": {s: [1.0, a] for s, a in enumerate(per_seed_std)},
                    "awp": {s: [1.0, a] for s, a in enumerate(per_seed_std)},
                    "bound-reg": {s: [1.0, a] for s, a in enumerate(per_seed_std)},
                },
            }
            for name in ("input", "weight-absolute", "weight-relative", "weight-shared")
        }
        for view in views.values():
            view["accuracy"] = {
                m: {str(s): v for s, v in acc.items()} for m, acc in view["accuracy"].items()
            }
        seeds = {str(s): {} for s in range(len(per_seed_pgd))}
        joint = {
            m: {str(s): [[1.0, 0.5], [0.5, 0.5]] for s in range(len(per_seed_pgd))}
            for m in ("standard", "bound-reg")
        }
        return {
            "data": {"test_examples": n},
            "views": views,
            "models": {m: seeds for m in ("pgd-at", "standard", "awp", "bound-reg")},
            "joint": {"accuracy": joint},
        }

    clear = verdicts(fake([0.30], [0.50]))[0]
    assert clear["verdict"] == "supported" and clear["difference"] == pytest.approx(-0.2)
    assert verdicts(fake([0.70], [0.50]))[0]["verdict"] == "contradicted"
    assert verdicts(fake([0.49], [0.50]))[0]["verdict"] == "inconclusive"
    # the same mean difference, but seeds that disagree, is not enough
    noisy = verdicts(fake([0.10, 0.60, 0.25], [0.35, 0.40, 0.35]))[0]
    assert noisy["difference"] == pytest.approx(-0.05) and noisy["verdict"] == "inconclusive"
    steady = verdicts(fake([0.30, 0.31, 0.29], [0.35, 0.36, 0.34], n=5000))[0]
    assert steady["verdict"] == "supported"
    assert verdicts(fake([0.3], [0.3]))[4]["verdict"] == "inconclusive"  # bound-reg = standard


def test_experiment_refuses_a_comparison_without_its_models():
    with pytest.raises(ConfigError, match="needs the pgd-at model"):
        Experiment(methods=("standard", "awp", "bound-reg"))
    with pytest.raises(ConfigError, match="seeds"):
        Experiment(seeds=0)
