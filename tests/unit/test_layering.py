"""The package's dependencies point one way: down the layers of docs/architecture.md, with no cycle.

Every import counts, a deferred one inside a function too; only imports under
``if TYPE_CHECKING:`` are left out, as they never run (they name types for
mypy). A new module must be given its layer here, and in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "citadel_supervisor"

#: Bottom to top. A module may import from its own layer and the ones below, never above.
#: The most specific prefix names a module's layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("", "states", "waits", "events", "testing", "systemd", "hookspecs", "logs",
                    "loop_stalls")),
    ("operating system", ("process",)),
    ("config", ("config",)),
    ("shared types", ("services.base", "probes.base", "worker.restart_policy", "worker.forensics", "control.route",
                      "control.responses", "exporter.snapshot", "multinode.rank", "multinode.auth")),
    ("mechanisms", ("plugins", "gpu", "probes", "exporter", "control.access",
                    "control.admission", "control.client")),
    ("workers", ("worker", "supervisor")),
    ("parts", ("services", "probes.kinds", "exporter.collectors.processes", "exporter.collectors.host",
               "exporter.server", "gpu.plugin", "control", "multinode", "ui", "demand")),
    ("assembly", ("daemon", "cli")),
]


def module_name(path: Path) -> str:
    """``citadel_supervisor/gpu/plugin.py`` -> ``gpu.plugin`` (the package itself is ``""``)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the most specific prefix that names ``module``."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = prefix == "" and module == "" or (
                prefix and (module == prefix or module.startswith(prefix + ".")))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports when it runs."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    here = module.split(".") if module else []
    if path.name != "__init__.py":
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "citadel_supervisor" or (node.module or "").startswith("citadel_supervisor."):
                target = node.module.removeprefix("citadel_supervisor").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("citadel_supervisor"):
                    found.add(alias.name.removeprefix("citadel_supervisor").lstrip("."))
    return {name for name in found if name in MODULES and name != module}


def test_every_module_has_a_layer() -> None:
    unplaced = [name or "citadel_supervisor" for name in MODULES if layer_of(name) < 0]
    assert not unplaced, f"give these a layer in LAYERS (and docs/architecture.md): {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module: str) -> None:
    mine = layer_of(module)
    upward = sorted(f"{name} ({LAYERS[layer_of(name)][0]})" for name in imports_of(module)
                    if layer_of(name) > mine)
    assert not upward, f"{module or 'citadel_supervisor'} ({LAYERS[mine][0]}) imports from above: {upward}"


def test_no_import_cycles() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    cycles = _strongly_connected(graph)
    assert not cycles, f"import cycles: {cycles}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: every group of two or more modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_the_check_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up cycle is found, and the layer table ranks upward."""
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer_of("daemon") > layer_of("worker.lifecycle") > layer_of("config.models") > layer_of("states")
    assert layer_of("gpu.plugin") > layer_of("gpu.inventory")
    assert "worker.lifecycle" in imports_of("supervisor")
    assert "gpu.fake_nvml" in imports_of("gpu.inventory")  # a deferred import counts
