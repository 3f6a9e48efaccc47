"""The gap between attacked and certified accuracy, per certificate method (issue 13).

On the 784-256-256-10 MLP trained by the library (``standard``, 20 epochs, mnist5k), on the
first 200 test digits, at three joint grid points: how many examples the strongest attack
(PGD-100, 3 restarts per loss, cross-entropy then margin loss) leaves standing, and how many of
them each certificate method certifies, with its time; ``bab`` (branch and bound, its own
attack and CROWN included) with a time limit per example. A certified example the attack
broke would be a soundness bug: the script fails loudly if it ever sees one. bab's cell also
gives the domains it bounded and their rate over its whole call (``--device cuda`` on a GPU).

    python benchmarks/certify_gap.py [--examples 200] [--epochs 20] [--bab-seconds 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import nonsingular as ns
from nonsingular.data import load
from nonsingular.training import TrainConfig, train

POINTS = [(0.005, 1e-5), (0.01, 5e-5), (0.02, 1e-4)]
METHODS = ("ibp", "crown", "alpha-crown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--bab-seconds", type=float, default=3.0, help="bab's limit per example")
    parser.add_argument("--bab-batch", type=int, default=1024, help="bab's domains per pass")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = load("mnist5k", seed=0)
    config = TrainConfig(method="standard", epochs=args.epochs, seed=0)
    model = train(config, data, progress=False, device=device).model.eval()
    x, y = data.x_test[: args.examples].to(device), data.y_test[: args.examples].to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{where}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; standard MLP, {args.epochs} epochs; {len(x)} test digits"
    )
    print(
        f"| eps_x | eps_w | attack leaves | {' | '.join(METHODS)} | bab ({args.bab_seconds:g} s) |"
    )
    print("|---|---|---:|" + "---:|" * (len(METHODS) + 1))
    for eps_x, eps_w in POINTS:
        threat = ns.Threat(eps_x=eps_x, eps_w=eps_w)
        attacked = ns.attack(model, x, y, threat, steps=100, restarts=3, loss="both", seed=0)
        standing = attacked.margins > 0
        cells = []
        for method in METHODS:
            start = time.perf_counter()
            cert = ns.certify(model, x, y, threat, method=method, dtype=torch.float32)
            seconds = time.perf_counter() - start
            certified = cert.certified
            if bool((certified & ~standing).any()):
                raise SystemExit(f"{method} certified an example the attack broke: a bug")
            share = int(certified.sum()) / max(1, int(standing.sum()))
            cells.append(f"{int(certified.sum())} ({100 * share:.0f}%, {seconds:.1f} s)")
        start = time.perf_counter()
        found = ns.bab(
            model,
            x,
            y,
            threat,
            time_limit=args.bab_seconds,
            batch=args.bab_batch,
            dtype=torch.float32,
        )
        seconds = time.perf_counter() - start
        certified = found.certified.to(standing.device)
        if bool((certified & ~standing).any()):
            raise SystemExit("bab certified an example the attack broke: a bug")
        share = int(certified.sum()) / max(1, int(standing.sum()))
        domains = int(found.domains.sum())
        cells.append(
            f"{int(certified.sum())} ({100 * share:.0f}%, {found.status.count('unknown')} "
            f"unknown, {seconds:.1f} s, {domains} domains, {domains / seconds:.0f}/s)"
        )
        print(f"| {eps_x:g} | {eps_w:g} | {int(standing.sum())} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
