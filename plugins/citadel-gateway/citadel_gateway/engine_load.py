"""The engines' own load, as citadeld reads it: a poll of ``GET /v1/engines`` on the control socket.

citadeld reads each vLLM worker's ``/metrics`` while someone asks (see
``citadel_supervisor/services/engine_load.py``); the gateway asks every
``poll_period`` seconds, over the control-socket session that discovery
opened. A reading carries its age, so its time here is ``now - age``; one
older than ``stale_after`` counts as no reading, and the policy falls back
to the gateway's own counts. When citadeld cannot be read, the feed backs
off (``poll_period`` doubling up to ``BACKOFF_MAX``) and the last readings
age into staleness on their own.

The answer comes from citadeld, but its values come from the workers'
pages: every field is checked (a number, finite, in range) and the answer
is capped in bytes, so a hostile worker can at most misreport its own load.
Nothing of it reaches a client but the gateway's own ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from loguru import logger

from citadel_supervisor.waits import cancel_and_wait

#: The largest answer read (bytes); a longer one is refused whole.
MAX_ANSWER_BYTES = 1024 * 1024
#: Entries read from one answer, at most.
MAX_ENGINES = 4096
#: Longest wait between two polls while citadeld cannot be read.
BACKOFF_MAX = 5.0
#: Between polls of a citadeld that has no ``/v1/engines`` (an older one).
MISSING_ROUTE_RETRY = 30.0
#: Larger numbers of requests are taken as this many: nothing real comes near it.
MAX_REQUESTS = 1e6


@dataclass(frozen=True)
class EngineSample:
    """One engine's load, as last read."""

    waiting: float
    running: float
    #: 0 to 1 (1 is a full cache); 0 when the page did not say.
    kv_cache_usage: float
    #: ``time.monotonic()`` (of this process) when citadeld read it.
    at: float


def _number(value: Any, high: float) -> float | None:
    """``value`` when it is a real number in ``[0, high]`` (booleans are not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, high)


def parse_engines(answer: Any, now: float) -> dict[str, EngineSample]:
    """The samples in an answer of ``GET /v1/engines`` (decoded JSON), read at ``now``.

    An entry without a worker name, an age or a waiting count is left out; a bad
    ``running`` or ``kv_cache_usage`` counts as 0.
    """
    samples: dict[str, EngineSample] = {}
    engines = answer.get("engines") if isinstance(answer, dict) else None
    if not isinstance(engines, list):
        return samples
    for entry in engines[:MAX_ENGINES]:
        if not isinstance(entry, dict):
            continue
        worker = entry.get("worker")
        age = _number(entry.get("age"), 3600.0)
        waiting = _number(entry.get("waiting"), MAX_REQUESTS)
        if not isinstance(worker, str) or not 0 < len(worker) <= 256 or age is None or waiting is None:
            continue
        samples[worker] = EngineSample(
            waiting=waiting,
            running=_number(entry.get("running"), MAX_REQUESTS) or 0.0,
            kv_cache_usage=_number(entry.get("kv_cache_usage"), 1.0) or 0.0,
            at=now - age,
        )
    return samples


class EngineLoadFeed:
    """Polls citadeld for the engines' load; ``sample(worker)`` is a fresh reading or None."""

    def __init__(self, poll_period: float, stale_after: float,
                 clock: Callable[[], float] = time.monotonic):
        self.poll_period = poll_period
        self.stale_after = stale_after
        self.clock = clock
        self.samples: dict[str, EngineSample] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self, worker: str) -> EngineSample | None:
        """The worker's engine load, or None when there is no reading younger than ``stale_after``."""
        found = self.samples.get(worker)
        if found is None or self.clock() - found.at > self.stale_after:
            return None
        return found

    def start(self, session: aiohttp.ClientSession) -> None:
        """Poll in the background through ``session`` (discovery's, on the control socket)."""
        self._task = asyncio.get_running_loop().create_task(self._poll(session), name="engine-load")

    async def close(self) -> None:
        """Stop polling."""
        await cancel_and_wait(self._task)

    async def _poll(self, session: aiohttp.ClientSession) -> None:
        delay = self.poll_period
        failures = 0
        while True:
            try:
                await self._read(session)
                if failures:
                    logger.info("engine load: reading citadeld's /v1/engines again")
                delay, failures = self.poll_period, 0
            except asyncio.CancelledError:
                raise
            except _MissingRoute:
                if not failures:
                    logger.warning("engine load: citadeld has no GET /v1/engines (older than this "
                                   "gateway?); routing by the gateway's own counts")
                failures += 1
                delay = MISSING_ROUTE_RETRY
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                failures += 1
                # The first failure and then every 20th: a gone citadeld must not flood the log.
                if failures == 1 or failures % 20 == 0:
                    logger.warning("engine load: cannot read citadeld's /v1/engines: {} (retrying)",
                                   str(exc) or type(exc).__name__)
                delay = min(max(delay, self.poll_period) * 2, BACKOFF_MAX)
            await asyncio.sleep(delay)

    async def _read(self, session: aiohttp.ClientSession) -> None:
        async with session.get("/v1/engines", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status == 404:
                raise _MissingRoute()
            body = await resp.content.read(MAX_ANSWER_BYTES + 1)
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
        self.samples = parse_engines(json.loads(body), self.clock())


class _MissingRoute(Exception):
    """citadeld answered 404: it has no ``/v1/engines``."""
