"""The one masking step that keeps secrets out of logs, errors and answers.

Every daemon log record, every captured worker line, every error message,
every control API answer and ``citadelctl``'s output passes through
``SecretMasker.mask`` (or ``mask_bytes`` for raw worker output).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus

MASK = "****"

#: Environment variable names whose values are secrets.
SECRET_NAME_PARTS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")

# Shortest value worth masking literally: masking "1" would shred every log.
_MIN_SECRET_LEN = 4

# Keys whose values are secret in "key=value" text, and what follows such a key.
_KEYWORDS = ("password", "passwd", "pwd", "secret", "token", "api_key", "api-key", "apikey")
_KEY_VALUE_REST = r"[\"']?\s*[=:]\s*[\"']?)(?!\$\{)[^\s'\",&;]+"

# (pattern, replacement) pairs; each keeps the part that says what was masked.
_PATTERNS: list[tuple[str, str]] = [
    (r"hf_[A-Za-z0-9]{6,}", "hf_" + MASK),
    (r"sk-[A-Za-z0-9_\-]{6,}", "sk-" + MASK),
    (r"(?i)(authorization\s*[:=]\s*(?:bearer|basic|token)\s+)[^\s'\",]+", r"\1" + MASK),
    (r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=\-]{6,}", r"\1" + MASK),
    # key=value and key: value; a ${VAR} reference is where a secret comes from,
    # not the secret: it stays readable.
    (r"(?i)((?:" + "|".join(_KEYWORDS) + r")" + _KEY_VALUE_REST, r"\1" + MASK),
    (r"(://[^/\s:@]+:)[^/\s@]+@", r"\1" + MASK + "@"),
    # A command-line flag such as vLLM's "--api-key VALUE" or "--hf-token VALUE".
    (
        r"(?i)(--[A-Za-z0-9_\-]*(?:api[_-]?key|token|password|passwd|secret)\s+[\"']?)[^\s'\"]+",
        r"\1" + MASK,
    ),
]
# Cheap substring tests per pattern, on a lower-cased copy (the patterns ignore
# case): most text contains none of these, and a substring search is far faster
# than running a case-insensitive regex over a 64 KiB chunk.
_HINTS: list[tuple[str, ...]] = [
    ("hf_",),
    ("sk-",),
    ("authorization",),
    ("bearer",),
    _KEYWORDS,
    ("@",),
    ("--",),
]
_HINTS_B = [tuple(h.encode() for h in hints) for hints in _HINTS]


def is_secret_name(name: str) -> bool:
    """Return True when an environment variable's name marks its value secret."""
    upper = name.upper()
    return any(part in upper for part in SECRET_NAME_PARTS)


