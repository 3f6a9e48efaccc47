"""Time per 1,000 mnist5k test examples and certified accuracy of every certificate method, on
the standard 784-256-256-10 MLP (or the small ResNet), at the joint threat (eps_x=0.005,
eps_w=1e-5), next to a plain forward pass over the same data and the attacked accuracy (the
upper bound). Every certify call includes reading the model (torch.fx) and checking the
reading against model(x) on the batch.

Targets (issue 4): ibp within 3x of a plain forward pass; crown under 10 s per 1,000 examples
on 2 CPU cores while certifying nearly every correctly classified example. The ResNet has no
closed-form or recursive bound (they are for MLPs); its crown takes IBP intermediate bounds
("crown (ibp)": CROWN's own are far too slow on thousands of conv neurons) and runs on
--examples (default 100).

    python benchmarks/certify_speed.py [--model mlp|resnet] [--repeats 21] [--epochs 20]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

import nonsingular as ns
from nonsingular.data import load
from nonsingular.training import TrainConfig, train


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(fn, baseline, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and median of its per-pair ratio to ``baseline``, the two run
    in turn (A B A B ...), so drift of a shared machine cancels in the ratio."""
    fn(), baseline()  # warm-up
    times, ratios = [], []
    for _ in range(repeats):
        t, b = seconds(fn), seconds(baseline)
        times.append(t)
        ratios.append(t / b)
    return statistics.median(times), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the model")
    parser.add_argument("--model", choices=("mlp", "resnet"), default="mlp")
    parser.add_argument("--examples", type=int, default=None, help="test examples (default all)")
    parser.add_argument(
        "--full-crown",
        type=int,
        default=10,
        metavar="N",
        help="ResNet: also time crown with its own intermediate bounds on N examples, once",
    )
    args = parser.parse_args()

    data = load("mnist5k")
    model = train(TrainConfig(model=args.model, epochs=args.epochs), data, progress=False).model
    n = args.examples or (len(data.x_test) if args.model == "mlp" else 100)
    x, y = data.x_test[:n], data.y_test[:n]
    threat = ns.Threat(eps_x=0.005, eps_w=1e-5)
    model64, x64 = copy.deepcopy(model).double(), x.double()

    def forward32() -> None:
        with torch.no_grad():
            model(x)

    def forward64() -> None:
        with torch.no_grad():
            model64(x64)

    fwd32 = statistics.median(seconds(forward32) for _ in range(args.repeats))
    fwd64 = statistics.median(seconds(forward64) for _ in range(args.repeats))
    attacked = ns.attack(model, x, y, threat, steps=50, restarts=2, loss="both")
    correct = int((attacked.clean_margins > 0).sum())

    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    names = {"mlp": "784-256-256-10 MLP", "resnet": "small ResNet (channels 16, 32)"}
    print(
        f"model: {names[args.model]}, {args.epochs} epochs; threat {threat.describe()}; "
        f"{len(x)} test examples; medians of {args.repeats} runs (crown: fewer)\n"
    )
    print(
        f"clean accuracy {correct / len(x):.1%}; attacked (PGD-50, 2 restarts, ce+margin) "
        f"{attacked.robust_accuracy:.1%}"
    )
    print(
        f"plain forward pass: {1e3 * fwd32:.2f} ms (float32), {1e3 * fwd64:.2f} ms (float64); "
        "'x fwd' is the median ratio to a forward pass of the same dtype, timed in turn\n"
    )
    print(
        f"{'method':12s} {'dtype':8s} {'s / 100 ex':>11s} {'s / 1000 ex':>12s} {'x fwd':>8s} "
        f"{'certified':>10s} "
        f"{'of correct':>11s}"
    )
    if args.model == "mlp":
        runs = [(m, torch.float64, "crown") for m in ns.certificates.METHODS]
        runs += [("ibp", torch.float32, "crown"), ("crown", torch.float32, "crown")]
    else:  # CROWN's own intermediate bounds are far too slow on thousands of conv neurons
        runs = [(m, d, "ibp") for m in ("ibp", "crown") for d in (torch.float64, torch.float32)]
    for method, dtype, intermediate in runs:
        baseline = forward64 if dtype == torch.float64 else forward32

        def run(m: str = method, d: torch.dtype = dtype, i: str = intermediate):
            return ns.certify(model, x, y, threat, m, dtype=d, intermediate=i)

        repeats = args.repeats if method != "crown" else max(1, args.repeats // 5)
        took, ratio = paired(run, baseline, repeats)
        cert = run()
        certified = int(cert.certified.sum())
        label = method if intermediate == "crown" or method == "ibp" else "crown (ibp)"
        print(
            f"{label:12s} {str(dtype).split('.')[-1]:8s} {took * 100 / len(x):11.3f} "
            f"{took * 1000 / len(x):12.3f} "
            f"{ratio:8.1f} {certified / len(x):10.1%} {certified / max(1, correct):11.1%}"
        )
    if args.model != "mlp" and args.full_crown > 0:
        full_crown(model, x, y, threat, args.full_crown)


def full_crown(model, x, y, threat, n: int) -> None:
    """One timed run of crown with CROWN intermediate bounds, on the first ``n`` examples."""
    start = time.perf_counter()
    cert = ns.certify(model, x[:n], y[:n], threat, "crown", intermediate="crown")
    took = time.perf_counter() - start
    correct = int((cert.clean_margins > 0).sum())
    print(
        f"\ncrown with its own intermediate bounds, float64, first {n} examples, one run: "
        f"{took:.1f} s ({took * 100 / n:.0f} s / 100 ex); certified "
        f"{int(cert.certified.sum())} of {correct} correctly classified"
    )


if __name__ == "__main__":
    main()
