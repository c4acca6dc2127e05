"""Plugins: Citadel's own parts (``DEFAULT_PLUGINS``), then the ``citadel`` entry-point group.

Citadel's built-in parts are plugins too, as pytest's are: the service types,
the probe kinds and the scrape collectors are modules listed in
``DEFAULT_PLUGINS``, registered first; the parts that need the running daemon
(the GPU part, the exporter) are objects the daemon registers as it assembles
itself (``register_builtin``). Listing the plugins lists every part.

pluggy's ``load_setuptools_entrypoints`` lets one broken plugin abort the
loading of all. Here each entry point is loaded and registered separately;
a broken one is recorded with its name, distribution and error, and the
rest load. ``[plugins] disable`` and ``CITADEL_DISABLE_PLUGINS`` (comma
separated) skip plugins by name; ``CITADEL_TRACE_PLUGINS=1`` traces every
hook call to stderr.

Every hook call goes through pluggy (so tracing and ``wrapper=True``
implementations work as pluggy has them), and a plugin's failure stays its
own: each plain implementation is wrapped, as it is registered, so that an
exception is logged with the plugin's and the hook's names and the call goes
on to the other plugins, as if that one had answered None.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from loguru import logger

from . import PROJECT_NAME, __version__, hookspecs
from .config.sources import disabled_from_env
from .logs.masking import masker

#: The distribution Citadel's built-in parts come with.
DISTRIBUTION = "citadel-supervisor"


@dataclass
class PluginRecord:
    """What ``citadelctl plugins`` shows about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    status: str  # "loaded" | "failed" | "disabled"
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    #: One of Citadel's own parts (``DEFAULT_PLUGINS``, or registered by the daemon).
    builtin: bool = False

    def to_json(self) -> dict[str, Any]:
        """The record as the control API answers it."""
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "hooks": self.hooks,
            "error": self.error,
            "builtin": self.builtin,
        }


#: Citadel's parts that are plain modules, by plugin name, registered in this order
#: before any installed plugin (a plugin's name must not be one of these).
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("command", "citadel_supervisor.services.command"),
    ("vllm", "citadel_supervisor.services.vllm"),
    ("probes", "citadel_supervisor.probes.kinds"),
    ("processes", "citadel_supervisor.exporter.collectors.processes"),
    ("host", "citadel_supervisor.exporter.collectors.host"),
    ("multinode-checks", "citadel_supervisor.multinode.checks"),
)


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

    def load_defaults(self, disable: Iterable[str] = ()) -> None:
        """Register the modules of ``DEFAULT_PLUGINS`` (but those disabled by name)."""
        disabled = set(disable) | disabled_from_env()
        for name, module in DEFAULT_PLUGINS:
            if name in disabled:
                self.records[name] = PluginRecord(name, DISTRIBUTION, __version__, "disabled",
                                                  builtin=True)
                logger.info("built-in plugin {} is disabled", name)
                continue
            self.register_builtin(importlib.import_module(module), name)

    def load_entry_points(self, disable: Iterable[str] = ()) -> None:
        """Load every entry point of the ``citadel`` group, isolating failures."""
        disabled = set(disable) | disabled_from_env()
        for ep in metadata.entry_points(group=PROJECT_NAME):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            if ep.name in self.records:
                if self.records[ep.name].builtin and dist_name != DISTRIBUTION:
                    logger.error("plugin {} from {} {} has the name of a built-in part; skipped",
                                 ep.name, dist_name, version)
                continue  # or the same entry point seen twice (e.g. an editable install)
            if ep.name in disabled:
                self.records[ep.name] = PluginRecord(ep.name, dist_name, version, "disabled")
                logger.info("plugin {} ({}) is disabled", ep.name, dist_name)
                continue
            try:
                plugin = ep.load()
                self.manager.register(plugin, name=ep.name)
                self._isolate(ep.name)
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
        self._isolate(name)
        self.records[name] = PluginRecord(name, None, None, "loaded", hooks=self._hooks_of(name))

    def register_builtin(self, plugin: object, name: str) -> None:
        """Register one of Citadel's own parts (a module, or an object the daemon made)."""
        self.manager.register(plugin, name=name)
        self._isolate(name)
        self.records[name] = PluginRecord(name, DISTRIBUTION, __version__, "loaded",
                                          hooks=self._hooks_of(name), builtin=True)

    def _isolate(self, name: str) -> None:
        """Wrap each plain hook implementation of plugin ``name`` (see the module's doc)."""
        plugin = self.manager.get_plugin(name)
        for caller in self.manager.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin_name == name and not (impl.wrapper or impl.hookwrapper):
                    # pluggy types it Final, but keeps it a plain slot: the one seam that
                    # leaves its calling, tracing and wrappers as they are.
                    impl.function = _isolated(impl.function, name, caller.name)  # type: ignore[misc]

    def _hooks_of(self, name: str) -> list[str]:
        plugin = self.manager.get_plugin(name)
        return sorted(h.name for h in self.manager.get_hookcallers(plugin) or [])

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call a hook through pluggy; ``(plugin_name, result)`` for each non-None result,
        in pluggy's order. A plugin that raises is logged by name and skipped."""
        answers: list[tuple[str, Any]] = []
        token = _ANSWERS.set(answers)
        try:
            getattr(self.manager.hook, hook_name)(**kwargs)
        finally:
            _ANSWERS.reset(token)
        return answers

    def collect_named(self, hook_name: str, what: str) -> dict[str, Any]:
        """Merge ``{name: value}`` answers of a registration hook; a name that a second
        plugin gives too is logged and ignored (the first plugin's stays)."""
        return _merge_named(self.call_each(hook_name), what)

    def service_types(self) -> dict[str, Any]:
        """``{type name: ServiceType}`` from every plugin."""
        answers = self.call_each("citadel_service_types")
        return _merge_named([(p, {t.name: t for t in types}) for p, types in answers], "service type")


#: Where the isolated implementations put their answers, with their plugin's name,
#: during a ``call_each`` (pluggy itself returns the answers without names).
_ANSWERS: ContextVar[list[tuple[str, Any]] | None] = ContextVar("citadel_hook_answers", default=None)


def _isolated(function: Callable[..., Any], plugin: str, hook: str) -> Callable[..., Any]:
    """``function`` (a hook implementation, called by pluggy with positional arguments)
    that logs an exception by plugin and hook and answers None instead of raising."""
    def call(*args: Any) -> Any:
        try:
            result = function(*args)
        except Exception as exc:  # noqa: BLE001 (a plugin's bug must not stop the others)
            logger.opt(exception=exc).error("plugin {} failed in hook {}: {}", plugin, hook,
                                            masker.mask(f"{type(exc).__name__}: {exc}"))
            return None
        answers = _ANSWERS.get()
        if answers is not None and result is not None:
            answers.append((plugin, result))
        return result

    call.__wrapped__ = function  # type: ignore[attr-defined]
    return call


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
    """A registry with Citadel's own modules and every installed plugin loaded (but those disabled)."""
    registry = PluginRegistry()
    registry.load_defaults(disable)
    registry.load_entry_points(disable)
    return registry
