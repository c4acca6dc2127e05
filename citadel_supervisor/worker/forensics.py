"""Why a worker's run failed, in words an operator acts on: read from how it ended, what its
cgroup counted, and what it last printed.

``classify`` refines a run's cause (``exit`` or ``signal``) from its last lines: a GPU
out of memory, a model that cannot be found or loaded, a port already taken. The
patterns are vLLM's, PyTorch's and Python's own messages; a worker's output is
untrusted, so a worker can only mislabel its own failure, never another's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: (cause, pattern): the first that matches one of the last lines wins.
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("gpu_oom", re.compile(r"CUDA out of memory|torch\.OutOfMemoryError|OutOfMemoryError: CUDA|"
                           r"No available memory for the cache blocks")),
    ("model", re.compile(r"Repository Not Found|does not appear to have a file named config\.json|"
                         r"HFValidationError|Can't load the configuration of|"
                         r"is not a local folder and is not a valid model identifier|"
                         r"Invalid repository ID or local directory specified")),
    ("port", re.compile(r"Address already in use|\[Errno 98\]")),
)

#: Causes a restart cannot mend: the worker goes fatal at once instead of looping.
FATAL_CAUSES = frozenset({"model"})


def classify(cause: str, last_lines: Iterable[str], oom_kills: int = 0, gpu_errors: int = 0) -> str:
    """``cause``, refined when the run exited or was killed: ``oom`` when the kernel's OOM
    killer ended one of its processes (``oom_kills``, from its cgroup); ``gpu_error`` when its
    GPUs raised XID errors during the run (``gpu_errors``, from NVML); else by its last lines."""
    if cause not in ("exit", "signal"):
        return cause
    if oom_kills > 0:
        return "oom"
    if gpu_errors > 0:
        return "gpu_error"
    lines = list(last_lines)
    for refined, pattern in PATTERNS:
        if any(pattern.search(line) for line in lines):
            return refined
    return cause
