"""The complete search over single bit flips of one example (``flip_bab``, docs/quantization.md).

A flip of weight ``W[r, c]`` of layer m by ``dw`` moves one pre-activation, ``z_m[r]``, by
``dw * h_c``; every other value up to layer m is unchanged. So each flip of row r is a value
``t`` of one scalar, ``z_m[r]``, and the margin is a function of ``t``. The flips of each row
are sorted by ``t``; a range of them is bounded at once by bounds on every neuron downstream
that are affine in ``t`` (ReLUs relaxed over the range; every layer's rounding as the other
certificates count it, the flip's own included in ``t``'s radius). A range not certified is
halved; a range of one value of ``t`` still not certified is run exactly on the unmodified
model, which either breaks the example (the flip is returned) or leaves the margin inside the
rounding (then no bound can decide it: the example stays unknown).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .bounds import Arithmetic, Dense, gamma, layer_terms, relax

BATCH = 2048  # ranges bounded together
REPLAYS = 256  # flips run on the model between looks at the clock
DIRECT = 1 << 22  # the largest products a spare flip's moves are taken over directly
EPS64 = torch.finfo(torch.float64).eps  # covers dw's own rounding for float64 weights
# A flip as the search names it: (layer index, row, column, index into the allowed bits).
Found = tuple[int, int, int, int]


@dataclass
class Pass:
    """One example through the unflipped chain: ``h_lo[m], h_hi[m]`` the input box of layer m
    and ``z_mid[m] +- z_rad[m]`` its output box, both from the model's rounding alone."""

    h_lo: list[Tensor]
    h_hi: list[Tensor]
    z_mid: list[Tensor]
    z_rad: list[Tensor]


def point_pass(chain: list[Dense], x: Tensor, budget: Arithmetic) -> Pass:
    """The boxes of ``x`` (one example, flat) through ``chain`` with no flip."""
    lo = hi = x.flatten().double()
    p = Pass([], [], [], [])
    for layer in chain:
        plain = Dense(layer.name, layer.weight, layer.bias, None)
        h_abs = torch.maximum(lo.abs(), hi.abs())[None]
        err = layer_terms(plain, h_abs, 1, budget.unit, budget.tiny).err[0]
        mid = (lo + hi) / 2 @ layer.weight.T + layer.bias
        rad = (hi - lo) / 2 @ layer.weight.abs().T + err
        p.h_lo.append(lo)
        p.h_hi.append(hi)
        p.z_mid.append(mid)
        p.z_rad.append(rad)
        lo, hi = (mid - rad).clamp_min(0), (mid + rad).clamp_min(0)
    return p


@dataclass
class Rows:
    """The single flips of one layer, row by row, sorted by the value they give ``z_m[r]``:
    ``t`` ``(n_out, F)`` its centre, ``order`` ``(n_out, F)`` each flip's column times the
    number of allowed bits plus its bit's index, ``rad`` ``(n_out,)`` the row's largest
    radius (the unflipped box, the flip's rounding and its input's box)."""

    t: Tensor
    order: Tensor
    rad: Tensor


def sorted_rows(dw: Tensor, p: Pass, m: int, budget: Arithmetic) -> Rows:
    """``dw`` ``(n_out, n_in, n_bits)``: the exact weight change of each flip of layer m."""
    lo, hi = p.h_lo[m], p.h_hi[m]
    h_abs = torch.maximum(lo.abs(), hi.abs())
    t = p.z_mid[m][:, None, None] + dw * ((lo + hi) / 2)[None, :, None]
    spread = (hi - lo) / 2 + (gamma(dw.shape[1] + 1, budget.unit) + EPS64) * h_abs
    rad = p.z_rad[m] + (dw.abs() * spread[None, :, None]).flatten(1).amax(1)
    t, order = t.flatten(1).sort(dim=1)
    return Rows(t, order, rad)


