"""Is a worker's page valid exposition text? Checked whole, in C, before it is relabelled.

A worker's page is hostile input: one bad line in the exporter's answer makes
Prometheus reject the whole scrape, citadeld's own series included. So a
page is checked before it is relabelled, and a bad one is dropped whole
(and counted), never passed on. The checks are two regular expressions over
the page, so that a 600-line vLLM page costs well under a millisecond and no
Python work per line; they run only when the page changed (the relabeller
keeps the last page).

- ``_PAGE``: every line is a HELP, TYPE or other comment line, a blank
  line, or a sample (``name{label="value",...} value [timestamp]``) in the
  strict form prometheus_client writes;
- duplicate label names on one sample (which Prometheus rejects): the label
  values are cut out, and each distinct list of label names is checked.
"""

from __future__ import annotations

import re

#: The largest page federated (bytes). A larger one is dropped whole; the fetch stops
#: reading there. A vLLM page is about 50 KiB; this leaves room for many adapters and LoRAs.
MAX_PAGE_BYTES = 4 * 1024 * 1024

#: Why a page was dropped (the ``reason`` label of ``citadel_federation_pages_dropped_total``).
TOO_LARGE = "too_large"
MALFORMED = "malformed"
DUPLICATE_LABELS = "duplicate_labels"
NOT_UTF8 = "not_utf8"

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*+"
_LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*+"
# A label value: only the escapes the text format defines, and no raw newline.
_VALUE = r'"[^"\\\n]*+(?:\\[\\n"][^"\\\n]*+)*+"'
_LABELS = rf"\{{(?:{_LABEL_NAME}={_VALUE}(?:,{_LABEL_NAME}={_VALUE})*+,?)?\}}"
# Go's and Python's float spellings that every parser reads alike.
_NUMBER = r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|Inf|inf)|NaN|nan"
_SAMPLE = rf"{_NAME}(?:{_LABELS})? (?:{_NUMBER})(?: -?\d+)?"
_COMMENT = (rf"# (?:HELP {_NAME}(?: [^\n]*+)?|TYPE {_NAME} (?:counter|gauge|histogram|summary|untyped))"
            r"|#(?! (?:HELP|TYPE)\b)[^\n]*+")
# Samples first: they are most of a page. Trailing blanks and CRs are tolerated (the line
# path strips them); nothing else is.
_PAGE = re.compile(rf"(?:(?:{_SAMPLE}|{_COMMENT}|)[ \t\r]*+\n)*+")
_QUOTED = re.compile(_VALUE)
# In a page without its label values: each sample's list of label names (``a=,b=``).
_LABEL_NAMES = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*\{([^}\n]+)\}", re.MULTILINE)


def page_problem(text: str) -> str | None:
    """Why ``text`` must not be federated (a ``reason``), or None when it is valid.

    ``text`` must already be within ``MAX_PAGE_BYTES`` (the fetch checks).
    """
    if not _PAGE.fullmatch(text if text.endswith("\n") else text + "\n"):
        return MALFORMED
    if "{" in text and _has_duplicate_label(text):
        return DUPLICATE_LABELS
    return None


def _has_duplicate_label(text: str) -> bool:
    """True when some sample names one label twice (``_PAGE`` has matched ``text``)."""
    skeleton = _QUOTED.sub("", text)
    for names in set(_LABEL_NAMES.findall(skeleton)):
        listed = names.rstrip(",").rstrip("=").split("=,")
        if len(listed) != len(set(listed)):
            return True
    return False
