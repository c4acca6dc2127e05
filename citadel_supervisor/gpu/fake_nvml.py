"""A FAKE NVML, for machines without an NVIDIA GPU: tests, demos, CI.

``FakeNvml`` has the same function names, arguments, return shapes and
``NVMLError_*`` exception names as the parts of ``pynvml`` (the
``nvidia-ml-py`` package) that ``gpu/inventory.py`` uses, so ``GpuInventory`` runs the
same code on a fake host as on a real one. The host is described in JSON
(see ``tests/fixtures/fake_host_8gpu.json``)::

    {"driver_version": "550.54.15",
     "numa_nodes": {"0": "0-31", "1": "32-63"},
     "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-...",
               "memory_total_mib": 81559, "memory_used_mib": 0,
               "numa_node": 0,            # cpu_affinity defaults to the node's CPUs
               "processes": [{"pid": 4242, "used_mib": 1024}],
               "unsupported": ["nvmlDeviceGetPowerUsage"],   # raise NotSupported
               "mig": {"enabled": true, "devices": [{"uuid": "MIG-...", "memory_total_mib": 9984}]}},
              ...],
     "init_error": "DriverNotLoaded"}     # optional: nvmlInit raises NVMLError_DriverNotLoaded

Every GPU key is optional (a UUID, bus id and 80 GB are made up); a GPU with no
``mig`` key cannot do MIG, one with no ``numa_node`` has none NVML tells.

Tests change the host through the ``fake_*`` methods (add or remove a
process, set memory used, inject an XID, make a call unsupported). citadeld
uses it only when ``CITADEL_FAKE_NVML=/path/host.json`` is set, and then says
loudly that its GPUs are fake; a host built from a file re-reads the file when
it changes, so a test can change a running daemon's fake GPUs (the dynamic
values only: memory, processes, utilisation, temperature, power; the devices
themselves stay as first read).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .cpus import parse_cpulist

MiB = 1024 * 1024
GiB = 1024 * MiB

# Constants with pynvml's names and values.
NVML_TEMPERATURE_GPU = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
nvmlEventTypeXidCriticalError = 0x8
nvmlMemory_v2 = 0x02000028


# --------------------------------------------------------------------------
# Errors: pynvml's class names, codes and messages
# --------------------------------------------------------------------------


class NVMLError(Exception):
    """Base of the fake's NVML errors, as ``pynvml.NVMLError``.

    As there, ``NVMLError(code)`` is an instance of the code's subclass
    (``NVMLError(3)`` is an ``NVMLError_NotSupported``), and ``str()`` is the
    code's message.
    """

    value = 999
    message = "Unknown Error"
    #: code -> its subclass, filled as the subclasses are made (pynvml's ``_valClassMapping``).
    by_value: ClassVar[dict[int, type[NVMLError]]] = {}

    # An instance of a subclass, not of cls: as pynvml's NVMLError does.
    def __new__(cls, value: int | None = None) -> NVMLError:  # noqa: PYI034
        target = cls
        if cls is NVMLError and value is not None:
            target = NVMLError.by_value.get(value, NVMLError)
        return Exception.__new__(target)

    def __init__(self, value: int | None = None):
        super().__init__()
        if value is not None:
            self.value = value

    def __str__(self) -> str:
        known = NVMLError.by_value.get(self.value)
        return known.message if known is not None else f"NVML Error with code {self.value}"


def _subclass(name: str, value: int, message: str) -> type[NVMLError]:
    cls = type(f"NVMLError_{name}", (NVMLError,), {"value": value, "message": message,
                                                   "__module__": __name__})
    NVMLError.by_value[value] = cls
    return cls


#: pynvml's error classes: ``NVML_ERROR_*`` codes, and the text ``str()`` gives (pynvml's
#: table; for codes it has no text for, what it says when it cannot ask the driver).
_ERROR_CODES: dict[str, tuple[int, str]] = {
    "Uninitialized": (1, "Uninitialized"),
    "InvalidArgument": (2, "Invalid Argument"),
    "NotSupported": (3, "Not Supported"),
    "NoPermission": (4, "Insufficient Permissions"),
    "AlreadyInitialized": (5, "Already Initialized"),
    "NotFound": (6, "Not Found"),
    "InsufficientSize": (7, "Insufficient Size"),
    "InsufficientPower": (8, "Insufficient External Power"),
    "DriverNotLoaded": (9, "Driver Not Loaded"),
    "Timeout": (10, "Timeout"),
    "IrqIssue": (11, "Interrupt Request Issue"),
    "LibraryNotFound": (12, "NVML Shared Library Not Found"),
    "FunctionNotFound": (13, "Function Not Found"),
    "CorruptedInforom": (14, "Corrupted infoROM"),
    "GpuIsLost": (15, "GPU is lost"),
    "ResetRequired": (16, "GPU requires restart"),
    "OperatingSystem": (17, "The operating system has blocked the request."),
    "LibRmVersionMismatch": (18, "RM has detected an NVML/RM version mismatch."),
    "InUse": (19, "NVML Error with code 19"),
    "Memory": (20, "Insufficient Memory"),
    "NoData": (21, "NVML Error with code 21"),
    "VgpuEccNotSupported": (22, "NVML Error with code 22"),
    "InsufficientResources": (23, "NVML Error with code 23"),
    "FreqNotSupported": (24, "NVML Error with code 24"),
    "ArgumentVersionMismatch": (25, "NVML Error with code 25"),
    "Deprecated": (26, "NVML Error with code 26"),
    "NotReady": (27, "NVML Error with code 27"),
    "GpuNotFound": (28, "NVML Error with code 28"),
    "InvalidState": (29, "NVML Error with code 29"),
    "ResetTypeNotSupported": (30, "NVML Error with code 30"),
    "Unknown": (999, "Unknown Error"),
}

_ERRORS: dict[str, type[NVMLError]] = {
    name: _subclass(name, value, message) for name, (value, message) in _ERROR_CODES.items()
}

# The ones the fake raises, by name (the rest are in _ERRORS, and on FakeNvml).
NVMLError_Uninitialized = _ERRORS["Uninitialized"]
NVMLError_InvalidArgument = _ERRORS["InvalidArgument"]
NVMLError_NotSupported = _ERRORS["NotSupported"]
NVMLError_NoPermission = _ERRORS["NoPermission"]
NVMLError_NotFound = _ERRORS["NotFound"]
NVMLError_DriverNotLoaded = _ERRORS["DriverNotLoaded"]
NVMLError_Timeout = _ERRORS["Timeout"]
NVMLError_LibraryNotFound = _ERRORS["LibraryNotFound"]
NVMLError_GpuIsLost = _ERRORS["GpuIsLost"]
NVMLError_ArgumentVersionMismatch = _ERRORS["ArgumentVersionMismatch"]
NVMLError_Unknown = _ERRORS["Unknown"]


# --------------------------------------------------------------------------
# Return values: the attribute names pynvml's structs have
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeMemoryInfo:
    """As ``c_nvmlMemory_t``: bytes."""

    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeMemoryInfoV2:
    """As ``c_nvmlMemory_v2_t`` (``nvmlDeviceGetMemoryInfo(handle, nvmlMemory_v2)``): bytes;
    ``used`` leaves out ``reserved``, the driver's own (0 on the fake)."""

    version: int
    total: int
    reserved: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeUtilization:
    """As ``c_nvmlUtilization_t``: percent."""

    gpu: int
    memory: int


