"""Hostile and careless input, table by table: every case states its exact outcome.

- CLI cases: exit code 2, one line on stderr naming the problem, no traceback, and (for
  ``train``) no run directory created;
- API cases: the typed ``NonsingularError`` subclass, with a message naming the problem;
- file cases: corrupted or crafted checkpoints, training states, data files and caches are
  detected, never trusted;
- cases that must simply work (the edges of every range) complete correctly.

The promises and their counts are in docs/reliability.md.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import nonsingular as ns
from nonsingular import (
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    Threat,
    ThreatError,
    TrainingError,
    UnsupportedModelError,
    checkpoint,
)
from nonsingular.checks import MAX_SEED
from nonsingular.cli import main
from nonsingular.data import load
from nonsingular.files import exclusive
from nonsingular.training import TrainConfig, train
from nonsingular.training.state import load_state, state_digest

from .conftest import assert_state_equal, malicious_pickle, state_copy
from .test_reproduce import TINY as TINY_SETTINGS


def exit_code(args):
    """main()'s return code, or argparse's exit code for errors it catches itself."""
    try:
        return main(args)
    except SystemExit as stop:
        return stop.code


def one_line_error(capsys, args, message):
    code = exit_code(args)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (args, err)
    assert len(lines) == 1, (args, err)
    assert message.lower() in lines[0].lower(), (args, lines[0])
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits):
    """A finished 1-epoch run: its checkpoint and training state are the files hacked below."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    train(
        TrainConfig(data="digits", hidden=(8,), epochs=1, eval_size=0),
        digits,
        out_dir=out,
        progress=False,
    )
    return out


