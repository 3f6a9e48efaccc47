"""The experiment's bit-flip family (``experiment.flipfamily``): measured in a tiny ``reproduce``
run, its numbers those of the library's own attacks, every flip set replayable, cached and
checked like an evaluation, read back from ``results.json``, reported, and claim 1 asked of
bit flips decided over seeds inside the Holm correction."""

import dataclasses
import json
import shutil
import statistics

import pytest
import torch
from scipy import stats as scipy_stats
from torch.func import functional_call

import nonsingular as ns
from nonsingular import CheckpointError, ConfigError, Outcomes, checkpoint
from nonsingular.data import load
from nonsingular.experiment import (
    BUDGETS,
    DataInfo,
    Experiment,
    Measured,
    Results,
    addflips,
    flipfamily,
    run_experiment,
)
from nonsingular.experiment import run as running
from nonsingular.experiment.config import FLIPS
from nonsingular.experiment.flipfamily import FlipFamily
from nonsingular.experiment.report import readme, write_report
from nonsingular.experiment.report import text as text_report
from nonsingular.experiment.report.flips import flip_section, flip_summary
from nonsingular.experiment.verdicts import FLIP_EQUIVALENCE, FlipVerdict, verdicts
from nonsingular.flips.grid import flipped_weights, quantized

SMALL = {
    "methods": ("standard", "pgd-at", "awp"),
    "epochs": 1,
    "eval_size": 40,
    "cert_size": 8,
    "attack_steps": 2,
    "min_clean": 0.0,
    "recipes": (),
    "stronger": False,
    "certify": ("ibp",),
    "eps_x": (0.0, 0.1),
    "eps_w_absolute": (0.0, 2e-3),
    "eps_w_relative": (0.0, 0.1),
    "eps_w_shared": (0.0, 2e-2),
    "joint_eps_x": (0.0, 0.1),
    "joint_eps_w": (0.0, 2e-3),
    "flips": (0, 2, 8),
    "flip_draws": 4,
    "flip_limit": 40,
}


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flips")
    torch.set_num_threads(1)  # one thread: the searches below are the same searches
    results = run_experiment(Experiment.quick(**SMALL), out, say=lambda text: None)
    write_report(results, out, ["reproduce", "(test)"])
    document = json.loads((out / "results.json").read_text())
    return out, results, document


def _replayed(q: torch.nn.Module, x, y, flips) -> float:
    """Accuracy of ``q`` with ``flips`` applied, each example run alone: the weights rebuilt
    from the flipped integers, independently of the experiment's code."""
    grid = quantized(q)
    params = {n: p.detach() for n, p in q.named_parameters()}
    params.update(flipped_weights(grid, grid.integers(q), list(flips)))
    with torch.no_grad():
        right = [
            int(functional_call(q, params, (x[i : i + 1],)).argmax(1)[0] == y[i])
            for i in range(len(y))
        ]
    return sum(right) / len(right)


def _quantized(out, model) -> torch.nn.Module:
    return ns.quantize(checkpoint.load(out / model.run_dir / "model.safetensors")[0])


def test_the_family_is_measured_on_every_model_and_reported(family_run):
    out, results, document = family_run
    exp = results.experiment
    assert "flip-at" in Experiment.quick().methods  # compared by default with the family
    for model in results.models:
        family = model.bit_flips
        assert family is not None and family.counts == exp.flips == (0, 2, 8)
        assert family.draws == 4 and family.limit == 40 and family.bits == 8
        assert family.target == pytest.approx(1 / 10 + 0.01)
        assert family.search[0] == family.clean == family.fault_mean[0]
        assert all(lo <= m <= hi for lo, m, hi in zip(*_faults(family), strict=True))
    report = (out / "report.md").read_text()
    assert "## Bit flips" in report and "(figures/accuracy_vs_flips.png)" in report
    png = (out / "figures" / "accuracy_vs_flips.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
        for line in report.split("Flips to collapse, over seeds:")[1].split("\n\n")[1].splitlines()
        if line.startswith("| ") and not line.startswith("| model")
    }
    for method in exp.methods:
        (model,) = results.of(method)
        count = model.bit_flips.collapse
        assert rows[method][-1] == (f">{exp.flip_limit}" if count is None else str(count))
    summary = {e["method"]: e for e in document["bit_flips"]}
    assert set(summary) == set(exp.methods)
    claim = [c for c in document["claims"] if c["family"] == FLIPS]
    assert len(claim) == 1 and claim[0]["model"] == "pgd-at" and claim[0]["metric"]
    assert claim[0]["verdict"] in ("needs seeds", "excluded")  # one seed: nothing to decide


