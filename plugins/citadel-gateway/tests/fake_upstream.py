"""A FAKE OpenAI-compatible server, standing in for vLLM in the gateway's tests and benchmark.

It is a fake because vLLM is far too slow on this machine's CPU to test
queueing, retries and disconnects against: it answers at once, or after the
delays a request asks for. Run it as a citadel ``command`` service::

    python fake_upstream.py --port 9001 [--fail reset|503|hang]

A request may carry ``fake_delay`` (seconds before the answer),
``fake_chunks`` and ``fake_chunk_delay`` (for streams). ``GET /fake/stats``
says what it received; ``POST /fake/health`` with ``{"ok": false}`` makes
``/health`` answer 503 (to drive readiness).

``GET /metrics`` serves a page in vLLM's names (``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``): running is the
requests it holds now, waiting and KV-cache use are what ``POST /fake/load``
with ``{"waiting": N, "kv_cache_usage": F}`` set (a pretend queue, to drive
the gateway's engine-load routing). Run as a ``vllm`` service (through a
shim that stands in for vLLM's interpreter, see ``gateway_harness``), it
takes vLLM's argv and ignores the flags it does not know.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from aiohttp import web

STATS = {"requests": 0, "completed": 0, "cancelled": 0, "last_body": None}
HEALTH = {"ok": True}
LOAD = {"waiting": 0.0, "kv_cache_usage": 0.0, "running": 0}

METRICS_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="fake"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="fake"}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="fake"}} {kv_cache_usage}
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{{engine="0",model_name="fake"}} {requests}
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{{engine="0",model_name="fake"}} {requests}
"""


def _usage(body: dict) -> dict:
    total = int(body.get("fake_usage", 15))
    return {"prompt_tokens": total - total // 3, "completion_tokens": total // 3, "total_tokens": total}


def make_app(worker: str, fail: str) -> web.Application:
    """The fake's routes."""

    async def answer(request: web.Request) -> web.StreamResponse:
        STATS["requests"] += 1
        LOAD["running"] += 1
        try:
            return await answer_one(request)
        finally:
            LOAD["running"] -= 1

    async def answer_one(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        STATS["last_body"] = body
        if fail == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if fail == "503":
            return web.json_response({"error": {"message": f"{worker} is failing on purpose",
                                                "type": "fake", "param": None, "code": None}}, status=503)
        try:
            if fail == "hang":
                await asyncio.sleep(3600)
            delay = float(body.get("fake_delay", 0))
            if delay:
                await asyncio.sleep(delay)
            if body.get("stream"):
                return await stream(request, body)
            STATS["completed"] += 1
            if request.path == "/v1/embeddings":
                return web.json_response({"object": "list", "model": body["model"],
                                          "data": [{"object": "embedding", "index": 0,
                                                    "embedding": [0.1, 0.2, 0.3]}],
                                          "usage": _usage(body)})
            return web.json_response({
                "id": f"fake-{STATS['requests']}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "system_fingerprint": worker,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hello from {worker}"},
                             "finish_reason": "stop"}],
                "usage": _usage(body),
            })
        except (asyncio.CancelledError, ConnectionResetError):
            STATS["cancelled"] += 1
            raise

    async def stream(request: web.Request, body: dict) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = int(body.get("fake_chunks", 3))
        pause = float(body.get("fake_chunk_delay", 0))
        base = {"id": "fake-stream", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body["model"], "system_fingerprint": worker}
        for i in range(chunks):
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": f"tok{i} "},
                                          "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if pause:
                await asyncio.sleep(pause)
        if (body.get("stream_options") or {}).get("include_usage"):
            final = {**base, "choices": [], "usage": _usage(body)}
            await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        STATS["completed"] += 1
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": HEALTH["ok"]}, status=200 if HEALTH["ok"] else 503)

    async def set_health(request: web.Request) -> web.Response:
        HEALTH["ok"] = bool((await request.json()).get("ok", True))
        return web.json_response(HEALTH)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**STATS, "worker": worker})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS_PAGE.format(**LOAD, requests=STATS["requests"]),
                            content_type="text/plain")

    async def set_load(request: web.Request) -> web.Response:
        body = await request.json()
        LOAD["waiting"] = float(body.get("waiting", 0))
        LOAD["kv_cache_usage"] = float(body.get("kv_cache_usage", 0))
        return web.json_response(LOAD)

    app = web.Application()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, answer)
    app.router.add_get("/health", health)
    app.router.add_post("/fake/health", set_health)
    app.router.add_get("/fake/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/fake/load", set_load)
    return app


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "0")))
    parser.add_argument("--fail", choices=["none", "reset", "503", "hang"], default="none")
    # vLLM's other flags (--model, --served-model-name, ...) when run as a vllm service: ignored.
    args, _ = parser.parse_known_args()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    worker = os.environ.get("CITADEL_WORKER", f"fake-{args.port}")
    web.run_app(make_app(worker, args.fail), host=args.host, port=args.port, access_log=None,
                print=None, handler_cancellation=True, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
