"""Choosing a worker: the routing policy (``policy.py``), a cap per worker, and one bounded queue.

``acquire`` returns a worker with a free slot at once when there is one.
Otherwise the request waits in a FIFO queue of at most ``queue_size``
requests (``QueueFull`` beyond that), for at most ``queue_timeout``
seconds. A released slot, or a change in the rotation, hands the first
waiter that can use a free worker its slot. A waiter whose model has no
worker in rotation any more fails with ``NoUpstream`` at once.

A request for a model whose workers are down for want of requests (or coming
up) and that this gateway may start (``on_demand``) is *held*: it waits in
the same queue, for at most ``hold_timeout`` seconds (``HoldTimeout``, a
503 with ``Retry-After``, beyond), while ``on_hold`` asks citadeld to start
or wake the services that serve it. It goes on once a worker is in rotation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from .policy import LEAST_OUTSTANDING, RoutingPolicy
from .upstreams import Upstream, UpstreamTable


class NoUpstream(Exception):
    """No worker in rotation serves the model (503)."""


class QueueFull(Exception):
    """Every worker is at its cap and the queue is full (429)."""


class QueueTimeout(Exception):
    """The request waited ``queue_timeout`` seconds without a free worker (429)."""


class HoldTimeout(Exception):
    """The request was held ``hold_timeout`` seconds and no worker for its model came up (503)."""


@dataclass
class _Waiter:
    model: str
    exclude: Collection[str]
    future: asyncio.Future[Upstream]
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    #: Held while a worker for its model comes up (rather than queued for a free slot).
    held: bool = False
    since: float = field(default_factory=time.monotonic)
    affinity: bytes | None = None


class Balancer:
    """Hands out worker slots; every ``acquire`` must be matched by one ``release``."""

    def __init__(self, table: UpstreamTable, per_worker: int, queue_size: int, queue_timeout: float,
                 policy: RoutingPolicy | None = None, hold_timeout: float = 300.0,
                 on_hold: Callable[[list[str]], None] | None = None,
                 on_served: Callable[[str, float], None] | None = None):
        """``on_hold(services)``: a request is held for these services to come up;
        ``on_served(model, seconds)``: a held request got its worker after so long."""
        self.table = table
        self.per_worker = per_worker
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.hold_timeout = hold_timeout
        self.on_hold = on_hold
        self.on_served = on_served
        self.policy = policy or RoutingPolicy(LEAST_OUTSTANDING, per_worker)
        self._waiters: list[_Waiter] = []
        #: Services a slot was taken on since ``take_used`` last emptied it.
        self._used: set[str] = set()
        table.on_change(self._dispatch)

    def queue_depths(self, held: bool = False) -> dict[str, int]:
        """Waiting requests by model (for metrics); ``held``: those held for a start instead."""
        depths: dict[str, int] = {}
        for waiter in self._waiters:
            if waiter.held == held:
                depths[waiter.model] = depths.get(waiter.model, 0) + 1
        return depths

    def held_services(self) -> list[str]:
        """The services held requests wait for (asked for again until one comes up)."""
        return sorted({s for w in self._waiters if w.held for s in self.table.startable(w.model)})

    def _candidates(self, model: str, exclude: Collection[str]) -> list[Upstream]:
        candidates = self.table.candidates(model)
        return [u for u in candidates if u.name not in exclude] if exclude else candidates

    def _pick(self, model: str, exclude: Collection[str],
              affinity: bytes | None = None) -> Upstream | None | bool:
        """A worker with a free slot, as the policy chooses; None when all are full; False
        when none is in rotation."""
        candidates = self._candidates(model, exclude)
        if not candidates:
            # None (wait) while a worker this gateway may start is coming up; else False.
            return None if self._holdable(model, exclude) else False
        return self.policy.choose(candidates, affinity)

    def _holdable(self, model: str, exclude: Collection[str]) -> bool:
        """True when a request for ``model`` may wait for a worker this gateway may start."""
        return not exclude and bool(self.table.startable(model))

    async def acquire(self, model: str, exclude: Collection[str] = (),
                      affinity: bytes | None = None) -> Upstream:
        """A slot on a worker serving ``model`` (not one named in ``exclude``); ``affinity``:
        the digest of the prompt's prefix, for prefix affinity.

        Raises ``NoUpstream``, ``QueueFull``, ``QueueTimeout`` or ``HoldTimeout``.
        """
        picked = (self._pick(model, exclude, affinity) if not self._waiters
                  else self._pick_behind_queue(model, exclude, affinity))
        if picked is False:
            raise NoUpstream(model)
        if isinstance(picked, Upstream):
            self._take(picked)
            return picked
        if len(self._waiters) >= self.queue_size:
            raise QueueFull(model)
        loop = asyncio.get_running_loop()
        held = not self.table.candidates(model)
        waiter = _Waiter(model, exclude, loop.create_future(), held=held, affinity=affinity)
        waiter.timer = loop.call_later(self.hold_timeout if held else self.queue_timeout, self._expire, waiter)
        self._waiters.append(waiter)
        if held and self.on_hold is not None:
            self.on_hold(self.table.startable(model))
        try:
            upstream = await waiter.future
            if held and self.on_served is not None:
                self.on_served(model, time.monotonic() - waiter.since)
            return upstream
        except asyncio.CancelledError:
            # The client left while waiting; a slot handed over meanwhile goes back.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(waiter.future.result())
            raise
        finally:
            waiter.timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _pick_behind_queue(self, model: str, exclude: Collection[str],
                           affinity: bytes | None) -> Upstream | None | bool:
        """Like ``_pick``, but a newcomer may not overtake a waiter for the same workers."""
        if any(w.model == model for w in self._waiters):
            # Asked of the table, not the policy: nothing is chosen, so nothing is counted.
            return None if self._candidates(model, exclude) or self._holdable(model, exclude) else False
        return self._pick(model, exclude, affinity)

    def _take(self, upstream: Upstream) -> None:
        upstream.outstanding += 1
        self._used.add(upstream.service)

    def take_used(self) -> set[str]:
        """The services slots were taken on since the last call (for citadeld's idle clock)."""
        used, self._used = self._used, set()
        return used

    def release(self, upstream: Upstream) -> None:
        """Give back a slot taken by ``acquire``; the next waiter may take it."""
        upstream.outstanding -= 1
        if self._waiters:
            self._dispatch()

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            waiter.future.set_exception(HoldTimeout(waiter.model) if waiter.held else QueueTimeout(waiter.model))
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _dispatch(self) -> None:
        """Hand free slots to waiters in order; fail those whose model lost every worker."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            picked = self._pick(waiter.model, waiter.exclude, waiter.affinity)
            if picked is False:
                waiter.future.set_exception(NoUpstream(waiter.model))
                self._waiters.remove(waiter)
            elif isinstance(picked, Upstream):
                self._take(picked)
                waiter.future.set_result(picked)
                self._waiters.remove(waiter)