def _faults(family: FlipFamily):
    return family.fault_low, family.fault_mean, family.fault_high


def test_results_json_reads_back_and_an_old_one_without_the_family_still_reports(
    family_run, tmp_path
):
    out, results, document = family_run
    again = Results.from_dict(document)
    assert again == results and again.models[0].bit_flips == results.models[0].bit_flips
    old = json.loads(json.dumps(document))  # as a run made before the family wrote it
    for name in ("flips", "flip_draws", "flip_limit"):
        del old["experiment"][name]
    for model in old["models"]:
        del model["bit_flips"]
    before = Results.from_dict(old)
    assert before.experiment.flips == () and all(m.bit_flips is None for m in before.models)
    assert before.experiment.methods == results.experiment.methods
    write_report(before, tmp_path, rewrite=True)
    written = json.loads((tmp_path / "results.json").read_text())
    assert "flips" not in written["experiment"] and "bit_flips" not in written
    assert all("bit_flips" not in m for m in written["models"])
    assert not [c for c in written["claims"] if c["family"] == FLIPS]
    assert "## Bit flips" not in (tmp_path / "report.md").read_text()


def _check(q: torch.nn.Module, x, y, family: FlipFamily, seed: int) -> None:
    """The search's accuracy at each count is ``ns.attack``'s shared bit search with that many
    flips, the random faults are ``method="noise"``'s draws, and every stored flip set gives
    the stored accuracy when applied to the quantized model by hand."""
    for i, k in enumerate(family.counts):
        used = family.search_flips[: family.search_used[i]]
        assert _replayed(q, x, y, used) == pytest.approx(family.search[i], abs=1e-6)
        if k == 0:
            continue
        found = ns.attack(q, x, y, ns.Threat(flips=k, scope="shared"))
        assert found.robust_accuracy == pytest.approx(family.search[i], abs=1e-6)
        assert found.bit_flips(0) == list(used)
        noise = ns.attack(
            q, x, y, ns.Threat(flips=k, scope="shared"), method="noise", samples=4, seed=seed
        )
        assert float(noise.accuracy_trace.mean()) == pytest.approx(family.fault_mean[i])
        assert float(noise.accuracy_trace.min()) == pytest.approx(family.fault_low[i])
    replayed = _replayed(q, x, y, family.collapse_flips)
    assert replayed == pytest.approx(family.collapse_replayed, abs=1e-6)
    if family.collapse is None:
        assert len(family.collapse_flips) == family.limit and replayed > family.target
    else:  # the fewest flips of the search that do it
        assert len(family.collapse_flips) == family.collapse and replayed <= family.target
        assert _replayed(q, x, y, family.collapse_flips[:-1]) > family.target


def test_the_numbers_are_those_of_the_librarys_attacks_and_every_flip_set_replays(family_run):
    out, results, _ = family_run
    data = load("mnist5k", seed=0)
    x, y = data.x_test[: SMALL["eval_size"]], data.y_test[: SMALL["eval_size"]]
    for model in results.models:
        _check(_quantized(out, model), x, y, model.bit_flips, model.seed)


def test_a_collapse_within_the_curve_is_the_fewest_flips_and_replays():
    """A small MLP trained for a few seconds collapses on a dozen digits within the curve's
    largest count: the curve then comes from a search of its own (to that count), and the
    collapse count is the fewest of the search's flips that reach the target."""
    data = load("mnist5k", seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(300):
        rows = torch.randint(0, len(data.y_train), (128,))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data.x_train[rows]), data.y_train[rows])
        loss.backward()
        opt.step()
    q = ns.quantize(model.eval())
    x, y = data.x_test[:12], data.y_test[:12]
    exp = Experiment.quick(flips=(0, 2, 8, 64), flip_draws=4, flip_limit=40)
    found = flipfamily.measure_flips(q, x, y, exp, seed=3)
    assert found.collapse is not None and found.collapse < max(exp.flips)
    assert found.search[-1] <= found.target < found.search[0]
    _check(q, x, y, found, 3)


