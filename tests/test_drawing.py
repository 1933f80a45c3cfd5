"""What tests/drawing.py draws from."""

from __future__ import annotations

import sys

from hypothesis.internal.intervalsets import IntervalSet

from tests.drawing import utf8_characters


def test_utf8_characters_are_every_code_point_utf8_encodes() -> None:
    """Every code point but the surrogates (U+D800 to U+DFFF), the ones Python's
    UTF-8 codec refuses: the set `st.characters(codec="utf-8")` draws from,
    without hypothesis encoding every code point to find it."""
    every = IntervalSet(((0, 0xD7FF), (0xE000, sys.maxunicode)))
    assert utf8_characters().wrapped_strategy.intervals == every  # type: ignore[attr-defined]
    crlf = utf8_characters("\r\n").wrapped_strategy.intervals  # type: ignore[attr-defined]
    assert crlf == every - IntervalSet.from_string("\r\n")
    for code in (0xD7FF, 0xD800, 0xDFFF, 0xE000, sys.maxunicode):
        encodable = True
        try:
            chr(code).encode("utf-8")
        except UnicodeEncodeError:
            encodable = False
        assert encodable == (code in every), hex(code)
