"""Usage in OpenAI's wire format, read without I/O: blocking bodies and streams.

The shapes are those of the official API reference and the ``openai`` SDK's
types (docs/upstreams/openai.md, "Wire format"):

- chat completions and completions: ``usage`` = ``{prompt_tokens,
  completion_tokens, total_tokens, prompt_tokens_details.cached_tokens,
  completion_tokens_details.reasoning_tokens}``; streamed, it arrives in one
  last ``chat.completion.chunk`` with ``choices: []`` when the request set
  ``stream_options.include_usage`` (every chunk before it has ``"usage": null``),
  and the stream ends with ``data: [DONE]``;
- embeddings: ``usage`` = ``{prompt_tokens, total_tokens}``;
- responses: ``usage`` = ``{input_tokens, output_tokens, total_tokens,
  input_tokens_details.cached_tokens, output_tokens_details.reasoning_tokens}``,
  streamed inside the ``response`` of ``response.completed`` (or
  ``response.incomplete`` / ``response.failed``);
- errors: ``{"error": {"message", "type", "param", "code"}}``, also as a
  ``data:`` line mid-stream; the responses stream has an ``error`` event.

Token counts only: OpenAI sends no money, the dialect prices the tokens.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

from gateway.pricing import Audio
from gateway.sse import ServerSentEvent
from gateway.upstreams.base import searches_every_answer
from gateway.usage import (
    FieldReader,
    Metered,
    Outcome,
    Usage,
    estimate_usage,
    unreadable_answer,
)

__all__ = [
    "ChatStreamMeter",
    "Extras",
    "ResponsesStreamMeter",
    "ToolCalls",
    "audio_from",
    "has_usage_mark",
    "is_usage_only",
    "meter_body",
    "prompt_chars",
    "unattributed_cache_writes",
    "usage_from",
    "usage_marks",
]

# Module-level so tests can count parses by patching it; looked up at call time.
_loads = orjson.loads


def _parsed(data: str | bytes) -> Any:
    """``data`` parsed as JSON, as the clients' own parsers read it: orjson, and
    where it refuses what Python's json module takes (NaN, a lone surrogate
    escape, a number too large for a double) or bytes that are not UTF-8 (read
    as the stream's decoder reads them, with replacement), json. ValueError when
    neither reads it. Without the second reading, such a usage chunk was
    estimated by the meter and shown to a client that had not asked for it
    (review of the streamed path)."""
    try:
        return _loads(data)
    except orjson.JSONDecodeError:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        try:
            return json.loads(text)
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc


# A chunk that carries usage: every chunk has a "usage" key once include_usage is
# set, but only the last one has an object there.
_USAGE_OBJECT: Final = re.compile(r'"usage"\s*:\s*\{')
_ERROR_FIRST: Final = re.compile(r'\s*\{\s*"error"\s*:')
_DONE: Final = "[DONE]"
# The text of a chunk, as JSON strings: delta.content (chat) or text
# (completions), and what a model writes besides: a tool call's arguments, a
# refusal, reasoning (reasoning_content: vLLM, DeepSeek; reasoning: OpenRouter,
# Ollama), an audio answer's transcript. A stream of tool calls alone is billed
# like any other answer.
_CHUNK_TEXT: Final = re.compile(
    r'"(?:content|text|arguments|refusal|reasoning_content|reasoning|transcript)"'
    r'\s*:\s*"((?:[^"\\]|\\.)*)"'
)
# The three patterns above define what the stream meter's hot path reads in a
# chunk. Run on every chunk they were most of an answer's metering (a search by
# _CHUNK_TEXT alone, some 30,000 instructions: issue 24), so the usual chunk is
# read with a few str.find calls instead (`_usage_object_in`, `_text_in_chunk`),
# which give what the patterns give; anything else is left to the patterns.
# tests/upstreams/test_openai_scan.py checks each against its pattern.
_USAGE_KEY: Final = '"usage"'
_CONTENT_KEY: Final = '"content"'
_TEXT_KEY: Final = '"text"'


def _usage_object_in(data: str) -> bool:
    """``_USAGE_OBJECT.search(data) is not None``; told at once for the usual
    chunk: no "usage" member, or one, null (include_usage's chunks before the last)."""
    at = data.find(_USAGE_KEY)
    if at < 0:
        return False
    if data.startswith(":null", at + len(_USAGE_KEY)) and _USAGE_KEY not in data[at + 1 :]:
        return False
    return _USAGE_OBJECT.search(data) is not None


def _text_in_chunk(data: str) -> int:
    """The characters of ``data``'s text strings (_CHUNK_TEXT's keys) as written
    (escapes as two or six): the sum of the group lengths _CHUNK_TEXT finds.
    Told at once for the usual chunk: no such member, or one
    ``"content":"..."`` whose closing quote has no backslash before it."""
    content = data.find(_CONTENT_KEY)
    # Any other key _CHUNK_TEXT reads leaves the chunk to it ('"reasoning' begins
    # both of its own; `in` tests written out: a loop or any() cost more).
    if (
        _TEXT_KEY not in data
        and '"arguments"' not in data
        and '"refusal"' not in data
        and '"reasoning' not in data
        and '"transcript"' not in data
    ):
        if content < 0:
            return 0
        start = content + len(_CONTENT_KEY) + 2
        if data.startswith(':"', start - 2) and _CONTENT_KEY not in data[start:]:
            # The one place a match can start. Its string ends at the first quote
            # after it unless a backslash escapes that quote; "." in the pattern
            # takes no line feed after a backslash, so a line feed is left to it.
            end = data.find('"', start)
            if end >= 0 and data[end - 1] != "\\" and "\n" not in data[start:end]:
                return end - start
    return sum(len(match.group(1)) for match in _CHUNK_TEXT.finditer(data))


def _usual_prefix(data: str) -> str | None:
    """The part of ``data`` up to its content string's opening quote, when
    ``data`` is a usual chunk (read by `_text_in_chunk`'s fast path) whose part
    before the string has no "usage" member and cannot begin an error; else None.

    The chunks of one stream begin alike (id, object, created, model, choices up
    to the content): a chunk that begins with this part is read by
    `ChatStreamMeter.feed` past it only. Such a part holds none of the keys the
    scans look for but the "content" at its end, and the only place a key can
    begin in it and end past it is its last character (the quote): a key begins
    with a quote, and its other quotes are those of '"content":"'. What the scans
    find in a chunk that begins with it, they find searching from that quote."""
    content = data.find(_CONTENT_KEY)
    start = content + len(_CONTENT_KEY) + 2
    if (
        content < 0
        or not data.startswith(':"', start - 2)
        or _CONTENT_KEY in data[start:]
        or _TEXT_KEY in data
        or '"arguments"' in data
        or '"refusal"' in data
        or '"reasoning' in data
        or '"transcript"' in data
    ):
        return None
    prefix = data[:start]
    if _USAGE_KEY in prefix or prefix[:2] != '{"' or prefix[1:8] == '"error"':
        return None
    return prefix


# Responses events whose JSON matters; the others are text (counted) or ignored.
_RESPONSE_FINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSE_TEXT: Final = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
    }
)

