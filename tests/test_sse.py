from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import ServerSentEvent, SSEDecoder
from tests.drawing import Shape, chunked, utf8_characters

E = ServerSentEvent


def decode(chunks: list[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.flush()


def one_byte_chunks(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


_ENVELOPE = {"conversation_id": "c1", "message_id": "m1", "task_id": "t1"}
_USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_price": "0E-7"}
DIFY_BODIES = [
    {"event": "message", **_ENVELOPE, "answer": a} for a in ["Bonjour", " à", " vous", " 👋"]
]
DIFY_BODIES.append({"event": "message_end", **_ENVELOPE, "metadata": {"usage": _USAGE}})


def dify_stream() -> bytes:
    """A chat answer as older Dify builds send it: spaced JSON, `\\uXXXX`, pings."""
    events = [b"data: " + json.dumps(body).encode() + b"\n\n" for body in DIFY_BODIES]
    return b"event: ping\n\n" + b"".join(events[:2]) + b"event: ping\n\n" + b"".join(events[2:])


CASES: list[tuple[str, list[bytes], list[ServerSentEvent]]] = [
    ("lf", [b"data: a\n\ndata: b\n\n"], [E("message", "a"), E("message", "b")]),
    ("crlf", [b"data: a\r\n\r\ndata: b\r\n\r\n"], [E("message", "a"), E("message", "b")]),
    ("cr", [b"data: a\r\rdata: b\r\r"], [E("message", "a"), E("message", "b")]),
    ("mixed endings", [b"data: a\r\n\rdata: b\n\r\n"], [E("message", "a"), E("message", "b")]),
    # A spurious empty line from a split "\r\n" would cut this block in two.
    ("cr then lf across chunks", [b"data: a\r", b"\ndata: b\r", b"\n\r\n"], [E("message", "a\nb")]),
    (
        "cr chunk then lf chunk",
        [b"data: a\r\n\r", b"\n", b"data: b\r\n\r\n"],
        [E("message", "a"), E("message", "b")],
    ),
    (
        "cr then cr across chunks",
        [b"data: a\r", b"\rdata: b\r\r"],
        [E("message", "a"), E("message", "b")],
    ),
    ("line split mid field", [b"da", b"ta: hel", b"lo\n", b"\n"], [E("message", "hello")]),
    ("multi-line data", [b"data: a\ndata:\ndata:  b\n\n"], [E("message", "a\n\n b")]),
    ("no space after colon", [b"data:a\n\n"], [E("message", "a")]),
    ("only one space removed", [b"data:   a \n\n"], [E("message", "  a ")]),
    ("field without colon", [b"data\ndata\n\n"], [E("message", "\n")]),
    ("empty data line dispatches", [b"data:\n\n"], [E("message", "")]),
    ("comments ignored", [b": hello\n:\ndata: a\n: mid\n\n"], [E("message", "a")]),
    ("event field", [b"event: message_end\ndata: {}\n\n"], [E("message_end", "{}")]),
    (
        "event resets per block",
        [b"event: x\ndata: 1\n\ndata: 2\n\n"],
        [E("x", "1"), E("message", "2")],
    ),
    ("empty event is message", [b"event:\ndata: 1\n\n"], [E("message", "1")]),
    ("last event wins", [b"event: a\nevent: b\ndata: 1\n\n"], [E("b", "1")]),
    (
        "id persists",
        [b"id: 7\ndata: a\n\ndata: b\n\nid: 8\ndata: c\n\n"],
        [E("message", "a", "7"), E("message", "b", "7"), E("message", "c", "8")],
    ),
    (
        "empty id clears",
        [b"id: 7\ndata: a\n\nid\ndata: b\n\n"],
        [E("message", "a", "7"), E("message", "b")],
    ),
    ("id with nul ignored", [b"id: 1\n\nid: 2\x003\ndata: a\n\n"], [E("message", "a", "1")]),
    ("id set by a block without data", [b"id: 5\n\ndata: a\n\n"], [E("message", "a", "5")]),
    (
        "retry",
        [b"retry: 3000\ndata: a\n\ndata: b\n\n"],
        [E("message", "a", None, 3000), E("message", "b")],
    ),
    ("retry with sign ignored", [b"retry: -1\ndata: a\n\n"], [E("message", "a")]),
    ("retry with letters ignored", [b"retry: 10s\ndata: a\n\n"], [E("message", "a")]),
    ("retry non-ascii digits ignored", ["retry: ١٢\ndata: a\n\n".encode()], [E("message", "a")]),
    ("retry empty ignored", [b"retry:\ndata: a\n\n"], [E("message", "a")]),
    ("retry too long ignored", [b"retry: " + b"9" * 5000 + b"\ndata: a\n\n"], [E("message", "a")]),
    ("ping not dispatched", [b"event: ping\n\ndata: a\n\n"], [E("message", "a")]),
    ("blank lines alone", [b"\n\n\r\n\r"], []),
    ("unknown fields ignored", [b"foo: bar\nData: x\n data: y\ndata: a\n\n"], [E("message", "a")]),
    ("field names are exact", [b"event : x\ndata: a\n\n"], [E("message", "a")]),
    ("bom dropped", [b"\xef\xbb\xbfdata: a\n\n"], [E("message", "a")]),
    ("bom split across chunks", [b"\xef", b"\xbb", b"\xbfdata: a\n\n"], [E("message", "a")]),
    ("only one bom dropped", [b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n"], []),
    ("bom-like prefix kept", [b"\xef", b"data: a\n\n"], []),
    ("bom mid-stream kept", [b"data: a\n\n\xef\xbb\xbfdata: b\n\n"], [E("message", "a")]),
    ("utf-8 split", [b"data: \xc3", b"\xa9t\xe2\x82", b"\xac\n\n"], [E("message", "ét€")]),
    ("utf-8 split after a line", [b"data: a\ndata: \xc3", b"\xa9\n\n"], [E("message", "a\n\xe9")]),
    ("emoji one byte at a time", one_byte_chunks("data: 👋\n\n".encode()), [E("message", "👋")]),
    ("invalid utf-8 replaced", [b"data: a\xffb\xe2\x82\n\n"], [E("message", "a\ufffdb\ufffd")]),
    (
        "flush dispatches unterminated line",
        [b"data: a\n\ndata: b"],
        [E("message", "a"), E("message", "b")],
    ),
    (
        "flush dispatches without blank line",
        [b"event: message_end\ndata: {}\n"],
        [E("message_end", "{}")],
    ),
    ("flush after cr", [b"data: a\r"], [E("message", "a")]),
    ("flush drops dataless block", [b"event: ping\n"], []),
    ("flush of a comment", [b": bye"], []),
    ("empty stream", [], []),
    ("empty chunks", [b"", b"data: a\n", b"", b"\n", b""], [E("message", "a")]),
    ("dify stream", [dify_stream()], [E("message", json.dumps(b)) for b in DIFY_BODIES]),
]


@pytest.mark.parametrize(("chunks", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decode(chunks: list[bytes], expected: list[ServerSentEvent]) -> None:
    assert decode(chunks) == expected


@pytest.mark.parametrize(("chunks", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decode_one_byte_at_a_time(chunks: list[bytes], expected: list[ServerSentEvent]) -> None:
    assert decode(one_byte_chunks(b"".join(chunks))) == expected


def test_dify_stream_json() -> None:
    stream = dify_stream()
    assert b"\\u00e0" in stream and b"\\ud83d\\udc4b" in stream  # old-style escapes
    bodies = [json.loads(event.data) for event in decode([stream])]
    assert "".join(b["answer"] for b in bodies[:-1]) == "Bonjour à vous 👋"
    assert bodies[-1]["metadata"]["usage"]["total_price"] == "0E-7"


def test_events_returned_as_soon_as_complete() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\ndata: b\n\nda") == [E("message", "a"), E("message", "b")]
    # A final "\r" ends the line at once; the decoder need not wait to see if "\n" follows.
    assert decoder.feed(b"ta: c\r\r") == [E("message", "c")]
    assert decoder.feed(b"\ndata: d") == []
    assert decoder.flush() == [E("message", "d")]


def test_flush_resets() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef\xbb\xbfid: 1\nevent: x\nretry: 5\ndata: a") == []
    assert decoder.flush() == [E("x", "a", "1", 5)]
    # A fresh stream: no id, event or data carried over, and a BOM is dropped again.
    assert decoder.feed(b"\xef\xbb\xbfdata: b\n\n") == [E("message", "b")]
    assert decoder.flush() == []


# Hypothesis: random events, written with random line endings and cut at random
# places. The structure is read from one drawn byte string and the cuts cost two
# choices (tests/drawing.py); the values are drawn as text and integers.

_text = st.text(utf8_characters("\r\n\0"), max_size=12)
_id = _text | st.just("a\0b")
_retry = st.integers(0, 10**6).map(str) | st.just("1x")
_EVENT_NAMES = ["", "message", "message_end", "ping"]
_OPTIONAL = [("id", _id), ("retry", _retry), ("", _text), ("unknown", _text)]
_MAX_BLOCKS = 6


def _blocks(draw: st.DrawFn, shape: Shape) -> list[list[tuple[str, str]]]:
    """Blocks as (name, value) lines; name "" is a comment, "data" lines may be 0."""
    blocks = []
    for _ in range(shape.below(_MAX_BLOCKS + 1)):
        lines: list[tuple[str, str]] = []
        event = shape.pick(_EVENT_NAMES)
        if shape.flag():
            lines.append(("event", event))
        for name, values in _OPTIONAL:
            if shape.flag():
                lines.append((name, draw(values)))
        lines += [("data", draw(_text)) for _ in range(shape.below(4))]
        blocks.append(shape.shuffled(lines))
    return blocks


def _expected(blocks: list[list[tuple[str, str]]]) -> list[ServerSentEvent]:
    """The spec's dispatch rules restated over whole blocks, as an independent oracle."""
    events, last_id = [], None
    for block in blocks:
        event, data, retry = "", [], None
        for name, value in block:
            if name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                last_id = value or None
            elif name == "retry" and value.isdigit():
                retry = int(value)
            elif name == "data":
                data.append(value)
        if data:
            events.append(E(event or "message", "\n".join(data), last_id, retry))
    return events


@st.composite
def _streams(draw: st.DrawFn, *, endings: list[bytes]) -> tuple[bytes, list[ServerSentEvent]]:
    shape_ = Shape(draw)
    blocks = _blocks(draw, shape_)
    out = [b"\xef\xbb\xbf"] if shape_.flag() else []
    previous = b""
    lines: list[bytes] = []
    for block in blocks:
        lines += [(f"{n}: {v}" if n else f":{v}").encode() for n, v in block] + [b""]
    # Dify may close without the last blank line; flush still dispatches that event.
    if lines and shape_.flag():
        lines.pop()
    for line in lines:
        ending = shape_.pick(endings)
        if previous == b"\r" and not line and ending == b"\n":
            ending = b"\r\n"  # "\r" + "\n" would be one line end, not an empty line
        out += [line, ending]
        previous = ending
    return b"".join(out), _expected(blocks)


@settings(max_examples=200, deadline=None)
@given(st.data(), _streams(endings=[b"\n"]))
def test_any_chunking_gives_the_same_events(
    data: st.DataObject, case: tuple[bytes, list[ServerSentEvent]]
) -> None:
    stream, expected = case
    whole = decode([stream])
    assert whole == expected
    assert decode(chunked(data.draw, stream)) == whole
    assert decode(one_byte_chunks(stream)) == whole


@settings(max_examples=200, deadline=None)
@given(st.data(), _streams(endings=[b"\n", b"\r\n", b"\r"]))
def test_any_chunking_and_line_endings_give_the_same_events(
    data: st.DataObject, case: tuple[bytes, list[ServerSentEvent]]
) -> None:
    stream, expected = case
    whole = decode([stream])
    assert whole == expected
    assert decode(chunked(data.draw, stream)) == whole
    assert decode(one_byte_chunks(stream)) == whole


def test_one_event_chunks_keep_the_state_around_them() -> None:
    # Whole one-line events (the usual chunk) between lines that set state.
    chunks = [
        b"id: 7\n\n",
        b"data: a\n\n",
        b"event: ping\n",
        b"data: b\n\n",
        b"retry: 5\n",
        b"data:c\n\n",
        b"data: d\n\n",
        b"data: \xc3\n\n",
    ]
    expected = [
        ServerSentEvent("message", "a", id="7"),
        ServerSentEvent("ping", "b", id="7"),
        ServerSentEvent("message", "c", id="7", retry=5),
        ServerSentEvent("message", "d", id="7"),
        ServerSentEvent("message", "\ufffd", id="7"),
    ]
    decoder = SSEDecoder()
    assert [e for chunk in chunks for e in decoder.feed(chunk)] == expected
    byte_by_byte = SSEDecoder()
    joined = b"".join(chunks)
    events = [e for i in range(len(joined)) for e in byte_by_byte.feed(joined[i : i + 1])]
    assert events == expected


def test_chunks_of_several_one_line_events_read_as_the_general_path_reads_them() -> None:
    # Chunks of several whole events (what a read under load gives), and chunks
    # that look like them but are not only one-line blocks: each decoded as one
    # byte at a time decodes it (the general path, by which the other is checked).
    chunks = [
        b"data: a\n\ndata:b\n\ndata: \xc3\xa9\xc3\n\n",  # several one-line events
        b"data: c\n\n\ndata: d\n\n",  # an empty line between: a blank block
        b"data: e\ndata: f\n\ndata: g\n\n",  # a two-line event first
        b"event: ping\ndata: h\n\n",
        b"data: i\n\ndata: j\n",  # the last line not ended by a blank line
        b"\ndata: k\n\ndata: l\n\n",
        b"id: 9\n\n",
        b"data: m\n\ndata:\n\n",  # an empty data line is an event with empty data
        b"data: n\n\n:comment\n\n",
    ]
    byte_by_byte = SSEDecoder()
    joined = b"".join(chunks)
    expected = [e for i in range(len(joined)) for e in byte_by_byte.feed(joined[i : i + 1])]
    decoder = SSEDecoder()
    assert [e for chunk in chunks for e in decoder.feed(chunk)] == expected
    assert [e.data for e in expected] == [
        "a", "b", "\u00e9\ufffd", "c", "d", "e\nf", "g", "h", "i", "j", "k", "l", "m", "", "n"
    ]  # fmt: skip
    assert [e.id for e in expected][-3:] == ["9", "9", "9"]


_PREFIXES = [b"data: ", b"data: ", b"data: ", b"data:", b"data:  ", b"event: "]
_FIELD_LIKE = ["data: x", "data:", " data: ", "\u00e9data: "]
_RUN_ENDS = [b"\n\n", b"\n\n", b"\n\n", b"\n", b"\n\n\n"]
_run_text = st.text(utf8_characters("\r\n\0"), max_size=8)


@st.composite
def _runs(draw: st.DrawFn) -> list[tuple[bytes, str, bytes]]:
    shape_ = Shape(draw)
    lines = []
    for _ in range(1 + shape_.below(8)):
        prefix = shape_.pick(_PREFIXES)
        value = shape_.pick(_FIELD_LIKE) if shape_.flag() else draw(_run_text)
        lines.append((prefix, value, shape_.pick(_RUN_ENDS)))
    return lines


@settings(max_examples=300, deadline=None)
@given(st.data(), _runs())
def test_runs_of_data_events_in_any_chunks_give_the_events_of_the_general_path(
    data: st.DataObject, lines: list[tuple[bytes, str, bytes]]
) -> None:
    # Mostly one-line data events ("data: ", its space read as the prefix's),
    # some with no space or two, some not ended or ended twice, a few other
    # fields; values that hold "data:" too; cut anywhere, and cut at the line
    # ends (where the whole-events path reads them).
    pieces = [prefix + value.encode() + end for prefix, value, end in lines]
    stream = b"".join(pieces)
    byte_by_byte = decode(one_byte_chunks(stream))
    assert decode([stream]) == byte_by_byte
    assert decode(chunked(data.draw, stream)) == byte_by_byte
    by_events = [b"".join(group) for group in chunked(data.draw, pieces)]
    assert decode([c for c in by_events if c]) == byte_by_byte
