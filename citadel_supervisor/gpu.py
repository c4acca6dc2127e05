"""GPUs: what NVML sees, which worker gets which GPU, and what a pinned worker is given.

In data-path order:

- inventory: ``detect_gpus`` / ``GpuInventory.detect`` read NVML through
  ``pynvml`` (the ``nvidia-ml-py`` package). NVML reads the physical devices and
  never initialises CUDA, so the daemon stays light; nothing here imports torch.
  Every per-device read that NVML refuses (NotSupported, NoPermission, GPU lost)
  becomes None for that field, never an exception.
- allocation: ``allocate_gpus`` (pure) turns the services' ``gpus`` keys into
  GPUs per worker, or ``ConfigIssue``s naming the key path;
  ``check_memory_fractions`` checks vLLM's ``gpu_memory_utilization`` on shared GPUs.
- placement: ``worker_placement`` gives a worker its ``CUDA_VISIBLE_DEVICES``
  (UUIDs, as CUDA's own device order can differ from NVML's) and its CPU set.
- release: ``wait_released`` waits, bounded, until a dead worker's GPU memory
  is free again, before its restart.

``CITADEL_FAKE_NVML=/path/host.json`` swaps NVML for ``fake_nvml.FakeNvml``
(loudly), for machines without a GPU.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from .config import CitadelConfig, ConfigIssue, ServiceConfig, format_path

#: Set to a fake host's JSON file to make citadeld use the FAKE NVML.
FAKE_NVML_ENV = "CITADEL_FAKE_NVML"

#: The ``pynvml`` module, or a ``fake_nvml.FakeNvml`` (same names and shapes).
NvmlApi = Any

_INIT_HINTS = {
    "NVMLError_LibraryNotFound": "no NVIDIA driver is installed here",
    "NVMLError_DriverNotLoaded": "is the nvidia kernel module loaded?",
    "NVMLError_NoPermission": "may citadeld's user open /dev/nvidia*?",
}


# --------------------------------------------------------------------------
# CPU lists and GPU index lists, as people write them
# --------------------------------------------------------------------------


def parse_cpulist(text: str) -> set[int]:
    """``"0-3,8"`` -> ``{0, 1, 2, 3, 8}`` (the kernel's cpulist format)."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def format_cpulist(cpus: Iterable[int]) -> str:
    """``{0, 1, 2, 3, 8}`` -> ``"0-3,8"``."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def _host_gpus(indices: Iterable[int]) -> str:
    """``this host has GPUs 0-7`` / ``this host has GPU 0``."""
    indices = sorted(indices)
    if len(indices) == 1:
        return f"this host has GPU {indices[0]}"
    return f"this host has GPUs {format_cpulist(indices).replace(',', ', ')}"


def _count(n: int, noun: str = "GPU") -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --------------------------------------------------------------------------
# Inventory
# --------------------------------------------------------------------------


@dataclass
class GpuProcess:
    """A process with a CUDA context on a GPU."""

    pid: int
    #: Bytes of GPU memory it holds; None when NVML cannot tell (MIG without privileges).
    used_memory: int | None


@dataclass
class MigDevice:
    """A MIG slice of a GPU; pinned by its ``MIG-...`` UUID."""

    uuid: str
    slot: int
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None


@dataclass
class GpuInfo:
    """One physical GPU as NVML reports it; None means NVML would not say."""

    index: int
    uuid: str
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None
    #: None: the GPU cannot do MIG (or NVML would not say).
    mig_enabled: bool | None = None
    mig_devices: list[MigDevice] = field(default_factory=list)
    numa_node: int | None = None
    #: CPUs close to the GPU: NVML's affinity mask, else its NUMA node's CPUs (sysfs).
    cpu_affinity: frozenset[int] | None = None
    #: Percent of the last sample period a kernel ran / memory was read or written.
    utilization: int | None = None
    memory_utilization: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: list[GpuProcess] | None = None
    #: XID errors seen since detection; None when NVML cannot deliver XID events here.
    xid_errors: int | None = None
    last_xid: int | None = None

    def to_json(
        self, owners: Mapping[int, str] | None = None, workers: Sequence[str] = ()
    ) -> dict[str, Any]:
        """This GPU for the control API; ``owners`` maps a pid to its worker's name."""
        owners = owners or {}
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "pci_bus_id": self.pci_bus_id,
            "memory": {"total": self.memory_total, "used": self.memory_used, "free": self.memory_free},
            "mig": {
                "enabled": self.mig_enabled,
                "devices": [
                    {"uuid": m.uuid, "slot": m.slot, "memory": {
                        "total": m.memory_total, "used": m.memory_used, "free": m.memory_free}}
                    for m in self.mig_devices
                ],
            },
            "numa_node": self.numa_node,
            "cpu_affinity": None if self.cpu_affinity is None else format_cpulist(self.cpu_affinity),
            "utilization_percent": self.utilization,
            "memory_utilization_percent": self.memory_utilization,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "power_limit_w": self.power_limit_w,
            "processes": None if self.processes is None else [
                {"pid": p.pid, "used_memory": p.used_memory, "worker": owners.get(p.pid)}
                for p in self.processes
            ],
            "xid_errors": self.xid_errors,
            "last_xid": self.last_xid,
            "workers": list(workers),
        }


