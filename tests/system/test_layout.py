"""The package's shape stays as the README's code map says (issue #17): no import cycle (function-
level imports included), at most 10 modules directly in trainer/, no function of 90 lines or more.
The layer order itself is `lint-imports`' contract in pyproject.toml, run by .ci/run."""

from __future__ import annotations

import ast

import grimp
from helpers import ROOT


def test_no_import_cycle():
    graph = grimp.build_graph("trainer")
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            assert back is None, f"import cycle: {module} -> {' -> '.join(back)}"


def test_top_level_holds_only_the_commands():
    modules = sorted(p.name for p in (ROOT / "trainer").glob("*.py"))
    assert len(modules) <= 10, modules


def test_functions_read_in_one_screen():
    longest = max(
        (node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}")
        for path in (ROOT / "trainer").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    assert longest[0] < 90, longest
