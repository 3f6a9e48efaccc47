"""B3, joint CROWN: backward linear bounds with ReLU relaxations; each perturbed layer enters
as an additive output set whose size comes from intermediate bounds (IBP, tightened by CROWN
itself for the pre-activations of ReLUs)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers import Affine, ReLU
from ..network import Network
from ..weights import LayerBudget
from .ibp import interval_step, last_affine
from .linear import Bounds, backward
from .region import InputRegion

INTERMEDIATE = ("crown", "ibp")


def _interval_is_exact(net: Network, k: int) -> bool:
    """IBP is already exact for layer ``k``: one affine map of the input box, no ReLU before."""
    before = net.layers[: k + 1]
    mixing = sum(isinstance(layer, Affine) for layer in before)
    return not any(isinstance(layer, ReLU) for layer in before) and mixing <= 1


def _tighten(
    net: Network, budgets: dict[int, LayerBudget], region: InputRegion, bounds: Bounds, k: int
) -> tuple[Tensor, Tensor]:
    """CROWN bounds for the output of layer ``k``, intersected with its IBP bounds.

    Only neurons that IBP leaves unstable need tighter bounds (a stable ReLU is relaxed
    exactly), so each example gets one row of ``lam`` per unstable neuron of its own, padded
    to the largest count in the batch, for the lower bound and as many for the upper.
    """
    lower, upper = bounds[k]
    flat_lower, flat_upper = lower.flatten(1), upper.flatten(1)
    unstable = (flat_lower < 0) & (flat_upper > 0)
    m = int(unstable.sum(1).max()) if unstable.numel() else 0
    if m == 0:
        return lower, upper
    # each example's unstable neurons first, then padding rows (masked out below)
    order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
    valid = unstable.gather(1, order).to(lower.dtype)
    batch, size = flat_lower.shape
    lam = lower.new_zeros(batch, 2 * m, size)
    lam.scatter_(2, order[:, :, None], valid[:, :, None])
    lam[:, m:] = -lam[:, :m]
    bound = backward(net, budgets, region, bounds, lam.reshape(batch, 2 * m, *lower.shape[1:]), k)
    low = torch.where(valid > 0, bound[:, :m], float("-inf"))
    high = torch.where(valid > 0, -bound[:, m:], float("inf"))
    flat_lower = flat_lower.scatter_reduce(1, order, low, reduce="amax")
    flat_upper = flat_upper.scatter_reduce(1, order, high, reduce="amin")
    return flat_lower.reshape(lower.shape), flat_upper.reshape(upper.shape)


def crown_bounds(
    net: Network, budgets: dict[int, LayerBudget], region: InputRegion, intermediate: str
) -> Bounds:
    """Bounds on the output of every layer: IBP, tightened by CROWN before each ReLU."""
    bounds: Bounds = []
    lower, upper = region.lower, region.upper
    nonnegative = net.nonnegative_inputs(region.nonnegative)
    for k in range(len(net.layers)):
        lower, upper = interval_step(net, budgets, k, lower, upper, k in nonnegative)
        bounds.append((lower, upper))
        feeds_relu = k + 1 < len(net.layers) and isinstance(net.layers[k + 1], ReLU)
        if intermediate == "crown" and feeds_relu and not _interval_is_exact(net, k):
            lower, upper = bounds[k] = _tighten(net, budgets, region, bounds, k)
    return bounds


def crown_margins(
    net: Network,
    budgets: dict[int, LayerBudget],
    region: InputRegion,
    c: Tensor,
    intermediate: str = "crown",
) -> tuple[Tensor, Tensor]:
    """``(CROWN, IBP)`` lower bounds ``(B, K)`` of ``c . logits`` (IBP comes for free)."""
    bounds = crown_bounds(net, budgets, region, intermediate)
    crown = backward(net, budgets, region, bounds, c, len(net.layers) - 1)
    ibp = backward(net, budgets, region, bounds, c, len(net.layers) - 1, last_affine(net))
    return crown, ibp
