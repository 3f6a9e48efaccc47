"""Joint attacks: PGD over the input and the weights at once, and the random-noise baseline.

An attack gives an upper bound on robust accuracy. Every point counts as broken if any
restart, loss or step broke it (per-example best-so-far, the clean point included, so the
attacked margin is never above the clean one). With ``scope="shared"`` one weight
perturbation serves the whole batch, so the best iterate is chosen for the batch as a whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigError
from .network import Network, check_batch, move_batch
from .perturbation import JointSpace, State, check_domain, margins
from .threat import Threat
from .weights import ParameterVariables, perturbed_layers

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


@dataclass
class AttackResult:
    """What an attack found for each example of the batch.

    x_adv:          (B, ...) adversarial inputs, inside the input ball and the bounds.
    margins:        (B,) ``z_y - max_{j != y} z_j`` under the best perturbation found.
    clean_margins:  (B,) the same without perturbation.
    success:        (B,) bool, ``margins <= 0``: the example is broken.
    loss_trace:     (steps + 1,) mean attack loss along the first run (flat: suspicious).
    """

    x_adv: Tensor
    margins: Tensor
    clean_margins: Tensor
    success: Tensor
    threat: Threat
    method: str
    loss_trace: Tensor
    _deltas: Callable[[int], dict[str, Tensor]] = field(repr=False)

    @property
    def clean_accuracy(self) -> float:
        return float((self.clean_margins > 0).float().mean())

    @property
    def robust_accuracy(self) -> float:
        return float((~self.success).float().mean())

    def weight_deltas(self, i: int) -> dict[str, Tensor]:
        """``{parameter name: Delta}`` the attack used on example ``i`` (same for all if shared)."""
        if not -len(self.margins) <= i < len(self.margins):
            raise IndexError(f"example index {i} out of range for a batch of {len(self.margins)}")
        return self._deltas(i % len(self.margins))

    def replay(self, model: nn.Module, i: int) -> Tensor:
        """Logits ``(1, classes)`` of the unmodified ``model`` at ``x_adv[i]`` with
        ``weight_deltas(i)`` added, through ``torch.func.functional_call``: the check that
        the perturbation found is real."""
        params = {n: p.detach() for n, p in model.named_parameters()}
        for name, delta in self.weight_deltas(i).items():
            params[name] = params[name] + delta
        with torch.no_grad():
            return functional_call(model, params, (self.x_adv[i : i + 1],))


class _Best:
    """Best-so-far tracker: per example, or for the batch as a whole when Delta is shared."""

    def __init__(self, space: JointSpace, x: Tensor, clean: Tensor, shared: bool) -> None:
        self.space = space
        self.shared = shared
        self.margins = clean.clone()
        self.state = space.zeros(x)
        self.x_adv = x.clone()
        self.score = self._score(clean)

    @staticmethod
    def _score(m: Tensor) -> tuple[int, float]:
        return int((m <= 0).sum()), -float(m.sum())

    def offer(self, index: Tensor, m: Tensor, state: State, x_adv: Tensor) -> Tensor:
        """Consider a candidate for the rows ``index``; return which of them improved."""
        if self.shared:  # the whole batch lives under one Delta: compare batches
            score = self._score(m)
            if score <= self.score:
                return torch.zeros_like(m, dtype=torch.bool)
            self.score, self.margins = score, m.clone()
            self.state = {k: v.detach().clone() for k, v in state.items()}
            self.x_adv = x_adv.detach().clone()
            return torch.ones_like(m, dtype=torch.bool)
        better = m < self.margins[index]
        rows = index[better]
        self.margins[rows] = m[better]
        self.x_adv[rows] = x_adv[better].detach()
        for key, v in state.items():
            if self.space.batched[key]:
                self.state[key][rows] = v[better].detach()
        return better


def pgd(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    alpha: float,
    loss: str = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    on_iterate: Callable[[Tensor, State], None] | None = None,
) -> tuple[State, Tensor]:
    """The one PGD loop: ``steps`` projected ascent steps on every variable of ``space``.

    ``on_iterate(logits, state)`` sees every iterate, the start included (evaluation tracks
    the best of them; training uses only the final state). Returns the final state and the
    mean loss along the way.
    """
    state = space.random(x, generator) if random_start else space.zeros(x)
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
        if on_iterate is not None:
            on_iterate(logits.detach(), state)
        if last:
            break
        keys = list(state)
        grads = torch.autograd.grad(per_example.sum(), [state[k] for k in keys])
        detached = {k: v.detach() for k, v in state.items()}
        state = space.step(x, detached, dict(zip(keys, grads, strict=True)), alpha)
    return {k: v.detach() for k, v in state.items()}, torch.tensor(trace)


def _pgd_run(
    space: JointSpace,
    x: Tensor,
    y: Tensor,
    index: Tensor,
    best: _Best,
    loss: str,
    steps: int,
    alpha: float,
    random_start: bool,
    generator: torch.Generator,
) -> Tensor:
    """One PGD run on the rows ``index``, offering every iterate to ``best``; the loss trace."""
    xs, ys = x[index], y[index]

    def offer(logits: Tensor, state: State) -> None:
        x_adv = xs + state["x"] if "x" in state else xs
        best.offer(index, margins(logits, ys), state, x_adv)

    _, trace = pgd(
        space,
        xs,
        ys,
        steps=steps,
        alpha=alpha,
        loss=loss,
        random_start=random_start,
        generator=generator,
        on_iterate=offer,
    )
    return trace


def default_step_size(steps: int) -> float:
    """PGD's step as a fraction of each ball's radius: 2.5 radii in all (1 for FGSM)."""
    return 1.0 if steps == 1 else 2.5 / steps


def _check_options(
    method: str, steps: int, restarts: int, loss: str, step_size: float | None, samples: int
) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    for name, value in (("steps", steps), ("restarts", restarts), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if step_size is not None and not (isinstance(step_size, (int, float)) and step_size > 0):
        raise ConfigError(
            f"step_size must be a positive number (a fraction of each ball's "
            f"radius) or None, got {step_size!r}"
        )


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
    """
    _check_options(method, steps, restarts, loss, step_size, samples)
    if not isinstance(threat, Threat):
        raise ConfigError(f"threat must be a nonsingular.Threat, got {type(threat).__name__}")
    net = Network.from_module(model)
    device = net.affine_layers[0][1].weight.device
    x, y = move_batch(x, y, device)
    logits = check_batch(net, x, y)
    y = y.long()
    clean = margins(logits, y)
    check_domain(x, threat)
    generator = torch.Generator(device=device).manual_seed(seed)

    if method == "noise":
        return _noise(net, x, y, threat, clean, samples, seed)

    space = JointSpace(net, threat)
    best = _Best(space, x, clean, shared=space.shared)
    trace = torch.zeros(1)
    if space.balls:
        alpha = step_size if step_size is not None else default_step_size(steps)
        start = steps > 1 if random_start is None else random_start
        runs = ["ce", "margin"] if loss == "both" else [loss]
        all_rows = torch.arange(len(y), device=device)
        for run, (loss_name, _) in enumerate((n, r) for n in runs for r in range(restarts)):
            rows = all_rows if space.shared else all_rows[best.margins > 0]
            if len(rows) == 0:
                break
            t = _pgd_run(space, x, y, rows, best, loss_name, steps, alpha, start, generator)
            trace = t if run == 0 else trace

    state = best.state

    def deltas(i: int) -> dict[str, Tensor]:
        row = torch.tensor([i], device=device)
        return space.materialize(best.x_adv[row], space.select(state, row))

    return AttackResult(
        best.x_adv, best.margins, clean, best.margins <= 0, threat, method, trace, deltas
    )


