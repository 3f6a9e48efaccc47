"""Certificates for bit flips: ``ibp`` and ``crown`` bounds (``bounds.py``), and the complete
method for one flip (``bab``): bound, then run exactly every flip the bounds cannot rule out.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from ..attacks.space import check_domain, margins
from ..certificates import BabResult, CertifyResult
from ..errors import ConfigError, UnsupportedModelError
from ..model.verify import read_batch
from ..threat import Threat
from .bounds import (
    Arithmetic,
    ChainBounds,
    Dense,
    bound,
    chain_bounds,
    margin_matrix,
    read_chain,
    weight_changes,
)
from .conv import Conv
from .exact import Found, Outcome, Problem, pair_search, point_pass, search
from .grid import Flip, dequantize
from .space import FlipSpace

METHODS = ("ibp", "crown")
CHUNK = 8  # examples bounded together (CROWN's matrices are (chunk, 2 n, n))


def arithmetic(k: int, model_dtype: torch.dtype) -> Arithmetic:
    """The budget, with the model's unit roundoff plus float64's (the bound computation's)."""
    mine, ours = torch.finfo(model_dtype), torch.finfo(torch.float64)
    return Arithmetic(k, (mine.eps + ours.eps) / 2, mine.tiny + ours.tiny)


def input_box(x: Tensor, threat: Threat) -> tuple[Tensor, Tensor]:
    """``(B, n)`` box of the inputs in float64: the linf box of radius eps_x (which holds the
    l2 ball too), clamped into the bounds."""
    x = x.flatten(1).double()
    lo, hi = x - threat.eps_x, x + threat.eps_x
    if threat.bounds is not None:
        lo, hi = lo.clamp(*threat.bounds), hi.clamp(*threat.bounds)
    return lo, hi


def _read(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, conv: bool = False) -> tuple:
    """The space, chain (Conv2d allowed when ``conv``: ibp), batch and logits, the chain
    checked to compute the model's logits."""
    graph, x, y, logits = read_batch(model, x, y)
    check_domain(x, threat)
    space = FlipSpace(model, threat)
    chain = read_chain(model, space, threat.flips, tuple(x.shape[1:]) if conv else None)
    out = x.flatten(1).double()
    for i, layer in enumerate(chain):
        out = layer.forward(out) if isinstance(layer, Conv) else out @ layer.weight.T + layer.bias
        out = out.clamp_min(0) if i < len(chain) - 1 else out
    scale = 1.0 + float(logits.abs().max()) if len(x) else 1.0
    if len(x) and float((out - logits.double()).abs().max()) > 1e-3 * scale:
        raise UnsupportedModelError("the model does not compute the Linear/ReLU chain it holds")
    return space, chain, x, y, logits


def margin_bounds(
    chain: list[Dense], lo: Tensor, hi: Tensor, y: Tensor, crown: bool, budget: Arithmetic
) -> tuple[Tensor, ChainBounds]:
    """``(B, classes)`` lower bounds on ``z_y - z_j`` (``+inf`` at j = y) and the boxes."""
    bounds = chain_bounds(chain, lo, hi, crown, budget)
    c = margin_matrix(y, chain[-1].weight.shape[0], lo.dtype)
    low = bound(chain, bounds, len(chain) - 1, c, crown, budget)
    return low.scatter(1, y[:, None], float("inf")), bounds


def flip_certify(
    model: nn.Module, x: Tensor, y: Tensor, threat: Threat, method: str
) -> CertifyResult:
    """Certified margins of the quantized MLP ``model`` under ``threat.flips`` bit flips (and
    ``eps_x``), by ``ibp`` or ``crown`` (``bab``: ``flip_bab``); ``ibp`` also covers Conv2d
    layers (``conv.py``)."""
    if method not in METHODS:
        raise ConfigError(
            f"for bit flips, method must be one of {', '.join(METHODS)}; got {method!r}"
        )
    space, chain, x, y, logits = _read(model, x, y, threat, conv=method == "ibp")
    budget = arithmetic(threat.flips, logits.dtype)
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), CHUNK):
            lo, hi = input_box(x[i : i + CHUNK], threat)
            low, _ = margin_bounds(chain, lo, hi, y[i : i + CHUNK], method == "crown", budget)
            parts.append(low.masked_fill(low.isnan(), float("-inf")))
    lower = torch.cat(parts) if parts else x.new_zeros(0, logits.shape[1], dtype=torch.float64)
    return CertifyResult(lower, method, threat, margins(logits, y))


