"""The config loader: valid files, and every kind of bad input named by file and key path."""

from __future__ import annotations

import os
import stat
import subprocess
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pydantic
import pytest
from conftest import CITADELD
from pydantic import BaseModel, ConfigDict

from citadel_supervisor.config import CitadelConfig, ConfigError, load_config
from citadel_supervisor.services.command import CommandConfig

SERVICE_TYPES = {"command": CommandConfig}

# The DESIGN.md example, with both services of the built-in "command" type so
# that the commands exist on this machine.
DESIGN_EXAMPLE = """\
[daemon]
control_socket = "run/control.sock"
state_dir = "run"
log_level = "info"

[exporter]
listen = "127.0.0.1:9180"

[services.chat]
type = "command"
command = ["python3", "-m", "http.server", "8001"]
gpus = [0, 1]
port = 8001
env = { VLLM_LOGGING_LEVEL = "INFO" }
replicas = 1
restart = "always"
backoff_initial = 1.0
backoff_max = 60.0
start_limit_burst = 5
start_limit_interval = 300.0
stop_timeout = 30.0
startup_timeout = 900.0
after = []

[services.tool]
type = "command"
command = ["python3", "-m", "http.server", "9000"]
health = { http = "http://127.0.0.1:9000/" }
after = ["chat"]
"""


class ExtrasSection(BaseModel):
    """A plugin's ``[plugin.extras]`` section, for the loader's section validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str
    retries: int = 3


def write(folder: Path, text: str, name: str = "citadeld.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load(folder: Path, text: str, environ: Mapping[str, str] | None = None,
         sections: Mapping[str, type[BaseModel]] | None = None) -> CitadelConfig:
    return load_config(write(folder, text), SERVICE_TYPES, sections, environ=environ or {})


def issues_of(folder: Path, text: str, environ: Mapping[str, str] | None = None,
              sections: Mapping[str, type[BaseModel]] | None = None) -> list[str]:
    """Every issue's text, ``FILE: PATH: message``."""
    with pytest.raises(ConfigError) as caught:
        load(folder, text, environ, sections)
    return [str(i) for i in caught.value.issues]


def one_issue(issues: list[str], path: str) -> str:
    """The one issue at ``path``; fails listing them all otherwise."""
    found = [i for i in issues if f": {path}: " in i]
    assert len(found) == 1, f"expected one issue at {path}, got:\n" + "\n".join(issues)
    return found[0]


# --------------------------------------------------------------------------
# Valid configs
# --------------------------------------------------------------------------


def test_design_example_loads(tmp_path: Path) -> None:
    config = load(tmp_path, DESIGN_EXAMPLE)
    chat = config.services["chat"]
    assert isinstance(chat, CommandConfig)
    assert chat.gpus == [0, 1] and chat.port == 8001 and chat.restart == "always"
    assert chat.env == {"VLLM_LOGGING_LEVEL": "INFO"}
    assert config.services["tool"].after == ["chat"]
    assert config.services["tool"].health is not None
    assert config.daemon.log_level == "INFO"
    # Relative paths are taken from the config's folder.
    assert config.daemon.control_socket == tmp_path / "run" / "control.sock"
    assert config.files == (tmp_path / "citadeld.toml",)
    assert config.worker_names("chat") == ["chat"]


def test_defaults_and_replica_names(tmp_path: Path) -> None:
    config = load(tmp_path, """\
        [services.pool]
        type = "command"
        command = ["python3", "-c", "pass"]
        replicas = 3
        port = 9100
        stop_signal = "int"
        """)
    pool = config.services["pool"]
    assert config.worker_names("pool") == ["pool.0", "pool.1", "pool.2"]
    assert [pool.port_for(r) for r in range(3)] == [9100, 9101, 9102]
    assert pool.stop_signal == 2
    assert pool.restart == "always" and pool.backoff_initial == 1.0
    assert config.daemon.log_format == "auto"


def test_models_are_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, DESIGN_EXAMPLE)
    with pytest.raises(pydantic.ValidationError):
        config.services["chat"].port = 9  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.daemon.log_level = "DEBUG"  # type: ignore[misc]


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("2m", 120.0), ("1.5h", 5400.0),
                                           ("30s", 30.0), ("7", 7.0)])
