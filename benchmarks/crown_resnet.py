"""CROWN with its own intermediate bounds on the built-in ResNet, before and after the cheap
first pass (issue 22, item 1), side by side in one run.

Trains the built-in ResNet (``--model resnet``: channels 16, 32) on mnist5k (``--epochs``,
seed 0), attacks the first ``--examples`` test digits at the reference joint threat of
``certify_speed.py`` (eps_x = 0.005, eps_w = 1e-5, absolute linf, per example; PGD-50, 2
restarts, cross-entropy and margin), and certifies them with ``crown`` and ``intermediate =
"crown"``:

- before: every neuron that interval bounds leave unstable is tightened by a backward pass
  (two rows of ``lam`` each), as git main does (``crown.FIRST_PASS = False``);
- after:  forward linear bounds first (``certificates/forward.py``), then backward passes only
  for the neurons those leave unstable, the bound nearer zero first.

The two run in turn on chunks of ``--chunk`` examples (so a shared machine's load falls on
both alike). Prints wall-clock and CPU seconds per example (the process's CPU time: on a
shared machine the steadier of the two, and with ``--threads 1`` the time one core needs)
and certified counts; a certified example that the attack broke, or an example "before"
certifies and "after" does not, stops the script.

``--processes N`` then certifies the same digits again ("after") the way a user spreads them
over ``N`` cores (``OMP_NUM_THREADS=1 torchrun --nproc_per_node N``): ``N`` fresh Python
processes of one thread each, the digits dealt out chunk by chunk, timed as a whole from
their launch to the last one's exit (start-up, imports and loading included, no warm-up);
CPU seconds are theirs in all. Needs ``--model-cache`` (the workers load the model).

``--device cuda`` trains, attacks and certifies on a GPU (its times are wall-clock, taken
after the GPU finished; ``--processes`` stays on the CPU).

    python benchmarks/crown_resnet.py [--examples 100] [--epochs 20] [--dtype float64]
        [--chunk 5] [--before-examples N] [--threads N] [--processes N]
        [--model-cache resnet.safetensors] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nonsingular as ns
from nonsingular.certificates import crown
from nonsingular.data import load
from nonsingular.model.architectures import resnet
from nonsingular.training import TrainConfig, train

THREAT = ns.Threat(eps_x=0.005, eps_w=1e-5)  # certify_speed.py's reference joint threat


def timed(
    model, x, y, first_pass: bool, dtype: torch.dtype
) -> tuple[ns.CertifyResult, float, float]:
    """``crown`` with its own intermediate bounds, with the first pass on or off: the result,
    its wall-clock and its CPU seconds."""
    saved, crown.FIRST_PASS = crown.FIRST_PASS, first_pass
    try:
        start, cpu = time.perf_counter(), time.process_time()
        cert = ns.certify(
            model, x, y, THREAT, "crown", intermediate="crown", dtype=dtype, progress=False
        )
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return cert, time.perf_counter() - start, time.process_time() - cpu
    finally:
        crown.FIRST_PASS = saved


def trained(epochs: int, cache: str | None, device: str = "cpu") -> torch.nn.Module:
    """The ResNet trained for ``epochs`` on mnist5k (seed 0) on ``device``, or the one
    ``cache`` holds."""
    if cache is not None and Path(cache).exists():
        return ns.checkpoint.load(cache, model=resnet())[0].to(device)
    torch.manual_seed(0)
    config = TrainConfig(model="resnet", epochs=epochs, seed=0)
    data = load("mnist5k")
    model = train(config, data, progress=False, device=torch.device(device)).model.eval()
    if cache is not None:
        ns.checkpoint.save(model, cache)
    return model


def worker(args: argparse.Namespace) -> None:
    """One of ``--processes`` workers: certify its share of the digits ("after", one thread)
    and write which it certified to ``--result`` (JSON)."""
    torch.set_num_threads(1)
    data = load("mnist5k")
    model = trained(args.epochs, args.model_cache)
    chunks = range(args.worker * args.chunk, args.examples, args.processes * args.chunk)
    found: dict[str, bool] = {}
    for i in chunks:
        stop = min(args.examples, i + args.chunk)
        x, y = data.x_test[i:stop], data.y_test[i:stop]
        cert = timed(model, x, y, True, getattr(torch, args.dtype))[0]
        found.update({str(i + j): bool(c) for j, c in enumerate(cert.certified.tolist())})
    Path(args.result).write_text(json.dumps(found))


def spread(args: argparse.Namespace, broken: torch.Tensor) -> None:
    """The digits certified by ``--processes`` one-thread processes at once: prints the wall
    and CPU seconds per example of the whole, start-up included, and the certified count."""
    n, count = args.examples, args.processes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        results = [Path(folder) / f"worker{i}.json" for i in range(count)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(i), "--processes", str(count)]
                + ["--examples", str(n), "--chunk", str(args.chunk), "--dtype", args.dtype]
                + ["--epochs", str(args.epochs), "--model-cache", args.model_cache]
                + ["--result", str(results[i])],
                env=env,
            )
            for i in range(count)
        ]
        codes = [w.wait() for w in workers]
        took = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if any(codes):
            raise SystemExit(f"a worker failed: exit codes {codes}")
        found: dict[str, bool] = {}
        for path in results:
            found.update(json.loads(path.read_text()))
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    certified = torch.tensor([found[str(i)] for i in range(n)])
    if bool((certified & broken).any()):
        raise SystemExit("UNSOUND: an example the attack broke was certified")
    print(
        f"{count} processes x 1 thread: {took / n:.2f} s/example wall ({cpu / n:.2f} CPU s), "
        f"whole command {took:.1f} s, start-up included; certified "
        f"{int(certified.sum())}/{n}; load {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--before-examples", type=int, default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=5)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument(
        "--model-cache",
        default=None,
        help="a .safetensors checkpoint: loaded if it exists, else written after training",
    )
    parser.add_argument("--processes", type=int, default=0, help="also spread over N processes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args)
        return
    if args.processes and args.model_cache is None:
        raise SystemExit("--processes needs --model-cache (the workers load the model)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    data = load("mnist5k")
    device = torch.device(args.device)
    model = trained(args.epochs, args.model_cache, args.device)
    n = args.examples
    before_n = n if args.before_examples is None else min(n, args.before_examples)
    x, y = data.x_test[:n].to(device), data.y_test[:n].to(device)
    attacked = ns.attack(model, x, y, THREAT, steps=50, restarts=2, loss="both")
    broken = attacked.success.cpu()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus{gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"model: ResNet (channels 16, 32), {args.epochs} epochs, seed 0; threat "
        f"{THREAT.describe()}; {n} test digits; crown, intermediate crown, {args.dtype}"
    )
    print(
        f"clean {int((attacked.clean_margins > 0).sum())}/{n}; attack leaves "
        f"{int((~attacked.success).sum())}/{n}"
    )
    timed(model, x[:1], y[:1], True, dtype)  # warm-up (first-call imports)
    totals = {True: 0.0, False: 0.0}
    cpus = {True: 0.0, False: 0.0}
    certified = {True: torch.zeros(0, dtype=torch.bool), False: torch.zeros(0, dtype=torch.bool)}
    for i in range(0, n, args.chunk):
        xs, ys = x[i : i + args.chunk], y[i : i + args.chunk]
        for first_pass in (False, True):
            if not first_pass and i >= before_n:
                continue
            cert, took, cpu = timed(model, xs, ys, first_pass, dtype)
            totals[first_pass] += took
            cpus[first_pass] += cpu
            certified[first_pass] = torch.cat([certified[first_pass], cert.certified.cpu()])
        done = min(n, i + args.chunk)
        line = (
            f"  {done:4d} examples: after {totals[True] / done:.2f} s/example "
            f"({cpus[True] / done:.2f} CPU s), certified {int(certified[True].sum())}"
        )
        if i < before_n:
            line += (
                f"; before {totals[False] / done:.2f} s/example "
                f"({cpus[False] / done:.2f} CPU s), certified {int(certified[False].sum())}"
            )
        print(f"{line}; load {os.getloadavg()[0]:.1f}", flush=True)
    for mask in certified.values():
        if bool((mask & broken[: len(mask)]).any()):
            raise SystemExit("UNSOUND: an example the attack broke was certified")
    lost = certified[False] & ~certified[True][:before_n]
    if bool(lost.any()):
        raise SystemExit(f"after certifies fewer: examples {lost.nonzero().flatten().tolist()}")
    for label, first_pass, count in (("before", False, before_n), ("after", True, n)):
        print(
            f"{label:6s}: {totals[first_pass] / max(1, count):.2f} s/example "
            f"({cpus[first_pass] / max(1, count):.2f} CPU s) over {count}; "
            f"certified {int(certified[first_pass].sum())}/{count}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.processes:
        spread(args, broken)


if __name__ == "__main__":
    main()
