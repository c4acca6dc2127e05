"""Worker events: state changes, readiness, exits; published to plugins and to followers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerEvent:
    """Something that happened to a worker."""

    #: "state" (a state change), "ready" (readiness flipped), "exit" (the leader exited),
    #: or "restart" (a restart was scheduled).
    kind: str
    worker: str
    service: str
    state: str
    old_state: str | None = None
    ready: bool = False
    time: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The event as the control API streams it."""
        return {
            "kind": self.kind,
            "worker": self.worker,
            "service": self.service,
            "state": self.state,
            "old_state": self.old_state,
            "ready": self.ready,
            "time": self.time,
            "detail": self.detail,
        }


class EventBus:
    """Fans events out to plugins (through one callback) and to queue subscribers."""

    def __init__(self, on_event: Callable[[WorkerEvent], None] | None = None, queue_size: int = 1000):
        self._on_event = on_event
        self._queues: set[asyncio.Queue[WorkerEvent]] = set()
        self._queue_size = queue_size

    def publish(self, event: WorkerEvent) -> None:
        """Deliver an event to the callback and to every subscriber (never blocks)."""
        if self._on_event is not None:
            self._on_event(event)
        for queue in list(self._queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a slow follower loses events, not the daemon
                pass

    def subscribe(self) -> asyncio.Queue[WorkerEvent]:
        """A queue that receives every event from now on; ``unsubscribe`` it when done."""
        queue: asyncio.Queue[WorkerEvent] = asyncio.Queue(self._queue_size)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[WorkerEvent]) -> None:
        """Stop delivering to ``queue``."""
        self._queues.discard(queue)
