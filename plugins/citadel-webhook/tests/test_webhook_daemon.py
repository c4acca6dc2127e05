"""The plugin inside a real citadeld: found through its entry point, posting a crashing
worker's events, signed with a secret from a credential, retried when the receiver fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from webhook_receiver import SECRET, WebhookReceiver

PY = sys.executable


def _config(receiver: WebhookReceiver, events: str = '["state", "restart", "exit"]') -> str:
    return f"""
        [plugin.webhook]
        urls = ["{receiver.url}"]
        secret = "${{credential:webhook-secret}}"
        events = {events}
        timeout = 2
        retries = 4
        backoff = 0.05

        [services.crashy]
        type = "command"
        command = ["{PY}", "-c", "import sys, time; time.sleep(0.1); sys.exit(3)"]
        backoff_initial = 0.05
        backoff_max = 0.1
        start_limit_burst = 3
        start_limit_interval = 60
        """


def _assert_no_asyncio_trouble(logs: str) -> None:
    """What a task or session the plugin lost track of would print."""
    for trouble in ("Unclosed client session", "Task was destroyed", "Traceback"):
        assert trouble not in logs


def _transitions(bodies: list[dict]) -> list[tuple[str | None, str]]:
    return [(b["old_state"], b["state"]) for b in bodies if b["event"] == "state"]


def test_a_crashing_worker_posts_its_state_changes_restarts_and_fatal(
        daemon_factory, receiver, credentials):
    daemon = daemon_factory(_config(receiver), env={"CREDENTIALS_DIRECTORY": str(credentials)})
    daemon.wait_state("crashy", "fatal", timeout=30)
    bodies = receiver.wait_for(lambda b: any(new == "fatal" for _, new in _transitions(b)),
                               what="the change into fatal")

    assert all(r.signed for r in receiver.received()), "every request carries a valid signature"
    assert {r.headers["X-Citadel-Event"] for r in receiver.received()} == {"state", "restart", "exit"}
    assert all(b["worker"] == "crashy" and b["service"] == "crashy" for b in bodies)
    transitions = _transitions(bodies)
    assert transitions[0] == ("stopped", "starting")
    assert transitions[-1][1] == "fatal"
    restarts = [b for b in bodies if b["event"] == "restart"]
    assert len(restarts) == 2  # the third failure is the start limit: fatal, no restart
    exits = [b for b in bodies if b["event"] == "exit"]
    assert len(exits) == 3 and all(e["detail"]["exit"] == {"code": 3, "signal": None} for e in exits)
    # Events arrive in the order they happened.
    assert [b["time"] for b in bodies] == sorted(b["time"] for b in bodies)
    # The credential is a secret: never in citadeld's log, nor in its answers.
    assert SECRET not in daemon.logs()
    assert SECRET not in daemon.ctl("plugins", "--json").stdout
    plugins = {p["name"]: p for p in json.loads(daemon.ctl("plugins", "--json").stdout)["plugins"]}
    assert plugins["webhook"]["status"] == "loaded"
    assert plugins["webhook"]["distribution"] == "citadel-webhook"
    daemon.stop()
    _assert_no_asyncio_trouble(daemon.logs())


def test_a_receiver_that_fails_first_gets_every_event_then(daemon_factory, receiver, credentials):
    receiver.plan = [503, 502, ("hang", 3.0)]  # the third one outlasts timeout = 2
    daemon = daemon_factory(_config(receiver, events='["fatal"]'),
                            env={"CREDENTIALS_DIRECTORY": str(credentials)})
    daemon.wait_state("crashy", "fatal", timeout=30)
    bodies = receiver.wait_for(lambda b: len(b) >= 1, timeout=20, what="the fatal event")
    assert [b["state"] for b in bodies] == ["fatal"]
    ids = [r.headers["X-Citadel-Delivery"] for r in receiver.received()]
    statuses = [r.status for r in receiver.received()]
    assert len(set(ids)) == 1, "one event, retried under one delivery id"
    assert statuses[:2] == [503, 502] and 200 in statuses
    logs = daemon.logs()
    assert "failed (try 1/5): HTTP 503" in logs and "failed (try 2/5): HTTP 502" in logs
    assert "no answer within 2s" in logs


def test_the_last_events_go_out_when_citadeld_stops(daemon_factory, receiver, credentials):
    daemon = daemon_factory(f"""
        [plugin.webhook]
        urls = ["{receiver.url}"]
        secret = "${{credential:webhook-secret}}"
        events = ["state"]

        [services.sleeper]
        type = "command"
        command = ["{PY}", "-c", "import time; time.sleep(600)"]
        """, env={"CREDENTIALS_DIRECTORY": str(credentials)})
    daemon.wait_state("sleeper", "running")
    assert daemon.stop() == 0
    bodies = receiver.wait_for(lambda b: ("stopping", "stopped") in _transitions(b), timeout=30,
                               what="the stop's events")
    assert _transitions(bodies)[-2:] == [("running", "stopping"), ("stopping", "stopped")]
    _assert_no_asyncio_trouble(daemon.logs())


def test_check_names_the_bad_key_and_never_shows_the_secret(tmp_path):
    config = tmp_path / "citadeld.toml"
    config.write_text(f"""
[daemon]
control_socket = "{tmp_path}/control.sock"
state_dir = "{tmp_path}/run"
log_dir = "{tmp_path}/log"

[plugin.webhook]
urls = ["ftp://example.com/x"]
secret = "short-one"
""")
    citadeld = str(Path(PY).parent / "citadeld")
    result = subprocess.run([citadeld, "--check", "--config", str(config)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "plugin.webhook.urls[0]: not an http:// or https:// URL" in result.stderr
    config.write_text(config.read_text().replace("ftp://", "https://"))
    result = subprocess.run([citadeld, "--check", "--config", str(config)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "plugin.webhook: the secret is too short" in result.stderr
    assert "short-one" not in result.stderr + result.stdout

