"""Cheap drawing for the property tests (issue 22).

Hypothesis spends about as much CPU on each choice it makes as the tests spend on
the example (recording it, its span, its node in the tree of what was tried), and
more on each strategy built inside a draw (validated anew). A test that drew a
stream line by line and its cut points one integer at a time spent ~86% of its CPU
in hypothesis. Here a stream's structure is read from one drawn byte string
(`Shape`) and a chunking costs two choices (`chunked`), whatever their sizes; the
values hypothesis is good at (text, integers) are still drawn as such.

Both shrink where hypothesis shrinks a byte string, to zeros: a `Shape` of zeros
reads the first option everywhere, a chunking of zeros is the fewest cuts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from hypothesis import strategies as st

T = TypeVar("T")
S = TypeVar("S", bytes, list[bytes])


class Shape:
    """Choices read one byte each from a drawn byte string; past its end, zeros."""

    __slots__ = ("_at", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._at = 0

    def below(self, n: int) -> int:
        """0 <= i < n (n <= 256), each about equally likely; 0 for a zero byte."""
        at = self._at
        self._at = at + 1
        return (self._raw[at] * n >> 8) if at < len(self._raw) else 0

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


def shape(draw: st.DrawFn, size: int) -> Shape:
    """A `Shape` of `size` bytes: one choice (hypothesis draws ~1 us a byte)."""
    return Shape(draw(st.binary(min_size=size, max_size=size)))


def chunked(draw: st.DrawFn, data: S) -> list[S]:
    """`data` cut into pieces, in two choices: how finely, then where.

    The fineness runs from no cut (0, what a failure shrinks to first), through
    pieces of up to all of it, half of it, a quarter... down to pieces of one
    byte, to every byte cut; one piece in sixteen is empty. So a test sees a
    few cuts and cuts everywhere alike, whatever the length: inside multi-byte
    characters, between the CR and the LF of a pair, at both ends (an empty
    first or last piece: every chunking that covers `data` before its pieces run
    out ends with one). `data` may be a list (of pieces): it is cut the same way.
    """
    n = len(data)
    levels = (n + 1).bit_length()
    # (A byte: hypothesis draws an integer at its bounds a third of the time.)
    level = shape(draw, 1).below(levels + 2)
    if level == 0:
        return [data]
    if level > levels:
        return [data[i : i + 1] for i in range(n)]
    top = (n + 1) >> (level - 1)  # the longest piece: n + 1 down to 1
    width = 1 if top < 256 else 2
    count = 2 * (n + 1) // (top + 1) + 8  # enough pieces to cover data, mostly
    raw = draw(st.binary(min_size=count * width, max_size=count * width))
    bits = 8 * width
    pieces, at = [], 0
    for i in range(0, count * width, width):
        if at >= n:
            break
        unit = int.from_bytes(raw[i : i + width], "big")
        # A zero is the longest piece; a unit in the top sixteenth, an empty one.
        size = 0 if unit >> (bits - 4) == 15 else top - (unit * 16 // 15 * top >> bits)
        pieces.append(data[at : at + size])
        at += size
    pieces.append(data[at:])
    return pieces
