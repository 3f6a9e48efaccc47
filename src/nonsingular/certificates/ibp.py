"""B2, joint interval bound propagation: boxes through every layer, each perturbed layer's box
widened by the lemma's output set; the last layer folded into the margin matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers import Affine
from ..network import Network
from ..weights import LayerBudget
from .linear import Bounds, backward, input_bounds, magnitude, margin_matrix
from .region import InputRegion


def interval_step(
    net: Network,
    budgets: dict[int, LayerBudget],
    k: int,
    lower: Tensor,
    upper: Tensor,
    nonnegative: bool = False,
) -> tuple[Tensor, Tensor]:
    """Bounds on the output of layer ``k`` from bounds on its input (``nonnegative``: the
    input is known to be >= 0, so its magnitude is ``upper``)."""
    if k not in budgets:
        return net.layers[k].interval(lower, upper)
    size = upper if nonnegative else magnitude(lower, upper)
    radius = budgets[k].output_set(size).radius()
    return net.layers[k].interval(lower, upper, extra=radius)  # type: ignore[call-arg]


def interval_bounds(
    net: Network, budgets: dict[int, LayerBudget], region: InputRegion, stop: int | None = None
) -> Bounds:
    """Bounds on the output of every layer before ``stop`` (default: all)."""
    bounds: Bounds = []
    lower, upper = region.lower, region.upper
    nonnegative = net.nonnegative_inputs(region.nonnegative)
    for k in range(len(net.layers) if stop is None else stop):
        lower, upper = interval_step(net, budgets, k, lower, upper, k in nonnegative)
        bounds.append((lower, upper))
    return bounds


def last_affine(net: Network) -> int:
    return max(k for k, layer in enumerate(net.layers) if isinstance(layer, Affine))


def ibp_margins(
    net: Network, budgets: dict[int, LayerBudget], region: InputRegion, y: Tensor, classes: int
) -> Tensor:
    """Lower bounds ``(B, classes)`` of the margins ``z_y - z_j`` by IBP, in margin form
    (the last layer is folded into the class differences, never bounded logit by logit)."""
    last = last_affine(net)
    bounds = interval_bounds(net, budgets, region, stop=len(net.layers) - 1)
    c = margin_matrix(y, classes, region.x.dtype)
    layer = net.layers[last]
    generic = (
        last != len(net.layers) - 1  # layers after the last affine one
        or layer.is_conv
        or (last == 0 and region.l2_radius is not None)  # the input ball, not only its box
        or classes**2 * layer.weight.shape[1] > 1 << 22
    )
    if generic:
        return backward(net, budgets, region, bounds, c, len(net.layers) - 1, last)
    # the same bound as ``backward``, without (B, classes, n) tensors: with m, r the centre and
    # radius of the last layer's input box, lower_j = (W m)_y - (W m)_j - |w_y - w_j| . r
    lower, upper = input_bounds(region, bounds, last)
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    z = layer.forward(centre)
    pairs = (layer.weight[:, None, :] - layer.weight[None, :, :]).abs()  # (K, K, n)
    spread = (radius @ pairs.reshape(classes * classes, -1).T).reshape(-1, classes, classes)
    bound = z.gather(1, y[:, None]) - z - spread[torch.arange(len(y)), y]
    if last in budgets:
        bound = bound - budgets[last].output_set(magnitude(lower, upper)).support(c)
    return bound
