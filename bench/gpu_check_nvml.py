"""NVML call shapes, for ``gpu_check.py``: what each call Citadel relies on gives back.

``probe(nvml)`` makes every NVML call that Citadel's GPU code makes, with the
arguments it passes, on the NVML in use (pynvml on a GPU, the FAKE one
without), and describes each answer: the type of a scalar, the fields of a
struct and their types, or the error class raised. ``declared()`` describes
the same calls from pynvml's own ctypes declarations, without a GPU.
``differences()`` lists where two descriptions disagree, so a fake that
answers unlike the real NVML shows up in the figures.

A description is JSON: ``{"type": "int"}``, ``{"type": "struct", "fields":
{"busId": "str", ...}}``, ``{"type": "sequence", "items": ...}``,
``{"type": "handle"}``, or ``{"raises": "NVMLError_NotSupported", "message":
...}``; ``value`` holds what was answered, for the record.
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

Shape = dict[str, Any]

#: Calls answered with a handle (an opaque pointer; its type differs between pynvml and the fake).
HANDLE_CALLS = ("nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMigDeviceHandleByIndex", "nvmlEventSetCreate")

#: What pynvml declares each call returns: a Python type name, or the name of its ctypes struct.
DECLARED = {
    "nvmlInit()": "None",
    "nvmlSystemGetDriverVersion()": "str",
    "nvmlDeviceGetCount()": "int",
    "nvmlDeviceGetUUID(h)": "str",
    "nvmlDeviceGetName(h)": "str",
    "nvmlDeviceGetPciInfo(h)": "nvmlPciInfo_t",
    "nvmlDeviceGetEnforcedPowerLimit(h)": "int",
    "nvmlDeviceGetNumaNodeId(h)": "int",
    "nvmlDeviceGetCpuAffinity(h, words)": "sequence[int]",
    "nvmlDeviceGetMigMode(h)": "sequence[int]",
    "nvmlDeviceGetMaxMigDeviceCount(h)": "int",
    "nvmlDeviceGetMemoryInfo(h)": "c_nvmlMemory_t",
    "nvmlDeviceGetMemoryInfo(h, nvmlMemory_v2)": "c_nvmlMemory_v2_t",
    "nvmlDeviceGetUtilizationRates(h)": "c_nvmlUtilization_t",
    "nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)": "int",
    "nvmlDeviceGetPowerUsage(h)": "int",
    "nvmlDeviceGetComputeRunningProcesses(h)": "sequence[c_nvmlProcessInfo_v3_t]",
    "nvmlDeviceGetSupportedEventTypes(h)": "int",
    "nvmlDeviceRegisterEvents(h, XidCriticalError, set)": "None",
    "nvmlEventSetWait_v2(set, 0)": "c_nvmlEventData_t",
    "nvmlEventSetFree(set)": "None",
    "nvmlShutdown()": "None",
}


# --------------------------------------------------------------------------
# Describing answers
# --------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """The Python type of a scalar, as a description names it."""
    if value is None:
        return "None"
    for name, cls in (("bool", bool), ("int", int), ("float", float), ("str", str), ("bytes", bytes)):
        if isinstance(value, cls):
            return name
    return "object"


def _field_names(value: Any) -> list[str] | None:
    """The fields of a struct-like answer, or None when it is no struct."""
    if isinstance(value, ctypes.Structure):
        return [name for name, *_ in value._fields_]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f.name for f in dataclasses.fields(value)]
    if type(value).__name__ == "nvmlFriendlyObject":  # pynvml's processes
        return list(vars(value))
    return None


def _jsonable(value: Any) -> Any:
    """``value`` for the record: scalars as they are, sequences up to 16 items."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return repr(value)[:80]


def describe(value: Any, handle: bool = False) -> Shape:
    """The description of one answer (``handle``: an opaque handle, by design)."""
    if handle:
        return {"type": "handle"}
    fields = _field_names(value)
    if fields is not None:
        kinds = {f: _kind(getattr(value, f)) for f in fields}
        return {"type": "struct", "fields": kinds,  # a handle in a struct is left out of the record
                "value": {f: _jsonable(getattr(value, f)) for f in fields if kinds[f] != "object"}}
    if isinstance(value, list | tuple | ctypes.Array):
        items = list(value)
        if items and _field_names(items[0]) is not None:
            first = describe(items[0])
            return {"type": "sequence", "items": {k: v for k, v in first.items() if k != "value"},
                    "value": [describe(i)["value"] for i in items[:16]]}
        item_kinds = sorted({_kind(i) for i in items})
        return {"type": "sequence", "items": "|".join(item_kinds) or None,
                "value": [_jsonable(i) for i in items[:16]]}
    return {"type": _kind(value), "value": _jsonable(value)}


