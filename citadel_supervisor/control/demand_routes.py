"""The control API's routes for models on demand: ``POST /v1/demand`` (the gateway's, on its
grant), ``POST /v1/sleep`` and ``POST /v1/wake`` (``citadelctl sleep`` and ``wake``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from loguru import logger

from ..states import WorkerState
from .access import Peer
from .guard import GRANTED_CALLER
from .responses import BadRequestError, error_response, json_response
from .route import Route
from .routes import _WORKERS, body_of, daemon_of, flag, names_of

if TYPE_CHECKING:
    from ..daemon import Daemon
    from ..worker.lifecycle import Worker

_DEMAND_BODY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "start": {"type": "array", "items": {"type": "string"},
                  "description": "services requests want now: their idle or asleep workers are "
                                 "started or woken (making room in their swap group)"},
        "used": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                 "description": "services the caller has requests in flight on, with the count: "
                                "they count as used (never started by this)"},
    },
}
_NAMES_BODY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "names": {"type": "array", "items": {"type": "string"}, "description": "worker or service names"},
        "all": {"type": "boolean", "default": False, "description": "every worker"},
        "wait": {"type": "boolean", "default": False,
                 "description": "answer once they are asleep or idle (sleep), running (wake), or failed"},
    },
}


def _demand_body(body: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    unknown = set(body) - {"start", "used"}
    if unknown:
        raise BadRequestError(f"unknown keys: {', '.join(sorted(unknown))} (known: start, used)")
    start = body.get("start", [])
    if not isinstance(start, list) or not all(isinstance(n, str) for n in start):
        raise BadRequestError("'start' must be a list of service names")
    used = body.get("used", {})
    if not isinstance(used, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in used.items()):
        raise BadRequestError("'used' must map service names to counts of requests in flight (0 or more)")
    return start, used


async def demand(request: web.Request) -> web.StreamResponse:
    """POST /v1/demand: requests want these services. A caller inside a worker may name only
    the services its worker's grant lists (the gateway's ``on_demand``)."""
    start, used = _demand_body(await body_of(request))
    daemon = daemon_of(request)
    known = set(daemon.config.services)
    for name in [*start, *used]:
        if name not in known:
            return error_response(404, f"no service named {name!r}")
    caller: Peer | None = request.get(GRANTED_CALLER)
    if caller is not None:
        worker, granted = daemon.demand.grants_for(caller.pid)
        refused = sorted({*start, *used} - granted)
        if worker is None or refused:
            who = f"worker {worker.name}" if worker is not None else caller.describe()
            logger.warning("control socket: refused POST /v1/demand of {} from {} (granted: {})",
                           ", ".join(refused) or "nothing", who, ", ".join(sorted(granted)) or "nothing")
            return error_response(403, f"permission denied: {who} may start or wake only the services "
                                       f"its on_demand names ({', '.join(sorted(granted)) or 'none'}), "
                                       f"not {', '.join(refused) or 'these'}")
    workers = daemon.demand.want(start, used)
    return json_response({"workers": [{"name": w.name, "service": w.info.service, "state": w.state.value,
                                       "ready": w.serving} for w in workers]})


async def _named_workers(request: web.Request) -> tuple[Daemon, list[Worker], bool]:
    """The daemon, the workers the body names (or all), and whether to wait."""
    body = await body_of(request)
    names, everything = names_of(body, allowed={"names", "all", "wait"})
    daemon = daemon_of(request)
    workers = list(daemon.supervisor.workers.values()) if everything else daemon.supervisor.resolve(names)
    return daemon, workers, flag(body, "wait")


async def sleep(request: web.Request) -> web.Response:
    """POST /v1/sleep: put running workers to sleep (stopped into idle where they cannot sleep)."""
    daemon, workers, wait = await _named_workers(request)
    for worker in workers:
        if worker.state == WorkerState.RUNNING:
            daemon.demand.put_down(worker, "put to sleep by citadelctl", "manual")
    if wait:
        down = {WorkerState.ASLEEP, WorkerState.IDLE, WorkerState.STOPPED, WorkerState.FATAL}
        for worker in workers:
            config = worker.info.config
            await worker.wait_for(down, config.stop_timeout + float(getattr(config, "sleep_timeout", 0)) + 10)
    return json_response({"workers": [w.to_json() for w in workers]})


async def wake(request: web.Request) -> web.Response:
    """POST /v1/wake: wake asleep workers, start idle ones (making room in their swap group)."""
    daemon, workers, wait = await _named_workers(request)
    for worker in workers:
        if worker.state in (WorkerState.ASLEEP, WorkerState.IDLE) or worker.going_down_idle:
            daemon.demand.bring_up(worker, by_operator=True)
    if wait:
        for worker in workers:
            await worker.settled(worker.info.config.startup_timeout)
    return json_response({"workers": [w.to_json() for w in workers]})


DEMAND_ROUTES: list[Route] = [
    Route("POST", "/demand", demand,
          "requests want these services: start or wake them (the gateway's right, for the services "
          "its on_demand names), and mark them used",
          body=_DEMAND_BODY,
          answer={"type": "object", "properties": {"workers": {"type": "array", "items": {
              "type": "object", "properties": {"name": {"type": "string"}, "service": {"type": "string"},
                                               "state": {"type": "string"}, "ready": {"type": "boolean"}}}}}}),
    Route("POST", "/sleep", sleep,
          "put running workers to sleep (vLLM's sleep mode), or stop them into idle where they cannot sleep",
          body=_NAMES_BODY, answer=_WORKERS),
    Route("POST", "/wake", wake, "wake asleep workers and start idle ones, making room in their swap group",
          body=_NAMES_BODY, answer=_WORKERS),
]
