"""Where a result came from: what every JSON output records, so that a number found later can
be traced to the code, the command, the data and the weights that made it."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import torch

from ._version import __version__
from .data import Dataset

_COMMAND: list[list[str]] = []  # the nonsingular command this process runs, if any


@contextlib.contextmanager
def command_line(argv: list[str]) -> Iterator[None]:
    """Within, outputs record ``nonsingular ARGV`` as their command (the CLI's ``main``)."""
    _COMMAND.append(list(argv))
    try:
        yield
    finally:
        _COMMAND.pop()


def provenance(
    command: list[str] | None = None,
    data: Dataset | None = None,
    split: str = "test",
    split_seed: int | None = 0,
    examples: int | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Versions, machine, date (UTC), the command line (``command``: the arguments after
    ``nonsingular``; by default the CLI's, or the Python script's), the data set and split
    used (``split_seed``: the seed of ``nonsingular.data.load`` that drew it; None when
    the caller made the split), and the
    checkpoint (path and SHA-256)."""
    out: dict[str, Any] = {
        "nonsingular": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {cores()} CPU cores",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": _command(command),
    }
    if data is not None:
        size = len(data.x_test) if split == "test" else len(data.x_train)
        out["data"] = {
            "name": data.name,
            "split": split,
            "split_seed": split_seed,
            "examples": size if examples is None else examples,
        }
    if checkpoint is not None:
        out["checkpoint"] = checkpoint
    return out


def _command(argv: list[str] | None) -> str:
    if argv is None and _COMMAND:
        argv = _COMMAND[-1]
    if argv is not None:
        return "nonsingular " + shlex.join(argv)
    return "python " + shlex.join(sys.argv)  # called from Python: the script that ran


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
