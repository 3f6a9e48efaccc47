"""CROWN on the built-in CNN before and after the joint weight term for convolutions (issue 25).

Trains the built-in CNN on mnist5k (``--method``, ``--epochs``, seed 0), attacks the first
``--examples`` test digits at every joint budget of the CNN report (``Experiment``'s
``joint_eps_x`` x ``joint_eps_w``, absolute linf, per-example; PGD-50, 1 restart, cross-entropy
then margin loss, the report's attack) and at the issue's l2 point, and certifies them with
CROWN twice: with the old position-by-position box for the conv layers' weight term (the
engine's ``COUPLED`` switch off) and with the joint term. Prints certified counts and times; a
certified example the attack broke is a soundness bug and stops the script.

    python benchmarks/conv_weight_term.py [--examples 100] [--epochs 4] [--method standard]
        [--intermediate ibp] [--dtype float32] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import nonsingular as ns
from nonsingular.certificates import crown_engine as engine
from nonsingular.data import load
from nonsingular.experiment.config import Experiment
from nonsingular.training import TrainConfig, train

L2_POINT = (0.3, 0.02)  # the issue's: eps_x = 0.3 (l2), eps_w = 0.02 (l2)


def threats(l2: bool) -> list[ns.Threat]:
    """The CNN report's joint grid without the zero weight budget (where the term is unused),
    then the issue's l2 point."""
    grid = Experiment()
    found = [
        ns.Threat(eps_x=eps_x, eps_w=eps_w)
        for eps_x in grid.joint_eps_x
        for eps_w in grid.joint_eps_w
        if eps_w > 0
    ]
    if l2:
        found.append(ns.Threat(eps_x=L2_POINT[0], eps_w=L2_POINT[1], x_norm="l2", w_norm="l2"))
    return found


def timed_crown(model, x, y, threat, coupled: bool, args) -> tuple[torch.Tensor, float]:
    """CROWN's certified mask and its seconds, with the joint term on or off."""
    saved, engine.COUPLED = engine.COUPLED, coupled
    try:
        start = time.perf_counter()
        cert = ns.certify(
            model,
            x,
            y,
            threat,
            "crown",
            intermediate=args.intermediate,
            dtype=getattr(torch, args.dtype),
        )
        return cert.certified, time.perf_counter() - start
    finally:
        engine.COUPLED = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--method", default="standard", help="training method")
    parser.add_argument("--intermediate", default="ibp", help="crown's pre-activation bounds")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--no-l2", action="store_true", help="skip the issue's l2 point")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load("mnist5k", seed=0)
    config = TrainConfig(model="cnn", method=args.method, epochs=args.epochs, seed=0)
    model = train(config, data, progress=False).model.eval()
    x, y = data.x_test[: args.examples], data.y_test[: args.examples]
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; cnn, {args.method}, {args.epochs} epochs; {len(x)} test "
        f"digits; crown with {args.intermediate} intermediate bounds in {args.dtype}"
    )
    print("| eps_x | eps_w | norms | attack leaves | crown before | crown after | time ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    totals = [0, 0, 0.0, 0.0]
    for threat in threats(not args.no_l2):
        attacked = ns.attack(model, x, y, threat, steps=50, restarts=1, loss="both", seed=0)
        standing = attacked.margins > 0
        before, t_before = timed_crown(model, x, y, threat, False, args)
        after, t_after = timed_crown(model, x, y, threat, True, args)
        for name, certified in (("before", before), ("after", after)):
            if bool((certified & ~standing).any()):
                raise SystemExit(f"crown ({name}) certified an example the attack broke: a bug")
        totals = [
            totals[0] + int(before.sum()),
            totals[1] + int(after.sum()),
            totals[2] + t_before,
            totals[3] + t_after,
        ]
        print(
            f"| {threat.eps_x:g} | {threat.eps_w:g} | {threat.x_norm}/{threat.w_norm} | "
            f"{int(standing.sum())} | {int(before.sum())} ({t_before:.1f} s) | "
            f"{int(after.sum())} ({t_after:.1f} s) | {t_after / t_before:.2f} |"
        )
    print(
        f"| all | | | | {totals[0]} ({totals[2]:.1f} s) | {totals[1]} ({totals[3]:.1f} s) | "
        f"{totals[3] / totals[2]:.2f} |"
    )


if __name__ == "__main__":
    main()
