"""What a worker prints or serves is hostile: federated pages, output lines, log files, terminals."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from citadel_supervisor.cli.citadelctl import main as citadelctl
from citadel_supervisor.control.client import ControlClient
from citadel_supervisor.exporter.federation import FederatedFamilies, PageRelabeler
from citadel_supervisor.exporter.federation.validate import MAX_PAGE_BYTES, page_problem
from citadel_supervisor.exporter.server import Exporter
from citadel_supervisor.logs.masking import SecretMasker, masker
from citadel_supervisor.logs.worker_output import RotatingFile, WorkerOutput
from citadel_supervisor.plugins import PluginRegistry

PROMETHEUS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
GOOD_PAGE = '# HELP up_ok A fine gauge.\n# TYPE up_ok gauge\nup_ok{model="m"} 1.0\n'

#: Pages that each once broke the exporter's whole answer, or could have, and why they are dropped.
HOSTILE_PAGES = {
    "garbage": ("# TYPE m gauge\nm 1\nthis is not a sample\n", "malformed"),
    "bad_value": ('# TYPE m gauge\nm{a="1"} one\n', "malformed"),
    "unclosed_labels": ('# TYPE m gauge\nm{a="1" 1\n', "malformed"),
    "bad_type": ("# TYPE m bogus\nm 1\n", "malformed"),
    "bad_escape": ('# TYPE m gauge\nm{a="\\q"} 1\n', "malformed"),
    "duplicate_label": ('# TYPE m gauge\nm{a="1",a="2"} 1\n', "duplicate_labels"),
    "huge": ("# TYPE big gauge\n" + 'big{x="' + "y" * MAX_PAGE_BYTES + '"} 1\n', "too_large"),
    "not_utf8": ("", "not_utf8"),  # served as raw bytes below
}


def _parse_both(text_body: bytes, om_body: bytes) -> tuple[list[Any], list[Any]]:
    """Both bodies through the strict parsers (each raises on anything invalid)."""
    return list(parse_text(text_body.decode())), list(parse_openmetrics(om_body.decode()))


@asynccontextmanager
async def page_servers(pages: dict[str, bytes]) -> AsyncIterator[dict[str, str]]:
    """One HTTP server on a port the kernel picks, serving ``/NAME`` for each page."""
    def serve(body: bytes) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=body)
        return handler

    app = web.Application()
    for name, body in pages.items():
        app.router.add_get(f"/{name}", serve(body))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield {name: f"http://127.0.0.1:{port}/{name}" for name in pages}
    finally:
        await runner.cleanup()


def _exporter(tmp_path: Path, session: aiohttp.ClientSession) -> Exporter:
    """An exporter without a daemon: enough to scrape workers and render the page."""
    exporter = SimpleNamespace(disk_paths=[], scrape_timeout=5.0)
    config = SimpleNamespace(exporter=exporter, daemon=SimpleNamespace(state_dir=tmp_path))
    return Exporter(config, None, PluginRegistry(), None, Counter(), session)  # type: ignore[arg-type]


async def _scrape_hostile(tmp_path: Path) -> tuple[bytes, bytes, Exporter]:
    bodies = {name: text.encode() for name, (text, _) in HOSTILE_PAGES.items()}
    bodies["not_utf8"] = b"# TYPE m gauge\nm{a=\"\xff\xfe\"} 1\n"
    bodies["dup_exported"] = b'# TYPE m gauge\nm{service="a",exported_service="b",worker="c"} 1\n'
    bodies["good"] = GOOD_PAGE.encode()
    async with page_servers(bodies) as urls, aiohttp.ClientSession() as session:
        exporter = _exporter(tmp_path, session)
        workers = [SimpleNamespace(service="svc", worker=name, metrics_url=url, proc=object())
                   for name, url in urls.items()]
        rendered = []
        for accept in ("text/plain", PROMETHEUS_ACCEPT):
            encoder, content_type = choose_encoder(accept)
            results = await exporter.scrape_workers(workers)  # type: ignore[arg-type]
            rendered.append(exporter.render([], b"", results, encoder,
                                            content_type.startswith("application/openmetrics-text")))
    return rendered[0], rendered[1], exporter


def test_hostile_pages_are_dropped_whole_and_counted_and_the_scrape_stays_valid(tmp_path: Path) -> None:
    text_body, om_body, _ = asyncio.run(_scrape_hostile(tmp_path))
    text_families, om_families = _parse_both(text_body, om_body)
    samples = [s for family in text_families for s in family.samples]
    # The good page and the one with both service and exported_service are federated...
    assert any(s.name == "up_ok" and s.labels["worker"] == "good" for s in samples)
    clash = [s for s in samples if s.name == "m" and s.labels["worker"] == "dup_exported"]
    assert len(clash) == 1 and clash[0].labels == {
        "service": "svc", "worker": "dup_exported", "exported_exported_service": "a",
        "exported_service": "b", "exported_worker": "c"}
    # ...each other page is dropped whole, nothing of it reaches the answer...
    workers = {s.labels.get("worker") for s in samples if not s.name.startswith("citadel_")}
    assert workers == {"good", "dup_exported"}
    # ...and the counter says why, once per scrape that dropped it (the text answer came
    # from the first scrape, the OpenMetrics one from the second).
    for families, times in ((text_families, 1.0), (om_families, 2.0)):
        dropped = {(s.labels["worker"], s.labels["reason"]): s.value for family in families
                   for s in family.samples if s.name == "citadel_federation_pages_dropped_total"}
        assert dropped == {(name, reason): times for name, (_, reason) in HOSTILE_PAGES.items()}
    up = {s.labels["worker"]: s.value for s in samples if s.name == "citadel_federation_up"}
    assert up["huge"] == 1.0 and up["good"] == 1.0


def test_the_fetch_stops_reading_at_the_cap(tmp_path: Path) -> None:
    """An endless page (no Content-Length) is cut off at the cap, not read to its end."""
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"# " + b"x" * 65534 + b"\n"
        try:
            while sent < 64 * MAX_PAGE_BYTES:
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    async def run() -> Any:
        from citadel_supervisor.exporter.federation import ScrapeTarget, fetch_page

        app = web.Application()
        app.router.add_get("/metrics", endless)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as session:
                target = ScrapeTarget("svc", "w", f"http://127.0.0.1:{port}/metrics")
                return await fetch_page(session, target, 30.0)
        finally:
            await runner.cleanup()

    result = asyncio.run(run())
    assert result.up and result.dropped == "too_large" and result.page is None
    assert sent < 64 * MAX_PAGE_BYTES


LABEL_VALUES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
LINES = st.one_of(
    st.text(st.sampled_from('ab_{}=", \\\n#01.e+-'), max_size=30),
    st.builds(lambda n, names, values, v: f'{n}{{{",".join(f"{k}={chr(34)}{x}{chr(34)}" for k, x in zip(names, values))}}} {v}',
              st.sampled_from(["m", "m_total", "m_bucket", "service"]),
              st.lists(st.sampled_from(["service", "worker", "exported_service", "a", "le"]), max_size=4),
              st.lists(LABEL_VALUES, min_size=4, max_size=4),
              st.sampled_from(["1", "-2.5", "NaN", "+Inf", "x"])),
    st.sampled_from(["# TYPE m gauge", "# TYPE m counter", "# HELP m some help", "# TYPE m wrong", ""]),
)


@given(st.lists(LINES, max_size=8))
def test_whatever_a_page_holds_the_federated_text_parses(lines: list[str]) -> None:
    """A page is federated only when the strict text parser reads what comes out of it."""
    page = PageRelabeler("svc", "w").split("\n".join(lines) + "\n")
    rendered = FederatedFamilies([page]).render()
    families = list(parse_text(rendered))
    for family in families:
        for sample in family.samples:
            assert sample.labels["service"] == "svc" and sample.labels["worker"] == "w"
    if page.dropped is None:
        assert page_problem(page.text) is None


def test_federated_pages_are_masked(tmp_path: Path) -> None:
    masker.add_secret("page-secret-4242")
    try:
        page = PageRelabeler("svc", "w").split(
            '# TYPE m gauge\nm{key="page-secret-4242"} 1\nm{url="a?k=page-secret-4242"} 2\n')
    finally:
        masker.clear()
    rendered = FederatedFamilies([page]).render()
    assert "page-secret-4242" not in rendered and rendered.count('"****"') == 1
    assert "a?k=****" in rendered


# -- masking --------------------------------------------------------------------------


@pytest.mark.parametrize("written", [
    "tok/en+with=signs", "tok%2Fen%2Bwith%3Dsigns", "tok%2fen%2bwith%3dsigns", "tok/en%2Bwith%3Dsigns",
    "tok%2Fen+with%3Dsigns".replace("+", "%2B"), 'tok\\/en+with=signs'.replace("\\/", "/"),
])
def test_url_encoded_spellings_of_a_secret_are_masked(written: str) -> None:
    local = SecretMasker()
    local.add_secret("tok/en+with=signs")
    line = f"GET /v1/x?token_value={written}&next=1"
    assert local.mask(line) == "GET /v1/x?token_value=****&next=1"
    assert local.mask_bytes(line.encode()) == b"GET /v1/x?token_value=****&next=1"


def test_json_escaped_secrets_with_quotes_are_masked() -> None:
    local = SecretMasker()
    local.add_secret('quote"and\\slash')
    assert local.mask('{"v": "quote\\"and\\\\slash"}') == '{"v": "****"}'


@pytest.fixture
def daemon_log() -> Iterator[list[str]]:
    """What the daemon's log receives (a loguru sink), for the test's duration."""
    records: list[str] = []
    sink = logger.add(lambda message: records.append(str(message)), format="{message}")
    yield records
    logger.remove(sink)


def _wide_pipe() -> tuple[int, int]:
    """A pipe that holds a whole test's output, so the reader's first read is exactly 64 KiB."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    return read_fd, write_fd


