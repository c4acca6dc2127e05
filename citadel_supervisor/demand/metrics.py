"""The demand part's families: sleeps, wakes, evictions, starts on demand, why a worker is
down, and the time from the first request that found a worker down to its readiness."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..exporter.monitors import StartupHistogram
from ..states import WorkerState

if TYPE_CHECKING:
    from ..worker.lifecycle import Worker
    from .controller import DemandController

#: From a wake (about a second on a GPU) to a cold start of a large model (minutes).
DEMAND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class DemandHistogram(StartupHistogram):
    """``citadel_demand_ready_seconds``: from the first request that found a worker down
    (idle or asleep) to its readiness, per service."""

    def __init__(self) -> None:
        super().__init__(DEMAND_BUCKETS, name="citadel_demand_ready_seconds",
                         help_text="Seconds from the first request that found the worker down (idle or "
                              "asleep) to its readiness.")


class DemandCollector:
    """Yields the demand families, read from the workers and the controller."""

    def __init__(self, workers: list[Worker], controller: DemandController):
        self.workers = workers
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        """Yield the families."""
        labels = ["service", "worker"]
        sleeps = CounterMetricFamily("citadel_worker_sleeps", "Times the worker's engine was put to sleep.",
                                     labels=labels)
        wakes = CounterMetricFamily("citadel_worker_wakes", "Times the worker's engine was woken.",
                                    labels=labels)
        down = GaugeMetricFamily("citadel_worker_down_reason",
                                 "1 for why an on-demand worker is idle or asleep: not_requested, idle "
                                 "(idle_stop), evicted (swap group), manual (citadelctl sleep).",
                                 labels=[*labels, "reason"])
        in_flight = GaugeMetricFamily("citadel_worker_in_flight",
                                      "Requests the gateway last said it has in flight to the worker.",
                                      labels=labels)
        for w in self.workers:
            if not w.info.config.demand_driven and not w.sleeps and w.state != WorkerState.IDLE:
                continue
            key = [w.info.service, w.name]
            sleeps.add_metric(key, float(w.sleeps))
            wakes.add_metric(key, float(w.wakes))
            in_flight.add_metric(key, float(w.in_flight))
            if w.state in (WorkerState.IDLE, WorkerState.ASLEEP):
                down.add_metric([*key, self.controller.down_kinds.get(w.name, "not_requested")], 1.0)
        evictions = CounterMetricFamily("citadel_swap_evictions",
                                        "Members evicted from a swap group to make room for another.",
                                        labels=["group", *labels])
        for (group, service, worker), count in sorted(self.controller.evictions.items()):
            evictions.add_metric([group, service, worker], float(count))
        starts = CounterMetricFamily("citadel_demand_starts",
                                     "Workers started (how=start) or woken (how=wake) because a request "
                                     "wanted them.", labels=[*labels, "how"])
        for (service, worker, how), count in sorted(self.controller.demand_starts.items()):
            starts.add_metric([service, worker, how], float(count))
        yield from (sleeps, wakes, down, in_flight, evictions, starts, self.controller.histogram.family())
