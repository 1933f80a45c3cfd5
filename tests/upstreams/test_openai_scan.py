"""The OpenAI stream meter's hot path reads chunks with str.find
(gateway/upstreams/openai_wire.py): each scan gives what the pattern that
defines it gives, on any text, the corner cases (escapes, whitespace, a string
never closed, keys inside strings) drawn often."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import ServerSentEvent
from gateway.upstreams.openai_wire import (
    _CHUNK_TEXT,
    _USAGE_MARK_BYTES,
    _USAGE_OBJECT,
    ChatStreamMeter,
    _text_in_chunk,
    _usage_object_in,
    _usual_prefix,
    has_usage_mark,
    usage_marks,
)
from tests.drawing import Shape

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
    "\\u0075",  # "u" escaped: keys spelled so are keys all the same
    '"\\u0075sage":{',
    '"us\\u0061ge":null',
]


def _pieces(shape: Shape, *, most: int, chars: int) -> str:
    """Up to `most` pieces: of `_PIECES`, or of up to `chars` characters."""
    out = []
    for _ in range(shape.below(most + 1)):
        if shape.flag():
            out.append(shape.chars(shape.below(chars + 1)))
        else:
            out.append(shape.pick(_PIECES))
    return "".join(out)


@st.composite
def texts(draw: st.DrawFn) -> str:
    """Any text of pieces, or one shaped like the usual chunk (one "content"
    string, a "usage" member: the shape the scans read without the patterns),
    with anything around and inside."""
    shape = Shape(draw)
    if not shape.flag():
        return _pieces(shape, most=24, chars=3)
    before = _pieces(shape, most=6, chars=2)
    value = _pieces(shape, most=6, chars=2)
    after = shape.pick(['"}}]', '"}}],', "", '\\"}}]'])
    usage = shape.pick(['"usage":null}', ',"usage":null}', '"usage": null}', '"usage":{}}', ""])
    return '{"id":"c",' + before + '"choices":[{"delta":{"content":"' + value + after + usage


def _reference_text(data: str) -> int:
    return sum(len(match.group(1)) for match in _CHUNK_TEXT.finditer(data))


@settings(max_examples=500)
@given(texts())
def test_text_in_chunk_is_the_patterns_count(data: str) -> None:
    assert _text_in_chunk(data) == _reference_text(data)


@settings(max_examples=400)
@given(texts())
def test_usage_object_is_the_patterns_search(data: str) -> None:
    assert _usage_object_in(data) == (_USAGE_OBJECT.search(data) is not None)
    raw = data.encode()
    assert has_usage_mark(raw) == (_USAGE_MARK_BYTES.search(raw) is not None)


@settings(max_examples=300)
@given(texts())
def test_usage_marks_are_where_the_pattern_matches(data: str) -> None:
    raw = data.encode()
    assert usage_marks(raw) == [m.start() for m in _USAGE_MARK_BYTES.finditer(raw)]


class _Unremembered(ChatStreamMeter):
    """The stream meter without its memo of how chunks begin: every chunk read
    as a whole (the reference for the memo's reading)."""

    __slots__ = ()

    def feed(self, event: ServerSentEvent) -> None:
        self._prefix = None
        super().feed(event)


def _state(meter: ChatStreamMeter) -> tuple[object, ...]:
    return (
        meter._text_chars,
        meter._usage,
        meter._started,
        meter._model,
        meter._errored,
        meter._error_code,
        meter._malformed,
        meter.extras.audio,
    )


# A stream's chunks: how they begin (the usual envelope, or one a memo of it must
# not be taken from: another text key, a "usage" member, an error), the content
# string's text (escapes, line feeds, a key's name), and how they go on after it
# (a usage object, another text key, a second "usage", a string never closed).
_USUAL_HEAD = '{"id":"c","model":"m","choices":[{"delta":{"content":"'
# Keys whose string values are text like content's, next to it in a chunk.
_TEXT_KEYS = ("text", "arguments", "refusal", "reasoning_content", "reasoning", "transcript")
_HEADS = [
    _USUAL_HEAD,
    _USUAL_HEAD,
    _USUAL_HEAD,
    '{"id":"c","usage":null,"choices":[{"delta":{"content":"',
    '{"error":{"message":"x"},"content":"',
    ' {"id":"c","content":"',
    '{"id":"c","choices":[{"delta":{"content" :"',
    *('{"id":"c","' + key + '":"a","content":"' for key in _TEXT_KEYS),
]
_VALUES = ["ab", '\\"', "\\\\", "\\\n", "\n", "é", 'text"', 'usage"', 'content"', 'reasoning"', ":"]
_RESTS = [
    '"}}]}',
    '"}}],"usage":null}',
    '"}}],"usage" : null}',
    '"}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
    '"}}],"usage":null,"usage":{}}',
    *('","' + key + '":"ab"}}]}' for key in (*_TEXT_KEYS, "content")),
    "",
]
_MAX_CHUNKS = 10


@st.composite
def _streams(draw: st.DrawFn) -> list[str]:
    """Chunks most of which begin alike (one head per stream), a few otherwise."""
    shape = Shape(draw)
    head = shape.pick(_HEADS)
    chunks = []
    for _ in range(1 + shape.below(_MAX_CHUNKS)):
        own = shape.pick(_HEADS) if shape.below(4) == 3 else head
        value = "".join(shape.pick(_VALUES) for _ in range(shape.below(4)))
        chunks.append(own + value + shape.pick(_RESTS))
    return chunks


@settings(max_examples=500)
@given(_streams())
def test_a_stream_read_past_its_chunks_beginning_is_read_as_a_whole(chunks: list[str]) -> None:
    # The first chunk is parsed (the model); the others go the hot path, the memo
    # of the stream's beginning taken from the chunks read there.
    body = {"messages": [{"role": "user", "content": "hi"}]}
    ours, reference = ChatStreamMeter(body), _Unremembered(body)
    for data in ['{"model":"m","choices":[]}', *chunks]:
        event = ServerSentEvent("message", data)
        ours.feed(event)
        reference.feed(event)
        assert _state(ours) == _state(reference), data
    assert ours.finish(cut=False) == reference.finish(cut=False)


@pytest.mark.parametrize(
    "rest",
    [
        'ab"}}],"usage":null}',  # the usual chunk
        'ab"}}],"usage":null,"usage":{}}',  # a second "usage", an object
        'ab"}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
        *(
            'ab","' + key + '":"cd"}}]}'
            for key in (
                "text",
                "arguments",
                "refusal",
                "reasoning_content",
                "transcript",
                "content",
            )
        ),
        'text":"x"}}]}',  # a key that begins at the head's last quote
        "ab",  # a string never closed
        'a\\"b"}}]}',  # an escaped quote
        'a\\\nb"}}]}',  # a line feed after a backslash
        "",
    ],
)
def test_a_chunk_begun_as_the_last_is_read_as_a_whole(rest: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    ours, reference = ChatStreamMeter(body), _Unremembered(body)
    for data in ['{"model":"m","choices":[]}', _USUAL_HEAD + 'x"}}]}', _USUAL_HEAD + rest]:
        event = ServerSentEvent("message", data)
        ours.feed(event)
        reference.feed(event)
    assert ours._prefix is not None  # the memo was taken, and used
    assert _state(ours) == _state(reference)


@pytest.mark.parametrize(
    ("data", "prefix"),
    [
        (
            '{"id":"c","choices":[{"delta":{"content":"hi"}}]}',
            '{"id":"c","choices":[{"delta":{"content":"',
        ),
        ('{"usage":null,"content":"hi"}', None),  # a usage member before the text
        ('{"error":1,"content":"hi"}', None),  # may begin an error
        (' {"id":"c","content":"hi"}', None),
        ('{"content":"hi","text":"x"}', None),  # another text key
        ('{"content":"hi","content":"x"}', None),
        ('{"content": "hi"}', None),
        ('{"id":"c"}', None),
    ],
)
def test_usual_prefix(data: str, prefix: str | None) -> None:
    assert _usual_prefix(data) == prefix


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
        ('{"usage":null,"x":{"usage":{}}}', True),  # a second one, not null
    ],
)
def test_usage_object_examples(data: str, found: bool) -> None:
    assert _usage_object_in(data) is found
    raw = data.encode()
    assert has_usage_mark(raw) is (_USAGE_MARK_BYTES.search(raw) is not None)
    assert bool(usage_marks(raw)) is (_USAGE_MARK_BYTES.search(raw) is not None)
    assert (_USAGE_OBJECT.search(data) is not None) is found