@pytest.mark.parametrize("offset", [1, 7, 15, 16])
def test_a_secret_cut_by_the_64k_line_cut_is_masked_in_both_parts(
        tmp_path: Path, daemon_log: list[str], offset: int) -> None:
    secret = "cut/secret+0123456789"
    # The secret starts `offset` bytes before the 64 KiB mark where an endless line is cut.
    data = (b"a" * (65536 - offset) + secret.encode() + b"b" * 70000 + b"\n"
            + b"url: " + secret.replace("/", "%2F").replace("+", "%2B").encode() + b"\n")
    masker.add_secret(secret)

    async def run() -> WorkerOutput:
        output = WorkerOutput("w", "svc", tmp_path, forward_rate=1000.0)
        read_fd, write_fd = _wide_pipe()
        os.write(write_fd, data)
        os.close(write_fd)
        output.attach([read_fd])
        await output.drained(30)
        output.close()
        return output

    try:
        output = asyncio.run(run())
    finally:
        masker.clear()
    logged = "\n".join(daemon_log)
    for where, text in (("log file", (tmp_path / "w.log").read_text()),
                        ("ring", "\n".join(output.recent())), ("daemon log", logged)):
        for part in ("cut/sec", "0123456789", "cut%2Fsecret"):
            assert part not in text, f"{part!r} in the {where}"
        assert "****" in text
    assert max(len(line) for line in output.recent()) <= 65536


