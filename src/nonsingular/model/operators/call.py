"""Operations without bounds, run as they are: attacks go through them, certificates refuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from .base import Operator
from .recurrent import unrolled, unrolling

# the keyword under which a module call's node carries the module's parameters, as ``Param``s
# of the graph: they are read from the graph's tensors like any other operand, so that a
# weight threat can move them (``model/weights.py``)
PARAMETERS = "__parameters__"


@dataclass
class Call(Operator):
    """Any other function or tensor method (``torch.sin``, ``x.size``, ``softmax``, ...)."""

    fn: Callable[..., Any]
    label: str

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


@dataclass
class ModuleCall(Operator):
    """A torch.nn module nonsingular has no operator for, called as it is (in eval mode), with
    the parameters the graph gives it (``PARAMETERS``: its own names -> tensors) in place of its
    own, through ``torch.func.functional_call`` (its buffers stay its own); an RNN inside
    ``recurrent.unrolled_recurrent()`` (attacks' vmap) runs unrolled over time."""

    module: nn.Module
    label: str

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        parameters: dict[str, Tensor] | None = kwargs.pop(PARAMETERS, None)
        if not parameters:
            return self.module(*args, **kwargs)
        if unrolling(self.module):  # an RNN under vmap: its fused kernel has no batching rule
            return unrolled(self.module, parameters, args, kwargs)  # type: ignore[arg-type]
        return functional_call(self.module, parameters, args, kwargs)
