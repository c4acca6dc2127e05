"""A plugin with a bug that shows only once its worker runs: the ``buggy`` service type,
whose ``probes`` raises after the process was spawned.

Only for tests (``tests/test_plugins.py``); not part of Citadel.
"""

from __future__ import annotations

import sys

from citadel_supervisor import hookimpl
from citadel_supervisor.config import ProbesConfig, ServiceConfig
from citadel_supervisor.services.base import ServiceType, SpawnSpec, WorkerInfo


class BuggyService(ServiceType):
    """Spawns a sleeper, then fails to say what its probes are."""

    name = "buggy"
    config_model = ServiceConfig

    def spawn_spec(self, worker: WorkerInfo) -> SpawnSpec:
        """A Python process that sleeps."""
        return SpawnSpec(argv=[sys.executable, "-c", "import time; time.sleep(600)"], env={})

    def probes(self, worker: WorkerInfo) -> ProbesConfig:
        """Always raises: the bug."""
        raise RuntimeError("buggy on purpose")


@hookimpl
def citadel_service_types() -> list[ServiceType]:
    """The ``buggy`` type."""
    return [BuggyService()]
