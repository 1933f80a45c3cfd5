"""The OpenAI stream meter's hot path reads chunks with str.find
(gateway/upstreams/openai_wire.py): each scan gives what the pattern that
defines it gives, on any text, the corner cases (escapes, whitespace, a string
never closed, keys inside strings) drawn often."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstreams.openai_wire import (
    _CHUNK_TEXT,
    _USAGE_OBJECT,
    _USAGE_OBJECT_BYTES,
    _text_in_chunk,
    _usage_object_in,
    has_usage_object,
)

# Pieces a chunk is made of, and the ones that trip a hand-written scan.
_PIECES = [
    '"content"',
    '"text"',
    '"usage"',
    ":null",
    ":",
    "{",
    "}",
    '"',
    "\\",
    '\\"',
    "\\\\",
    " ",
    "\t",
    "\n",
    "\r",
    "\x0b",
    "\u2003",  # an em space: whitespace to str.isspace and to \s alike
    "\x85",
    "null",
    "a",
    "é",
    ",",
    '"content":"',
    '"text": "',
    '"usage": {',
    '"content":"x"',
    '"usage":null',
    '"usage":{',
    '"arguments":"',
    '"refusal":null',
    '"reasoning_content": "',
    '"reasoning":"',
    '"transcript":"',
]
_ANY = st.lists(st.sampled_from(_PIECES) | st.text(max_size=3), max_size=24).map("".join)
# Chunks shaped like the usual one (one "content" string, a "usage" member), the
# shape the scans read without the patterns, with anything around and inside.
_FEW = st.lists(st.sampled_from(_PIECES) | st.text(max_size=2), max_size=6).map("".join)
_USUAL = st.builds(
    lambda before, value, after, usage: (
        '{"id":"c",' + before + '"choices":[{"delta":{"content":"' + value + after + usage
    ),
    _FEW,
    _FEW,
    st.sampled_from(['"}}]', '"}}],', "", '\\"}}]']),
    st.sampled_from(['"usage":null}', ',"usage":null}', '"usage": null}', '"usage":{}}', ""]),
)
texts = _ANY | _USUAL


def _reference_text(data: str) -> int:
    return sum(len(match.group(1)) for match in _CHUNK_TEXT.finditer(data))


@settings(max_examples=500)
@given(texts)
def test_text_in_chunk_is_the_patterns_count(data: str) -> None:
    assert _text_in_chunk(data) == _reference_text(data)


@settings(max_examples=400)
@given(texts)
def test_usage_object_is_the_patterns_search(data: str) -> None:
    assert _usage_object_in(data) == (_USAGE_OBJECT.search(data) is not None)
    raw = data.encode()
    assert has_usage_object(raw) == (_USAGE_OBJECT_BYTES.search(raw) is not None)


@pytest.mark.parametrize(
    ("data", "chars"),
    [
        ('{"choices":[{"delta":{"content":"Hello"}}]}', 5),
        ('{"choices":[{"delta":{"content":"a\\"b"}}]}', 4),  # an escaped quote: as written
        ('{"choices":[{"delta":{"content":"a\\\\"}}]}', 3),  # an escaped backslash ends it
        ('{"choices":[{"text" :  "abc"},{"text":"de"}]}', 5),
        ('{"content":"never closed', 0),
        ('{"content":"x\\"text":"y"}', 7),  # a key inside a string is not read again
        ('{"content": null, "text":"ok"}', 2),
        ('{"content":"line\\\nfeed"}', 0),  # a raw line feed after a backslash: no match
        ('{"content":"line\nfeed"}', 9),  # a raw line feed alone is taken
        ('{"content":"content"}', 7),
        ('{"content":"a","content":"bc"}', 3),
        ('{"content":"\\u00e9\\n"}', 8),
        # What a model writes besides content is counted too, and sends the
        # chunk to the pattern.
        ('{"delta":{"tool_calls":[{"function":{"arguments":"{\\"a\\":1}"}}]}}', 9),
        ('{"delta":{"content":"a","reasoning_content":"bcd"}}', 4),
        ('{"delta":{"reasoning":"xy"}}', 2),
        ('{"delta":{"content":"","refusal":"no"}}', 2),
        ('{"delta":{"content":null,"refusal":null}}', 0),
        ('{"delta":{"audio":{"transcript":"hi"}}}', 2),
    ],
)
def test_text_in_chunk_examples(data: str, chars: int) -> None:
    assert _text_in_chunk(data) == chars == _reference_text(data)


@pytest.mark.parametrize(
    ("data", "found"),
    [
        ('{"id":"x","usage":null}', False),
        ('{"id":"x","usage" :\t{"total_tokens":1}}', True),
        ('{"usage":null,"x":"\\"usage\\":{"}', False),
        ('{"a":"\\"usage\\": {"}', False),  # escaped quotes end the key: no member
        ('"usage"\u2003:\u2003{', True),
    ],
)
def test_usage_object_examples(data: str, found: bool) -> None:
    assert _usage_object_in(data) is found
    raw = data.encode()
    assert has_usage_object(raw) is (_USAGE_OBJECT_BYTES.search(raw) is not None)
    assert (_USAGE_OBJECT.search(data) is not None) is found
