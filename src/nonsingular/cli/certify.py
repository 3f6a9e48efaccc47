"""``nonsingular certify``: certified accuracy (a lower bound on robust accuracy) over a grid."""

from __future__ import annotations

import argparse
from typing import Any

from ..certificates import CertifyOptions
from ..certificates.crown import INTERMEDIATE
from ..certificates.options import METHODS
from . import common
from .evaluate import add_certify_options, certify_options, evaluate_and_report

DEFAULT = CertifyOptions()  # the flags' defaults: the options' own


def run_certify(args: argparse.Namespace) -> int:
    options = certify_options(args, intermediate=args.intermediate)
    return evaluate_and_report(args, None, args.method, options)


def register(sub: Any) -> None:
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
        help=f"comma-separated, from {', '.join(METHODS)} (default crown)",
    )
    b.add_argument(
        "--intermediate",
        choices=INTERMEDIATE,
        default=DEFAULT.intermediate,
        help=f"how crown bounds pre-activations (default {DEFAULT.intermediate})",
    )
    b.add_argument("--batch-size", type=int, default=1000, help="examples per batch")
    add_certify_options(b)
    c.set_defaults(func=run_certify)
