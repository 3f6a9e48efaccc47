"""``nonsingular train``: one flag per ``TrainConfig`` field; ``--config`` reads the same
keys from TOML, and flags given on the command line win."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..distributed import ranks
from ..errors import ConfigError
from ..files import refuse_links
from ..model.architectures import BUILTIN
from ..nesting import check_depth
from ..training import METHODS, TrainConfig, train
from ..training.config import BOUNDS, OPTIMIZERS, read_config
from . import common


def _hidden(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 256,256, got {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        check_depth(text, "--model-args", ConfigError)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"channels\": [8, 16]}}', got {text!r}"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "1", "yes")


# (flag, type or choices, help): each flag is a TrainConfig field of the same name
OPTIONS: list[tuple[str, Any, str]] = [
    ("data", str, "data set (default mnist5k)"),
    (
        "model",
        str,
        f"architecture: {', '.join(BUILTIN)}, or an importable factory "
        "package.module:function (default mlp)",
    ),
    ("model-args", _json_object, "keyword arguments of the model's factory, as JSON"),
    ("hidden", _hidden, "MLP hidden widths (default 256,256)"),
    ("epochs", int, "epochs (default 20)"),
    ("batch-size", int, "batch size (default 256)"),
    ("lr", float, "peak learning rate of the one-cycle schedule (default 4e-3)"),
    ("optimizer", OPTIMIZERS, "adam or sgd (default adam)"),
    ("weight-decay", float, "weight decay (default 0)"),
    ("augment", int, "random shifts of up to N pixels (default 2; 0 = off)"),
    ("seed", int, "seed of the initialization, data order and attacks (default 0)"),
    ("eps-x", float, "training input budget (default: the method's)"),
    ("eps-w", float, "training weight budget (default: the method's)"),
    ("x-norm", ("linf", "l2"), "input norm (default linf)"),
    ("w-mode", ("absolute", "relative", "layer"), "weight budget mode (default: the method's)"),
    ("w-norm", ("linf", "l2"), "weight norm (default: the method's)"),
    ("scope", ("per-example", "shared"), "weight scope (default: the method's)"),
    ("bias", _flag, "perturb biases too: true or false (default false)"),
    (
        "attack-steps",
        int,
        "PGD steps of the inner attack; flip-at: the bit flips (default: the method's)",
    ),
    ("attack-step-size", float, "inner step as a fraction of the budget (default 2.5/steps)"),
    ("lambda-x", float, "bound-reg: weight of the input term"),
    ("lambda-w", float, "bound-reg: weight of the weight term"),
    ("bound", BOUNDS, "bound-reg: closed-form (B0, the paper's) or recursive (B1)"),
    ("kappa", float, "ibp: final weight of the clean loss (default 0.5)"),
    ("ramp", float, "fraction of training over which the budget ramps up (default 0.25; ibp 0.5)"),
    ("eval-size", int, "test examples of the per-epoch robust accuracy (default 200)"),
    ("eval-eps-x", float, "per-epoch robust accuracy: input budget (default: training's)"),
    ("eval-eps-w", float, "per-epoch robust accuracy: weight budget (default: training's)"),
]


def _config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config is not None:  # a factory in it only when --model names it too
        values = read_config(args.config, getattr(args, "model", None))
    values = {k.replace("-", "_"): v for k, v in values.items()}
    for flag, _, _ in [("method", None, ""), *OPTIONS]:
        key = flag.replace("-", "_")
        if hasattr(args, key):  # given on the command line
            values[key] = getattr(args, key)
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    where = common.start(args)  # joins torchrun's group; all agree
    config = _config(args).resolved()  # validate before any work
    out = args.out or Path("runs") / config.method
    refuse_links(out)  # before anything is written in it
    result = train(config, out_dir=out, resume=args.resume, device=where, progress=not args.quiet)
    if not ranks().lead:  # one process reports for all
        return 0
    print(f"{'epoch':>5}  {'loss':>7}  {'train':>6}  {'test':>6}  {'robust':>6}  seconds")
    for m in result.history:
        robust = "-" if m["robust_accuracy"] is None else f"{m['robust_accuracy']:.1%}"
        print(
            f"{m['epoch']:>5}  {m['loss']:>7.4f}  {m['train_accuracy']:>6.1%}  "
            f"{m['test_accuracy']:>6.1%}  {robust:>6}  {m['seconds']:.2f}"
        )
    last = result.history[-1] if result.history else {}
    if last.get("eval_threat"):
        print(f"robust accuracy: PGD-10 on {config.eval_size} test examples, {last['eval_threat']}")
    print(f"run directory: {out} (model.safetensors, config.json, config.toml, metrics.jsonl)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help=f"train a model with one of the {len(METHODS)} training methods",
        description="Train a model on the embedded data (or yours) with a robust training "
        "method; writes a run directory that --resume continues after a crash.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        help="training method: "
        + "; ".join(f"{name} ({method.label})" for name, method in METHODS.items())
        + " (default standard)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML file whose keys are these flags (e.g. eps-x = 0.1); flags given here win",
    )
    p.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="run directory (default runs/METHOD)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --out from its last completed epoch",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bars")
    g = p.add_argument_group("training options (also TOML keys)")
    for flag, kind, text in OPTIONS:
        if isinstance(kind, tuple):
            g.add_argument(f"--{flag}", choices=kind, help=text)
        else:
            g.add_argument(f"--{flag}", type=kind, help=text)
    p.set_defaults(func=run)
