"""``nonsingular`` command line: a thin shell over the Python API.

Every user mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

from .. import distributed
from .._version import __version__
from ..errors import NonsingularError
from ..provenance import command_line
from . import certify, evaluate, quantize, reproduce, train
from .common import Parser


def build_parser() -> Parser:
    parser = Parser(
        prog="nonsingular",
        description=(
            "Attack, certify and train neural networks under joint input and weight perturbations."
        ),
    )
    parser.add_argument("--version", action="version", version=f"nonsingular {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    reproduce.register(sub)
    train.register(sub)
    evaluate.register(sub)
    quantize.register(sub)
    certify.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what outputs record
    try:
        with command_line(args.argv):
            return int(args.func(args))
    except NonsingularError as exc:
        if os.environ.get("NONSINGULAR_DEBUG", "") not in ("", "0"):
            traceback.print_exception(exc)  # with its cause: a user factory's own traceback
        print(f"nonsingular {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable input or unwritable output named by the user
        print(f"nonsingular {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise  # anything else is a bug: its traceback is what a report needs
        print(
            f"nonsingular {args.command}: error: out of memory ({_first_line(exc)}): reduce "
            "--batch-size, the model's size or the number of examples",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("nonsingular: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.stop()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text


if __name__ == "__main__":
    sys.exit(main())
