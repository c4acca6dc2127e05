"""The restart policy, in-process: when to restart, after how long, and when to give up."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from citadel_supervisor.config import ServiceConfig
from citadel_supervisor.worker.restart_policy import RestartPolicy


def policy(**keys: object) -> RestartPolicy:
    """A policy over a command service's config with ``keys`` set; its jitter is seeded."""
    config = ServiceConfig.model_validate({"type": "command", **keys})
    return RestartPolicy(config, rng=random.Random(0))


def test_never_and_on_failure_follow_the_exit() -> None:
    assert not policy(restart="never").decide(True, 1.0, 0.0).restart
    on_failure = policy(restart="on-failure")
    assert not on_failure.decide(False, 1.0, 0.0).restart
    assert on_failure.decide(True, 1.0, 0.0).restart
    assert policy(restart="always").decide(False, 1.0, 0.0).restart


def test_quick_exits_back_off_exponentially_within_the_jitter_and_the_cap() -> None:
    p = policy(backoff_initial=1.0, backoff_max=8.0, stable_after=60.0, start_limit_burst=100)
    for n, full in enumerate([1.0, 2.0, 4.0, 8.0, 8.0], start=1):
        decision = p.decide(True, 0.5, float(n))
        assert decision.restart and not decision.fatal
        assert full / 2 <= decision.delay <= full, (n, decision)
        assert decision.reason == f"quick exit #{n}"


def test_a_stable_run_restarts_at_once_and_resets_the_backoff() -> None:
    p = policy(backoff_initial=1.0, stable_after=10.0, start_limit_burst=100)
    p.decide(True, 0.1, 0.0)
    p.decide(True, 0.1, 1.0)
    stable = p.decide(True, 30.0, 40.0)
    assert stable.restart and stable.delay == 0.0
    assert p.decide(True, 0.1, 41.0).delay <= 1.0  # back to the first step


def test_the_start_limit_is_fatal_only_within_its_interval() -> None:
    p = policy(start_limit_burst=3, start_limit_interval=10.0)
    assert not p.decide(True, 0.1, 0.0).fatal
    assert not p.decide(True, 0.1, 1.0).fatal
    fatal = p.decide(True, 0.1, 2.0)
    assert fatal.fatal and not fatal.restart
    assert "3 failures within 10s" in fatal.reason
    spaced = policy(start_limit_burst=3, start_limit_interval=10.0)
    assert not any(spaced.decide(True, 0.1, t).fatal for t in (0.0, 11.0, 22.0, 33.0))


def test_reset_forgets_the_failures() -> None:
    p = policy(start_limit_burst=2, start_limit_interval=10.0)
    p.decide(True, 0.1, 0.0)
    p.reset()
    assert not p.decide(True, 0.1, 1.0).fatal


@given(uptimes=st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=50),
       initial=st.floats(min_value=0, max_value=100), cap=st.floats(min_value=0, max_value=1000))
def test_no_delay_is_ever_negative_or_above_the_cap(uptimes: list[float], initial: float, cap: float) -> None:
    p = policy(backoff_initial=min(initial, cap), backoff_max=cap, start_limit_burst=1000)
    for t, uptime in enumerate(uptimes):
        decision = p.decide(True, uptime, float(t))
        assert 0.0 <= decision.delay <= cap


def test_a_model_that_cannot_be_loaded_is_fatal_at_once() -> None:
    decision = policy(start_limit_burst=100).decide(True, 0.5, 0.0, cause="model")
    assert decision.fatal and not decision.restart and "model cannot be loaded" in decision.reason
    assert policy().decide(True, 0.5, 0.0, cause="gpu_oom").restart  # may pass once memory is freed
