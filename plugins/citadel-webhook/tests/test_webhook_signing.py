"""The signature a receiver checks, and the settings' validation."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from citadel_webhook import WebhookConfig, sign, verify
from pydantic import ValidationError

SECRET = "0123456789abcdef-secret"


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"event": "state", "worker": "chat"}'
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert sign(body, SECRET) == f"sha256={expected}"
    assert verify(body, SECRET, sign(body, SECRET))


@pytest.mark.parametrize("header", [
    sign(b'{"event": "state", "worker": "chat!"}', SECRET),  # another body
    sign(b'{"event": "state", "worker": "chat"}', SECRET + "x"),  # another key
    sign(b'{"event": "state", "worker": "chat"}', SECRET).removeprefix("sha256="),  # no scheme
    "",
    None,
])
def test_a_wrong_or_missing_signature_does_not_verify(header: str | None) -> None:
    assert not verify(b'{"event": "state", "worker": "chat"}', SECRET, header)


def test_the_secret_never_shows_in_the_settings() -> None:
    config = WebhookConfig(urls=["https://example.com/hook"], secret=SECRET)
    assert SECRET not in repr(config)
    assert SECRET not in config.model_dump_json()
    assert config.secret.get_secret_value() == SECRET


def test_a_short_secret_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValidationError) as info:
        WebhookConfig(urls=["https://example.com/hook"], secret="tooshort")
    # citadeld builds its message from each error's msg (and quotes the input
    # only when it is a scalar: here it is the whole table).
    [error] = info.value.errors()
    assert "at least 16 characters" in error["msg"]
    assert "tooshort" not in error["msg"]
    assert not isinstance(error["input"], str)


def test_fatal_selects_only_state_changes_into_fatal() -> None:
    config = WebhookConfig(urls=["https://example.com/hook"], secret=SECRET, events=["fatal"])
    assert config.wants("state", "fatal", "chat")
    assert not config.wants("state", "backoff", "chat")
    assert not config.wants("restart", "backoff", "chat")


def test_services_filter() -> None:
    config = WebhookConfig(urls=["https://example.com/hook"], secret=SECRET, services=["chat"],
                           events=["state", "restart"])
    assert config.wants("restart", "backoff", "chat")
    assert not config.wants("restart", "backoff", "embed")