# The event names of an SSE event without an "event:" line.
_UNNAMED: Final = frozenset({"", "message"})
# A "type" member and its value, as JSON writes it. A string inside the JSON cannot
# hold an unescaped quote, so every match is a real member, possibly nested.
_TYPE: Final = re.compile(r'"type"\s*:\s*"([^"\\]*)"')
# Output items announced in a stream: the hosted tool calls are among them.
_RESPONSE_ITEM: Final = frozenset({"response.output_item.added", "response.output_item.done"})
_RESPONSE_PARSED: Final = _RESPONSE_FINAL | _RESPONSE_ITEM | {"error", "response.created"}
# The tool a Responses output item of this type is a call of, where the name is not
# the type less "_call" (OpenAI's ResponseOutputItem types).
_CALL_TOOLS: Final = {
    "computer_call": "computer_use_preview",
    "custom_tool_call": "custom",
}


def _data_type(data: str) -> tuple[str, object]:
    """The ``type`` of a responses event from its data alone, and the parsed data
    when it had to be parsed (else None). Only an event that may be one whose JSON
    matters (usage, an error, the model) is parsed: the others, text deltas among
    them, are told by their type member, found without parsing."""
    kinds = _TYPE.findall(data)
    if _RESPONSE_PARSED.isdisjoint(kinds):
        # A text delta's only object is the event itself: its type is the first.
        return (str(kinds[0]) if kinds else ""), None
    try:
        obj = _parsed(data)
    except ValueError:
        # Unreadable: taken for the kind it names, so a broken final event is
        # reported as one (malformed usage), as with an "event:" line.
        return next(kind for kind in kinds if kind in _RESPONSE_PARSED), None
    kind = obj.get("type") if isinstance(obj, dict) else None
    return (kind if isinstance(kind, str) else ""), obj


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _detail(raw: dict[str, Any], outer: str, inner: str, read: FieldReader) -> int:
    details = raw.get(outer)
    if details is None:
        return 0
    if not isinstance(details, dict):
        read.clamped.append(f"{outer}=<{type(details).__name__}>")
        return 0
    return read.tokens(details, inner)


