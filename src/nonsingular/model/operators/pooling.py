"""MaxPool as an operator (its relaxation in ``maxpool_bounds.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .base import Box, Operator, tiny_of
from .maxpool_bounds import maxpool_backward, maxpool_interval


@dataclass
class MaxPool(Operator):
    """``F.max_pool1d`` / ``F.max_pool2d`` (no indices returned)."""

    label: str
    dims: int
    options: dict[str, Any]

    def forward(self, h: Tensor) -> Tensor:
        pool = F.max_pool1d if self.dims == 1 else F.max_pool2d
        return pool(h, **self.options)

    def interval(self, h: Box) -> Box:
        return Box(*maxpool_interval(h.lower, h.upper, dims=self.dims, **self.options))

    def backward(self, lam: Tensor, h: Box) -> tuple[list[Tensor | None], Tensor]:
        lam_in, const = maxpool_backward(lam, h.lower, h.upper, dims=self.dims, **self.options)
        return [lam_in], const

    def needs_tightening(self, box: Box) -> Tensor | None:
        return box.upper > box.lower

    def rounding(self, unit: float, h: Box) -> float:
        """A max is exact, but an operand near zero may be flushed: ``tiny``."""
        return tiny_of(unit)
