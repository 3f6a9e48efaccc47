"""Bit flips on 8-bit (per-channel) quantized models trained on mnist5k.

    python benchmarks/flip_attack.py speed      # one shared flip-search step vs one PGD step;
                                                # per-example search on 500 test digits
    python benchmarks/flip_attack.py per-example  # the per-example search alone (500 digits)
    python benchmarks/flip_attack.py collapse   # flips-to-collapse (<= 11%) of the shared
                                                # search, 5 seeds, MLP and CNN, beside random flips
    python benchmarks/flip_attack.py complete   # bab, k = 1 (and 2 on a few digits), on a
                                                # 784-512-512-512-10 MLP
    python benchmarks/flip_attack.py defense    # flips-to-collapse of flip-at beside standard
                                                # training (the library's, same seed and data)

Models are trained here with plain Adam (the library's own training is not what is measured),
except by ``defense``, which compares two of the library's training methods.
A step's time is the difference of a long and a short run over the difference in steps, so
set-up (reading and checking the model) cancels; medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import nonsingular as ns
from nonsingular.data import load
from nonsingular.flips.search import progressive_search
from nonsingular.flips.space import FlipSpace
from nonsingular.model.architectures import cnn, mlp


def trained(kind: str, seed: int, epochs: int = 5, hidden=(256, 256)) -> torch.nn.Module:
    data = load("mnist5k")
    torch.manual_seed(seed)
    model = mlp(hidden=hidden) if kind == "mlp" else cnn()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train))
        for i in range(0, len(order), 64):
            rows = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[rows]), data.y_train[rows]).backward()
            opt.step()
    return model.eval()


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def speed() -> None:
    data = load("mnist5k")
    q = ns.quantize(trained("mlp", 0))
    x, y = data.x_test[:500], data.y_test[:500]
    space = FlipSpace(q, ns.Threat(flips=20, scope="shared"))
    pgd = ns.Threat(eps_x=0.1)
    flip_steps, pgd_steps = [], []
    for _ in range(5):  # interleaved
        long = seconds(lambda: progressive_search(space, x, y, 6, target=-1.0))
        short = seconds(lambda: progressive_search(space, x, y, 1, target=-1.0))
        flip_steps.append((long - short) / 5)
        long = seconds(lambda: ns.attack(q, x, y, pgd, steps=30))
        short = seconds(lambda: ns.attack(q, x, y, pgd, steps=10))
        pgd_steps.append((long - short) / 20)
    f, p = statistics.median(flip_steps), statistics.median(pgd_steps)
    print(
        f"shared flip step {f * 1e3:.1f} ms, PGD step {p * 1e3:.1f} ms, ratio {f / p:.2f}",
        flush=True,
    )
    per_example(q, x, y)


def per_example(q: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The per-example search on every example of ``x``: wall time and this process's CPU
    time (one thread: on a machine shared with other work the wall time is mostly waiting)."""
    for k in (1, 4):
        start, cpu = time.perf_counter(), time.process_time()
        r = ns.attack(q, x, y, ns.Threat(flips=k))
        t, c = time.perf_counter() - start, time.process_time() - cpu
        print(
            f"per-example search k={k}, {len(y)} examples: {t:.1f} s wall, {c:.1f} s CPU, "
            f"clean {r.clean_accuracy:.3f} -> {r.robust_accuracy:.3f}",
            flush=True,
        )


def collapse(seeds: int, examples: int, first: int = 0) -> None:
    """Seeds ``first`` to ``seeds - 1`` outermost, models alternating, so that a partial run
    covers both."""
    data = load("mnist5k")
    x, y = data.x_test[:examples], data.y_test[:examples]
    counts: dict[str, list] = {"mlp": [], "cnn": []}
    for seed in range(first, seeds):
        for kind in counts:
            model = trained(kind, seed)
            q = ns.quantize(model)
            f_acc = float((model(x).argmax(1) == y).float().mean())
            q_acc = float((q(x).argmax(1) == y).float().mean())
            found = ns.flips_to(q, x, y, 0.11, max_flips=200)
            noise = ns.attack(q, x, y, ns.Threat(flips=100, scope="shared"), method="noise")
            counts[kind].append(found.flips)
            acc = noise.accuracy_trace
            print(
                f"{kind} seed {seed}: float {f_acc:.3f} int8 {q_acc:.3f}, flips to <= 11%: "
                f"{found.flips} (replayed {found.replayed:.3f}), 100 random flips: "
                f"{float(acc.mean()):.3f} +- {float(acc.std()):.3f} (min {float(acc.min()):.3f})",
                flush=True,
            )
    for kind, found in counts.items():
        done = [c for c in found if c is not None]
        if done:
            print(
                f"{kind}: median {statistics.median(done)}, range {min(done)}-{max(done)}, "
                f"{len(done)}/{seeds - first} reached"
            )


