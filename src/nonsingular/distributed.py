"""Work spread over torch.distributed processes: who does what, and putting results back.

Data-parallel throughout. Examples (and, for ``reproduce``, whole models) are split over the
ranks of the default process group; results are summed or gathered on every rank; rank 0
alone writes outputs. Per-example randomness is seeded by each example's place in its data
set (``seeds.py``), so numbers never depend on the split. Without a process group (or with
one process) everything below is the identity: one code path for one process or many.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes outputs."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1


_ALONE = [0]  # > 0 inside ``alone()``


def ranks() -> Ranks:
    """The default process group's view of this process (one process when there is none, or
    inside ``alone()``)."""
    if not _ALONE[0] and dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Work that belongs to this process only (a whole model ``reproduce`` gave it): inside,
    nothing is split or summed with the other processes."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


_STARTED = [False]  # whether ``start`` made the process group (and ``stop`` should end it)


def launched() -> bool:
    """Started by torchrun (or any launcher that sets ``WORLD_SIZE`` above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA), once; the
    device of this process (``cuda:LOCAL_RANK`` when ``device`` is CUDA)."""
    if not launched() or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _STARTED[0] = True
    return device


def agree(options: dict[str, Any]) -> None:
    """Raise ConfigError on every process unless all were started with the same ``options``
    (every option of the command): ranks that disagree (one ``--seed`` or ``--lr`` typed
    differently) would otherwise write mixed results or abort inside a collective. One
    exchange of a SHA-256 each; the options themselves only when the digests differ."""
    if not ranks().many:
        return
    text = json.dumps(options, sort_keys=True, default=repr)
    if len(set(gather(hashlib.sha256(text.encode()).hexdigest()))) == 1:
        return
    every: list[dict[str, Any]] = gather(json.loads(text))
    names = sorted(set().union(*every))
    differ = [k for k in names if any(o.get(k) != every[0].get(k) for o in every)]
    shown = "; ".join(
        f"--{k.replace('_', '-')}: "
        + ", ".join(f"rank {r} {o.get(k)!r}" for r, o in enumerate(every))
        for k in differ[:3]
    )
    raise ConfigError(
        f"the {len(every)} processes were started with different options ({shown}): start "
        "every process with the same command line"
    )


def stop() -> None:
    """Leave the process group ``start`` joined (a group the caller made is left alone).
    Without this, a gloo process can abort at exit ("terminate called without an active
    exception") while its connection threads still run, and torchrun fails the job."""
    if _STARTED[0] and dist.is_initialized():
        dist.destroy_process_group()
    _STARTED[0] = False


def part(n: int, where: Ranks | None = None) -> slice:
    """This rank's contiguous share of ``n`` items (shares differ by one at most)."""
    where = where or ranks()
    return slice(n * where.rank // where.world, n * (where.rank + 1) // where.world)


def dealt(n: int, where: Ranks | None = None) -> slice:
    """This rank's share of ``n`` items dealt in turn (0, W, 2W, ... for rank 0): hard and easy
    examples, often grouped in a data set, spread evenly over the processes."""
    where = where or ranks()
    return slice(where.rank, n, where.world)


def mine(items: Sequence[T], where: Ranks | None = None) -> list[tuple[int, T]]:
    """``(index, item)`` for the items this rank handles, dealt back and forth (0, 1, ...,
    W-1, W-1, ..., 1, 0, 0, 1, ...): lists that repeat a pattern of costs (the same methods
    for each seed) then spread the dear items over the ranks instead of giving them all to
    one."""
    where = where or ranks()
    return [(i, item) for i, item in enumerate(items) if _dealt_to(i, where.world) == where.rank]


def _dealt_to(i: int, world: int) -> int:
    turn, place = divmod(i, world)
    return place if turn % 2 == 0 else world - 1 - place


def total(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """``values`` summed over the ranks (each rank gets the sums)."""
    if not ranks().many:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device or _device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (a new tensor; ``tensor`` itself is left alone)."""
    if not ranks().many:
        return tensor.clone()
    out = tensor.to(_device(), copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (JSON-like objects)."""
    if not ranks().many:
        return [value]
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, value)
    return found


def sum_gradient(gradient: Tensor) -> Tensor:
    """A gradient summed over the ranks (a variable shared by a batch split across them)."""
    if ranks().many:
        gradient = gradient.clone()
        dist.all_reduce(gradient)
    return gradient


def _device() -> torch.device:
    """Where collectives run: CUDA for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
