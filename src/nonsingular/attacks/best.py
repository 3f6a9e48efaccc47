"""Per-example best-so-far: a point counts as broken if any restart, loss or step broke it."""

from __future__ import annotations

import torch
from torch import Tensor

from .space import JointSpace, State, copy_rows


class BestSoFar:
    """Best-so-far tracker: per example, or for the batch as a whole when Delta is shared."""

    def __init__(
        self, space: JointSpace, x: Tensor, clean: Tensor, shared: bool, classes: int = 0
    ) -> None:
        self.space = space
        self.shared = shared
        self.margins = clean.clone()
        self.state = space.zeros(x)
        # variables whose best is an attack's iterate itself, held without a copy (attacks
        # never write into their iterates: each step makes new tensors); on a partial update
        # the best is written into a buffer of the tracker's own (``_own``), in place: on a
        # large per-example state a new tensor costs more than the copy
        self._borrowed: set[object] = set()
        self._own = dict(self.state)
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
            self._borrowed.clear()
            self.x_adv = x_adv.detach().clone()
            return torch.ones_like(m, dtype=torch.bool)
        better = m < self.margins[index]
        rows = index[better]
        self.margins[rows] = m[better]
        self.x_adv[rows] = x_adv[better].detach()
        whole = self._whole(index)
        everyone = whole and bool(better.all())
        if not (everyone or bool(better.any())):
            return better
        for key, v in state.items():
            if not self.space.batched[key]:
                continue
            if everyone:  # every row improved: keep the candidate itself, no copy
                self.state[key] = v.detach()
                self._borrowed.add(key)
                continue
            own = self._owned(key)
            if whole:  # the improved rows, in place
                copy_rows(own, v.detach(), better)
            else:
                own[rows] = v[better].detach()
        return better

    def _owned(self, key: object) -> Tensor:
        """The tracker's own buffer of ``key``, holding its best point (written into next)."""
        own = self._own[key]
        if key in self._borrowed:  # the attack's own tensor: copied, never written into
            own.copy_(self.state[key])
            self._borrowed.discard(key)
        self.state[key] = own
        return own

    def _whole(self, index: Tensor) -> bool:
        """Whether ``index`` is every row in order (0..B-1)."""
        rows = len(self.margins)
        return len(index) == rows and bool((index == torch.arange(rows, device=index.device)).all())
