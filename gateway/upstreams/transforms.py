"""Stream transforms a dialect can return from `Upstream.stream_transform`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

# The end of an SSE event: a line ending followed by an empty line. A line ends in
# CRLF, LF or a lone CR (the SSE spec); a CR followed by LF is one ending, not two.
_EVENT_END: Final = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")


class DropEvents:
    """Passes an SSE stream on byte for byte, except whole events for which
    ``drop(event_bytes)`` is true (e.g. a usage chunk the dialect asked for and
    the client did not). Holds back at most the one event still incomplete.

    ``may_drop``, when given, is a cheap test of a run of complete events: when
    it says no event in the run can be dropped, the run is passed on as it is,
    unsplit. With it, a chunk that ends at an event boundary and holds nothing to
    drop - nearly every chunk - costs one test and no copy.
    """

    __slots__ = ("_drop", "_held", "_may_drop")

    def __init__(
        self, drop: Callable[[bytes], bool], *, may_drop: Callable[[bytes], bool] | None = None
    ) -> None:
        self._drop = drop
        self._may_drop = may_drop
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        if data.endswith((b"\n\n", b"\r\n\r\n")):
            complete, self._held = data, b""
        else:
            ends = [match.end() for match in _EVENT_END.finditer(data)]
            if data.endswith(b"\r"):
                # A CR at the very end may be half of a CRLF: not yet a boundary.
                ends = [end for end in ends if end < len(data)]
            cut = ends[-1] if ends else 0
            complete, self._held = data[:cut], data[cut:]
        if not complete or (self._may_drop is not None and not self._may_drop(complete)):
            return complete
        kept: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(complete):
            event = complete[start : match.end()]
            if not self._drop(event):
                kept.append(event)
            start = match.end()
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self._held = self._held, b""
        return b"" if rest and self._drop(rest) else rest
