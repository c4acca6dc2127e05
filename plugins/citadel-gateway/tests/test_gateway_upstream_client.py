"""The gateway's HTTP/1.1 client against a raw asyncio server on a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from citadel_gateway.upstream_client import UpstreamClient, UpstreamError
from gateway_harness import free_ports

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


async def _serve(answer: Answer) -> tuple[asyncio.Server, list[int]]:
    """A server that answers each request with ``answer``; it closes when ``answer`` says False."""
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while True:
                await _read_request(reader)
                if not await answer(reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


def _port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


def test_keep_alive_connection_is_reused() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        return True

    async def scenario() -> None:
        server, connections = await _serve(answer)
        client = UpstreamClient(connect_timeout=2, read_timeout=2)
        for _ in range(3):
            resp = await client.post("127.0.0.1", _port(server), "/v1/x", b'{"a": 1}')
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.read() == b"{}"
        assert connections[0] == 1
        server.close()
    asyncio.run(scenario())


def test_chunked_answer_arrives_chunk_by_chunk() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: a\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"7\r\ndata: b\r\n0\r\n\r\n")
        return True

    async def scenario() -> None:
        server, _ = await _serve(answer)
        client = UpstreamClient(connect_timeout=2, read_timeout=2)
        resp = await client.post("127.0.0.1", _port(server), "/v1/x", b"{}")
        assert resp.content_type == "text/event-stream"
        assert [piece async for piece in resp.chunks()] == [b"data: a", b"data: b"]
        server.close()
    asyncio.run(scenario())


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False  # closes without saying "Connection: close", as an idle timeout does

    async def scenario() -> None:
        server, connections = await _serve(answer)
        client = UpstreamClient(connect_timeout=2, read_timeout=2)
        for _ in range(2):
            resp = await client.post("127.0.0.1", _port(server), "/v1/x", b"{}")
            assert await resp.read() == b"ok"
        assert connections[0] == 2
        server.close()
    asyncio.run(scenario())


def test_failures_raise_upstream_error() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.transport.abort()
        return False

    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        return False

    async def scenario() -> None:
        client = UpstreamClient(connect_timeout=2, read_timeout=2)
        server, _ = await _serve(reset)
        with pytest.raises(UpstreamError):
            await client.post("127.0.0.1", _port(server), "/v1/x", b"{}")
        server.close()
        server, _ = await _serve(short)
        resp = await client.post("127.0.0.1", _port(server), "/v1/x", b"{}")
        with pytest.raises(UpstreamError, match="7 bytes short"):
            await resp.read()
        server.close()
        (closed_port,) = free_ports(1)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await client.post("127.0.0.1", closed_port, "/v1/x", b"{}")
    asyncio.run(scenario())


def test_a_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async def scenario() -> None:
        server, _ = await _serve(silent)
        client = UpstreamClient(connect_timeout=2, read_timeout=0.1)
        with pytest.raises(TimeoutError):
            await client.post("127.0.0.1", _port(server), "/v1/x", b"{}")
        server.close()
    asyncio.run(scenario())