def usage_from(raw: object) -> Usage:
    """An OpenAI ``usage`` object (any endpoint's shape) as token counts.

    Each count is read on its own (FieldReader): a bad one is derived from the
    others or bounded, and named in ``clamped``; the rest is kept. Raises
    ``ValueError`` when it is not an object, or nothing usable is left.

    The prompt cache's writes a router in front of Claude reports
    (`_cache_writes`) are read as ``cache_write_tokens``, of which the 1-hour
    cache's as ``cache_write_1h_tokens``, both parts of ``prompt_tokens`` (as
    pricing.py prices them), whichever way the router counted its prompt
    (`_router_prompt`); the reads a router names apart
    (``cache_read_input_tokens``) as ``cached_tokens``, once.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"usage is not an object: {raw!r}")
    read = FieldReader()
    if "input_tokens" in raw or "output_tokens" in raw:  # the responses API
        prompt, completion, total = read.split(raw, "input_tokens", "output_tokens", "total_tokens")
        details = "input_tokens_details"
        reasoning = _detail(raw, "output_tokens_details", "reasoning_tokens", read)
    else:
        prompt, completion, total = read.split(
            raw, "prompt_tokens", "completion_tokens", "total_tokens"
        )
        details = "prompt_tokens_details"
        reasoning = _detail(raw, "completion_tokens_details", "reasoning_tokens", read)
    cached = _detail(raw, details, "cached_tokens", read)
    if raw.get(_READS) is not None:
        # The cache's reads a router names apart (review5 R5-6): Portkey before
        # 1.14 names them only there, LiteLLM and later Portkey in cached_tokens
        # too - the same count, read once.
        cached = max(cached, read.tokens(raw, _READS))
    written = written_1h = 0
    writes = _cache_writes(raw, details, read)
    if writes is not None:
        written, written_1h, _ = writes
        prompt = _router_prompt(prompt, completion, total, cached, written)
        total = max(total, prompt + completion)
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        cache_write_tokens=written,
        cache_write_1h_tokens=written_1h,
    )
    return read.usable(usage)


# Anthropic's prompt-cache counts as the LLM routers in front of Claude put
# them in an OpenAI usage object (review4 R4-2), each the same count where
# several are there: LiteLLM's ``usage.cache_creation_input_tokens`` and
# ``prompt_tokens_details.cache_creation_tokens``, split by the cache's
# lifetime in ``prompt_tokens_details.cache_creation_token_details``
# (litellm/types/utils.py, Usage and PromptTokensDetailsWrapper); Portkey's
# ``usage.cache_creation_input_tokens`` and ``cache_read_input_tokens``
# (src/providers/anthropic/chatComplete.ts: the reads also in
# ``prompt_tokens_details.cached_tokens`` from 1.14.0 on, only there before);
# OpenRouter's ``prompt_tokens_details.cache_write_tokens``; Anthropic's own
# split, ``usage.cache_creation``, where a router passes it on.
_WRITES: Final = "cache_creation_input_tokens"
_READS: Final = "cache_read_input_tokens"
_SPLIT: Final = "cache_creation"
_DETAIL_WRITES: Final = ("cache_creation_tokens", "cache_write_tokens")
_DETAIL_SPLIT: Final = "cache_creation_token_details"
_FIVE_MINUTES: Final = "ephemeral_5m_input_tokens"
_ONE_HOUR: Final = "ephemeral_1h_input_tokens"


def _cache_writes(
    raw: dict[str, Any], details_name: str, read: FieldReader
) -> tuple[int, int, int] | None:
    """The cache writes a usage object reports, of them the 1-hour cache's, and
    those neither part of a split names (unattributed); None when it names
    none of Anthropic's cache counts.

    The writes are never fewer than their parts (a split that sums past the
    total raises it). A split that is not an object is named (clamped) and
    every write taken as a 1-hour one, the dearest they can be."""
    details = raw.get(details_name)
    details = details if isinstance(details, dict) else {}
    names = [name for name in _DETAIL_WRITES if details.get(name) is not None]
    split: object = details.get(_DETAIL_SPLIT)
    split_name = _DETAIL_SPLIT
    if split is None:
        split, split_name = raw.get(_SPLIT), _SPLIT
    if raw.get(_WRITES) is None and raw.get(_READS) is None and not names and split is None:
        return None
    written = read.tokens(raw, _WRITES)
    for name in names:
        written = max(written, read.tokens(details, name))
    five_minutes = one_hour = 0
    if isinstance(split, dict):
        five_minutes = read.tokens(split, _FIVE_MINUTES)
        one_hour = read.tokens(split, _ONE_HOUR)
    elif split is not None:
        read.bad(split_name, split)
        return written, written, 0  # as anthropic_wire.py reads it: the dearest
    written = max(written, five_minutes + one_hour)
    return written, one_hour, written - five_minutes - one_hour


def _router_prompt(prompt: int, completion: int, total: int, cached: int, written: int) -> int:
    """Every prompt token, the cache's reads and writes among them, from a
    router's counts: LiteLLM's and OpenRouter's ``prompt_tokens`` count them
    all, Portkey's counts only the uncached ones (Anthropic's ``input_tokens``)
    and its ``total_tokens`` all of them. A prompt fewer than its own cache
    reads and writes is taken to leave them out; a total past the prompt and
    the completion holds prompt tokens the prompt does not."""
    if prompt < cached + written:
        prompt += cached + written
    return max(prompt, total - completion)


def unattributed_cache_writes(raw: object) -> int:
    """The cache writes a usage object reports that no split by the cache's
    lifetime attributes (all of them, without a split): the dialect charges
    them as 1-hour writes when the request asked for a 1-hour cache."""
    if not isinstance(raw, dict):
        return 0
    responses = "input_tokens" in raw or "output_tokens" in raw  # as `usage_from` tells
    details = "input_tokens_details" if responses else "prompt_tokens_details"
    writes = _cache_writes(raw, details, FieldReader())
    return 0 if writes is None else writes[2]


def _text_chars(value: object) -> int:
    """Characters of text in a prompt or message content: a string, a list of
    strings, or a list of parts/items whose text is under "text" or "content".

    Walked with a stack, not recursion: the body is the client's (or the
    upstream's) and may nest a thousand levels deep."""
    chars = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.append(item.get("text"))
            stack.append(item.get("content"))
    return chars


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of prompt in a request body, for an estimate (chat ``messages``,
    completions ``prompt``, embeddings and responses ``input``, ``instructions``)."""
    return sum(
        _text_chars(body.get(key)) for key in ("messages", "prompt", "input", "instructions")
    )


def _partial(prompt: int, text: int, *, started: bool) -> Usage | None:
    """The charge for a stream that reported no usage: an estimate of its prompt
    and of the text it produced. A stream the upstream had begun is charged at
    least its prompt, whether it was cut (OpenAI bills the prompt of an answer
    stopped by closing it) or ended without usage (a compatible server that
    ignores include_usage bills its answer all the same); one the upstream never
    began, and that produced no text, is not charged."""
    return estimate_usage(prompt, text) if text or started else None


# What a model writes in a message (or a delta) besides its tool calls.
_MESSAGE_TEXT: Final = ("content", "refusal", "reasoning_content", "reasoning")


def _choices_chars(obj: dict[str, Any], part: str) -> int:
    """Characters of text in ``obj``'s choices: each choice's ``part`` ("message"
    in a body, "delta" in a stream chunk) - its content, refusal, reasoning, tool
    calls' names and arguments, audio transcript - and a completion's ``text``."""
    chars = 0
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                message = choice.get(part)
                if isinstance(message, dict):
                    chars += _message_chars(message)
                chars += _text_chars(choice.get("text"))
    return chars


def _message_chars(message: dict[str, Any]) -> int:
    chars = 0
    for key in _MESSAGE_TEXT:
        chars += _text_chars(message.get(key))
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict):
            chars += _function_chars(call.get("function"))
    chars += _function_chars(message.get("function_call"))  # (the API's older form)
    audio = message.get("audio")
    if isinstance(audio, dict):
        chars += _text_chars(audio.get("transcript"))
    return chars


def _function_chars(function: object) -> int:
    if not isinstance(function, dict):
        return 0
    return _text_chars(function.get("name")) + _text_chars(function.get("arguments"))


def _answer_chars(obj: dict[str, Any]) -> int:
    """Characters of answer text in a blocking body (chat, completion or response)."""
    chars = _choices_chars(obj, "message")
    output = obj.get("output")
    if isinstance(output, list):
        chars += _text_chars(output)
    return chars


def _error_code(error: object) -> str:
    if isinstance(error, dict):
        return _str_or_none(error.get("code")) or _str_or_none(error.get("type")) or "error"
    return "error"


class ToolCalls:
    """The tool calls a response reports: its output items of a ``*_call`` type
    (``web_search_call``, ``image_generation_call``...), each counted once
    however often a stream shows it (added, done, then in the final response).

    OpenAI bills code interpreter per container, not per call: its calls count
    once per container they ran in."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        # (tool, the item's id or output index) -> the container it ran in
        self._items: dict[tuple[str, str], str | None] = {}

    def add(self, item: object, index: object) -> None:
        if not isinstance(item, dict):
            return
        kind = item.get("type")
        if not isinstance(kind, str) or not kind.endswith("_call"):
            return
        tool = _CALL_TOOLS.get(kind) or kind.removesuffix("_call")
        key = (tool, _str_or_none(item.get("id")) or f"#{index}")
        container = _str_or_none(item.get("container_id"))
        if container is not None or key not in self._items:
            self._items[key] = container

    def add_output(self, output: object) -> None:
        """Every item of a response's ``output`` list."""
        if isinstance(output, list):
            for index, item in enumerate(output):
                self.add(item, index)

    def counts(self) -> dict[str, int]:
        """Calls per tool name (code interpreter: per container)."""
        counts: dict[str, int] = {}
        containers: set[str] = set()
        for (tool, _), container in self._items.items():
            if container is not None and tool == "code_interpreter":
                if container in containers:
                    continue
                containers.add(container)
            counts[tool] = counts.get(tool, 0) + 1
        return counts


