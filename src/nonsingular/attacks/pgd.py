"""Joint attacks: PGD over the input and the weights at once, and the random-noise baseline.

An attack gives an upper bound on robust accuracy. Every point counts as broken if any
restart, loss or step broke it (per-example best-so-far, the clean point included, so the
attacked margin is never above the clean one). With ``scope="shared"`` one weight
perturbation serves the whole batch, so the best iterate is chosen for the batch as a whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import MAX_SEED, choice, integer, number
from ..errors import ConfigError
from ..model.verify import read_batch, with_gradients
from ..seeds import mix
from ..threat import Threat
from .best import BestSoFar
from .noise import noise
from .result import AttackResult
from .space import JointSpace, State, check_domain, check_positions, margins

LOSSES = ("ce", "margin", "dlr", "both")
METHODS = ("pgd", "noise")


def attack_loss(name: str, logits: Tensor, y: Tensor) -> Tensor:
    """Per-example loss that the attack maximizes: ``ce``, ``margin`` (CW) or ``dlr``."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    m = margins(logits, y)
    if name == "margin":
        return -m
    top = logits.topk(min(3, logits.shape[1]), dim=1).values  # dlr: scale-free CW (Croce & Hein)
    return -m / (top[:, 0] - top[:, -1] + 1e-12)


