"""The supervisor's families: each worker's state, readiness, restarts and probes; the daemon's own."""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ... import __version__
from ...states import STATE_NAMES
from ..monitors import LoopLagMonitor, StartupHistogram
from ..snapshot import WorkerSnapshot
from . import WORKER_LABELS as _WORKER

#: The states of the contract, in the order ``citadel_worker_state`` lists them.
WORKER_STATES = STATE_NAMES


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
        failures = CounterMetricFamily("citadel_worker_failures",
                                       "Failed runs of the worker, by cause: spawn, startup, liveness, "
                                       "stalled, exit, signal, oom, gpu_error, gpu_oom, model, port, internal.", labels=_WORKER + ["cause"])
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
            for cause, count in w.failures:
                failures.add_metric(key + [cause], float(count))
            uptime.add_metric(key, w.uptime or 0.0)
            for probe in w.probes:
                if probe.duration is not None:
                    probe_time.add_metric(key + [probe.role], probe.duration)
                probe_failures.add_metric(key + [probe.role], float(probe.failures_total))
        yield from (state, up, ready, restarts, failures, uptime, self.startup.family(), probe_time, probe_failures)

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
                                "Largest lag of the supervisor's event loop over the last minute.")
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
