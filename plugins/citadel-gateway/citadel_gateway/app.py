"""The gateway's HTTP API: the OpenAI endpoints, ``/healthz`` and ``/metrics``.

Every request is checked in the same order before any worker sees it: the
key (401), the body's size (413), its JSON (400), its ``model`` (400, 404),
the key's models (403), the key's rate limits (429). Then the balancer
finds a worker (503 when none is ready, 429 when all are busy and the queue
is full) and the forwarder sends it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import errors
from .affinity import prefix_key, prompt_prefix
from .balancer import Balancer
from .config import GatewaySettings
from .demand import DemandClient
from .discovery import ControlFeed
from .engine_load import EngineLoadFeed
from .forward import ClientGone, Forwarder, ProxiedRequest
from .keys import ApiKey, KeyRing, bearer_token
from .metrics import GatewayMetrics
from .policy import ENGINE_LOAD, RoutingPolicy
from .ratelimit import RateLimiter, estimate_tokens
from .upstreams import UpstreamTable

#: The request's body as it arrived (read once, by the checks).
RAW_BODY = web.RequestKey("raw_body", bytes)
#: Endpoints whose streams can carry a usage chunk (embeddings do not stream).
_STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions")

_GATEWAY = web.AppKey("gateway", object)


@dataclass
class _Labels:
    """What the metrics middleware counts a request under."""

    model: str = "-"
    key: str = "-"


_LABELS = web.RequestKey("citadel_gateway.labels", _Labels)


class Gateway:
    """Everything one gateway process runs: discovery, balancing, limits, forwarding."""

    def __init__(self, settings: GatewaySettings, keys: KeyRing, control_socket: Path,
                 upstream_keys: dict[str, str] | None = None):
        self.settings = settings
        self.keys = keys
        self.require_key = settings.require_key if settings.require_key is not None else len(keys) > 0
        self.table = UpstreamTable(settings.routes, settings.on_demand)
        self.engines = EngineLoadFeed(settings.engine_load.poll_period, settings.engine_load.stale_after)
        self.policy = RoutingPolicy(settings.policy, settings.per_worker_concurrency,
                                    self.engines.sample, settings.prefix_affinity)
        self.balancer = Balancer(self.table, settings.per_worker_concurrency, settings.queue_size,
                                 settings.queue_timeout, self.policy, settings.hold_timeout,
                                 on_hold=self._on_hold, on_served=self._on_served)
        self.limiter = RateLimiter()
        self.metrics = GatewayMetrics(self.table, self.balancer.queue_depths, self.policy, self.engines)
        self.forwarder = Forwarder(settings, self.balancer, self.limiter, self.metrics,
                                   upstream_keys or {})
        self.feed = ControlFeed(control_socket, self.table)
        self.demand: DemandClient | None = None

    @property
    def reads_engines(self) -> bool:
        """True when routing uses the engines' own load (the policy, or affinity's overload check)."""
        return self.settings.policy == ENGINE_LOAD or self.settings.prefix_affinity is not None

    async def start(self, app: web.Application) -> None:
        """Start following citadeld, telling it what requests want, and reading the engines'
        load when routing uses it."""
        self.feed.start()
        self.demand = DemandClient(self.feed.session, self.table, self.balancer)
        self.demand.start()
        if self.reads_engines:
            self.engines.start(self.feed.session)

    async def stop(self, app: web.Application) -> None:
        """Stop following citadeld."""
        if self.demand is not None:
            await self.demand.close()
        await self.engines.close()
        await self.feed.close()

    def _on_hold(self, services: list[str]) -> None:
        self.metrics.held.inc()
        if self.demand is not None:
            self.demand.want(services)

    def _on_served(self, model: str, seconds: float) -> None:
        self.metrics.hold_seconds.labels(model).observe(seconds)

    # -- checks -------------------------------------------------------------

    def authenticate(self, request: web.Request) -> ApiKey | None:
        """The request's key, None for an allowed anonymous request; raises 401."""
        header = request.headers.get("Authorization")
        token = bearer_token(header)
        if token is None:
            if self.require_key:
                if header:
                    raise errors.unauthenticated("the Authorization header must be 'Bearer <key>'")
                raise errors.unauthenticated(
                    "no API key given: send the header 'Authorization: Bearer <key>'")
            return None
        key = self.keys.find(token)
        if key is None and len(self.keys):
            raise errors.unauthenticated("the API key is not valid")
        return key

    async def read_json(self, request: web.Request) -> dict[str, object]:
        """The request's JSON object; raises 413 or 400."""
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit) from None
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise errors.invalid_request(f"the body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise errors.invalid_request("the body must be a JSON object")
        request[RAW_BODY] = body
        return payload

    # -- handlers -----------------------------------------------------------

    def proxy(self, path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The handler of one OpenAI endpoint: check the request, then forward it."""
        async def handle(request: web.Request) -> web.StreamResponse:
            labels: _Labels = request[_LABELS]
            key = self.authenticate(request)
            labels.key = key.name if key is not None else "-"
            payload = await self.read_json(request)
            model = payload.get("model")
            if not isinstance(model, str) or not model:
                raise errors.invalid_request("'model' must be a non-empty string", param="model")
            if not self.table.known(model):
                raise errors.model_not_found(model, self._models_for(key))
            labels.model = model
            if key is not None and not key.allows(model):
                raise errors.model_not_allowed(key.name, model)
            estimate = estimate_tokens(request[RAW_BODY], payload)
            if key is not None:
                limited = self.limiter.admit(key, estimate)
                if limited is not None:
                    raise errors.rate_limited(
                        f"the key {key.name!r} reached its limit of {limited.per_minute} "
                        f"{limited.limit} per minute; try again in {limited.retry_after}s",
                        limited.limit, limited.retry_after)
            body: bytes = request[RAW_BODY]
            stream = payload.get("stream") is True
            strip_usage = False
            if stream and self.settings.stream_usage and path in _STREAMING_PATHS:
                options = payload.get("stream_options")
                if not (isinstance(options, dict) and options.get("include_usage")):
                    payload["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                                 "include_usage": True}
                    body = json.dumps(payload).encode()
                    strip_usage = True
            req = ProxiedRequest(path, body, model, key, stream, strip_usage, estimate,
                                 self._affinity(path, payload))
            try:
                return await self.forwarder.forward(request, req)
            except errors.GatewayError:
                # No worker answered: nothing was used. (A client that hangs up, ClientGone or
                # a cancellation, keeps the estimate charged.)
                if key is not None:
                    self.limiter.settle(key, estimate, 0)
                raise
        return handle

    def _affinity(self, path: str, payload: dict[str, object]) -> bytes | None:
        """The digest of the prompt's prefix when prefix affinity is on and the prompt is long enough."""
        settings = self.settings.prefix_affinity
        if settings is None:
            return None
        prefix = prompt_prefix(path, payload, settings.prefix_chars)
        return prefix_key(prefix) if prefix is not None else None

    def _models_for(self, key: ApiKey | None) -> list[str]:
        models = self.table.available_models()
        return [m for m in models if key is None or key.allows(m)]

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the models with a ready worker that the key may use."""
        key = self.authenticate(request)
        request[_LABELS].key = key.name if key is not None else "-"
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "citadel"}
                for m in self._models_for(key)]
        return web.json_response({"object": "list", "data": data})

    async def healthz(self, request: web.Request) -> web.Response:
        """GET /healthz: 200 once the workers were read from citadeld, else 503."""
        if not self.table.loaded:
            return web.json_response({"status": "waiting for citadeld's status"}, status=503)
        return web.json_response({"status": "ok", "models": self.table.available_models()})

    async def metrics_page(self, request: web.Request) -> web.Response:
        """GET /metrics: the gateway's Prometheus metrics."""
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- the middleware -----------------------------------------------------

    @web.middleware
    async def count(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Turn ``GatewayError`` into its answer, and count every API request."""
        if not request.path.startswith("/v1/"):
            return await handler(request)
        labels = request[_LABELS] = _Labels()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except errors.GatewayError as exc:
            status = exc.status
            return exc.response()
        except ClientGone as gone:
            status = 499
            self.metrics.client_disconnects.labels(labels.model).inc()
            return gone.response
        except asyncio.CancelledError:
            status = 499  # nginx's "client closed request"
            self.metrics.client_disconnects.labels(labels.model).inc()
            raise
        except web.HTTPException as exc:
            status = exc.status
            error = errors.GatewayError(exc.status, exc.reason, "invalid_request_error")
            return error.response()
        except Exception:  # noqa: BLE001  a bug in a handler still gets an OpenAI-style 500
            logger.exception("gateway error on {} {}", request.method, request.path)
            return errors.GatewayError(500, "internal gateway error", "server_error").response()
        finally:
            self.metrics.requests.labels(labels.model, labels.key, str(status)).inc()


def _too_large(limit: int) -> errors.GatewayError:
    return errors.invalid_request(f"the body is larger than the limit of {limit} bytes",
                                  code="request_too_large", status=413)


def make_app(gateway: Gateway) -> web.Application:
    """The aiohttp application of one gateway."""
    app = web.Application(middlewares=[gateway.count],
                          client_max_size=gateway.settings.max_body_bytes)
    app[_GATEWAY] = gateway
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, gateway.proxy(path))
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/healthz", gateway.healthz)
    app.router.add_get("/metrics", gateway.metrics_page)
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.stop)
    return app
