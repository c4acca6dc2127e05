"""packaging/: the systemd unit, sysusers/tmpfiles, Prometheus rules and the Grafana dashboard.

Checked with the real tools (systemd-analyze, systemd-sysusers, systemd-tmpfiles,
promtool), and against a real citadeld's /metrics so that the alerts and the
dashboard name only series the exporter serves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RunningDaemon, free_ports
from prometheus_client.parser import text_string_to_metric_families

from citadel_supervisor.config import DaemonConfig, ServiceConfig
from citadel_supervisor.gpu.metrics import GpuCollector

ROOT = Path(__file__).parents[2]
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "citadeld.service"
RULES = PACKAGING / "prometheus" / "citadel-alerts.yml"
RULE_TESTS = PACKAGING / "prometheus" / "citadel-alerts.test.yml"
SCRAPE_CONFIG = PACKAGING / "prometheus" / "prometheus.yml"
DASHBOARD = PACKAGING / "grafana" / "citadel.json"
INSTALL_DOC = ROOT / "docs" / "install.md"
VENV = Path(sys.executable).parent.parent
#: Where the install guide puts citadeld's virtual environment.
INSTALLED_VENV = "/opt/citadel/venv"

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (apt install systemd)")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (apt install prometheus)")


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=120, check=False)


# --------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """``{Key: [values...]}`` of a unit file (keys may repeat; comments dropped)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def local_unit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unit with ExecStart in this test's venv: systemd-analyze checks the binary exists."""
    path = tmp_path_factory.mktemp("unit") / "citadeld.service"
    path.write_text(UNIT.read_text().replace(INSTALLED_VENV, str(VENV)))
    assert str(VENV / "bin" / "citadeld") in path.read_text()
    return path


@needs_systemd
def test_unit_verifies_cleanly(local_unit: Path) -> None:
    result = run("systemd-analyze", "verify", str(local_unit))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"systemd-analyze verify warned:\n{result.stderr}"


def test_unit_matches_what_citadeld_does() -> None:
    unit = unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in unit.items()}
    # citadeld sends READY/RELOADING/STOPPING and reloads on SIGHUP (see systemd.py).
    assert one["Type"] == "notify"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["ExecStart"] == f"{INSTALLED_VENV}/bin/citadeld --config /etc/citadel/citadeld.toml"
    assert one["Restart"] == "on-failure"
    assert _seconds(one["WatchdogSec"]) >= 10
    # citadeld stops its own workers; systemd kills what is left.
    assert one["KillMode"] == "mixed"
    assert _seconds(one["TimeoutStopSec"]) > 2 * ServiceConfig.model_fields["stop_timeout"].default
    assert one["Delegate"] == "yes"
    # The directories systemd makes are the ones citadeld uses by default.
    defaults = DaemonConfig()
    assert defaults.control_socket == Path("/run") / one["RuntimeDirectory"] / "control.sock"
    assert defaults.state_dir == Path("/run") / one["RuntimeDirectory"]
    assert defaults.log_dir == Path("/var/log") / one["LogsDirectory"]
    assert one["User"] == one["Group"] == defaults.socket_group == "citadel"
    assert "VLLM_CACHE_ROOT=%C/citadel/vllm" in unit["Environment"]
    assert one["CacheDirectory"] == "citadel"
    # Hardening that keeps the GPUs: no PrivateDevices, a device list with NVIDIA's nodes.
    assert "PrivateDevices" not in unit
    for device in ("/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia* rw"):
        assert device in unit["DeviceAllow"]
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert one[hardening] == "yes"
    assert one["ProtectSystem"] == "strict"


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


@needs_systemd
def test_security_score_is_the_one_the_install_guide_reports(local_unit: Path) -> None:
    result = run("systemd-analyze", "security", "--offline=true", "--no-pager", str(local_unit))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:]
    score = float(match.group(1))
    assert score <= 2.5, f"the unit got less strict: exposure {score}"
    assert f"exposure level {match.group(1)} {match.group(2)}" in INSTALL_DOC.read_text(), (
        f"docs/install.md should report the current score: {match.group(1)} {match.group(2)}")


