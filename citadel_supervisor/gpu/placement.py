"""What a pinned worker is given (CUDA_VISIBLE_DEVICES, CPUs), and the wait for GPU memory release."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection
from dataclasses import dataclass

from loguru import logger

from .allocation import WorkerGpus
from .inventory import GpuInventory, GpuProcess

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

