"""The gateway against hostile or unlucky input: long event lines, bursts, clients that hang up."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from citadel_gateway.app import Gateway, make_app
from citadel_gateway.config import GatewayConfig, GatewaySettings
from citadel_gateway.discovery import MAX_EVENT_LINE, ControlFeed, bounded_lines
from citadel_gateway.forward import ClientGone, ProxiedRequest
from citadel_gateway.keys import ApiKey, KeyRing, digest
from citadel_gateway.ratelimit import RateLimiter, estimate_tokens
from citadel_gateway.service import citadel_check_config
from citadel_gateway.upstreams import UpstreamTable

from citadel_supervisor.config import load_config
from citadel_supervisor.logs.masking import masker
from citadel_supervisor.services.command import CommandConfig

KEY = "sk-hardening-test-key-0001"


# -- following citadeld's events --------------------------------------------------


class _Stream:
    """Enough of aiohttp's StreamReader for ``bounded_lines``: ``iter_any``."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def _lines(chunks: list[bytes], limit: int) -> list[bytes]:
    return [line async for line in bounded_lines(_Stream(chunks), limit)]  # type: ignore[arg-type]


def test_bounded_lines_skip_a_line_over_the_limit_and_read_on() -> None:
    chunks = [b"one\ntw", b"o\n" + b"x" * 10, b"x" * 10 + b"\nthree\n", b"y" * 11 + b"\nfour"]
    assert asyncio.run(_lines(chunks, 10)) == [b"one", b"two", b"three", b"four"]


def test_the_feed_survives_an_event_line_longer_than_aiohttps_limit(tmp_path: Path) -> None:
    """One huge line used to end the feed (aiohttp's 64 KiB line limit), freezing the table."""
    socket_path = tmp_path / "control.sock"

    async def run() -> bool:
        ready = {"a": True}
        status_served = asyncio.Event()
        done = asyncio.Event()

        async def status(request: web.Request) -> web.Response:
            status_served.set()
            return web.json_response({"workers": [
                {"name": "a", "service": "svc", "port": 1, "models": ["m"], "state": "running",
                 "ready": ready["a"]}]})

        async def events(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            await status_served.wait()  # the table holds "a" before the events below
            long_line = json.dumps({"kind": "state", "worker": "a", "detail": "x" * (256 * 1024)})
            await response.write(long_line.encode() + b"\n")
            ready["a"] = False
            await response.write(json.dumps({"kind": "state", "worker": "a", "state": "running",
                                             "ready": False}).encode() + b"\n")
            await done.wait()
            return response

        app = web.Application()
        app.router.add_get("/v1/status", status)
        app.router.add_get("/v1/events", events)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(socket_path)).start()
        table = UpstreamTable()
        changed = asyncio.Event()
        table.on_change(changed.set)
        feed = ControlFeed(socket_path, table)
        feed.start()
        try:
            async def not_ready() -> None:
                while not (table.workers.get("a") is not None and not table.workers["a"].ready):
                    changed.clear()
                    await changed.wait()
            await asyncio.wait_for(not_ready(), 20)
            assert feed._task is not None
            return not feed._task.done()
        finally:
            done.set()
            await feed.close()
            await runner.cleanup()

    assert asyncio.run(run())
    assert MAX_EVENT_LINE > 256 * 1024


# -- tokens per minute ------------------------------------------------------------------


class _FakeForwarder:
    """Answers every request at once, as ``mode`` says, and counts them."""

    def __init__(self, mode: str):
        self.mode = mode
        self.forwarded = 0

    async def forward(self, request: web.Request, req: ProxiedRequest) -> web.StreamResponse:
        self.forwarded += 1
        await asyncio.sleep(0)  # let the other requests of a burst reach their checks
        if self.mode == "hang-up":
            raise ClientGone(web.StreamResponse())  # as the real one does when the client leaves
        return web.json_response({"choices": []})  # no usage (a worker that reports none)


