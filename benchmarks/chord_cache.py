"""The dense weight term's chord made once per box (``Bounds.chord``) against made in every
backward pass, side by side in one run, on the reference 784-256-256-10 MLP (``standard``, 20
epochs, mnist5k), the first ``--examples`` test digits, at ``eps_x = 0.02, eps_w = 1e-4``:

- alpha-crown (20 slope steps over the same bounds: 21 passes), the two in turn
  ``--repeats`` times, the median time of each and of their per-pair ratio;
- bab at ``--bab-seconds`` per example: the domains each bounds in that time and what it
  certifies (a wall-clock limit: more domains in the same time is the gain).

"made again" is the same code with the cache bypassed (``Bounds.chord`` replaced by a
function that makes the chord every time), so the bounds are the same: the script checks that
alpha-crown's are equal.

    python benchmarks/chord_cache.py [--examples 100] [--repeats 5] [--bab-seconds 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import nonsingular as ns
from nonsingular.certificates.crown_engine import Bounds
from nonsingular.data import load
from nonsingular.model.lemma import chord
from nonsingular.training import TrainConfig, train

THREAT = ns.Threat(eps_x=0.02, eps_w=1e-4)
CACHED = Bounds.chord


def made_again(self: Bounds, index: int, h) -> tuple[torch.Tensor, torch.Tensor]:
    return chord(h, self.unit)


def timed(cached: bool, fn):
    Bounds.chord = CACHED if cached else made_again
    try:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start
    finally:
        Bounds.chord = CACHED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bab-seconds", type=float, default=1.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load("mnist5k", seed=0)
    model = train(TrainConfig(method="standard", epochs=20, seed=0), data, progress=False).model
    model.eval()
    x, y = data.x_test[: args.examples], data.y_test[: args.examples]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load {os.getloadavg()[0]:.1f}; "
        f"{args.examples} digits, {THREAT.describe()}"
    )

    def alpha():
        return ns.certify(model, x, y, THREAT, "alpha-crown", progress=False).lower

    alpha()  # warm-up
    times = {True: [], False: []}
    ratios = []
    for _ in range(args.repeats):
        new, t_new = timed(True, alpha)
        old, t_old = timed(False, alpha)
        if not torch.equal(new, old):
            raise SystemExit("the cached chord changed alpha-crown's bounds")
        times[True].append(t_new)
        times[False].append(t_old)
        ratios.append(t_new / t_old)
    print(
        f"alpha-crown: chord once per box {statistics.median(times[True]):.2f} s, made in every "
        f"pass {statistics.median(times[False]):.2f} s; median ratio "
        f"{statistics.median(ratios):.2f}x ({args.repeats} pairs)"
    )
    for cached in (False, True):
        found, took = timed(
            cached, lambda: ns.bab(model, x, y, THREAT, time_limit=args.bab_seconds)
        )
        label = "chord once per box" if cached else "made in every pass"
        print(
            f"bab ({args.bab_seconds:g} s per example), {label}: {int(found.domains.sum())} "
            f"domains, {int(found.certified.sum())} certified, "
            f"{found.status.count('unknown')} unknown, {took:.1f} s"
        )
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
