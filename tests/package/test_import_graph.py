"""The package's import graph: no cycles, ``geometry`` imports nothing, ``kernels/`` imports nothing
of the library above it, ``experiments/`` has no cycles either."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"lowrank_optim": ROOT / "lowrank_optim", "lowrank_optim.kernels": ROOT / "kernels",
            "experiments": ROOT / "experiments"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Library modules imported at module level (not inside functions or TYPE_CHECKING blocks)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_there_is_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for child in graph[node]:
            if state.get(child) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(child):] + [child]))
            if child not in state:
                visit(child, stack + [child])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_geometry_imports_nothing_of_the_library():
    assert _graph()["lowrank_optim.geometry"] == set()


def test_kernels_import_nothing_of_the_library_above_them():
    for name, imports in _graph().items():
        if name.startswith("lowrank_optim.kernels"):
            outside = {i for i in imports if not i.startswith("lowrank_optim.kernels")}
            assert not outside, f"{name} imports {outside}"
