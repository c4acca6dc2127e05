"""citadeld: one asyncio loop running the supervisor, the control socket and the exporter.

Signal handlers only queue the signal; the main loop dispatches it
(SIGTERM/SIGINT stop, SIGHUP reloads, SIGCHLD reaps adopted orphans).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import signal
import tomllib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from loguru import logger

from . import __version__
from .config import CitadelConfig, ConfigError, ConfigIssue, load_config
from .control import API_PREFIX
from .control.access import AccessPolicy
from .control.openapi import builtin_routes
from .control.route import Route, accept_plugin_routes
from .control.server import ControlServer
from .demand.controller import DemandController
from .events import EventBus, WorkerEvent
from .exporter.server import Exporter
from .gpu import GpuAllocation, GpuDetection
from .gpu.metrics import GpuReader
from .gpu.plan import plan_gpus
from .gpu.plugin import GpuPlugin
from .logs.masking import masker
from .loop_stalls import LoopStallReporter
from .multinode.coordinator import MultinodePlugin
from .plugins import PluginRegistry
from .probes.runner import ProbeKinds
from .process.cgroups import CgroupTree
from .process.spawn import become_subreaper, children
from .process.statefile import StateFile
from .services.engine_load import EngineLoad
from .supervisor import Supervisor
from .systemd import Notifier
from .ui.page import StatusPage
from .worker.lifecycle import WorkerRuntime


def disabled_plugins(path: Path) -> list[str]:
    """``[plugins] disable`` read ahead of validation (plugins load before the config does)."""
    try:
        with path.open("rb") as fh:
            disable = tomllib.load(fh).get("plugins", {}).get("disable", [])
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return []
    return [d for d in disable if isinstance(d, str)] if isinstance(disable, list) else []


def probe_kinds(registry: PluginRegistry) -> ProbeKinds:
    """Every probe kind, Citadel's own and plugins' (``citadel_probe_kinds``)."""
    return ProbeKinds(registry.collect_named("citadel_probe_kinds", "probe kind"))


def load_validated(path: Path, registry: PluginRegistry) -> CitadelConfig:
    """Load and validate the config with every plugin's types, sections, probe kinds and checks."""
    service_types = registry.service_types()
    sections = registry.collect_named("citadel_config_sections", "config section")
    config = load_config(path, {n: t.config_model for n, t in service_types.items()}, sections,
                         probe_kinds=set(probe_kinds(registry)))
    issues: list[ConfigIssue] = []
    for _, found in registry.call_each("citadel_check_config", config=config):
        issues.extend(found)
    if issues:
        raise ConfigError(issues)
    return config


def load_and_plan(
    path: Path, registry: PluginRegistry, gpus: GpuDetection,
    previous: Mapping[str, Sequence[str]] | None = None,
) -> tuple[CitadelConfig, GpuAllocation]:
    """``load_validated``, then the GPUs of every worker; GPU problems are config errors too."""
    config = load_validated(path, registry)
    allocation, issues = plan_gpus(config, gpus, registry.service_types(), previous)
    if issues:
        raise ConfigError(issues)
    return config, allocation


