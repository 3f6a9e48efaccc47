"""How deeply a JSON or TOML text nests, measured before it is parsed: the parsers (and
everything that walks what they return) recurse, so a text nested thousands deep is a
``RecursionError`` traceback instead of an error saying what was wrong."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .errors import NonsingularError

MAX_DEPTH = 64  # far more than any file the library writes or reads needs
_STRINGS = re.compile(r'"(?:[^"\\\n]|\\.)*"' + r"|'[^'\n]*'")  # JSON/TOML strings, one line


def depth(text: str | bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in ``text``, brackets inside strings aside."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    bare = _STRINGS.sub("", text).encode()
    codes = np.frombuffer(bare, dtype=np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
    steps -= np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def check_depth(
    text: str | bytes, what: str, error: type[NonsingularError], limit: int = MAX_DEPTH
) -> None:
    """Raise ``error`` naming ``what`` when ``text`` nests deeper than ``limit``."""
    found = depth(text)
    if found > limit:
        raise error(f"{what} nests {found} levels deep; at most {limit} are accepted")


def check_value_depth(
    value: Any, what: str, error: type[NonsingularError], limit: int = MAX_DEPTH
) -> None:
    """Raise ``error`` when parsed ``value`` (lists and dicts) nests deeper than ``limit``
    (TOML's dotted keys nest without brackets); measured without recursion."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            raise error(f"{what} nests more than {limit} levels deep")
        if isinstance(item, dict):
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, (list, tuple)):
            stack += [(v, level + 1) for v in item]
