"""Rolling restarts: a service with replicas never has zero ready workers.

A poller thread samples ``GET /v1/status`` every few milliseconds throughout
the restart (by hand with ``citadelctl restart NAME --rolling``, and by a
reload that changes the service) and records how many replicas were ready.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conftest import RunningDaemon

from citadel_supervisor.control.client import ControlClient

if TYPE_CHECKING:
    from typing import Self

# Serves 200 on $PORT, but only READY_AFTER seconds after it starts, like a model server loading.
SLOW_SERVER = """
import http.server, os, time
time.sleep(float(os.environ.get("READY_AFTER", "0.8")))
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Ok).serve_forever()
"""


def service(name: str, script: Path, replicas: int = 3, version: str = "1") -> str:
    """A command service of slow-to-ready HTTP servers with startup and readiness probes."""
    return f"""
[services.{name}]
type = "command"
command = ["{sys.executable}", "{script}"]
port = 0
replicas = {replicas}
stop_timeout = 5
env = {{ VERSION = "{version}" }}
probes.startup = {{ kind = "http", path = "/", period = 0.1, timeout = 1 }}
probes.readiness = {{ kind = "http", path = "/", period = 0.2, timeout = 1 }}
"""


class ReadinessPoller:
    """Samples the number of ready workers of a service until stopped."""

    def __init__(self, socket: Path, service: str):
        self.client = ControlClient(str(socket), timeout=10)
        self.service = service
        self.samples: list[int] = []
        self.pids: list[set[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            workers = [w for w in self.client.call("GET", "/v1/status")["workers"]
                       if w["service"] == self.service]
            self.samples.append(sum(1 for w in workers if w["ready"]))
            self.pids.append({w["pid"] for w in workers if w["pid"]})
            time.sleep(0.01)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def start(daemon_factory: Any, tmp_path: Path, replicas: int = 3) -> tuple[RunningDaemon, str, Path]:
    script = tmp_path / "slow_server.py"
    script.write_text(SLOW_SERVER)
    name = f"api-{secrets.token_hex(3)}"  # unique: worker cgroups are named after workers
    d = daemon_factory(service(name, script, replicas))
    d.wait_for(lambda s: sum(1 for w in s.values() if w["ready"]) == replicas, timeout=30,
               what="every replica ready")
    return d, name, script


def _pids(d: RunningDaemon, name: str) -> set[int]:
    return {w["pid"] for w in d.status().values() if w["service"] == name}


def test_restart_rolling_keeps_a_replica_ready(daemon_factory: Any, tmp_path: Path) -> None:
    d, name, _ = start(daemon_factory, tmp_path)
    before = _pids(d, name)
    with ReadinessPoller(d.socket, name) as poller:
        result = d.ctl("restart", name, "--rolling", timeout=60)
    after = _pids(d, name)
    assert not before & after, "every replica got a new process"
    assert len(after) == 3
    assert min(poller.samples) >= 1, f"zero ready replicas at some point: {poller.samples}"
    assert min(poller.samples) < 3, "the poller saw the restarts (replicas went unready)"
    assert result.stdout.count(": running") == 3
    assert "stopping" in result.stderr  # the progress it showed


def test_a_plain_restart_does_take_the_service_down(daemon_factory: Any, tmp_path: Path) -> None:
    # The poller can see an outage: without --rolling every replica restarts at once.
    d, name, _ = start(daemon_factory, tmp_path)
    with ReadinessPoller(d.socket, name) as poller:
        d.ctl("restart", name, "--wait", timeout=60)
    assert min(poller.samples) == 0


def test_a_reload_that_changes_the_service_restarts_it_rolling(daemon_factory: Any, tmp_path: Path) -> None:
    d, name, script = start(daemon_factory, tmp_path)
    before = _pids(d, name)
    d.write_config(service(name, script, version="2"))
    with ReadinessPoller(d.socket, name) as poller:
        result = d.ctl("reload", timeout=60, check=False)
    assert result.stdout.strip() == f"changed: {name}", f"{result}\n{d.logs()[-5000:]}"
    after = _pids(d, name)
    assert not before & after and len(after) == 3
    assert min(poller.samples) >= 1, f"zero ready replicas at some point: {poller.samples}"
    assert min(poller.samples) < 3
