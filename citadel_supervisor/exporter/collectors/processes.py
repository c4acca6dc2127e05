"""Each worker's processes, summed over its whole tree: a built-in plugin (``citadel_scrape_collectors``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ... import hookimpl
from ...process.procstat import ProcStat, open_fds
from ..snapshot import Scrape, WorkerSnapshot
from . import WORKER_LABELS as _WORKER


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


@hookimpl
def citadel_scrape_collectors(scrape: Scrape) -> list[ProcessCollector]:
    """The worker processes' families for this scrape."""
    return [ProcessCollector(scrape.workers, scrape.members)]
