"""The code's shape as the style guide asks: short functions (a reader sees one whole)."""

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "nonsingular"
LONGEST = 60  # lines, decorators and docstring included


def test_no_function_in_the_library_is_longer_than_a_screen():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > LONGEST:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
