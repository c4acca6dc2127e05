"""Who gets a connection slot: a cap on open connections, with slots kept for the operator.

Used by the control socket (where callers without control access, the read
group and strangers, may hold only part of the slots, so that root and the
control group are always answered) and by the exporter (one cap for all).
A connection beyond its cap is answered 503 and closed at once, so it holds
its file descriptor for no longer than that.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from loguru import logger

#: Seconds between two log lines about refused connections (a flood must not flood the log).
_REFUSAL_LOG_PERIOD = 10.0


def _refuse(transport: asyncio.BaseTransport, message: str, content_type: str) -> None:
    """Answer 503 with ``message`` and close: the connection never reaches a handler."""
    body = (json.dumps({"error": message}) if content_type == "application/json" else message + "\n").encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    transport.write(head + body)  # type: ignore[attr-defined]
    transport.close()


class ConnectionGate:
    """The protocol factory of a capped listener: admits a connection into aiohttp's
    ``server`` or refuses it.

    ``max_connections`` caps every connection. With ``privileged`` (a test on the
    peer's socket), callers it rejects may hold at most ``max_unprivileged`` of them.
    """

    def __init__(self, server: web.Server, name: str, max_connections: int,
                 max_unprivileged: int | None = None,
                 privileged: Callable[[socket.socket], tuple[bool, str]] | None = None,
                 content_type: str = "application/json"):
        self.server = server
        self.name = name
        self.max_connections = max_connections
        self.max_unprivileged = max_connections if max_unprivileged is None else max_unprivileged
        self.privileged = privileged
        self.content_type = content_type
        # The handlers of unprivileged callers' connections; pruned to the open ones when
        # counted (aiohttp's handlers take no weak references, and tell nobody they closed).
        self._unprivileged: set[Any] = set()
        self._refused = 0
        self._logged_at = 0.0

    def __call__(self) -> asyncio.Protocol:
        """A protocol for one new connection (asyncio's ``protocol_factory``)."""
        return _Admission(self)

    def unprivileged_count(self) -> int:
        """Open connections of callers without the privilege."""
        self._unprivileged.intersection_update(self.server.connections)
        return len(self._unprivileged)

    def admit(self, transport: asyncio.BaseTransport) -> asyncio.Protocol | None:
        """The handler for this connection, or None when it was refused (and answered)."""
        if len(self.server.connections) >= self.max_connections:
            self._note_refusal(f"{len(self.server.connections)} connections open")
            _refuse(transport, f"too many connections to {self.name}; try again", self.content_type)
            return None
        privileged, who = True, ""
        if self.privileged is not None:
            sock = transport.get_extra_info("socket")
            try:
                privileged, who = self.privileged(sock)
            except OSError:
                privileged, who = False, "a caller whose credentials cannot be read"
        if not privileged and self.unprivileged_count() >= self.max_unprivileged:
            self._note_refusal(f"refusing a read-only caller, {who}: read-only callers hold "
                               f"{self.max_unprivileged} connections, the most they may")
            _refuse(transport, f"too many read-only connections to {self.name} "
                               f"({self.max_unprivileged}); try again", self.content_type)
            return None
        handler = self.server()
        if not privileged:
            self._unprivileged.add(handler)
        return handler

    def _note_refusal(self, why: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _REFUSAL_LOG_PERIOD:
            logger.warning("{}: {}; refused {} connection(s) since the last such line",
                           self.name, why, self._refused)
            self._logged_at, self._refused = now, 0


class _Admission(asyncio.Protocol):
    """Stands in for aiohttp's handler until the connection is admitted, then hands the
    transport over (the peer's credentials exist only once the connection does)."""

    def __init__(self, gate: ConnectionGate):
        self.gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit or refuse; an admitted connection is the handler's from here on."""
        handler = self.gate.admit(transport)
        if handler is not None:
            transport.set_protocol(handler)
            handler.connection_made(transport)


class CappedSockSite(web.SockSite):
    """A ``SockSite`` whose connections pass a ``ConnectionGate``."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket,
                 gate: Callable[[web.Server], ConnectionGate]):
        """``gate(server)`` builds the gate once the runner's server exists."""
        super().__init__(runner, sock)
        self._gate = gate

    async def start(self) -> None:
        """Serve the socket through the gate."""
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._gate(server), sock=self._sock, backlog=self._backlog)


class CappedTCPSite(web.TCPSite):
    """A ``TCPSite`` whose connections pass a ``ConnectionGate``."""

    def __init__(self, runner: web.AppRunner, host: str | None, port: int,
                 gate: Callable[[web.Server], ConnectionGate]):
        """``gate(server)`` builds the gate once the runner's server exists."""
        super().__init__(runner, host, port)
        self._gate = gate

    async def start(self) -> None:
        """Listen on host:port (every address when host is None) through the gate."""
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._gate(server), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
