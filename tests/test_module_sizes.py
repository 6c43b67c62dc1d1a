"""Rooms by role (#36): no module of the packages is over `MAX_MODULE_LINES` lines and no function or method
over `MAX_FUNCTION_LINES` (from its ``def`` line to its last line, docstring included, decorators not); a
module or function that grows past them is split along a seam of what it does."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_import_graph import PACKAGES, ROOT

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


def function_lengths(source: str) -> list[tuple[int, str, int]]:
    """(line, name, lines) of every function and method of `source`, nested ones too."""
    return [(node.lineno, node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_function_lengths_are_counted() -> None:
    source = "@property\ndef f(x):\n    '''Doc.'''\n\n    return x\n\n\nclass A:\n    async def g(self):\n        pass\n"
    assert function_lengths(source) == [(2, "f", 4), (9, "g", 2)]


def test_no_module_or_function_is_too_long() -> None:
    modules = _modules()
    assert ROOT / "cli" / "main.py" in modules  # the packages are read
    offenders = []
    for path in modules:
        source = path.read_text()
        name = path.relative_to(ROOT)
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            offenders.append(f"{name}: {lines} lines (module, at most {MAX_MODULE_LINES})")
        offenders += [f"{name}:{line} {func}: {n} lines (function, at most {MAX_FUNCTION_LINES})"
                      for line, func, n in function_lengths(source) if n > MAX_FUNCTION_LINES]
    assert not offenders, "split these along a seam of what they do:\n" + "\n".join(offenders)