def defense(seeds: int, examples: int, first: int = 0, epochs: int = 5) -> None:
    """Standard training and flip-at (``nonsingular train``'s methods, their defaults, the same
    seed and data), quantized to 8 bits per channel: flips to <= 11% and 100 random flips."""
    from nonsingular.training import TrainConfig, train

    data = load("mnist5k")
    x, y = data.x_test[:examples], data.y_test[:examples]
    counts: dict[tuple[str, str], list] = {}
    for seed in range(first, seeds):
        for kind in ("mlp", "cnn"):
            for method in ("standard", "flip-at"):
                start = time.perf_counter()
                config = TrainConfig(model=kind, method=method, seed=seed, epochs=epochs)
                model = train(config.replace(eval_size=0), data, progress=False).model
                took = time.perf_counter() - start
                q = ns.quantize(model)
                q_acc = float((q(x).argmax(1) == y).float().mean())
                found = ns.flips_to(q, x, y, 0.11, max_flips=400)
                noise = ns.attack(q, x, y, ns.Threat(flips=100, scope="shared"), method="noise")
                acc = noise.accuracy_trace
                counts.setdefault((kind, method), []).append(found.flips)
                print(
                    f"{kind} {method} seed {seed}: int8 {q_acc:.3f} (trained in {took:.0f} s), "
                    f"flips to <= 11%: {found.flips} (replayed {found.replayed:.3f}), 100 random "
                    f"flips: {float(acc.mean()):.3f} +- {float(acc.std()):.3f}",
                    flush=True,
                )
    for (kind, method), found in counts.items():
        done = [c for c in found if c is not None]
        if done:
            print(
                f"{kind} {method}: median {statistics.median(done)}, range {min(done)}-"
                f"{max(done)}, {len(done)}/{len(found)} reached within 400"
            )


def complete(examples: int, time_limit: float, pairs: int, pair_limit: float) -> None:
    """bab for one flip on ``examples`` test digits; CROWN for two on the same digits, and bab
    for two on the first ``pairs`` digits CROWN leaves open (``pair_limit`` seconds each)."""
    data = load("mnist5k")
    q = ns.quantize(trained("mlp", 0, hidden=(512, 512, 512)))
    x, y = data.x_test[:examples], data.y_test[:examples]
    start = time.perf_counter()
    found = ns.bab(q, x, y, ns.Threat(flips=1), time_limit=time_limit)
    took = time.perf_counter() - start
    counts = {s: found.status.count(s) for s in ("certified", "broken", "unknown")}
    print(
        f"bab k=1, {examples} digits: {counts} in {took:.1f} s "
        f"(clean {float((found.attack.clean_margins > 0).float().mean()):.3f}; slowest digit "
        f"{float(found.seconds.max()):.1f} s)",
        flush=True,
    )
    crown = ns.certify(q, x, y, ns.Threat(flips=1), method="crown")
    print(f"crown alone k=1: {int(crown.certified.sum())} certified", flush=True)
    start = time.perf_counter()
    crown2 = ns.certify(q, x, y, ns.Threat(flips=2), method="crown")
    print(
        f"crown k=2: {int(crown2.certified.sum())} certified in "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    clean = found.attack.clean_margins > 0
    open_ = (~crown2.certified & clean).nonzero().flatten()[:pairs]
    for i in open_.tolist():
        start = time.perf_counter()
        two = ns.bab(q, x[i : i + 1], y[i : i + 1], ns.Threat(flips=2), time_limit=pair_limit)
        print(
            f"bab k=2, digit {i}: {two.status[0]} in {time.perf_counter() - start:.1f} s "
            f"({int(two.domains[0])} ranges; flips {two.attack.bit_flips(0)})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["speed", "per-example", "collapse", "complete", "defense"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--examples",
        type=int,
        default=None,
        help="test digits (complete 100, collapse 1000, defense 500)",
    )
    parser.add_argument("--first-seed", type=int, default=0, help="collapse: skip seeds below")
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--pairs", type=int, default=3, help="complete: digits for bab k=2")
    parser.add_argument("--pair-time-limit", type=float, default=600.0)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.examples is None:
        args.examples = {"collapse": 1000, "defense": 500}.get(args.what, 100)
    if args.what == "speed":
        speed()
    elif args.what == "per-example":
        data = load("mnist5k")
        per_example(ns.quantize(trained("mlp", 0)), data.x_test[:500], data.y_test[:500])
    elif args.what == "collapse":
        collapse(args.seeds, args.examples, args.first_seed)
    elif args.what == "defense":
        defense(args.seeds, args.examples, args.first_seed)
    else:
        complete(args.examples, args.time_limit, args.pairs, args.pair_time_limit)


if __name__ == "__main__":
    main()
