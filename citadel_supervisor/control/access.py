"""Who may call the control socket: peer credentials checked against allowed groups.

Workers run model code that may be hostile, and often as citadeld's own user:
a caller inside a worker's process tree (a descendant of citadeld, or a
process in a worker's cgroup) gets read access at most, whatever its uid.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..process.procstat import read_stat

Access = Literal["control", "read", "none"]


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a Unix socket connection (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        """Read the peer's credentials from a connected socket."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid)

    def groups(self) -> set[int]:
        """The peer's primary and supplementary groups, as the kernel has them."""
        groups = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("Groups:"):
                        groups.update(int(g) for g in line.split()[1:])
                        break
        except OSError:
            pass
        return groups

    def describe(self) -> str:
        """``uid 1000 (alice), pid 4242``."""
        try:
            user = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            user = "?"
        return f"uid {self.uid} ({user}), pid {self.pid}"


def group_ids(names: list[str]) -> set[int]:
    """The gids of the named groups that exist on this host."""
    gids = set()
    for name in names:
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    return gids


#: A worker's cgroup's name starts so (process/cgroups.py names them).
_WORKER_CGROUP = "/citadel-worker-"
#: Deeper than any real process tree: a walk that goes on is not trusted.
_MAX_DEPTH = 512


def in_worker_tree(pid: int, supervisor: int) -> bool:
    """True when ``pid`` runs inside one of ``supervisor``'s workers: it descends from
    ``supervisor`` (orphans of a worker's tree are reparented to citadeld, a child
    subreaper, so a double fork does not leave it), or it sits in a worker's cgroup.

    A process that cannot be read (it ended while its request was in flight) counts as
    a worker's: less access is the safe side.
    """
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return True
    if _WORKER_CGROUP in cgroups:
        return True
    walk = pid
    for _ in range(_MAX_DEPTH):
        stat = read_stat(walk)
        if stat is None:
            return True
        if stat.ppid == supervisor:
            return True
        if stat.ppid <= 1:
            return False
        walk = stat.ppid
    return True


def worker_leader(pid: int, supervisor: int) -> int | None:
    """The ancestor of ``pid`` (or ``pid`` itself) that is a child of ``supervisor``: the
    leader of the worker it runs in, or None when it descends from no child of citadeld.
    A child of citadeld is citadeld's to reap, so its pid cannot be reused meanwhile."""
    walk = pid
    for _ in range(_MAX_DEPTH):
        stat = read_stat(walk)
        if stat is None or stat.ppid <= 1:
            return None
        if stat.ppid == supervisor:
            return walk
        walk = stat.ppid
    return None


@dataclass(frozen=True)
class AccessPolicy:
    """root and citadeld's own user control; listed groups control or read; others
    nothing; a caller inside a worker's tree reads at most."""

    control_gids: frozenset[int]
    read_gids: frozenset[int]
    #: citadeld's pid: its descendants are its workers' processes.
    supervisor_pid: int = field(default_factory=os.getpid)

    @classmethod
    def from_groups(cls, control: list[str], read: list[str]) -> AccessPolicy:
        """Build from group names (unknown names are ignored)."""
        return cls(frozenset(group_ids(control)), frozenset(group_ids(read)))

    def access(self, peer: Peer) -> Access:
        """What this peer may do."""
        granted = self._by_credentials(peer)
        if granted == "control" and in_worker_tree(peer.pid, self.supervisor_pid):
            return "read"
        return granted

    def _by_credentials(self, peer: Peer) -> Access:
        if peer.uid in (0, os.getuid()):
            return "control"
        groups = peer.groups()
        if groups & self.control_gids:
            return "control"
        if groups & self.read_gids:
            return "read"
        return "none"