def _ctype_kind(ctype: Any) -> str:
    """What pynvml gives for a struct field of this ctypes type."""
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array) and ctype._type_ is ctypes.c_char:
        return "str"  # pynvml's structs decode their char arrays
    if isinstance(ctype, type) and issubclass(ctype, ctypes._Pointer):
        return "handle"
    return "int"


def declared(pynvml: Any) -> dict[str, Shape]:
    """The descriptions pynvml's declarations give, by call (no GPU needed)."""
    out: dict[str, Shape] = {}
    for call, name in DECLARED.items():
        inner = name.removeprefix("sequence[").removesuffix("]")
        struct = getattr(pynvml, inner, None)
        if isinstance(struct, type) and issubclass(struct, ctypes.Structure):
            shape: Shape = {"type": "struct",
                            "fields": {f: _ctype_kind(t) for f, t, *_ in struct._fields_}}
        else:
            shape = {"type": inner}
        out[call] = {"type": "sequence", "items": shape if "fields" in shape else inner} \
            if name.startswith("sequence[") else shape
    return out


# --------------------------------------------------------------------------
# Probing an NVML
# --------------------------------------------------------------------------


class Recorder:
    """Makes NVML calls and keeps each one's description, by call."""

    def __init__(self, nvml: Any):
        self.nvml = nvml
        self.shapes: dict[str, Shape] = {}

    def call(self, label: str, function: str, *args: Any, **kwargs: Any) -> Any:
        """``nvml.function(*args)``; its answer, or None when it raised (recorded either way)."""
        fn: Callable[..., Any] | None = getattr(self.nvml, function, None)
        if fn is None:
            self.shapes[label] = {"raises": "missing", "message": f"this NVML has no {function}"}
            return None
        try:
            value = fn(*args, **kwargs)
        except self.nvml.NVMLError as exc:
            self.shapes[label] = {"raises": type(exc).__name__, "message": str(exc)}
            return None
        except Exception as exc:  # noqa: BLE001 - not an NVMLError: itself a difference to record
            self.shapes[label] = {"raises": f"{type(exc).__name__} (not an NVMLError)", "message": str(exc)}
            return None
        self.shapes[label] = describe(value, handle=function in HANDLE_CALLS)
        return value


def probe(nvml: Any, index: int = 0, cpu_words: int = 1, inject_xid: bool = False) -> dict[str, Shape]:
    """Every call Citadel's GPU code makes, on GPU ``index``, described; NVML is started and
    shut down again. ``inject_xid`` (the fake only) queues an XID, so that the event wait
    answers with an event rather than a timeout."""
    rec = Recorder(nvml)
    rec.call("nvmlInit()", "nvmlInit")
    rec.call("nvmlSystemGetDriverVersion()", "nvmlSystemGetDriverVersion")
    count = rec.call("nvmlDeviceGetCount()", "nvmlDeviceGetCount")
    h = rec.call("nvmlDeviceGetHandleByIndex(i)", "nvmlDeviceGetHandleByIndex", index)
    if h is not None:
        _probe_device(rec, h, cpu_words, inject_xid, index)
    rec.call("nvmlDeviceGetHandleByIndex(count)", "nvmlDeviceGetHandleByIndex", count or 0)
    rec.call("nvmlShutdown()", "nvmlShutdown")
    rec.call("nvmlDeviceGetCount() after nvmlShutdown", "nvmlDeviceGetCount")
    return rec.shapes


def probe_processes(nvml: Any, index: int = 0) -> Shape:
    """``nvmlDeviceGetComputeRunningProcesses`` on GPU ``index`` while processes hold memory
    there (``probe`` runs before any does, and an empty list shows no fields)."""
    rec = Recorder(nvml)
    rec.call("nvmlInit()", "nvmlInit")
    handle = rec.call("nvmlDeviceGetHandleByIndex(i)", "nvmlDeviceGetHandleByIndex", index)
    label = "nvmlDeviceGetComputeRunningProcesses(h)"
    if handle is not None:
        rec.call(label, "nvmlDeviceGetComputeRunningProcesses", handle)
    rec.call("nvmlShutdown()", "nvmlShutdown")
    return rec.shapes.get(label) or rec.shapes["nvmlDeviceGetHandleByIndex(i)"]


