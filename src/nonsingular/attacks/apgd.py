"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks") over every variable of a ``JointSpace``.

The input delta and every weight variable take the same steps, each in its own ball (its
``step`` direction, its ``project``): a first step of ``alpha`` radii (2 by default), then
momentum 0.75 over the previous move; at checkpoints (after 22% of the steps, then at
intervals 3% shorter each time, at least 6%) the step is halved, and the iterate reset to
the point of highest loss, where fewer than 75% of the steps since the last checkpoint raised
the loss, or where neither the step nor the best loss changed since then.
Each example has its own step size and checkpoint decisions; when some variable is shared by
the batch (``scope="shared"``) the batch is one problem (the summed loss, one step size).
A run of ``steps`` costs what PGD's does: ``steps`` gradients and one last forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..balls import Ball, BoxBall
from .options import APGD_STEP
from .space import JointSpace, State, Variable, copy_rows, finite_gradient

MOMENTUM = 0.75
RHO = 0.75  # the fraction of steps since the last checkpoint that must raise the loss


def checkpoints(steps: int) -> set[int]:
    """The iterations after which APGD checks its progress, in whole iterations as the
    authors' code counts them: the first after ``0.22 steps``, each next interval
    ``0.03 steps`` shorter than the last but at least ``0.06 steps``."""
    interval = max(int(0.22 * steps), 1)
    shorter, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    marks, at = set(), interval
    while at < steps:
        marks.add(at)
        interval = max(interval - shorter, shortest)
        at += interval
    return marks


class _Run:
    """The state of one APGD run: per row (an example, or the whole batch when shared) its
    step size, best loss and checkpoint counters; per variable the current, previous and best
    points and the gradients at the current and the best one.

    The iterates it is given are never written into (the best-so-far tracker keeps them
    without a copy); the gradients are its own: the next step is computed into them. The best
    point and its gradients live in buffers of the run's own, updated row by row in place
    (no new tensor a step: on a large per-example state, fresh memory costs more than
    the arithmetic)."""

    def __init__(self, space: JointSpace, state: State, grads: State, f: Tensor, alpha: float):
        self.space, self.shared = space, space.is_shared
        self.cur, self.prev = state, state
        self.grad = _owned(grads)
        self.best = {k: v.clone() for k, v in state.items()}
        self.grad_best = {k: g.clone() for k, g in self.grad.items()}
        self.f_best, self.f_prev, self.f_mark = f, f, f
        self.eta = torch.full_like(f, alpha)
        self.successes = torch.zeros_like(f)
        self.reduced = torch.zeros_like(f, dtype=torch.bool)
        self.spare: list[State] = []  # buffers a checkpoint sends points back into
        self.scratch: State = {}  # each box variable's momentum term

    def rows(self, t: Tensor, v: Tensor) -> Tensor:
        """``t`` (one value per row) shaped to broadcast against the variable ``v``."""
        return t.reshape(()) if self.shared else t.reshape(-1, *[1] * (v.dim() - 1))

    def _copy(self, into: State, mask: Tensor, source: State) -> None:
        """``into[k][i] = source[k][i]`` for every row ``i`` in ``mask``, in place."""
        for k, v in into.items():
            copy_rows(v, source[k], mask, self.shared)

    def update(self, state: State, grads: State, f: Tensor) -> None:
        """Record the iterate ``state`` of loss ``f`` and its gradients ``grads`` (the run's
        own from now on)."""
        self.successes += (f > self.f_prev).to(f.dtype)
        self.f_prev = f
        better = f > self.f_best
        grads = _owned(grads)
        self._copy(self.best, better, state)
        self._copy(self.grad_best, better, grads)
        self.f_best = torch.where(better, f, self.f_best)
        self.prev, self.cur, self.grad = self.cur, state, grads

    def checkpoint(self, length: int) -> None:
        """Halve the step of the rows that made too little progress over the last ``length``
        iterations, and send them back to their best point."""
        reduce = (self.successes <= RHO * length) | (~self.reduced & (self.f_mark >= self.f_best))
        self.eta = torch.where(reduce, self.eta / 2, self.eta)
        if bool(reduce.any()):
            self.cur = self._sent_back(reduce)
        self._copy(self.grad, reduce, self.grad_best)
        self.reduced, self.f_mark = reduce, self.f_best
        self.successes = torch.zeros_like(self.successes)

    def _sent_back(self, reduce: Tensor) -> State:
        """The current point with the rows ``reduce`` at their best point, in a buffer of the
        run's own: two in turn, as the one written last is still the previous point (the best
        point's buffers change at the next update, before the step that reads it)."""
        if len(self.spare) < 2:
            into = {k: torch.empty_like(v) for k, v in self.cur.items()}
        else:
            into = self.spare.pop(0)
        self._copy(into, ~reduce, self.cur)  # one pass: each row from one of the two
        self._copy(into, reduce, self.best)
        self.spare.append(into)
        return dict(into)

    def keep(self, mask: Tensor) -> None:
        """Go on with the rows ``mask`` only (per-example runs)."""
        for name in ("cur", "grad", "prev", "best", "grad_best"):
            setattr(self, name, {k: v[mask] for k, v in getattr(self, name).items()})
        for name in ("f_best", "f_prev", "f_mark", "eta", "successes", "reduced"):
            setattr(self, name, getattr(self, name)[mask])
        self.spare, self.scratch = [], {}

    def step(self, x: Tensor, first: bool) -> State:
        """The next iterate, computed into the gradients: a step of ``eta`` radii along each
        ball's ascent direction, then momentum over the previous move (none on the first
        step), projected into each ball."""
        a = 1.0 if first else MOMENTUM
        balls = self.space.balls
        z = {
            key: balls[key].ascend(v, self.grad[key], self.rows(self.eta, v), consume=True)
            for key, v in self.cur.items()
        }
        z = self.space.clamp_input(x, z)
        moved = {
            key: _momentum(balls[key], v, z[key], self.prev[key], a, self._scratch(key, v))
            for key, v in self.cur.items()
        }
        return self.space.clamp_input(x, moved)

    def _scratch(self, key: Variable, v: Tensor) -> Tensor:
        if key not in self.scratch or self.scratch[key].shape != v.shape:
            self.scratch[key] = torch.empty_like(v)
        return self.scratch[key]


