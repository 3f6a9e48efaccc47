"""``nonsingular evaluate``: clean, attacked (and certified) accuracy over a grid."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..attacks import LOSSES, METHODS, SCHEDULES, AttackOptions
from ..certificates import CertifyOptions
from ..certificates.options import BAB_SECONDS
from ..certificates.options import METHODS as CERTIFY_METHODS
from ..certificates.rounding import BOUND_DTYPES
from ..checks import number
from ..data import Dataset, load
from ..distributed import ranks
from ..errors import ConfigError
from ..evaluation import EvaluationTable, ExampleSaver, evaluate
from ..evaluation.examples import sidecar
from ..model.weights import WeightCoverage, weight_coverage
from ..provenance import provenance
from ..threat import grid
from . import common


def prepare(args: argparse.Namespace) -> tuple[list, Any, Any, Any]:
    """Validate cheap things first, then load data and the model."""
    common.check_out(args.out)
    where = common.start(args)  # joins torchrun's group; all agree
    threats = grid(args.eps_x, **common.weight_grid(args), **common.threat_fields(args))
    data = load(args.data, test_size=args.test_size, seed=args.seed)
    model = common.quantized_for(args, common.load_model(args, data, where))
    return threats, data, model, where


def coverage(threats: list, model: Any, x: Any) -> WeightCoverage | None:
    """What the grid's weight threats move (they share layers and bias: the first one with a
    weight budget says it for all), checked before any work: a weight threat that moves
    nothing, or ``--layers`` naming what no threat moves, stops here."""
    weighted = [t for t in threats if t.eps_w > 0]
    return weight_coverage(model, x, weighted[0]) if weighted else None


def report(
    args: argparse.Namespace,
    table: EvaluationTable,
    data: Dataset,
    covered: WeightCoverage | None = None,
) -> None:
    if not ranks().lead:  # every process holds the whole table: one writes and prints it
        return
    if args.out is not None:
        made = None
        if args.checkpoint is not None:
            info = checkpoint.read_info(args.checkpoint)
            made = {"path": str(args.checkpoint), "sha256": info["sha256"]}
        about = provenance(args.argv, data, split_seed=args.seed, checkpoint=made)
        moved = None if covered is None else asdict(covered)
        table.save(args.out, world_size=ranks().world, provenance=about, weights=moved)
    print(table)
    if covered is not None:
        print("\n".join(covered.lines()))
    for column in table.columns():
        kind = "attacked" if column == "attacked" else f"certified ({column})"
        print(f"\n{kind} accuracy (rows eps_x, columns eps_w):")
        print(table.matrix_text(column))
    if args.out is not None:
        print(f"\nwrote {args.out}")


def evaluate_and_report(
    args: argparse.Namespace,
    attack: AttackOptions | None,
    methods: list[str],
    options: CertifyOptions,
    saver: ExampleSaver | None = None,
) -> int:
    """What ``evaluate`` and ``certify`` share: load, evaluate the grid, print and save (and
    the adversarial examples ``saver`` kept, to ``args.save_examples``)."""
    threats, data, model, where = prepare(args)
    covered = coverage(threats, model, data.x_test[:2].to(where))
    table = evaluate(
        model,
        (data.x_test.to(where), data.y_test.to(where)),
        threats,
        attack,
        certify=methods,
        certify_options=options,
        batch_size=args.batch_size,
        progress=not args.quiet,
        on_attack=saver,
    )
    report(args, table, data, covered)
    if saver is not None and ranks().lead:
        saver.save(args.save_examples)
        print(f"wrote {args.save_examples} and {sidecar(args.save_examples)}")
    return 0


def example_saver(args: argparse.Namespace) -> ExampleSaver | None:
    """The saver ``--save-examples`` asks for, its paths checked before any work is done."""
    path = args.save_examples
    if path is None:
        return None
    if ranks().many:
        raise ConfigError("--save-examples works in one process; run without torchrun")
    if path.suffix != ".safetensors":
        raise ConfigError(f"--save-examples {path}: expected a file name ending .safetensors")
    common.check_out(path)
    if args.out is not None and Path(args.out).resolve() == sidecar(path).resolve():
        raise ConfigError(f"--out {args.out} is where --save-examples writes its description")
    if args.save_count < 1:
        raise ConfigError(f"--save-count must be at least 1, got {args.save_count}")
    return ExampleSaver(args.save_count)


def run_evaluate(args: argparse.Namespace) -> int:
    options = AttackOptions(
        method=args.method,
        steps=args.steps,
        restarts=args.restarts,
        loss=args.loss,
        targets=args.targets,
        step_size=args.step_size,
        schedule=args.schedule,
        samples=args.samples,
        seed=args.seed,
    )  # checked before anything is loaded
    certify = certify_options(args)
    saver = example_saver(args)
    return evaluate_and_report(args, options, args.certify or [], certify, saver)


DEFAULT = AttackOptions()  # the flags' defaults: the options' own


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
    a.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT.method,
        help=f"pgd, apgd, strong (APGD-CE then targeted APGD-DLR) or noise "
        f"(default {DEFAULT.method})",
    )
    a.add_argument(
        "--steps", type=int, default=DEFAULT.steps, help=f"PGD steps (default {DEFAULT.steps})"
    )
    a.add_argument(
        "--restarts",
        type=int,
        default=DEFAULT.restarts,
        help=f"PGD runs per loss (default {DEFAULT.restarts})",
    )
    a.add_argument(
        "--loss", choices=LOSSES, default=DEFAULT.loss, help=f"attack loss (default {DEFAULT.loss})"
    )
    a.add_argument(
        "--targets",
        type=int,
        default=DEFAULT.targets,
        help="targeted runs (--loss dlr-targeted, --method strong): the classes other than the "
        f"label with the highest clean logits, one run each (default {DEFAULT.targets})",
    )
    add_step_size(a)
    a.add_argument(
        "--samples",
        type=int,
        default=DEFAULT.samples,
        help=f"draws for --method noise (default {DEFAULT.samples})",
    )
    a.add_argument("--batch-size", type=int, default=1000, help="examples per attack batch")
    a.add_argument(
        "--certify",
        type=common.names,
        default=None,
        metavar="METHODS",
        help=f"also certify, e.g. ibp,crown (from {', '.join(CERTIFY_METHODS)})",
    )
    add_certify_options(a)
    add_save_examples(p)
    p.set_defaults(func=run_evaluate)


def add_step_size(group: Any) -> None:
    """--step-size and --schedule (the attack's steps)."""
    group.add_argument(
        "--step-size",
        type=float,
        default=DEFAULT.step_size,
        help="step as a fraction of each budget (default pgd 2.5/steps, its linear schedule's "
        "first step 2; apgd's first step 2)",
    )
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=DEFAULT.schedule,
        help="pgd's step sizes: constant, or linear from --step-size down to --step-size/steps "
        f"(default {DEFAULT.schedule})",
    )


