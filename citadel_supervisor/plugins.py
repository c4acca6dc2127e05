"""Plugin discovery: the ``citadel`` entry-point group, each entry point loaded on its own.

pluggy's ``load_setuptools_entrypoints`` lets one broken plugin abort the
loading of all. Here each entry point is loaded and registered separately;
a broken one is recorded with its name, distribution and error, and the
rest load. ``[plugins] disable`` and ``CITADEL_DISABLE_PLUGINS`` (comma
separated) skip plugins by name; ``CITADEL_TRACE_PLUGINS=1`` traces every
hook call to stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from loguru import logger

from . import PROJECT_NAME, hookspecs
from .masking import masker


@dataclass
class PluginRecord:
    """What ``citadelctl plugins`` shows about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    status: str  # "loaded" | "failed" | "disabled"
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as the control API answers it."""
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "hooks": self.hooks,
            "error": self.error,
        }


def disabled_from_env() -> set[str]:
    """Plugin names listed in ``CITADEL_DISABLE_PLUGINS``."""
    return {n.strip() for n in os.environ.get("CITADEL_DISABLE_PLUGINS", "").split(",") if n.strip()}


class PluginRegistry:
    """The pluggy manager, plus what was loaded, what failed and why."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        if os.environ.get("CITADEL_TRACE_PLUGINS"):
            self.manager.trace.root.setwriter(sys.stderr.write)
            self.manager.enable_tracing()

    @property
    def hook(self) -> Any:
        """The hook relay: ``registry.hook.citadel_service_types()``."""
        return self.manager.hook

    def load_entry_points(self, disable: Iterable[str] = ()) -> None:
        """Load every entry point of the ``citadel`` group, isolating failures."""
        disabled = set(disable) | disabled_from_env()
        for ep in metadata.entry_points(group=PROJECT_NAME):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            if ep.name in self.records:
                continue  # the same entry point seen twice (e.g. an editable install)
            if ep.name in disabled:
                self.records[ep.name] = PluginRecord(ep.name, dist_name, version, "disabled")
                logger.info("plugin {} ({}) is disabled", ep.name, dist_name)
                continue
            try:
                plugin = ep.load()
                self.manager.register(plugin, name=ep.name)
            # Any error in a third party's import is theirs, not ours; a stray
            # sys.exit() at import time must not end citadeld either.
            except (Exception, SystemExit) as exc:  # noqa: BLE001
                error = masker.mask(f"{type(exc).__name__}: {exc}")
                self.records[ep.name] = PluginRecord(ep.name, dist_name, version, "failed", error=error)
                logger.error(
                    "plugin {} from {} {} failed to load and is skipped: {}",
                    ep.name, dist_name, version, error,
                )
                continue
            self.records[ep.name] = PluginRecord(
                ep.name, dist_name, version, "loaded", hooks=self._hooks_of(ep.name)
            )

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object directly (tests, or embedding citadel)."""
        self.manager.register(plugin, name=name)
        self.records[name] = PluginRecord(name, None, None, "loaded", hooks=self._hooks_of(name))

    def _hooks_of(self, name: str) -> list[str]:
        plugin = self.manager.get_plugin(name)
        return sorted(h.name for h in self.manager.get_hookcallers(plugin) or [])

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call each plugin's implementation of a hook on its own.

        A plugin that raises is logged by name and skipped; the others still
        run. Returns ``(plugin_name, result)`` for each non-None result.
        """
        caller = getattr(self.manager.hook, hook_name)
        results = []
        for impl in reversed(caller.get_hookimpls()):
            try:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:  # noqa: BLE001 (a plugin's bug must not stop the others)
                logger.opt(exception=exc).error(
                    "plugin {} failed in hook {}: {}", impl.plugin_name, hook_name,
                    masker.mask(f"{type(exc).__name__}: {exc}"),
                )
                continue
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    def collect_named(self, hook_name: str, what: str) -> dict[str, Any]:
        """Merge ``{name: value}`` answers of a registration hook; duplicates are errors."""
        return _merge_named(self.call_each(hook_name), what)

    def service_types(self) -> dict[str, Any]:
        """``{type name: ServiceType}`` from every plugin."""
        answers = self.call_each("citadel_service_types")
        return _merge_named([(p, {t.name: t for t in types}) for p, types in answers], "service type")


def _merge_named(answers: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    """Merge per-plugin ``{name: value}`` answers; a name a second plugin provides is logged and ignored."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for plugin_name, answer in answers:
        for key, value in dict(answer).items():
            if key in merged:
                logger.error(
                    "plugin {} provides {} {!r}, which plugin {} already provides; ignored",
                    plugin_name, what, key, owner[key],
                )
                continue
            merged[key] = value
            owner[key] = plugin_name
    return merged


def load_plugins(disable: Iterable[str] = ()) -> PluginRegistry:
    """A registry with every installed plugin loaded (but those disabled)."""
    registry = PluginRegistry()
    registry.load_entry_points(disable)
    return registry
