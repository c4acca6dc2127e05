"""One URL's sender against a real local receiver: retries, backoff, timeouts, refusals."""

from __future__ import annotations

import asyncio

import aiohttp
from citadel_webhook import WebhookConfig
from citadel_webhook.delivery import Delivery, Endpoint, backoff_delay
from webhook_receiver import SECRET, WebhookReceiver


def _config(receiver: WebhookReceiver, **changes: object) -> WebhookConfig:
    return WebhookConfig(urls=[receiver.url], secret=SECRET,
                         **{"timeout": 2.0, "retries": 3, "backoff": 0.01, **changes})


def _send(receiver: WebhookReceiver, config: WebhookConfig, count: int = 1) -> Endpoint:
    """Queue ``count`` deliveries on a fresh Endpoint and wait until it is idle."""

    async def run() -> Endpoint:
        async with aiohttp.ClientSession() as session:
            endpoint = Endpoint(receiver.url, lambda: session, "citadel-webhook/test")
            for i in range(count):
                endpoint.offer(Delivery(f"d{i}", "state", "chat", b'{"n": %d}' % i), config)
            await endpoint.idle()
            return endpoint

    return asyncio.run(run())


def test_a_failing_receiver_gets_the_same_delivery_again_until_it_takes_it(receiver):
    receiver.plan = [503, 500]
    endpoint = _send(receiver, _config(receiver))
    got = receiver.received()
    assert [r.status for r in got] == [503, 500, 200]
    assert {r.headers["X-Citadel-Delivery"] for r in got} == {"d0"}
    assert all(r.signed for r in got)
    assert endpoint.failed == 0


def test_a_receiver_that_does_not_answer_in_time_is_retried(receiver):
    receiver.plan = [("hang", 1.5)]
    _send(receiver, _config(receiver, timeout=0.3))
    # The hung request is recorded when the receiver finally answers it; the
    # retry was answered first.
    receiver.wait_for(lambda bodies: len(bodies) == 2, timeout=30, what="the retry and the late one")
    assert [r.headers["X-Citadel-Delivery"] for r in receiver.received()] == ["d0", "d0"]


def test_a_refusal_is_not_retried(receiver):
    receiver.plan = [401]
    endpoint = _send(receiver, _config(receiver))
    assert [r.status for r in receiver.received()] == [401]
    assert endpoint.failed == 1


def test_it_gives_up_after_the_retries_and_goes_on_with_the_next(receiver):
    receiver.plan = [503, 503, 503]
    endpoint = _send(receiver, _config(receiver, retries=2), count=2)
    got = receiver.received()
    assert [(r.headers["X-Citadel-Delivery"], r.status) for r in got] == [
        ("d0", 503), ("d0", 503), ("d0", 503), ("d1", 200)]
    assert endpoint.failed == 1


def test_deliveries_keep_their_order(receiver):
    receiver.plan = [503]
    _send(receiver, _config(receiver), count=5)
    delivered = [b["n"] for b in receiver.delivered()]
    assert delivered == [0, 1, 2, 3, 4]


def test_a_full_queue_drops_the_oldest(receiver):
    async def run() -> Endpoint:
        async with aiohttp.ClientSession() as session:
            endpoint = Endpoint(receiver.url, lambda: session, "citadel-webhook/test")
            config = _config(receiver, queue_size=2)
            # Queued without yielding to the loop: the sender has not run yet.
            for i in range(4):
                endpoint.offer(Delivery(f"d{i}", "state", "chat", b'{"n": %d}' % i), config)
            await endpoint.idle()
            return endpoint

    endpoint = asyncio.run(run())
    assert [b["n"] for b in receiver.delivered()] == [2, 3]
    assert endpoint.dropped == 2


def test_backoff_doubles_and_is_capped():
    config = WebhookConfig(urls=["http://127.0.0.1:1/"], secret=SECRET, backoff=1.0)
    assert [backoff_delay(config, n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(config, 30) == 60.0


def test_a_cancelled_sender_still_posts_what_is_queued_once(receiver):
    # citadeld's loop cancels every task on exit; the last events must still go out.

    async def run() -> Endpoint:
        async with aiohttp.ClientSession() as session:
            endpoint = Endpoint(receiver.url, lambda: session, "citadel-webhook/test")
            config = _config(receiver)
            for i in range(3):
                endpoint.offer(Delivery(f"d{i}", "state", "chat", b'{"n": %d}' % i), config)
            await asyncio.sleep(0)  # the sender starts, and takes d0
            endpoint._task.cancel()
            await endpoint.stopped()
            return endpoint

    asyncio.run(run())
    # d0 was in flight when the cancel came: it goes again, first, under its own id.
    assert [r.headers["X-Citadel-Delivery"] for r in receiver.received()] == ["d0", "d1", "d2"]
