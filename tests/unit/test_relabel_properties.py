"""The whole-page relabelling against the line-by-line one, on generated pages.

Pages are built from families with random names, types, label sets (some with
labels named service or worker, escaped quotes, empty sets), samples without
labels, stray samples of other families and comments. Whatever the fast path
takes, the merged result must be the line path's.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families as parse_text

from citadel_supervisor.exporter.federation import FederatedFamilies, PageRelabeler, page_by_line

names = st.from_regex(r"[a-z][a-z0-9_]{0,8}(:[a-z0-9_]{1,6})?", fullmatch=True)
# Hazards for the fast path (labels named service or worker, escaped quotes, empty
# label sets, comments, strays) are drawn rarely, so that about half the pages take it.
label_names = st.sampled_from(["model", "engine", "le", "code", "a_b"] * 8 + ["service", "worker"])
label_values = st.one_of(
    st.from_regex(r"[a-zA-Z0-9 ._/{}-]{0,8}", fullmatch=True),
    st.from_regex(r"[a-zA-Z0-9 ._/{}-]{0,8}", fullmatch=True),
    st.from_regex(r"[a-zA-Z0-9 ._/{}-]{0,8}", fullmatch=True),
    st.sampled_from(['x\\"} y', "back\\\\slash", "new\\nline"]),
)
values = st.sampled_from(["0.0", "1.0", "2.5", "1e+06", "+Inf", "NaN", "17"])
helps = st.sampled_from(["Help."] * 6 + ['Has x{a="b"} 1 in it.', ""])


@st.composite
def samples(draw: Any, name: str) -> str:
    labels = draw(st.dictionaries(label_names, label_values, max_size=3))
    suffix = draw(st.sampled_from(["", "", "_total", "_bucket", "_count", "_sum"]))
    if labels:
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        label_set = "{" + text + "}"
    else:
        label_set = draw(st.sampled_from([""] * 9 + ["{}"]))
    return f"{name}{suffix}{label_set} {draw(values)}"


@st.composite
def pages(draw: Any) -> str:
    lines = []
    for name in draw(st.lists(names, min_size=1, max_size=5, unique=True)):
        if draw(st.booleans()):
            lines.append(f"# HELP {name} {draw(helps)}")
        if draw(st.integers(0, 4)):
            lines.append(f"# TYPE {name} {draw(st.sampled_from(['gauge', 'counter', 'histogram', 'untyped']))}")
        for _ in range(draw(st.integers(0, 4))):
            lines.append(draw(samples(name)))
        extra = draw(st.sampled_from([""] * 12 + ["# a comment", "stray_metric{x=\"1\"} 3", "stray 4"]))
        if extra:
            lines.append(extra)
    return "\n".join(lines) + "\n"


def canonical(text: str) -> list[tuple[Any, ...]]:
    return sorted(
        (f.name, f.type, f.documentation,
         tuple(sorted((s.name, tuple(sorted(s.labels.items())), repr(s.value)) for s in f.samples)))
        for f in parse_text(text)
    )


def line_path(*pages: str) -> list[tuple[Any, ...]]:
    merged = FederatedFamilies()
    for i, page in enumerate(pages):
        merged._add_families(page_by_line(page, f'service="chat",worker="chat.{i}"'), f"chat.{i}")
    return canonical(merged.render())


# How many examples: the profile's (tests/conftest.py), so that "explore" can raise it.
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(first=pages(), second=pages())
def test_the_fast_path_merges_to_what_the_line_path_gives(first: str, second: str) -> None:
    relabeler = PageRelabeler("chat", "chat.0")
    for page in (first, second, first):  # a warm relabeller, with a layout from another page
        assert canonical(FederatedFamilies([relabeler.split(page)]).render()) == line_path(page)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(page=pages(), other=pages())
# Found by a random run: a family with a help text and no samples on the shared
# layout, samples of it on another page. The fast path dropped the help.
@example(page="# HELP a00000000 Help.\n", other="a00000000 0.0\n")
@example(page="# TYPE a counter\n", other="a 1\n")
def test_pages_of_one_layout_merge_as_the_line_path_merges_them(page: str, other: str) -> None:
    """Two workers serving the same families (one layout, merged a family at a time), and
    a third with other ones."""
    split = [PageRelabeler("chat", f"chat.{i}").split(text) for i, text in enumerate((page, page, other))]
    assert canonical(FederatedFamilies(split).render()) == line_path(page, page, other)