def _relu_affine(a_lo, b_lo, a_hi, b_hi, t_lo, t_hi):
    """ReLU of neurons bounded by ``a t + b``: the affine bounds of its output and its largest
    value."""
    z_lo = b_lo + torch.minimum(a_lo * t_lo, a_lo * t_hi)
    z_hi = b_hi + torch.maximum(a_hi * t_lo, a_hi * t_hi)
    lower, upper, intercept = relax(z_lo, z_hi)
    return lower * a_lo, lower * b_lo, upper * a_hi, upper * b_hi + intercept, z_hi.clamp_min(0)


def range_bounds(
    chain: list[Dense], p: Pass, m: int, rows: Tensor, t_lo: Tensor, t_hi: Tensor, c: Tensor,
    budget: Arithmetic, spare: Spare | None = None,
) -> Tensor:  # fmt: skip
    """``(N, K)`` lower bounds on ``c . z`` (``c`` ``(K, classes)``) with ``z_m[rows[n]]``
    anywhere in ``[t_lo[n], t_hi[n]]`` and every other value of layer m in its box; with
    ``spare`` (a layer at or after m), and one more flip of any weight of that layer: each of
    its neurons lowered and raised by the most one flip of its row can move it (in the last
    layer the flip moves one logit, so a margin loses the larger of its two logits' moves)."""
    last = len(chain) - 1
    count, at = len(rows), torch.arange(len(rows))
    a = t_lo.new_zeros(count, chain[m].weight.shape[0])
    a[at, rows] = 1.0
    b_lo = (p.z_mid[m] - p.z_rad[m]).expand_as(a).clone()
    b_hi = (p.z_mid[m] + p.z_rad[m]).expand_as(a).clone()
    b_lo[at, rows], b_hi[at, rows] = 0.0, 0.0
    h_hi, h_lo = p.h_hi[m][None], p.h_lo[m][None]
    where = None if spare is None else spare.at
    if where == m and m < last:
        down, up = _moves(spare, h_hi, h_lo, budget)
        b_lo, b_hi = b_lo - down, b_hi + up
    a_lo, a_hi, t_lo, t_hi = a, a, t_lo[:, None], t_hi[:, None]
    if m == last:  # the flipped layer gives the logits
        coef = a_lo @ c.clamp(min=0).T + a_hi @ c.clamp(max=0).T
        const = b_lo @ c.clamp(min=0).T + b_hi @ c.clamp(max=0).T
        low = const + torch.minimum(coef * t_lo, coef * t_hi)
    else:
        low, h_hi = _downstream(
            chain, p, m, (a_lo, b_lo, a_hi, b_hi), (t_lo, t_hi), c, budget, spare
        )
        h_lo = None
    if where == last:  # (N or 1, classes) each
        down, up = _moves(spare, h_hi, h_lo, budget, p.h_hi[last])
        loss = torch.maximum(
            c.clamp(min=0)[None] * down[:, None], -c.clamp(max=0)[None] * up[:, None]
        )
        low = low - loss.amax(-1)
    return low


