"""The control API's routes: one handler each, and the table the app and the OpenAPI document use.

GET paths read (status, logs, events, plugins, version, and what other parts
add: health, gpus); POST paths act (start, stop, restart, reload) and need
control access.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from .. import __version__
from ..logs.masking import masker
from ..services.engine_load import ENGINES_ANSWER
from ..states import STATE_NAMES
from ..waits import within
from ..worker.lifecycle import port_owners
from . import API_PREFIX
from .responses import BadRequestError, json_response
from .route import Route

if TYPE_CHECKING:
    from ..daemon import Daemon

DAEMON_KEY = web.AppKey("daemon", object)
#: Seconds a caller has to send a request body once its headers arrived.
BODY_TIMEOUT_KEY = web.AppKey("body_timeout", float)

T = TypeVar("T")

#: Seconds between checks, while a follow waits for news, that its caller is still there.
#: aiohttp does not cancel a handler whose caller hung up, and a quiet worker gives its
#: followers nothing to write (whose failure would tell): without the check, a dropped
#: follow would hold its request slot until citadeld restarts.
GONE_CHECK_PERIOD = 0.5


def daemon_of(request: web.Request) -> Daemon:
    """The daemon the control app serves."""
    return request.app[DAEMON_KEY]  # type: ignore[return-value]


async def body_of(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body ({} when none); 400 when it is not one."""
    if not request.can_read_body:
        return {}
    try:
        raw = await within(request.read(), request.app[BODY_TIMEOUT_KEY])
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason="request body not received in time") from None
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequestError("the body must be a JSON object")
    return data


def flag(body: dict[str, Any], key: str) -> bool:
    """A boolean of the body (False when absent); 400 when it is not one."""
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequestError(f"{key!r} must be true or false")
    return value


def names_of(body: dict[str, Any], allowed: frozenset[str] | set[str] = frozenset(
        {"names", "all", "wait", "rolling"})) -> tuple[list[str], bool]:
    """The body's ``names`` and ``all``; 400 on a key not ``allowed``, or neither given."""
    unknown = set(body) - allowed
    if unknown:
        raise BadRequestError(f"unknown keys: {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(allowed))})")
    names = body.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadRequestError("'names' must be a list of strings")
    everything = flag(body, "all")
    if not names and not everything:
        raise BadRequestError("give worker or service names, or all = true")
    return names, everything


_YES_NO = ("0", "1", "true", "false", "yes", "no")


def _yes(request: web.Request, key: str, default: bool) -> bool:
    value = request.query.get(key)
    if value is None:
        return default
    if value not in _YES_NO:
        raise BadRequestError(f"{key} must be one of {', '.join(_YES_NO)}, not {value!r}")
    return value in ("1", "true", "yes")


async def version(request: web.Request) -> web.Response:
    """GET /v1/version."""
    return json_response({"version": __version__, "api": API_PREFIX.strip("/"), "pid": os.getpid()})


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: ``{"workers": [...]}``, each with ``port_owner``: whether the
    listener on its port is its own (read from /proc now, off the event loop)."""
    workers = list(daemon_of(request).supervisor.workers.values())
    answer = [w.to_json() for w in workers]
    for entry, owner in zip(answer, await asyncio.to_thread(port_owners, workers), strict=True):
        entry["port_owner"] = owner
    return json_response({"workers": answer})


async def engines(request: web.Request) -> web.Response:
    """GET /v1/engines: each running vLLM worker's own load (waiting, running, KV-cache use,
    prefix-cache counters) and its age; asking keeps the readings fresh within a second."""
    return json_response(await daemon_of(request).engines.answer())


async def _act(request: web.Request, action: str) -> web.Response:
    body = await body_of(request)
    names, everything = names_of(body)
    wait, rolling = flag(body, "wait"), flag(body, "rolling")
    result = await daemon_of(request).act(action, names, everything, wait=wait, rolling=rolling)
    return json_response(result)


async def start(request: web.Request) -> web.Response:
    """POST /v1/start."""
    return await _act(request, "start")


async def stop(request: web.Request) -> web.Response:
    """POST /v1/stop."""
    return await _act(request, "stop")


async def restart(request: web.Request) -> web.Response:
    """POST /v1/restart."""
    return await _act(request, "restart")


async def reload(request: web.Request) -> web.Response:
    """POST /v1/reload: the diff applied, or 422 with the config error."""
    body = await body_of(request)
    if body:
        raise BadRequestError("reload takes no parameters; send {} or nothing")
    ok, result = await daemon_of(request).reload()
    return json_response(result, 200 if ok else 422)


async def plugins(request: web.Request) -> web.Response:
    """GET /v1/plugins."""
    return json_response({"plugins": [r.to_json() for r in daemon_of(request).plugins.records.values()]})


def caller_gone(request: web.Request) -> bool:
    """True once the caller's connection is closed or closing."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def next_or_gone(request: web.Request, queue: asyncio.Queue[T]) -> T:
    """The queue's next item; ``ConnectionResetError`` as soon as the caller has hung up."""
    getter = asyncio.ensure_future(queue.get())
    try:
        while not caller_gone(request):
            done, _ = await asyncio.wait({getter}, timeout=GONE_CHECK_PERIOD)
            if done:
                return getter.result()
        raise ConnectionResetError("the caller hung up")
    finally:
        getter.cancel()


def _lines_wanted(request: web.Request) -> int:
    raw = request.query.get("n", "100")
    try:
        n = int(raw)
    except ValueError:
        raise BadRequestError(f"n must be a whole number of lines, not {raw!r}") from None
    if n < 0:
        raise BadRequestError("n must not be negative")
    return n


