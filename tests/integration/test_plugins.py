"""Plugins as installed distributions: loading, isolation of broken ones, disabling, hooks, sections."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import CITADELD, wait_gone
from loguru import logger

from citadel_supervisor import hookimpl
from citadel_supervisor.config.sources import disabled_from_env
from citadel_supervisor.control.client import ControlClient
from citadel_supervisor.plugins import PluginRegistry

PLUGIN_SOURCES = Path(__file__).parents[1] / "plugins_for_tests"

# name in the "citadel" group -> the module it points at
TEST_PLUGINS = {
    "good": "citadel_test_good",
    "broken": "citadel_test_broken",
    "faulty": "citadel_test_faulty",
    "unwanted": "citadel_test_unwanted",
    "buggy": "citadel_test_buggy",
}
FAULTY_SECRET = "faulty-secret-value-31337"


def install_plugins(site: Path, plugins: dict[str, str]) -> Path:
    """Install each plugin as its own distribution ``citadel-test-NAME 1.0`` in ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    for name, module in plugins.items():
        shutil.copy(PLUGIN_SOURCES / f"{module}.py", site / f"{module}.py")
        info = site / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: citadel-test-{name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[citadel]\n{name} = {module}\n")
    return site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return install_plugins(tmp_path / "site", TEST_PLUGINS)


ECHO_SERVICE = """\
[services.hello]
type = "echo"
message = "hello from the echo plugin"
"""


def check(tmp_path: Path, site: Path, config: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "citadeld.toml"
    path.write_text(textwrap.dedent(config))
    full_env = {k: v for k, v in os.environ.items() if k != "CITADEL_DISABLE_PLUGINS"}
    return subprocess.run([CITADELD, "--check", "--config", str(path)], check=False, capture_output=True,
                          text=True, timeout=60, env={**full_env, "PYTHONPATH": str(site), **env})


def test_check_isolates_the_broken_plugin(tmp_path: Path, site: Path) -> None:
    result = check(tmp_path, site, '[plugins]\ndisable = ["unwanted"]\n' + ECHO_SERVICE
                   + '[plugin.good]\ngreeting = "hi"\n')
    assert result.returncode == 0, result.stderr
    assert "OK (1 services" in result.stdout
    assert "plugins that failed to load: broken)" in result.stdout
    assert ("plugin broken from citadel-test-broken 1.0 failed to load and is skipped: "
            "RuntimeError: broken on purpose") in result.stderr
    assert "plugin unwanted (citadel-test-unwanted) is disabled" in result.stderr
    assert "was imported" not in result.stderr


def test_disable_from_env(tmp_path: Path, site: Path) -> None:
    result = check(tmp_path, site, ECHO_SERVICE, CITADEL_DISABLE_PLUGINS="broken, unwanted")
    assert result.returncode == 0, result.stderr
    assert "failed to load" not in result.stdout + result.stderr
    # Disabling the plugin that provides a type makes the services of that type unknown.
    result = check(tmp_path, site, ECHO_SERVICE, CITADEL_DISABLE_PLUGINS="good,broken,unwanted")
    assert result.returncode == 1
    assert "services.hello.type: unknown service type 'echo'" in result.stderr


def test_plugin_config_sections(tmp_path: Path, site: Path) -> None:
    result = check(tmp_path, site, ECHO_SERVICE + '[plugin.good]\ngreeting = 5\ncolour = "red"\n'
                   + "[plugin.goood]\n[plugin.unwanted]\nx = 1\n",
                   CITADEL_DISABLE_PLUGINS="broken,unwanted")
    assert result.returncode == 1
    path = tmp_path / "citadeld.toml"
    assert f"{path}: plugin.good.greeting: Input should be a valid string (got 5)" in result.stderr
    assert f"{path}: plugin.good.colour: unknown key" in result.stderr
    assert (f"{path}: plugin.goood: no loaded plugin reads this section (did you mean 'good'?)"
            in result.stderr)
    # A plugin disabled on purpose keeps its section without complaint.
    assert "plugin.unwanted" not in result.stderr


def test_daemon_with_real_plugins(daemon_factory: Any, site: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    d = daemon_factory('[plugins]\ndisable = ["unwanted"]\n' + ECHO_SERVICE
                       + '[plugin.good]\ngreeting = "hi"\n',
                       env={"PYTHONPATH": str(site), "CITADEL_TEST_EVENTS": str(events),
                            "FAULTY_API_KEY": FAULTY_SECRET})
    d.wait_state("hello", "running")
    d.wait_for(lambda s: d.ctl("logs", "hello").stdout.strip() == "hello from the echo plugin",
               what="the echo service's output")

    plugins = {p["name"]: p for p in json.loads(d.ctl("plugins", "--json").stdout)["plugins"]}
    assert plugins["broken"]["status"] == "failed"
    assert plugins["broken"]["distribution"] == "citadel-test-broken"
    assert plugins["broken"]["version"] == "1.0"
    assert plugins["broken"]["error"] == "RuntimeError: broken on purpose"
    assert plugins["good"]["status"] == "loaded"
    assert {"citadel_service_types", "citadel_config_sections", "citadel_worker_event"} <= set(
        plugins["good"]["hooks"])
    assert plugins["faulty"]["status"] == "loaded"
    assert plugins["unwanted"]["status"] == "disabled"
    # Citadel's own parts are plugins too, listed as built-in:
    builtin = {name for name, p in plugins.items() if p["builtin"]}
    assert builtin == {"command", "vllm", "probes", "processes", "host", "multinode-checks", "gpu", "exporter",
                       "ui", "multinode", "demand"}
    assert all(plugins[name]["status"] == "loaded" for name in builtin)
    assert plugins["gpu"]["hooks"] == ["citadel_before_restart", "citadel_control_routes",
                                       "citadel_scrape_collectors"]
    assert not plugins["good"]["builtin"]

    # A plugin's GET route is served and described; its POST route and its taken path were
    # left out, and logged by plugin.
    client = ControlClient(str(d.socket))
    assert client.call("GET", "/v1/good/greeting") == {"greeting": "hello from the good plugin"}
    described = client.call("GET", "/v1/openapi.json")["paths"]
    assert list(described["/v1/good/greeting"]) == ["get"]
    assert {"/v1/gpus", "/v1/health"} <= set(described)
    assert "plugin good adds the control route POST /good/greeting: only GET routes" in d.logs()
    assert "plugin good adds the control route GET /status, which is taken" in d.logs()

    table = d.ctl("plugins").stdout
    assert "broken" in table and "failed" in table and "citadel-test-broken 1.0" in table
    assert "error: RuntimeError: broken on purpose" in table
    assert re.search(r"^gpu +loaded +citadel-supervisor \S+ \(built-in\)$", table, re.MULTILINE), table

    # faulty raised in every citadel_worker_event; the daemon logged it by name, and went on:
    log = d.logs()
    assert "plugin faulty failed in hook citadel_worker_event: ValueError: hook exploded" in log
    assert FAULTY_SECRET not in log
    # ... and the good plugin's implementation of the same hook still ran.
    seen = [json.loads(line) for line in events.read_text().splitlines()]
    assert any(e["worker"] == "hello" and e["state"] == "running" for e in seen), seen
    pid = d.status()["hello"]["pid"]
    d.ctl("restart", "hello")
    d.wait_for(lambda s: s["hello"]["state"] == "running" and s["hello"]["pid"] != pid,
               what="hello to run again after a restart")

    # A worker that dies is restarted after the plugins' waits (citadel_before_restart):
    # the good plugin's ran, and the faulty plugin's, which raised, was logged by name.
    pid = d.status()["hello"]["pid"]
    os.kill(pid, signal.SIGKILL)
    d.wait_for(lambda s: s["hello"]["state"] == "running" and s["hello"]["pid"] not in (None, pid),
               what="hello to run again after it was killed")
    noted = [json.loads(line) for line in events.read_text().splitlines()]
    assert {"kind": "before_restart", "worker": "hello"} in noted
    assert ("plugin faulty failed while the restart waited for the faulty plugin's wait: "
            "ValueError: wait exploded") in d.logs()
    assert "was imported" not in d.logs()


# --------------------------------------------------------------------------
# The registry in this process
# --------------------------------------------------------------------------


def test_load_entry_points_survives_sys_exit_at_import(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    site = install_plugins(tmp_path / "site", {"exits": "citadel_test_exits", "good": "citadel_test_good",
                                               "unwanted": "citadel_test_unwanted"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("CITADEL_DISABLE_PLUGINS", raising=False)
    for module in ("citadel_test_exits", "citadel_test_good", "citadel_test_unwanted"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    registry = PluginRegistry()
    registry.load_entry_points(disable=["unwanted"])
    records = registry.records
    assert records["exits"].status == "failed"
    assert records["exits"].error == "SystemExit: 3"
    assert records["exits"].distribution == "citadel-test-exits"
    assert records["good"].status == "loaded"
    assert records["unwanted"].status == "disabled"
    assert "echo" in registry.service_types()
    assert "citadel_test_unwanted" not in sys.modules


class _Raises:
    @hookimpl
    def citadel_daemon_started(self, supervisor: Any) -> None:
        raise RuntimeError("started hook failed")


class _Records:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    @hookimpl
    def citadel_daemon_started(self, supervisor: Any) -> None:
        self.calls.append(supervisor)

    @hookimpl
    def citadel_config_sections(self) -> dict[str, Any]:
        return {"records": dict}


def test_call_each_isolates_a_raising_hook() -> None:
    registry = PluginRegistry()
    records = _Records()
    registry.register(_Raises(), "raises")
    registry.register(records, "records")
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="ERROR", format="{message}")
    try:
        results = registry.call_each("citadel_daemon_started", supervisor="SUP")
    finally:
        logger.remove(sink)
    assert records.calls == ["SUP"]
    assert results == []
    assert messages == ["plugin raises failed in hook citadel_daemon_started: RuntimeError: started hook failed"]
    assert registry.records["records"].hooks == ["citadel_config_sections", "citadel_daemon_started"]
    assert registry.collect_named("citadel_config_sections", "config section") == {"records": dict}


class _Wraps:
    """A ``wrapper=True`` implementation: pluggy runs it around the plain ones."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    @hookimpl(wrapper=True)
    def citadel_config_sections(self) -> Any:
        answers = yield
        self.seen.append(answers)
        return answers


def test_hooks_go_through_pluggy_so_wrappers_wrap_and_failures_stay_isolated() -> None:
    registry = PluginRegistry()
    wraps = _Wraps()
    registry.register(_Raises(), "raises")
    registry.register(_Records(), "records")
    registry.register(wraps, "wraps")
    assert registry.call_each("citadel_config_sections") == [("records", {"records": dict})]
    assert wraps.seen == [[{"records": dict}]], "the wrapper ran once, around every plain answer"
    # A failing plain implementation answers None; the wrapper and the others still run.
    assert registry.call_each("citadel_daemon_started", supervisor="SUP") == []


def test_trace_plugins_prints_every_hook_call(tmp_path: Path, site: Path) -> None:
    result = check(tmp_path, site, '[plugins]\ndisable = ["unwanted"]\n' + ECHO_SERVICE,
                   CITADEL_TRACE_PLUGINS="1")
    assert result.returncode == 0, result.stderr
    assert "citadel_service_types" in result.stderr and "finish citadel_service_types" in result.stderr, \
        result.stderr[-2000:]
    assert "citadel_check_config" in result.stderr


def test_disabled_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITADEL_DISABLE_PLUGINS", " a, b ,,c")
    assert disabled_from_env() == {"a", "b", "c"}
    monkeypatch.delenv("CITADEL_DISABLE_PLUGINS")
    assert disabled_from_env() == set()


def test_a_bug_in_a_running_worker_stops_its_process_and_never_hangs_the_exit(
        daemon_factory: Any, site: Path) -> None:
    """The buggy type raises after its process is spawned: citadeld stops that process (it
    must not run unsupervised), counts a failed run, and still exits on SIGTERM."""
    d = daemon_factory('[plugins]\ndisable = ["unwanted"]\n[services.bug]\ntype = "buggy"\n'
                       'backoff_initial = 60\n', env={"PYTHONPATH": str(site)})
    exits = d.wait_for(lambda s: s["bug"]["state"] == "backoff" and s["bug"],
                       what="the buggy worker's failed run")
    assert exits["pid"] is None and exits["restarts"] == 1
    assert "internal error while running the worker: RuntimeError: buggy on purpose" in d.logs()
    spawned = [int(pid) for pid in re.findall(r"-> starting, pid=(\d+)", d.logs())]
    assert spawned and wait_gone(spawned, timeout=10) == [], "the buggy worker's process outlived its run"
    assert d.stop(timeout=30) == 0
