"""The layout's rules that the linters do not check: no import cycle in any package, and short functions.

(The layering itself is import-linter's job: `lint-imports`, contracts in pyproject.toml.)"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vlm", "projector_training", "demo")
MAX_FUNCTION_LINES = 60
LONGER: dict[str, str] = {}
"""Functions allowed past the limit ("path:name": why). None today."""


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_package_imports_itself_in_a_loop():
    graph = grimp.build_graph(*PACKAGES)
    # A package's __init__ re-exporting its modules is not a loop a reader has to untangle.
    for package in [m for m in graph.modules if graph.find_children(m)]:
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=package, imported=child):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def test_no_function_is_longer_than_the_limit():
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{path.relative_to(ROOT)}:{node.name}"
                    if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and name not in LONGER:
                        long.append(f"{name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
