"""The control API server: HTTP + JSON on a Unix socket, with access checks and limits.

``curl --unix-socket /run/citadel/control.sock http://citadel/v1/status``
works. GET paths read (status, health, logs, events, plugins, gpus); POST
paths act (start, stop, restart, reload) and need control access. Every
answer passes through the secret masker.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from loguru import logger

from .. import __version__
from ..masking import masker
from ..supervisor import UnknownWorkerError
from . import API_PREFIX
from .access import AccessPolicy, Peer

if TYPE_CHECKING:
    from ..daemon import Daemon

MAX_REQUEST_BYTES = 64 * 1024
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 64

_ACCESS = web.AppKey("access", AccessPolicy)
_DAEMON = web.AppKey("daemon", object)


class SocketInUseError(RuntimeError):
    """Another citadeld answers on the control socket."""


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON answer, masked."""
    return web.Response(text=masker.mask(json.dumps(data)), status=status,
                        content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    """``{"error": message}`` with a status."""
    return json_response({"error": message}, status)


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Check the caller, cap concurrency, and turn every failure into an error answer."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    policy: AccessPolicy = request.app[_ACCESS]
    try:
        peer = Peer.of(sock)
    except (OSError, AttributeError):
        return error_response(403, "cannot read the caller's credentials")
    access = policy.access(peer)
    needed = "read" if request.method in ("GET", "HEAD") else "control"
    if access == "none" or (needed == "control" and access != "control"):
        logger.warning("control socket: refused {} {} from {} (needs {} access)",
                       request.method, request.path, peer.describe(), needed)
        return error_response(403, f"permission denied: {peer.describe()} may not {needed} "
                                   "citadeld (see daemon.control_groups and daemon.read_groups)")
    state = request.app["connections"]
    if state["active"] >= MAX_CONNECTIONS:
        return error_response(503, "too many concurrent requests; try again")
    state["active"] += 1
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except UnknownWorkerError as exc:
        return error_response(404, str(exc))
    except (ValueError, TypeError, KeyError) as exc:
        return error_response(400, masker.mask(f"bad request: {exc}"))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the daemon answers, whatever went wrong in a handler
        logger.opt(exception=exc).error("control API error on {} {}", request.method, request.path)
        return error_response(500, masker.mask(f"internal error: {type(exc).__name__}: {exc}"))
    finally:
        state["active"] -= 1


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        raw = await asyncio.wait_for(request.read(), READ_TIMEOUT)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout(text="request body not received in time") from None
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def _names(body: dict[str, Any]) -> tuple[list[str], bool]:
    names = body.get("names", [])
    everything = body.get("all", False)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("'names' must be a list of strings")
    if not isinstance(everything, bool):
        raise ValueError("'all' must be true or false")
    if not names and not everything:
        raise ValueError("give worker or service names, or all = true")
    return names, everything


def _daemon(request: web.Request) -> Daemon:
    return request.app[_DAEMON]  # type: ignore[return-value]


async def version(request: web.Request) -> web.Response:
    """GET /v1/version."""
    return json_response({"version": __version__, "api": API_PREFIX.strip("/"), "pid": os.getpid()})


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: ``{"workers": [...]}``."""
    return json_response({"workers": _daemon(request).supervisor.status()})


async def _act(request: web.Request, action: str) -> web.Response:
    body = await _body(request)
    names, everything = _names(body)
    wait = bool(body.get("wait", False))
    rolling = bool(body.get("rolling", False))
    daemon = _daemon(request)
    result = await daemon.act(action, names, everything, wait=wait, rolling=rolling)
    return json_response(result)


async def start(request: web.Request) -> web.Response:
    """POST /v1/start ``{"names": [...]} | {"all": true}``, optional ``"wait": true``."""
    return await _act(request, "start")


async def stop(request: web.Request) -> web.Response:
    """POST /v1/stop."""
    return await _act(request, "stop")


async def restart(request: web.Request) -> web.Response:
    """POST /v1/restart, optional ``"rolling": true``."""
    return await _act(request, "restart")


async def reload(request: web.Request) -> web.Response:
    """POST /v1/reload: the diff applied, or 422 with the config error."""
    ok, result = await _daemon(request).reload()
    return json_response(result, 200 if ok else 422)


async def plugins(request: web.Request) -> web.Response:
    """GET /v1/plugins."""
    return json_response({"plugins": [r.to_json() for r in _daemon(request).plugins.records.values()]})


async def logs(request: web.Request) -> web.StreamResponse:
    """GET /v1/logs/{name}?n=N&follow=1: recent lines as text, then new ones as they come."""
    daemon = _daemon(request)
    workers = daemon.supervisor.resolve([request.match_info["name"]])
    if len(workers) != 1:
        raise ValueError(f"{request.match_info['name']!r} has {len(workers)} workers; name one of "
                         + ", ".join(w.name for w in workers))
    output = workers[0].output
    n = int(request.query.get("n", "100"))
    follow = request.query.get("follow") in ("1", "true", "yes")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    queue = output.follow() if follow else None
    try:
        backlog = "".join(line + "\n" for line in output.recent(n))
        await resp.write(masker.mask(backlog).encode())
        while queue is not None:
            line = await queue.get()
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
    """GET /v1/events: one JSON object per line, for every worker event, until the caller leaves."""
    bus = _daemon(request).events
    queue = bus.subscribe()
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        if request.query.get("snapshot") in ("1", "true"):
            for worker in _daemon(request).supervisor.status():
                await resp.write(masker.mask(json.dumps({"kind": "snapshot", **worker}) + "\n").encode())
        while True:
            event = await queue.get()
            await resp.write(masker.mask(json.dumps(event.to_json()) + "\n").encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        bus.unsubscribe(queue)
    return resp


def make_app(daemon: Daemon, policy: AccessPolicy) -> web.Application:
    """The aiohttp application of the control API."""
    app = web.Application(middlewares=[_guard], client_max_size=MAX_REQUEST_BYTES)
    app[_ACCESS] = policy
    app[_DAEMON] = daemon
    app["connections"] = {"active": 0}
    p = API_PREFIX
    app.router.add_get(p + "/version", version)
    app.router.add_get(p + "/status", status)
    app.router.add_post(p + "/start", start)
    app.router.add_post(p + "/stop", stop)
    app.router.add_post(p + "/restart", restart)
    app.router.add_post(p + "/reload", reload)
    app.router.add_get(p + "/plugins", plugins)
    app.router.add_get(p + "/logs/{name}", logs)
    app.router.add_get(p + "/events", events)
    for path, handler in daemon.extra_routes():
        app.router.add_get(p + path, handler)
    return app


def bind_socket(path: Path, group: str | None) -> socket.socket:
    """Bind the control socket ``0660`` in a folder that is not world-writable.

    A socket file nobody answers on is stale and replaced; one that answers
    means another citadeld runs, and ``SocketInUseError`` says so.
    """
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    mode = folder.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise PermissionError(f"{folder} is world-writable; put daemon.control_socket elsewhere")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            logger.info("removing stale control socket {}", path)
            path.unlink()
        else:
            raise SocketInUseError(f"another citadeld is running: it answers on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except KeyError:
            logger.warning("group {!r} (daemon.socket_group) does not exist; {} keeps group {}",
                           group, path, os.getgid())
        except PermissionError as exc:
            logger.warning("cannot give {} to group {!r}: {}", path, group, exc.strerror)
    sock.listen(128)
    return sock


class ControlServer:
    """Runs the control app on its socket."""

    def __init__(self, daemon: Daemon, path: Path, group: str | None, policy: AccessPolicy):
        self.daemon = daemon
        self.path = path
        self.group = group
        self.policy = policy
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve."""
        sock = bind_socket(self.path, self.group)
        self._runner = web.AppRunner(make_app(self.daemon, self.policy), access_log=None,
                                     handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        logger.info("control socket on {}", self.path)

    async def close(self) -> None:
        """Stop serving and remove the socket file."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
