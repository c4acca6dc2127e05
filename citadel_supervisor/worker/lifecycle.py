"""One worker: its state machine, restart policy, probes and process tree.

States (the contract): ``stopped``, ``starting`` (spawned, not yet ready),
``running`` (ready), ``backoff`` (waiting to restart), ``stopping``,
``fatal`` (gave up; a manual start clears it), and for workers started on
demand ``idle`` (down until a request wants it) and ``asleep`` (its process
runs, its engine sleeps). One task per worker runs the lifecycle; ``start``,
``stop``, ``restart``, ``stop_idle``, ``sleep`` and ``wake`` only set what is
wanted and wake it, so every transition happens in one place.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import aiohttp
from loguru import logger

from ..config import ProbeConfig
from ..events import EventBus, WorkerEvent
from ..gpu import GpuInventory, WorkerGpus, worker_placement
from ..logs.masking import masker
from ..logs.worker_output import WorkerOutput
from ..plugins import PluginRegistry
from ..probes.base import ProbeFactory, ProbeResult
from ..probes.runner import ProbeRunner
from ..process.accounts import RunAs
from ..process.cgroups import CgroupTree
from ..process.listeners import Owner, listening_sockets, port_owner
from ..process.procstat import ProcStat, process_table
from ..process.spawn import ExitStatus, ProcessTree, SpawnError, check_port_free, spawn
from ..process.statefile import StateFile
from ..services.base import ServiceType, SleepControl, SleepError, WorkerInfo
from ..states import WorkerState
from ..waits import wait_event
from .forensics import classify
from .restart_policy import RestartPolicy, RestartWait

#: Variables of citadeld's own environment that must not reach a worker.
_PRIVATE_ENV = (
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
    "LISTEN_FDNAMES", "JOURNAL_STREAM", "INVOCATION_ID", "PROMETHEUS_MULTIPROC_DIR",
    "CREDENTIALS_DIRECTORY",
)


def worker_base_env() -> dict[str, str]:
    """citadeld's environment, less what belongs to citadeld alone."""
    return {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}


@dataclass
class WorkerRuntime:
    """What every worker shares: the daemon's HTTP session, plugins, events, cgroups."""

    session: aiohttp.ClientSession
    plugins: PluginRegistry
    events: EventBus
    state_file: StateFile
    probe_kinds: dict[str, ProbeFactory]
    cgroup_tree: CgroupTree | None = None
    #: NVML's view of the GPUs (None on a CPU host), for pinning workers.
    gpu_inventory: GpuInventory | None = None


#: Seconds a gateway's count of requests in flight stands (it reports once a second).
IN_FLIGHT_FRESH = 5.0

#: Why a run failed, one word each: it could not be spawned; it was not ready within
#: startup_timeout; its liveness probe failed; the progress probe saw a stalled engine;
#: it exited with a non-zero code, or a signal killed it (both refined from its last
#: lines, its cgroup and NVML by ``forensics``: oom, gpu_error, gpu_oom, model, port);
#: it did not wake from sleep; citadeld's own bug.
FAILURE_CAUSES = ("spawn", "startup", "liveness", "stalled", "exit", "signal", "oom", "gpu_error",
                  "gpu_oom", "model", "port", "wake", "internal")


@dataclass
class RunOutcome:
    """How one run of the process ended."""

    failed: bool
    uptime: float
    interrupted: bool
    reason: str
    #: The failure's class, in one word (``FAILURE_CAUSES``); "" when it did not fail.
    cause: str = ""


