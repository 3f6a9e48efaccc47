"""The experiment's bit-flip family: each trained model quantized to 8 bits per output channel
(``ns.quantize``), then

- the shared progressive bit search (one flip set for every attacked example, what
  ``ns.attack(q, x, y, Threat(flips=k, scope="shared"))`` finds) at each count ``k`` of
  ``Experiment.flips``: the accuracy of the best prefix of at most ``k`` of its flips,
  replayed example by example on the unmodified quantized model;
- random faults at each ``k``: ``Experiment.flip_draws`` draws of ``k`` distinct random flips
  (``method="noise"``'s draws, seeded by the training seed, so every method of one seed meets
  the same fault positions), their mean, sd, lowest and highest accuracy;
- flips to collapse (``ns.flips_to``): how many flips of the same search bring the accuracy
  to chance + 1 point, counted by replay, with the flips themselves (replayable).

The search at each ``k`` is a prefix of one greedy search (each step keeps the best flip given
the earlier ones), so one search serves every count: the flips-to-collapse search's when it
ran at least ``max(flips)`` steps, otherwise a search of ``max(flips)`` steps of its own.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flips import flips_to, quantize, quantized
from ..flips.attack import fault_draws  # method="noise"'s draws, without replaying the worst one
from ..flips.grid import Flip
from ..flips.search import progressive_search
from ..flips.space import FlipSpace
from ..seeds import mix
from ..threat import Threat
from .config import FLIP_BITS, FLIP_GRANULARITY, Experiment

FORMAT = 1  # raised when what the family's numbers mean changes: older cached ones recomputed


@dataclass(frozen=True)
class FlipFamily:
    """One model's bit-flip family (accuracies are fractions of the attacked examples).

    counts:           the flip counts (``Experiment.flips``).
    clean:            the quantized model's clean accuracy (the float one is ``Measured.clean``).
    search:           per count, the shared search's accuracy with at most that many flips.
    search_used:      per count, how many of ``search_flips`` that accuracy used (a prefix).
    search_flips:     the search's flips in the order found: ``(weight, flat index, bit)``.
    fault_mean, fault_sd, fault_low, fault_high: per count, over the random draws (at 0 flips:
                      the quantized model itself, sd 0).
    draws:            random draws per count.
    target:           the collapse target: chance + 1 point.
    collapse:         flips to collapse (None: not reached within ``limit``).
    collapse_flips:   those flips (all the search tried when not reached).
    collapse_replayed: the accuracy they give, replayed example by example.
    limit:            the most flips the collapse search could take.
    seconds:          the time the family took to measure.
    """

    counts: tuple[int, ...]
    clean: float
    search: tuple[float, ...]
    search_used: tuple[int, ...]
    search_flips: tuple[Flip, ...]
    fault_mean: tuple[float, ...]
    fault_sd: tuple[float, ...]
    fault_low: tuple[float, ...]
    fault_high: tuple[float, ...]
    draws: int
    target: float
    collapse: int | None
    collapse_flips: tuple[Flip, ...]
    collapse_replayed: float
    limit: int
    bits: int = FLIP_BITS
    granularity: str = FLIP_GRANULARITY
    seconds: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.counts)
        per_count = ("search", "search_used", "fault_mean", "fault_sd", "fault_low", "fault_high")
        if n == 0 or any(len(getattr(self, name)) != n for name in per_count):
            raise ConfigError(
                f"a bit-flip family holds one value per flip count ({n}) in each of "
                f"{', '.join(per_count)}"
            )
        if max(self.search_used) > len(self.search_flips):
            raise ConfigError("a bit-flip family's search uses more flips than it holds")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, value in out.items():
            if isinstance(value, tuple):
                out[name] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlipFamily:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ConfigError(f"not a bit-flip family: {str(data)[:80]!r}")
        values = {}
        for name, value in data.items():
            if name in ("search_flips", "collapse_flips"):
                value = tuple((str(w), int(i), int(b)) for w, i, b in value)
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)


def quantized_digest(model: nn.Module) -> str:
    """A hash of a quantized model: its weights and biases, and its grid (bits, scales)."""
    grid = quantized(model)
    digest = hashlib.sha256(f"{grid.bits} {grid.granularity}".encode())
    for name, tensor in [*model.state_dict().items(), *grid.scales.items()]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def quantized_model(model: nn.Module) -> nn.Module:
    """The experiment's quantized copy of ``model`` (``model`` is untouched)."""
    return quantize(model, bits=FLIP_BITS, granularity=FLIP_GRANULARITY)