@dataclass(frozen=True)
class FakePciInfo:
    """As ``nvmlPciInfo_t``: its text fields are str, as pynvml decodes them."""

    #: ``00000000:18:00.0`` (an 8-digit domain); ``busIdLegacy`` has 4: ``0000:18:00.0``.
    busId: str
    busIdLegacy: str
    domain: int
    bus: int
    device: int
    pciDeviceId: int = 0
    pciSubSystemId: int = 0

    @classmethod
    def of(cls, bus_id: str) -> FakePciInfo:
        """The struct for a bus id written ``DOMAIN:BUS:DEVICE.FUNCTION`` (hex); a host
        file's id in another form is kept as it is, with zero numbers."""
        try:
            domain, bus, rest = bus_id.split(":")
            d, b, v = int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16)
        except ValueError:
            return cls(busId=bus_id, busIdLegacy=bus_id, domain=0, bus=0, device=0)
        return cls(busId=bus_id, busIdLegacy=f"{d:04X}:{b:02X}:{v:02X}.0", domain=d, bus=b, device=v)


@dataclass(frozen=True)
class FakeProcessInfo:
    """As pynvml's process objects; ``usedGpuMemory`` is None when NVML cannot tell."""

    pid: int
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class FakeEventData:
    """As ``c_nvmlEventData_t``: ``eventData`` is the XID for XID events."""

    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


# --------------------------------------------------------------------------
# The fake devices (they are also the handles NVML calls take)
# --------------------------------------------------------------------------


