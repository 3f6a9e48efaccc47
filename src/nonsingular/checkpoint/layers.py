"""Flat ``nn.Sequential`` models described layer by layer as JSON (``describe``) and built
back (``build``), for checkpoints of models that no factory names.

The layers that can be described are the reader's own (``model.catalog.MODULES``: one list of
supported layers for reading and for checkpoints). A layer is described by its constructor's
arguments read back from the module; every description is checked by building it again and
comparing, so a layer whose state the constructor does not capture is refused, never saved
wrong.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import nn

from ..errors import CheckpointError, UnsupportedLayerError
from ..model.catalog import MODULES

LAYERS: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in MODULES}
_SKIPPED = {"self", "device", "dtype"}


def _json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    return value


def _arguments(module: nn.Module) -> dict[str, Any]:
    """``module``'s constructor arguments, read back from its attributes."""
    out: dict[str, Any] = {}
    for name, p in inspect.signature(type(module).__init__).parameters.items():
        if name in _SKIPPED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == "bias" and not isinstance(getattr(module, "bias", None), bool):
            out[name] = module.bias is not None  # Linear/Conv/LayerNorm: a tensor or None
        elif hasattr(module, name):
            out[name] = _json(getattr(module, name))
        elif p.default is p.empty:
            raise UnsupportedLayerError(
                f"{type(module).__name__} cannot be described as JSON: its argument {name!r} "
                "is not an attribute of the module"
            )
    return out


def _describe_layer(name: str, module: nn.Module) -> dict[str, Any]:
    kind = type(module).__name__
    if LAYERS.get(kind) is not type(module):
        raise UnsupportedLayerError(
            f"layer '{name}' ({kind}) cannot be described as JSON; describable: {', '.join(LAYERS)}"
        )
    entry = {"type": kind, **_arguments(module)}
    rebuilt = _build_layer(0, entry, UnsupportedLayerError)
    if _arguments(rebuilt) != _arguments(module) or _shapes(rebuilt) != _shapes(module):
        raise UnsupportedLayerError(
            f"layer '{name}' ({kind}) is not rebuilt the same from its constructor's arguments"
        )
    return entry


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def entry_arguments(entry: dict[str, Any]) -> dict[str, Any]:
    """A description's constructor arguments, JSON lists read back as the tuples torch keeps."""
    return {k: _tuples(v) for k, v in entry.items() if k != "type"}


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """JSON-able list of the model's layers (sizes and options, no weights)."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise UnsupportedLayerError(
            f"describe() supports flat nn.Sequential models only, got {type(model).__name__}"
        )
    return [_describe_layer(name, child) for name, child in model.named_children()]


def _check_layer(index: int, kind: str, kwargs: dict[str, Any]) -> None:
    """A described layer's options: never where it lives (loading puts the model on the
    caller's device, in the weights' dtype), and finite numbers."""
    for key, value in kwargs.items():
        if key in ("device", "dtype"):
            raise CheckpointError(
                f"layer {index} ({kind}) of the model description sets {key}={value!r}: a "
                f"description never chooses the {key} (load(..., device=...) does)"
            )
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise CheckpointError(
                f"layer {index} ({kind}) of the model description: {key} must be finite, "
                f"got {value!r}"
            )


def _build_layer(i: int, entry: object, error: type[Exception]) -> nn.Module:
    if not isinstance(entry, dict) or entry.get("type") not in LAYERS:
        got = entry.get("type") if isinstance(entry, dict) else entry
        raise error(
            f"layer {i} of the model description has unknown type {got!r}; "
            f"known: {', '.join(LAYERS)}"
        )
    _check_layer(i, entry["type"], {k: v for k, v in entry.items() if k != "type"})
    try:
        return LAYERS[entry["type"]](**entry_arguments(entry))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise error(
            f"layer {i} ({entry['type']}) of the model description is invalid: {exc}"
        ) from None


def build(spec: list[dict[str, Any]]) -> nn.Sequential:
    """The ``nn.Sequential`` that ``describe`` described (freshly initialized)."""
    if not isinstance(spec, list) or not spec:
        raise CheckpointError(
            f"a model description must be a non-empty list of layers, got {type(spec).__name__}"
        )
    return nn.Sequential(*(_build_layer(i, e, CheckpointError) for i, e in enumerate(spec)))
