"""The module import graph of the three packages (every import, top-level or inside a function):
no cycle; ``pipelines`` imports nothing from ``rewards`` or the trainers, ``rewards`` nothing from
the trainers; configuration errors come from the one ``align.errors`` module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "rewards", "pipelines", "demos")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {f for f in found if f in modules and f != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import cycle found by depth-first search, as a path, or None."""
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the search finds one
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_packages_import_only_downwards():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("pipelines"):
            bad = [t for t in targets if t.startswith(("rewards", "align.trainers"))]
            assert not bad, (name, bad)
            assert all(t == "align.errors" for t in targets if t.startswith("align")), (name, targets)
        if name.startswith("rewards"):
            assert not [t for t in targets if t.startswith("align.trainers")], name
        if name.startswith(("align", "rewards", "pipelines")) and not name.startswith("align.commands") \
                and name not in ("rewards.cli", "align.__main__"):
            # the library and the training runtime never import a command module
            assert not [t for t in targets if t.startswith("align.commands") or t == "rewards.cli"], (name, targets)


def test_config_errors_come_from_one_module():
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            if path.name != "errors.py":
                assert "class ConfigError" not in text, path
            if pkg != "align":
                assert "from align.config import ConfigError" not in text, path
