"""The house's import rules, read from the source (no module is imported): no import cycle, and
each layer imports only what docs/ARCHITECTURE.md allows it to.

Every ``import`` counts, at the top of a file or inside a function (a lazy import is still a
dependency). ``from compressor.a import b`` is an edge to ``compressor.a.b`` when that is a module,
else to ``compressor.a``.
"""

import ast
from pathlib import Path

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
                    edges.add(
                        f"{node.module}.{alias.name}" if is_module(f"{node.module}.{alias.name}") else node.module
                    )
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


# docs/ARCHITECTURE.md's layers, from the bottom up: a module imports only its own layer and those before it
LAYERS = (
    (
        "foundations",
        (
            "compressor.errors",
            "compressor.version",
            "compressor.step",
            "compressor.progress",
            "compressor.data_files",
            "compressor.demo",
        ),
    ),
    ("value types", ("compressor.weights",)),
    ("kernels", ("compressor.kernels",)),
    ("quantized modules", ("compressor.modules",)),
    ("architecture", ("compressor.arch",)),
    ("KV caches", ("compressor.kvcache",)),
    (
        "model and runners",
        (
            "compressor.model",
            "compressor.moe",
            "compressor.blockwise",
            "compressor.calibration",
            "compressor.report",
            "compressor.distill",
            "compressor.training",
            "compressor.declaration",
            "compressor.distributed",
            "compressor.resume",
        ),
    ),
    ("export", ("compressor.export",)),
    ("step contract", ("compressor.context",)),
    ("methods", METHODS),
    ("method list and recipe", ("compressor.methods", "compressor.recipe")),
    ("session and entry points", ("compressor",)),  # pipeline, api, eval, validate, cli, ... and the package root
)


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the longest prefix naming ``module``."""
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1]


def shipped_code() -> set[str]:
    """The modeling files our exports ship: they run on the serving side, where the native one imports the
    package root to register our quantizer (the one import allowed to go up)."""
    from compressor.arch.shipped import SHIPPED

    return {f"compressor.arch.{row.package}.{file[:-3]}" for row in SHIPPED for file in row.modeling_files}


def test_every_import_goes_down_the_layers():
    allowed = {(module, "compressor") for module in shipped_code()}
    upward = sorted(
        f"{module} ({LAYERS[layer_of(module)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
        for module, edges in GRAPH.items()
        for target in edges
        if layer_of(target) > layer_of(module) and (module, target) not in allowed
    )
    assert upward == []


def test_kernels_import_no_export_and_the_value_types_nothing():
    kernels = {
        m: sorted(e for e in edges if e.startswith("compressor.export"))
        for m, edges in imports_of("compressor.kernels").items()
    }
    assert {m: e for m, e in kernels.items() if e} == {}
    assert GRAPH["compressor.weights.values"] == set()


def test_the_step_contract_imports_no_export():
    assert not [e for e in GRAPH["compressor.context"] if e.startswith("compressor.export")]


def test_readers_of_the_kv_cache_use_its_channel_never_a_method():
    for module in ("compressor.eval", "compressor.export.loading", "compressor.export.hf_quantizer"):
        assert not [e for e in GRAPH[module] if e.startswith("compressor.kvcache.")], module


def test_methods_import_neither_the_pipeline_nor_the_recipe_nor_export_nor_another_method():
    above = (
        "compressor.pipeline",
        "compressor.api",
        "compressor.recipe",
        "compressor.methods",
        "compressor.export",
        "compressor.cli",
    )
    for module, edges in GRAPH.items():
        if module.startswith(METHODS) and module not in METHODS:
            assert not [e for e in edges if e.startswith(above)], module
            # shared by methods: the uniform grid, weighted codebooks (SqueezeLLM, LUT-GPTQ), and GPTQ's
            # Hessian-aware rounding (Block-AP's ``init: gptq``, LUT-GPTQ's column sweep)
            shared = (
                "compressor.quant.uniform",
                "compressor.quant.codebook",
                "compressor.quant.gptq",
                "compressor.quant.allocation",
            )
            assert not [e for e in edges if e.startswith(METHODS) and e not in shared], module


def test_step_declarations_import_no_method_and_no_torch():
    source = (PACKAGE / "step.py").read_text() + (PACKAGE / "methods.py").read_text()
    assert "import torch" not in source
    assert not any(e.startswith(METHODS) for e in GRAPH["compressor.step"] | GRAPH["compressor.recipe"])


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
