"""The library's floor plan (docs/method.md, Code layout): each folder imports only itself and the folders before it,
and no module imports itself back through others, not even through an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "lib" / "medlsam"
# the order data flows in: a folder may import the ones before it (the top-level modules are rank 0)
FOLDERS = ["utils", "io", "rt", "medlam", "atlas", "segment", "learn", "interact", "cli"]


def _module_name(path: Path) -> str:
    parts = ["medlsam", *path.relative_to(LIBRARY).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rank(module: str) -> int:
    parts = module.split(".")
    return FOLDERS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in FOLDERS else 0


def _imports() -> dict[str, set[str]]:
    """Module -> the library modules it imports anywhere in its file (functions included)."""
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medlsam"):
                for alias in node.names:  # `from medlsam.utils import cancel` names a module
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("medlsam")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_folders_exist_and_every_module_lives_in_one():
    assert {p.name for p in LIBRARY.iterdir() if p.is_dir() and (p / "__init__.py").exists()} <= set(FOLDERS)
    loose = sorted(p.name for p in LIBRARY.glob("*.py"))
    assert loose == ["__init__.py", "errors.py", "paths.py"], loose


def test_each_folder_imports_only_the_folders_before_it():
    wrong = [
        f"{module} -> {target}"
        for module, targets in _imports().items()
        for target in targets
        if _rank(target) > _rank(module)
    ]
    assert not wrong, wrong


def test_no_import_cycle_hidden_or_not():
    graph = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles
