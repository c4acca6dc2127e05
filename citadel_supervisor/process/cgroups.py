"""Per-worker cgroup v2 groups, where a writable subtree is available.

Under systemd with ``Delegate=yes`` (or as root), citadeld creates one child
cgroup per worker beside itself, moves the worker's leader into it at spawn,
and kills the whole group at once with ``cgroup.kill``: no descendant, not
even one that called ``setsid()`` and double-forked, can escape it.
No controllers are enabled, so the daemon may stay in its own cgroup.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from loguru import logger

_PREFIX = "citadel-worker-"


def _own_cgroup_dir() -> Path | None:
    """The cgroup v2 directory this process lives in, if cgroup v2 is mounted."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    mount = None
    for line in mountinfo:
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] == "cgroup2":
            mount = left.split(" ")[4]
            break
    if rel is None or mount is None:
        return None
    return Path(mount) / rel.lstrip("/")


class CgroupTree:
    """The folder under which per-worker cgroups are created.

    Names carry an instance key (from citadeld's ``state_dir``), so two
    citadelds sharing a cgroup (as every process does outside systemd) never
    take each other's workers for leftovers.
    """

    def __init__(self, base: Path, instance: str):
        self.base = base
        self.prefix = f"{_PREFIX}{instance}-"

    @classmethod
    def detect(cls, instance: str) -> CgroupTree | None:
        """A tree under this process's own cgroup, or None where it cannot be written."""
        base = _own_cgroup_dir()
        if base is None or not os.access(base, os.W_OK):
            return None
        probe = base / f"{_PREFIX}probe-{os.getpid()}"
        try:
            probe.mkdir()
            has_kill = (probe / "cgroup.kill").exists()
            probe.rmdir()
        except OSError as exc:
            logger.debug("cgroup v2 at {} is not writable: {}", base, exc)
            return None
        if not has_kill:
            logger.info("cgroup v2 at {} has no cgroup.kill (Linux < 5.14); using process groups", base)
            return None
        return cls(base, instance)

    @classmethod
    def locate(cls, instance: str) -> CgroupTree | None:
        """Where this instance's worker cgroups are (written or not), or None without cgroup v2.

        For the start-up clean-up, which must know them even when this run will
        not make any (``cgroups = "off"``, or no longer writable).
        """
        base = _own_cgroup_dir()
        return cls(base, instance) if base is not None else None

    def owns(self, path: Path) -> bool:
        """True for a path this instance names its worker cgroups by: directly under
        ``base``, with this instance's prefix (so no other cgroup, nor any other folder)."""
        return (path.is_absolute() and path.parent == self.base
                and path.name.startswith(self.prefix) and len(path.name) > len(self.prefix))

    def path_for(self, worker: str) -> Path:
        """The cgroup folder of a worker."""
        return self.base / (self.prefix + worker)

    def prepare(self, worker: str) -> Path:
        """Create a worker's cgroup, first killing anything left in an old one."""
        path = self.path_for(worker)
        if path.exists():
            kill(path)
            remove(path)
        path.mkdir(exist_ok=True)
        return path


def procs(path: Path) -> list[int]:
    """The pids in a cgroup (empty when it is gone)."""
    try:
        with open(path / "cgroup.procs", "rb") as fh:  # not Path.read_text: read at every scrape
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def kill(path: Path) -> None:
    """SIGKILL every process in the cgroup, at once."""
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        for pid in procs(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                logger.warning("cannot kill pid {} of cgroup {}: permission denied", pid, path)


def oom_kills(path: Path) -> int:
    """How many of the cgroup's processes the kernel's OOM killer ended (``memory.events``);
    0 when the memory controller is not enabled there, or the file cannot be read."""
    try:
        text = (path / "memory.events").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def remove(path: Path) -> bool:
    """Remove an empty cgroup; False when processes are still in it."""
    try:
        path.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            logger.warning("cannot remove cgroup {}: {}", path, exc.strerror)
        return False
