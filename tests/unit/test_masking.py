"""The secret masker: what it hides, in text and in raw bytes, and what it leaves alone."""

from __future__ import annotations

import json

import pytest

from citadel_supervisor.logs.masking import MASK, SecretMasker, is_secret_name


@pytest.fixture
def masker() -> SecretMasker:
    return SecretMasker()


def both(m: SecretMasker, text: str) -> str:
    """Mask as text and as bytes; the two must agree."""
    as_text = m.mask(text)
    assert m.mask_bytes(text.encode()) == as_text.encode()
    return as_text


def test_configured_secrets(masker: SecretMasker) -> None:
    masker.add_secrets(["correct-horse-battery", "s3cr3t"])
    assert both(masker, "login with correct-horse-battery, then s3cr3t.") == f"login with {MASK}, then {MASK}."
    # Raw bytes around the secret need not be UTF-8.
    assert masker.mask_bytes(b"\xff\xfe s3cr3t \xff") == b"\xff\xfe **** \xff"


def test_longest_secret_masked_whole(masker: SecretMasker) -> None:
    masker.add_secrets(["abcd", "abcdefgh"])
    assert both(masker, "x abcdefgh y") == "x **** y"


def test_short_and_empty_values_are_not_secrets(masker: SecretMasker) -> None:
    masker.add_secrets(["", "1", "abc"])
    masker.add_secret(None)
    assert both(masker, "value 1 abc 123") == "value 1 abc 123"


def test_regex_characters_in_secrets(masker: SecretMasker) -> None:
    masker.add_secret("a.b*c(d)")
    assert both(masker, "x a.b*c(d) axbbc(d)") == "x **** axbbc(d)"


def test_json_spellings_of_a_secret(masker: SecretMasker) -> None:
    """A secret with quotes, backslashes or non-ASCII is masked inside JSON too."""
    secret = 'pa"ss\\wörd'
    masker.add_secret(secret)
    for dumped in (json.dumps({"v": secret}), json.dumps({"v": secret}, ensure_ascii=False)):
        assert "ss" not in masker.mask(dumped), dumped


def test_env_names_mark_secrets(masker: SecretMasker) -> None:
    masker.add_env({"HF_TOKEN": "tok-value-1", "OPENAI_API_KEY": "key-value-2", "APP_SECRET": "sec-value-3",
                    "DB_PASSWORD": "pw-value-4", "PATH": "/usr/local/bin", "MODEL": "phi3"})
    text = "tok-value-1 key-value-2 sec-value-3 pw-value-4 /usr/local/bin phi3"
    assert both(masker, text) == "**** **** **** **** /usr/local/bin phi3"


@pytest.mark.parametrize("name, secret", [
    ("HF_TOKEN", True), ("hf_token", True), ("OPENAI_API_KEY", True), ("SECRET", True),
    ("PGPASSWORD", True), ("MY_CREDENTIALS", True), ("PATH", False), ("HOME", False),
    ("CUDA_VISIBLE_DEVICES", False), ("VLLM_PORT", False),
])
def test_is_secret_name(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


@pytest.mark.parametrize("text, masked", [
    ("token hf_AbCdEf0123456789 here", "token hf_**** here"),
    ("OPENAI key sk-proj-abc_DEF-1234567890", "OPENAI key sk-****"),
    ("Authorization: Bearer eyJhbGciOi.J9.abc", "Authorization: Bearer ****"),
    ("authorization=Basic dXNlcjpwYXNz", "authorization=Basic ****"),
    ("curl -H 'Authorization: Bearer xyz123456'", "curl -H 'Authorization: Bearer ****'"),
    ("password=hunter2 next", "password=**** next"),
    ("PASSWORD: 'hunter2'", "PASSWORD: '****'"),
    ('{"password": "abc"}', '{"password": "****"}'),
    ("api_key=abcd&x=1", "api_key=****&x=1"),
    ("postgres://user:pa55w0rd@db:5432/x", "postgres://user:****@db:5432/x"),
    ("https://bob:hunter2@example.com/", "https://bob:****@example.com/"),
    ("serve --api-key abcdefgh --port 8000", "serve --api-key **** --port 8000"),
    ("serve --hf-token 'tok123' x", "serve --hf-token '****' x"),
])
def test_secret_patterns(masker: SecretMasker, text: str, masked: str) -> None:
    assert both(masker, text) == masked


@pytest.mark.parametrize("text", [
    "INFO 200 GET /v1/models",
    "key=1",
    "monkey=banana",
    "the key is here",
    "max_tokens=512 --max-num-batched-tokens 8192 --tokenizer gpt2",
    "https://example.com/path?q=1",
    "http://user@host/",
    "sk-short hf_ab",
    "passwordless login is off",
    "Loading safetensors checkpoint shards: 100% Completed | 2/2",
    "",
])
def test_ordinary_text_is_left_alone(masker: SecretMasker, text: str) -> None:
    masker.add_secrets(["some-configured-secret"])
    assert both(masker, text) == text


def test_clear_forgets_literals_but_keeps_patterns(masker: SecretMasker) -> None:
    masker.add_secret("literal-value")
    masker.clear()
    assert both(masker, "literal-value hf_abcdefghij") == "literal-value hf_****"
