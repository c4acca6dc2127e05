"""One worker's ``/metrics`` page with ``service`` and ``worker`` labels on every sample.

A label of the same name already on a sample is kept as ``exported_service`` /
``exported_worker`` (``exported_exported_service`` when that is taken too), as
Prometheus' ``honor_labels = false`` does. A page is masked (the registered
secrets) and checked (``validate``) first; a bad page is dropped whole.

Pages are handled as text, without building sample objects: a vLLM page is
about 600 lines, and a scrape may carry dozens of them. A page that
prometheus_client wrote (vLLM's, and most) is relabelled whole, in C; any
other page in the text format is relabelled line by line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ...logs.masking import masker
from .validate import page_problem

#: Sample-name suffixes that belong to a family of the base name.
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_info", "_gcount", "_gsum")
_CLASH = re.compile(r'[{,](?:service|worker)=')
#: One label of a validated page: its name and its quoted value.
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)=("[^"\\\n]*(?:\\.[^"\\\n]*)*")')

#: What the whole-page relabelling cannot take (anywhere in the page, help texts
#: included); such a page is done line by line: a label named service or worker
#: (it must be renamed), a CR, and a backslash (checked further, below: an escaped
#: quote means a label value might hold ``"} ``).
_NOT_PLAIN = ("service=", "worker=", "\r")


@dataclass
class Family:
    """One metric family: its name, type, help and sample text."""

    name: str
    type: str = "untyped"
    help: str | None = None
    #: Relabelled sample lines, in chunks (one per worker, once merged); each line ends with a newline.
    chunks: list[str] = field(default_factory=list)

    def owns(self, sample_name: str) -> bool:
        """True when a sample of this name belongs to this family."""
        if sample_name == self.name:
            return True
        return sample_name.startswith(self.name) and sample_name[len(self.name):] in _SUFFIXES


#: The sample names a family of each type has in the text format, after its own name
#: ("" is the name itself). prometheus_client writes a counter's family as NAME_total
#: and its creation times as a gauge family of their own.
_SAMPLE_SUFFIXES = {
    "histogram": ("_bucket", "_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum"),
}


class LayoutFamily(NamedTuple):
    """One family of a page's layout."""

    name: str
    type: str
    help: str | None
    #: The page's blocks that hold its samples.
    blocks: list[int]
    #: How each of its relabelled sample lines may start: its sample names, each with
    #: the ``{`` that every relabelled sample has after its name.
    starts: tuple[str, ...]
    #: The same, each after a newline: what to count in a text of such lines.
    line_starts: tuple[str, ...]


class BlockLayout:
    """A page cut at its ``# HELP``/``# TYPE`` lines into blocks: which family each belongs to.

    Made from the metadata lines (``heads``, without their ``# ``) and the
    blocks' samples of the page it is first made for. ``families``: in page
    order, or None when a line is neither HELP nor TYPE; ``bare``: the blocks
    that held samples without labels. Pages with equal ``key``s have the same
    layout, so their blocks line up.
    """

    def __init__(self, heads: list[str], samples: list[str]):
        self.heads = heads
        self.key = tuple(heads)
        found: dict[str, list[Any]] = {}
        self.families: list[LayoutFamily] | None = None
        self.bare: list[int] = []
        for index, head in enumerate(heads):
            kind, _, rest = head.partition(" ")
            name, _, value = rest.partition(" ")
            if kind not in ("HELP", "TYPE") or not name:
                return
            family = found.setdefault(name, ["untyped", None, []])
            if kind == "HELP":
                family[1] = value
            else:
                family[0] = value.strip() or "untyped"
            family[2].append(index)
        self.families = []
        for name, (kind, help_text, blocks) in found.items():
            starts = tuple(f"{name}{suffix}{{" for suffix in _SAMPLE_SUFFIXES.get(kind, ("",)))
            self.families.append(LayoutFamily(name, kind, help_text, blocks, starts,
                                              tuple("\n" + start for start in starts)))
        self.bare = [i for i, rest in enumerate(samples) if rest and any("{" not in line for line in rest.split("\n"))]


@dataclass(frozen=True)
class RelabelledPage:
    """One worker's page with its labels added.

    Cut into blocks (``layout``, and ``samples``: each block's sample lines,
    joined by newlines, without a final one), or, for a page that could not
    be relabelled whole, split into families line by line (``line_families``).
    """

    worker: str
    labels: str
    #: The page as fetched: merging splits it again line by line should a block hold
    #: samples of another family.
    text: str
    layout: BlockLayout | None = None
    samples: list[str] = field(default_factory=list)
    #: How many sample lines ``samples`` holds.
    lines: int = 0
    line_families: list[Family] = field(default_factory=list)
    #: Why the page is not federated (``validate``'s reasons), or None.
    dropped: str | None = None

    def families(self) -> list[Family]:
        """The page's families."""
        if self.layout is None or self.layout.families is None:
            return self.line_families
        found = []
        for family in self.layout.families:
            chunks = [self.samples[i] + "\n" for i in family.blocks if self.samples[i]]
            found.append(Family(family.name, family.type, family.help, chunks))
        return found

    def by_line(self) -> list[Family]:
        """The page's families, split and relabelled line by line."""
        return self.line_families if self.layout is None else page_by_line(self.text, self.labels)


