"""Every hook of Citadel's plugin API, typed and documented.

Plugins implement these with functions of the same name decorated with
``citadel_supervisor.hookimpl``, in a module or object registered in the
``citadel`` entry-point group. Hooks run on the daemon's event loop thread:
they must not block. A hook that has slow work to do schedules a task with
``asyncio.get_running_loop().create_task(...)``.

A plugin that raises from a hook is reported by name in the log; the other
plugins' implementations still run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from . import PROJECT_NAME

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .config import CitadelConfig, ConfigIssue
    from .control.route import Route
    from .events import WorkerEvent
    from .exporter.snapshot import Scrape
    from .probes.base import ProbeFactory
    from .services.base import ServiceType, SpawnSpec, WorkerInfo
    from .supervisor import Supervisor
    from .worker.restart_policy import RestartWait

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


# --------------------------------------------------------------------------
# Registration hooks: called once, when the plugins are loaded
# --------------------------------------------------------------------------


@hookspec
def citadel_service_types() -> list[ServiceType]:
    """Return the service types this plugin provides.

    Each ``ServiceType`` names the value of ``type = "..."`` it handles, the
    pydantic model that validates its config table, and how to spawn its
    workers. A type name that a second plugin provides too is logged, and the
    second one's is ignored.
    """


@hookspec
def citadel_config_sections() -> dict[str, type[BaseModel]]:
    """Return ``{section: model}`` for the ``[plugin.SECTION]`` tables this plugin reads.

    The loader validates each section with its model, reporting errors with
    the file and key path; a section that no plugin claims is an error.
    """


@hookspec
def citadel_probe_kinds() -> dict[str, ProbeFactory]:
    """Return ``{kind: factory}`` for the probe kinds this plugin adds.

    A factory is called as ``factory(probe_config, worker_info, session)``
    (the probe's ``ProbeConfig``, the worker's ``WorkerInfo`` and the daemon's
    ``aiohttp.ClientSession``) and returns an object with an
    ``async check() -> ProbeResult`` method.
    """


@hookspec
def citadel_control_routes() -> list[Route]:
    """Return read-only ``GET`` routes to add to the control API, under ``/v1``.

    Each ``Route`` (``citadel_supervisor.control.route``) names its path, its
    handler (``async handler(request) -> web.Response``), a summary and the
    JSON schema of its answer, for the OpenAPI document. Callers need read
    access, as for every GET. A route that is not GET, or whose path another
    route has, is logged and left out.
    """


# --------------------------------------------------------------------------
# Config hooks
# --------------------------------------------------------------------------


@hookspec
def citadel_check_config(config: CitadelConfig) -> list[ConfigIssue]:
    """Check the whole config after it validated; return the problems found.

    :param config: the validated config. A non-empty list rejects the config
        (at start-up, ``--check`` or reload), naming each problem.
    """


# --------------------------------------------------------------------------
# Worker hooks
# --------------------------------------------------------------------------


@hookspec
def citadel_prepare_spawn(worker: WorkerInfo, spec: SpawnSpec) -> None:
    """Adjust a worker's argv, env, cwd or CPU affinity just before it is spawned.

    :param worker: which worker is about to start (service, replica, port, GPUs).
    :param spec: the ``SpawnSpec`` to change in place.
    """


@hookspec
def citadel_before_restart(worker: WorkerInfo) -> RestartWait | None:
    """Hold a failed worker's restart until something is over; None holds nothing.

    :param worker: the worker about to be spawned again, its backoff served.
        Return a ``RestartWait`` (``citadel_supervisor.worker.restart_policy``):
        what the worker waits for, shown in its status, and the awaitable that
        ends when that is over. It must end by itself within a bound (the GPU
        part waits at most the service's ``gpu_release_timeout``); one that
        raises is logged by plugin and the restart goes on. A stop, start or
        restart request cuts the wait short and cancels the awaitable.
    """


@hookspec
def citadel_worker_event(event: WorkerEvent) -> None:
    """Be told of a worker event: a state change, a restart, an exit, going fatal.

    :param event: what happened, to which worker, and when.
    """


# --------------------------------------------------------------------------
# Daemon hooks
# --------------------------------------------------------------------------


@hookspec
def citadel_metric_collectors(supervisor: Supervisor) -> list[Any]:
    """Return prometheus_client collectors to add to the exporter.

    :param supervisor: the running supervisor, to read workers from. Each
        collector's ``collect()`` runs in the exporter's thread, not the loop.
    """


@hookspec
def citadel_scrape_collectors(scrape: Scrape) -> list[Any]:
    """Return prometheus_client collectors for one scrape of ``/metrics``.

    :param scrape: the workers as copied on the loop for this scrape, each running
        worker's live processes, and the ``[exporter]`` config. Called on every
        scrape, in the exporter's thread, not the loop: the collectors may read
        ``/proc`` or NVML, and should be quick. Citadel's own process, host and
        GPU families come through this hook.
    """


@hookspec
def citadel_exporter_routes() -> list[Route]:
    """Return ``GET`` routes to add to the exporter's listener, under ``/v1``.

    A route with ``at_root=True`` is served at its path as it is, at the
    listener's root (the ``ui`` part serves the status page at ``/`` and
    ``/ui/``). The exporter faces the network and checks no caller: a route
    added here must authenticate its callers itself (the ``multinode`` part
    signs with the group's secret) and reveal nothing secret. A route that is
    not GET, or whose path is taken, is logged and left out.
    """


@hookspec
def citadel_daemon_started(supervisor: Supervisor) -> None:
    """Be told that citadeld has started its workers and is serving.

    :param supervisor: the running supervisor.
    """


@hookspec
def citadel_daemon_stopping(supervisor: Supervisor) -> None:
    """Be told that citadeld is about to stop its workers and exit.

    :param supervisor: the running supervisor.
    """
