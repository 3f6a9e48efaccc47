"""The input side of the threat as a region bounds can be concretized over."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..threat import Threat


def box_minimum(lam: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``min over h in [lower, upper] of lam . h``: ``lam (B, K, *s)``, bounds ``(B, *s)``.

    As ``lam . center - |lam| . radius`` (the hot spot of CROWN; multiply-and-sum measured
    faster than batched mat-vecs here).
    """
    flat = lam.flatten(2)
    center = ((upper + lower) / 2).flatten(1)[:, None]
    radius = ((upper - lower) / 2).flatten(1)[:, None]
    return (flat * center).sum(-1) - (flat.abs() * radius).sum(-1)


@dataclass
class InputRegion:
    """``{x' : ||x' - x|| <= eps_x} ∩ bounds`` for a batch ``x: (B, ...)``.

    ``lower``/``upper`` is a box containing the region (exactly it for linf); for l2 the
    Euclidean ball is used too, and the better of the two concretizations is kept (both are
    sound for the intersection).
    """

    x: Tensor
    lower: Tensor
    upper: Tensor
    l2_radius: float | None = None
    nonnegative: bool = False  # every x' >= 0 (bounds start at 0 or above)

    @classmethod
    def from_threat(cls, x: Tensor, threat: Threat) -> InputRegion:
        lower, upper = x - threat.eps_x, x + threat.eps_x
        if threat.bounds is not None:
            lower, upper = lower.clamp(*threat.bounds), upper.clamp(*threat.bounds)
        l2 = threat.eps_x if threat.x_norm == "l2" else None
        return cls(x, lower, upper, l2, threat.bounds is not None and threat.bounds[0] >= 0)

    def minimum(self, lam: Tensor) -> Tensor:
        """``min over the region of lam . x'`` (a sound lower bound), shape (B, K)."""
        low = box_minimum(lam, self.lower, self.upper)
        if self.l2_radius is not None:
            center = (lam.flatten(2) * self.x.flatten(1)[:, None]).sum(-1)
            low = low.maximum(center - self.l2_radius * lam.flatten(2).norm(dim=-1))
        return low
