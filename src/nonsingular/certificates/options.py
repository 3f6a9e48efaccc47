"""How a certificate is computed: ``CertifyOptions``, the one home of the certificates'
defaults (the methods, bab's time limit), taken by ``certify``, ``evaluate``, the command
line and the experiment."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..checks import MAX_BATCH, choice, integer, number, options
from ..errors import ConfigError
from .crown import INTERMEDIATE
from .rounding import check_bound_dtype

BOUNDS = ("closed-form", "recursive", "ibp", "crown", "alpha-crown")  # one bound pass each
METHODS = (*BOUNDS, "bab")
BAB_SECONDS = 5.0  # bab's default time limit per example


@dataclass(frozen=True)
class CertifyOptions:
    """Options of ``certify`` (every field is checked when the options are made).

    intermediate: how ``crown`` bounds the inputs of relaxed operators (``crown`` or ``ibp``).
    batch_size:   examples per chunk (None: sized for ~250 MB of bound matrices).
    dtype:        precision of the bound computation (float32 is faster; its rounding is
                  accounted for like the model's).
    time_limit:   seconds per example. ``bab``: each example's own, after which it answers
                  unknown (None: ``BAB_SECONDS``). The bound methods, which bound examples
                  in chunks: the run's budget is ``time_limit`` times the examples; no chunk
                  starts once it is spent, and the examples not reached are not certified
                  (``CertifyResult.finished``; None: no limit).
    memory_limit: bytes one run may plan to take (None: 80% of what the device has free);
                  chunks are sized to fit, and a run whose one example would not fit is a
                  ``MemoryLimitError`` before it starts (``resources.py``).
    """

    intermediate: str = "crown"
    batch_size: int | None = None
    dtype: torch.dtype = torch.float64
    time_limit: float | None = None
    memory_limit: int | None = None

    def __post_init__(self) -> None:
        choice("intermediate", self.intermediate, INTERMEDIATE)
        if self.batch_size is not None:
            integer("batch_size", self.batch_size, 1, MAX_BATCH)
        if self.time_limit is not None:
            number("time_limit", self.time_limit, 0.0, 1e9)
        if self.memory_limit is not None:
            integer("memory_limit", self.memory_limit, 1, 1 << 50)
        check_bound_dtype(self.dtype)

    @property
    def bab_seconds(self) -> float:
        """``bab``'s time per example."""
        return BAB_SECONDS if self.time_limit is None else self.time_limit

    @classmethod
    def of(cls, base: CertifyOptions | None = None, **overrides: Any) -> CertifyOptions:
        """``base`` (default: the defaults) with ``overrides``, whose names are checked."""
        if base is not None and not isinstance(base, CertifyOptions):
            raise ConfigError(
                f"certificate options must be CertifyOptions, got {type(base).__name__}"
            )
        return replace(base or cls(), **options(cls, overrides, "certificate"))


def check_method(method: object) -> str:
    """``method`` if it names a certificate method."""
    if method not in METHODS:
        raise ConfigError(
            f"unknown certificate method {method!r}; choose from {', '.join(METHODS)}"
        )
    return str(method)
