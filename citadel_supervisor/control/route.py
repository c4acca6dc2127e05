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
    #: Exporter routes only: served at the listener's root (``path`` as it is) rather than
    #: under the API's prefix; the status page, which a browser opens at ``/``.
    at_root: bool = False

    def mounted(self, prefix: str) -> str:
        """The path served: ``path`` under the API's ``prefix``, or as it is when ``at_root``."""
        return self.path if self.at_root else prefix + self.path


def accept_plugin_routes(answers: list[tuple[str, list[Route]]], taken: set[str], prefix: str,
                         root_allowed: bool = False) -> list[Route]:
    """The routes plugins gave (``(plugin, routes)`` each), less any that is not a GET,
    whose served path (``Route.mounted(prefix)``) is ``taken`` or came from an earlier
    plugin, or that is ``at_root`` where ``root_allowed`` is not; those are logged by plugin."""
    accepted: list[Route] = []
    seen = set(taken)
    for plugin, routes in answers:
        for route in routes:
            path = route.mounted(prefix)
            if route.method != "GET":
                logger.error("plugin {} adds the control route {} {}: only GET routes may be "
                             "added; left out", plugin, route.method, route.path)
            elif route.at_root and not root_allowed:
                logger.error("plugin {} adds the route GET {} at the root: only the exporter's "
                             "routes may be; left out", plugin, route.path)
            elif path in seen:
                logger.error("plugin {} adds the control route GET {}, which is taken; left out",
                             plugin, route.path)
            else:
                accepted.append(route)
                seen.add(path)
    return accepted
