"""What the exporter keeps between scrapes: workers' start-up times, and the event loop's lag."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable

from prometheus_client.core import HistogramMetricFamily

from ..events import WorkerEvent

#: Buckets of ``citadel_worker_startup_seconds``: a command starts in well under a
#: second, a vLLM server in half a minute to a quarter of an hour.
STARTUP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0)


class StartupHistogram:
    """Spawn-to-ready times per service, fed by worker events."""

    def __init__(self, buckets: Iterable[float] = STARTUP_BUCKETS,
                 name: str = "citadel_worker_startup_seconds",
                 help_text: str = "Seconds from a worker's spawn to its first readiness."):
        self.buckets = tuple(sorted(buckets))
        self.name = name
        self.help_text = help_text
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
        """The histogram (``citadel_worker_startup_seconds`` by default)."""
        family = HistogramMetricFamily(self.name, self.help_text, labels=["service"])
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
