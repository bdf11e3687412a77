"""The package's layers (docs/architecture.md): no module imports a higher layer, no import
cycle, no module over the length limit unless docs/architecture.md names it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import metagrad

PACKAGE = Path(metagrad.__file__).parent
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MAX_LINES = 500

LAYERS: dict[str, int] = {
    # 0: foundations, importing nothing of the package above them
    "registry": 0,
    "kernels": 0,
    "layout": 0,
    "vector_casts": 0,
    "checkpoint": 0,
    "_version": 0,
    "plugins": 0,
    "stats": 0,
    "machine": 0,
    # 1: what to quantize and how
    "quant": 1,
    # 2: the backward products
    "backward": 2,
    # 3: layers and model conversion; process groups and communication; models
    "nn": 3,
    "parallel": 3,
    "models": 3,
    # 4: MetaGrad; datasets
    "meta": 4,
    "data": 4,
    # 5: training runs
    "training": 5,
    # 6: entry points
    "cli": 6,
    "demo": 6,
    "plot": 6,
    "__main__": 6,
    "__init__": 6,
    "_moved": 6,
    "_startup": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _component(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package's own __init__
        return "__init__"
    return parts[1]


def _resolve(node: ast.ImportFrom | ast.Import, module: str) -> list[str]:
    """The package modules an import statement loads (``from pkg import mod`` is ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "metagrad"]
    base = node.module or ""
    if node.level:  # relative: from . import x / from .y import z
        package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{base}" if base else package
    if base.split(".")[0] != "metagrad":
        return []
    targets = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        targets.append(full if full in MODULES else base)
    return targets


def _imports(module: str, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(_resolve(node, module))
    return found


def test_every_module_has_a_layer():
    missing = sorted({_component(m) for m in MODULES} - set(LAYERS))
    assert not missing, f"add to LAYERS and docs/architecture.md: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    """Function-level and ``TYPE_CHECKING`` imports count too."""
    own = LAYERS[_component(module)]
    higher = sorted(
        target
        for target in _imports(module, top_level_only=False)
        if target in MODULES and LAYERS[_component(target)] > own
    )
    assert not higher, f"{module} (layer {own}) imports {higher}"


def test_no_import_cycle():
    """Between modules, through the imports that run when a module loads."""
    graph = {m: sorted(_imports(m, top_level_only=True) & set(MODULES)) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module)


def test_modules_are_short_or_named_in_the_architecture_doc():
    named = ARCHITECTURE.read_text() if ARCHITECTURE.exists() else ""
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    unexplained = {path: n for path, n in long.items() if f"`{path}`" not in named}
    assert not unexplained, f"over {MAX_LINES} lines: {unexplained}"
