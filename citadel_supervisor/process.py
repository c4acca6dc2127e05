"""Spawning workers and killing their whole process trees.

One spawn path (``spawn``) for every child citadeld starts. Each worker:

- runs in its own session and process group, never through a shell unless
  its config asks for one;
- has ``PR_SET_PDEATHSIG`` set, so it dies if citadeld is killed;
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
        try:
            children = psutil.Process().children()
        except psutil.Error:
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
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # citadeld died before the prctl took effect
            os._exit(1)
        if cgroup_procs_fd is not None:
            os.write(cgroup_procs_fd, b"0")
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run_in_child


class ProcessTree:
    """A spawned worker: its leader, and the means to find and kill its descendants."""

    def __init__(self, popen: subprocess.Popen[bytes], spawn_id: str, cgroup: Path | None):
        self.popen = popen
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
        """The read end of the worker's stdout pipe."""
        assert self.popen.stdout is not None
        return self.popen.stdout.fileno()

    @property
    def stderr(self) -> int:
        """The read end of the worker's stderr pipe."""
        assert self.popen.stderr is not None
        return self.popen.stderr.fileno()

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
        found: set[int] = set()
        if self.leader_alive and _alive(self.pid):
            found.add(self.pid)
        try:
            found.update(c.pid for c in psutil.Process(self.pid).children(recursive=True))
        except psutil.Error:
            pass
        for proc in psutil.process_iter(["pid"]):
            pid = proc.info["pid"]
            if pid in found or pid == os.getpid():
                continue
            try:
                if os.getpgid(pid) == self.pid:
                    found.add(pid)
            except OSError:
                continue
        found.update(self._tagged_orphans())
        return {p for p in found if _alive(p)}

    def _tagged_orphans(self) -> set[int]:
        tagged = set()
        me = psutil.Process()
        try:
            adopted = [c for c in me.children() if c.pid not in children.pids]
        except psutil.Error:
            return tagged
        for child in adopted:
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
    out = subprocess.PIPE if capture_output else subprocess.DEVNULL
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=(procs_fd,) if procs_fd is not None else (),
            preexec_fn=_preexec(procs_fd, cpu_affinity, os.getpid()),
        )
    except FileNotFoundError:
        raise SpawnError(f"{argv[0]}: no such file or directory") from None
    except PermissionError:
        raise SpawnError(f"{argv[0]}: permission denied (not executable?)") from None
    except OSError as exc:
        raise SpawnError(f"{argv[0]}: {exc.strerror}") from None
    finally:
        if procs_fd is not None:
            os.close(procs_fd)
    children.pids.add(popen.pid)
    return ProcessTree(popen, spawn_id, cgroup)
