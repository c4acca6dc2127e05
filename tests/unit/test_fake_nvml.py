"""The FAKE NVML against pynvml's own declarations (no GPU needed).

pynvml (nvidia-ml-py) declares what its calls return: ctypes structs whose
``_fields_`` name every attribute, with text fields decoded to str. The fake
must return the same attributes with the same Python types, take the same
parameter names, and raise the same error classes, so that code written
against the fake runs on a real GPU. ``bench/gpu_check.py`` records the same
shapes on a real GPU.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import pynvml
import pytest

from citadel_supervisor import gpu as gpu_module
from citadel_supervisor.gpu.fake_nvml import FakeNvml

HOST_8GPU = Path(__file__).parents[1] / "fixtures" / "fake_host_8gpu.json"


@pytest.fixture
def fake() -> FakeNvml:
    nvml = FakeNvml(json.loads(HOST_8GPU.read_text()), source=str(HOST_8GPU))
    nvml.nvmlInit()
    return nvml


def _kind(ctype: Any) -> type:
    """The Python type pynvml gives for a struct field of this ctypes type."""
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array) and ctype._type_ is ctypes.c_char:
        return str  # _PrintableStructure decodes char arrays
    return int


def _assert_like(value: Any, struct: Any) -> None:
    """``value`` has every field of pynvml's ``struct``, each of the type pynvml gives."""
    for name, ctype in struct._fields_:
        assert hasattr(value, name), f"{type(value).__name__} lacks {struct.__name__}.{name}"
        field = getattr(value, name)
        if name == "device":  # a handle
            continue
        if name == "usedGpuMemory" and field is None:  # pynvml's "not available"
            continue
        assert isinstance(field, _kind(ctype)), \
            f"{type(value).__name__}.{name} is {type(field).__name__}; pynvml gives {_kind(ctype).__name__}"


def test_structs_have_pynvmls_fields_and_types(fake: FakeNvml) -> None:
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    fake.fake_add_process(0, pid=4242, used_bytes=2**30)
    _assert_like(fake.nvmlDeviceGetPciInfo(handle), pynvml.nvmlPciInfo_t)
    _assert_like(fake.nvmlDeviceGetMemoryInfo(handle), pynvml.c_nvmlMemory_t)
    _assert_like(fake.nvmlDeviceGetMemoryInfo(handle, pynvml.nvmlMemory_v2), pynvml.c_nvmlMemory_v2_t)
    _assert_like(fake.nvmlDeviceGetUtilizationRates(handle), pynvml.c_nvmlUtilization_t)
    (process,) = fake.nvmlDeviceGetComputeRunningProcesses(handle)
    _assert_like(process, pynvml.c_nvmlProcessInfo_v3_t)
    events = fake.nvmlEventSetCreate()
    fake.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, events)
    fake.fake_inject_xid(0, 79)
    _assert_like(fake.nvmlEventSetWait_v2(events, 0), pynvml.c_nvmlEventData_t)


def test_pci_info_is_text_as_pynvml_decodes_it(fake: FakeNvml) -> None:
    pci = fake.nvmlDeviceGetPciInfo(fake.nvmlDeviceGetHandleByIndex(0))
    assert pci.busId == "00000000:18:00.0" and pci.busIdLegacy == "0000:18:00.0"
    assert (pci.domain, pci.bus, pci.device) == (0, 0x18, 0)


def test_memory_info_v2_and_an_unknown_version(fake: FakeNvml) -> None:
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    v1 = fake.nvmlDeviceGetMemoryInfo(handle)
    v2 = fake.nvmlDeviceGetMemoryInfo(handle, version=FakeNvml.nvmlMemory_v2)
    assert FakeNvml.nvmlMemory_v2 == pynvml.nvmlMemory_v2
    assert v2.version == pynvml.nvmlMemory_v2 and v2.reserved == 0
    assert (v2.total, v2.free, v2.used) == (v1.total, v1.free, v1.used)
    with pytest.raises(FakeNvml.NVMLError_ArgumentVersionMismatch):
        fake.nvmlDeviceGetMemoryInfo(handle, version=7)


def test_every_pynvml_error_class_is_in_the_fake() -> None:
    real_names = sorted(n for n in dir(pynvml) if n.startswith("NVMLError_"))
    assert "NVMLError_FunctionNotFound" in real_names and len(real_names) >= 30
    for name in real_names:
        real, fake = getattr(pynvml, name), getattr(FakeNvml, name, None)
        assert fake is not None, f"the fake has no {name}"
        assert issubclass(fake, FakeNvml.NVMLError) and fake.__name__ == name
        assert fake().value == real().value, name
        # pynvml's text for the codes it knows; for the others, what it says without a driver.
        known = pynvml.NVMLError._errcode_to_string.get(real().value)
        assert str(fake()) == (known or f"NVML Error with code {real().value}"), name


def test_nvmlerror_of_a_code_is_that_codes_class() -> None:
    for code in (1, 3, 13, 15, 999):
        real, fake = pynvml.NVMLError(code), FakeNvml.NVMLError(code)
        assert type(fake).__name__ == type(real).__name__ and fake.value == real.value == code
        assert str(fake) == str(real)
    assert isinstance(FakeNvml.NVMLError(3), FakeNvml.NVMLError_NotSupported)
    unknown = FakeNvml.NVMLError(4711)
    assert type(unknown) is FakeNvml.NVMLError and str(unknown) == "NVML Error with code 4711"


def test_the_functions_gpu_code_calls_take_pynvmls_parameter_names() -> None:
    source = "".join(p.read_text() for p in Path(gpu_module.__file__).parent.glob("*.py")
                     if p.name != "fake_nvml.py")
    used = sorted(set(re.findall(r"\b(nvml[A-Z]\w+)\b", source)))
    functions = [n for n in used if inspect.isfunction(getattr(pynvml, n, None))]
    assert "nvmlDeviceGetMigMode" in functions and len(functions) >= 20
    for name in functions:
        real = list(inspect.signature(getattr(pynvml, name)).parameters)
        fake = [p for p in inspect.signature(getattr(FakeNvml, name)).parameters if p != "self"]
        assert fake == real, f"{name}: the fake takes {fake}, pynvml {real}"


def test_a_host_file_replaced_within_one_clock_tick_is_reread(tmp_path: Path) -> None:
    """Two writes within one tick of the kernel's coarse mtime clock: the second is seen too
    (a file replaced has a new inode), as ``bench/gpu_check.py`` and its rehearsal rely on."""
    host = json.loads(HOST_8GPU.read_text())
    path = tmp_path / "host.json"

    def replace(processes: list[dict[str, int]], mtime_ns: int) -> None:
        host["gpus"][0]["processes"] = processes
        tmp = tmp_path / "host.tmp"
        tmp.write_text(json.dumps(host))
        os.utime(tmp, ns=(mtime_ns, mtime_ns))  # the same mtime for every write
        os.replace(tmp, path)

    replace([{"pid": 41, "used_mib": 1024}, {"pid": 42, "used_mib": 1024}], 10**18)
    fake = FakeNvml.from_file(path)
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    assert [p.pid for p in fake.nvmlDeviceGetComputeRunningProcesses(handle)] == [41, 42]
    replace([{"pid": 42, "used_mib": 1024}], 10**18)
    assert [p.pid for p in fake.nvmlDeviceGetComputeRunningProcesses(handle)] == [42]
    replace([], 10**18)
    assert fake.nvmlDeviceGetComputeRunningProcesses(handle) == []
    assert fake.nvmlDeviceGetMemoryInfo(handle).used == 0
