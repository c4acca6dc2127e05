"""The control API server: the socket, its limits, and the aiohttp application on it.

``curl --unix-socket /run/citadel/control.sock http://citadel/v1/status``
works. The routes are in ``routes``, the access checks in ``guard``.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from loguru import logger

from ..waits import within
from . import API_PREFIX
from .access import AccessPolicy, Peer
from .admission import CappedSockSite, ConnectionGate
from .demand_routes import DEMAND_ROUTES
from .guard import ACCESS_KEY, ACTIVE_KEY, MAX_READ_REQUESTS_KEY, MAX_REQUESTS_KEY, guard
from .openapi import OPENAPI_ROUTE
from .routes import BODY_TIMEOUT_KEY, DAEMON_KEY, ROUTES, ROUTES_KEY

if TYPE_CHECKING:
    from ..daemon import Daemon



class SocketInUseError(RuntimeError):
    """Another citadeld answers on the control socket."""


@dataclass(frozen=True)
class ControlLimits:
    """What one caller may take from the daemon.

    ``read_timeout``: seconds to send a whole request (headers, then body);
    an idle or stalled connection is closed after it. ``max_connections``:
    open connections; one more is answered 503 and closed. ``max_requests``:
    requests in handlers at once (503 beyond). ``max_body``: bytes (413 beyond).
    ``reserved_connections``: of ``max_connections`` (and of ``max_requests``),
    how many only root and the control group may take, so that read-only
    callers can never lock them out.
    """

    read_timeout: float = 10.0
    max_connections: int = 64
    max_requests: int = 64
    max_body: int = 64 * 1024
    reserved_connections: int = 16

    def reserved(self, cap: int) -> int:
        """Slots of ``cap`` kept for root and the control group: ``reserved_connections``,
        but at least one and never all (a cap of 1 keeps none)."""
        return max(0, min(max(self.reserved_connections, 1), cap - 1))

    @property
    def max_read_connections(self) -> int:
        """Connections callers without control access may hold at once."""
        return self.max_connections - self.reserved(self.max_connections)

    @property
    def max_read_requests(self) -> int:
        """Requests of callers without control access that may be in handlers at once."""
        return self.max_requests - self.reserved(self.max_requests)

    @classmethod
    def from_env(cls) -> ControlLimits:
        """The defaults, overridden by ``CITADEL_CONTROL_READ_TIMEOUT``,
        ``CITADEL_CONTROL_MAX_CONNECTIONS``, ``CITADEL_CONTROL_MAX_REQUESTS``, ``CITADEL_CONTROL_MAX_BODY``
        and ``CITADEL_CONTROL_RESERVED_CONNECTIONS``."""
        def number(name: str, default: float, kind: type) -> Any:
            raw = os.environ.get(f"CITADEL_CONTROL_{name}")
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                logger.warning("ignoring CITADEL_CONTROL_{}={!r}: not a number", name, raw)
                return default
            return value if value > 0 else default

        d = cls()
        return cls(number("READ_TIMEOUT", d.read_timeout, float),
                   number("MAX_CONNECTIONS", d.max_connections, int),
                   number("MAX_REQUESTS", d.max_requests, int),
                   number("MAX_BODY", d.max_body, int),
                   number("RESERVED_CONNECTIONS", d.reserved_connections, int))


def make_app(daemon: Daemon, policy: AccessPolicy, limits: ControlLimits | None = None) -> web.Application:
    """The aiohttp application of the control API: its own routes and those plugins add
    (``daemon.control_routes()``), then the OpenAPI document's, which describes them all."""
    limits = limits or ControlLimits()
    app = web.Application(middlewares=[guard], client_max_size=limits.max_body)
    app[ACCESS_KEY] = policy
    app[DAEMON_KEY] = daemon
    app[MAX_REQUESTS_KEY] = limits.max_requests
    app[MAX_READ_REQUESTS_KEY] = limits.max_read_requests
    app[ACTIVE_KEY] = {"n": 0, "control": 0, "read": 0}
    app[BODY_TIMEOUT_KEY] = limits.read_timeout
    routes = [*ROUTES, *DEMAND_ROUTES, *daemon.control_routes(), OPENAPI_ROUTE]
    app[ROUTES_KEY] = routes
    for route in routes:
        app.router.add_route(route.method, API_PREFIX + route.path, route.handler)
    return app


def bind_socket(path: Path, group: str | None) -> socket.socket:
    """Bind the control socket ``0660`` in a folder that is not world-writable.

    A socket file nobody listens on (connect: ECONNREFUSED) is stale and
    replaced. Any other outcome means a listener, perhaps too busy to accept
    (a full backlog fails with EAGAIN): ``SocketInUseError`` says so, and the
    file is left alone.
    """
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    mode = folder.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise PermissionError(f"{folder} is world-writable; put daemon.control_socket elsewhere")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; remove it or choose another path")
        if _listened_on(path):
            raise SocketInUseError(f"another citadeld is running: it listens on {path}; "
                                   "stop it first, or give this one another daemon.control_socket")
        logger.info("replacing stale control socket {} (nothing listens on it)", path)
        path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # never world-accessible, not even between bind and chmod
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


def _listened_on(path: Path) -> bool:
    """Whether a process listens on the Unix socket ``path``.

    Only ECONNREFUSED (and the file vanishing) proves nobody does: a listener
    that is slow to accept fails a connect with EAGAIN or a timeout, and
    removing its socket would cut its operator off.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


#: Seconds citadeld waits, on exit, for control connections to finish.
CLOSE_TIMEOUT = 2.0


def _has_control(policy: AccessPolicy) -> Callable[[socket.socket], tuple[bool, str]]:
    """The connection gate's test: may this peer control citadeld (and who is it)."""
    def check(sock: socket.socket) -> tuple[bool, str]:
        peer = Peer.of(sock)
        return policy.access(peer) == "control", peer.describe()

    return check


class ControlServer:
    """Runs the control app on its socket."""

    def __init__(self, daemon: Daemon, path: Path, group: str | None, policy: AccessPolicy,
                 limits: ControlLimits | None = None):
        self.daemon = daemon
        self.path = path
        self.group = group
        self.policy = policy
        self.limits = limits or ControlLimits.from_env()
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None

    def bind(self) -> None:
        """Claim the socket (raises ``SocketInUseError`` if another citadeld holds it)."""
        if self._sock is None:
            self._sock = bind_socket(self.path, self.group)

    async def start(self) -> None:
        """Bind (if not yet) and serve."""
        self.bind()
        assert self._sock is not None
        # keepalive_timeout also closes a connection that has not sent a whole request in time.
        self._runner = web.AppRunner(make_app(self.daemon, self.policy, self.limits), access_log=None,
                                     handle_signals=False, shutdown_timeout=1.0,
                                     keepalive_timeout=self.limits.read_timeout)
        await self._runner.setup()
        limits = self.limits

        def gate(server: web.Server) -> ConnectionGate:
            return ConnectionGate(server, "citadeld's control socket", limits.max_connections,
                                  limits.max_read_connections, _has_control(self.policy))

        await CappedSockSite(self._runner, self._sock, gate).start()
        logger.info("control socket on {}", self.path)

    async def close(self) -> None:
        """Stop serving and remove the socket file."""
        if self._runner is not None:
            # Open connections (followers of events or logs, stalled clients) each get
            # a grace period to finish; citadeld's exit must not wait on them for long.
            try:
                await within(self._runner.cleanup(), CLOSE_TIMEOUT)
            except TimeoutError:
                logger.info("control socket: closed with clients still connected")
            self._runner = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
