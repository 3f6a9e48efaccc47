"""The model is the truth: a reading is compared with ``model(x)`` before anything relies on it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedModelError
from .graph import Graph
from .reader import eval_mode, read_model

LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
Params = ParamSpec("Params")
Returned = TypeVar("Returned")


def with_gradients(function: Callable[Params, Returned]) -> Callable[Params, Returned]:
    """Run ``function`` with autograd on, whatever the caller's ``torch.no_grad()`` or
    ``torch.inference_mode()``: attacks, alpha-crown and training need gradients."""

    @functools.wraps(function)
    def run(*args: Params.args, **kwargs: Params.kwargs) -> Returned:
        with torch.inference_mode(False), torch.enable_grad():
            return function(*args, **kwargs)

    return run


def usable(tensor: Tensor) -> Tensor:
    """``tensor``, or a normal copy of an inference tensor (one made under
    ``torch.inference_mode()``, which autograd cannot save); call it outside inference mode."""
    return tensor.clone() if tensor.is_inference() else tensor


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of every floating parameter and buffer of ``model`` (None: none,
    or several): the dtype its inputs are cast to."""
    tensors = [*model.parameters(), *model.buffers()]
    found = {t.dtype for t in tensors if t.is_floating_point()}
    return found.pop() if len(found) == 1 else None


def move_batch(
    x: object, y: object, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` on ``device``, floating ``x`` in ``dtype`` (None: its own); InputError for
    anything but tensors."""
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtype is None or not x.is_floating_point():  # type: ignore[union-attr]
        dtype = x.dtype  # type: ignore[union-attr]
    return usable(x.to(device, dtype)), usable(y.to(device))  # type: ignore[union-attr]


def check_clean_logits(logits: Tensor) -> None:
    """The rule for what the model computes on the clean batch (docs/reliability.md): NaN
    is an InputError, never a margin (it would compare as neither right nor broken).
    ``inf`` is kept: the model overflowing as it runs (``attacks.margins`` says how)."""
    bad = logits.isnan().flatten(1).any(dim=1)
    if bool(bad.any()):
        raise InputError(
            f"the model outputs NaN on the clean pass on example {int(bad.nonzero()[0])} "
            f"({int(bad.sum())} of {len(bad)} examples), e.g. from a BatchNorm running_var "
            "below zero, a log or sqrt of a negative, or 0/0; expected finite logits"
        )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_batch(graph: Graph, model: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
    """Run the reading and ``model(x)`` (eval mode, no grad) on the batch; return the logits.

    Raises UnsupportedModelError when they disagree (beyond the dtype's rounding), and
    InputError for a batch that does not fit the model or labels out of range.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError(
            f"x must be a floating-point tensor, got {type(x).__name__} "
            f"{getattr(x, 'dtype', '')}".rstrip()
        )
    if x.dim() < 2:
        raise InputError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        raise InputError(
            f"x holds NaN or infinite values in {int(bad.sum())} examples (the first is "
            f"example {int(bad.nonzero()[0])}): attacks and certificates need finite inputs"
        )
    with torch.no_grad():
        try:
            logits = graph.run(x)
            with eval_mode(model):
                truth = model(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise InputError(
                f"x of shape {tuple(x.shape)} does not fit the model: {_first_line(exc)}"
            ) from None
    if not isinstance(truth, Tensor) or truth.dim() != 2 or truth.shape[0] != x.shape[0]:
        raise InputError(
            f"the model must output (batch, classes) logits, got "
            f"{tuple(getattr(truth, 'shape', ())) or type(truth).__name__}"
        )
    check_clean_logits(truth)
    _compare(graph, logits, truth)
    if y is not None:
        _check_labels(x, y, truth.shape[1])
    return truth


def _compare(graph: Graph, ours: Tensor, truth: Tensor) -> None:
    if ours.shape == truth.shape and ours.dtype == truth.dtype:
        scale = 1.0 + float(truth.nan_to_num(0.0).abs().max()) if truth.numel() else 1.0
        tolerance = 64 * torch.finfo(truth.dtype).eps * scale
        same = (ours == truth) | (ours.isnan() & truth.isnan())  # overflowed alike: inf == inf
        gap = (ours - truth).abs().masked_fill(same, 0.0)
        gap = gap.nan_to_num(float("inf"))
        if gap.numel() == 0 or float(gap.max()) <= tolerance:
            return
        where = int(gap.flatten().argmax()) // max(1, truth.shape[1])
        detail = f"largest difference {float(gap.max()):.3g} at example {where}"
    else:
        detail = f"shapes {tuple(ours.shape)} vs {tuple(truth.shape)}"
    raise UnsupportedModelError(
        f"the graph read from {graph.model_name} disagrees with model(x) ({detail}): its forward "
        "may draw random numbers, keep state that changes between calls, branch on values "
        "torch.fx cannot see (data-dependent control flow), or compute in place on module "
        "state; nonsingular will not attack or certify a reading it cannot trust"
    )


def _check_labels(x: Tensor, y: Tensor, classes: int) -> None:
    if not isinstance(y, Tensor) or y.dtype not in LABEL_DTYPES:
        raise InputError(f"y must be an integer tensor of labels, got {getattr(y, 'dtype', y)}")
    if y.shape != (x.shape[0],):
        raise InputError(
            f"y must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise InputError(
            f"labels must lie in [0, {classes - 1}] for a model with {classes} outputs, "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )


def read_batch(
    model: nn.Module, x: object, y: object, *, detach: bool = True
) -> tuple[Graph, Tensor, Tensor, Tensor]:
    """Read ``model`` and check it on ``(x, y)``: ``(graph, x, y as int64, logits)``, with the
    batch moved to the model's device and ``x`` cast to its floating dtype."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"the model's {name} holds NaN or infinite values")
    device = next((t.device for _, t in tensors), torch.device("cpu"))
    x, y = move_batch(x, y, device, model_dtype(model))  # a float64/bfloat16 model: in its dtype
    graph = read_model(model, x, detach=detach)
    logits = check_batch(graph, model, x, y)
    return graph, x, y.long(), logits
