"""The OpenAI usage chunk hidden from a client that did not ask for it
(`DropEvents` with `usage_marks` / `is_usage_only`) and read by `ChatStreamMeter`,
however an upstream writes and splits its stream, against a reference that reads
the stream as the SSE spec does (lines ended by CRLF, LF or CR; an event is the
lines from its first to the blank line that dispatches it; a blank line with no
pending lines belongs to no event), parses each event's data with `json`, and
decides: an event whose data is an object with ``choices == []`` and a usage
object is hidden, every other byte is forwarded; the meter charges the last usage
object reported, and estimates only when none came. (From a review of the
streamed path; the examples at the end failed before its findings were fixed.)
A BOM before a usage-only first event is not covered: the usage chunk ends a
stream, and a BOM can only precede its first event.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sse import SSEDecoder
from gateway.upstreams.openai_wire import (
    ChatStreamMeter,
    is_usage_only,
    usage_from,
    usage_marks,
)
from gateway.upstreams.transforms import DropEvents
from tests.drawing import Shape, chunked

_BOM = b"\xef\xbb\xbf"


# --- the reference -----------------------------------------------------------------------


def _lines(stream: bytes) -> list[tuple[int, int, int]]:
    """(start, end of text, end with its line end) of each line, per the SSE spec;
    a last line with no end runs to the end of the stream."""
    out = []
    pos = 3 if stream.startswith(_BOM) else 0
    size = len(stream)
    while pos < size:
        cr, lf = stream.find(b"\r", pos), stream.find(b"\n", pos)
        ends = [i for i in (cr, lf) if i >= 0]
        if not ends:
            out.append((pos, size, size))
            break
        end = min(ends)
        after = end + 2 if stream[end : end + 2] == b"\r\n" else end + 1
        out.append((pos, end, after))
        pos = after
    return out


def _events(stream: bytes) -> list[tuple[int, int, str | None]]:
    """(start, end, data or None when the block has no data field) of each block."""
    events = []
    start: int | None = None
    data: list[str] = []
    has_data = False
    for begin, text_end, after in _lines(stream):
        line = stream[begin:text_end]
        if not line:
            if start is not None:
                events.append((start, after, "\n".join(data) if has_data else None))
            start, data, has_data = None, [], False
            continue
        if start is None:
            start = begin
        if line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            has_data = True
            data.append(value.decode("utf-8", "replace"))
    if start is not None:  # the gateway's decoder dispatches an unended last block
        events.append((start, len(stream), "\n".join(data) if has_data else None))
    return events


def _parsed(data: str | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _usage_only(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def expected_output(stream: bytes) -> bytes:
    kept, pos = [], 0
    for start, end, data in _events(stream):
        if _usage_only(_parsed(data)):
            kept.append(stream[pos:start])
            pos = end
    kept.append(stream[pos:])
    return b"".join(kept)


def expected_usage(stream: bytes) -> Any:
    usage = None
    for _, _, data in _events(stream):
        obj = _parsed(data)
        if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
            usage = usage_from(obj["usage"])
    return usage


# --- the code under review ---------------------------------------------------------------


def filtered(chunks: list[bytes]) -> bytes:
    drop = DropEvents(is_usage_only, marks=usage_marks)
    return b"".join(drop.feed(chunk) for chunk in chunks) + drop.flush()


def metered(chunks: list[bytes]) -> Any:
    meter = ChatStreamMeter({"messages": [{"role": "user", "content": "hello"}]})
    decoder = SSEDecoder()
    for chunk in chunks:
        for event in decoder.feed(chunk):
            meter.feed(event)
    for event in decoder.flush():
        meter.feed(event)
    return meter.finish(cut=False).usage


# --- generated streams -------------------------------------------------------------------

_TEXTS = [
    "hi",
    "usage",
    '"usage":{',
    '"usage":null',
    "\\",
    '\\"usage\\":{}',
    "\\u0075sage",
    "é",
    "\u2028",
    '"choices":[]',
    "",
]
_USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


class _Writer:
    """JSON text written as an unusual upstream may write it: keys and strings with
    letters escaped, whitespace between tokens, and the places between tokens where
    a data line may end (a line end inside a string would break the JSON)."""

    def __init__(self, rng: random.Random, escapes: float, spaces: float) -> None:
        self.rng = rng
        self.escapes = escapes
        self.spaces = spaces
        self.parts: list[str] = []  # tokens; a data line may end between any two

    def string(self, text: str) -> None:
        out = ['"']
        for ch in text:
            roll = self.rng.random()
            if ch in '"\\' or ord(ch) < 32:
                out.append(json.dumps(ch)[1:-1])
            elif roll < self.escapes and ord(ch) < 128:
                code = f"{ord(ch):04x}"
                out.append("\\u" + (code.upper() if self.rng.random() < 0.3 else code))
            else:
                out.append(ch)
        out.append('"')
        self.parts.append("".join(out))

    def value(self, value: Any) -> None:
        if isinstance(value, dict):
            self.parts.append("{")
            for i, (key, item) in enumerate(value.items()):
                if i:
                    self.parts.append(",")
                self.string(key)
                spaced = self.rng.random() < self.spaces
                self.parts.append(self.rng.choice([" :", ": ", " : "]) if spaced else ":")
                self.value(item)
            self.parts.append("}")
        elif isinstance(value, list):
            self.parts.append("[")
            for i, item in enumerate(value):
                if i:
                    self.parts.append(",")
                self.value(item)
            self.parts.append("]")
        elif isinstance(value, str):
            self.string(value)
        else:
            self.parts.append(json.dumps(value))

    def lines(self, split: float) -> list[str]:
        lines, line = [], ""
        for part in self.parts:
            line += part
            if self.rng.random() < split:
                lines.append(line)
                line = ""
        lines.append(line)
        return lines


def _object(rng: random.Random, kind: str) -> dict[str, Any]:
    text = rng.choice(_TEXTS)
    delta = {"content": text}
    if kind == "usage_only":
        obj: dict[str, Any] = {"id": "c", "choices": [], "usage": dict(_USAGE)}
    elif kind == "usage_first":
        obj = {"usage": dict(_USAGE), "id": "c", "choices": []}
    elif kind == "usage_null_empty":
        obj = {"id": "c", "choices": [], "usage": None}
    elif kind == "usage_with_text":
        obj = {"id": "c", "choices": [{"index": 0, "delta": delta}], "usage": dict(_USAGE)}
    elif kind == "usage_dup":
        # Serialised by hand below: a null "usage" member, then an object one.
        obj = {"id": "c", "choices": [], "usage": None, "usage2": dict(_USAGE)}
    elif kind == "usage_as_value":
        obj = {"id": "c", "choices": [], "type": "usage"}
    else:
        obj = {"id": "c", "choices": [{"index": 0, "delta": delta}], "usage": None}
        if rng.random() < 0.3:
            del obj["usage"]
    return obj


_KINDS = (
    ["text"] * 5
    + ["usage_only", "usage_first", "usage_null_empty", "usage_with_text", "usage_dup"]
    + ["usage_as_value", "comment", "done", "named"]
)
_ENDS = ["\n", "\n", "\r\n", "\r"]


@st.composite
def streams(draw: st.DrawFn, *, odd_blank_lines: bool = False) -> bytes:
    # The events, how they are written and where their JSON is split into lines
    # from drawn bytes; each line's prefix and ending from the seed
    # that writes the JSON.
    shape = Shape(draw)
    rng = random.Random(draw(st.integers(0, 2**32)))
    escapes = shape.pick([0.0, 0.0, 0.02, 0.3])
    spaces = shape.pick([0.0, 0.0, 0.3])
    kinds = [shape.pick(_KINDS) for _ in range(1 + shape.below(6))]
    ends = ["\n"] if not shape.flag() else _ENDS  # LF alone: the fast paths
    out = []
    for kind in kinds:
        end = shape.pick(ends)
        lines: list[str]
        if kind == "comment":
            lines = [": keep-alive"]
        elif kind == "done":
            lines = ["data: [DONE]"]
        else:
            writer = _Writer(rng, escapes, spaces)
            obj = _object(rng, kind)
            writer.value(obj)
            json_lines = writer.lines(shape.pick([0.0, 0.0, 0.1, 0.5]))
            if kind == "usage_dup":
                json_lines = [line.replace("usage2", "usage") for line in json_lines]
            lines = [rng.choice(["data: ", "data:"]) + line for line in json_lines]
            if kind == "named":
                lines = ["event: message", "id: 1", *lines]
        for line in lines:
            out.append(line + rng.choice(ends))
        out.append(end)  # the blank line
        if odd_blank_lines and shape.flag():
            out.append(shape.pick(ends))
    return "".join(out).encode()


# --- properties ---------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_generated_streams_are_filtered_and_metered_as_the_reference(
    stream: bytes, data: st.DataObject
) -> None:
    chunks = chunked(data.draw, stream)
    assert filtered(chunks) == expected_output(stream)
    want = expected_usage(stream)
    got = metered(chunks)
    if want is None:
        assert got is None or got.estimated  # nothing begun: nothing charged
    else:
        assert got == want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(odd_blank_lines=True), st.data())
def test_generated_streams_with_extra_blank_lines_are_metered_as_the_reference(
    stream: bytes, data: st.DataObject
) -> None:
    chunks = chunked(data.draw, stream)
    want = expected_usage(stream)
    got = metered(chunks)
    if want is None:
        assert got is None or got.estimated  # nothing begun: nothing charged
    else:
        assert got == want
    # Whatever the filter does with a blank line between events,
    # the client reads the same lines and the same events from it.
    _assert_same_to_a_client(filtered(chunks), expected_output(stream))


def _texts(stream: bytes) -> list[bytes]:
    return [stream[a:b] for a, b, _ in _lines(stream) if b > a]


def _assert_same_to_a_client(out: bytes, want: bytes) -> None:
    assert _texts(out) == _texts(want)
    assert [d for _, _, d in _events(out)] == [d for _, _, d in _events(want)]


_SOUP = [
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"data: ",
    b"data:",
    b": c",
    b"data",
    b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}',
    b'{"choices":[],"usage":',
    b'{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}',
    b'{"choices":[],"\\u0075sage":{}}',
    b'{"choices":[{"delta":{"content":"usage"}}],"usage":null}',
    b'{"choices":[],"usage":null}',
    b"[DONE]",
]


@st.composite
def _soups(draw: st.DrawFn) -> bytes:
    shape = Shape(draw)
    return b"".join(shape.pick(_SOUP) for _ in range(shape.below(15)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_soups(), st.data())
def test_any_soup_of_lines_reaches_the_client_as_the_reference(
    stream: bytes, data: st.DataObject
) -> None:
    chunks = chunked(data.draw, stream)
    _assert_same_to_a_client(filtered(chunks), expected_output(stream))
    want = expected_usage(stream)
    got = metered(chunks)
    if want is None:
        assert got is None or got.estimated
    else:
        assert got == want


# --- examples -----------------------------------------------------------

_TEXT_CHUNK = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
_USAGE_ONLY = (
    b'data: {"id":"c","choices":[],"usage":'
    b'{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
)


def _usage_only_with(id_json: bytes) -> bytes:
    return _USAGE_ONLY.replace(b'"id":"c"', b'"id":' + id_json)


@pytest.mark.parametrize(
    "usage_chunk",
    [
        pytest.param(_usage_only_with(b'"\xff"'), id="invalid-utf8-byte"),
        pytest.param(_usage_only_with(b'"\xe2\x82"'), id="truncated-utf8-char"),
    ],
)
def test_a_usage_chunk_with_invalid_utf8_is_hidden(usage_chunk: bytes) -> None:
    """The meter (its decoder replaces a bad byte) reads this usage, so
    the gateway itself holds it a usage chunk; the filter parses the raw bytes
    with orjson, which refuses them, and forwards the chunk to a client that did
    not ask for usage."""
    stream = _TEXT_CHUNK + usage_chunk + b"data: [DONE]\n\n"
    assert metered([stream]) == usage_from(dict(_USAGE))
    assert filtered([stream]) == _TEXT_CHUNK + b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    "usage_chunk",
    [
        pytest.param(_usage_only_with(b'"\\ud800"'), id="lone-surrogate-escape"),
        pytest.param(
            _USAGE_ONLY.replace(b'"total_tokens":7}', b'"total_tokens":7,"cost":NaN}'),
            id="NaN-member",
        ),
    ],
)
def test_a_usage_chunk_only_pythons_json_reads_is_hidden_and_read(usage_chunk: bytes) -> None:
    """Python's json (the OpenAI SDK's parser) reads these chunks as
    usage-only; orjson refuses them, so the chunk is forwarded to a client that did
    not ask for it, and the meter charges an estimate (malformed_usage) instead of
    the 3/4/7 tokens reported."""
    data = usage_chunk[len(b"data: ") : -2].decode()
    assert _usage_only(json.loads(data))
    stream = _TEXT_CHUNK + usage_chunk + b"data: [DONE]\n\n"
    assert filtered([stream]) == _TEXT_CHUNK + b"data: [DONE]\n\n"
    assert metered([stream]) == usage_from(dict(_USAGE))


@pytest.mark.parametrize(
    ("chunks", "want"),
    [
        # One read: an odd blank line before the usage chunk goes with it.
        ([_TEXT_CHUNK + b"\n" + _USAGE_ONLY], _TEXT_CHUNK + b"\n"),
        ([_TEXT_CHUNK + b"\r\n" + _USAGE_ONLY], _TEXT_CHUNK + b"\r\n"),
        ([_TEXT_CHUNK + b"\n\n\n" + _USAGE_ONLY], _TEXT_CHUNK + b"\n\n\n"),
        # Two reads: what the first read ends with decides what the second loses.
        ([_TEXT_CHUNK + b"\n", b"\n" + _USAGE_ONLY], _TEXT_CHUNK + b"\n\n"),
        ([_TEXT_CHUNK + b"\n", b"\r\n" + _USAGE_ONLY], _TEXT_CHUNK + b"\n\r\n"),
    ],
)
def test_a_blank_line_before_the_usage_chunk_is_forwarded(chunks: list[bytes], want: bytes) -> None:
    """A blank line between events (an odd run of line ends) is no
    part of the usage chunk, but is dropped with it; and how many bytes are
    dropped depends on where the upstream's reads end."""
    stream = b"".join(chunks)
    assert expected_output(stream) == want
    assert filtered(chunks) == want