def _noise(
    net: Network, x: Tensor, y: Tensor, threat: Threat, clean: Tensor, samples: int, seed: int
) -> AttackResult:
    """Uniform draws from the ball; one weight draw per sample serves the whole batch."""
    layers = {k: ParameterVariables(b, batched=False) for k, b in perturbed_layers(net, threat)}
    space = JointSpace(net, threat, weights=layers)
    best = _Best(space, x, clean, shared=threat.scope == "shared")
    choice = torch.full((len(y),), -1, dtype=torch.long, device=x.device)
    index = torch.arange(len(y), device=x.device)

    def draw(j: int) -> State:
        return space.random(x, torch.Generator(device=x.device).manual_seed(seed * 7919 + j))

    trace = []
    with torch.no_grad():
        for j in range(samples if space.balls else 0):
            state = draw(j)
            m = margins(space.forward(x, state), y)
            trace.append(float(-m.mean()))
            improved = best.offer(index, m, state, x + state["x"] if "x" in state else x)
            choice[improved] = j

    def deltas(i: int) -> dict[str, Tensor]:
        j = int(choice[i])
        if j < 0:
            return {}
        row = torch.tensor([i], device=x.device)
        return space.materialize(best.x_adv[row], space.select(draw(j), row))

    return AttackResult(
        best.x_adv,
        best.margins,
        clean,
        best.margins <= 0,
        threat,
        "noise",
        torch.tensor(trace),
        deltas,
    )
