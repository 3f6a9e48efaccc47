"""Digests of the code that computed a cached number, so that a cache written by other code is
recomputed, never reused, with no version counter for a change to forget to raise."""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def code_digest(root: Path, parts: tuple[str, ...]) -> str:
    """A digest of the Python files under each of ``parts`` (folders or files of the package
    at ``root``), by path and content."""
    digest = hashlib.sha256()
    for part in parts:
        where = root / part
        files = sorted(where.rglob("*.py")) if where.is_dir() else [where]
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
