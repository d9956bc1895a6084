"""The structure the code promises: the layer contract of pyproject.toml (import-linter), no import cycle between
any two modules of posttrain/ (function-level imports included), and steps that read top to bottom in one file."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_the_layer_contract_holds():
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                             "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "posttrain layers KEPT" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over direct imports."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return out


def test_no_module_of_posttrain_is_in_an_import_cycle():
    graph = grimp.build_graph("posttrain", include_external_packages=False)
    # a package's __init__ re-exporting its modules is not a cycle with them; everything else is
    for module in list(graph.modules):
        for child in graph.find_children(module):
            if graph.direct_import_exists(importer=child, imported=module):
                details = graph.get_import_details(importer=child, imported=module)
                assert not details, f"{child} imports its own package {module}: {details}"
    assert _cycles(graph) == []


def test_each_step_reads_top_to_bottom_in_one_file_of_under_350_lines():
    for name in ("pairs", "groups"):
        path = ROOT / "posttrain" / "steps" / f"{name}.py"
        assert len(path.read_text().splitlines()) < 350, path


def test_no_function_outside_the_steps_and_the_trainer_takes_the_trainer():
    offenders = []
    for path in (ROOT / "posttrain").rglob("*.py"):
        if path.name == "trainer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(arg.arg == "trainer" for arg in node.args.args + node.args.kwonlyargs):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert offenders == []
