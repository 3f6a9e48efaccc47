"""Hostile input, round two (issue 20), the cases left after test_hostile_values/_files:
crafted training states whose digest was recomputed, models that do not fit the data,
``--model-args`` outside the flags' ranges, user factories that raise, deep nesting.

Each test states the exact outcome: a typed error (one line and exit code 2 on the command
line) naming what was wrong, and nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nonsingular as ns
from nonsingular import (
    AttackOptions,
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    Threat,
    attack,
    evaluate,
)
from nonsingular.data import Dataset, load
from nonsingular.training import TrainConfig, loop, train
from nonsingular.training.state import state_digest

from .test_hostile import exit_code

CONFIG = TrainConfig(data="digits", hidden=(8,), epochs=1, eval_size=0)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("more") / "run"
    train(CONFIG, digits, out_dir=out, progress=False)
    return out


# ----------------------------------------------------- training states, digest recomputed
def craft(path, tensors=None, meta=None, resign=True):
    """Change a state's tensors and header fields as a crafter would: with ``resign``, the
    digest is recomputed so the state is self-consistent and only the field checks refuse it."""
    weights = load_file(path)
    with safe_open(path, "pt") as f:
        fields = dict(f.metadata())
    if tensors is not None:
        tensors(weights)
    if meta is not None:
        meta(fields)
    if resign:
        fields["sha256"] = state_digest(weights, fields)
    save_file(weights, path, metadata=fields)


def _json_field(key, change):
    def edit(fields):
        value = json.loads(fields[key])
        change(value)
        fields[key] = json.dumps(value)

    return edit


def _beta1(groups):
    groups[0]["betas"][0] = 0.8


def _nan_weight(weights):
    name = next(k for k in weights if k.startswith("model.") and k.endswith("weight"))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")


def _first_slot(weights, slot):
    return next(k for k in weights if k.startswith("optim.") and k.endswith(slot))


STATES = {
    "beta1 edited, digest kept": (None, _json_field("param_groups", _beta1), False, "SHA-256"),
    "epoch history edited, digest kept": (
        None,
        _json_field("history", lambda h: h[0].update(loss=0.0)),
        False,
        "SHA-256",
    ),
    "beta1 0.9 -> 0.8": (None, _json_field("param_groups", _beta1), True, "betas"),
    "lr edited": (
        None,
        _json_field("param_groups", lambda g: g[0].update(lr=1.0)),
        True,
        "lr",
    ),
    "weight decay added": (
        None,
        _json_field("param_groups", lambda g: g[0].update(weight_decay=0.5)),
        True,
        "weight_decay",
    ),
    "params [0,1,2,99]": (
        None,
        _json_field("param_groups", lambda g: g[0].update(params=[0, 1, 2, 99])),
        True,
        "params",
    ),
    "NaN weight": (_nan_weight, None, True, "NaN"),
    "float64 weight": (
        lambda w: w.update({k: v.double() for k, v in w.items() if k.startswith("model.")}),
        None,
        True,
        "float64",
    ),
    "NaN Adam moment": (
        lambda w: w[_first_slot(w, "exp_avg")].view(-1).__setitem__(0, float("nan")),
        None,
        True,
        "NaN",
    ),
    "Adam moment dropped": (
        lambda w: w.pop(_first_slot(w, "exp_avg_sq")),
        None,
        True,
        "exp_avg_sq",
    ),
    "moment for parameter 99": (
        lambda w: w.update({"optim.99.exp_avg": w[_first_slot(w, "exp_avg")].clone()}),
        None,
        True,
        "parameter '99'",
    ),
    "unknown slot": (
        lambda w: w.update({"optim.0.momentum_buffer": w[_first_slot(w, "exp_avg")].clone()}),
        None,
        True,
        "keeps",
    ),
    "schedule restarted": (
        None,
        _json_field("schedule", lambda s: s.update(last_epoch=0, _step_count=1)),
        True,
        "steps",
    ),
    "schedule total steps": (
        None,
        _json_field("schedule", lambda s: s.update(total_steps=10**6)),
        True,
        "total_steps",
    ),
    "schedule last rates": (
        None,
        _json_field("schedule", lambda s: s.update(_last_lr=[1.0])),
        True,
        "last rates",
    ),
}


@pytest.mark.parametrize("case", list(STATES))
def test_a_crafted_training_state_is_refused_even_with_its_digest_recomputed(
    case, run_dir, tmp_path, digits
):
    out = tmp_path / "run"
    out.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    tensors, meta, resign, message = STATES[case]
    craft(out / "state.safetensors", tensors, meta, resign)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(CheckpointError, match=message):
        train(CONFIG, digits, out_dir=out, resume=True, progress=False)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_an_untouched_state_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path, digits, monkeypatch
):
    two = TrainConfig(data="digits", hidden=(8,), epochs=2, eval_size=0)
    straight = train(two, digits, progress=False).model
    out = tmp_path / "run"
    real = loop.save_state

    def killed_after_the_first_state(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", killed_after_the_first_state)
    with pytest.raises(KeyboardInterrupt):
        train(two, digits, out_dir=out, progress=False)
    monkeypatch.undo()
    resumed = train(two, digits, out_dir=out, resume=True, progress=False)
    assert len(resumed.history) == 2
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


# ------------------------------------------- models that do not fit the data, refused first
MISFITS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, out=10, width=64, freeze=False, dtype=torch.float32):
        super().__init__()
        self.fc = nn.Linear(width, out, dtype=dtype)
        self.fc.requires_grad_(not freeze)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Pair(Net):
    def forward(self, x):
        return super().forward(x), x


class Named(Net):
    def forward(self, x):
        return {"logits": super().forward(x)}


class Double(Net):  # float32 weights, float64 logits (a float64 model trains: data is cast)
    def forward(self, x):
        return self.fc(x.flatten(1)).double()


class Detached(Net):
    def forward(self, x):
        return super().forward(x).detach()


class Bypass(Net):
    def forward(self, x):
        return torch.zeros(len(x), 10, requires_grad=True) + 0 * x.flatten(1)[:, :10]


class Empty(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]


def classes3():
    return Net(out=3)


def mnist_sized():
    return Net(width=784)


def pair():
    return Pair()


def named():
    return Named()


def float64():
    return Double()


def frozen():
    return Net(freeze=True)


def parameterless():
    return Empty()


def detached():
    return Detached()


def bypass():
    return Bypass()
"""
FITS = {  # factory in MISFITS -> what the one-line error names
    "classes3": r"outputs shape \(\d+, 3\) .* expected \(\d+, 10\)",
    "mnist_sized": r"does not accept the data's batches \(torch.float32 of shape \(\d+, 1, 8, 8\)",
    "pair": "returns a tuple, expected a tensor",
    "named": "returns a dict, expected a tensor",
    "float64": "outputs torch.float64 for torch.float32 data",
    "frozen": "no trainable parameters",
    "parameterless": "no trainable parameters",
    "detached": "output does not depend on trainable parameters",
    "bypass": "no gradient reaches its trainable parameters",
}
TRAIN = ["train", "--quiet", "--device", "cpu", "--data", "digits", "--epochs", "1"]
TRAIN += ["--eval-size", "0"]


