"""Progressive bit search (BFA, Rakin et al., ICCV 2019): the worst few bit flips, one at a time.

Each step takes the gradient ``g`` of the attack loss with respect to the weights at the current
flips; each candidate flip's first-order gain is ``g * delta`` (``delta``: the weight change the
flip makes, known in advance from the integer); the ``tries`` best candidates of each layer are
run exactly, and the one that raises the loss most is kept. Steps repeat until ``k`` flips, or
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
from .space import FlipSpace


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


def _gradients(
    space: FlipSpace, x: Tensor, y: Tensor, flips: list[Flip], loss: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The weights at ``flips`` and the gradient of the summed loss with respect to each."""
    params = space.weights(flips)
    chosen = {n: params[n].clone().requires_grad_(True) for n in space.names}
    value = attack_loss(loss, space.logits(x, {**params, **chosen}), y).sum()
    grads = torch.autograd.grad(value, list(chosen.values()), allow_unused=True)
    found = {
        n: torch.zeros_like(chosen[n]) if g is None else g.nan_to_num(0.0, 0.0, 0.0)
        for n, g in zip(chosen, grads, strict=True)
    }
    return {n: params[n] for n in space.names}, found


def candidates(
    space: FlipSpace, x: Tensor, y: Tensor, flips: list[Flip], loss: str, tries: int
) -> list[Flip]:
    """The ``tries`` flips of each layer with the largest first-order gain ``g * delta``,
    never one already in ``flips`` (flipping it again would undo it)."""
    weights, grads = _gradients(space, x, y, flips, loss)
    ints = space.current(flips)
    found: list[Flip] = []
    for name in space.names:
        delta = space.deltas(name, ints[name], weights[name])
        gain = grads[name].flatten()[:, None] * delta
        for n, i, b in flips:
            if n == name and bool((space.allowed == b).any()):
                gain[i, int((space.allowed == b).nonzero()[0])] = float("-inf")
        top = gain.flatten().topk(min(tries, gain.numel())).indices
        for t in top.tolist():
            index, column = divmod(t, len(space.allowed))
            if gain[index, column] > float("-inf"):
                found.append((name, index, int(space.allowed[column])))
    return found


def _score(space: FlipSpace, x: Tensor, y: Tensor, flips: list[Flip], loss: str) -> tuple:
    with torch.no_grad():
        logits = space.logits(x, space.weights(flips))
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
    flips: list[Flip] = []
    accuracy, value = _score(space, x, y, flips, loss)
    search = Search(flips, [accuracy], [value])
    while len(flips) < k and accuracy > target:
        best = None
        for flip in candidates(space, x, y, flips, loss, tries):
            acc, val = _score(space, x, y, [*flips, flip], loss)
            if best is None or (-acc, val) > (-best[1], best[2]):
                best = (flip, acc, val)
        if best is None:
            break
        flips.append(best[0])
        accuracy = best[1]
        search.accuracy.append(best[1])
        search.losses.append(best[2])
    return search
