"""Seconds per training epoch on mnist5k for every method, side by side in one run, as a
ratio to ``standard`` (the 784-256-256-10 MLP, the default batch of 256, the methods' default
budgets).

Targets (issue 5): bound-reg <= 1.3x standard; joint-at with k attack steps <= (k + 1.5)x,
i.e. the per-example weight part adds almost nothing to input PGD (compare pgd-at).
Epoch times exclude the per-epoch evaluation; methods are interleaved, epoch by epoch, and
the median of the timed epochs is reported.

    python benchmarks/train_speed.py [--epochs 3] [--rounds 8] [--steps 10] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from nonsingular.data import load
from nonsingular.training import METHODS, TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per method and round")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=10, help="k: inner attack steps")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    data = load("mnist5k")
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    ratios: dict[str, list[float]] = {m: [] for m in METHODS}  # per round, to standard
    for _ in range(args.rounds):
        this_round = {}
        for method in METHODS:
            config = TrainConfig(
                method=method,
                epochs=args.epochs,
                eval_size=0,
                batch_size=args.batch_size,
                attack_steps=args.steps if method != "standard" else None,
            )
            history = train(config, data, progress=False).history
            epochs = [m["seconds"] for m in history[1:]]  # the first epoch warms up
            times[method] += epochs
            this_round[method] = statistics.median(epochs)
        for method in METHODS:
            ratios[method].append(this_round[method] / this_round["standard"])
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; 784-256-256-10 MLP, 4,000 mnist5k digits, "
        f"batch {args.batch_size}; {args.rounds} rounds of {args.epochs} epochs per method; "
        "'x standard' is the median over rounds of each round's ratio\n"
    )
    print(f"{'method':10s} {'s / epoch':>10s} {'x standard':>11s}  target")
    targets = {"bound-reg": "<= 1.3", "joint-at": f"<= {args.steps + 1.5:g} (k = {args.steps})"}
    for method in METHODS:
        seconds, ratio = statistics.median(times[method]), statistics.median(ratios[method])
        print(f"{method:10s} {seconds:10.3f} {ratio:11.2f}  {targets.get(method, '')}")
    awp_steps = "input PGD skipped (eps_x = 0 by default), one weight step"
    print(f"\npgd-at and joint-at use k = {args.steps} attack steps; awp: {awp_steps}.")


if __name__ == "__main__":
    main()