def _gateway(tmp_path: Path, mode: str, tokens_per_minute: int) -> tuple[Gateway, ApiKey, _FakeForwarder]:
    key = ApiKey("k", digest(KEY), None, tokens_per_minute=tokens_per_minute)
    settings = GatewaySettings.model_validate({"routes": {"m": ["svc"]}})
    gateway = Gateway(settings, KeyRing([key]), tmp_path / "none.sock")
    gateway.limiter = RateLimiter(clock=lambda: 1000.0)  # time stands still: no refill
    fake = _FakeForwarder(mode)
    gateway.forwarder = fake  # type: ignore[assignment]
    return gateway, key, fake


async def _post_all(gateway: Gateway, bodies: list[dict[str, Any]]) -> list[int]:
    app = make_app(gateway)
    app.on_startup.clear()  # no citadeld to follow here
    app.on_cleanup.clear()
    async with TestClient(TestServer(app)) as client:
        async def post(body: dict[str, Any]) -> int:
            async with client.post("/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}) as resp:
                await resp.read()
                return resp.status
        return list(await asyncio.gather(*(post(body) for body in bodies)))


def test_a_burst_cannot_all_pass_an_almost_spent_tokens_bucket(tmp_path: Path) -> None:
    gateway, key, fake = _gateway(tmp_path, "answer", 1000)
    assert gateway.limiter.admit(key) is None
    gateway.limiter.charge_tokens(key, 990)  # 10 tokens left
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    statuses = asyncio.run(_post_all(gateway, [body] * 5))
    assert sorted(statuses) == [200, 429, 429, 429, 429] and fake.forwarded == 1


def test_a_client_that_hangs_up_is_charged_the_estimate(tmp_path: Path) -> None:
    gateway, key, _ = _gateway(tmp_path, "hang-up", 100_000)
    body = {"model": "m", "max_tokens": 700, "messages": [{"role": "user", "content": "x" * 400}]}
    asyncio.run(_post_all(gateway, [body]))
    raw = json.dumps(body).encode()  # aiohttp's client sends json.dumps' bytes
    estimate = estimate_tokens(raw, body)
    assert estimate >= 800
    bucket = gateway.limiter._for(key).tokens
    assert bucket is not None and bucket._refill() == 100_000 - estimate


def test_the_estimate_is_settled_to_the_reported_usage() -> None:
    key = ApiKey("k", digest(KEY), None, tokens_per_minute=10_000)
    limiter = RateLimiter(clock=lambda: 5.0)
    assert limiter.admit(key, 2_000) is None
    bucket = limiter._for(key).tokens
    assert bucket is not None and bucket._refill() == 8_000
    limiter.settle(key, 2_000, 150)  # refund what was not used
    assert bucket._refill() == 9_850
    assert limiter.admit(key, 100) is None
    limiter.settle(key, 100, 1_000)  # charge what the estimate missed
    assert bucket._refill() == 8_850


def test_a_key_written_in_the_config_is_registered_with_the_masker(tmp_path: Path) -> None:
    literal = "sk-written-literally-9f8e7d6c"
    config_file = tmp_path / "citadel.toml"
    config_file.write_text(textwrap.dedent(f"""\
        [services.up]
        type = "command"
        command = ["sleep", "60"]
        [services.gw]
        type = "gateway"
        port = 8000
        keys = [{{ name = "a", key = "{literal}" }}]
        """))
    config = load_config(config_file, {"command": CommandConfig, "gateway": GatewayConfig})
    try:
        assert citadel_check_config(config) == []
        # The sk- pattern alone would leave "sk-****"; a registered secret is masked whole.
        assert masker.mask(f"[{literal}] url=x%3F{literal}") == "[****] url=x%3F****"
        assert masker.mask_secrets(f"m{{k=\"{literal}\"}} 1") == 'm{k="****"} 1'
    finally:
        masker.clear()
