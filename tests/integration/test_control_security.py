"""Who may call the control socket: real users and groups, real credentials on the socket.

The test creates groups and unprivileged users (tests run as root), starts a
citadeld whose socket belongs to one group and whose config lets one group
control and one read, then forks children that ``setgroups``/``setgid``/
``setuid`` to each user and call the socket.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Accounts, GuardedDaemon, RunningDaemon, drop_to

from citadel_supervisor.control.client import ControlClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="needs root and useradd to create users")

TAG = secrets.token_hex(3)
WORKER = f"guarded-{TAG}"


def as_user(user: pwd.struct_passwd, calls: Callable[[], Any]) -> Any:
    """Run ``calls()`` in a forked child with the user's uid, gid and groups; its JSON result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, call, report, and leave without pytest's cleanup
        try:
            os.close(read_fd)
            drop_to(user)
            result = {"ok": calls()}
        except BaseException as exc:  # noqa: BLE001  (everything goes back to the parent)
            result = {"error": f"{type(exc).__name__}: {exc}",
                      "status": getattr(exc, "status", None)}
        with os.fdopen(write_fd, "w") as out:
            json.dump(result, out)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as src:
        raw = src.read()
    os.waitpid(pid, 0)
    return json.loads(raw)


@pytest.fixture(scope="module")
def setup() -> Iterator[dict[str, Any]]:
    accounts = Accounts()
    # A folder every user may traverse (pytest's own tmp folders are 0700 under root's).
    root = Path(tempfile.mkdtemp(prefix="citadel-sec-", dir="/tmp"))
    root.chmod(0o755)
    daemon = None
    try:
        sock_group, ctl_group, read_group = (f"cz{kind}{TAG}" for kind in ("sock", "ctl", "read"))
        gids = {name: accounts.group(name) for name in (sock_group, ctl_group, read_group)}
        users = {
            "outsider": accounts.user(f"czout{TAG}", []),
            "stranger": accounts.user(f"czstr{TAG}", [sock_group]),
            "reader": accounts.user(f"czrd{TAG}", [sock_group, read_group]),
            "controller": accounts.user(f"czctl{TAG}", [sock_group, ctl_group]),
        }
        access = (f'socket_group = "{sock_group}"\ncontrol_groups = ["{ctl_group}"]\n'
                  f'read_groups = ["{read_group}"]\n')
        daemon = GuardedDaemon(root, f"""
            [services.{WORKER}]
            type = "command"
            command = ["sleep", "600"]
            """, access).start()
        daemon.wait_state(WORKER, "running")
        yield {"daemon": daemon, "users": users, "socket_gid": gids[sock_group]}
    finally:
        if daemon is not None:
            daemon.stop()
        accounts.remove()
        shutil.rmtree(root, ignore_errors=True)


def _client(daemon: RunningDaemon) -> ControlClient:
    return ControlClient(str(daemon.socket), timeout=10)


def test_the_socket_is_0660_and_belongs_to_socket_group(setup: dict[str, Any]) -> None:
    st = os.stat(setup["daemon"].socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_mode & 0o777 == 0o660
    assert st.st_gid == setup["socket_gid"]


def test_a_user_outside_the_socket_group_cannot_connect(setup: dict[str, Any]) -> None:
    daemon = setup["daemon"]
    result = as_user(setup["users"]["outsider"], lambda: _client(daemon).call("GET", "/v1/status"))
    assert result["status"] == 403
    assert "permission denied on" in result["error"] and str(daemon.socket) in result["error"]


def test_a_stranger_is_refused_with_a_clear_message_and_logged(setup: dict[str, Any]) -> None:
    daemon, user = setup["daemon"], setup["users"]["stranger"]
    result = as_user(user, lambda: _client(daemon).call("GET", "/v1/status"))
    assert result["status"] == 403
    assert f"uid {user.pw_uid} ({user.pw_name})" in result["error"]
    assert "may not read citadeld" in result["error"] and "daemon.read_groups" in result["error"]
    result = as_user(user, lambda: _client(daemon).call("POST", "/v1/stop", {"names": [WORKER]}))
    assert result["status"] == 403 and "may not control" in result["error"]
    assert f"refused GET /v1/status from uid {user.pw_uid} ({user.pw_name})" in daemon.logs()
    assert daemon.status()[WORKER]["state"] == "running"


def test_a_read_group_member_may_read_but_not_act(setup: dict[str, Any]) -> None:
    daemon, user = setup["daemon"], setup["users"]["reader"]
    pid = daemon.status()[WORKER]["pid"]
    result = as_user(user, lambda: _client(daemon).call("GET", "/v1/status"))
    assert [w["pid"] for w in result["ok"]["workers"]] == [pid]
    result = as_user(user, lambda: _client(daemon).call("POST", "/v1/stop", {"names": [WORKER]}))
    assert result["status"] == 403 and "may not control citadeld" in result["error"]
    result = as_user(user, lambda: _client(daemon).call("POST", "/v1/reload", {}))
    assert result["status"] == 403
    assert daemon.status()[WORKER]["pid"] == pid


def test_a_control_group_member_may_act(setup: dict[str, Any]) -> None:
    daemon, user = setup["daemon"], setup["users"]["controller"]
    pid = daemon.status()[WORKER]["pid"]
    result = as_user(user, lambda: _client(daemon).call("GET", "/v1/version"))
    assert result["ok"]["pid"] == daemon.proc.pid
    result = as_user(user, lambda: _client(daemon).call(
        "POST", "/v1/restart", {"names": [WORKER], "wait": True}))
    (worker,) = result["ok"]["workers"]
    assert worker["state"] == "running" and worker["pid"] != pid
