"""The status page's live feed: server-sent events to every open page, each message encoded once.

The page part hears every worker event (``citadel_worker_event``), encodes it once
and hands the same bytes to every open stream's queue (``EventStreams.publish``); so
do its reads of the health report and the GPUs. Each stream's handler writes what its
queue holds, what came within ``BATCH`` seconds in one write. An event costs one
encoding whatever the number of open pages, and a page with nothing to hear costs a
comment every ``HEARTBEAT`` seconds (well within the exporter's idle timeout, and for a
proxy in between). A page that left is noticed within ``GONE_CHECK`` seconds by one look
at every stream's connection (``EventStreams.end_gone``), and its slot freed.

Streams are capped (``stream_limit``: at most half the exporter's connections, so
Prometheus and load balancers always find a slot); one more is answered 503. A stream
whose page reads too slowly loses no state: its queue is bounded, and once it overflows
the stream is marked behind and its page gets a fresh snapshot instead.
"""

from __future__ import annotations

import asyncio

#: Open streams at most, whatever the exporter's connection cap.
MAX_STREAMS = 32
#: Seconds between comments on a quiet stream.
HEARTBEAT = 2.5
#: Seconds a stream gathers what comes after a message before it writes: a worker's
#: burst of events (exit, restart, starting, running, ready) goes out in one write.
BATCH = 0.1
#: Seconds between two looks, for every open stream at once, at whether its page left.
GONE_CHECK = 0.5
#: Messages a stream may have waiting before it is marked behind.
BACKLOG = 256
#: Seconds a page has to take a write that waits for it (the connection's buffer is
#: full) before its stream is closed: a page that reads nothing must not hold a slot.
WRITE_TIMEOUT = 10.0
#: The comment a quiet stream sends.
KEEPALIVE = b": keep-alive\n\n"


def stream_limit(max_connections: int) -> int:
    """How many streams may be open: ``MAX_STREAMS``, or half the listener's connections."""
    return max(1, min(MAX_STREAMS, max_connections // 2))


class EventStream:
    """One open page's messages waiting to be written, and a way to wait for them.

    Cheaper than an ``asyncio.Queue`` read under a timeout (a task per wait): a wait is
    one future and one timer, and the messages that came meanwhile go out in one write.
    """

    def __init__(self, transport: asyncio.BaseTransport | None = None) -> None:
        #: The page's connection, to tell when it is gone.
        self.transport = transport
        self.pending: list[bytes] = []
        #: Messages were lost: the page needs a snapshot before anything else.
        self.behind = False
        #: citadeld is stopping: the stream ends.
        self.ended = False
        self._waiter: asyncio.Future[None] | None = None

    def put(self, message: bytes) -> None:
        """Queue ``message``; past ``BACKLOG`` of them, drop them all and mark the stream behind."""
        if self.behind or self.ended:
            return
        if len(self.pending) >= BACKLOG:
            self.pending.clear()
            self.behind = True
        else:
            self.pending.append(message)
        self._wake()

    def end(self) -> None:
        """End the stream: its handler stops at its next wake-up."""
        self.ended = True
        self._wake()

    def gone(self) -> bool:
        """True once the page's connection is closed or closing."""
        return self.transport is None or self.transport.is_closing()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until there is something to do (a message, behind, ended), or ``timeout`` seconds."""
        if self.pending or self.behind or self.ended:
            return
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._wake)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> bytes:
        """Every pending message, in order, as one write."""
        data = b"".join(self.pending)
        self.pending.clear()
        return data

    def catch_up(self) -> None:
        """Forget what is pending (a snapshot replaces it) and clear ``behind``."""
        self.pending.clear()
        self.behind = False


class EventStreams:
    """The open streams."""

    def __init__(self) -> None:
        self._open: set[EventStream] = set()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, limit: int, transport: asyncio.BaseTransport | None) -> EventStream | None:
        """A new stream for the page on ``transport``, or None when ``limit`` are open;
        ``close`` it when its page leaves."""
        if len(self._open) >= limit:
            # Before refusing, leave out the pages that left since the last look.
            self.end_gone()
            if sum(1 for stream in self._open if not stream.ended) >= limit:
                return None
        stream = EventStream(transport)
        self._open.add(stream)
        return stream

    def close(self, stream: EventStream) -> None:
        """Stop feeding ``stream`` and free its slot."""
        self._open.discard(stream)

    def end_all(self) -> None:
        """End every open stream (citadeld is stopping)."""
        for stream in self._open:
            stream.end()

    def end_gone(self) -> None:
        """End the streams whose pages left (aiohttp tells a handler nothing of it)."""
        for stream in self._open:
            if stream.gone():
                stream.end()

    def publish(self, message: bytes) -> None:
        """Queue ``message`` for every open stream (never blocks)."""
        for stream in self._open:
            stream.put(message)
