"""The gateway's parts on their own: token buckets, the balancer, usage reading, keys."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from citadel_gateway.balancer import Balancer, HoldTimeout, NoUpstream, QueueFull, QueueTimeout
from citadel_gateway.keys import ApiKey, KeyRing, bearer_token
from citadel_gateway.ratelimit import RateLimiter, TokenBucket
from citadel_gateway.upstreams import UpstreamTable
from citadel_gateway.usage import SseUsageTap, usage_in


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)  # one a second
    assert all(bucket.take() == 0.0 for _ in range(60))
    assert bucket.take() == pytest.approx(1.0)
    clock.now += 0.5
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take() == 0.0


def test_tokens_charged_after_the_fact_can_go_into_debt() -> None:
    clock = Clock()
    key = ApiKey("k", "0" * 64, None, tokens_per_minute=600)  # ten a second
    limiter = RateLimiter(clock)
    assert limiter.admit(key) is None
    limiter.charge_tokens(key, 800)  # 200 in debt
    refused = limiter.admit(key)
    assert refused is not None and refused.limit == "tokens" and refused.retry_after == 20
    clock.now += 20.1
    assert limiter.admit(key) is None


def test_requests_limit_names_its_limit() -> None:
    key = ApiKey("k", "0" * 64, None, requests_per_minute=2)
    limiter = RateLimiter(Clock())
    assert limiter.admit(key) is None and limiter.admit(key) is None
    refused = limiter.admit(key)
    assert refused is not None and refused.limit == "requests" and refused.per_minute == 2


def _table(*workers: tuple[str, bool]) -> UpstreamTable:
    table = UpstreamTable({"m": [name for name, _ in workers]})
    table.replace([{"name": name, "service": name, "port": 9000 + i, "state": "running", "ready": ready}
                   for i, (name, ready) in enumerate(workers)])
    return table


def test_balancer_picks_the_fewest_outstanding() -> None:
    async def scenario() -> None:
        table = _table(("a", True), ("b", True), ("c", False))
        balancer = Balancer(table, per_worker=4, queue_size=0, queue_timeout=1)
        first = await balancer.acquire("m")
        second = await balancer.acquire("m")
        assert {first.name, second.name} == {"a", "b"}, "never the worker that is not ready"
        balancer.release(first)
        third = await balancer.acquire("m")
        assert third is first, "the idle one, not the busy one"
        fourth = await balancer.acquire("m", exclude=[first.name])
        assert fourth is second
    asyncio.run(scenario())


def test_balancer_queues_then_hands_over_released_slots_in_order() -> None:
    async def scenario() -> None:
        table = _table(("a", True))
        balancer = Balancer(table, per_worker=1, queue_size=2, queue_timeout=30)
        held = await balancer.acquire("m")
        waiting = [asyncio.ensure_future(balancer.acquire("m")) for _ in range(2)]
        await asyncio.sleep(0)
        assert balancer.queue_depths() == {"m": 2}
        with pytest.raises(QueueFull):
            await balancer.acquire("m")
        balancer.release(held)
        got = await waiting[0]
        assert got is held and not waiting[1].done()
        balancer.release(got)
        balancer.release(await waiting[1])
        assert held.outstanding == 0 and balancer.queue_depths() == {}
    asyncio.run(scenario())


def test_waiters_fail_at_once_when_their_model_loses_every_worker() -> None:
    async def scenario() -> None:
        table = _table(("a", True))
        balancer = Balancer(table, per_worker=1, queue_size=4, queue_timeout=30)
        await balancer.acquire("m")
        waiter = asyncio.ensure_future(balancer.acquire("m"))
        await asyncio.sleep(0)
        table.apply_event({"worker": "a", "state": "running", "ready": False})
        with pytest.raises(NoUpstream):
            await waiter
        with pytest.raises(NoUpstream):
            await balancer.acquire("m")
    asyncio.run(scenario())


def test_a_waiter_times_out_and_a_cancelled_waiter_gives_its_slot_back() -> None:
    async def scenario() -> None:
        table = _table(("a", True))
        balancer = Balancer(table, per_worker=1, queue_size=4, queue_timeout=0.05)
        held = await balancer.acquire("m")
        with pytest.raises(QueueTimeout):
            await balancer.acquire("m")
        balancer.queue_timeout = 30
        waiter = asyncio.ensure_future(balancer.acquire("m"))
        await asyncio.sleep(0)
        waiter.cancel()
        balancer.release(held)
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert held.outstanding == 0
    asyncio.run(scenario())


def test_usage_is_read_from_answers_and_null_usage_is_none() -> None:
    body = b'{"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}'
    usage = usage_in(body)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 3, 10)
    assert usage_in(b'{"choices": [{}], "usage": null}') is None
    assert usage_in(b'{"choices": [{}]}') is None


def test_sse_tap_passes_lines_on_and_strips_only_the_usage_chunk_it_added() -> None:
    usage_line = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\n'
    stream = [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', usage_line[:20], usage_line[20:] + b"\n",
              b"data: [DONE]\n\n"]
    tap = SseUsageTap(strip=True)
    out = [tap.feed(chunk) for chunk in stream] + [tap.flush()]
    assert out[0] == stream[0], "a complete event goes on at once"
    assert out[1] == b"", "half a line waits for its end"
    assert b"usage" not in b"".join(out) and b"[DONE]" in b"".join(out)
    assert tap.usage is not None and tap.usage.total_tokens == 3

    keep = SseUsageTap(strip=False)
    assert b"".join([keep.feed(chunk) for chunk in stream] + [keep.flush()]) == b"".join(stream)
    assert keep.usage is not None and keep.usage.total_tokens == 3


def test_keys_are_found_by_digest_and_bearer_tokens_parsed() -> None:
    key = ApiKey("alice", hashlib.sha256(b"sk-alice-secret").hexdigest(), frozenset({"m"}))
    ring = KeyRing.from_env(f'[{{"name": "alice", "sha256": "{key.sha256}", "models": ["m"]}}]')
    assert ring.find("sk-alice-secret") == key
    assert ring.find("sk-alice-secreT") is None
    assert key.allows("m") and not key.allows("n")
    assert bearer_token("Bearer  sk-x ") == "sk-x"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token(None) is None


def test_a_status_read_older_than_an_event_does_not_undo_it() -> None:
    table = _table(("a", True))
    read_from = table.events_applied  # a /v1/status read begins...
    table.apply_event({"worker": "a", "state": "running", "ready": False})  # ...an event lands
    table.replace([{"name": "a", "service": "a", "port": 9000, "state": "running", "ready": True}],
                  read_from)  # ...and the read, older, answers
    assert not table.workers["a"].ready
    table.replace([{"name": "a", "service": "a", "port": 9000, "state": "running", "ready": True}],
                  table.events_applied)  # a read begun after the event counts
    assert table.workers["a"].ready


def _on_demand_table(state: str) -> UpstreamTable:
    table = UpstreamTable(on_demand=["lazy"])
    table.replace([{"name": "lazy", "service": "lazy", "port": 1, "models": ["m"], "state": state,
                    "ready": False}])
    return table


def test_a_request_for_an_idle_on_demand_model_is_held_until_a_worker_is_ready() -> None:
    async def scenario() -> None:
        asked: list[list[str]] = []
        table = _on_demand_table("idle")
        balancer = Balancer(table, per_worker=1, queue_size=4, queue_timeout=0.01, hold_timeout=30,
                            on_hold=asked.append)
        waiter = asyncio.ensure_future(balancer.acquire("m"))
        await asyncio.sleep(0)
        assert asked == [["lazy"]] and balancer.queue_depths(True) == {"m": 1}
        assert balancer.held_services() == ["lazy"]
        table.apply_event({"worker": "lazy", "state": "starting", "ready": False})
        await asyncio.sleep(0.05)  # past queue_timeout: a held request waits hold_timeout instead
        assert not waiter.done()
        table.apply_event({"worker": "lazy", "state": "running", "ready": True})
        got = await waiter
        assert got.name == "lazy" and balancer.take_used() == {"lazy"}
    asyncio.run(scenario())


def test_held_requests_time_out_and_stopped_or_ungranted_models_fail_at_once() -> None:
    async def scenario() -> None:
        table = _on_demand_table("idle")
        balancer = Balancer(table, per_worker=1, queue_size=4, queue_timeout=30, hold_timeout=0.05)
        with pytest.raises(HoldTimeout):
            await balancer.acquire("m")
        table.apply_event({"worker": "lazy", "state": "stopped", "ready": False})
        with pytest.raises(NoUpstream):  # an operator's stop: nothing to wait for
            await balancer.acquire("m")
        ungranted = UpstreamTable()
        ungranted.replace([{"name": "x", "service": "x", "port": 1, "models": ["m"], "state": "idle",
                            "ready": False}])
        with pytest.raises(NoUpstream):
            await Balancer(ungranted, 1, 4, 30).acquire("m")
    asyncio.run(scenario())
