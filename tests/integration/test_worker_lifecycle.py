"""Worker lifecycle under a real citadeld: restarts, backoff, fatal, policies, ordering, reload."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil
from conftest import free_port_run, wait_until

PY = sys.executable


def _events_of(daemon, worker: str) -> list[dict]:
    """State transitions of ``worker`` from citadeld's JSON log."""
    out = []
    for line in daemon.logs().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("worker") == worker and " -> " in rec["message"]:
            out.append(rec)
    return out


def test_crash_restarts_with_backoff(daemon_factory):
    daemon = daemon_factory(f"""
        [services.crashy]
        type = "command"
        command = ["{PY}", "-c", "import sys, time; print('boom: about to fail', flush=True); time.sleep(0.2); sys.exit(3)"]
        backoff_initial = 0.4
        backoff_max = 2.0
        start_limit_burst = 50
        """)
    status = daemon.wait_for(lambda s: s["crashy"] if s["crashy"]["restarts"] >= 3 else None,
                             timeout=30, what="3 restarts")
    assert status["last_exit"] == {"code": 3, "signal": None}
    assert "boom: about to fail" in status["last_lines"]
    messages = [e["message"] for e in _events_of(daemon, "crashy")]
    assert any("-> backoff" in m for m in messages)
    # The exit is logged with the worker's last lines, where an operator looks first.
    assert "exited (exit code 3)" in daemon.logs() and "boom: about to fail" in daemon.logs()
    spawns = [e for e in _events_of(daemon, "crashy") if "-> starting" in e["message"]]
    assert len(spawns) >= 3


def test_crash_loop_goes_fatal_and_manual_start_clears_it(daemon_factory):
    daemon = daemon_factory(f"""
        [services.loop]
        type = "command"
        command = ["{PY}", "-c", "raise SystemExit(1)"]
        backoff_initial = 0.05
        backoff_max = 0.1
        start_limit_burst = 3
        start_limit_interval = 60
        """)
    status = daemon.wait_state("loop", "fatal", timeout=20)
    assert status["restarts"] == 2
    assert status["pid"] is None
    spawns_before = _spawns(daemon, "loop")
    result = daemon.ctl("start", "loop")
    assert result.returncode == 0
    # A manual start clears fatal: it runs again (and fails its way back to fatal, maybe
    # faster than a status poll could see it leave: its spawns are counted in the log).
    wait_until(lambda: _spawns(daemon, "loop") > spawns_before, timeout=30, what="loop to be spawned again")
    daemon.wait_state("loop", "fatal", timeout=30)


def _spawns(daemon, worker: str) -> int:
    return sum("-> starting" in e["message"] for e in _events_of(daemon, worker))


def test_stable_worker_restarts_at_once(daemon_factory):
    daemon = daemon_factory(f"""
        [services.stable]
        type = "command"
        command = ["{PY}", "-c", "import time; time.sleep(3600)"]
        stable_after = 0.3
        backoff_initial = 60.0
        """)
    first = daemon.wait_state("stable", "running")
    time.sleep(0.5)
    killed = time.time()
    os.kill(first["pid"], signal.SIGKILL)
    second = daemon.wait_for(lambda s: s["stable"] if s["stable"]["pid"] not in (None, first["pid"])
                             and s["stable"]["state"] == "running" else None, timeout=30, what="respawn")
    # backoff_initial is 60 s: respawning well before that proves the stable fast path.
    assert psutil.Process(second["pid"]).create_time() - killed < 30.0
    assert second["restarts"] == 1


def test_restart_policies(daemon_factory):
    daemon = daemon_factory(f"""
        [services.never]
        type = "command"
        command = ["{PY}", "-c", "raise SystemExit(1)"]
        restart = "never"

        [services.onfail-ok]
        type = "command"
        command = ["{PY}", "-c", "raise SystemExit(0)"]
        restart = "on-failure"

        [services.onfail-bad]
        type = "command"
        command = ["{PY}", "-c", "raise SystemExit(2)"]
        restart = "on-failure"
        backoff_initial = 0.05
        start_limit_burst = 2
        """)
    daemon.wait_for(lambda s: s["never"]["state"] == "stopped" and s["never"]["last_exit"], what="never")
    daemon.wait_for(lambda s: s["onfail-ok"]["state"] == "stopped" and s["onfail-ok"]["last_exit"],
                    what="onfail-ok")
    status = daemon.wait_state("onfail-bad", "fatal")
    assert status["restarts"] == 1
    final = daemon.status()
    assert final["never"]["restarts"] == 0
    assert final["onfail-ok"]["restarts"] == 0
    assert final["onfail-ok"]["last_exit"] == {"code": 0, "signal": None}


