"""DropEvents (the OpenAI dialect's usage-chunk filter) holds a long incomplete event
in linear time, and still cuts events exactly where a search of all the data would."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstreams import transforms
from gateway.upstreams.openai_wire import has_usage_mark, is_usage_only, usage_marks
from gateway.upstreams.transforms import DropEvents
from tests.drawing import Shape, chunked

_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")


class Reference:
    """DropEvents as it was before (gateway/upstreams/transforms.py at 6083e21):
    the held bytes and the chunk joined and searched whole on every chunk
    (quadratic for a long event); but what follows the last event end of what
    it passes on is kept, and the line ends a dropped event begins with (the
    last of an odd run: a blank line, no event's), as DropEvents keeps them now."""

    def __init__(self, drop: Callable[[bytes], bool]) -> None:
        self._drop = drop
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        if data.endswith((b"\n\n", b"\r\n\r\n")):
            complete, self._held = data, b""
        else:
            ends = [m.end() for m in _EVENT_END.finditer(data)]
            if data.endswith(b"\r"):
                ends = [end for end in ends if end < len(data)]
            cut = ends[-1] if ends else 0
            complete, self._held = data[:cut], data[cut:]
        kept, start = [], 0
        for match in _EVENT_END.finditer(complete):
            event = complete[start : match.end()]
            kept.append(_leading_line_ends(event) if self._drop(event) else event)
            start = match.end()
        kept.append(complete[start:])  # (since the review of 03b9278: it was left out)
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self._held = self._held, b""
        return _leading_line_ends(rest) if rest and self._drop(rest) else rest


def _leading_line_ends(event: bytes) -> bytes:
    """The blank lines a dropped event begins with, kept (since the review of
    30d753c: they were dropped with it, or not, by where the reads ended)."""
    return event[: len(event) - len(event.lstrip(b"\r\n"))]


def drop_usage(event: bytes) -> bool:
    return b"usage" in event


_ENDINGS = [b"\n", b"\r\n", b"\r"]
_LINES = [b"data: a", b"data: usage", b": ping", b"event: x", b"", b"data:"]


@st.composite
def streams(draw: st.DrawFn, endings: list[bytes] = _ENDINGS) -> bytes:
    # Up to 30 lines, each a line and an ending, read from drawn bytes.
    shape = Shape(draw)
    lines = (shape.pick(_LINES) + shape.pick(endings) for _ in range(shape.below(31)))
    return b"".join(lines)


def _compare(stream: bytes, data: st.DataObject) -> None:
    chunks = chunked(data.draw, stream)
    ours, reference = DropEvents(drop_usage), Reference(drop_usage)
    got = [ours.feed(c) for c in chunks] + [ours.flush()]
    want = [reference.feed(c) for c in chunks] + [reference.flush()]
    assert got == want


@settings(max_examples=500, deadline=None)
@given(streams(), st.data())
def test_any_chunking_cuts_and_drops_as_a_whole_search_would(
    stream: bytes, data: st.DataObject
) -> None:
    _compare(stream, data)


@settings(max_examples=500, deadline=None)
@given(streams([b"\n"]), st.data())
def test_streams_of_line_feeds_alone_are_cut_as_a_whole_search_would(
    stream: bytes, data: st.DataObject
) -> None:
    # The usual stream (OpenAI's): its events are cut without the pattern.
    _compare(stream, data)


def _kept_by_search(complete: bytes) -> bytes:
    """What DropEvents kept of a run of complete events before it cut them with
    split (the pattern's search), and what follows the last event end as it is."""
    kept, start = [], 0
    for match in _EVENT_END.finditer(complete):
        event = complete[start : match.end()]
        kept.append(_leading_line_ends(event) if drop_usage(event) else event)
        start = match.end()
    kept.append(complete[start:])
    return b"".join(kept)


_RUN_PIECES = [b"\n", b"\r", b"data: a", b"usage", b"\n\n"]


@st.composite
def _runs(draw: st.DrawFn) -> bytes:
    shape = Shape(draw)
    return b"".join(shape.pick(_RUN_PIECES) for _ in range(shape.below(21)))


@settings(max_examples=1000, deadline=None)
@given(_runs())
def test_a_run_of_events_keeps_what_a_whole_search_kept(complete: bytes) -> None:
    assert DropEvents(drop_usage)._kept(complete) == _kept_by_search(complete)


@pytest.mark.parametrize(
    "chunk",
    [
        b"data: a\n\n\n",  # an odd run of line ends: the last one is no event's
        b"data: a\n\n\n\n\ndata: usage\n\n",
        b"data: usage\n\n\n\ndata: b\n\n\n",
        b"data: a\r\n\r\ndata: usage\n\n",
    ],
)
def test_runs_of_line_ends_are_cut_as_a_whole_search_would(chunk: bytes) -> None:
    assert DropEvents(drop_usage)._kept(chunk) == _kept_by_search(chunk)
    ours, reference = DropEvents(drop_usage), Reference(drop_usage)
    assert [ours.feed(chunk), ours.flush()] == [reference.feed(chunk), reference.flush()]


class _CountingPattern:
    """`transforms._EVENT_END` with the bytes each search is given counted."""

    def __init__(self) -> None:
        self.searched = 0

    def finditer(self, data: bytes) -> Iterator[re.Match[bytes]]:
        self.searched += len(data)
        return _EVENT_END.finditer(data)


def test_a_long_incomplete_event_costs_linear_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 MB in 4 KB chunks: searching all the held bytes for every chunk took 45 s.
    # Counted, not timed: each chunk is searched with at most the 4 bytes held
    # before it, and held as it came, not copied into a growing buffer.
    pattern = _CountingPattern()
    monkeypatch.setattr(transforms, "_EVENT_END", pattern)
    transform = DropEvents(drop_usage)
    chunks = [b"a" * 4096 for _ in range(8 * 1024 * 1024 // 4096)]
    assert transform.feed(b"data: ") == b""
    for chunk in chunks:
        assert transform.feed(chunk) == b""
    assert all(held is chunk for held, chunk in zip(transform._held[1:], chunks, strict=True))
    assert pattern.searched <= sum(len(chunk) + 4 for chunk in chunks) + len(b"data: ")
    out = transform.feed(b"\n\ndata: b\n\n")
    assert out == b"data: " + b"a" * (8 * 1024 * 1024) + b"\n\ndata: b\n\n"


# The OpenAI dialect's filter: the events that hold a usage object are found by
# its marks (`usage_marks`), and only they are cut out and tested. It must keep
# and drop what the filter does when it tests every event (no marks), with any
# line ends, any chunking.
_USAGE_LINES = [
    b"data: a",
    b'data: {"usage":null}',
    b'data: {"usage":{}}',
    b'data: {"usage" : {}, "keep"}',
    b'data: "usage":{"usage":{',
    b": ping",
    b"",
]
_USAGE_ENDS = [b"\n", b"\n", b"\n\n", b"\r\n", b"\r"]


def _drop_usage_object(event: bytes) -> bool:
    return has_usage_mark(event) and b"keep" not in event


@st.composite
def _usage_streams(draw: st.DrawFn) -> bytes:
    shape = Shape(draw)
    lines = (shape.pick(_USAGE_LINES) + shape.pick(_USAGE_ENDS) for _ in range(shape.below(17)))
    return b"".join(lines)


@settings(max_examples=500, deadline=None)
@given(_usage_streams(), st.data())
def test_marked_events_are_dropped_as_when_every_event_was_tested(
    stream: bytes, data: st.DataObject
) -> None:
    chunks = chunked(data.draw, stream)
    ours = DropEvents(_drop_usage_object, marks=usage_marks)
    reference = DropEvents(_drop_usage_object)
    got = [ours.feed(c) for c in chunks] + [ours.flush()]
    want = [reference.feed(c) for c in chunks] + [reference.flush()]
    assert got == want


@pytest.mark.parametrize(
    "chunk",
    [
        b'data: a\n\ndata: {"usage":{}}\n\ndata: b\n\n',
        b'data: {"usage":{}}\n\n',  # the first event
        b'data: {"usage":{}, "keep"}\n\ndata: {"usage":{}}\n\n',  # one kept, one not
        b'data: {"usage":{}}\ndata: "usage":{\n\ndata: b\n\n',  # two marks, one event
        b'data: a\n\n\ndata: {"usage":{}}\n\n',  # an odd run of line feeds before it
        b'data: a\n\n\n\ndata: {"usage":{}}\n\n',
        b'data: {"usage":{}}\n\ndata: a\n\n\n',  # and at the end
        b'data: a\r\n\r\ndata: {"usage":{}}\n\n',
        b'data: {"usage":{}}\n\ndata: a',  # an event begun after the last end
    ],
)
def test_marked_events_examples(chunk: bytes) -> None:
    ours = DropEvents(_drop_usage_object, marks=usage_marks)
    reference = DropEvents(_drop_usage_object)
    assert [ours.feed(chunk), ours.flush()] == [reference.feed(chunk), reference.flush()]
    assert ours._kept_at(chunk, usage_marks(chunk)) == reference._kept(chunk)


@pytest.mark.parametrize(
    "chunk",
    [
        # A read ending in an odd run of line ends (a blank line after an event)
        # that holds a usage object, so its events are cut and tested: the last
        # "\n" was neither forwarded nor held (review of 03b9278).
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}\n\n\n',
        b'data: {"choices":[],"usage":{}}\n\ndata: {"a":1}\n\n\n',
        b'data: {"choices":[{"delta":{}}],"usage":{"x":1}}\r\n\r\n\n',
    ],
)
@pytest.mark.parametrize("how", ["marks", "every-event"])
def test_no_byte_after_the_last_event_is_lost(chunk: bytes, how: str) -> None:
    drop = (
        DropEvents(is_usage_only, marks=usage_marks)
        if how == "marks"
        else DropEvents(is_usage_only)
    )
    out = drop.feed(chunk) + drop.flush()
    assert out == chunk.replace(b'data: {"choices":[],"usage":{}}\n\n', b"")
