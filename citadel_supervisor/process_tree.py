"""A spawned worker's process tree: its members, signalling it, and stopping it.

Its tree is its cgroup where it has one; otherwise its process group, every
descendant of its leader, and every orphan that carries its tag.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from loguru import logger

from . import cgroups
from .procstat import ProcStat, process_table, read_stat
from .reaper import children, own_children

SPAWN_ID_ENV = "CITADEL_SPAWN_ID"


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None
    signal: int | None

    def failed(self) -> bool:
        """True unless the process exited with code 0."""
        return self.code != 0

    def describe(self) -> str:
        """``exit code 1`` or ``killed by SIGKILL``."""
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        return f"exit code {self.code}"

    def to_json(self) -> dict[str, int | None]:
        """As ``last_exit`` in ``status --json``."""
        return {"code": self.code, "signal": self.signal}


class ProcessTree:
    """A spawned worker: its leader, and the means to find and kill its descendants."""

    def __init__(self, popen: subprocess.Popen[bytes], spawn_id: str, cgroup: Path | None,
                 pipes: tuple[int, int] | None = None):
        self.popen = popen
        # Raw fds that we own, not Popen's file objects: those would close their fd
        # again when collected, by then perhaps another worker's pidfd or pipe.
        self._pipes = pipes
        self.pid = popen.pid
        self.spawn_id = spawn_id
        self.cgroup = cgroup
        self.started = time.time()
        self.create_time = _create_time(self.pid)
        self.status: ExitStatus | None = None
        self._exited = asyncio.get_running_loop().create_future()
        self._pidfd = os.pidfd_open(self.pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_pidfd)

    @property
    def stdout(self) -> int:
        """The read end of the worker's stdout pipe (the reader closes it)."""
        assert self._pipes is not None, "spawned without capture_output"
        return self._pipes[0]

    @property
    def stderr(self) -> int:
        """The read end of the worker's stderr pipe (the reader closes it)."""
        assert self._pipes is not None, "spawned without capture_output"
        return self._pipes[1]

    def _on_pidfd(self) -> None:
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            result = None
        if result is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        children.pids.discard(self.pid)
        if result.si_code == os.CLD_EXITED:
            self.status = ExitStatus(code=result.si_status, signal=None)
            self.popen.returncode = result.si_status
        else:
            self.status = ExitStatus(code=None, signal=result.si_status)
            self.popen.returncode = -result.si_status
        if not self._exited.done():
            self._exited.set_result(self.status)

    async def wait(self) -> ExitStatus:
        """Wait for the leader to exit; its status."""
        return await asyncio.shield(self._exited)

    @property
    def leader_alive(self) -> bool:
        """True until the leader has been reaped."""
        return not self._exited.done()

    def members(self, table: dict[int, ProcStat] | None = None) -> set[int]:
        """Every live process of this worker's tree, leader included.

        ``table``: the host's processes (``procstat.process_table()``), when the
        caller lists several trees at once; read here when it is needed and not given.
        """
        return set(self.member_stats(table))

    def member_stats(self, table: dict[int, ProcStat] | None = None) -> dict[int, ProcStat]:
        """Every live process of this worker's tree, with what ``/proc/PID/stat`` says of it."""
        if self.cgroup is not None:
            found = {pid: read_stat(pid) for pid in cgroups.procs(self.cgroup)}
            return {pid: stat for pid, stat in found.items() if stat is not None and not stat.zombie}
        if table is None:
            table = process_table()
        tree = {pid for pid, stat in table.items() if stat.pgid == self.pid}
        tree.add(self.pid)
        by_parent: dict[int, list[int]] = {}
        for pid, stat in table.items():
            by_parent.setdefault(stat.ppid, []).append(pid)
        stack = [self.pid]
        while stack:  # the leader's descendants, whichever group or session they moved to
            for child in by_parent.get(stack.pop(), []):
                if child not in tree:
                    tree.add(child)
                    stack.append(child)
        tree.discard(os.getpid())
        tree.update(self._tagged_orphans())
        return {pid: table[pid] for pid in tree if pid in table and not table[pid].zombie}

    def _tagged_orphans(self) -> set[int]:
        tagged = set()
        for pid in own_children():
            if pid in children.pids:
                continue
            try:
                child = psutil.Process(pid)
            except psutil.Error:
                continue
            try:
                if child.environ().get(SPAWN_ID_ENV) == self.spawn_id:
                    tagged.add(child.pid)
                    tagged.update(c.pid for c in child.children(recursive=True))
            except psutil.Error:
                continue
        return tagged

    def signal_tree(self, sig: int) -> int:
        """Send ``sig`` to every process of the tree; how many were signalled."""
        members = self.members()
        if sig == signal.SIGKILL and self.cgroup is not None:
            cgroups.kill(self.cgroup)
            return len(members)
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in members:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return len(members)

    async def stop(self, sig: int, timeout: float) -> bool:
        """Signal the whole tree, wait up to ``timeout``, then SIGKILL what is left.

        Returns True when the tree ended within the timeout, False when it had
        to be killed.
        """
        if not self.members() and not self.leader_alive:
            self._cleanup_cgroup()
            return True
        self.signal_tree(sig)
        graceful = await self._wait_empty(timeout, resignal=sig)
        if not graceful:
            left = self.members()
            logger.warning("{} process(es) of pid {} outlived the stop signal; sending SIGKILL: {}",
                           len(left), self.pid, sorted(left))
            self.signal_tree(signal.SIGKILL)
            if not await self._wait_empty(10.0, resignal=signal.SIGKILL):
                logger.error("processes {} survived SIGKILL (uninterruptible sleep?)", sorted(self.members()))
        self._cleanup_cgroup()
        return graceful

    async def _wait_empty(self, timeout: float, resignal: int) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.005
        seen = self.members()
        while True:
            children.reap_orphans()
            members = self.members()
            if not members and not self.leader_alive:
                return True
            if not members and self.leader_alive:
                # Reaped by nobody yet: give the pidfd callback a turn.
                await asyncio.sleep(0)
            new = members - seen
            for pid in new:  # forked after the signal: they get it too
                try:
                    os.kill(pid, resignal)
                except ProcessLookupError:
                    pass
            seen |= new
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def _cleanup_cgroup(self) -> None:
        if self.cgroup is not None:
            cgroups.remove(self.cgroup)


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
