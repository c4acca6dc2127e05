"""The control API over its real Unix socket: answers, errors, limits, fuzzing, the OpenAPI document."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import CITADELD, RunningDaemon, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citadel_supervisor.control.access import AccessPolicy
from citadel_supervisor.control.client import ControlClient, ControlError
from citadel_supervisor.control.openapi import document
from citadel_supervisor.control.server import make_app

REPO = Path(__file__).resolve().parents[2]

# Worker names are unique per test run: citadeld names each worker's cgroup after the worker,
# under its own cgroup, and on a machine where every process shares one cgroup two daemons
# with a worker of the same name would kill each other's.
TAG = secrets.token_hex(3)
SOLO, SLEEPER = f"solo-{TAG}", f"sleeper-{TAG}"


def sleepers(solo: str = SOLO, sleeper: str = SLEEPER) -> str:
    """Two services of sleeping workers: ``sleeper`` (2 replicas) and ``solo``."""
    return f"""
[services.{sleeper}]
type = "command"
command = ["sleep", "600"]
replicas = 2

[services.{solo}]
type = "command"
command = ["sleep", "600"]
"""


def raw_request(path: Path, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes on the socket and read until the daemon closes it (HTTP/1.0: after the answer)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)  # no half-close: the daemon takes EOF as the caller leaving
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def http(path: Path, method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One HTTP/1.0 request; (status, decoded JSON body)."""
    head = f"{method} {url} HTTP/1.0\r\nHost: citadel\r\n"
    for key, value in (headers or {}).items():
        head += f"{key}: {value}\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    raw = raw_request(path, head.encode() + b"\r\n" + (body or b""))
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload) if payload.strip() else None


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: Any) -> Any:
    """One citadeld for the tests that leave its workers as they found them."""
    root = tmp_path_factory.mktemp("api")
    d = RunningDaemon(root, sleepers(), env={"CITADEL_CONTROL_READ_TIMEOUT": "1",
                                           "CITADEL_CONTROL_MAX_CONNECTIONS": "8"}).start()
    try:
        d.wait_for(lambda s: len(s) == 3 and all(w["state"] == "running" for w in s.values()),
                   what="all running")
        yield d
    finally:
        d.stop()


def test_status_answers_the_contract(daemon: RunningDaemon) -> None:
    data = ControlClient(str(daemon.socket)).call("GET", "/v1/status")
    assert [w["name"] for w in data["workers"]] == [f"{SLEEPER}.0", f"{SLEEPER}.1", SOLO]
    for w in data["workers"]:
        assert {"name", "service", "state", "pid", "restarts", "ready", "gpus", "port", "since",
                "last_exit"} <= set(w)
        assert w["state"] == "running" and isinstance(w["pid"], int) and w["ready"] is True


@pytest.mark.parametrize(("method", "url", "body", "status", "says"), [
    ("POST", "/v1/stop", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/stop", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/stop", b'{"names": "solo"}', 400, "list of strings"),
    ("POST", "/v1/stop", b'{"names": ["solo"], "wait": "yes"}', 400, "true or false"),
    ("POST", "/v1/stop", b'{"names": ["solo"], "force": true}', 400, "unknown keys: force"),
    ("POST", "/v1/stop", b"{}", 400, "give worker or service names"),
    ("POST", "/v1/stop", b'{"names": ["nosuch"]}', 404, "no service or worker named 'nosuch'"),
    ("POST", "/v1/stop", json.dumps({"names": [SLEEPER + "x"]}).encode(), 404, f"did you mean '{SLEEPER}'"),
    ("GET", "/v1/logs/nosuch", None, 404, "nosuch"),
    ("GET", f"/v1/logs/{SLEEPER}", None, 400, "has 2 workers"),
    ("GET", f"/v1/logs/{SOLO}?n=many", None, 400, "whole number"),
    ("GET", f"/v1/logs/{SOLO}?n=-1", None, 400, "negative"),
    ("GET", "/v1/events?follow=maybe", None, 400, "follow must be one of"),
    ("GET", "/v1/nothing", None, 404, "openapi.json"),
    ("GET", "/v2/status", None, 404, "no such API path"),
    ("DELETE", "/v1/status", None, 405, "allowed: GET"),
    ("GET", "/v1/stop", None, 405, "allowed: POST"),
    ("POST", "/v1/reload", b'{"dry": true}', 400, "no parameters"),
])
def test_malformed_requests_get_error_answers(daemon: RunningDaemon, method: str, url: str,
                                              body: bytes | None, status: int, says: str) -> None:
    code, data = http(daemon.socket, method, url, body)
    assert code == status, data
    assert says in data["error"]
    assert daemon.status()[SOLO]["state"] == "running"


