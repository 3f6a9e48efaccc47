"""``nonsingular reproduce``: report, figures and JSON agree; verdicts come from the numbers."""

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest

from nonsingular import ConfigError, experiment
from nonsingular.experiment import Experiment, run_experiment
from nonsingular.report import cell, pct, recipe_section, stronger_attack, write_report
from nonsingular.training import loop
from nonsingular.verdicts import CLAIMS, at_key_budgets, verdicts

TINY = {
    "epochs": 1,
    "eval_size": 60,
    "cert_size": 12,
    "attack_steps": 3,
    "min_clean": 0.0,  # one epoch: no model is trained enough for the stated threshold
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
    write_report(results, out, ["reproduce", "--quick", "(test)"])
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


def test_the_report_shows_the_verdicts_and_numbers_of_the_json(reproduced):
    out, results = reproduced
    report = (out / "report.md").read_text()
    shown = re.findall(
        r"\*\*(supported|contradicted|inconclusive|needs seeds|excluded)\*\*", report
    )
    assert shown == [c["verdict"] for c in results["claims"]]
    assert len(shown) == len(CLAIMS) == 5
    assert "Rule:" in report and "Holm" in report and "paired" in report
    for c in results["claims"]:
        assert f"{100 * c['difference']:+.1f}" in report
    # the stronger check ran at every family's key budget, for every model
    assert "## Stronger attack" in report and "verdicts change with the stronger attack" in report
    for family, entry in results["stronger"].items():
        for method in experiment.COMPARISON:
            found = entry["outcomes"][method]["0"]
            assert len(found["stronger"]) == TINY["eval_size"], family
            if entry["threat"]["scope"] == "shared":  # the worse of two whole perturbations
                assert found["stronger"].count("1") <= found["default"].count("1")
            else:  # example by example
                assert all(s <= d for s, d in zip(found["stronger"], found["default"], strict=True))
    # the claims again on models trained without augmentation, beside the default recipe
    assert "## Sensitivity to the recipe" in report and "no-augmentation (augment=0)" in report
    plain = results["recipes"]["no-augmentation"]
    assert set(plain["models"]) == {"standard", "pgd-at", "awp", "bound-reg"}
    info = json.loads((out / "models/seed0/no-augmentation/pgd-at/config.json").read_text())
    assert info["config"]["augment"] == 0
    assert len(plain["outcomes"]["joint"]["pgd-at"]["0"]) == 4  # the 2 x 2 joint grid
    # one seed: the shared view cannot be judged, and says why
    shared = [c for c in results["claims"] if c["family"] == "weight-shared"]
    assert shared[0]["verdict"] == "needs seeds" and "3 seeds" in shared[0]["reason"]
    # per-example outcomes are in the JSON: one 0/1 per attacked example, per budget
    bits = results["outcomes"]["weight-absolute"]["standard"]["0"]
    assert len(bits) == len(TINY["eps_w_absolute"])
    assert all(len(b) == TINY["eval_size"] and set(b) <= {"0", "1"} for b in bits)
    accuracy = results["views"]["weight-absolute"]["accuracy"]["standard"]["0"]
    assert [b.count("1") / len(b) for b in bits] == pytest.approx(accuracy)


def test_results_say_where_they_came_from(reproduced):
    out, results = reproduced
    run = results["run"]
    assert run["command"] == "nonsingular reproduce --quick '(test)'"
    assert run["nonsingular"] and run["torch"] and "CPU cores" in run["machine"]
    assert results["data"]["split"] == "test" and results["data"]["split_seed"] == 0
    for seeds in results["models"].values():
        weights = out / seeds["0"]["run_dir"] / "model.safetensors"
        assert seeds["0"]["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    report = (out / "report.md").read_text()
    seeds = "1 seed"
    assert report.count(f"{TINY['eval_size']} mnist5k test examples, {seeds}") >= 3  # captions


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
    # the six models, and the four claim models trained without augmentation
    assert sum("reusing" in m for m in messages) == len(experiment.COMPARISON) + 4
    assert again["views"] == results["views"] and again["joint"] == results["joint"]
    for part in ("views", "joint", "outcomes"):
        assert (
            again["recipes"]["no-augmentation"][part] == results["recipes"]["no-augmentation"][part]
        )
    # per main model: 4 views, the joint grid, its certificates, the training threats, 5 key
    # budgets attacked harder (6 x 12); per recipe model: 4 views and the joint grid (4 x 5)
    assert again["reused"] == {
        "models": 10,
        "of_models": 10,
        "evaluations": 92,
        "of_evaluations": 92,
    }


def test_a_model_trained_with_other_options_is_not_silently_reused(reproduced):
    out, _ = reproduced
    with pytest.raises(ConfigError, match="other options"):
        run_experiment(Experiment.quick(**{**TINY, "epochs": 2}), out, say=lambda text: None)


FAMILIES = ("input", "weight-absolute", "weight-relative", "weight-shared", "joint")


def fake(survivors: dict[str, list[range | set]], n: int = 1000) -> dict:
    """results.json as the verdicts read it: per method, per seed, the examples that survive
    every nonzero budget of every family (all survive at budget 0)."""
    everyone = "1" * n

    def bits(alive) -> str:
        return "".join("1" if i in alive else "0" for i in range(n))

    outcomes = {
        family: {
            m: {str(s): [everyone, bits(alive)] for s, alive in enumerate(per_seed)}
            for m, per_seed in survivors.items()
        }
        for family in FAMILIES[:-1]
    }
    outcomes["joint"] = {  # grid (0, 0), (0, 1), (1, 0), (1, 1): budget 0 first
        m: {str(s): [everyone, *[bits(alive)] * 3] for s, alive in enumerate(per_seed)}
        for m, per_seed in survivors.items()
    }
    views = {
        f: {"budgets": [0.0, 1.0], "threat": {"scope": "shared"} if f == "weight-shared" else {}}
        for f in FAMILIES[:-1]
    }
    return {
        "experiment": {"min_clean": 0.8},
        "models": {
            m: {str(s): {"clean": 0.9} for s in range(len(v))} for m, v in survivors.items()
        },
        "views": views,
        "joint": {"eps_x": [0.0, 1.0], "eps_w": [0.0, 1.0]},
        "outcomes": outcomes,
    }


def by_family(results: dict) -> dict:
    return {(c.model, c.family): c for c in verdicts(results)}


def test_a_small_difference_on_the_same_examples_is_significant_when_paired():
    """pgd-at survives exactly the standard model's survivors but 40 of 1,000 (50% vs 46%):
    the old unpaired two-binomial margin (2 se = 4.5 points) called this inconclusive."""
    half = range(500)
    got = by_family(fake({"standard": [half], "pgd-at": [range(460)]}))
    claim = got[("pgd-at", "weight-absolute")]
    assert claim.difference == pytest.approx(-0.04)
    assert claim.verdict == "supported" and claim.p_holm < 0.01
    assert claim.unit == "examples" and claim.seeds == 1
    flipped = by_family(fake({"standard": [range(460)], "pgd-at": [half]}))
    assert flipped[("pgd-at", "weight-absolute")].verdict == "contradicted"
    same = by_family(fake({"standard": [half], "pgd-at": [half]}))
    assert same[("pgd-at", "weight-absolute")].verdict == "inconclusive"
    assert same[("awp", "input")].verdict == "not run"


def test_the_shared_view_replicates_over_seeds_only():
    """One shared perturbation: a large difference in one seed is not evidence; three seeds
    that agree are tested by their per-seed differences."""
    one = by_family(fake({"standard": [range(500)], "pgd-at": [range(300)]}))
    assert one[("pgd-at", "weight-shared")].verdict == "needs seeds"
    assert one[("pgd-at", "weight-absolute")].verdict == "supported"  # per example: fine
    steady = {"standard": [range(500)] * 3, "pgd-at": [range(300), range(310), range(290)]}
    shared = by_family(fake(steady))[("pgd-at", "weight-shared")]
    assert shared.unit == "seeds" and shared.seeds == 3
    assert shared.verdict == "supported"
    wild = {"standard": [range(500)] * 3, "pgd-at": [range(100), range(900), range(480)]}
    assert by_family(fake(wild))[("pgd-at", "weight-shared")].verdict == "inconclusive"


def test_holm_turns_a_lone_small_p_into_inconclusive_among_more_claims():
    """pgd-at loses 24 examples and gains 10 (McNemar z = 2.4, p about 0.016): significant with
    two tested claims (Holm x2), not with four (x4) when awp and bound-reg are measured too."""
    standard = set(range(500))
    pgd = (standard - set(range(24))) | set(range(500, 510))
    alone = by_family(fake({"standard": [standard], "pgd-at": [pgd]}))
    assert 0.005 < alone[("pgd-at", "weight-absolute")].p < 0.03
    assert alone[("pgd-at", "weight-absolute")].verdict == "supported"
    more = by_family(
        fake({"standard": [standard], "pgd-at": [pgd], "awp": [standard], "bound-reg": [standard]})
    )
    claim = more[("pgd-at", "weight-absolute")]
    assert claim.p == pytest.approx(alone[("pgd-at", "weight-absolute")].p)
    assert claim.p_holm > 0.05 and claim.verdict == "inconclusive"


def with_stronger(results: dict, stronger: dict[str, list], n: int = 1000) -> dict:
    """``results`` (from ``fake``) with key budgets: the default attack's outcomes are the
    family's nonzero budget; ``stronger`` gives per method and seed the survivors of both."""

    def bits(alive) -> str:
        return "".join("1" if i in alive else "0" for i in range(n))

    results["stronger"] = {
        family: {
            "threat": {
                "eps_x": 1.0 if family in ("input", "joint") else 0.0,
                "eps_w": 0.0 if family == "input" else 1.0,
                **results["views"].get(family, {}).get("threat", {}),
            },
            "outcomes": {
                m: {
                    s: {"default": o[-1], "stronger": bits(stronger[m][int(s)])}
                    for s, o in results["outcomes"][family][m].items()
                }
                for m in results["models"]
            },
        }
        for family in FAMILIES
    }
    for family in FAMILIES[:-1]:
        results["views"][family]["axis"] = "eps_x" if family == "input" else "eps_w"
        results["views"][family]["label"] = family
    results["attack"] = {"steps": 10, "restarts": 1, "loss": "both"}
    results["stronger_attack"] = {"steps": 20, "restarts": 2, "loss": "both"}
    return results


def test_a_verdict_that_rests_on_a_weak_attack_is_shown_to_change():
    """pgd-at looks 4 points less robust under the default attack, but the stronger attack
    breaks 40 more of the standard model's examples: the difference vanishes, the verdict
    moves from supported to inconclusive, and the report's section says so."""
    results = with_stronger(
        fake({"standard": [range(500)], "pgd-at": [range(460)]}),
        {"standard": [range(460)], "pgd-at": [range(460)]},
    )
    before = {(v.model, v.family): v for v in at_key_budgets(results, "default")}
    after = {(v.model, v.family): v for v in at_key_budgets(results, "stronger")}
    assert before[("pgd-at", "weight-absolute")].verdict == "supported"
    assert after[("pgd-at", "weight-absolute")].verdict == "inconclusive"
    assert after[("pgd-at", "weight-absolute")].difference == 0
    text = "\n".join(stronger_attack(results, {f: f for f in FAMILIES}))
    assert "## Stronger attack" in text and "PGD-20, 2 restarts" in text
    assert "50.0% → 46.0%" in text  # the standard model, default → stronger
    assert "2 of 5 verdicts change with the stronger attack" in text  # absolute and relative
    steady = with_stronger(
        fake({"standard": [range(500)], "pgd-at": [range(460)]}),
        {"standard": [range(500)], "pgd-at": [range(460)]},
    )
    assert "0 of 5 verdicts change" in "\n".join(stronger_attack(steady, {f: f for f in FAMILIES}))


def test_an_undertrained_model_is_kept_out_of_verdicts_and_adjusted_figures_shown():
    """The same outcomes, but pgd-at right on only 70% of clean examples: excluded, with the
    reason; the clean-adjusted difference divides each model's robust accuracy by its clean."""
    results = fake({"standard": [range(500)], "pgd-at": [range(460)]})
    fine = by_family(results)[("pgd-at", "weight-absolute")]
    assert fine.verdict == "supported"
    assert fine.difference_clean_adjusted == pytest.approx(0.46 / 0.9 - 0.5 / 0.9)
    results["models"]["pgd-at"]["0"]["clean"] = 0.7
    claim = by_family(results)[("pgd-at", "weight-absolute")]
    assert (
        claim.verdict == "excluded" and "pgd-at's clean accuracy 70.0% is below 80%" in claim.reason
    )
    assert claim.p is None and claim.difference == pytest.approx(-0.04)  # numbers still shown
    assert claim.difference_clean_adjusted == pytest.approx(0.46 / 0.7 - 0.5 / 0.9)  # +0.1
    # the other tested claim (relative weights) is no longer corrected for this one
    others = by_family(results)
    assert others[("pgd-at", "weight-relative")].verdict == "excluded"
    results["models"]["standard"]["0"]["clean"] = 0.5
    results["models"]["pgd-at"]["0"]["clean"] = 0.9
    assert (
        "standard's clean accuracy 50.0%" in by_family(results)[("pgd-at", "input")].reason
        if ("pgd-at", "input") in by_family(results)
        else True
    )


def test_experiment_refuses_a_comparison_without_its_models():
    with pytest.raises(ConfigError, match="needs the pgd-at model"):
        Experiment(methods=("standard", "awp", "bound-reg"))
    with pytest.raises(ConfigError, match="seeds"):
        Experiment(seeds=0)


def test_an_experiment_comes_from_a_toml_file_and_flags_override_it(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(
        'methods = ["standard", "pgd-at", "awp"]\n'
        "eps-x = [0, 0.03, 0.3]\n"
        "attack-steps = 7\n"
        "seeds = 2\n"
    )
    exp = Experiment.from_toml(path)
    assert exp.methods == ("standard", "pgd-at", "awp") and exp.eps_x == (0, 0.03, 0.3)
    assert exp.attack_steps == 7 and exp.seeds == 2 and exp.epochs == 20
    quick = Experiment.from_toml(path, quick=True)
    assert quick.epochs == 5 and quick.eps_x == (0, 0.03, 0.3)  # the file wins over quick
    (tmp_path / "bad.toml").write_text("eps-x = [0, 0.1]\nstpes = 3\n")
    with pytest.raises(ConfigError, match="unknown experiment options: stpes"):
        Experiment.from_toml(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    "budgets",
    [[0.1, 0.05], [0, -0.1], [0, 0], [], [0, float("nan")], [0, True], "0.1"],
)
def test_budget_lists_are_checked(budgets):
    with pytest.raises(ConfigError, match="increasing non-negative"):
        Experiment.from_dict({"joint_eps_w": budgets})


def test_reproduce_config_flag_reads_the_file_and_refuses_a_bad_one(tmp_path, capsys):
    from nonsingular.cli import main

    (tmp_path / "bad.toml").write_text("cert-dtype = 'float16'\n")
    code = main(["reproduce", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "cert_dtype" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written
    code = main(["reproduce", "--config", str(tmp_path / "none.toml")])
    assert code == 2 and "config file not found" in capsys.readouterr().err


def test_a_claim_that_moves_with_the_training_recipe_is_shown_to():
    """Default recipe: pgd-at 4 points below standard (supported); without augmentation the
    two are equal: the section shows both verdicts and counts the change."""
    results = fake({"standard": [range(500)], "pgd-at": [range(460)]})
    plain = fake({"standard": [range(500)], "pgd-at": [range(500)]})
    results["recipes"] = {"no-augmentation": {**plain, "changes": {"augment": 0}}}
    claims = verdicts(results)
    text = "\n".join(recipe_section(results, claims, {f: f for f in FAMILIES}))
    row = next(line for line in text.splitlines() if line.startswith("| 1 | weight-absolute"))
    assert "supported (-4.0 points)" in row and "inconclusive (+0.0 points)" in row
    assert "no-augmentation (augment=0)" in text
    assert "2 of 5 verdicts differ between recipes" in text  # absolute and relative views


def test_the_toml_example_in_the_docs_is_a_valid_experiment(tmp_path):
    docs = (Path(__file__).parent.parent / "docs" / "reproduce.md").read_text()
    block = docs.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "exp.toml").write_text(block)
    exp = Experiment.from_toml(tmp_path / "exp.toml")
    assert exp.model == "cnn" and exp.attack_restarts == 2 and exp.recipes == ("no-augmentation",)
