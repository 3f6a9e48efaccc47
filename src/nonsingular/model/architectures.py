"""Architectures: the built-in ones (``mlp``, ``cnn``, ``resnet``) and user ones, both named
by a factory: a built-in name or an importable ``package.module:function`` with JSON keyword
arguments (``Architecture``). Checkpoints record an ``Architecture``; a user factory is imported
only when the user names it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from .factory_arguments import check_arguments

MAX_SIZE = 1 << 24  # one dimension of an input (pixels, channels, features)


def _check_shape(in_shape: Sequence[int]) -> tuple[int, ...]:
    sizes = () if isinstance(in_shape, (str, bytes)) else tuple(in_shape)
    if not sizes or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and 1 <= s <= MAX_SIZE
        for s in sizes
    ):
        raise ConfigError(
            f"in_shape must be sizes from 1 to {MAX_SIZE} like (1, 28, 28), got {in_shape!r}"
        )
    return tuple(int(s) for s in sizes)


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


class ResidualBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + skip(x))``; the skip is a strided 1x1 convolution
    when the shape changes (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    """A small ResNet: a strided stem, one residual block per width (each after the first
    halving the resolution), global average pooling, a linear head."""

    def __init__(self, in_shape: Sequence[int], channels: Sequence[int], classes: int) -> None:
        super().__init__()
        c = _check_shape(in_shape)[0]
        widths = [int(w) for w in channels]
        if not widths or any(w < 1 for w in widths):
            raise ConfigError(f"channels must be positive widths like (8, 16), got {channels!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(c, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        blocks = [ResidualBlock(widths[0], widths[0])]
        blocks += [ResidualBlock(a, b, stride=2) for a, b in zip(widths, widths[1:], strict=False)]
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], int(classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def resnet(
    in_shape: Sequence[int] = (1, 28, 28), channels: Sequence[int] = (16, 32), classes: int = 10
) -> ResNet:
    """The small residual network of ``--model resnet`` (see ``ResNet``)."""
    return ResNet(in_shape, channels, classes)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet}
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def check_factory_name(name: object) -> str:
    """A built-in architecture name or a ``package.module:function`` reference."""
    if not isinstance(name, str) or (name not in BUILTIN and not _REFERENCE.match(name)):
        raise ConfigError(
            f"model must be one of {', '.join(BUILTIN)} or an importable factory like "
            f"mypackage.models:resnet, got {name!r}"
        )
    return name


def import_factory(name: str) -> Callable[..., nn.Module]:
    """The callable a built-in name or a ``package.module:function`` reference names."""
    check_factory_name(name)
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, attribute = name.split(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name} for model {name}: {exc}") from None
    except Exception as exc:  # the factory's own module failing: its message, one line
        raise ConfigError(
            f"model {name}: importing {module_name} raised {type(exc).__name__}: {_line(exc)}"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{module_name} has no attribute {attribute} (model {name})")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"model {name} is not callable (a class or a function that builds one)")
    return target  # type: ignore[no-any-return]


def _check_args(args: object) -> dict[str, Any]:
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ConfigError(f"model arguments must be a mapping of names to values, got {args!r}")
    try:
        json.dumps(args)
    except (TypeError, ValueError):
        raise ConfigError(f"model arguments must be plain JSON values, got {args!r}") from None
    return dict(args)


@dataclass(frozen=True)
class Architecture:
    """How to build a model: ``factory`` (a built-in name or ``package.module:function``),
    its keyword ``args``, and the data's ``in_shape`` and ``classes``, passed to the factory
    when it takes parameters of those names and ``args`` does not set them."""

    factory: str
    args: dict[str, Any] = field(default_factory=dict)
    in_shape: tuple[int, ...] = (1, 28, 28)
    classes: int = 10

    def __post_init__(self) -> None:
        check_factory_name(self.factory)
        object.__setattr__(self, "args", _check_args(self.args))
        object.__setattr__(self, "in_shape", _check_shape(self.in_shape))
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 1:
            raise ConfigError(f"classes must be a positive integer, got {self.classes!r}")

    @property
    def builtin(self) -> bool:
        return self.factory in BUILTIN

    def build(self) -> nn.Module:
        """A freshly initialized model (imports a user factory: call only for one the user
        named)."""
        factory = import_factory(self.factory)
        kwargs = dict(self.args)
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepted = {}
        for name, value in (("in_shape", list(self.in_shape)), ("classes", self.classes)):
            if name in accepted and name not in kwargs:
                kwargs[name] = value
        check_arguments(self.factory, factory, kwargs)
        try:
            model = factory(**kwargs)
        except Exception as exc:  # the factory's own error: its message, one line
            raise ConfigError(
                f"model {self.factory}({_call(kwargs)}) failed: {type(exc).__name__}: {_line(exc)}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model {self.factory} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "factory": self.factory,
            "args": dict(self.args),
            "in_shape": list(self.in_shape),
            "classes": self.classes,
        }

    @classmethod
    def from_dict(cls, data: object) -> Architecture:
        if not isinstance(data, dict) or not isinstance(data.get("factory"), str):
            raise CheckpointError(f"not a model architecture: {data!r}"[:200])
        try:
            return cls(
                data["factory"],
                data.get("args", {}),
                tuple(data.get("in_shape", ())),
                data.get("classes", 0),
            )
        except (ConfigError, TypeError) as exc:
            raise CheckpointError(f"invalid model architecture: {exc}") from None


def _line(exc: BaseException) -> str:
    """An exception's first line (the traceback: NONSINGULAR_DEBUG=1, see the CLI)."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _call(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
