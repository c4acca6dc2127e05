"""Choosing a worker: the routing policy (``policy.py``), a cap per worker, and one bounded queue.

``acquire`` returns a worker with a free slot at once when there is one.
Otherwise the request waits in a FIFO queue of at most ``queue_size``
requests (``QueueFull`` beyond that), for at most ``queue_timeout``
seconds. A released slot, or a change in the rotation, hands the first
waiter that can use a free worker its slot. A waiter whose model has no
worker in rotation any more fails with ``NoUpstream`` at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field

from .policy import LEAST_OUTSTANDING, RoutingPolicy
from .upstreams import Upstream, UpstreamTable


class NoUpstream(Exception):
    """No worker in rotation serves the model (503)."""


class QueueFull(Exception):
    """Every worker is at its cap and the queue is full (429)."""


class QueueTimeout(Exception):
    """The request waited ``queue_timeout`` seconds without a free worker (429)."""


@dataclass
class _Waiter:
    model: str
    exclude: Collection[str]
    future: asyncio.Future[Upstream]
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    affinity: bytes | None = None


class Balancer:
    """Hands out worker slots; every ``acquire`` must be matched by one ``release``."""

    def __init__(self, table: UpstreamTable, per_worker: int, queue_size: int, queue_timeout: float,
                 policy: RoutingPolicy | None = None):
        self.table = table
        self.per_worker = per_worker
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.policy = policy or RoutingPolicy(LEAST_OUTSTANDING, per_worker)
        self._waiters: list[_Waiter] = []
        table.on_change(self._dispatch)

    def queue_depths(self) -> dict[str, int]:
        """Waiting requests by model (for metrics)."""
        depths: dict[str, int] = {}
        for waiter in self._waiters:
            depths[waiter.model] = depths.get(waiter.model, 0) + 1
        return depths

    def _candidates(self, model: str, exclude: Collection[str]) -> list[Upstream]:
        candidates = self.table.candidates(model)
        return [u for u in candidates if u.name not in exclude] if exclude else candidates

    def _pick(self, model: str, exclude: Collection[str],
              affinity: bytes | None = None) -> Upstream | None | bool:
        """A worker with a free slot, as the policy chooses; None when all are full; False
        when none is in rotation."""
        candidates = self._candidates(model, exclude)
        if not candidates:
            return False
        return self.policy.choose(candidates, affinity)

    async def acquire(self, model: str, exclude: Collection[str] = (),
                      affinity: bytes | None = None) -> Upstream:
        """A slot on a worker serving ``model`` (not one named in ``exclude``); ``affinity``:
        the digest of the prompt's prefix, for prefix affinity.

        Raises ``NoUpstream``, ``QueueFull`` or ``QueueTimeout``.
        """
        picked = (self._pick(model, exclude, affinity) if not self._waiters
                  else self._pick_behind_queue(model, exclude, affinity))
        if picked is False:
            raise NoUpstream(model)
        if isinstance(picked, Upstream):
            picked.outstanding += 1
            return picked
        if len(self._waiters) >= self.queue_size:
            raise QueueFull(model)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(model, exclude, loop.create_future(), affinity=affinity)
        waiter.timer = loop.call_later(self.queue_timeout, self._expire, waiter)
        self._waiters.append(waiter)
        try:
            return await waiter.future
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
            return None if self._candidates(model, exclude) else False
        return self._pick(model, exclude, affinity)

    def release(self, upstream: Upstream) -> None:
        """Give back a slot taken by ``acquire``; the next waiter may take it."""
        upstream.outstanding -= 1
        if self._waiters:
            self._dispatch()

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            waiter.future.set_exception(QueueTimeout(waiter.model))
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
                picked.outstanding += 1
                waiter.future.set_result(picked)
                self._waiters.remove(waiter)
