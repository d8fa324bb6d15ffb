"""
The house's layers: every module of C{imageio/} imports only modules of
its own layer or of a lower one, and no import cycle exists.

The imports are read from the source with L{ast}, not by importing. The
rule, stated once:

  - Every C{import} and C{from ... import} statement counts, wherever it
    is: at the top, inside a function or method, or under an C{if}. A
    function-level import is a dependency like any other (moving an
    import into a function was how the services -> workers -> services
    cycle hid).
  - C{from imageio.x import y} depends on C{imageio.x.y} when that is a
    module, otherwise on C{imageio.x}. Importing C{imageio.x.y} is not
    counted as depending on the package C{imageio.x} (Python runs the
    package's C{__init__} first, which is why a package C{__init__} stays
    free of top-level imports of its own submodules).
  - Two kinds of edge are left out of the cycle check (they still count
    for the layers): a package C{__init__} importing its own submodule
    inside a function (C{imageio.backends.open} opens the backend module
    a url scheme names, and the backend modules import C{IBackend} from
    the package), and an import under C{if TYPE_CHECKING:}, which never
    runs (a module naming, in annotations only, the class that uses it).
  - Modules are never imported by name at run time (C{importlib},
    C{__import__}), so the walk sees every edge.

The layer table is also in C{docs/architecture.md} ("Layers").
"""

from __future__ import annotations

import ast
import pathlib
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "imageio"

# Highest layer first. A module matches its exact name, else the longest
# package prefix ending in ".*". Same-layer imports are allowed (no cycle).
LAYERS = [
    ("entry points", [
        "imageio.tap", "imageio.ctl", "imageio.workers.__main__",
        "imageio.client.cli"]),
    ("process services", [
        "imageio.services", "imageio.workers.workerside"]),
    ("web, workers (main side), client", [
        "imageio.web.*", "imageio.workers.mainside",
        "imageio.workers.commands", "imageio.client", "imageio.client.*"]),
    ("tickets, backends, transfer", [
        "imageio.tickets", "imageio.backends", "imageio.backends.*",
        "imageio.transfer", "imageio.operations"]),
    ("protocols", [
        "imageio.protocols.*", "imageio.tls", "imageio.endpoints"]),
    ("common", [
        "imageio", "imageio.units", "imageio.errors", "imageio.extents",
        "imageio.logs", "imageio.metrics", "imageio.blkhash",
        "imageio.config", "imageio.malloc", "imageio.schemes",
        "imageio.deferreds", "imageio.compat", "imageio.abilities",
        "imageio.iopool",
        "imageio.web",
        "imageio.protocols",
        "imageio.workers"]),
]


def moduleName(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def allModules() -> dict[str, pathlib.Path]:
    return {moduleName(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = allModules()


def layerOf(name: str) -> int:
    """
    @return: the index in L{LAYERS} (0 is the highest layer).
    """
    best = None
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern == name:
                return index
            if pattern.endswith(".*") and name.startswith(pattern[:-1]):
                size = len(pattern)
                if best is None or size > best[0]:
                    best = (size, index)
    if best is None:
        raise LookupError(f"{name} has no layer: add it to LAYERS (and to "
                          f"docs/architecture.md)")
    return best[1]


def _isPackage(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


class Import(NamedTuple):
    target: str
    line: int
    inFunction: bool = False
    typeOnly: bool = False


def _isTypeChecking(node) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute)
            and test.attr == "TYPE_CHECKING")


def imports(name: str) -> list[Import]:
    """
    @return: an L{Import} for each imageio module that module C{name}
        imports.
    """
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found = []

    def visit(node, inFunction, typeOnly):
        for child in ast.iter_child_nodes(node):
            inner = inFunction or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            typing = typeOnly or _isTypeChecking(node) and child in node.body
            for target in _targets(name, child):
                found.append(Import(target, child.lineno, inner, typing))
            visit(child, inner, typing)

    visit(tree, False, False)
    return [f for f in found if f.target != name]


def _targets(name: str, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names
                if a.name == "imageio" or a.name.startswith("imageio.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = name.split(".")
        if not _isPackage(name):
            package.pop()
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    if base != "imageio" and not base.startswith("imageio."):
        return []
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append(sub if sub in MODULES else base)
    return targets


def _hidesImports(tree) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called = (f.attr if isinstance(f, ast.Attribute)
                      else getattr(f, "id", None))
            if called in ("import_module", "__import__"):
                lines.append(node.lineno)
    return lines


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name in MODULES:
        edges[name] = set()
        for imp in imports(name):
            if imp.typeOnly:
                continue  # never runs, see the module docstring
            if (imp.inFunction and _isPackage(name)
                    and imp.target.startswith(name + ".")):
                continue  # a package's registry, see the module docstring
            edges[name].add(imp.target)
    return edges


def test_every_module_has_a_layer():
    missing = []
    for name in MODULES:
        try:
            layerOf(name)
        except LookupError as e:
            missing.append(str(e))
    assert not missing, "\n".join(missing)


def test_no_upward_import():
    upward = []
    for name in MODULES:
        mine = layerOf(name)
        for target, line, _, _ in imports(name):
            theirs = layerOf(target)
            if theirs < mine:
                upward.append(
                    f"{MODULES[name].relative_to(ROOT.parent)}:{line}: "
                    f"{name} ({LAYERS[mine][0]}) imports {target} "
                    f"({LAYERS[theirs][0]})")
    assert not upward, "imports upward:\n" + "\n".join(upward)


def test_no_cycle():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(name):
        state[name] = 1
        stack.append(name)
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target)
        stack.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            walk(name)
    assert not cycles, "import cycles:\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_no_import_by_name():
    hidden = []
    for name, path in MODULES.items():
        for line in _hidesImports(ast.parse(path.read_text())):
            hidden.append(f"{path.relative_to(ROOT.parent)}:{line}")
    assert not hidden, "imports by name hide edges:\n" + "\n".join(hidden)


# The checker itself, on made-up modules.

@pytest.mark.parametrize("name, layer", [
    ("imageio.tap", 0),
    ("imageio.workers.workerside", 1),
    ("imageio.workers", 5),
    ("imageio.web.images", 2),
    ("imageio.web", 5),
    ("imageio.protocols.nbd", 4),
])
def test_layer_lookup(name, layer):
    assert layerOf(name) == layer


def test_unknown_module_has_no_layer():
    with pytest.raises(LookupError):
        layerOf("imageio.nowhere")


def test_function_level_import_counts(monkeypatch, tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from imageio import services\n")
    monkeypatch.setitem(MODULES, "imageio.backends.fake", source)
    assert imports("imageio.backends.fake") == [
        Import("imageio.services", 2, inFunction=True)]


def test_type_checking_import_is_type_only(monkeypatch, tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n"
                      "    from imageio import tickets\n"
                      "else:\n"
                      "    from imageio import errors\n")
    monkeypatch.setitem(MODULES, "imageio.backends.fake", source)
    assert imports("imageio.backends.fake") == [
        Import("imageio.tickets", 3, typeOnly=True),
        Import("imageio.errors", 5)]
