"""Balls that PGD variables live in: each knows how to sample, step and project itself.

The joint attack loop is written once and walks the variables of a ``JointSpace`` (a dict of
name to ball); the input part and every weight mode are just balls with different radii
(Foolbox's idea, extended to weights). Radii broadcast against the variable; ``batch_dims``
leading dimensions index independent balls (1 for per-example variables, 0 for one shared
variable).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _as_tensor(radius: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(radius, dtype=like.dtype, device=like.device)


def _scratch(grad: Tensor, v: Tensor) -> bool:
    """Whether a step may be computed into ``grad``: a plain dense tensor shaped like ``v``
    (not an expanded one, nor one autograd tracks)."""
    return (
        grad.shape == v.shape
        and grad.dtype == v.dtype
        and grad.is_contiguous()
        and not grad.requires_grad
    )


class Ball(ABC):
    """A norm ball centred at zero."""

    def __init__(self, radius: Tensor | float, batch_dims: int = 0) -> None:
        uniform = isinstance(radius, (int, float)) or (
            isinstance(radius, Tensor) and radius.dim() == 0 and not radius.requires_grad
        )
        self.radius = float(radius) if uniform else radius  # a float takes the fast paths
        self.batch_dims = batch_dims

    @abstractmethod
    def random(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A sample drawn uniformly from the ball, shaped like ``like``."""

    @abstractmethod
    def step(self, v: Tensor, grad: Tensor, alpha: float) -> Tensor:
        """An ascent step along ``grad`` whose length is ``alpha`` times the radius."""

    @abstractmethod
    def project(self, v: Tensor) -> Tensor:
        """The closest point of the ball (Euclidean for l2, coordinate clamp for linf)."""

    @abstractmethod
    def contains(self, v: Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
        """Whether ``v`` lies in the ball up to rounding."""

    def ascend(
        self, v: Tensor, grad: Tensor, alpha: float | Tensor, *, consume: bool = False
    ) -> Tensor:
        """``project(step(v, grad, alpha))``: one projected ascent step (the PGD update); with
        ``alpha`` a tensor broadcasting against ``v`` (a step per row: APGD's),
        ``project(v + alpha * step(0, grad, 1))``. ``consume``: ``grad`` is the caller's own
        scratch tensor, which the step may compute into (``v`` is never written into)."""
        if isinstance(alpha, Tensor):
            return self.project(v + alpha * self.step(torch.zeros_like(v), grad, 1.0))
        return self.project(self.step(v, grad, alpha))


class BoxBall(Ball):
    """``|v[i]| <= radius[i]`` elementwise (linf); radius may differ per coordinate."""

    def random(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return (2 * u - 1) * _as_tensor(self.radius, like)

    def step(self, v: Tensor, grad: Tensor, alpha: float) -> Tensor:
        return v + alpha * _as_tensor(self.radius, v) * grad.sign()

    def project(self, v: Tensor) -> Tensor:
        r = _as_tensor(self.radius, v)
        return torch.maximum(torch.minimum(v, r), -r)

    def contains(self, v: Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
        r = _as_tensor(self.radius, v)
        return bool((v.abs() <= r * (1 + rtol) + atol).all())

    def ascend(
        self, v: Tensor, grad: Tensor, alpha: float | Tensor, *, consume: bool = False
    ) -> Tensor:
        # the hot path of every PGD and APGD step: the same numbers as the definition in four
        # or five kernels, and no new tensor when the gradient is the caller's scratch
        r = self.radius if isinstance(self.radius, float) else _as_tensor(self.radius, v)
        if isinstance(r, Tensor) and r.requires_grad:  # a relative radius carrying its
            return super().ascend(v, grad, alpha)  # parameter's gradient (training)
        s = grad.sign_() if consume and _scratch(grad, v) else grad.sign()
        if isinstance(alpha, Tensor):  # a step per row: |s| r exactly, then times the row's
            s.mul_(r).mul_(alpha)
        else:
            s.mul_(alpha * r)
        s.add_(v)
        return s.clamp_(-r, r) if isinstance(r, float) else s.clamp_(min=-r, max=r)


class L2Ball(Ball):
    """``||v_b||_2 <= radius_b`` over the non-batch dimensions of ``v``."""

    def _norm(self, v: Tensor) -> Tensor:
        dims = tuple(range(self.batch_dims, v.dim()))
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()

    def _radius(self, v: Tensor) -> Tensor:
        r = _as_tensor(self.radius, v)
        return r.reshape(r.shape + (1,) * (v.dim() - r.dim()))

    def random(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        g = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        direction = g / self._norm(g).clamp_min(1e-12)
        n = max(1, like[(0,) * self.batch_dims].numel())
        shape = like.shape[: self.batch_dims] + (1,) * (like.dim() - self.batch_dims)
        u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
        return direction * u.pow(1.0 / n) * self._radius(like)

    def step(self, v: Tensor, grad: Tensor, alpha: float) -> Tensor:
        unit = grad / self._norm(grad).clamp_min(1e-12)
        return v + alpha * self._radius(v) * unit

    def project(self, v: Tensor) -> Tensor:
        factor = (self._radius(v) / self._norm(v).clamp_min(1e-12)).clamp(max=1.0)
        return v * factor

    def contains(self, v: Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
        return bool((self._norm(v) <= self._radius(v) * (1 + rtol) + atol).all())


def make_ball(norm: str, radius: Tensor | float, batch_dims: int = 0) -> Ball:
    """The ball of norm ``linf`` or ``l2``."""
    return (BoxBall if norm == "linf" else L2Ball)(radius, batch_dims)