def check_log_dir(path: Path) -> None:
    """Create the log folder and prove it writable; raise ``OSError`` naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".citadel-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"daemon.log_dir {path} is not writable: {exc.strerror}") from None


class InstanceLockedError(RuntimeError):
    """Another citadeld runs on this state_dir."""


class InstanceLock:
    """One citadeld per ``daemon.state_dir``: an ``flock`` on ``STATE_DIR/citadeld.lock``.

    Taken before anything else is touched (the control socket, the state file's
    leftovers), so a second citadeld stops without disturbing the first. The
    kernel drops the lock when its holder exits, however it exits; the file
    holds the holder's pid for the message a second one prints.
    """

    def __init__(self, state_dir: Path):
        self.path = state_dir / "citadeld.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; ``InstanceLockedError`` naming the file and its holder if held."""
        # 0755: a state_dir others may write is not trusted (statefile.folder_doubt).
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # O_CLOEXEC (Python's default): workers must not inherit, and so hold, the lock.
        # O_NOFOLLOW: a link planted there must not make citadeld open another file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(f"cannot lock {self.path}: {exc.strerror}") from None
            raise InstanceLockedError(
                f"another citadeld is running ({self._holder()}): it holds the lock {self.path}; "
                "stop it first, or give this one another daemon.state_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _holder(self) -> str:
        """``pid N`` as the lock file says, or why that is unknown."""
        try:
            text = self.path.read_text().strip()
        except OSError as exc:
            return f"pid unknown: {exc.strerror}"
        return f"pid {text}" if text.isdigit() else "pid unknown"

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race a starting citadeld)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Daemon:
    """The running citadeld."""

    def __init__(self, config_path: Path, config: CitadelConfig, registry: PluginRegistry,
                 gpus: GpuDetection, allocation: GpuAllocation):
        self.config_path = config_path
        self.config = config
        self.plugins = registry
        self.gpus = gpus
        self.allocation = allocation
        self.events = EventBus(self._on_event)
        self.notifier = Notifier()
        self.supervisor: Supervisor = None  # type: ignore[assignment]  # set in run()
        self.demand: DemandController = None  # type: ignore[assignment]  # set in run()
        #: The vLLM engines' load for ``GET /v1/engines``; set in run(), with the HTTP session.
        self.engines: EngineLoad = None  # type: ignore[assignment]
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._reload_lock = asyncio.Lock()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        #: Config reloads by result ("success", "failure"), for the exporter.
        self.reloads: Counter[str] = Counter()

    def _on_event(self, event: WorkerEvent) -> None:
        self.plugins.call_each("citadel_worker_event", event=event)
        if event.kind == "state":
            self.notifier.status(self.supervisor.summary())

    def control_routes(self) -> list[Route]:
        """The GET routes parts and plugins add to the control API (``citadel_control_routes``)."""
        taken = {API_PREFIX + route.path for route in builtin_routes()}
        return accept_plugin_routes(self.plugins.call_each("citadel_control_routes"), taken, API_PREFIX)

    # -- actions from the control API ----------------------------------------

    async def act(self, action: str, names: list[str], everything: bool, wait: bool = False,
                  rolling: bool = False) -> dict[str, Any]:
        """Start, stop or restart workers; with ``wait``, until they settled."""
        sup = self.supervisor
        workers = list(sup.workers.values()) if everything else sup.resolve(names)
        if action == "start":
            # A member of a swap group starts once the group has room for it.
            direct = [w for w in workers if not w.info.config.swap_group]
            making_room = [self.demand.bring_up(w, by_operator=True)
                           for w in workers if w.info.config.swap_group]
            if wait:
                await sup.start_workers(direct)
                await asyncio.gather(*making_room, return_exceptions=True)
                await asyncio.gather(*(w.settled(w.info.config.startup_timeout) for w in workers))
            else:
                for w in direct:
                    w.start()
        elif action == "stop":
            if wait:
                await sup.stop_workers(workers)
            else:
                for w in workers:
                    w.stop()
        elif action == "restart":
            if wait or rolling:
                await sup.restart_workers(workers, rolling=rolling)
            else:
                for w in workers:
                    w.restart()
        else:
            raise ValueError(f"unknown action {action!r}")
        return {"workers": [w.to_json() for w in workers]}

    async def reload(self) -> tuple[bool, dict[str, Any]]:
        """Reload the config file; on error nothing changes. One reload at a time."""
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> tuple[bool, dict[str, Any]]:
        self.notifier.reloading()
        try:
            previous = {name: w.info.gpu_uuids for name, w in self.supervisor.workers.items()}
            new, allocation = load_and_plan(self.config_path, self.plugins, self.gpus, previous)
        except ConfigError as exc:
            logger.error("reload failed, nothing changed:\n{}", exc)
            self.reloads["failure"] += 1
            self.notifier.status(f"reload failed; {self.supervisor.summary()}")
            self.notifier.notify("READY=1")
            return False, {"error": str(exc), "issues": [str(i) for i in exc.issues]}
        masker.add_secrets(new.secrets)
        if new.daemon != self.config.daemon or new.exporter != self.config.exporter:
            logger.warning("changes to [daemon] and [exporter] take effect when citadeld restarts")
        self.config = new
        self.reloads["success"] += 1
        self.allocation = allocation
        result = await self.supervisor.reload(new, allocation)
        logger.info("reloaded: added {}, removed {}, changed {}",
                    result.added or "none", result.removed or "none", result.changed or "none")
        self.notifier.ready(self.supervisor.summary())
        return True, result.to_json()

    # -- assembly -------------------------------------------------------------

    def _assemble(self, session: aiohttp.ClientSession, control_connections: int) -> Exporter:
        """Register the parts that need the running daemon as built-in plugins: the GPU
        part, the exporter, the status page and the multinode coordinator (the modules of
        ``DEFAULT_PLUGINS`` are registered already)."""
        inventory = self.gpus.inventory
        reader = GpuReader(inventory) if inventory is not None else None
        gpu = GpuPlugin(self.gpus, reader, workers=lambda: list(self.supervisor.workers.values()),
                        assigned=lambda: self.allocation.by_device())
        self.plugins.register_builtin(gpu, "gpu")
        exporter = Exporter(self.config, self.supervisor, self.plugins, self.events, self.reloads,
                            session, gpus=reader, control_connections=control_connections)
        self.plugins.register_builtin(exporter, "exporter")
        page = StatusPage(self.config.exporter, self.supervisor, report=exporter.report, gpus=gpu.answer,
                          max_connections=lambda: exporter.max_connections)
        self.plugins.register_builtin(page, "ui")
        # Closed in reverse: the open pages' streams end before the listener waits for them.
        self._closers += [exporter.close, page.close]
        self.engines = EngineLoad(lambda: list(self.supervisor.workers.values()), session)
        self._closers.append(self.engines.close)
        self.plugins.register_builtin(
            MultinodePlugin(workers=lambda: list(self.supervisor.workers.values()), session=session),
            "multinode")
        self.demand = DemandController(workers=lambda: list(self.supervisor.workers.values()),
                                       groups=lambda: self.config.swap_groups, plugins=self.plugins,
                                       events=self.events)
        self.plugins.register_builtin(self.demand, "demand")
        return exporter

    # -- running ----------------------------------------------------------------

    def _queue_signal(self, signum: int) -> None:
        self._signals.put_nowait(signum)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if not interval:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def run(self) -> int:
        """Run until SIGTERM or SIGINT; the exit code."""
        cfg = self.config
        # Take the lock, then claim the control socket: a second citadeld must stop here,
        # before it touches the first one's socket or workers (stop_leftovers below).
        lock = InstanceLock(cfg.daemon.state_dir)
        lock.acquire()
        try:
            become_subreaper()
            control = ControlServer(self, cfg.daemon.control_socket, cfg.daemon.socket_group,
                                    AccessPolicy.from_groups(cfg.daemon.control_groups,
                                                             cfg.daemon.read_groups))
            control.bind()
            try:
                return await self._run_bound(control)
            finally:
                await control.close()  # also when start-up failed after the bind
        finally:
            lock.release()

    async def _run_bound(self, control: ControlServer) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        # Writable by citadeld alone: stop_leftovers trusts no state file in a folder others may write.
        cfg.daemon.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        check_log_dir(cfg.daemon.log_dir)
        state_file = StateFile(cfg.daemon.state_dir / "workers.json")
        instance = hashlib.sha1(str(cfg.daemon.state_dir.resolve()).encode()).hexdigest()[:8]
        state_file.stop_leftovers(CgroupTree.locate(instance))
        cgroup_tree = CgroupTree.detect(instance) if cfg.daemon.cgroups == "auto" else None
        logger.info("citadeld {} starting (pid {}); workers get {}", __version__, os.getpid(),
                    f"cgroups under {cgroup_tree.base}" if cgroup_tree else "process groups")
        async with aiohttp.ClientSession() as session:
            runtime = WorkerRuntime(session=session, plugins=self.plugins, events=self.events,
                                    state_file=state_file, probe_kinds=probe_kinds(self.plugins),
                                    cgroup_tree=cgroup_tree, gpu_inventory=self.gpus.inventory)
            self.supervisor = Supervisor(cfg, self.plugins.service_types(), runtime, self.allocation)
            self.exporter = self._assemble(session, control.limits.max_connections)
            await control.start()
            await self.exporter.start()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                loop.add_signal_handler(signum, self._queue_signal, signum)
            watchdog = loop.create_task(self._watchdog())
            stalls = LoopStallReporter()
            stalls.start()
            starting = loop.create_task(self.supervisor.start())
            self.demand.start()
            starting.add_done_callback(lambda _: self.notifier.ready(self.supervisor.summary()))
            self.plugins.call_each("citadel_daemon_started", supervisor=self.supervisor)
            try:
                await self._dispatch_signals()
            finally:
                logger.info("stopping all workers")
                self.notifier.stopping()
                self.plugins.call_each("citadel_daemon_stopping", supervisor=self.supervisor)
                starting.cancel()
                await self.demand.close()  # no start on demand while everything stops
                await self.supervisor.shutdown()
                state_file.close()  # its last write (no worker left) is on disk
                watchdog.cancel()
                stalls.stop()
                for closer in reversed(self._closers):
                    await closer()
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    loop.remove_signal_handler(signum)
        logger.info("citadeld stopped")
        return 0

    async def _dispatch_signals(self) -> None:
        while True:
            signum = await self._signals.get()
            if signum in (signal.SIGTERM, signal.SIGINT):
                logger.info("received {}", signal.Signals(signum).name)
                return
            if signum == signal.SIGHUP:
                logger.info("received SIGHUP: reloading {}", self.config_path)
                asyncio.get_running_loop().create_task(self.reload())
            elif signum == signal.SIGCHLD:
                children.reap_orphans()
