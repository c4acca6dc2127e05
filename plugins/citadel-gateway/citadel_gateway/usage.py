"""Reading the token ``usage`` a worker reports, without parsing whole answers.

An answer's ``usage`` object is found by a byte search and a few small
regular expressions, so that a large answer (embeddings) is never decoded
just to count its tokens. For streams, ``SseUsageTap`` passes the bytes on
line by line, reads the usage chunk, and drops it when the gateway asked
for it on the client's behalf (the client did not, and may not expect it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_USAGE_KEY = b'"usage"'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_FIELDS = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d+)')
           for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
#: How far past ``"usage"`` its counts may be (the object is small).
_WINDOW = 2048


@dataclass
class Usage:
    """Tokens one request used, as the worker reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage_in(data: bytes) -> Usage | None:
    """The last ``usage`` object in ``data`` (a JSON answer or an SSE line), or None."""
    at = data.rfind(_USAGE_KEY)
    if at < 0:
        return None
    window = data[at:at + _WINDOW]
    if not _USAGE_OBJECT.match(window):
        return None  # "usage": null
    counts = {}
    for name, pattern in _FIELDS.items():
        found = pattern.search(window)
        counts[name] = int(found.group(1)) if found else 0
    if not counts["total_tokens"]:
        counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
    return Usage(**counts)


class SseUsageTap:
    """Passes a server-sent event stream on, complete lines at a time, noting its usage.

    Only a partial last line is held back, until its end arrives: an SSE
    client acts on whole events, so holding half a line delays nothing.
    With ``strip``, the usage-only chunk (``"choices": []``) is dropped: the
    gateway added ``stream_options.include_usage`` itself. Dropping its
    ``data:`` line leaves an empty event, which SSE clients skip.
    """

    def __init__(self, strip: bool):
        self.strip = strip
        self.usage: Usage | None = None
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on for this chunk (maybe empty)."""
        if self._tail:
            chunk = self._tail + chunk
        end = chunk.rfind(b"\n") + 1
        self._tail = chunk[end:]
        complete = chunk[:end]
        if _USAGE_KEY not in complete:
            return complete
        kept = []
        for line in complete.splitlines(keepends=True):
            if _USAGE_KEY in line:
                usage = usage_in(line)
                if usage is not None:
                    self.usage = usage
                    if self.strip and _EMPTY_CHOICES.search(line):
                        continue
            kept.append(line)
        return b"".join(kept)

    def flush(self) -> bytes:
        """What is left at the end of the stream (a last line without its newline)."""
        rest, self._tail = self._tail, b""
        if rest and _USAGE_KEY in rest:
            usage = usage_in(rest)
            if usage is not None:
                self.usage = usage
        return rest
