"""What a flip attack returns: the usual ``AttackResult`` plus every flip set, replayable."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..attacks.result import AttackResult
from ..model.reader import eval_mode
from .grid import Flip, flipped_weights, quantized


@dataclass
class FlipAttackResult(AttackResult):
    """An ``AttackResult`` whose weight perturbation is a set of bit flips.

    flip_sets:     one list of flips per example (the same list object for every example
                   under a shared flip set).
    accuracy_trace: shared search: batch accuracy after 0, 1, ... flips (the search's own
                   batched forwards); random faults: the accuracy of each draw.
    margins are each example's margin run alone through ``replay`` (batches of one), so that
    ``replay`` reproduces them exactly.
    """

    flip_sets: list[list[Flip]] = field(default_factory=list)
    accuracy_trace: Tensor = field(default_factory=lambda: torch.zeros(0))

    def bit_flips(self, i: int) -> list[Flip]:
        """``[(parameter name, flat index, bit)]`` flipped for example ``i``."""
        if not -len(self.margins) <= i < len(self.margins):
            raise IndexError(f"example index {i} out of range for a batch of {len(self.margins)}")
        return list(self.flip_sets[i % len(self.margins)])

    def replay(self, model: nn.Module, i: int) -> Tensor:
        """Logits ``(1, classes)`` of the unmodified quantized ``model`` at ``x_adv[i]`` with
        the integers of ``bit_flips(i)`` flipped (weights rebuilt as ``q * scale``), through
        ``functional_call`` in eval mode; the model is left as it was."""
        grid = quantized(model)
        flips = self.bit_flips(i)
        params = {n: p.detach() for n, p in model.named_parameters()}
        if flips:
            params.update(flipped_weights(grid, grid.integers(model), flips))
        with torch.no_grad(), eval_mode(model):
            return functional_call(model, params, (self.x_adv[i : i + 1],))