@needs_systemd
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles --root chowns: needs root")
def test_sysusers_and_tmpfiles_make_the_user_and_folders(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", tmp_path / "etc" / name)
    sysusers = (PACKAGING / "sysusers.d" / "citadel.conf").read_text()
    result = run("systemd-sysusers", f"--root={tmp_path}", "-", stdin=sysusers)
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    groups = {line.split(":")[0]: line for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert re.search(r"^citadel:x:\d+:\d+:.*:/var/lib/citadel:/usr/sbin/nologin$", passwd, re.MULTILINE)
    # The unit's User, Group and SupplementaryGroups all exist.
    for group in ["citadel"] + unit_settings(UNIT.read_text())["SupplementaryGroups"][0].split():
        assert group in groups
    citadel_gid = int(groups["citadel"].split(":")[2])

    tmpfiles = (PACKAGING / "tmpfiles.d" / "citadel.conf").read_text()
    result = run("systemd-tmpfiles", f"--root={tmp_path}", "--create", "-", stdin=tmpfiles)
    assert result.returncode == 0, result.stderr
    etc = (tmp_path / "etc" / "citadel").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o777) == (0, citadel_gid, 0o750)
    credentials = (tmp_path / "etc" / "citadel" / "credentials").stat()
    assert (credentials.st_uid, credentials.st_mode & 0o777) == (0, 0o700)


# --------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------


@needs_promtool
def test_alert_rules_check() -> None:
    result = run("promtool", "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_pass_their_tests() -> None:
    result = run("promtool", "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_scrape_config_checks() -> None:
    result = run("promtool", "check", "config", str(SCRAPE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_and_a_severity() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    alerts = {r["alert"] for r in rules}
    assert alerts - tested == set(), "alerts no test makes fire"
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in rules)


# --------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text())["panels"]


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard, variables included."""
    data = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in data["annotations"]["list"] if "expr" in a]
    return exprs


def test_dashboard_layout() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] and data["title"] == "Citadel"
    assert data["schemaVersion"] >= 36
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert p["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in data["templating"]["list"]}
    assert {"datasource", "instance", "service"} <= names
    titles = " ".join(p["title"] for p in panels).lower()
    for wanted in ("workers by state", "restarts", "ready replicas", "tokens per second",
                   "time to first token", "kv-cache", "gpu utilisation per worker",
                   "gpu memory per worker",
                   "host cpu", "host memory"):
        assert wanted in titles


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": _without_grafana_variables(e)}
        for i, e in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run("promtool", "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _without_grafana_variables(expr: str) -> str:
    return (expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
            .replace("$service", ".*"))


# --------------------------------------------------------------------------
# Names: the alerts and the dashboard use what a real citadeld exports
# --------------------------------------------------------------------------

NAME_RE = re.compile(r"\b(citadel_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
MATCHERS_RE = re.compile(r"\b(citadel_[a-z0-9_]+|vllm:[a-z0-9_:]+)\{([^}]*)\}")
_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def _family(name: str, families: dict[str, set[str]]) -> str | None:
    if name in families:
        return name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in families:
            return name.removesuffix(suffix)
    return None


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """``{family: label names}`` from a real citadeld's /metrics.

    It runs one worker that serves the vLLM /metrics stand-in, so the
    federated vllm:* families are there too; the GPU families come from the
    exporter's GPU collector (this host has no GPU).
    """
    root = tmp_path_factory.mktemp("exporter")
    www = root / "www"
    www.mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "vllm_metrics_standin.txt", www / "metrics")
    worker_port, exporter_port = free_ports(2)
    daemon = RunningDaemon(root, f"""
        [exporter]
        listen = "127.0.0.1:{exporter_port}"

        [services.standin]
        type = "command"
        command = ["{sys.executable}", "-m", "http.server", "{worker_port}", "--bind", "127.0.0.1",
                   "--directory", "{www}"]
        port = {worker_port}
        metrics = "/metrics"
        health = {{ http = "http://127.0.0.1:{worker_port}/metrics" }}
        """)
    daemon.start()
    try:
        daemon.wait_state("standin", "running")
        text = _scrape(exporter_port)
    finally:
        daemon.stop()
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = families.setdefault(family.name, set())
        for sample in family.samples:
            labels.update(sample.labels)
    for family in GpuCollector([], [], {}).collect():
        families.setdefault(family.name, set()).update({"gpu", "uuid"})
    families["citadel_worker_gpu_memory_bytes"] |= {"service", "worker"}
    yield families


def _scrape(port: int) -> str:
    import time
    import urllib.request

    deadline = time.monotonic() + 20
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        if 'vllm:num_requests_running{' in text:  # the worker's metrics were federated
            return text
        time.sleep(0.2)
    raise AssertionError(f"no federated vllm series in the exporter's /metrics:\n{text[:3000]}")


def _used(texts: list[str]) -> tuple[set[str], list[tuple[str, set[str]]]]:
    names: set[str] = set()
    matchers: list[tuple[str, set[str]]] = []
    for text in texts:
        names |= set(NAME_RE.findall(text))
        for name, inside in MATCHERS_RE.findall(text):
            matchers.append((name, set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!=|!~|=)", inside))))
    return names, matchers


def _check_names(source: str, texts: list[str], families: dict[str, set[str]]) -> None:
    names, matchers = _used(texts)
    unknown = sorted(n for n in names if _family(n, families) is None)
    assert not unknown, f"{source} uses series citadeld does not export: {unknown}"
    for name, labels in matchers:
        family = _family(name, families)
        assert family is not None
        # job and instance come from Prometheus, not from the exporter.
        missing = labels - families[family] - {"job", "instance"}
        assert not missing, f"{source}: {name} has no label(s) {sorted(missing)}"


def test_alerts_use_exported_series(exported: dict[str, set[str]]) -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    _check_names("citadel-alerts.yml", [r["expr"] for r in rules], exported)


def test_dashboard_uses_exported_series(exported: dict[str, set[str]]) -> None:
    data = json.loads(DASHBOARD.read_text())
    variable_queries = [v["definition"] for v in data["templating"]["list"] if "definition" in v]
    _check_names("citadel.json", dashboard_exprs() + variable_queries, exported)


def test_federated_series_carry_service_and_worker(exported: dict[str, set[str]]) -> None:
    # The dashboard groups vLLM's own series by these labels.
    for family in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                   "vllm:generation_tokens", "vllm:time_to_first_token_seconds"):
        assert {"service", "worker"} <= exported[family], family


# --------------------------------------------------------------------------
# The package's data files
# --------------------------------------------------------------------------


def test_the_built_package_holds_the_status_page(tmp_path: Path) -> None:
    """setuptools' build_py (what a wheel is made of) copies the page's files, and the
    status page reads them from the built tree."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "citadel_supervisor", source / "citadel_supervisor",
                    ignore=shutil.ignore_patterns("__pycache__"))
    built = tmp_path / "lib"
    result = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                             "build_py", "--build-lib", str(built)],
                            cwd=source, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    static = {p.name for p in (built / "citadel_supervisor" / "ui" / "static").iterdir()}
    assert static == {p.name for p in (ROOT / "citadel_supervisor" / "ui" / "static").iterdir()}
    check = subprocess.run(
        [sys.executable, "-c", "import citadel_supervisor.ui.page as p; "
                               "print(p.__file__); print(sorted(p.read_static()))"],
        env={**os.environ, "PYTHONPATH": str(built)}, cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    where, files = check.stdout.splitlines()
    assert where.startswith(str(built))
    assert files == str(sorted(["index.html", "status.css", "status.js"]))
