"""citadeld harms nothing it does not own: the state file is untrusted input, and a
process is signalled only when it proves to be a worker's (real processes, real signals).

Tests run as root. Where citadeld must be refused a signal, it runs without
CAP_KILL (dropped from its bounding set), and the process it must not signal
belongs to user nobody: the kernel then answers EPERM, as it does to a
citadeld of one user signalling another's process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import RunningDaemon, process_gone, wait_until

from citadel_supervisor.process.cgroups import CgroupTree
from citadel_supervisor.process.spawn import SPAWN_ID_ENV

NOBODY = 65534
CAP_KILL = 5
#: An argv prefix that runs citadeld without CAP_KILL (PR_CAPBSET_DROP = 24).
_DROP_CAP_KILL = (
    "import ctypes, os, sys\n"
    f"if ctypes.CDLL(None, use_errno=True).prctl(24, {CAP_KILL}, 0, 0, 0) != 0:\n"
    "    sys.exit('PR_CAPBSET_DROP failed')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
WITHOUT_CAP_KILL = [sys.executable, "-c", _DROP_CAP_KILL]

Spawner = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def sleepers() -> Iterator[Spawner]:
    """``sleepers(**popen_kwargs)`` -> a ``sleep`` in its own session; all killed afterwards."""
    made: list[subprocess.Popen[bytes]] = []

    def start(**kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "600"], start_new_session=True, **kwargs)
        made.append(proc)
        return proc

    yield start
    for proc in made:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _created(pid: int) -> float:
    return psutil.Process(pid).create_time()


def _leftover(sleepers: Spawner) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """A process that proves to be a recorded worker's, and its state-file entry."""
    spawn_id = uuid.uuid4().hex
    proc = sleepers(env={**os.environ, SPAWN_ID_ENV: spawn_id})
    return proc, {"pid": proc.pid, "create_time": _created(proc.pid), "spawn_id": spawn_id, "cgroup": None}


def _daemon(daemon_factory: Any, state: str | bytes | None = None, services: str = "",
            cgroups: str = "auto") -> RunningDaemon:
    """A citadeld not yet started, its state_dir made, holding ``state`` as workers.json."""
    daemon: RunningDaemon = daemon_factory(services, start=False)
    state_dir = _state_dir(daemon)
    text = daemon.config.read_text().replace("[daemon]\n", f'[daemon]\ncgroups = "{cgroups}"\n', 1)
    # Apart from the control socket's folder, which citadeld checks on its own terms.
    moved = text.replace(f'state_dir = "{daemon.root / "run"}"', f'state_dir = "{state_dir}"')
    assert moved != text, "the config's state_dir line changed: update _daemon"
    daemon.config.write_text(moved)
    state_dir.mkdir(mode=0o755)
    if state is not None:
        path = state_dir / "workers.json"
        path.write_bytes(state.encode() if isinstance(state, str) else state)
        path.chmod(0o644)
    return daemon


