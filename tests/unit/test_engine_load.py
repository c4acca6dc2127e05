"""citadeld's reads of the vLLM engines' load (``GET /v1/engines``): fresh while asked,
values as the page gives them, a bad page never trusted."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from citadel_supervisor.services.engine_load import EngineLoad
from citadel_supervisor.states import WorkerState

PAGE = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 400.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0
"""


def _worker(name: str, port: int, type_name: str = "vllm",
            state: WorkerState = WorkerState.RUNNING) -> Any:
    service_type = SimpleNamespace(name=type_name,
                                   metrics_url=lambda info: f"http://127.0.0.1:{info.port}/metrics")
    return SimpleNamespace(name=name, state=state, service_type=service_type,
                           info=SimpleNamespace(port=port, service=name.split(".")[0]))


async def _serve(pages: dict[str, str]) -> tuple[web.AppRunner, int]:
    async def metrics(request: web.Request) -> web.Response:
        served = pages["page"]
        if served == "500":
            return web.Response(status=500)
        return web.Response(text=served)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


def test_engines_are_read_while_asked_and_values_are_the_pages() -> None:
    async def run() -> None:
        pages = {"page": PAGE}
        runner, port = await _serve(pages)
        workers = [_worker("chat.0", port), _worker("tool", port, type_name="command"),
                   _worker("chat.1", port, state=WorkerState.STARTING)]
        async with aiohttp.ClientSession() as session:
            load = EngineLoad(lambda: workers, session, period=0.05, linger=0.5)
            answer = await load.answer()
            assert answer["period"] == 0.05
            [entry] = answer["engines"]  # the command worker and the starting one are not read
            assert entry["worker"] == "chat.0" and entry["service"] == "chat"
            assert (entry["waiting"], entry["running"], entry["kv_cache_usage"]) == (3.0, 2.0, 0.25)
            assert (entry["prefix_cache_queries"], entry["prefix_cache_hits"]) == (400.0, 300.0)
            assert 0 <= entry["age"] < 1 and entry["error"] is None

            # A hostile page: garbage and a negative value are dropped, never served.
            pages["page"] = "vllm:num_requests_waiting{} -5\n\x00\xff garbage\nvllm:kv_cache_usage_perc nan\n"
            deadline = asyncio.get_running_loop().time() + 5
            while (await load.answer())["engines"][0]["waiting"] is not None:
                assert asyncio.get_running_loop().time() < deadline, "the new page was never read"
                await asyncio.sleep(0.02)
            entry = (await load.answer())["engines"][0]
            assert entry["kv_cache_usage"] is None and entry["running"] is None

            # A failing read keeps the last values, with why, and they age.
            pages["page"] = "500"
            while (await load.answer())["engines"][0]["error"] is None:
                assert asyncio.get_running_loop().time() < deadline + 5, "the failure was never seen"
                await asyncio.sleep(0.02)
            assert "HTTP 500" in (await load.answer())["engines"][0]["error"]
            await load.close()
        await runner.cleanup()

    asyncio.run(run())


def test_reads_stop_when_nobody_asks() -> None:
    async def run() -> None:
        runner, port = await _serve({"page": PAGE})
        async with aiohttp.ClientSession() as session:
            load = EngineLoad(lambda: [_worker("chat", port)], session, period=0.02, linger=0.1)
            await load.answer()
            assert load._task is not None
            await asyncio.wait_for(load._task, 5)  # ends by itself once the linger is over
            await load.close()
        await runner.cleanup()

    asyncio.run(run())


@pytest.mark.parametrize("state", [WorkerState.STOPPED, WorkerState.BACKOFF])
def test_a_worker_that_stopped_loses_its_reading(state: WorkerState) -> None:
    async def run() -> None:
        runner, port = await _serve({"page": PAGE})
        worker = _worker("chat", port)
        async with aiohttp.ClientSession() as session:
            load = EngineLoad(lambda: [worker], session, period=0.02, linger=1.0)
            assert (await load.answer())["engines"]
            worker.state = state
            assert (await load.answer())["engines"] == []
            await load.close()
        await runner.cleanup()

    asyncio.run(run())
