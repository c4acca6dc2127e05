"""``python -m citadel_gateway``: the gateway process that citadeld runs as a worker.

    python -m citadel_gateway --listen 127.0.0.1:8000 \\
        --control-socket /run/citadel/control.sock --config-json '{"queue_size": 64}'

The keys come from ``CITADEL_GATEWAY_KEYS`` (sha256 digests), never from
the command line. Without ``--control-socket``, ``CITADEL_SOCKET`` or
``/run/citadel/control.sock`` is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from aiohttp import web
from loguru import logger
from pydantic import ValidationError

from .app import Gateway, make_app
from .config import GatewaySettings
from .keys import KEYS_ENV, UPSTREAM_KEYS_ENV, KeyRing

DEFAULT_SOCKET = "/run/citadel/control.sock"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` -> ``(host, port)``; raises ``argparse.ArgumentTypeError``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    """Run the gateway until SIGTERM or SIGINT; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m citadel_gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=parse_listen, required=True, help="HOST:PORT to serve on")
    parser.add_argument("--control-socket", type=Path,
                        default=Path(os.environ.get("CITADEL_SOCKET", DEFAULT_SOCKET)),
                        help="citadeld's control socket (default: $CITADEL_SOCKET or %(default)s)")
    parser.add_argument("--config-json", default="{}", help="the gateway's settings, as JSON")
    args = parser.parse_args(argv)

    try:
        settings = GatewaySettings.model_validate(json.loads(args.config_json))
        keys = KeyRing.from_env(os.environ.get(KEYS_ENV))
        upstream_keys = json.loads(os.environ.get(UPSTREAM_KEYS_ENV) or "{}")
    except (ValueError, ValidationError, KeyError, TypeError) as exc:
        print(f"citadel_gateway: bad settings: {exc}", file=sys.stderr)
        return 2
    logger.remove()
    # diagnose=False: a traceback must not print variable values (a request's headers).
    logger.add(sys.stderr, level=settings.log_level, format="{level} {message}",
               backtrace=False, diagnose=False)

    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    host, port = args.listen
    gateway = Gateway(settings, keys, args.control_socket, upstream_keys)
    logger.info("gateway on {}:{} with {} key(s), following citadeld on {}",
                host, port, len(keys), args.control_socket)
    # handler_cancellation: a client that disconnects cancels its handler, and
    # so its request to the worker.
    web.run_app(make_app(gateway), host=host, port=port, access_log=None, print=None,
                handler_cancellation=True, shutdown_timeout=5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
