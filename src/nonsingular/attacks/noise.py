"""The fault-injection baseline: uniform draws from the joint ball, one weight draw per sample
serving the whole batch."""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.graph import Graph
from ..seeds import mix
from ..threat import Threat
from .best import BestSoFar
from .result import AttackResult
from .space import JointSpace, State, margins


def noise(
    graph: Graph,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    clean: Tensor,
    samples: int,
    seed: int,
    positions: Tensor,
) -> AttackResult:
    """``samples`` uniform draws; the best per example (or per batch when shared) is kept.
    The input's draws belong to each example (``positions``); each weight draw serves all."""
    space = JointSpace(graph, threat, x, shared_weights=True)
    best = BestSoFar(space, x, clean, shared=threat.scope == "shared")
    choice = torch.full((len(y),), -1, dtype=torch.long, device=x.device)
    index = torch.arange(len(y), device=x.device)

    def draw(j: int, rows: Tensor | None = None) -> State:
        where = positions if rows is None else positions[rows.cpu()]
        return space.random(x if rows is None else x[rows], mix(seed, "noise", j), where)

    trace = []
    with torch.no_grad():
        for j in range(samples if space.balls else 0):
            state = draw(j)
            m = margins(space.forward(x, state), y)
            trace.append(float(-m.mean()))
            improved = best.offer(index, m, state, space.inputs(x, state))
            choice[improved] = j

    def deltas(i: int) -> dict[str, Tensor]:
        j = int(choice[i])
        if j < 0:
            return {}
        row = torch.tensor([i], device=x.device)
        return space.materialize(best.x_adv[row], space.select(draw(j, row), torch.tensor([0])))

    return AttackResult(
        best.x_adv,
        best.margins,
        clean,
        best.margins <= 0,
        threat,
        "noise",
        torch.tensor(trace),
        deltas,
        untouched=space.untouched,
    )
