"""Atomic file writes (a reader, or a killed process, never sees half a file), one writer
per directory (an OS lock held while a run lasts), and no writes through symbolic links: the
library makes none, so a link in a directory it writes is refused before anything is written."""

from __future__ import annotations

import contextlib
import errno
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
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the OS has none (Windows)


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


def refuse_links(directory: str | os.PathLike[str]) -> None:
    """Raise ConfigError if anything inside ``directory`` (at any depth) is a symbolic link,
    dangling or not: writing through it could change or create a file elsewhere. The
    directory itself may be a link; a missing directory holds none."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for root, dirs, files in os.walk(directory):  # never descends into linked directories
        for name in [*dirs, *files]:
            if os.path.islink(os.path.join(root, name)):
                raise _link_error(os.path.join(root, name))


def _link_error(path: str | os.PathLike[str]) -> ConfigError:
    return ConfigError(
        f"{path} is a symbolic link: nonsingular never writes through links in a directory it "
        "writes; remove it, or choose another directory"
    )


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (``O_EXCL``: never an existing
    file or link), fsync it, then rename over ``path`` (a link there is replaced, not followed)."""
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
    second writer gets a ConfigError at once. A directory holding a symbolic link is refused
    first (``refuse_links``). Temporary files that killed writers left behind are removed
    once the lock is held."""
    directory = Path(directory)
    refuse_links(directory)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = _open_lock(directory / LOCK)
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


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file, never following a link put there."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666 & ~_umask())
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise _link_error(path) from None
