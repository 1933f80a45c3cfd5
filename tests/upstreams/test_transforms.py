"""DropEvents (the OpenAI dialect's usage-chunk filter) holds a long incomplete event
in linear time, and still cuts events exactly where a search of all the data would."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstreams.transforms import DropEvents

_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")


class Reference:
    """DropEvents as it was before (gateway/upstreams/transforms.py at 6083e21):
    the held bytes and the chunk joined and searched whole on every chunk
    (quadratic for a long event)."""

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
            if not self._drop(event):
                kept.append(event)
            start = match.end()
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self._held = self._held, b""
        return b"" if rest and self._drop(rest) else rest


def drop_usage(event: bytes) -> bool:
    return b"usage" in event


_ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])
_LINE = st.sampled_from([b"data: a", b"data: usage", b": ping", b"event: x", b"", b"data:"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.tuples(_LINE, _ENDINGS), max_size=30))
    return b"".join(line + end for line, end in parts)


@settings(max_examples=500, deadline=None)
@given(streams(), st.data())
def test_any_chunking_cuts_and_drops_as_a_whole_search_would(
    stream: bytes, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    ours, reference = DropEvents(drop_usage), Reference(drop_usage)
    got = b"".join(ours.feed(c) for c in chunks) + ours.flush()
    want = b"".join(reference.feed(c) for c in chunks) + reference.flush()
    assert got == want


def test_a_long_incomplete_event_costs_linear_time() -> None:
    # 8 MB in 4 KB chunks: searching all the held bytes for every chunk took 45 s.
    transform = DropEvents(drop_usage)
    began = time.perf_counter()
    assert transform.feed(b"data: ") == b""
    for _ in range(8 * 1024 * 1024 // 4096):
        assert transform.feed(b"a" * 4096) == b""
    out = transform.feed(b"\n\ndata: b\n\n")
    assert time.perf_counter() - began < 2.0
    assert out == b"data: " + b"a" * (8 * 1024 * 1024) + b"\n\ndata: b\n\n"
