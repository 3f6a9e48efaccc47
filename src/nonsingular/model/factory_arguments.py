"""A model factory's keyword arguments (``--model-args``, a TOML's ``model-args``, a
checkpoint's sidecar), checked against the factory's signature before it is called: names it
takes, values of the types its annotations (or defaults) say, finite numbers, and widths in
the range the ``--hidden`` flag allows. Anything else is a ConfigError naming the argument;
JSON's ``"16"`` is never read as the widths 1 and 6, ``8.7`` never as 8."""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from ..checks import MAX_WIDTH
from ..errors import ConfigError

WIDTHS = frozenset({"hidden", "channels", "width", "widths", "classes"})  # sizes of layers
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable)


def check_arguments(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise ConfigError when ``kwargs`` does not fit ``factory`` (called ``name``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): values checked alone
        params = {}
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # annotations naming what cannot be resolved here
        hints = {}
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if params and not takes_any:
        taken = [k for k, p in params.items() if p.kind in keyword]
        unknown = sorted(k for k in kwargs if k not in taken)
        if unknown:
            raise ConfigError(
                f"model {name} takes no argument {', '.join(unknown)}; it takes "
                f"{', '.join(taken) or 'none'}"
            )
    for key, value in kwargs.items():
        param = params.get(key)
        default = param.default if param is not None else inspect.Parameter.empty
        _check(f"model {name}: argument {key}", value, hints.get(key), default, key in WIDTHS)


def _check(what: str, value: Any, hint: Any, default: Any, width: bool) -> None:
    _finite(what, value)
    if hint is None and default is not inspect.Parameter.empty and default is not None:
        hint = _hint_of(default)
    if hint is not None and not _fits(value, hint):
        raise ConfigError(f"{what} must be {_describe(hint)}, got {value!r}")
    if width:
        for size in value if isinstance(value, list) else [value]:
            if isinstance(size, int) and not isinstance(size, bool) and not 1 <= size <= MAX_WIDTH:
                raise ConfigError(f"{what}: a width must be from 1 to {MAX_WIDTH}, got {size}")


def _finite(what: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r} (too large, or NaN)")
    if isinstance(value, list):
        for item in value:
            _finite(what, item)
    if isinstance(value, dict):
        for item in value.values():
            _finite(what, item)


def _hint_of(default: Any) -> Any:
    """The type a default value implies (``(256, 256)``: a sequence of integers)."""
    if isinstance(default, (list, tuple)) and default:
        kinds = {type(v) for v in default}
        return collections.abc.Sequence[kinds.pop()] if len(kinds) == 1 else None
    return type(default) if isinstance(default, (bool, int, float, str)) else None


def _fits(value: Any, hint: Any) -> bool:
    """Whether JSON ``value`` is of type ``hint``; a hint it cannot judge lets it pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        inner = [a for a in args if a is not Ellipsis]
        item = inner[0] if len(inner) == 1 else None
        return isinstance(value, list) and all(item is None or _fits(v, item) for v in value)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint in (int, float, str):
        return {int: "an integer", float: "a number", str: "a string"}[hint]
    if hint in _SEQUENCES or origin in _SEQUENCES:
        inner = [a for a in args if a is not Ellipsis]
        item = _describe(inner[0]) if len(inner) == 1 else "values"
        return f"a list of {item.removeprefix('an ').removeprefix('a ')}s"
    if hint is type(None):
        return "null"
    if args:
        return " or ".join(_describe(a) for a in args)
    return getattr(hint, "__name__", str(hint))
