"""The record of running workers in ``state_dir``, to stop what an earlier citadeld left.

If citadeld is killed with SIGKILL, its workers' leaders get SIGTERM
(``PR_SET_PDEATHSIG``), but a leader that ignores it, or descendants that
outlive it, may live on. At start-up the next citadeld reads this file and
stops every recorded tree that is still there.

The file is untrusted input: it is read only from a folder and a file that
citadeld's own uid owns and no one else may write, every entry is validated
(a bad file is moved aside as ``workers.json.bad``, bad entries are skipped),
and a process is signalled only when it proves to be the worker's: the
recorded leader by its pid and start time, any other process by the spawn id
in its environment or by being in the worker's own cgroup (one that this
citadeld names, under its own cgroup). A pidfd is opened before each proof,
so the process proved is the one signalled, however soon its pid is reused.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import psutil
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import cgroups
from .cgroups import CgroupTree
from .tree import SPAWN_ID_ENV, open_pidfd, send_signal

#: Far more than citadeld writes (an entry is about 150 bytes): a larger file is not its.
_MAX_BYTES = 1 << 20
#: How far apart two psutil readings of one process's start time may be (float rounding).
_SAME_START = 0.05
#: At most this many problems are named in the warning about a bad file.
_MAX_PROBLEMS = 5


class StateEntry(BaseModel):
    """One recorded worker: what proves a process to be its own."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    # Not 0 or below: os.kill would signal a process group, or every process; 1 is init.
    pid: int = Field(gt=1)
    create_time: float = Field(gt=0, allow_inf_nan=False)
    spawn_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    cgroup: str | None = Field(None, pattern=r"^/[^\x00]*$")


class StateFileError(Exception):
    """The state file cannot be trusted or read; the message says why."""


class StateFile:
    """``state_dir/workers.json``: the running workers' pids, start times and cgroups."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        # One writer thread, so writes land in order and never block the loop
        # (a rename on a busy file system can take tens of milliseconds).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statefile")

    def add(self, worker: str, pid: int, create_time: float, cgroup: Path | None,
            spawn_id: str) -> None:
        """Record a spawned worker."""
        self.entries[worker] = {"pid": pid, "create_time": create_time, "spawn_id": spawn_id,
                                "cgroup": str(cgroup) if cgroup else None}
        self._write()

    def remove(self, worker: str) -> None:
        """Forget a worker whose tree is gone."""
        if self.entries.pop(worker, None) is not None:
            self._write()

    def _write(self) -> None:
        self._writer.submit(self._write_now, json.dumps(self.entries))

    def _write_now(self, text: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
            # Never through a link or into a file someone else made there.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot write {}: {}", self.path, exc.strerror)

    def close(self) -> None:
        """Finish pending writes."""
        self._writer.shutdown(wait=True)

    def stop_leftovers(self, cgroup_tree: CgroupTree | None = None, timeout: float = 5.0) -> list[str]:
        """Stop every tree an earlier instance recorded; the names of those found alive.

        ``cgroup_tree``: where this instance's worker cgroups are
        (``CgroupTree.locate``); a recorded cgroup anywhere else is ignored.
        ``timeout``: how long the trees get to end on SIGTERM before SIGKILL.
        """
        if not os.path.lexists(self.path):
            return []
        doubt = folder_doubt(self.path.parent)
        if doubt is not None:
            logger.warning("not using {} to stop what an earlier citadeld left running: {}; "
                           "make the folder owned by uid {} and writable by it alone",
                           self.path, doubt, os.geteuid())
            return []
        entries = self._load()
        found = [worker for worker, entry in entries.items()
                 if _stop_leftover(worker, entry, cgroup_tree, timeout)]
        self.entries = {}
        self._write()
        return found

    def _load(self) -> dict[str, StateEntry]:
        """The file's valid entries; what was wrong is logged, and a bad file moved aside."""
        problems: list[str] = []
        data: Any = {}
        try:
            data = json.loads(read_own_file(self.path, _MAX_BYTES))
        except FileNotFoundError:
            return {}
        except StateFileError as exc:
            problems.append(str(exc))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            problems.append(f"not valid JSON ({_clip(str(exc))})")
        if not isinstance(data, dict):
            problems.append(f"expected an object of worker names, found {type(data).__name__}")
            data = {}
        entries = {}
        for worker, value in data.items():
            try:
                entries[worker] = StateEntry.model_validate(value)
            except ValidationError as exc:
                problems.append(f"worker {_clip(repr(worker))}: {_describe(exc)}")
        if problems:
            self._move_aside(problems)
        return entries

    def _move_aside(self, problems: list[str]) -> None:
        bad = self.path.with_name(self.path.name + ".bad")
        listed = "; ".join(problems[:_MAX_PROBLEMS])
        if len(problems) > _MAX_PROBLEMS:
            listed += f"; and {len(problems) - _MAX_PROBLEMS} more"
        try:
            os.replace(self.path, bad)
            where = f"moved to {bad}"
        except OSError as exc:
            where = f"could not move it to {bad}: {exc.strerror}"
        logger.warning("{}: {} (skipped; the valid entries are still used; {})", self.path, listed, where)