def test_the_same_stream_is_filtered_alike_however_it_is_read() -> None:
    """As the invariant the filter's tests assume: one read, or two."""
    stream = _TEXT_CHUNK + b"\n\n" + _USAGE_ONLY
    whole = filtered([stream])
    for cut in range(len(stream) + 1):
        assert filtered([stream[:cut], stream[cut:]]) == whole, cut


# Cost (counted in parses, not timed): what no chunk of these upstreams should pay.


def _counting_parses(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    from gateway.upstreams import openai_wire

    parsed: list[object] = []
    real = openai_wire._loads

    def counting(data: Any) -> Any:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(openai_wire, "_loads", counting)
    return parsed


def _json_chunk(text: str, **dumps: Any) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        "usage": None,
    }
    return b"data: " + json.dumps(obj, **dumps).encode() + b"\n\n"


def test_a_null_usage_written_with_a_space_is_not_parsed_by_the_filter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """json.dumps' default separators write '"usage": null' in every
    chunk, a null all the same: no chunk of the stream is parsed by the filter."""
    parsed = _counting_parses(monkeypatch)
    chunk = _json_chunk("hello")
    assert b'"usage": null' in chunk
    assert filtered([chunk] * 20) == chunk * 20
    assert parsed == []


def test_latin1_text_escaped_by_json_dumps_stays_on_the_meters_hot_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """json.dumps (ensure_ascii) writes "é" as "\\u00e9", which is
    no escape of a letter of a key: the meter parses only the first chunk of a
    French or German answer, as it does any other."""
    first = _json_chunk("", separators=(",", ":"))
    chunk = _json_chunk("déjà vu", separators=(",", ":"))
    assert b"\\u00e9" in chunk
    parsed = _counting_parses(monkeypatch)
    metered([first] + [chunk] * 20)
    assert len(parsed) == 1  # the first chunk, for the model
