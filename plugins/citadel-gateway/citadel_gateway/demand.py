"""Telling citadeld what requests want: starts for held requests, and the services in use.

The gateway may start or wake only the services its ``on_demand`` names
(citadeld checks that against the gateway's own process, whatever it sends).
A held request asks at once (``POST /v1/demand {"start": [...]}``), and every
second while any request is held the ask is repeated (a citadeld that
restarted meanwhile still hears it). Once a second, the services requests
were sent to, and those with requests still in flight, are reported as
``used`` with their in-flight counts: citadeld's idle clock (``idle_stop``)
and its swap groups (which never evict a member that is in use) read them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
from loguru import logger

from citadel_supervisor.waits import cancel_and_wait

from .balancer import Balancer
from .upstreams import UpstreamTable

#: Seconds between reports of the services in use (and repeated asks for held requests).
REPORT_PERIOD = 1.0


class DemandClient:
    """Asks citadeld, over its control socket, to start what held requests wait for."""

    def __init__(self, session: aiohttp.ClientSession, table: UpstreamTable, balancer: Balancer):
        self.session = session
        self.table = table
        self.balancer = balancer
        self._task: asyncio.Task[None] | None = None
        self._asking: set[str] = set()
        #: Services last reported with requests in flight: their drop to 0 is reported too.
        self._busy: set[str] = set()
        self._refused_logged = False

    def start(self) -> None:
        """Report the services in use once a second, in the background."""
        if self.table.on_demand:
            self._task = asyncio.get_running_loop().create_task(self._report(), name="demand-report")

    async def close(self) -> None:
        """Stop reporting."""
        await cancel_and_wait(self._task)

    def want(self, services: Iterable[str]) -> None:
        """Ask for ``services`` to be started or woken now (a request is held for them)."""
        fresh = sorted(set(services) - self._asking)
        if not fresh:
            return
        self._asking.update(fresh)
        task = asyncio.get_running_loop().create_task(self._post({"start": fresh}))
        task.add_done_callback(lambda _: self._asking.difference_update(fresh))

    def _in_use(self) -> dict[str, int]:
        used = dict.fromkeys((self.balancer.take_used() | self._busy) & self.table.on_demand, 0)
        for upstream in self.table.workers.values():
            if upstream.service in self.table.on_demand and upstream.outstanding > 0:
                used[upstream.service] = used.get(upstream.service, 0) + upstream.outstanding
        self._busy = {service for service, count in used.items() if count > 0}
        return used

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_PERIOD)
            body: dict[str, object] = {}
            if used := self._in_use():
                body["used"] = used
            if held := self.balancer.held_services():
                body["start"] = held
            if body:
                await self._post(body)

    async def _post(self, body: dict[str, object]) -> None:
        try:
            async with self.session.post("/v1/demand", json=body,
                                         timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status == 403 and not self._refused_logged:
                    self._refused_logged = True
                    logger.error("citadeld refused this gateway's demand: {}", (await resp.text())[:300])
                elif resp.status != 200:
                    logger.warning("citadeld answered POST /v1/demand with HTTP {}: {}", resp.status,
                                   (await resp.text())[:300])
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            logger.warning("cannot tell citadeld what requests want: {}", str(exc) or type(exc).__name__)
