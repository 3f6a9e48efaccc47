"""Hostile input, round two (issue 20), the cases left after test_hostile_values/_files:
crafted training states whose digest was recomputed, models that do not fit the data,
``--model-args`` outside the flags' ranges, user factories that raise, deep nesting.

Each test states the exact outcome: a typed error (one line and exit code 2 on the command
line) naming what was wrong, and nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nonsingular import CheckpointError
from nonsingular.data import load
from nonsingular.training import TrainConfig, loop, train
from nonsingular.training.state import state_digest

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
