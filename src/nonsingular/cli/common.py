"""Pieces shared by the commands: one-line errors, list parsing, devices, threat flags."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import checkpoint, distributed
from ..checks import MAX_SEED
from ..data import NAMES, Dataset
from ..errors import ConfigError
from ..threat import SCOPES, W_MODES, W_NORMS, X_NORMS
from ..training import TrainConfig, train


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): what was wrong and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _numbers(text: str, kind: type, what: str, example: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {what}s like {example}, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one {what}")
    return values


def floats(text: str) -> list[float]:
    """``"0,0.05,0.1"`` -> ``[0.0, 0.05, 0.1]``."""
    return _numbers(text, float, "number", "0,0.05,0.1")


def integers(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    return _numbers(text, int, "integer", "0,1,2")


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def device(name: str) -> torch.device:
    """The device ``name`` names, checked to exist here (``auto``: CUDA when there is one);
    under torchrun, this process joins the process group (and takes its own GPU)."""
    return distributed.start(_device(name))


def start(args: argparse.Namespace) -> torch.device:
    """``device(args.device)``, then, under torchrun, every process checks that all were
    started with the same options (and config file contents) before any work."""
    where = device(args.device)
    options = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    config = options.get("config")
    if config is not None and Path(config).is_file():
        options["config file"] = hashlib.sha256(Path(config).read_bytes()).hexdigest()
    distributed.agree(options)
    return where


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r} requested but CUDA is not available here")
        if chosen.index is not None and chosen.index >= count:
            raise ConfigError(f"device {name!r} requested but this machine has {count} GPU(s)")
    elif chosen.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r} requested but MPS is not available here")
    elif chosen.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda, cuda:N, mps or auto")
    return chosen


def seed(text: str) -> int:
    """An argparse type: a seed from 0 to MAX_SEED."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must lie in 0..{MAX_SEED}, got {value}")
    return value


def say(args: argparse.Namespace, text: str) -> None:
    """A message for people (stderr), silenced by --quiet; one process speaks for all."""
    if not args.quiet and distributed.ranks().lead:
        print(text, file=sys.stderr)


def check_out(path: Path | None) -> None:
    """Refuse an output file that could not be written, before any work is done."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory, expected a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"cannot write {path}: directory {path.parent} is not writable")


def add_threat(p: argparse.ArgumentParser, eps_x: str, eps_w: str) -> None:
    g = p.add_argument_group("threat")
    g.add_argument(
        "--eps-x",
        type=floats,
        default=floats(eps_x),
        metavar="LIST",
        help=f"input budgets, comma-separated (default {eps_x})",
    )
    g.add_argument(
        "--eps-w",
        type=floats,
        default=floats(eps_w),
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
        type=names,
        default=None,
        metavar="NAMES",
        help="perturb only these weights, e.g. 1.weight,3.weight (default: all)",
    )
    g.add_argument("--bias", action="store_true", help="perturb biases too")
    _add_flips(g)


def _add_flips(g: Any) -> None:
    """The bit-flip threat's flags (docs/quantization.md)."""
    g.add_argument(
        "--flips",
        type=integers,
        default=None,
        metavar="LIST",
        help="bit flips instead of weight budgets, e.g. 0,1,2,4,8 (replaces --eps-w; the "
        "model must be quantized, or give --bits)",
    )
    g.add_argument(
        "--bits",
        type=int,
        default=None,
        metavar="N",
        help="with --flips: quantize a float model to N-bit integers per channel first",
    )
    g.add_argument(
        "--flip-bits",
        type=integers,
        default=None,
        metavar="LIST",
        help="with --flips: the bit positions that may flip, e.g. 7 (default all)",
    )


def threat_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "x_norm": args.x_norm,
        "w_mode": args.w_mode,
        "w_norm": args.w_norm,
        "scope": args.scope,
        "layers": args.layers,
        "bias": args.bias,
        **({"bits": tuple(args.flip_bits)} if args.flip_bits else {}),
    }


def weight_grid(args: argparse.Namespace) -> dict[str, Any]:
    """``grid``'s weight axis: ``--eps-w``, or ``--flips`` (which replaces it)."""
    if args.flips:
        return {"eps_w": [0.0], "flips": args.flips}
    if args.flip_bits or args.bits is not None:
        raise ConfigError("--bits and --flip-bits go with --flips")
    return {"eps_w": args.eps_w}


def quantized_for(args: argparse.Namespace, model: torch.nn.Module) -> torch.nn.Module:
    """The model, quantized to ``--bits`` when flips are asked for on a float model."""
    if not args.flips or args.bits is None:
        return model
    from ..flips.grid import ATTRIBUTE, quantize

    grid = getattr(model, ATTRIBUTE, None)
    if grid is not None:
        if grid.bits != args.bits:
            raise ConfigError(f"the model is quantized to {grid.bits} bits, not --bits {args.bits}")
        return model
    return quantize(model, bits=args.bits)


def add_data(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--seed", type=seed, default=0, help="seed for data split and attacks")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument(
        "--out", type=Path, default=None, metavar="PATH", help="write the results as JSON to PATH"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def add_model_source(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--model",
        default=None,
        metavar="FACTORY",
        help="package.module:function that built the checkpoint's model: naming it allows "
        "importing it (checkpoints of built-in models need nothing)",
    )


def load_model(args: argparse.Namespace, data: Dataset, where: torch.device) -> torch.nn.Module:
    """The model to evaluate: a checkpoint, or a small standard MLP trained right now."""
    if args.checkpoint is not None:
        model, _ = checkpoint.load(args.checkpoint, device=where, factory=args.model)
        return model
    start = time.perf_counter()
    result = train(
        TrainConfig(epochs=10, seed=args.seed), data, device=where, progress=not args.quiet
    )
    say(
        args,
        f"trained a standard MLP in {time.perf_counter() - start:.1f}s: "
        f"clean test accuracy {result.history[-1]['test_accuracy']:.1%}",
    )
    return result.model
