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
from tests.upstreams.test_openai_scan import _state, _Unremembered

_TEXT = st.lists(
    st.sampled_from(
        ['"usage":{', '"choices":[]', "\\", '"', '\\"', "\n", '"content":"', "é", "\u2028", "a b"]
    )
    | st.text(max_size=4),
    max_size=6,
).map("".join)
_USAGE: Any = st.sampled_from(
    [None, "absent", {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}, {}]
)
_KINDS = ["content"] * 6 + ["role", "tool", "reasoning", "refusal", "final", "error", "multi"]


def _dump(obj: dict[str, Any], how: int) -> str:
    if how == 0:
        return orjson.dumps(obj).decode()
    if how == 1:
        return json.dumps(obj)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@st.composite
def _chunk(draw: st.DrawFn, envelope: dict[str, Any]) -> str:
    kind, usage, text = draw(st.sampled_from(_KINDS)), draw(_USAGE), draw(_TEXT)
    obj: dict[str, Any] = dict(envelope)
    delta: dict[str, Any]
    if kind == "final":
        obj["choices"] = []
        usage = {
            "prompt_tokens": 3,
            "completion_tokens": draw(st.integers(0, 99)),
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
            delta = {
                draw(st.sampled_from(["reasoning", "reasoning_content"])): text,
                "content": None,
            }
        else:
            delta = {"refusal": text}
        count = 2 if kind == "multi" else 1
        obj["choices"] = [{"index": i, "delta": delta} for i in range(count)]
    if usage != "absent":
        obj["usage"] = usage
    return _dump(obj, draw(st.integers(0, 2)))


@st.composite
def _streams(draw: st.DrawFn) -> list[str]:
    envelope = {
        "id": draw(st.sampled_from(["chatcmpl-1", 'c\\"x', "x"])),
        "object": "chat.completion.chunk",
        "created": 1,
        "model": draw(_TEXT),
    }
    return draw(st.lists(_chunk(envelope), min_size=1, max_size=14))


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


_SEPARATORS = st.sampled_from([b"\n\n", b"\n\n", b"\n\n\n", b"\r\n\r\n", b"\r\r", b"\n\n: c\n\n"])


@settings(max_examples=200, deadline=None)
@given(_streams(), st.lists(_SEPARATORS, min_size=14, max_size=14), st.data())
def test_marked_filter_forwards_what_testing_every_event_forwards(
    chunks: list[str], separators: list[bytes], data: st.DataObject
) -> None:
    raw = b"".join(
        b"data: " + chunk.encode().replace(b"\n", b"\ndata: ") + sep
        for chunk, sep in zip(chunks, separators, strict=False)
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=5)))
    ours = DropEvents(is_usage_only, marks=usage_marks)
    reference = DropEvents(is_usage_only)
    start = 0
    for cut in [*cuts, len(raw)]:
        piece = raw[start:cut]
        start = cut
        assert ours.feed(piece) == reference.feed(piece)  # per read: no coalescing, no delay
    assert ours.flush() == reference.flush()
