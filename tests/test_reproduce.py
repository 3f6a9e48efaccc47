"""``nonsingular reproduce``: report, figures and JSON agree; verdicts come from the numbers."""

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest

from nonsingular import ConfigError, Outcomes, experiment
from nonsingular.experiment import (
    AtKeyBudget,
    DataInfo,
    Experiment,
    Measured,
    Results,
    report,
    run_experiment,
    spread,
)
from nonsingular.experiment import run as running
from nonsingular.experiment.report import write_report
from nonsingular.experiment.report.figures import HEATMAP
from nonsingular.experiment.report.summary import cell, pct
from nonsingular.experiment.report.text import recipe_section, stronger_attack
from nonsingular.experiment.verdicts import CLAIMS, verdicts
from nonsingular.training import loop

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
    "flips": (),  # no bit-flip family here (tests/test_flip_family.py), so no flip-at either
}
# the methods the experiment compares by default without the bit-flip family
COMPARED = Experiment.quick(**TINY).methods


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    results = run_experiment(Experiment.quick(**TINY), out, say=lambda text: None)
    write_report(results, out, ["reproduce", "--quick", "(test)"])
    document = json.loads((out / "results.json").read_text())
    return out, Results.from_dict(document), document


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
    out, results, document = reproduced
    report = (out / "report.md").read_text()
    for name in [
        "accuracy_vs_eps_x.png",
        "accuracy_vs_eps_w.png",
        "heatmaps.png",
        "attacked_vs_certified.png",
        *[f"heatmap_{m}.png" for m in COMPARED],
    ]:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 250
        assert f"(figures/{name})" in report, name  # embedded or linked
    exp = results.experiment
    summary = document["summary"]
    for family in exp.families():
        rows = table_rows(report, f"## {family.label[0].upper() + family.label[1:]}")
        assert set(rows) == set(COMPARED)
        for method, cells in rows.items():
            (model,) = results.of(method)
            assert cells == [pct(v) for v in model.accuracy[family.name]]  # one seed: raw
            means = summary["families"][family.name][method]["mean"]
            assert means == model.accuracy[family.name]
    joint = table_rows(report, "Robust accuracy under joint attacks:", keys=2)
    assert len(joint) == len(COMPARED) * len(exp.joint_eps_x)
    for (method, eps_x), cells in joint.items():
        i = [f"{x:g}" for x in exp.joint_eps_x].index(eps_x)
        assert cells == [pct(v) for v in results.of(method)[0].joint[i]]
    for c in exp.certify:
        certified = table_rows(report, f"Certified by {c}, on the first", keys=2)
        for (method, eps_x), cells in certified.items():
            i = [f"{x:g}" for x in exp.joint_eps_x].index(eps_x)
            assert cells == [pct(v) for v in results.of(method)[0].certified[c][i]]
    clean = table_rows(report, "## Clean accuracy")
    assert {m: c[0] for m, c in clean.items()} == {m: pct(results.of(m)[0].clean) for m in COMPARED}


def test_the_report_shows_the_verdicts_and_numbers_of_the_json(reproduced):
    out, results, document = reproduced
    report = (out / "report.md").read_text()
    shown = re.findall(
        r"\*\*(supported|contradicted|no difference shown|underpowered|needs seeds|excluded)\*\*",
        report,
    )
    assert shown == [c["verdict"] for c in document["claims"]]
    assert len(shown) == len(CLAIMS) == 6  # claim 2 on awp and on weight-at
    assert "Rule:" in report and "Holm" in report and "paired" in report
    for c in document["claims"]:
        if c["difference"] is not None:  # None: every budget a floor cell (one epoch)
            assert f"{100 * c['difference']:+.1f}" in report
    # the stronger check ran at every family's key budget, for every model
    assert "## Stronger attack" in report and "verdicts change with the stronger attack" in report
    for family, threat in results.experiment.key_threats().items():
        for method in COMPARED:
            found = results.of(method)[0].stronger[family]
            assert len(found.stronger) == TINY["eval_size"], family
            if threat.scope == "shared":  # the worse of two whole perturbations
                assert found.stronger.count <= found.default.count
            else:  # example by example
                assert all(s <= d for s, d in zip(found.stronger, found.default, strict=True))
    # the claims again on models trained without augmentation, beside the default recipe
    assert "## Sensitivity to the recipe" in report and "no-augmentation (augment=0)" in report
    assert set(results.methods("no-augmentation")) == {
        "standard",
        "pgd-at",
        "awp",
        "weight-at",
        "bound-reg",
    }
    info = json.loads((out / "models/seed0/no-augmentation/pgd-at/config.json").read_text())
    assert info["config"]["augment"] == 0
    (plain,) = results.of("pgd-at", "no-augmentation")
    assert len(plain.outcomes["joint"]) == 4 and not plain.certified  # the 2 x 2 joint grid
    # every main model under every method's training threat, its own in bold in the report
    own = results.experiment.training_threats()
    assert own and "## Matched comparisons" in report
    for model in results.models:
        assert set(model.matched) == (set(own) if model.recipe is None else set())
    matched = table_rows(report, "## Matched comparisons")
    for method in own:
        (model,) = results.of(method)
        column = list(own).index(method)
        assert matched[method][column] == f"**{pct(model.matched[method])}**"
    # one seed: the shared view cannot be judged, and says why
    shared = [c for c in document["claims"] if c["family"] == "weight-shared"]
    assert shared[0]["verdict"] == "needs seeds" and "3 seeds" in shared[0]["reason"]
    # per-example outcomes are in the JSON: one 0/1 per attacked example, per budget
    (standard,) = results.of("standard")
    bits = standard.outcomes["weight-absolute"]
    assert len(bits) == len(TINY["eps_w_absolute"])
    assert all(len(b) == TINY["eval_size"] and set(b.bits) <= {"0", "1"} for b in bits)
    accuracy = standard.accuracy["weight-absolute"]
    assert [b.rate for b in bits] == pytest.approx(accuracy)


