"""Bit-flip attacks on quantized models: the progressive bit search (shared or per example),
joint with an input attack when ``eps_x > 0``, and random faults (docs/quantization.md).

The joint threat alternates: flips are searched at the current inputs, then input PGD runs on
the model with those flips, ``rounds`` times (each flip search starts afresh from the new
inputs, with the whole budget k). Alternating, not interleaving, because a flip is a discrete
choice that needs exact forwards to rank, far dearer than a PGD step: block-coordinate ascent
spends the flip search where the inputs have already moved, and lets PGD finish against the
final flips, so the inputs it returns are tuned to the flips reported.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attacks.space import check_domain
from ..checks import integer, number
from ..model.verify import read_batch, with_gradients
from ..seeds import generator, mix
from ..threat import Threat
from .grid import Flip, flipped_weights
from .result import FlipAttackResult
from .search import progressive_search
from .space import FlipSpace


def with_flips(model: nn.Module, space: FlipSpace, flips: list[Flip]) -> nn.Module:
    """A copy of ``model`` holding the flipped weights (for attacks that take a module)."""
    copy = deepcopy(model)
    params = dict(copy.named_parameters())
    with torch.no_grad():
        for name, weight in flipped_weights(space.quantization, space.integers, flips).items():
            params[name].copy_(weight)
    return copy


def _input_attack(
    model: nn.Module, space: FlipSpace, flips: list[Flip], x: Tensor, y: Tensor, threat: Threat
) -> Tensor:
    """Input PGD (50 steps) on the model with ``flips``; the adversarial inputs."""
    from ..attacks.pgd import attack

    inputs_only = Threat(eps_x=threat.eps_x, x_norm=threat.x_norm, bounds=threat.bounds)
    return attack(with_flips(model, space, flips), x, y, inputs_only, steps=50).x_adv


def _search(
    model: nn.Module, space: FlipSpace, x: Tensor, y: Tensor, threat: Threat, options: dict
) -> tuple[list[Flip], Tensor, list[float]]:
    """The flips (best prefix of the search), the inputs, and the accuracy trace, for one
    batch under one shared flip set, alternating with input PGD when ``eps_x > 0``."""
    x_adv, flips, trace = x, [], []
    for _ in range(options["rounds"] if threat.eps_x > 0 else 1):
        found = progressive_search(
            space,
            x_adv,
            y,
            threat.flips,
            target=options["target"],
            loss=options["loss"],
            tries=options["tries"],
        )
        flips, trace = found.flips[: found.best_prefix()], found.accuracy
        if threat.eps_x > 0:
            x_adv = _input_attack(model, space, flips, x, y, threat)
    return flips, x_adv, trace


def _random_flips(space: FlipSpace, k: int, g: torch.Generator) -> list[Flip]:
    """``k`` distinct flips drawn uniformly over every allowed (weight element, bit)."""
    sizes = torch.tensor([space.params[n].numel() * len(space.allowed) for n in space.names])
    ends = sizes.cumsum(0)
    chosen: set[int] = set()
    while len(chosen) < k:
        chosen.update(torch.randint(int(ends[-1]), (k - len(chosen),), generator=g).tolist())
    flips = []
    for c in sorted(chosen):
        layer = int(torch.searchsorted(ends, c, right=True))
        within = c - (int(ends[layer - 1]) if layer else 0)
        index, column = divmod(within, len(space.allowed))
        flips.append((space.names[layer], index, int(space.allowed[column])))
    return flips


def fault_draws(
    space: FlipSpace, x: Tensor, y: Tensor, threat: Threat, samples: int, seed: int
) -> tuple[list[list[Flip]], Tensor]:
    """``samples`` random draws of k flips, each serving the batch: the worst draw for the
    batch (shared scope) or for each example (per-example), and every draw's accuracy."""
    from ..attacks.space import margins

    best = torch.full((len(y),), float("inf"), dtype=x.dtype)
    sets: list[list[Flip]] = [[] for _ in y]
    worst_batch: tuple[float, list[Flip]] = (2.0, [])
    accuracy = []
    for j in range(samples):
        flips = _random_flips(space, threat.flips, generator(seed, "faults", j))
        with torch.no_grad():
            m = margins(space.logits(x, space.weights(flips)), y).cpu()
        accuracy.append(float((m > 0).float().mean()))
        worst_batch = min(worst_batch, (accuracy[-1], flips), key=lambda t: t[0])
        for i in (m < best).nonzero().flatten().tolist():
            best[i], sets[i] = m[i], flips
    if threat.scope == "shared":
        sets = [worst_batch[1]] * len(y)
    return sets, torch.tensor(accuracy)


