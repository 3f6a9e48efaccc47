"""Training: every method learns, the bound regularizer does its job, runs survive SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import nonsingular as ns
from nonsingular import CheckpointError, ConfigError, Threat, checkpoint
from nonsingular.certificates import closed_form_terms
from nonsingular.cli import build_parser
from nonsingular.data import load
from nonsingular.experiment import Experiment
from nonsingular.experiment.verdicts import CLAIMS
from nonsingular.files import write_bytes
from nonsingular.model import read_model
from nonsingular.training import METHODS, TrainConfig, TrainingMethod, build_model, train
from nonsingular.training.config import read_toml
from nonsingular.training.methods import Standard
from nonsingular.training.registry import make_method

from .conftest import malicious_pickle

QUICK = {"epochs": 2, "hidden": (64, 64), "eval_size": 100}


@pytest.fixture(scope="module")
def initial_accuracy(mnist):
    model = build_model(TrainConfig(**QUICK).resolved(), mnist)
    return ns.training.accuracy(model.eval(), mnist.x_test, mnist.y_test)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_an_mlp_beyond_its_initialization(method, mnist, initial_accuracy):
    result = train(TrainConfig(method=method, **QUICK), mnist, progress=False)
    first, last = result.history[0], result.history[-1]
    assert len(result.history) == 2 and not result.model.training
    assert last["test_accuracy"] > initial_accuracy + 0.1, (method, last)
    assert last["loss"] < first["loss"]
    if method != "standard":  # the cheap robust accuracy runs under the training threat
        assert last["robust_accuracy"] is not None and last["eval_threat"]


def test_bound_regularizer_lowers_the_weight_term(mnist):
    threat = Threat(eps_x=0.1, eps_w=1e-3)
    quick = {"epochs": 2, "hidden": (64, 64), "eval_size": 0}
    standard = train(TrainConfig(**quick), mnist, progress=False).model
    regularized = train(
        TrainConfig(method="bound-reg", lambda_x=0.0, lambda_w=0.05, **quick), mnist, progress=False
    ).model
    x, y = mnist.x_test[:200], mnist.y_test[:200]

    def weight_term(model):
        terms = closed_form_terms(read_model(model, x), x, y, threat)
        wrong = torch.ones_like(terms.margins, dtype=torch.bool).scatter(1, y[:, None], False)
        return float(terms.weight_term[wrong].mean())

    assert weight_term(regularized) < 0.5 * weight_term(standard)
    assert ns.training.accuracy(regularized, x, y) > 0.5


# a small, fast run on sklearn's digits, and each robust method's own threat there (the
# defaults are for MNIST): pgd-at input, joint-at and ibp joint, awp relative shared weights,
# weight-at per-example absolute weights
DIGITS = {"data": "digits", "hidden": (64,), "epochs": 3, "batch_size": 64, "lr": 1e-2}
ROBUST = {
    "pgd-at": {"eps_x": 0.1, "attack_steps": 5},
    "joint-at": {"eps_x": 0.05, "eps_w": 5e-3, "attack_steps": 5},
    "awp": {"eps_w": 0.1},
    "weight-at": {"eps_w": 2e-2, "attack_steps": 5},
    "ibp": {"eps_x": 0.05, "eps_w": 5e-3},
}


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def digits_standard(digits):
    config = TrainConfig(**DIGITS, augment=0, eval_size=0)
    return train(config, digits, progress=False).model


@pytest.mark.parametrize("method", ROBUST)
def test_each_robust_method_beats_standard_training_under_its_own_threat(
    method, digits, digits_standard
):
    config = TrainConfig(method=method, **DIGITS, **ROBUST[method], augment=0, eval_size=0)
    robust = train(config, digits, progress=False).model
    threat = config.resolved_threat()  # the threat it trained against
    x, y = digits.x_test, digits.y_test  # 359 examples

    def attacked(model):
        return ns.attack(model, x, y, threat, steps=20, loss="both").robust_accuracy

    # measured 7 to 26 points over seeds 0-2; an inner attack that returns its starting point
    # (or ibp's bound at a zero budget) trains a standard model again: under 5 points
    assert attacked(robust) > attacked(digits_standard) + 0.05, method


def test_pgd_at_refuses_a_weight_budget_it_would_not_train_with():
    with pytest.raises(ConfigError, match="pgd-at trains with eps_w = 0.0 only; got 0.001"):
        TrainConfig(method="pgd-at", eps_w=1e-3)
    config = TrainConfig(method="pgd-at", eps_x=0.05)
    assert config.resolved().eps_w == 0.0  # what the run records
    assert make_method(config).threat.eps_w == 0.0  # what it trains with
    assert config.eval_threat().eps_w == 0.0  # what each epoch evaluates
    assert TrainConfig(method="pgd-at", eps_w=0.0).resolved().eps_w == 0.0


class Tiny(Standard):
    """A throwaway method: standard training under another name."""


def test_the_registry_drives_every_list_of_methods(monkeypatch, capsys):
    from nonsingular.experiment import report

    entry = TrainingMethod(
        Tiny,
        "a throwaway method",
        "#123456",
        "*",
        defaults={"eps_x": 0.02, "attack_steps": 3},
        forced={"eps_w": 0.0},
        attacks=True,
        mlp_only="it is only a test",
        recipes=True,
    )
    claimed = {"standard"} | {model for _, _, model, _, _ in CLAIMS}  # what recipes retrain
    assert claimed == {name for name, method in METHODS.items() if method.recipes}
    with pytest.raises(ConfigError, match="method must be one of"):
        TrainConfig(method="tiny")
    monkeypatch.setitem(METHODS, "tiny", entry)
    config = TrainConfig(method="tiny")  # the config's choices, defaults and checks
    resolved = config.resolved()
    assert (resolved.eps_x, resolved.eps_w, resolved.attack_steps) == (0.02, 0.0, 3)
    assert isinstance(make_method(config), Tiny)
    with pytest.raises(ConfigError, match="attack_steps must be >= 1"):
        TrainConfig(method="tiny", attack_steps=0)
    with pytest.raises(ConfigError, match="tiny trains with eps_w = 0.0 only"):
        TrainConfig(method="tiny", eps_w=0.01)
    experiment = Experiment()  # the comparison and its recipes
    assert experiment.methods[-1] == "tiny" and "tiny" in experiment.recipe_methods
    assert "tiny" not in Experiment(model="cnn").methods
    with pytest.raises(ConfigError, match="tiny: it is only a test; leave it out"):
        Experiment(model="cnn", methods=("standard", "pgd-at", "awp", "tiny"))
    assert report.style("tiny") == ("#123456", "*")  # the report
    assert build_parser().parse_args(["train", "--method", "tiny"]).method == "tiny"  # the CLI
    for command in ("train", "reproduce"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "tiny (a throwaway method)" in shown and "tiny (MLP only)" in shown
    assert f"one of the {len(METHODS)} training methods" in " ".join(
        build_parser().format_help().split()
    )


def test_python_3_10_reads_config_files_with_tomli(monkeypatch, tmp_path):
    root = Path(__file__).parent.parent
    project = read_toml(root / "pyproject.toml")["project"]
    tomli = [d for d in project["dependencies"] if d.split(";")[0].strip() == "tomli>=2"]
    assert tomli and tomli[0].split(";")[1].strip() == 'python_version < "3.11"'
    read = {"read by": "tomli"}
    stand_in = types.SimpleNamespace(loads=lambda text: read, TOMLDecodeError=ValueError)
    monkeypatch.setitem(sys.modules, "tomli", stand_in)
    monkeypatch.setattr(sys, "version_info", (3, 10, 0))
    path = tmp_path / "c.toml"
    path.write_text("epochs = 1")
    assert read_toml(path) is read


def test_config_defaults_validation_and_toml_round_trip(tmp_path):
    config = TrainConfig(method="joint-at").resolved()
    assert config.eps_x == METHODS["joint-at"].defaults["eps_x"] and config.attack_steps == 10
    assert TrainConfig(method="awp").resolved_threat().scope == "shared"
    assert TrainConfig(method="pgd-at", eps_w=0.0).eval_threat().eps_x == 0.1
    assert TrainConfig().eval_threat() is None
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert "eps-x = 0.05" in path.read_text()
    assert TrainConfig.from_toml(path) == config
    bad = [
        ({"method": "magic"}, "method must be one of"),
        ({"lambda_w": -1.0}, "lambda_w"),
        ({"epochs": 0}, "epochs"),
        ({"eps_x": float("nan")}, "eps_x"),
        ({"kappa": 2.0}, "kappa"),
        ({"w_mode": "layer", "w_norm": "l2"}, "layer"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**kwargs)
    with pytest.raises(ConfigError, match="unknown training options: colour"):
        TrainConfig.from_dict({"colour": "red"})
    path.write_text("epochs = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.from_toml(path)


def test_run_directory_files_and_refusals(mnist, tmp_path):
    config = TrainConfig(epochs=1, hidden=(16,), eval_size=0)
    out = tmp_path / "run"
    result = train(config, mnist, out_dir=out, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".lock",  # one writer per run directory
        "config.json",
        "config.toml",
        "metrics.jsonl",
        "model.json",
        "model.safetensors",
        "state.safetensors",
    ]
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["method"] == "standard"
    about = info["provenance"]
    assert about["torch"] == torch.__version__ and about["command"].startswith("python ")
    assert about["data"] == {  # the caller's data: its split is not ours to name
        "name": mnist.name,
        "split": "train",
        "split_seed": None,
        "examples": len(mnist.x_train),
    }
    assert [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == result.history
    model, meta = checkpoint.load(out / "model.safetensors")
    assert meta["epochs"] == 1
    assert torch.equal(model(mnist.x_test[:5]), result.model(mnist.x_test[:5]))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, mnist, out_dir=out, progress=False)
    with pytest.raises(ConfigError, match="other options"):
        train(config.replace(lr=1e-3), mnist, out_dir=out, resume=True, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write to output directory"):
        train(config, mnist, out_dir=blocker / "run", progress=False)


def test_resume_state_is_never_unpickled_and_damage_is_reported(mnist, tmp_path):
    config = TrainConfig(epochs=1, hidden=(16,), eval_size=0)
    out = tmp_path / "run"
    train(config, mnist, out_dir=out, progress=False)
    state = out / "state.safetensors"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        train(config, mnist, out_dir=out, resume=True, progress=False)
    marker = tmp_path / "pwned"
    state.write_bytes(malicious_pickle(marker))
    with pytest.raises(CheckpointError):
        train(config, mnist, out_dir=out, resume=True, progress=False)
    assert not marker.exists()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_bytes(target, b"new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left


def _train_command(out, *extra):
    return [
        sys.executable,
        "-m",
        "nonsingular",
        "train",
        "--method",
        "joint-at",
        "--epochs",
        "4",
        "--hidden",
        "32,32",
        "--attack-steps",
        "3",
        "--eval-size",
        "50",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


# one thread: a matrix product split over a number of threads that the BLAS picks by the load
# (MKL's dynamic threading) sums in another order, so two runs of the same training under
# load can differ in their last bits, which training amplifies; with one thread the reference
# run and the resumed one do the same arithmetic, and only the resume is tested
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}


def _completed_epochs(out):
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_epochs, extra_delay", [(1, 0.0), (2, 0.15)])
def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path, kill_after_epochs, extra_delay):
    reference = tmp_path / "reference"
    subprocess.run(_train_command(reference), check=True, timeout=300, env=ONE_THREAD)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_command(killed), env=ONE_THREAD)
    deadline = time.time() + 240
    while _completed_epochs(killed) < kill_after_epochs and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(extra_delay)  # 0: right after an epoch's files; 0.15 s: mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < _completed_epochs(killed) < 4
    for line in (killed / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every file is whole, never half-written
    subprocess.run(_train_command(killed, "--resume"), check=True, timeout=300, env=ONE_THREAD)
    a, _ = checkpoint.load(reference / "model.safetensors")
    b, _ = checkpoint.load(killed / "model.safetensors")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    ref_metrics = (reference / "metrics.jsonl").read_text().splitlines()
    got_metrics = (killed / "metrics.jsonl").read_text().splitlines()
    strip = [
        {k: v for k, v in json.loads(m).items() if "seconds" not in k}
        for m in (ref_metrics, got_metrics)
        for m in m
    ]
    assert strip[:4] == strip[4:]


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    from nonsingular.cli import main

    def code(*args):
        try:
            return main(["train", "--quiet", *args])
        except SystemExit as stop:
            return stop.code

    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (["--method", "magic"], "invalid choice: 'magic'"),
        (["--lambda-w=-1", "--method", "bound-reg"], "lambda_w must be"),
        (["--out", str(blocker / "run")], "cannot write to output directory"),
        (["--config", str(tmp_path / "missing.toml")], "config file not found"),
    ]
    for args, message in cases:
        assert code(*args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    toml = tmp_path / "c.toml"
    toml.write_text('method = "standard"\nepochs = 1\nhidden = [8]\neval-size = 0\n')
    assert code("--config", str(toml), "--out", str(tmp_path / "r"), "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "run directory" in out
    saved = TrainConfig.from_toml(tmp_path / "r" / "config.toml")
    assert saved.epochs == 1 and saved.hidden == (8,)


class _ConcatTail(torch.nn.Module):
    """An affine tail with linear maps between its layers: a concatenation, flips, and a flip
    of the logits (so the interval margins take the generic backward step)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(6, 6)
        self.c = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.b(torch.relu(self.a(x)))
        return self.c(torch.cat([z, z.flip(1)], 1)).flip(1)