def load_nvml(environ: Mapping[str, str] | None = None) -> tuple[NvmlApi | None, str | None]:
    """The NVML to use: the FAKE one if ``CITADEL_FAKE_NVML`` is set, else ``pynvml``.

    Returns ``(nvml, None)``, or ``(None, reason)`` when there is none to use.
    """
    environ = os.environ if environ is None else environ
    fake_path = environ.get(FAKE_NVML_ENV)
    if fake_path:
        from .fake_nvml import FakeNvml

        try:
            fake = FakeNvml.from_file(fake_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"{FAKE_NVML_ENV}={fake_path}: cannot read the fake host: {exc}"
        logger.warning(
            "{}={} is set: the GPUs citadeld reports and pins workers to are FAKE, "
            "described by that file; no real GPU is used", FAKE_NVML_ENV, fake_path)
        return fake, None
    try:
        import pynvml
    except ImportError as exc:
        return None, f"the nvidia-ml-py package (pynvml) is not installed: {exc}"
    return pynvml, None


@dataclass(frozen=True)
class GpuDetection:
    """What ``detect_gpus`` found: an inventory, or the reason there is none."""

    inventory: GpuInventory | None
    #: Why there is no inventory (None when there is one).
    reason: str | None = None

    def to_json(self, owners: Mapping[int, str] | None = None,
                assigned: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """The control API's ``gpus`` answer, with or without GPUs."""
        if self.inventory is not None:
            return self.inventory.to_json(owners, assigned)
        return {"available": False, "reason": self.reason, "fake": False, "gpus": []}


def detect_gpus(
    nvml: NvmlApi | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    sysfs: Path | None = None,
) -> GpuDetection:
    """Start NVML and read every GPU; never raises for a missing or broken NVML.

    ``nvml`` defaults to ``load_nvml(environ)``. ``sysfs`` (default ``/sys`` for
    real NVML, nothing for a fake) is where NUMA nodes are looked up when NVML
    does not tell them.
    """
    if nvml is None:
        nvml, reason = load_nvml(environ)
        if nvml is None:
            return GpuDetection(None, reason)
    fake = bool(getattr(nvml, "IS_FAKE", False))
    if sysfs is None and not fake:
        sysfs = Path("/sys")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - nothing NVML does at start may stop the daemon
        name = type(exc).__name__
        hint = _INIT_HINTS.get(name)
        text = str(exc) or name
        return GpuDetection(None, f"NVML could not start: {text}" + (f" ({hint})" if hint else ""))
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as exc:
        _shutdown(nvml)
        return GpuDetection(None, f"NVML could not count the GPUs: {exc}")
    if count == 0:
        _shutdown(nvml)
        return GpuDetection(None, "NVML found no GPU")
    inventory = GpuInventory(nvml, fake=fake, sysfs=sysfs)
    try:
        inventory._read_devices(count)
    except Exception as exc:  # noqa: BLE001 - a driver or binding bug must not stop the daemon
        logger.opt(exception=exc).error("reading the GPUs through NVML failed")
        inventory.close()
        return GpuDetection(None, f"NVML failed while reading the GPUs: {type(exc).__name__}: {exc}")
    if not inventory.gpus:
        inventory.close()
        lost = "; ".join(f"GPU {i}: {why}" for i, why in sorted(inventory.unusable.items()))
        return GpuDetection(None, f"NVML found {_count(count)} but could read none: {lost}")
    if fake:
        logger.warning("using {} FAKE GPUs from {}", len(inventory.gpus), getattr(nvml, "source", "?"))
    return GpuDetection(inventory)


def _shutdown(nvml: NvmlApi) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError:
        pass


class GpuInventory:
    """The host's GPUs as NVML reports them. NVML stays initialised until ``close()``.

    The static facts (index, UUID, name, NUMA node, CPU affinity, MIG devices)
    are read once; ``refresh()`` re-reads memory, utilisation, temperature,
    power, processes and pending XID events. NVML calls block (briefly, unless
    a GPU hangs): from the event loop, ``await asyncio.to_thread(inv.refresh)``.
    """

    def __init__(self, nvml: NvmlApi, *, fake: bool = False, sysfs: Path | None = None):
        self.nvml = nvml
        #: True when the GPUs come from ``fake_nvml`` (everything reported says so).
        self.fake = fake
        self.gpus: list[GpuInfo] = []
        #: GPU index -> why NVML could not read it (such GPUs are left out of ``gpus``).
        self.unusable: dict[int, str] = {}
        self.driver_version: str | None = None
        self._sysfs = sysfs
        self._handles: dict[str, Any] = {}  # GPU or MIG UUID -> NVML handle
        self._parents: dict[str, GpuInfo] = {}  # GPU or MIG UUID -> its physical GPU
        self._event_set: Any = None
        self._cpu_words = max(1, -(-(os.cpu_count() or 1) // 64))
        self._quiet: set[str] = set()  # functions whose refusal was already logged

    @classmethod
    def detect(cls, nvml: NvmlApi | None = None, *, environ: Mapping[str, str] | None = None,
               sysfs: Path | None = None) -> GpuInventory | None:
        """The inventory, or None when there is no usable GPU (``detect_gpus`` says why)."""
        return detect_gpus(nvml, environ=environ, sysfs=sysfs).inventory

    # -- reading ------------------------------------------------------------

    def _call(self, function: str, *args: Any) -> Any:
        """``nvml.function(*args)``, or None if NVML refuses or lacks the function."""
        fn = getattr(self.nvml, function, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except self.nvml.NVMLError as exc:
            if function not in self._quiet:
                self._quiet.add(function)
                logger.debug("NVML {} failed ({}); that value is reported as unknown", function, exc)
            return None

    def _read_devices(self, count: int) -> None:
        self.driver_version = _text(self._call("nvmlSystemGetDriverVersion"))
        self._event_set = self._call("nvmlEventSetCreate")
        for index in range(count):
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(self.nvml.nvmlDeviceGetUUID(handle))
            except self.nvml.NVMLError as exc:
                self.unusable[index] = str(exc)
                logger.warning("GPU {} is left out: NVML could not read it ({})", index, exc)
                continue
            assert uuid is not None
            gpu = GpuInfo(index=index, uuid=uuid)
            self._read_static(gpu, handle)
            self.gpus.append(gpu)
            self._handles[uuid] = handle
            self._parents[uuid] = gpu
        self.refresh()

    def _read_static(self, gpu: GpuInfo, handle: Any) -> None:
        gpu.name = _text(self._call("nvmlDeviceGetName", handle))
        pci = self._call("nvmlDeviceGetPciInfo", handle)
        gpu.pci_bus_id = _text(pci.busId) if pci is not None else None
        limit = self._call("nvmlDeviceGetEnforcedPowerLimit", handle)
        gpu.power_limit_w = limit / 1000 if limit is not None else None

        gpu.numa_node = self._call("nvmlDeviceGetNumaNodeId", handle)
        if gpu.numa_node is not None and gpu.numa_node < 0:
            gpu.numa_node = None
        if gpu.numa_node is None and gpu.pci_bus_id and self._sysfs:
            gpu.numa_node = _sysfs_numa_node(self._sysfs, gpu.pci_bus_id)
        mask = self._call("nvmlDeviceGetCpuAffinity", handle, self._cpu_words)
        cpus = {w * 64 + bit for w, word in enumerate(mask or []) for bit in range(64) if word >> bit & 1}
        if not cpus and gpu.numa_node is not None and self._sysfs:
            cpus = _sysfs_node_cpus(self._sysfs, gpu.numa_node)
        gpu.cpu_affinity = frozenset(cpus) if cpus else None

        mode = self._call("nvmlDeviceGetMigMode", handle)
        gpu.mig_enabled = None if mode is None else mode[0] == self.nvml.NVML_DEVICE_MIG_ENABLE
        if gpu.mig_enabled:
            for slot in range(self._call("nvmlDeviceGetMaxMigDeviceCount", handle) or 0):
                mig_handle = self._call("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
                mig_uuid = _text(self._call("nvmlDeviceGetUUID", mig_handle)) if mig_handle else None
                if mig_uuid:
                    gpu.mig_devices.append(MigDevice(uuid=mig_uuid, slot=slot))
                    self._handles[mig_uuid] = mig_handle
                    self._parents[mig_uuid] = gpu

        # XIDs have no pull API: an event set collects them, and refresh() drains it.
        xid = self.nvml.nvmlEventTypeXidCriticalError
        supported = self._call("nvmlDeviceGetSupportedEventTypes", handle)
        if self._event_set is not None and supported is not None and supported & xid:
            try:
                self.nvml.nvmlDeviceRegisterEvents(handle, xid, self._event_set)
                gpu.xid_errors = 0
            except self.nvml.NVMLError as exc:
                logger.debug("GPU {}: XID events cannot be watched ({})", gpu.index, exc)

    def refresh(self) -> None:
        """Re-read the dynamic values of every GPU, and count new XID errors."""
        for gpu in self.gpus:
            handle = self._handles[gpu.uuid]
            memory = self._call("nvmlDeviceGetMemoryInfo", handle)
            gpu.memory_total, gpu.memory_used, gpu.memory_free = _memory(memory)
            rates = self._call("nvmlDeviceGetUtilizationRates", handle)
            gpu.utilization = rates.gpu if rates is not None else None
            gpu.memory_utilization = rates.memory if rates is not None else None
            gpu.temperature_c = self._call("nvmlDeviceGetTemperature", handle,
                                           self.nvml.NVML_TEMPERATURE_GPU)
            power = self._call("nvmlDeviceGetPowerUsage", handle)
            gpu.power_w = power / 1000 if power is not None else None
            gpu.processes = self.processes_on(gpu.uuid)
            for mig in gpu.mig_devices:
                mig_memory = self._call("nvmlDeviceGetMemoryInfo", self._handles[mig.uuid])
                mig.memory_total, mig.memory_used, mig.memory_free = _memory(mig_memory)
        self._drain_xid_events()

    def _drain_xid_events(self) -> None:
        wait = getattr(self.nvml, "nvmlEventSetWait_v2", None)
        if self._event_set is None or wait is None:
            return
        new: dict[int, int] = {}  # GPU index -> XIDs in this drain
        for _ in range(1000):  # bounded: a storm of events must not stall a refresh
            try:
                # A timeout of 0 returns at once: an event if one is queued, else Timeout.
                event = wait(self._event_set, 0)
            except self.nvml.NVMLError:
                break
            uuid = _text(self._call("nvmlDeviceGetUUID", event.device))
            gpu = self._parents.get(uuid or "")
            if gpu is None or event.eventType != self.nvml.nvmlEventTypeXidCriticalError:
                continue
            gpu.xid_errors = (gpu.xid_errors or 0) + 1
            gpu.last_xid = int(event.eventData)
            new[gpu.index] = new.get(gpu.index, 0) + 1
        for gpu in self.gpus:
            if gpu.index in new:
                logger.error("GPU {} ({}) reported {} (the last: XID {})", gpu.index, gpu.uuid,
                             _count(new[gpu.index], "XID error"), gpu.last_xid)

    def processes_on(self, uuid: str) -> list[GpuProcess] | None:
        """The processes holding memory on a GPU or MIG device now (read live); None if unknown."""
        handle = self._handles.get(uuid)
        found = self._call("nvmlDeviceGetComputeRunningProcesses", handle) if handle else None
        if found is None:
            return None
        return [GpuProcess(pid=int(p.pid), used_memory=p.usedGpuMemory) for p in found]

    # -- lookups ------------------------------------------------------------

    def gpu(self, key: int | str) -> GpuInfo | None:
        """A GPU by NVML index, or the GPU that a GPU or MIG UUID belongs to."""
        if isinstance(key, int):
            return next((g for g in self.gpus if g.index == key), None)
        return self._parents.get(_uuid_key(key, self._parents))

    def close(self) -> None:
        """Free the XID event set and shut NVML down; the inventory is stale afterwards."""
        if self._event_set is not None:
            self._call("nvmlEventSetFree", self._event_set)
            self._event_set = None
        _shutdown(self.nvml)

    def to_json(self, owners: Mapping[int, str] | None = None,
                assigned: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """The control API's ``gpus`` answer.

        ``owners`` maps a pid to its worker's name (to label processes);
        ``assigned`` maps a GPU UUID to the workers pinned to it
        (``GpuAllocation.by_device()``).
        """
        assigned = assigned or {}
        return {
            "available": True,
            "fake": self.fake,
            "fake_host": getattr(self.nvml, "source", None) if self.fake else None,
            "driver_version": self.driver_version,
            "gpus": [
                gpu.to_json(owners, [w for u in [gpu.uuid, *(m.uuid for m in gpu.mig_devices)]
                                     for w in assigned.get(u, ())])
                for gpu in self.gpus
            ],
            "unusable": {str(i): why for i, why in sorted(self.unusable.items())},
        }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _memory(info: Any) -> tuple[int | None, int | None, int | None]:
    if info is None:
        return None, None, None
    return int(info.total), int(info.used), int(info.free)


def _uuid_key(uuid: str, known: Mapping[str, Any]) -> str:
    """The known spelling of ``uuid`` (UUIDs compare case-insensitively)."""
    if uuid in known:
        return uuid
    return next((k for k in known if k.lower() == uuid.lower()), uuid)


def _sysfs_numa_node(sysfs: Path, bus_id: str) -> int | None:
    """The NUMA node of a PCI device; NVML's bus id has an 8-digit domain, sysfs's has 4."""
    domain, _, rest = bus_id.lower().partition(":")
    try:
        text = (sysfs / "bus/pci/devices" / f"{int(domain, 16):04x}:{rest}" / "numa_node").read_text()
        node = int(text)
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _sysfs_node_cpus(sysfs: Path, node: int) -> set[int]:
    try:
        return parse_cpulist((sysfs / f"devices/system/node/node{node}/cpulist").read_text())
    except (OSError, ValueError):
        return set()


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


# --------------------------------------------------------------------------
# Placement: what a pinned worker is given
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlacement:
    """The env a worker adds, and the CPUs it may run on (None: any)."""

    env: dict[str, str]
    cpus: set[int] | None


def worker_placement(
    gpus: WorkerGpus,
    inventory: GpuInventory | None,
    *,
    allowed_cpus: Collection[int] | None = None,
) -> WorkerPlacement:
    """``CUDA_VISIBLE_DEVICES`` (UUIDs) and ``CUDA_DEVICE_ORDER``, and the worker's CPU set.

    The CPU set is the union of its GPUs' CPU affinity, within ``allowed_cpus``
    (default: the daemon's own, ``os.sched_getaffinity(0)``); None when a GPU's
    CPUs are unknown or none of them is allowed. An unpinned worker gets
    nothing: it sees whatever the daemon sees.
    """
    if not gpus:
        return WorkerPlacement({}, None)
    env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus.uuids), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if inventory is None:
        return WorkerPlacement(env, None)
    cpus: set[int] = set()
    for uuid in gpus.uuids:
        gpu = inventory.gpu(uuid)
        if gpu is None or gpu.cpu_affinity is None:
            return WorkerPlacement(env, None)
        cpus |= gpu.cpu_affinity
    allowed = set(os.sched_getaffinity(0) if allowed_cpus is None else allowed_cpus)
    cpus &= allowed
    if not cpus:
        logger.debug("the CPUs near GPUs {} are outside the daemon's CPUs; the worker is not pinned",
                     ",".join(map(str, gpus.indices)))
        return WorkerPlacement(env, None)
    return WorkerPlacement(env, cpus)


# --------------------------------------------------------------------------
# Release: before a restart
# --------------------------------------------------------------------------


async def wait_released(
    inventory: GpuInventory,
    uuids: Collection[str],
    pids: Collection[int] | None,
    timeout: float,
    poll: float = 0.5,
    *,
    other_pids: Collection[int] = (),
) -> bool:
    """Wait until no process of a dead worker holds memory on its GPUs; True if in time.

    ``pids`` are the dead worker's processes (its whole tree). If they are
    unknown (None), wait until no process at all holds memory there, except
    ``other_pids`` (other workers sharing these GPUs). Waits at most ``timeout``
    seconds, checking every ``poll``. Returns True at once if NVML cannot list
    the processes on these GPUs (it logs that it cannot tell).
    """
    if not uuids:
        return True
    loop = asyncio.get_running_loop()
    start = loop.time()
    labels = ", ".join(_device_label(inventory, u) for u in uuids)
    logged = False
    while True:
        holders = await asyncio.to_thread(_holders, inventory, uuids, pids, other_pids)
        elapsed = loop.time() - start
        if holders is None:
            logger.warning("cannot tell whether GPU memory on {} is released: NVML does not list "
                           "its processes", labels)
            return True
        if not holders:
            if logged:
                logger.info("GPU memory on {} released after {:.1f}s", labels, elapsed)
            return True
        described = ", ".join(
            f"pid {p.pid} ({_bytes(p.used_memory)} on {_device_label(inventory, u)})" for u, p in holders)
        if elapsed >= timeout:
            logger.warning("GPU memory on {} is still held after {:.1f}s, by {}; not waiting longer",
                           labels, elapsed, described)
            return False
        if not logged:
            logger.info("waiting up to {:.0f}s for GPU memory on {} to be released; held by {}",
                        timeout, labels, described)
            logged = True
        await asyncio.sleep(max(0.0, min(poll, timeout - elapsed)))


def _holders(
    inventory: GpuInventory, uuids: Collection[str], pids: Collection[int] | None,
    other_pids: Collection[int],
) -> list[tuple[str, GpuProcess]] | None:
    found: list[tuple[str, GpuProcess]] = []
    known = False
    for uuid in uuids:
        processes = inventory.processes_on(uuid)
        if processes is None:
            continue
        known = True
        found.extend((uuid, p) for p in processes
                     if (p.pid in pids if pids is not None else p.pid not in other_pids))
    return found if known else None


def _device_label(inventory: GpuInventory, uuid: str) -> str:
    gpu = inventory.gpu(uuid)
    if gpu is None:
        return uuid
    return f"GPU {gpu.index}" if gpu.uuid.lower() == uuid.lower() else f"{uuid} (GPU {gpu.index})"


def _bytes(n: int | None) -> str:
    if n is None:
        return "memory unknown"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