class PageRelabeler:
    """Relabels one worker's pages, keeping what it learnt from the last one.

    The layout of a page's blocks is worked out again only when its HELP and
    TYPE lines change, and an unchanged page (an idle server's) is not
    relabelled at all. Otherwise the whole page is relabelled in C: one
    ``str.replace`` gives every label set the worker's labels (``"} `` ends a
    label set when no value holds an escaped quote), and only the samples
    without labels, in the blocks the layout knows to have them, are done one
    by one. Counts then check that each sample got the labels exactly once;
    a page where that fails, or that ``_NOT_PLAIN`` rules out, is relabelled
    line by line. That each sample sits under its own family is checked when
    pages are merged, a whole family at a time (``merge.py``).
    """

    def __init__(self, service: str, worker: str):
        self.service = service
        self.worker = worker
        self.labels = f'service="{label_value(service)}",worker="{label_value(worker)}"'
        self._labelled = f'",{self.labels}}} '
        self._layout: BlockLayout | None = None
        self._last: RelabelledPage | None = None
        self._last_fetched: str | None = None

    def split(self, text: str) -> RelabelledPage:
        """The page, masked, checked and relabelled (CPU work: under a millisecond for a
        vLLM page here); a page that fails the check comes back ``dropped``, without samples."""
        if self._last is not None and text == self._last_fetched:
            return self._last
        self._last_fetched = text
        text = masker.mask_secrets(text)
        problem = page_problem(text)
        if problem is not None:
            self._layout = None
            self._last = RelabelledPage(self.worker, self.labels, text, dropped=problem)
            return self._last
        page = self._relabel_whole(text)
        if page is None:
            self._layout = None
            page = RelabelledPage(self.worker, self.labels, text, line_families=page_by_line(text, self.labels))
        self._last = page
        return page

    def _relabel_whole(self, text: str) -> RelabelledPage | None:
        page = "\n" + text.strip("\n")
        if any(pattern in page for pattern in _NOT_PLAIN) or ("\\" in page and '\\"' in page):
            return None
        relabelled = page.replace('"} ', self._labelled)
        blocks = relabelled.split("\n# ")
        if blocks[0] or len(blocks) < 2:
            return None  # samples before any HELP or TYPE line, or no metadata at all
        cut = [block.partition("\n") for block in blocks[1:]]
        heads = [head for head, _, _ in cut]
        samples = [rest for _, _, rest in cut]
        layout = self._layout
        if layout is None or heads != layout.heads:
            if self.labels in "\n".join(heads):
                return None  # a help text held '"} ' and was relabelled
            layout = BlockLayout(heads, samples)
            if layout.families is None:
                return None  # a comment that is neither HELP nor TYPE
            self._layout = layout
        labelled = relabelled.count(self.labels)
        for i in layout.bare:
            samples[i], done = _label_bare_lines(samples[i], self.labels)
            labelled += done
        if labelled != page.count("\n") - len(cut):
            return None  # an empty label set, a blank line, or samples without labels in a new block
        return RelabelledPage(self.worker, self.labels, text, layout, samples, labelled)


def label_value(value: str) -> str:
    """``value`` escaped for a label value in the text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_bare_lines(samples: str, labels: str) -> tuple[str, int]:
    """Give the lines of ``samples`` that have no labels (``name 1``) the ``labels``;
    the new text, and how many lines got them (a blank line gets none)."""
    lines = samples.split("\n")
    done = 0
    for i, line in enumerate(lines):
        if line and "{" not in line:
            lines[i] = relabel_line(line, labels)[1]
            done += 1
    return "\n".join(lines), done


def relabel_line(line: str, labels: str) -> tuple[str, str]:
    """``name{a="b"} 1`` -> (``name``, ``name{service="s",worker="w",a="b"} 1``)."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = line[brace + 1:]
        if ("service" in rest or "worker" in rest) and _CLASH.search(line, brace):
            rest = _exported(rest)
        joiner = "" if rest.startswith("}") else ","
        return line[:brace], f"{line[:brace]}{{{labels}{joiner}{rest}"
    name = line[:space] if space != -1 else line
    return name, f"{name}{{{labels}}}{line[len(name):]}"


def _exported(rest: str) -> str:
    """A validated line after its ``{``, with its own ``service`` and ``worker`` labels
    renamed as Prometheus does: ``exported_service``, or ``exported_exported_service``
    when that is taken too, so that no label name is given twice."""
    labels = []
    end = 0
    for match in _LABEL.finditer(rest):
        if rest[end:match.start()] not in ("", ","):
            break  # past the label set (a value after it cannot hold a label)
        labels.append((match.group(1), match.group(2)))
        end = match.end()
    taken = {name for name, _ in labels}
    renamed = []
    for name, value in labels:
        if name in ("service", "worker"):
            while name in taken:
                name = "exported_" + name
            taken.add(name)
        renamed.append(f"{name}={value}")
    return ",".join(renamed) + rest[end:].removeprefix(",")


def page_by_line(text: str, labels: str) -> list[Family]:
    """Split and relabel any page in the text format, one line at a time."""
    page: dict[str, Family] = {}
    lines: dict[str, list[str]] = {}
    current: Family | None = None
    for line in text.split("\n"):
        line = line.rstrip()
        if not line:
            continue
        if line[0] == "#":
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue
            name = parts[2]
            current = page.get(name)
            if current is None:
                current = page[name] = Family(name)
                lines[name] = []
            if parts[1] == "HELP":
                current.help = parts[3] if len(parts) > 3 else ""
            else:
                current.type = parts[3].strip() if len(parts) > 3 else "untyped"
            continue
        name, relabelled = relabel_line(line, labels)
        if current is None or not current.owns(name):
            current = page.get(name)
            if current is None:
                current = page[name] = Family(name)
                lines[name] = []
        lines[current.name].append(relabelled + "\n")
    for name, family in page.items():
        if lines[name]:
            family.chunks.append("".join(lines[name]))
    return list(page.values())


