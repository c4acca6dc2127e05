"""A real citadeld names why its workers failed: in status, the exit event, the log and the metrics."""

from __future__ import annotations

import sys
import urllib.request
from typing import Any

from conftest import free_port

BAD_MODEL = ("import sys; print('huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. "
             "Repository Not Found for url: https://huggingface.co/api/models/no/such-model', flush=True); "
             "sys.exit(1)")


def test_a_model_that_cannot_be_found_goes_fatal_at_once_and_says_why(daemon_factory: Any) -> None:
    port = free_port()
    d = daemon_factory(f"""
        [exporter]
        listen = "127.0.0.1:{port}"

        [services.broken]
        type = "command"
        command = ["{sys.executable}", "-c", "{BAD_MODEL}"]
        backoff_initial = 0
        start_limit_burst = 5
        """)
    status = d.wait_state("broken", "fatal")
    assert status["restarts"] == 0  # no restart loop on a wrong model
    assert status["last_failure"] == "model"
    assert "cause model" in d.logs() and "no restart mends that" in d.logs()
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'citadel_worker_failures_total{cause="model",service="broken",worker="broken"} 1.0' in page
