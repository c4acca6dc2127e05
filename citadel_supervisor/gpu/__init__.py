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

from .allocation import (
    FileOf,
    GpuAllocation,
    WorkerGpus,
    allocate_gpus,
    check_memory_fractions,
    pick_group,
)
from .cpus import format_cpulist, parse_cpulist
from .inventory import (
    FAKE_NVML_ENV,
    GpuDetection,
    GpuInfo,
    GpuInventory,
    GpuProcess,
    MigDevice,
    NvmlApi,
    detect_gpus,
    load_nvml,
)
from .placement import WorkerPlacement, wait_released, worker_placement

__all__ = ['FAKE_NVML_ENV', 'FileOf', 'GpuAllocation', 'GpuDetection', 'GpuInfo', 'GpuInventory', 'GpuProcess', 'MigDevice', 'NvmlApi', 'WorkerGpus', 'WorkerPlacement', 'allocate_gpus', 'check_memory_fractions', 'detect_gpus', 'format_cpulist', 'load_nvml', 'parse_cpulist', 'pick_group', 'wait_released', 'worker_placement']
