"""Atomic file writes (a reader, or a killed process, never sees half a file) and one writer
per directory (an OS lock held while a run lasts)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError

try:  # POSIX; elsewhere runs are not locked (documented in docs/reliability.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; files follow the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the directory's lock (``DIRECTORY/.lock``, ``flock``) for the ``with`` block: a
    second writer gets a ConfigError at once. Temporary files that killed writers left
    behind are removed once the lock is held."""
    directory = Path(directory)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another process is writing to {directory}: wait for it to finish, or choose "
                "another directory"
            ) from None
        for orphan in directory.glob(".*.tmp"):  # from writers killed mid-write
            with contextlib.suppress(OSError):
                orphan.unlink()
        yield
    finally:
        os.close(fd)  # releases the lock
