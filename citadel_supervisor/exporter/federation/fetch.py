"""Fetching every worker's own ``/metrics`` concurrently, and how each fetch went.

Every page is fetched with one timeout through the daemon's one HTTP session,
so a slow or dead worker costs at most that timeout and never hides the
others; reading stops at ``MAX_PAGE_BYTES``, and a page too large, not
UTF-8 or not valid text is dropped whole and counted, never passed on. Each page is relabelled as soon as it arrives, while the others are
still on their way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .relabel import PageRelabeler, RelabelledPage
from .validate import MAX_PAGE_BYTES, NOT_UTF8, TOO_LARGE

#: What federation asks workers for: the classic text format, parsed here.
TEXT_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"
#: The pages come over loopback: compressing them (prometheus_client, and so vLLM, gzips
#: whenever asked) would cost the worker and citadeld CPU and save nothing.
FETCH_HEADERS = {"Accept": TEXT_ACCEPT, "Accept-Encoding": "identity"}


@dataclass(frozen=True)
class ScrapeTarget:
    """One worker's page to fetch; ``url`` is None when the worker does not run."""

    service: str
    worker: str
    url: str | None


@dataclass
class ScrapeResult:
    """How fetching one worker's page went, and the page, relabelled, when it was up."""

    target: ScrapeTarget
    up: bool
    duration: float
    page: RelabelledPage | None = None
    error: str | None = None
    #: Why the page was fetched but not federated (too large, not valid text), or None.
    dropped: str | None = None


async def fetch_page(session: aiohttp.ClientSession, target: ScrapeTarget, timeout: float,
                     relabeler: PageRelabeler | None = None,
                     max_bytes: int = MAX_PAGE_BYTES) -> ScrapeResult:
    """Fetch one worker's page and relabel it as soon as it arrives, while the other
    pages are still on their way.

    A failure is a result with ``up`` False, never an exception. A page larger
    than ``max_bytes`` (reading stops there), not UTF-8, or not valid text is
    ``dropped``, with ``up`` still True: the worker answered.
    """
    if target.url is None:
        return ScrapeResult(target, False, 0.0, error="not running")
    start = time.monotonic()
    try:
        # auto_decompress off: a worker that gzips anyway must not make citadeld inflate a bomb;
        # its compressed page is then not UTF-8, and dropped.
        async with session.get(target.url, headers=FETCH_HEADERS, auto_decompress=False,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return ScrapeResult(target, False, time.monotonic() - start, error=f"HTTP {resp.status}")
            body = await read_capped(resp, max_bytes)
    except TimeoutError:
        return ScrapeResult(target, False, time.monotonic() - start, error=f"timed out after {timeout:g}s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return ScrapeResult(target, False, time.monotonic() - start, error=f"{type(exc).__name__}: {exc}")
    duration = time.monotonic() - start
    if body is None:
        return ScrapeResult(target, True, duration, dropped=TOO_LARGE)
    try:
        # The exposition format is UTF-8; decoding it here spares aiohttp's charset guessing.
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return ScrapeResult(target, True, duration, dropped=NOT_UTF8)
    relabeler = relabeler or PageRelabeler(target.service, target.worker)
    # On the loop, on purpose: a page is quick to split, while handing it to a thread made
    # the loop wait for the GIL (up to the interpreter's switch interval) on every read of
    # the other pages still arriving (docs/benchmarks.md). The sleep(0) gives each page its own turn
    # of the loop, so that pages arriving together do not add up into one long stall.
    await asyncio.sleep(0)
    page = relabeler.split(text)
    if page.dropped is not None:
        return ScrapeResult(target, True, duration, dropped=page.dropped)
    return ScrapeResult(target, True, duration, page)


async def read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes | None:
    """The answer's body, or None as soon as it is past ``max_bytes`` (reading stops there)."""
    if resp.content_length is not None and resp.content_length > max_bytes:
        return None
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > max_bytes:
            return None
    return bytes(body)


async def scrape_all(session: aiohttp.ClientSession, targets: Iterable[ScrapeTarget], timeout: float,
                     relabelers: dict[tuple[str, str], PageRelabeler] | None = None) -> list[ScrapeResult]:
    """Fetch every target's page at once; one result per target, in order.

    ``relabelers`` keeps each worker's ``PageRelabeler`` (and its cache) from
    one scrape to the next; workers no longer listed are dropped from it.
    """
    targets = list(targets)
    if relabelers is None:
        relabelers = {}
    wanted = {(t.service, t.worker) for t in targets}
    for key in [k for k in relabelers if k not in wanted]:
        del relabelers[key]
    for t in targets:
        relabelers.setdefault((t.service, t.worker), PageRelabeler(t.service, t.worker))
    return list(await asyncio.gather(*(
        fetch_page(session, t, timeout, relabelers[(t.service, t.worker)]) for t in targets)))


class PageDrops:
    """How many pages of each worker were dropped, by reason, since citadeld started."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str, str], int] = {}

    def count(self, results: Iterable[ScrapeResult]) -> None:
        """Count the pages dropped in one scrape (each scrape that drops a page counts it)."""
        for result in results:
            if result.dropped is not None:
                key = (result.target.service, result.target.worker, result.dropped)
                self.totals[key] = self.totals.get(key, 0) + 1


class FederationCollector:
    """``citadel_federation_up`` and ``citadel_federation_scrape_duration_seconds`` per
    worker, and ``citadel_federation_pages_dropped_total`` per worker and reason."""

    def __init__(self, results: Iterable[ScrapeResult], drops: PageDrops | None = None):
        self.results = list(results)
        self.drops = drops

    def collect(self) -> Iterator[Metric]:
        """Yield the two families."""
        labels = ["service", "worker"]
        up = GaugeMetricFamily("citadel_federation_up",
                               "1 when the worker's own /metrics was fetched in this scrape.", labels=labels)
        duration = GaugeMetricFamily("citadel_federation_scrape_duration_seconds",
                                     "Seconds fetching the worker's own /metrics took in this scrape.",
                                     labels=labels)
        for result in self.results:
            key = [result.target.service, result.target.worker]
            up.add_metric(key, 1.0 if result.up else 0.0)
            duration.add_metric(key, result.duration)
        yield up
        yield duration
        if self.drops is not None:
            dropped = CounterMetricFamily(
                "citadel_federation_pages_dropped",
                "Worker /metrics pages not federated, by reason: too_large, not_utf8, malformed "
                "(a line that is not valid exposition text), duplicate_labels.",
                labels=["service", "worker", "reason"])
            for (service, worker, reason), total in sorted(self.drops.totals.items()):
                dropped.add_metric([service, worker, reason], float(total))
            yield dropped
