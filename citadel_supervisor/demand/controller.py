"""Starting, waking, sleeping and evicting workers as requests want them.

- ``want``: requests for services arrived (from the gateway, or ``citadelctl
  wake``): their workers count as used, and those down for want of requests
  (``idle``, ``asleep``) are started or woken, making room in their swap group
  first (``swap.choose_victims``). A worker stopped by an operator, or
  ``fatal``, is left alone: demand never overrides a person.
- Every second, a running worker whose service has ``idle_stop`` and that
  nothing wanted for that long is put down.
- Putting down: to sleep where its type can (vLLM's sleep mode), else stopped
  into ``idle``. An evicted member that was stopped is waited for until its
  process is gone and its GPU memory free (``citadel_before_restart``: the
  wait a restart makes) before the next member starts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from loguru import logger

from .. import hookimpl
from ..config import SwapGroupConfig
from ..control.access import worker_leader
from ..events import EventBus, WorkerEvent
from ..logs.masking import masker
from ..plugins import PluginRegistry
from ..states import WorkerState
from ..waits import cancel_and_wait
from ..worker.lifecycle import Worker
from ..worker.restart_policy import RestartWait
from .metrics import DemandCollector, DemandHistogram
from .swap import Member, choose_victims

#: States in which a worker holds (or is about to hold) its memory.
AWAKE = {WorkerState.STARTING, WorkerState.RUNNING, WorkerState.BACKOFF, WorkerState.STOPPING}
#: Down for want of requests: what a demand brings up.
DOWN_ON_DEMAND = {WorkerState.IDLE, WorkerState.ASLEEP}
#: A member used this recently is busy: the gateway reports in-flight counts once a second.
RECENT_USE = 2.0
#: Seconds between looks at busy members while a start waits for room.
ROOM_POLL = 0.2
#: Seconds between checks for idle workers.
IDLE_POLL = 1.0


def _busy(worker: Worker) -> bool:
    return (worker.in_flight > 0 or worker.idle_for < RECENT_USE
            or worker.state in (WorkerState.STARTING, WorkerState.STOPPING))


class DemandController:
    """The ``demand`` part: brings workers up on demand and takes idle ones down."""

    def __init__(self, workers: Callable[[], Iterable[Worker]],
                 groups: Callable[[], Mapping[str, SwapGroupConfig]],
                 plugins: PluginRegistry, events: EventBus):
        self.workers = workers
        self.groups = groups
        self.plugins = plugins
        self.events = events
        self.histogram = DemandHistogram()
        self.evictions: Counter[tuple[str, str, str]] = Counter()
        self.demand_starts: Counter[tuple[str, str, str]] = Counter()
        #: Why each down worker went down, in one word: not_requested, idle, evicted, manual.
        self.down_kinds: dict[str, str] = {}
        #: When a request first wanted each worker that is still coming up (monotonic).
        self._held_since: dict[str, float] = {}
        self._bringing: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None

    # -- running ------------------------------------------------------------

    def start(self) -> None:
        """Start the idle check."""
        self._task = asyncio.get_running_loop().create_task(self._watch_idle(), name="demand-idle")

    async def close(self) -> None:
        """Stop the idle check and every start in progress."""
        await cancel_and_wait(self._task, *self._bringing.values())

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_POLL)
            for worker in list(self.workers()):
                limit = worker.info.config.idle_stop
                if (limit and worker.state == WorkerState.RUNNING and worker.wanted
                        and worker.in_flight == 0 and worker.idle_for >= limit):
                    self.put_down(worker, f"idle for {limit:g}s", "idle")

    # -- requests -------------------------------------------------------------

    def want(self, services: Iterable[str], used: Mapping[str, int] | None = None) -> list[Worker]:
        """Requests want ``services`` now: mark their workers used and bring up those down for
        want of requests; ``used``: services the caller has requests in flight on, with the
        count (marks them used, never starts them). The workers of ``services``."""
        by_service: dict[str, list[Worker]] = {}
        for worker in self.workers():
            by_service.setdefault(worker.info.service, []).append(worker)
        for service, in_flight in (used or {}).items():
            for worker in by_service.get(service, ()):
                worker.used(in_flight)
        wanted: list[Worker] = []
        for service in services:
            for worker in by_service.get(service, ()):
                worker.used()
                wanted.append(worker)
                if worker.state in DOWN_ON_DEMAND or worker.going_down_idle:
                    self.bring_up(worker)
        return wanted

    def bring_up(self, worker: Worker, by_operator: bool = False) -> asyncio.Task[None]:
        """Start or wake ``worker`` in the background, making room in its swap group first
        (one such start per worker at a time); the task doing it. ``by_operator``: a person
        asked (``citadelctl start`` or ``wake``), so a stopped worker starts too."""
        if not by_operator:
            self._held_since.setdefault(worker.name, time.monotonic())
        task = self._bringing.get(worker.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._bring_up(worker, by_operator),
                                                          name=f"demand-{worker.name}")
            self._bringing[worker.name] = task
            task.add_done_callback(lambda _: self._bringing.pop(worker.name, None))
        return task

    async def _bring_up(self, worker: Worker, by_operator: bool) -> None:
        try:
            group = worker.info.config.swap_group
            if group is not None and group in self.groups():
                lock = self._locks.setdefault(group, asyncio.Lock())
                async with lock:
                    await self._make_room(worker, group)
                    self._start(worker, by_operator)
                    # Hold the group until it is up: the next start must see it awake and busy.
                    await worker.wait_for({WorkerState.RUNNING, WorkerState.FATAL, WorkerState.STOPPED,
                                           WorkerState.BACKOFF, WorkerState.IDLE},
                                          worker.info.config.startup_timeout)
            else:
                self._start(worker, by_operator)
        except Exception as exc:  # noqa: BLE001 (a bug here must not end the daemon's demand handling)
            logger.opt(exception=exc).error("cannot bring up {}: {}", worker.name, masker.mask(str(exc)))

    def _start(self, worker: Worker, by_operator: bool) -> None:
        how = "wake" if worker.state == WorkerState.ASLEEP else "start"
        if not by_operator:
            if worker.state not in DOWN_ON_DEMAND and not worker.going_down_idle:
                return  # an operator stopped it meanwhile, or it is up already
            logger.bind(worker=worker.name, service=worker.info.service).info(
                "{} on demand ({})", "waking" if how == "wake" else "starting", worker.down_reason or "down")
            self.demand_starts[(worker.info.service, worker.name, how)] += 1
        self.down_kinds.pop(worker.name, None)
        worker.start()

    async def _make_room(self, worker: Worker, group: str) -> None:
        """Evict members of ``group`` until ``worker`` fits; wait until they are down."""
        config = self.groups()[group]
        deadline = time.monotonic() + config.busy_wait
        while True:
            members = [w for w in self.workers() if w.info.config.swap_group == group and w is not worker]
            force = time.monotonic() >= deadline
            victims = choose_victims(
                [Member(w.name, w.state in AWAKE, _busy(w), w.idle_for, w.start_seconds) for w in members],
                config.max_running, config.eviction, force=force)
            if victims is not None:
                break
            await asyncio.sleep(ROOM_POLL)
        evicted = [w for w in members if w.name in victims]
        for victim in evicted:
            if force and _busy(victim):
                logger.warning("swap group {}: evicting {} with {} requests in flight after busy_wait = "
                               "{:g}s, for {}", group, victim.name, victim.in_flight, config.busy_wait,
                               worker.name)
            self.evictions[(group, victim.info.service, victim.name)] += 1
            self.events.publish(WorkerEvent(kind="evict", worker=victim.name, service=victim.info.service,
                                            state=victim.state.value,
                                            detail={"group": group, "for": worker.name}))
            self.put_down(victim, f"evicted for {worker.name}", "evicted")
        await asyncio.gather(*(self._down(victim) for victim in evicted))

    async def _down(self, worker: Worker) -> None:
        """Wait until an evicted worker is down, and a stopped one's GPU memory is free."""
        config = worker.info.config
        timeout = config.stop_timeout + float(getattr(config, "sleep_timeout", 60.0)) + 10
        await worker.wait_for({WorkerState.IDLE, WorkerState.ASLEEP, WorkerState.STOPPED, WorkerState.FATAL},
                              timeout)
        if worker.state == WorkerState.ASLEEP:
            return  # the sleep returned once its memory was released
        for plugin, wait in self.plugins.call_each("citadel_before_restart", worker=worker.info):
            if isinstance(wait, RestartWait):
                try:
                    await wait.until
                except Exception as exc:  # noqa: BLE001 (a plugin's failure must not block the start)
                    logger.error("plugin {} failed while {} waited for {}: {}", plugin, worker.name,
                                 wait.what, masker.mask(str(exc)))

    def put_down(self, worker: Worker, reason: str, kind: str) -> None:
        """Put ``worker`` to sleep where its type can, else stop it into ``idle``."""
        self.down_kinds[worker.name] = kind
        self._held_since.pop(worker.name, None)
        if worker.can_sleep and worker.sleep(reason):
            logger.bind(worker=worker.name, service=worker.info.service).info("putting it to sleep: {}", reason)
        else:
            worker.stop_idle(reason)

    def grants_for(self, pid: int) -> tuple[Worker | None, frozenset[str]]:
        """The worker process ``pid`` runs in, and the services its type grants it the right to
        start or wake (the gateway's ``on_demand``); (None, nothing) outside every worker."""
        leader = worker_leader(pid, os.getpid())
        for worker in self.workers():
            proc = worker.proc
            if leader is not None and proc is not None and proc.pid == leader:
                return worker, worker.service_type.control_grants(worker.info)
        return None, frozenset()

    # -- hooks ----------------------------------------------------------------

    @hookimpl
    def citadel_worker_event(self, event: WorkerEvent) -> None:
        """Time from the first request that found a worker down to its readiness."""
        if event.kind == "ready" and event.ready:
            since = self._held_since.pop(event.worker, None)
            if since is not None:
                self.histogram.observe(event.service, time.monotonic() - since)
        elif event.kind == "state" and event.state in (WorkerState.STOPPED.value, WorkerState.FATAL.value):
            self._held_since.pop(event.worker, None)

    @hookimpl
    def citadel_scrape_collectors(self, scrape: Any) -> list[DemandCollector]:
        """The demand families."""
        return [DemandCollector(list(self.workers()), self)]
