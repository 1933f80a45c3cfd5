"""Stream transforms a dialect can return from `Upstream.stream_transform`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final

# The end of an SSE event: a line ending followed by an empty line. A line ends in
# CRLF, LF or a lone CR (the SSE spec); a CR followed by LF is one ending, not two.
_MAX_END: Final = 4  # the longest event end: "\r\n\r\n"
_EVENT_END: Final = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_CR: Final = 13  # b"\r" as a byte value: ``13 in data`` is a memchr
_LF: Final = 10


def _last_bytes(pieces: list[bytes]) -> bytes:
    """The last _MAX_END bytes of ``pieces`` (fewer if they hold fewer)."""
    tail = b""
    for piece in reversed(pieces):
        tail = piece[-_MAX_END:] + tail
        if len(tail) >= _MAX_END:
            return tail[-_MAX_END:]
    return tail


class DropEvents:
    """Passes an SSE stream on byte for byte, except whole events for which
    ``drop(event_bytes)`` is true (e.g. a usage chunk the dialect asked for and
    the client did not). Holds back at most the one event still incomplete.

    ``marks``, when given, finds in a run of complete events the places that may
    make one droppable: every event ``drop`` would drop holds one of them (none:
    nothing is dropped, and the run is passed on as it is, unsplit). Only the
    events that hold one are cut out and tested; the rest of the run is passed
    on as it is. With it, a chunk that ends at an event boundary and holds
    nothing to drop - nearly every chunk - costs one call and no copy.
    """

    __slots__ = ("_drop", "_held", "_held_len", "_marks")

    def __init__(
        self,
        drop: Callable[[bytes], bool],
        *,
        marks: Callable[[bytes], Sequence[int]] | None = None,
    ) -> None:
        self._drop = drop
        self._marks = marks
        # The incomplete event, in pieces: a long one is searched for its end only
        # where new bytes came (an end is at most 4 bytes, so the last 4 held bytes
        # and the chunk), and joined once, when it is complete: linear time.
        self._held: list[bytes] = []
        self._held_len = 0

    def feed(self, chunk: bytes) -> bytes:
        held = self._held
        if not held and chunk[-2:] == b"\n\n":
            # The usual chunk: whole events, nothing held before it (what the
            # general path below makes of it, without its copies and calls).
            if self._marks is not None:
                marks = self._marks(chunk)
                return self._kept_at(chunk, marks) if marks else chunk
            return self._kept(chunk)
        tail = _last_bytes(held)
        window = tail + chunk if tail else chunk
        if window.endswith((b"\n\n", b"\r\n\r\n")):
            cut = len(window)
        else:
            # No end lies wholly in the held bytes (they were cut after the last
            # one), so none starts before the window: searched from there, the
            # matches are those a search of all the data would find.
            ends = [match.end() for match in _EVENT_END.finditer(window)]
            if window.endswith(b"\r"):
                # A CR at the very end may be half of a CRLF: not yet a boundary.
                ends = [end for end in ends if end < len(window)]
            cut = ends[-1] if ends else 0
        if not cut:
            if chunk:
                held.append(chunk)
                self._held_len += len(chunk)
            return b""
        data = b"".join(held) + chunk if held else chunk
        cut += self._held_len - len(tail)
        complete, rest = data[:cut], data[cut:]
        self._held = [rest] if rest else []
        self._held_len = len(rest)
        if not complete:
            return complete
        if self._marks is not None:
            marks = self._marks(complete)
            return self._kept_at(complete, marks) if marks else complete
        return self._kept(complete)

    def _kept_at(self, complete: bytes, marks: Sequence[int]) -> bytes:
        """`_kept`, testing only the events that hold one of ``marks`` (ascending
        places in ``complete``, none at a line end). Where split would cut the
        events otherwise than the search below (a CR, an odd run of line feeds
        before a mark's event or at the end), `_kept` cuts them."""
        size = len(complete)
        if _CR in complete or complete[-2:] != b"\n\n" or complete[size - 3 : size - 2] == b"\n":
            return self._kept(complete)
        drop = self._drop
        pieces: list[bytes] = []
        start = 0  # what is not placed yet begins here
        tested = 0  # the end of the last event tested
        for at in marks:
            if at < tested:
                continue  # in the event just tested
            # The event around the mark: from the end of the line-end pair before
            # it (a pair alone: a longer run is cut in pairs from its start, as
            # split cuts it) to the end of the first pair after it (the start of
            # a run, where split cuts too).
            before = complete.rfind(b"\n\n", 0, at)
            if before > 0 and complete[before - 1] == _LF:
                return self._kept(complete)
            begin = before + 2 if before >= 0 else 0
            tested = complete.find(b"\n\n", at) + 2
            event = complete[begin:tested]
            if drop(event):
                pieces.append(complete[start:begin])
                pieces.append(_blank_lines(event))
                start = tested
        if not start:
            return complete
        pieces.append(complete[start:])
        return b"".join(pieces)

    def _kept(self, complete: bytes) -> bytes:
        """The events of ``complete`` that are not dropped, and what follows its
        last event end as it is (a line end after an odd run of them - a blank
        line, no event's - which was left out: the stream is forwarded byte for
        byte but for the events dropped)."""
        drop = self._drop
        if _CR not in complete:
            # Every line ends in "\n": the events end where split cuts them, at
            # the same leftmost "\n\n" pairs the pattern finds, a hundred times
            # cheaper than its search (tried at every byte).
            events = complete.split(b"\n\n")
            after = events.pop()  # what follows the last end
            kept = []
            for event in events:
                event += b"\n\n"
                kept.append(_blank_lines(event) if drop(event) else event)
            if after:
                kept.append(after)
            return b"".join(kept)
        kept = []
        start = 0
        for match in _EVENT_END.finditer(complete):
            event = complete[start : match.end()]
            kept.append(_blank_lines(event) if drop(event) else event)
            start = match.end()
        kept.append(complete[start:])
        return b"".join(kept)

    def flush(self) -> bytes:
        rest = b"".join(self._held)
        self._held, self._held_len = [], 0
        return _blank_lines(rest) if rest and self._drop(rest) else rest


def _blank_lines(event: bytes) -> bytes:
    """What of a dropped event is kept: the line ends it begins with. The events
    are cut at the first two line ends of a run, so the last of an odd run (a
    blank line after the event before: no event's) begins the next event; it is
    forwarded, so the output does not depend on where the upstream's reads end
    (review of the streamed path)."""
    return event[: len(event) - len(event.lstrip(b"\r\n"))]