def folder_doubt(folder: Path) -> str | None:
    """Why a file in ``folder`` may have been written by someone else than citadeld; None if not."""
    try:
        info = os.stat(folder)
    except OSError as exc:
        return f"cannot read {folder}: {exc.strerror}"
    if info.st_uid != os.geteuid():
        return f"{folder} is owned by uid {info.st_uid}, not by citadeld's uid {os.geteuid()}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{folder} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def read_own_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of citadeld's uid that no one else may write;
    ``StateFileError`` naming what is wrong otherwise. ``FileNotFoundError`` passes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symbolic link
        raise StateFileError(f"cannot open it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateFileError("not a regular file")
        if info.st_uid != os.geteuid():
            raise StateFileError(f"owned by uid {info.st_uid}, not by citadeld's uid {os.geteuid()}")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StateFileError(f"writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise StateFileError(f"larger than {limit} bytes")
    return data


def _describe(exc: ValidationError) -> str:
    """A validation error in one line: each field, what was wrong, and what it held."""
    parts = []
    for error in exc.errors()[:3]:
        field = ".".join(str(part) for part in error["loc"]) or "entry"
        parts.append(f"{field}: {error['msg']} (got {_clip(repr(error['input']))})")
    return ", ".join(parts)


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width] + "..."


def _stop_leftover(worker: str, entry: StateEntry, cgroup_tree: CgroupTree | None, timeout: float) -> bool:
    """Stop what is left of one recorded worker; True when something of it was alive."""
    cgroup = _owned_cgroup(worker, entry, cgroup_tree)
    pidfds = _leftover_pidfds(entry)
    try:
        if cgroup is not None:
            pidfds.update(_cgroup_pidfds(cgroup, set(pidfds)))
        if not pidfds:
            if cgroup is not None:
                cgroups.remove(cgroup)
            return False
        logger.warning("stopping {} left running by an earlier citadeld: pids {}",
                       _clip(worker), sorted(pidfds))
        _terminate(pidfds, cgroup, timeout)
        return True
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def _owned_cgroup(worker: str, entry: StateEntry, cgroup_tree: CgroupTree | None) -> Path | None:
    """The entry's cgroup if it is one this citadeld names; None (with a warning) if not."""
    if not entry.cgroup:
        return None
    path = Path(entry.cgroup)
    if cgroup_tree is None or not cgroup_tree.owns(path):
        where = f"{cgroup_tree.base}/{cgroup_tree.prefix}*" if cgroup_tree else "none: no cgroup v2 here"
        logger.warning("ignoring the cgroup {} recorded for {}: not one of this citadeld's ({})",
                       _clip(entry.cgroup, 200), _clip(worker), where)
        return None
    return path


def _leftover_pidfds(entry: StateEntry) -> dict[int, int]:
    """pidfds of the processes that prove to be the recorded worker's, by pid.

    The leader, when its pid and start time match, and its descendants; any
    process started since that carries the worker's spawn id. Never a process
    for its process group alone: a stranger given the old leader's pid leads
    a group of that id.
    """
    pidfds: dict[int, int] = {}
    leader = open_pidfd(entry.pid, partial(_started_at, entry.pid, entry.create_time))
    if leader is not None:
        pidfds[entry.pid] = leader
        pidfds.update(_descendant_pidfds(entry.pid, leader))
    if entry.spawn_id:
        spawn_id = entry.spawn_id
        for pid in _started_since(entry.create_time):
            if pid in pidfds:
                continue
            pidfd = open_pidfd(pid, partial(_carries, pid, spawn_id))
            if pidfd is not None:
                pidfds[pid] = pidfd
    pidfds.pop(os.getpid(), None)
    return pidfds


def _descendant_pidfds(pid: int, pidfd: int) -> dict[int, int]:
    """pidfds of the descendants of the live process ``pid`` (held by ``pidfd``)."""
    try:
        found = [(child.pid, child.create_time()) for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return {}
    if not _alive([pidfd]):
        return {}  # gone while listed: its pid, and so its children's ppid, may be a stranger's
    pidfds = {}
    for child, created in found:
        child_pidfd = open_pidfd(child, partial(_started_at, child, created))
        if child_pidfd is not None:
            pidfds[child] = child_pidfd
    return pidfds


def _cgroup_pidfds(cgroup: Path, have: set[int]) -> dict[int, int]:
    """pidfds of the processes in ``cgroup`` (one of this citadeld's) not in ``have``."""
    pidfds = {}
    for pid in cgroups.procs(cgroup):
        if pid in have or pid == os.getpid():
            continue
        pidfd = open_pidfd(pid, partial(_in_cgroup, pid, cgroup))
        if pidfd is not None:
            pidfds[pid] = pidfd
    return pidfds


def _started_at(pid: int, create_time: float) -> bool:
    return abs(psutil.Process(pid).create_time() - create_time) < _SAME_START


def _in_cgroup(pid: int, cgroup: Path) -> bool:
    return pid in cgroups.procs(cgroup)


def _started_since(create_time: float) -> list[int]:
    """The pids of processes started since ``create_time``, this one aside."""
    pids = []
    for proc in psutil.process_iter(["create_time"]):
        started = proc.info["create_time"]
        if started is not None and started >= create_time - _SAME_START and proc.pid != os.getpid():
            pids.append(proc.pid)
    return pids


def _carries(pid: int, spawn_id: str) -> bool:
    return bool(psutil.Process(pid).environ().get(SPAWN_ID_ENV) == spawn_id)


def _terminate(pidfds: dict[int, int], cgroup: Path | None, timeout: float) -> None:
    """SIGTERM every process, SIGKILL those still there after ``timeout``, remove the cgroup."""
    signalled = [fd for pid, fd in pidfds.items() if send_signal(fd, signal.SIGTERM, pid)]
    left = set(_wait_exited(signalled, timeout))
    if cgroup is not None:
        cgroups.kill(cgroup)
    killed = [fd for pid, fd in pidfds.items() if fd in left and send_signal(fd, signal.SIGKILL, pid)]
    _wait_exited(killed, 2.0)
    if cgroup is not None:
        cgroups.remove(cgroup)


def _alive(pidfds: list[int]) -> bool:
    """True when every process of ``pidfds`` is still running (a pidfd reads ready once it exits)."""
    return len(_wait_exited(pidfds, 0.0)) == len(pidfds)


def _wait_exited(pidfds: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` for the processes to exit; the pidfds of those still running."""
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    running = set(pidfds)
    deadline = time.monotonic() + timeout
    while running:
        for pidfd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            poller.unregister(pidfd)
            running.discard(pidfd)
        if time.monotonic() >= deadline:
            break
    return [pidfd for pidfd in pidfds if pidfd in running]
