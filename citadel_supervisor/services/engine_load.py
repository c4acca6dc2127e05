"""The vLLM engines' own load, read by citadeld for whoever routes to them (``GET /v1/engines``).

A gateway balances better on what the engines say (their waiting queue, their
KV-cache use) than on its own count of requests in flight. citadeld already
reaches each worker's ``/metrics``; ``EngineLoad`` reads the pages of the
running ``vllm`` workers every ``PERIOD`` seconds, but only while someone
asks: the first ``answer()`` starts the reads, and they stop ``LINGER``
seconds after the last one, so an idle citadeld reads nothing.

The pages are a worker's: untrusted. A read is capped in bytes and time,
every value is read through ``vllm_metrics.read_engine`` (malformed lines
skipped), and a negative or non-finite value is dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from ..exporter.federation.validate import MAX_PAGE_BYTES
from ..states import WorkerState
from ..waits import cancel_and_wait
from .vllm_metrics import EngineMetrics, read_engine

if TYPE_CHECKING:
    from ..worker.lifecycle import Worker

#: Seconds between two reads of one engine while someone asks (the answer is fresh within 1 s).
PERIOD = 0.5
#: Seconds the reads go on after the last ``answer()``.
LINGER = 10.0
#: Longest wait for one engine's page; a slower one keeps its last reading, which ages.
READ_TIMEOUT = 1.0
#: The engine values served, by the name ``GET /v1/engines`` gives them.
FIELDS = {"waiting": "requests_waiting", "running": "requests_running",
          "kv_cache_usage": "kv_cache_usage", "prefix_cache_queries": "prefix_cache_queries",
          "prefix_cache_hits": "prefix_cache_hits"}

#: The answer of ``GET /v1/engines``, for the OpenAPI document.
ENGINES_ANSWER: dict[str, Any] = {
    "type": "object", "required": ["period", "engines"],
    "properties": {
        "period": {"type": "number", "description": "seconds between two reads of an engine"},
        "engines": {"type": "array", "items": {
            "type": "object", "required": ["worker", "service", "age"],
            "properties": {
                "worker": {"type": "string"}, "service": {"type": "string"},
                "age": {"type": "number", "description": "seconds since the values were read"},
                **{name: {"type": ["number", "null"]} for name in FIELDS},
                "error": {"type": ["string", "null"],
                          "description": "why the latest read failed (the values are older)"},
            }}},
    },
}


@dataclass(frozen=True)
class EngineReading:
    """The last good reading of one engine, and why a later read failed (if one did)."""

    worker: str
    service: str
    #: ``time.monotonic()`` when the values were read.
    at: float
    metrics: EngineMetrics
    error: str | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        """One entry of ``GET /v1/engines``."""
        entry: dict[str, Any] = {"worker": self.worker, "service": self.service,
                                 "age": round(max(0.0, now - self.at), 3)}
        for name, meaning in FIELDS.items():
            value = getattr(self.metrics, meaning)
            entry[name] = value if value is not None and math.isfinite(value) and value >= 0 else None
        entry["error"] = self.error
        return entry


class EngineLoad:
    """Reads the running vLLM workers' pages while asked, and answers ``GET /v1/engines``."""

    def __init__(self, workers: Callable[[], Iterable[Worker]], session: aiohttp.ClientSession,
                 period: float = PERIOD, linger: float = LINGER):
        """``workers``: the supervisor's workers now; ``session``: citadeld's one HTTP session."""
        self.workers = workers
        self.session = session
        self.period = period
        self.linger = linger
        self.readings: dict[str, EngineReading] = {}
        self._asked = 0.0
        self._task: asyncio.Task[None] | None = None
        self._first_round: asyncio.Event | None = None

    def _engines(self) -> list[tuple[Worker, str]]:
        """The running vllm workers with a page to read, and its URL."""
        found = []
        for worker in self.workers():
            if worker.service_type.name != "vllm" or worker.state != WorkerState.RUNNING:
                continue
            url = worker.service_type.metrics_url(worker.info) if worker.info.port else None
            if url:
                found.append((worker, url))
        return found

    async def answer(self) -> dict[str, Any]:
        """What ``GET /v1/engines`` answers; starts the reads (a first answer waits for one
        round of them, at most ``READ_TIMEOUT`` seconds)."""
        self._asked = time.monotonic()
        if self._task is None or self._task.done():
            self._first_round = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._read_while_asked(),
                                                                 name="engine-load")
        if self._first_round is not None and not self._first_round.is_set():
            try:
                await asyncio.wait_for(self._first_round.wait(), READ_TIMEOUT + 0.5)
            except TimeoutError:
                pass
        now = time.monotonic()
        running = {worker.name for worker, _ in self._engines()}
        engines = [r.to_json(now) for name, r in sorted(self.readings.items()) if name in running]
        return {"period": self.period, "engines": engines}

    async def close(self) -> None:
        """Stop reading."""
        await cancel_and_wait(self._task)

    async def _read_while_asked(self) -> None:
        while time.monotonic() - self._asked < self.linger:
            started = time.monotonic()
            engines = self._engines()
            await asyncio.gather(*(self._read(worker, url) for worker, url in engines))
            names = {worker.name for worker, _ in engines}
            for gone in set(self.readings) - names:
                del self.readings[gone]  # stopped or removed: its values say nothing now
            if self._first_round is not None:
                self._first_round.set()
            await asyncio.sleep(max(0.0, self.period - (time.monotonic() - started)))

    async def _read(self, worker: Worker, url: str) -> None:
        """Read one engine's page into ``readings``; a failure keeps the old values, with why."""
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT)) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                page = (await resp.content.read(MAX_PAGE_BYTES)).decode(errors="replace")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            old = self.readings.get(worker.name)
            if old is not None:
                why = str(exc) or type(exc).__name__
                self.readings[worker.name] = EngineReading(old.worker, old.service, old.at,
                                                           old.metrics, f"{url}: {why}"[:200])
            return
        self.readings[worker.name] = EngineReading(worker.name, worker.info.service, time.monotonic(),
                                                   read_engine(page))
