"""Checks across services (``after`` names and cycles, port clashes), and of the
names only the loaded plugins know (probe kinds)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from .errors import ConfigIssue, did_you_mean, format_path
from .models import ServiceConfig, SwapGroupConfig


def check_services(
    services: Mapping[str, ServiceConfig],
    names: set[str],
    sources: Callable[[tuple[object, ...]], Path | None],
) -> list[ConfigIssue]:
    """Checks across ``services`` (those that validated; ``names``: every service the
    config names): ``after`` names and cycles, port clashes. ``sources`` gives the file
    that set a key path."""
    issues: list[ConfigIssue] = []
    for name, service in services.items():
        for i, dep in enumerate(service.after):
            loc: tuple[object, ...] = ("services", name, "after", i)
            if dep == name:
                issues.append(ConfigIssue(sources(loc), format_path(loc), "a service cannot come after itself"))
            elif dep not in names:
                issues.append(ConfigIssue(sources(loc), format_path(loc),
                                          f"no service named {dep!r}{did_you_mean(dep, names)}"))
    cycle = find_cycle({n: [d for d in s.after if d in services and d != n] for n, s in services.items()})
    if cycle:
        loc = ("services", cycle[0], "after")
        issues.append(ConfigIssue(sources(loc), format_path(loc),
                                  "startup order has a cycle: " + " -> ".join(cycle)))
    ports: dict[int, str] = {}
    for name, service in services.items():
        for replica in range(service.replicas):
            port = service.port_for(replica)
            if port is None or port == 0:
                continue
            owner = name if service.replicas == 1 else f"{name}.{replica}"
            if port in ports:
                loc = ("services", name, "port")
                issues.append(ConfigIssue(sources(loc), format_path(loc),
                                          f"port {port} of {owner} is also used by {ports[port]}"))
            else:
                ports[port] = owner
    return issues


def check_probe_kinds(
    services: Mapping[str, ServiceConfig],
    kinds: Collection[str],
    sources: Callable[[tuple[object, ...]], Path | None],
) -> list[ConfigIssue]:
    """Every probe whose kind is none of ``kinds`` (built-in, and the plugins' own)."""
    issues: list[ConfigIssue] = []
    known = ", ".join(sorted(kinds))
    for name, service in services.items():
        for role in ("startup", "liveness", "readiness"):
            probe = getattr(service.probes, role)
            if probe is None or probe.kind in kinds:
                continue
            loc: tuple[object, ...] = ("services", name, "probes", role, "kind")
            issues.append(ConfigIssue(
                sources(loc), format_path(loc),
                f"no probe kind {probe.kind!r}{did_you_mean(probe.kind, kinds)}; known kinds: {known} "
                "(a plugin adds others through citadel_probe_kinds)"))
    return issues


def find_cycle(graph: Mapping[str, list[str]]) -> list[str] | None:
    """A cycle in ``graph`` as a list of names (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def check_swap_groups(
    services: Mapping[str, ServiceConfig],
    groups: Mapping[str, SwapGroupConfig],
    sources: Callable[[tuple[object, ...]], Path | None],
) -> list[ConfigIssue]:
    """Each ``swap_group`` names a ``[swap_groups.NAME]``, and the members that start with
    citadeld (``start = "always"``) fit within its ``max_running``."""
    issues: list[ConfigIssue] = []
    always: dict[str, list[str]] = {}
    for name, service in services.items():
        group = service.swap_group
        if group is None:
            continue
        if group not in groups:
            loc: tuple[object, ...] = ("services", name, "swap_group")
            known = f" (defined: {', '.join(sorted(groups))})" if groups else " (none is defined)"
            issues.append(ConfigIssue(sources(loc), format_path(loc),
                                      f"no [swap_groups.{group}] table{did_you_mean(group, groups) or known}"))
        elif service.start == "always":
            always.setdefault(group, []).extend([name] * service.replicas)
    for group, members in always.items():
        limit = groups[group].max_running
        if len(members) > limit:
            loc = ("swap_groups", group, "max_running")
            issues.append(ConfigIssue(sources(loc), format_path(loc),
                                      f"{len(members)} workers of this group start with citadeld "
                                      f"({', '.join(sorted(set(members)))}), more than max_running = "
                                      f"{limit}; give the others start = \"on-demand\""))
    return issues
