"""Prefix affinity: which worker a prompt's opening belongs to.

vLLM caches the KV blocks of the prompts it has seen; a request whose prompt
starts like an earlier one skips that part of its prefill, but only on the
engine that saw it. So requests that share a long prefix (a system prompt, a
document, a few-shot block) should go to one worker. ``prompt_prefix`` takes
the first ``chars`` characters of a request's prompt (bounded work, whatever
the body holds); ``owner`` maps its digest to one of the candidates by
rendezvous hashing: each worker scores ``hash(key, name)`` and the highest
wins, so a worker joining or leaving moves only the prefixes it wins or
held, and the others stay where their cache is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

#: Chat messages looked at, at most: a prefix is met long before in any real request.
MAX_MESSAGES = 256
#: The endpoints whose prompts go through vLLM's prefix cache.
AFFINITY_PATHS = ("/v1/chat/completions", "/v1/completions")

T = TypeVar("T")


def _text_of(content: Any, room: int) -> str:
    """The text of a message's ``content`` (a string, or a list of parts), up to ``room`` chars."""
    if isinstance(content, str):
        return content[:room]
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    for part in content[:MAX_MESSAGES]:
        if room <= 0:
            break
        if isinstance(part, Mapping) and isinstance(text := part.get("text"), str):
            texts.append(text[:room])
            room -= len(texts[-1])
    return "".join(texts)


def prompt_prefix(path: str, payload: Mapping[str, Any], chars: int) -> str | None:
    """The first ``chars`` characters of the request's prompt, or None when it is shorter
    (or the endpoint has no prompt to cache).

    Chat: each message as ``role`` and its text, in order. Completions: the prompt text,
    or the first prompt of a list (token ids as numbers).
    """
    if path not in AFFINITY_PATHS:
        return None
    pieces: list[str] = []
    room = chars
    if path == "/v1/chat/completions":
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return None
        for message in messages[:MAX_MESSAGES]:
            if room <= 0:
                break
            if not isinstance(message, Mapping):
                continue
            role = message.get("role")
            piece = f"{role if isinstance(role, str) else ''}\x00{_text_of(message.get('content'), room)}\x01"
            pieces.append(piece[:room])
            room -= len(pieces[-1])
    else:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt:
            first = prompt[0]
            # A list of prompts: the first; a list of token ids: that list itself.
            prompt = first if isinstance(first, (str, list)) else prompt
        if isinstance(prompt, str):
            pieces.append(prompt[:room])
        elif isinstance(prompt, list):
            # Token ids: each at least 2 characters here, so chars // 2 of them suffice.
            pieces.append(",".join(str(t) for t in prompt[:chars // 2] if isinstance(t, int))[:room])
    text = "".join(pieces)
    return text if len(text) >= chars else None


def prefix_key(prefix: str) -> bytes:
    """The digest that stands for a prefix (what ``owner`` hashes)."""
    return hashlib.blake2b(prefix.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def weight(key: bytes, name: str) -> int:
    """Rendezvous weight of the worker ``name`` for ``key``."""
    digest = hashlib.blake2b(key + b"\x00" + name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(key: bytes, workers: Iterable[T], name_of: Callable[[T], str]) -> T | None:
    """The worker ``key`` belongs to among ``workers`` (rendezvous hashing), None when none."""
    best: T | None = None
    best_weight = -1
    for worker in workers:
        w = weight(key, name_of(worker))
        if w > best_weight:
            best, best_weight = worker, w
    return best
