"""The exporter's collectors: supervisor, worker processes, host, GPUs, and the daemon's own.

Each collector is a prometheus_client custom collector (``collect()`` yields
metric families), built for one scrape from a ``WorkerSnapshot`` list taken on
the event loop; those that read ``/proc`` or NVML run in a thread, never on
the loop. Names follow Prometheus' conventions: the ``citadel_`` prefix, base
units (seconds, bytes, ratios), ``_total`` on counters.
"""

from __future__ import annotations

import asyncio
import os
import platform
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from loguru import logger
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import __version__
from .events import WorkerEvent
from .process import ProcessTree
from .procstat import ProcStat, open_fds, process_table
from .states import STATE_NAMES

#: The states of the contract, in the order ``citadel_worker_state`` lists them.
WORKER_STATES = STATE_NAMES

#: Buckets of ``citadel_worker_startup_seconds``: a command starts in well under a
#: second, a vLLM server in half a minute to a quarter of an hour.
STARTUP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0)

_WORKER = ["service", "worker"]


@dataclass(frozen=True)
class ProbeSnapshot:
    """One probe runner's figures at scrape time."""

    role: str
    passing: bool
    duration: float | None
    failures_total: int
    detail: str | None
    time: float | None


@dataclass(frozen=True)
class WorkerSnapshot:
    """What a scrape needs of one worker, copied on the event loop."""

    service: str
    worker: str
    state: str
    ready: bool
    required: bool
    restarts: int
    uptime: float | None
    probes: tuple[ProbeSnapshot, ...]
    proc: ProcessTree | None
    metrics_url: str | None

    @classmethod
    def of(cls, worker: Any) -> WorkerSnapshot:
        """Copy a ``Worker``'s figures (call on the event loop)."""
        proc = worker.proc
        return cls(
            service=worker.info.service,
            worker=worker.name,
            state=worker.state.value,
            ready=worker.ready,
            required=worker.info.config.required,
            restarts=worker.restarts,
            uptime=(time.monotonic() - worker.spawned_at) if proc is not None and worker.spawned_at else None,
            probes=tuple(
                ProbeSnapshot(role, r.passing, r.last.duration if r.last else None, r.failures_total,
                              r.last.detail if r.last else None, r.last.time if r.last else None)
                for role, r in list(worker.probes.items())
            ),
            proc=proc,
            metrics_url=worker.service_type.metrics_url(worker.info),
        )


def snapshot_workers(supervisor: Any) -> list[WorkerSnapshot]:
    """Every worker of the supervisor, copied (call on the event loop)."""
    return [WorkerSnapshot.of(w) for w in list(supervisor.workers.values())]


# --------------------------------------------------------------------------
# What the daemon keeps between scrapes
# --------------------------------------------------------------------------


