"""A failed run's cause, refined from the last lines it printed (real messages of vLLM, PyTorch, Python)."""

from __future__ import annotations

from citadel_supervisor.worker.forensics import classify


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