def test_a_huge_body_is_refused_413(daemon: RunningDaemon) -> None:
    body = json.dumps({"names": ["x" * 100] * 1000}).encode()  # about 100 kB, over the 64 kB limit
    code, data = http(daemon.socket, "POST", "/v1/stop", body)
    assert code == 413
    assert "too large" in data["error"]
    assert daemon.status()[SOLO]["state"] == "running"


def test_garbage_bytes_on_the_socket(daemon: RunningDaemon) -> None:
    for garbage in (b"\x00\xff" * 500, b"GET\r\n\r\n", b"HELLO WORLD\r\n\r\n", os.urandom(4096),
                    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"GET /v1/status HTTP/1.1\r\n" + b"X-Long: " + b"a" * 100_000 + b"\r\n\r\n"):
        answer = raw_request(daemon.socket, garbage)
        assert answer == b"" or answer.split()[1].startswith(b"4"), answer[:100]
    assert daemon.status()[SOLO]["state"] == "running"


def test_a_stalled_client_does_not_hold_the_daemon(daemon: RunningDaemon) -> None:
    # half a request's headers, then nothing: the daemon answers others meanwhile, and
    # closes the stalled connection after the read timeout (1 s here).
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(daemon.socket))
    stalled.sendall(b"POST /v1/stop HTTP/1.1\r\nHost: citadel\r\nContent-Le")
    half_body = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half_body.connect(str(daemon.socket))
    half_body.sendall(b"POST /v1/stop HTTP/1.1\r\nHost: citadel\r\nContent-Length: 100\r\n\r\n{\"na")
    try:
        assert daemon.status()[SOLO]["state"] == "running"
        stalled.settimeout(10)
        assert stalled.recv(100) == b""  # closed by the daemon
        half_body.settimeout(10)
        answer = half_body.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408") or answer == b"", answer
    finally:
        stalled.close()
        half_body.close()
    assert daemon.status()[SOLO]["state"] == "running"


def _refusal(daemon: RunningDaemon) -> ControlError | None:
    """The error of one status call, or None when it was served."""
    try:
        ControlClient(str(daemon.socket)).call("GET", "/v1/status")
    except ControlError as exc:
        return exc
    return None


def test_connections_beyond_the_cap_get_503(daemon: RunningDaemon) -> None:
    idle = []
    try:
        for _ in range(8):  # CITADEL_CONTROL_MAX_CONNECTIONS=8 in this fixture
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket))
            idle.append(sock)
        # Until citadeld has accepted all eight, a ninth caller may still be served.
        refused = wait_until(lambda: _refusal(daemon), timeout=10, what="a caller over the cap refused")
        assert refused.status == 503
        assert "too many connections" in str(refused)
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # once they are gone, callers are served again
        try:
            ControlClient(str(daemon.socket)).call("GET", "/v1/status")
            break
        except ControlError:
            time.sleep(0.05)
    assert daemon.status()[SOLO]["state"] == "running"


def test_fifty_concurrent_clients_all_get_correct_answers(daemon_factory: Any) -> None:
    solo = f"solo-{secrets.token_hex(3)}"
    d = daemon_factory(sleepers(solo=solo, sleeper=f"sleeper-{secrets.token_hex(3)}"))
    d.wait_for(lambda s: len(s) == 3 and all(w["state"] == "running" for w in s.values()),
               what="all running")
    pids = {name: w["pid"] for name, w in d.status().items()}
    answers: list[Any] = [None] * 50
    barrier = threading.Barrier(50)

    def client(i: int) -> None:
        c = ControlClient(str(d.socket))
        barrier.wait()
        if i % 5 == 0:  # some act: starting what runs changes nothing
            answers[i] = c.call("POST", "/v1/start", {"names": [solo]})
        elif i % 5 == 1:
            answers[i] = c.call("GET", "/v1/version")
        else:
            answers[i] = c.call("GET", "/v1/status")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, answer in enumerate(answers):
        assert answer is not None, f"client {i} got no answer"
        if i % 5 == 0:
            assert answer["workers"][0]["name"] == solo and answer["workers"][0]["pid"] == pids[solo]
        elif i % 5 == 1:
            assert answer["pid"] == d.proc.pid
        else:
            assert {w["name"]: w["pid"] for w in answer["workers"]} == pids


