"""The package's layers (docs/ARCHITECTURE.md): every import in src/llama4 - at the top of a module or inside
a function - points down the layers or within its own package, and no chain of imports comes back to where
it started. Imports for type checkers only (``if TYPE_CHECKING:``) are not followed: they never run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "llama4"

# Layer of each top-level unit, bottom to top. A unit imports only units of a lower layer (and itself);
# units that share a layer are siblings that never import each other (e.g. inference and train).
LAYERS = [
    {"config", "dtypes"},
    {"presets"},
    {"model", "prompt"},
    {"checkpoint"},
    {"quant"},  # quantized weights and their checkpoint layouts (reads checkpoint's name mapping)
    {"lora"},  # LoRA / QLoRA wrappers over float or quantized modules, PEFT adapter files
    {"kernels"},  # CPU fast paths, packing float and quantized modules alike
    {"distributed"},  # tensor / expert parallel plans (the only torch.distributed user); build may apply them
    {"build"},
    {"info"},
    {"inference", "train"},
    {"serve", "evaluation"},
    {"llama4"},  # the package's public API (llama4/__init__.py): only the command line above it uses it
    {"cli"},
    {"__main__"},  # python -m llama4 / torchrun -m llama4: runs the command line
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module an imported name lives in (``llama4.a.b.f`` -> ``llama4.a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for statement in node.body for inner in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {_resolve(alias.name) for alias in node.names if alias.name.split(".")[0] == "llama4"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "llama4":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else _resolve(base))
    found.discard(module)
    found.discard("")
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llama4"


def test_every_unit_has_a_layer():
    assert {_unit(m) for m in MODULES} - {"embedded"} <= set(RANK), "add new top-level modules to LAYERS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    unit = _unit(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        other = _unit(target)
        if other != unit and RANK[other] >= RANK[unit]:
            kind = "a sibling" if RANK[other] == RANK[unit] else "a higher layer"
            wrong.append(f"{module} imports {target} ({kind}: {other})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checks_see_imports_inside_functions_and_relative_ones():
    assert "llama4.kernels.cpu.packing" in GRAPH["llama4.kernels.cpu"]
    assert any(target.startswith("llama4.prompt.") for target in GRAPH["llama4.prompt"])  # relative imports
    assert "llama4.evaluation" in GRAPH["llama4.cli"]  # imported inside a function


def test_no_process_wide_switch_inside_the_library():
    """No ``global`` statement in src/llama4, and the environment read only by the commands (cli.py, and
    ``llama4 serve``'s for LLAMA4_API_KEY) and the engine's config (everything else takes its settings as
    arguments)."""
    globals_used, environ = [], []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        globals_used += [f"{module}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
        if any((isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "os"
                and n.attr in ("environ", "getenv", "environb"))
               or (isinstance(n, ast.ImportFrom) and n.module == "os"
                   and {a.name for a in n.names} & {"environ", "getenv", "environb"}) for n in ast.walk(tree)):
            environ.append(module)
    assert globals_used == []
    assert sorted(environ) == ["llama4.cli", "llama4.inference.engine", "llama4.serve.command"]
