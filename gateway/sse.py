"""Incremental Server-Sent Events decoder (sans-io).

Implements the parsing half of the WHATWG SSE spec
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final, NamedTuple, cast

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "EventTooLarge", "SSEDecoder", "ServerSentEvent"]

_BOM = b"\xef\xbb\xbf"
# Byte values: ``13 in chunk`` finds a byte with memchr, where ``b"\r" in chunk``
# goes through the buffer protocol first.
_CR: Final = 13
_LF: Final = 10
_SPACE: Final = 32

# The default cap on one line, and on one event's data: far above any event an
# LLM upstream sends (an image generated in one event is a few MB of base64),
# far below what would hold a process's memory (upstream.max_event_bytes).
DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024


class EventTooLarge(ValueError):
    """The stream holds a line, or an event, longer than the decoder's cap: a
    broken or hostile upstream. The line or event is dropped; ``events`` are the
    events the same chunk completed before it (they may carry usage)."""

    def __init__(self, message: str, events: list[ServerSentEvent] | None = None) -> None:
        super().__init__(message)
        self.events: list[ServerSentEvent] = events or []


class ServerSentEvent(NamedTuple):
    """One event. A named tuple, not a frozen dataclass: the decoder makes one per
    event on the hot path, and a tuple is made in one call (`_new_event`), where a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``
    (some 7,000 instructions an event against some 1,700: issue 24). As a tuple it
    compares equal to a plain 4-tuple of the same values, and orjson does not
    serialise it (`_asdict()` does)."""

    event: str  # the `event:` field; "message" when the stream gave none
    data: str  # data lines joined with "\n"
    id: str | None = None  # the last event id in force when this event was dispatched
    retry: int | None = None  # a `retry:` field seen in this event's block


_NEXT_DATA: Final = "\n\ndata: "  # the end of one block and the start of the next
# ServerSentEvent(event, data, id, retry), all four given, without the Python-level
# __new__ a named tuple's constructor goes through.
_new_event: Final = cast(
    Callable[[type[ServerSentEvent], tuple[str, str, str | None, int | None]], ServerSentEvent],
    tuple.__new__,
)


class SSEDecoder:
    """Turn chunks of an ``text/event-stream`` body into events, as they arrive.

    ``feed`` takes bytes split anywhere (inside a line, a ``\\r\\n`` pair or a UTF-8
    character) and returns the events completed so far; ``flush`` ends the stream.
    Only the unfinished last line is kept between calls, as bytes, so a character
    split across chunks is decoded once it is whole. That line is kept as the list
    of its pieces, and only each new chunk is searched for a line end: a long line
    costs time in proportion to its length, not to its square.

    A line, or an event's data, longer than ``max_event_bytes`` raises
    `EventTooLarge` (docs/proxy.md: the answer ends as an upstream error).
    """

    __slots__ = (
        "_buf",
        "_buf_len",
        "_data",
        "_data_len",
        "_event",
        "_last_id",
        "_max",
        "_pending_cr",
        "_retry",
        "_started",
    )

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._reset()

    def _reset(self) -> None:
        # The unterminated tail, in pieces; never holds a "\r" (that ends a line).
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._started = False  # past the place where a BOM may appear
        self._pending_cr = False  # the last chunk ended in "\r": a leading "\n" is its pair
        self._event = ""
        self._data: list[str] = []
        self._data_len = 0  # characters in _data: bounded by the cap too
        # The spec's "last event ID" starts as "" and "" means none; None stands for it.
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not chunk:
            return []
        if (
            # The usual chunk: whole events of one `data:` line each (Dify writes
            # each event on its own; under load several are read at once), arriving
            # between blocks. Read directly, as the general path below would read it.
            # (Tested with slices and byte values, not startswith or b"\r" in:
            # a method call, or a search for a bytes needle, costs several times
            # as much on every chunk.)
            chunk[:5] == b"data:"  # no BOM can be here, or be held (no _buf)
            and chunk[-2:] == b"\n\n"
            and not self._buf
            and not self._pending_cr
            and not self._data
            and not self._event
            and self._retry is None
            and len(chunk) <= self._max
            and _CR not in chunk
        ):
            self._started = True
            if _LF not in chunk[:-2]:  # one event: read it at once
                # The "data:" prefix is ASCII: decoding after it is decoding the line.
                start = 6 if chunk[5] == _SPACE else 5
                data = chunk[start:-2].decode("utf-8", "replace")
                return [_new_event(ServerSentEvent, ("message", data, self._last_id, None))]
            events = self._whole_events(chunk)
            if events is not None:
                return events
        if not self._started:
            chunk = b"".join(self._buf) + chunk
            self._buf, self._buf_len = [], 0
            # The BOM itself may arrive split across chunks, so wait until it can be told.
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._buf, self._buf_len = [chunk], len(chunk)
                return []
            self._started = True
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if self._pending_cr:
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            # Rare in practice (Dify sends "\n"), so normalise here and keep the common
            # case below free of it. Replacing "\r\n" first is exact: the pairs cannot
            # overlap, and what "\r" remains is a line end on its own.
            self._pending_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = chunk.rfind(b"\n")  # in the new chunk only: the tail held has none
        if end < 0:
            self._hold(chunk)
            return []
        if self._buf:
            lines = b"".join(self._buf) + chunk[:end]
            self._buf, self._buf_len = [], 0
        else:
            lines = chunk[:end]
        # Splitting the decoded text on "\n" matches decoding line by line: a line end
        # is ASCII, which is never part of a multi-byte or invalid sequence.
        events = self._lines(lines.decode("utf-8", "replace").split("\n"))
        try:
            self._hold(chunk[end + 1 :])
        except EventTooLarge as exc:
            exc.events[:0] = events
            raise
        return events

    def _whole_events(self, chunk: bytes) -> list[ServerSentEvent] | None:
        """``chunk``'s events when it is only blocks of one ``data:`` line each
        (it starts with "data:", ends with a blank line, holds no "\r"); None
        for anything else, the state untouched, for the general path to read."""
        # Splitting the decoded text matches decoding line by line (see feed): a
        # line end is ASCII, never part of a multi-byte or invalid sequence.
        text = chunk[:-2].decode("utf-8", "replace")
        last_id = self._last_id
        if text[:6] == "data: " and text.count("\n") == 2 * text.count(_NEXT_DATA):
            # The usual run (Dify's, and OpenAI's): every line end is one of a
            # "\n\ndata: " between two blocks (those cannot touch: each ends in
            # a space), so each block is one "data: " line, its value what
            # follows that prefix - as the loop below reads them, with one
            # search of the text for each kind of line end, not one per block.
            return [
                _new_event(ServerSentEvent, ("message", value, last_id, None))
                for value in text[6:].split(_NEXT_DATA)
            ]
        blocks = text.split("\n\n")
        events: list[ServerSentEvent] = []
        for block in blocks:
            # Each block is one line: it starts with "data:" and holds no line end
            # (an empty line in between, or a second line, leaves the general path).
            if "\n" in block or not block.startswith("data:"):
                return None
            value = block[6:] if block[5:6] == " " else block[5:]
            events.append(_new_event(ServerSentEvent, ("message", value, last_id, None)))
        return events

    def _hold(self, tail: bytes) -> None:
        """Keep ``tail``, the start of a line not ended yet."""
        if not tail:
            return
        self._buf.append(tail)
        self._buf_len += len(tail)
        if self._buf_len > self._max:
            held = self._buf_len
            self._buf, self._buf_len = [], 0
            self._data, self._data_len, self._event = [], 0, ""
            raise EventTooLarge(f"an SSE line of more than {held} bytes with no end")

    def flush(self) -> list[ServerSentEvent]:
        """End the stream: return what is left and reset the decoder for reuse."""
        lines = [b"".join(self._buf).decode("utf-8", "replace")] if self._buf else []
        # Deviation from the spec, which discards an event not closed by a blank line:
        # Dify can close the connection right after its last `data:` line, and that
        # line is often the `message_end` that carries the usage we meter.
        if lines or self._data:
            lines.append("")
        events = self._lines(lines)
        self._reset()
        return events

    def _lines(self, lines: list[str]) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        try:
            self._read_lines(lines, events)
        except EventTooLarge as exc:
            exc.events[:0] = events
            raise
        return events

    def _read_lines(self, lines: list[str], events: list[ServerSentEvent]) -> None:
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(
                        ServerSentEvent(
                            event=self._event or "message",
                            data="\n".join(data),
                            id=self._last_id,
                            retry=self._retry,
                        )
                    )
                    data = self._data = []
                    self._data_len = 0
                # A block with no data (Dify's `event: ping`) still ends here.
                self._event = ""
                self._retry = None
                continue
            # Dify's events are single `data:` lines; test for that before the general case.
            if line.startswith("data:"):
                value = line[6:] if line.startswith(" ", 5) else line[5:]
                self._add_data(value)
                continue
            colon = line.find(":")
            if colon == 0:
                continue  # a comment
            if colon < 0:
                name, value = line, ""
            else:
                name = line[:colon]
                value = line[colon + 2 :] if line.startswith(" ", colon + 1) else line[colon + 1 :]
            if name == "event":
                self._event = value
            elif name == "data":
                self._add_data(value)
            elif name == "id":
                if "\0" not in value:
                    self._last_id = value or None
            elif name == "retry" and value.isascii() and value.isdigit():
                # Python refuses to parse more than 4300 digits (CVE-2020-10735); such a
                # value is no delay anyone means, so it is ignored like any bad one.
                with contextlib.suppress(ValueError):
                    self._retry = int(value)

    def _add_data(self, value: str) -> None:
        self._data_len += len(value) + 1  # with the "\n" that joins it
        if self._data_len > self._max:
            self._data, self._data_len, self._event = [], 0, ""
            raise EventTooLarge(f"an SSE event of more than {self._max} bytes of data")
        self._data.append(value)
