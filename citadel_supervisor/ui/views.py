"""What the status page may see: chosen field by field, so that nothing reaches the network
because it was added to ``status --json`` (which read callers of the control socket get).

Worker output (a worker's last lines, in its status, its exit events and its log) is left
out unless ``[exporter] ui_logs`` is on; when shown, it is masked, its control characters
are escaped (a terminal escape shows as ``\\x1b[31m``) and long lines are cut. The page
puts every value into the document as text (``textContent``), never as HTML.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..logs.daemon_log import escape_control
from ..logs.masking import masker

if TYPE_CHECKING:
    from ..events import WorkerEvent
    from ..worker.lifecycle import Worker

#: The fields of a worker's status the page shows.
WORKER_FIELDS = ("name", "service", "type", "state", "pid", "restarts", "ready", "gpus", "port",
                 "since", "uptime", "last_exit", "last_error", "last_failure", "phase", "models")
#: The keys of an event's ``detail`` the page shows (``last_lines`` only with ``ui_logs``).
EVENT_DETAIL = ("reason", "cause", "exit", "delay", "waiting", "error", "pid")
#: The fields of a GPU the page shows.
GPU_FIELDS = ("index", "uuid", "name", "memory", "utilization_percent", "temperature_c", "power_w",
              "power_limit_w", "xid_errors", "workers")
#: A line of output longer than this is cut on the page (a worker may print 64 KiB lines).
MAX_LINE = 4096


def page_lines(lines: Iterable[str]) -> list[str]:
    """Worker output as the page shows it: masked, control characters escaped, cut at
    ``MAX_LINE`` characters (after masking, so a cut never leaves part of a secret)."""
    shown = []
    for line in lines:
        line = escape_control(masker.mask(line))
        shown.append(line if len(line) <= MAX_LINE else line[:MAX_LINE] + " [cut]")
    return shown


def page_worker(worker: Worker, logs: bool) -> dict[str, Any]:
    """One worker, with the reason of its last exit (``killed by SIGKILL``)."""
    status = worker.to_json()
    entry = {key: status.get(key) for key in WORKER_FIELDS}
    reason = worker.last_exit.describe() if worker.last_exit is not None else None
    if reason is not None and worker.last_failure not in (None, "exit", "signal"):
        reason = f"{reason} ({worker.last_failure})"  # what the exit alone does not say: (oom)
    entry["last_exit_reason"] = reason
    down = (status.get("demand") or {}).get("down_reason")
    if down and status["state"] in ("idle", "asleep"):
        entry["phase"] = down  # the badge reads "idle (evicted for coder)"
    if logs:
        entry["last_lines"] = page_lines(status.get("last_lines") or [])
    return entry


def page_event(event: WorkerEvent, logs: bool) -> dict[str, Any]:
    """One worker event."""
    shown = event.to_json()
    detail = {key: value for key, value in event.detail.items() if key in EVENT_DETAIL}
    if logs and event.detail.get("last_lines"):
        detail["last_lines"] = page_lines(event.detail["last_lines"])
    shown["detail"] = detail
    return shown


def page_gpus(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The GPUs (the ``/v1/gpus`` answer, trimmed): per GPU its memory, the workers pinned to
    it (``workers``) and those whose processes hold its memory (``holders``)."""
    gpus = []
    for gpu in answer.get("gpus", []):
        entry = {key: gpu.get(key) for key in GPU_FIELDS}
        processes = gpu.get("processes") or []
        entry["holders"] = sorted({p["worker"] for p in processes if p.get("worker")})
        entry["other_processes"] = sum(1 for p in processes if not p.get("worker"))
        gpus.append(entry)
    return {"available": bool(answer.get("available")), "reason": answer.get("reason"),
            "fake": bool(answer.get("fake")), "driver_version": answer.get("driver_version"),
            "gpus": gpus}


def sse_message(kind: str, data: Any) -> bytes:
    """One server-sent event: its ``kind`` and its data as one line of JSON, masked (JSON
    escapes every newline, so a value cannot end the message or start another)."""
    return f"event: {kind}\ndata: {masker.mask(json.dumps(data))}\n\n".encode()