def test_after_orders_startup_and_reverse_shutdown(daemon_factory, tmp_path):
    marker = tmp_path / "order.log"
    ready = tmp_path / "db-ready"
    (tmp_path / "db.py").write_text(
        "import pathlib, signal, sys, time\n"
        f"log = open({str(marker)!r}, 'a', buffering=1)\n"
        "log.write('db up\\n')\n"
        "def bye(*_):\n"
        "    log.write('db down\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "time.sleep(0.5)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "while True: time.sleep(1)\n")
    (tmp_path / "app.py").write_text(
        "import time\n"
        f"open({str(marker)!r}, 'a').write('app up\\n')\n"
        "while True: time.sleep(1)\n")
    daemon = daemon_factory(f"""
        [services.app]
        type = "command"
        command = ["{PY}", "{tmp_path / 'app.py'}"]
        after = ["db"]

        [services.db]
        type = "command"
        command = ["{PY}", "{tmp_path / 'db.py'}"]
        probes.startup = {{ kind = "exec", command = ["test", "-f", "{ready}"], period = 0.1 }}
        """)
    daemon.wait_state("app", "running")
    deadline = time.monotonic() + 10
    while len(marker.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text().splitlines()[:2] == ["db up", "app up"]
    app_pid = daemon.status()["app"]["pid"]
    assert daemon.stop() == 0
    # app stopped before db: app was gone when db wrote its goodbye.
    assert marker.read_text().splitlines()[-1] == "db down"
    assert not psutil.pid_exists(app_pid) or psutil.Process(app_pid).status() == psutil.STATUS_ZOMBIE


def test_replicas_get_their_own_names_and_ports(daemon_factory):
    port = free_port_run(2)
    daemon = daemon_factory(f"""
        [services.web]
        type = "command"
        command = ["{PY}", "-c", "import os, http.server as h; h.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), h.SimpleHTTPRequestHandler).serve_forever()"]
        replicas = 2
        port = {port}
        health = {{ http = "http://127.0.0.1:{port}/", period = 0.5 }}
        """)
    status = daemon.wait_state("web.1", "running")
    assert status["port"] == port + 1
    assert daemon.status()["web.0"]["port"] == port
    daemon.ctl("stop", "web", "--wait")
    assert {w["state"] for w in daemon.status().values()} == {"stopped"}


def test_reload_by_diff(daemon_factory):
    base = f"""
        [services.keep]
        type = "command"
        command = ["{PY}", "-c", "import time; time.sleep(3600)"]

        [services.change]
        type = "command"
        command = ["{PY}", "-c", "import time; time.sleep(3600)"]
        env = {{ VERSION = "1" }}

        [services.remove]
        type = "command"
        command = ["{PY}", "-c", "import time; time.sleep(3600)"]
        """
    daemon = daemon_factory(base)
    for name in ("keep", "change", "remove"):
        daemon.wait_state(name, "running")
    before = daemon.status()
    daemon.write_config(base.replace('VERSION = "1"', 'VERSION = "2"').replace("[services.remove]", "[services.added]"))
    daemon.signal(signal.SIGHUP)
    after = daemon.wait_for(lambda s: s if "added" in s and s["added"]["state"] == "running"
                            and s["change"]["state"] == "running" and s["change"]["pid"] != before["change"]["pid"]
                            else None, what="reload applied")
    assert after["keep"]["pid"] == before["keep"]["pid"], "an unchanged service was touched"
    assert "remove" not in after
    assert psutil.Process(after["change"]["pid"]).environ()["VERSION"] == "2"
    assert not psutil.pid_exists(before["remove"]["pid"]) or \
        psutil.Process(before["remove"]["pid"]).status() == psutil.STATUS_ZOMBIE

    # An invalid config changes nothing.
    daemon.write_config(base + "\n[services.bad]\ntype = \"command\"\ncommand = [\"/no/such/program\"]\n")
    result = daemon.ctl("reload", check=False)
    assert result.returncode == 1
    assert "services.bad.command" in result.stderr and "/no/such/program" in result.stderr
    still = daemon.status()
    assert {n: w["pid"] for n, w in still.items()} == {n: w["pid"] for n, w in after.items()}


def test_missing_program_at_spawn_is_reported(daemon_factory, tmp_path):
    program = tmp_path / "prog.sh"
    program.write_text("#!/bin/sh\nsleep 3600\n")
    program.chmod(0o755)
    daemon = daemon_factory(f"""
        [services.vanish]
        type = "command"
        command = ["{program}"]
        backoff_initial = 0.05
        start_limit_burst = 2
        """)
    daemon.wait_state("vanish", "running")
    program.unlink()
    daemon.ctl("restart", "vanish")
    status = daemon.wait_state("vanish", "fatal")
    assert "no such file" in status["last_error"]