def test_results_say_where_they_came_from(reproduced):
    out, results, _ = reproduced
    run = results.run
    assert run["command"] == "nonsingular reproduce --quick '(test)'"
    assert run["nonsingular"] and run["torch"] and "CPU cores" in run["machine"]
    assert results.data.split == "test" and results.data.split_seed == 0
    for model in results.models:
        weights = out / model.run_dir / "model.safetensors"
        assert model.checkpoint_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    report = (out / "report.md").read_text()
    seeds = "1 seed"
    assert report.count(f"{TINY['eval_size']} mnist5k test examples, {seeds}") >= 3  # captions


def test_the_json_reads_back_into_the_results_it_was_written_from(reproduced):
    _, results, document = reproduced
    assert Results.from_dict(results.to_dict()) == results
    assert {k: document[k] for k in results.to_dict()} == results.to_dict()
    assert (
        len(results.models) == len(COMPARED) + 5
    )  # standard, pgd-at, awp, weight-at, bound-reg again, without augmentation


def test_certificates_sit_under_the_attack_on_the_same_examples(reproduced):
    _, results, _ = reproduced
    for model in results.models:
        if model.recipe is not None:
            continue
        for c in results.experiment.certify:
            for row_c, row_a in zip(model.certified[c], model.certified_attacked, strict=True):
                assert all(cv <= av + 1e-12 for cv, av in zip(row_c, row_a, strict=True))
    assert not [w for w in results.warnings if "soundness" in w]


def test_rerun_reuses_models_and_evaluations(reproduced, monkeypatch):
    out, results, _ = reproduced
    messages = []

    class NoTraining:
        def prepare(self, *args):
            return None  # checking that a model can be trained is not training it

        def loss(self, *args):
            raise AssertionError("a finished model was trained again")

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished evaluation was computed again")

    monkeypatch.setattr(loop, "make_method", lambda config: NoTraining())  # used by any step
    monkeypatch.setattr(running, "evaluate", no_evaluation)
    again = run_experiment(Experiment.quick(**TINY), out, say=messages.append)
    # the comparison's models, and the five claim models trained without augmentation
    assert sum("reusing" in m for m in messages) == len(COMPARED) + 5
    for model, earlier in zip(again.models, results.models, strict=True):
        assert model.accuracy == earlier.accuracy and model.joint == earlier.joint
        assert model.outcomes == earlier.outcomes and model.certified == earlier.certified
    # per main model: 4 views, the joint grid, its certificates, the training threats, 5 key
    # budgets attacked harder (12 each); per recipe model: 4 views and the joint grid (5 x 5)
    main = len(COMPARED)
    assert all(m.reused for m in again.models) and len(again.models) == main + 5
    assert sum(m.evaluations_reused for m in again.models) == 12 * main + 25
    assert sum(m.evaluations_computed for m in again.models) == 0


def test_a_model_trained_with_other_options_is_not_silently_reused(reproduced):
    out, _, _ = reproduced
    with pytest.raises(ConfigError, match="other options"):
        run_experiment(Experiment.quick(**{**TINY, "epochs": 2}), out, say=lambda text: None)