def _state_dir(daemon: RunningDaemon) -> Path:
    return daemon.root / "state"


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _cap_kill(pid: int) -> bool:
    """True when the process has CAP_KILL in its effective set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << CAP_KILL))
    raise AssertionError(f"no CapEff in /proc/{pid}/status")


# -- 1. the state file is validated ---------------------------------------------------

BAD_FILES = {
    "list": "[]",
    "empty-entry": '{"w": {}}',
    "pid-string": '{"w": {"pid": "4242", "create_time": 1.0}}',
    "pid-bool": '{"w": {"pid": true, "create_time": 1.0}}',
    "pid-negative": '{"w": {"pid": -1, "create_time": 1.0}}',
    "create-time-string": '{"w": {"pid": 4242, "create_time": "yesterday"}}',
    "create-time-nan": '{"w": {"pid": 4242, "create_time": NaN}}',
    "entry-list": '{"w": [4242, 1.0]}',
    "cgroup-number": '{"w": {"pid": 4242, "create_time": 1.0, "cgroup": 7}}',
    "spawn-id-object": '{"w": {"pid": 4242, "create_time": 1.0, "spawn_id": {}}}',
    "not-json": '{"w": {"pid": 4242,',
    "not-utf8": b'{"w\xff\xfe": 1}',
    "deep": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_state_file_is_moved_aside_and_citadeld_starts(daemon_factory, content):
    daemon = _daemon(daemon_factory, content)
    path = _state_dir(daemon) / "workers.json"
    daemon.start()
    daemon.ctl("status")
    logs = daemon.logs()
    assert f"{path}: " in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    raw = content.encode() if isinstance(content, str) else content
    assert path.with_name("workers.json.bad").read_bytes() == raw
    wait_until(lambda: path.exists() and json.loads(path.read_text()) == {}, 10,
               "citadeld to rewrite workers.json")


def test_valid_entries_are_handled_beside_bad_ones(daemon_factory, sleepers):
    proc, entry = _leftover(sleepers)
    state = {"bad": {"pid": "x", "create_time": 1.0}, "w": entry}
    daemon = _daemon(daemon_factory, json.dumps(state)).start()
    wait_until(lambda: not _alive(proc), 10, "the valid leftover to be stopped")
    assert "left running by an earlier citadeld" in daemon.logs()
    assert "'bad'" in daemon.logs()


# -- 2. a reused pid is a stranger's ----------------------------------------------------

def test_a_stranger_given_an_old_workers_pid_is_left_running(daemon_factory, sleepers):
    stranger = sleepers()  # a session leader: its group id is its pid
    assert os.getpgid(stranger.pid) == stranger.pid
    old = {"pid": stranger.pid, "create_time": _created(stranger.pid) - 100,
           "spawn_id": uuid.uuid4().hex, "cgroup": None}
    daemon = _daemon(daemon_factory, json.dumps({"w": old})).start()
    daemon.ctl("status")  # start-up, and so the clean-up, is over
    assert _alive(stranger), f"citadeld killed an unrelated process:\n{daemon.logs()[-3000:]}"
    assert "left running by an earlier citadeld" not in daemon.logs()


# -- 3. a leftover citadeld may not signal -------------------------------------------------

def test_a_leftover_citadeld_may_not_signal_does_not_stop_start_up(daemon_factory, sleepers):
    proc = sleepers(user=NOBODY, group=NOBODY, extra_groups=[])
    entry = {"pid": proc.pid, "create_time": _created(proc.pid), "spawn_id": None, "cgroup": None}
    daemon = _daemon(daemon_factory, json.dumps({"w": entry}))
    daemon.wrapper = WITHOUT_CAP_KILL
    daemon.start()
    assert daemon.proc is not None and not _cap_kill(daemon.proc.pid)
    daemon.ctl("status")
    assert f"cannot send SIGTERM to pid {proc.pid}: permission denied" in daemon.logs()
    assert _alive(proc)


# -- 4. a recorded cgroup must be one of citadeld's own ---------------------------------

def _writable_cgroup_base() -> Path | None:
    tree = CgroupTree.detect("test")
    return tree.base if tree is not None else None


def test_a_folder_made_to_look_like_a_cgroup_is_not_touched(daemon_factory, sleepers, tmp_path):
    victim = sleepers()
    fake = tmp_path / "fake-cgroup"
    fake.mkdir()
    (fake / "cgroup.procs").write_text(f"{victim.pid}\n")
    (fake / "cgroup.kill").write_text("")
    absent = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it
    state = {"w": {"pid": absent, "create_time": 1.0, "spawn_id": None, "cgroup": str(fake)}}
    daemon = _daemon(daemon_factory, json.dumps(state)).start()
    daemon.ctl("status")
    assert _alive(victim)
    assert (fake / "cgroup.kill").read_text() == ""
    assert (fake / "cgroup.procs").exists()
    assert f"ignoring the cgroup {fake}" in daemon.logs()


@pytest.mark.parametrize("name", ["other-{}", "citadel-worker-{instance}-w{}"])
def test_a_cgroup_outside_citadelds_own_is_not_touched(daemon_factory, sleepers, name):
    base = _writable_cgroup_base()
    if base is None:
        pytest.skip("no writable cgroup v2 with cgroup.kill here")
    daemon = _daemon(daemon_factory)
    own = hashlib.sha1(str(_state_dir(daemon).resolve()).encode()).hexdigest()[:8]
    other_instance = "ffffffff" if own != "ffffffff" else "00000000"
    foreign = base / name.format(uuid.uuid4().hex[:8], instance=other_instance)
    foreign.mkdir()
    victim = sleepers()
    try:
        (foreign / "cgroup.procs").write_text(str(victim.pid))
        absent = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
        state = {"w": {"pid": absent, "create_time": 1.0, "spawn_id": None, "cgroup": str(foreign)}}
        (_state_dir(daemon) / "workers.json").write_text(json.dumps(state))
        daemon.start()
        daemon.ctl("status")
        assert _alive(victim)
        assert foreign.is_dir()
        assert (foreign / "cgroup.procs").read_text().split() == [str(victim.pid)]
        assert f"ignoring the cgroup {foreign}" in daemon.logs()
    finally:
        victim.kill()
        victim.wait()
        if foreign.exists():  # an unfixed citadeld removes it
            foreign.rmdir()


# -- 5. a state_dir others could write is not trusted --------------------------------------

@pytest.mark.parametrize("owner, mode, trusted", [
    (0, 0o755, True),
    (NOBODY, 0o755, False),
    (0, 0o775, False),
    (0, 0o757, False),
], ids=["own", "owned-by-nobody", "group-writable", "others-writable"])
def test_state_dir_others_could_write_is_not_trusted(daemon_factory, sleepers, owner, mode, trusted):
    proc, entry = _leftover(sleepers)
    daemon = _daemon(daemon_factory, json.dumps({"w": entry}))
    state_dir = _state_dir(daemon)
    os.chown(state_dir, owner, owner)
    state_dir.chmod(mode)
    daemon.start()
    daemon.ctl("status")
    if trusted:  # the leftover is provably the worker's: a trusted file has it stopped
        wait_until(lambda: not _alive(proc), 10, "the leftover to be stopped")
    else:
        assert _alive(proc), daemon.logs()[-3000:]
        assert "not using" in daemon.logs() and str(state_dir) in daemon.logs()


# -- 6. the tree kill, without cgroups -------------------------------------------------

SETSID_CHILD = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = os.fork()
if child == 0:
    os.setsid()  # leaves the leader's group: once the leader is reaped, its pid is free
    while True:
        time.sleep(1)
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()} {child}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
signal.signal(signal.SIGTERM, signal.SIG_DFL)
while True:
    time.sleep(1)
"""