def test_the_family_is_cached_and_a_damaged_entry_is_recomputed_not_trusted(
    family_run, tmp_path, monkeypatch
):
    out, results, _ = family_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = copy / "evals" / "seed0" / "standard.json"
    entries = json.loads(path.read_text())
    (digest,) = [d for d, e in entries.items() if e["key"]["kind"] == "bit-flips"]
    key = entries[digest]["key"]
    assert key["attack_code"] == running.ATTACK_REVISION and len(key["quantized"]) == 16
    entries[digest]["value"]["collapse"] = 3  # edited by hand: its checksum no longer holds
    path.write_text(json.dumps(entries))
    calls = []
    measure = flipfamily.measure_flips

    def counted(q, *args, **kwargs):
        calls.append(flipfamily.quantized_digest(q))
        return measure(q, *args, **kwargs)

    monkeypatch.setattr(running, "measure_flips", counted)
    said = []
    again = run_experiment(Experiment.quick(**SMALL), copy, say=said.append)
    assert len(calls) == 1 and calls[0] == key["quantized"]  # the damaged one only
    assert any("damaged or was edited" in text for text in said)
    for model, earlier in zip(again.models, results.models, strict=True):
        assert model.bit_flips.collapse == earlier.bit_flips.collapse
        assert model.bit_flips.search == earlier.bit_flips.search
    # a family whose checksum holds but whose numbers do not fit together is refused
    entries = json.loads(path.read_text())
    value = entries[digest]["value"]
    value["search"] = value["search"][:-1]
    entries[digest]["sha256"] = running._sha256([entries[digest]["key"], value])
    path.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match="one value per flip count"):
        run_experiment(Experiment.quick(**SMALL), copy, say=lambda text: None)


def test_other_attack_code_recomputes_the_family(family_run, tmp_path, monkeypatch):
    out, results, _ = family_run
    shutil.copytree(out, tmp_path / "copy")
    calls = []
    monkeypatch.setattr(running, "ATTACK_REVISION", running.ATTACK_REVISION + "-changed")
    measure = flipfamily.measure_flips
    monkeypatch.setattr(
        running, "measure_flips", lambda *a, **k: calls.append(1) or measure(*a, **k)
    )
    again = run_experiment(Experiment.quick(**SMALL), tmp_path / "copy", say=lambda text: None)
    assert len(calls) == len(results.models)
    for model, earlier in zip(again.models, results.models, strict=True):
        assert model.bit_flips.collapse_flips == earlier.bit_flips.collapse_flips


def _without_the_family(out, copy) -> Results:
    """``out`` copied to ``copy`` as a run made without the family would have left it."""
    shutil.copytree(out, copy)
    results = Results.from_dict(json.loads((copy / "results.json").read_text()))
    results.experiment = dataclasses.replace(results.experiment, flips=())
    for model in results.models:
        model.bit_flips = None
    write_report(results, copy, rewrite=True)
    return results


def test_the_family_is_added_to_a_finished_run_from_its_checkpoints(
    family_run, tmp_path, monkeypatch
):
    """``addflips`` measures the family of a run made without it, from the run's checkpoints,
    through the cache a ``reproduce`` run keeps (here every entry is reused: the same models
    and settings), and writes the report again, saying when and by what it was added."""
    out, results, _ = family_run
    before = _without_the_family(out, tmp_path / "run")
    assert "## Bit flips" not in (tmp_path / "run" / "report.md").read_text()
    monkeypatch.setattr(running, "measure_flips", lambda *a, **k: pytest.fail("recomputed"))
    settings = {name: SMALL[name] for name in ("flips", "flip_draws", "flip_limit")}
    added = addflips.add_flip_family(
        tmp_path / "run", settings=settings, command="addflips (test)", say=lambda text: None
    )
    for model, earlier, plain in zip(added.models, results.models, before.models, strict=True):
        assert model.bit_flips == earlier.bit_flips
        assert model.accuracy == plain.accuracy and model.outcomes == plain.outcomes
    document = json.loads((tmp_path / "run" / "results.json").read_text())
    assert Results.from_dict(document) == added and document["run"]["bit_flips"]["command"]
    assert document["run"]["command"] == results.run["command"]  # the run's own provenance
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Bit flips" in report and "by `addflips (test)`" in report