FAMILIES = ("input", "weight-absolute", "weight-relative", "weight-shared", "joint")


def fake(
    survivors: dict[str, list[range | set]],
    n: int = 1000,
    recipe: str | None = None,
    stronger: dict[str, list] | None = None,
) -> Results:
    """Results as the verdicts read them: per method, per seed, the examples that survive
    every nonzero budget of every family (all survive at budget 0); ``stronger``: per method
    and seed, the survivors of the default and the stronger attack together at the key
    budgets (the default attack's there are ``survivors``)."""
    everyone = Outcomes("1" * n)

    def bits(alive) -> Outcomes:
        return Outcomes.of(i in alive for i in range(n))

    exp = Experiment(
        methods=("standard", "pgd-at", "awp", "bound-reg"),
        attack_steps=10,
        **{name: (0.0, 0.1) for name in experiment.BUDGETS},
    )
    models = []
    for method, per_seed in survivors.items():
        for seed, alive in enumerate(per_seed):
            outcomes = {f.name: [everyone, bits(alive)] for f in exp.families()}
            outcomes["joint"] = [everyone, *[bits(alive)] * 3]  # grid (0,0), (0,1), (1,0), (1,1)
            after = bits(stronger[method][seed]) if stronger else bits(alive)
            models.append(
                Measured(
                    method=method,
                    seed=seed,
                    recipe=recipe,
                    clean=0.9,
                    clean_full_test=0.9,
                    train_seconds=1.0,
                    run_dir="",
                    checkpoint_sha256="",
                    reused=False,
                    accuracy={f: [1.0, len(alive) / n] for f in outcomes if f != "joint"},
                    joint=[[1.0, len(alive) / n], [len(alive) / n] * 2],
                    outcomes=outcomes,
                    stronger={f: AtKeyBudget(bits(alive), after) for f in outcomes},
                )
            )
    return Results(exp, DataInfo("fake", n, n, (1,), 10), models)


def by_family(results: Results, **options) -> dict:
    return {(c.model, c.family): c for c in verdicts(results, **options)}


def test_a_small_difference_on_the_same_examples_is_significant_when_paired():
    """pgd-at survives exactly the standard model's survivors but 40 of 1,000 (50% vs 46%):
    the old unpaired two-binomial margin (2 se = 4.5 points) called this inconclusive. One
    seed cannot speak for a training method (needs seeds), though the paired bootstrap over
    its examples sees the difference; three seeds that agree decide it."""
    half = range(500)
    one = by_family(fake({"standard": [half], "pgd-at": [range(460)]}))
    claim = one[("pgd-at", "weight-absolute")]
    assert claim.difference == pytest.approx(-0.04) and claim.seeds == 1
    assert claim.verdict == "needs seeds" and claim.p is None and claim.p_examples < 0.01
    three = {"standard": [half] * 3, "pgd-at": [range(460), range(455), range(465)]}
    claim = by_family(fake(three))[("pgd-at", "weight-absolute")]
    assert claim.verdict == "supported" and claim.p_holm < 0.05
    assert claim.unit == "seeds" and claim.seeds == 3
    flipped = {"standard": three["pgd-at"], "pgd-at": [half] * 3}
    assert by_family(fake(flipped))[("pgd-at", "weight-absolute")].verdict == "contradicted"
    same = by_family(fake({"standard": [half] * 3, "pgd-at": [half] * 3}))
    assert same[("pgd-at", "weight-absolute")].verdict == "no difference shown"
    assert same[("awp", "input")].verdict == "not run"


def test_every_claim_replicates_over_seeds():
    """A large difference in one seed is not evidence about a method, whatever the family;
    three seeds that agree are tested by their per-seed differences, three that do not are
    too few to say."""
    one = by_family(fake({"standard": [range(500)], "pgd-at": [range(300)]}))
    assert one[("pgd-at", "weight-shared")].verdict == "needs seeds"
    assert one[("pgd-at", "weight-absolute")].verdict == "needs seeds"
    steady = {"standard": [range(500)] * 3, "pgd-at": [range(300), range(310), range(290)]}
    shared = by_family(fake(steady))[("pgd-at", "weight-shared")]
    assert shared.unit == "seeds" and shared.seeds == 3
    assert shared.verdict == "supported" and shared.p_examples is None  # examples not apart
    wild = {"standard": [range(500)] * 3, "pgd-at": [range(100), range(900), range(480)]}
    assert by_family(fake(wild))[("pgd-at", "weight-shared")].verdict == "underpowered"