def single_problem(
    space: FlipSpace, chain: list[Dense], x: Tensor, y: Tensor, budget: Arithmetic,
    first: Found | None = None,
) -> Problem:  # fmt: skip
    """The search over single flips of one example ``(1, ...)``, replayed through ``space``
    (the unmodified model); after the flip ``first``, when given, over the flips of its layer
    and later ones only (the pairs with a flip below are searched from that flip)."""
    ints = dict(space.integers)
    weights = {d.name: space.params[d.name] for d in chain if d.flips is not None}
    if first is not None:
        name = chain[first[0]].name
        ints = space.current([_flip(space, chain, first)])
        weights[name] = dequantize(ints[name], space.quantization.scales[name])
        layer = chain[first[0]]
        chain = list(chain)
        chain[first[0]] = Dense(name, weights[name].double(), layer.bias, layer.flips)
    before = [] if first is None else [_flip(space, chain, first)]

    def replay(found: list[Found]) -> Tensor:
        sets = [[*before, _flip(space, chain, f)] for f in found]
        return space.replay_margins(x.expand(len(sets), *x.shape[1:]), y.expand(len(sets)), sets)

    c = margin_matrix(y, chain[-1].weight.shape[0], torch.float64)[0]
    lowest = 0 if first is None else first[0]  # a pair's lower flip is its first
    changes = [
        None
        if d.flips is None or m < lowest
        else weight_changes(space, d.name, ints[d.name], weights[d.name])
        for m, d in enumerate(chain)
    ]
    return Problem(chain, point_pass(chain, x, budget), changes, c, int(y[0]), replay)


def _flip(space: FlipSpace, chain: list[Dense], found: Found) -> Flip:
    m, row, col, bit = found
    return (chain[m].name, row * chain[m].fan_in + col, int(space.allowed[bit]))


def _open_example(
    space: FlipSpace, chain: list[Dense], x: Tensor, y: Tensor, budget: Arithmetic, deadline: float
) -> Outcome:
    """The complete search for one example ``(1, ...)`` the bounds leave open: single flips
    (``budget.k == 1``) or pairs."""
    problem = single_problem(space, chain, x, y, budget)
    if budget.k == 1:
        return search(problem, budget, deadline)

    def flipped(first: Found) -> Problem:
        return single_problem(space, chain, x, y, budget, first)

    return pair_search(problem, flipped, budget, deadline)


def flip_bab(
    model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *, time_limit: float = 5.0
) -> BabResult:
    """Complete verification of one or two bit flips (``threat.flips`` 1 or 2, ``eps_x ==
    0``): CROWN first; for each example it leaves open, the flips are bounded by ranges of
    one neuron's flips and those not ruled out run on the unmodified model
    (``exact.search``, ``exact.pair_search``): certified, broken with its flips
    (``attack.bit_flips(i)``), or unknown (after ``time_limit`` seconds, or a margin inside
    the model's rounding). With ``eps_x > 0`` open examples are unknown."""
    if threat.flips not in (1, 2):
        raise ConfigError(
            f"bab for bit flips is complete for flips=1 or 2 only; got flips={threat.flips}"
        )
    space, chain, x, y, logits = _read(model, x, y, threat)
    budget = arithmetic(threat.flips, logits.dtype)
    root = flip_certify(model, x, y, threat, "crown")
    clean = margins(logits, y)
    status, sets, lower = [], [], root.lower.clone()
    domains, seconds = torch.zeros(len(y), dtype=torch.long), torch.zeros(len(y))
    with torch.no_grad():
        for i in range(len(y)):
            start = time.monotonic()
            state, flips = "unknown", []
            if bool(root.certified[i]):
                state = "certified"
            elif float(clean[i]) <= 0:
                state = "broken"
            elif threat.eps_x == 0:
                out = _open_example(
                    space, chain, x[i : i + 1], y[i : i + 1], budget, start + time_limit
                )
                state, domains[i] = out.status, out.ranges
                flips = [_flip(space, chain, f) for f in out.flips]
                if state == "certified":  # every flip was bounded: a lower bound for all
                    lower[i] = torch.maximum(out.lower, root.lower[i])
            status.append(state)
            sets.append(flips)
            seconds[i] = time.monotonic() - start
    from .attack import flip_attack_result

    found = flip_attack_result(model, space, x, x, y, threat, "bab", sets, torch.zeros(0))
    return BabResult(status, lower, domains, seconds, found, threat)
