"""The house's import rules, read from the source (no module is imported): no import cycle, and
each layer imports only what docs/ARCHITECTURE.md allows it to.

Every ``import`` counts, at the top of a file or inside a function (a lazy import is still a
dependency). ``from compressor.a import b`` is an edge to ``compressor.a.b`` when that is a module,
else to ``compressor.a``.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "compressor"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name.startswith("compressor")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compressor"):
                for alias in node.names:
                    edges.add(f"{node.module}.{alias.name}" if is_module(f"{node.module}.{alias.name}") else node.module)
        graph[module_name(path)] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


GRAPH = import_graph()
METHODS = ("compressor.quant", "compressor.lowrank")


def imports_of(prefix: str) -> dict[str, set[str]]:
    return {m: edges for m, edges in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}


def test_there_is_no_import_cycle():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("layer", ["compressor.weights", "compressor.kernels", "compressor.export", "compressor.arch"])
def test_lower_layers_import_no_method(layer):
    offending = {m: sorted(e for e in edges if e.startswith(METHODS)) for m, edges in imports_of(layer).items()}
    assert {m: e for m, e in offending.items() if e} == {}


def test_kernels_import_no_export_and_the_value_types_nothing():
    kernels = {m: sorted(e for e in edges if e.startswith("compressor.export")) for m, edges in imports_of("compressor.kernels").items()}
    assert {m: e for m, e in kernels.items() if e} == {}
    assert GRAPH["compressor.weights.values"] == set()


def test_methods_import_neither_the_pipeline_nor_the_recipe_nor_export_nor_another_method():
    above = ("compressor.pipeline", "compressor.api", "compressor.recipe", "compressor.methods", "compressor.export", "compressor.cli")
    for module, edges in GRAPH.items():
        if module.startswith(METHODS) and module not in METHODS:
            assert not [e for e in edges if e.startswith(above)], module
            assert not [e for e in edges if e.startswith(METHODS) and e != "compressor.quant.uniform"], module


def test_step_declarations_import_no_method_and_no_torch():
    source = (PACKAGE / "step.py").read_text() + (PACKAGE / "methods.py").read_text()
    assert "import torch" not in source
    assert not any(e.startswith(METHODS) for e in GRAPH["compressor.step"] | GRAPH["compressor.recipe"])


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
