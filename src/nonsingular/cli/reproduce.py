"""``nonsingular reproduce``: the paper's experiment end to end, with a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..certificates import METHODS as CERTIFY_METHODS
from ..distributed import ranks
from ..experiment import ARCHITECTURES, Experiment, run_experiment
from ..experiment.verdicts import FlipVerdict, flips_text, interval_text
from ..training import METHODS
from ..training.config import read_toml
from . import common


def run(args: argparse.Namespace) -> int:
    where = common.start(args)  # joins torchrun's group; all agree
    settings = read_toml(args.config) if args.config is not None else {}
    for name in ("data", "model", "seeds", "epochs", "certify"):  # flags override the file
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    exp = Experiment.from_dict(settings, quick=args.quick)
    out: Path = args.out or Path("runs") / ("reproduce-quick" if args.quick else "reproduce")
    results = run_experiment(exp, out, device=where, say=lambda text: common.say(args, text))
    if not ranks().lead:  # every process holds the results: one writes the report
        return 0
    from ..experiment.report import write_report  # matplotlib: imported by the command that draws

    report = write_report(results, out, args.argv)
    print(
        f"{'claim':5}  {'family':16}  {'model':>7}  {'standard':>8}  {'diff':>6}  "
        f"{'95% interval':>15}  {'p (Holm)':>8}  verdict"
    )
    for c in report.claims:
        p = "-" if c.p_holm is None else f"{c.p_holm:.3g}"
        if c.metric_model is None:  # not run
            numbers = f"{'-':>7}  {'-':>8}  {'-':>6}  {'-':>15}  {'-':>8}"
        elif isinstance(c, FlipVerdict):  # flips to collapse, not accuracies
            numbers = (
                f"{c.metric_model:6.1f}f  {c.metric_standard:7.1f}f  {c.difference:+6.1f}  "
                f"{flips_text(c.interval):>15}  {p:>8}"
            )
        else:
            numbers = (
                f"{100 * c.metric_model:6.1f}%  {100 * c.metric_standard:7.1f}%  "
                f"{100 * c.difference:+6.1f}  {interval_text(c.interval):>15}  {p:>8}"
            )
        reason = f" ({c.reason})" if c.reason else ""
        print(f"{c.claim:5}  {c.family:16}  {numbers}  {c.verdict}{reason}")
    print(f"\nreport: {report.path}\nfigures: {out / 'figures'}\nnumbers: {out / 'results.json'}")
    return 0


def _methods() -> str:
    """The training methods, MLP-only ones marked."""
    return ", ".join(m + (" (MLP only)" if METHODS[m].mlp_only else "") for m in METHODS)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce",
        help="the paper's experiment end to end, with a report",
        description=f"Train the comparison's models ({_methods()}), attack and certify each "
        "under input, weight (three views) and joint threats, and write report.md, figures "
        "and results.json. Finished models and evaluations in --out are reused.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output directory (default runs/reproduce, or runs/reproduce-quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer epochs, smaller grids and test sets (a few minutes)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="experiment TOML: methods, budgets, grids, attack, seeds... (see docs/reproduce.md); "
        "flags given on the command line override it",
    )
    p.add_argument("--data", default=None, help="data set (default mnist5k)")
    p.add_argument(
        "--model",
        choices=ARCHITECTURES,
        default=None,
        help="architecture of every model (default mlp)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="repeat with N seeds; the report gives mean and spread (default 1)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 20, 5 with --quick)"
    )
    p.add_argument(
        "--certify",
        type=common.names,
        default=None,
        metavar="METHODS",
        help=f"certificates on the joint grid, from {', '.join(CERTIFY_METHODS)} (default "
        "ibp,crown; bab takes its default time limit per example)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)