def test_the_interval_loss_is_differentiated_through_concatenations_and_flips():
    """IBP training's robust loss reads the margins' lower bound as a function of the weights:
    its gradient for the last layer, whose coefficients pass a concatenation and flips on
    their way to the ReLU's box, equals central differences of the bound (float64)."""
    from nonsingular.certificates.ibp import ibp_margins, interval_bounds
    from nonsingular.certificates.region import InputRegion
    from nonsingular.model import perturbed_layers

    torch.manual_seed(0)
    model = _ConcatTail().double().eval()
    x = torch.rand(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    threat = Threat(eps_x=0.05, eps_w=0.01)
    graph = read_model(model, x, detach=False)

    def bound() -> torch.Tensor:
        budgets = {b.index: b for b in perturbed_layers(graph, threat)}
        region = InputRegion.from_threat(x, threat)
        bounds = interval_bounds(graph, budgets, region, unit=0.0)
        lower = ibp_margins(graph, budgets, region, y, 3, bounds)
        return lower.masked_fill(torch.isinf(lower), 0.0).sum()

    (grad,) = torch.autograd.grad(bound(), model.c.weight)
    step = 1e-6
    for i, j in [(0, 0), (1, 5), (2, 7), (0, 11)]:
        with torch.no_grad():
            model.c.weight[i, j] += step
            up = float(bound())
            model.c.weight[i, j] -= 2 * step
            down = float(bound())
            model.c.weight[i, j] += step
        assert abs(float(grad[i, j]) - (up - down) / (2 * step)) <= 1e-5, (i, j)
