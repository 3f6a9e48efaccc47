"""APGD against PGD at equal cost (the same steps: ``steps`` gradients and one last forward
pass each, one run, no early stop) on the zoo of tests/zoo.py and a small trained MLP, for an
input, a weight and a joint threat: robust accuracy, median attacked margin and time.

The zoo's models are untrained (random weights), so their labels are their own clean
predictions (clean accuracy 100%) on ``--examples`` random inputs shaped like the zoo's. Times
are the median of ``--repeats`` interleaved runs (PGD, APGD, PGD, APGD, ...), so drift of a
shared machine hits both alike; they are still noisy where other jobs share the cores.

    PYTHONPATH=src:. python benchmarks/apgd_vs_pgd.py [--steps 20] [--examples 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from tests.zoo import ZOO

import nonsingular as ns
from nonsingular import Threat
from nonsingular.data import load
from nonsingular.training import TrainConfig, train

THREATS = {
    "input": Threat(eps_x=0.03),
    "weight": Threat(eps_w=0.05, w_mode="relative"),
    "joint": Threat(eps_x=0.015, eps_w=0.025, w_mode="relative"),
}


def models(examples: int) -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """Every zoo model on ``examples`` random inputs labelled by its own predictions, and the
    standard MLP trained 3 epochs on mnist5k on its first ``examples`` test digits."""
    out = {}
    for name, build in ZOO.items():
        model, x = build()
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(examples, *x.shape[1:], generator=gen)
        with torch.no_grad():
            out[name] = (model, x, model(x).argmax(1))
    data = load("mnist5k")
    mlp = train(TrainConfig(epochs=3, seed=0), data, progress=False).model
    out["mnist-mlp"] = (mlp, data.x_test[:examples], data.y_test[:examples])
    return out


def measure(model, x, y, threat, steps: int, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Per method: robust accuracy, median margin, median seconds."""
    seconds: dict[str, list[float]] = {"pgd": [], "apgd": []}
    found = {}
    for _ in range(repeats):
        for method in seconds:
            start = time.perf_counter()
            res = ns.attack(model, x, y, threat, method=method, steps=steps)
            seconds[method].append(time.perf_counter() - start)
            found[method] = (res.robust_accuracy, float(res.margins.median()))
    return {m: (*found[m], statistics.median(s)) for m, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, steps={args.steps}, examples={args.examples}"
    )
    print(
        "| model | threat | PGD robust | APGD robust | PGD median margin | "
        "APGD median margin | PGD s | APGD s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    wins = ties = losses = 0
    for name, (model, x, y) in models(args.examples).items():
        for label, threat in THREATS.items():
            r = measure(model, x, y, threat, args.steps, args.repeats)
            (pa, pm, ps), (aa, am, as_) = r["pgd"], r["apgd"]
            wins, ties, losses = wins + (aa < pa), ties + (aa == pa), losses + (aa > pa)
            print(
                f"| {name} | {label} | {pa:.3f} | {aa:.3f} | {pm:.3g} | {am:.3g} | "
                f"{ps:.2f} | {as_:.2f} |",
                flush=True,
            )
    print(
        f"\nAPGD lower robust accuracy on {wins}, equal on {ties}, higher on {losses} "
        "(model, threat) pairs"
    )


if __name__ == "__main__":
    main()
