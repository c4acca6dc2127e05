"""What citadeld reads of other processes, straight from ``/proc``.

One read of ``/proc/PID/stat`` gives a process's state, parent, group, CPU
time, threads and resident memory: what the reaper, process trees and the
exporter need, at a small part of what psutil's objects cost per process
(which matters in a scrape that covers every process of every worker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    """One process, as ``/proc/PID/stat`` has it."""

    ppid: int
    pgid: int
    zombie: bool
    #: User and system CPU seconds.
    cpu_seconds: float
    threads: int
    resident_bytes: int
    #: Clock ticks from boot to the process's start: with the pid, what tells it
    #: from a later process given the same pid.
    start_ticks: int = 0


def parse_stat(data: bytes) -> ProcStat:
    """A ``/proc/PID/stat`` line; the command name (in parentheses) may hold spaces."""
    fields = data[data.rfind(b")") + 2:].split()
    return ProcStat(
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        zombie=fields[0] == b"Z",
        cpu_seconds=(int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND,
        threads=int(fields[17]),
        resident_bytes=int(fields[21]) * _PAGE_SIZE,
        start_ticks=int(fields[19]),
    )


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return parse_stat(fh.read())
    except (OSError, ValueError, IndexError):
        return None


def open_fds(pid: int) -> int:
    """How many files the process holds open; 0 when it is gone or not readable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def process_table() -> dict[int, ProcStat]:
    """Every process on the host, in one ``/proc`` pass."""
    table: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := read_stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table
