"""The built-in probe kinds: ``http``, ``tcp`` and ``exec``, registered as a plugin.

They come to citadeld as any plugin's kinds do, through ``citadel_probe_kinds``
(this module is in ``plugins.DEFAULT_PLUGINS``).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .. import hookimpl
from ..config import ProbeConfig
from ..process.spawn import SpawnError, spawn
from ..services.base import WorkerInfo
from ..waits import within
from .base import ProbeFactory, ProbeResult


def _target_url(config: ProbeConfig, worker: WorkerInfo) -> str:
    if config.url:
        return config.url
    host = worker.config.host
    return f"http://{host}:{worker.port}{config.path}"


class HttpProbe:
    """GET a URL: 2xx and 3xx pass, and the body must contain ``expect_body`` if set."""

    def __init__(self, config: ProbeConfig, worker: WorkerInfo, session: aiohttp.ClientSession):
        self.config = config
        self.url = _target_url(config, worker)
        self.session = session

    async def check(self) -> ProbeResult:
        """GET the URL once."""
        start = time.monotonic()
        try:
            async with self.session.get(
                self.url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=self.config.timeout)
            ) as resp:
                ok = 200 <= resp.status < 400
                detail = f"HTTP {resp.status}"
                if ok and self.config.expect_body is not None:
                    body = await resp.text(errors="replace")
                    if self.config.expect_body not in body:
                        ok, detail = False, f"HTTP {resp.status}, body lacks {self.config.expect_body!r}"
        except TimeoutError:
            ok, detail = False, f"timed out after {self.config.timeout:g}s"
        except aiohttp.ClientError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return ProbeResult(ok, detail, time.monotonic() - start)


class TcpProbe:
    """Open a TCP connection to ``address`` (host:port)."""

    def __init__(self, config: ProbeConfig, worker: WorkerInfo, session: aiohttp.ClientSession):
        assert config.address is not None
        host, _, port = config.address.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.timeout = config.timeout

    async def check(self) -> ProbeResult:
        """Connect once, then close."""
        start = time.monotonic()
        try:
            _, writer = await within(asyncio.open_connection(self.host, self.port), self.timeout)
            writer.close()
            return ProbeResult(True, "connected", time.monotonic() - start)
        except TimeoutError:
            return ProbeResult(False, f"timed out after {self.timeout:g}s", time.monotonic() - start)
        except OSError as exc:
            return ProbeResult(False, exc.strerror or str(exc), time.monotonic() - start)


class ExecProbe:
    """Run an argv (no shell); exit status 0 passes. Killed at the timeout."""

    def __init__(self, config: ProbeConfig, worker: WorkerInfo, session: aiohttp.ClientSession):
        assert config.command is not None
        self.argv = list(config.command)
        self.timeout = config.timeout
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **worker.config.env,
                    "CITADEL_WORKER": worker.name, "CITADEL_SERVICE": worker.service}

    async def check(self) -> ProbeResult:
        """Run the command once."""
        start = time.monotonic()
        try:
            proc = spawn(self.argv, self.env, capture_output=False)
        except SpawnError as exc:
            return ProbeResult(False, str(exc), time.monotonic() - start)
        try:
            status = await within(proc.wait(), self.timeout)
        except TimeoutError:
            await proc.stop(9, 1.0)
            return ProbeResult(False, f"timed out after {self.timeout:g}s", time.monotonic() - start)
        return ProbeResult(not status.failed(), status.describe(), time.monotonic() - start)


@hookimpl
def citadel_probe_kinds() -> dict[str, ProbeFactory]:
    """The built-in kinds."""
    return {"http": HttpProbe, "tcp": TcpProbe, "exec": ExecProbe}
