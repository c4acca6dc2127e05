"""Who holds a listening TCP port: the kernel's socket tables, and the processes' fds.

A worker's port is only a number: once the worker is gone, or before it binds,
any local process may listen there (port squatting) and receive what is sent
to the worker, its API key included. Before a secret goes to a port, citadeld
proves that the listener is the worker's own: ``/proc/net/tcp`` and
``/proc/net/tcp6`` give each listening socket's inode, and one of the worker's
processes must hold that inode (``/proc/PID/fd/N -> socket:[INODE]``). Only the
worker's own pids are scanned; the whole host only to name a stranger.

A worker run as a user of its own (``user``) may keep its fds from a citadeld
that is not root; its listener is then known by the socket's owner instead:
a socket of that user is the worker's (only the worker's processes run as the
user the operator gave it).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN = "0A"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: What holds a port: one of the worker's processes, another process, or nothing listens.
Owner = Literal["worker", "other", "none"]


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket, as the kernel's table lists it."""

    address: IpAddress
    port: int
    inode: int
    #: The uid that owns the socket.
    uid: int = -1


def _decode_address(text: str) -> IpAddress:
    """An address of ``/proc/net/tcp*``: 32-bit words in hex, each in the host's byte order."""
    raw = b"".join(int(text[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(text), 8))
    return ipaddress.ip_address(raw)


def listening_sockets(port: int | None = None) -> list[Listener]:
    """The TCP sockets listening in citadeld's network namespace (on ``port`` if given)."""
    found = []
    suffix = None if port is None else f":{port:04X}"
    for table in _TABLES:
        try:
            with open(table) as fh:
                lines = fh.readlines()[1:]
        except OSError:  # no IPv6 on this host
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            local = fields[1]
            if suffix is not None and not local.endswith(suffix):
                continue
            address, _, port_hex = local.partition(":")
            found.append(Listener(_decode_address(address), int(port_hex, 16), int(fields[9]),
                                  int(fields[7])))
    return found


def reaches(host: str, address: IpAddress) -> bool:
    """True when a connection to ``host`` may reach a socket listening on ``address``.

    Erring towards True: a host that is a name (``localhost``) or unspecified
    (``0.0.0.0``, which Linux connects to loopback) may reach any listener, and
    an IPv6 wildcard listener may take IPv4 connections (dual-stack).
    """
    try:
        target = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    if target.is_unspecified or address == target:
        return True
    if address.is_unspecified:
        return address.version == 6 or target.version == 4
    return isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped == target


def listeners_on(host: str, port: int, sockets: Iterable[Listener] | None = None) -> list[Listener]:
    """The listening sockets a connection to ``host:port`` may reach."""
    sockets = listening_sockets(port) if sockets is None else sockets
    return [s for s in sockets if s.port == port and reaches(host, s.address)]


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets the process holds open; empty when it is gone or unreadable."""
    inodes: set[int] = set()
    try:
        entries = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    with entries:
        for entry in entries:
            try:
                target = os.readlink(entry.path)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def holders(inodes: set[int], pids: Iterable[int]) -> dict[int, int]:
    """``{inode: pid}`` for the ``inodes`` that a process among ``pids`` holds."""
    found: dict[int, int] = {}
    for pid in pids:
        for inode in socket_inodes(pid) & inodes:
            found.setdefault(inode, pid)
        if len(found) == len(inodes):
            break
    return found


def listener_pid(host: str, port: int, pids: Iterable[int],
                 sockets: Iterable[Listener] | None = None) -> int | None:
    """The pid among ``pids`` that holds a socket listening on ``host:port``, or None."""
    inodes = {s.inode for s in listeners_on(host, port, sockets)}
    found = holders(inodes, pids) if inodes else {}
    return next(iter(found.values()), None)


@dataclass(frozen=True)
class PortOwner:
    """Whose listener a connection to a worker's port reaches."""

    owner: Owner
    host: str
    port: int
    #: The inodes of the sockets no process of the worker holds (when ``owner`` is "other").
    strangers: frozenset[int] = frozenset()

    def holder(self) -> tuple[int, str] | None:
        """The pid and command line of a process that holds a stranger's socket, or None
        when citadeld cannot see it. Scans every process's fds: only to say who it is."""
        for entry in os.listdir("/proc"):
            if entry.isdigit() and socket_inodes(int(entry)) & self.strangers:
                return int(entry), command_line(int(entry))
        return None

    def refusal(self) -> str:
        """Why a secret is not sent to this port, naming the holder when it can be found."""
        if self.owner == "none":
            return f"nothing listens on {self.host}:{self.port}: the API key is not sent"
        found = self.holder()
        who = (f"pid {found[0]} ({found[1]})" if found
               else "a process citadeld cannot see (another user's, or in another namespace)")
        return f"port {self.port} is held by {who}, not by the worker: the API key is not sent"


def port_owner(host: str, port: int, pids: Callable[[], Iterable[int]],
               sockets: Iterable[Listener] | None = None) -> PortOwner:
    """Whose listener a connection to ``host:port`` reaches: the worker's (every such
    listener is held by one of ``pids()``), another process's, or none.

    ``pids`` is called only when something listens; ``sockets``: ``listening_sockets()``,
    when the caller checks several ports at once. Reads ``/proc``: not on the event loop.
    """
    found = {s.inode: s for s in listeners_on(host, port, sockets)}
    if not found:
        return PortOwner("none", host, port)
    members = list(pids())
    inodes = set(found)
    strangers = inodes - holders(inodes, members).keys()
    if strangers:
        hidden = _hidden_users(members)
        strangers = {inode for inode in strangers if found[inode].uid not in hidden}
    return PortOwner("other" if strangers else "worker", host, port, frozenset(strangers))


def _hidden_users(pids: Iterable[int]) -> set[int]:
    """The uids, other than citadeld's, of those ``pids`` whose fds citadeld may not read."""
    users = set()
    for pid in pids:
        if not _fds_hidden(pid):
            continue
        try:
            with open(f"/proc/{pid}/status") as fh:
                uid = next(int(line.split()[1]) for line in fh if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError):
            continue
        if uid != os.geteuid():
            users.add(uid)
    return users


def command_line(pid: int, limit: int = 120) -> str:
    """The process's command line, cut to ``limit`` characters; ``?`` when unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read(limit * 4)
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return (text[:limit] + "...") if len(text) > limit else text or "?"


def _fds_hidden(pid: int) -> bool:
    """True when citadeld may list the process's fds but not read where they lead (the
    kernel's ptrace check: another user's process, without CAP_SYS_PTRACE)."""
    try:
        with os.scandir(f"/proc/{pid}/fd") as entries:
            for entry in entries:
                try:
                    os.readlink(entry.path)
                except PermissionError:
                    return True
                except OSError:
                    continue  # closed meanwhile
                return False
    except PermissionError:
        return True
    except OSError:
        pass  # gone
    return False