class SecretMasker:
    """Replaces known secret values and secret-looking patterns with ``****``.

    Thread-safe to update; reads take a snapshot of the compiled state.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._literal_re: re.Pattern[str] | None = None
        self._literal_re_b: re.Pattern[bytes] | None = None
        self._ordered: tuple[str, ...] = ()
        #: The byte length of the longest spelling of any secret (0 when none).
        self.longest = 0
        self._patterns = [(re.compile(p), r) for p, r in _PATTERNS]
        self._patterns_b = [(re.compile(p.encode()), r.encode()) for p, r in _PATTERNS]
        # The case-insensitive patterns, made case-sensitive to run on a lower-cased
        # copy: about ten times faster on bytes, where lower() keeps every offset.
        # The key=value pattern is split into one pattern per key, each starting with
        # a literal, which the regex engine finds with a fast string search.
        self._folded_b: list[list[re.Pattern[bytes]] | None] = [
            [re.compile(p.removeprefix("(?i)").encode())] if p.startswith("(?i)") else None
            for p, _ in _PATTERNS
        ]
        key_value = next(i for i, (p, _) in enumerate(_PATTERNS) if _KEY_VALUE_REST in p)
        self._folded_b[key_value] = [
            re.compile(("(" + re.escape(k) + _KEY_VALUE_REST).encode()) for k in _KEYWORDS
        ]

    def add_secret(self, value: str | None) -> None:
        """Mask this exact value from now on (short values are ignored)."""
        if not value or len(value) < _MIN_SECRET_LEN:
            return
        spellings = _spellings(value)
        with self._lock:
            if spellings <= self._secrets:
                return
            self._secrets.update(spellings)
            self._compile()

    def add_secrets(self, values: Iterable[str]) -> None:
        """Mask each of these values from now on."""
        for value in values:
            self.add_secret(value)

    def add_env(self, env: Mapping[str, str]) -> None:
        """Mask the values of the variables whose names mark them secret."""
        self.add_secrets(v for k, v in env.items() if is_secret_name(k))

    def clear(self) -> None:
        """Forget every literal secret (the patterns stay)."""
        with self._lock:
            self._secrets.clear()
            self._compile()

    def _compile(self) -> None:
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(self._secrets, key=len, reverse=True)
        self._ordered = tuple(ordered)
        self.longest = max((len(s.encode()) for s in ordered), default=0)
        if not ordered:
            self._literal_re = self._literal_re_b = None
            return
        alternation = "|".join(re.escape(s) for s in ordered)
        self._literal_re = re.compile(alternation)
        self._literal_re_b = re.compile(alternation.encode())

    def mask(self, text: str) -> str:
        """Return ``text`` with every secret and secret-looking pattern masked."""
        literal = self._literal_re
        if literal is not None:
            text = literal.sub(MASK, text)
        lower = text.lower()
        for (pattern, repl), hints in zip(self._patterns, _HINTS):
            if any(h in lower for h in hints):
                text = pattern.sub(repl, text)
        return text

    def mask_secrets(self, text: str) -> str:
        """``text`` with the registered secrets masked, and nothing else (no patterns).

        Cheap when none occurs (one substring search per spelling), for large
        texts that seldom hold one: the workers' ``/metrics`` pages.
        """
        literal = self._literal_re
        if literal is None or not any(secret in text for secret in self._ordered):
            return text
        return literal.sub(MASK, text)

    def cut_point(self, data: bytes, at: int) -> int:
        """``at``, or a later offset, such that no registered secret in ``data`` spans it.

        Worker output is cut into pieces of at most 64 KiB: a secret cut in two
        would be masked in neither piece. A secret that spans ``at`` lies whole
        in ``data`` when ``data`` holds at least ``longest`` bytes past ``at``.
        """
        literal = self._literal_re_b
        if literal is None:
            return at
        moved = True
        while moved:  # overlapping secrets: a match may end inside the next one
            moved = False
            for match in literal.finditer(data, max(0, at - self.longest)):
                if match.start() >= at:
                    break
                if match.end() > at:
                    at, moved = match.end(), True
                    break
        return at

    def mask_bytes(self, data: bytes) -> bytes:
        """Like ``mask``, on raw bytes (worker output), without decoding."""
        literal = self._literal_re_b
        if literal is not None:
            data = literal.sub(MASK.encode(), data)
        lower = data.lower()
        for (pattern, repl), folded, hints in zip(self._patterns_b, self._folded_b, _HINTS_B):
            if not any(h in lower for h in hints):
                continue
            if folded is None:
                data = pattern.sub(repl, data)
                lower = data.lower()
                continue
            spans = _spans(folded, lower)
            if spans:
                data = _replace_spans(data, spans)
                lower = data.lower()
        return data


def _spellings(value: str) -> set[str]:
    """``value`` as worker output and answers may spell it.

    JSON lines and API answers escape quotes, backslashes, control and
    non-ASCII characters; URLs and form bodies percent-encode (``%2F``,
    ``%2B``, ``%3D``: a token in a query string or a logged request URL), in
    upper- or lower-case hex, with ``/`` kept or not, and ``+`` for spaces.
    """
    spellings = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    for encoded in (quote(value, safe=""), quote(value), quote_plus(value, safe="")):
        spellings.add(encoded)
        spellings.add(_PERCENT.sub(lambda m: m.group(0).lower(), encoded))
    return spellings


_PERCENT = re.compile(r"%[0-9A-F]{2}")


def _spans(patterns: list[re.Pattern[bytes]], lower: bytes) -> list[tuple[int, int]]:
    """The (value start, end) of every match, each keeping its group 1, without overlaps."""
    found = sorted((m.end(1), m.end()) for p in patterns for m in p.finditer(lower))
    spans: list[tuple[int, int]] = []
    for start, end in found:
        if not spans or start >= spans[-1][1]:
            spans.append((start, end))
    return spans


def _replace_spans(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    out, last = [], 0
    for start, end in spans:
        out += [data[last:start], MASK.encode()]
        last = end
    out.append(data[last:])
    return b"".join(out)


#: The daemon's one masker; the config loader fills it with secret values.
masker = SecretMasker()