@with_gradients
def flip_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    method: str = "pgd",
    loss: str = "ce",
    samples: int = 100,
    seed: int = 0,
    tries: int = 1,
    rounds: int = 2,
    target: float = 0.0,
) -> FlipAttackResult:
    """Attack the quantized ``model`` at ``(x, y)`` with ``threat.flips`` bit flips.

    method ``pgd``: the progressive bit search (one flip set for the batch when
    ``threat.scope == "shared"``, one per example otherwise, which stops once the example is
    broken); ``noise``: ``samples`` random draws of k flips (the fault-injection baseline).
    tries: candidates per layer run exactly at each step; rounds: flip search / input PGD
    alternations when ``eps_x > 0``; target: the shared search stops at this accuracy.
    """
    integer("tries", tries, 1, 10_000)
    integer("rounds", rounds, 1, 100)
    graph, x, y, _ = read_batch(model, x, y)
    check_domain(x, threat)
    space = FlipSpace(model, threat)
    options = {"rounds": rounds, "target": target, "loss": loss, "tries": tries}
    x_adv, trace = x, torch.zeros(0)
    if method == "noise":
        sets, trace = fault_draws(space, x, y, threat, samples, mix(seed))
    elif threat.scope == "shared":
        flips, x_adv, accuracy = _search(model, space, x, y, threat, options)
        sets, trace = [flips] * len(y), torch.tensor(accuracy)
    else:
        sets, rows = [], []
        for i in range(len(y)):
            flips, xi, _ = _search(model, space, x[i : i + 1], y[i : i + 1], threat, options)
            sets.append(flips)
            rows.append(xi)
        x_adv = torch.cat(rows) if rows else x
    return flip_attack_result(model, space, x, x_adv, y, threat, method, sets, trace)


def flip_attack_result(
    model: nn.Module,
    space: FlipSpace,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    threat: Threat,
    method: str,
    sets: list[list[Flip]],
    trace: Tensor,
) -> FlipAttackResult:
    """The result of flipping ``sets`` (one list of flips per example) at inputs ``x_adv``:
    margins replayed through the model, clean ones at ``x`` with no flip."""
    clean = space.replay_margins(x, y, [[] for _ in y])
    found = space.replay_margins(x_adv, y, sets)
    if trace.numel() == 0:  # per example: the mean negative margin before and after
        trace = torch.stack([-clean.mean(), -found.mean()]).cpu() if len(y) else trace

    def deltas(i: int) -> dict[str, Tensor]:
        new = flipped_weights(space.quantization, space.integers, sets[i])
        return {n: w - space.params[n] for n, w in new.items()}

    return FlipAttackResult(
        x_adv.detach(),
        found,
        clean,
        found <= 0,
        threat,
        method,
        trace,
        deltas,
        flip_sets=sets,
        accuracy_trace=trace if method != "pgd" or threat.scope == "shared" else torch.zeros(0),
    )


@dataclass
class FlipsTo:
    """How many flips the shared progressive bit search needs to bring accuracy to a target.

    flips:     that number (None when ``max_flips`` did not reach the target).
    flip_set:  the flips, in the order found (all of them when the target was not reached).
    accuracy:  batch accuracy after 0, 1, ... flips of the search.
    replayed:  the accuracy under ``flip_set`` replayed example by example on the unmodified
               model (``FlipAttackResult.replay``'s computation), at most ``target`` if reached.
    """

    flips: int | None
    flip_set: list[Flip]
    accuracy: list[float]
    replayed: float
    target: float


@with_gradients
def flips_to(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target_accuracy: float | None = None,
    *,
    max_flips: int = 100,
    layers: tuple[str, ...] | None = None,
    bits: tuple[int, ...] | None = None,
    loss: str = "ce",
    tries: int = 1,
) -> FlipsTo:
    """Flips the shared progressive bit search needs to bring the accuracy of the quantized
    ``model`` on ``(x, y)`` to at most ``target_accuracy`` (default: chance plus 1 point,
    ``1 / classes + 0.01``); counted by replay, so the reported number really does it."""
    integer("max_flips", max_flips, 1, 1_000_000)
    _, x, y, logits = read_batch(model, x, y)
    target = 1 / logits.shape[1] + 0.01 if target_accuracy is None else target_accuracy
    number("target_accuracy", target, 0.0, 1.0)
    threat = Threat(flips=max_flips, layers=layers, bits=bits, scope="shared", bounds=None)
    space = FlipSpace(model, threat)
    found = progressive_search(space, x, y, max_flips, target=target, loss=loss, tries=tries)

    def replayed(n: int) -> float:
        m = space.replay_margins(x, y, [found.flips[:n]] * len(y))
        return float((m > 0).float().mean()) if len(y) else 0.0

    for n, acc in enumerate(found.accuracy):
        if acc <= target and replayed(n) <= target:
            return FlipsTo(n, found.flips[:n], found.accuracy, replayed(n), target)
    return FlipsTo(None, found.flips, found.accuracy, replayed(len(found.flips)), target)