def add_save_examples(parser: Any) -> None:
    """--save-examples and --save-count (evaluate only)."""
    s = parser.add_argument_group("adversarial examples")
    s.add_argument(
        "--save-examples",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the adversarial inputs and each example's weight deltas (materialized) of "
        "the first --save-count examples at every grid point to PATH (.safetensors), "
        "described in PATH with .json",
    )
    s.add_argument(
        "--save-count",
        type=int,
        default=10,
        help="examples kept per grid point by --save-examples (default 10)",
    )


def memory_bytes(args: argparse.Namespace) -> int | None:
    """--memory-limit (GB) in bytes, checked (None: not given)."""
    gb = args.memory_limit
    return None if gb is None else int(number("--memory-limit", gb, 0.0, 1e6, positive=True) * 1e9)


def certify_options(args: argparse.Namespace, **extra: Any) -> CertifyOptions:
    """The certificates' options from --time-limit, --memory-limit and --bound-dtype (and
    ``extra``), checked."""
    return CertifyOptions(
        time_limit=args.time_limit,
        memory_limit=memory_bytes(args),
        dtype=getattr(torch, args.bound_dtype),
        **extra,
    )


def add_certify_options(group: Any) -> None:
    """--time-limit, --memory-limit and --bound-dtype: the certificates' options (certify
    and evaluate)."""
    names = [str(d).removeprefix("torch.") for d in BOUND_DTYPES]
    group.add_argument(
        "--bound-dtype",
        choices=names,
        default=str(CertifyOptions().dtype).removeprefix("torch."),
        help="precision the bounds are computed in, its rounding accounted for either way "
        "(default %(default)s; float32 is faster, chiefly on convolutions)",
    )
    group.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="GB",
        help="memory a certificate run may plan to take: chunks are sized to fit, and a model "
        "whose one example would not fit is refused before it starts (default: 80%% of what "
        "is free)",
    )
    group.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"seconds per example: bab's own, after which it is unknown (default "
        f"{BAB_SECONDS:g}); for the other methods the run's budget at each grid point is this "
        "times the examples, and examples not reached in it are not certified (default: none)",
    )
