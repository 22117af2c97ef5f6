"""Layers import downward only (read from the source, nothing is imported).

    lotcast.launch, lotcast.cli          the launcher: picks and starts a node app
    broadcaster/, relay/                 the node apps (neither imports the other)
    lotcast.service, lotcast.node        running an app under uvicorn; what every node serves
    lotcast.media | lotcast.interactive  media path | room protocol (neither imports the other)
    lotcast.ops                          registry, placement, metrics (no media, no interactive)
    lotcast.*                            ids, keys, config, auth, ...

Imports under `if TYPE_CHECKING:` count too: a type-only cycle is still a cycle in the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lotcast", "broadcaster", "relay")
LAUNCHER = frozenset({"lotcast.launch", "lotcast.cli", "lotcast.__main__"})


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert "lotcast.service" in found and "relay.app" in found
    return found


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module `name` imports, at any depth of its code (function bodies too)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path) if m in modules}
            for name, path in modules.items()}


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


GRAPH = _graph()


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...],
                allowed: frozenset[str] = frozenset()) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, dsts in GRAPH.items()
                  if _under(src, *importers) and src not in allowed
                  for dst in dsts if _under(dst, *forbidden))


def test_only_the_launcher_imports_the_node_apps() -> None:
    assert _violations(("lotcast",), ("broadcaster", "relay"), LAUNCHER) == []
    # and it does import them (the rule above is not vacuous)
    assert {"broadcaster.app", "relay.app"} <= GRAPH["lotcast.launch"]


def test_nothing_below_imports_the_launcher() -> None:
    assert _violations(PACKAGES, tuple(LAUNCHER), LAUNCHER) == []


def test_service_runs_an_app_without_knowing_which() -> None:
    assert _violations(("lotcast.service",), ("broadcaster", "relay", "lotcast.media",
                                               "lotcast.interactive")) == []


@pytest.mark.parametrize(("a", "b"), [("broadcaster", "relay"), ("relay", "broadcaster")])
def test_the_apps_do_not_import_each_other(a: str, b: str) -> None:
    assert _violations((a,), (b,)) == []


@pytest.mark.parametrize(("a", "b"), [("lotcast.media", "lotcast.interactive"),
                                      ("lotcast.interactive", "lotcast.media")])
def test_media_and_interactive_are_independent(a: str, b: str) -> None:
    assert _violations((a,), (b,)) == []


def test_ops_and_node_layers() -> None:
    assert _violations(("lotcast.ops",), ("lotcast.media", "lotcast.interactive",
                                          "lotcast.node", "lotcast.service")) == []
    assert _violations(("lotcast.media", "lotcast.interactive", "lotcast.ops"),
                       ("lotcast.node", "lotcast.service")) == []


def test_no_import_cycles() -> None:
    """Between modules, and between the packages the docstring lists as layers."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH[module]):
            # `import a.b` names the package `a` too; a package importing its own submodules
            # (an __init__ re-exporting) is not a cycle of the design
            if module.startswith(dep + ".") or dep == module:
                continue
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert cycles == []