@dataclass(eq=False)
class FakeMigDevice:
    """One MIG device (a slice of a GPU)."""

    uuid: str
    memory_total: int
    memory_reserved: int = 0
    processes: dict[int, int | None] = field(default_factory=dict)

    def memory_used(self) -> int:
        return self.memory_reserved + sum(m or 0 for m in self.processes.values())


@dataclass(eq=False)
class FakeGpu:
    """One fake GPU. ``memory_reserved`` is memory used by no listed process."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    memory_total: int
    memory_reserved: int = 0
    numa_node: int | None = None
    cpu_affinity: set[int] = field(default_factory=set)
    utilization: int = 0
    memory_utilization: int = 0
    temperature: int = 30
    power_mw: int = 70_000
    power_limit_mw: int = 700_000
    processes: dict[int, int | None] = field(default_factory=dict)
    #: None: not MIG capable (MIG calls raise NotSupported).
    mig_enabled: bool | None = None
    mig_devices: list[FakeMigDevice] = field(default_factory=list)
    #: NVML function names that raise NotSupported for this GPU.
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False

    def memory_used(self) -> int:
        own = self.memory_reserved + sum(m or 0 for m in self.processes.values())
        return own + sum(m.memory_used() for m in self.mig_devices)


def _processes(entries: Iterable[Mapping[str, Any]]) -> dict[int, int | None]:
    out: dict[int, int | None] = {}
    for entry in entries:
        used = entry.get("used_mib")
        out[int(entry["pid"])] = None if used is None else int(used * MiB)
    return out


def _gpu_from_json(index: int, desc: Mapping[str, Any], numa_cpus: Mapping[int, set[int]]) -> FakeGpu:
    node = desc.get("numa_node")
    mig = desc.get("mig")
    # Unless the GPU says otherwise, its CPUs are those of its NUMA node, as on real hosts.
    affinity = desc.get("cpu_affinity")
    cpus = parse_cpulist(affinity) if affinity else set(numa_cpus.get(node, set()) if node is not None else ())
    gpu = FakeGpu(
        index=index,
        uuid=desc.get("uuid", f"GPU-fake{index:04d}-0000-0000-0000-{index:012d}"),
        name=desc.get("name", "NVIDIA FAKE GPU"),
        pci_bus_id=desc.get("pci_bus_id", f"00000000:{0x10 + index:02X}:00.0"),
        memory_total=int(desc.get("memory_total_mib", 81559) * MiB),
        numa_node=node,
        cpu_affinity=cpus,
        mig_enabled=None if mig is None else bool(mig.get("enabled", False)),
        mig_devices=[
            FakeMigDevice(uuid=m["uuid"], memory_total=int(m.get("memory_total_mib", 9984) * MiB),
                          processes=_processes(m.get("processes", [])))
            for m in (mig or {}).get("devices", [])
        ],
        unsupported=set(desc.get("unsupported", [])),
    )
    _apply_dynamic(gpu, desc)
    return gpu


def _apply_dynamic(gpu: FakeGpu, desc: Mapping[str, Any]) -> None:
    """Set the values a host file may change while a daemon reads it."""
    gpu.processes = _processes(desc.get("processes", []))
    used = int(desc.get("memory_used_mib", 0) * MiB)
    gpu.memory_reserved = max(0, used - sum(m or 0 for m in gpu.processes.values()))
    gpu.utilization = int(desc.get("utilization", 0))
    gpu.memory_utilization = int(desc.get("memory_utilization", 0))
    gpu.temperature = int(desc.get("temperature", 30))
    gpu.power_mw = int(desc.get("power_w", 70) * 1000)
    gpu.power_limit_mw = int(desc.get("power_limit_w", 700) * 1000)


def _stamp(path: Path) -> tuple[int, int, int]:
    """What tells that a host file changed. Not its mtime alone: the kernel's clock for it
    ticks every few milliseconds, and two writes within a tick (a test's, or a driver's
    stand-in freeing two processes) would look like one; a file replaced has a new inode."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


# --------------------------------------------------------------------------
# The fake NVML
# --------------------------------------------------------------------------


