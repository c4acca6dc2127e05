"""Which GPUs each worker gets: the config's requests, the service types' defaults, NVML's view."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..config import CitadelConfig, ConfigIssue
from ..services.base import ServiceType
from . import GpuAllocation, GpuDetection, allocate_gpus, check_memory_fractions


def plan_gpus(
    config: CitadelConfig,
    detection: GpuDetection,
    service_types: Mapping[str, ServiceType],
    previous: Mapping[str, Sequence[str]] | None = None,
) -> tuple[GpuAllocation, list[ConfigIssue]]:
    """Allocate GPUs to every worker; the allocation and every problem found.

    On a host with GPUs, a service that leaves ``gpus`` unset gets its type's
    default (vLLM: ``"auto"``, a tensor-parallel group per worker). On a CPU
    host nothing is pinned, and a service that asks for GPUs is an issue.
    """
    services = dict(config.services)
    if detection.inventory is not None:
        for name, service in services.items():
            default = service_types[service.type].default_gpus(service)
            if service.gpus is None and default is not None:
                services[name] = service.model_copy(update={"gpus": default})
    effective = config.model_copy(update={"services": services})
    group_sizes = {n: service_types[s.type].gpu_group_size(s) for n, s in services.items()}
    allocation = allocate_gpus(effective, detection.inventory, no_gpu_reason=detection.reason,
                               group_sizes=group_sizes, previous=previous)
    fractions = {n: f for n, s in services.items()
                 if (f := service_types[s.type].gpu_memory_fraction(s)) is not None}
    issues = allocation.issues + check_memory_fractions(allocation, fractions)
    return allocation, issues