def _details_count(raw: dict[str, Any], outer: str) -> int:
    # A part of the counts, read on its own: a bad one is bounded like any other
    # field, and the tokens themselves are still charged at the text rate.
    return _detail(raw, outer, "audio_tokens", FieldReader())


def audio_from(raw: object) -> Audio | None:
    """The audio tokens an OpenAI usage object reports among its prompt and
    completion tokens (chat completions' ``*_tokens_details.audio_tokens``), or
    None when it reports none."""
    if not isinstance(raw, dict):
        return None
    heard = _details_count(raw, "prompt_tokens_details")
    spoken = _details_count(raw, "completion_tokens_details")
    return Audio(heard, spoken) if heard or spoken else None


class Extras:
    """What an answer reports besides its token counts that the dialect prices:
    the tool calls of a response, the audio tokens of a chat completion, the
    cache writes no count attributes to a cache's lifetime; and, for a blocking
    answer, its parsed body (``answer``), read once for all of it."""

    __slots__ = ("answer", "audio", "calls", "unattributed_writes")

    def __init__(self) -> None:
        self.calls = ToolCalls()
        self.audio: Audio | None = None
        self.answer: object = None
        # Cache writes a router reported without their cache's lifetime.
        self.unattributed_writes = 0


def meter_body(body: dict[str, Any], response: bytes, extras: Extras | None = None) -> Metered:
    """Usage of an answer given as one JSON body (any endpoint, not streamed);
    its tool calls and audio tokens go into ``extras`` when given.

    The answer id is left to the gateway (see ``OpenAIUpstream``); the model
    is the one the upstream names.
    """
    try:
        obj = _parsed(response)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        return unreadable_answer(prompt_chars(body), response)
    model = _str_or_none(obj.get("model"))
    if extras is not None:
        extras.answer = obj
        if obj.get("object") == "response":
            extras.calls.add_output(obj.get("output"))
        extras.audio = audio_from(obj.get("usage"))
        extras.unattributed_writes = unattributed_cache_writes(obj.get("usage"))
    if "error" in obj and "usage" not in obj:
        return Metered(None, None, None, None, "error", error_code=_error_code(obj["error"]))
    raw = obj.get("usage")
    if obj.get("object") == "response" and obj.get("status") == "failed" and raw is None:
        return Metered(None, None, None, None, "error", error_code=_error_code(obj.get("error")))
    try:
        usage = usage_from(raw)
        outcome: Outcome = "complete"
    except ValueError:
        # No usage (some compatible servers leave it out) or a broken one: estimate.
        usage = estimate_usage(prompt_chars(body), _answer_chars(obj))
        outcome = "cut"
    return Metered(None, None, None, usage, outcome, model=model)


