"""The worker's state machine, in-process: no citadeld, a fake service type whose worker is a
short real process, and the restart hook. States as events: starting, running, backoff, fatal."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

from citadel_supervisor import hookimpl
from citadel_supervisor.config import ServiceConfig
from citadel_supervisor.events import EventBus, WorkerEvent
from citadel_supervisor.logs.worker_output import WorkerOutput
from citadel_supervisor.plugins import PluginRegistry
from citadel_supervisor.probes.runner import ProbeKinds
from citadel_supervisor.process.statefile import StateFile
from citadel_supervisor.services.base import ServiceType, SpawnSpec, WorkerInfo
from citadel_supervisor.states import WorkerState
from citadel_supervisor.worker.lifecycle import Worker, WorkerRuntime
from citadel_supervisor.worker.restart_policy import RestartWait


class ExitAfterService(ServiceType):
    """A FAKE service type for this test: its worker is ``python -c`` with the given program."""

    name = "exit_after"
    config_model = ServiceConfig

    def __init__(self, program: str):
        self.program = program

    def spawn_spec(self, worker: WorkerInfo) -> SpawnSpec:
        """Run the program."""
        return SpawnSpec(argv=[sys.executable, "-c", self.program], env={})


class HoldsRestarts:
    """A plugin that holds every restart until the test lets it go."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held: list[str] = []

    @hookimpl
    def citadel_before_restart(self, worker: WorkerInfo) -> RestartWait:
        self.held.append(worker.name)
        return RestartWait("the test's permission", self.release.wait())


def make_worker(tmp_path: Path, session: aiohttp.ClientSession, program: str,
                plugins: PluginRegistry, events: EventBus, **keys: object) -> Worker:
    config = ServiceConfig.model_validate({"type": "exit_after", "backoff_initial": 0,
                                           "probes": {}, **keys})
    runtime = WorkerRuntime(session=session, plugins=plugins, events=events,
                            state_file=StateFile(tmp_path / "workers.json"), probe_kinds=ProbeKinds())
    info = WorkerInfo(name="w", service="w", replica=0, config=config)
    return Worker(info, ExitAfterService(program), runtime, WorkerOutput("w", "w", None))


async def states_until(queue: asyncio.Queue[WorkerEvent], last: str, limit: int = 50) -> list[str]:
    """The worker's states, from its events, up to and including ``last``; every exit event on
    the way must name its cause."""
    seen: list[str] = []
    while len(seen) < limit:
        event = await asyncio.wait_for(queue.get(), 30)
        if event.kind == "exit":
            assert event.detail["cause"] in ("exit", None), event.detail
        if event.kind == "state":
            seen.append(event.state)
            if event.state == last:
                return seen
    raise AssertionError(f"no {last!r} in {seen}")


async def held(queue: asyncio.Queue[WorkerEvent]) -> WorkerEvent:
    """The first event of a restart held by a plugin (state backoff, ``waiting`` set)."""
    event = await asyncio.wait_for(queue.get(), 30)
    while not (event.kind == "state" and event.detail.get("waiting")):
        event = await asyncio.wait_for(queue.get(), 30)
    return event


def test_a_worker_that_keeps_failing_is_restarted_then_goes_fatal(tmp_path: Path) -> None:
    asyncio.run(_keeps_failing(tmp_path))


async def _keeps_failing(tmp_path: Path) -> None:
    session = aiohttp.ClientSession()
    events = EventBus()
    queue = events.subscribe()
    worker = make_worker(tmp_path, session, "import sys; sys.exit(3)", PluginRegistry(), events,
                         start_limit_burst=3, start_limit_interval=60)
    worker.run()
    worker.start()
    seen = await states_until(queue, "fatal")
    # No probes: running once spawned; no backoff with backoff_initial = 0; the third is fatal.
    assert seen == ["starting", "running"] * 3 + ["fatal"]
    assert worker.state == WorkerState.FATAL and worker.restarts == 2
    assert worker.last_exit is not None and worker.last_exit.code == 3
    assert worker.last_failure == "exit" and worker.failures == {"exit": 3}
    assert worker.to_json()["last_failure"] == "exit"
    worker.stop()
    await worker.settled(10)
    await session.close()


def failing_worker_held(tmp_path: Path, session: aiohttp.ClientSession
                        ) -> tuple[Worker, asyncio.Queue[WorkerEvent], HoldsRestarts]:
    """A started worker that exits 1 at once, whose restarts ``HoldsRestarts`` holds."""
    events = EventBus()
    queue = events.subscribe()
    holder = HoldsRestarts()
    plugins = PluginRegistry()
    plugins.register(holder, "holder")
    worker = make_worker(tmp_path, session, "import sys; sys.exit(1)", plugins, events,
                         start_limit_burst=100)
    worker.run()
    worker.start()
    return worker, queue, holder


def test_a_restart_waits_for_the_plugins_and_a_stop_ends_it(tmp_path: Path) -> None:
    asyncio.run(_restart_waits(tmp_path))


async def _restart_waits(tmp_path: Path) -> None:
    session = aiohttp.ClientSession()
    worker, queue, holder = failing_worker_held(tmp_path, session)
    event = await held(queue)
    assert event.state == "backoff" and event.detail["waiting"] == "the test's permission"
    assert holder.held == ["w"] and worker.state == WorkerState.BACKOFF
    holder.release.set()
    assert await states_until(queue, "starting") == ["starting"]  # held, then let go
    worker.stop()
    await worker.settled(10)
    assert worker.state == WorkerState.STOPPED and worker.proc is None
    await session.close()


def test_a_stop_cuts_a_held_restart_short(tmp_path: Path) -> None:
    asyncio.run(_stop_while_held(tmp_path))


async def _stop_while_held(tmp_path: Path) -> None:
    session = aiohttp.ClientSession()
    worker, queue, holder = failing_worker_held(tmp_path, session)  # never released: only a stop ends it
    await held(queue)
    worker.stop()
    assert await worker.wait_for({WorkerState.STOPPED}, timeout=10)  # the wait never ends by itself
    assert worker.state == WorkerState.STOPPED and holder.held == ["w"]
    await session.close()
