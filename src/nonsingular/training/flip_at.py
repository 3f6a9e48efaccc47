"""``flip-at``: training against bit flips of the model's quantized weights (docs/training.md).

After adversarial bit error training (Stutz et al., "Random and adversarial bit error
robustness", TPAMI 2022), in the form of Rakin et al.'s bit search: every batch, each Linear/Conv
weight is put on the grid ``ns.quantize`` would give it (8 bits, symmetric per output channel),
the loss gradient there ranks every possible flip of every integer by its first-order gain
``g * delta`` (each weight's best bit, then the ``k`` best over all layers, as the progressive
bit search ranks its candidates), those ``k`` flips are made, and the cross-entropy at the
flipped weights trains the float weights through the grid with a straight-through gradient
(quantizing taken as the identity), so the model learns to withstand the flips an attacker
would pick on the model it will be deployed as.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import UnsupportedModelError
from ..flips.grid import bit_changes, dequantize, highest, lowest, quantizable, symmetric_scale
from ..model.reader import eval_mode
from .methods import Batch, Method

BITS = 8  # the grid trained on: ns.quantize's default (8 bits, per output channel)


def on_grid(weight: Tensor, bits: int = BITS) -> tuple[Tensor, Tensor, Tensor]:
    """``(w, q, scale)``: ``weight`` on its symmetric per-channel grid, ``w = q * scale`` in
    value with the gradient of ``weight`` (straight-through), ``q`` the integers (int64)."""
    scale = symmetric_scale(weight, bits, "channel")
    q = torch.round(weight.detach() / scale).clamp(lowest(bits), highest(bits))
    grid = dequantize(q, scale)
    return weight + (grid - weight).detach(), q.long(), scale


def worst_flips(
    model: nn.Module,
    grids: dict[str, tuple[Tensor, Tensor, Tensor]],
    x: Tensor,
    y: Tensor,
    k: int,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{weight name: the flips' change of that weight}`` (detached, zero where nothing
    flips): the ``k`` flips, one bit of ``k`` distinct integers, of largest first-order gain of
    the cross-entropy at the grid weights ``grids`` (``on_grid``'s), ranked in eval mode
    (BatchNorm's statistics unmoved). ``reduce`` sums the gradient over the processes that
    hold parts of the batch, so that every one picks the same flips."""
    names = list(grids)
    leaves = {n: grids[n][0].detach().clone().requires_grad_(True) for n in names}
    with eval_mode(model):
        logits = functional_call(model, leaves, (x,))
    grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), list(leaves.values()))
    flat = torch.cat([g.flatten() for g in grads]).nan_to_num(0.0, 0.0, 0.0)
    if reduce is not None:
        flat = reduce(flat)
    gains, changes = [], []
    for name, g in zip(names, flat.split([leaves[n].numel() for n in names]), strict=True):
        w, q, scale = grids[name]
        q = q.flatten()
        flipped = dequantize(
            q[:, None] + bit_changes(q, BITS), scale.expand_as(w).flatten()[:, None]
        )
        delta = flipped - w.detach().flatten()[:, None]
        best, column = (g[:, None] * delta).max(dim=1)  # each integer's best bit
        gains.append(best)
        changes.append(delta.gather(1, column[:, None])[:, 0])
    gain, change = torch.cat(gains), torch.cat(changes)
    chosen = torch.zeros_like(change)
    top = gain.topk(min(k, gain.numel())).indices
    chosen[top] = change[top]
    parts = chosen.split([leaves[n].numel() for n in names])
    return {n: part.view_as(leaves[n]) for n, part in zip(names, parts, strict=True)}


class FlipAdversarial(Method):
    """``flip-at``: cross-entropy at the 8-bit per-channel grid weights with the ``k`` worst
    bit flips (``worst_flips``) made, ``k = attack_steps`` ramped up over the first ``ramp`` of
    training; the gradient reaches the float weights straight through the grid."""

    def prepare(self, model: nn.Module, x: Tensor) -> None:
        if not quantizable(model):
            raise UnsupportedModelError(
                "flip-at trains against bit flips of quantized Linear/Conv weights; the model "
                "has no Linear or Conv layer"
            )

    def flips(self, progress: float) -> int:
        """The number of flips trained against at ``progress``."""
        return round(self.config.attack_steps * self.scale(progress))

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, progress: float, batch: Batch
    ) -> tuple[Tensor, Tensor]:
        params = dict(model.named_parameters())
        grids = {n: on_grid(params[n]) for n in quantizable(model)}
        weights = {n: grid[0] for n, grid in grids.items()}
        k = self.flips(progress)
        if k > 0:
            changes = worst_flips(model, grids, x, y, k, batch.reduce)
            weights = {n: w + changes[n] for n, w in weights.items()}
        logits = functional_call(model, weights, (x,))  # training mode, the live parameters
        return F.cross_entropy(logits, y), logits
