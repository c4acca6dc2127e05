"""Models on demand under a real citadeld: idle workers, idle stop, swap groups, sleep and wake
(against a stand-in that implements vLLM's sleep endpoints), and who may ask for a start."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port, vllm_standin_service, wait_until

from citadel_supervisor.control.client import ControlClient, ControlError

PY = sys.executable
SERVE = f'["{PY}", "-c", "import http.server as h; h.test(h.SimpleHTTPRequestHandler, port=int(__import__(\'os\').environ[\'PORT\']), bind=\'127.0.0.1\')"]'


def _http_service(name: str, port: int, extra: str = "") -> str:
    return f"""
        [services.{name}]
        type = "command"
        command = {SERVE}
        env = {{ PORT = "{port}" }}
        health = {{ http = "http://127.0.0.1:{port}/" }}
        stop_timeout = 5
        {extra}
        """


def _client(daemon) -> ControlClient:
    return ControlClient(str(daemon.socket))


def test_an_on_demand_service_waits_idle_then_starts_and_idles_out(daemon_factory):
    port = free_port()
    daemon = daemon_factory(_http_service("lazy", port, 'start = "on-demand"\nidle_stop = 1'))
    lazy = daemon.status()["lazy"]
    assert lazy["state"] == "idle" and lazy["pid"] is None
    assert lazy["demand"]["down_reason"] == "on demand: not requested yet"
    assert "idle (on demand: not requested yet)" in daemon.ctl("status").stdout

    answer = _client(daemon).call("POST", "/v1/demand", {"start": ["lazy"]})
    assert [w["name"] for w in answer["workers"]] == ["lazy"]
    daemon.wait_state("lazy", "running")
    # Nothing uses it: after idle_stop it is stopped into idle, saying why, not failed.
    idle = daemon.wait_state("lazy", "idle", timeout=15)
    assert idle["demand"]["down_reason"] == "idle for 1s"
    assert idle["last_failure"] is None and idle["restarts"] == 0


def test_used_reports_keep_a_worker_up_and_never_start_one(daemon_factory):
    port = free_port()
    daemon = daemon_factory(_http_service("kept", port, 'start = "on-demand"\nidle_stop = 2'))
    client = _client(daemon)
    client.call("POST", "/v1/demand", {"used": {"kept": 0}})
    assert daemon.status()["kept"]["state"] == "idle"  # 'used' alone starts nothing
    client.call("POST", "/v1/demand", {"start": ["kept"]})
    daemon.wait_state("kept", "running")
    # Requests in flight keep it up past idle_stop, however long they take.
    client.call("POST", "/v1/demand", {"used": {"kept": 1}})
    running = daemon.status()["kept"]
    assert running["demand"]["in_flight"] == 1
    client.call("POST", "/v1/demand", {"used": {"kept": 0}})
    daemon.wait_state("kept", "idle", timeout=15)


def test_requests_that_bypass_the_gateway_count_as_use(daemon_factory, tmp_path):
    """No gateway reports here: the worker's own counters, read by its progress probe, show
    the clients that talk to its port directly. They keep it up past idle_stop (ten probe
    periods); once they stop, it idles out."""
    port = free_port()
    daemon = daemon_factory(vllm_standin_service(tmp_path, port, """
        start = "on-demand"
        idle_stop = 5
        stall_timeout = 2
        """), env={"STANDIN_LOG": str(tmp_path / "standin.log")})
    _client(daemon).call("POST", "/v1/demand", {"start": ["chat"]})
    running = daemon.wait_state("chat", "running", timeout=30)
    assert running["probes"]["liveness"]["kind"] == "progress"
    pid = running["pid"]
    clients_until = time.monotonic() + 12  # more than twice idle_stop
    while time.monotonic() < clients_until:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        time.sleep(0.2)  # a client's pace between its requests, not a wait for a condition
    kept = daemon.status()["chat"]
    assert kept["state"] == "running" and kept["pid"] == pid, kept
    idle = daemon.wait_state("chat", "idle", timeout=30)
    assert idle["demand"]["down_reason"] == "idle for 5s" and idle["last_failure"] is None


def test_an_operators_stop_is_not_undone_by_demand(daemon_factory):
    port = free_port()
    daemon = daemon_factory(_http_service("held", port, 'start = "on-demand"'))
    daemon.ctl("stop", "held")
    daemon.wait_state("held", "stopped")
    _client(daemon).call("POST", "/v1/demand", {"start": ["held"]})
    assert daemon.status()["held"]["state"] == "stopped"
    daemon.ctl("start", "held", "--wait")
    assert daemon.status()["held"]["state"] == "running"


def test_a_swap_group_evicts_the_least_recently_used(daemon_factory):
    ports = [free_port() for _ in range(3)]
    exporter = free_port()
    daemon = daemon_factory(f"""
        [exporter]
        listen = "127.0.0.1:{exporter}"
        [swap_groups.gpu0]
        max_running = 2
        """ + _http_service("a", ports[0], 'swap_group = "gpu0"')
        + _http_service("b", ports[1], 'swap_group = "gpu0"\nstart = "on-demand"')
        + _http_service("c", ports[2], 'swap_group = "gpu0"\nstart = "on-demand"'))
    daemon.wait_state("a", "running")
    client = _client(daemon)
    client.call("POST", "/v1/demand", {"start": ["b"]})
    daemon.wait_state("b", "running")
    # The group is full; a was used before b (its start), so c's start evicts a.
    wait_until(lambda: daemon.status()["b"]["demand"]["last_used"] > daemon.status()["a"]["demand"]["last_used"],
               what="b to be used after a")
    events = client.open_stream("/v1/events")[0]
    client.call("POST", "/v1/demand", {"start": ["c"]})
    daemon.wait_state("c", "running", timeout=30)
    status = daemon.status()
    assert status["a"]["state"] == "idle" and status["a"]["demand"]["down_reason"] == "evicted for c"
    assert status["b"]["state"] == "running"
    evict = wait_until(lambda: next((e for e in map(json.loads, events) if e["kind"] == "evict"), None),
                       what="the evict event")
    assert evict["worker"] == "a" and evict["detail"] == {"group": "gpu0", "for": "c"}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{exporter}/metrics", timeout=10).read().decode()
    assert 'citadel_swap_evictions_total{group="gpu0",service="a",worker="a"} 1.0' in metrics
    assert 'citadel_worker_down_reason{reason="evicted",service="a",worker="a"} 1.0' in metrics
    assert 'citadel_worker_state{service="a",state="idle",worker="a"} 1.0' in metrics
    assert 'citadel_demand_starts_total{how="start",service="c",worker="c"} 1.0' in metrics
    assert 'citadel_demand_ready_seconds_count{service="c"} 1.0' in metrics
    # citadelctl start of an idle member makes room the same way.
    daemon.ctl("start", "a", "--wait")
    after = daemon.status()
    assert after["a"]["state"] == "running"
    assert sum(after[n]["state"] == "running" for n in "abc") == 2


def test_a_worker_cannot_ask_for_starts_without_a_grant(daemon_factory, tmp_path):
    port = free_port()
    out = tmp_path / "answer.json"
    asker = (f'import json\nfrom citadel_supervisor.control.client import ControlClient, ControlError\n'
             f'try:\n    ControlClient({str(tmp_path / "d0" / "run" / "control.sock")!r}).call('
             f'"POST", "/v1/demand", {{"start": ["lazy"]}})\n    r = "allowed"\n'
             f'except ControlError as e:\n    r = [e.status, str(e)]\n'
             f'open({str(out)!r}, "w").write(json.dumps(r))\n'
             'import time\ntime.sleep(600)\n')
    daemon = daemon_factory(_http_service("lazy", port, 'start = "on-demand"') + f"""
        [services.asker]
        type = "command"
        command = ["{PY}", "-c", {json.dumps(asker)}]
        stop_timeout = 2
        """)
    answer = json.loads(wait_until(lambda: out.exists() and out.read_text(), what="the worker's attempt"))
    assert answer[0] == 403 and "may start or wake only" in answer[1] and "asker" in answer[1]
    assert daemon.status()["lazy"]["state"] == "idle"


def _requests(log: Path) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if "path" in r]


def test_sleep_and_wake_at_level_1_through_the_standin(daemon_factory, tmp_path):
    log = tmp_path / "standin.log"
    daemon = daemon_factory(vllm_standin_service(tmp_path, free_port(), "sleep = 1"),
                            env={"STANDIN_LOG": str(log)})
    running = daemon.wait_state("chat", "running", timeout=30)
    first = json.loads(log.read_text().splitlines()[0])
    assert first["dev_mode"] is True and "--enable-sleep-mode" in first["argv"]
    daemon.ctl("sleep", "chat", "--wait")
    asleep = daemon.status()["chat"]
    assert asleep["state"] == "asleep" and asleep["pid"] == running["pid"] and not asleep["ready"]
    assert asleep["demand"]["down_reason"] == "put to sleep by citadelctl"
    assert [(r["path"], r["query"]) for r in _requests(log)][-1] == ("/sleep", "level=1")
    before = len(_requests(log))
    daemon.ctl("wake", "chat", "--wait")
    awake = daemon.status()["chat"]
    assert awake["state"] == "running" and awake["ready"] and awake["pid"] == running["pid"]
    # Level 1 wakes in one call, and readiness waited for a first request served.
    assert [r["path"] for r in _requests(log)[before:]][:2] == ["/wake_up", "/v1/completions"]
    assert awake["demand"]["wakes"] == 1 and awake["demand"]["sleeps"] == 1


def test_waking_from_level_2_reloads_the_weights(daemon_factory, tmp_path):
    log = tmp_path / "standin.log"
    daemon = daemon_factory(vllm_standin_service(tmp_path, free_port(), "sleep = 2"),
                            env={"STANDIN_LOG": str(log)})
    daemon.wait_state("chat", "running", timeout=30)
    daemon.ctl("sleep", "chat", "--wait")
    before = len(_requests(log))
    daemon.ctl("wake", "chat", "--wait")
    calls = [(r["path"], r["query"], r["body"]) for r in _requests(log)[before:]]
    assert [(p, q) for p, q, _ in calls[:5]] == [
        ("/wake_up", "tags=weights"), ("/collective_rpc", ""), ("/wake_up", "tags=kv_cache"),
        ("/reset_prefix_cache", ""), ("/v1/completions", "")]
    assert json.loads(calls[1][2]) == {"method": "reload_weights"}


def test_a_build_without_sleep_mode_is_stopped_and_started_instead(daemon_factory, tmp_path):
    log = tmp_path / "standin.log"
    daemon = daemon_factory(vllm_standin_service(tmp_path, free_port(), "sleep = 1"),
                            env={"STANDIN_LOG": str(log), "STANDIN_NO_SLEEP": "1"})
    daemon.wait_state("chat", "running", timeout=30)
    first = json.loads(log.read_text().splitlines()[0])
    assert first["dev_mode"] is False and "--enable-sleep-mode" not in first["argv"]
    daemon.ctl("sleep", "chat", "--wait")
    idle = daemon.status()["chat"]
    assert idle["state"] == "idle" and idle["pid"] is None
    assert daemon.logs().count("stopped and started instead of sleeping") == 1
    daemon.ctl("wake", "chat", "--wait")
    assert daemon.status()["chat"]["state"] == "running"


def test_the_sleep_endpoints_need_a_loopback_host(daemon_factory, tmp_path):
    daemon = daemon_factory(vllm_standin_service(tmp_path, free_port(), 'sleep = 1\nhost = "0.0.0.0"'),
                            start=False)
    done = __import__("subprocess").run([str(Path(PY).parent / "citadeld"), "--check", "--config",
                                         str(daemon.config)], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "services.chat: sleep = 1 serves vLLM's development endpoints" in done.stderr
    assert "host must be loopback" in done.stderr


def test_control_error_names_the_unknown_service(daemon_factory):
    daemon = daemon_factory(_http_service("lazy", free_port(), 'start = "on-demand"'))
    try:
        _client(daemon).call("POST", "/v1/demand", {"start": ["nope"]})
    except ControlError as exc:
        assert exc.status == 404 and "nope" in str(exc)
    else:
        raise AssertionError("an unknown service was accepted")
    assert os.path.exists(daemon.socket)
