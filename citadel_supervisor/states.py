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


#: Every state's name, in the contract's order.
STATE_NAMES: tuple[str, ...] = tuple(state.value for state in WorkerState)
