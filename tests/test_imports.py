"""The package's import graph has no cycle.

Every import statement counts, also those inside functions: a lazy import only postpones a cycle
to the call that runs it (the loop -> evaluate -> launch -> loop cycle went through one), and
modules that import each other cannot be read or moved one at a time.
"""
from __future__ import annotations

import ast
from pathlib import Path

import unet_dist

ROOT = Path(unet_dist.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``unet_dist`` modules it imports (``from pkg import mod`` names the submodule)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_cycle_finder_reports_a_cycle_through_three_modules():
    graph = {"loop": {"evaluate"}, "evaluate": {"launch"}, "launch": {"loop"}, "cli": {"launch"}}
    assert find_cycle(graph) == ["launch", "loop", "evaluate", "launch"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_unet_dist_has_no_import_cycle():
    graph = import_graph()
    assert {"unet_dist.train.loop", "unet_dist.evaluation"} <= graph.keys()
    assert "unet_dist.evaluation" in graph["unet_dist.train.loop"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
