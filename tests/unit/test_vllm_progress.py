"""vLLM's metrics read by meaning across releases, and the progress probe's verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

from citadel_supervisor.config import ProbeConfig
from citadel_supervisor.services.base import WorkerInfo
from citadel_supervisor.services.vllm import ProgressProbe, VllmConfig, VllmService
from citadel_supervisor.services.vllm_metrics import NAMES, EngineMetrics, read_engine

FIXTURES = Path(__file__).parents[1] / "fixtures"

#: The same engine state in the V0 engine's names (vllm/engine/metrics.py up to 0.10).
V0_PAGE = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 5.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="m"} 100.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="m"} 40.0
"""


def test_a_real_vllm_0_32_page_is_read_by_meaning() -> None:
    engine = read_engine((FIXTURES / "vllm_metrics.txt").read_text())
    assert engine == EngineMetrics(requests_running=0.0, requests_waiting=0.0, kv_cache_usage=0.0,
                                   generation_tokens=62.0, prompt_tokens=152.0,
                                   prefix_cache_queries=152.0, prefix_cache_hits=0.0)


def test_the_first_v1_prefix_cache_names_are_read_too() -> None:
    page = ('vllm:gpu_prefix_cache_queries_total{engine="0"} 64.0\n'
            'vllm:gpu_prefix_cache_hits_total{engine="0"} 48.0\n')
    engine = read_engine(page)
    assert (engine.prefix_cache_queries, engine.prefix_cache_hits) == (64.0, 48.0)


def test_the_v0_names_give_the_same_meanings() -> None:
    assert read_engine(V0_PAGE) == EngineMetrics(2.0, 5.0, 0.25, 40.0, 100.0)


def test_series_without_labels_are_read_too() -> None:
    page = "vllm:num_requests_waiting 3\nvllm:generation_tokens_total 7 1700000000000\n"
    engine = read_engine(page)
    assert (engine.requests_waiting, engine.generation_tokens) == (3.0, 7.0)


def test_a_release_serving_both_names_is_not_counted_twice() -> None:
    both = 'vllm:kv_cache_usage_perc{engine="0"} 0.5\nvllm:gpu_cache_usage_perc{engine="0"} 0.5\n'
    assert read_engine(both).kv_cache_usage == 0.5


def test_engines_are_summed_and_garbage_is_skipped() -> None:
    page = ('vllm:num_requests_waiting{engine="0"} 1\nvllm:num_requests_waiting{engine="1"} 2\n'
            'vllm:num_requests_waiting{engine="2"} NaN\nvllm:num_requests_waiting{broken 7\n'
            'vllm:num_requests_waiting\nnot_vllm 5\n')
    assert read_engine(page).requests_waiting == 3.0
    assert read_engine("").pending is None and read_engine("").tokens is None
    assert set(NAMES) == set(EngineMetrics.__dataclass_fields__)


def probe(stall_after: float = 60.0) -> ProgressProbe:
    config = VllmConfig.model_validate({"type": "vllm", "model": "org/model", "python": sys.executable})
    info = WorkerInfo(name="chat", service="chat", replica=0, config=config, port=8000)
    return ProgressProbe(ProbeConfig(kind="progress", stall_after=stall_after), info, None)  # type: ignore[arg-type]


def test_pending_work_without_tokens_is_a_stall_only_after_the_threshold() -> None:
    p = probe(stall_after=60.0)
    busy = EngineMetrics(1.0, 4.0, 0.5, 40.0, 100.0)
    assert p._judge(busy, now=1000.0, duration=0.0).ok  # the first reading: progress
    assert p._judge(busy, now=1059.0, duration=0.0).ok  # flat, but not for 60 s yet
    stalled = p._judge(busy, now=1060.0, duration=0.0)
    assert not stalled.ok and stalled.cause == "stalled"
    assert stalled.detail.startswith("stalled: 5 requests pending and no token processed for 60s")


def test_tokens_moving_or_nothing_pending_is_never_a_stall() -> None:
    p = probe(stall_after=10.0)
    for t in range(0, 100, 5):  # a busy engine: tokens keep coming
        assert p._judge(EngineMetrics(1.0, 9.0, 0.9, 40.0 + t, 100.0), now=float(t), duration=0.0).ok
    idle = probe(stall_after=10.0)
    for t in range(0, 100, 5):  # an idle engine: flat counters, nothing pending
        assert idle._judge(EngineMetrics(0.0, 0.0, 0.0, 40.0, 100.0), now=float(t), duration=0.0).ok


def test_the_probe_says_busy_when_the_engine_served_requests_since_the_last_check() -> None:
    """What marks use by clients that bypass the gateway: work pending, or tokens moved."""
    p = probe(stall_after=60.0)
    flat = EngineMetrics(0.0, 0.0, 0.0, 40.0, 100.0)
    assert not p._judge(flat, now=0.0, duration=0.0).busy  # the first reading: no baseline
    assert not p._judge(flat, now=5.0, duration=0.0).busy  # nothing happened since
    moved = EngineMetrics(0.0, 0.0, 0.0, 41.0, 100.0)
    assert p._judge(moved, now=10.0, duration=0.0).busy  # served and done between two checks
    assert not p._judge(moved, now=15.0, duration=0.0).busy
    pending = EngineMetrics(0.0, 1.0, 0.0, 41.0, 100.0)
    assert p._judge(pending, now=20.0, duration=0.0).busy  # queued, nothing generated yet
    assert p._judge(pending, now=30.0, duration=0.0).busy  # still queued (not stalled yet)
    assert not probe()._judge(read_engine(""), now=0.0, duration=0.0).busy  # no counters: no claim


def test_a_page_without_known_names_falls_back_to_health() -> None:
    result = probe()._judge(read_engine("# nothing here\n"), now=0.0, duration=0.0)
    assert result.ok and "no engine counters" in result.detail


def test_vllm_workers_get_the_progress_probe_by_default() -> None:
    def liveness(**keys: object) -> ProbeConfig | None:
        config = VllmConfig.model_validate({"type": "vllm", "model": "org/model", "python": sys.executable, **keys})
        info = WorkerInfo(name="chat", service="chat", replica=0, config=config, port=8000)
        return VllmService().default_probes(info).liveness
    default = liveness()
    assert default is not None and default.kind == "progress" and default.stall_after == 120.0
    assert default.period <= 120.0 / 4
    off = liveness(stall_timeout=0)
    assert off is not None and off.kind == "http"
    inference = liveness(inference_probe=True)
    assert inference is not None and inference.kind == "inference"
