"""Per-example best-so-far: a point counts as broken if any restart, loss or step broke it."""

from __future__ import annotations

import torch
from torch import Tensor

from .space import JointSpace, State


class BestSoFar:
    """Best-so-far tracker: per example, or for the batch as a whole when Delta is shared."""

    def __init__(
        self, space: JointSpace, x: Tensor, clean: Tensor, shared: bool, classes: int = 0
    ) -> None:
        self.space = space
        self.shared = shared
        self.margins = clean.clone()
        self.state = space.zeros(x)
        self.x_adv = x.clone()
        self.score = self._score(clean)
        self.classes = classes  # how many the model tells apart (targeted runs' targets)

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
