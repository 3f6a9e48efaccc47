"""Per-step cost of joint attacks whose weights enter linear maps other than Linear/Conv layers
(tests/zoo.py's ``OTHER_WEIGHTS``: einsum/matmul with raw parameters, a TransformerEncoder,
MultiheadAttention, an LSTM and a GRU), against the input-only attack on the same batch.

Those weights are moved as one materialized copy per example: the model runs once per example
(vmapped; a loop over the examples for RNNs, which vmap cannot batch). A step's time is
``(T(long) - T(short)) / (long - short steps)`` (reading and checking the model cancel), the
median of interleaved runs.

    python benchmarks/other_weights.py [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from tests.zoo import OTHER_WEIGHTS

import nonsingular as ns


def step_time(model, x, y, threat, short: int, long: int) -> float:
    times = []
    for steps in (short, long):
        start = time.perf_counter()
        ns.attack(model, x, y, threat, steps=steps, restarts=1)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=12)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, ", end="")
    print(f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    threats = {"input-only": ns.Threat(eps_x=0.03), "joint": ns.Threat(eps_x=0.03, eps_w=0.02)}
    print("| model | input-only ms / step | joint ms / step | joint / input-only |")
    print("|---|---:|---:|---:|")
    for kind, build in OTHER_WEIGHTS.items():
        model, x = build()
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, *x.shape[1:], generator=gen)
        with torch.no_grad():
            y = model(x).argmax(1)
        found: dict[str, list[float]] = {k: [] for k in threats}
        for _ in range(args.repeats):  # interleaved: drift hits both alike
            for name, threat in threats.items():
                found[name].append(step_time(model, x, y, threat, args.short, args.long))
        a, b = (1000 * statistics.median(found[k]) for k in threats)
        print(f"| {kind} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
    print(f"batch {args.batch}; load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