class _StreamMeter:
    """What both stream meters keep, and how a stream's result is decided."""

    __slots__ = (
        "_error_code",
        "_errored",
        "_malformed",
        "_model",
        "_prompt_chars",
        "_started",
        "_text_chars",
        "_usage",
        "extras",
    )

    def __init__(self, body: dict[str, Any]) -> None:
        self._prompt_chars = prompt_chars(body)
        self._model: str | None = None
        self._started = False  # the upstream began the answer (a first chunk, response.created)
        self._text_chars = 0
        self._usage: Usage | None = None
        self._errored = False
        self._error_code: str | None = None
        self._malformed = False
        self.extras = Extras()

    @property
    def task_id(self) -> str | None:
        # OpenAI has no stop endpoint: an answer is stopped by closing its stream.
        return None

    def finish(self, *, cut: bool) -> Metered:
        model, code = self._model, self._error_code
        if self._usage is not None:
            outcome: Outcome = "error" if self._errored else "complete"
            return Metered(None, None, None, self._usage, outcome, error_code=code, model=model)
        # (An error the upstream answered with, the stream not cut, is not billed.)
        begun = self._started and (cut or not self._errored)
        partial = _partial(self._prompt_chars, self._text_chars, started=begun)
        if self._errored:
            return Metered(None, None, None, partial, "error", error_code=code, model=model)
        code = "malformed_usage" if self._malformed else None
        return Metered(None, None, None, partial, "cut", error_code=code, model=model)


