"""The middleware in front of every route: who calls, how many at once, and no crash escapes.

Each request's caller is read from the socket (``SO_PEERCRED``) and checked
against the ``AccessPolicy``: GET and HEAD need read access, everything else
control access. Refusals are answered 403 with a message that says what to
do, and logged. Every failure in a handler becomes a JSON error answer, so
the daemon keeps serving whatever a caller sends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from loguru import logger

from ..logs.masking import masker
from ..supervisor import UnknownWorkerError
from .access import AccessPolicy, Peer, in_worker_tree
from .responses import BadRequestError, error_response

ACCESS_KEY = web.AppKey("access", AccessPolicy)
#: How many requests may be in handlers at once; the rest are answered 503.
MAX_REQUESTS_KEY = web.AppKey("max_requests", int)
#: How many of them may be callers without control access (the rest wait for root).
MAX_READ_REQUESTS_KEY = web.AppKey("max_read_requests", int)
ACTIVE_KEY = web.AppKey("active_requests", dict)
#: Where a worker may act although it reads at most: its handler checks the worker's grant
#: (``ServiceType.control_grants``) against what it asks for.
GRANTED_PATHS = frozenset({"/v1/demand"})
#: The request's key for the caller that came in on a grant.
GRANTED_CALLER = web.RequestKey("granted_caller", Peer)

_READ_METHODS = ("GET", "HEAD")


def refusal_message(peer: Peer, needed: str, policy: AccessPolicy) -> str:
    """What a refused caller reads: who they are, what they lack, and where that is set."""
    if policy.access(peer) == "read" and in_worker_tree(peer.pid, policy.supervisor_pid):
        return (f"permission denied: {peer.describe()} runs inside a worker of citadeld, and "
                "workers may only read; run citadelctl from outside the workers")
    return (f"permission denied: {peer.describe()} may not {needed} citadeld; "
            f"{'daemon.read_groups or ' if needed == 'read' else ''}daemon.control_groups "
            "in citadeld's config list the groups that may")


def _http_error(exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        return error_response(404, "no such API path; GET /v1/openapi.json lists them")
    if exc.status == 405:
        return error_response(405, f"method not allowed; allowed: {exc.headers.get('Allow', '?')}")
    if exc.status == 413:
        return error_response(413, f"request body too large: {exc.text or ''}".strip())
    return error_response(exc.status, exc.reason or exc.text or f"HTTP {exc.status}")


@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Check the caller, cap concurrency, and turn every failure into an error answer."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    try:
        if sock is None:
            raise OSError("no socket")
        peer = Peer.of(sock)
    except (OSError, AttributeError):
        return error_response(403, "cannot read the caller's credentials")
    access = request.app[ACCESS_KEY].access(peer)
    needed = "read" if request.method in _READ_METHODS else "control"
    if needed == "control" and access == "read" and request.path in GRANTED_PATHS:
        request[GRANTED_CALLER] = peer  # the handler checks what this worker was granted
    elif access == "none" or (needed == "control" and access != "control"):
        logger.warning("control socket: refused {} {} from {} (has {} access, needs {})",
                       request.method, request.path, peer.describe(), access, needed)
        return error_response(403, refusal_message(peer, needed, request.app[ACCESS_KEY]))
    active = request.app[ACTIVE_KEY]
    if active["n"] >= request.app[MAX_REQUESTS_KEY]:
        return error_response(503, "too many concurrent requests; try again")
    if access != "control" and active["read"] >= request.app[MAX_READ_REQUESTS_KEY]:
        return error_response(503, "too many concurrent read-only requests; try again")
    kind = "control" if access == "control" else "read"
    active[kind] += 1
    active["n"] += 1
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _http_error(exc)
    except UnknownWorkerError as exc:
        return error_response(404, str(exc))
    except BadRequestError as exc:
        return error_response(400, masker.mask(str(exc)))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001  (the daemon answers, whatever went wrong)
        logger.opt(exception=exc).error("control API error on {} {}", request.method, request.path)
        return error_response(500, masker.mask(f"internal error: {type(exc).__name__}: {exc}"))
    finally:
        active["n"] -= 1
        active[kind] -= 1
