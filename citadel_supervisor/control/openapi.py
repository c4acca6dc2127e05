"""The OpenAPI 3.1 document of the control API, built from the route table it describes.

``python -m citadel_supervisor.control.openapi`` prints the document of the
built-in routes (``docs/openapi.json`` is that output; a test keeps them
equal). A running citadeld serves the full document, with the routes other
parts added, at ``GET /v1/openapi.json``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from .. import __version__
from . import API_PREFIX
from .demand_routes import DEMAND_ROUTES
from .responses import json_response
from .route import Route
from .routes import ROUTES, ROUTES_KEY

_ERROR: dict[str, Any] = {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}}

def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary,
                          "operationId": route.handler.__name__ + ("" if route.method == "GET"
                                                                   else "_" + route.method.lower())}
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
              for n in re.findall(r"{(\w+)}", route.path)]
    params += [{"name": n, "in": "query", "required": False, "schema": s}
               for n, s in route.query.items()]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": False,
                             "content": {"application/json": {"schema": route.body}}}
    answer = route.answer if route.answer is not None else None
    if route.stream:
        ok = {"description": "a stream, until the caller closes it",
              "content": {route.stream: {"schema": {"type": "string"}}}}
    else:
        ok = {"description": "OK", "content": {"application/json": {
            "schema": answer or {"type": "object"}}}}
    responses: dict[str, Any] = {"200": ok}
    if route.body is not None or route.query or params:
        responses["400"] = _error("a malformed request: bad JSON, wrong types, unknown keys")
    if params or route.body is not None:
        responses["404"] = _error("no service or worker of that name")
    if route.path == "/reload":
        responses["422"] = _error("the config is invalid; `issues` lists each problem; "
                                  "nothing changed")
    responses["403"] = _error("the caller may not " + ("read" if route.method == "GET" else "control")
                              + " citadeld")
    responses["413"] = _error("the request is larger than the limit")
    responses["503"] = _error("too many concurrent requests")
    op["responses"] = responses
    return op


async def openapi(request: web.Request) -> web.Response:
    """GET /v1/openapi.json: this API, described."""
    return json_response(document(request.app[ROUTES_KEY]))


#: The route that serves the document; the last of the built-in routes.
OPENAPI_ROUTE = Route("GET", "/openapi.json", openapi, "this document", answer={"type": "object"})


def builtin_routes() -> list[Route]:
    """The control API's own routes (those plugins add come between these and nothing else)."""
    return [*ROUTES, *DEMAND_ROUTES, OPENAPI_ROUTE]


def document(routes: list[Route] | None = None) -> dict[str, Any]:
    """The OpenAPI document for ``routes`` (the built-in ones by default)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes if routes is not None else builtin_routes():
        paths.setdefault(API_PREFIX + route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "citadeld control API",
            "version": __version__,
            "description": "HTTP with JSON on citadeld's Unix socket, e.g. "
                           "`curl --unix-socket /run/citadel/control.sock http://citadel/v1/status`. "
                           "GET needs read access (root, citadeld's user, daemon.control_groups "
                           "or daemon.read_groups); POST needs control access.",
        },
        "servers": [{"url": "http://citadel"}],
        "paths": dict(sorted(paths.items())),
    }


if __name__ == "__main__":
    print(json.dumps(document(), indent=2))