def test_holm_turns_a_lone_small_p_into_undecided_among_more_claims():
    """pgd-at 4.0, 3.2 and 4.8 points below standard in three seeds (t-test p about 0.013):
    significant with its three views tested (Holm x3), not with five claims (x5) when awp
    and bound-reg are measured too."""
    standard = [range(500)] * 3
    pgd = [range(460), range(468), range(452)]
    alone = by_family(fake({"standard": standard, "pgd-at": pgd}))
    assert 0.01 < alone[("pgd-at", "weight-absolute")].p < 0.0166
    assert alone[("pgd-at", "weight-absolute")].verdict == "supported"
    more = by_family(
        fake({"standard": standard, "pgd-at": pgd, "awp": standard, "bound-reg": standard})
    )
    claim = more[("pgd-at", "weight-absolute")]
    assert claim.p == pytest.approx(alone[("pgd-at", "weight-absolute")].p)
    assert claim.p_holm > 0.05 and claim.verdict == "underpowered"


def test_a_verdict_that_rests_on_a_weak_attack_is_shown_to_change():
    """pgd-at looks 4 points less robust under the default attack, but the stronger attack
    breaks 40 more of the standard model's examples: the difference vanishes, the verdict
    moves from supported to no difference shown, and the report's section says so."""
    pgd = [range(460), range(455), range(465)]
    results = fake(
        {"standard": [range(500)] * 3, "pgd-at": pgd},
        stronger={"standard": pgd, "pgd-at": pgd},
    )
    before = by_family(results, attack="default")
    after = by_family(results, attack="stronger")
    assert before[("pgd-at", "weight-absolute")].verdict == "supported"
    assert after[("pgd-at", "weight-absolute")].verdict == "no difference shown"
    assert after[("pgd-at", "weight-absolute")].difference == 0
    text = "\n".join(stronger_attack(results, {f: f for f in FAMILIES}))
    assert "## Stronger attack" in text and "PGD-20, 2 restarts" in text
    assert "50.0% → 46.0%" in text  # the standard model, default → stronger
    assert "3 of 6 verdicts change with the stronger attack" in text  # pgd-at's three views, of 6
    steady = fake(
        {"standard": [range(500)] * 3, "pgd-at": pgd},
        stronger={"standard": [range(500)] * 3, "pgd-at": pgd},
    )
    assert "0 of 6 verdicts change" in "\n".join(stronger_attack(steady, {f: f for f in FAMILIES}))


def test_an_undertrained_model_is_kept_out_of_verdicts_and_adjusted_figures_shown():
    """The same outcomes, but pgd-at right on only 70% of clean examples: excluded, with the
    reason; the clean-adjusted difference divides each model's robust accuracy by its clean."""
    results = fake({"standard": [range(500)] * 3, "pgd-at": [range(460)] * 3})
    fine = by_family(results)[("pgd-at", "weight-absolute")]
    assert fine.verdict == "supported"
    assert fine.difference_clean_adjusted == pytest.approx(0.46 / 0.9 - 0.5 / 0.9)
    for pgd in results.of("pgd-at"):
        pgd.clean = 0.7
    claim = by_family(results)[("pgd-at", "weight-absolute")]
    assert (
        claim.verdict == "excluded" and "pgd-at's clean accuracy 70.0% is below 80%" in claim.reason
    )
    assert claim.p is None and claim.difference == pytest.approx(-0.04)  # numbers still shown
    assert claim.difference_clean_adjusted == pytest.approx(0.46 / 0.7 - 0.5 / 0.9)  # +0.1
    # the other tested claim (relative weights) is no longer corrected for this one
    others = by_family(results)
    assert others[("pgd-at", "weight-relative")].verdict == "excluded"
    for standard, pgd in zip(results.of("standard"), results.of("pgd-at"), strict=True):
        standard.clean, pgd.clean = 0.5, 0.9
    low = by_family(results)[("pgd-at", "weight-absolute")]
    assert low.verdict == "excluded" and "standard's clean accuracy 50.0%" in low.reason


