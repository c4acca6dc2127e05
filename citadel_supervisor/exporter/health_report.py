"""Aggregated health: readiness per service, the ``application/health+json`` report, the health file.

The report follows the IETF draft "Health Check Response Format for HTTP
APIs" (draft-inadarei-api-health-check): a top-level ``status`` of ``pass``,
``warn`` or ``fail``, and ``checks`` keyed ``component:measurement`` (here
``SERVICE:ready``, ``SERVICE:liveness``, ``host:disk_free``, ``gpu:temperature``
...), each a list of objects with ``componentId``, ``observedValue``,
``status`` and ``time``. The whole is ``fail`` when a required service has no
ready worker or a host check fails.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .snapshot import WorkerSnapshot

#: The media type of the report.
HEALTH_JSON = "application/health+json"

_RANK = {"pass": 0, "warn": 1, "fail": 2}


def worst(statuses: Iterable[str]) -> str:
    """The worst of ``pass``/``warn``/``fail`` (``pass`` for none)."""
    return max(statuses, key=_RANK.__getitem__, default="pass")


def status_code(status: str) -> int:
    """``citadel_health_check_status``'s value: 0 pass, 1 warn, 2 fail."""
    return _RANK[status]


@dataclass(frozen=True)
class CheckResult:
    """One object of the report's ``checks``: one component's verdict on one measurement."""

    key: str
    component_id: str
    status: str
    observed_value: Any = None
    observed_unit: str | None = None
    output: str | None = None
    component_type: str = "component"
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """The object as the draft writes it (``time`` in RFC 3339)."""
        out: dict[str, Any] = {
            "componentId": self.component_id,
            "componentType": self.component_type,
            "observedValue": self.observed_value,
            "status": self.status,
            "time": datetime.fromtimestamp(self.time, UTC).isoformat().replace("+00:00", "Z"),
        }
        if self.observed_unit is not None:
            out["observedUnit"] = self.observed_unit
        if self.output and self.status != "pass":  # the draft: output only for warn and fail
            out["output"] = self.output
        return out


def ready_services(workers: Iterable[WorkerSnapshot]) -> dict[str, bool]:
    """``{service: at least one of its workers is ready}``."""
    ready: dict[str, bool] = {}
    for w in workers:
        ready[w.service] = ready.get(w.service, False) or w.ready
    return ready


def readiness(workers: list[WorkerSnapshot], service: str | None = None) -> tuple[bool, dict[str, bool]]:
    """Whether traffic may come: every required service (or the one named) has a ready worker.

    Returns ``(ready, {service: ready})``; raises ``KeyError`` for an unknown service.
    """
    by_service = ready_services(workers)
    if service is not None:
        return by_service[service], {service: by_service[service]}
    required = {w.service for w in workers if w.required}
    return all(by_service[s] for s in required), by_service


def worker_checks(workers: list[WorkerSnapshot]) -> list[CheckResult]:
    """``SERVICE:ready`` per worker, and ``SERVICE:ROLE`` per probe.

    A worker that is not ready fails its service when no other worker of a
    required service is ready, and warns otherwise; a probe that is not
    passing warns (its effect, a restart or unreadiness, is seen elsewhere).
    """
    by_service = ready_services(workers)
    now = time.time()
    results = []
    for w in workers:
        if w.ready:
            status = "pass"
        elif w.required and not by_service[w.service]:
            status = "fail"
        else:
            status = "warn"
        results.append(CheckResult(f"{w.service}:ready", w.worker, status, w.ready,
                                   output=f"state {w.state}", time=now))
        for probe in w.probes:
            results.append(CheckResult(
                f"{w.service}:{probe.role}", w.worker, "pass" if probe.passing else "warn",
                probe.duration, "s", probe.detail, time=probe.time or now,
            ))
    return results


def build_report(checks: Iterable[CheckResult], release: str) -> dict[str, Any]:
    """The ``application/health+json`` document."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    statuses = []
    for check in checks:
        grouped.setdefault(check.key, []).append(check.to_json())
        statuses.append(check.status)
    return {
        "status": worst(statuses),
        "version": release.split(".")[0],
        "releaseId": release,
        "serviceId": "citadeld",
        "description": "Citadel supervisor: its workers and its host",
        "checks": grouped,
    }


def check_statuses(checks: Iterable[CheckResult]) -> dict[str, int]:
    """``{check key: 0 pass, 1 warn, 2 fail}``, the worst of each key's objects."""
    worst_by_key: dict[str, str] = {}
    for check in checks:
        worst_by_key[check.key] = worst([worst_by_key.get(check.key, "pass"), check.status])
    return {key: status_code(status) for key, status in worst_by_key.items()}


def _without_times(report: Any) -> Any:
    if isinstance(report, dict):
        return {k: _without_times(v) for k, v in report.items() if k != "time"}
    if isinstance(report, list):
        return [_without_times(v) for v in report]
    return report


class HealthFile:
    """The report as a file, for load balancers and scripts: replaced atomically when it changes."""

    def __init__(self, path: Path):
        self.path = path
        self._last: str | None = None

    def write(self, report: dict[str, Any]) -> bool:
        """Write the report if anything but its times changed; True when written (blocks: disk)."""
        key = json.dumps(_without_times(report), sort_keys=True)
        if key == self._last:
            return False
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one
        self._last = key
        return True
