"""Two processes (torch.distributed, gloo on the CPU) give the numbers of one: evaluate,
certify (bit flips too), train (every method) and reproduce, from Python and through
torchrun; a process that dies fails the job, and nothing partial is written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from nonsingular.distributed import Ranks, mine

from .distributed_tasks import METHODS, TASKS, worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_two_processes(task: str, tmp_path: Path) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(2, free_port(), task, str(tmp_path)), nprocs=2, join=True)
    return json.loads((tmp_path / "result.json").read_text())


def in_one_process(task: str, tmp_path: Path) -> dict:
    return json.loads(json.dumps(TASKS[task](tmp_path / "work")))


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.slow  # a torchrun job of two processes
def test_evaluate_and_certify_in_two_processes_give_the_numbers_of_one(tmp_path):
    one = in_one_process("evaluate", tmp_path / "one")
    two = in_two_processes("evaluate", tmp_path / "two")
    assert without_timings(two["attack"]) == without_timings(one["attack"])
    assert without_timings(two["certify"]) == without_timings(one["certify"])
    assert any(r["attacked"] < r["clean"] for r in one["attack"])  # the attacks did something
    assert one["attack"][-1]["threat"]["scope"] == "shared"  # one perturbation for all: kept


@pytest.mark.slow  # a torchrun job of two processes
def test_bit_flip_evaluation_in_two_processes_gives_the_numbers_of_one(tmp_path):
    one = in_one_process("flips", tmp_path / "one")
    two = in_two_processes("flips", tmp_path / "two")
    assert without_timings(two["attack"]) == without_timings(one["attack"])
    assert without_timings(two["noise"]) == without_timings(one["noise"])
    assert [r["threat"].get("flips", 0) for r in one["attack"]] == [0, 1, 3, 0, 1, 3, 4]
    assert any(r["attacked"] < r["clean"] for r in one["attack"])  # the flips did something
    assert any(r["certified"]["crown"] < r["clean"] for r in one["attack"])


@pytest.mark.slow  # a torchrun job of two processes
def test_training_in_two_processes_reaches_the_weights_of_one(tmp_path):
    one = in_one_process("training", tmp_path / "one")
    two = in_two_processes("training", tmp_path / "two")
    for method in METHODS:
        for name, weights in one[method].items():
            gap = max(
                abs(a - b) for a, b in zip(_flat(weights), _flat(two[method][name]), strict=True)
            )
            assert gap <= 1e-4, (method, name, gap)
        for m1, m2 in zip(one[method + " history"], two[method + " history"], strict=True):
            for key, value in m1.items():
                if value is None:  # no robust accuracy without a threat
                    assert m2[key] is None
                else:
                    assert value == pytest.approx(m2[key], rel=1e-5, abs=1e-6), (method, key)
    # only rank 0 wrote the run directories, and their configs say how many processes ran
    info = json.loads((tmp_path / "two" / "work" / "pgd-at" / "config.json").read_text())
    assert info["world_size"] == 2


def _flat(value):
    if isinstance(value, list):
        for v in value:
            yield from _flat(v)
    else:
        yield value


@pytest.mark.slow  # a torchrun job of two processes
def test_reproduce_in_two_processes_gives_the_numbers_of_one(tmp_path):
    one = in_one_process("reproduce", tmp_path / "one")
    two = in_two_processes("reproduce", tmp_path / "two")
    assert len(one["models"]) == len(two["models"]) == 3 + 3  # and the recipe's three
    for a, b in zip(one["models"], two["models"], strict=True):
        assert (a["method"], a["seed"], a["recipe"]) == (b["method"], b["seed"], b["recipe"])
        for key in ("clean", "accuracy", "joint", "outcomes", "certified", "matched", "stronger"):
            assert a[key] == b[key], (a["method"], a["recipe"], key)
    assert (one["world_size"], two["world_size"]) == (1, 2)


FRAGILE = """
import os
import signal

import torch.distributed as dist
from torch import nn


class Fragile(nn.Sequential):
    def forward(self, x):
        if os.environ.get("KILL_RANK") and dist.is_initialized():
            if dist.get_rank() == int(os.environ["KILL_RANK"]):
                os.kill(os.getpid(), signal.SIGKILL)  # this process dies, as in a crash
        return super().forward(x)


def fragile(in_shape, classes):
    return Fragile(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))
"""


def torchrun(args, env=None):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "nonsingular",
        *args,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.mark.slow  # a torchrun job of two processes
def test_torchrun_evaluates_like_one_process_and_a_killed_process_fails_the_job(tmp_path):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(FRAGILE))
    env = {"PYTHONPATH": str(tmp_path)}
    base = [sys.executable, "-m", "nonsingular"]
    run = tmp_path / "run"
    subprocess.run(
        [
            *base,
            "train",
            "--model",
            "userpkg.models:fragile",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--eval-size",
            "0",
            "--out",
            str(run),
            "--quiet",
        ],
        check=True,
        env={**os.environ, **env},
        capture_output=True,
        timeout=240,
    )
    args = [
        "evaluate",
        "--checkpoint",
        str(run / "model.safetensors"),
        "--model",
        "userpkg.models:fragile",
        "--data",
        "digits",
        "--eps-x",
        "0,0.05",
        "--eps-w",
        "0,0.01",
        "--steps",
        "5",
        "--certify",
        "ibp",
        "--quiet",
    ]
    single = subprocess.run(
        [*base, *args, "--out", str(tmp_path / "one.json")],
        env={**os.environ, **env},
        capture_output=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr
    both = torchrun([*args, "--out", str(tmp_path / "two.json")], env)
    assert both.returncode == 0, both.stderr[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert without_timings(two["rows"]) == without_timings(one["rows"])
    assert two["world_size"] == 2 and "world_size" not in one or one.get("world_size") == 1
    assert both.stdout.count("examples;") == 1  # one process printed the table

    killed = torchrun([*args, "--out", str(tmp_path / "killed.json")], {**env, "KILL_RANK": "1"})
    assert killed.returncode != 0
    assert "exitcode" in killed.stderr and "-9" in killed.stderr  # torchrun names the death
    assert not (tmp_path / "killed.json").exists()  # never a partial result as if whole


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 50), st.integers(1, 5))
def test_dealing_gives_every_item_to_exactly_one_process_in_even_shares(n, world):
    shares = [[i for i, _ in mine(range(n), Ranks(rank, world))] for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_dealing_spreads_a_repeating_pattern_of_costs():
    """Six methods per seed, the dear ones (pgd-at, joint-at, ibp) at odd places: dealt in
    turn, one process would get all of them; dealt back and forth, each gets some."""
    work = [(seed, m) for seed in range(3) for m in range(6)]
    for rank in range(2):
        dear = [m for _, (_, m) in mine(work, Ranks(rank, 2)) if m % 2 == 1]
        assert 0 < len(dear) < 9
