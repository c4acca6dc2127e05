"""The ``gateway`` service type: its config errors (through ``citadeld --check``) and its spawn."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from citadel_gateway.config import GatewayConfig
from citadel_gateway.keys import KEYS_ENV
from citadel_gateway.service import GATEWAY, citadel_check_config

from citadel_supervisor.config import load_config
from citadel_supervisor.services.base import WorkerInfo
from citadel_supervisor.services.command import CommandConfig

CITADELD = str(Path(sys.executable).parent / "citadeld")
SECRET = "sk-from-credential-4b1d9e7f"


def _check(tmp_path: Path, services: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "citadel.toml"
    config.write_text(textwrap.dedent(f"""\
        [daemon]
        control_socket = "{tmp_path / 'control.sock'}"
        [services.up]
        type = "command"
        command = ["sleep", "60"]
        """) + textwrap.dedent(services))
    return subprocess.run([CITADELD, "--check", "--config", str(config)], capture_output=True, text=True,
                          check=False)


def test_a_valid_gateway_config_checks(tmp_path: Path) -> None:
    result = _check(tmp_path, f"""
        [services.gw]
        type = "gateway"
        listen = "127.0.0.1:8000"
        routes = {{ m = ["up"] }}
        [[services.gw.keys]]
        name = "a"
        hash = "sha256:{hashlib.sha256(b'k').hexdigest()}"
        models = ["m"]
        requests_per_minute = 10
        """)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("table", "path", "message"), [
    ('listen = "nowhere"', "services.gw", "HOST:PORT"),
    ('port = 8000\nroutes = { m = ["nope"] }', "services.gw.routes.m[0]", "no service named 'nope'"),
    ('port = 8000\nroutes = { m = ["gw"] }', "services.gw.routes.m[0]", "cannot route to itself"),
    ('port = 8000\nrequire_key = true', "services.gw", "no keys are given"),
    ('port = 8000\nkeys = [{ name = "a" }]', "services.gw.keys[0]", "exactly one of hash"),
    ('port = 8000\nkeys = [{ name = "a", hash = "md5:00" }]', "services.gw.keys[0]", "64 lowercase hex"),
    ('port = 8000\nkeys = [{ name = "a", key = "sk-aaaaaaaa" }, { name = "a", key = "sk-bbbbbbbb" }]',
     "services.gw", "used twice"),
    ('port = 8000\nqueue_sise = 3', "services.gw.queue_sise", "did you mean 'queue_size'"),
])
def test_config_errors_name_the_key(tmp_path: Path, table: str, path: str, message: str) -> None:
    result = _check(tmp_path, f'[services.gw]\ntype = "gateway"\n{table}\n')
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert path in output and message in output, output


def _gateway(tmp_path: Path) -> GatewayConfig:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gw-key").write_text(SECRET)
    config_file = tmp_path / "citadel.toml"
    config_file.write_text(textwrap.dedent(f"""\
        [daemon]
        control_socket = "{tmp_path / 'daemon.sock'}"
        [services.up]
        type = "command"
        command = ["sleep", "60"]
        [services.gw]
        type = "gateway"
        host = "0.0.0.0"
        port = 8000
        queue_size = 7
        routes = {{ m = ["up"] }}
        [[services.gw.keys]]
        name = "from-credential"
        key = "${{credential:gw-key}}"
        """))
    config = load_config(config_file, {"command": CommandConfig, "gateway": GatewayConfig},
                         environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert citadel_check_config(config) == []
    service = config.services["gw"]
    assert isinstance(service, GatewayConfig)
    return service


def test_spawn_passes_settings_in_argv_and_only_key_digests_in_env(tmp_path: Path) -> None:
    service = _gateway(tmp_path)
    worker = WorkerInfo(name="gw", service="gw", replica=0, config=service, port=8000)
    spec = GATEWAY.spawn_spec(worker)
    assert spec.argv[:3] == [sys.executable, "-m", "citadel_gateway"]
    args = dict(zip(spec.argv[3::2], spec.argv[4::2]))
    assert args["--listen"] == "0.0.0.0:8000"
    assert args["--control-socket"] == str(tmp_path / "daemon.sock"), "the daemon's own socket"
    settings = json.loads(args["--config-json"])
    assert settings["queue_size"] == 7 and settings["routes"] == {"m": ["up"]}
    assert "keys" not in settings
    assert SECRET not in " ".join(spec.argv)
    keys = json.loads(spec.env[KEYS_ENV])
    assert keys == [{"name": "from-credential", "sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                     "models": "*", "requests_per_minute": None, "tokens_per_minute": None}]
    assert SECRET not in spec.env[KEYS_ENV]
    assert GATEWAY.metrics_url(worker) == "http://127.0.0.1:8000/metrics"
    probes = GATEWAY.probes(worker)
    assert probes.startup is not None and probes.startup.path == "/healthz"
