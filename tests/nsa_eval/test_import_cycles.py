"""No import cycle among the project's own modules.

The rule: every `import X` / `from X import Y` statement in a module's source is an edge from that module to the
project module it names, wherever the statement stands: at module level, inside a function (a "lazy" import), or
under `if TYPE_CHECKING:`. A function-local import hides a cycle from Python's import machinery but not from the
reader; both modules still need each other, so it counts. `from pkg import name` is an edge to `pkg.name` when that
is a module of ours, else to `pkg`. Imports of other distributions (torch, click, ...) are not edges. The implicit
import of a parent package (importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`) is not an edge: a
package's `__init__` that re-exports its submodules would otherwise make a cycle with each of them.

The sources are found from pyproject.toml's package-dir map (the folders stand at the top of the repository under
the one `nsa_eval.*` namespace), read as text with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def project_modules() -> dict[str, Path]:
    """Module name -> source file, for every .py file under the package-dir folders of pyproject.toml."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules.setdefault(name, path)
    return modules


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from . import x, from ..a import b
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target for alias in node.names]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (the rule in this file's docstring)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(module, path, node, modules):
                while target and target not in modules:  # `import a.b.name`: the longest prefix that is a module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
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


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return project_modules()


@pytest.fixture(scope="module")
def graph(modules) -> dict[str, set[str]]:
    """Parsed once for the tests below (neither changes it)."""
    return import_graph(modules)


def test_the_graph_is_the_project(modules, graph):
    assert {"nsa_eval.cli", "nsa_eval.kernels.nsa.reference", "nsa_eval.tasks.niah",
            "nsa_eval.model_adapters.runtime.engine"} <= set(modules)
    assert "nsa_eval.registry" in graph["nsa_eval.cli"]  # a module-level import
    assert "nsa_eval.runner" in graph["nsa_eval.cli"]  # a function-local import counts too
    assert "nsa_eval.kernels" not in graph["nsa_eval.tasks.niah"]


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
