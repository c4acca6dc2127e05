"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import json

from aiohttp import web


class GatewayError(Exception):
    """A request the gateway answers itself, with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str, code: str | None = None,
                 param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def response(self) -> web.Response:
        """The error as an HTTP answer (with ``Retry-After`` when it has one)."""
        body = {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.Response(status=self.status, text=json.dumps(body),
                            content_type="application/json", headers=headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None,
                    status: int = 400) -> GatewayError:
    """400 (or ``status``): something is wrong with the request itself."""
    return GatewayError(status, message, "invalid_request_error", code, param)


def unauthenticated(message: str) -> GatewayError:
    """401: no key, or not a key the gateway knows."""
    return GatewayError(401, message, "authentication_error", "invalid_api_key")


def model_not_allowed(key_name: str, model: str) -> GatewayError:
    """403: the key may not use this model."""
    return GatewayError(403, f"the key {key_name!r} may not use the model {model!r}",
                        "permission_error", "model_not_allowed", "model")


def model_not_found(model: str, available: list[str]) -> GatewayError:
    """404: no worker serves this model, nor does a route name it."""
    hint = f"; available: {', '.join(available)}" if available else ""
    return GatewayError(404, f"the model {model!r} does not exist{hint}",
                        "invalid_request_error", "model_not_found", "model")


def rate_limited(message: str, limit: str, retry_after: int) -> GatewayError:
    """429: a key's requests or tokens per minute are spent (``type`` names which, as OpenAI's do)."""
    return GatewayError(429, message, limit, "rate_limit_exceeded", retry_after=retry_after)


def overloaded(message: str, retry_after: int) -> GatewayError:
    """429: every worker for the model is busy and the queue is full."""
    return GatewayError(429, message, "server_overloaded", "queue_full", retry_after=retry_after)


def unavailable(message: str, retry_after: int = 1, code: str = "no_ready_worker") -> GatewayError:
    """503: no worker serving the model is ready (``model_starting``: held, and still starting)."""
    return GatewayError(503, message, "service_unavailable", code, retry_after=retry_after)


def bad_gateway(message: str, status: int = 502) -> GatewayError:
    """502 (or 504): the worker failed before answering, and so did the retry."""
    return GatewayError(status, message, "upstream_error", "upstream_failed")
