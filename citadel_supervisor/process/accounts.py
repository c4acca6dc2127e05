"""The user and group a worker runs as (a service's ``user`` and ``group``).

Workers may run code downloaded with a model (vLLM's ``trust_remote_code``).
Run as citadeld's own user, such code could signal citadeld, read its
credentials and rewrite its state; run as a user of its own, it can do none
of that. Switching users needs CAP_SETUID and CAP_SETGID: root has them, and
a unit that runs citadeld as ``citadel`` grants them with
``AmbientCapabilities=`` (docs/install.md).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

#: Bits of the capability sets in /proc/PID/status (linux/capability.h).
CAP_SETGID = 6
CAP_SETUID = 7


@dataclass(frozen=True)
class RunAs:
    """Who a worker runs as: what ``subprocess.Popen`` takes, and the variables that name it."""

    uid: int | None
    gid: int | None
    #: Supplementary groups: the user's own (None: citadeld's are kept).
    groups: list[int] | None
    #: ``HOME``, ``USER`` and ``LOGNAME`` of the user (empty without one).
    env: dict[str, str]

    @classmethod
    def resolve(cls, user: str | None, group: str | None) -> RunAs:
        """Look the names (or numeric ids) up; ``KeyError`` naming what does not exist."""
        entry = lookup_user(user) if user is not None else None
        gid = lookup_group(group) if group is not None else (entry.pw_gid if entry else None)
        if entry is None:
            return cls(None, gid, None, {})
        assert gid is not None
        return cls(entry.pw_uid, gid, os.getgrouplist(entry.pw_name, gid),
                   {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name})

    def switches(self) -> bool:
        """True when this differs from citadeld's own user or group."""
        return (self.uid is not None and self.uid != os.geteuid()) or (
            self.gid is not None and self.gid != os.getegid())


def lookup_user(name: str) -> pwd.struct_passwd:
    """The passwd entry of a user name or numeric uid; ``KeyError`` when there is none."""
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise KeyError(f"no user {name!r} on this host") from None


def lookup_group(name: str) -> int:
    """The gid of a group name or numeric gid; ``KeyError`` when there is none."""
    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise KeyError(f"no group {name!r} on this host") from None


def can_switch_users() -> bool:
    """True when this process holds CAP_SETUID and CAP_SETGID (effective)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps >> CAP_SETUID & 1 and caps >> CAP_SETGID & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0
