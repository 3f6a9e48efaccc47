"""APGD and PGD's linear schedule against PGD at equal cost (the same steps: ``steps``
gradients and one last forward pass each, one run, no early stop) on the zoo of tests/zoo.py
and a small trained MLP, for an input, a weight and a joint threat: robust accuracy, median
attacked margin and time. ``--trained``: also the standard MLP (20 epochs) and the small CNN
(4 epochs) on their first 200 test digits at budgets where the attacks break some digits.

The zoo's models are untrained (random weights), so their labels are their own clean
predictions (clean accuracy 100%) on ``--examples`` random inputs shaped like the zoo's. Times
are the median of ``--repeats`` interleaved runs (PGD, APGD, PGD, APGD, ...), so drift of a
shared machine hits both alike; they are still noisy where other jobs share the cores.

    PYTHONPATH=src:. python benchmarks/apgd_vs_pgd.py [--steps 20] [--examples 64] [--repeats 3]
        [--trained]
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


# the attacks compared, as ns.attack's options: PGD (constant steps), its linear schedule, APGD
ATTACKS = {
    "PGD": {"method": "pgd"},
    "PGD linear": {"method": "pgd", "schedule": "linear"},
    "APGD": {"method": "apgd"},
}
TRAINED_THREATS = {
    "input 0.03": Threat(eps_x=0.03),
    "weight 0.002": Threat(eps_w=0.002),
    "joint 0.01 + 0.001": Threat(eps_x=0.01, eps_w=0.001),
    "joint 0.02 + 0.001": Threat(eps_x=0.02, eps_w=0.001),
}


def measure(model, x, y, threat, steps: int, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Per attack of ``ATTACKS``: robust accuracy, median margin, median seconds."""
    seconds: dict[str, list[float]] = {name: [] for name in ATTACKS}
    found = {}
    for _ in range(repeats):
        for name, options in ATTACKS.items():
            start = time.perf_counter()
            res = ns.attack(model, x, y, threat, steps=steps, **options)
            seconds[name].append(time.perf_counter() - start)
            found[name] = (res.robust_accuracy, float(res.margins.median()))
    return {m: (*found[m], statistics.median(s)) for m, s in seconds.items()}


def trained_models() -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """The standard MLP (20 epochs) and the small CNN (4 epochs), seed 0, on mnist5k's first
    200 test digits."""
    data = load("mnist5k")
    x, y = data.x_test[:200], data.y_test[:200]
    return {
        "mnist-mlp-20": (train(TrainConfig(epochs=20, seed=0), data, progress=False).model, x, y),
        "mnist-cnn-4": (
            train(TrainConfig(model="cnn", epochs=4, seed=0), data, progress=False).model,
            x,
            y,
        ),
    }


def table(rows, threats, steps: int, repeats: int) -> tuple[int, int, int]:
    """Print one row per (model, threat); count where PGD linear's robust accuracy is lower
    than, equal to or higher than PGD's."""
    names = list(ATTACKS)
    print(
        "| model | threat | "
        + " | ".join(f"{n} robust" for n in names)
        + " | "
        + " | ".join(f"{n} median margin" for n in names)
        + " | "
        + " | ".join(f"{n} s" for n in names)
        + " |"
    )
    print("|---|---|" + "---|" * (3 * len(names)))
    lower = equal = higher = 0
    for name, (model, x, y) in rows.items():
        for label, threat in threats.items():
            r = measure(model, x, y, threat, steps, repeats)
            pgd, linear = r["PGD"][0], r["PGD linear"][0]
            lower += linear < pgd
            equal += linear == pgd
            higher += linear > pgd
            print(
                f"| {name} | {label} | "
                + " | ".join(f"{r[n][0]:.3f}" for n in names)
                + " | "
                + " | ".join(f"{r[n][1]:.3g}" for n in names)
                + " | "
                + " | ".join(f"{r[n][2]:.2f}" for n in names)
                + " |",
                flush=True,
            )
    return lower, equal, higher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trained", action="store_true", help="also two trained models")
    parser.add_argument("--no-zoo", action="store_true", help="skip the zoo")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, steps={args.steps}, examples={args.examples}"
    )
    parts = [] if args.no_zoo else [(models(args.examples), THREATS)]
    if args.trained:
        parts.append((trained_models(), TRAINED_THREATS))
    for rows, threats in parts:
        lower, equal, higher = table(rows, threats, args.steps, args.repeats)
        print(
            f"\nPGD linear's robust accuracy lower than PGD's on {lower}, equal on {equal}, "
            f"higher on {higher} (model, threat) pairs\n"
        )


if __name__ == "__main__":
    main()
