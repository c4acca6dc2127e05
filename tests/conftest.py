"""Shared fixtures: a real citadeld in a subprocess, driven through real citadelctl calls."""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from citadel_supervisor.testing import (  # noqa: F401 (tests import them from here)
    free_port,
    free_port_run,
    free_ports,
    process_gone,
    wait_gone,
    wait_until,
)

# Property tests: the default profile, "ci", is derandomized and keeps no example
# database, so every run draws the same examples and a run cannot fail by chance.
# "explore" searches afresh each run, with many more examples, and keeps what it
# finds in .hypothesis/: ``pytest --hypothesis-profile explore tests/unit/test_relabel_properties.py``.
settings.register_profile("ci", max_examples=200, derandomize=True, database=None,
                          deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=20_000, deadline=None)
settings.load_profile("ci")

BIN = Path(sys.executable).parent
CITADELD = str(BIN / "citadeld")
CITADELCTL = str(BIN / "citadelctl")
#: A STAND-IN for vLLM's API server (not vLLM): see its docstring.
VLLM_STANDIN = Path(__file__).parent / "fixtures" / "vllm_sleep_standin.py"


def vllm_standin_python(folder: Path) -> Path:
    """An executable for a ``vllm`` service's ``python`` that runs the vLLM STAND-IN."""
    wrapper = folder / "standin-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{VLLM_STANDIN}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def vllm_standin_service(folder: Path, port: int, extra: str = "") -> str:
    """The config of a ``vllm`` service ``chat`` run by the vLLM STAND-IN on ``port`` (its
    model folder and interpreter under ``folder``); ``extra``: more keys, one per line."""
    model = folder / "model"
    model.mkdir(exist_ok=True)
    keys = "\n".join(line.strip() for line in extra.strip().splitlines())
    return (f'[services.chat]\ntype = "vllm"\nmodel = "{model}"\n'
            f'python = "{vllm_standin_python(folder)}"\nport = {port}\nstop_timeout = 5\n{keys}\n')


class RunningDaemon:
    """A citadeld subprocess on a config in a temp folder."""

    def __init__(self, root: Path, config_text: str, env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None):
        self.root = root
        self.config = root / "citadeld.toml"
        self.socket = root / "run" / "control.sock"
        self.log_path = root / "citadeld.log"
        self.env = {**os.environ, **(env or {})}
        self.write_config(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        #: An argv that execs citadeld's, e.g. ``["prlimit", "--nofile=256", "--"]``.
        self.wrapper = wrapper or []

    def write_config(self, services_text: str) -> None:
        """Write the config: a [daemon] table pointing into ``root``, then ``services_text``."""
        head = textwrap.dedent(f"""\
            [daemon]
            control_socket = "{self.socket}"
            state_dir = "{self.root / 'run'}"
            log_dir = "{self.root / 'log'}"
            log_level = "DEBUG"
            socket_group = ""
            """)
        body = textwrap.dedent(services_text)
        if "[exporter]" not in body:
            head += '[exporter]\nlisten = ""\n'
        self.config.write_text(head + body)

    def start(self, wait: bool = True) -> RunningDaemon:
        """Start citadeld and wait until its socket answers."""
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen([*self.wrapper, CITADELD, "--config", str(self.config),
                                      "--log-format", "json"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"citadeld exited {self.proc.returncode}:\n{self.logs()}")
                if self.ctl("version", check=False).returncode == 0:
                    return self
                time.sleep(0.05)
            raise TimeoutError(f"citadeld did not answer:\n{self.logs()}")
        return self

    def logs(self) -> str:
        """Everything citadeld wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run citadelctl against this daemon."""
        result = subprocess.run([CITADELCTL, "--socket", str(self.socket), *args],
                                check=False, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"citadelctl {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}"
                                 f"\n--- citadeld log ---\n{self.logs()[-4000:]}")
        return result

    def status(self) -> dict[str, dict[str, Any]]:
        """``status --json``, keyed by worker name."""
        data = json.loads(self.ctl("status", "--json").stdout)
        return {w["name"]: w for w in data["workers"]}

    def wait_for(self, predicate: Any, timeout: float = 20, what: str = "condition") -> Any:
        """Poll ``predicate(status)`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status()
            result = predicate(last)
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(last, indent=1)}"
                             f"\n--- citadeld log ---\n{self.logs()[-4000:]}")

    def wait_state(self, worker: str, state: str, timeout: float = 20) -> dict[str, Any]:
        """Wait until ``worker`` is in ``state``; its status."""
        return self.wait_for(lambda s: s.get(worker) if s.get(worker, {}).get("state") == state else None,
                             timeout, f"{worker} to be {state}")

    def signal(self, sig: int) -> None:
        """Send a signal to citadeld."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM citadeld and wait for it; its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """``daemon_factory(config_text)`` -> a started RunningDaemon; all are stopped afterwards."""
    made: list[RunningDaemon] = []

    def make(config_text: str, start: bool = True, env: dict[str, str] | None = None) -> RunningDaemon:
        root = tmp_path / f"d{len(made)}"
        root.mkdir()
        daemon = RunningDaemon(root, config_text, env)
        made.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in made:
        if daemon.proc is not None and daemon.proc.poll() is None:
            # SIGTERM first: a SIGKILLed citadeld leaves its workers' descendants behind
            # (by design, for the next citadeld to stop), which would load the machine.
            daemon.proc.terminate()
            try:
                daemon.proc.wait(60)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()


class Accounts:
    """Groups and users made for one test run, removed afterwards (tests run as root)."""

    def __init__(self) -> None:
        self.groups: list[str] = []
        self.users: list[str] = []

    def group(self, name: str) -> int:
        """Create a group; its gid."""
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        self.groups.append(name)
        return grp.getgrnam(name).gr_gid

    def user(self, name: str, groups: list[str]) -> pwd.struct_passwd:
        """Create a user without a home, in ``groups``."""
        argv = ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name]
        if groups:
            argv[1:1] = ["-G", ",".join(groups)]
        subprocess.run(argv, check=True, capture_output=True)
        self.users.append(name)
        return pwd.getpwnam(name)

    def remove(self) -> None:
        """Delete every user and group made."""
        for name in self.users:
            subprocess.run(["userdel", name], check=False, capture_output=True)
        for name in self.groups:
            subprocess.run(["groupdel", name], check=False, capture_output=True)


def drop_to(user: pwd.struct_passwd) -> None:
    """In a forked child: become ``user``, with its gid and supplementary groups."""
    os.setgroups([g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


class GuardedDaemon(RunningDaemon):
    """A RunningDaemon whose [daemon] table sets the socket's group and the allowed groups."""

    def __init__(self, root: Path, services: str, access: str, env: dict[str, str] | None = None):
        self.access = access
        super().__init__(root, services, env)

    def write_config(self, services_text: str) -> None:
        """The usual config, with ``access`` in place of the empty socket_group."""
        super().write_config(services_text)
        text = self.config.read_text().replace('socket_group = ""\n', self.access)
        self.config.write_text(text)
