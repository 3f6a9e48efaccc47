"""What an attack returns: adversarial inputs, margins, success, and the weight perturbation of
every example, materializable and replayable on the unmodified model."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import InputError
from ..model.reader import eval_mode
from ..threat import Threat


class ExampleIndexError(InputError, IndexError):
    """An example index outside the attacked batch (an InputError, and an IndexError)."""


@dataclass
class AttackResult:
    """What an attack found for each example of the batch.

    x_adv:          (B, ...) adversarial inputs, inside the input ball and the bounds.
    margins:        (B,) ``z_y - max_{j != y} z_j`` under the best perturbation found.
    clean_margins:  (B,) the same without perturbation.
    success:        (B,) bool, ``margins <= 0``: the example is broken.
    loss_trace:     pgd, apgd, strong: the first run's mean attack loss at each iterate, start
                    included (up to steps + 1 values), over the rows it attacks (per-example
                    scope: the ones the clean pass gets right; with ``until_broken``, only those
                    not yet broken, and it ends when none are left); ``[0.]`` when it attacks
                    nothing. noise: the mean negative margin of each draw (``samples`` values; empty
                    when the threat perturbs nothing). A flat trace is suspicious.
    untouched:      every parameter of the model the weight threat leaves as it is, with why
                    (not a linear map's, a bias without ``bias=True``, left out by ``layers``);
                    empty when the threat has no weight budget.
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
    untouched: dict[str, str] = field(default_factory=dict)

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
        n = len(self.margins)
        try:
            index = operator.index(i)  # an int, a numpy integer, a one-element integer tensor
        except (TypeError, RuntimeError, ValueError):
            index = None
        if isinstance(i, bool) or index is None or not -n <= index < n:
            raise ExampleIndexError(f"example index must be an integer in [-{n}, {n}), got {i!r}")
        return self._deltas(index % n)

    def replay(self, model: nn.Module, i: int) -> Tensor:
        """Logits ``(1, classes)`` of the unmodified ``model`` at ``x_adv[i]`` with
        ``weight_deltas(i)`` added, through ``torch.func.functional_call``: the check that
        the perturbation found is real. The model runs as deployed (eval mode: no Dropout,
        BatchNorm's running statistics, which it does not update) and is left as it was."""
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = {n: p.detach() for n, p in model.named_parameters()}
        for name, delta in self.weight_deltas(i).items():
            if name not in params or params[name].shape != delta.shape:
                got = tuple(params[name].shape) if name in params else "no such parameter"
                raise InputError(
                    f"replay: the attack perturbed {name} of shape {tuple(delta.shape)}, this "
                    f"model has {got}: replay on the model that was attacked"
                )
            params[name] = params[name] + delta
        row = operator.index(i) % len(self.margins)
        with torch.no_grad(), eval_mode(model):
            return functional_call(model, params, (self.x_adv[row : row + 1],))