def test_the_gap_between_attacked_and_certified_is_shown_per_certificate():
    """The report's gap table: attacked minus certified accuracy, per model and certificate,
    its mean over the joint grid and its largest value with where it is."""
    results = fake({"standard": [range(900)], "pgd-at": [range(900)]})
    for model in results.models:
        model.certified_attacked = [[0.9, 0.8], [0.7, 0.5]]
        model.certified = {"ibp": [[0.9, 0.2], [0.1, 0.0]], "crown": [[0.9, 0.8], [0.6, 0.1]]}
    results.models[1].certified["crown"] = [[0.9, 0.8], [0.7, 0.5]]  # no gap left
    text = "\n".join(
        report.text.certified_section(results, report.summarize(results), {"certified": "f"})
    )
    rows = table_rows(text, "The gap:")
    assert rows["standard"] == ["42.5; 60.0 at (0, 0.1)", "12.5; 40.0 at (0.1, 0.1)"]
    assert rows["pgd-at"] == ["42.5; 60.0 at (0, 0.1)", "0.0; 0.0 at (0, 0)"]


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
    [[0.1, 0.05], [0, -0.1], [0, 0], [], [0, float("nan")], [0, True], "0.1", [0, 10**400]],
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
    (tmp_path / "ok.toml").write_text("certify = ['ibp']\n")  # the flag overrides the file
    code = main(["reproduce", "--config", str(tmp_path / "ok.toml"), "--certify", "crown,lp"])
    err = capsys.readouterr().err
    assert code == 2 and "certify must be one of" in err and "got 'lp'" in err


@pytest.mark.parametrize("certify", [["lp"], [], "crown", ["crown", 3]])
def test_the_certificates_of_an_experiment_are_checked(certify):
    with pytest.raises(ConfigError, match="certify must be"):
        Experiment.from_dict({"certify": certify})
    assert Experiment.from_dict({"certify": ["alpha-crown", "bab"]}).certify == (
        "alpha-crown",
        "bab",
    )


def test_a_claim_that_moves_with_the_training_recipe_is_shown_to():
    """Default recipe: pgd-at 4 points below standard (supported); without augmentation the
    two are equal: the section shows both verdicts and counts the change."""
    results = fake({"standard": [range(500)] * 3, "pgd-at": [range(460)] * 3})
    plain = fake(
        {"standard": [range(500)] * 3, "pgd-at": [range(500)] * 3}, recipe="no-augmentation"
    )
    results.models += plain.models
    claims = verdicts(results)
    assert by_family(results, recipe="no-augmentation")[("pgd-at", "weight-absolute")].p > 0.5
    text = "\n".join(recipe_section(results, claims, {f: f for f in FAMILIES}))
    row = next(line for line in text.splitlines() if line.startswith("| 1 | weight-absolute"))
    assert "supported (-4.0 points)" in row and "no difference shown (+0.0 points)" in row
    assert "no-augmentation (augment=0)" in text
    assert "3 of 6 verdicts differ between recipes" in text  # pgd-at's three views


def test_the_toml_example_in_the_docs_is_a_valid_experiment(tmp_path):
    docs = (Path(__file__).parent.parent / "docs" / "reproduce.md").read_text()
    block = docs.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "exp.toml").write_text(block)
    exp = Experiment.from_toml(tmp_path / "exp.toml")
    assert exp.model == "cnn" and exp.attack_restarts == 2 and exp.recipes == ("no-augmentation",)


def test_the_summary_over_seeds_is_mean_and_sample_sd_elementwise():
    per_seed = [[[0.5, 0.6]], [[0.7, 0.8]], [[0.9, 1.0]]]  # three seeds, 1 x 2 matrices
    summary = spread(per_seed)
    assert summary.mean[0] == pytest.approx([0.7, 0.8]) and len(summary.mean) == 1
    assert summary.sd[0] == pytest.approx([0.2, 0.2])
    assert cell(summary, 0, 1) == "80.0% ± 20.0"
    one = spread([[0.25, 0.5]])
    assert one.sd is None and cell(one, 1) == "50.0%"  # one seed: no spread shown


def test_certificates_cached_by_other_bound_code_are_recomputed(reproduced, monkeypatch, tmp_path):
    """A change to the bound code changes ``certificates.REVISION``: every cached certificate
    table is computed again, every attack is still reused."""
    import shutil

    out, results, _ = reproduced
    shutil.copytree(out, tmp_path / "copy")
    monkeypatch.setattr(running, "BOUNDS_REVISION", running.BOUNDS_REVISION + "-changed")
    again = run_experiment(Experiment.quick(**TINY), tmp_path / "copy", say=lambda text: None)
    main_models = [m for m in again.models if m.recipe is None]
    assert sum(m.evaluations_computed for m in again.models) == len(main_models)
    for model, earlier in zip(again.models, results.models, strict=True):
        assert model.certified == earlier.certified  # the same bound code: the same numbers


