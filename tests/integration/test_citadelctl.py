"""``citadelctl`` as an operator runs it: real processes against a real citadeld."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import CITADELCTL, RunningDaemon, free_port, vllm_standin_service

from citadel_supervisor.cli.citadelctl import status_table
from citadel_supervisor.control.client import ControlClient

# Worker names are unique per run: citadeld names worker cgroups after workers, and daemons of
# other tests on this machine may share the cgroup they are made under.
TAG = secrets.token_hex(3)
TALKER, PAIR, SLOW = f"talker-{TAG}", f"pair-{TAG}", f"slow-{TAG}"

SERVICES = f"""
[services.{TALKER}]
type = "command"
command = ["sh", "-c", "echo hello from $CITADEL_WORKER; while true; do echo tick; sleep 0.2; done"]

[services.{PAIR}]
type = "command"
command = ["sleep", "600"]
replicas = 2

[services.{SLOW}]
type = "command"
command = ["sleep", "600"]
startup_timeout = 600
probes.startup = {{ kind = "tcp", address = "127.0.0.1:9", period = 0.5 }}
"""

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ctl(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """citadelctl with exactly the arguments given (no --socket added)."""
    return subprocess.run([CITADELCTL, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: Any) -> Any:
    d = RunningDaemon(tmp_path_factory.mktemp("ctl"), SERVICES).start()
    try:
        d.wait_for(lambda s: len(s) == 4 and s[TALKER]["state"] == "running"
                   and s[f"{PAIR}.1"]["state"] == "running" and s[SLOW]["state"] == "starting",
                   what="workers up")
        yield d
    finally:
        d.stop()


# -- status ---------------------------------------------------------------------


def test_status_prints_the_table(daemon: RunningDaemon) -> None:
    out = daemon.ctl("status").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PID", "GPUS", "PORT", "UPTIME", "RESTARTS", "READY"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {TALKER, f"{PAIR}.0", f"{PAIR}.1", SLOW}
    pid = daemon.status()[TALKER]["pid"]
    assert rows[TALKER].split()[1:3] == ["running", str(pid)]
    assert rows[TALKER].split()[-1] == "yes"
    # a starting worker says for how long it has been starting
    assert re.search(r"starting \(for \d+[smhd]", rows[SLOW]), rows[SLOW]
    assert rows[SLOW].split()[-1] == "no"
    assert not ANSI.search(out), "no colour when stdout is not a terminal"


def test_status_is_coloured_on_a_terminal(daemon: RunningDaemon) -> None:
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.Popen([CITADELCTL, "--socket", str(daemon.socket), "status"], stdout=follower,
                            stderr=subprocess.PIPE, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(30) == 0
    out = b"".join(chunks).decode()
    assert "\x1b[32mrunning" in out  # green


def test_status_table_shows_phase_and_exit() -> None:
    now = 1000.0
    base = {"pid": None, "gpus": [], "port": None, "uptime": None, "restarts": 0, "ready": False,
            "last_exit": None}
    table = status_table([
        {**base, "name": "chat", "service": "chat", "state": "starting", "since": now - 75,
         "phase": "loading weights", "pid": 42, "gpus": [0, 1], "port": 8001, "uptime": 75.0},
        {**base, "name": "tool", "service": "tool", "state": "fatal", "since": now, "restarts": 5,
         "last_exit": {"code": 3, "signal": None}},
    ], colour=False, now=now)
    lines = table.splitlines()
    assert "starting (for 1m15s, loading weights)" in lines[1]
    assert lines[1].split()[-5:] == ["0,1", "8001", "1m15s", "0", "no"]
    assert "fatal (exit 3)" in lines[2]


def test_status_json_is_the_contract(daemon: RunningDaemon) -> None:
    data = json.loads(daemon.ctl("status", "--json").stdout)
    assert list(data) == ["workers"]
    assert [w["name"] for w in data["workers"]] == [TALKER, f"{PAIR}.0", f"{PAIR}.1", SLOW]
    for w in data["workers"]:
        assert isinstance(w["name"], str) and isinstance(w["service"], str)
        assert w["state"] in ("stopped", "starting", "running", "backoff", "stopping", "fatal")
        assert w["pid"] is None or isinstance(w["pid"], int)
        assert isinstance(w["restarts"], int) and isinstance(w["ready"], bool)
        assert isinstance(w["gpus"], list)
        assert w["port"] is None or isinstance(w["port"], int)
        assert isinstance(w["since"], float) and abs(w["since"] - time.time()) < 3600
        assert w["last_exit"] is None or set(w["last_exit"]) >= {"code", "signal"}
    assert data["workers"][1]["service"] == PAIR


def test_status_of_names(daemon: RunningDaemon) -> None:
    data = json.loads(daemon.ctl("status", "--json", PAIR).stdout)
    assert [w["name"] for w in data["workers"]] == [f"{PAIR}.0", f"{PAIR}.1"]
    missing = daemon.ctl("status", "nosuch", check=False)
    assert missing.returncode == 2 and "no worker or service named nosuch" in missing.stderr


# -- picking the socket, and exit code 3 ------------------------------------------------------


def test_exit_3_when_the_daemon_is_not_reachable(tmp_path: Path) -> None:
    gone = ctl("--socket", str(tmp_path / "none.sock"), "status")
    assert gone.returncode == 3
    assert "not reachable" in gone.stderr and str(tmp_path / "none.sock") in gone.stderr
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # a socket file nobody listens on
    result = ctl("--socket", str(stale), "stop", "--all")
    assert result.returncode == 3 and "not reachable" in result.stderr


def test_citadel_socket_env_and_config_pick_the_socket(daemon: RunningDaemon, tmp_path: Path) -> None:
    assert ctl("status", env={"CITADEL_SOCKET": str(daemon.socket)}).returncode == 0
    assert ctl("--config", str(daemon.config), "status").returncode == 0
    # --socket wins over the environment
    other = ctl("--socket", str(tmp_path / "x.sock"), "status", env={"CITADEL_SOCKET": str(daemon.socket)})
    assert other.returncode == 3


def test_usage_errors_exit_2(daemon: RunningDaemon) -> None:
    for args in (["stop"], ["stop", "--all", TALKER], ["status", "--bogus"], ["frobnicate"],
                 ["restart", "nosuch"], ["logs", TALKER, "-n", "-3"]):
        result = daemon.ctl(*args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip(), args


# -- reading -------------------------------------------------------------------------------


def _interruptible() -> None:
    # A background job (CI) starts with SIGINT ignored, and Python keeps it so:
    # give the child the terminal's default, as a user pressing Ctrl-C has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_logs(daemon: RunningDaemon) -> None:
    out = daemon.ctl("logs", TALKER, "-n", "1000").stdout.splitlines()
    assert out[0] == f"hello from {TALKER}" and "tick" in out
    assert daemon.ctl("logs", TALKER, "-n", "2").stdout.splitlines() == ["tick", "tick"]
    proc = subprocess.Popen([CITADELCTL, "--socket", str(daemon.socket), "logs", TALKER, "-n", "0", "-f"],
                            stdout=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "tick\n"  # new lines as they come
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0, "Ctrl-C should end the follow cleanly"


def test_events_snapshot_then_follow(daemon: RunningDaemon) -> None:
    snapshot = [json.loads(line) for line in daemon.ctl("events").stdout.splitlines()]
    assert {e["name"] for e in snapshot} == {TALKER, f"{PAIR}.0", f"{PAIR}.1", SLOW}
    assert all(e["kind"] == "snapshot" for e in snapshot)
    proc = subprocess.Popen([CITADELCTL, "--socket", str(daemon.socket), "events", "-f"],
                            stdout=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        assert proc.stdout is not None
        for _ in snapshot:
            proc.stdout.readline()
        daemon.ctl("restart", f"{PAIR}.0")
        event = json.loads(proc.stdout.readline())
        assert (event["kind"], event["worker"], event["old_state"], event["state"]) == (
            "state", f"{PAIR}.0", "running", "stopping")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0, "Ctrl-C should end the follow cleanly"


def test_version_and_plugins(daemon: RunningDaemon) -> None:
    out = daemon.ctl("version").stdout
    assert out.startswith("citadelctl 0.") and f"(pid {daemon.proc.pid}, API v1)" in out
    plugins = daemon.ctl("plugins").stdout
    assert re.search(r"^command\s+loaded", plugins, re.MULTILINE)
    data = json.loads(daemon.ctl("plugins", "--json").stdout)
    command = next(p for p in data["plugins"] if p["name"] == "command")
    assert "citadel_service_types" in command["hooks"]


def _served(daemon: RunningDaemon) -> set[str]:
    """The paths this citadeld serves, from its OpenAPI document."""
    return set(ControlClient(str(daemon.socket)).call("GET", "/v1/openapi.json")["paths"])


def test_health(daemon: RunningDaemon) -> None:
    data = json.loads(daemon.ctl("health", "--json", check=False).stdout)
    assert data["status"] in ("pass", "warn", "fail")
    result = daemon.ctl("health", check=False)
    assert result.stdout.startswith(f"status: {data['status']}")
    assert result.returncode == (1 if data["status"] == "fail" else 0)


def test_engines_shows_each_vllm_workers_load(daemon_factory: Any, tmp_path: Path) -> None:
    """``citadelctl engines`` reads a running vllm worker's /metrics through citadeld: the
    worker is the vLLM STAND-IN serving a recorded vLLM page (2 running, 0 waiting, KV
    cache 3.21%, 20480 of 48211 prefix tokens hit)."""
    page = Path(__file__).parents[1] / "fixtures" / "vllm_metrics_standin.txt"
    d = daemon_factory(vllm_standin_service(tmp_path, free_port(), "stall_timeout = 0"),
                       env={"STANDIN_LOG": str(tmp_path / "standin.log"), "STANDIN_METRICS": str(page)})
    d.wait_for(lambda s: s["chat"]["ready"], 30, "the stand-in to be ready")
    data = json.loads(d.ctl("engines", "--json").stdout)
    [engine] = data["engines"]
    assert engine["worker"] == "chat" and engine["running"] == 2 and engine["waiting"] == 0
    assert (engine["prefix_cache_queries"], engine["prefix_cache_hits"]) == (48211, 20480)
    header, row = d.ctl("engines").stdout.splitlines()
    assert header.split() == ["WORKER", "SERVICE", "WAITING", "RUNNING", "KV-CACHE", "PREFIX-HITS", "AGE", "ERROR"]
    assert row.split()[:6] == ["chat", "chat", "0", "2", "3.2%", "42.5%"], row
    d.ctl("stop", "chat", "--wait")
    assert d.ctl("engines").stdout == "no running vLLM worker\n"


def test_gpus_without_gpus(daemon: RunningDaemon) -> None:
    data = json.loads(daemon.ctl("gpus", "--json").stdout)
    assert data["available"] is False and data["gpus"] == []
    assert daemon.ctl("gpus").stdout.startswith("no GPUs: ")


def test_gpus_with_the_fake_nvml(daemon_factory: Any) -> None:
    # This machine has no GPU: a FAKE NVML (CITADEL_FAKE_NVML) describes 8 of them.
    name = f"pinned-{secrets.token_hex(3)}"
    d = daemon_factory(f"""
        [services.{name}]
        type = "command"
        command = ["sleep", "600"]
        gpus = [1]
        """, env={"CITADEL_FAKE_NVML": str(Path(__file__).parents[1] / "fixtures" / "fake_host_8gpu.json")})
    d.wait_state(name, "running")
    data = json.loads(d.ctl("gpus", "--json").stdout)
    assert data["available"] is True and len(data["gpus"]) == 8
    result = d.ctl("gpus")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["INDEX", "NAME", "MEMORY", "MiB", "UTIL", "WORKERS", "UUID"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {str(i) for i in range(8)}
    assert name in rows["1"] and name not in rows["0"]
    assert "FAKE" in result.stderr


# -- shell completion ---------------------------------------------------------------------


def test_shell_completion_script_and_names(daemon: RunningDaemon) -> None:
    script = ctl(env={"_CITADELCTL_COMPLETE": "bash_source"})
    assert script.returncode == 0
    assert "_citadelctl_completion" in script.stdout and "complete " in script.stdout
    words = f"citadelctl --socket {daemon.socket} stop {PAIR[:3]}"
    names = ctl(env={"_CITADELCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": "4"})
    completions = {line.split(",", 1)[1] for line in names.stdout.splitlines()}
    assert {PAIR, f"{PAIR}.0", f"{PAIR}.1"} <= completions
    assert TALKER not in completions


# -- acting ---------------------------------------------------------------------------------


def test_stop_start_restart_with_wait(daemon_factory: Any) -> None:
    name = f"w-{secrets.token_hex(3)}"
    d = daemon_factory(f"""
        [services.{name}]
        type = "command"
        command = ["sleep", "600"]
        replicas = 2
        """)
    d.wait_state(f"{name}.1", "running")
    stopped = d.ctl("stop", name, "--wait")
    assert stopped.stdout.splitlines() == [f"{name}.0: stopped", f"{name}.1: stopped"]
    assert f"{name}.0: running -> stopping" in stopped.stderr  # progress while it waited
    assert all(w["state"] == "stopped" for w in d.status().values())
    started = d.ctl("start", "--all", "--wait")
    assert all(line.split()[1] == "running" for line in started.stdout.splitlines())
    before = d.status()[f"{name}.0"]["pid"]
    restarted = d.ctl("restart", f"{name}.0", "--wait").stdout
    after = d.status()[f"{name}.0"]["pid"]
    assert after != before and restarted.strip() == f"{name}.0: running (pid {after})"
    assert d.ctl("stop", "--all").returncode == 0  # without --wait it answers at once


def test_start_wait_exits_1_when_the_worker_does_not_come_up(daemon_factory: Any) -> None:
    name = f"broken-{secrets.token_hex(3)}"
    d = daemon_factory(f"""
        [services.{name}]
        type = "command"
        command = ["sh", "-c", "sleep 0.3; echo cannot start >&2; exit 3"]
        restart = "never"
        probes.startup = {{ kind = "tcp", address = "127.0.0.1:9", period = 0.1 }}
        """)
    d.wait_for(lambda s: s[name]["state"] in ("stopped", "fatal"), what="it failed")
    result = d.ctl("start", name, "--wait", check=False)
    assert result.returncode == 1
    assert f"not running: {name}" in result.stderr
    assert f"{name}: stopped" in result.stdout


# -- reload ---------------------------------------------------------------------------------


def test_reload_reports_the_diff_and_refuses_an_invalid_config(daemon_factory: Any) -> None:
    keep, change, drop, add = (f"{n}-{secrets.token_hex(3)}" for n in ("keep", "change", "drop", "add"))

    def services(*blocks: tuple[str, str]) -> str:
        return "".join(f'\n[services.{n}]\ntype = "command"\ncommand = ["sleep", "{arg}"]\n'
                       for n, arg in blocks)

    d = daemon_factory(services((keep, "600"), (change, "600"), (drop, "600")))
    d.wait_for(lambda s: all(w["state"] == "running" for w in s.values()) and len(s) == 3,
               what="all running")
    pids = {n: w["pid"] for n, w in d.status().items()}
    assert d.ctl("reload").stdout.strip() == "no changes"

    d.write_config(services((keep, "600"), (change, "700"), (add, "600")))
    out = d.ctl("reload").stdout.splitlines()
    assert out == [f"added: {add}", f"removed: {drop}", f"changed: {change}"]
    status = d.wait_for(lambda s: s if s.get(add, {}).get("state") == "running" else None,
                        what="the added service")
    assert drop not in status
    assert status[keep]["pid"] == pids[keep]
    assert status[change]["pid"] != pids[change]

    pids = {n: w["pid"] for n, w in d.status().items()}
    d.config.write_text(d.config.read_text() + f'\n[services.{keep}-bad]\ntype = "command"\n'
                                               'command = ["sleep", "1"]\nreplicas = -1\n')
    failed = d.ctl("reload", check=False)
    assert failed.returncode == 1
    assert "reload failed, nothing changed" in failed.stderr and "replicas" in failed.stderr
    assert {n: w["pid"] for n, w in d.status().items()} == pids


def test_citadelctl_status_imports_nothing_heavy(daemon: RunningDaemon) -> None:
    # What keeps `citadelctl status` fast (bench/bench_ctl_status.py): none of the daemon's
    # libraries are imported to print the table.
    code = ("import sys\nfrom citadel_supervisor.cli.citadelctl import main\n"
            "try:\n    main(['--socket', sys.argv[1], 'status'])\nexcept SystemExit:\n    pass\n"
            "heavy = {'aiohttp', 'pydantic', 'pluggy', 'loguru', 'psutil', 'http.client', 'email',"
            " 'citadel_supervisor.config', 'citadel_supervisor.logs.masking'}\n"
            "print(sorted(heavy & set(sys.modules)), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code, str(daemon.socket)], capture_output=True,
                            text=True, check=True)
    assert "NAME" in result.stdout
    assert result.stderr.strip() == "[]"
