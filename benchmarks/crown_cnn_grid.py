"""What crown over its own intermediate bounds costs `reproduce --model cnn` (issue 22 item 5).

Trains the built-in CNN as the experiment does (``Experiment(model="cnn")``: its epochs, seed
0, mnist5k) and certifies its first ``cert_size`` test digits with ``crown`` at every nonzero
budget of the experiment's certified families (input, absolute and relative per-example
weights, joint), over its own intermediate bounds (the CNN's default) and over interval
boxes (the earlier default), in the experiment's ``cert_dtype``, one thread. Prints, per
budget, both certified counts and the CPU seconds of the first, and their total: the extra
cost per trained CNN of the default.

    python benchmarks/crown_cnn_grid.py [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import nonsingular as ns
from nonsingular.data import load
from nonsingular.experiment.config import Experiment
from nonsingular.training import TrainConfig, train


def budgets(e: Experiment) -> list[ns.Threat]:
    """Every nonzero budget of the experiment's per-example certified families."""
    points = [ns.Threat(eps_x=v) for v in e.eps_x if v > 0]
    points += [ns.Threat(eps_w=v) for v in e.eps_w_absolute if v > 0]
    points += [ns.Threat(eps_w=v, w_mode="relative") for v in e.eps_w_relative if v > 0]
    points += [ns.Threat(eps_x=a, eps_w=b) for a in e.joint_eps_x for b in e.joint_eps_w if a and b]
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    e = Experiment(model="cnn")
    dtype = getattr(torch, e.cert_dtype)
    data = load("mnist5k")
    model = train(TrainConfig(model="cnn", epochs=e.epochs, seed=0), data, progress=False).model
    model.eval()
    x, y = data.x_test[: e.cert_size], data.y_test[: e.cert_size]
    clean = int((model(x).argmax(1) == y).sum())
    print(
        f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}; CNN, {e.epochs} "
        f"epochs, {len(x)} digits ({clean} classified right), crown in {e.cert_dtype}"
    )
    print("| budget | crown, own bounds | crown, interval boxes | CPU s (own bounds) |")
    print("|---|---:|---:|---:|")
    total = 0.0
    for threat in budgets(e):
        start = time.process_time()
        own = ns.certify(
            model, x, y, threat, "crown", intermediate="crown", dtype=dtype, progress=False
        )
        cpu = time.process_time() - start
        total += cpu
        boxes = ns.certify(
            model, x, y, threat, "crown", intermediate="ibp", dtype=dtype, progress=False
        )
        if bool((boxes.certified & ~own.certified).any()):
            raise SystemExit(f"own bounds certify less than interval boxes at {threat}")
        print(
            f"| {threat.describe()} | {int(own.certified.sum())} | "
            f"{int(boxes.certified.sum())} | {cpu:.1f} |",
            flush=True,
        )
    print(
        f"\n{len(budgets(e))} budgets: {total:.0f} CPU s ({total / 60:.1f} min) for crown over "
        f"its own bounds per trained CNN; load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