def _probe_device(rec: Recorder, h: Any, cpu_words: int, inject_xid: bool, index: int) -> None:
    nvml = rec.nvml
    for function in ("nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetPciInfo",
                     "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetNumaNodeId",
                     "nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
                     "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates",
                     "nvmlDeviceGetPowerUsage", "nvmlDeviceGetComputeRunningProcesses",
                     "nvmlDeviceGetSupportedEventTypes"):
        rec.call(f"{function}(h)", function, h)
    rec.call("nvmlDeviceGetCpuAffinity(h, words)", "nvmlDeviceGetCpuAffinity", h, cpu_words)
    rec.call("nvmlDeviceGetMigDeviceHandleByIndex(h, 0)", "nvmlDeviceGetMigDeviceHandleByIndex", h, 0)
    rec.call("nvmlDeviceGetMemoryInfo(h, nvmlMemory_v2)", "nvmlDeviceGetMemoryInfo", h,
             version=getattr(nvml, "nvmlMemory_v2", 0x02000028))
    rec.call("nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)", "nvmlDeviceGetTemperature", h,
             nvml.NVML_TEMPERATURE_GPU)
    rec.call("nvmlDeviceGetTemperature(h, 99)", "nvmlDeviceGetTemperature", h, 99)
    events = rec.call("nvmlEventSetCreate()", "nvmlEventSetCreate")
    if events is None:
        return
    rec.call("nvmlDeviceRegisterEvents(h, XidCriticalError, set)", "nvmlDeviceRegisterEvents", h,
             nvml.nvmlEventTypeXidCriticalError, events)
    if inject_xid and hasattr(nvml, "fake_inject_xid"):
        nvml.fake_inject_xid(index, 79)
    rec.call("nvmlEventSetWait_v2(set, 0)", "nvmlEventSetWait_v2", events, 0)
    rec.call("nvmlEventSetFree(set)", "nvmlEventSetFree", events)


# --------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------


def _compatible(a: str, b: str) -> bool:
    """Two kinds agree; None stands for a value NVML does not have (pynvml's "not available")."""
    return a == b or "None" in (a, b)


def _shape_differences(label: str, a: Shape, b: Shape, names: tuple[str, str]) -> list[str]:
    """Where the answers' descriptions differ (both answered)."""
    if a.get("type") != b.get("type"):
        return [f"{label}: {names[0]} gives {a.get('type')}, {names[1]} {b.get('type')}"]
    if a.get("type") == "sequence":
        items_a, items_b = a.get("items"), b.get("items")
        if isinstance(items_a, dict) and isinstance(items_b, dict):
            return _shape_differences(f"{label}[]", items_a, items_b, names)
        if isinstance(items_a, str) and isinstance(items_b, str) and items_a != items_b:
            return [f"{label}: items are {items_a} in {names[0]}, {items_b} in {names[1]}"]
        return []
    if a.get("type") != "struct":
        return []
    fa, fb = a.get("fields", {}), b.get("fields", {})
    out = [f"{label}: {names[0]} lacks field {f}" for f in fb if f not in fa]
    out += [f"{label}: {names[0]} has field {f}, which {names[1]} has not" for f in fa if f not in fb]
    out += [f"{label}.{f}: {fa[f]} in {names[0]}, {fb[f]} in {names[1]}"
            for f in fa if f in fb and fb[f] != "handle" and not _compatible(fa[f], fb[f])]
    return out


def differences(actual: Mapping[str, Shape], expected: Mapping[str, Shape],
                names: tuple[str, str] = ("the fake", "pynvml"), errors: bool = True) -> list[str]:
    """Every call on which ``actual`` and ``expected`` disagree. With ``errors``, an error on
    one side only, or another error class, is a difference too (compare two live NVMLs);
    without, calls that raised are not compared (compare with pynvml's declarations)."""
    out: list[str] = []
    for label, want in expected.items():
        got = actual.get(label)
        if got is None:
            continue
        raised = (got.get("raises"), want.get("raises"))
        if raised[0] or raised[1]:
            if errors and raised[0] != raised[1]:
                out.append(f"{label}: {names[0]} {_outcome(got)}, {names[1]} {_outcome(want)}")
            continue
        out += _shape_differences(label, got, want, names)
    return out


def _outcome(shape: Shape) -> str:
    return f"raises {shape['raises']}" if shape.get("raises") else f"gives {shape.get('type')}"


def error_differences(fake: Any, pynvml: Any) -> list[str]:
    """pynvml's error classes the fake lacks, or has with another code or class name."""
    out = []
    for name in sorted(n for n in dir(pynvml) if n.startswith("NVMLError_")):
        theirs, ours = getattr(pynvml, name), getattr(fake, name, None)
        if ours is None:
            out.append(f"the fake has no {name}")
        elif ours().value != theirs().value:
            out.append(f"{name}: code {ours().value} in the fake, {theirs().value} in pynvml")
    return out


def functions_used(package: Path, pynvml: Any) -> set[str]:
    """The pynvml functions the package calls (its source, the fake left out)."""
    names: set[str] = set()
    for path in package.rglob("*.py"):
        if path.name != "fake_nvml.py":
            names.update(re.findall(r"\b(nvml[A-Z]\w+)\b", path.read_text(errors="replace")))
    return {n for n in names if inspect.isfunction(getattr(pynvml, n, None))}


def functions_probed(shapes: Iterable[str]) -> set[str]:
    """The functions named in these call labels."""
    return {label.split("(")[0] for label in shapes}
