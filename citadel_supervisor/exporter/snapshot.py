"""What a scrape needs of the workers, copied on the event loop; the collectors read only these copies."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import ExporterConfig
from ..process.procstat import ProcStat, process_table
from ..process.spawn import ProcessTree

if TYPE_CHECKING:
    from ..supervisor import Supervisor
    from ..worker.lifecycle import Worker


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
    #: Failed runs by cause (worker.lifecycle.FAILURE_CAUSES), since citadeld started.
    failures: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, worker: Worker) -> WorkerSnapshot:
        """Copy a ``Worker``'s figures (call on the event loop)."""
        proc = worker.proc
        return cls(
            service=worker.info.service,
            worker=worker.name,
            state=worker.state.value,
            ready=worker.serving,
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
            failures=tuple(sorted(worker.failures.items())),
        )


def snapshot_workers(supervisor: Supervisor) -> list[WorkerSnapshot]:
    """Every worker of the supervisor, copied (call on the event loop)."""
    return [WorkerSnapshot.of(w) for w in list(supervisor.workers.values())]


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


@dataclass(frozen=True)
class Scrape:
    """One scrape of ``/metrics``, as ``citadel_scrape_collectors`` is given it."""

    #: Every worker, as copied on the loop when the scrape began.
    workers: list[WorkerSnapshot]
    #: Each running worker's live processes, by worker name (``tree_members``).
    members: dict[str, dict[int, ProcStat]]
    #: The ``[exporter]`` table of the config.
    config: ExporterConfig
