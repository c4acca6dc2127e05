"""The workers the gateway can send to, and which of them serve each model.

A worker serves a model when citadeld reports the model in its ``models``
(the vLLM type fills it from ``served_model_name``) or when the gateway's
``routes`` table maps the model to the worker's service. Only workers that
are running, ready and have a port are in the rotation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: States of a worker that a request may wait on: down for want of requests, or coming up.
STARTABLE_STATES = frozenset({"idle", "asleep", "starting", "backoff", "stopping", "running"})


@dataclass
class Upstream:
    """One citadel worker, as the gateway sees it."""

    name: str
    service: str
    port: int | None
    models: tuple[str, ...] = ()
    state: str = "stopped"
    ready: bool = False
    host: str = "127.0.0.1"
    #: citadeld's word on whose listener its port reaches ("worker", "other", "none"),
    #: or None when citadeld did not say (an older one).
    port_owner: str | None = None
    #: Requests sent to it and not yet finished (what balancing counts).
    outstanding: int = 0
    base_url: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.base_url = f"http://{self.host}:{self.port}" if self.port is not None else ""

    @property
    def in_rotation(self) -> bool:
        """True when requests may be sent to it."""
        return self.ready and self.state == "running" and self.port is not None

    @classmethod
    def from_status(cls, entry: Mapping[str, Any]) -> Upstream:
        """Build from one entry of citadeld's ``/v1/status`` (or an events snapshot line)."""
        host = entry.get("host") or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # listening everywhere: reach it on loopback
        return cls(
            name=str(entry["name"]),
            service=str(entry.get("service", entry["name"])),
            port=entry.get("port"),
            models=tuple(entry.get("models") or ()),
            state=str(entry.get("state", "stopped")),
            ready=bool(entry.get("ready", False)),
            host=host,
            port_owner=owner if isinstance(owner := entry.get("port_owner"), str) else None,
        )

    def key_refusal(self) -> str | None:
        """Why the worker's API key must not go to its port, or None when it may.

        The key goes only where citadeld saw the worker's own process listening: to
        another process on the port (one that took it while the worker was down, or
        before it bound), to nothing, or where citadeld did not say, it stays here.
        """
        if self.port_owner == "worker":
            return None
        why = {"other": "is held by another process, not by the worker",
               "none": "has no listener"}.get(self.port_owner or "", "is not known to be the worker's")
        return f"port {self.port} of {self.name} {why}: its API key is not sent"


class UpstreamTable:
    """Every known worker, and the models each serves; tells listeners when it changes."""

    def __init__(self, routes: Mapping[str, Iterable[str]] | None = None, on_demand: Iterable[str] = ()):
        """``on_demand``: the services this gateway may ask citadeld to start or wake."""
        self.routes = {model: tuple(services) for model, services in (routes or {}).items()}
        self.on_demand = frozenset(on_demand)
        self.workers: dict[str, Upstream] = {}
        self._serving: dict[str, list[Upstream]] = {}
        self._listeners: list[Callable[[], None]] = []
        #: True once citadeld's status was read at least once.
        self.loaded = False
        #: Events applied so far, and the count at each worker's last one.
        self.events_applied = 0
        self._event_at: dict[str, int] = {}

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each change (the balancer re-dispatches its queue)."""
        self._listeners.append(listener)

    def replace(self, entries: Iterable[Mapping[str, Any]], read_from: int | None = None) -> None:
        """Replace the table with a fresh ``/v1/status``; outstanding counts carry over.
        ``read_from``: the ``events_applied`` count when that read began: a worker with an
        event applied since keeps the event's state and readiness (the read may predate it)."""
        fresh: dict[str, Upstream] = {}
        for entry in entries:
            upstream = Upstream.from_status(entry)
            old = self.workers.get(upstream.name)
            if old is not None and old.base_url == upstream.base_url:
                # Keep the object: requests in flight hold it and release it later.
                if read_from is None or self._event_at.get(old.name, -1) <= read_from:
                    old.state, old.ready = upstream.state, upstream.ready
                old.models = upstream.models
                old.port_owner = upstream.port_owner
                upstream = old
            fresh[upstream.name] = upstream
        self.workers = fresh
        self.loaded = True
        self._changed()

    def apply_event(self, event: Mapping[str, Any]) -> bool:
        """Apply an event's state and readiness at once; False when the worker is unknown."""
        upstream = self.workers.get(str(event.get("worker")))
        self.events_applied += 1
        if upstream is None:
            return False
        self._event_at[upstream.name] = self.events_applied
        state = event.get("state")
        ready = event.get("ready")
        if isinstance(state, str):
            upstream.state = state
        if isinstance(ready, bool):
            upstream.ready = ready
        self._changed()
        return True

    def _changed(self) -> None:
        serving: dict[str, list[Upstream]] = {}
        for upstream in self.workers.values():
            for model in upstream.models:
                serving.setdefault(model, []).append(upstream)
        for model, services in self.routes.items():
            members = serving.setdefault(model, [])
            for upstream in self.workers.values():
                if upstream.service in services and upstream not in members:
                    members.append(upstream)
        self._serving = serving
        for listener in self._listeners:
            listener()

    def known(self, model: str) -> bool:
        """True when some worker (ready or not) serves ``model``, or a route names it."""
        return model in self._serving or model in self.routes

    def candidates(self, model: str) -> list[Upstream]:
        """The workers in rotation that serve ``model``."""
        return [u for u in self._serving.get(model, ()) if u.in_rotation]

    def startable(self, model: str) -> list[str]:
        """The services of ``on_demand`` serving ``model`` whose workers, none in rotation, are
        coming up or may be brought up (idle, asleep, starting, backing off, stopping): a
        request for it is held while citadeld starts one. Empty when none is (stopped by an
        operator, fatal, or not this gateway's to start)."""
        return sorted({u.service for u in self._serving.get(model, ())
                       if u.service in self.on_demand and u.state in STARTABLE_STATES})

    def available_models(self) -> list[str]:
        """The models a worker in rotation serves, or one this gateway may start, sorted."""
        return sorted(m for m, members in self._serving.items()
                      if any(u.in_rotation for u in members) or self.startable(m))
