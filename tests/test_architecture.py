"""The layout rules of docs/architecture.md, checked: no import cycles, imports inside functions only
for optional heavy dependencies, no module much over 400 lines. (The layer contract itself is checked
by `lint-imports` in CI.)"""

import ast
import tomllib
from pathlib import Path

import grimp

PACKAGE = Path(__file__).parents[1] / "src" / "hcx_extend"
# Imported where used, because they are optional extras or slow to import.
OPTIONAL = ("matplotlib", "peft", "bitsandbytes", "aeon", "mamba_ssm", "triton", "fastapi", "uvicorn")
MAX_LINES = 450


def strongly_connected(graph) -> list[set[str]]:
    """Tarjan's algorithm over the module graph: every group of modules that import each other in a cycle."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(module):
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_there_are_no_import_cycles():
    graph = grimp.build_graph("hcx_extend")
    assert len(graph.modules) > 40
    assert strongly_connected(graph) == []


def test_imports_inside_functions_are_only_optional_dependencies():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom):
                        names = [inner.module or ""]
                    elif isinstance(inner, ast.Import):
                        names = [alias.name for alias in inner.names]
                    else:
                        continue
                    found += [f"{path.relative_to(PACKAGE)}:{inner.lineno} {n}" for n in names
                              if n.split(".")[0] not in OPTIONAL]
    assert found == []


def test_no_module_is_much_longer_than_400_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_every_top_level_module_has_a_layer():
    """import-linter ignores modules no layer names: a new module must be placed in the contract."""
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    layers = pyproject["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == named