def _owned(grads: State) -> State:
    """``grads`` as tensors the run may write into: each its own dense memory (autograd may
    hand one tensor to two variables, or an expanded one)."""
    seen: set[int] = set()
    owned = {}
    for k, g in grads.items():
        ptr = g.data_ptr()
        owned[k] = g.clone() if ptr in seen or not g.is_contiguous() else g
        seen.add(ptr)
    return owned


def _box(ball: Ball) -> Tensor | float | None:
    """The radius of a box ball that steps may be computed in place against (a float or a
    tensor no gradient flows through), else None."""
    if not isinstance(ball, BoxBall):
        return None
    r = ball.radius
    return r if isinstance(r, float) or not r.requires_grad else None


def _momentum(ball: Ball, v: Tensor, z: Tensor, prev: Tensor, a: float, scratch: Tensor) -> Tensor:
    """``project(v + (a (z - v) + (1 - a) (v - prev)))``, computed into ``z`` (the caller's
    own) where the ball is a box (``scratch``: a tensor like ``v`` for the momentum term):
    the same numbers (with ``a = 1`` neither the product by 1 nor the second term, zero, is
    computed)."""
    r = _box(ball)
    if r is None:
        return ball.project(v + (a * (z - v) + (1 - a) * (v - prev)))
    z = z.sub_(v) if a == 1.0 else z.sub_(v).mul_(a)
    if a != 1.0:
        z.add_(torch.sub(v, prev, out=scratch).mul_(1 - a))
    z.add_(v)
    return z.clamp_(-r, r) if isinstance(r, float) else z.clamp_(min=-r, max=r)


def _evaluate(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    state: State,
    loss: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    grad: bool,
) -> tuple[Tensor, Tensor, State, State]:
    """The per-example loss, the logits, the detached point and (``grad``) its gradients:
    zero where the output does not reach a variable or the gradient is not finite."""
    state = {k: v.detach().requires_grad_(grad) for k, v in state.items()}
    with torch.set_grad_enabled(grad):
        logits = space.forward(x, state)
        per_example = loss(logits, y, target)
    grads: State = {}
    if grad:
        keys = list(state)
        found = torch.autograd.grad(per_example.sum(), [state[k] for k in keys], allow_unused=True)
        grads = {k: finite_gradient(g, state[k]) for k, g in zip(keys, found, strict=True)}
    detached = {k: v.detach() for k, v in state.items()}
    return per_example.detach(), logits.detach(), detached, grads


def apgd(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    loss: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    alpha: float = APGD_STEP,
    target: Tensor | None = None,
    random_start: bool = True,
    seed: int = 0,
    positions: Tensor | None = None,
    on_iterate: Callable[[Tensor, State], Tensor | None] | None = None,
) -> tuple[State, Tensor]:
    """One APGD run of ``steps`` iterations on every variable of ``space``, maximizing
    ``loss(logits, y, target)`` (``target``: one class per example, for targeted losses).

    The start, ``positions``, ``on_iterate`` (which may drop rows) and the returned final
    state and mean loss trace are those of ``pgd``; ``alpha`` is the first step in radii.
    """
    state = space.random(x, seed, positions) if random_start else space.zeros(x)
    marks, mark, trace = checkpoints(steps), 0, []
    run: _Run | None = None
    for it in range(steps + 1):
        last = it == steps
        if last and on_iterate is None:
            break
        f, logits, state, grads = _evaluate(space, x, y, target, state, loss, not last)
        trace.append(float(f.mean()))
        keep = None if on_iterate is None else on_iterate(logits, state)
        if last:
            break
        total = f.sum().reshape(1) if space.is_shared else f
        if run is None:
            run = _Run(space, state, grads, total, alpha)
        else:
            run.update(state, grads, total)
        if it in marks:
            run.checkpoint(it - mark)
            mark = it
        if keep is not None and not space.is_shared and not bool(keep.all()):
            if not bool(keep.any()):
                break
            x, y, target = x[keep], y[keep], None if target is None else target[keep]
            run.keep(keep)
        state = run.step(x, first=it == 0)
    return state, torch.tensor(trace)
