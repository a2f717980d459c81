"""diffserve's own modules import each other without cycles (read with `ast`, nothing is imported).

Every import statement counts, also those inside functions and under `if TYPE_CHECKING:`: a lazy import
hides a cycle from the interpreter, not from the reader. A package's `__init__` is a node of its own; the
interpreter running a parent package's `__init__` before its submodules is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "diffserve"


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the package `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported_names(module: str, path: Path) -> list[str]:
    """Dotted names each import statement of `module` asks for (`from a import b` gives `a.b`)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: drop one trailing part per level (the module, then packages)
                anchor = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `files` it imports (the longest known prefix of each imported name)."""
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        deps = set()
        for name in _imported_names(module, path):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = "open"
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_sees_a_lazy_import_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_diffserve_has_no_import_cycle() -> None:
    files = module_files()
    graph = import_graph(files)
    assert "diffserve.engine.engine" in graph and "diffserve.engine.entry" in graph["diffserve"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_in_process_engine_knows_nothing_of_the_parallel_engine() -> None:
    graph = import_graph(module_files())
    seen, todo = set(), ["diffserve.engine.engine"]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert not seen & {"diffserve.engine.entry", "diffserve.engine.parallel_engine", "diffserve.engine.ranks"}
