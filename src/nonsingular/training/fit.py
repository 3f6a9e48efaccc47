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
from ..errors import ConfigError, InputError
from ..model.architectures import Architecture
from ..model.verify import LABEL_DTYPES, usable
from ..threat import Threat
from .config import TrainConfig

_RAISED = (RuntimeError, ValueError, TypeError, IndexError, AttributeError, AssertionError)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def check_fits(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    device: str | torch.device,
    architecture: Architecture | None,
) -> None:
    """Raise InputError when ``data`` cannot be trained on with ``config`` (``check_dataset``),
    and ConfigError when ``model`` cannot be trained on its first training batch. ``model``
    is untouched: the passes run on a copy, under a forked RNG (Dropout)."""
    check_dataset(data, [config.resolved_threat(), *filter(None, [config.eval_threat()])])
    name = architecture.factory if architecture is not None else type(model).__name__
    x = data.x_train[: config.batch_size].to(device)
    y = data.y_train[: config.batch_size].to(device)
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


def check_dataset(data: object, threats: list[Threat]) -> None:
    """Raise InputError when ``data`` cannot be trained on: each split's inputs a floating
    tensor of one example shape, finite, inside the bounds of every threat in ``threats``
    that clamps; its labels integers of shape (N,), one per input, in [0, classes); a
    training split that is not empty."""
    if not isinstance(data, Dataset):
        raise InputError(f"data must be a nonsingular Dataset, got {type(data).__name__}")
    classes = data.classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise InputError(f"data.classes must be a positive integer, got {classes!r}")
    if not isinstance(data.x_train, Tensor) or len(data.x_train) == 0:
        raise InputError("data.x_train holds no examples: there is nothing to train on")
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        _check_inputs(f"data.x_{split}", x, data.x_train, threats)
        _check_labels(f"data.y_{split}", y, len(x), classes)


def _check_inputs(name: str, x: object, first: Tensor, threats: list[Threat]) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise InputError(
            f"{name} must be a floating-point tensor (N, ...), got {type(x).__name__} "
            f"{getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[1:] != first.shape[1:]:
        raise InputError(
            f"{name} has examples of shape {tuple(x.shape[1:])}, data.x_train "
            f"{tuple(first.shape[1:])}: every split must have the same"
        )
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} holds NaN or infinite values; expected finite inputs")
    for threat in threats:
        if threat.perturbs_input and threat.bounds is not None and x.numel():
            lo, hi = threat.bounds
            if float(x.min()) < lo or float(x.max()) > hi:
                raise InputError(
                    f"{name} has values in [{float(x.min()):.6g}, {float(x.max()):.6g}], outside "
                    f"the bounds ({lo:g}, {hi:g}) its threat clamps to: scale the data to them"
                )


def _check_labels(name: str, y: object, n: int, classes: int) -> None:
    if not isinstance(y, Tensor) or y.dtype not in LABEL_DTYPES:
        raise InputError(
            f"{name} must be an integer tensor of labels, got {getattr(y, 'dtype', type(y))}"
        )
    if tuple(y.shape) != (n,):
        raise InputError(f"{name} must have shape ({n},), a label per input; got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise InputError(
            f"{name} holds labels in [{int(y.min())}, {int(y.max())}]; with data.classes = "
            f"{classes} they must lie in [0, {classes - 1}]"
        )
