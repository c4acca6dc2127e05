"""Spawning workers.

One spawn path (``spawn``) for every child citadeld starts. Each worker:

- runs in its own session and process group, never through a shell unless
  its config asks for one;
- has ``PR_SET_PDEATHSIG`` (SIGTERM) set, so it stops if citadeld is killed;
- is tagged with ``CITADEL_SPAWN_ID`` in its environment, which its
  descendants inherit, so orphans reparented to citadeld (a child
  subreaper) are recognised as the worker's;
- is put in its own cgroup where a writable cgroup v2 subtree exists.

A spawned worker is a ``ProcessTree`` (process/tree.py); the orphans its tree
leaves behind are reaped by ``children`` (process/reaper.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
from loguru import logger

from .accounts import RunAs
from .reaper import children
from .tree import SPAWN_ID_ENV, ExitStatus, ProcessTree

__all__ = [
    "PR_SET_CHILD_SUBREAPER",
    "PR_SET_PDEATHSIG",
    "SPAWN_ID_ENV",
    "ExitStatus",
    "ProcessTree",
    "SpawnError",
    "become_subreaper",
    "check_port_free",
    "children",
    "spawn",
]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


class SpawnError(Exception):
    """A worker could not be started (missing or non-executable program, bad cwd)."""


def become_subreaper() -> bool:
    """Make this process a child subreaper; True on success."""
    if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("PR_SET_CHILD_SUBREAPER failed: {}", os.strerror(ctypes.get_errno()))
        return False
    return True


def _preexec(cgroup_procs_fd: int | None, cpus: set[int] | None, parent: int) -> Callable[[], None]:
    def run_in_child() -> None:
        # Runs between fork and exec: raw syscalls only.
        # SIGTERM, not SIGKILL: vLLM's API server then takes its EngineCore and Worker
        # down with it (SIGKILL would orphan them, holding GPU memory: vLLM issue 55510).
        # A leader that ignores SIGTERM is stopped by the next citadeld (process/statefile.py).
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # citadeld died before the prctl took effect
            os._exit(1)
        if cgroup_procs_fd is not None:
            os.write(cgroup_procs_fd, b"0")
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run_in_child


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
    run_as: RunAs | None = None,
) -> ProcessTree:
    """Start a process in its own session (as ``run_as``'s user and groups, when given);
    raise ``SpawnError`` naming what was wrong."""
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
            # Raw syscalls only (prctl, write, sched_setaffinity): safe beside threads. Python
            # calls it after switching user and groups, so the parent-death signal (which a
            # change of credentials clears) holds.
            preexec_fn=_preexec(procs_fd, cpu_affinity, os.getpid()),  # noqa: PLW1509
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=run_as.groups if run_as else None,
        )
    except OSError as exc:
        if capture_output:
            os.close(out_read)
            os.close(err_read)
        if isinstance(exc, FileNotFoundError):
            raise SpawnError(f"{argv[0]}: no such file or directory") from None
        if isinstance(exc, PermissionError):
            who = f" for uid {run_as.uid}" if run_as and run_as.uid is not None else ""
            raise SpawnError(f"{argv[0]}: permission denied{who} (not executable, or a folder "
                             "on its path not searchable?)") from None
        raise SpawnError(f"{argv[0]}: {exc.strerror}") from None
    finally:
        if procs_fd is not None:
            os.close(procs_fd)
        if capture_output:
            os.close(out_write)
            os.close(err_write)
    children.pids.add(popen.pid)
    return ProcessTree(popen, spawn_id, cgroup, (out_read, err_read) if capture_output else None)
