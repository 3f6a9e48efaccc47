"""``nonsingular evaluate`` and ``nonsingular certify``."""

from __future__ import annotations

import argparse
from typing import Any

from .. import checkpoint
from ..attacks import LOSSES, METHODS
from ..certificates import BAB_SECONDS
from ..certificates import METHODS as CERTIFY_METHODS
from ..certificates.crown import INTERMEDIATE
from ..data import Dataset, load
from ..distributed import ranks
from ..evaluation import EvaluationTable, evaluate
from ..provenance import provenance
from ..threat import grid
from . import common


def _prepare(args: argparse.Namespace) -> tuple[list, Any, Any, Any]:
    """Validate cheap things first, then load data and the model."""
    common.check_out(args.out)
    where = common.start(args)  # joins torchrun's group; all agree
    threats = grid(args.eps_x, args.eps_w, **common.threat_fields(args))
    data = load(args.data, test_size=args.test_size, seed=args.seed)
    return threats, data, common.load_model(args, data, where), where


def _report(args: argparse.Namespace, table: EvaluationTable, data: Dataset) -> None:
    if not ranks().lead:  # every process holds the whole table: one writes and prints it
        return
    if args.out is not None:
        made = None
        if args.checkpoint is not None:
            info = checkpoint.read_info(args.checkpoint)
            made = {"path": str(args.checkpoint), "sha256": info["sha256"]}
        about = provenance(args.argv, data, split_seed=args.seed, checkpoint=made)
        table.save(args.out, world_size=ranks().world, provenance=about)
    print(table)
    for column in table.columns():
        kind = "attacked" if column == "attacked" else f"certified ({column})"
        print(f"\n{kind} accuracy (rows eps_x, columns eps_w):")
        print(table.matrix_text(column))
    if args.out is not None:
        print(f"\nwrote {args.out}")


def run_evaluate(args: argparse.Namespace) -> int:
    threats, data, model, where = _prepare(args)
    options = {
        "method": args.method,
        "steps": args.steps,
        "restarts": args.restarts,
        "loss": args.loss,
        "samples": args.samples,
        "seed": args.seed,
    }
    if args.step_size is not None:
        options["step_size"] = args.step_size
    table = evaluate(
        model,
        (data.x_test.to(where), data.y_test.to(where)),
        threats,
        options,
        certify=args.certify or (),
        certify_kwargs={"time_limit": args.time_limit},
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    _report(args, table, data)
    return 0


def run_certify(args: argparse.Namespace) -> int:
    threats, data, model, where = _prepare(args)
    table = evaluate(
        model,
        (data.x_test.to(where), data.y_test.to(where)),
        threats,
        certify=args.method,
        certify_kwargs={"intermediate": args.intermediate, "time_limit": args.time_limit},
        attack=False,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    _report(args, table, data)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="clean, attacked (and certified) accuracy over a grid of budgets",
        description="Clean and attacked accuracy of a model over the product grid of --eps-x "
        "and --eps-w; --certify adds certified accuracy next to it.",
    )
    common.add_model_source(p)
    common.add_data(p)
    common.add_threat(p, "0,0.05,0.1", "0,0.001,0.002")
    a = p.add_argument_group("attack")
    a.add_argument("--method", choices=METHODS, default="pgd", help="pgd or noise (default pgd)")
    a.add_argument("--steps", type=int, default=50, help="PGD steps (default 50)")
    a.add_argument("--restarts", type=int, default=1, help="PGD restarts (default 1)")
    a.add_argument("--loss", choices=LOSSES, default="ce", help="attack loss (default ce)")
    a.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="step as a fraction of each budget (default 2.5/steps)",
    )
    a.add_argument("--samples", type=int, default=100, help="draws for --method noise")
    a.add_argument("--batch-size", type=int, default=1000, help="examples per attack batch")
    a.add_argument(
        "--certify",
        type=common.names,
        default=None,
        metavar="METHODS",
        help=f"also certify, e.g. ibp,crown (from {', '.join(CERTIFY_METHODS)})",
    )
    _add_time_limit(a)
    p.set_defaults(func=run_evaluate)

    c = sub.add_parser(
        "certify",
        help="certified accuracy (a lower bound on robust accuracy) over a grid",
        description="Certified accuracy under the joint threat: every example counted is "
        "provably robust to every input and weight perturbation of the threat.",
    )
    common.add_model_source(c)
    common.add_data(c)
    common.add_threat(c, "0,0.005,0.01", "0,1e-05,0.0001")
    b = c.add_argument_group("certificate")
    b.add_argument(
        "--method",
        type=common.names,
        default=["crown"],
        metavar="METHODS",
        help=f"comma-separated, from {', '.join(CERTIFY_METHODS)} (default crown)",
    )
    b.add_argument(
        "--intermediate",
        choices=INTERMEDIATE,
        default="crown",
        help="how crown bounds pre-activations (default crown)",
    )
    b.add_argument("--batch-size", type=int, default=1000, help="examples per batch")
    _add_time_limit(b)
    c.set_defaults(func=run_certify)


def _add_time_limit(group: Any) -> None:
    group.add_argument(
        "--time-limit",
        type=float,
        default=BAB_SECONDS,
        metavar="SECONDS",
        help=f"bab's time per example, after which it is unknown (default {BAB_SECONDS:g})",
    )