def test_a_stale_socket_is_replaced(daemon_factory: Any) -> None:
    solo = f"solo-{secrets.token_hex(3)}"
    d = daemon_factory(sleepers(solo=solo, sleeper=f"sleeper-{secrets.token_hex(3)}"), start=False)
    d.socket.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d.socket))  # a socket file with nobody listening, as a killed citadeld leaves
    stale.close()
    assert d.socket.exists()
    d.start()
    assert d.status()[solo]["pid"]
    assert "replacing stale control socket" in d.logs()


def test_a_live_socket_means_the_second_citadeld_refuses(daemon: RunningDaemon) -> None:
    pids = {name: w["pid"] for name, w in daemon.status().items()}
    # Another state_dir, so that the lock (test_lockout.py) lets it reach the socket check.
    config = daemon.root / "second.toml"
    config.write_text(daemon.config.read_text().replace(f'state_dir = "{daemon.root / "run"}"',
                                                        f'state_dir = "{daemon.root / "run2"}"'))
    second = subprocess.run([CITADELD, "--config", str(config)], check=False, capture_output=True,
                            text=True, timeout=30)
    assert second.returncode != 0
    assert "another citadeld is running" in second.stderr
    assert str(daemon.socket) in second.stderr
    # the first one's workers were not touched
    assert {name: w["pid"] for name, w in daemon.status().items()} == pids


def test_the_socket_is_0660_in_a_folder_that_is_not_world_writable(daemon: RunningDaemon) -> None:
    assert daemon.socket.stat().st_mode & 0o777 == 0o660
    assert not daemon.socket.parent.stat().st_mode & 0o002


def test_a_world_writable_socket_folder_is_refused(daemon_factory: Any) -> None:
    d = daemon_factory(sleepers(f"solo-{secrets.token_hex(3)}", f"sleeper-{secrets.token_hex(3)}"),
                       start=False)
    d.socket.parent.mkdir(parents=True)
    d.socket.parent.chmod(0o777)
    with pytest.raises(RuntimeError, match="exited 1"):
        d.start()
    assert "world-writable" in d.logs()


# -- fuzzing ---------------------------------------------------------------------

FUZZ_SOLO, FUZZ_SLEEPER = f"solo-{secrets.token_hex(3)}", f"sleeper-{secrets.token_hex(3)}"

_NAMES = st.sampled_from([FUZZ_SOLO, FUZZ_SLEEPER, f"{FUZZ_SLEEPER}.0", "nosuch", "", "../..", "s\x00lo", "ü"])
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
_BODIES = (
    st.fixed_dictionaries({}, optional={"names": st.lists(_NAMES, max_size=3) | _JSON,
                                        "all": _JSON, "wait": st.just(False) | _JSON,
                                        "rolling": _JSON})
    | _JSON
)
_PATHS = st.sampled_from(["/v1/start", "/v1/stop", "/v1/restart", "/v1/reload", "/v1/status",
                          "/v1/version", "/v1/plugins", f"/v1/logs/{FUZZ_SOLO}?n=3", "/v1/logs/%00",
                          "/v1/openapi.json", "/v1/", "/", "/v1/status/../stop"]) | st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda t: "/" + t)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "BREW"]),
       path=_PATHS, body=_BODIES | st.binary(max_size=200).map(lambda b: {"raw": b}),
       junk_header=st.booleans())
