"""Per-example outcomes, in one encoding: what paired comparisons of two models need."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError


@dataclass(frozen=True)
class Outcomes:
    """Examples one by one, in data-set order: True where the example is right, survives the
    attack, or is certified. Written to JSON as one ``0`` or ``1`` per example (``bits``):
    compact, and readable by eye."""

    bits: str

    def __post_init__(self) -> None:
        if not isinstance(self.bits, str) or set(self.bits) - {"0", "1"}:
            raise InputError("per-example outcomes must be a string of 0 and 1")

    @classmethod
    def of(cls, values: Tensor | Iterable[bool]) -> Outcomes:
        """From a boolean (or 0/1) tensor or any iterable of truth values."""
        items = values.tolist() if isinstance(values, Tensor) else list(values)
        return cls("".join("1" if v else "0" for v in items))

    def __len__(self) -> int:
        return len(self.bits)

    def __getitem__(self, i: int) -> bool:
        return self.bits[i] == "1"

    def __str__(self) -> str:
        return self.bits

    @property
    def count(self) -> int:
        """How many examples are True."""
        return self.bits.count("1")

    @property
    def rate(self) -> float:
        """The share of examples that are True (0 for no examples)."""
        return self.count / len(self.bits) if self.bits else 0.0

    def to_list(self) -> list[bool]:
        return [c == "1" for c in self.bits]

    def tensor(self) -> Tensor:
        return torch.tensor(self.to_list(), dtype=torch.bool)

    def first(self, n: int) -> Outcomes:
        """The first ``n`` examples."""
        return Outcomes(self.bits[:n])

    def both(self, other: Outcomes) -> Outcomes:
        """True where both are (an example survives two attacks only if it survives each)."""
        if len(other) != len(self):
            raise InputError(f"outcomes of {len(self)} and {len(other)} examples cannot be paired")
        pairs = zip(self.bits, other.bits, strict=True)
        return Outcomes("".join("1" if a == b == "1" else "0" for a, b in pairs))