# ------------------------------------------------------------------------------ CLI: train
TRAIN_CASES = {
    "lr 1e30": (["--lr", "1e30"], "lr must be a finite number > 0 and <= 10"),
    "lr 0": (["--lr", "0"], "lr must be a finite number > 0"),
    "lr negative": (["--lr", "-1"], "lr must be"),
    "lr nan": (["--lr", "nan"], "lr must be a finite number"),
    "eps-w 1e308": (["--method", "joint-at", "--eps-w", "1e308"], "eps_w must be"),
    "eps-x negative": (["--eps-x", "-0.1"], "eps_x must be"),
    "eps-x inf": (["--eps-x", "inf"], "eps_x must be"),
    "seed 1e15": (["--seed", "1000000000000000"], "seed must be an integer from 0"),
    "seed negative": (["--seed", "-1"], "seed must be an integer from 0"),
    "hidden 1e12": (["--hidden", "1000000000000"], "hidden must be an integer from 1 to 65536"),
    "hidden 0": (["--hidden", "0"], "hidden must be an integer from 1"),
    "hidden text": (["--hidden", "abc"], "expected widths"),
    "epochs 0": (["--epochs", "0"], "epochs must be an integer from 1"),
    "epochs huge": (["--epochs", "1000000"], "epochs must be an integer from 1 to 100000"),
    "batch 0": (["--batch-size", "0"], "batch_size must be an integer from 1"),
    "batch huge": (["--batch-size", "100000000"], "batch_size must be an integer"),
    "device mps": (["--device", "mps"], "MPS is not available"),
    "device unknown": (["--device", "tpu9"], "unknown device"),
    "device cuda:99": (
        ["--device", "cuda:99"],
        "GPU(s)" if torch.cuda.device_count() else "CUDA is not available",  # no GPU 99 either way
    ),
    "device xla": (["--device", "xla"], "not supported"),
    "method": (["--method", "bogus"], "invalid choice: 'bogus'"),
    "model module missing": (["--model", "nosuchpackage.models:net"], "cannot import"),
    "model path-like": (["--model", "../../etc/passwd"], "importable factory"),
    "model args list": (["--model-args", "[1, 2]"], "expected a JSON object"),
    "model args broken": (["--model-args", "{bad"], "expected a JSON object"),
    "model args unknown": (["--model", "mlp", "--model-args", '{"depth": 3}'], "no argument depth"),
    "pgd-at without steps": (["--method", "pgd-at", "--attack-steps", "0"], "attack_steps"),
    "joint-at without steps": (["--method", "joint-at", "--attack-steps", "0"], "attack_steps"),
    "attack steps negative": (["--attack-steps", "-1"], "attack_steps must be an integer"),
    "attack steps huge": (["--attack-steps", "100000"], "attack_steps must be an integer"),
    "attack step size 0": (["--attack-step-size", "0"], "attack_step_size must be"),
    "lambda-x negative": (["--lambda-x", "-1"], "lambda_x must be"),
    "lambda-w huge": (["--lambda-w", "1e9"], "lambda_w must be"),
    "kappa 2": (["--kappa", "2"], "kappa must be"),
    "ramp negative": (["--ramp", "-0.5"], "ramp must be"),
    "augment 100": (["--augment", "100"], "augment must be an integer from 0 to 64"),
    "eval size negative": (["--eval-size", "-5"], "eval_size must be an integer"),
    "weight decay 5": (["--weight-decay", "5"], "weight_decay must be"),
    "optimizer": (["--optimizer", "rmsprop"], "invalid choice"),
    "w-mode": (["--w-mode", "bogus"], "invalid choice"),
    "x-norm": (["--x-norm", "l3"], "invalid choice"),
    "scope": (["--scope", "everyone"], "invalid choice"),
    "bias": (["--bias", "maybe"], "expected true or false"),
    "data unknown": (["--data", "nosuch"], "unknown data set"),
    "data missing dir": (["--data", "idx:/nonexistent/place"], "expected a directory"),
    "eval-eps-x huge": (["--eval-eps-x", "1e300"], "eval_eps_x must be"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_before_writing_anything(case, capsys, tmp_path):
    args, message = TRAIN_CASES[case]
    out = tmp_path / "run"
    one_line_error(
        capsys,
        ["train", "--quiet", "--epochs", "1", "--data", "digits", "--out", str(out), *args],
        message,
    )
    assert not out.exists()


def _toml(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


CONFIG_FILE_CASES = {
    "data = 5": ("data = 5\n", "data must be a data set name"),
    "invalid toml": ("epochs = = 2\n", "not valid TOML"),
    "unknown key": ("depth = 3\n", "unknown training options: depth"),
    "hidden text": ('hidden = "x"\n', "hidden must be"),
    "epochs float": ("epochs = 2.5\n", "epochs must be an integer"),
    "seed huge": ("seed = 99999999999\n", "seed must be an integer from 0"),
    "model args not a table": ('model-args = "x"\n', "model arguments must be a mapping"),
    "lr text": ('lr = "fast"\n', "lr must be a finite number"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILE_CASES))
def test_train_config_files_are_checked_like_flags(case, capsys, tmp_path):
    text, message = CONFIG_FILE_CASES[case]
    out = tmp_path / "run"
    one_line_error(
        capsys, ["train", "--quiet", "--config", _toml(tmp_path, text), "--out", str(out)], message
    )
    assert not out.exists()


def test_train_run_directory_refusals(capsys, tmp_path, run_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    common = [
        "train",
        "--quiet",
        "--data",
        "digits",
        "--hidden",
        "8",
        "--epochs",
        "1",
        "--eval-size",
        "0",
    ]
    cases = [
        (["--out", str(empty), "--resume"], "nothing to resume"),
        (["--out", str(tmp_path / "typo"), "--resume"], "nothing to resume"),
        (["--out", str(blocker / "run")], "cannot write to output directory"),
        (["--out", str(run_dir)], "already holds a run"),
        (["--out", str(run_dir), "--resume", "--lr", "0.001"], "other options"),
        (
            ["--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "x")],
            "config file not found",
        ),
    ]
    for args, message in cases:
        one_line_error(capsys, [*common, *args], message)
    assert not (tmp_path / "typo").exists()  # a mistyped --out is not created by --resume


# --------------------------------------------------------------------- CLI: evaluate/certify
@pytest.fixture(scope="module")
def ckpt(run_dir):
    return str(run_dir / "model.safetensors")


EVALUATE_CASES = {  # "{tmp}" stands for a fresh temporary directory
    "seed negative": (["--seed", "-1"], "a seed must lie in 0.."),
    "seed huge": (["--seed", str(2**40)], "a seed must lie in 0.."),
    "seed text": (["--seed", "x"], "expected an integer seed"),
    "eps-x 1e308": (["--eps-x", "1e308"], "eps_x must be at most"),
    "eps-x nan": (["--eps-x", "nan"], "eps_x must be finite"),
    "eps-w negative": (["--eps-w", "-1"], "eps_w must be >= 0"),
    "eps-x text": (["--eps-x", "a,b"], "expected comma-separated numbers"),
    "eps-x empty": (["--eps-x", ","], "expected at least one number"),
    "steps 0": (["--steps", "0"], "steps must be an integer from 1"),
    "steps huge": (["--steps", "1000000000"], "steps must be an integer from 1 to 100000"),
    "restarts 0": (["--restarts", "0"], "restarts must be an integer from 1"),
    "samples 0": (["--method", "noise", "--samples", "0"], "samples must be an integer"),
    "step size 0": (["--step-size", "0"], "step_size must be"),
    "step size huge": (["--step-size", "100"], "step_size must be"),
    "schedule for apgd": (["--method", "apgd", "--schedule", "linear"], "schedule 'linear' is pgd"),
    "schedule unknown": (["--schedule", "cosine"], "invalid choice"),
    "batch 0": (["--batch-size", "0"], "batch_size must be an integer from 1"),
    "test size 0": (["--test-size", "0"], "test_size must be a positive int"),
    "test size huge": (["--test-size", "1000000"], "test_size must be at most"),
    "checkpoint missing": (["--checkpoint", "{tmp}/no.safetensors"], "not found"),
    "checkpoint is a dir": (["--checkpoint", "{tmp}"], "not found"),
    "out is a directory": (["--out", "{tmp}"], "it is a directory"),
    "out in missing dir": (["--out", "{tmp}/no/r.json"], "does not exist"),
    "certify unknown": (["--certify", "lp"], "unknown certificate method 'lp'"),
    "layers typo without weights": (
        ["--eps-w", "0", "--layers", "9.weight"],
        "not a weight of this model",
    ),
    "layers typo with weights": (["--eps-w", "0.001", "--layers", "x"], "not a weight"),
    "device mps": (["--device", "mps"], "MPS is not available"),
    "loss": (["--loss", "hinge"], "invalid choice"),
    "w-norm with layer mode": (
        ["--w-norm", "l2", "--w-mode", "layer", "--eps-w", "0.1"],
        "w_mode='layer' is defined for w_norm='linf' only",
    ),
    "data mismatch": (["--data", "mnist5k"], "does not fit the model"),
}


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_evaluate_refuses_with_one_line_and_writes_nothing(case, capsys, tmp_path, ckpt):
    args, message = EVALUATE_CASES[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = [
        "evaluate",
        "--quiet",
        "--checkpoint",
        ckpt,
        "--data",
        "digits",
        "--test-size",
        "20",
        "--steps",
        "2",
        "--eps-x",
        "0,0.01",
        "--eps-w",
        "0",
    ]
    before = set(tmp_path.iterdir())
    one_line_error(capsys, [*base, *args], message)
    assert set(tmp_path.iterdir()) == before


def test_a_builtin_checkpoint_ignores_a_factory_it_does_not_need(capsys, ckpt):
    args = [
        "evaluate",
        "--quiet",
        "--checkpoint",
        ckpt,
        "--data",
        "digits",
        "--test-size",
        "20",
        "--steps",
        "2",
        "--eps-x",
        "0",
        "--eps-w",
        "0",
        "--model",
        "nosuch.pkg:f",
    ]
    assert exit_code(args) == 0
    capsys.readouterr()


CERTIFY_CASES = {
    "method unknown": (["--method", "lp"], "unknown certificate method 'lp'"),
    "intermediate": (["--intermediate", "bogus"], "invalid choice"),
    "closed-form with l2 weights": (
        ["--method", "closed-form", "--eps-w", "0.1", "--w-norm", "l2"],
        "w_norm='l2'",
    ),
    "eps-x huge": (["--eps-x", "1e13"], "eps_x must be at most"),
    "seed negative": (["--seed", "-3"], "a seed must lie"),
    "batch 0": (["--batch-size", "0"], "batch_size must be an integer"),
    "time limit negative": (["--time-limit", "-1"], "time_limit must"),
    "time limit not a number": (["--time-limit", "nan"], "time_limit must"),
}


@pytest.mark.parametrize("case", list(CERTIFY_CASES))
def test_certify_refuses_with_one_line(case, capsys, ckpt):
    args, message = CERTIFY_CASES[case]
    one_line_error(
        capsys,
        [
            "certify",
            "--quiet",
            "--checkpoint",
            ckpt,
            "--data",
            "digits",
            "--test-size",
            "10",
            *args,
        ],
        message,
    )


REPRODUCE_CASES = {
    "seeds 0": (["--seeds", "0"], "seeds must be an integer from 1"),
    "seeds huge": (["--seeds", "5000"], "seeds must be an integer from 1 to 1000"),
    "epochs 0": (["--epochs", "0"], "epochs must be an integer from 1"),
    "model": (["--model", "vit"], "invalid choice"),
    "device": (["--device", "mps"], "MPS is not available"),
}


@pytest.mark.parametrize("case", list(REPRODUCE_CASES))
def test_reproduce_refuses_with_one_line(case, capsys, tmp_path):
    args, message = REPRODUCE_CASES[case]
    out = tmp_path / "out"
    one_line_error(capsys, ["reproduce", "--quiet", "--out", str(out), *args], message)
    assert not out.exists()


# ------------------------------------------------------------------------------------- API
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


X, Y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])

THREAT_CASES = {
    "eps_x negative": ({"eps_x": -1.0}, "eps_x must be >= 0"),
    "eps_x nan": ({"eps_x": float("nan")}, "eps_x must be finite"),
    "eps_x inf": ({"eps_x": float("inf")}, "eps_x must be finite"),
    "eps_x huge": ({"eps_x": 1e13}, "eps_x must be at most"),
    "eps_x text": ({"eps_x": "0.1"}, "eps_x must be a number"),
    "eps_x bool": ({"eps_x": True}, "eps_x must be a number"),
    "eps_w negative": ({"eps_w": -0.5}, "eps_w must be >= 0"),
    "eps_w huge": ({"eps_w": 1e300}, "eps_w must be at most"),
    "eps_w none": ({"eps_w": None}, "eps_w must be a number"),
    "x_norm": ({"x_norm": "l3"}, "x_norm must be one of"),
    "w_mode": ({"w_mode": "multiplicative"}, "w_mode must be one of"),
    "w_norm": ({"w_norm": "l1"}, "w_norm must be one of"),
    "layer with l2": ({"w_mode": "layer", "w_norm": "l2"}, "w_mode='layer'"),
    "scope": ({"scope": "batch"}, "scope must be one of"),
    "layers string": ({"layers": "1.weight"}, "layers must be None or a list"),
    "layers empty": ({"layers": []}, "non-empty list"),
    "layers numbers": ({"layers": [1]}, "non-empty list of names"),
    "bounds reversed": ({"bounds": (1.0, 0.0)}, "low < high"),
    "bounds infinite": ({"bounds": (0.0, float("inf"))}, "finite"),
    "bounds text": ({"bounds": "ab"}, "bounds must be"),
    "bounds huge": ({"bounds": (0.0, 1e20)}, "bounds must lie within"),
    "bias text": ({"bias": "yes"}, "bias must be True or False"),
}


@pytest.mark.parametrize("case", list(THREAT_CASES))
def test_threats_are_checked(case):
    fields, message = THREAT_CASES[case]
    with pytest.raises(ThreatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Threat(**fields)


def _nan_model():
    model = _model()
    model[1].weight.data[0, 0] = float("nan")
    return model


def _hooked():
    model = _model()
    model[2].register_forward_hook(lambda m, i, o: o)
    return model


API_CASES = {
    "x nan": (
        lambda: ns.attack(
            _model(),
            X.clone().index_fill_(0, torch.tensor([2]), float("nan")),
            Y,
            Threat(eps_x=0.1),
        ),
        InputError,
        "NaN or infinite values",
    ),
    "x inf": (
        lambda: ns.certify(_model(), torch.full((2, 4), float("inf")), Y[:2], Threat()),
        InputError,
        "NaN or infinite",
    ),
    "x integer": (
        lambda: ns.attack(_model(), torch.ones(2, 4, dtype=torch.long), Y[:2], Threat()),
        InputError,
        "floating-point",
    ),
    "x one dimension": (
        lambda: ns.attack(_model(), torch.rand(4), Y[:1], Threat()),
        InputError,
        "batch dimension|does not fit",
    ),
    "x wrong width": (
        lambda: ns.attack(_model(), torch.rand(2, 5), Y[:2], Threat()),
        InputError,
        "does not fit the model",
    ),
    "x outside bounds": (
        lambda: ns.attack(_model(), X + 1.0, Y, Threat(eps_x=0.1)),
        InputError,
        "outside the threat's bounds",
    ),
    "x list": (
        lambda: ns.attack(_model(), X.tolist(), Y, Threat()),
        InputError,
        "x must be a torch.Tensor",
    ),
    "y float": (lambda: ns.attack(_model(), X, Y.float(), Threat()), InputError, "integer tensor"),
    "y shape": (lambda: ns.attack(_model(), X, Y[:3], Threat()), InputError, "y must have shape"),
    "y out of range": (
        lambda: ns.certify(_model(), X, Y + 5, Threat()),
        InputError,
        "labels must lie in",
    ),
    "y negative": (
        lambda: ns.certify(_model(), X, Y - 1, Threat()),
        InputError,
        "labels must lie in",
    ),
    "threat dict": (
        lambda: ns.attack(_model(), X, Y, {"eps_x": 0.1}),
        ConfigError,
        "threat must be a nonsingular.Threat",
    ),
    "steps 0": (
        lambda: ns.attack(_model(), X, Y, Threat(), steps=0),
        ConfigError,
        "steps must be an integer from 1",
    ),
    "steps float": (
        lambda: ns.attack(_model(), X, Y, Threat(), steps=2.5),
        ConfigError,
        "steps must be an integer",
    ),
    "restarts 0": (
        lambda: ns.attack(_model(), X, Y, Threat(), restarts=0),
        ConfigError,
        "restarts must be",
    ),
    "loss": (
        lambda: ns.attack(_model(), X, Y, Threat(), loss="hinge"),
        ConfigError,
        "loss must be one of",
    ),
    "attack method": (
        lambda: ns.attack(_model(), X, Y, Threat(), method="cw"),
        ConfigError,
        "method must be one of",
    ),
    "seed negative": (
        lambda: ns.attack(_model(), X, Y, Threat(), seed=-1),
        ConfigError,
        "seed must be an integer from 0",
    ),
    "seed huge": (
        lambda: ns.attack(_model(), X, Y, Threat(), seed=MAX_SEED + 1),
        ConfigError,
        "seed must be",
    ),
    "step size negative": (
        lambda: ns.attack(_model(), X, Y, Threat(), step_size=-1.0),
        ConfigError,
        "step_size must be",
    ),
    "samples 0": (
        lambda: ns.attack(_model(), X, Y, Threat(), method="noise", samples=0),
        ConfigError,
        "samples must be",
    ),
    "model not a module": (
        lambda: ns.attack(lambda x: x, X, Y, Threat()),
        UnsupportedModelError,
        "torch.nn.Module",
    ),
    "model nan weights": (
        lambda: ns.attack(_nan_model(), X, Y, Threat()),
        InputError,
        "1.weight holds NaN",
    ),
    "model with hook": (
        lambda: ns.certify(_hooked(), X, Y, Threat()),
        UnsupportedModelError,
        "forward hook",
    ),
    "layers typo, no budget": (
        lambda: ns.attack(_model(), X, Y, Threat(layers=("9",))),
        ns.ThreatError,
        "not a weight of this model",
    ),
    "certify method": (
        lambda: ns.certify(_model(), X, Y, Threat(), "lp"),
        ConfigError,
        "unknown certificate method 'lp'",
    ),
    "certify intermediate": (
        lambda: ns.certify(_model(), X, Y, Threat(), intermediate="lp"),
        ConfigError,
        "intermediate must be one of",
    ),
    "certify batch 0": (
        lambda: ns.certify(_model(), X, Y, Threat(), batch_size=0),
        ConfigError,
        "batch_size must be",
    ),
    "certify float16": (
        lambda: ns.certify(_model(), X, Y, Threat(), dtype=torch.float16),
        ConfigError,
        "dtype must be",
    ),
    "certify time limit nan": (
        lambda: ns.certify(_model(), X, Y, Threat(), "bab", time_limit=float("nan")),
        ConfigError,
        "time_limit must",
    ),
    "bab time limit negative": (
        lambda: ns.bab(_model(), X, Y, Threat(), time_limit=-1.0),
        ConfigError,
        "time_limit must",
    ),
    "bab batch 0": (
        lambda: ns.bab(_model(), X, Y, Threat(), batch=0),
        ConfigError,
        "batch must be",
    ),
    "bab float16": (
        lambda: ns.bab(_model(), X, Y, Threat(), dtype=torch.float16),
        ConfigError,
        "dtype must be",
    ),
    "bab threat a dict": (
        lambda: ns.bab(_model(), X, Y, {"eps_x": 0.1}),
        ConfigError,
        "threat must be",
    ),
    "evaluate empty grid": (
        lambda: ns.evaluate(_model(), (X, Y), []),
        ConfigError,
        "grid must be a non-empty list",
    ),
    "evaluate grid of dicts": (
        lambda: ns.evaluate(_model(), (X, Y), [{"eps_x": 0}]),
        ConfigError,
        "grid must be",
    ),
    "evaluate batch 0": (
        lambda: ns.evaluate(_model(), (X, Y), [Threat()], batch_size=0),
        ConfigError,
        "batch_size must be",
    ),
    "evaluate nothing": (
        lambda: ns.evaluate(_model(), (X, Y), [Threat()], attack=None),
        ConfigError,
        "nothing to evaluate",
    ),
    "evaluate unknown certificate": (
        lambda: ns.evaluate(_model(), (X, Y), [Threat()], certify=["lp"]),
        ConfigError,
        "unknown certificate",
    ),
    "evaluate data": (
        lambda: ns.evaluate(_model(), X, [Threat()]),
        InputError,
        "data must be a nonsingular Dataset",
    ),
    "evaluate empty data": (
        lambda: ns.evaluate(_model(), (X[:0], Y[:0]), [Threat()]),
        InputError,
        "no examples",
    ),
    "grid empty": (lambda: ns.grid(eps_x=[]), ThreatError, "at least one"),
    "threat from dict": (
        lambda: Threat.from_dict({"eps": 1}),
        ThreatError,
        "unknown threat fields: eps",
    ),
    "config seed": (lambda: TrainConfig(seed=2**40), ConfigError, "seed must be"),
    "config lr": (lambda: TrainConfig(lr=1e30), ConfigError, "lr must be"),
    "config data": (lambda: TrainConfig(data=5), ConfigError, "data must be a data set name"),
    "config hidden empty": (lambda: TrainConfig(hidden=()), ConfigError, "hidden must be"),
    "config method": (lambda: TrainConfig(method="sgd"), ConfigError, "method must be one of"),
    "config model": (lambda: TrainConfig(model="torch.load"), ConfigError, "importable factory"),
    "config model args": (lambda: TrainConfig(model_args={"f": print}), ConfigError, "plain JSON"),
    "config pgd-at steps": (
        lambda: TrainConfig(method="pgd-at", attack_steps=0),
        ConfigError,
        "attack_steps must be >= 1",
    ),
    "train model not a module": (
        lambda: train(TrainConfig(), load("digits"), model="mlp"),
        ConfigError,
        "model must be a torch.nn.Module",
    ),
    "load data name": (lambda: load("nosuch"), DataError, "unknown data set"),
    "load test size": (lambda: load("digits", test_size=0), DataError, "test_size must be"),
    "load train size": (
        lambda: load("digits", train_size=10**7),
        DataError,
        "train_size must be at most",
    ),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_errors_are_typed(case):
    run, kind, message = API_CASES[case]
    with pytest.raises(kind, match=message):
        run()


def test_a_diverging_loss_is_a_training_error_and_the_run_keeps_its_last_good_epoch(
    digits, tmp_path
):
    out = tmp_path / "run"
    wild = TrainConfig(
        data="digits",
        hidden=(8,),
        epochs=3,
        eval_size=0,
        method="bound-reg",
        lr=10.0,
        lambda_x=1e6,
        lambda_w=1e6,
        eps_x=1e12,
        eps_w=1e12,
    )
    with pytest.raises(TrainingError, match=r"epoch (\d+).*last completed epoch") as info:
        train(wild, digits, out_dir=out, progress=False)
    epoch = int(re.search(r"epoch (\d+)", str(info.value)).group(1))
    if epoch == 1:  # nothing completed: nothing to resume, the directory says what was asked
        assert not (out / "state.safetensors").exists() and (out / "config.json").exists()
    else:  # the state holds the last completed epoch, with finite weights
        tensors, meta = load_state(out / "state.safetensors")
        assert meta["epoch"] == epoch - 1
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# ------------------------------------------------------------------------- files: checkpoints
def _sidecar(path):
    return path.with_suffix(".json")


def _rewrite(path, data):
    """Replace the weights and record their checksum: a crafted but self-consistent file."""
    import hashlib

    path.write_bytes(data)
    info = json.loads(_sidecar(path).read_text())
    info["sha256"] = hashlib.sha256(data).hexdigest()
    _sidecar(path).write_text(json.dumps(info))


def _edit_info(path, change):
    info = json.loads(_sidecar(path).read_text())
    change(info)
    _sidecar(path).write_text(json.dumps(info))


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def _nan_weights(path):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = st_load(path.read_bytes())
    name = next(n for n in tensors if n.endswith("weight"))
    tensors[name][0, 0] = float("nan")
    _rewrite(path, st_save(tensors))


CHECKPOINT_CASES = {
    **{
        f"truncated to {frac}": (
            lambda p, f=frac: p.write_bytes(p.read_bytes()[: int(len(p.read_bytes()) * f)]),
            "SHA-256",
        )
        for frac in (0.0, 0.01, 0.1, 0.5, 0.99)
    },
    **{
        f"bit flip at {off}": (lambda p, o=off: _flip(p, o), "SHA-256")
        for off in (3, 20, 200, -5, -500)
    },
    "zeros": (lambda p: p.write_bytes(b"\0" * 64), "SHA-256"),
    "pickle payload": (lambda p: p.write_bytes(malicious_pickle(p.parent / "pwned")), "SHA-256"),
    "no sidecar": (lambda p: _sidecar(p).unlink(), "no description"),
    "sidecar not json": (lambda p: _sidecar(p).write_text("{nope"), "not valid JSON"),
    "sidecar list": (lambda p: _sidecar(p).write_text("[]"), "not a nonsingular checkpoint"),
    "sidecar no checksum": (lambda p: _edit_info(p, lambda i: i.pop("sha256")), "SHA-256"),
    "sidecar bad checksum": (
        lambda p: _edit_info(p, lambda i: i.update(sha256="ab" * 32)),
        "SHA-256",
    ),
    "sidecar checksum text": (lambda p: _edit_info(p, lambda i: i.update(sha256=5)), "SHA-256"),
    "negative width": (
        lambda p: _edit_info(p, lambda i: i["model"][1].update(out_features=-8)),
        "invalid|shape",
    ),
    "huge layer": (
        lambda p: _edit_info(
            p, lambda i: i["model"][1].update(in_features=10**7, out_features=10**7)
        ),
        "shape",
    ),
    "width text": (
        lambda p: _edit_info(p, lambda i: i["model"][1].update(out_features="8")),
        "invalid",
    ),
    "unknown layer": (
        lambda p: _edit_info(p, lambda i: i["model"].append({"type": "LSTM"})),
        "unknown type 'LSTM'",
    ),
    "model not a list": (
        lambda p: _edit_info(p, lambda i: i.update(model=5)),
        "not a model architecture",
    ),
    "factory unnamed": (
        lambda p: _edit_info(
            p,
            lambda i: i.update(
                model={
                    "factory": "os:system",
                    "args": {"command": "touch pwned"},
                    "in_shape": [1, 8, 8],
                    "classes": 10,
                }
            ),
        ),
        "built by os:system",
    ),
    "factory bad args": (
        lambda p: _edit_info(
            p,
            lambda i: i.update(
                model={
                    "factory": "mlp",
                    "args": {"hidden": [-3]},
                    "in_shape": [1, 8, 8],
                    "classes": 10,
                }
            ),
        ),
        "invalid|failed|checkpoint",
    ),
    "factory huge": (
        lambda p: _edit_info(
            p,
            lambda i: i.update(
                model={
                    "factory": "mlp",
                    "args": {"hidden": [10**6]},
                    "in_shape": [1, 8, 8],
                    "classes": 10,
                }
            ),
        ),
        "a width must be from 1 to 65536",
    ),
    "factory other layers": (
        lambda p: _edit_info(
            p,
            lambda i: i.update(
                model={
                    "factory": "mlp",
                    "args": {"hidden": [8, 8]},
                    "in_shape": [1, 8, 8],
                    "classes": 10,
                }
            ),
        ),
        "does not match its description",
    ),
    "instance model": (
        lambda p: _edit_info(p, lambda i: i.update(model={"factory": None, "class": "x.Net"})),
        "trained from an instance",
    ),
    "nan weights": (_nan_weights, "NaN or infinite"),
}


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """A checkpoint of a flat Sequential, described layer by layer (the other format)."""
    from nonsingular.model.architectures import mlp

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("described") / "model.safetensors"
    return checkpoint.save(mlp((1, 8, 8), hidden=(8,)), path)


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_or_crafted_checkpoints_are_refused(case, described, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(described.read_bytes())
    _sidecar(path).write_bytes(_sidecar(described).read_bytes())
    checkpoint.load(path)  # intact, it loads: what follows is what breaks it
    hack, message = CHECKPOINT_CASES[case]
    hack(path)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------- files: training state
def _state_meta(path, change, resign=True):
    """Rewrite the state's header metadata (tensors kept), and its digest as a crafter would
    (``resign``) so that the field checks, not the digest, are what refuses it."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header["__metadata__"]
    change(meta)
    if resign and "sha256" in meta and meta["sha256"] != "0" * 64:
        meta["sha256"] = state_digest(load_file(path), meta)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])


def _state_tensor(path):
    """Change one tensor's bytes (the header, with its digest, kept)."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


STATE_CASES = {
    'config = "[]"': (lambda p: _state_meta(p, lambda m: m.update(config="[]")), "config"),
    'history = "5"': (lambda p: _state_meta(p, lambda m: m.update(history="5")), "history"),
    'history = "[1]"': (lambda p: _state_meta(p, lambda m: m.update(history="[1]")), "metrics"),
    "history not json": (lambda p: _state_meta(p, lambda m: m.update(history="[")), "header"),
    'epoch = "x"': (lambda p: _state_meta(p, lambda m: m.update(epoch="x")), "header"),
    "epoch ahead": (lambda p: _state_meta(p, lambda m: m.update(epoch="7")), "epoch count"),
    "epoch missing": (lambda p: _state_meta(p, lambda m: m.pop("epoch")), "header"),
    "config missing": (lambda p: _state_meta(p, lambda m: m.pop("config")), "header"),
    'param_groups = "{}"': (
        lambda p: _state_meta(p, lambda m: m.update(param_groups="{}")),
        "param_groups",
    ),
    'optim_state = "[]"': (
        lambda p: _state_meta(p, lambda m: m.update(optim_state="[]")),
        "optim_state",
    ),
    'schedule = "[]"': (lambda p: _state_meta(p, lambda m: m.update(schedule="[]")), "schedule"),
    "schedule empty": (lambda p: _state_meta(p, lambda m: m.update(schedule="{}")), "optimizer"),
    "param groups empty": (
        lambda p: _state_meta(p, lambda m: m.update(param_groups="[]")),
        "optimizer",
    ),
    "optim state text": (
        lambda p: _state_meta(p, lambda m: m.update(optim_state='{"0": 5}')),
        "optimizer",
    ),
    "format": (
        lambda p: _state_meta(p, lambda m: m.update(format="other")),
        "not a nonsingular training state",
    ),
    "digest missing": (lambda p: _state_meta(p, lambda m: m.pop("sha256")), "SHA-256"),
    "digest wrong": (lambda p: _state_meta(p, lambda m: m.update(sha256="0" * 64)), "SHA-256"),
    "tensor changed": (_state_tensor, "SHA-256"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "corrupted or truncated"),
    "empty": (lambda p: p.write_bytes(b""), "corrupted or truncated"),
    "pickle": (
        lambda p: p.write_bytes(malicious_pickle(p.parent / "pwned")),
        "corrupted or truncated",
    ),
    "header huge": (
        lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"),
        "corrupted or truncated",
    ),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_damaged_or_crafted_training_states_are_refused(case, run_dir, tmp_path, digits):
    out = tmp_path / "run"
    out.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    hack, message = STATE_CASES[case]
    hack(out / "state.safetensors")
    config = TrainConfig(data="digits", hidden=(8,), epochs=1, eval_size=0)
    with pytest.raises(CheckpointError, match=message):
        train(config, digits, out_dir=out, resume=True, progress=False)
    assert not (tmp_path / "pwned").exists()


# -------------------------------------------------------------------------- files: data sets
def _idx(path, magic, dims, body, gz=False):
    data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + body
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _idx_set(root, n_train=10, n_test=4, labels=None, gz=False, **override):
    root.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n_train) % 10 if labels is None else labels
    files = {
        "train-images-idx3-ubyte": (0x803, (n_train, 4, 4), bytes(16 * n_train)),
        "train-labels-idx1-ubyte": (0x801, (n_train,), bytes(labels.astype(np.uint8))),
        "t10k-images-idx3-ubyte": (0x803, (n_test, 4, 4), bytes(16 * n_test)),
        "t10k-labels-idx1-ubyte": (
            0x801,
            (n_test,),
            bytes((np.arange(n_test) % 10).astype(np.uint8)),
        ),
    }
    files.update(override)
    for name, spec in files.items():
        if spec is not None:
            _idx(root / name, *spec, gz=gz)
    return f"idx:{root}"


DATA_CASES = {
    "gzip bomb": (
        lambda r: _idx_set(
            r,
            gz=True,
            **{"t10k-labels-idx1-ubyte": (0x801, (4,), bytes(np.arange(4)) + bytes(50_000_000))},
        ),
        "expected 4 bytes.*found more",
    ),
    "declares 4 GB": (
        lambda r: _idx_set(r, **{"train-images-idx3-ubyte": (0x803, (60000, 256, 256), b"")}),
        "more than the",
    ),
    "wrong magic": (
        lambda r: _idx_set(r, **{"train-labels-idx1-ubyte": (0x803, (10,), bytes(10))}),
        "expected IDX magic",
    ),
    "truncated header": (
        lambda r: (
            _idx_set(r),
            (r / "train-images-idx3-ubyte").write_bytes(struct.pack(">I", 0x803) + b"\0\0"),
        ),
        "header",
    ),
    "truncated body": (
        lambda r: _idx_set(r, **{"train-images-idx3-ubyte": (0x803, (10, 4, 4), bytes(100))}),
        "expected 160 bytes",
    ),
    "trailing data": (
        lambda r: _idx_set(r, **{"train-images-idx3-ubyte": (0x803, (10, 4, 4), bytes(161))}),
        "found more",
    ),
    "no training images": (
        lambda r: _idx_set(r, n_train=0, labels=np.zeros(0)),
        "expected training and test images",
    ),
    "labels up to 255": (
        lambda r: _idx_set(r, labels=np.array([0, 1, 2, 255, 4, 5, 6, 7, 8, 9])),
        "never appear",
    ),
    "label count mismatch": (
        lambda r: _idx_set(r, **{"train-labels-idx1-ubyte": (0x801, (9,), bytes(9))}),
        "one label per image",
    ),
    "missing file": (
        lambda r: _idx_set(r, **{"t10k-images-idx3-ubyte": None}),
        "t10k-images-idx3-ubyte",
    ),
    "gzip garbage": (
        lambda r: (
            _idx_set(r),
            (r / "t10k-images-idx3-ubyte").unlink(),
            (r / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip"),
        ),
        "readable",
    ),
    "cifar oversized": (
        lambda r: (r.mkdir(), _sparse(r / "data_batch_1.bin", (1 << 30) + 1)),
        "more than the",
    ),
    "cifar bad record size": (
        lambda r: (r.mkdir(), (r / "data_batch_1.bin").write_bytes(bytes(100))),
        "multiple of 3073",
    ),
    "cifar labels": (
        lambda r: (
            r.mkdir(),
            (r / "data_batch_1.bin").write_bytes(bytes([11]) + bytes(3072)),
            (r / "test_batch.bin").write_bytes(bytes(3073)),
        ),
        "labels in 0..9",
    ),
    "cifar evil pickle": (
        lambda r: (r.mkdir(), (r / "data_batch_1").write_bytes(malicious_pickle(r / "pwned"))),
        "refused to unpickle",
    ),
}


def _sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_damaged_or_crafted_data_files_are_refused(case, tmp_path):
    build, message = DATA_CASES[case]
    root = tmp_path / "d"
    name = build(root)
    if not isinstance(name, str):
        name = f"cifar10:{root}" if case.startswith("cifar") else f"idx:{root}"
    with pytest.raises(DataError, match=message):
        load(name)
    assert not (root / "pwned").exists()


# ------------------------------------------------------------------- concurrent runs and files
HOLD = """
import sys, time
from nonsingular.files import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tmp_path, digits, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(data="digits", hidden=(8,), epochs=1, eval_size=0)
    first = subprocess.Popen(  # another process, alive and writing to the directory
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another process is writing"):
            train(config, digits, out_dir=out, progress=False)
        one_line_error(
            capsys, ["reproduce", "--quiet", "--out", str(out)], "another process is writing"
        )
        with pytest.raises(ConfigError, match="another process"), exclusive(out):
            pass
    finally:
        first.kill()
        first.wait()
    assert not (out / "config.json").exists()
    train(config, digits, out_dir=out, progress=False)  # once it is gone, the run goes ahead
    assert (out / "state.safetensors").exists()


def test_orphan_temporary_files_are_removed_and_files_follow_the_umask(tmp_path, digits):
    out = tmp_path / "run"
    out.mkdir()
    orphan = out / ".model.safetensors.abc123.tmp"
    orphan.write_bytes(b"half a file from a killed writer")
    old = os.umask(0o027)
    try:
        train(
            TrainConfig(data="digits", hidden=(8,), epochs=1, eval_size=0),
            digits,
            out_dir=out,
            progress=False,
        )
    finally:
        os.umask(old)
    assert not orphan.exists()
    for name in ("model.safetensors", "model.json", "state.safetensors", "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name


def test_evaluate_out_into_a_directory_fails_before_any_work(capsys, tmp_path, ckpt):
    target = tmp_path / "results"
    target.mkdir()
    one_line_error(
        capsys,
        ["evaluate", "--quiet", "--checkpoint", ckpt, "--data", "digits", "--out", str(target)],
        "it is a directory",
    )


# ------------------------------------------------------------------------ the model, replayed
def test_replay_leaves_a_train_mode_model_exactly_as_it_was_and_repeats_itself():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 3)
    ).train()
    model[1].running_var.fill_(2.0)
    before = state_copy(model)
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    res = ns.attack(model, x, y, Threat(eps_x=0.05, eps_w=0.01), steps=3)
    first, second = res.replay(model, 0), res.replay(model, 0)
    assert torch.equal(first, second)  # no dropout: the deployed function
    assert_state_equal(model, before)  # BatchNorm's statistics did not move
    assert model.training and model[1].training
    torch.testing.assert_close(
        float(first[0, y[0]] - first[0].scatter(0, y[:1], -1e9).max()),
        float(res.margins[0]),
        atol=1e-4,
        rtol=0,
    )


# --------------------------------------------------------------------- edges that must work
def _margins_to(logits, y):
    """``z_y - z_j`` for every class j, ``+inf`` at ``j = y``, from logits alone."""
    out = logits[torch.arange(len(y)), y.long()][:, None] - logits
    return out.scatter(1, y.long()[:, None], float("inf"))


def _attack_is_real(model, x, y, threat, res):
    """The attack ran under ``threat``, its margins are the margins of perturbations it can
    replay, never above the clean ones, and the clean ones are those of ``model(x)``."""
    assert res.threat == threat
    clean = _margins_to(model(x).detach(), y).min(1).values
    torch.testing.assert_close(res.clean_margins, clean, atol=1e-5, rtol=0)
    assert bool((res.margins <= res.clean_margins + 1e-6).all())
    for i in range(len(y)):
        replayed = _margins_to(res.replay(model, i), y[i : i + 1]).min(1).values
        torch.testing.assert_close(replayed, res.margins[i : i + 1], atol=1e-4, rtol=0)
    return True


def _certificate_holds(model, x, y, threat, res, draws=256):
    """Finite lower bounds, below the margins of ``model`` at the clean input and at inputs
    drawn uniformly from the input box (clamped into ``threat.bounds``) by this test."""
    assert bool(torch.isfinite(res.lower.scatter(1, y[:, None], 0.0)).all())
    g = torch.Generator().manual_seed(1)
    noise = (torch.rand(draws, *x.shape, generator=g) * 2 - 1) * threat.eps_x
    points = torch.cat([x[None], x[None] + noise])
    if threat.bounds is not None:
        points = points.clamp(*threat.bounds)
    with torch.no_grad():
        seen = torch.stack([_margins_to(model(p), y) for p in points]).amin(0)
    assert bool((res.lower <= seen + 1e-5).all()), (res.lower, seen)
    return True


X_ON_BOUNDS = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
WORKING_CASES = {  # name: (what must work, what it must give)
    "largest budget": (
        lambda: Threat(eps_x=1e12, eps_w=1e12),
        lambda t: (t.eps_x, t.eps_w) == (1e12, 1e12),
    ),
    "seed at its maximum": (lambda: TrainConfig(seed=MAX_SEED), lambda c: c.seed == MAX_SEED),
    "attack with the largest seed": (
        lambda: ns.attack(_model(), X, Y, Threat(eps_x=0.1), steps=2, seed=MAX_SEED),
        lambda r: _attack_is_real(_model(), X, Y, Threat(eps_x=0.1), r),
    ),
    "x exactly on the bounds": (
        lambda: ns.certify(_model(), X_ON_BOUNDS, Y[:1], Threat(eps_x=0.1)),
        lambda r: _certificate_holds(_model(), X_ON_BOUNDS, Y[:1], Threat(eps_x=0.1), r),
    ),
    "no bounds, large x": (
        lambda: ns.certify(_model(), X * 100, Y, Threat(eps_x=0.1, bounds=None)),
        lambda r: _certificate_holds(_model(), X * 100, Y, Threat(eps_x=0.1, bounds=None), r),
    ),
    "one example": (
        lambda: ns.attack(_model(), X[:1], Y[:1], Threat(eps_x=0.1, eps_w=0.01), steps=2),
        lambda r: _attack_is_real(_model(), X[:1], Y[:1], Threat(eps_x=0.1, eps_w=0.01), r),
    ),
    "layer names with zero budget": (  # nothing is perturbed: the clean margins
        lambda: ns.attack(_model(), X, Y, Threat(layers=("1",))),
        lambda r: (
            _attack_is_real(_model(), X, Y, Threat(layers=("1",)), r)
            and torch.equal(r.margins, r.clean_margins)
        ),
    ),
    "uint8 labels": (  # read as the same classes as int64 labels
        lambda: ns.attack(_model(), X, Y.to(torch.uint8), Threat(), steps=1),
        lambda r: _attack_is_real(_model(), X, Y, Threat(), r),
    ),
}


@pytest.mark.parametrize("case", list(WORKING_CASES))
def test_the_edges_of_every_range_work(case):
    run, check = WORKING_CASES[case]
    assert check(run())


def test_a_state_written_by_the_library_loads(run_dir):
    tensors, meta = load_state(run_dir / "state.safetensors")
    assert meta["epoch"] == len(meta["history"]) == 1 and tensors


# ------------------------------------------------------------------------- caches (reproduce)
# the reproduction's tiny settings, without the parts these cases do not need
CACHED = {**TINY_SETTINGS, "stronger": False, "recipes": ()}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    from nonsingular.experiment import Experiment, run_experiment

    out = tmp_path_factory.mktemp("cached")
    return out, run_experiment(Experiment.quick(**CACHED), out, say=lambda text: None)


def _cache_edit(change):
    def hack(path):
        entries = json.loads(path.read_text())
        change(entries)
        path.write_text(json.dumps(entries))

    return hack


def _first(entries):
    return entries[next(iter(entries))]


def _edit_value(entries):
    row = _first(entries)["value"]["rows"][-1]
    row["attacked"] = 1.0 - (row["attacked"] or 0.0)  # a flipped number, checksum left stale


def _other_version(entries):
    import hashlib

    entry = _first(entries)
    entry["key"]["nonsingular"] = "0.0.1"  # numbers from another version
    digest = json.dumps([entry["key"], entry["value"]], sort_keys=True).encode()
    entry["sha256"] = hashlib.sha256(digest).hexdigest()  # consistent, so no warning


CACHE_CASES = {
    "truncated": (lambda p: p.write_text(p.read_text()[:40]), "unreadable"),
    "not json": (lambda p: p.write_text("{"), "unreadable"),
    "a list": (lambda p: p.write_text("[]"), "not an evaluation cache"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00"), "unreadable"),
    "entry reshaped": (_cache_edit(lambda e: _first(e).pop("sha256")), "damaged or was edited"),
    "entry replaced": (
        _cache_edit(lambda e: e.update({next(iter(e)): 5})),
        "damaged or was edited",
    ),
    "value hand-edited": (_cache_edit(_edit_value), "damaged or was edited"),
    "another version": (_cache_edit(_other_version), None),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_damaged_or_stale_caches_are_recomputed_never_trusted(case, reproduced, tmp_path):
    import shutil

    from nonsingular.experiment import Experiment, run_experiment

    source, original = reproduced
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    hack, warning = CACHE_CASES[case]
    hack(out / "evals" / "seed0" / "standard.json")
    messages = []
    again = run_experiment(Experiment.quick(**CACHED), out, say=messages.append)
    assert len(again.models) == len(original.models) and all(
        m.reused for m in again.models
    )  # models intact
    assert sum(m.evaluations_computed for m in again.models) > 0  # recomputed
    for model, earlier in zip(again.models, original.models, strict=True):
        assert model.accuracy == earlier.accuracy and model.joint == earlier.joint
    added = [w for w in again.warnings if w not in original.warnings]
    if warning is None:  # not a damaged cache: quietly not reused
        assert not added
    else:
        assert added and all(warning in w for w in added), added
