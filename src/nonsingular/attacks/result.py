"""What an attack returns: adversarial inputs, margins, success, and the weight perturbation of
every example, materializable and replayable on the unmodified model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..model.reader import eval_mode
from ..threat import Threat


@dataclass
class AttackResult:
    """What an attack found for each example of the batch.

    x_adv:          (B, ...) adversarial inputs, inside the input ball and the bounds.
    margins:        (B,) ``z_y - max_{j != y} z_j`` under the best perturbation found.
    clean_margins:  (B,) the same without perturbation.
    success:        (B,) bool, ``margins <= 0``: the example is broken.
    loss_trace:     pgd: the first run's mean attack loss at each iterate, start included
                    (up to steps + 1 values), over the rows it attacks (per-example scope: the
                    ones the clean pass gets right; with ``until_broken``, only those not yet
                    broken, and it ends when none are left); ``[0.]`` when it attacks nothing.
                    noise: the mean negative margin of each draw (``samples`` values; empty
                    when the threat perturbs nothing). A flat trace is suspicious.
    """

    x_adv: Tensor
    margins: Tensor
    clean_margins: Tensor
    success: Tensor
    threat: Threat
    method: str
    loss_trace: Tensor
    _deltas: Callable[[int], dict[str, Tensor]] = field(repr=False)
    # a shared attack's best point in its own variables: where a larger budget continues
    state: dict[Any, Tensor] | None = field(default=None, repr=False)

    @property
    def clean_accuracy(self) -> float:
        return float((self.clean_margins > 0).float().mean())

    @property
    def robust_accuracy(self) -> float:
        return float((~self.success).float().mean())

    def weight_deltas(self, i: int) -> dict[str, Tensor]:
        """``{parameter name: Delta}`` the attack used on example ``i`` (same for all if shared).

        Names are the model's ``named_parameters()`` names; a tied parameter appears once.
        """
        if not -len(self.margins) <= i < len(self.margins):
            raise IndexError(f"example index {i} out of range for a batch of {len(self.margins)}")
        return self._deltas(i % len(self.margins))

    def replay(self, model: nn.Module, i: int) -> Tensor:
        """Logits ``(1, classes)`` of the unmodified ``model`` at ``x_adv[i]`` with
        ``weight_deltas(i)`` added, through ``torch.func.functional_call``: the check that
        the perturbation found is real. The model runs as deployed (eval mode: no Dropout,
        BatchNorm's running statistics, which it does not update) and is left as it was."""
        params = {n: p.detach() for n, p in model.named_parameters()}
        for name, delta in self.weight_deltas(i).items():
            params[name] = params[name] + delta
        with torch.no_grad(), eval_mode(model):
            return functional_call(model, params, (self.x_adv[i : i + 1],))
