"""Joint attacks: PGD (and APGD, ``apgd.py``) over the input and the weights at once, the
strong ensemble, and the random-noise baseline.

An attack gives an upper bound on robust accuracy. Every point counts as broken if any
restart, loss or step broke it (per-example best-so-far, the clean point included, so the
attacked margin is never above the clean one). With ``scope="shared"`` one weight
perturbation serves the whole batch, so the best iterate is chosen for the batch as a whole;
its loss is clipped (a broken example stops pulling, so collapsing every example into one
class does not satisfy it), targeted runs push each class to another (a class permutation),
and a result at a smaller budget of the same threat can seed it (``start``): offered as it
is, it makes the attack monotone in the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..model.select import Selector, selecting
from ..model.verify import read_batch, with_gradients
from ..seeds import mix
from ..threat import Threat
from .apgd import apgd
from .best import BestSoFar
from .noise import noise
from .options import AttackOptions, pgd_step_size, scheduled
from .result import AttackResult
from .space import (
    INPUT,
    JointSpace,
    State,
    check_domain,
    check_positions,
    finite_gradient,
    margins,
)


def attack_loss(name: str, logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-example loss that the attack maximizes: ``ce``, ``margin`` (CW), ``dlr`` or
    ``dlr-targeted`` (toward the class ``target`` of each example; Croce & Hein 2020)."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "dlr-targeted":
        if target is None:
            raise ConfigError("loss dlr-targeted needs a target class per example")
        top = logits.sort(dim=1, descending=True).values
        scale = top[:, 0] - (top[:, 2] + top[:, 3]) / 2 if top.shape[1] >= 4 else top[:, 0]
        scale = scale - (top[:, -1] if top.shape[1] < 4 else 0)
        gap = logits.gather(1, y[:, None]) - logits.gather(1, target[:, None])
        return -gap.squeeze(1) / (scale + 1e-12)
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
    loss: str | Callable[[Tensor, Tensor, Tensor | None], Tensor] = "ce",
    random_start: bool = True,
    seed: int = 0,
    positions: Tensor | None = None,
    on_iterate: Callable[[Tensor, State], Tensor | None] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    target: Tensor | None = None,
    start: State | None = None,
    schedule: str = "constant",
) -> tuple[State, Tensor]:
    """The one PGD loop: ``steps`` projected ascent steps on every variable of ``space``, of
    ``alpha`` radii (``schedule="linear"``: decreasing from ``alpha``, ``scheduled``).

    ``seed`` and ``positions`` (each example's place in its data set, default 0..B-1) seed the
    random start example by example (``JointSpace.random``). ``on_iterate(logits, state)``
    sees every iterate, the start included (evaluation tracks the best of them; training uses
    only the final state); when it returns a mask, only the rows it keeps are attacked on (a
    per-example space only: the rows of a shared one are never dropped), and the final state
    holds those rows. ``reduce`` sums the gradient of a variable shared by the batch over
    the processes that hold the rest of it (distributed training). ``target``: each example's
    target class, for a targeted loss. ``loss``: a name of ``attack_loss`` or
    ``loss(logits, y, target)`` per example. ``start``: where to start (not at random).
    Returns the final state and the mean loss along the way.
    """
    state = space.random(x, seed, positions) if random_start else space.zeros(x)
    state = state if start is None else dict(start)
    objective = _loss(loss) if isinstance(loss, str) else loss
    trace = []
    for it in range(steps + 1):
        last = it == steps
        if last and on_iterate is None:  # nobody looks at the final iterate's logits
            break
        state = {k: v.detach().requires_grad_(not last) for k, v in state.items()}
        with torch.set_grad_enabled(not last):
            logits = space.forward(x, state)
            per_example = objective(logits, y, target)
        trace.append(float(per_example.detach().mean()))
        keep = None if on_iterate is None else on_iterate(logits.detach(), state)
        if last:
            break
        found = _gradients(space, state, per_example, reduce)
        detached = {k: v.detach() for k, v in state.items()}
        if keep is not None and not space.is_shared and not bool(keep.all()):
            if not bool(keep.any()):
                break  # nothing left to attack
            x, y, target = x[keep], y[keep], None if target is None else target[keep]
            detached = {k: v[keep] if space.batched[k] else v for k, v in detached.items()}
            found = {k: g[keep] if space.batched[k] else g for k, g in found.items()}
        size = scheduled(alpha, schedule, it, steps)
        state = space.step(x, detached, found, size, consume=True)  # found: its own
    return {k: v.detach() for k, v in state.items()}, torch.tensor(trace)


def _gradients(
    space: JointSpace,
    state: State,
    per_example: Tensor,
    reduce: Callable[[Tensor], Tensor] | None,
) -> State:
    """The gradient of the summed loss in every variable (summed over the processes by
    ``reduce`` where a variable is shared). A weight the output does not reach (a dead ReLU
    branch) gets none: zero; so does a non-finite one (logits overflowing there), which would
    step out of the ball."""
    keys = list(state)
    grads = torch.autograd.grad(per_example.sum(), [state[k] for k in keys], allow_unused=True)
    found = {k: finite_gradient(g, state[k]) for k, g in zip(keys, grads, strict=True)}
    if reduce is not None:
        found = {k: g if space.batched[k] else reduce(g) for k, g in found.items()}
    return found


class _Run(NamedTuple):
    """One run of an attack: the algorithm (``pgd`` or ``apgd``), the loss, each example's
    target class (None for an untargeted loss); for a shared perturbation, ``shift`` > 0 pushes
    class ``c`` toward ``c + shift`` (modulo the classes), and ``start`` starts it there."""

    algorithm: str
    loss: str
    target: Tensor | None
    shift: int = 0
    start: State | None = None


def _one_run(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    index: Tensor,
    best: BestSoFar,
    run: _Run,
    options: AttackOptions,
    seed: int,
    positions: Tensor,
    until_broken: bool,
) -> Tensor:
    """One run on the rows ``index``, offering every iterate to ``best``; the loss trace.
    ``until_broken``: a row is dropped from the run as soon as it is misclassified."""
    live = [index, x[index], y[index]]  # the rows still attacked, their inputs and labels

    def offer(logits: Tensor, state: State) -> Tensor | None:
        rows, xs, ys = live
        m = margins(logits, ys)
        best.offer(rows, m, state, space.inputs(xs, state))
        if not until_broken:
            return None
        keep = m > 0
        live[:] = [rows[keep], xs[keep], ys[keep]]
        return keep

    common = {
        "steps": options.steps,
        "alpha": options.alpha,
        "random_start": options.starts_at_random,
        "seed": seed,
        "positions": positions[index.to(positions.device)],
        "on_iterate": offer,
        "target": None if run.target is None else run.target[index],
    }
    loss = _shared_loss(run.loss, run.shift, best.classes) if space.is_shared else _loss(run.loss)
    if run.algorithm == "apgd" and run.start is None:
        _, trace = apgd(space, x[index], y[index], loss=loss, **common)  # type: ignore[arg-type]
    else:
        _, trace = pgd(
            space,
            x[index],
            y[index],
            loss=loss,
            start=run.start,
            schedule=options.schedule,  # "constant" for every method but pgd (checked)
            **common,  # type: ignore[arg-type]
        )
    return trace


def _loss(name: str) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    return lambda logits, y, target: attack_loss(name, logits, y, target)


def _shared_loss(
    name: str, shift: int, classes: int
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """A shared attack's loss: ``name`` (or with ``shift`` > 0, class ``c``'s logit pushed
    above its own toward ``c + shift``), counting 0 for a broken example, which stops pulling
    (collapsing every example into one class would otherwise satisfy it)."""

    def loss(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if shift == 0:
            value = attack_loss(name, logits, y, target)
        else:
            pair = logits.gather(1, torch.stack([(y + shift) % classes, y], 1))
            value = pair[:, 0] - pair[:, 1]
        return value * (margins(logits.detach(), y) > 0)

    return loss


def _runs(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    best: BestSoFar,
    positions: Tensor,
    options: AttackOptions,
    until_broken: bool,
    clean_logits: Tensor,
    start: State | None = None,
) -> Tensor:
    """Every run of ``_plan``, each on the examples still unbroken (all of them for a shared
    perturbation); the first run's loss trace. A targeted run of rank ``t`` aims every example
    at the class with its ``t+1``-th highest clean logit other than its label."""
    order = clean_logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
    all_rows = torch.arange(len(y), device=x.device)
    trace = torch.zeros(1)
    for number, (algorithm, loss_name, rank, shift, begin) in enumerate(
        _plan(space, options, best.classes, start)
    ):
        if loss_name == "dlr-targeted" and rank >= clean_logits.shape[1] - 1:
            continue  # fewer other classes than targets asked for
        rows = all_rows if space.is_shared else all_rows[best.margins > 0]
        if len(rows) == 0:
            break
        target = order[:, rank] if loss_name == "dlr-targeted" else None
        run = _Run(algorithm, loss_name, target, shift, begin)
        seed = mix(options.seed, "run", number)
        t = _one_run(space, x, y, rows, best, run, options, seed, positions, until_broken)
        trace = t if number == 0 else trace
    return trace


def _plan(
    space: JointSpace, options: AttackOptions, classes: int, start: State | None
) -> list[tuple[str, str, int, int, State | None]]:
    """``(algorithm, loss, target rank, shift, start)`` of every run: ``options.runs()``, and
    for a shared perturbation as many class-permutation runs (below the floor that one class's
    share would set) and, with a ``start``, one more PGD run from there."""
    plan = [(a, loss, rank, 0, None) for a, loss, rank in options.runs()]
    if not space.is_shared or classes < 2:
        return plan  # type: ignore[return-value]
    algorithm, loss = plan[0][0], plan[0][1]
    loss = "ce" if loss == "dlr-targeted" else loss
    shifts = range(1, classes)
    plan += [(algorithm, loss, 0, shifts[r % len(shifts)], None) for r in range(options.restarts)]
    plan += [] if start is None else [("pgd", loss, 0, 0, start)]
    return plan  # type: ignore[return-value]


def _continued(
    space: JointSpace, x: Tensor, y: Tensor, best: BestSoFar, start: AttackResult
) -> State:
    """Offer ``start``'s perturbation (a shared attack's at a budget within this one) to
    ``best`` as it is; return it scaled out to this threat's budgets, the next run's start."""
    if start.threat.scope != "shared" or space.threat.scope != "shared":
        raise ConfigError("start: only a shared-scope attack continues from another one")
    old, new = start.threat, space.threat
    if old.replace(eps_x=new.eps_x, eps_w=new.eps_w) != new or not (
        old.eps_x <= new.eps_x and old.eps_w <= new.eps_w
    ):
        raise ConfigError(
            f"start: a result under {old.describe()} does not fit inside {new.describe()}: "
            "expected the same threat at budgets no larger"
        )
    if start.state is None or start.x_adv.shape != x.shape:
        raise ConfigError("start: the result of an attack on the same examples was expected")
    state = {k: start.state.get(k, v) for k, v in space.zeros(x).items()}
    with torch.no_grad():
        found = margins(space.forward(x, state), y)
    best.offer(torch.arange(len(x), device=x.device), found, state, space.inputs(x, state))
    scaled = {}
    for key, v in state.items():
        was, now = (old.eps_x, new.eps_x) if key == INPUT else (old.eps_w, new.eps_w)
        scaled[key] = space.balls[key].project(v * (now / was)) if was > 0 else v
    return space.clamp_input(x, scaled)


default_step_size = pgd_step_size  # training's name for it


def _flip_attack(
    model: nn.Module, x: Tensor, y: Tensor, threat: Threat, options: AttackOptions
) -> AttackResult:
    from ..flips.attack import flip_attack  # the flip package builds on this one

    loss = "ce" if options.loss == "both" else options.loss
    return flip_attack(  # type: ignore[return-value]
        model,
        x,
        y,
        threat,
        method=options.method,
        loss=loss,
        samples=options.samples,
        seed=options.seed,
    )


@with_gradients
def attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    options: AttackOptions | None = None,
    *,
    positions: Tensor | None = None,
    until_broken: bool = False,
    start: AttackResult | None = None,
    logits: Selector | None = None,
    **overrides: Any,
) -> AttackResult:
    """Attack ``model`` at ``(x, y)`` under the joint ``threat``; the model is never modified.

    x: (B, ...) inputs inside ``threat.bounds``; y: (B,) integer labels.
    options:      ``AttackOptions`` (method, steps, restarts, loss, ...); ``overrides``
                  replace some of them by name (``attack(..., steps=10)``).
    positions:    each example's place in its data set (default 0..B-1), which seeds its
                  random draws, so an example's result never depends on its batch.
    until_broken: stop attacking an example once it is misclassified (per-example threats):
                  whether it breaks is unchanged, but its margin is then the first one found
                  below zero, not the lowest; what evaluation needs, at a fraction of the cost.
    start:        a shared-scope threat only: the result of this attack on the same examples
                  under the same threat at budgets no larger; its perturbation is a candidate
                  here (so the accuracy found is never above its), and, scaled out to this
                  threat's budgets, the start of one more PGD run (budget continuation).
    logits:       a dict or tuple output's key or index of the logits, or a function (``select``).
    Under ``Threat(flips=k)`` (a quantized model) ``pgd`` is the progressive bit search and
    ``noise`` random bit flips (``flips.attack.flip_attack``; steps and restarts do not apply).
    """
    options = AttackOptions.of(options, **overrides)
    model = selecting(model, logits)
    if isinstance(threat, Threat) and threat.flips:  # bit flips: progressive bit search
        return _flip_attack(model, x, y, threat, options)
    if not isinstance(until_broken, bool):
        raise ConfigError(f"until_broken must be True or False, got {until_broken!r}")
    if not isinstance(threat, Threat):
        raise ConfigError(f"threat must be a nonsingular.Threat, got {type(threat).__name__}")
    graph, x, y, logits = read_batch(model, x, y)
    clean = margins(logits, y)
    check_domain(x, threat)
    positions = check_positions(positions, len(x))
    if start is not None and (not isinstance(start, AttackResult) or options.method == "noise"):
        raise ConfigError("start must be an AttackResult, and continues a pgd or apgd attack only")
    if options.method == "noise":
        return noise(graph, x, y, threat, clean, options.samples, options.seed, positions)
    space = JointSpace(graph, threat, x)
    best = BestSoFar(space, x, clean, shared=space.is_shared, classes=logits.shape[1])
    begin = None if start is None else _continued(space, x, y, best, start)
    trace = torch.zeros(1)
    if space.balls:
        stop = until_broken and not space.is_shared
        trace = _runs(space, x, y, best, positions, options, stop, logits, begin)
    return _result(space, best, x, clean, threat, options.method, trace)


def _result(
    space: JointSpace,
    best: BestSoFar,
    x: Tensor,
    clean: Tensor,
    threat: Threat,
    method: str,
    trace: Tensor,
) -> AttackResult:
    """The best point found, as an ``AttackResult`` whose weight deltas are materialized on
    demand (and, for a shared threat, its state: where a larger budget continues)."""
    state = best.state

    def deltas(i: int) -> dict[str, Tensor]:
        row = torch.tensor([i], device=x.device)
        return space.materialize(best.x_adv[row], space.select(state, row))

    result = AttackResult(
        best.x_adv, best.margins, clean, best.margins <= 0, threat, method, trace, deltas
    )
    result.state = state if threat.scope == "shared" else None
    result.untouched = space.untouched
    return result
