"""``nonsingular quantize``: a checkpoint's model on an integer grid, written as a checkpoint
of integers and scales, with its clean accuracy beside the float model's."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..data import load
from ..errors import CheckpointError
from ..flips.grid import GRANULARITIES, quantize
from . import common


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def run_quantize(args: argparse.Namespace) -> int:
    common.check_out(args.out)
    if args.out.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint paths end in .safetensors, got {str(args.out)!r}")
    model, info = checkpoint.load(args.checkpoint, factory=args.model)
    q_model = quantize(model, bits=args.bits, granularity=args.granularity)
    data = load(args.data, test_size=args.test_size, seed=args.seed)
    before = _accuracy(model, data.x_test, data.y_test)
    after = _accuracy(q_model, data.x_test, data.y_test)
    keep = {
        k: v for k, v in info.items() if k not in ("format", "version", "torch", "model", "sha256")
    }
    checkpoint.save(q_model, args.out, quantized_from=str(args.checkpoint), **keep)
    print(
        f"{args.bits}-bit ({args.granularity}) clean accuracy {after:.1%} "
        f"(float {before:.1%}) on {len(data.y_test)} test examples of {args.data}; wrote {args.out}"
    )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "quantize",
        help="put a checkpoint's Linear/Conv weights on a symmetric integer grid",
        description="Quantize a checkpoint (symmetric, per output channel or per tensor), "
        "report clean accuracy before and after, and write the integers and scales.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, metavar="PATH")
    p.add_argument("--model", default=None, metavar="FACTORY", help="the checkpoint's factory")
    p.add_argument("--bits", type=int, default=8, help="integer width (default 8)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="channel")
    p.add_argument("--data", default="mnist5k", help="data set for the accuracies")
    p.add_argument("--test-size", type=int, default=None, metavar="N")
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="output .safetensors")
    p.set_defaults(func=run_quantize)