@pytest.fixture
def misfits(tmp_path, monkeypatch):
    module = "hostile_misfit_factories"
    (tmp_path / f"{module}.py").write_text(MISFITS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    yield module
    sys.modules.pop(module, None)


@pytest.mark.parametrize("name", list(FITS))
def test_a_factory_model_that_does_not_fit_the_data_is_refused_before_any_write(
    name, misfits, capsys, tmp_path
):
    out = tmp_path / "run"
    code = exit_code([*TRAIN, "--model", f"{misfits}:{name}", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.search(FITS[name], err[0]) and f"{misfits}:{name}" in err[0], err[0]
    assert not out.exists()  # no .lock, config.json or config.toml first


@pytest.mark.parametrize("name", list(FITS))
def test_a_model_instance_that_does_not_fit_is_refused_untouched(name, misfits, tmp_path, digits):
    import importlib

    model = getattr(importlib.import_module(misfits), name)()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=FITS[name]):
        train(CONFIG, digits, model=model, out_dir=out, progress=False)
    assert not out.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------- --model-args: the factory's signature
DEEP = '{"a": ' * 5000 + "1" + "}" * 5000
MODEL_ARGS = {  # (model, --model-args, what the one-line error says)
    'hidden "16"': ("mlp", '{"hidden": "16"}', "argument hidden must be a list of integers"),
    "hidden [8.7]": ("mlp", '{"hidden": [8.7]}', "argument hidden must be a list of integers"),
    "hidden [0]": ("mlp", '{"hidden": [0]}', "a width must be from 1 to 65536, got 0"),
    "hidden [1e6]": ("mlp", '{"hidden": [1000000]}', "a width must be from 1 to 65536"),
    "hidden [true]": ("mlp", '{"hidden": [true]}', "argument hidden must be a list of integers"),
    'bias "no"': ("mlp", '{"bias": "no"}', "argument bias must be true or false"),
    "bias 0": ("mlp", '{"bias": 0}', "argument bias must be true or false"),
    "hidden [1e400]": ("mlp", '{"hidden": [1e400]}', "must be a finite number"),
    "unknown name": ("mlp", '{"depth": 3}', "takes no argument depth; it takes in_shape"),
    "cnn hidden true": ("cnn", '{"hidden": true}', "argument hidden must be an integer"),
    "cnn channels wide": ("cnn", '{"channels": [70000]}', "a width must be from 1 to 65536"),
    'resnet channels "8"': ("resnet", '{"channels": "8"}', "must be a list of integers"),
    "nested 5000 deep": ("mlp", DEEP, "--model-args nests 5000 levels deep; at most 64"),
}


@pytest.mark.parametrize("case", list(MODEL_ARGS))
def test_model_args_are_checked_against_the_factory_before_any_write(case, capsys, tmp_path):
    model, args, message = MODEL_ARGS[case]
    out = tmp_path / "run"
    code = exit_code([*TRAIN, "--model", model, "--model-args", args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert message in err[0], err[0]
    assert not out.exists()


USER = """
import torch
from torch import nn


def typed(in_shape, classes, width: int = 8, scale: float = 1.0, tag: str = "x"):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, classes))


def untyped(in_shape, classes, width=8, widths=(4, 4)):
    return typed(in_shape, classes, width)


def anything(in_shape, classes, **options):
    return typed(in_shape, classes)


def divides(in_shape, classes):
    return 1 / 0


def looks_up(in_shape, classes):
    return {}["missing key"]
"""
USER_ARGS = {  # (factory, --model-args, error or None when it trains)
    "typed width text": ("typed", {"width": "8"}, "argument width must be an integer"),
    "typed width 0": ("typed", {"width": 0}, "a width must be from 1 to 65536"),
    "typed scale text": ("typed", {"scale": "1"}, "argument scale must be a number"),
    "typed tag number": ("typed", {"tag": 5}, "argument tag must be a string"),
    "typed unknown": ("typed", {"colour": 1}, "takes no argument colour"),
    "untyped width 2.5": ("untyped", {"width": 2.5}, "argument width must be an integer"),
    "untyped widths text": ("untyped", {"widths": "44"}, "must be a list of integers"),
    "untyped widths [4]": ("untyped", {"width": 4, "widths": [4]}, None),
    "any keyword taken": ("anything", {"colour": "red"}, None),
    "any keyword still finite": ("anything", {"x": [1e400]}, "must be a finite number"),
    "raises at call": ("divides", {}, "failed: ZeroDivisionError: division by zero"),
    "KeyError at call": ("looks_up", {}, "failed: KeyError: 'missing key'"),
}


def _user_module(tmp_path, monkeypatch, name, text):
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize("case", list(USER_ARGS))
def test_a_user_factorys_arguments_follow_its_signature_and_its_errors_are_one_line(
    case, capsys, tmp_path, monkeypatch
):
    _user_module(tmp_path, monkeypatch, "hostile_user_factory", USER)
    factory, args, message = USER_ARGS[case]
    out = tmp_path / "run"
    name = f"hostile_user_factory:{factory}"
    code = exit_code([*TRAIN, "--model", name, "--model-args", json.dumps(args), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    if message is None:
        assert code == 0, err
        assert (out / "model.safetensors").exists()
        return
    assert code == 2 and len(err) == 1, err
    assert message in err[0] and name.split(":")[0] in err[0], err[0]
    assert not out.exists()


BROKEN_MODULES = {  # module text -> what the one line says
    "syntax": ("def build(:\n", "raised SyntaxError: invalid syntax"),
    "runtime": ('raise RuntimeError("no GPU driver here")\n', "RuntimeError: no GPU driver here"),
    "assertion": ("assert False, 'configure me first'\n", "AssertionError: configure me first"),
}


@pytest.mark.parametrize("case", list(BROKEN_MODULES))
@pytest.mark.parametrize("debug", [False, True])
def test_a_factory_module_raising_at_import_is_one_line_its_traceback_under_debug(
    case, debug, capsys, tmp_path, monkeypatch
):
    module = f"hostile_broken_{case}"
    text, message = BROKEN_MODULES[case]
    _user_module(tmp_path, monkeypatch, module, text)
    if debug:
        monkeypatch.setenv("NONSINGULAR_DEBUG", "1")
    else:
        monkeypatch.delenv("NONSINGULAR_DEBUG", raising=False)
    out = tmp_path / "run"
    code = exit_code([*TRAIN, "--model", f"{module}:build", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert message in err[-1] and f"model {module}:build" in err[-1], err[-1]
    if debug:  # the original traceback, from the user's file, above the one line
        assert err[0].startswith("Traceback") and any(f"{module}.py" in line for line in err)
    else:
        assert len(err) == 1, err


# ------------------------------- checkpoints: nesting, numbers and devices in what they say
def _sidecar_edit(change):
    def hack(path):
        sidecar = path.with_suffix(".json")
        info = json.loads(sidecar.read_text())
        change(info)
        sidecar.write_text(json.dumps(info))

    return hack


def _sidecar_text(text_of):
    """Replace the sidecar by a text built from its JSON (for what json.dumps cannot write)."""

    def hack(path):
        sidecar = path.with_suffix(".json")
        sidecar.write_text(text_of(json.loads(sidecar.read_text())))

    return hack


def _header(change):
    """Rewrite the safetensors header, the sidecar's SHA-256 recomputed: self-consistent."""

    def hack(path):
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = change(data[8 : 8 + size].decode())
        encoded = header.encode() + b" " * (-len(header.encode()) % 8)
        data = struct.pack("<Q", len(encoded)) + encoded + data[8 + size :]
        path.write_bytes(data)
        _sidecar_edit(lambda i: i.update(sha256=hashlib.sha256(data).hexdigest()))(path)

    return hack


def _arch(**fields):
    return _sidecar_edit(lambda i: i["model"].update(fields))


def _arch_text(key, token):
    return _sidecar_text(
        lambda i: json.dumps({**i, "model": {**i["model"], key: "@@"}}).replace('"@@"', token)
    )


def _layer(**fields):
    return _sidecar_edit(lambda i: i["model"][1].update(fields))


def _first_shape(header, token):
    parsed = json.loads(header)
    name = next(k for k in parsed if k != "__metadata__")
    parsed[name]["shape"] = "@@"
    return json.dumps(parsed).replace('"@@"', token)


def _nan_features(info):
    info["model"][1]["in_features"] = "@@"
    return json.dumps(info).replace('"@@"', "NaN")


NESTED = "[" * 5000 + "]" * 5000
SIDECARS = {  # (which checkpoint, hack, what the error names)
    "sidecar 5000 deep": (
        "factory",
        _sidecar_text(lambda i: json.dumps({**i, "x": "@@"}).replace('"@@"', NESTED)),
        "nests 5001 levels deep",
    ),
    "header 5000 deep": (
        "factory",
        _header(lambda h: h[:-1] + ', "__metadata__": {"x": ' + NESTED + "}}"),
        "nests 5001 levels deep",
    ),
    "header shape 1e400": ("factory", _header(lambda h: _first_shape(h, "[1e400]")), "shape"),
    "header shape text": ("factory", _header(lambda h: _first_shape(h, '["8"]')), "shape"),
    'in_shape "abc"': ("factory", _arch(in_shape="abc"), "in_shape"),
    "in_shape NaN": ("factory", _arch_text("in_shape", "[1, NaN, 8]"), "in_shape"),
    "in_shape Infinity": ("factory", _arch_text("in_shape", "[1, Infinity, 8]"), "in_shape"),
    "in_shape 8.5": ("factory", _arch(in_shape=[1, 8.5, 8]), "in_shape"),
    "in_shape true": ("factory", _arch(in_shape=[True, 8, 8]), "in_shape"),
    'layer device "meta"': ("layers", _layer(device="meta"), "device"),
    'layer device "cuda"': ("layers", _layer(device="cuda"), "device"),
    "layer in_features NaN": ("layers", _sidecar_text(_nan_features), "in_features"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, run_dir):
    """The two sidecar formats: an architecture (a factory) and a list of layers."""
    from nonsingular import checkpoint
    from nonsingular.model.architectures import mlp

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    return {
        "factory": run_dir / "model.safetensors",
        "layers": checkpoint.save(mlp((1, 8, 8), hidden=(8,)), folder / "layers.safetensors"),
    }


@pytest.mark.parametrize("case", list(SIDECARS))
def test_a_checkpoints_description_is_range_checked_and_never_picks_the_device(
    case, checkpoints, tmp_path
):
    from nonsingular import checkpoint

    which, hack, message = SIDECARS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(checkpoints[which].read_bytes())
    path.with_suffix(".json").write_bytes(checkpoints[which].with_suffix(".json").read_bytes())
    checkpoint.load(path)  # intact, it loads
    hack(path)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)


TOMLS = {
    "arrays 5000 deep": "model-args = { a = " + "[" * 5000 + "]" * 5000 + " }\n",
    "inline tables 5000 deep": "model-args = " + "{ a = " * 5000 + "1" + " }" * 5000 + "\n",
    "dotted keys 5000 deep": "model-args." + ".".join(["a"] * 5000) + " = 1\n",
}


@pytest.mark.parametrize("case", list(TOMLS))
def test_a_deeply_nested_toml_is_one_line_before_any_write(case, capsys, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(TOMLS[case])
    out = tmp_path / "run"
    code = exit_code([*TRAIN, "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err[-3:]
    assert "nests" in err[0] and "64" in err[0], err[0]
    assert not out.exists()


def test_a_training_state_with_deeply_nested_history_is_refused(run_dir, tmp_path, digits):
    out = tmp_path / "run"
    out.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    nested = "[" * 5000 + "]" * 5000
    craft(out / "state.safetensors", meta=lambda m: m.update(history=nested))
    with pytest.raises(CheckpointError, match="history nests 5000 levels deep"):
        train(CONFIG, digits, out_dir=out, resume=True, progress=False)


# ------------------------------------ reproduce: the whole experiment checked before any work
def _experiment(tmp_path, **changes):
    """The tiny experiment of test_hostile_files with ``changes`` (TOML values, as text)."""
    from .test_hostile_files import EXPERIMENT

    lines = [line for line in EXPERIMENT.splitlines() if line.split(" =")[0] not in changes] + [
        f"{key} = {value}" for key, value in changes.items()
    ]
    path = tmp_path / "experiment.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


EXPERIMENTS = {  # (TOML changes, extra flags, what the one line names)
    'intermediate "bogus"': ({"intermediate": '"bogus"'}, [], "intermediate must be one of"),
    "intermediate 5": ({"intermediate": "5"}, [], "intermediate must be one of"),
    "eps-x [0, 1e300]": ({"eps-x": "[0, 1e300]"}, [], "eps_x must be a list"),
    "joint-eps-w [0, 1e300]": ({"joint-eps-w": "[0, 1e300]"}, [], "joint_eps_w must be a list"),
    "recipes = 5": ({"recipes": "5"}, [], "recipes must be a list of names"),
    'recipes = "no-augmentation"': (
        {"recipes": '"no-augmentation"'},
        [],
        "recipes must be a list of names",
    ),
    "recipe-methods = 5": ({"recipe-methods": "5"}, [], "recipe_methods must be a list"),
    "data = 5": ({"data": "5"}, [], "data must be a data set name"),
    "--data nosuch": ({}, ["--data", "nosuch"], "unknown data set 'nosuch'"),
    "data nosuch dir": ({"data": '"idx:/nonexistent/place"'}, [], "expected a directory"),
}


@pytest.mark.parametrize("case", list(EXPERIMENTS))
def test_reproduce_checks_the_whole_experiment_before_creating_its_directory(
    case, capsys, tmp_path
):
    changes, flags, message = EXPERIMENTS[case]
    config = _experiment(tmp_path, **changes)
    out = tmp_path / "out"
    code = exit_code(
        ["reproduce", "--quiet", "--device", "cpu", "--config", str(config)]
        + ["--out", str(out), *flags]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err[-3:]
    assert message in err[0], err[0]
    assert not out.exists()  # nothing trained, not even a .lock


# ------------------------------------------------------------- the Python API checks its data
def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    ).eval()


X4, Y4 = torch.rand(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
SMALL = {"epochs": 1, "batch_size": 4, "eval_size": 0, "augment": 0, "hidden": (4,)}


def _data(**changes):
    fields = {"name": "t", "x_train": X4, "y_train": Y4, "x_test": X4, "y_test": Y4, "classes": 3}
    return Dataset(**{**fields, **changes})


DATA_CASES = {  # (method, dataset changes, what the InputError says)
    "test label 12": (
        "pgd-at",
        {"y_test": Y4.clone().fill_(12)},
        r"data.y_test holds labels in \[12, 12\]",
    ),
    "train label -1": ("standard", {"y_train": Y4 - 1}, r"data.y_train holds labels in \[-1, 1\]"),
    "float labels": ("standard", {"y_train": Y4.float()}, "data.y_train must be an integer tensor"),
    "inputs in [0, 5] for pgd-at": ("pgd-at", {"x_train": X4 * 5}, "outside the bounds"),
    "test inputs in [-1, 0] for pgd-at": ("pgd-at", {"x_test": -X4}, "data.x_test has values"),
    "empty training set": (
        "standard",
        {"x_train": X4[:0], "y_train": Y4[:0]},
        "data.x_train holds no examples",
    ),
    "fewer labels than inputs": ("standard", {"y_train": Y4[:5]}, r"must have shape \(8,\)"),
    "test examples of another shape": (
        "standard",
        {"x_test": torch.rand(8, 5)},
        r"data.x_test has examples of shape \(5,\)",
    ),
    "NaN input": ("standard", {"x_train": X4.clone().fill_(float("nan"))}, "NaN or infinite"),
    "classes 0": ("standard", {"classes": 0}, "data.classes must be a positive integer"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_train_checks_the_data_before_any_work(case, tmp_path):
    method, changes, message = DATA_CASES[case]
    config = TrainConfig(method=method, **SMALL)
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "run"
    with pytest.raises(InputError, match=message):
        train(config, _data(**changes), model=model, out_dir=out, progress=False)
    assert not out.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_normalized_data_trains_with_a_threat_that_does_not_clamp(tmp_path):
    """The bounds are the threat's: data outside [0, 1] trains when nothing clamps to it."""
    result = train(
        TrainConfig(method="standard", **SMALL),
        _data(x_train=X4 * 5),
        model=_tiny(),
        progress=False,
    )
    assert len(result.history) == 1


THREAT = Threat(eps_x=0.1, eps_w=0.01)
OPTION_CASES = {  # call -> what the ConfigError says
    "attack random_start yes": (
        lambda: attack(_tiny(), X4, Y4, THREAT, random_start="yes"),
        "random_start must be True, False or None, got 'yes'",
    ),
    "attack random_start 1": (
        lambda: attack(_tiny(), X4, Y4, THREAT, random_start=1),
        "random_start must be True, False or None",
    ),
    "attack key misspelt": (
        lambda: attack(_tiny(), X4, Y4, THREAT, stepz=3),
        "unknown attack options: stepz; known: loss, method",
    ),
    "attack key attack sets itself": (
        lambda: AttackOptions.of(positions=None),
        "unknown attack options: positions",
    ),
    "certify key misspelt": (
        lambda: ns.certify(_tiny(), X4, Y4, THREAT, "ibp", dtypo=1),
        "unknown certificate options: dtypo; known: batch_size, dtype",
    ),
    "evaluate attack options not typed": (
        lambda: evaluate(_tiny(), (X4, Y4), [THREAT], {"steps": 3}, progress=False),
        "attack must be AttackOptions (or None: certify only), got dict",
    ),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_keys_and_kinds_are_checked_by_name(case):
    call, message = OPTION_CASES[case]
    with pytest.raises(ConfigError, match=re.escape(message)):
        call()


@pytest.fixture(scope="module")
def attacked():
    model = _tiny()
    return model, attack(model, X4, Y4, THREAT, steps=3)


REPLAY_CASES = {
    "index 8 of 8": (
        lambda r, m: r.replay(m, 8),
        r"example index must be an integer in \[-8, 8\), got 8",
    ),
    "index -9": (lambda r, m: r.replay(m, -9), "got -9"),
    "index 1.5": (lambda r, m: r.replay(m, 1.5), "got 1.5"),
    "index True": (lambda r, m: r.replay(m, True), "got True"),
    "weight_deltas 99": (lambda r, m: r.weight_deltas(99), "got 99"),
    "another width": (
        lambda r, m: r.replay(
            torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(4, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)
            ),
            0,
        ),
        r"perturbed 1.weight of shape \(6, 4\), this model has \(7, 4\)",
    ),
    "other names": (
        lambda r, m: r.replay(torch.nn.Sequential(torch.nn.Linear(4, 3)), 0),
        "this model has no such parameter",
    ),
    "not a model": (lambda r, m: r.replay("model", 0), "model must be a torch.nn.Module"),
}


@pytest.mark.parametrize("case", list(REPLAY_CASES))
def test_replay_refuses_another_model_or_an_index_outside_the_batch(case, attacked):
    model, result = attacked
    call, message = REPLAY_CASES[case]
    with pytest.raises(InputError, match=message):
        call(result, model)


def test_replay_takes_any_integer_index_and_negative_ones_count_from_the_end(attacked):
    model, result = attacked
    last = result.replay(model, -1)
    assert last.shape == (1, 3)  # x_adv[-1:0] was empty
    assert torch.equal(last, result.replay(model, 7))
    assert torch.equal(result.replay(model, torch.tensor(7)), last)


# ------------------------------------------------------------------------- data files
def _cifar_dir(root, batch=None, test=None):
    """A python-format CIFAR-10 directory: one training batch, one test batch."""
    root.mkdir()
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name, content in (("data_batch_1", batch or good), ("test_batch", test or good)):
        (root / name).write_bytes(pickle.dumps(content, protocol=2))
    return f"cifar10:{root}"


def _shared_lists(levels=12, width=10):
    """A few hundred bytes of pickle: one list shared ``width`` times per level, ``width **
    levels`` leaves once expanded (np.asarray would build them all)."""
    inner: list = [0] * width
    for _ in range(levels):
        inner = [inner] * width
    return inner


def _fifo(root):
    root.mkdir()
    os.mkfifo(root / "data_batch_1.bin")
    (root / "test_batch.bin").write_bytes(bytes(3073))
    return f"cifar10:{root}"


def _to_dev_zero(root):
    root.mkdir()
    (root / "data_batch_1.bin").symlink_to("/dev/zero")
    (root / "test_batch.bin").write_bytes(bytes(3073))
    return f"cifar10:{root}"


def _idx_0x0(root):
    from .test_hostile import _idx_set

    return _idx_set(
        root,
        **{
            "train-images-idx3-ubyte": (0x803, (10, 0, 0), b""),
            "t10k-images-idx3-ubyte": (0x803, (4, 0, 0), b""),
        },
    )


FILES = {  # build(root) -> name to load, what the DataError says
    "FIFO named data_batch_1.bin": (_fifo, "expected a regular file, found a FIFO"),
    "data_batch_1.bin linked to /dev/zero": (_to_dev_zero, "expected a regular file"),
    "labels: shared nested lists": (
        lambda r: _cifar_dir(
            r, {b"data": np.zeros((2, 3072), np.uint8), b"labels": _shared_lists()}
        ),
        "flat list of integers",
    ),
    "data: shared nested lists": (
        lambda r: _cifar_dir(r, {b"data": _shared_lists(), b"labels": [0, 1]}),
        "b'data' to be a numpy array, found list",
    ),
    "data: ragged lists": (
        lambda r: _cifar_dir(r, {b"data": [[1, 2], [3]], b"labels": [0, 1]}),
        "b'data' to be a numpy array",
    ),
    "labels: ragged lists": (
        lambda r: _cifar_dir(r, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], 1]}),
        "flat list of integers",
    ),
    "labels: huge integer": (
        lambda r: _cifar_dir(r, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 2**70]}),
        "huge integer",
    ),
    "labels: a string": (
        lambda r: _cifar_dir(r, {b"data": np.zeros((2, 3072), np.uint8), b"labels": "01"}),
        "b'labels' to be a list or array",
    ),
    "IDX images of 0x0 pixels": (_idx_0x0, r"at least 1x1 pixels, found \(0, 0\)"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_data_files_are_regular_files_read_within_bounds(case, tmp_path):
    build, message = FILES[case]
    name = build(tmp_path / "d")
    signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(20)  # a FIFO's open would otherwise wait for a writer forever
    try:
        with pytest.raises(DataError, match=message):
            load(name)
    finally:
        signal.alarm(0)


def _too_slow(*_):
    raise TimeoutError("load() did not return within 20 s")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: load(5), "data set name must be a string"),
        (lambda: load(None), "data set name must be a string"),
        (lambda: load("digits", seed=-1), "seed must be an integer from 0"),
        (lambda: load("digits", seed=2**40), "seed must be an integer from 0"),
        (lambda: load("digits", seed="0"), "seed must be an integer"),
    ],
)
def test_load_checks_its_name_and_seed(call, message):
    with pytest.raises(DataError, match=message):
        call()


def test_a_well_formed_python_cifar_directory_still_loads(tmp_path):
    data = load(_cifar_dir(tmp_path / "d"))
    assert data.x_train.shape == (2, 3, 32, 32) and data.y_train.tolist() == [0, 1]


# ------------------------------------------------------- torchrun: the ranks agree or refuse
def cli_rank(rank: int, world: int, port: int, commands: list, out: str) -> None:
    """One process of a torchrun-like group (gloo) running each command line of ``commands``
    (one per rank each) in turn through the CLI; writes each exit code and stderr."""
    import contextlib
    import io

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    outcomes = []
    try:
        for per_rank in commands:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                outcomes.append([exit_code(per_rank[rank]), err.getvalue()])
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcomes))


DISAGREE = {  # flags of rank 0, of rank 1, the option the error names
    "seed": (["--seed", "0"], ["--seed", "1"], "--seed: rank 0 0, rank 1 1"),
    "lr": (["--lr", "0.004"], ["--lr", "0.003"], "--lr: rank 0 0.004, rank 1 0.003"),
    "epochs": (["--epochs", "1"], ["--epochs", "2"], "--epochs: rank 0 1, rank 1 2"),
    "eps-x on one rank only": ([], ["--eps-x", "0.1"], "--eps-x: rank 0 None, rank 1 0.1"),
}


def test_torchrun_ranks_started_with_different_options_refuse_naming_it(tmp_path):
    import torch.multiprocessing as mp

    from .test_distributed import free_port

    base = ["train", "--quiet", "--device", "cpu", "--data", "digits", "--hidden", "8"]
    base += ["--eval-size", "0", "--epochs", "1"]  # a later --epochs wins
    commands = [
        [[*base, "--out", str(tmp_path / case), *flags] for flags in DISAGREE[case][:2]]
        for case in DISAGREE
    ]
    mp.spawn(cli_rank, args=(2, free_port(), commands, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        outcomes = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, (code, err) in zip(DISAGREE, outcomes, strict=True):
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, (case, rank, err)
            assert "started with different options" in lines[0], (case, lines[0])
            assert DISAGREE[case][2] in lines[0], (case, lines[0])
            assert not (tmp_path / case).exists()
