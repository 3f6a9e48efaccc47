"""CROWN's time here against another revision of the library, on the same model and digits.

Trains the standard 784-256-256-10 MLP (20 epochs, mnist5k) once, then times ``certify(...,
"crown", dtype=float32)`` on the first 200 test digits at one joint point, with this working
tree's code and with ``--reference`` (any git revision, checked out in a temporary worktree),
each in its own process, the two sides alternating (A B B A ...) so that drift of a shared
machine falls on both. Each side reports the median of 5 calls and how many digits it
certified.

    python benchmarks/crown_against.py --reference 01a420f [--pairs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from nonsingular.data import load
from nonsingular.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TIMING = """
import statistics, sys, time, torch
from safetensors.torch import load_file
from torch import nn
import nonsingular as ns
from nonsingular.data import load
data = load("mnist5k", seed=0)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                      nn.ReLU(), nn.Linear(256, 10))
model.load_state_dict(load_file(sys.argv[1]))
model.eval()
x, y = data.x_test[:200], data.y_test[:200]
threat = ns.Threat(eps_x=float(sys.argv[2]), eps_w=float(sys.argv[3]))
ns.certify(model, x, y, threat, "crown", dtype=torch.float32)  # warm-up
times = []
for _ in range(5):
    start = time.perf_counter()
    cert = ns.certify(model, x, y, threat, "crown", dtype=torch.float32)
    times.append(time.perf_counter() - start)
print(statistics.median(times), int(cert.certified.sum()))
"""


def timed(src: Path, weights: Path, eps_x: float, eps_w: float) -> tuple[float, int]:
    """Median seconds and certified count of CROWN with the library at ``src``."""
    out = subprocess.run(
        [sys.executable, "-c", TIMING, str(weights), str(eps_x), str(eps_w)],
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="git revision to compare with")
    parser.add_argument("--pairs", type=int, default=2, help="A B pairs, in both orders")
    parser.add_argument("--eps-x", type=float, default=0.02)
    parser.add_argument("--eps-w", type=float, default=1e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    trained = train(TrainConfig(method="standard", epochs=20, seed=0), load("mnist5k", seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "mlp.safetensors"
        save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, weights)
        tree = Path(tmp) / "reference"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.reference],
            check=True,
            capture_output=True,
        )
        try:
            sides = {"this tree": ROOT / "src", args.reference: tree / "src"}
            found: dict[str, list[str]] = {name: [] for name in sides}
            for pair in range(args.pairs):
                order = list(sides) if pair % 2 == 0 else list(sides)[::-1]
                for name in order:
                    seconds, certified = timed(sides[name], weights, args.eps_x, args.eps_w)
                    found[name].append(f"{seconds:.2f} s ({certified} certified)")
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True
            )
    print(f"crown, 200 digits at eps_x={args.eps_x:g}, eps_w={args.eps_w:g}, float32, median of 5")
    for name, cells in found.items():
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
