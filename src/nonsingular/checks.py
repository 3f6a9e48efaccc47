"""Validation rules shared by every entry point: one place says what a seed, a size or a rate
may be, and what the error says when it is not."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from .errors import ConfigError, NonsingularError

MAX_SEED = 2**31 - 1  # numpy, torch and the per-epoch seed arithmetic all take it
MAX_BATCH = 1 << 20  # examples per batch
MAX_WIDTH = 1 << 16  # units or channels of one layer (--hidden, a factory's widths)


def options(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """``data``'s keys as the field names of dataclass ``cls`` (``-`` read as ``_``, as in
    flags and TOML files); unknown keys are a ConfigError naming them and the known ones."""
    known = {f.name for f in fields(cls)}
    clean = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(clean) - known)
    if unknown:
        raise ConfigError(
            f"unknown {what} options: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return clean


def integer(
    name: str, value: object, low: int, high: int, error: type[NonsingularError] = ConfigError
) -> int:
    """``value`` as an int in ``[low, high]``, or ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def number(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    positive: bool = False,
    error: type[NonsingularError] = ConfigError,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``> low`` when ``positive``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (positive and value <= low):  # type: ignore[operator]
        side = f"> {low:g}" if positive else f">= {low:g}"
        raise error(f"{name} must be a finite number {side} and <= {high:g}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def choice(
    name: str, value: object, choices: Sequence[str], error: type[NonsingularError] = ConfigError
) -> str:
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)