def _downstream(
    chain: list[Dense], p: Pass, m: int, bounds: tuple, t: tuple[Tensor, Tensor], c: Tensor,
    budget: Arithmetic, spare: Spare | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``range_bounds`` from the affine bounds of ``z_m`` on: the margins' lower bounds
    (without a spare flip of the last layer) and the last layer's input bound (``h >= 0``)."""
    a_lo, b_lo, a_hi, b_hi = bounds
    (t_lo, t_hi), count = t, len(a_lo)
    for idx in range(m + 1, len(chain)):
        layer = chain[idx]
        a_lo, b_lo, a_hi, b_hi, h_abs = _relu_affine(a_lo, b_lo, a_hi, b_hi, t_lo, t_hi)
        plain = Dense(layer.name, layer.weight, layer.bias, None)
        err = layer_terms(plain, h_abs, 1, budget.unit, budget.tiny).err
        down = up = 0.0
        if spare is not None and spare.at == idx and idx < len(chain) - 1:
            down, up = _moves(spare, h_abs, None, budget, p.h_hi[idx])
        weight, bias = layer.weight, layer.bias
        if idx == len(chain) - 1:
            weight, bias, err = c @ weight, c @ bias, err @ c.abs().T
        mid = torch.cat([a_lo + a_hi, b_lo + b_hi]) / 2 @ weight.T
        rad = torch.cat([a_hi - a_lo, b_hi - b_lo]) / 2 @ weight.abs().T
        a_lo, a_hi = mid[:count] - rad[:count], mid[:count] + rad[:count]
        b_lo = mid[count:] - rad[count:] + bias - err - down
        b_hi = mid[count:] + rad[count:] + bias + err + up
    return b_lo + torch.minimum(a_lo * t_lo, a_lo * t_hi), h_abs


@dataclass
class Spare:
    """One more flip allowed in layer ``at``: ``up``, ``down`` ``(n_out, n_in)`` the most one
    flip raises and lowers each weight (from the unflipped integers; flips of distinct bits of
    one integer add up exactly)."""

    at: int
    up: Tensor
    down: Tensor

    @classmethod
    def of(cls, at: int, changes: Tensor) -> Spare:
        return cls(at, changes.clamp_min(0).amax(-1), (-changes).clamp_min(0).amax(-1))


def _moves(
    spare: Spare, h_hi: Tensor, h_lo: Tensor | None, budget: Arithmetic,
    near: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(N, n_out)`` each: at least how far one flip of ``spare``'s layer lowers and raises
    each neuron for inputs in ``[h_lo, h_hi]`` ``(N, n_in)`` (``h_lo`` None: zero), its
    rounding included."""
    grow = 1 + gamma(spare.up.shape[1] + 1, budget.unit)
    pos = h_hi.clamp_min(0)
    down, up = _largest(spare.down, pos, near), _largest(spare.up, pos, near)
    if h_lo is not None and bool((h_lo < 0).any()):
        neg = (-h_lo).clamp_min(0)
        down = torch.maximum(down, _largest(spare.up, neg, None))
        up = torch.maximum(up, _largest(spare.down, neg, None))
    return down * grow, up * grow


def _largest(a: Tensor, h: Tensor, near: Tensor | None) -> Tensor:
    """``(N, n_out)`` at least ``max_i a_ji h_i`` for ``a`` ``(n_out, n_in)`` and ``h``
    ``(N, n_in)``, both nonnegative. With ``near`` ``(n_in,)`` and a large batch, through it:
    ``max_i a_ji near_i + max_i a_ji * max_i (h_i - near_i)+``, linear in N rather than
    N n_out n_in."""
    if near is None or len(h) * a.numel() <= DIRECT:
        step = max(1, DIRECT // a.numel())
        return torch.cat([(a[None] * part[:, None]).amax(2) for part in h.split(step)])
    above = (h - near).clamp_min(0).amax(1, keepdim=True)  # (N, 1)
    return (a * near).amax(1) + a.amax(1) * above


@dataclass
class Outcome:
    """A search's end: ``status`` certified, broken (``flips`` break it on the model) or
    unknown (the time limit, or ``inside`` flips whose margin lies within the rounding);
    ``lower`` ``(classes,)`` a lower bound on each margin over the flips bounded (meaningful
    when certified); ``ranges`` the ranges bounded."""

    status: str
    flips: list[Found]
    lower: Tensor
    ranges: int
    inside: int = 0


@dataclass
class Problem:
    """One example's search: the chain, its unflipped pass, each layer's exact weight changes
    ``(n_out, n_in, n_bits)`` (None: not flipped), the margin matrix ``c`` ``(K, classes)``
    (``+inf`` bounds at the label's own row are ignored), and ``replay``: the margins the
    unmodified model gives under each flip of a list."""

    chain: list[Dense]
    point: Pass
    changes: list[Tensor | None]
    c: Tensor
    label: int
    replay: Callable[[list[Found]], Tensor]
    spares: dict[int, Spare] = field(default_factory=dict)


Settle = Callable[[list[Found], int, float], Outcome]


def search(problem: Problem, budget: Arithmetic, deadline: float) -> Outcome:
    """Every single flip of every flipped layer (the last layer first: its flips are the
    cheapest to bound), bounded by ranges; a range of one value still open is replayed at
    once, and the example is broken as soon as a replay breaks it."""
    return _sweep(
        problem, budget, deadline, False, lambda live, dead, at: _replay(problem, live, dead, at)
    )


def pair_search(
    problem: Problem, flipped: Callable[[Found], Problem], budget: Arithmetic, deadline: float
) -> Outcome:
    """Every set of at most two flips: the single flips first (``search``); then every first
    flip f1, the one of a pair in the lower layer (either of two in one layer), by ranges
    bounded with one more flip allowed from f1's layer on; each f1 of a range of one value
    still open is applied (``flipped(f1)``: the problem of the model it makes, with the flips
    of f1's layer and later ones) and the single-flip search run on the rest. A first flip
    meeting an input that is exactly zero changes nothing a later flip could see, so its pairs
    are the single flips, already certified."""
    first = search(problem, budget, deadline)
    if first.status != "certified":
        return first

    def settle(live: list[Found], dead: int, at: float) -> Outcome:
        lower = torch.full_like(problem.c[:, 0], float("inf"))
        ranges, inside = 0, 0
        for f1 in live:
            if time.monotonic() > at:
                return Outcome("unknown", [], lower, ranges, inside + 1)
            out = search(flipped(f1), budget, at)
            ranges += out.ranges
            if out.status == "broken":
                return Outcome("broken", [f1, *out.flips], lower, ranges, inside)
            if out.status == "unknown":
                inside += max(out.inside, 1)
            lower = torch.minimum(lower, out.lower)
        return Outcome("unknown" if inside else "certified", [], lower, ranges, inside)

    second = _sweep(problem, budget, deadline, True, settle)
    second.lower = torch.minimum(second.lower, first.lower)
    second.ranges += first.ranges
    return second


def _replay(problem: Problem, live: list[Found], dead: int, deadline: float) -> Outcome:
    """Run single flips on the model, the likeliest first: broken at the first that breaks
    the example; else they are open (their margins inside the rounding)."""
    lower = torch.full_like(problem.c[:, 0], float("inf"))
    for part in range(0, len(live), REPLAYS):
        if time.monotonic() > deadline:
            break
        some = live[part : part + REPLAYS]
        broken = (problem.replay(some) <= 0).nonzero().flatten()
        if len(broken):
            return Outcome("broken", [some[int(broken[0])]], lower, 0, 0)
    return Outcome("unknown", [], lower, 0, len(live) + dead)


def _sweep(
    problem: Problem, budget: Arithmetic, deadline: float, spare: bool, settle: Settle
) -> Outcome:
    """Each flipped layer's rows by ranges (``_layer``), the last layer first; certified when
    every range is, and the unflipped point too."""
    p, c = problem.point, problem.c
    box = (p.z_mid[-1] - p.z_rad[-1], p.z_mid[-1] + p.z_rad[-1])
    lower = c.clamp(min=0) @ box[0] + c.clamp(max=0) @ box[1]  # no flip
    lower[problem.label] = float("inf")
    total = Outcome("certified", [], lower, 0, 0)
    for m in range(len(problem.chain) - 1, -1, -1):
        if problem.changes[m] is None:
            continue
        rows = sorted_rows(problem.changes[m], problem.point, m, budget)
        out = _layer(problem, m, rows, budget, deadline, total, spare, settle)
        if out is not None:
            return out
    total.status = "certified" if total.inside == 0 and bool((total.lower > 0).all()) else "unknown"
    return total


def _layer(
    problem: Problem, m: int, rows: Rows, budget: Arithmetic, deadline: float,
    total: Outcome, spare: bool, settle: Settle,
) -> Outcome | None:  # fmt: skip
    """Bisect the ranges of layer m's rows, ``total`` kept up to date; an outcome when the
    example is broken or the time is up, else None."""
    n_out, width = rows.t.shape
    todo = [
        (torch.arange(n_out), torch.zeros(n_out, dtype=torch.long), torch.full((n_out,), width))
    ]
    while todo:
        if time.monotonic() > deadline:
            return Outcome("unknown", [], total.lower, total.ranges, total.inside)
        row, start, end = (v[:BATCH] for v in todo[-1])
        rest = [v[BATCH:] for v in todo.pop()]
        if len(rest[0]):
            todo.append(tuple(rest))
        t_lo = rows.t[row, start] - rows.rad[row]
        t_hi = rows.t[row, end - 1] + rows.rad[row]
        low = _bounds(problem, m, row, t_lo, t_hi, budget, spare)
        low[:, problem.label] = float("inf")
        total.ranges += len(row)
        worst = low.min(1).values
        done, single = worst > 0, rows.t[row, start] == rows.t[row, end - 1]
        if bool(done.any()):
            total.lower = torch.minimum(total.lower, low[done].amin(0))
        split, leaf = ~done & ~single, ~done & single
        if bool(split.any()):
            r, s, e = row[split], start[split], end[split]
            todo.append(
                (torch.cat([r, r]), torch.cat([s, (s + e) // 2]), torch.cat([(s + e) // 2, e]))
            )
        if bool(leaf.any()):
            order = worst[leaf].argsort()  # the likeliest to break first
            live, dead = _flips(m, rows, *(v[leaf][order] for v in (row, start, end)), problem)
            out = settle(live, dead, deadline)
            total.ranges += out.ranges
            if out.status == "broken":
                return Outcome("broken", out.flips, total.lower, total.ranges, total.inside)
            total.inside += out.inside
            bound = out.lower if out.status == "certified" else low[leaf].amin(0)
            total.lower = torch.minimum(total.lower, bound)
    return None


def _bounds(
    problem: Problem, m: int, row: Tensor, t_lo: Tensor, t_hi: Tensor, budget: Arithmetic,
    spare: bool,
) -> Tensor:  # fmt: skip
    """``range_bounds``; with ``spare``, the worst over the layers the second flip may be in."""
    args = (problem.chain, problem.point, m, row, t_lo, t_hi, problem.c, budget)
    layers = [i for i in range(m, len(problem.chain)) if problem.changes[i] is not None]
    if not spare or not layers:
        return range_bounds(*args)
    for i in layers:
        if i not in problem.spares:
            problem.spares[i] = Spare.of(i, problem.changes[i])
    return torch.stack([range_bounds(*args, problem.spares[i]) for i in layers]).amin(0)


def _flips(
    m: int, rows: Rows, row: Tensor, start: Tensor, end: Tensor, problem: Problem
) -> tuple[list[Found], int]:
    """The flips of the given ranges that can change the model's output, and how many do
    not: a flip whose weight meets an input that is exactly zero (its box is ``[0, 0]``: a
    zero pixel or a ReLU the rounding box keeps off) changes a product ``w * 0`` from one zero to
    another, so the model computes the logits it computes without it."""
    point = problem.point
    n_bits, live = problem.changes[m].shape[2], (point.h_hi[m] != 0) | (point.h_lo[m] != 0)
    out, dead = [], 0
    for r, s, e in zip(row.tolist(), start.tolist(), end.tolist(), strict=True):
        for f in rows.order[r, s:e].tolist():
            if live[f // n_bits]:
                out.append((m, r, f // n_bits, f % n_bits))
            else:
                dead += 1
    return out, dead
