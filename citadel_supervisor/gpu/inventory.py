"""The GPU inventory: what NVML (or, for tests, the FAKE NVML) sees.

NVML reads the physical devices and never initialises CUDA, so the daemon
stays light; nothing here imports torch. Every per-device read that NVML
refuses (NotSupported, NoPermission, GPU lost) becomes None for that field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from .cpus import format_cpulist, parse_cpulist

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
# GPU index lists, as people write them
# --------------------------------------------------------------------------


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

    def xid_errors(self, uuids: Sequence[str]) -> int | None:
        """XID errors seen so far on the GPUs of ``uuids``, refreshed first (blocks: NVML);
        None when NVML delivers no XID events for them."""
        self.refresh()
        counts = [g.xid_errors for g in self.gpus if g.uuid in uuids]
        if not counts or any(c is None for c in counts):
            return None
        return sum(c for c in counts if c is not None)

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


