"""Stream transforms a dialect can return from `Upstream.stream_transform`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

# The end of an SSE event: a line ending followed by an empty line, in any of the
# three line-ending forms the format allows.
_EVENT_END: Final = re.compile(rb"(?:\r\n|\r|\n)(?:\r\n|\r|\n)")


class DropEvents:
    """Passes an SSE stream on byte for byte, except whole events for which
    ``drop(event_bytes)`` is true (e.g. a usage chunk the dialect asked for and
    the client did not). Holds back at most the one event still incomplete."""

    __slots__ = ("_drop", "_held")

    def __init__(self, drop: Callable[[bytes], bool]) -> None:
        self._drop = drop
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        kept: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            event = data[start : match.end()]
            if not self._drop(event):
                kept.append(event)
            start = match.end()
        self._held = data[start:]
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self._held = self._held, b""
        return b"" if rest and self._drop(rest) else rest
