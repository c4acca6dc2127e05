"""Host health checks with warn and fail thresholds: disk, memory, load, and per GPU.

Each check reads the host (psutil, NVML through a ``GpuReader``) and so
blocks briefly: run ``run_host_checks`` in a thread. The thresholds come from
``[exporter.host_checks]``; a threshold set to nothing turns that level off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from ..config import HostChecksConfig
from .health_report import CheckResult


def grade(value: float, warn: float | None, fail: float | None, *, low_is_bad: bool) -> str:
    """``pass``, ``warn`` or ``fail`` for ``value`` against the thresholds.

    With ``low_is_bad`` a value below a threshold crosses it (free space);
    otherwise a value at or above it does (temperature, load).
    """
    def crossed(threshold: float | None) -> bool:
        if threshold is None:
            return False
        return value < threshold if low_is_bad else value >= threshold

    if crossed(fail):
        return "fail"
    if crossed(warn):
        return "warn"
    return "pass"


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


def disk_checks(paths: Iterable[Path], limits: HostChecksConfig) -> list[CheckResult]:
    """``host:disk_free``: the free fraction of the file system holding each path."""
    results = []
    for path in paths:
        try:
            usage = psutil.disk_usage(str(path))
        except OSError as exc:
            results.append(CheckResult("host:disk_free", str(path), "fail", None, "ratio",
                                       f"cannot read: {exc.strerror or exc}", "datastore"))
            continue
        ratio = usage.free / usage.total if usage.total else 0.0
        results.append(CheckResult(
            "host:disk_free", str(path),
            grade(ratio, limits.disk_free_warn_ratio, limits.disk_free_fail_ratio, low_is_bad=True),
            round(ratio, 4), "ratio", f"{_gib(usage.free)} free of {_gib(usage.total)}", "datastore",
        ))
    return results


def memory_check(limits: HostChecksConfig) -> CheckResult:
    """``host:memory_available``: the fraction of memory available to new processes."""
    memory = psutil.virtual_memory()
    ratio = memory.available / memory.total
    return CheckResult(
        "host:memory_available", "memory",
        grade(ratio, limits.memory_available_warn_ratio, limits.memory_available_fail_ratio, low_is_bad=True),
        round(ratio, 4), "ratio", f"{_gib(memory.available)} available of {_gib(memory.total)}", "system",
    )


def load_check(limits: HostChecksConfig) -> CheckResult:
    """``host:load``: the 5-minute load average per CPU."""
    cpus = os.cpu_count() or 1
    load5 = os.getloadavg()[1]
    per_cpu = load5 / cpus
    return CheckResult(
        "host:load", "cpu",
        grade(per_cpu, limits.load_warn_per_cpu, limits.load_fail_per_cpu, low_is_bad=False),
        round(per_cpu, 3), "load per CPU", f"5-minute load {load5:.2f} on {cpus} CPUs", "system",
    )


def gpu_checks(gpus: Iterable[Any], limits: HostChecksConfig) -> list[CheckResult]:
    """``gpu:temperature``, ``gpu:memory_used`` and ``gpu:xid_errors`` per GPU (``gpu.inventory.GpuInfo``)."""
    results = []
    for gpu in gpus:
        who = f"GPU {gpu.index}"
        if gpu.temperature_c is not None:
            results.append(CheckResult(
                "gpu:temperature", gpu.uuid,
                grade(gpu.temperature_c, limits.gpu_temperature_warn_celsius,
                      limits.gpu_temperature_fail_celsius, low_is_bad=False),
                gpu.temperature_c, "C", who, "GPU",
            ))
        if gpu.memory_used is not None and gpu.memory_total:
            ratio = gpu.memory_used / gpu.memory_total
            results.append(CheckResult(
                "gpu:memory_used", gpu.uuid,
                grade(ratio, limits.gpu_memory_used_warn_ratio, limits.gpu_memory_used_fail_ratio,
                      low_is_bad=False),
                round(ratio, 4), "ratio", f"{who}: {_gib(gpu.memory_used)} of {_gib(gpu.memory_total)}", "GPU",
            ))
        if gpu.xid_errors is not None:
            last = f", last XID {gpu.last_xid}" if getattr(gpu, "last_xid", None) is not None else ""
            results.append(CheckResult(
                "gpu:xid_errors", gpu.uuid,
                grade(gpu.xid_errors, limits.gpu_xid_warn, limits.gpu_xid_fail, low_is_bad=False),
                gpu.xid_errors, "errors", f"{who}{last}", "GPU",
            ))
    return results


def run_host_checks(paths: Iterable[Path], limits: HostChecksConfig,
                    gpus: Iterable[Any] = ()) -> list[CheckResult]:
    """Every host check (blocks: reads /proc, the file systems and NVML's last values)."""
    return [*disk_checks(paths, limits), memory_check(limits), load_check(limits), *gpu_checks(gpus, limits)]
