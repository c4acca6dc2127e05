"""GPU allocation: the services' ``gpus`` keys -> GPUs per worker, or issues naming the key."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from ..config import CitadelConfig, ConfigIssue, ServiceConfig, format_path
from .inventory import GpuInfo, GpuInventory, MigDevice, _count, _host_gpus

# --------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerGpus:
    """The GPUs (or MIG devices) one worker is pinned to; empty: unpinned."""

    service: str
    #: NVML indices of the physical GPUs (a MIG device gives its GPU's index).
    indices: tuple[int, ...] = ()
    #: GPU or MIG UUIDs, in the same order: what ``CUDA_VISIBLE_DEVICES`` gets.
    uuids: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.uuids)


@dataclass
class GpuAllocation:
    """``allocate_gpus``'s answer: every worker's GPUs, and what was wrong."""

    #: Worker name (``chat`` or ``chat.0``...) -> its GPUs, for every worker of every service.
    workers: dict[str, WorkerGpus]
    issues: list[ConfigIssue] = field(default_factory=list)

    def by_device(self) -> dict[str, list[str]]:
        """GPU or MIG UUID -> the workers pinned to it."""
        out: dict[str, list[str]] = {}
        for worker, gpus in self.workers.items():
            for uuid in gpus.uuids:
                out.setdefault(uuid, []).append(worker)
        return out


@dataclass(frozen=True)
class _Device:
    """A pinnable device: a whole GPU, or one MIG device of a GPU."""

    gpu: GpuInfo
    mig: MigDevice | None = None

    @property
    def uuid(self) -> str:
        return self.mig.uuid if self.mig else self.gpu.uuid

    @property
    def label(self) -> str:
        return f"MIG device {self.mig.uuid} of GPU {self.gpu.index}" if self.mig else f"GPU {self.gpu.index}"


#: Which file a key path came from, for ``ConfigIssue.file``.
FileOf = Callable[[tuple[object, ...]], "Path | None"]


def _asks_for_gpus(gpus: object) -> bool:
    """``gpus`` unset, ``[]`` or ``0`` all mean: no GPU, run unpinned."""
    return gpus is not None and gpus != 0 and gpus != []


def allocate_gpus(
    config: CitadelConfig,
    inventory: GpuInventory | None,
    *,
    no_gpu_reason: str | None = None,
    group_sizes: Mapping[str, int] | None = None,
    previous: Mapping[str, Sequence[str]] | None = None,
    file_of: FileOf | None = None,
) -> GpuAllocation:
    """Assign GPUs to every worker of every service; a pure function of its inputs.

    ``gpus`` may be a list of indices and/or UUIDs (GPU or MIG), split evenly
    among the replicas; a count per worker; or ``"auto"``, a group of
    ``group_sizes[service]`` GPUs per worker (default 1; vLLM's tensor-parallel
    size). Counts and ``"auto"`` take the GPUs with the most free memory that no
    list names, one NUMA node per group where NVML tells the nodes, bigger groups
    first; a worker named in ``previous`` (worker -> UUIDs it has now) keeps its
    GPUs when they still fit, so a reload does not move running workers. Two
    services may name one GPU only if both set ``gpus_shared = true``.

    With no inventory (a CPU host), services without ``gpus`` run unpinned and a
    service that asks for GPUs is an issue quoting ``no_gpu_reason``. Issues name
    the key path; ``file_of(loc)`` gives their file (default: the main config file).
    """
    main_file = config.files[0] if config.files else None
    where: FileOf = file_of or (lambda loc: main_file)
    issues: list[ConfigIssue] = []

    def issue(loc: tuple[object, ...], message: str) -> None:
        issues.append(ConfigIssue(where(loc), format_path(loc), message))

    workers = {w: WorkerGpus(service=name)
               for name in config.services for w in config.worker_names(name)}
    requests = {n: s for n, s in config.services.items() if _asks_for_gpus(s.gpus)}
    if not requests:
        return GpuAllocation(workers, issues)
    if inventory is None:
        reason = no_gpu_reason or "NVML found no GPU"
        for name in requests:
            issue(("services", name, "gpus"),
                  f"this host has no GPU: {reason}; remove gpus to run this service on the CPU")
        return GpuAllocation(workers, issues)

    claims: dict[str, tuple[str, bool]] = {}  # device UUID -> (service, gpus_shared)
    for name, service in requests.items():
        if isinstance(service.gpus, list):
            _allocate_listed(name, service, config, inventory, claims, workers, issue)

    pending: list[tuple[int, int, str]] = []  # (group size, config order, service)
    for order, (name, service) in enumerate(requests.items()):
        if service.gpus == "auto":
            size = (group_sizes or {}).get(name, 1)
        elif isinstance(service.gpus, int) and not isinstance(service.gpus, bool):
            size = service.gpus
        else:
            continue
        if size < 1:
            issue(("services", name, "gpus"), f"a GPU count must be at least 1 (got {size})")
            continue
        pending.append((size, order, name))
    free = [g for g in inventory.gpus if not g.mig_enabled and g.uuid not in claims]
    _allocate_counted(pending, config, inventory, free, previous or {}, workers, issue)
    return GpuAllocation(workers, issues)


def _resolve(item: int | str, inventory: GpuInventory) -> _Device | str:
    """One ``gpus`` list entry -> a device, or what is wrong with it."""
    if isinstance(item, str) and item.strip().isdigit():
        item = int(item)
    if isinstance(item, int):
        gpu = inventory.gpu(item)
        if gpu is None:
            return f"GPU {item} does not exist ({_host_gpus(g.index for g in inventory.gpus)})"
        return _Device(gpu)
    gpu = inventory.gpu(item)
    if gpu is None:
        return (f"no GPU or MIG device has UUID {item!r} "
                f"({_host_gpus(g.index for g in inventory.gpus)}; `citadelctl gpus` lists their UUIDs)")
    mig = next((m for m in gpu.mig_devices if m.uuid.lower() == item.lower()), None)
    return _Device(gpu, mig)


def _allocate_listed(
    name: str,
    service: ServiceConfig,
    config: CitadelConfig,
    inventory: GpuInventory,
    claims: dict[str, tuple[str, bool]],
    workers: dict[str, WorkerGpus],
    issue: Callable[[tuple[object, ...], str], None],
) -> None:
    assert isinstance(service.gpus, list)
    loc: tuple[object, ...] = ("services", name, "gpus")
    devices: list[_Device] = []
    ok = True
    for pos, item in enumerate(service.gpus):
        found = _resolve(item, inventory)
        if isinstance(found, str):
            issue(loc + (pos,), found)
            ok = False
            continue
        if found.mig is None and found.gpu.mig_enabled:
            migs = ", ".join(m.uuid for m in found.gpu.mig_devices) or "none is configured"
            issue(loc + (pos,), f"GPU {found.gpu.index} is in MIG mode: name one of its MIG devices "
                                f"by UUID instead ({migs})")
            ok = False
            continue
        if any(d.uuid == found.uuid for d in devices):
            issue(loc + (pos,), f"{found.label} is listed twice")
            ok = False
            continue
        other = claims.get(found.uuid)
        if other is not None and not (other[1] and service.gpus_shared):
            issue(loc + (pos,), f"{found.label} is claimed by both services {other[0]!r} and {name!r}; "
                                f"set gpus_shared = true in both to let them share it")
            ok = False
            continue
        devices.append(found)
    replicas = service.replicas
    if ok and len(devices) % replicas:
        issue(loc, f"{_count(len(devices))} cannot be split evenly among {replicas} replicas "
                   f"(each replica gets its own GPUs); list a multiple of {replicas}")
        ok = False
    per_worker = len(devices) // replicas if ok else 0
    if ok and per_worker > 1 and any(d.mig for d in devices):
        issue(loc, "a CUDA process can use only one MIG device, and no other GPU beside it; "
                   "give each replica exactly one MIG device")
        ok = False
    for device in devices:
        claims.setdefault(device.uuid, (name, service.gpus_shared))
    if not ok:
        return
    for i, worker in enumerate(config.worker_names(name)):
        chunk = devices[i * per_worker:(i + 1) * per_worker]
        workers[worker] = WorkerGpus(name, tuple(d.gpu.index for d in chunk), tuple(d.uuid for d in chunk))


def _allocate_counted(
    pending: list[tuple[int, int, str]],
    config: CitadelConfig,
    inventory: GpuInventory,
    free: list[GpuInfo],
    previous: Mapping[str, Sequence[str]],
    workers: dict[str, WorkerGpus],
    issue: Callable[[tuple[object, ...], str], None],
) -> None:
    # Workers that already run keep their GPUs if they still fit: a reload must not move them.
    for size, _, name in pending:
        for worker in config.worker_names(name):
            kept = [g for g in free if g.uuid in set(previous.get(worker, ()))]
            if kept and len(kept) == size == len(previous[worker]):
                for g in kept:
                    free.remove(g)
                workers[worker] = _pinned(name, kept)

    # Bigger groups first, so that a tensor-parallel group still finds a whole NUMA node.
    for size, _, name in sorted(pending, key=lambda p: (-p[0], p[1])):
        waiting = [w for w in config.worker_names(name) if not workers[w]]
        if not waiting:
            continue
        need = size * len(waiting)
        if need > len(free):
            replicas = config.services[name].replicas
            asked = _count(size) if replicas == 1 else \
                f"{_count(size)} for each of {replicas} replicas ({need} in all)"
            available = "none is free" if not free else \
                f"only {len(free)} {'is' if len(free) == 1 else 'are'} free"
            why = []
            taken = len([g for g in inventory.gpus if not g.mig_enabled]) - len(free)
            if taken:
                why.append(f"{taken} of this host's {len(inventory.gpus)} are pinned by other services")
            if any(g.mig_enabled for g in inventory.gpus):
                why.append("GPUs in MIG mode are never picked by count or auto; name MIG devices by UUID")
            issue(("services", name, "gpus"),
                  f"asks for {asked} but {available}" + (f" ({'; '.join(why)})" if why else ""))
            continue
        for worker in waiting:
            group = pick_group(free, size)
            for g in group:
                free.remove(g)
            workers[worker] = _pinned(name, group)


def _pinned(service: str, gpus: Sequence[GpuInfo]) -> WorkerGpus:
    ordered = sorted(gpus, key=lambda g: g.index)
    return WorkerGpus(service, tuple(g.index for g in ordered), tuple(g.uuid for g in ordered))


def pick_group(candidates: Sequence[GpuInfo], size: int) -> list[GpuInfo]:
    """The ``size`` GPUs with the most free memory, all on one NUMA node if any node has enough.

    Among nodes that can hold the group, the one whose group has the most free
    memory on its emptiest GPU wins (vLLM sizes its cache by each GPU's free
    memory); ties go to the lower indices. Raises ValueError if there are fewer
    than ``size`` candidates.
    """
    if size > len(candidates):
        raise ValueError(f"{size} GPUs asked for, {len(candidates)} available")

    def free(g: GpuInfo) -> int:
        return g.memory_free if g.memory_free is not None else -1

    ranked = sorted(candidates, key=lambda g: (-free(g), g.index))
    nodes: dict[int, list[GpuInfo]] = {}
    for g in ranked:
        if g.numa_node is not None:
            nodes.setdefault(g.numa_node, []).append(g)
    groups = [gpus[:size] for gpus in nodes.values() if len(gpus) >= size]
    if not groups:
        if nodes and size > 1:
            logger.warning("no NUMA node has {} free GPUs: the group spans nodes", size)
        return ranked[:size]
    return max(groups, key=lambda grp: (min(free(g) for g in grp), sum(free(g) for g in grp),
                                        [-g.index for g in grp]))


def check_memory_fractions(
    allocation: GpuAllocation,
    fractions: Mapping[str, float],
    *,
    key: str = "gpu_memory_utilization",
    file_of: FileOf | None = None,
) -> list[ConfigIssue]:
    """Refuse shared GPUs whose services' memory fractions add up to more than 1.0.

    ``fractions`` maps a service to the fraction of each of its GPUs it takes
    (vLLM's ``gpu_memory_utilization``, default 0.92); services not in it (plain
    commands) are not counted. One issue per set of services, on the last one's
    ``key``, naming them all.
    """
    issues: list[ConfigIssue] = []
    seen: set[tuple[str, ...]] = set()
    index_of = {u: i for g in allocation.workers.values() for u, i in zip(g.uuids, g.indices)}
    for uuid, names in allocation.by_device().items():
        sharing = [(w, allocation.workers[w].service) for w in names
                   if allocation.workers[w].service in fractions]
        if len(sharing) < 2:
            continue
        total = sum(fractions[s] for _, s in sharing)
        services = tuple(dict.fromkeys(s for _, s in sharing))
        if total <= 1.0 + 1e-9 or services in seen:
            continue
        seen.add(services)
        parts = [f"{w} ({fractions[s]:g})" for w, s in sharing]
        label = f"GPU {index_of[uuid]}" if uuid.upper().startswith("GPU-") else f"MIG device {uuid}"
        loc: tuple[object, ...] = ("services", services[-1], key)
        issues.append(ConfigIssue(
            file_of(loc) if file_of else None, format_path(loc),
            f"{label} is shared by {', '.join(parts[:-1])} and {parts[-1]}, whose {key} add up to "
            f"{total:.2f}, more than 1.0; lower them so they add up to at most 1.0",
        ))
    return issues