def pgd(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    alpha: float,
    loss: str = "ce",
    random_start: bool = True,
    seed: int = 0,
    positions: Tensor | None = None,
    on_iterate: Callable[[Tensor, State], Tensor | None] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[State, Tensor]:
    """The one PGD loop: ``steps`` projected ascent steps on every variable of ``space``.

    ``seed`` and ``positions`` (each example's place in its data set, default 0..B-1) seed the
    random start example by example (``JointSpace.random``). ``on_iterate(logits, state)``
    sees every iterate, the start included (evaluation tracks the best of them; training uses
    only the final state); when it returns a mask, only the rows it keeps are attacked on (a
    per-example space only: the rows of a shared one are never dropped), and the final state
    holds those rows. ``reduce`` sums the gradient of a variable shared by the batch over
    the processes that hold the rest of it (distributed training). Returns the final state
    and the mean loss along the way.
    """
    state = space.random(x, seed, positions) if random_start else space.zeros(x)
    trace = []
    for it in range(steps + 1):
        last = it == steps
        if last and on_iterate is None:  # nobody looks at the final iterate's logits
            break
        state = {k: v.detach().requires_grad_(not last) for k, v in state.items()}
        with torch.set_grad_enabled(not last):
            logits = space.forward(x, state)
            per_example = attack_loss(loss, logits, y)
        trace.append(float(per_example.detach().mean()))
        keep = None if on_iterate is None else on_iterate(logits.detach(), state)
        if last:
            break
        keys = list(state)
        # a weight the output does not reach (a dead ReLU branch) gets no gradient: zero; so
        # does a non-finite one (logits overflowing there), which would step out of the ball
        grads = torch.autograd.grad(per_example.sum(), [state[k] for k in keys], allow_unused=True)
        found = {
            k: torch.zeros_like(state[k]) if g is None else g.nan_to_num(0.0, 0.0, 0.0)
            for k, g in zip(keys, grads, strict=True)
        }
        if reduce is not None:
            found = {k: g if space.batched[k] else reduce(g) for k, g in found.items()}
        detached = {k: v.detach() for k, v in state.items()}
        if keep is not None and not space.is_shared and not bool(keep.all()):
            if not bool(keep.any()):
                break  # nothing left to attack
            x, y = x[keep], y[keep]
            detached = {k: v[keep] if space.batched[k] else v for k, v in detached.items()}
            found = {k: g[keep] if space.batched[k] else g for k, g in found.items()}
        state = space.step(x, detached, found, alpha)
    return {k: v.detach() for k, v in state.items()}, torch.tensor(trace)


def _pgd_run(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    index: Tensor,
    best: BestSoFar,
    loss: str,
    steps: int,
    alpha: float,
    random_start: bool,
    seed: int,
    positions: Tensor,
    until_broken: bool,
) -> Tensor:
    """One PGD run on the rows ``index``, offering every iterate to ``best``; the loss trace.
    ``until_broken``: a row is dropped from the run as soon as it is misclassified."""
    live = [index, x[index], y[index]]  # the rows still attacked, their inputs and labels

    def offer(logits: Tensor, state: State) -> Tensor | None:
        rows, xs, ys = live
        m = margins(logits, ys)
        best.offer(rows, m, state, xs + state["x"] if "x" in state else xs)
        if not until_broken:
            return None
        keep = m > 0
        live[:] = [rows[keep], xs[keep], ys[keep]]
        return keep

    _, trace = pgd(
        space,
        x[index],
        y[index],
        steps=steps,
        alpha=alpha,
        loss=loss,
        random_start=random_start,
        seed=seed,
        positions=positions[index.to(positions.device)],
        on_iterate=offer,
    )
    return trace


def _runs(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    best: BestSoFar,
    positions: Tensor,
    loss: str,
    restarts: int,
    seed: int,
    options: tuple[int, float, bool, bool],
) -> Tensor:
    """Every PGD run (``restarts`` per loss), each on the examples still unbroken (all of
    them for a shared perturbation); the first run's loss trace. ``options``: steps, step
    size, random start, until_broken."""
    steps, alpha, start, until_broken = options
    runs = ["ce", "margin"] if loss == "both" else [loss]
    all_rows = torch.arange(len(y), device=x.device)
    trace = torch.zeros(1)
    for run, loss_name in enumerate(n for n in runs for _ in range(restarts)):
        rows = all_rows if space.is_shared else all_rows[best.margins > 0]
        if len(rows) == 0:
            break
        args = (loss_name, steps, alpha, start, mix(seed, "run", run), positions, until_broken)
        t = _pgd_run(space, x, y, rows, best, *args)
        trace = t if run == 0 else trace
    return trace


def default_step_size(steps: int) -> float:
    """PGD's step as a fraction of each ball's radius: 2.5 radii in all (1 for FGSM)."""
    return 1.0 if steps == 1 else 2.5 / steps


def _check_options(
    method: str,
    steps: int,
    restarts: int,
    loss: str,
    step_size: float | None,
    samples: int,
    seed: int,
    random_start: bool | None = None,
) -> None:
    if random_start is not None and not isinstance(random_start, bool):
        raise ConfigError(f"random_start must be True, False or None, got {random_start!r}")
    choice("method", method, METHODS)
    choice("loss", loss, LOSSES)
    integer("steps", steps, 1, 100_000)
    integer("restarts", restarts, 1, 1_000)
    integer("samples", samples, 1, 1_000_000)
    integer("seed", seed, 0, MAX_SEED)
    if step_size is not None:  # a fraction of each ball's radius
        number("step_size", step_size, 0.0, 10.0, positive=True)


@with_gradients
def attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    method: str = "pgd",
    steps: int = 50,
    restarts: int = 1,
    loss: str = "ce",
    step_size: float | None = None,
    random_start: bool | None = None,
    samples: int = 100,
    seed: int = 0,
    positions: Tensor | None = None,
    until_broken: bool = False,
) -> AttackResult:
    """Attack ``model`` at ``(x, y)`` under the joint ``threat``; the model is never modified.

    x: (B, ...) inputs inside ``threat.bounds``; y: (B,) integer labels.
    method:       ``pgd`` (projected gradient ascent) or ``noise`` (``samples`` uniform draws
                  from the ball, weights drawn once per sample: the fault-injection baseline).
    steps:        PGD iterations; ``steps=1`` without random start is FGSM.
    restarts:     PGD runs per loss; later runs attack only the examples still unbroken.
    loss:         ``ce``, ``margin`` (CW), ``dlr``, or ``both`` (ce then margin).
    step_size:    step as a fraction of each ball's radius (default ``2.5 / steps``, 1 for FGSM),
                  so the input and every weight variable move in proportion to their budget.
    random_start: start inside the ball at random (default: when ``steps > 1``).
    seed:         seeds every random draw, example by example, with ``positions``: each
                  example's place in its data set (default 0..B-1), so an example's result
                  never depends on the batch it is attacked in.
    until_broken: stop attacking an example once it is misclassified (per-example threats):
                  whether it breaks is unchanged, but its margin is then the first one found
                  below zero, not the lowest; what evaluation needs, at a fraction of the cost.
    """
    _check_options(method, steps, restarts, loss, step_size, samples, seed, random_start)
    if not isinstance(until_broken, bool):
        raise ConfigError(f"until_broken must be True or False, got {until_broken!r}")
    if not isinstance(threat, Threat):
        raise ConfigError(f"threat must be a nonsingular.Threat, got {type(threat).__name__}")
    graph, x, y, logits = read_batch(model, x, y)
    device = x.device
    clean = margins(logits, y)
    check_domain(x, threat)
    positions = check_positions(positions, len(x))

    if method == "noise":
        return noise(graph, x, y, threat, clean, samples, seed, positions)

    space = JointSpace(graph, threat, x)
    best = BestSoFar(space, x, clean, shared=space.is_shared)
    trace = torch.zeros(1)
    if space.balls:
        alpha = step_size if step_size is not None else default_step_size(steps)
        start = steps > 1 if random_start is None else random_start
        options = (steps, alpha, start, until_broken and not space.is_shared)
        trace = _runs(space, x, y, best, positions, loss, restarts, seed, options)
    state = best.state

    def deltas(i: int) -> dict[str, Tensor]:
        row = torch.tensor([i], device=device)
        return space.materialize(best.x_adv[row], space.select(state, row))

    return AttackResult(
        best.x_adv, best.margins, clean, best.margins <= 0, threat, method, trace, deltas
    )
