"""JSON answers of the control API; every one passes through the secret masker."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..logs.masking import masker


def json_response(data: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    """A JSON answer, masked."""
    return web.Response(text=masker.mask(json.dumps(data)), status=status, content_type=content_type)


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    """``{"error": message, ...extra}`` with an HTTP status."""
    return json_response({"error": message, **extra}, status)


class BadRequestError(ValueError):
    """The request's body or query is wrong; answered 400 with the message."""