def _pids(pidfile: Path) -> list[int]:
    wait_until(pidfile.exists, 20, f"{pidfile} to be written")
    return [int(p) for p in pidfile.read_text().split()]


def _take_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """A new session leader given ``pid`` (free by then), or None when another process took it first."""
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    if proc.pid == pid:
        return proc
    proc.kill()
    proc.wait()
    return None


def test_stop_spares_a_stranger_given_the_reaped_leaders_pid(daemon_factory, tmp_path):
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("cannot choose the next pid here (/proc/sys/kernel/ns_last_pid)")
    script, pidfile = tmp_path / "setsid_child.py", tmp_path / "w.pids"
    script.write_text(SETSID_CHILD)
    daemon = _daemon(daemon_factory, cgroups="off", services=f"""
        [services.w]
        type = "command"
        command = ["{sys.executable}", "{script}", "{pidfile}"]
        stop_timeout = 60
        """)
    daemon.start()
    daemon.wait_state("w", "running")
    leader, child = _pids(pidfile)
    daemon.ctl("stop", "w")  # the leader dies of SIGTERM; the child ignores it
    stranger = wait_until(lambda: _take_pid(leader), 20, f"pid {leader} to be free and taken")
    try:
        assert os.getpgid(stranger.pid) == leader
        # citadeld goes on stopping the tree: it lists its members as often as it
        # has the chance; the stranger, of pid and group id ``leader``, is none of them.
        os.kill(child, signal.SIGKILL)
        daemon.wait_state("w", "stopped")
        assert _alive(stranger), f"citadeld killed the stranger:\n{daemon.logs()[-3000:]}"
    finally:
        stranger.kill()
        stranger.wait()


FORKS_NOBODY = """\
import os, signal, sys, time
def fork_nobody(signum, frame):
    child = os.fork()
    if child == 0:
        os.setgid(65534)
        os.setuid(65534)  # a member citadeld, without CAP_KILL, may not signal
        while True:
            time.sleep(1)
    with open(sys.argv[1] + ".tmp", "w") as fh:
        fh.write(str(child))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, fork_nobody)
print("up", flush=True)
while True:
    time.sleep(1)
"""


def test_a_member_citadeld_may_not_signal_does_not_hang_the_stop(daemon_factory, tmp_path):
    script, pidfile = tmp_path / "forks_nobody.py", tmp_path / "nobody.pid"
    script.write_text(FORKS_NOBODY)
    daemon = _daemon(daemon_factory, cgroups="off", services=f"""
        [services.w]
        type = "command"
        command = ["{sys.executable}", "{script}", "{pidfile}"]
        stop_timeout = 60
        """)
    daemon.wrapper = WITHOUT_CAP_KILL
    daemon.start()
    assert daemon.proc is not None and not _cap_kill(daemon.proc.pid)
    leader = daemon.wait_state("w", "running")["pid"]
    daemon.ctl("stop", "w")
    # Answered only once the stop has signalled the tree and listed its members:
    # what forks from now on is a new member, signalled as it is found.
    daemon.wait_state("w", "stopping")
    os.kill(leader, signal.SIGUSR1)
    child = _pids(pidfile)[0]
    try:
        wait_until(lambda: f"cannot send SIGTERM to pid {child}: permission denied" in daemon.logs(),
                   20, "citadeld to report the refused signal")
    finally:
        os.kill(child, signal.SIGKILL)
        os.kill(leader, signal.SIGKILL)
    daemon.wait_state("w", "stopped")
    assert wait_until(lambda: process_gone(child), 10, "the nobody child to be gone")
    assert daemon.stop() == 0
