"""Who may call the control socket: peer credentials checked against allowed groups."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True)
class AccessPolicy:
    """root and citadeld's own user control; listed groups control or read; others nothing."""

    control_gids: frozenset[int]
    read_gids: frozenset[int]

    @classmethod
    def from_groups(cls, control: list[str], read: list[str]) -> AccessPolicy:
        """Build from group names (unknown names are ignored)."""
        return cls(frozenset(group_ids(control)), frozenset(group_ids(read)))

    def access(self, peer: Peer) -> Access:
        """What this peer may do."""
        if peer.uid in (0, os.getuid()):
            return "control"
        groups = peer.groups()
        if groups & self.control_gids:
            return "control"
        if groups & self.read_gids:
            return "read"
        return "none"