def test_adding_the_family_refuses_a_changed_checkpoint_and_a_missing_run(
    family_run, tmp_path, capsys
):
    out, results, _ = family_run
    _without_the_family(out, tmp_path / "run")
    run = tmp_path / "run"
    standard, other = (run / m.run_dir for m in results.models[:2])
    written = (run / "results.json").read_text()
    for name in ("model.safetensors", "model.json"):  # another model, its own sidecar beside
        shutil.copy(other / name, standard / name)
    with pytest.raises(ConfigError, match="not the checkpoint the run measured"):
        addflips.add_flip_family(run, say=lambda text: None)
    for name in ("model.safetensors", "model.json"):  # its own again, one byte changed
        shutil.copy(out / results.models[0].run_dir / name, standard / name)
    data = (standard / "model.safetensors").read_bytes()
    (standard / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="changed or damaged"):
        addflips.add_flip_family(run, say=lambda text: None)
    assert (run / "results.json").read_text() == written  # nothing rewritten
    with pytest.raises(ConfigError, match="unknown bit-flip settings: flipz"):
        addflips.add_flip_family(tmp_path / "run", settings={"flipz": 3})
    assert addflips.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no results.json" in err[0]


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"flips": [4, 2]}, "flips must be"),
        ({"flips": [0, -1]}, "flips must be"),
        ({"flips": [0, 1.5]}, "flips must be"),
        ({"flips": [0, True]}, "flips must be"),
        ({"flips": [0]}, "flips must be"),
        ({"flips": "8"}, "flips must be"),
        ({"flip_draws": 0}, "flip_draws must be"),
        ({"flip-limit": "many"}, "flip_limit must be"),
        ({"flip_limit": 0}, "flip_limit must be"),
    ],
)
def test_bad_family_settings_are_refused(settings, words):
    with pytest.raises(ConfigError, match=words):
        Experiment.from_dict(settings)


