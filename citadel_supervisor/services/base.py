"""What a service type is: a config model, and how to spawn and probe its workers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import aiohttp

from ..config import ProbeConfig, ProbesConfig, ServiceConfig

if TYPE_CHECKING:
    from ..multinode.rank import GroupRank


@dataclass(frozen=True)
class WorkerInfo:
    """Who a worker is: what hooks and service types are told about it."""

    name: str
    service: str
    replica: int
    config: ServiceConfig
    port: int | None = None
    #: GPUs assigned to this worker, as NVML indices and UUIDs (empty on the CPU).
    gpu_indices: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    #: The pids of the worker's process tree now (reads /proc): set on the info a probe is
    #: built with, so that it can tell the worker's sockets from a stranger's; empty elsewhere.
    tree_pids: Callable[[], set[int]] = field(default=lambda: set(), compare=False, repr=False)
    #: Its rank, when the service runs across nodes (``multinode``); None otherwise.
    group_rank: GroupRank | None = field(default=None, compare=False)


@dataclass
class SpawnSpec:
    """How to start one worker process. Hooks may adjust it before the spawn."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    #: CPUs the worker may run on (its GPUs' NUMA node), or None for any.
    cpu_affinity: set[int] | None = None


class SleepControl(Protocol):
    """How a worker's engine is put to sleep and woken, keeping its process (vLLM's sleep
    mode): the GPU memory is released while it sleeps. Each call raises ``SleepError``
    when the worker refuses."""

    #: The sleep level (vLLM: 1 keeps the weights in host memory, 2 drops them).
    level: int

    async def sleep(self) -> None:
        """Put the engine to sleep; returns once its memory is released."""

    async def wake(self) -> None:
        """Wake the engine, and return once it has served a first request again."""


class SleepError(RuntimeError):
    """A worker did not go to sleep or wake as asked; the message says what it answered."""


class ServiceType(ABC):
    """A kind of service (``type = "..."`` in the config), provided by a plugin."""

    #: The value of ``type`` in the config.
    name: ClassVar[str]
    #: The model that validates a service table of this type.
    config_model: ClassVar[type[ServiceConfig]]

    @abstractmethod
    def spawn_spec(self, worker: WorkerInfo) -> SpawnSpec:
        """Build the argv, env and cwd for one worker of this type."""

    def probes(self, worker: WorkerInfo) -> ProbesConfig:
        """The worker's probes: its ``probes`` table, else ``health``, else the type's defaults."""
        config = worker.config
        probes = config.probes
        if probes.startup or probes.liveness or probes.readiness:
            return probes
        if config.health is not None:
            h = config.health
            probe = ProbeConfig(
                kind="http" if h.http else "tcp",
                url=h.http,
                address=h.tcp,
                expect_body=h.expect_body,
                period=h.period,
                timeout=h.timeout,
                failure_threshold=3,
            )
            return ProbesConfig(startup=probe.model_copy(update={"period": min(h.period, 0.2)}),
                                readiness=probe)
        return self.default_probes(worker)

    def default_probes(self, worker: WorkerInfo) -> ProbesConfig:
        """Probes used when the config gives none; none by default."""
        return ProbesConfig()

    async def before_spawn(self, worker: WorkerInfo) -> None:
        """Awaited before each spawn, for a slow check the spawn spec depends on (the vLLM
        type asks its interpreter once whether the build has a sleep mode); nothing by default."""

    def sleep_control(self, worker: WorkerInfo, session: aiohttp.ClientSession) -> SleepControl | None:
        """How to put the worker to sleep and wake it; None (the default): an idle or evicted
        worker is stopped, and started again on demand."""
        return None

    def control_grants(self, worker: WorkerInfo) -> frozenset[str]:
        """The services this worker may start or wake (``POST /v1/demand``) although it runs
        inside citadeld's workers (the gateway: its ``on_demand``); none by default."""
        return frozenset()

    def default_gpus(self, config: ServiceConfig) -> str | None:
        """What ``gpus`` means when unset on a host with GPUs: None (unpinned), or ``"auto"``."""
        return None

    def gpu_group_size(self, config: ServiceConfig) -> int:
        """How many GPUs one worker takes when ``gpus = "auto"``."""
        return 1

    def gpu_memory_fraction(self, config: ServiceConfig) -> float | None:
        """The fraction of each GPU's memory a worker takes, where the type knows it."""
        return None

    def startup_phase(self, line: str) -> str | None:
        """What a line of the worker's output says it is doing while it starts (or None).

        The phase ``"serving"`` also triggers the startup probe at once, so a
        worker is seen ready without waiting for the next probe period.
        """
        return None

    def models(self, worker: WorkerInfo) -> list[str]:
        """The model names the worker serves (for routing by ``model``); none by default."""
        return []

    def metrics_url(self, worker: WorkerInfo) -> str | None:
        """The URL of the worker's own Prometheus ``/metrics``, to federate, or None.

        The service's ``metrics`` key (a URL, or a path on the worker's port) wins when set.
        """
        page = worker.config.metrics
        if page and not page.startswith("/"):
            return page
        if page and worker.port:
            return f"http://{worker.config.host}:{worker.port}{page}"
        return None
