"""The routing policy on its own: engine-load scores, ties, stale readings, prefix affinity
(its stability when a worker joins or leaves, its overload fallback), and reading citadeld's
answer without trusting it.

Property tests run under the main conftest's hypothesis profile: derandomized in CI.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from citadel_gateway.affinity import owner, prefix_key, prompt_prefix
from citadel_gateway.balancer import Balancer
from citadel_gateway.config import EngineLoadSettings, GatewaySettings, PrefixAffinity
from citadel_gateway.engine_load import EngineLoadFeed, EngineSample, parse_engines
from citadel_gateway.policy import (
    ENGINE_LOAD,
    LEAST_OUTSTANDING,
    PREFIX_AFFINITY,
    RoutingPolicy,
    engine_score,
)
from citadel_gateway.upstreams import Upstream, UpstreamTable
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError


def _workers(*outstanding: int) -> list[Upstream]:
    workers = []
    for i, count in enumerate(outstanding):
        u = Upstream(name=f"chat.{i}", service="chat", port=9000 + i, state="running", ready=True)
        u.outstanding = count
        workers.append(u)
    return workers


def _sample(waiting: float = 0, running: float = 0, kv: float = 0, at: float = 1000.0) -> EngineSample:
    return EngineSample(waiting=waiting, running=running, kv_cache_usage=kv, at=at)


# -- engine-load ---------------------------------------------------------------


def test_the_score_adds_the_engines_queue_and_cache_to_the_gateways_count() -> None:
    assert engine_score(2, _sample(running=5)) == 2  # running: the reading is older than the count
    assert engine_score(1, _sample(running=3, waiting=2)) == 1 + 2  # a queue, whoever filled it
    assert engine_score(0, _sample(kv=1.0)) == 4  # a full KV cache weighs 4 requests


def test_engine_load_avoids_the_engine_with_a_queue() -> None:
    a, b = _workers(1, 1)
    samples = {"chat.0": _sample(waiting=5, running=4), "chat.1": _sample(running=1)}
    policy = RoutingPolicy(ENGINE_LOAD, 8, samples.get)
    assert all(policy.choose([a, b]) is b for _ in range(5))
    assert policy.chosen_by == Counter({ENGINE_LOAD: 5})


def test_least_outstanding_ignores_the_engines() -> None:
    a, b = _workers(0, 1)
    samples = {"chat.0": _sample(waiting=50), "chat.1": _sample()}
    policy = RoutingPolicy(LEAST_OUTSTANDING, 8, samples.get)
    assert policy.choose([a, b]) is a


def test_ties_rotate() -> None:
    a, b = _workers(0, 0)
    policy = RoutingPolicy(ENGINE_LOAD, 8, {"chat.0": _sample(), "chat.1": _sample()}.get)
    assert {policy.choose([a, b]).name for _ in range(4)} == {"chat.0", "chat.1"}  # type: ignore[union-attr]


def test_a_missing_reading_falls_back_to_outstanding_counts_for_all() -> None:
    a, b = _workers(3, 0)
    policy = RoutingPolicy(ENGINE_LOAD, 8, {"chat.0": _sample()}.get)  # chat.1 has none
    assert policy.choose([a, b]) is b
    assert policy.chosen_by == Counter({LEAST_OUTSTANDING: 1})


def test_a_stale_reading_is_no_reading() -> None:
    clock = [1000.0]
    feed = EngineLoadFeed(0.5, 3.0, clock=lambda: clock[0])
    feed.samples = parse_engines({"engines": [{"worker": "chat.0", "age": 0.2, "waiting": 9}]}, clock[0])
    assert feed.sample("chat.0") == _sample(waiting=9, at=999.8)
    clock[0] += 2.0
    assert feed.sample("chat.0") is not None
    clock[0] += 1.5
    assert feed.sample("chat.0") is None, "older than stale_after"
    assert feed.sample("chat.9") is None


def test_a_worker_at_its_cap_is_never_chosen() -> None:
    a, b = _workers(2, 2)
    policy = RoutingPolicy(ENGINE_LOAD, 2, {"chat.0": _sample(), "chat.1": _sample()}.get)
    assert policy.choose([a, b]) is None
    b.outstanding = 1
    assert policy.choose([a, b]) is b


@given(st.lists(st.tuples(st.integers(0, 8), st.floats(0, 50), st.floats(0, 50), st.floats(0, 1)),
                min_size=1, max_size=6))
def test_engine_load_chooses_a_lowest_score_among_free_workers(
        loads: list[tuple[int, float, float, float]]) -> None:
    workers = _workers(*(o for o, *_ in loads))
    samples = {u.name: _sample(waiting=w, running=r, kv=kv) for u, (_, w, r, kv) in zip(workers, loads)}
    policy = RoutingPolicy(ENGINE_LOAD, 8, samples.get)
    chosen = policy.choose(workers)
    free = [u for u in workers if u.outstanding < 8]
    if not free:
        assert chosen is None
        return
    assert chosen in free
    best = min(engine_score(u.outstanding, samples[u.name]) for u in free)
    assert engine_score(chosen.outstanding, samples[chosen.name]) == pytest.approx(best)


# -- reading citadeld's answer ------------------------------------------------------


def test_a_hostile_answer_yields_only_sane_samples() -> None:
    answer = {"engines": [
        {"worker": "ok", "age": 0.1, "waiting": 2, "running": 1, "kv_cache_usage": 0.5},
        {"worker": "neg", "age": 0.1, "waiting": -1},
        {"worker": "nan", "age": 0.1, "waiting": float("nan")},
        {"worker": "bool", "age": 0.1, "waiting": True},
        {"worker": "str", "age": "0", "waiting": 1},
        {"worker": "huge", "age": 0.1, "waiting": 1e300, "kv_cache_usage": 7, "running": "x"},
        {"worker": "x" * 1000, "age": 0.1, "waiting": 1},
        {"age": 0.1, "waiting": 1}, "not a dict", None,
    ]}
    samples = parse_engines(answer, 100.0)
    assert set(samples) == {"ok", "huge"}
    assert samples["ok"] == _sample(waiting=2, running=1, kv=0.5, at=99.9)
    assert samples["huge"].waiting == 1e6 and samples["huge"].kv_cache_usage == 1.0
    assert samples["huge"].running == 0.0
    for garbage in (None, [], "x", {"engines": "x"}, {"engines": None}):
        assert parse_engines(garbage, 0.0) == {}


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4),
                    max_leaves=20))
def test_any_json_parses_without_raising(answer: object) -> None:
    for sample in parse_engines({"engines": [answer]} if not isinstance(answer, list) else
                                {"engines": answer}, 0.0).values():
        assert sample.waiting >= 0 and 0 <= sample.kv_cache_usage <= 1


# -- prefix affinity ----------------------------------------------------------------


SYSTEM = "You are a careful assistant. " * 60  # about 1700 characters


def _chat(question: str, system: str = SYSTEM) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": question}]}


def test_prompts_sharing_a_long_opening_share_a_key() -> None:
    one = prompt_prefix("/v1/chat/completions", _chat("What is 2+2?"), 1024)
    two = prompt_prefix("/v1/chat/completions", _chat("Name a colour."), 1024)
    assert one is not None and one == two and len(one) == 1024
    other = prompt_prefix("/v1/chat/completions", _chat("x", system="Another prompt. " * 100), 1024)
    assert other is not None and prefix_key(other) != prefix_key(one)


def test_short_prompts_and_embeddings_get_no_affinity() -> None:
    assert prompt_prefix("/v1/chat/completions", _chat("hi", system="short"), 1024) is None
    assert prompt_prefix("/v1/embeddings", {"input": SYSTEM}, 64) is None
    assert prompt_prefix("/v1/completions", {"prompt": SYSTEM}, 1024) == SYSTEM[:1024]
    assert prompt_prefix("/v1/completions", {"prompt": [SYSTEM, "b"]}, 1024) == SYSTEM[:1024]
    assert prompt_prefix("/v1/completions", {"prompt": list(range(2000))}, 64) is not None
    for junk in ({"messages": "x"}, {"messages": [1, None, {"content": 5}]}, {"prompt": {"a": 1}}):
        assert prompt_prefix("/v1/chat/completions", junk, 64) is None
        assert prompt_prefix("/v1/completions", junk, 64) is None


def test_content_parts_count_as_text() -> None:
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": SYSTEM},
                                                       {"type": "image_url", "image_url": {}}]}]}
    assert prompt_prefix("/v1/chat/completions", parts, 512) is not None


@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=50, unique=True),
       st.integers(2, 8))
def test_a_worker_joining_moves_only_the_keys_it_wins(keys: list[bytes], count: int) -> None:
    names = [f"chat.{i}" for i in range(count)]
    before = {k: owner(k, names, str) for k in keys}
    after = {k: owner(k, [*names, "chat.new"], str) for k in keys}
    for key in keys:
        assert after[key] in (before[key], "chat.new")


@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=50, unique=True),
       st.integers(2, 8), st.data())
def test_a_worker_leaving_moves_only_its_own_keys(keys: list[bytes], count: int, data: st.DataObject) -> None:
    names = [f"chat.{i}" for i in range(count)]
    gone = data.draw(st.sampled_from(names))
    before = {k: owner(k, names, str) for k in keys}
    after = {k: owner(k, [n for n in names if n != gone], str) for k in keys}
    for key in keys:
        if before[key] != gone:
            assert after[key] == before[key]


def test_affinity_keeps_a_prefix_on_one_worker_and_spreads_prefixes() -> None:
    workers = _workers(0, 0, 0)
    policy = RoutingPolicy(LEAST_OUTSTANDING, 64, affinity=PrefixAffinity(slack=100))
    key = prefix_key("a long shared opening")
    home = {policy.choose(workers, key).name for _ in range(20)}  # type: ignore[union-attr]
    assert len(home) == 1
    homes = {policy.choose(workers, prefix_key(f"prefix {i}")).name for i in range(40)}  # type: ignore[union-attr]
    assert homes == {"chat.0", "chat.1", "chat.2"}
    assert policy.chosen_by[PREFIX_AFFINITY] == 60 and policy.affinity_outcomes["hit"] == 60


def test_an_overloaded_home_falls_back_to_the_policy() -> None:
    key = prefix_key("a long shared opening")
    workers = _workers(0, 0)
    home = owner(key, workers, lambda u: u.name)
    assert home is not None
    other = next(u for u in workers if u is not home)
    samples: dict[str, EngineSample] = {}
    policy = RoutingPolicy(ENGINE_LOAD, 4, samples.get, PrefixAffinity(max_waiting=1, slack=2))

    # The engine's queue is above max_waiting.
    samples.update({home.name: _sample(waiting=2), other.name: _sample()})
    assert policy.choose(workers, key) is other
    # Within bounds again: home.
    samples[home.name] = _sample(waiting=1)
    assert policy.choose(workers, key) is home
    # More than slack requests beyond the least busy worker.
    home.outstanding, other.outstanding = 3, 0
    assert policy.choose(workers, key) is other
    # At its cap.
    home.outstanding, other.outstanding = 4, 3
    assert policy.choose(workers, key) is other
    assert policy.affinity_outcomes == Counter({"overloaded": 3, "hit": 1})


def test_affinity_through_the_balancer_survives_the_queue() -> None:
    async def scenario() -> None:
        table = UpstreamTable({"m": ["chat"]})
        table.replace([{"name": f"chat.{i}", "service": "chat", "port": 9000 + i, "state": "running",
                        "ready": True} for i in range(2)])
        policy = RoutingPolicy(LEAST_OUTSTANDING, 1, affinity=PrefixAffinity(slack=0))
        balancer = Balancer(table, per_worker=1, queue_size=4, queue_timeout=30, policy=policy)
        key = prefix_key("opening")
        home = owner(key, table.candidates("m"), lambda u: u.name)
        first = await balancer.acquire("m", affinity=key)
        assert first is home
        other = await balancer.acquire("m", affinity=key)  # home is at its cap
        assert other is not home
        waiting = asyncio.ensure_future(balancer.acquire("m", affinity=key))
        await asyncio.sleep(0)
        assert not waiting.done()
        balancer.release(first)
        assert await waiting is home

    asyncio.run(scenario())


# -- settings -------------------------------------------------------------------


def test_the_settings_name_what_is_wrong() -> None:
    assert GatewaySettings().policy == LEAST_OUTSTANDING and GatewaySettings().prefix_affinity is None
    with pytest.raises(ValidationError, match="least-outstanding"):
        GatewaySettings.model_validate({"policy": "random"})
    with pytest.raises(ValidationError, match="must be longer than poll_period"):
        EngineLoadSettings(poll_period=1, stale_after=1)
    with pytest.raises(ValidationError, match="prefix_chars"):
        GatewaySettings.model_validate({"prefix_affinity": {"prefix_chars": 8}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        GatewaySettings.model_validate({"prefix_affinity": {"chars": 1024}})
    settings = GatewaySettings.model_validate({"policy": "engine-load", "prefix_affinity": {},
                                               "engine_load": {"stale_after": "2s"}})
    assert settings.prefix_affinity == PrefixAffinity() and settings.engine_load.stale_after == 2.0
    assert GatewaySettings.model_validate_json(settings.model_dump_json()) == settings