def test_durations_with_units(tmp_path: Path, text: str, seconds: float) -> None:
    config = load(tmp_path, f"""\
        [services.a]
        type = "command"
        command = ["python3"]
        stop_timeout = "{text}"
        """)
    assert config.services["a"].stop_timeout == seconds


def test_bad_duration_names_key(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, """\
        [services.a]
        type = "command"
        command = ["python3"]
        stop_timeout = "soon"
        """)
    assert "is not a duration" in one_issue(issues, "services.a.stop_timeout")


# --------------------------------------------------------------------------
# Bad input: each names the file and the key path
# --------------------------------------------------------------------------


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, '[daemon]\nlog_level = "INFO"\nstate_dir = \n')
    assert len(issues) == 1
    assert issues[0].startswith(f"{tmp_path / 'citadeld.toml'}: ")
    assert "invalid TOML" in issues[0] and "line 3" in issues[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml", SERVICE_TYPES)
    assert str(caught.value) == f"{tmp_path / 'nope.toml'}: file not found"


def test_unknown_keys_with_did_you_mean_everywhere_at_once(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, """\
        servics = {}
        [daemon]
        log_levl = "INFO"
        [services.chat]
        type = "command"
        command = ["python3"]
        restrat = "always"
        health = { http = "http://x/", perod = 1 }
        """)
    file = tmp_path / "citadeld.toml"
    assert f"{file}: servics: unknown key (did you mean 'services'?)" in issues
    assert f"{file}: daemon.log_levl: unknown key (did you mean 'log_level'?)" in issues
    assert f"{file}: services.chat.restrat: unknown key (did you mean 'restart'?)" in issues
    assert f"{file}: services.chat.health.perod: unknown key (did you mean 'period'?)" in issues
    assert len(issues) == 4, issues


def test_loader_fields_cannot_be_set_from_the_file(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, 'secrets = ["x"]\nfiles = []\n')
    assert one_issue(issues, "secrets").endswith("unknown key")
    assert one_issue(issues, "files").endswith("unknown key")


def test_wrong_types_name_the_element(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, """\
        [services.chat]
        type = "command"
        command = ["python3"]
        gpus = [0, [1]]
        replicas = "two"
        env = { PORT = 8000 }
        [services.other]
        type = "command"
        command = ["python3"]
        gpus = "two"
        """)
    # One clear issue per bad value, not one per member of the union.
    assert "valid integer or a valid string" in one_issue(issues, "services.chat.gpus[1]")
    assert "(got 'two')" in one_issue(issues, "services.chat.replicas")
    other = one_issue(issues, "services.other.gpus")
    assert "GPU indices or UUIDs, a count, or 'auto'" in other and "(got 'two')" in other
    assert "valid string (got 8000)" in one_issue(issues, "services.chat.env.PORT")
    assert not any("union[" in i or "literal[" in i for i in issues), issues
    assert len(issues) == 4, issues


def test_duplicate_ports(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, """\
        [services.a]
        type = "command"
        command = ["python3"]
        port = 9000
        replicas = 2
        [services.b]
        type = "command"
        command = ["python3"]
        port = 9001
        """)
    assert "port 9001 of b is also used by a.1" in one_issue(issues, "services.b.port")


def test_after_missing_service_and_cycle(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, """\
        [services.chat]
        type = "command"
        command = ["python3"]
        after = ["tool"]
        [services.tool]
        type = "command"
        command = ["python3"]
        after = ["chta"]
        [services.x]
        type = "command"
        command = ["python3"]
        after = ["y"]
        [services.y]
        type = "command"
        command = ["python3"]
        after = ["x"]
        """)
    assert "no service named 'chta' (did you mean 'chat'?)" in one_issue(issues, "services.tool.after[0]")
    cycle = [i for i in issues if "cycle" in i]
    assert len(cycle) == 1 and "x -> y -> x" in cycle[0], issues


def test_cross_checks_reported_with_other_issues(tmp_path: Path) -> None:
    """Every problem at once: a type error elsewhere does not hide a bad ``after``."""
    issues = issues_of(tmp_path, """\
        [daemon]
        log_level = 5
        [services.a]
        type = "command"
        command = ["python3"]
        after = ["nosuch"]
        [services.b]
        type = "command"
        command = ["python3"]
        replicas = 0
        [services.c]
        type = "command"
        command = ["python3"]
        after = ["b"]
        """)
    one_issue(issues, "daemon.log_level")
    one_issue(issues, "services.a.after[0]")
    one_issue(issues, "services.b.replicas")
    # b failed, but it is a service: c's after = ["b"] is not an error.
    assert not any("services.c" in i for i in issues), issues


def test_command_must_exist_and_be_executable(tmp_path: Path) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    plain.chmod(0o644)
    issues = issues_of(tmp_path, f"""\
        [services.gone]
        type = "command"
        command = ["{tmp_path}/no-such-program", "--flag"]
        [services.plain]
        type = "command"
        command = ["{plain}"]
        [services.unknown]
        type = "command"
        command = ["no-such-program-on-path-xyz"]
        """)
    assert "does not exist" in one_issue(issues, "services.gone.command[0]")
    assert "is not an executable file" in one_issue(issues, "services.plain.command[0]")
    assert "not found on PATH" in one_issue(issues, "services.unknown.command[0]")


def test_relative_command_from_config_folder(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "serve"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    config = load(tmp_path, '[services.s]\ntype = "command"\ncommand = ["bin/serve"]\n')
    assert config.services["s"].command == ["bin/serve"]


def test_unknown_service_type(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, '[services.a]\ntype = "comand"\ncommand = ["python3"]\n')
    issue = one_issue(issues, "services.a.type")
    assert "unknown service type 'comand' (did you mean 'command'?)" in issue
    assert "known types: command" in issue


def test_missing_type(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, '[services.a]\ncommand = ["python3"]\n')
    assert "missing; one of: command" in one_issue(issues, "services.a.type")


def test_string_command_needs_shell(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, '[services.a]\ntype = "command"\ncommand = "echo hi"\n')
    assert "shell = true" in one_issue(issues, "services.a.command")
    config = load(tmp_path, '[services.a]\ntype = "command"\ncommand = "echo hi"\nshell = true\n')
    assert config.services["a"].command == "echo hi"


def test_bad_service_name(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, '[services."a b"]\ntype = "command"\ncommand = ["python3"]\n')
    assert "letters, digits" in one_issue(issues, "services.a b")


# --------------------------------------------------------------------------
# include = [...] drop-ins
# --------------------------------------------------------------------------


def test_include_merges_drop_ins(tmp_path: Path) -> None:
    write(tmp_path, '[services.b]\ntype = "command"\ncommand = ["python3"]\n', "conf.d/20-b.toml")
    write(tmp_path, '[services.a]\nrestart = "never"\n', "conf.d/10-a.toml")
    write(tmp_path, "not toml at all", "conf.d/readme.txt")
    config = load(tmp_path, """\
        include = ["conf.d/*.toml"]
        [services.a]
        type = "command"
        command = ["python3"]
        """)
    assert set(config.services) == {"a", "b"}
    # A drop-in's table merges key by key into the main file's.
    assert config.services["a"].restart == "never"
    assert config.services["a"].command == ["python3"]
    assert config.files == (tmp_path / "citadeld.toml", tmp_path / "conf.d/10-a.toml",
                            tmp_path / "conf.d/20-b.toml")


def test_error_in_drop_in_names_the_drop_in(tmp_path: Path) -> None:
    drop_in = write(tmp_path, '[services.b]\ntype = "command"\ncommand = ["python3"]\nrestrat = 1\n',
                    "conf.d/b.toml")
    broken = write(tmp_path, "[services.c\n", "conf.d/c.toml")
    issues = issues_of(tmp_path, """\
        include = ["conf.d/*.toml"]
        [services.a]
        type = "command"
        command = ["python3"]
        """)
    assert f"{drop_in}: services.b.restrat: unknown key (did you mean 'restart'?)" in issues
    assert any(i.startswith(f"{broken}: invalid TOML") and "line 1" in i for i in issues), issues


def test_drop_in_cannot_include(tmp_path: Path) -> None:
    drop_in = write(tmp_path, 'include = ["more/*.toml"]\n', "conf.d/x.toml")
    issues = issues_of(tmp_path, 'include = ["conf.d/*.toml"]\n')
    assert issues == [f"{drop_in}: include: drop-in files cannot include others"]


# --------------------------------------------------------------------------
# ${VAR}, env files, credentials, and secrets
# --------------------------------------------------------------------------


def service_with_env(env: str, extra: str = "") -> str:
    return f'[services.a]\ntype = "command"\ncommand = ["python3"]\nenv = {{ {env} }}\n{extra}'


def test_variables_defaults_and_escape(tmp_path: Path) -> None:
    config = load(tmp_path, service_with_env(
        'A = "${MODEL_DIR}/x", B = "${UNSET:-fallback}", C = "$${LITERAL}", D = "cost $5"'),
        environ={"MODEL_DIR": "/srv/models"})
    assert config.services["a"].env == {"A": "/srv/models/x", "B": "fallback", "C": "${LITERAL}",
                                        "D": "cost $5"}
    assert config.secrets == frozenset()


def test_variables_in_daemon_and_lists(tmp_path: Path) -> None:
    config = load(tmp_path, """\
        [daemon]
        log_dir = "${LOGS}"
        [services.a]
        type = "command"
        command = ["python3", "--port", "${PORT:-8000}"]
        """, environ={"LOGS": "/var/tmp/citadel-logs"})
    assert config.daemon.log_dir == Path("/var/tmp/citadel-logs")
    assert config.services["a"].command == ["python3", "--port", "8000"]


def test_missing_variable_names_variable_and_key_never_a_secret(tmp_path: Path) -> None:
    secret = "hunter2-very-secret"
    issues = issues_of(tmp_path, service_with_env('A = "${NOT_SET_ANYWHERE}", B = "${DB_PASSWORD}"',
                                                  'port = "${DB_PASSWORD}"\n'),
                       environ={"DB_PASSWORD": secret})
    issue = one_issue(issues, "services.a.env.A")
    assert "${NOT_SET_ANYWHERE}" in issue and "not set" in issue
    # The secret went into a field that rejected it; the message must not show it.
    port_issue = one_issue(issues, "services.a.port")
    assert "****" in port_issue
    assert not any(secret in i for i in issues), issues


def test_bad_reference(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, service_with_env('A = "${not valid}"'))
    assert "is not a valid reference" in one_issue(issues, "services.a.env.A")


def test_daemon_env_file_supplies_variables(tmp_path: Path) -> None:
    (tmp_path / "citadel.env").write_text(
        "# comment\nexport HF_TOKEN=hf_abcdefghijklmnopqrstuv\nMODEL='/srv/m'\n")
    config = load(tmp_path, """\
        [daemon]
        env_file = "citadel.env"
        [services.a]
        type = "command"
        command = ["python3"]
        env = { HF_TOKEN = "${HF_TOKEN}", M = "${MODEL}" }
        """)
    assert config.services["a"].env == {"HF_TOKEN": "hf_abcdefghijklmnopqrstuv", "M": "/srv/m"}
    assert config.daemon.env_file == tmp_path / "citadel.env"
    assert "hf_abcdefghijklmnopqrstuv" in config.secrets


def test_bad_daemon_env_file(tmp_path: Path) -> None:
    (tmp_path / "citadel.env").write_text("OK=1\nthis line is wrong\n")
    issues = issues_of(tmp_path, '[daemon]\nenv_file = "citadel.env"\n')
    assert "citadel.env:2: expected KEY=VALUE" in one_issue(issues, "daemon.env_file")
    issues = issues_of(tmp_path, '[daemon]\nenv_file = "missing.env"\n')
    assert "missing.env" in one_issue(issues, "daemon.env_file")


def test_service_env_file(tmp_path: Path) -> None:
    (tmp_path / "a.env").write_text("FROM_FILE=1\nBOTH=file\nOPENAI_API_KEY=plain-secret-value\n")
    config = load(tmp_path, service_with_env('BOTH = "table"', 'env_file = "a.env"\n'))
    # The env table wins over the file.
    assert config.services["a"].env == {"FROM_FILE": "1", "BOTH": "table",
                                        "OPENAI_API_KEY": "plain-secret-value"}
    assert "plain-secret-value" in config.secrets
    issues = issues_of(tmp_path, service_with_env('X = "1"', 'env_file = "nope.env"\n'))
    assert "nope.env" in one_issue(issues, "services.a.env_file")


def test_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hf").write_text("hf_credentialvalue123\n")
    config = load(tmp_path, service_with_env('HUB = "${credential:hf}"'),
                  environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.services["a"].env["HUB"] == "hf_credentialvalue123"
    # A credential is secret whatever the variable's name.
    assert "hf_credentialvalue123" in config.secrets

    issues = issues_of(tmp_path, service_with_env('HUB = "${credential:nope}"'),
                       environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert "cannot read" in one_issue(issues, "services.a.env.HUB")
    issues = issues_of(tmp_path, service_with_env('HUB = "${credential:hf}"'))
    assert "CREDENTIALS_DIRECTORY is not set" in one_issue(issues, "services.a.env.HUB")


def test_secret_values_are_collected(tmp_path: Path) -> None:
    config = load(tmp_path, service_with_env(
        'HF_TOKEN = "${T}", MY_API_KEY = "literal-api-key", DB_PASSWORD = "pw-12345", PLAIN = "${P}"'),
        environ={"T": "tok-from-env-1234", "P": "not-a-secret", "SESSION_SECRET": "unused"})
    assert {"tok-from-env-1234", "literal-api-key", "pw-12345"} <= config.secrets
    assert "not-a-secret" not in config.secrets
    # A variable whose own name marks it secret is a secret wherever it goes.
    config = load(tmp_path, service_with_env('PLAIN = "${SESSION_SECRET}"'),
                  environ={"SESSION_SECRET": "s3cr3t-value"})
    assert config.secrets == frozenset({"s3cr3t-value"})


# --------------------------------------------------------------------------
# Plugin sections
# --------------------------------------------------------------------------


def test_plugin_sections(tmp_path: Path) -> None:
    sections = {"extras": ExtrasSection}
    config = load(tmp_path, '[plugin.extras]\nurl = "http://x"\n', sections=sections)
    assert config.plugin["extras"] == ExtrasSection(url="http://x", retries=3)

    issues = issues_of(tmp_path, '[plugin.extras]\nurl = 5\nretrys = 1\n[plugin.extra]\n',
                       sections=sections)
    assert "(got 5)" in one_issue(issues, "plugin.extras.url")
    assert "did you mean 'retries'" in one_issue(issues, "plugin.extras.retrys")
    assert "no loaded plugin reads this section (did you mean 'extras'?)" in one_issue(issues, "plugin.extra")

    # The section of a plugin disabled on purpose is kept quiet.
    config = load(tmp_path, '[plugins]\ndisable = ["extras"]\n[plugin.extras]\nurl = 1\n')
    assert config.plugin == {}


# --------------------------------------------------------------------------
# citadeld --check
# --------------------------------------------------------------------------


# The DESIGN example pins GPUs 0 and 1; this machine has none, so --check sees a FAKE NVML host.
FAKE_GPU_HOST = Path(__file__).parents[1] / "fixtures" / "fake_host_8gpu.json"


def check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "CITADEL_FAKE_NVML": str(FAKE_GPU_HOST), **(env or {})}
    return subprocess.run([CITADELD, "--check", "--config", str(path)], check=False, capture_output=True,
                          text=True, timeout=60, env=full_env)


def test_check_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK (2 services" in result.stdout


def test_check_invalid_file_lists_every_issue(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE.replace('restart = "always"', 'restrat = "always"')
                 + '[services.bad]\ntype = "command"\ncommand = ["python3"]\nenv = { K = "${NOPE_VAR}" }\n')
    result = check(path)
    assert result.returncode != 0
    assert f"{path}: services.chat.restrat: unknown key (did you mean 'restart'?)" in result.stderr
    assert f"{path}: services.bad.env.K: ${{NOPE_VAR}} is not set" in result.stderr


def test_check_never_prints_secrets(tmp_path: Path) -> None:
    secret = "sk-live-abcdef0123456789"
    path = write(tmp_path, service_with_env('K = "${OPENAI_API_KEY}"', 'replicas = "${OPENAI_API_KEY}"\n'))
    result = check(path, {"OPENAI_API_KEY": secret})
    assert result.returncode != 0
    assert "services.a.replicas" in result.stderr
    assert secret not in result.stdout + result.stderr
