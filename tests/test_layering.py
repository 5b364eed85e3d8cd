"""The package's import graph: no module imports (at any depth, lazily or not) a module that imports it back,
the registry is a leaf, no method imports another method's detector, and code cites only files in the repo."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "omniad"
REPO = SRC.parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """omniad module -> the omniad modules it imports anywhere in its body (function-level imports included)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                for alias in node.names:  # "from omniad.methods import padim" imports the module omniad.methods.padim
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    # the package root imports everything (its public API); nothing but the CLI's entry may import it
    graph = {k: v - {"omniad"} for k, v in import_graph().items()}
    importers_of_root = sorted(k for k, v in import_graph().items() if "omniad" in v and k != "omniad")
    assert importers_of_root == [], f"modules import the package root: {importers_of_root}"
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_registry_is_a_leaf():
    assert import_graph()["omniad.registry"] == set()


def test_no_method_imports_another_methods_detector():
    graph = import_graph()
    for module, targets in graph.items():
        if not module.startswith("omniad.methods."):
            continue
        own = module.split(".")[2]
        for target in targets:
            parts = target.split(".")
            is_detector = len(parts) >= 3 and parts[1] == "methods" and (
                (len(parts) == 4 and parts[3] == "detector") or (len(parts) == 3 and parts[2] in ("padim", "patchcore"))
            )
            assert not (is_detector and parts[2] != own), f"{module} imports another method's detector {target}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_code_cites_only_files_in_the_repository(path):
    for cited in re.findall(r"\b((?:docs|benchmarks|tests)/[\w./-]+\.(?:md|py|json))", path.read_text()):
        assert (REPO / cited).exists(), f"{path.name} cites {cited}, which is not in the repository"
    for outside in ("DESIGN.md", "HELPERS.md", "METHODS.md", "../shared"):
        assert outside not in path.read_text(), f"{path.name} cites {outside}, which is outside the repository"
