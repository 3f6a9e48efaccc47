"""Model builders and a JSON description of any supported ``nn.Sequential``.

``describe(model)`` turns a model into plain JSON (layer types and sizes, no weights) and
``build(spec)`` turns it back, so a checkpoint is safetensors for the weights plus this JSON,
and never a pickle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import CheckpointError, ConfigError, UnsupportedLayerError


def _check_shape(in_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in in_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"in_shape must be positive sizes like (1, 28, 28), got {in_shape!r}")
    return shape


def mlp(
    in_shape: Sequence[int] = (1, 28, 28),
    hidden: Sequence[int] = (256, 256),
    classes: int = 10,
    bias: bool = True,
) -> nn.Sequential:
    """``Flatten -> (Linear -> ReLU) * len(hidden) -> Linear``."""
    width = math.prod(_check_shape(in_shape))
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(width, int(h), bias=bias), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, classes, bias=bias))
    return nn.Sequential(*layers)


def cnn(
    in_shape: Sequence[int] = (1, 28, 28),
    channels: Sequence[int] = (16, 32),
    hidden: int = 100,
    classes: int = 10,
) -> nn.Sequential:
    """Two stride-2 ``Conv2d(k=4, p=1) -> ReLU``, flatten, two dense layers (the small CNN
    of the certified-training literature)."""
    c, h, w = _check_shape(in_shape)
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, int(out), kernel_size=4, stride=2, padding=1), nn.ReLU()]
        c, h, w = int(out), h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """JSON-able list of the model's layers (sizes and options, no weights)."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise UnsupportedLayerError(
            f"describe() supports flat nn.Sequential models only, got {type(model).__name__}"
        )
    for name, child in model.named_children():
        if _BUILDERS.get(type(child).__name__) is not type(child):
            raise UnsupportedLayerError(
                f"layer '{name}' ({type(child).__name__}) cannot be described as JSON; "
                f"describable: {', '.join(_BUILDERS)}"
            )
    spec: list[dict[str, Any]] = []
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            continue
        if isinstance(m, nn.Linear):
            d = {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bias": m.bias is not None,
            }
        elif isinstance(m, nn.Conv2d):
            d = {
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size),
                "stride": list(m.stride),
                "padding": list(m.padding),
                "dilation": list(m.dilation),
                "groups": m.groups,
                "bias": m.bias is not None,
            }
        elif isinstance(m, nn.Flatten):
            d = {"start_dim": m.start_dim, "end_dim": m.end_dim}
        elif isinstance(m, nn.AvgPool2d):
            d = {
                "kernel_size": m.kernel_size,
                "stride": m.stride,
                "padding": m.padding,
                "ceil_mode": m.ceil_mode,
                "count_include_pad": m.count_include_pad,
            }
        elif isinstance(m, nn.Dropout):
            d = {"p": m.p}
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            d = {
                "num_features": m.num_features,
                "eps": m.eps,
                "momentum": m.momentum,
                "affine": m.affine,
            }
        else:  # ReLU, Identity
            d = {}
        spec.append({"type": type(m).__name__, **d})
    if len(list(model.named_children())) != len(spec):
        raise UnsupportedLayerError("describe() supports flat nn.Sequential models only")
    return spec


_BUILDERS: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "ReLU": nn.ReLU,
    "Flatten": nn.Flatten,
    "AvgPool2d": nn.AvgPool2d,
    "Identity": nn.Identity,
    "Dropout": nn.Dropout,
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
}


def build(spec: list[dict[str, Any]]) -> nn.Sequential:
    """The ``nn.Sequential`` that ``describe`` described (freshly initialized)."""
    if not isinstance(spec, list) or not spec:
        raise CheckpointError(
            f"a model description must be a non-empty list of layers, got {type(spec).__name__}"
        )
    layers = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or entry.get("type") not in _BUILDERS:
            got = entry.get("type") if isinstance(entry, dict) else entry
            raise CheckpointError(
                f"layer {i} of the model description has unknown type {got!r}; "
                f"known: {', '.join(_BUILDERS)}"
            )
        kwargs = {k: v for k, v in entry.items() if k != "type"}
        try:
            layers.append(_BUILDERS[entry["type"]](**kwargs))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"layer {i} ({entry['type']}) of the model description is invalid: {exc}"
            ) from None
    return nn.Sequential(*layers)
