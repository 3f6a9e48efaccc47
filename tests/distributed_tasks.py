"""Work run the same way in one process and in several (``tests/test_distributed.py``): each
task returns plain numbers, so the two can be compared exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import nonsingular as ns
from nonsingular.data import load
from nonsingular.experiment import Experiment, run_experiment
from nonsingular.model.architectures import mlp
from nonsingular.training import METHODS, TrainConfig, train


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return mlp((1, 8, 8), hidden=(16,), classes=10).eval()


def evaluate(out: Path) -> dict:
    data = load("digits", test_size=45)
    grid = ns.grid(eps_x=[0.0, 0.05], eps_w=[0.0, 0.02])
    shared = ns.grid(eps_x=[0.05], eps_w=[0.02], scope="shared")
    table = ns.evaluate(
        _model(),
        data,
        grid + shared,
        ns.AttackOptions(steps=5, restarts=2, loss="both"),
        certify=["ibp", "crown"],
        batch_size=16,
        progress=False,
    )
    certified = ns.evaluate(_model(), data, grid, certify=["crown"], attack=None, progress=False)
    return {"attack": table.to_dict()["rows"], "certify": certified.to_dict()["rows"]}


def flips(out: Path) -> dict:
    """Bit flips of the quantized model: per-example (alone and joint with eps_x, dealt to the
    processes), shared (one process) and random faults, attacked and certified."""
    model = ns.quantize(_model())
    x = load("digits", test_size=45).x_test
    with torch.no_grad():
        data = (x, model(x).argmax(1))  # labelled by the model: every example counts
    grid = ns.grid(eps_x=[0.0, 0.03], flips=[0, 1, 3]) + ns.grid(flips=[4], scope="shared")
    table = ns.evaluate(model, data, grid, certify=["crown"], batch_size=16, progress=False)
    noise = ns.evaluate(
        model, data, ns.grid(flips=[20]), ns.AttackOptions(method="noise"), progress=False
    )
    return {"attack": table.to_dict()["rows"], "noise": noise.to_dict()["rows"]}


def training(out: Path) -> dict:
    data = load("digits")
    weights = {}
    for method in METHODS:
        config = TrainConfig(
            data="digits",
            method=method,
            hidden=(16,),
            epochs=1,
            eval_size=20,
            batch_size=64,
            attack_steps=2 if METHODS[method].attacks else None,
        )
        result = train(config, data, progress=False, out_dir=out / method)
        weights[method] = {k: v.tolist() for k, v in result.model.state_dict().items()}
        weights[method + " history"] = [
            {k: m[k] for k in ("loss", "train_accuracy", "test_accuracy", "robust_accuracy")}
            for m in result.history
        ]
    return weights


def reproduce(out: Path) -> dict:
    exp = Experiment.quick(
        data="digits",
        epochs=1,
        eval_size=40,
        cert_size=8,
        attack_steps=2,
        methods=("standard", "pgd-at", "awp"),
        eps_x=(0.0, 0.1),
        eps_w_absolute=(0.0, 0.01),
        eps_w_relative=(0.0, 0.1),
        eps_w_shared=(0.0, 0.05),
        joint_eps_x=(0.0, 0.1),
        joint_eps_w=(0.0, 0.01),
        flips=(0, 2),
        flip_draws=2,
        flip_limit=10,
    )
    results = run_experiment(exp, out, say=lambda text: None)
    document = results.to_dict()  # the numbers, and where each model was trained and saved
    return {"models": document["models"], "world_size": results.world_size}


TASKS = {"evaluate": evaluate, "flips": flips, "training": training, "reproduce": reproduce}


def worker(rank: int, world: int, port: int, task: str, out: str) -> None:
    """One process of ``world``: join the gloo group, run ``task``, rank 0 writes its result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = TASKS[task](Path(out) / "work")
        if rank == 0:
            (Path(out) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