def test_attacks_cached_by_other_attack_code_are_recomputed(reproduced, monkeypatch, tmp_path):
    """A change to the attack code (the shared attack's objective, say) changes
    ``ATTACK_REVISION``: every cached attack table is computed again, every certificate is
    still reused, and the same code gives the same numbers."""
    import shutil

    out, results, _ = reproduced
    shutil.copytree(out, tmp_path / "copy")
    monkeypatch.setattr(running, "ATTACK_REVISION", running.ATTACK_REVISION + "-changed")
    again = run_experiment(Experiment.quick(**TINY), tmp_path / "copy", say=lambda text: None)
    main_models = [m for m in again.models if m.recipe is None]
    computed = sum(m.evaluations_computed for m in again.models)
    reused = sum(m.evaluations_reused for m in again.models)
    assert reused == len(main_models)  # the certificate tables only
    assert computed > 0 and computed + reused == sum(
        m.evaluations_computed + m.evaluations_reused for m in results.models
    )
    for model, earlier in zip(again.models, results.models, strict=True):
        assert model.joint == earlier.joint and model.outcomes == earlier.outcomes


def _luminance(rgb) -> float:
    """Relative luminance (WCAG) of an sRGB colour in [0, 1]."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_figures_read_without_colour_vision():
    """The heatmap's colours rise in lightness from low to high accuracy (so they read in
    greyscale and without red-green vision: a red-to-green map does not), and every model's
    line differs from every other one by its marker."""
    import matplotlib

    from nonsingular.experiment import report

    def lightness(name: str) -> list[float]:
        cmap = matplotlib.colormaps[name]
        return [_luminance(cmap(i / 20)) for i in range(21)]

    shades = lightness(HEATMAP)
    assert all(a < b for a, b in zip(shades, shades[1:], strict=False))
    red_green = lightness("RdYlGn")
    assert not all(a < b for a, b in zip(red_green, red_green[1:], strict=False))
    colors, markers = zip(*(report.style(method) for method in experiment.COMPARISON), strict=True)
    assert len(set(colors)) == len(colors) and len(set(markers)) == len(markers)


def test_bit_flip_methods_join_the_default_comparison_only_with_the_bit_flip_family():
    """A bit-flip training method is compared by default where the experiment measures the
    bit-flip family (the threat it trains for); without the family (``flips = []``) it is left
    out (it would be judged only on threats it was not built for), and can still be asked for."""
    from nonsingular.training import METHODS

    flips = [m for m, entry in METHODS.items() if entry.flips]
    assert flips and Experiment().flips and set(flips) <= set(Experiment().methods)
    assert not set(flips) & set(Experiment(flips=()).methods)
    chosen = Experiment(flips=(), methods=("standard", "pgd-at", "awp", *flips)).methods
    assert set(flips) <= set(chosen)


def test_the_cnn_is_certified_by_crown_over_its_own_intermediate_bounds(small_cnn, mnist):
    """``reproduce --model cnn`` certifies with crown over CROWN's own intermediate bounds: on
    a small joint grid, as the experiment evaluates it, crown certifies examples at every
    budget, never one the attack breaks, and at no budget fewer than over interval boxes
    (strictly more at the joint one)."""
    from nonsingular import evaluate, grid
    from nonsingular.certificates import CertifyOptions

    exp = Experiment.quick(model="cnn", joint_eps_x=(0.0, 0.02), joint_eps_w=(0.0, 5e-4))
    assert exp.intermediate == "crown" and "crown" in exp.certify
    x, y = mnist.x_test[:16], mnist.y_test[:16]
    threats = grid(exp.joint_eps_x, exp.joint_eps_w)
    own = evaluate(
        small_cnn,
        (x, y),
        threats,
        exp.attack_options(),
        certify=["crown"],
        certify_options=exp.certify_options(),
        progress=False,
    )
    boxes = evaluate(
        small_cnn,
        (x, y),
        threats,
        None,
        certify=["crown"],
        certify_options=CertifyOptions(intermediate="ibp", dtype=exp.certify_options().dtype),
        progress=False,
    )
    for row, interval in zip(own.rows, boxes.rows, strict=True):
        assert 0 < row.certified["crown"] <= row.attacked, row.threat.describe()
        assert row.certified["crown"] >= interval.certified["crown"], row.threat.describe()
        assert not any(row.unsound.values())
    assert own.rows[-1].certified["crown"] > boxes.rows[-1].certified["crown"]
