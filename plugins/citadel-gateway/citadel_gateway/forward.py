"""Sending one request to a worker and its answer back, retrying once on another worker.

A request that fails before any byte reached the client (the connection
failed, the worker went silent, it answered with a status in
``retry.statuses``, or its stream ended before the first chunk) is retried
on another worker, ``retry.attempts`` times. Once the first byte is sent to
the client, a failure ends the answer instead.

Streams pass through as the worker writes them (see ``usage.SseUsageTap``).
When the client goes away, aiohttp cancels the handler (the app runs with
``handler_cancellation``), and closing the worker's connection cancels the
request there: vLLM aborts a request whose connection closes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web
from loguru import logger

from . import errors
from .balancer import Balancer, HoldTimeout, NoUpstream, QueueFull, QueueTimeout
from .config import GatewaySettings
from .keys import ApiKey
from .metrics import GatewayMetrics
from .ratelimit import RateLimiter
from .upstream_client import UpstreamClient, UpstreamError, UpstreamResponse
from .upstreams import Upstream
from .usage import SseUsageTap, Usage, usage_in

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ProxiedRequest:
    """A checked request, ready to send."""

    path: str
    body: bytes
    model: str
    key: ApiKey | None
    stream: bool
    #: True when the gateway added ``include_usage`` itself (drop the usage chunk).
    strip_usage: bool
    #: The tokens charged to the key when the request was admitted, settled once its usage is known.
    estimate: int = 0
    #: The digest of the prompt's prefix, for prefix affinity (None: no affinity).
    affinity: bytes | None = None

    @property
    def key_name(self) -> str:
        """The key's configured name, or ``-`` for a request without one."""
        return self.key.name if self.key is not None else "-"


class ClientGone(Exception):
    """The client left mid-stream; ``response`` is the answer that was being sent."""

    def __init__(self, response: web.StreamResponse):
        super().__init__("client disconnected")
        self.response = response


