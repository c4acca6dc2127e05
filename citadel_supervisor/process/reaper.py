"""The children of citadeld: listing them, and reaping the orphans reparented to it.

citadeld is a child subreaper, so a worker's orphans become its children;
``children`` records the pids it forked itself, whose exit statuses belong
to their own waiters, so that the orphan reaper leaves them alone.
"""

from __future__ import annotations

import os

from .procstat import read_stat


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
            if pid in self.pids or not ((stat := read_stat(pid)) is not None and stat.zombie):
                continue
            try:
                waited, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if waited:
                reaped.append((waited, status))
        return reaped


#: The one registry of this process.
children = ChildRegistry()
