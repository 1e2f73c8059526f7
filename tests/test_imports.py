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
    assert {"unet_dist.train.loop", "unet_dist.scoring"} <= graph.keys()
    assert "unet_dist.scoring" in graph["unet_dist.train.loop"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Lowest first. A module belongs to the most specific entry naming it or a package above it; an import
# may point to its own layer or below, never up (a new module must be given a place here).
LAYERS = [
    ["unet_dist", "unet_dist.errors", "unet_dist.config", "unet_dist.labels", "unet_dist.encoding",
     "unet_dist.storage", "unet_dist.distributed", "unet_dist.cli", "unet_dist.constraints", "unet_dist.strict_yaml",
     "unet_dist.unet_geometry", "unet_dist.devices", "unet_dist.ray_address", "unet_dist.tracking_store",
     "unet_dist.model_source"],
    ["unet_dist.data", "unet_dist.synth", "unet_dist.preprocess", "unet_dist.metrics", "unet_dist.viz", "unet_dist.losses",
     "unet_dist.mask_files", "unet_dist.photo_files"],
    ["unet_dist.checkpoint"],  # checkpoint file I/O
    ["unet_dist.model", "unet_dist.segment", "unet_dist.scoring", "unet_dist.onnx_model"],
    ["unet_dist.serving", "unet_dist.serve"],
    ["unet_dist.tracking"],
    ["unet_dist.train", "unet_dist.sweep", "unet_dist.tune", "unet_dist.batch"],  # batch: Ray Data, the launcher's Ray
    ["unet_dist.evaluate", "unet_dist.predict", "unet_dist.batch_predict", "unet_dist.export", "unet_dist.demo",
     "unet_dist.train.cli", "unet_dist.train.__main__",
     "unet_dist.synth.cli", "unet_dist.synth.__main__"],
]


def layer_of(module: str) -> int | None:
    matches = [(len(name), i) for i, names in enumerate(LAYERS) for name in names
               if module == name or (name != "unet_dist" and module.startswith(name + "."))]
    return max(matches)[1] if matches else None


def test_layers_point_down_from_commands_to_training_tracking_serving_models_checkpoints_data():
    graph = import_graph()
    assert layer_of("unet_dist.train.cli") > layer_of("unet_dist.train.loop") > layer_of("unet_dist.serving.pyfunc")
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"
    up = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))
    assert not up, "imports that point up a layer: " + "; ".join(up)


def private_uses(source: str, modules: set[str], where: str = "<source>") -> list[str]:
    """Private names (``_x``, not dunders) this source takes from another ``unet_dist`` module: by
    ``from unet_dist.m import _x``, or as ``m._x`` on a module it imported."""
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    tree = ast.parse(source, where)
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unet_dist"):
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases.add(a.asname or a.name)
                elif private(a.name):
                    found.append(f"{where}:{node.lineno} imports {node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("unet_dist") and a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and private(node.attr):
            found.append(f"{where}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_private_name_finder_sees_imports_and_attribute_uses():
    modules = {"unet_dist.config", "unet_dist.data.loader"}
    source = ("from unet_dist.config import _apply, load_config\nfrom unet_dist import __version__\n"
              "from unet_dist.data import loader as L\nL._train_sample()\nL.to_device()\n")
    assert private_uses(source, modules) == ["<source>:1 imports unet_dist.config._apply",
                                             "<source>:4 uses L._train_sample"]


def test_no_module_uses_another_modules_private_names():
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    found = [f for name, path in sorted(paths.items())
             for f in private_uses(path.read_text(), set(paths), str(path.relative_to(ROOT.parent)))]
    assert not found, "make these public (or move the code that needs them): " + "; ".join(found)
