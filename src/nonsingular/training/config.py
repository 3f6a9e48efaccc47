"""Training configuration: one frozen dataclass whose field names equal the CLI flags."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import ConfigError

METHODS = ("standard",)
ARCHITECTURES = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the data set and the seed)."""

    data: str = "mnist5k"
    model: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)
    method: str = "standard"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    augment: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("model", self.model, ARCHITECTURES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("epochs", "batch_size"):
            _integer(name, getattr(self, name), low=1)
        _integer("augment", self.augment, low=0)
        _integer("seed", self.seed, low=0)
        for name in ("lr", "weight_decay"):
            _number(name, getattr(self, name), positive=name == "lr")
        hidden = tuple(self.hidden)
        for h in hidden:
            _integer("hidden", h, low=1)
        object.__setattr__(self, "hidden", hidden)

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown training options: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _integer(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _number(name: str, value: object, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):  # type: ignore[operator]
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
