"""FamilyEncoder: the same bytes as prometheus_client's encoders, reusing unchanged families."""

from __future__ import annotations

import pytest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from citadel_supervisor.exporter.exposition import CollectedFamilies, FamilyEncoder, without_eof


def families(restarts: float, uptime: float) -> list[Metric]:
    state = GaugeMetricFamily("citadel_worker_state", "State.", labels=["worker", "state"])
    for name in ("running", "backoff"):
        state.add_metric(["chat.0", name], 1.0 if name == "running" else 0.0)
    counter = CounterMetricFamily("citadel_worker_restarts", "Restarts.", labels=["worker"])
    counter.add_metric(["chat.0"], restarts)
    gauge = GaugeMetricFamily("citadel_worker_uptime_seconds", "Uptime.", labels=["worker"])
    gauge.add_metric(["chat.0"], uptime)
    histogram = HistogramMetricFamily("citadel_worker_startup_seconds", "Startup.", labels=["service"])
    histogram.add_metric(["chat"], [("1.0", 1.0), ("+Inf", 2.0)], sum_value=3.5)
    return [state, counter, gauge, histogram]


@pytest.mark.parametrize("encoder", [
    generate_latest, generate_openmetrics,
    # what choose_encoder gives for Prometheus' Accept header
    choose_encoder("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")[0],
])
def test_the_bytes_are_prometheus_clients_and_unchanged_families_are_reused(encoder: object) -> None:
    encode = FamilyEncoder()
    for restarts, uptime in ((0.0, 1.0), (0.0, 2.0), (1.0, 2.0), (1.0, 2.0)):
        page = families(restarts, uptime)
        assert encode.encode(page, encoder) == without_eof(encoder(CollectedFamilies(page)))  # type: ignore[operator]

    first = encode.encode(families(5.0, 1.0), encoder)  # type: ignore[arg-type]
    cached = {name: data for name, (_, data) in next(iter(encode._caches.values())).items()}
    # the other format in between, as when two scrapers ask for different ones
    other = generate_latest if encoder is generate_openmetrics else generate_openmetrics
    encode.encode(families(5.0, 1.0), other)
    encode.encode(families(5.0, 9.0), encoder)  # type: ignore[arg-type]
    assert len(encode._caches) == 2  # one per format, however many times each was asked for
    again = {name: data for name, (_, data) in next(iter(encode._caches.values())).items()}
    assert again["citadel_worker_state"] is cached["citadel_worker_state"]
    assert again["citadel_worker_restarts"] is cached["citadel_worker_restarts"]
    assert again["citadel_worker_uptime_seconds"] is not cached["citadel_worker_uptime_seconds"]
    assert b"9.0" in again["citadel_worker_uptime_seconds"]
    assert b"# EOF" not in first


def test_a_family_that_is_gone_is_not_kept() -> None:
    encode = FamilyEncoder()
    encode.encode(families(0.0, 1.0), generate_latest)
    encode.encode(families(0.0, 1.0)[:1], generate_latest)
    assert [list(cache) for cache in encode._caches.values()] == [["citadel_worker_state"]]


def test_names_that_escaping_would_change_are_encoded_as_prometheus_client_does() -> None:
    """A colon in a sample name, or a label name outside the legacy runes: the family
    goes through the encoder as asked, not the cheaper equivalent."""
    odd = GaugeMetricFamily("vllm:num_requests", "Colons.", labels=["model.name"])
    odd.add_metric(["m"], 1.0)
    plain = families(0.0, 1.0)
    page = [odd, *plain]
    for encoder in (generate_openmetrics,
                    choose_encoder("application/openmetrics-text;version=1.0.0;escaping=underscores")[0]):
        assert FamilyEncoder().encode(page, encoder) == without_eof(encoder(CollectedFamilies(page)))


def test_choose_encoders_partials_share_one_cache() -> None:
    """choose_encoder makes a new partial per request: they must not each get a cache."""
    encode = FamilyEncoder()
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    for _ in range(5):
        encode.encode(families(0.0, 1.0), choose_encoder(accept)[0])
    assert len(encode._caches) == 1
