"""A failed run's cause, refined from the last lines it printed (real messages of vLLM, PyTorch, Python)."""

from __future__ import annotations

from pathlib import Path

from citadel_supervisor.gpu.fake_nvml import FakeNvml
from citadel_supervisor.gpu.inventory import GpuInventory
from citadel_supervisor.process.cgroups import oom_kills
from citadel_supervisor.worker.forensics import classify

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_real_messages_name_their_cause() -> None:
    cases = {
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB": "gpu_oom",
        "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`": "gpu_oom",
        "huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. Repository Not Found for url": "model",
        "OSError: /models/x does not appear to have a file named config.json.": "model",
        "OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): address "
        "already in use": "port",
    }
    for line, cause in cases.items():
        assert classify("exit", ["INFO starting", line]) == cause, line
        assert classify("signal", [line]) == cause


def test_other_causes_and_other_lines_stay_as_they_are() -> None:
    assert classify("exit", ["INFO all fine", "Traceback (most recent call last):"]) == "exit"
    assert classify("signal", []) == "signal"
    assert classify("stalled", ["CUDA out of memory"]) == "stalled"  # the probe knew better
    assert classify("startup", ["Repository Not Found"]) == "startup"


def test_the_oom_killer_is_read_from_the_workers_cgroup(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n")
    assert oom_kills(tmp_path) == 2
    assert oom_kills(tmp_path / "absent") == 0  # no memory controller there: nothing known
    assert classify("signal", ["Killed"], oom_kills=2) == "oom"
    assert classify("exit", ["CUDA out of memory"], oom_kills=1) == "oom"  # the kernel's word first
    assert classify("liveness", [], oom_kills=1) == "liveness"


def test_xid_errors_during_a_run_make_it_a_gpu_error() -> None:
    """Counted on the worker's own GPUs, by NVML (the FAKE one here), before and after the run."""
    fake = FakeNvml.from_file(FIXTURES / "fake_host_8gpu.json")
    inventory = GpuInventory.detect(fake)
    mine = [inventory.gpus[1].uuid]
    before = inventory.xid_errors(mine)
    assert before == 0
    fake.fake_inject_xid(2, 48)  # another worker's GPU: not this run's business
    assert inventory.xid_errors(mine) == 0
    fake.fake_inject_xid(1, 79)  # "GPU has fallen off the bus"
    assert inventory.xid_errors(mine) == 1
    assert classify("signal", [], gpu_errors=1) == "gpu_error"
    assert classify("exit", ["CUDA out of memory"], oom_kills=1, gpu_errors=1) == "oom"
