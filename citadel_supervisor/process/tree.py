"""A spawned worker's process tree: its members, signalling it, and stopping it.

Its tree is its cgroup where it has one; otherwise its process group, every
descendant of its leader, and every orphan that carries its tag.

A pid is only a name that the kernel gives again once its process is gone, so
a member is signalled through a pidfd opened before its start time is checked
again (``signal_process``), and the process group only while the leader is
unreaped (until then no other process can get its pid, the group's id).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
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
        #: Processes of the tree the kernel's OOM killer ended (read from its cgroup as the
        #: tree is cleaned up; stays 0 without a cgroup with the memory controller).
        self.oom_kills = 0
        #: pid -> start ticks of the members found last time: proof, while such a process
        #: lives, that its pid and group id are still this tree's after the leader is reaped.
        self._known: dict[int, int] = {}
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
        roots = self._anchors(table)
        if self._holds_group(roots, table):
            roots |= {pid for pid, stat in table.items() if stat.pgid == self.pid}
        roots |= self._tagged_orphans() & table.keys()
        tree = _with_descendants(roots, table)
        tree.discard(os.getpid())
        members = {pid: table[pid] for pid in tree if not table[pid].zombie}
        self._known = {pid: stat.start_ticks for pid, stat in members.items()}  # one store: read by threads
        return members

    def _anchors(self, table: dict[int, ProcStat]) -> set[int]:
        """The processes known to be this tree's: the unreaped leader, and earlier members
        whose pid still has the same start time."""
        known = self._known
        anchors = {pid for pid, stat in table.items() if known.get(pid) == stat.start_ticks}
        if self.leader_alive and self.pid in table:
            anchors.add(self.pid)  # unreaped: its pid cannot have been given to another process
        return anchors

    def _holds_group(self, anchors: set[int], table: dict[int, ProcStat]) -> bool:
        """True while the group id (the leader's pid) is this tree's.

        A group id stays taken while the group has a member; once the leader is
        reaped and its group empty, a stranger may get the pid and lead a group of that id.
        """
        return self.leader_alive or any(table[pid].pgid == self.pid for pid in anchors)

    def _tagged_orphans(self) -> set[int]:
        """citadeld's children that carry this tree's spawn id (orphans reparented to it)."""
        tagged = set()
        for pid in own_children():
            if pid in children.pids:
                continue
            try:
                if psutil.Process(pid).environ().get(SPAWN_ID_ENV) == self.spawn_id:
                    tagged.add(pid)
            except psutil.Error:
                continue
        return tagged

    def signal_tree(self, sig: int) -> int:
        """Send ``sig`` to every process of the tree; how many were signalled."""
        members = self.member_stats()
        if sig == signal.SIGKILL and self.cgroup is not None:
            cgroups.kill(self.cgroup)
            return len(members)
        if self.leader_alive:
            # Reaches the ones forked since the listing; safe only while the leader is
            # unreaped, so that the group id cannot be a stranger's.
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass  # each member is tried below, and refusals logged
        for pid, stat in members.items():
            signal_process(pid, stat.start_ticks, sig)
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
            members = self.member_stats()
            if not members and not self.leader_alive:
                return True
            if not members and self.leader_alive:
                # Reaped by nobody yet: give the pidfd callback a turn.
                await asyncio.sleep(0)
            new = members.keys() - seen
            for pid in new:  # forked after the signal: they get it too
                signal_process(pid, members[pid].start_ticks, resignal)
            seen |= new
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def _cleanup_cgroup(self) -> None:
        if self.cgroup is not None:
            self.oom_kills = cgroups.oom_kills(self.cgroup)
            cgroups.remove(self.cgroup)


def _with_descendants(roots: set[int], table: dict[int, ProcStat]) -> set[int]:
    """``roots`` and every descendant of theirs in ``table``, whichever group or session it is in."""
    by_parent: dict[int, list[int]] = {}
    for pid, stat in table.items():
        by_parent.setdefault(stat.ppid, []).append(pid)
    tree = set(roots)
    stack = list(roots)
    while stack:
        for child in by_parent.get(stack.pop(), []):
            if child not in tree:
                tree.add(child)
                stack.append(child)
    return tree


def open_pidfd(pid: int, is_same: Callable[[], bool]) -> int | None:
    """A pidfd for the process that has ``pid`` now, if ``is_same()`` says it is the one meant.

    The pidfd is opened first and the process checked after: if the check passes,
    the pidfd is that process's, and stays so however soon the pid is given again
    (it then signals nobody). None when the process is gone or is another one.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # ESRCH: gone; EINVAL: not a pid
        return None
    try:
        same = is_same()
    except (OSError, psutil.Error):
        same = False
    if not same:
        os.close(pidfd)
        return None
    return pidfd


def send_signal(pidfd: int, sig: int, pid: int) -> bool:
    """Send ``sig`` through ``pidfd`` (the process of ``pid``); False when it is gone or refused.

    A refusal (a member that became another user, which citadeld without
    CAP_KILL may not signal) is logged, never raised: stopping goes on.
    """
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.warning("cannot send {} to pid {}: permission denied (a process of another user?)",
                       signal.Signals(sig).name, pid)
        return False


def signal_process(pid: int, start_ticks: int, sig: int) -> bool:
    """Send ``sig`` to the process ``pid`` if it is still the one started at ``start_ticks``."""
    def is_same() -> bool:
        stat = read_stat(pid)
        return stat is not None and stat.start_ticks == start_ticks

    pidfd = open_pidfd(pid, is_same)
    if pidfd is None:
        return False
    try:
        return send_signal(pidfd, sig, pid)
    finally:
        os.close(pidfd)


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
