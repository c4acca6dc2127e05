"""The status page's live feed: server-sent events to every open page, each message encoded once.

The page part hears every worker event (``citadel_worker_event``), encodes it once
and hands the same bytes to every open stream's queue (``EventStreams.publish``); each
stream's handler writes what its queue holds. So an event costs one encoding whatever
the number of open pages, and an open page with nothing to report costs a check every
``GONE_CHECK_PERIOD`` that its caller is still there and a comment every ``HEARTBEAT``
seconds (well within the exporter's idle timeout, and so that a proxy in between keeps
the connection).

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
#: Messages a stream may have waiting before it is marked behind.
BACKLOG = 256
#: Seconds a page has to take one message before its stream is closed (a page that reads
#: nothing must not hold a slot for ever).
WRITE_TIMEOUT = 10.0
#: The comment a quiet stream sends.
KEEPALIVE = b": keep-alive\n\n"
#: Queued to a stream to end it (citadeld is stopping).
END = b""


def stream_limit(max_connections: int) -> int:
    """How many streams may be open: ``MAX_STREAMS``, or half the listener's connections."""
    return max(1, min(MAX_STREAMS, max_connections // 2))


class EventStream:
    """One open page's queue of messages."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(BACKLOG)
        #: Messages were lost: the page needs a snapshot before anything else.
        self.behind = False

    def catch_up(self) -> None:
        """Forget what is queued (a snapshot replaces it) and clear ``behind``."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.behind = False


class EventStreams:
    """The open streams."""

    def __init__(self) -> None:
        self._open: set[EventStream] = set()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, limit: int) -> EventStream | None:
        """A new stream, or None when ``limit`` are open; ``close`` it when its page leaves."""
        if len(self._open) >= limit:
            return None
        stream = EventStream()
        self._open.add(stream)
        return stream

    def close(self, stream: EventStream) -> None:
        """Stop feeding ``stream`` and free its slot."""
        self._open.discard(stream)

    def end_all(self) -> None:
        """End every open stream: each gets ``END`` next, whatever it had queued."""
        for stream in self._open:
            stream.catch_up()
            stream.queue.put_nowait(END)

    def publish(self, message: bytes) -> None:
        """Queue ``message`` for every open stream (never blocks)."""
        for stream in self._open:
            if stream.behind:
                continue
            try:
                stream.queue.put_nowait(message)
            except asyncio.QueueFull:
                stream.behind = True
