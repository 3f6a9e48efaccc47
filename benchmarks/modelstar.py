"""The ModelStar setup (NNV star sets, 2025), side by side (issue 22 item 3).

An MLP 784-1024-512-256-256-256-10 trained by the library (``standard``) on mnist5k: 4,000
training digits, where ModelStar trains on the 60,000 of MNIST. On the first ``--examples``
held-out digits, one layer's weights at a time perturbed by 0.05, 0.1, 0.2 and 0.4% of that
layer's weight range (``max W - min W``), absolute l_inf on that layer only
(``Threat(layers=[name])``), each of the six layers in turn; then every layer at once and the
same with an input budget as well. Each point runs ``ns.bab`` (its own PGD attack, CROWN, then
branch and bound with ``--bab-seconds`` per example) and reports certified / broken (the
attack's counterexample) / unknown counts, CROWN's certified count, and the time of the point.
A digit the clean model gets wrong counts as broken.

Every layer at once: ``Threat`` has one budget for all layers, so it is ``w_mode="layer"``
with a radius of ``2 p% * max|W_l|`` on layer ``l``, at least ``p%`` of its range (a threat
at least as large as the per-layer one).

    python benchmarks/modelstar.py [--examples 100] [--epochs 20] [--bab-seconds 2]
        [--percents 0.05,0.1,0.2,0.4] [--layers 1,2,3,4,5,6] [--all-percents 0.05,0.1]
        [--eps-x 0.005] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch import nn

import nonsingular as ns
from nonsingular.data import load
from nonsingular.training import TrainConfig, train

HIDDEN = (1024, 512, 256, 256, 256)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's Linear modules in order, with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def point(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ns.Threat, seconds: float):
    """One row's cells: bab's verdicts, CROWN's count, and the point's wall time."""
    start = time.perf_counter()
    crown = ns.certify(model, x, y, threat, method="crown", dtype=torch.float32).certified
    found = ns.bab(model, x, y, threat, time_limit=seconds, dtype=torch.float32)
    wall = time.perf_counter() - start
    status = found.status
    if bool((found.certified & found.attack.success.cpu()).any()):
        raise SystemExit("bab certified an example its attack broke: a bug")
    return {
        "certified": status.count("certified"),
        "broken": status.count("broken"),
        "unknown": status.count("unknown"),
        "crown": int(crown.sum()),
        "seconds": round(wall, 1),
        "domains": int(found.domains.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--bab-seconds", type=float, default=2.0, help="bab's limit per example")
    parser.add_argument("--percents", default="0.05,0.1,0.2,0.4")
    parser.add_argument("--layers", default="1,2,3,4,5,6", help="1-based Linear layers, or ''")
    parser.add_argument("--all-percents", default=None, help="the every-layer rows' percents")
    parser.add_argument("--eps-x", type=float, default=0.005, help="the joint rows' input budget")
    parser.add_argument("--no-all", action="store_true", help="skip the every-layer rows")
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    args = parser.parse_args()
    percents = [float(p) for p in args.percents.split(",")]
    torch.manual_seed(0)
    data = load("mnist5k", seed=0)
    config = TrainConfig(method="standard", hidden=HIDDEN, epochs=args.epochs, seed=0)
    started = time.perf_counter()
    model = train(config, data, progress=False).model.eval()
    trained = time.perf_counter() - started
    x, y = data.x_test[: args.examples], data.y_test[: args.examples]
    clean = int((model(x).argmax(1) == y).sum())
    print(
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f}; MLP 784-"
        f"{'-'.join(map(str, HIDDEN))}-10, standard, {args.epochs} epochs on mnist5k "
        f"({trained:.0f} s); {len(x)} test digits, {clean} classified right; "
        f"bab {args.bab_seconds:g} s per example",
        flush=True,
    )
    print("| layer | % of range | eps_w | eps_x | certified | broken | unknown | crown | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    layers = linear_layers(model)

    def run(label: str, percent: float, eps_w: float, eps_x: float, threat: ns.Threat) -> None:
        cells = point(model, x, y, threat, args.bab_seconds)
        rows.append({"layer": label, "percent": percent, "eps_w": eps_w, "eps_x": eps_x, **cells})
        print(
            f"| {label} | {percent:g} | {eps_w:.3g} | {eps_x:g} | {cells['certified']} | "
            f"{cells['broken']} | {cells['unknown']} | {cells['crown']} | {cells['seconds']} |",
            flush=True,
        )

    for index in [int(i) for i in args.layers.split(",") if i]:
        name, layer = layers[index - 1]
        spread = float(layer.weight.detach().max() - layer.weight.detach().min())
        for p in percents:
            eps = p / 100 * spread
            run(str(index), p, eps, 0.0, ns.Threat(eps_w=eps, layers=(name,)))
    if not args.no_all:
        every = [float(p) for p in (args.all_percents or args.percents).split(",")]
        for eps_x in (0.0, args.eps_x):
            for p in every:
                ratio = 2 * p / 100
                run("all", p, ratio, eps_x, ns.Threat(eps_x=eps_x, eps_w=ratio, w_mode="layer"))
        name, layer = layers[3]
        spread = float(layer.weight.detach().max() - layer.weight.detach().min())
        for p in percents:
            eps = p / 100 * spread
            run("4", p, eps, args.eps_x, ns.Threat(eps_x=args.eps_x, eps_w=eps, layers=(name,)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "clean": clean, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
