"""Worker output capture: rotated files, the ring, following, rate limits, and a flooding worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import CITADELCTL, CITADELD

from citadel_supervisor.logs.masking import masker
from citadel_supervisor.logs.worker_output import RateLimiter, RotatingFile, WorkerOutput

# --------------------------------------------------------------------------
# RotatingFile
# --------------------------------------------------------------------------


def test_rotation_keeps_the_configured_count(tmp_path: Path) -> None:
    f = RotatingFile(tmp_path / "w.log", max_bytes=1000, backups=2)
    for i in range(50):
        f.write(f"line {i:04d} ".encode() + b"x" * 88 + b"\n", 1)  # 100 bytes each
    f.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["w.log", "w.log.1", "w.log.2"]
    for p in tmp_path.iterdir():
        assert 0 < p.stat().st_size <= 1000
    # Newest in w.log, then .1, then .2; nothing lost inside the kept window.
    current, one, two = ((tmp_path / n).read_text() for n in names)
    assert current.splitlines()[-1].startswith("line 0049")
    assert one.splitlines()[-1].startswith("line 0039")
    assert two.splitlines()[-1].startswith("line 0029")


def test_a_chunk_larger_than_max_bytes_is_split_at_line_ends(tmp_path: Path) -> None:
    f = RotatingFile(tmp_path / "w.log", max_bytes=1000, backups=2)
    f.write(b"".join(b"%03d" % i + b"x" * 96 + b"\n" for i in range(35)), 35)  # 3500 bytes at once
    f.write(b"L" * 1500 + b"\n", 1)  # one line longer than max_bytes gets a file to itself
    f.close()
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert sizes == {"w.log": 1501, "w.log.1": 500, "w.log.2": 1000}
    assert (tmp_path / "w.log.1").read_text().startswith("030")
    assert (tmp_path / "w.log.2").read_text().startswith("020")


def test_lines_fill_the_current_file_before_rotating(tmp_path: Path) -> None:
    (tmp_path / "w.log").write_bytes(b"o" * 99 + b"\n")
    f = RotatingFile(tmp_path / "w.log", max_bytes=1000, backups=1)
    f.write(b"".join(b"%03d" % i + b"n" * 96 + b"\n" for i in range(12)), 12)
    f.close()
    assert (tmp_path / "w.log.1").stat().st_size == 1000  # the old line and 9 new ones
    assert (tmp_path / "w.log").read_text().startswith("009")
    assert (tmp_path / "w.log").stat().st_size == 300


def test_rotation_without_backups_truncates(tmp_path: Path) -> None:
    f = RotatingFile(tmp_path / "w.log", max_bytes=1000, backups=0)
    for i in range(25):
        f.write(b"y" * 99 + b"\n", 1)
    f.close()
    assert [p.name for p in tmp_path.iterdir()] == ["w.log"]
    assert (tmp_path / "w.log").stat().st_size == 500


def test_rotation_continues_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "w.log").write_bytes(b"z" * 950)
    f = RotatingFile(tmp_path / "w.log", max_bytes=1000, backups=1)
    f.write(b"a" * 99 + b"\n", 1)
    f.close()
    assert (tmp_path / "w.log.1").stat().st_size == 950
    assert (tmp_path / "w.log").stat().st_size == 100


def test_unwritable_file_drops_lines_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    f = RotatingFile(blocker / "w.log", max_bytes=1000, backups=1)
    f.write(b"a\nb\n", 2)
    f.write(b"c\n", 1)
    assert f.dropped_lines == 3


def test_rate_limiter_grants_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(10.0)
    assert limiter.take(100) == 40  # the burst is four seconds' worth
    assert limiter.take(100) == 0


# --------------------------------------------------------------------------
# WorkerOutput on real pipes
# --------------------------------------------------------------------------


async def _feed(output: WorkerOutput, chunks: list[bytes]) -> None:
    """Write ``chunks`` to a real pipe that ``output`` reads, close it, and wait for the end."""
    read_fd, write_fd = os.pipe()
    output.attach([read_fd])
    for chunk in chunks:
        os.write(write_fd, chunk)
        await asyncio.sleep(0.01)
    os.close(write_fd)
    await output.drained(5)


def test_lines_go_to_file_and_ring_masked(tmp_path: Path) -> None:
    masker.add_secret("worker-secret-77")
    try:
        output = WorkerOutput("w", "svc", tmp_path, ring_lines=5)
        asyncio.run(_feed(output, [b"one\ntw", b"o\nthree worker-secret-77\n", b"four\nfive\nsix\nno newline"]))
        output.close()
    finally:
        masker.clear()
    # A line split across reads is joined; the last line without a newline is kept at EOF.
    assert output.recent() == ["two", "three ****", "four", "five", "six", "no newline"][-5:]
    assert output.recent(2) == ["six", "no newline"]
    assert output.recent(0) == []
    text = (tmp_path / "w.log").read_text()
    assert text == "one\ntwo\nthree ****\nfour\nfive\nsix\nno newline\n"
    assert output.total_lines == 7


def test_endless_line_is_cut(tmp_path: Path) -> None:
    output = WorkerOutput("w", "svc", None)
    asyncio.run(_feed(output, [b"a" * 50000, b"b" * 50000, b"c\n"]))
    output.close()
    lines = output.recent()
    assert len(lines) == 2 and len(lines[0]) >= 65536 and lines[1].endswith("c")


def test_follow_gets_new_lines(tmp_path: Path) -> None:
    async def run() -> list[str | None]:
        output = WorkerOutput("w", "svc", None)
        queue = output.follow()
        await _feed(output, [b"old?\n", b"new 1\nnew 2\n"])
        output.unfollow(queue)
        await _feed(output, [b"after unfollow\n"])
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert asyncio.run(run()) == ["old?", "new 1", "new 2"]


def test_rate_limit_suppresses_and_reports(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from loguru import logger

    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="DEBUG", format="{message}")
    try:
        output = WorkerOutput("w", "svc", tmp_path, forward_rate=5.0)
        lines = b"".join(b"line %d\n" % i for i in range(100))
        asyncio.run(_feed(output, [lines]))
        output.close()
    finally:
        logger.remove(sink)
    forwarded = [m for m in seen if m.startswith("line ")]
    assert len(forwarded) == 20  # the burst: 4 x 5 lines per second
    assert "80 lines suppressed (rate limit); all are in the worker's log file" in seen
    # The file and the ring have everything.
    assert len((tmp_path / "w.log").read_text().splitlines()) == 100
    assert output.recent(1) == ["line 99"]


# --------------------------------------------------------------------------
# A real citadeld
# --------------------------------------------------------------------------

FLOOD = "import sys; [sys.stdout.write('x'*100+'\\n') for _ in iter(int, 1)]\n"


def test_flooding_worker_does_not_stall_the_daemon(daemon_factory: Any, tmp_path: Path) -> None:
    script = tmp_path / "flood.py"
    script.write_text(FLOOD)
    d = daemon_factory(f"""\
        [services.flood]
        type = "command"
        command = ["python3", "{script}"]
        stop_timeout = 5
        """, start=False)
    # The fixture writes [daemon]; add the rotation keys to it.
    d.config.write_text(d.config.read_text().replace(
        "[daemon]\n", "[daemon]\nlog_max_bytes = 20000\nlog_backups = 2\n", 1))
    d.start()
    log_dir = d.root / "log"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
            (log_dir / "flood.log.2").exists() and "lines suppressed" in d.logs()):
        time.sleep(0.1)
    assert "lines suppressed (rate limit)" in d.logs(), d.logs()[-3000:]
    # The daemon answers while the worker floods (a stalled loop would time out here).
    for _ in range(2):
        assert d.status()["flood"]["state"] == "running"  # each call times out after 60 s
    # It stops cleanly, flood and all; then the files hold still for a look.
    assert d.stop() == 0
    names = sorted(p.name for p in log_dir.iterdir() if p.name.startswith("flood"))
    assert names == ["flood.log", "flood.log.1", "flood.log.2"]
    assert (log_dir / "flood.log").stat().st_size <= 20000
    for name in names[1:]:  # rotated when full (a line is 101 bytes), not early
        assert 20000 - 101 < (log_dir / name).stat().st_size <= 20000


COUNTER = "import time\nfor i in range(10**6):\n    print('tick', i, flush=True)\n    time.sleep(0.05)\n"


def test_logs_ring_and_follow(daemon_factory: Any, tmp_path: Path) -> None:
    script = tmp_path / "count.py"
    script.write_text("for i in range(20):\n    print('line', i)\n")
    ticker = tmp_path / "ticker.py"
    ticker.write_text(COUNTER)
    d = daemon_factory(f"""\
        [services.count]
        type = "command"
        command = ["python3", "{script}"]
        restart = "never"
        [services.ticker]
        type = "command"
        command = ["python3", "{ticker}"]
        """)
    d.wait_for(lambda s: s["count"]["last_exit"], what="count to exit")
    assert d.ctl("logs", "count", "-n", "5").stdout.splitlines() == [f"line {i}" for i in range(15, 20)]
    assert len(d.ctl("logs", "count").stdout.splitlines()) == 20
    missing = d.ctl("logs", "nosuch", check=False)
    assert missing.returncode == 2 and "nosuch" in missing.stderr

    d.wait_state("ticker", "running")
    follower = subprocess.Popen([CITADELCTL, "--socket", str(d.socket), "logs", "ticker", "-f", "-n", "1"],
                                stdout=subprocess.PIPE, text=True, env=d.env)
    try:
        assert follower.stdout is not None
        seen = [follower.stdout.readline() for _ in range(4)]
        assert follower.poll() is None  # still following
    finally:
        follower.terminate()
        follower.wait(10)
    numbers = [int(line.split()[1]) for line in seen]
    assert all(line.startswith("tick ") for line in seen), seen
    assert numbers == list(range(numbers[0], numbers[0] + 4)), seen


def test_unwritable_log_dir_is_a_clear_start_up_error(tmp_path: Path) -> None:
    # Tests run as root, which may write anywhere: a path under a regular file cannot exist.
    (tmp_path / "afile").write_text("")
    config = tmp_path / "citadeld.toml"
    config.write_text(textwrap.dedent(f"""\
        [daemon]
        control_socket = "{tmp_path}/run/control.sock"
        state_dir = "{tmp_path}/run"
        log_dir = "{tmp_path}/afile/logs"
        socket_group = ""
        [exporter]
        listen = ""
        [services.a]
        type = "command"
        command = ["sleep", "60"]
        """))
    result = subprocess.run([CITADELD, "--config", str(config)], check=False, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert f"daemon.log_dir {tmp_path}/afile/logs is not writable" in result.stderr

