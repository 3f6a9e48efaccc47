"""Wall time of one ``nonsingular evaluate`` job run by one process (one thread) and by two
processes under torchrun (one thread each), whole processes timed from outside, start-up
included: what a user waits for. Runs alternate (one, two, one, two ...) and the ratio is
taken pair by pair, so drift of a shared machine cancels; medians are reported.

Target (issue 12): two processes take at most 0.6x the time of one on a 2-core machine.

    python benchmarks/distributed_speed.py [--rounds 5] [--steps 50]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(TrainConfig(epochs=10, eval_size=0), load("mnist5k"), out_dir=run, progress=False)
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
            "ibp",
            "--quiet",
        ]
        one = [sys.executable, *job]
        two = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *job,
        ]
        wall(one), wall(two)  # warm-up: file caches
        times = {"one process": [], "two processes": []}
        ratios = []
        for _ in range(args.rounds):
            a, b = wall(one), wall(two)
            times["one process"].append(a)
            times["two processes"].append(b)
            ratios.append(b / a)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"job: evaluate on the 1,000 mnist5k test digits, 4 x 4 joint grid, PGD-{args.steps}, "
        f"2 restarts, CE and margin, IBP; {args.rounds} alternating rounds, one thread per "
        "process, whole-process wall time (start-up included)\n"
    )
    for name, values in times.items():
        print(
            f"{name:14s}  median {statistics.median(values):6.2f} s  "
            f"(min {min(values):.2f}, max {max(values):.2f})"
        )
    print(
        f"\ntwo / one processes: median {statistics.median(ratios):.2f}x "
        f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}; target <= 0.6)"
    )


if __name__ == "__main__":
    main()
