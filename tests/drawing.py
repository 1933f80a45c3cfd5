"""Cheap drawing for the property tests (issue 22).

Hypothesis spends about as much CPU on each choice it makes as the tests spend on
the example (recording it, its span, its node in the tree of what was tried), and
more on each strategy built inside a draw (validated anew). A test that drew a
stream line by line and its cut points one integer at a time spent ~86% of its CPU
in hypothesis. Here a stream's structure is read from drawn bytes (`Shape`) and a
chunking from a few more (`chunked`); the values hypothesis is good at (text,
integers) are still drawn as such.

The bytes are drawn in blocks of one size, as they are read. Hypothesis's
generator copies a drawn value over another of the same kind (to repeat a line,
say); a copy that does not fit (bytes of another length) is read as the simplest
value instead and all that follows it too: with blocks of several sizes, four
examples in ten read zeros throughout. Zeros are also where a failure shrinks
to: the first option everywhere, and the fewest cuts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from hypothesis import strategies as st

T = TypeVar("T")
S = TypeVar("S", bytes, list[bytes])


def utf8_characters(exclude: str = "") -> st.SearchStrategy[str]:
    """Any character UTF-8 encodes (every code point but the surrogates) but
    ``exclude``: the set ``st.characters(codec="utf-8")`` and `st.text()`'s
    default alphabet draw from, so the same draws. Said so, hypothesis does not
    work the set out by encoding each of the 1.1 million code points, which it
    does for ``codec="utf-8"`` (6.170) in each pytest process of a checkout
    without its ``.hypothesis`` cache (CI, a new clone or worktree): ~1.5 s of
    CPU a worker."""
    return st.characters(exclude_categories=("Cs",), exclude_characters=exclude)


BLOCK = 128  # bytes: hypothesis draws ~1 us a byte, ~30 us a draw
_BLOCK = st.binary(min_size=BLOCK, max_size=BLOCK)
_CHARS = st.text(utf8_characters(), min_size=32, max_size=32)  # as st.text() draws them


class Shape:
    """Choices read from drawn bytes, a block at a time."""

    __slots__ = ("_at", "_chars", "_chars_at", "_draw", "_raw")

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw
        self._raw = bytearray()
        self._at = 0
        self._chars = ""
        self._chars_at = 0

    def chars(self, size: int) -> str:
        """`size` characters as `st.text()` draws them (in blocks of 32)."""
        at = self._chars_at
        while at + size > len(self._chars):
            self._chars += self._draw(_CHARS)
        self._chars_at = at + size
        return self._chars[at : at + size]

    def take(self, size: int) -> bytes:
        """`size` bytes as drawn."""
        at = self._at
        while at + size > len(self._raw):
            self._raw += self._draw(_BLOCK)
        self._at = at + size
        return bytes(self._raw[at : at + size])

    def below(self, n: int) -> int:
        """0 <= i < n, each about equally likely; 0 from zeros."""
        if n <= 256:
            at = self._at
            if at >= len(self._raw):
                self._raw += self._draw(_BLOCK)
            self._at = at + 1
            return self._raw[at] * n >> 8
        width = ((n - 1).bit_length() + 7) // 8
        return int.from_bytes(self.take(width), "big") * n >> (8 * width)

    def flag(self) -> bool:
        return self.below(2) == 1

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def shuffled(self, items: list[T]) -> list[T]:
        """Any order of `items` (Fisher-Yates); zeros keep their order."""
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = i - self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


def chunked(draw: st.DrawFn, data: S) -> list[S]:
    """`data` cut into pieces: how finely, then where, read from a `Shape`.

    The fineness runs from no cut (0, what a failure shrinks to first), through
    pieces of up to all of it, half of it, a quarter... down to pieces of one
    byte, to every byte cut; one piece in sixteen is empty. So a test sees a
    few cuts and cuts everywhere alike, whatever the length: inside multi-byte
    characters, between the CR and the LF of a pair, at both ends (an empty
    first piece, and a last one: a chunking whose pieces end at the end of
    `data` has one). `data` may be a list (of pieces): it is cut the same way.
    It costs hypothesis one draw of a block, and one more for every ~100
    pieces past the first hundred.
    """
    shape = Shape(draw)
    n = len(data)
    levels = (n + 1).bit_length()
    level = shape.below(levels + 2)
    if level == 0:
        return [data]
    if level > levels:
        return [data[i : i + 1] for i in range(n)]
    top = (n + 1) >> (level - 1)  # the longest piece: n + 1 down to 1
    pieces, at = [], 0
    while at < n:
        # A zero is the longest piece; a unit in the top sixteenth, an empty one.
        unit = shape.below(16 * top)
        size = 0 if unit >= 15 * top else top - unit // 15
        pieces.append(data[at : at + size])
        at += size
    pieces.append(data[at:])
    return pieces
