"""A plugin that imports fine but raises inside a hook. Only for tests."""

from __future__ import annotations

import os

from citadel_supervisor import hookimpl
from citadel_supervisor.events import WorkerEvent
from citadel_supervisor.worker.restart_policy import RestartWait


@hookimpl
def citadel_worker_event(event: WorkerEvent) -> None:
    """Raise, quoting a secret from the environment (which the log must mask)."""
    raise ValueError(f"hook exploded on {event.kind} with {os.environ.get('FAULTY_API_KEY', '')}")


async def _explode() -> None:
    raise ValueError("wait exploded")


@hookimpl
def citadel_before_restart(worker: object) -> RestartWait:
    """A wait that raises: the restart must go on."""
    return RestartWait("the faulty plugin's wait", _explode())
