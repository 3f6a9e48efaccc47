"""``nonsingular`` command line: a thin shell over the Python API.

Every user mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import checkpoint
from ._version import __version__
from .attacks import LOSSES, METHODS
from .certificates import METHODS as CERTIFY_METHODS
from .certificates.crown import INTERMEDIATE
from .data import NAMES, load
from .errors import ConfigError, NonsingularError
from .evaluation import evaluate
from .threat import SCOPES, W_MODES, W_NORMS, X_NORMS, grid
from .training import TrainConfig, train


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): what was wrong and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0,0.05,0.1, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here")
    return device


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def _add_threat(p: argparse.ArgumentParser, eps_x: str, eps_w: str) -> None:
    g = p.add_argument_group("threat")
    g.add_argument(
        "--eps-x",
        type=_floats,
        default=_floats(eps_x),
        metavar="LIST",
        help=f"input budgets, comma-separated (default {eps_x})",
    )
    g.add_argument(
        "--eps-w",
        type=_floats,
        default=_floats(eps_w),
        metavar="LIST",
        help=f"weight budgets, comma-separated (default {eps_w})",
    )
    g.add_argument("--x-norm", choices=X_NORMS, default="linf", help="input norm (default linf)")
    g.add_argument(
        "--w-mode",
        choices=W_MODES,
        default="absolute",
        help="weight budget: absolute, relative to |W|, or relative to max|W| of "
        "the layer (default absolute)",
    )
    g.add_argument(
        "--w-norm",
        choices=W_NORMS,
        default="linf",
        help="weight norm: elementwise linf or Frobenius l2 (default linf)",
    )
    g.add_argument(
        "--scope",
        choices=SCOPES,
        default="per-example",
        help="per-example weight perturbations or one shared by all (default per-example)",
    )
    g.add_argument(
        "--layers",
        type=_names,
        default=None,
        metavar="NAMES",
        help="perturb only these weights, e.g. 1.weight,3.weight (default: all)",
    )
    g.add_argument("--bias", action="store_true", help="perturb biases too")


def _threat_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "x_norm": args.x_norm,
        "w_mode": args.w_mode,
        "w_norm": args.w_norm,
        "scope": args.scope,
        "layers": args.layers,
        "bias": args.bias,
    }


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default="mnist5k", help=f"data set: {', '.join(NAMES)} (default mnist5k)"
    )
    p.add_argument(
        "--test-size",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on a seeded random subset of N test examples (default all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data split and attacks")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument(
        "--out", type=Path, default=None, metavar="PATH", help="write the results as JSON to PATH"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="model.safetensors written by nonsingular (JSON sidecar beside it)",
    )
    src.add_argument(
        "--train-quick",
        action="store_true",
        help="train a small standard MLP on the data first (seconds)",
    )


def _model(args: argparse.Namespace, data: Any, device: torch.device) -> torch.nn.Module:
    """The model to evaluate: a checkpoint, or a small standard MLP trained right now."""
    if args.checkpoint is not None:
        model, _ = checkpoint.load(args.checkpoint, device=device)
        return model
    start = time.perf_counter()
    result = train(
        TrainConfig(epochs=10, seed=args.seed), data, device=device, progress=not args.quiet
    )
    acc = result.history[-1]["test_accuracy"]
    _say(
        args,
        f"trained a standard MLP in {time.perf_counter() - start:.1f}s: "
        f"clean test accuracy {acc:.1%}",
    )
    return result.model


def _check_out(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")


def _prepare(args: argparse.Namespace) -> tuple[list, Any, torch.nn.Module, torch.device]:
    """Validate cheap things first, then load data and the model."""
    _check_out(args.out)
    device = _device(args.device)
    threats = grid(args.eps_x, args.eps_w, **_threat_fields(args))
    data = load(args.data, test_size=args.test_size, seed=args.seed)
    return threats, data, _model(args, data, device), device


def _report(args: argparse.Namespace, table: Any) -> None:
    if args.out is not None:
        table.save(args.out)
    print(table)
    for column in table.columns():
        kind = "attacked" if column == "attacked" else f"certified ({column})"
        print(f"\n{kind} accuracy (rows eps_x, columns eps_w):")
        print(table.matrix_text(column))
    if args.out is not None:
        print(f"\nwrote {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    threats, data, model, device = _prepare(args)
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
        (data.x_test.to(device), data.y_test.to(device)),
        threats,
        options,
        certify=args.certify or (),
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    _report(args, table)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    threats, data, model, device = _prepare(args)
    table = evaluate(
        model,
        (data.x_test.to(device), data.y_test.to(device)),
        threats,
        certify=args.method,
        certify_kwargs={"intermediate": args.intermediate},
        attack=False,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    _report(args, table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nonsingular",
        description=(
            "Attack, certify and train neural networks under joint input and weight perturbations."
        ),
    )
    parser.add_argument("--version", action="version", version=f"nonsingular {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "evaluate",
        help="clean, attacked (and certified) accuracy over a grid of joint budgets",
        description="Clean and attacked accuracy of a model over the product grid of --eps-x "
        "and --eps-w; --certify adds certified accuracy next to it.",
    )
    _add_model_source(p)
    _add_common(p)
    _add_threat(p, "0,0.05,0.1", "0,0.001,0.002")
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
        type=_names,
        default=None,
        metavar="METHODS",
        help=f"also certify, e.g. ibp,crown (from {', '.join(CERTIFY_METHODS)})",
    )
    p.set_defaults(func=cmd_evaluate)

    c = sub.add_parser(
        "certify",
        help="certified accuracy (a lower bound on robust accuracy) over a grid",
        description="Certified accuracy under the joint threat: every example counted is "
        "provably robust to every input and weight perturbation of the threat.",
    )
    _add_model_source(c)
    _add_common(c)
    _add_threat(c, "0,0.005,0.01", "0,1e-05,0.0001")
    b = c.add_argument_group("certificate")
    b.add_argument(
        "--method",
        type=_names,
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
    c.set_defaults(func=cmd_certify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except NonsingularError as exc:
        print(f"nonsingular {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable input or unwritable output named by the user
        print(f"nonsingular {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nonsingular: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
