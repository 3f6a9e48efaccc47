"""Backward linear bound propagation with weight perturbations as additive output sets.

``backward`` runs ``lam`` from the output of layer ``start`` down to the input of layer
``stop``: every layer contributes its own linear bound (``layers.py``), and every perturbed
layer subtracts the support of its output-change set (``weights.py``, the lemma), whose size
comes from the bounds on that layer's input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..network import Network
from ..weights import LayerBudget
from .region import InputRegion, box_minimum

Bounds = list[tuple[Tensor, Tensor]]


def input_bounds(region: InputRegion, bounds: Bounds, k: int) -> tuple[Tensor, Tensor]:
    """Elementwise bounds on the input of layer ``k``."""
    return (region.lower, region.upper) if k == 0 else bounds[k - 1]


def magnitude(lower: Tensor, upper: Tensor) -> Tensor:
    """``max |h|`` over ``[lower, upper]``: what weight perturbations are scaled by."""
    return lower.abs().maximum(upper.abs())


def backward(
    net: Network,
    budgets: dict[int, LayerBudget],
    region: InputRegion,
    bounds: Bounds,
    lam: Tensor,
    start: int,
    stop: int = 0,
) -> Tensor:
    """A lower bound ``(B, K)`` of ``lam . output(start)`` over the joint threat.

    Layers ``start`` down to ``stop`` are relaxed linearly; the input of ``stop`` is then
    concretized over its box (or over the input region when ``stop == 0``).
    """
    const = lam.new_zeros(lam.shape[:2])
    for k in range(start, stop - 1, -1):
        lower, upper = input_bounds(region, bounds, k)
        if k in budgets:
            const = const - budgets[k].output_set(magnitude(lower, upper)).support(lam)
        lam, c = net.layers[k].backward(lam, lower, upper)
        const = const + c
    if stop == 0:
        return const + region.minimum(lam)
    return const + box_minimum(lam, *bounds[stop - 1])


def margin_matrix(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``C: (B, classes, classes)`` with rows ``e_y - e_j``: margins in one linear map."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    return eye[y][:, None, :] - eye[None, :, :]