def _accuracy(space: FlipSpace, x: Tensor, y: Tensor, flips: list[Flip]) -> float:
    """Accuracy under ``flips``, each example replayed alone (``FlipAttackResult.replay``)."""
    m = space.replay_margins(x, y, [flips] * len(y))
    return float((m > 0).float().mean())


def _curve(
    space: FlipSpace, x: Tensor, y: Tensor, counts: tuple[int, ...], flips: list[Flip], trace
) -> tuple[list[float], list[int]]:
    """Per count ``k``: the replayed accuracy of the best prefix of at most ``k`` flips (the
    lowest search accuracy, the longest among equals: ``Search.best_prefix``) and its length."""
    accuracy, used = [], []
    for k in counts:
        seen = trace[: k + 1]
        low = min(seen)
        j = max(i for i, a in enumerate(seen) if a == low)
        used.append(j)
        accuracy.append(_accuracy(space, x, y, flips[:j]))
    return accuracy, used


def _faults_at(
    q: nn.Module, x: Tensor, y: Tensor, counts: tuple[int, ...], draws: int, seed: int, clean
) -> list[tuple[float, float, float, float]]:
    """Per count: mean, sd, lowest and highest accuracy over ``draws`` random flip sets."""
    out = []
    for k in counts:
        if k == 0:
            out.append((clean, 0.0, clean, clean))
            continue
        threat = Threat(flips=k, scope="shared", bounds=None)
        _, acc = fault_draws(FlipSpace(q, threat), x, y, threat, draws, mix(seed))
        sd = float(acc.std()) if len(acc) > 1 else 0.0
        out.append((float(acc.mean()), sd, float(acc.min()), float(acc.max())))
    return out


def measure_flips(q: nn.Module, x: Tensor, y: Tensor, exp: Experiment, seed: int) -> FlipFamily:
    """The bit-flip family of the quantized model ``q`` (``quantized_model``) on ``(x, y)``;
    ``seed`` seeds the random draws."""
    start = time.perf_counter()
    with torch.enable_grad():
        found = flips_to(q, x, y, max_flips=exp.flip_limit)
    top = max(exp.flips)
    space = FlipSpace(q, Threat(flips=max(top, 1), scope="shared", bounds=None))
    clean = _accuracy(space, x, y, [])
    if len(found.flip_set) >= top:  # the collapse search ran every step the curve needs
        flips, trace = list(found.flip_set), found.accuracy
    else:
        with torch.enable_grad():
            search = progressive_search(space, x, y, top, target=0.0, loss="ce", tries=1)
        flips, trace = search.flips, search.accuracy
    search_accuracy, used = _curve(space, x, y, exp.flips, flips, trace)
    flips = flips[: max(used)]
    faults = _faults_at(q, x, y, exp.flips, exp.flip_draws, seed, clean)
    mean, sd, low, high = (tuple(f[i] for f in faults) for i in range(4))
    return FlipFamily(
        counts=exp.flips,
        clean=clean,
        search=tuple(search_accuracy),
        search_used=tuple(used),
        search_flips=tuple(flips),
        fault_mean=mean,
        fault_sd=sd,
        fault_low=low,
        fault_high=high,
        draws=exp.flip_draws,
        target=found.target,
        collapse=found.flips,
        collapse_flips=tuple(found.flip_set),
        collapse_replayed=found.replayed,
        limit=exp.flip_limit,
        seconds=time.perf_counter() - start,
    )