async def logs(request: web.Request) -> web.StreamResponse:
    """GET /v1/logs/{name}?n=N&follow=1: recent lines as text, then new ones as they come."""
    name = request.match_info["name"]
    workers = daemon_of(request).supervisor.resolve([name])
    if len(workers) != 1:
        raise BadRequestError(f"{name!r} has {len(workers)} workers; name one of "
                              + ", ".join(w.name for w in workers))
    n = _lines_wanted(request)
    follow = _yes(request, "follow", False)
    output = workers[0].output
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    queue = output.follow() if follow else None
    try:
        await resp.write(masker.mask("".join(line + "\n" for line in output.recent(n))).encode())
        while queue is not None:
            line = await next_or_gone(request, queue)
            if line is None:
                break
            await resp.write(masker.mask(line + "\n").encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        if queue is not None:
            output.unfollow(queue)
    return resp


async def events(request: web.Request) -> web.StreamResponse:
    """GET /v1/events: one JSON object per line for every worker event, until the caller leaves."""
    daemon = daemon_of(request)
    snapshot, follow = _yes(request, "snapshot", False), _yes(request, "follow", True)
    queue = daemon.events.subscribe()
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        if snapshot:
            lines = [json.dumps({"kind": "snapshot", **w}) + "\n" for w in daemon.supervisor.status()]
            await resp.write(masker.mask("".join(lines)).encode())
        while follow:
            event = await next_or_gone(request, queue)
            await resp.write(masker.mask(json.dumps(event.to_json()) + "\n").encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        daemon.events.unsubscribe(queue)
    return resp


# -- schemas, for the OpenAPI document ---------------------------------------

_ACTION_BODY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "names": {"type": "array", "items": {"type": "string"},
                  "description": "worker (svc.N) or service names"},
        "all": {"type": "boolean", "default": False, "description": "every worker"},
        "wait": {"type": "boolean", "default": False,
                 "description": "answer once the workers are running (stopped for stop), or failed"},
        "rolling": {"type": "boolean", "default": False,
                    "description": "restart: one worker at a time, each once the last is ready"},
    },
}
_WORKER: dict[str, Any] = {
    "type": "object",
    "required": ["name", "service", "state", "pid", "restarts", "ready", "gpus", "port", "since",
                 "last_exit"],
    "properties": {
        "name": {"type": "string"}, "service": {"type": "string"}, "type": {"type": "string"},
        "state": {"enum": list(STATE_NAMES)},
        "pid": {"type": ["integer", "null"]}, "restarts": {"type": "integer"},
        "ready": {"type": "boolean"}, "gpus": {"type": "array", "items": {"type": "integer"}},
        "port": {"type": ["integer", "null"]},
        "port_owner": {"enum": ["worker", "other", "none", None],
                       "description": "GET /v1/status only: whose listener the port reaches, the "
                                      "worker's own, another process's, or none; null without a port"},
        "since": {"type": "number", "description": "epoch seconds of the last state change"},
        "uptime": {"type": ["number", "null"]},
        "last_exit": {"oneOf": [{"type": "null"}, {
            "type": "object", "properties": {"code": {"type": ["integer", "null"]},
                                             "signal": {"type": ["integer", "null"]}}}]},
        "phase": {"type": ["string", "null"], "description": "what a starting worker is doing"},
    },
}
_WORKERS: dict[str, Any] = {"type": "object", "required": ["workers"],
                            "properties": {"workers": {"type": "array", "items": _WORKER}}}
_NAMES_LIST: dict[str, Any] = {"type": "array", "items": {"type": "string"}}

ROUTES_KEY = web.AppKey("routes", list)

ROUTES: list[Route] = [
    Route("GET", "/version", version, "citadeld's version, API version and pid",
          answer={"type": "object", "properties": {"version": {"type": "string"},
                                                   "api": {"type": "string"},
                                                   "pid": {"type": "integer"}}}),
    Route("GET", "/status", status, "every worker, as `citadelctl status --json` prints it",
          answer=_WORKERS),
    Route("GET", "/engines", engines,
          "the vLLM engines' own load: waiting and running requests, KV-cache use and "
          "prefix-cache counters, with their age; read every 0.5 s while asked",
          answer=ENGINES_ANSWER),
    Route("POST", "/start", start, "start workers or services (clears fatal)",
          body=_ACTION_BODY, answer=_WORKERS),
    Route("POST", "/stop", stop, "stop workers or services (their whole process trees)",
          body=_ACTION_BODY, answer=_WORKERS),
    Route("POST", "/restart", restart, "restart workers or services; rolling: one at a time",
          body=_ACTION_BODY, answer=_WORKERS),
    Route("POST", "/reload", reload,
          "reload the config file and apply the diff; 422 with the issues, changing nothing, "
          "when it is invalid",
          body={"type": "object", "maxProperties": 0},
          answer={"type": "object", "properties": {k: _NAMES_LIST for k in
                                                   ("added", "removed", "changed", "unchanged")}}),
    Route("GET", "/plugins", plugins, "plugins: name, status, distribution, version, hooks, error",
          answer={"type": "object", "properties": {"plugins": {"type": "array",
                                                                "items": {"type": "object"}}}}),
    Route("GET", "/logs/{name}", logs, "a worker's recent output, then new lines with follow",
          stream="text/plain",
          query={"n": {"type": "integer", "minimum": 0, "default": 100},
                 "follow": {"type": "string", "enum": list(_YES_NO), "default": "0"}}),
    Route("GET", "/events", events,
          "worker events as JSON lines (kind, worker, service, state, old_state, ready, time, "
          "detail), until the caller leaves; snapshot=1 first lists every worker; follow=0 ends "
          "after the snapshot",
          stream="application/x-ndjson",
          query={"snapshot": {"type": "string", "enum": list(_YES_NO), "default": "0"},
                 "follow": {"type": "string", "enum": list(_YES_NO), "default": "1"}}),
]

