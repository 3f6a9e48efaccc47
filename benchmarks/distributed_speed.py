"""Wall time of one ``nonsingular evaluate`` job run by one process (one thread) and by two
processes under torchrun (one thread each), whole processes timed from outside, start-up
included: what a user waits for. Runs alternate (one, two, one, two ...) and the ratio is
taken pair by pair, so drift of a shared machine cancels; medians are reported.

Target (issue 12): two processes take at most 0.6x the time of one on a 2-core machine.

    python benchmarks/distributed_speed.py [--rounds 3] [--steps 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nonsingular.data import load
from nonsingular.training import TrainConfig, train


def wall(command: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process in both variants
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr.decode()[-3000:]}")
    return time.perf_counter() - start


JOBS = {  # certificate methods: the attack-and-IBP job, and the one that also runs CROWN
    "attack + IBP": "ibp",
    "attack + IBP + CROWN": "ibp,crown",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"evaluate on the 1,000 mnist5k test digits (a 784-256-256-10 MLP), 4 x 4 joint grid, "
        f"PGD-{args.steps}, 2 restarts, CE and margin; {args.rounds} alternating rounds, one "
        "thread per process, whole-process wall time (start-up included)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(TrainConfig(epochs=10, eval_size=0), load("mnist5k"), out_dir=run, progress=False)
        for name, certify in JOBS.items():
            job = [
                "-m",
                "nonsingular",
                "evaluate",
                "--checkpoint",
                str(run / "model.safetensors"),
                "--eps-x",
                "0,0.01,0.02,0.05",
                "--eps-w",
                "0,2e-4,5e-4,1e-3",
                "--steps",
                str(args.steps),
                "--restarts",
                "2",
                "--loss",
                "both",
                "--certify",
                certify,
                "--quiet",
            ]
            compare(name, job, args.rounds)


def compare(name: str, job: list[str], rounds: int) -> None:
    """Time ``job`` in one process and in two, alternating; print medians and the ratio."""
    one = [sys.executable, *job]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two += job
    wall(one), wall(two)  # warm-up: file caches
    times: dict[str, list[float]] = {"one process": [], "two processes": []}
    ratios = []
    for _ in range(rounds):
        a, b = wall(one), wall(two)
        times["one process"].append(a)
        times["two processes"].append(b)
        ratios.append(b / a)
    print(f"\n{name}")
    for label, values in times.items():
        print(
            f"  {label:14s}  median {statistics.median(values):6.2f} s  "
            f"(min {min(values):.2f}, max {max(values):.2f})"
        )
    print(
        f"  two / one processes: median {statistics.median(ratios):.2f}x "
        f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}; target <= 0.6)"
    )


if __name__ == "__main__":
    main()