# -- log files and terminals ------------------------------------------------------------


def test_a_log_file_replaced_by_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    log = tmp_path / "w.log"
    log.symlink_to(target)
    file = RotatingFile(log, 1024, 0)
    file.write(b"worker line\n", 1)
    file.close()
    assert target.read_text() == "precious\n" and file.dropped_lines == 1


def test_a_symlink_is_not_truncated_on_rotation(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    log = tmp_path / "w.log"
    file = RotatingFile(log, 16, 0)
    file.write(b"first line\n", 1)
    file.close()  # the worker swaps its log file for a link meanwhile
    log.unlink()
    log.symlink_to(target)
    file.write(b"a line too long to fit\n", 1)
    file.close()
    assert target.read_text() == "precious\n"


def test_a_log_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    os.mkfifo(log)
    file = RotatingFile(log, 1024, 0)
    file.write(b"worker line\n", 1)  # would block forever on a FIFO without a reader
    assert file.dropped_lines == 1


def test_citadelctl_logs_escapes_terminal_control_sequences(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = ["\x1b]0;owned\x07title", "\x1b[2J\x1b[31mred", "csi \x9b31m", "cr\rback", "tab\tkept"]
    monkeypatch.setattr(ControlClient, "stream", lambda self, path: iter(hostile))
    result = CliRunner().invoke(citadelctl, ["--socket", str(tmp_path / "sock"), "logs", "w"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "\\x1b]0;owned\\x07title", "\\x1b[2J\\x1b[31mred", "csi \\x9b31m", "cr\\rback", "tab\tkept"]
