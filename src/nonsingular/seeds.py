"""Randomness that belongs to an example, not to a batch: each example's draws come from a
generator seeded by its position in the data set, so a result never depends on how examples
were batched or split across processes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def mix(*parts: object) -> int:
    """A 63-bit seed made of ``parts`` (ints and strings): the same on every machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by ``mix(*parts)`` (draws are moved to the device after)."""
    return torch.Generator().manual_seed(mix(*parts))


def per_example(
    draw: Callable[[torch.Generator], Tensor], seed: int, positions: Sequence[int]
) -> Tensor:
    """``(B, ...)``: ``draw(g)`` for each example, ``g`` seeded by ``(seed, its position)``."""
    return torch.stack([draw(generator(seed, int(p))) for p in positions])
