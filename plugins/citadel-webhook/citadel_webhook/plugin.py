"""The hooks: declare ``[plugin.webhook]``, and turn each worker event into queued deliveries.

``plugin`` is the object the ``citadel`` entry point names. It reads its
settings from the running config at each event, so ``citadelctl reload``
changes URLs, filters and the secret without a restart.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
from loguru import logger
from pydantic import BaseModel

from citadel_supervisor import hookimpl
from citadel_supervisor.logs.masking import masker

from . import __version__
from .config import WebhookConfig
from .delivery import Delivery, Endpoint

if TYPE_CHECKING:
    from citadel_supervisor.events import WorkerEvent
    from citadel_supervisor.supervisor import Supervisor

#: The ``[plugin.NAME]`` table this plugin reads.
SECTION = "webhook"


def event_body(event: WorkerEvent, delivery_id: str, host: str) -> bytes:
    """The JSON body posted for an event: the event as ``citadelctl events`` shows it, and
    ``delivery``, ``host`` and ``event`` (the kind, also in ``X-Citadel-Event``)."""
    data: dict[str, Any] = {"event": event.kind, "delivery": delivery_id, "host": host,
                            **event.to_json()}
    # Worker output in ``detail`` went through the masker when it was read;
    # masking the whole body again costs little and covers everything else.
    return masker.mask(json.dumps(data, default=str, sort_keys=True)).encode()


class WebhookPlugin:
    """Posts worker events to the URLs of ``[plugin.webhook]``."""

    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self.host = socket.gethostname()
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Task[None] | None = None

    # -- hooks ------------------------------------------------------------------

    @hookimpl
    def citadel_config_sections(self) -> dict[str, type[BaseModel]]:
        """``[plugin.webhook]``, validated by ``WebhookConfig``."""
        return {SECTION: WebhookConfig}

    @hookimpl
    def citadel_daemon_started(self, supervisor: Supervisor) -> None:
        """Keep the supervisor, to read the current config at each event."""
        self.supervisor = supervisor
        config = self.config()
        if config is None:
            logger.info("webhook: no [plugin.{}] table; not sending events", SECTION)
        else:
            logger.info("webhook: sending {} events to {} URL(s)", ", ".join(config.events),
                        len(config.urls))

    @hookimpl
    def citadel_worker_event(self, event: WorkerEvent) -> None:
        """Queue the event for each URL; the posting happens in each URL's own task."""
        config = self.config()
        if config is None or not config.wants(event.kind, event.state, event.service):
            return
        delivery_id = str(uuid.uuid4())
        delivery = Delivery(delivery_id, event.kind, event.worker,
                            event_body(event, delivery_id, self.host))
        for url in config.urls:
            self.endpoint(url).offer(delivery, config)

    @hookimpl
    def citadel_daemon_stopping(self, supervisor: Supervisor) -> None:
        """Close the HTTP session once the last deliveries went out (see ``_close``)."""
        # Kept referenced: the loop holds tasks weakly, and this one only waits.
        self._closing = asyncio.get_running_loop().create_task(
            self._close(), name="citadel-webhook close")

    # -- the rest ---------------------------------------------------------------

    def config(self) -> WebhookConfig | None:
        """The running ``[plugin.webhook]`` settings, or None when there are none."""
        if self.supervisor is None:
            return None
        config = self.supervisor.config.plugin.get(SECTION)
        if isinstance(config, WebhookConfig):
            # A secret written into the file (not a credential) is masked too.
            masker.add_secret(config.secret.get_secret_value())
            return config
        return None

    def endpoint(self, url: str) -> Endpoint:
        """The sender for ``url``, made on first use."""
        if url not in self.endpoints:
            self.endpoints[url] = Endpoint(url, self.session, f"citadel-webhook/{__version__}")
        return self.endpoints[url]

    def session(self) -> aiohttp.ClientSession:
        """The one HTTP session, opened on first use (inside the running loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _close(self) -> None:
        # Runs until citadeld cancels its remaining tasks on exit: the
        # workers' last "stopping"/"stopped" events are posted meanwhile
        # (each Endpoint flushes what is left when cancelled), then the
        # session closes.
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.gather(*(e.stopped() for e in self.endpoints.values()),
                                 return_exceptions=True)
            if self._session is not None:
                await self._session.close()


#: The plugin object registered under the entry point ``webhook``.
plugin = WebhookPlugin()
