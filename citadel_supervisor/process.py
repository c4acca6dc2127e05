"""Spawning workers and killing their whole process trees.

One spawn path (``spawn``) for every child citadeld starts. Each worker:

- runs in its own session and process group, never through a shell unless
  its config asks for one;
- has ``PR_SET_PDEATHSIG`` (SIGTERM) set, so it stops if citadeld is killed;
- is tagged with ``CITADEL_SPAWN_ID`` in its environment, which its
  descendants inherit, so orphans reparented to citadeld (a child
  subreaper) are recognised as the worker's;
- is put in its own cgroup where a writable cgroup v2 subtree exists.

Its tree is its cgroup where it has one; otherwise its process group, every
descendant of its leader, and every orphan that carries its tag.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from loguru import logger

from . import cgroups

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SPAWN_ID_ENV = "CITADEL_SPAWN_ID"

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


class SpawnError(Exception):
    """A worker could not be started (missing or non-executable program, bad cwd)."""


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


def become_subreaper() -> bool:
    """Make this process a child subreaper; True on success."""
    if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("PR_SET_CHILD_SUBREAPER failed: {}", os.strerror(ctypes.get_errno()))
        return False
    return True


def own_children() -> list[int]:
    """The pids of this process's children, from ``/proc/self/task/*/children``.

    Far cheaper than psutil's ``children()``, which reads every process on the host.
    """
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as fh:
                pids.extend(int(p) for p in fh.read().split())
        except OSError:
            continue
    return pids


def _process_table() -> dict[int, tuple[int, int, bool]]:
    """Every process on the host: pid -> (parent pid, process group, is a zombie); one /proc pass."""
    table: dict[int, tuple[int, int, bool]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split(b" ", 4)
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0] == b"Z")
    return table


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] == b"Z"


class ChildRegistry:
    """The pids citadeld forked itself: the orphan reaper must leave them alone."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def reap_orphans(self) -> list[tuple[int, int]]:
        """Reap zombie children that citadeld did not fork (reparented orphans).

        Returns ``(pid, status)`` for each one reaped. The direct children's
        exit statuses are left for their own pidfd waiters.
        """
        reaped = []
        for pid in own_children():
            if pid in self.pids or not _is_zombie(pid):
                continue
            try:
                waited, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if waited:
                reaped.append((waited, status))
        return reaped
        for child in children:
            if child.pid in self.pids:
                continue
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    continue
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except (psutil.Error, ChildProcessError):
                continue
            if pid:
                reaped.append((pid, status))
        return reaped


#: The one registry of this process.
children = ChildRegistry()


def _preexec(cgroup_procs_fd: int | None, cpus: set[int] | None, parent: int) -> Callable[[], None]:
    def run_in_child() -> None:
        # Runs between fork and exec: raw syscalls only.
        # SIGTERM, not SIGKILL: vLLM's API server then takes its EngineCore and Worker
        # down with it (SIGKILL would orphan them, holding GPU memory: vLLM issue 55510).
        # A leader that ignores SIGTERM is stopped by the next citadeld (statefile.py).
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # citadeld died before the prctl took effect
            os._exit(1)
        if cgroup_procs_fd is not None:
            os.write(cgroup_procs_fd, b"0")
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run_in_child


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

    def members(self) -> set[int]:
        """Every live process of this worker's tree, leader included."""
        if self.cgroup is not None:
            return {p for p in cgroups.procs(self.cgroup) if _alive(p)}
        table = _process_table()
        found = {pid for pid, (_, pgid, _) in table.items() if pgid == self.pid}
        found.add(self.pid)
        by_parent: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            by_parent.setdefault(ppid, []).append(pid)
        stack = [self.pid]
        while stack:  # the leader's descendants, whichever group or session they moved to
            for child in by_parent.get(stack.pop(), []):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        found.discard(os.getpid())
        found.update(self._tagged_orphans())
        return {p for p in found if p in table and not table[p][2]}

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


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def check_port_free(host: str, port: int) -> None:
    """Raise ``SpawnError`` naming the holder when something already listens on the port.

    A worker started on a taken port fails in its own words, late, or worse:
    its probes reach the other program and report it healthy.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return
    holder = ""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                holder = f" by pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:120]})"
                break
    except (psutil.Error, OSError):
        pass
    raise SpawnError(f"port {port} on {host} is already in use{holder}")


def spawn(
    argv: list[str],
    env: dict[str, str],
    cwd: Path | None = None,
    cgroup: Path | None = None,
    cpu_affinity: set[int] | None = None,
    capture_output: bool = True,
) -> ProcessTree:
    """Start a process in its own session; raise ``SpawnError`` naming what was wrong."""
    if not argv:
        raise SpawnError("empty command")
    if cwd is not None and not cwd.is_dir():
        raise SpawnError(f"working directory {cwd} does not exist")
    spawn_id = uuid.uuid4().hex
    env = {**env, SPAWN_ID_ENV: spawn_id}
    procs_fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY) if cgroup is not None else None
    if capture_output:
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_write if capture_output else subprocess.DEVNULL,
            stderr=err_write if capture_output else subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=(procs_fd,) if procs_fd is not None else (),
            # Raw syscalls only (prctl, write, sched_setaffinity): safe beside threads.
            preexec_fn=_preexec(procs_fd, cpu_affinity, os.getpid()),  # noqa: PLW1509
        )
    except OSError as exc:
        if capture_output:
            os.close(out_read)
            os.close(err_read)
        if isinstance(exc, FileNotFoundError):
            raise SpawnError(f"{argv[0]}: no such file or directory") from None
        if isinstance(exc, PermissionError):
            raise SpawnError(f"{argv[0]}: permission denied (not executable?)") from None
        raise SpawnError(f"{argv[0]}: {exc.strerror}") from None
    finally:
        if procs_fd is not None:
            os.close(procs_fd)
        if capture_output:
            os.close(out_write)
            os.close(err_write)
    children.pids.add(popen.pid)
    return ProcessTree(popen, spawn_id, cgroup, (out_read, err_read) if capture_output else None)