class FakeNvml:
    """A fake ``pynvml``: pass it wherever ``gpu/inventory.py`` takes ``nvml``.

    Build one with ``FakeNvml(host_dict)`` or ``FakeNvml.from_file(path)``.
    """

    #: ``gpu/inventory.py`` checks this to label everything it reports as fake.
    IS_FAKE = True

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_ArgumentVersionMismatch = NVMLError_ArgumentVersionMismatch
    NVMLError_Unknown = NVMLError_Unknown
    # (every other NVMLError_* of pynvml is set on the class below it)
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError
    nvmlMemory_v2 = nvmlMemory_v2

    def __init__(self, host: Mapping[str, Any], source: str = "<dict>"):
        self.source = source
        self.driver_version = str(host.get("driver_version", "550.54.15"))
        init_error = host.get("init_error")
        if init_error is not None and init_error not in _ERRORS:
            raise ValueError(f"init_error: {init_error!r} is not one of {', '.join(_ERRORS)}")
        #: The error nvmlInit raises, to fake a host whose driver is broken.
        self.init_error: type[NVMLError] | None = _ERRORS[init_error] if init_error else None
        numa_cpus = {int(k): parse_cpulist(v) for k, v in host.get("numa_nodes", {}).items()}
        self.gpus = [_gpu_from_json(i, d, numa_cpus) for i, d in enumerate(host.get("gpus", []))]
        self._init_count = 0
        self._event_sets: list[list[FakeEventData]] = []
        self._registered: dict[int, set[int]] = {}  # id(event set) -> GPU indices
        self._path: Path | None = None
        self._stamp: tuple[int, int, int] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> FakeNvml:
        """A fake host read from a JSON file, re-read when the file changes."""
        path = Path(path)
        stamp = _stamp(path)
        fake = cls(json.loads(path.read_text()), source=str(path))
        fake._path = path
        fake._stamp = stamp
        return fake

    # -- test controls ------------------------------------------------------

    def fake_gpu(self, gpu: int | str) -> FakeGpu:
        """A fake GPU by index or UUID."""
        for candidate in self.gpus:
            if candidate.index == gpu or candidate.uuid == gpu:
                return candidate
        raise KeyError(f"the fake host has no GPU {gpu!r}")

    def fake_add_process(self, gpu: int | str, pid: int, used_bytes: int | None) -> None:
        """Make ``pid`` hold ``used_bytes`` of GPU memory on ``gpu`` (None: NVML cannot tell)."""
        self.fake_gpu(gpu).processes[pid] = used_bytes

    def fake_remove_process(self, gpu: int | str, pid: int) -> None:
        """``pid`` no longer holds memory on ``gpu``."""
        self.fake_gpu(gpu).processes.pop(pid, None)

    def fake_set_memory_used(self, gpu: int | str, used_bytes: int) -> None:
        """Set the GPU's used memory (processes included; free follows)."""
        device = self.fake_gpu(gpu)
        held = device.memory_used() - device.memory_reserved
        device.memory_reserved = max(0, used_bytes - held)

    def fake_set_unsupported(self, gpu: int | str, *functions: str) -> None:
        """Make these NVML functions raise NotSupported for ``gpu``."""
        self.fake_gpu(gpu).unsupported.update(functions)

    def fake_lose_gpu(self, gpu: int | str) -> None:
        """The GPU falls off the bus: every call on it raises GpuIsLost."""
        self.fake_gpu(gpu).lost = True

    def fake_inject_xid(self, gpu: int | str, xid: int) -> None:
        """An XID error on ``gpu``, delivered to event sets registered for it."""
        device = self.fake_gpu(gpu)
        for event_set in self._event_sets:
            if device.index in self._registered.get(id(event_set), set()):
                event_set.append(FakeEventData(device, nvmlEventTypeXidCriticalError, xid))

    def _reload_if_changed(self) -> None:
        if self._path is None:
            return
        try:
            stamp = _stamp(self._path)
            if stamp == self._stamp:
                return
            host = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return  # a half-written file: keep the last good values
        self._stamp = stamp
        for gpu, desc in zip(self.gpus, host.get("gpus", [])):
            _apply_dynamic(gpu, desc)

    def _check_init(self) -> None:
        if self._init_count <= 0:
            raise NVMLError_Uninitialized()
        self._reload_if_changed()

    def _device(self, handle: Any, function: str) -> Any:
        self._check_init()
        gpu = handle if isinstance(handle, FakeGpu) else self._parent_of(handle)
        if gpu is None:
            raise NVMLError_InvalidArgument()
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        if function in gpu.unsupported:
            raise NVMLError_NotSupported()
        return handle

    def _parent_of(self, handle: Any) -> FakeGpu | None:
        for gpu in self.gpus:
            if any(m is handle for m in gpu.mig_devices):
                return gpu
        return None

    # -- pynvml's functions -------------------------------------------------

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error()
        self._init_count += 1

    def nvmlShutdown(self) -> None:
        self._check_init()
        self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return self._device(self.gpus[index], "nvmlDeviceGetHandleByIndex")

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._device(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return self._whole(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> FakePciInfo:
        return FakePciInfo.of(self._whole(handle, "nvmlDeviceGetPciInfo").pci_bus_id)

    def nvmlDeviceGetMemoryInfo(
        self, handle: Any, version: int | None = None
    ) -> FakeMemoryInfo | FakeMemoryInfoV2:
        device = self._device(handle, "nvmlDeviceGetMemoryInfo")
        used = min(device.memory_used(), device.memory_total)
        free = device.memory_total - used
        if not version:  # as pynvml: no version, the v1 struct
            return FakeMemoryInfo(total=device.memory_total, free=free, used=used)
        if version != nvmlMemory_v2:
            raise NVMLError_ArgumentVersionMismatch()
        return FakeMemoryInfoV2(version=version, total=device.memory_total, reserved=0, free=free,
                                used=used)

    def nvmlDeviceGetMigMode(self, device: FakeGpu) -> list[int]:
        gpu = self._whole(device, "nvmlDeviceGetMigMode")
        if gpu.mig_enabled is None:
            raise NVMLError_NotSupported()
        mode = NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: FakeGpu) -> int:
        gpu = self._whole(device, "nvmlDeviceGetMaxMigDeviceCount")
        if gpu.mig_enabled is None:
            raise NVMLError_NotSupported()
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: FakeGpu, index: int) -> FakeMigDevice:
        gpu = self._whole(device, "nvmlDeviceGetMigDeviceHandleByIndex")
        if not gpu.mig_enabled:
            raise NVMLError_InvalidArgument()
        if not 0 <= index < len(gpu.mig_devices):
            raise NVMLError_NotFound()  # an empty slot, as NVML says
        return gpu.mig_devices[index]

    def nvmlDeviceGetNumaNodeId(self, handle: FakeGpu) -> int:
        gpu = self._whole(handle, "nvmlDeviceGetNumaNodeId")
        if gpu.numa_node is None:
            raise NVMLError_NotSupported()
        return gpu.numa_node

    def nvmlDeviceGetCpuAffinity(self, handle: FakeGpu, cpuSetSize: int) -> list[int]:
        gpu = self._whole(handle, "nvmlDeviceGetCpuAffinity")
        words = [0] * cpuSetSize
        for cpu in gpu.cpu_affinity:
            if cpu // 64 < cpuSetSize:
                words[cpu // 64] |= 1 << (cpu % 64)
        return words

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> FakeUtilization:
        gpu = self._whole(handle, "nvmlDeviceGetUtilizationRates")
        return FakeUtilization(gpu=gpu.utilization, memory=gpu.memory_utilization)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        gpu = self._whole(handle, "nvmlDeviceGetTemperature")
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        return self._whole(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeGpu) -> int:
        return self._whole(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[FakeProcessInfo]:
        device = self._device(handle, "nvmlDeviceGetComputeRunningProcesses")
        held = dict(device.processes)
        if isinstance(device, FakeGpu):  # a whole GPU lists its MIG devices' processes too
            for mig in device.mig_devices:
                held.update(mig.processes)
        return [FakeProcessInfo(pid, used) for pid, used in held.items()]

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeGpu) -> int:
        self._whole(handle, "nvmlDeviceGetSupportedEventTypes")
        return nvmlEventTypeXidCriticalError

    def nvmlEventSetCreate(self) -> list[FakeEventData]:
        self._check_init()
        event_set: list[FakeEventData] = []
        self._event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(
        self, handle: FakeGpu, eventTypes: int, eventSet: list[FakeEventData]
    ) -> None:
        gpu = self._whole(handle, "nvmlDeviceRegisterEvents")
        if eventTypes & ~nvmlEventTypeXidCriticalError:
            raise NVMLError_NotSupported()
        self._registered.setdefault(id(eventSet), set()).add(gpu.index)

    def nvmlEventSetWait_v2(self, eventSet: list[FakeEventData], timeoutms: int) -> FakeEventData:
        # The fake never sleeps: an event is either queued or it is a timeout.
        self._check_init()
        if not eventSet:
            raise NVMLError_Timeout()
        return eventSet.pop(0)

    def nvmlEventSetFree(self, eventSet: list[FakeEventData]) -> None:
        self._check_init()
        self._registered.pop(id(eventSet), None)
        self._event_sets = [s for s in self._event_sets if s is not eventSet]

    def _whole(self, handle: Any, function: str) -> FakeGpu:
        """A call that takes a whole GPU's handle (NVML rejects MIG handles there)."""
        device = self._device(handle, function)
        if not isinstance(device, FakeGpu):
            raise NVMLError_NotSupported()
        return device


for _name, _error in _ERRORS.items():
    setattr(FakeNvml, f"NVMLError_{_name}", _error)