class ChatStreamMeter(_StreamMeter):
    """Meters a streamed chat completion or completion (``data:`` chunks, then
    ``data: [DONE]``).

    Only chunks that can carry usage or an error are parsed, the first one
    (for the model), and those with an escaped lower-case letter (a key may be
    written so). Answer text is measured in the others without parsing them,
    for an estimate when no usage comes.
    """

    __slots__ = ("_prefix",)

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        # How this stream's usual chunk begins, up to its content string (see
        # `_usual_prefix`): None until a chunk read on the hot path shows it.
        self._prefix: str | None = None

    def feed(self, event: ServerSentEvent) -> None:
        data = event.data
        prefix = self._prefix
        if prefix is not None and data.startswith(prefix):
            # The usual chunk, read as `_usage_object_in`, `_ERROR_FIRST`, the
            # escape test and `_text_in_chunk` read it below, but past the prefix (which holds no key
            # they look for; one can begin only at its last character, the quote):
            # a third of the bytes, and three str.find/startswith calls instead of
            # five (each parses its arguments: some 700 instructions on Python
            # 3.11; slices and `in` do not). Anything else goes the general way.
            tail = data[len(prefix) - 1 :]
            at = tail.find(_USAGE_KEY)
            if (
                (at < 0 or (tail[at + 7 : at + 12] == ":null" and _USAGE_KEY not in tail[at + 1 :]))
                and ("\\" not in tail or ("\\u006" not in tail and "\\u007" not in tail))
                and _TEXT_KEY not in tail
                and '"arguments"' not in tail
                and '"refusal"' not in tail
                and '"reasoning' not in tail
                and '"transcript"' not in tail
            ):
                value = tail[1:]  # the content string's text, and what follows it
                end = value.find('"')
                if (
                    end >= 0
                    and tail[end] != "\\"  # the character before the closing quote
                    and _CONTENT_KEY not in value
                    and "\n" not in value[:end]
                ):
                    self._text_chars += end
                    return
        if not data:
            return
        if data == _DONE:
            return
        if (
            self._started
            and ("\\" not in data or ("\\u006" not in data and "\\u007" not in data))
            and not _usage_object_in(data)
            and _ERROR_FIRST.match(data) is None
        ):
            # The hot path: the text is measured where it sits, unparsed (escapes
            # count as written; good enough for an estimate). A chunk with an
            # escaped lower-case letter ("\u006" or "\u007": "\u0075sage" is
            # "usage"; OpenAI's own chunks escape none) is parsed whole, since
            # the scans look for keys as they are usually written; it is looked
            # for only where a backslash is (a memchr), and not as "\u00", which
            # json.dumps writes for every é.
            self._text_chars += _text_in_chunk(data)
            # A chunk not begun as the last one read this way: the stream's
            # chunks may begin otherwise from here (a first one with its role).
            self._prefix = _usual_prefix(data) or prefix
            return
        try:
            obj = _parsed(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            self._malformed = True
            return
        if "error" in obj:
            self._errored = True
            self._error_code = self._error_code or _error_code(obj["error"])
            return
        if not self._started:
            self._started = True
            self._model = _str_or_none(obj.get("model"))
        elif (
            (named := obj.get("model")) != self._model
            and isinstance(named, str)
            and searches_every_answer(named)
            and not searches_every_answer(self._model)
        ):
            # A later chunk (the usage chunk: always parsed) naming another model
            # than the first, one that searches on every answer: a router that
            # wrote its alias on the chunk it built and the deployment's name on
            # the rest. That model answered, for its search's charge (review F4,
            # `OpenAIUpstream.priced_with`).
            self._model = named
        self._text_chars += self._chunk_text(obj)
        raw = obj.get("usage")
        if raw is not None:
            try:
                self._usage = usage_from(raw)
            except ValueError:
                self._malformed = True
            else:
                self.extras.audio = audio_from(raw)
                self.extras.unattributed_writes = unattributed_cache_writes(raw)

    @staticmethod
    def _chunk_text(obj: dict[str, Any]) -> int:
        return _choices_chars(obj, "delta")


class ResponsesStreamMeter(_StreamMeter):
    """Meters a streamed response (``event: response.*`` events).

    The event type is in the SSE ``event:`` field, so text deltas are measured
    without parsing; the final event's ``response.usage`` is the usage.
    """

    __slots__ = ("_overhead",)

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self._overhead: dict[str, int] = {}

    def feed(self, event: ServerSentEvent) -> None:
        data = event.data
        if not data:
            return
        kind, obj = event.event, None
        if kind in _UNNAMED:
            # No "event:" line (some compatible servers send only data lines): the
            # kind is the data's "type".
            kind, obj = _data_type(data)
        if kind in _RESPONSE_TEXT:
            overhead = self._overhead.get(kind)
            if overhead is not None:
                extra = len(data) - overhead
                if extra > 0:
                    self._text_chars += extra
                return
        elif kind not in _RESPONSE_PARSED:
            return
        elif kind in _RESPONSE_ITEM and '_call"' not in data:
            # Only tool calls (types ending "_call") are counted; a message item's
            # done event holds the whole answer's text, not worth parsing again.
            return
        if obj is None:
            try:
                obj = _parsed(data)
            except ValueError:
                obj = None
        if not isinstance(obj, dict):
            if kind in _RESPONSE_FINAL:
                self._malformed = True
            return
        if kind in _RESPONSE_TEXT:
            text = _text_chars(obj.get("delta"))
            self._text_chars += text
            self._overhead[kind] = len(data) - text
        elif kind == "error":
            self._errored = True
            self._error_code = self._error_code or _str_or_none(obj.get("code")) or "error"
        elif kind in _RESPONSE_ITEM:
            # Counted as soon as announced: a call the stream is cut after is billed.
            self.extras.calls.add(obj.get("item"), obj.get("output_index"))
        else:
            self._on_response(kind, obj.get("response"))

    def _on_response(self, kind: str, response: object) -> None:
        if not isinstance(response, dict):
            self._malformed = kind in _RESPONSE_FINAL
            return
        self._model = _str_or_none(response.get("model")) or self._model
        self._started = True
        self.extras.calls.add_output(response.get("output"))
        if kind == "response.failed":
            self._errored = True
            self._error_code = self._error_code or _error_code(response.get("error"))
        if kind not in _RESPONSE_FINAL or response.get("usage") is None:
            return
        try:
            self._usage = usage_from(response["usage"])
        except ValueError:
            self._malformed = True
        else:
            self.extras.unattributed_writes = unattributed_cache_writes(response["usage"])


_USAGE_KEY_BYTES: Final = _USAGE_KEY.encode()
# A "usage" member that may hold an object, as a usage chunk's bytes can show it:
# its key written plainly or with any of its letters escaped ("\u0075sage"), and
# not followed by a null. A JSON string holds no unescaped quote, so a match
# begins at a key, at a string value ("usage" as a value), or at an escaped
# quote inside a string ('"say \\"usage\\""'): those are tested and kept. It
# asks nothing else of what follows the key, since a chunk's data lines may
# split it there ('"usage":' then 'data: {...}'): a search for the key and its
# object in the raw bytes missed such a chunk, and an escaped key, and both were
# forwarded to clients that had not asked for them (review of the streamed
# path). The stream meter reads the data lines joined, and parses a chunk with
# an escaped letter whole.
_USAGE_MARK_BYTES: Final = re.compile(
    rb'"(?:u|\\u0075)(?:s|\\u0073)(?:a|\\u0061)(?:g|\\u0067)(?:e|\\u0065)"'
    rb"(?![ \t]*:[ \t]*null)"
)
_PLAIN_USAGE_MARK_BYTES: Final = re.compile(rb'"usage"(?![ \t]*:[ \t]*null)')
_BACKSLASH: Final = 92


def has_usage_mark(events: bytes) -> bool:
    """Whether raw SSE bytes may hold a usage chunk (a cheap test, no parsing):
    ``_USAGE_MARK_BYTES.search(events) is not None``."""
    return bool(usage_marks(events))


def usage_marks(events: bytes) -> list[int]:
    """Where ``_USAGE_MARK_BYTES`` matches in raw SSE bytes (`DropEvents`'
    marks): a usage-only chunk holds a match, and a search of a run of events
    finds it, since two matches cannot overlap (a match holds quotes only at
    its start and at the end of its key). Empty at once for the usual chunk (one
    "usage" member, null, and no escaped letter): one search by the pattern
    costs more than that chunk's whole filtering. A run of several chunks is
    searched by the pattern: cheaper than a loop of finds over its members."""
    if _BACKSLASH in events and (b"\\u006" in events or b"\\u007" in events):
        return [match.start() for match in _USAGE_MARK_BYTES.finditer(events)]
    # No escaped letter: the plain key's pattern (a literal prefix, which the
    # regex engine looks for as a string; the pattern with escapes stops at
    # every quote), after the usual chunk is told at once.
    at = events.find(_USAGE_KEY_BYTES)
    if at < 0 or (
        events[at + 7 : at + 12] == b":null" and events.find(_USAGE_KEY_BYTES, at + 7) < 0
    ):
        return []
    return [match.start() for match in _PLAIN_USAGE_MARK_BYTES.finditer(events)]


def is_usage_only(event: bytes) -> bool:
    """Whether one raw SSE event is the usage-only chunk (``choices: []``, a usage
    object) that ``stream_options.include_usage`` adds at the end of a stream."""
    if not has_usage_mark(event):
        return False
    data = b"\n".join(
        line[5:].removeprefix(b" ")
        for line in event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        if line.startswith(b"data:")
    )
    try:
        obj = _parsed(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)