def test_the_cli_refuses_a_bad_family_before_writing_anything(tmp_path, capsys):
    from nonsingular.cli import main

    (tmp_path / "bad.toml").write_text("flips = [0, 8, 4]\n")
    out = tmp_path / "o"
    code = main(["reproduce", "--config", str(tmp_path / "bad.toml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "flips must be" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    (tmp_path / "none.toml").write_text("flips = []\n")  # no family: no flip-at by default
    assert "flip-at" not in Experiment.from_toml(tmp_path / "none.toml").methods


def _family(collapse: int | None, limit: int = 400) -> FlipFamily:
    flips = tuple(("0.weight", i, 7) for i in range(collapse or limit))
    return FlipFamily(
        counts=(0, 1),
        clean=0.9,
        search=(0.9, 0.8),
        search_used=(0, 1),
        search_flips=flips[:1],
        fault_mean=(0.9, 0.9),
        fault_sd=(0.0, 0.0),
        fault_low=(0.9, 0.9),
        fault_high=(0.9, 0.9),
        draws=2,
        target=0.11,
        collapse=collapse,
        collapse_flips=flips,
        collapse_replayed=0.1 if collapse else 0.5,
        limit=limit,
    )


def _counted(counts: dict[str, list[int | None]]) -> Results:
    """Results whose models differ only in their flips to collapse (every attacked family
    equal for every model, so only the bit-flip claim can be decided)."""
    exp = Experiment(
        methods=("standard", "pgd-at", "awp"),
        attack_steps=10,
        stronger=False,
        recipes=(),
        **{name: (0.0, 0.1) for name in BUDGETS},
    )
    half = Outcomes("1" * 500 + "0" * 500)
    outcomes = {f.name: [Outcomes("1" * 1000), half] for f in exp.families()}
    outcomes["joint"] = [Outcomes("1" * 1000), half, half, half]
    models = [
        Measured(
            method=method,
            seed=seed,
            recipe=None,
            clean=0.9,
            clean_full_test=0.9,
            train_seconds=1.0,
            run_dir="",
            checkpoint_sha256="",
            reused=False,
            accuracy={f: [1.0, 0.5] for f in outcomes if f != "joint"},
            joint=[[1.0, 0.5], [0.5, 0.5]],
            outcomes=outcomes,
            bit_flips=_family(count),
        )
        for method, per_seed in counts.items()
        for seed, count in enumerate(per_seed)
    ]
    return Results(exp, DataInfo("fake", 1000, 1000, (1,), 10), models)


def _flip_claim(results: Results) -> FlipVerdict:
    (claim,) = [c for c in verdicts(results) if c.family == FLIPS]
    assert isinstance(claim, FlipVerdict)
    return claim


def test_the_flip_claim_replicates_over_seeds_not_examples():
    """pgd-at needs fewer flips than standard in every one of three seeds (10, 5 and 15 fewer):
    each flips-to-collapse count is measured on 500 examples, but the examples are not the
    replicates: the t-test over the three per-seed differences (p about 0.07, from scipy
    here) leaves it undecided, and six seeds of the same pattern decide it."""
    three = _flip_claim(_counted({"standard": [100] * 3, "pgd-at": [90, 95, 85]}))
    assert three.unit == "seeds" and three.seeds == 3
    assert three.per_seed_differences == (-10.0, -5.0, -15.0)
    expected = scipy_stats.ttest_1samp([-10, -5, -15], 0.0).pvalue
    assert three.p == pytest.approx(expected) and 0.05 < expected < 0.1
    assert three.verdict == "underpowered" and "flips" in three.reason
    assert three.metric_model == 90 and three.metric_standard == 100
    six = _flip_claim(_counted({"standard": [100] * 6, "pgd-at": [90, 95, 85] * 2}))
    assert six.verdict == "supported" and six.p_holm < 0.05
    more = _flip_claim(_counted({"standard": [100] * 6, "pgd-at": [110, 105, 115] * 2}))
    assert more.verdict == "contradicted"
    same = _flip_claim(_counted({"standard": [100] * 6, "pgd-at": [99, 101, 100] * 2}))
    assert same.verdict == "no difference shown"
    assert same.margin == pytest.approx(FLIP_EQUIVALENCE * 100)
    two = _flip_claim(_counted({"standard": [100] * 2, "pgd-at": [50, 50]}))
    assert two.verdict == "needs seeds" and two.p is None
    open_ = _flip_claim(_counted({"standard": [100, None, 100], "pgd-at": [90, 95, 85]}))
    assert open_.verdict == "excluded" and "did not collapse within 400" in open_.reason


def test_the_flip_claim_is_holm_adjusted_with_the_other_claims():
    """With pgd-at's three weight views tested too (their p-values 1: equal models), the flip
    claim's p is multiplied by the four claims tested (it is the smallest), by hand here."""
    results = _counted({"standard": [100] * 4, "pgd-at": [80, 85, 90, 82]})
    claims = verdicts(results)
    tested = [c for c in claims if c.p is not None]
    flip = _flip_claim(results)
    assert len(tested) == 4 and {c.family for c in tested} >= {FLIPS, "weight-absolute"}
    assert flip.p_holm == pytest.approx(min(1.0, 4 * flip.p))
    assert flip.p < 0.05 / 4 and flip.verdict == "supported"


def test_the_readme_and_the_report_state_the_flip_claim_from_its_numbers():
    results = _counted({"standard": [100] * 4, "pgd-at": [80, 85, 90, 82]})
    flip = _flip_claim(results)
    text = "\n".join(readme.block("docs/x", results))
    assert "pgd-at needs fewer bit flips to collapse than standard" in text
    assert f"{flip.metric_model:.1f} flips" in text and f"{flip.difference:+.1f} flips" in text
    assert "80 vs 100, 85 vs 100, 90 vs 100, 82 vs 100" in text
    assert "fewer in 4 of 4 seeds" in text
    labels = results.experiment.labels()
    table = "\n".join(text_report.verdict_section(verdicts(results), labels))
    (row,) = [line for line in table.splitlines() if "bit flips" in line and line[:4] == "| 1 "]
    assert f"{statistics.fmean([80, 85, 90, 82]):.1f} flips" in row and "**supported**" in row
    assert "Claim 1 asked of bit flips" in table
    section = "\n".join(flip_section(results, flip_summary(results), {"flips": "f.png"}))
    assert "## Bit flips" in section and "| pgd-at | 90.0% | 90.0% | 83.5 | 80-90 |" in section
