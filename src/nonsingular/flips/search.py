"""Progressive bit search (BFA, Rakin et al., ICCV 2019): the worst few bit flips, one at a time.

Each step takes the gradient ``g`` of the attack loss with respect to the weights at the current
flips; each candidate flip's first-order gain is ``g * delta`` (``delta``: the weight change the
flip makes, known in advance from the integer); the ``tries`` best candidates of each layer are
run exactly, and the one that lowers the batch's accuracy most (then raises the loss most) is
kept. Steps repeat until ``k`` flips, or
until the batch's accuracy reaches the target. ``scope="per-example"`` runs the same search on
each example alone, stopping once it is broken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attacks.pgd import attack_loss
from ..attacks.space import margins
from .grid import Flip
from .space import FlipSpace, FlipState


@dataclass
class Search:
    """One progressive bit search on a batch.

    flips:    the flips kept, in the order found (at most k).
    accuracy: ``(len(flips) + 1,)`` batch accuracy after 0, 1, ... of them (the search's own
              batched forwards).
    losses:   the same for the mean attack loss.
    """

    flips: list[Flip]
    accuracy: list[float]
    losses: list[float]

    def best_prefix(self) -> int:
        """How many of the flips to keep: the prefix with the lowest accuracy (the longest
        among equals; every prefix is within the budget)."""
        low = min(self.accuracy)
        return max(i for i, a in enumerate(self.accuracy) if a == low)


def _gradients(state: FlipState, x: Tensor, y: Tensor, loss: str) -> dict[str, Tensor]:
    """The gradient of the summed attack loss with respect to each flippable weight."""
    params = state.params()
    chosen = {n: params[n].clone().requires_grad_(True) for n in state.space.names}
    value = attack_loss(loss, state.space.logits(x, {**params, **chosen}), y).sum()
    grads = torch.autograd.grad(value, list(chosen.values()), allow_unused=True)
    return {
        n: torch.zeros_like(chosen[n]) if g is None else g.nan_to_num(0.0, 0.0, 0.0)
        for n, g in zip(chosen, grads, strict=True)
    }


def candidates(state: FlipState, x: Tensor, y: Tensor, loss: str, tries: int) -> list[Flip]:
    """The ``tries`` flips of each layer with the largest first-order gain ``g * delta``,
    never one already kept (flipping it again would undo it)."""
    grads = _gradients(state, x, y, loss)
    allowed = state.space.allowed
    found: list[Flip] = []
    for name in state.space.names:
        g = grads[name].flatten()
        gain = g[:, None] * state.deltas[name]
        for i, row in state.changed[name].items():
            gain[i] = g[i] * row
        for n, i, b in state.flips:
            if n == name:
                gain[i, int((allowed == b).nonzero()[0])] = float("-inf")
        best, column = gain.max(dim=1)  # each weight's best bit, then the best weights
        top = best.topk(min(tries, best.numel()))
        for value, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if value > float("-inf"):
                found.append((name, index, int(allowed[column[index]])))
    return found


def _score(
    state: FlipState, x: Tensor, y: Tensor, loss: str, extra: Flip | None = None
) -> tuple[float, float]:
    """Accuracy and mean attack loss under the kept flips (and ``extra``)."""
    with torch.no_grad():
        logits = state.space.logits(x, state.params(extra))
    m = margins(logits, y)
    return float((m > 0).float().mean()), float(attack_loss(loss, logits, y).mean())


def progressive_search(
    space: FlipSpace,
    x: Tensor,
    y: Tensor,
    k: int,
    *,
    target: float = 0.0,
    loss: str = "ce",
    tries: int = 1,
) -> Search:
    """Up to ``k`` flips, each the best of the gradient's ``tries`` candidates per layer;
    stops early once the batch accuracy is at most ``target``."""
    state = FlipState(space)
    flips = state.flips
    accuracy, value = _score(state, x, y, loss)
    search = Search(flips, [accuracy], [value])
    while len(flips) < k and accuracy > target:
        best = None
        for flip in candidates(state, x, y, loss, tries):
            acc, val = _score(state, x, y, loss, flip)
            if best is None or (-acc, val) > (-best[1], best[2]):
                best = (flip, acc, val)
        if best is None:
            break
        state.apply(best[0])
        accuracy = best[1]
        search.accuracy.append(best[1])
        search.losses.append(best[2])
    return search
