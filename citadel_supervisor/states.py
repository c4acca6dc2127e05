"""A worker's states, as the contract names them (DESIGN.md). A leaf: it imports nothing
of Citadel's, so the worker, the metrics, the control API and citadelctl share one list."""

from __future__ import annotations

import enum


class WorkerState(str, enum.Enum):
    """The states of the contract."""

    STOPPED = "stopped"
    STARTING = "starting"  # spawned, not yet ready
    RUNNING = "running"  # ready
    BACKOFF = "backoff"  # waiting to restart
    STOPPING = "stopping"
    FATAL = "fatal"  # gave up; a manual start clears it
    IDLE = "idle"  # on demand, no process: starts at the first request for it (or a start)
    ASLEEP = "asleep"  # its process runs with the engine asleep (memory released): wakes on demand


#: Every state's name, in the contract's order.
STATE_NAMES: tuple[str, ...] = tuple(state.value for state in WorkerState)
