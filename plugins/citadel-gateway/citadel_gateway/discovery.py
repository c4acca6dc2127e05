"""Learning the workers from citadeld: its event stream, and its status on each change.

The gateway follows ``GET /v1/events?snapshot=1`` on the control socket.
Each event's state and readiness apply at once (a worker that stops being
ready leaves the rotation before the next request), and then a fresh
``GET /v1/status`` replaces the table (ports and models, workers added or
removed by a reload). Status reads are coalesced: events that arrive during
one read cause exactly one more. When the stream ends or fails, the feed
reconnects with a growing backoff, keeping the last table meanwhile; an event
line longer than ``MAX_EVENT_LINE`` is skipped, never the end of the feed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from loguru import logger

from citadel_supervisor.waits import cancel_and_wait

from .upstreams import UpstreamTable

_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
#: The longest event line read (bytes); a longer one is skipped. An event is well under
#: 4 KiB, but it quotes a worker's exit report, and aiohttp's own line limit is 64 KiB.
MAX_EVENT_LINE = 1024 * 1024


async def bounded_lines(stream: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """The stream's lines (without the newline); a line longer than ``limit`` is skipped
    whole, holding at most ``limit`` bytes of it, and the next line is read as usual."""
    held = bytearray()
    skipping = False
    async for chunk in stream.iter_any():
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if not skipping and len(held) + end - start <= limit:
                held += chunk[start:end]
                yield bytes(held)
            held.clear()
            skipping = False
            start = end + 1
        if not skipping:
            held += chunk[start:]
            if len(held) > limit:
                held.clear()
                skipping = True
    if held and not skipping:
        yield bytes(held)


class ControlFeed:
    """Keeps an ``UpstreamTable`` in step with citadeld."""

    def __init__(self, socket_path: Path, table: UpstreamTable):
        self.socket_path = socket_path
        self.table = table
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._dirty = False

    def start(self) -> None:
        """Start following citadeld in the background."""
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        self._session = aiohttp.ClientSession(connector=connector, base_url="http://citadel")
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="control-feed")

    @property
    def session(self) -> aiohttp.ClientSession:
        """The one HTTP session on the control socket (other readers of citadeld share it)."""
        assert self._session is not None, "start() opens the session"
        return self._session

    async def close(self) -> None:
        """Stop following and close the connection."""
        await cancel_and_wait(self._task, self._refresh_task)
        if self._session is not None:
            await self._session.close()

    async def _follow(self) -> None:
        assert self._session is not None
        delay = _BACKOFF_FIRST
        failures = 0
        while True:
            try:
                async with self._session.get(
                    "/v1/events", params={"snapshot": "1"}, timeout=aiohttp.ClientTimeout(total=None)
                ) as resp:
                    if resp.status != 200:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status, message=await resp.text()
                        )
                    if failures:
                        logger.info("control socket {}: following events again", self.socket_path)
                    delay, failures = _BACKOFF_FIRST, 0
                    self._refresh()
                    async for line in bounded_lines(resp.content, MAX_EVENT_LINE):
                        self._on_line(line)
                logger.warning("control socket {}: the event stream ended", self.socket_path)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                # ValueError too: whatever the stream holds, the feed must reconnect, never
                # end and leave the routing table frozen.
                failures += 1
                # The first failure and then every 20th: a gone citadeld must not flood the log.
                if failures == 1 or failures % 20 == 0:
                    logger.warning("control socket {}: {} (retrying)", self.socket_path,
                                   str(exc) or type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    def _on_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("kind") == "snapshot":
            return  # the status read that follows the connect covers these
        self.table.apply_event(event)
        self._refresh()

    def _refresh(self) -> None:
        """Read ``/v1/status`` soon; one read at a time, and one more if asked meanwhile."""
        self._dirty = True
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.get_running_loop().create_task(self._read_status())

    async def _read_status(self) -> None:
        assert self._session is not None
        while self._dirty:
            self._dirty = False
            read_from = self.table.events_applied
            try:
                async with self._session.get("/v1/status", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    data = await resp.json(content_type=None)
                if resp.status != 200 or not isinstance(data, dict):
                    logger.warning("control socket: /v1/status answered {}: {}", resp.status, data)
                    continue
                self.table.replace(data.get("workers", []), read_from)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                logger.warning("control socket: cannot read /v1/status: {}", exc)
