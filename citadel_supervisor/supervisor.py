"""The supervisor: owns the workers, starts and stops them in order, reloads by diff."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from .config import CitadelConfig, ServiceConfig
from .gpu import GpuAllocation
from .logs.worker_output import WorkerOutput
from .multinode.rank import GroupRank
from .services.base import ServiceType, WorkerInfo
from .states import WorkerState
from .worker.lifecycle import Worker, WorkerRuntime

_SETTLED = {WorkerState.STOPPED, WorkerState.FATAL}


class UnknownWorkerError(KeyError):
    """A name that is neither a service nor a worker."""

    def __init__(self, name: str, known: Iterable[str]):
        from .config import did_you_mean

        super().__init__(name)
        self.message = f"no service or worker named {name!r}{did_you_mean(name, known)}"

    def __str__(self) -> str:
        return self.message


@dataclass
class ReloadResult:
    """What a reload changed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, list[str]]:
        """As the control API answers it."""
        return {"added": self.added, "removed": self.removed, "changed": self.changed,
                "unchanged": self.unchanged}


async def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds passed (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


def _leader(worker: Worker) -> int | None:
    """The pid of the worker's process. A pid, not the ``ProcessTree``: holding on to an old
    tree would delay closing its pipes' file objects until their fd numbers are reused."""
    proc = worker.proc
    return proc.pid if proc is not None else None


class Supervisor:
    """Keeps every configured worker in the state the operator asked for."""

    def __init__(self, config: CitadelConfig, service_types: dict[str, ServiceType],
                 runtime: WorkerRuntime, allocation: GpuAllocation):
        self.config = config
        self.allocation = allocation
        self.service_types = service_types
        self.runtime = runtime
        self.workers: dict[str, Worker] = {}
        self._ports: dict[str, int] = {}

    # -- building workers ---------------------------------------------------

    def _infos(self, config: CitadelConfig) -> dict[str, WorkerInfo]:
        infos = {}
        for service_name, service in config.services.items():
            for replica, name in enumerate(config.worker_names(service_name)):
                gpus = self.allocation.workers.get(name)
                rank = (GroupRank.of(service_name, service.multinode, config.daemon.node_name())
                        if service.multinode is not None else None)
                infos[name] = WorkerInfo(name=name, service=service_name, replica=replica,
                                         config=service, port=self._port(name, service, replica),
                                         gpu_indices=gpus.indices if gpus else (),
                                         gpu_uuids=gpus.uuids if gpus else (), group_rank=rank)
        return infos

    def _port(self, name: str, service: ServiceConfig, replica: int) -> int | None:
        port = service.port_for(replica)
        if port != 0:
            return port
        if name not in self._ports:  # port = 0: one from the range, kept across reloads
            self._ports[name] = self._free_port()
        return self._ports[name]

    def _free_port(self) -> int:
        low, high = self.config.daemon.port_range
        taken = set(self._ports.values()) | {
            p for s in self.config.services.values() for r in range(s.replicas)
            if (p := s.port_for(r))
        }
        for port in range(low, high + 1):
            if port in taken:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RuntimeError(f"no free port in daemon.port_range {low}-{high}")

    def _make_worker(self, info: WorkerInfo) -> Worker:
        daemon = self.config.daemon
        output = WorkerOutput(info.name, info.service, daemon.log_dir, daemon.log_max_bytes,
                              daemon.log_backups, daemon.log_ring_lines, daemon.log_forward_rate)
        return Worker(info, self.service_types[info.config.type], self.runtime, output)

    # -- names --------------------------------------------------------------

    def resolve(self, names: Iterable[str]) -> list[Worker]:
        """Workers by worker or service name; raises ``UnknownWorkerError``."""
        found: dict[str, Worker] = {}
        for name in names:
            if name in self.workers:
                found[name] = self.workers[name]
                continue
            members = [w for w in self.workers.values() if w.info.service == name]
            if not members:
                raise UnknownWorkerError(name, list(self.workers) + list(self.config.services))
            found.update((w.name, w) for w in members)
        return list(found.values())

    def _by_service(self, workers: Iterable[Worker]) -> dict[str, list[Worker]]:
        grouped: dict[str, list[Worker]] = {}
        for worker in workers:
            grouped.setdefault(worker.info.service, []).append(worker)
        return grouped

    # -- start and stop, in order -------------------------------------------

    async def start(self) -> None:
        """Create every configured worker and start them in ``after`` order."""
        for name, info in self._infos(self.config).items():
            self.workers[name] = self._make_worker(info)
        await self.start_workers(list(self.workers.values()), ranks=False)

    async def start_workers(self, workers: list[Worker], *, ranks: bool = True) -> None:
        """Start workers; each service waits for the services it comes ``after`` to settle.
        ``ranks=False`` (citadeld's start-up, a reload) leaves out the ranks of multinode
        groups, which their coordinator starts head first, and services started on demand."""
        if not ranks:
            workers = [w for w in workers
                       if w.info.group_rank is None and w.info.config.start != "on-demand"]
        grouped = self._by_service(workers)
        settled: dict[str, asyncio.Event] = {name: asyncio.Event() for name in grouped}

        async def start_service(name: str, members: list[Worker]) -> None:
            service = self.config.services[name]
            for dep in service.after:
                if dep in settled:
                    await settled[dep].wait()
            for worker in members:
                worker.start()
            if any(name in self.config.services[other].after for other in grouped):
                await asyncio.gather(*(w.settled(service.startup_timeout) for w in members))
            settled[name].set()

        await asyncio.gather(*(start_service(n, m) for n, m in grouped.items()))

    async def stop_workers(self, workers: list[Worker]) -> None:
        """Stop workers in reverse ``after`` order, independent ones in parallel."""
        grouped = self._by_service(workers)
        stopped: dict[str, asyncio.Event] = {name: asyncio.Event() for name in grouped}

        async def stop_service(name: str, members: list[Worker]) -> None:
            for other in grouped:
                if name in self.config.services[other].after:
                    await stopped[other].wait()
            for worker in members:
                worker.stop()
            await asyncio.gather(*(w.wait_for(_SETTLED) for w in members))
            stopped[name].set()

        await asyncio.gather(*(stop_service(n, m) for n, m in grouped.items()))

    async def restart_workers(self, workers: list[Worker], rolling: bool = False) -> None:
        """Restart workers; ``rolling`` restarts one at a time, each once the last is ready again.

        In a rolling restart a worker is only taken down while another replica
        of its service is ready (waiting up to its ``startup_timeout`` for one),
        so that the service keeps answering throughout.
        """
        if not rolling:
            await asyncio.gather(*(self._restart_one(w) for w in workers))
            return
        for worker in workers:
            if not await self._restart_one_rolling(worker):
                return

    async def _restart_one(self, worker: Worker) -> None:
        """Restart a worker and wait until its new process is running, or failed trying."""
        old = _leader(worker)
        worker.restart()
        # Until the lifecycle task acts, the old process still runs and looks settled.
        await _wait_until(lambda: _leader(worker) not in (None, old) or not worker.wanted
                          or worker.state in (WorkerState.BACKOFF, WorkerState.FATAL),
                          worker.info.config.stop_timeout + 10)
        await worker.settled(worker.info.config.startup_timeout)

    async def _restart_one_rolling(self, worker: Worker) -> bool:
        """Restart one worker once another replica is ready; True when it is ready again."""
        timeout = worker.info.config.startup_timeout
        peers = [w for w in self.workers.values()
                 if w.info.service == worker.info.service and w is not worker and w.wanted]
        if peers and not await _wait_until(lambda: any(p.ready for p in peers), timeout):
            logger.warning("rolling restart of {}: no other replica is ready; restarting {} anyway",
                           worker.info.service, worker.name)
        old = _leader(worker)
        worker.restart()
        await _wait_until(lambda: (_leader(worker) not in (None, old) and worker.ready)
                          or worker.state == WorkerState.FATAL or not worker.wanted, timeout)
        if not worker.ready:
            logger.error("rolling restart of {} stopped: {} is {} and not ready", worker.info.service,
                         worker.name, worker.state.value)
            return False
        return True

    async def shutdown(self) -> None:
        """Stop every worker (in reverse order) and close them."""
        await self.stop_workers(list(self.workers.values()))
        for worker in self.workers.values():
            await worker.close()

    # -- reload -------------------------------------------------------------

    async def reload(self, new: CitadelConfig, allocation: GpuAllocation) -> ReloadResult:
        """Apply a new, already validated config: start added services, stop removed
        ones, restart changed ones (rolling where there are replicas), leave the rest."""
        old = self.config
        result = ReloadResult()
        for name in sorted(set(old.services) | set(new.services)):
            if name not in new.services:
                result.removed.append(name)
            elif name not in old.services:
                result.added.append(name)
            elif old.services[name] != new.services[name]:
                result.changed.append(name)
            else:
                result.unchanged.append(name)
        removed = [w for w in self.workers.values() if w.info.service in result.removed]
        await self.stop_workers(removed)
        for worker in removed:
            await worker.close()
            del self.workers[worker.name]
            self._ports.pop(worker.name, None)
        self.config = new
        self.allocation = allocation
        infos = self._infos(new)
        # Changed services: drop replicas that are gone, restart the rest with the new config.
        for name in result.changed:
            current = [w for w in self.workers.values() if w.info.service == name]
            gone = [w for w in current if w.name not in infos]
            await self.stop_workers(gone)
            for worker in gone:
                await worker.close()
                del self.workers[worker.name]
        to_start = []
        for name, info in infos.items():
            if name not in self.workers:
                self.workers[name] = worker = self._make_worker(info)
                to_start.append(worker)
        await self.start_workers(to_start, ranks=False)
        await asyncio.gather(*(self._restart_changed(name, infos) for name in result.changed))
        return result

    async def _restart_changed(self, service: str, infos: dict[str, WorkerInfo]) -> None:
        workers = [w for w in self.workers.values() if w.info.service == service
                   and w.info != infos[w.name]]
        for worker in workers:
            info = infos[worker.name]
            worker.info = info
            worker.policy.config = info.config
            worker.service_type = self.service_types[info.config.type]
        running = [w for w in workers if w.wanted]
        await self.restart_workers(running, rolling=len(workers) > 1)

    # -- reading ------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Every worker, as ``status --json`` lists them."""
        return [w.to_json() for w in self.workers.values()]

    def summary(self) -> str:
        """``"4/5 workers running"``, for sd_notify's STATUS."""
        running = sum(1 for w in self.workers.values() if w.state == WorkerState.RUNNING)
        return f"{running}/{len(self.workers)} workers running"
