"""The GPUs' families: per GPU its use, memory, temperature, power and XID errors; per worker its GPU memory."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from loguru import logger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..process.procstat import ProcStat

if TYPE_CHECKING:
    from ..exporter.snapshot import WorkerSnapshot

_WORKER = ["service", "worker"]


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
