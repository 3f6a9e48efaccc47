"""A model checked against the data before training writes anything: one forward and one
backward pass of a copy of it on a training batch. The model must output a tensor of shape
(batch, classes), of the data's floating dtype, have at least one trainable parameter, and
let the loss's gradient reach one; otherwise a ConfigError names the mismatch."""

from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset
from ..errors import ConfigError
from ..model.verify import usable
from ..models import Architecture

_RAISED = (RuntimeError, ValueError, TypeError, IndexError, AttributeError, AssertionError)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def check_fits(
    model: nn.Module,
    data: Dataset,
    batch_size: int,
    device: str | torch.device,
    architecture: Architecture | None,
) -> None:
    """Raise ConfigError when ``model`` cannot be trained on ``data``'s first training batch.
    ``model`` is untouched: the passes run on a copy, under a forked RNG (Dropout)."""
    name = architecture.factory if architecture is not None else type(model).__name__
    x = data.x_train[:batch_size].to(device)
    y = data.y_train[:batch_size].to(device)
    classes = data.classes
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"model {name} has no trainable parameters (none, or all frozen with "
            "requires_grad=False); expected at least one"
        )
    probe = deepcopy(model).train()
    x, y = usable(x), usable(y)  # data made under inference_mode
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        try:
            out = probe(x)
        except _RAISED as exc:
            raise ConfigError(
                f"model {name} does not accept the data's batches ({x.dtype} of shape "
                f"{tuple(x.shape)}): {_first_line(exc)}"
            ) from None
    _check_output(out, x, classes, name)
    if not out.requires_grad:
        raise ConfigError(f"model {name}: its output does not depend on trainable parameters")
    try:
        F.cross_entropy(out, y).backward()
    except _RAISED as exc:
        raise ConfigError(f"model {name}: its backward pass failed: {_first_line(exc)}") from None
    if not any(p.grad is not None for p in probe.parameters() if p.requires_grad):
        raise ConfigError(f"model {name}: no gradient reaches its trainable parameters")


def _check_output(out: object, x: Tensor, classes: int, name: str) -> None:
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"model {name} returns a {type(out).__name__}, expected a tensor of logits of "
            f"shape (batch, classes)"
        )
    if tuple(out.shape) != (len(x), classes):
        raise ConfigError(
            f"model {name} outputs shape {tuple(out.shape)} for a batch of {len(x)}, expected "
            f"({len(x)}, {classes}): one logit per class of the data"
        )
    if out.dtype != x.dtype:
        raise ConfigError(
            f"model {name} outputs {out.dtype} for {x.dtype} data, expected {x.dtype} "
            "(convert the model, e.g. model.float())"
        )
