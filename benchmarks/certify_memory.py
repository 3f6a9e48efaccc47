"""The memory certify estimates for one example (``certificates/resources.py``) beside the
peak resident memory one example's run really adds, on small conv nets of growing width, for
CROWN with its own intermediate bounds and with IBP's. Each case runs in its own process (the
peak RSS of a process only grows).

    python benchmarks/certify_memory.py [--widths 8,16] [--eps-x 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

import torch
from torch import nn

import nonsingular as ns
from nonsingular.certificates.resources import estimate_memory
from nonsingular.model import read_model


def one(width: int, intermediate: str, eps_x: float) -> dict[str, float | str]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * 16 * 16, 10),
    ).eval()
    x = torch.rand(1, 1, 16, 16)
    y = model(x).argmax(1)
    threat = ns.Threat(eps_x=eps_x)
    graph = read_model(model, x).cast(torch.float64)
    estimate = estimate_memory(graph, x.double(), "crown", intermediate, {}, threat)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ns.certify(model, x, y, threat, "crown", intermediate=intermediate, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "width": width,
        "intermediate": intermediate,
        "estimate_mb": estimate.per_example / 1e6,
        "peak_growth_mb": (after - before) / 1e6,
        "peak": estimate.peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", default="8,16")
    parser.add_argument("--eps-x", type=float, default=0.05)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        width, intermediate = args.one.split(":")
        print(json.dumps(one(int(width), intermediate, args.eps_x)))
        return
    print(f"# {platform.processor() or platform.machine()}, load {os.getloadavg()}")
    print("| width | intermediate | estimate (MB) | peak RSS growth (MB) | ratio | peak |")
    print("|---|---|---|---|---|---|")
    for width in map(int, args.widths.split(",")):
        for intermediate in ("crown", "ibp"):
            command = [sys.executable, __file__, "--one", f"{width}:{intermediate}"]
            command += ["--eps-x", str(args.eps_x)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            ratio = r["estimate_mb"] / max(r["peak_growth_mb"], 1e-9)
            print(
                f"| {r['width']} | {r['intermediate']} | {r['estimate_mb']:.1f} | "
                f"{r['peak_growth_mb']:.1f} | {ratio:.2f} | {r['peak']} |"
            )


if __name__ == "__main__":
    main()
