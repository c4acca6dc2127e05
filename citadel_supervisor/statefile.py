"""The record of running workers in ``state_dir``, to stop what an earlier citadeld left.

If citadeld is killed with SIGKILL, its workers' leaders get SIGTERM
(``PR_SET_PDEATHSIG``), but a leader that ignores it, or descendants that
outlive it, may live on. At start-up the
next citadeld reads this file and stops every recorded tree whose leader,
process group or cgroup is still there; process start times guard against
a pid that was reused by an unrelated process.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from loguru import logger

from . import cgroups
from .process import SPAWN_ID_ENV


class StateFile:
    """``state_dir/workers.json``: the running workers' pids, start times and cgroups."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        # One writer thread, so writes land in order and never block the loop
        # (a rename on a busy ext4 has taken 70 ms here).
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
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot write {}: {}", self.path, exc.strerror)

    def close(self) -> None:
        """Finish pending writes."""
        self._writer.shutdown(wait=True)

    def stop_leftovers(self, timeout: float = 5.0) -> list[str]:
        """Stop every tree an earlier instance recorded; the names of those found alive."""
        try:
            old = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable {}: {}", self.path, exc)
            return []
        found = []
        for worker, entry in old.items():
            pids = _leftover_pids(entry)
            cgroup = Path(entry["cgroup"]) if entry.get("cgroup") else None
            if cgroup is not None and cgroups.procs(cgroup):
                pids |= set(cgroups.procs(cgroup))
            if not pids:
                if cgroup is not None:
                    cgroups.remove(cgroup)
                continue
            found.append(worker)
            logger.warning("stopping {} left running by an earlier citadeld: pids {}", worker, sorted(pids))
            _terminate(pids, cgroup, timeout)
        self.entries = {}
        self._write()
        return found


def _leftover_pids(entry: dict[str, Any]) -> set[int]:
    pid = int(entry["pid"])
    pids: set[int] = set()
    try:
        leader = psutil.Process(pid)
        if abs(leader.create_time() - float(entry["create_time"])) < 0.05:
            pids.add(pid)
            pids.update(c.pid for c in leader.children(recursive=True))
    except psutil.Error:
        pass
    # The leader's process group outlives it (vLLM's EngineCore and Worker stay in it), and
    # descendants that left the group still carry the worker's spawn id in their environment.
    started = float(entry["create_time"]) - 0.05
    spawn_id = entry.get("spawn_id")
    for proc in psutil.process_iter(["pid", "create_time"]):
        if proc.info["create_time"] is None or proc.info["create_time"] < started:
            continue
        try:
            if os.getpgid(proc.pid) == pid or spawn_id and proc.environ().get(SPAWN_ID_ENV) == spawn_id:
                pids.add(proc.pid)
        except (OSError, psutil.Error):
            continue
    pids.discard(os.getpid())
    return pids


def _terminate(pids: set[int], cgroup: Path | None, timeout: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and _not_zombie(p) for p in pids):
        time.sleep(0.05)
    if cgroup is not None:
        cgroups.kill(cgroup)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if cgroup is not None:
        time.sleep(0.05)
        cgroups.remove(cgroup)


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