class StartupHistogram:
    """Spawn-to-ready times per service, fed by worker events."""

    def __init__(self, buckets: Iterable[float] = STARTUP_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._spawned: dict[str, float] = {}  # worker -> time of its last spawn

    def observe(self, service: str, seconds: float) -> None:
        """Count one worker that took ``seconds`` from spawn to ready."""
        counts = self._counts.setdefault(service, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                counts[i] += 1
        counts[-1] += 1
        self._sums[service] = self._sums.get(service, 0.0) + seconds

    def on_event(self, event: WorkerEvent) -> None:
        """Track spawns (``starting``) and the first readiness after each."""
        if event.kind == "state" and event.state == "starting" and event.old_state != "starting":
            self._spawned[event.worker] = event.time
        elif event.kind == "ready" and event.ready:
            spawned = self._spawned.pop(event.worker, None)
            if spawned is not None:
                self.observe(event.service, max(0.0, event.time - spawned))
        elif event.kind == "exit":
            self._spawned.pop(event.worker, None)

    def family(self) -> HistogramMetricFamily:
        """``citadel_worker_startup_seconds``."""
        family = HistogramMetricFamily(
            "citadel_worker_startup_seconds",
            "Seconds from a worker's spawn to its first readiness.",
            labels=["service"],
        )
        for service, counts in sorted(self._counts.items()):
            buckets = [(_le(b), float(c)) for b, c in zip(self.buckets, counts)]
            buckets.append(("+Inf", float(counts[-1])))
            family.add_metric([service], buckets, self._sums[service])
        return family


def _le(bound: float) -> str:
    return repr(float(bound))


class LoopLagMonitor:
    """Measures how late the event loop wakes a sleeping task: the supervisor loop's lag.

    ``lag()`` is the largest lag seen over the last ``window`` seconds, so that
    a short stall is still visible to a scrape that comes later.
    """

    def __init__(self, period: float = 1.0, window: float = 60.0):
        self.period = period
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()  # (monotonic time, lag)
        #: Wall-clock time of the last tick: the loop's heartbeat.
        self.last_tick: float | None = None

    async def run(self) -> None:
        """Sleep ``period`` over and over, recording how late each wake-up is."""
        loop = asyncio.get_running_loop()
        self.last_tick = time.time()  # the loop runs: a heartbeat from the start
        while True:
            start = loop.time()
            await asyncio.sleep(self.period)
            now = loop.time()
            self.record(now, max(0.0, now - start - self.period))

    def record(self, now: float, lag: float) -> None:
        """Keep one sample and forget those older than the window."""
        self.samples.append((now, lag))
        self.last_tick = time.time()
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()

    def lag(self) -> float:
        """The largest lag in the window (0 before the first sample)."""
        return max((lag for _, lag in list(self.samples)), default=0.0)


# --------------------------------------------------------------------------
# Collectors
# --------------------------------------------------------------------------


class SupervisorCollector:
    """Per worker: state, up, ready, restarts, uptime, probes; the daemon's build,
    plugins, config reloads, loop lag and heartbeat, and its health checks."""

    def __init__(
        self,
        workers: list[WorkerSnapshot],
        *,
        startup: StartupHistogram,
        loop_lag: LoopLagMonitor,
        plugins: Mapping[str, str],
        reloads: Mapping[str, int],
        checks: Mapping[str, int],
    ):
        self.workers = workers
        self.startup = startup
        self.loop_lag = loop_lag
        self.plugins = plugins
        self.reloads = reloads
        self.checks = checks

    def collect(self) -> Iterator[Metric]:
        """Yield the families."""
        state = GaugeMetricFamily("citadel_worker_state", "1 for the worker's current state, 0 for the others.",
                                  labels=_WORKER + ["state"])
        up = GaugeMetricFamily("citadel_worker_up", "1 when a process of the worker runs.", labels=_WORKER)
        ready = GaugeMetricFamily("citadel_worker_ready", "1 when the worker is ready for traffic.",
                                  labels=_WORKER)
        restarts = CounterMetricFamily("citadel_worker_restarts", "Restarts of the worker by citadeld.",
                                       labels=_WORKER)
        uptime = GaugeMetricFamily("citadel_worker_uptime_seconds",
                                   "Seconds since the worker's process was spawned; 0 when none runs.",
                                   labels=_WORKER)
        probe_time = GaugeMetricFamily("citadel_probe_duration_seconds",
                                       "Duration of the probe's last check.", labels=_WORKER + ["role"])
        probe_failures = CounterMetricFamily("citadel_probe_failures",
                                             "Failed checks of the probe since the worker's process started.",
                                             labels=_WORKER + ["role"])
        for w in self.workers:
            key = [w.service, w.worker]
            for name in WORKER_STATES:
                state.add_metric(key + [name], 1.0 if w.state == name else 0.0)
            up.add_metric(key, 1.0 if w.proc is not None else 0.0)
            ready.add_metric(key, 1.0 if w.ready else 0.0)
            restarts.add_metric(key, float(w.restarts))
            uptime.add_metric(key, w.uptime or 0.0)
            for probe in w.probes:
                if probe.duration is not None:
                    probe_time.add_metric(key + [probe.role], probe.duration)
                probe_failures.add_metric(key + [probe.role], float(probe.failures_total))
        yield from (state, up, ready, restarts, uptime, self.startup.family(), probe_time, probe_failures)

        build = GaugeMetricFamily("citadel_build_info", "Always 1; the labels say which citadeld runs.",
                                  labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1.0)
        plugins = GaugeMetricFamily("citadel_plugins", "1 per plugin, labelled with its status.",
                                    labels=["plugin", "status"])
        for name, status in sorted(self.plugins.items()):
            plugins.add_metric([name, status], 1.0)
        reloads = CounterMetricFamily("citadel_config_reloads", "Config reloads, by result.", labels=["result"])
        for result in ("success", "failure"):
            reloads.add_metric([result], float(self.reloads.get(result, 0)))
        lag = GaugeMetricFamily("citadel_loop_lag_seconds",
                                "Largest lag of the supervisor's event loop over the last 10 seconds.")
        lag.add_metric([], self.loop_lag.lag())
        heartbeat = GaugeMetricFamily("citadel_last_watchdog_timestamp_seconds",
                                      "Unix time of the supervisor loop's last heartbeat.")
        if self.loop_lag.last_tick is not None:
            heartbeat.add_metric([], self.loop_lag.last_tick)
        checks = GaugeMetricFamily("citadel_health_check_status",
                                   "Health check verdict: 0 pass, 1 warn, 2 fail.", labels=["check"])
        for name, value in sorted(self.checks.items()):
            checks.add_metric([name], float(value))
        yield from (build, plugins, reloads, lag, heartbeat, checks)


def tree_members(workers: Iterable[WorkerSnapshot]) -> dict[str, dict[int, ProcStat]]:
    """Every live process of each running worker's tree, with its ``/proc`` stat
    (reads /proc: not on the loop).

    Trees without a cgroup are found in one table of the host's processes, read once.
    """
    members: dict[str, dict[int, ProcStat]] = {}
    table = None
    for w in workers:
        if w.proc is None:
            continue
        if table is None and w.proc.cgroup is None:
            table = process_table()
        try:
            members[w.worker] = w.proc.member_stats(table)
        except OSError:
            members[w.worker] = {}
    return members


class ProcessCollector:
    """Per worker, summed over its whole process tree: CPU, memory, threads, files, processes."""

    def __init__(self, workers: list[WorkerSnapshot], members: Mapping[str, Mapping[int, ProcStat]]):
        self.workers = workers
        self.members = members

    def collect(self) -> Iterator[Metric]:
        """Yield the families (reads each process's open files in /proc)."""
        cpu = CounterMetricFamily("citadel_worker_cpu_seconds",
                                  "User and system CPU seconds of the worker's live processes.",
                                  labels=_WORKER)
        rss = GaugeMetricFamily("citadel_worker_resident_memory_bytes",
                                "Resident memory of the worker's processes.", labels=_WORKER)
        threads = GaugeMetricFamily("citadel_worker_threads", "Threads of the worker's processes.",
                                    labels=_WORKER)
        fds = GaugeMetricFamily("citadel_worker_open_fds", "Open file descriptors of the worker's processes.",
                                labels=_WORKER)
        count = GaugeMetricFamily("citadel_worker_processes", "Live processes in the worker's tree.",
                                  labels=_WORKER)
        for w in self.workers:
            stats = self.members.get(w.worker)
            if stats is None:
                continue
            totals = _tree_totals(stats)
            key = [w.service, w.worker]
            cpu.add_metric(key, totals[0])
            rss.add_metric(key, totals[1])
            threads.add_metric(key, totals[2])
            fds.add_metric(key, totals[3])
            count.add_metric(key, totals[4])
        yield from (cpu, rss, threads, fds, count)


def _tree_totals(stats: Mapping[int, ProcStat]) -> tuple[float, float, float, float, float]:
    cpu = rss = threads = fds = 0.0
    for pid, stat in stats.items():
        cpu += stat.cpu_seconds
        rss += stat.resident_bytes
        threads += stat.threads
        fds += open_fds(pid)
    return cpu, rss, threads, fds, float(len(stats))


class HostCollector:
    """The host, through psutil: CPU seconds by mode, memory, disks, network, load."""

    def __init__(self, disk_paths: Iterable[Path]):
        self.disk_paths = list(disk_paths)

    def collect(self) -> Iterator[Metric]:
        """Yield the families (reads /proc)."""
        cpu = CounterMetricFamily("citadel_host_cpu_seconds", "CPU seconds of all CPUs, by mode.",
                                  labels=["mode"])
        for mode, seconds in psutil.cpu_times()._asdict().items():
            if mode not in ("guest", "guest_nice"):  # already counted in user and nice
                cpu.add_metric([mode], seconds)
        memory = psutil.virtual_memory()
        total = GaugeMetricFamily("citadel_host_memory_total_bytes", "Physical memory.")
        total.add_metric([], memory.total)
        available = GaugeMetricFamily("citadel_host_memory_available_bytes",
                                      "Memory available to new processes without swapping.")
        available.add_metric([], memory.available)
        yield from (cpu, total, available)

        disk_total = GaugeMetricFamily("citadel_host_disk_total_bytes", "Size of the file system holding path.",
                                       labels=["path"])
        disk_free = GaugeMetricFamily("citadel_host_disk_free_bytes",
                                      "Bytes free to unprivileged users on the file system holding path.",
                                      labels=["path"])
        for path in self.disk_paths:
            try:
                usage = psutil.disk_usage(str(path))
            except OSError:
                continue
            disk_total.add_metric([str(path)], usage.total)
            disk_free.add_metric([str(path)], usage.free)
        yield from (disk_total, disk_free)

        received = CounterMetricFamily("citadel_host_network_receive_bytes", "Bytes received, by interface.",
                                       labels=["interface"])
        sent = CounterMetricFamily("citadel_host_network_transmit_bytes", "Bytes sent, by interface.",
                                   labels=["interface"])
        for name, counters in sorted(psutil.net_io_counters(pernic=True).items()):
            received.add_metric([name], counters.bytes_recv)
            sent.add_metric([name], counters.bytes_sent)
        yield from (received, sent)

        for minutes, value in zip((1, 5, 15), os.getloadavg()):
            load = GaugeMetricFamily(f"citadel_host_load{minutes}",
                                     f"Load average over {minutes} minute{'s' if minutes > 1 else ''}.")
            load.add_metric([], value)
            yield load


class GpuReader:
    """Refreshes a ``GpuInventory`` (gpu/inventory.py) from one thread at a time.

    The inventory is used duck-typed: ``refresh()``, and ``gpus``, each with
    ``index``, ``uuid``, ``utilization`` (percent), ``memory_used``,
    ``memory_total`` (bytes), ``temperature_c``, ``power_w``, ``xid_errors``
    and ``processes`` (each with ``pid`` and ``used_memory``); a field NVML
    would not give is None and its sample is left out.
    """

    def __init__(self, inventory: Any, min_interval: float = 1.0):
        self.inventory = inventory
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._refreshed = 0.0

    def read(self) -> list[Any]:
        """The GPUs, refreshed unless they were less than ``min_interval`` ago (blocks: NVML)."""
        with self._lock:
            if time.monotonic() - self._refreshed >= self.min_interval:
                try:
                    self.inventory.refresh()
                except Exception as exc:  # noqa: BLE001 - a GPU read must not break a scrape
                    logger.warning("GPU refresh failed: {}", exc)
                self._refreshed = time.monotonic()
            return list(self.inventory.gpus)


class GpuCollector:
    """Per GPU: utilisation, memory, temperature, power, XID errors; per worker its GPU memory."""

    def __init__(self, gpus: list[Any], workers: list[WorkerSnapshot],
                 members: Mapping[str, Mapping[int, ProcStat]]):
        self.gpus = gpus
        self.workers = workers
        self.members = members

    def collect(self) -> Iterator[Metric]:
        """Yield the families."""
        labels = ["gpu", "uuid"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "utilization": GaugeMetricFamily("citadel_gpu_utilization_ratio",
                                             "Fraction of the last sample period a kernel ran.", labels=labels),
            "memory_used": GaugeMetricFamily("citadel_gpu_memory_used_bytes", "GPU memory in use.",
                                             labels=labels),
            "memory_total": GaugeMetricFamily("citadel_gpu_memory_total_bytes", "GPU memory.", labels=labels),
            "temperature_c": GaugeMetricFamily("citadel_gpu_temperature_celsius", "GPU temperature.",
                                               labels=labels),
            "power_w": GaugeMetricFamily("citadel_gpu_power_watts", "GPU power draw.", labels=labels),
            "xid_errors": CounterMetricFamily("citadel_gpu_xid_errors", "XID errors since citadeld started.",
                                              labels=labels),
        }
        per_worker = GaugeMetricFamily("citadel_worker_gpu_memory_bytes",
                                       "GPU memory held by the worker's processes, per GPU.",
                                       labels=_WORKER + labels)
        owner = {pid: w for w in self.workers for pid in self.members.get(w.worker, ())}
        for gpu in self.gpus:
            key = [str(gpu.index), gpu.uuid]
            for field, family in families.items():
                value = getattr(gpu, field, None)
                if value is None:
                    continue
                family.add_metric(key, value / 100 if field == "utilization" else float(value))
            held: Counter[str] = Counter()
            for proc in getattr(gpu, "processes", None) or []:
                worker = owner.get(proc.pid)
                if worker is not None and proc.used_memory is not None:
                    held[worker.worker] += proc.used_memory
            for w in self.workers:
                if w.worker in held:
                    per_worker.add_metric([w.service, w.worker] + key, float(held[w.worker]))
        yield from families.values()
        yield per_worker


def collect_safely(collectors: Iterable[Any]) -> list[Metric]:
    """Every family of every collector; a collector that raises is logged and skipped."""
    families: list[Metric] = []
    for collector in collectors:
        try:
            families.extend(collector.collect())
        except Exception as exc:  # noqa: BLE001 - one bad collector (often a plugin's) must not cost the rest
            logger.opt(exception=exc).error("metric collector {} failed: {}", type(collector).__name__, exc)
    return families
