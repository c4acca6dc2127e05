"""One route of the control API, as the route table and plugins (``citadel_control_routes``) declare it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loguru import logger

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    """One path of the API, with what the OpenAPI document says about it."""

    method: str
    path: str
    handler: Handler
    summary: str
    #: JSON schema of the request body (POST), or None.
    body: dict[str, Any] | None = None
    #: JSON schema of a 200 answer; None for streams.
    answer: dict[str, Any] | None = None
    #: The media type of a streamed answer.
    stream: str | None = None
    query: dict[str, dict[str, Any]] = field(default_factory=dict)


def accept_plugin_routes(answers: list[tuple[str, list[Route]]], taken: set[str]) -> list[Route]:
    """The routes plugins gave (``(plugin, routes)`` each), less any that is not a GET or
    whose path is ``taken`` (or came from an earlier plugin); those are logged by plugin."""
    accepted: list[Route] = []
    seen = set(taken)
    for plugin, routes in answers:
        for route in routes:
            if route.method != "GET":
                logger.error("plugin {} adds the control route {} {}: only GET routes may be "
                             "added; left out", plugin, route.method, route.path)
            elif route.path in seen:
                logger.error("plugin {} adds the control route GET {}, which is taken; left out",
                             plugin, route.path)
            else:
                accepted.append(route)
                seen.add(route.path)
    return accepted
