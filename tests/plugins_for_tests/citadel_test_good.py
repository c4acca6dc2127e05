"""A plugin that works: the ``echo`` service type, a config section, and an event log.

Only for tests (``tests/test_plugins.py``); not part of Citadel.
"""

from __future__ import annotations

import json
import os
import sys

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from citadel_supervisor import hookimpl
from citadel_supervisor.config import ServiceConfig
from citadel_supervisor.control.responses import json_response
from citadel_supervisor.control.route import Route
from citadel_supervisor.events import WorkerEvent
from citadel_supervisor.services.base import ServiceType, SpawnSpec, WorkerInfo
from citadel_supervisor.worker.restart_policy import RestartWait

ECHO_PROGRAM = "import sys, time; print(sys.argv[1], flush=True); time.sleep(600)"


class EchoConfig(ServiceConfig):
    """``type = "echo"``: prints ``message``, then waits."""

    message: str


class EchoService(ServiceType):
    """Prints its message once and sleeps, so a test can see it ran."""

    name = "echo"
    config_model = EchoConfig

    def spawn_spec(self, worker: WorkerInfo) -> SpawnSpec:
        """``python -c ECHO_PROGRAM MESSAGE``."""
        assert isinstance(worker.config, EchoConfig)
        return SpawnSpec(argv=[sys.executable, "-c", ECHO_PROGRAM, worker.config.message],
                         env=dict(worker.config.env))


class GoodSection(BaseModel):
    """``[plugin.good]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    greeting: str


@hookimpl
def citadel_service_types() -> list[ServiceType]:
    """The ``echo`` type."""
    return [EchoService()]


@hookimpl
def citadel_config_sections() -> dict[str, type[BaseModel]]:
    """The ``[plugin.good]`` section."""
    return {"good": GoodSection}


@hookimpl
def citadel_worker_event(event: WorkerEvent) -> None:
    """Append the event to ``$CITADEL_TEST_EVENTS`` as a JSON line."""
    path = os.environ.get("CITADEL_TEST_EVENTS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(event.to_json()) + "\n")


async def _greeting(request: web.Request) -> web.Response:
    """GET /v1/good/greeting."""
    return json_response({"greeting": "hello from the good plugin"})


@hookimpl
def citadel_control_routes() -> list[Route]:
    """``GET /v1/good/greeting``, and a POST route and a taken path, which must be left out."""
    return [Route("GET", "/good/greeting", _greeting, "the good plugin's greeting"),
            Route("POST", "/good/greeting", _greeting, "not allowed: routes plugins add are GET"),
            Route("GET", "/status", _greeting, "not allowed: the path is citadeld's own")]


async def _note_restart(worker: WorkerInfo) -> None:
    path = os.environ.get("CITADEL_TEST_EVENTS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"kind": "before_restart", "worker": worker.name}) + "\n")


@hookimpl
def citadel_before_restart(worker: WorkerInfo) -> RestartWait:
    """Note, in ``$CITADEL_TEST_EVENTS``, that the worker's restart waited for this plugin."""
    return RestartWait("the good plugin's note", _note_restart(worker))
