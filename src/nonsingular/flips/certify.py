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
    backward,
    bound,
    chain_bounds,
    gamma,
    layer_terms,
    margin_matrix,
    read_chain,
    relax,
)
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


def _read(model: nn.Module, x: Tensor, y: Tensor, threat: Threat) -> tuple:
    graph, x, y, logits = read_batch(model, x, y)
    check_domain(x, threat)
    space = FlipSpace(model, threat)
    chain = read_chain(model, space, threat.flips)
    out = x.flatten(1).double()
    for i, layer in enumerate(chain):
        out = out @ layer.weight.T + layer.bias
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
    ``eps_x``), by ``ibp`` or ``crown`` (``bab``: ``flip_bab``)."""
    if method not in METHODS:
        raise ConfigError(
            f"for bit flips, method must be one of {', '.join(METHODS)}; got {method!r}"
        )
    space, chain, x, y, logits = _read(model, x, y, threat)
    budget = arithmetic(threat.flips, logits.dtype)
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), CHUNK):
            lo, hi = input_box(x[i : i + CHUNK], threat)
            low, _ = margin_bounds(chain, lo, hi, y[i : i + CHUNK], method == "crown", budget)
            parts.append(low.masked_fill(low.isnan(), float("-inf")))
    lower = torch.cat(parts) if parts else x.new_zeros(0, logits.shape[1], dtype=torch.float64)
    return CertifyResult(lower, method, threat, margins(logits, y))


def _candidates(
    chain: list[Dense], bounds: ChainBounds, y: Tensor, budget: Arithmetic, space: FlipSpace
) -> list[tuple[int, Tensor, Tensor]]:
    """For one example (a batch of one): per flipped layer, the flips ``(F, 3)`` (row, column,
    bit position) that CROWN cannot rule out: ``|lambda_j| * |delta| * max|h_i|`` reaches
    the margin's bound without flips for some class; and ``(K,)`` a lower bound on each
    margin under any one flip of that layer that is ruled out."""
    c = margin_matrix(y, chain[-1].weight.shape[0], torch.float64)
    const, _ = backward(chain, bounds, len(chain) - 1, c, 0, budget)
    lam = c
    found = []
    for m in range(len(chain) - 1, -1, -1):
        layer = chain[m]
        if layer.flips is not None:
            weight = space.params[layer.name]
            delta = space.deltas(layer.name, space.integers[layer.name], weight).double().abs()
            h_abs = torch.maximum(bounds.h_lo[m].abs(), bounds.h_hi[m].abs())[0]
            ratio = const[0, :, None] / lam[0].abs().clamp_min(1e-300)  # (K, n_out)
            ratio = ratio.masked_fill(lam[0].abs() == 0, float("inf"))
            ratio[y[0]] = float("inf")
            threshold = ratio.min(dim=0).values  # (n_out,)
            effect = delta.view(*weight.shape, -1) * h_abs[None, :, None]
            effect = effect * (1 + 8 * budget.unit)  # the effect's own rounding
            mask = effect >= threshold[:, None, None]
            hit = mask.nonzero()
            rest = effect.masked_fill(mask, 0.0).flatten(1).amax(1)  # (n_out,) largest left
            spared = const[0] - (lam[0].abs() * rest).amax(1)  # (K,) over flips ruled out
            flips = torch.cat([hit[:, :2], space.allowed[hit[:, 2]][:, None]], 1)
            found.append((m, flips, spared))
        if m == 0:
            break
        a = lam @ layer.weight
        lower, upper, _ = relax(*bounds.pre[m - 1])
        lam = torch.where(a >= 0, a * lower[:, None], a * upper[:, None])
    return found


def _tail(
    chain: list[Dense], point: ChainBounds, m: int, flips: Tensor, dw: Tensor, budget: Arithmetic
) -> tuple[Tensor, Tensor]:
    """Logit boxes ``(F, classes)`` of one example with each single flip of layer ``m``
    (``flips`` rows ``(row, column, bit)``, ``dw`` its weight change): the unflipped point
    boxes (its rounding) moved in one coordinate, then interval arithmetic to the output."""
    layer = chain[m]
    lo, hi = point.h_lo[m][0], point.h_hi[m][0]
    centre = (lo + hi) / 2 @ layer.weight.T + layer.bias
    radius = (hi - lo) / 2 @ layer.weight.abs().T + point.terms[m].err[0]
    rows, cols, count = flips[:, 0], flips[:, 1], len(flips)
    zc, zr = centre.repeat(count, 1), radius.repeat(count, 1)
    at = torch.arange(count)
    h_abs = torch.maximum(lo[cols].abs(), hi[cols].abs())
    zc[at, rows] += dw * (lo[cols] + hi[cols]) / 2
    zr[at, rows] += dw.abs() * (
        (hi[cols] - lo[cols]) / 2 + gamma(layer.fan_in + 1, budget.unit) * h_abs
    )
    for nxt in chain[m + 1 :]:
        h_lo, h_hi = (zc - zr).clamp_min(0), (zc + zr).clamp_min(0)
        err = layer_terms(nxt, h_hi, budget.k, budget.unit, budget.tiny).err
        zc = (h_lo + h_hi) / 2 @ nxt.weight.T + nxt.bias
        zr = (h_hi - h_lo) / 2 @ nxt.weight.abs().T + err
    return zc - zr, zc + zr


def _single_flips(
    space: FlipSpace, chain: list[Dense], x: Tensor, y: Tensor, budget: Arithmetic, deadline: float
) -> tuple[str, list, Tensor, int]:
    """Complete search over single flips of one example ``(1, ...)``: ``(status, flips,
    lower (classes,), flips run exactly)``."""
    lo, hi = input_box(x, Threat(bounds=None))
    bounds = chain_bounds(chain, lo, hi, True, budget)
    plain = [Dense(d.name, d.weight, d.bias, None) for d in chain]
    point = chain_bounds(plain, lo, hi, False, budget)
    c = margin_matrix(y, chain[-1].weight.shape[0], torch.float64)
    low, _ = backward(plain, point, len(chain) - 1, c, len(chain) - 1, budget)
    lower, ran, unsure = low[0].clone(), 0, []
    for m, flips, spared in _candidates(chain, bounds, y, budget, space):
        lower = torch.minimum(lower, spared)
        name, weight = chain[m].name, space.params[chain[m].name]
        delta = space.deltas(name, space.integers[name], weight).view(*weight.shape, -1)
        column = torch.searchsorted(space.allowed, flips[:, 2].contiguous())
        for part in range(0, len(flips), 4096):
            if time.monotonic() > deadline:
                return "unknown", [], lower, ran
            f = flips[part : part + 4096]
            dw = delta[f[:, 0], f[:, 1], column[part : part + 4096]].double()
            z_lo, z_hi = _tail(chain, point, m, f, dw, budget)
            worst = (z_lo.gather(1, y.expand(len(f))[:, None]) - z_hi).scatter(
                1, y.expand(len(f))[:, None], float("inf")
            )
            lower = torch.minimum(lower, worst.min(0).values)
            ran += len(f)
            cols = weight.shape[1]
            unsure += [
                (name, int(r) * cols + int(i), int(b))
                for r, i, b in f[worst.min(1).values <= 0].tolist()
            ]
    if not unsure:
        return "certified", [], lower, ran
    margins_found = space.replay_margins(
        x.expand(len(unsure), *x.shape[1:]), y.expand(len(unsure)), [[u] for u in unsure]
    )
    broken = (margins_found <= 0).nonzero().flatten()
    if len(broken):
        return "broken", [unsure[int(broken[0])]], lower, ran
    return "unknown", [], lower, ran


def flip_bab(
    model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *, time_limit: float = 5.0
) -> BabResult:
    """Complete verification of one bit flip (``threat.flips == 1``, ``eps_x == 0``): CROWN
    first; for each example it leaves open, every single flip its bounds cannot rule out is
    bounded at the point (its rounding included) and, where that is not enough, run on the
    unmodified model: certified, broken with the flip (``attack.bit_flips(i)``), or unknown
    after ``time_limit`` seconds. With ``eps_x > 0`` open examples are unknown."""
    if threat.flips != 1:
        raise ConfigError(
            f"bab for bit flips is complete for flips=1 only; got flips={threat.flips}"
        )
    space, chain, x, y, logits = _read(model, x, y, threat)
    budget = arithmetic(1, logits.dtype)
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
                state, flips, low, domains[i] = _single_flips(
                    space, chain, x[i : i + 1], y[i : i + 1], budget, start + time_limit
                )
                if state != "unknown":  # every flip was bounded: a lower bound for all
                    lower[i] = torch.maximum(low, root.lower[i])
            status.append(state)
            sets.append(flips)
            seconds[i] = time.monotonic() - start
    from .attack import _result

    found = _result(model, space, x, x, y, threat, "bab", sets, torch.zeros(0))
    return BabResult(status, lower, domains, seconds, found, threat)
