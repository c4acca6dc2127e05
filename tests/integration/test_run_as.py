"""Workers as a user of their own (``user``, ``group``): what the kernel shows, and the errors.

The tests run as root, like citadeld under a unit that allows it; ``nobody``
(and its group) exist on every Debian-like host.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import CITADELD

NOBODY = pwd.getpwnam("nobody")
CAP_SETUID = 7
#: An argv prefix that runs citadeld without CAP_SETUID (PR_CAPBSET_DROP = 24).
WITHOUT_CAP_SETUID = [sys.executable, "-c", (
    "import ctypes, os, sys\n"
    f"if ctypes.CDLL(None, use_errno=True).prctl(24, {CAP_SETUID}, 0, 0, 0) != 0:\n"
    "    sys.exit('PR_CAPBSET_DROP failed')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n")]


def _status(pid: int) -> dict[str, list[str]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.split() for k, _, v in (line.partition(":") for line in lines)}


def test_a_worker_runs_as_its_user_with_that_users_groups_and_home(daemon_factory: Any) -> None:
    daemon = daemon_factory(f"""
        [services.confined]
        type = "command"
        # A program nobody may run (this venv's Python may sit in a folder only root enters).
        command = ["/bin/sleep", "3600"]
        user = "nobody"
        """)
    pid = daemon.wait_state("confined", "running")["pid"]
    status = _status(pid)
    assert status["Uid"] == [str(NOBODY.pw_uid)] * 4
    assert status["Gid"] == [str(NOBODY.pw_gid)] * 4
    assert sorted(map(int, status["Groups"])) == sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid)))
    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    assert (environ["USER"], environ["HOME"]) == ("nobody", NOBODY.pw_dir)
    daemon.ctl("stop", "confined", "--wait")
    assert daemon.status()["confined"]["state"] == "stopped"


def _check(tmp_path: Path, service: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "citadeld.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        control_socket = "{tmp_path}/control.sock"
        state_dir = "{tmp_path}"
        [services.confined]
        type = "command"
        command = ["{sys.executable}", "-c", "pass"]
        """) + service)
    return subprocess.run([*(prefix or []), CITADELD, "--check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_user_or_group_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    result = _check(tmp_path, 'user = "no-such-user-x"\n')
    assert result.returncode != 0
    assert "services.confined: no user 'no-such-user-x' on this host" in result.stdout + result.stderr
    result = _check(tmp_path, 'group = "no-such-group-x"\n')
    assert "services.confined: no group 'no-such-group-x' on this host" in result.stdout + result.stderr


def test_switching_users_without_the_capability_is_a_config_error(tmp_path: Path) -> None:
    result = _check(tmp_path, 'user = "nobody"\n', WITHOUT_CAP_SETUID)
    assert result.returncode != 0
    assert "without CAP_SETUID and CAP_SETGID, so it cannot start workers as another user" in (
        result.stdout + result.stderr)
    assert _check(tmp_path, 'user = "nobody"\n').returncode == 0
