"""The host's CPU, memory, disks, network and load: a built-in plugin (``citadel_scrape_collectors``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ... import hookimpl
from ..snapshot import Scrape


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


@hookimpl
def citadel_scrape_collectors(scrape: Scrape) -> list[HostCollector]:
    """The host's families, with the disks of ``[exporter] disk_paths``."""
    return [HostCollector(scrape.config.disk_paths)]
