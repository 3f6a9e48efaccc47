"""Models that return more than logits (a dict, a tuple, a Hugging Face-style output): the
``logits=`` selector of ``attack``, ``certify``, ``evaluate`` and ``train`` picks the logits
out, and everything else (the reading, its check against ``model(x)``, replays) sees a model
that returns them.

The view is a shallow copy of the user's module whose ``forward`` picks: it holds the same
parameters, buffers and submodules under the same names (a threat's ``layers=``, weight deltas
and checkpoints name them as the user does), in registries of its own, so nothing is ever
registered on, or taken from, the user's module.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from ..errors import ConfigError

Selector = str | int | Callable[[Any], Any]


def check_selector(logits: object) -> None:
    """ConfigError unless ``logits`` is None, a key (str), an index (int) or a callable."""
    if logits is None or callable(logits):
        return
    if isinstance(logits, bool) or not isinstance(logits, (str, int)):
        raise ConfigError(
            "logits must pick the logits from what the model returns: a dict key (str), a "
            f"tuple index (int) or a function of the output; got {type(logits).__name__}"
        )


def selecting(model: nn.Module, logits: Selector | None) -> nn.Module:
    """``model`` itself (``logits=None``), or a view of it whose forward returns
    ``output[logits]`` (a key or index) or ``logits(output)`` (a callable)."""
    check_selector(logits)
    if logits is None:
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    view = copy.copy(model)
    for key in ("_parameters", "_buffers", "_modules"):
        view.__dict__[key] = type(model.__dict__[key])(model.__dict__[key])
    forward = model.__dict__.get("forward")  # a view of a view picks from the picked
    inner = forward if forward is not None else functools.partial(type(model).forward, view)
    view.forward = functools.partial(_picked, inner, logits)
    return view


def unselected(model: nn.Module) -> nn.Module:
    """A view made by ``selecting`` as its own module again (its forward its class's): what
    ``train`` returns, so the trained model returns what the user's does."""
    model.__dict__.pop("forward", None)
    return model


def _picked(forward: Callable[[Any], Any], logits: Selector, x: Any) -> Any:
    out = forward(x)
    if not isinstance(logits, (str, int)):
        return logits(out)  # type: ignore[operator]
    if isinstance(out, Tensor) or (isinstance(out, fx.Proxy) and isinstance(logits, str)):
        raise ConfigError(
            f"logits={logits!r} picks from a dict or tuple, but the model returns a tensor: "
            "leave logits unset"
        )
    try:
        return out[logits]
    except (KeyError, IndexError, TypeError) as exc:
        keys = list(out) if isinstance(out, dict) else type(out).__name__
        raise ConfigError(
            f"logits={logits!r} picks nothing from the model's output ({keys}): {exc}"
        ) from None
