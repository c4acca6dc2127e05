"""``[plugin.webhook]``: where to post, which events, how hard to try, and the signing secret."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator

#: Shorter HMAC keys are too easy to guess.
MIN_SECRET_LENGTH = 16

def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("not an http:// or https:// URL")
    return url


#: An absolute http(s) URL.
HttpUrlText = Annotated[str, AfterValidator(_http_url)]

#: What ``events`` may list: the kinds of ``WorkerEvent``, and ``fatal`` for
#: the state changes into ``fatal`` alone.
EventName = Literal["state", "ready", "exit", "restart", "fatal"]

#: Sent when ``events`` is not given: every state change and every restart.
DEFAULT_EVENTS: tuple[EventName, ...] = ("state", "restart")


class WebhookConfig(BaseModel):
    """``[plugin.webhook]``: post worker events to these URLs, signed with ``secret``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    urls: list[HttpUrlText] = Field(min_length=1, description="http(s) URLs; each gets every event")
    secret: SecretStr = Field(
        description='the HMAC-SHA256 key, usually "${credential:webhook-secret}"; masked everywhere',
    )
    events: list[EventName] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        description="event kinds to send: state, ready, exit, restart, or fatal (state changes into fatal)",
    )
    services: list[str] = Field(
        default_factory=list, description="send only these services' events (empty: every service)"
    )
    timeout: float = Field(5.0, gt=0, description="seconds one POST may take")
    retries: int = Field(3, ge=0, le=20, description="more tries after a failed POST")
    backoff: float = Field(
        1.0, ge=0, description="seconds before the first retry; doubles with each one (at most 60)"
    )
    queue_size: int = Field(1000, ge=1, description="events kept per URL while it is slow; the oldest go first")

    @model_validator(mode="after")
    def _long_secret(self) -> WebhookConfig:
        # Checked here, not with min_length on the field: a field's error
        # quotes the value it rejected, and this value is a secret. (Reported
        # on the table, since "secret: <word>" is what the masker hides.)
        if len(self.secret.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"the secret is too short: use at least {MIN_SECRET_LENGTH} characters "
                "(`openssl rand -hex 32` makes one)"
            )
        return self

    def wants(self, kind: str, state: str, service: str) -> bool:
        """True when an event of this kind, new state and service is to be sent."""
        if self.services and service not in self.services:
            return False
        return kind in self.events or (kind == "state" and state == "fatal" and "fatal" in self.events)
