"""The stream meter with its remembered chunk start, and the usage filter with
its marks, agree with the meter without it and the filter that tests every
event, on realistic OpenAI streams (chunks encoded by orjson and json.dumps:
role, content with escapes and key names, tool calls, reasoning, refusal,
several choices, usage null, an object or first, the final usage-only chunk,
errors) cut anywhere. From the review of the fast paths, which ran them at
20,000 examples; they widen test_openai_scan.py's and test_transforms.py's
generators. 200 examples a run here: hypothesis varies them from run to run."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import ServerSentEvent
from gateway.upstreams.openai_wire import (
    ChatStreamMeter,
    is_usage_only,
    usage_marks,
)
from gateway.upstreams.transforms import DropEvents
from tests.drawing import Shape, chunked
from tests.upstreams.test_openai_scan import _state, _Unremembered

_TEXT_PIECES = [
    '"usage":{', '"choices":[]', "\\", '"', '\\"', "\n", '"content":"', "é", "\u2028", "a b"
]  # fmt: skip
_USAGES: list[Any] = [
    None,
    "absent",
    {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12},
    {},
]
_KINDS = ["content"] * 6 + ["role", "tool", "reasoning", "refusal", "final", "error", "multi"]


def _text(shape: Shape) -> str:
    """Up to 6 pieces: of `_TEXT_PIECES`, or up to 4 characters."""
    pieces = []
    for _ in range(shape.below(7)):
        if shape.flag():
            pieces.append(shape.chars(shape.below(5)))
        else:
            pieces.append(shape.pick(_TEXT_PIECES))
    return "".join(pieces)


def _dump(obj: dict[str, Any], how: int) -> str:
    if how == 0:
        return orjson.dumps(obj).decode()
    if how == 1:
        return json.dumps(obj)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _chunk(shape: Shape, envelope: dict[str, Any]) -> str:
    kind, usage, text = shape.pick(_KINDS), shape.pick(_USAGES), _text(shape)
    obj: dict[str, Any] = dict(envelope)
    delta: dict[str, Any]
    if kind == "final":
        obj["choices"] = []
        usage = {
            "prompt_tokens": 3,
            "completion_tokens": shape.below(100),
            "total_tokens": 5,
        }
    elif kind == "error":
        obj, usage = {"error": {"message": text, "code": "x"}}, "absent"
    else:
        if kind in ("content", "multi"):
            delta = {"content": text}
        elif kind == "role":
            delta = {"role": "assistant", "content": text}
        elif kind == "tool":
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        elif kind == "reasoning":
            delta = {shape.pick(["reasoning", "reasoning_content"]): text, "content": None}
        else:
            delta = {"refusal": text}
        count = 2 if kind == "multi" else 1
        obj["choices"] = [{"index": i, "delta": delta} for i in range(count)]
    if usage != "absent":
        obj["usage"] = usage
    return _dump(obj, shape.below(3))


@st.composite
def _streams(draw: st.DrawFn) -> list[str]:
    # Read from drawn bytes and characters (tests/drawing.py).
    shape = Shape(draw)
    envelope = {
        "id": shape.pick(["chatcmpl-1", 'c\\"x', "x"]),
        "object": "chat.completion.chunk",
        "created": 1,
        "model": _text(shape),
    }
    return [_chunk(shape, envelope) for _ in range(1 + shape.below(14))]


@settings(max_examples=200, deadline=None)
@given(_streams())
def test_realistic_streams_are_metered_as_without_the_memo(chunks: list[str]) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    ours, reference = ChatStreamMeter(body), _Unremembered(body)
    for data in chunks:
        event = ServerSentEvent("message", data)
        ours.feed(event)
        reference.feed(event)
        assert _state(ours) == _state(reference), data
    assert ours.finish(cut=True) == reference.finish(cut=True)
    assert ours.finish(cut=False) == reference.finish(cut=False)


_SEPARATORS = [b"\n\n", b"\n\n", b"\n\n\n", b"\r\n\r\n", b"\r\r", b"\n\n: c\n\n"]


@st.composite
def _separators(draw: st.DrawFn) -> list[bytes]:
    shape = Shape(draw)
    return [shape.pick(_SEPARATORS) for _ in range(14)]


@settings(max_examples=200, deadline=None)
@given(_streams(), _separators(), st.data())
def test_marked_filter_forwards_what_testing_every_event_forwards(
    chunks: list[str], separators: list[bytes], data: st.DataObject
) -> None:
    raw = b"".join(
        b"data: " + chunk.encode().replace(b"\n", b"\ndata: ") + sep
        for chunk, sep in zip(chunks, separators, strict=False)
    )
    ours = DropEvents(is_usage_only, marks=usage_marks)
    reference = DropEvents(is_usage_only)
    for piece in chunked(data.draw, raw):
        assert ours.feed(piece) == reference.feed(piece)  # per read: no coalescing, no delay
    assert ours.flush() == reference.flush()
