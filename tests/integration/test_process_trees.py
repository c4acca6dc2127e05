"""Process trees: nothing a worker started outlives it (real processes, real signals)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_gone

TREE = Path(__file__).parents[1] / "workers" / "tree.py"


def _tree_service(pidfile: Path, extra: str = "") -> str:
    return f"""
        [services.tree]
        type = "command"
        command = ["{sys.executable}", "{TREE}", "{pidfile}"{extra}]
        stop_timeout = 1.0
        backoff_initial = 0.1
        stable_after = 0.5
        """


def _read_pids(pidfile: Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pidfile.exists():
            return [int(p) for p in pidfile.read_text().split()]
        time.sleep(0.02)
    raise AssertionError(f"{pidfile} was not written")


def _start(daemon_factory, tmp_path: Path, cgroups: str, extra: str = ""):
    pidfile = tmp_path / f"tree-{cgroups}.pids"
    daemon = daemon_factory(_tree_service(pidfile, extra), start=False)
    daemon.config.write_text(daemon.config.read_text().replace(
        "[daemon]\n", f'[daemon]\ncgroups = "{cgroups}"\n', 1))
    daemon.start()
    daemon.wait_state("tree", "running")
    return daemon, pidfile


@pytest.mark.parametrize("cgroups", ["auto", "off"])
def test_stop_kills_stubborn_and_escaped_descendants(daemon_factory, tmp_path, cgroups):
    daemon, pidfile = _start(daemon_factory, tmp_path, cgroups)
    pids = _read_pids(pidfile)
    assert len(pids) == 3
    leader, stubborn, escaped = pids
    assert os.getsid(escaped) != os.getsid(leader), "the grandchild should have its own session"
    daemon.ctl("stop", "tree", "--wait")
    assert daemon.status()["tree"]["state"] == "stopped"
    assert wait_gone(pids, timeout=30) == [], "a descendant outlived the stop"


@pytest.mark.parametrize("cgroups", ["auto", "off"])
def test_leader_sigkill_kills_descendants_before_restart(daemon_factory, tmp_path, cgroups):
    daemon, pidfile = _start(daemon_factory, tmp_path, cgroups)
    old = _read_pids(pidfile)
    pidfile.unlink()
    os.kill(old[0], signal.SIGKILL)
    new = _read_pids(pidfile)  # the restarted worker wrote its new tree
    assert new[0] != old[0]
    # By the time the new leader ran, every old descendant had to be gone.
    new_start = psutil.Process(new[0]).create_time()
    for pid in old[1:]:
        assert wait_gone([pid], timeout=0.1) == [], f"old descendant {pid} still alive after the restart"
    status = daemon.wait_state("tree", "running")
    assert status["restarts"] == 1
    assert status["last_exit"] == {"code": None, "signal": signal.SIGKILL}
    assert new_start > 0


def test_sigkill_of_citadeld_leaves_no_worker(daemon_factory, tmp_path):
    daemon, pidfile = _start(daemon_factory, tmp_path, "off")
    pids = _read_pids(pidfile)
    daemon.proc.kill()
    daemon.proc.wait()
    # PR_SET_PDEATHSIG: the leader dies with citadeld at once.
    assert wait_gone([pids[0]], timeout=30) == []
    # Its descendants in other sessions are stopped by the next citadeld, from the state file.
    daemon.start()
    assert wait_gone(pids, timeout=30) == [], "a worker of the killed citadeld survived"
    assert "left running by an earlier citadeld" in daemon.logs()


def test_sigkill_of_citadeld_with_cgroups_next_start_cleans_up(daemon_factory, tmp_path):
    daemon, pidfile = _start(daemon_factory, tmp_path, "auto")
    pids = _read_pids(pidfile)
    daemon.proc.kill()
    daemon.proc.wait()
    assert wait_gone([pids[0]], timeout=30) == []
    daemon.start()
    assert wait_gone(pids, timeout=30) == []


def test_sigterm_stops_everything_and_exits_zero(daemon_factory, tmp_path):
    daemon, pidfile = _start(daemon_factory, tmp_path, "off")
    pids = _read_pids(pidfile)
    assert daemon.stop() == 0
    assert wait_gone(pids, timeout=30) == []
    assert not daemon.socket.exists()


def test_orphans_reparented_to_citadeld_are_reaped(daemon_factory, tmp_path):
    # The worker forks a child that forks a grandchild and exits: the grandchild is
    # reparented to citadeld (a subreaper) and exits in turn; citadeld must reap it.
    script = tmp_path / "orphans.py"
    script.write_text(
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(0.3); os._exit(0)\n"
        "        os._exit(0)\n"
        "    os.wait()\n"
        "time.sleep(60)\n"
    )
    daemon = daemon_factory(f"""
        [services.orphans]
        type = "command"
        command = ["{sys.executable}", "{script}"]
        """)
    daemon.wait_state("orphans", "running")
    time.sleep(1.5)
    zombies = [c for c in psutil.Process(daemon.proc.pid).children()
               if c.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []
    leader = daemon.status()["orphans"]["pid"]
    assert psutil.Process(leader).status() != psutil.STATUS_ZOMBIE