def test_fuzzed_requests_never_crash_the_daemon(fuzz_daemon: RunningDaemon, method: str, path: str,
                                                body: Any, junk_header: bool) -> None:
    # "all": true would stop or restart everything; keep the fuzzer's actions on named workers.
    if isinstance(body, dict) and "raw" in body and isinstance(body["raw"], bytes):
        payload = body["raw"]
    else:
        if isinstance(body, dict) and body.get("all") is True:
            body["all"] = False
        payload = json.dumps(body).encode()
    headers = {"X-Junk": "\x7f;;=="} if junk_header else {}
    head = f"{method} {path} HTTP/1.0\r\nHost: citadel\r\nContent-Length: {len(payload)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    answer = raw_request(fuzz_daemon.socket, head.encode() + b"\r\n" + payload)
    if answer:
        status = int(answer.split()[1])
        assert status < 500 or status == 503, answer[:300]
        if status >= 400 and method != "HEAD" and b"application/json" in answer.split(b"\r\n\r\n")[0]:
            assert "error" in json.loads(answer.partition(b"\r\n\r\n")[2])
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: Any) -> Any:
    root = tmp_path_factory.mktemp("fuzz")
    d = RunningDaemon(root, sleepers(FUZZ_SOLO, FUZZ_SLEEPER),
                      env={"CITADEL_CONTROL_READ_TIMEOUT": "2"}).start()
    yield d
    # after the fuzzing, it still answers `status`
    assert d.ctl("status").returncode == 0
    assert "internal error" not in d.logs()
    d.stop()


# -- the OpenAPI document ---------------------------------------------------------------


class _NoExtraRoutes:
    """Just enough of a Daemon to build the app: no routes added by parts or plugins."""

    def control_routes(self) -> list[Any]:
        return []


def test_the_openapi_document_describes_every_route_and_no_other() -> None:
    app = make_app(_NoExtraRoutes(), AccessPolicy(frozenset(), frozenset()))  # type: ignore[arg-type]
    served = {(r.method, r.resource.canonical) for r in app.router.routes()  # type: ignore[union-attr]
              if r.method != "HEAD"}
    doc = document()
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == described
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["summary"] and "200" in op["responses"] and "403" in op["responses"]


def test_docs_openapi_json_is_the_generated_document() -> None:
    generated = subprocess.run([sys.executable, "-m", "citadel_supervisor.control.openapi"],
                               capture_output=True, text=True, check=True).stdout
    assert json.loads((REPO / "docs" / "openapi.json").read_text()) == json.loads(generated), (
        "docs/openapi.json is stale: python -m citadel_supervisor.control.openapi > docs/openapi.json")


def test_the_daemon_serves_its_openapi_document(daemon: RunningDaemon) -> None:
    doc = ControlClient(str(daemon.socket)).call("GET", "/v1/openapi.json")
    assert doc["openapi"].startswith("3.")
    assert {"/v1/status", "/v1/start", "/v1/reload", "/v1/events"} <= set(doc["paths"])
    assert set(document()["paths"]) <= set(doc["paths"])  # plus what other modules added
    for path, ops in doc["paths"].items():  # every path it describes is served
        url = path.replace("{name}", SOLO) + ("?follow=0" if path == "/v1/events" else "")
        for method in ops:
            code, data = http(daemon.socket, method.upper(), url, b"[]" if method == "post" else None)
            assert code == (400 if method == "post" else 200), (path, data)


def test_an_answer_sent_before_the_request_is_read_still_reaches_the_caller(tmp_path: Path) -> None:
    """citadeld answers a connection over its cap at once and hangs up: the caller's send
    then fails (EPIPE), but the 503 waits in its socket and is what it reports."""
    path = tmp_path / "refuser.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def refuse_one() -> None:
        conn, _ = server.accept()
        body = b'{"error": "too many connections to citadeld; try again"}'
        conn.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        conn.close()  # without reading the request

    refuser = threading.Thread(target=refuse_one)
    refuser.start()
    try:
        # A body larger than the socket's buffers: the send cannot finish before the hang-up.
        with pytest.raises(ControlError) as refused:
            ControlClient(str(path), timeout=10).call("POST", "/v1/start", {"names": ["x" * 4_000_000]})
        assert refused.value.status == 503 and "too many connections" in str(refused.value)
    finally:
        refuser.join(10)
        server.close()
