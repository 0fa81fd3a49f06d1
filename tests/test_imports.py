"""Imports: inside ``tensorweave/`` they point one way (no module reaches, directly or through others, back to
itself), and every third-party module the tests import is installed by ``pip install -e '.[test]'``.

The graph is read from the source with ``ast`` (nothing is imported), counting imports inside functions too (a
lazy import is still a dependency; it only hides the cycle until run time). Imports under ``if TYPE_CHECKING:``
are left out: they never run. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg`` itself. Importing a module also runs its parent packages' ``__init__``, but that is not counted as an edge:
every submodule would otherwise "import" ``tensorweave/__init__``."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1] / "tensorweave"
TESTS = Path(__file__).resolve().parent


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (a package is its ``__init__``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            found.append(child)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                found += [sub] if isinstance(sub, ast.Import | ast.ImportFrom) else _imports(sub)
        else:
            found += _imports(child)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = ".".join(p for p in (base if node.level else "", node.module or "") if p)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
    return graph


def knots(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan): each holds at least one cycle, and
    every module in one reaches every other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One concrete cycle inside a knot: the shortest path from its first module back to it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = [f"{' -> '.join(cycle_through(graph, k))}  (the knot: {', '.join(sorted(k))})" for k in knots(graph)]
    assert not found, "import cycles in tensorweave/:\n" + "\n".join(found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_the_graph_sees_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    """The checker itself: a cycle through a function-level import, ``from . import submodule`` and a two-dot
    relative import is found; one through ``if TYPE_CHECKING:`` only is not."""
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import f\n",
            "pkg/a.py": "from . import b\ndef f():\n    return b\n",
            "pkg/b.py": "def g():\n    from .sub.c import h\n    return h\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n"
            "else:\n    import os\ndef h():\n    from .. import a\n    return a\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import x\n",
            "pkg/e.py": "from .d import y\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == set()
    (knot,) = knots(graph)
    assert knot == {"pkg.a", "pkg.b", "pkg.sub.c"}
    assert cycle_through(graph, knot) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


# ARCHITECTURE.md's arrows, as ranks of the package's top-level parts: an import goes to a lower rank, or stays inside
# its own part. cli -> runtime -> models/loaders -> core; backends and communicators -> core; core imports no plugin.
RANKS = {
    "tensorweave": 9,  # __init__: the public API
    "cli": 8,
    "conformance": 7,
    "serve": 7,  # the OpenAI-compatible server: cli/serve -> serve -> runtime
    "runtime": 6,
    "models": 5,
    "loaders": 5,
    "backends": 4,
    "communicators": 4,
    "core": 2,
    "format": 1,
    "errors": 0,
    "_version": 0,
}


def part(module: str) -> str:
    """The top-level part of the package a module belongs to: ``tensorweave.core.ops`` -> ``core``."""
    return module.split(".")[1] if "." in module else module


def test_imports_point_down_the_layers() -> None:
    graph = import_graph()
    unranked = sorted({part(m) for m in graph} - set(RANKS))
    assert not unranked, f"give these parts of tensorweave/ a rank in RANKS (ARCHITECTURE.md's arrows): {unranked}"
    upward = [
        f"{m} -> {t}"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if part(m) != part(t) and RANKS[part(t)] >= RANKS[part(m)]
    ]
    assert not upward, "imports against ARCHITECTURE.md's arrows:\n" + "\n".join(upward)


def test_contracts_are_pure() -> None:
    """The Device/Backend and Communicator contracts import no factory machinery: only errors, dtypes and the
    device contract (which the communicator's buffers live on)."""
    graph = import_graph()
    allowed = {"tensorweave.errors", "tensorweave.core.dtypes", "tensorweave.core.device"}
    for contract in ("tensorweave.core.device", "tensorweave.core.communicator"):
        assert graph[contract] <= allowed, f"{contract} imports {sorted(graph[contract] - allowed)}"


def requirement_closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """The distributions ``pip install name[extras]`` installs (canonical names), read from the installed
    metadata: the requirements that apply to those extras, recursively."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(name, extras)]
    while todo:
        dist_name, dist_extras = todo.pop()
        if (canonicalize_name(dist_name), dist_extras) in seen:
            continue
        seen.add((canonicalize_name(dist_name), dist_extras))
        try:
            requires = md.requires(dist_name) or []
        except md.PackageNotFoundError:  # required only on another platform or Python: nothing imports it here
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*dist_extras, "")):
                todo.append((req.name, frozenset(req.extras)))
    return {dist for dist, _ in seen}


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in ``path`` outside the standard library."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names)


def test_the_test_extra_installs_what_the_tests_import() -> None:
    """A fresh ``pip install -e '.[test]'`` must be enough for ``pytest``: a module the tests import that only
    happens to be installed here (safetensors once was) fails this test, not a new user's first run. Covers the
    tests and the conformance kit they run (optional backends, e.g. cupy, are the package's own business)."""
    provided = requirement_closure("tensorweave", frozenset({"test"}))
    owners = md.packages_distributions()
    ours = {"tensorweave"} | {p.stem for p in TESTS.glob("*.py")}  # the tests import their own helper modules
    missing: dict[str, list[str]] = {}
    for path in sorted([*TESTS.glob("*.py"), *(ROOT / "conformance").glob("*.py")]):
        for name in sorted(third_party_imports(path) - ours):
            if not any(canonicalize_name(d) in provided for d in owners.get(name, [])):
                missing.setdefault(name, []).append(str(path.relative_to(TESTS.parent)))
    assert not missing, (
        "imported by the tests but not installed by the `test` extra of pyproject.toml (as installed: after editing "
        f"it, rerun pip install -e '.[test]'): {missing}"
    )
