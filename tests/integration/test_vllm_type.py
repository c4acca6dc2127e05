"""The vllm service type: config checks, the argv it spawns, its probes and phases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CITADELD

from citadel_supervisor.config import ConfigError, load_config
from citadel_supervisor.services.base import WorkerInfo
from citadel_supervisor.services.vllm import VllmConfig, VllmService, startup_phase

FAKE_HOST = Path(__file__).parents[1] / "fixtures" / "fake_host_8gpu.json"


def _load(tmp_path: Path, body: str, env: dict[str, str] | None = None):
    (tmp_path / "model").mkdir(exist_ok=True)
    path = tmp_path / "c.toml"
    path.write_text(body)
    return load_config(path, {"vllm": VllmConfig}, environ=env or {})


def _service(extra: str = "", name: str = "chat") -> str:
    return f"""
[services.{name}]
type = "vllm"
model = "./model"
python = "{sys.executable}"
{extra}
"""


def test_argv_has_no_shell_and_the_key_goes_by_env(tmp_path):
    config = _load(tmp_path, _service('served_model_name = "chat"\nport = 8001\napi_key = "${CHAT}"\n'
                                      'max_model_len = 2048\nargs = ["--enforce-eager"]\ndrain_timeout = 10'),
                   env={"CHAT": "sk-thisIsASecretKey1234"})
    service = config.services["chat"]
    spec = VllmService().spawn_spec(WorkerInfo("chat", "chat", 0, service, port=8001))
    assert spec.argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert spec.argv[spec.argv.index("--port") + 1] == "8001"
    assert spec.argv[spec.argv.index("--model") + 1] == str((tmp_path / "model").resolve())
    assert "--shutdown-timeout" in spec.argv and "--enforce-eager" in spec.argv
    assert "sk-thisIsASecretKey1234" not in " ".join(spec.argv)
    assert spec.env["VLLM_API_KEY"] == "sk-thisIsASecretKey1234"
    assert "PROMETHEUS_MULTIPROC_DIR" not in spec.env
    assert "sk-thisIsASecretKey1234" in config.secrets
    assert "sk-thisIsASecretKey1234" not in repr(service)


def test_probe_and_scrape_paths_stay_out_of_the_access_log_unless_asked(tmp_path):
    def argv(extra: str) -> list[str]:
        service = _load(tmp_path, _service(extra)).services["chat"]
        return VllmService().spawn_spec(WorkerInfo("chat", "chat", 0, service, port=8001)).argv

    default = argv("")
    assert default[default.index("--disable-access-log-for-endpoints") + 1] == "/health,/metrics"
    assert "--disable-access-log-for-endpoints" not in argv("access_log_exclude = []")
    with pytest.raises(ConfigError) as err:
        argv('access_log_exclude = ["health"]')
    assert "services.chat.access_log_exclude" in str(err.value) and "'health' is not a URL path" in str(err.value)
    with pytest.raises(ConfigError) as err:
        argv('args = ["--disable-access-log-for-endpoints=/x"]')
    assert "set by the key 'access_log_exclude'" in str(err.value)


def test_missing_local_model_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _service().replace("./model", "./nope"))
    assert "services.chat.model" in str(err.value) and "does not exist" in str(err.value)


def test_model_id_is_not_checked_as_a_path(tmp_path):
    config = _load(tmp_path, _service().replace("./model", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert config.services["chat"].model_names() == ["HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_port_clash_between_services(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _service("port = 8001\nreplicas = 2") + _service("port = 8002", name="other"))
    assert "port 8002" in str(err.value) and "chat.1" in str(err.value)


def test_tensor_parallel_must_match_gpus(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _service("gpus = [0, 1, 2]\ntensor_parallel_size = 2"))
    assert "services.chat" in str(err.value) and "needs 2 GPUs, but gpus gives 3" in str(err.value)


def test_managed_flags_are_refused_in_args(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _service('args = ["--port", "9000"]'))
    assert "--port is set by the key 'port'" in str(err.value)


def test_shared_gpu_memory_fractions_over_one_refused(tmp_path):
    (tmp_path / "model").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(_service("gpus = [0]\ngpus_shared = true\ngpu_memory_utilization = 0.6")
                      + _service("gpus = [0]\ngpus_shared = true\ngpu_memory_utilization = 0.5", name="b"))
    result = subprocess.run([CITADELD, "--check", "--config", str(config)], capture_output=True, text=True,
                            env={**os.environ, "CITADEL_FAKE_NVML": str(FAKE_HOST)})
    assert result.returncode == 1
    assert "GPU 0 is shared by chat (0.6) and b (0.5)" in result.stderr


def test_default_probes_and_phases(tmp_path):
    config = _load(tmp_path, _service("port = 8001\ninference_probe = true"))
    info = WorkerInfo("chat", "chat", 0, config.services["chat"], port=8001)
    probes = VllmService().probes(info)
    assert probes.startup.path == "/health" and probes.startup.period <= 0.1
    assert probes.liveness.kind == "inference"
    assert probes.readiness.path == "/health"
    assert VllmService().metrics_url(info) == "http://127.0.0.1:8001/metrics"
    assert startup_phase("(Worker pid=1) INFO [default_loader.py:501] Loading weights took 0.95 seconds") \
        == "loading weights"
    assert startup_phase("(APIServer pid=1) INFO [entry.py:140] Starting vLLM server on http://x") == "serving"
    assert startup_phase("hello") is None
