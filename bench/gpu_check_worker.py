"""The worker ``gpu_check.py`` runs under citadeld, pinned to one GPU by its UUID.

With torch (a real GPU): it allocates ``--gib`` GiB on the one GPU it sees,
starts a child process that allocates ``--child-gib`` GiB there too, writes
a report, and keeps the GPU busy with matrix products until it is killed.

With ``--fake`` (the FAKE NVML, no GPU, no torch): the same report, with no
GPU touched; ``gpu_check.py`` writes the allocation into the fake host's file.

The report, ``REPORT_DIR/worker-PID.json``, is written once the worker and
its child hold their memory, or with ``error`` set when something failed. It
says what the worker was given (``CUDA_VISIBLE_DEVICES``, CPUs) and what it
saw (torch's device count and the device's UUID).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30

#: The tensors allocated: the memory is held as long as they live, until the process is killed.
HELD: list[Any] = []


def given() -> dict[str, Any]:
    """What citadeld gave this process: its pid, the pinning env, and its CPUs."""
    return {
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "citadel_worker": os.environ.get("CITADEL_WORKER"),
        "cpus": sorted(os.sched_getaffinity(0)),
    }


def nvml_uuid(raw: str) -> str:
    """torch's UUID (``1a2b...``) in NVML's spelling (``GPU-1a2b...``)."""
    return raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"


def allocate(gib: float) -> dict[str, Any]:
    """Allocate ``gib`` GiB on CUDA device 0 with torch (kept in ``HELD``); what torch saw."""
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "device_count": torch.cuda.device_count()}
    props = torch.cuda.get_device_properties(0)
    raw_uuid = getattr(props, "uuid", None)
    facts["device_name"] = props.name
    facts["device_total_memory"] = getattr(props, "total_memory", None)
    facts["device_uuid"] = nvml_uuid(str(raw_uuid)) if raw_uuid is not None else None
    block = torch.empty(int(gib * GiB), dtype=torch.uint8, device="cuda:0")
    block.fill_(1)  # touch it: the memory is the process's, whatever the allocator does
    torch.cuda.synchronize()
    facts["allocated_bytes"] = int(block.numel())
    facts["reserved_bytes"] = int(torch.cuda.memory_reserved(0))
    HELD.append(block)
    return facts


def fake_facts() -> dict[str, Any]:
    """What a fake worker can tell without torch: one device per UUID it was given."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ""
    uuids = [u for u in visible.split(",") if u]
    return {"torch": None, "device_count": len(uuids), "device_uuid": None, "allocated_bytes": 0}


def start_child(gib: float, fake: bool, timeout: float) -> dict[str, Any]:
    """Start a child that allocates ``gib`` GiB too; its report line, once it holds the memory."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--gib", str(gib)]
    child = subprocess.Popen(argv + (["--fake"] if fake else []), stdout=subprocess.PIPE)
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline() if ready else b""
    if not line:
        child.kill()
        raise RuntimeError(f"the child (pid {child.pid}) did not report within {timeout:g}s")
    facts: dict[str, Any] = json.loads(line)
    if facts.get("error"):
        raise RuntimeError(f"the child (pid {child.pid}) failed: {facts['error']}")
    return facts


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """Write the report atomically: the reader never sees half of it."""
    path = folder / f"worker-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)


def keep_busy(fake: bool) -> None:
    """Run matrix products on the GPU until killed (the fake sleeps instead)."""
    if fake:
        while True:
            signal.pause()
    import torch

    a = torch.randn(8192, 8192, device="cuda:0", dtype=torch.float16)
    while True:
        a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def child_main(args: argparse.Namespace) -> None:
    """The child: allocate, say so on stdout as one JSON line, then wait to be killed."""
    facts: dict[str, Any] = {"pid": os.getpid()}
    try:
        if not args.fake:
            facts.update(allocate(args.gib))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the check
        facts["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(facts), flush=True)
    while True:
        signal.pause()


def worker_main(args: argparse.Namespace) -> None:
    """The worker: allocate, start the child, report, keep the GPU busy."""
    report: dict[str, Any] = {"started": time.time(), **given()}
    try:
        report.update(fake_facts() if args.fake else allocate(args.gib))
        report["child"] = start_child(args.child_gib, args.fake, args.child_timeout)
    except Exception as exc:  # noqa: BLE001 - reported: gpu_check.py fails the check with it
        report["error"] = f"{type(exc).__name__}: {exc}"
        write_report(args.report, report)
        sys.exit(1)
    report["ready"] = time.time()
    write_report(args.report, report)
    print(f"worker {os.getpid()} holds its memory; child {report['child']['pid']}", flush=True)
    keep_busy(args.fake)


def main() -> None:
    """Parse the arguments; run as the worker or as its child."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, help="the folder for the report (the worker)")
    parser.add_argument("--gib", type=float, default=20.0, help="GiB to allocate")
    parser.add_argument("--child-gib", type=float, default=2.0, help="GiB the child allocates")
    parser.add_argument("--child-timeout", type=float, default=180.0)
    parser.add_argument("--fake", action="store_true", help="no torch, no GPU: report only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
    elif args.report is None:
        parser.error("--report is needed")
    else:
        worker_main(args)


if __name__ == "__main__":
    main()
