"""Helpers for the gateway's tests: free ports, the fake's service table, a small HTTP client.

A module of its own (not ``conftest``): the main test suite imports its own
``conftest`` by that name, and the two must not shadow each other.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
from pathlib import Path
from typing import Any

from citadel_supervisor.testing import free_ports, wait_until  # noqa: F401 (the tests import them from here)

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_upstream.py"


def sha256_hash(key: str) -> str:
    """The config's ``hash = "sha256:<hex>"`` of a key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def fake_service(name: str, port: int, fail: str = "none", period: float = 0.2) -> str:
    """A ``command`` service running the fake upstream on ``port``."""
    argv = json.dumps([sys.executable, str(FAKE), "--port", str(port), "--fail", fail])
    return (f"[services.{name}]\ntype = \"command\"\ncommand = {argv}\nport = {port}\n"
            f"stop_timeout = 5\n"
            f"health = {{ http = \"http://127.0.0.1:{port}/health\", period = {period} }}\n")


def fake_vllm_python(folder: Path) -> Path:
    """A shim to give a ``vllm`` service as its ``python``: it drops ``-m MODULE`` from vLLM's
    argv and runs the FAKE upstream with the rest (``--port``, ``--host``; others ignored)."""
    shim = folder / "fake-vllm-python"
    shim.write_text(f"#!/bin/sh\n# A FAKE vLLM interpreter: runs the stand-in upstream.\n"
                    f"shift 2\nexec {sys.executable} {FAKE} \"$@\"\n")
    shim.chmod(0o755)
    return shim


def fake_vllm_service(name: str, port: int, python: Path, model_dir: Path, served: str,
                      replicas: int = 1) -> str:
    """A ``vllm`` service whose workers run the FAKE upstream (through ``fake_vllm_python``):
    citadeld reads its ``/metrics`` as an engine's. No stall check: the fake's queue is pretend."""
    return (f"[services.{name}]\ntype = \"vllm\"\nmodel = \"{model_dir}\"\npython = \"{python}\"\n"
            f"served_model_name = \"{served}\"\nport = {port}\nreplicas = {replicas}\n"
            f"stall_timeout = 0\nstop_timeout = 5\n")


class Http:
    """A tiny blocking HTTP client for one host:port (http.client; one connection a call)."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.host = host
        self.port = port

    def request(self, method: str, path: str, body: Any = None, key: str | None = None,
                raw: bytes | None = None, timeout: float = 30,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        """One request; ``(status, headers, decoded JSON or text)``."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            conn.request(method, path, body=payload, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            decoded: Any = json.loads(data)
        except ValueError:
            decoded = data.decode(errors="replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, decoded

    def post(self, path: str, body: Any = None, key: str | None = None, **kw: Any) -> tuple[int, dict[str, str], Any]:
        """POST JSON."""
        return self.request("POST", path, body, key, **kw)

    def get(self, path: str, key: str | None = None, **kw: Any) -> tuple[int, dict[str, str], Any]:
        """GET."""
        return self.request("GET", path, None, key, **kw)

    def stream(self, path: str, body: Any, key: str | None = None,
               timeout: float = 30) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Start a streaming POST; the open connection and response (close it yourself)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        hdrs = {"Content-Type": "application/json"}
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        conn.request("POST", path, body=json.dumps(body).encode(), headers=hdrs)
        return conn, conn.getresponse()


def read_sse(resp: http.client.HTTPResponse) -> list[str]:
    """Every ``data:`` payload of a finished SSE answer."""
    events = []
    for line in resp.read().decode().splitlines():
        if line.startswith("data: "):
            events.append(line[len("data: "):])
    return events


def wait_gateway_models(gw: Http, key: str | None, models: set[str], timeout: float = 20) -> None:
    """Wait until ``/v1/models`` lists exactly ``models``."""
    def listed() -> bool:
        try:
            status, _, data = gw.get("/v1/models", key=key, timeout=2)
        except OSError:
            return False
        return status == 200 and {m["id"] for m in data["data"]} == models
    wait_until(listed, timeout, f"the gateway to list {sorted(models)}")