class Worker:
    """One replica of a service, kept in the state the operator asked for."""

    def __init__(self, info: WorkerInfo, service_type: ServiceType, runtime: WorkerRuntime,
                 output: WorkerOutput):
        self.info = info
        self.service_type = service_type
        self.runtime = runtime
        self.output = output
        self.policy = RestartPolicy(info.config)
        self.state = WorkerState.STOPPED
        self.since = time.time()
        self.ready = False
        self.restarts = 0
        self.last_exit: ExitStatus | None = None
        self.last_error: str | None = None
        #: The cause of the last failed run (``FAILURE_CAUSES``), and a count of each.
        self.last_failure: str | None = None
        self.failures: Counter[str] = Counter()
        self.last_lines: list[str] = []
        self.proc: ProcessTree | None = None
        self.spawned_at: float | None = None
        self.probes: dict[str, ProbeRunner] = {}
        #: Set by readers such as the vLLM type: what the worker is doing while it starts.
        self.phase: str | None = None
        #: Why it is idle or asleep (``"idle for 600s"``, ``"evicted for coder"``), else None.
        self.down_reason: str | None = None
        #: When a request last wanted it (monotonic), and how many the gateway has in flight.
        self.last_used = time.monotonic()
        self._in_flight = 0
        self._in_flight_at = 0.0
        #: Seconds its last start (spawn to ready) and its last wake took; what eviction weighs.
        self.start_seconds: float | None = None
        self.wake_seconds: float | None = None
        self.sleeps = 0
        self.wakes = 0
        #: Why it goes down into ``idle`` rather than ``stopped`` (not an operator's stop).
        self._idle_reason: str | None = None
        self._sleep_reason = ""
        self._sleep_wanted = asyncio.Event()
        self._wake_wanted = asyncio.Event()
        if info.config.start == "on-demand":
            self._idle_reason = self.down_reason = "on demand: not requested yet"
            self.state = WorkerState.IDLE
        self._want_up = False
        self._wake = asyncio.Event()
        self._interrupt = asyncio.Event()
        self._changed = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._spawns = 0
        self._spawns_at_start = 0
        self._log = logger.bind(worker=info.name, service=info.service)

    @property
    def name(self) -> str:
        """The worker's name: the service's, or ``service.N`` for replicas."""
        return self.info.name

    @property
    def serving(self) -> bool:
        """Ready for traffic: ready, and for a rank of a multinode group, its whole group ready."""
        rank = self.info.group_rank
        return self.ready and (rank is None or rank.group_ready)

    @property
    def wanted(self) -> bool:
        """True when the operator (or the config) wants this worker up."""
        return self._want_up

    # -- requests -----------------------------------------------------------

    def run(self) -> None:
        """Create the lifecycle task (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._lifecycle(), name=self.name)

    def start(self) -> None:
        """Ask for the worker to run; clears ``fatal``, cuts a backoff short, wakes it from sleep."""
        self._idle_reason = None
        if self.state == WorkerState.FATAL:
            self.policy.reset()
            self._set_state(WorkerState.STOPPED)
        if self.state == WorkerState.ASLEEP or self._sleep_wanted.is_set():
            self.wake()
        if not self._want_up:
            self._spawns_at_start = self._spawns
        self._want_up = True
        if self.state == WorkerState.BACKOFF:
            self._interrupt.set()  # no process runs during a backoff: just cut it short
        self._wake.set()
        self.run()

    def stop(self) -> None:
        """Ask for the worker to stop (its whole tree); it stays ``stopped``, not on demand."""
        self._idle_reason = None
        self._want_up = False
        self._interrupt.set()
        self._wake.set()
        if self._task is None and self.state == WorkerState.IDLE:
            self._set_state(WorkerState.STOPPED)  # never started: no lifecycle task to do it

    def stop_idle(self, reason: str) -> None:
        """Stop the worker into ``idle``: down for ``reason``, started again on demand."""
        if self._task is None:
            return
        self._idle_reason = reason
        self._want_up = False
        self._interrupt.set()
        self._wake.set()

    @property
    def can_sleep(self) -> bool:
        """True when its type can put it to sleep (vLLM's sleep mode, where the build has it)."""
        return self.service_type.sleep_control(self.info, self.runtime.session) is not None

    def sleep(self, reason: str) -> bool:
        """Put the running worker's engine to sleep (its type's ``sleep_control``); False when it
        is not running, or cannot sleep."""
        if self.state != WorkerState.RUNNING or not self._want_up or not self.can_sleep:
            return False
        self._sleep_reason = reason
        self._wake_wanted.clear()
        self._sleep_wanted.set()
        return True

    def wake(self) -> None:
        """Wake the worker if it sleeps, or is about to."""
        self._sleep_wanted.clear()
        if self.state == WorkerState.ASLEEP:
            self._wake_wanted.set()

    def used(self, in_flight: int | None = None) -> None:
        """A request wanted the worker now (``in_flight``: the gateway's count, if it said)."""
        self.last_used = time.monotonic()
        if in_flight is not None:
            self._in_flight, self._in_flight_at = in_flight, self.last_used

    @property
    def in_flight(self) -> int:
        """Requests the gateway last said it has in flight to the worker; 0 once that report is
        older than ``IN_FLIGHT_FRESH`` (a gateway that ended reports nothing more)."""
        return self._in_flight if time.monotonic() - self._in_flight_at < IN_FLIGHT_FRESH else 0

    @property
    def going_down_idle(self) -> bool:
        """True while it is being stopped into ``idle`` or put to sleep."""
        return self._want_up is False and self._idle_reason is not None or self._sleep_wanted.is_set()

    @property
    def idle_for(self) -> float:
        """Seconds since a request last wanted it."""
        return time.monotonic() - self.last_used

    def restart(self) -> None:
        """Stop the running process (if any) and start a new one."""
        self._want_up = True
        self._interrupt.set()
        self._wake.set()
        self.run()

    async def wait_for(self, states: set[WorkerState], timeout: float | None = None) -> bool:
        """Wait until the worker is in one of ``states``; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state not in states:
            changed = self._changed
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not await wait_event(changed, remaining):
                return self.state in states
        return True

    async def settled(self, timeout: float | None = None) -> bool:
        """Wait until the last start request played out: running, or failed trying.

        Used to order start-up (``after``): a dependent starts once this is
        running, fatal, or backing off or stopped after at least one spawn.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.state in (WorkerState.RUNNING, WorkerState.FATAL):
                return True
            if self.state in (WorkerState.BACKOFF, WorkerState.STOPPED) and (
                self._spawns > self._spawns_at_start or not self._want_up
            ):
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not await wait_event(self._changed, remaining):
                return False

    async def close(self) -> None:
        """Stop, wait until stopped, and end the lifecycle task."""
        self.stop()
        if self._task is not None:
            await self.wait_for({WorkerState.STOPPED, WorkerState.FATAL})
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.output.close()

    # -- state --------------------------------------------------------------

    def _set_state(self, state: WorkerState, **detail: Any) -> None:
        if state == self.state and not detail:
            return
        old = self.state
        self.state = state
        self.since = time.time()
        if state != WorkerState.RUNNING:
            self._set_ready(False, publish=False)
        if state == WorkerState.STARTING:
            self.output.line_watcher = self._watch_startup_line
        else:
            self.phase = None
            self.output.line_watcher = None
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self._log.info("{} -> {}{}", old.value, state.value,
                       "".join(f", {k}={v}" for k, v in detail.items() if k != "last_lines"))
        self._publish("state", old.value, detail)

    def _set_ready(self, ready: bool, publish: bool = True) -> None:
        if ready == self.ready:
            return
        self.ready = ready
        if publish:
            self._publish("ready", self.state.value, {})

    def _publish(self, kind: str, old: str | None, detail: dict[str, Any]) -> None:
        event = WorkerEvent(kind=kind, worker=self.name, service=self.info.service,
                            state=self.state.value, old_state=old, ready=self.ready, detail=detail)
        self.runtime.events.publish(event)

    # -- the lifecycle ------------------------------------------------------

    async def _lifecycle(self) -> None:
        while True:
            if not self._want_up:
                down = WorkerState.IDLE if self._idle_reason else WorkerState.STOPPED
                if self.state not in (down, WorkerState.FATAL):
                    self.down_reason = self._idle_reason
                    self._set_state(down, **({"reason": self._idle_reason} if self._idle_reason else {}))
                await self._wake.wait()
                self._wake.clear()
                continue
            self._interrupt.clear()
            try:
                outcome = await self._run_once()
            except Exception as exc:  # noqa: BLE001 (a bug must not leave the process unsupervised)
                outcome = await self._recover_from(exc)
            if outcome.failed and not outcome.interrupted:
                self.last_failure = outcome.cause
                self.failures[outcome.cause] += 1
            if outcome.interrupted or not self._want_up:
                continue
            decision = self.policy.decide(outcome.failed, outcome.uptime, time.monotonic(), outcome.cause)
            if decision.fatal:
                self._want_up = False
                self._log.error("giving up: {}; `citadelctl start {}` tries again",
                                decision.reason, self.name)
                self._set_state(WorkerState.FATAL, reason=decision.reason)
                continue
            if not decision.restart:
                self._want_up = False
                self._set_state(WorkerState.STOPPED, reason=decision.reason)
                continue
            self.restarts += 1
            self._publish("restart", self.state.value, {"delay": decision.delay, "reason": decision.reason})
            if decision.delay > 0:
                self._set_state(WorkerState.BACKOFF, delay=round(decision.delay, 3))
                if await wait_event(self._interrupt, decision.delay):
                    continue  # a stop or start request cut the backoff short
            if await self._before_restart():
                continue  # a stop or start request cut the waiting short

    async def _before_restart(self) -> bool:
        """Wait for what plugins hold the restart for (``citadel_before_restart``), each in turn;
        one that raises is logged by plugin, and the restart goes on. True when a stop, start
        or restart request cut the waiting short (the plugin's awaitable is then cancelled)."""
        for plugin, wait in self.runtime.plugins.call_each("citadel_before_restart", worker=self.info):
            if not isinstance(wait, RestartWait):
                self._log.error("plugin {} answered citadel_before_restart with a {}, not a "
                                "RestartWait; ignored", plugin, type(wait).__name__)
                continue
            self._set_state(WorkerState.BACKOFF, waiting=wait.what)
            waiting = asyncio.ensure_future(wait.until)
            interrupted = asyncio.ensure_future(self._interrupt.wait())
            try:
                await asyncio.wait({waiting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                interrupted.cancel()
                over = waiting.done()
                if not over:
                    waiting.cancel()
            if not over:
                self._log.info("a request cut short the wait for {}", wait.what)
                return True
            if not waiting.cancelled() and (exc := waiting.exception()) is not None:
                self._log.error("plugin {} failed while the restart waited for {}: {}", plugin, wait.what,
                                masker.mask(f"{type(exc).__name__}: {exc}"))
        return False

    def _spawn(self) -> ProcessTree:
        spec = self.service_type.spawn_spec(self.info)
        placement = worker_placement(
            WorkerGpus(self.info.service, self.info.gpu_indices, self.info.gpu_uuids),
            self.runtime.gpu_inventory)
        spec.env.update(placement.env)
        if placement.cpus is not None and spec.cpu_affinity is None:
            spec.cpu_affinity = placement.cpus
        self.runtime.plugins.call_each("citadel_prepare_spawn", worker=self.info, spec=spec)
        config = self.info.config
        try:
            run_as = RunAs.resolve(config.user, config.group) if config.user or config.group else None
        except KeyError as exc:  # removed from the host since the config was loaded
            raise SpawnError(f"user or group: {exc.args[0]}") from None
        env = {**worker_base_env(), **(run_as.env if run_as else {}), **spec.env,
               "CITADEL_WORKER": self.name, "CITADEL_SERVICE": self.info.service}
        masker.add_env(env)
        if self.info.port:
            check_port_free(self.info.config.host, self.info.port)
        tree = self.runtime.cgroup_tree
        cgroup = tree.prepare(self.name) if tree is not None else None
        return spawn(spec.argv, env, spec.cwd, cgroup=cgroup, cpu_affinity=spec.cpu_affinity, run_as=run_as)

    async def _gpu_xids(self) -> int | None:
        """XID errors on the worker's GPUs so far (None: no GPUs, or NVML delivers no XIDs)."""
        inventory = self.runtime.gpu_inventory
        if inventory is None or not self.info.gpu_uuids:
            return None
        return await asyncio.to_thread(inventory.xid_errors, self.info.gpu_uuids)

    async def _gpu_errors_since(self, before: int | None) -> int:
        """XID errors on the worker's GPUs since ``before`` was counted."""
        if before is None:
            return 0
        now = await self._gpu_xids()
        return 0 if now is None else max(0, now - before)

    async def _run_once(self) -> RunOutcome:
        self._spawns += 1
        self.down_reason = None
        await self.service_type.before_spawn(self.info)
        xids_at_spawn = await self._gpu_xids()
        try:
            proc = self._spawn()
        except (SpawnError, OSError) as exc:
            self.last_error = masker.mask(str(exc))
            self._log.error("cannot start: {}", self.last_error)
            self._set_state(WorkerState.STOPPED, error=self.last_error)
            return RunOutcome(failed=True, uptime=0.0, interrupted=False, reason=self.last_error, cause="spawn")
        self.proc = proc
        self.last_error = None
        self.spawned_at = time.monotonic()
        self.output.attach([proc.stdout, proc.stderr])
        self.runtime.state_file.add(self.name, proc.pid, proc.create_time, proc.cgroup, proc.spawn_id)
        self._set_state(WorkerState.STARTING, pid=proc.pid)
        exit_task = asyncio.ensure_future(proc.wait())
        interrupt_task = asyncio.ensure_future(self._interrupt.wait())
        failure: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        probe_tasks: list[asyncio.Task[None]] = []
        reason = cause = ""
        try:
            probes = self.service_type.probes(self.info)
            startup = asyncio.ensure_future(self._startup(probes.startup))
            probe_tasks.append(startup)  # type: ignore[arg-type]
            await asyncio.wait({exit_task, interrupt_task, startup}, return_when=asyncio.FIRST_COMPLETED)
            if startup.done() and not exit_task.done() and not interrupt_task.done():
                error = startup.result()
                if error is not None:
                    failure.set_result((error, "startup"))
                else:
                    self.start_seconds = time.monotonic() - self.spawned_at
                    await self._serve(probes, exit_task, interrupt_task, failure, probe_tasks)
        finally:
            for task in probe_tasks:
                task.cancel()
            self.probes = {}
        uptime = time.monotonic() - self.spawned_at
        interrupted = self._interrupt.is_set() and not exit_task.done()
        interrupt_task.cancel()
        if not exit_task.done():
            self._set_state(WorkerState.STOPPING)
            if failure.done():
                reason, cause = failure.result()
                self._log.error("{} ({}); stopping it", reason, cause)
        await proc.stop(self.info.config.stop_signal, self.info.config.stop_timeout)
        status = await exit_task
        await self.output.drained(0.5)
        self.output.detach()
        self.runtime.state_file.remove(self.name)
        self.proc = None
        self.last_exit = status
        self.last_lines = self.output.recent(10)
        failed = not interrupted and (failure.done() or status.failed())
        if not interrupted and not failure.done():
            reason = status.describe()
            gpu_errors = await self._gpu_errors_since(xids_at_spawn)
            cause = classify("signal" if status.signal is not None else "exit", self.last_lines,
                             proc.oom_kills, gpu_errors)
            tail = "".join(f"\n  | {line}" for line in self.last_lines)
            level = "ERROR" if failed else "INFO"
            because = f", cause {cause}" if failed else ""
            self._log.log(level, "exited ({}) after {:.1f}s{}; last lines:{}", reason, uptime, because,
                          tail or " none")
        self._publish("exit", self.state.value, {"exit": status.to_json(), "reason": reason,
                                                 "cause": cause if failed else None,
                                                 "last_lines": self.last_lines})
        return RunOutcome(failed=failed, uptime=uptime, interrupted=interrupted, reason=reason,
                          cause=cause if failed else "")

    async def _serve(self, probes: Any, exit_task: asyncio.Future[ExitStatus],
                     interrupt_task: asyncio.Future[Any], failure: asyncio.Future[tuple[str, str]],
                     probe_tasks: list[asyncio.Task[None]]) -> None:
        """Running, until the process exits, a probe fails or a request interrupts; asleep
        and awake again in between, as ``sleep`` and ``wake`` ask."""
        ends: list[asyncio.Future[Any]] = [exit_task, interrupt_task, failure]
        while True:
            # Up (again) counts as used: the requests held for it are about to arrive, and
            # the idle clock and swap groups must not take it down before they do.
            self.used()
            self._set_state(WorkerState.RUNNING)
            self._set_ready(probes.readiness is None or probes.startup is not None)
            running = self._start_probes(probes.liveness, probes.readiness, failure)
            probe_tasks += running
            asked = asyncio.ensure_future(self._sleep_wanted.wait())
            try:
                await asyncio.wait([*ends, asked], return_when=asyncio.FIRST_COMPLETED)
            finally:
                asked.cancel()
            if any(f.done() for f in ends):
                return
            for task in running:
                task.cancel()
            self.probes = {}
            if not await self._sleep_through(ends, failure):
                return

    async def _until(self, work: Any, ends: list[asyncio.Future[Any]]) -> asyncio.Future[Any] | None:
        """Run ``work`` until it finishes (its future) or the run ends first (None; cancelled)."""
        task = asyncio.ensure_future(work)
        await asyncio.wait([*ends, task], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            return None
        return task

    async def _sleep_through(self, ends: list[asyncio.Future[Any]],
                             failure: asyncio.Future[tuple[str, str]]) -> bool:
        """Put the engine to sleep, wait for a wake and wake it: True once it serves again,
        False when the run ends meanwhile. A sleep the worker refuses stops it into ``idle``."""
        reason = self._sleep_reason
        self._sleep_wanted.clear()
        self._set_ready(False)
        control: SleepControl | None = self.service_type.sleep_control(self.info, self.runtime.session)
        slept = await self._until(control.sleep(), ends) if control is not None else None
        if slept is None and any(f.done() for f in ends):
            return False
        if control is None or slept is None or slept.exception() is not None:
            why = "its type has no sleep" if control is None or slept is None else str(slept.exception())
            self._log.error("cannot put it to sleep ({}): stopping it instead", masker.mask(why))
            self.stop_idle(reason)
            return False
        self.sleeps += 1
        self.down_reason = reason
        self._set_state(WorkerState.ASLEEP, reason=reason)
        if await self._until(self._wake_wanted.wait(), ends) is None:
            return False
        self._wake_wanted.clear()
        self._set_state(WorkerState.STARTING, waking=True)
        self.phase = "waking"
        started = time.monotonic()
        woke = await self._until(control.wake(), ends)
        if woke is None:
            return False
        if (exc := woke.exception()) is not None:
            error = masker.mask(str(exc)) if isinstance(exc, SleepError) else f"{type(exc).__name__}: {exc}"
            if not failure.done():
                failure.set_result((f"cannot wake it: {error}", "wake"))
            return False
        self.wakes += 1
        self.wake_seconds = time.monotonic() - started
        self.down_reason = None
        return True

    async def _recover_from(self, exc: Exception) -> RunOutcome:
        """One run broke on a bug (here or in a plugin's hook): stop the process it started,
        so that nothing runs unsupervised and ``close`` never waits on a dead task; the run
        counts as failed, and the restart policy decides what comes next."""
        self._log.opt(exception=exc).error("internal error while running the worker: {}: {}",
                                           type(exc).__name__, masker.mask(str(exc)))
        proc, self.proc = self.proc, None
        self.probes = {}
        if proc is not None:
            self._set_state(WorkerState.STOPPING)
            try:
                await proc.stop(self.info.config.stop_signal, self.info.config.stop_timeout)
            except Exception as stop_exc:  # noqa: BLE001
                self._log.opt(exception=stop_exc).error("cannot stop pid {}: {}", proc.pid, stop_exc)
            self.output.detach()
            self.runtime.state_file.remove(self.name)
        reason = f"internal error: {type(exc).__name__}"
        self._publish("exit", self.state.value, {"exit": None, "reason": reason, "cause": "internal",
                                                 "last_lines": []})
        return RunOutcome(failed=True, uptime=0.0, interrupted=False, reason=reason, cause="internal")

    def _watch_startup_line(self, line: str) -> None:
        phase = self.service_type.startup_phase(line)
        if phase is not None and phase != self.phase:
            self.phase = phase
            if phase == "serving":
                self._probe_now.set()

    async def _startup(self, probe: ProbeConfig | None) -> str | None:
        """Run the startup probe until it passes; an error text on timeout."""
        if probe is None:
            return None
        checker = self._make_probe(probe)
        runner = ProbeRunner("startup", checker, probe, lambda ok, r: None)
        self.probes["startup"] = runner
        deadline = time.monotonic() + self.info.config.startup_timeout
        while True:
            result = await checker.check()
            runner.record(result)
            if runner.passing:
                return None
            if time.monotonic() >= deadline:
                return (f"not ready within startup_timeout = {self.info.config.startup_timeout:g}s "
                        f"(last probe: {result.detail})")
            # Sleep a period, or less when the output says the worker now serves.
            self._probe_now.clear()
            await wait_event(self._probe_now, min(probe.period, max(0.0, deadline - time.monotonic())))

    def _start_probes(self, liveness: ProbeConfig | None, readiness: ProbeConfig | None,
                      failure: asyncio.Future[tuple[str, str]]) -> list[asyncio.Task[None]]:
        tasks = []
        if liveness is not None:
            def on_liveness(passing: bool, result: ProbeResult) -> None:
                if not passing and not failure.done():
                    failure.set_result(
                        (f"liveness probe failed {liveness.failure_threshold} times: {result.detail}",
                         result.cause or "liveness"))

            runner = ProbeRunner("liveness", self._make_probe(liveness), liveness, on_liveness, True,
                                 on_busy=self.used)
            self.probes["liveness"] = runner
            tasks.append(asyncio.ensure_future(runner.run()))
        if readiness is not None:
            def on_readiness(passing: bool, result: ProbeResult) -> None:
                self._log.info("readiness: {} ({})", "ready" if passing else "not ready", result.detail)
                self._set_ready(passing)

            runner = ProbeRunner("readiness", self._make_probe(readiness), readiness, on_readiness,
                                 initially_passing=self.ready)
            self.probes["readiness"] = runner
            tasks.append(asyncio.ensure_future(runner.run()))
        return tasks

    def _make_probe(self, config: ProbeConfig) -> Any:
        factory = self.runtime.probe_kinds.get(config.kind)
        if factory is None:
            raise SpawnError(f"no probe kind {config.kind!r} (a plugin may be missing)")
        return factory(config, replace(self.info, tree_pids=self.tree_pids), self.runtime.session)

    def tree_pids(self, table: dict[int, ProcStat] | None = None) -> set[int]:
        """The pids of the worker's process tree now; none while no process runs (reads /proc)."""
        proc = self.proc
        return proc.members(table) if proc is not None else set()

    # -- reading ------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The worker as ``status --json`` shows it."""
        proc = self.proc
        return {
            "name": self.name,
            "service": self.info.service,
            "type": self.service_type.name,
            "state": self.state.value,
            "pid": proc.pid if proc is not None else None,
            "restarts": self.restarts,
            "ready": self.serving,
            "gpus": list(self.info.gpu_indices),
            "gpu_uuids": list(self.info.gpu_uuids),
            "host": self.info.config.host,
            "port": self.info.port,
            "models": self.service_type.models(self.info),
            "multinode": self.info.group_rank.to_json() if self.info.group_rank is not None else None,
            "since": self.since,
            "uptime": (time.monotonic() - self.spawned_at) if proc is not None and self.spawned_at else None,
            "last_exit": self.last_exit.to_json() if self.last_exit else None,
            "last_error": self.last_error,
            "last_failure": self.last_failure,
            "last_lines": self.last_lines,
            "phase": self.phase,
            "probes": {role: r.to_json() for role, r in self.probes.items()},
            "demand": self._demand_json(),
        }

    def _demand_json(self) -> dict[str, Any] | None:
        """How the worker comes and goes on demand, or None when it always runs."""
        config = self.info.config
        sleep = self.service_type.sleep_control(self.info, self.runtime.session) is not None
        if not config.demand_driven and not sleep and self.state not in (WorkerState.IDLE, WorkerState.ASLEEP):
            return None
        return {"start": config.start, "idle_stop": config.idle_stop, "swap_group": config.swap_group,
                "sleep": sleep, "down_reason": self.down_reason,
                "last_used": time.time() - self.idle_for, "in_flight": self.in_flight,
                "start_seconds": self.start_seconds, "wake_seconds": self.wake_seconds,
                "sleeps": self.sleeps, "wakes": self.wakes}


def port_owners(workers: Sequence[Worker]) -> list[Owner | None]:
    """For each worker, whose listener its port reaches (``"worker"``, ``"other"``,
    ``"none"``), or None without a port. Reads /proc, the socket tables and the host's
    process table once each, and only when needed: not on the event loop."""
    targets = [(w, w.info.config.host, w.info.port) for w in workers]
    if not any(port for _, _, port in targets):
        return [None] * len(targets)
    sockets = listening_sockets()
    table: dict[int, ProcStat] | None = None

    def pids(worker: Worker) -> set[int]:
        nonlocal table
        proc = worker.proc
        if table is None and proc is not None and proc.cgroup is None:
            table = process_table()  # one read of the host's processes for every tree
        return worker.tree_pids(table)

    return [port_owner(host, port, partial(pids, w), sockets).owner if port else None
            for w, host, port in targets]