class _AttemptFailed(Exception):
    """A worker failed before any byte reached the client."""

    def __init__(self, reason: str, status: int | None = None, body: bytes = b"",
                 content_type: str = "application/json", timed_out: bool = False,
                 refused: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out
        #: Not sent at all (the worker's key may not go to its port): no retry is spent.
        self.refused = refused
        self.status = status
        self.body = body
        self.content_type = content_type


class Forwarder:
    """Sends checked requests to workers, through the one ``UpstreamClient``."""

    def __init__(self, settings: GatewaySettings, balancer: Balancer, limiter: RateLimiter,
                 metrics: GatewayMetrics, upstream_keys: dict[str, str]):
        self.settings = settings
        self.balancer = balancer
        self.limiter = limiter
        self.metrics = metrics
        self.retry_statuses = frozenset(settings.retry.statuses)
        self.client = UpstreamClient(settings.connect_timeout, settings.upstream_timeout)
        #: service -> the ``Authorization`` header its workers want (vLLM's ``api_key``).
        self.upstream_auth = {s: f"Bearer {k}" for s, k in upstream_keys.items()}

    async def forward(self, request: web.Request, req: ProxiedRequest) -> web.StreamResponse:
        """Answer ``request`` from a worker serving ``req.model``; raises ``GatewayError``."""
        tried: list[str] = []
        retries_left = self.settings.retry.attempts
        last: _AttemptFailed | None = None
        while True:
            upstream = await self._acquire(req, tried, last)
            try:
                return await self._attempt(upstream, request, req)
            except _AttemptFailed as failure:
                last = failure
                tried.append(upstream.name)
                if failure.refused:
                    logger.warning("{} for model {} (key {}) not sent to {}: {}", req.path, req.model,
                                   req.key_name, upstream.name, failure.reason)
                    continue
                if retries_left <= 0:
                    logger.warning("{} for model {} (key {}) failed on {}: {}", req.path, req.model,
                                   req.key_name, upstream.name, failure.reason)
                    return self._give_up(failure)
                retries_left -= 1
                self.metrics.retries.labels(req.model).inc()
                logger.warning("{} for model {} (key {}) failed on {}: {}; retrying on another worker",
                               req.path, req.model, req.key_name, upstream.name, failure.reason)
            finally:
                self.balancer.release(upstream)

    async def _acquire(self, req: ProxiedRequest, tried: Iterable[str],
                       last: _AttemptFailed | None) -> Upstream:
        try:
            return await self.balancer.acquire(req.model, tuple(tried), affinity=req.affinity)
        except NoUpstream:
            if last is not None:
                raise self._give_up_error(last, "and no other worker serves it") from None
            raise errors.unavailable(f"no worker serving the model {req.model!r} is ready; "
                                     "try again shortly") from None
        except QueueFull:
            raise errors.overloaded(
                f"every worker serving {req.model!r} is busy and {self.balancer.queue_size} "
                "requests are waiting; try again shortly", self.settings.retry_after) from None
        except HoldTimeout:
            self.metrics.hold_timeouts.labels(req.model).inc()
            raise errors.unavailable(
                f"the model {req.model!r} is starting on demand and was not ready within "
                f"hold_timeout = {self.balancer.hold_timeout:g}s; try again shortly",
                self.settings.retry_after, code="model_starting") from None
        except QueueTimeout:
            raise errors.overloaded(
                f"no worker serving {req.model!r} was free within "
                f"{self.balancer.queue_timeout:g}s; try again shortly", self.settings.retry_after) from None

    def _give_up(self, failure: _AttemptFailed) -> web.Response:
        if failure.status is not None:
            # The worker's own error says more than ours would.
            return web.Response(status=failure.status, body=failure.body,
                                content_type=failure.content_type)
        raise self._give_up_error(failure, "")

    @staticmethod
    def _give_up_error(failure: _AttemptFailed, why: str) -> errors.GatewayError:
        if failure.status is not None:
            return errors.GatewayError(failure.status, f"the worker answered HTTP {failure.status} {why}",
                                       "upstream_error", "upstream_failed")
        status = 504 if failure.timed_out else 502
        return errors.bad_gateway(f"the worker failed: {failure.reason}{'; ' + why if why else ''}",
                                  status)

    async def _attempt(self, upstream: Upstream, request: web.Request,
                       req: ProxiedRequest) -> web.StreamResponse:
        sent = time.perf_counter()
        resp: UpstreamResponse | None = None
        authorization = self.upstream_auth.get(upstream.service)
        if authorization is not None and (refusal := upstream.key_refusal()) is not None:
            raise _AttemptFailed(refusal, refused=True)
        try:
            resp = await self.client.post(upstream.host, upstream.port or 0, req.path, req.body,
                                          authorization=authorization)
            if resp.status in self.retry_statuses:
                raise _AttemptFailed(f"HTTP {resp.status}", resp.status, await resp.read(),
                                     resp.content_type)
            if req.stream and resp.status == 200 and resp.content_type == "text/event-stream":
                return await self._stream(resp, request, req, sent)
            body = await resp.read()
            usage = usage_in(body)
            if usage is None and resp.status >= 400 and req.key is not None:
                self.limiter.settle(req.key, req.estimate, 0)  # refused by the worker: nothing used
            self._observe(req, sent, time.perf_counter() - sent, usage)
            return web.Response(status=resp.status, body=body, content_type=resp.content_type)
        except _AttemptFailed:
            raise
        except TimeoutError:
            raise _AttemptFailed(f"silent for {self.settings.upstream_timeout:g}s", timed_out=True) from None
        except UpstreamError as exc:
            raise _AttemptFailed(str(exc)) from None
        finally:
            if resp is not None:
                resp.close()  # a no-op once the body was read; else the worker sees the close

    async def _stream(self, resp: UpstreamResponse, request: web.Request,
                      req: ProxiedRequest, sent: float) -> web.StreamResponse:
        chunks = resp.chunks()
        try:
            first = await anext(chunks, b"")
            if not first:
                raise _AttemptFailed("the stream ended before its first byte")
            ttfb = time.perf_counter() - sent
            out = web.StreamResponse(status=200, headers=_STREAM_HEADERS)
            out.content_type = resp.content_type
            tap = SseUsageTap(req.strip_usage)
            try:
                await out.prepare(request)
                data = tap.feed(first)
                if data:
                    await out.write(data)
                async for chunk in chunks:
                    data = tap.feed(chunk)
                    if data:
                        await out.write(data)
                rest = tap.flush()
                if rest:
                    await out.write(rest)
                await out.write_eof()
            except ConnectionResetError:
                # The client left mid-stream: closing the worker's connection cancels its request.
                resp.close()
                raise ClientGone(out) from None
            except (UpstreamError, TimeoutError) as exc:
                logger.warning("{} stream for model {} (key {}) broke after its first byte: {}",
                               req.path, req.model, req.key_name, str(exc) or type(exc).__name__)
                resp.close()
        finally:
            await chunks.aclose()
        self._observe(req, sent, ttfb, tap.usage)
        return out

    def _observe(self, req: ProxiedRequest, sent: float, ttfb: float, usage: Usage | None) -> None:
        self.metrics.upstream_ttfb.labels(req.model).observe(ttfb)
        self.metrics.upstream_latency.labels(req.model).observe(time.perf_counter() - sent)
        if usage is None:
            return
        if req.key is not None:
            self.limiter.settle(req.key, req.estimate, usage.total_tokens)
        self.metrics.tokens.labels(req.model, req.key_name, "prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels(req.model, req.key_name, "completion").inc(usage.completion_tokens)
