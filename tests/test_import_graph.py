"""The package's import graph, read from the source with ``ast``: no cycle, and no module reads another
module's private (underscore) names.

Every ``import`` counts, wherever it stands: at module level, inside a function, or under
``if TYPE_CHECKING:`` (a cycle hidden behind a lazy import or a type-only import is still two modules
that cannot be understood, tested or moved one without the other). A private name is read across
modules by ``from m import _name`` or by ``m._name`` where ``m`` is an imported module of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each source root and the folder its top-level packages sit in: diffgym/ at the repository root, each
# trainer plugin's package (diffgym_ppo, diffgym_apg) inside trainers/<name>/.
SOURCE_ROOTS = [(ROOT / "diffgym", ROOT), *((pkg, pkg.parent) for pkg in sorted(ROOT.glob("trainers/*/diffgym_*"))
                                            if (pkg / "__init__.py").exists())]


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path, base): path for pkg, base in SOURCE_ROOTS for path in sorted(pkg.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``, which
    is a package's ``__init__`` when ``is_package``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], list[str]]:
    """The package modules ``module`` imports, and the private names it reads from them (as
    ``"line N: m._name"``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    edges: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> package module it is bound to

    def add(target: str) -> str | None:
        # `import a.b.c` binds a but depends on a.b.c: the edge goes to the most specific package module
        parts = target.split(".")
        for k in range(len(parts), 0, -1):
            prefix = ".".join(parts[:k])
            if prefix in modules:
                if prefix != module:
                    edges.add(prefix)
                return prefix
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = add(alias.name)
                if bound is not None:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                        alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path.name == "__init__.py", node)
            if source in modules or any(m.startswith(source + ".") for m in modules):
                add(source)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from pkg import mod`: an edge to mod, bound as a module
                    add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                elif source in modules and source != module and _private(alias.name):
                    private.append(f"line {node.lineno}: from {source} import {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _private(node.attr) and aliases[node.value.id] != module):
            private.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return edges, private


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    modules = package_modules()
    graph, private = {}, {}
    for module, path in modules.items():
        graph[module], found = imports_of(module, path, modules)
        if found:
            private[module] = found
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The reader itself: module-level, function-level, TYPE_CHECKING and relative imports are edges,
    and both spellings of a private read are caught (so the tests below can fail)."""
    source = ("from typing import TYPE_CHECKING\n"
              "from diffgym.core import bridge\n"
              "from .state import _hidden\n"
              "if TYPE_CHECKING:\n    from diffgym.core.sim import DiffSim\n"
              "def f():\n    import diffgym.core.env\n    return bridge._plan\n")
    path = tmp_path / "probe.py"
    path.write_text(source)
    modules = {**package_modules(), "diffgym.core.probe": path}
    edges, private = imports_of("diffgym.core.probe", path, modules)
    assert {"diffgym.core.bridge", "diffgym.core.state", "diffgym.core.sim", "diffgym.core.env"} <= edges
    assert private == ["line 3: from diffgym.core.state import _hidden", "line 8: diffgym.core.bridge._plan"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    found = cycles(import_graph()[0])
    assert not found, f"import cycles (each a set of modules that import each other): {found}"


def test_no_private_name_crosses_modules():
    private = import_graph()[1]
    assert not private, "private names read from another module (make them public or move the code): " + \
        "; ".join(f"{m}: {', '.join(names)}" for m, names in sorted(private.items()))
