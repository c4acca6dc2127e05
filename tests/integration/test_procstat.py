"""procstat: what /proc says of a process, checked against psutil on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from citadel_supervisor.process.procstat import open_fds, parse_stat, process_table, read_stat

# A child with three threads and a few extra open files, that burns some CPU first.
CHILD = """
import sys, threading, time
files = [open(sys.executable, "rb") for _ in range(5)]
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
for _ in range(2):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


def test_a_live_process_reads_as_psutil_sees_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        stat = read_stat(child.pid)
        proc = psutil.Process(child.pid)
        assert stat is not None
        assert stat.ppid == os.getpid()
        assert stat.threads == proc.num_threads() == 3
        times = proc.cpu_times()
        assert abs(stat.cpu_seconds - (times.user + times.system)) < 0.05
        assert stat.cpu_seconds >= 0.25
        assert abs(stat.resident_bytes - proc.memory_info().rss) < 1 << 20
        assert open_fds(child.pid) == proc.num_fds() >= 8
        assert not stat.zombie
        assert process_table()[child.pid].pgid == os.getpgid(child.pid)
    finally:
        child.kill()
    # killed but not yet waited for: a zombie
    deadline = time.monotonic() + 5
    while (stat := read_stat(child.pid)) is not None and not stat.zombie and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stat is not None and stat.zombie
    child.wait()
    assert read_stat(child.pid) is None
    assert open_fds(child.pid) == 0


def test_a_command_name_with_spaces_and_parentheses_is_parsed() -> None:
    line = b"42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 100 1000 300 rest\n"
    stat = parse_stat(line)
    assert (stat.ppid, stat.pgid, stat.zombie, stat.threads) == (1, 42, False, 7)
    assert stat.cpu_seconds == 300 / os.sysconf("SC_CLK_TCK")
    assert stat.resident_bytes == 300 * os.sysconf("SC_PAGE_SIZE")
