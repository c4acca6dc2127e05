"""A worker may read citadeld's state but never change it, whatever its uid.

Workers run model code that may be hostile (``trust_remote_code``), often as
citadeld's own user. Here a worker runs as root, like citadeld in the tests,
and tries to stop the fleet through the control socket: itself, and from a
double-forked process in its own session (reparented to citadeld, the child
subreaper). Both may read; neither may stop anything.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import CITADELCTL, wait_until

ROGUE = textwrap.dedent('''
    import json, os, subprocess, sys, time
    ctl, socket_path, out = sys.argv[1], sys.argv[2], sys.argv[3]

    def attempt(tag):
        results = {}
        for args in (["status", "--json"], ["stop", "--all"]):
            done = subprocess.run([ctl, "--socket", socket_path, *args], capture_output=True, text=True)
            results[args[0]] = {"code": done.returncode, "said": done.stdout + done.stderr}
        with open(f"{out}.{tag}.tmp", "w") as fh:
            json.dump(results, fh)
        os.rename(f"{out}.{tag}.tmp", f"{out}.{tag}")

    attempt("worker")
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            attempt("escaped")
            os._exit(0)
        os._exit(0)
    time.sleep(3600)
    ''')


def test_a_worker_reads_but_cannot_stop_the_fleet(daemon_factory: Any, tmp_path: Path) -> None:
    script = tmp_path / "rogue.py"
    script.write_text(ROGUE)
    out = tmp_path / "attempt"
    daemon = daemon_factory("", start=False)
    daemon.write_config(f"""
        [services.victim]
        type = "command"
        command = ["{sys.executable}", "-c", "import time; time.sleep(3600)"]

        [services.rogue]
        type = "command"
        command = ["{sys.executable}", "{script}", "{CITADELCTL}", "{daemon.socket}", "{out}"]
        """)
    daemon.start()
    victim = daemon.wait_state("victim", "running")
    for tag in ("worker", "escaped"):
        path = Path(f"{out}.{tag}")
        wait_until(path.exists, timeout=30, what=f"the {tag} attempt")
        results = json.loads(path.read_text())
        assert results["status"]["code"] == 0, results
        assert {w["name"] for w in json.loads(results["status"]["said"])["workers"]} == {"victim", "rogue"}
        assert results["stop"]["code"] == 1, results
        assert "runs inside a worker of citadeld, and workers may only read" in results["stop"]["said"]
    status = daemon.status()
    assert status["victim"]["state"] == "running" and status["victim"]["pid"] == victim["pid"]
    assert status["rogue"]["state"] == "running"
    # Root, from outside the workers, still controls.
    daemon.ctl("stop", "victim", "--wait")
    assert daemon.status()["victim"]["state"] == "stopped"
