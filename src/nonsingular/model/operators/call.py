"""Operations without bounds, run as they are: attacks go through them, certificates refuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import Operator


@dataclass
class Call(Operator):
    """Any other function or tensor method (``torch.sin``, ``x.size``, ``softmax``, ...)."""

    fn: Callable[..., Any]
    label: str

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


@dataclass
class ModuleCall(Operator):
    """A torch.nn module nonsingular has no operator for, called as it is (in eval mode)."""

    module: nn.Module
    label: str

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
