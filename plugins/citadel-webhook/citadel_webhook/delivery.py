"""Posting to one URL: a queue of deliveries, sent in order by one task, retried with backoff.

A hook must not block citadeld's event loop, so the hook only queues; each
URL's ``Endpoint`` task does the network work. Deliveries to one URL keep
their order (a retry holds back the ones behind it); a slow URL never
delays another. When the queue is full the oldest delivery is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from loguru import logger

from .config import WebhookConfig
from .signing import SIGNATURE_HEADER, sign

#: Longest wait between two tries, whatever ``backoff`` and the try count say.
MAX_BACKOFF = 60.0

# Answers that say "try again later"; any other 4xx is the receiver refusing
# this body (a bad signature, say), which a retry would not change.
_RETRY_STATUSES = {408, 425, 429}


@dataclass(frozen=True)
class Delivery:
    """One event's body, ready to post; its ``id`` is the same on every retry."""

    id: str
    event: str
    worker: str
    body: bytes


def backoff_delay(config: WebhookConfig, retry: int) -> float:
    """Seconds before retry number ``retry`` (1 for the first): doubling, capped."""
    return min(MAX_BACKOFF, config.backoff * 2 ** (retry - 1))


class Endpoint:
    """One URL's queue, and the task that posts it."""

    def __init__(self, url: str, session: Callable[[], aiohttp.ClientSession], user_agent: str):
        self.url = url
        self._session = session
        self._user_agent = user_agent
        self._queue: asyncio.Queue[tuple[Delivery, WebhookConfig]] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Deliveries given up on (after every retry, or refused), and dropped from a full queue.
        self.failed = 0
        self.dropped = 0

    def offer(self, delivery: Delivery, config: WebhookConfig) -> None:
        """Queue a delivery and return at once; starts the sender task on first use."""
        if self._queue is None:
            self._queue = asyncio.Queue(config.queue_size)
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"citadel-webhook {self.url}"
            )
        if self._queue.full():
            lost, _ = self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
            logger.warning("webhook {}: queue full ({} events); dropped delivery {} ({} of {})",
                           self.url, self._queue.maxsize, lost.id, lost.event, lost.worker)
        self._queue.put_nowait((delivery, config))

    async def idle(self) -> None:
        """Wait until every queued delivery was sent or given up on."""
        if self._queue is not None:
            await self._queue.join()

    async def _run(self) -> None:
        assert self._queue is not None
        current: tuple[Delivery, WebhookConfig] | None = None
        try:
            while True:
                current = await self._queue.get()
                try:
                    await self.post(*current)
                finally:
                    self._queue.task_done()
                current = None
        except asyncio.CancelledError:
            # citadeld is exiting: what its last worker stops produced is
            # still queued (and one delivery may be half-sent: it goes again,
            # under the same id). One try each, within one timeout, then let go.
            await self._flush([current] if current is not None else [])
            raise

    async def _flush(self, pending: list[tuple[Delivery, WebhookConfig]]) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
            self._queue.task_done()
        if not pending:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(config.timeout for _, config in pending)
        for sent, (delivery, config) in enumerate(pending):
            if loop.time() >= deadline:
                logger.warning("webhook {}: {} deliveries not sent before exit",
                               self.url, len(pending) - sent)
                return
            await self._post_once(delivery, config)

    async def stopped(self) -> None:
        """Wait until the sender task has ended (after a cancel, once it flushed)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def post(self, delivery: Delivery, config: WebhookConfig) -> bool:
        """Post one delivery, retrying with backoff; True when the receiver took it."""
        tries = config.retries + 1
        for attempt in range(1, tries + 1):
            error, retry = await self._post_once(delivery, config)
            if error is None:
                return True
            if not retry or attempt == tries:
                self.failed += 1
                logger.error("webhook {}: gave up on delivery {} ({} of {}) after {} tries: {}",
                             self.url, delivery.id, delivery.event, delivery.worker, attempt, error)
                return False
            delay = backoff_delay(config, attempt)
            logger.warning("webhook {}: delivery {} ({} of {}) failed (try {}/{}): {}; retrying in {:g}s",
                           self.url, delivery.id, delivery.event, delivery.worker, attempt, tries,
                           error, delay)
            await asyncio.sleep(delay)
        return False  # not reached: the loop returns on its last try

    async def _post_once(self, delivery: Delivery, config: WebhookConfig) -> tuple[str | None, bool]:
        """One POST: ``(None, _)`` on success, else ``(what went wrong, worth retrying)``."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            "X-Citadel-Event": delivery.event,
            "X-Citadel-Delivery": delivery.id,
            SIGNATURE_HEADER: sign(delivery.body, config.secret.get_secret_value()),
        }
        try:
            async with self._session().post(
                self.url, data=delivery.body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=config.timeout), allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return None, False
                retry = response.status >= 500 or response.status in _RETRY_STATUSES
                return f"HTTP {response.status} {response.reason or ''}".strip(), retry
        except asyncio.TimeoutError:
            return f"no answer within {config.timeout:g}s", True
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}", True
