"""Usage in Anthropic's Messages wire format, read without I/O.

The shapes are those of the Messages API reference and the ``anthropic`` SDK's
types (docs/upstreams/anthropic.md, "Wire format"):

- a blocking answer is one ``message`` object whose ``usage`` is
  ``{input_tokens, output_tokens, cache_creation_input_tokens,
  cache_read_input_tokens, cache_creation: {ephemeral_5m_input_tokens,
  ephemeral_1h_input_tokens}, server_tool_use: {web_search_requests,
  web_fetch_requests}}`` (``cache_creation``: the cache writes by the cache's
  lifetime, the SDK's ``CacheCreation``);
- a streamed answer is named SSE events in this order: ``message_start`` (the
  message, with the input side of the usage), then per content block
  ``content_block_start``, ``content_block_delta``..., ``content_block_stop``,
  with ``ping`` events anywhere, then ``message_delta`` (the stop reason and the
  usage so far: ``output_tokens`` is cumulative, and any other count it holds
  replaces the one of ``message_start``) and ``message_stop``;
- an error is ``{"type": "error", "error": {"type", "message"}}``, as a body or
  as an ``error`` event mid-stream.

``input_tokens`` counts only the prompt tokens that neither read nor wrote the
prompt cache; the gateway records the prompt as OpenAI reports it: every prompt
token (``prompt_tokens`` = input + cache reads + cache writes), the cache reads
as ``cached_tokens`` and the cache writes as ``cache_write_tokens``, of which
the 1-hour cache's as ``cache_write_1h_tokens`` (billed at their own rate).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import orjson

from gateway.http import cgi_spelling, is_dashed
from gateway.sse import ServerSentEvent
from gateway.upstreams.base import refuse_option, shown_value
from gateway.usage import (
    FieldReader,
    Metered,
    Outcome,
    Usage,
    estimate_tokens,
    estimate_usage,
    unreadable_answer,
)

__all__ = [
    "MessageStreamMeter",
    "ServerCalls",
    "meter_message",
    "prompt_chars",
    "refuse_compaction",
    "refuse_unpriced_betas",
    "usage_from",
]

_loads = orjson.loads

# anthropic-beta values that change the rates: the 1M-token context window
# (context-1m-2025-08-07), whose prompts over 200K tokens Anthropic bills at its
# long-context rates (2x input, 1.5x output); server-side compaction
# (compact-2026-01-12), a sampling step of its own over the whole conversation
# whenever the prompt passes its trigger, billed beside the answer and reported
# only in ``usage.iterations`` - more than a request's money bound holds (its
# prompt once and its max_tokens; review-meter F1).
_PRICED_BETA_PREFIXES: Final = ("context-1m", "compact-")
_BETA_HEADER: Final = b"anthropic-beta"


def refuse_unpriced_betas(headers: list[tuple[bytes, bytes]]) -> None:
    """Refuse an ``anthropic-beta`` (a comma-separated list; the header may
    come more than once) that opens rates the price table does not hold;
    spelled with underscores too, which a router behind a server reading
    headers as CGI variables takes for it (review 8, R8-7). The Anthropic
    dialect's check, and the OpenAI dialect's: a router in front of Claude
    (LiteLLM) passes a client's anthropic-beta on from any route (review 9)."""
    for name, value in headers:
        if name != _BETA_HEADER and (is_dashed(name) or cgi_spelling(name) != _BETA_HEADER):
            continue
        for beta in value.decode("latin-1").split(","):
            beta = beta.strip()
            if beta.lower().startswith(_PRICED_BETA_PREFIXES):
                refuse_option(f"anthropic-beta: {beta}")


def refuse_compaction(body: dict[str, Any]) -> None:
    """Refuse server-side compaction asked for in the body (403
    ``option_not_priced``): a sampling step over the whole conversation each
    time the prompt passes its trigger, billed beside the answer - more than
    the request's money bound holds (review-meter F1). Anthropic's shape, a
    ``context_management`` object whose ``edits`` hold a ``compact*`` type, and
    the Responses API's, a list holding a ``compaction`` entry (which a router
    in front of Claude turns into Anthropic's, beta header and all: review of
    the fixes, 1). Its beta value is refused too (`refuse_unpriced_betas`); the
    edits that clear tool results or thinking only shorten the prompt."""
    managed = body.get("context_management")
    if isinstance(managed, dict):
        entries = managed.get("edits")
    else:
        entries = managed
    for entry in entries if isinstance(entries, list) else ():
        kind = entry.get("type") if isinstance(entry, dict) else None
        if isinstance(kind, str) and kind.lower().startswith("compact"):
            refuse_option(f"context_management: {shown_value(kind)}")


# The events whose JSON the meter reads; text deltas are measured unparsed, and
# ping, content_block_start/stop and message_stop carry nothing it needs.
_MESSAGE_START: Final = "message_start"
_MESSAGE_DELTA: Final = "message_delta"
_MESSAGE_STOP: Final = "message_stop"
_ERROR: Final = "error"
_DELTA: Final = "content_block_delta"
_BLOCK_START: Final = "content_block_start"
# The text of a delta: text_delta's "text", input_json_delta's "partial_json",
# thinking_delta's "thinking", as JSON strings.
_DELTA_TEXT: Final = re.compile(r'"(?:text|partial_json|thinking)"\s*:\s*"((?:[^"\\]|\\.)*)"')
# The server tools whose calls the usage counts: usage.server_tool_use's fields.
_SERVER_TOOL_COUNTS: Final = {
    "web_search_requests": "web_search",
    "web_fetch_requests": "web_fetch",
}
# The server tools whose calls a stream shows as server_tool_use blocks, by name.
_SERVER_TOOL_NAMES: Final = frozenset(_SERVER_TOOL_COUNTS.values())


def _not_asked() -> bool:
    return False


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


class ServerCalls:
    """The server-tool calls an answer's usage reports, by tool name
    (``usage.server_tool_use``: web searches, web fetches)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def read(self, usage: object) -> None:
        """Take the counts of a usage object (cumulative: a later one replaces)."""
        if not isinstance(usage, dict):
            return
        tools = usage.get("server_tool_use")
        if not isinstance(tools, dict):
            return
        read = FieldReader()
        for field, tool in _SERVER_TOOL_COUNTS.items():
            if tools.get(field) is not None:
                self.counts[tool] = read.tokens(tools, field)


def usage_from(
    raw: object, *, start: Usage | None = None, one_hour: Callable[[], bool] = _not_asked
) -> Usage:
    """An Anthropic ``usage`` object as the gateway's token counts.

    ``start`` is what ``message_start`` reported, for a ``message_delta``'s
    usage: a count the delta leaves out (or null) keeps its value there. Each
    count is read on its own (FieldReader). ``one_hour``: whether the request
    asked for a 1-hour cache, so writes no lifetime accounts for are 1-hour ones
    (`_cache_writes`; asked only when there are such writes). Raises ``ValueError`` when it is not an object, or
    nothing usable is left.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"usage is not an object: {raw!r}")
    read = FieldReader()
    base = start or Usage()

    def count(name: str, before: int) -> int:
        return before if raw.get(name) is None else read.tokens(raw, name)

    uncached = count(
        "input_tokens", base.prompt_tokens - base.cached_tokens - base.cache_write_tokens
    )
    written = count("cache_creation_input_tokens", base.cache_write_tokens)
    written, written_1h = _cache_writes(read, raw.get("cache_creation"), written, base, one_hour)
    cached = count("cache_read_input_tokens", base.cached_tokens)
    output = count("output_tokens", base.completion_tokens)
    iterations = raw.get("iterations")
    if iterations is not None:
        # The sampling steps of one request (a compaction, an advisor's turns,
        # the answer's own): the top-level counts are the answer's steps only,
        # and Anthropic bills the sum of every step (review-meter F1).
        steps = _iteration_sums(read, iterations)
        uncached, cached, output = (
            max(uncached, steps[0]),
            max(cached, steps[2]),
            max(output, steps[3]),
        )
        if steps[1] > written:
            if one_hour():  # writes past those the top level accounts for
                written_1h += steps[1] - written
            written = steps[1]
    prompt = uncached + written + cached
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=output,
        total_tokens=prompt + output,
        cached_tokens=cached,
        cache_write_tokens=written,
        cache_write_1h_tokens=written_1h,
    )
    return read.usable(usage)


_STEP_COUNTS: Final = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


def _iteration_sums(read: FieldReader, iterations: object) -> list[int]:
    """``usage.iterations``' counts summed over its steps, in the order of
    `_STEP_COUNTS`. A list that is not one, or a step that is not an object,
    is named (clamped) and counts nothing: the top-level counts stand."""
    sums = [0, 0, 0, 0]
    if not isinstance(iterations, list):
        read.bad("iterations", iterations)
        return sums
    named = False
    for step in iterations:
        if not isinstance(step, dict):
            if not named:  # (one is enough for the log: the list is the upstream's)
                read.bad("iterations[]", step)
                named = True
            continue
        for at, name in enumerate(_STEP_COUNTS):
            if step.get(name) is not None:
                sums[at] += read.tokens(step, name)
    return sums


def _cache_writes(
    read: FieldReader, split: object, written: int, base: Usage, one_hour: Callable[[], bool]
) -> tuple[int, int]:
    """The cache writes and, of them, the 1-hour cache's, from ``usage``'s
    ``cache_creation`` (``split``) beside its ``cache_creation_input_tokens``
    (``written``).

    A lifetime's count the object leaves out (or null, or no object: message_delta
    has none in the SDK's types) keeps the one ``base`` had, as the other counts
    do. The writes are never fewer than their parts: a split that sums past the
    total raises it, so a 1-hour write is never dropped for a smaller total.
    Writes the split does not account for (a total past it, or no split at all)
    are 1-hour ones when the request asked for a 1-hour cache (``one_hour``):
    Anthropic bills them at 2x, and they were 5-minute ones at 1.25x (review 4,
    R4-1); else 5-minute ones, the only cache such a request can write. A
    ``cache_creation`` that is not an object is named (clamped) and every write
    is taken as a 1-hour one, the dearest they can be."""
    written_1h = base.cache_write_1h_tokens
    five_minutes = base.cache_write_tokens - base.cache_write_1h_tokens
    if isinstance(split, dict):
        if split.get("ephemeral_1h_input_tokens") is not None:
            written_1h = read.tokens(split, "ephemeral_1h_input_tokens")
        if split.get("ephemeral_5m_input_tokens") is not None:
            five_minutes = read.tokens(split, "ephemeral_5m_input_tokens")
    elif split is not None:
        read.bad("cache_creation", split)
        return written, written
    split_sum = five_minutes + written_1h
    if written > split_sum and one_hour():  # (asked only then: it reads the whole body)
        written_1h = written - five_minutes
    return max(written, split_sum), written_1h


def _text_chars(value: object) -> int:
    """Characters of text in a prompt or content: strings, lists, and blocks whose
    text is under "text", "content", "input" (a tool call) or "thinking".

    Walked with a stack, not recursion: the body may nest a thousand levels."""
    chars = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key in ("text", "content", "thinking"):
                stack.append(item.get(key))
            tool_input = item.get("input")
            if isinstance(tool_input, dict):
                chars += len(orjson.dumps(tool_input))
    return chars


def prompt_chars(body: dict[str, Any]) -> int:
    """Characters of prompt in a Messages request (``system`` and ``messages``),
    for an estimate."""
    return _text_chars(body.get("system")) + _text_chars(body.get("messages"))


def _error_type(error: object) -> str:
    if isinstance(error, dict):
        return _str_or_none(error.get("type")) or "error"
    return "error"


def meter_message(
    body: dict[str, Any],
    response: bytes,
    calls: ServerCalls | None = None,
    *,
    one_hour: Callable[[], bool] = _not_asked,
) -> Metered:
    """Usage of a blocking answer (one ``message`` object, or an error); its
    server-tool calls go into ``calls`` when given."""
    try:
        obj = _loads(response)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return unreadable_answer(prompt_chars(body), response)
    if obj.get("type") == "error":
        return Metered(None, None, None, None, "error", error_code=_error_type(obj.get("error")))
    model = _str_or_none(obj.get("model"))
    raw = obj.get("usage")
    if calls is not None:
        calls.read(raw)
    try:
        usage = usage_from(raw, one_hour=one_hour)
        outcome: Outcome = "complete"
    except ValueError:
        # No usable usage: an estimate from the prompt and the answer's text.
        usage = estimate_usage(prompt_chars(body), _text_chars(obj.get("content")))
        outcome = "cut"
    return Metered(None, None, None, usage, outcome, model=model)


class MessageStreamMeter:
    """Meters a streamed Messages answer.

    Only ``message_start``, ``message_delta`` and ``error`` events are parsed;
    the text of deltas is measured without parsing (for an estimate should no
    usage come), every other event is skipped by its name.
    """

    __slots__ = (
        "_error_code",
        "_errored",
        "_final",
        "_malformed",
        "_model",
        "_one_hour",
        "_prompt_chars",
        "_seen",
        "_start",
        "_started",
        "_text_chars",
        "calls",
    )

    def __init__(self, body: dict[str, Any], *, one_hour: Callable[[], bool] = _not_asked) -> None:
        self._prompt_chars = prompt_chars(body)
        self._one_hour = one_hour  # the request asked for a 1-hour cache (`usage_from`)
        self._model: str | None = None
        self._started = False  # message_start came: the upstream began (and bills) it
        self._start: Usage | None = None  # message_start's usage
        self._final: Usage | None = None  # the last message_delta's usage
        self._text_chars = 0
        self._errored = False
        self._error_code: str | None = None
        self._malformed = False
        # Server-tool calls whose blocks streamed (by name), for a stream cut
        # before message_delta: only that event reports them, and they ran.
        self._seen: dict[str, int] = {}
        self.calls = ServerCalls()

    @property
    def task_id(self) -> str | None:
        return None  # no stop endpoint: an answer is stopped by closing its stream

    def feed(self, event: ServerSentEvent) -> None:
        kind, data = event.event, event.data
        if not data:
            return
        if kind == _DELTA:
            # The hot path: the text is measured where it sits (escapes count as
            # written; good enough for an estimate).
            for match in _DELTA_TEXT.finditer(data):
                self._text_chars += len(match.group(1))
            return
        if kind == _BLOCK_START:
            if "server_tool_use" in data:  # parsed only then: one per server-tool call
                self._on_block(data)
            return
        if kind not in (_MESSAGE_START, _MESSAGE_DELTA, _ERROR):
            return
        try:
            obj = _loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            if kind != _ERROR:
                self._malformed = True
            else:
                self._errored = True
                self._error_code = self._error_code or "error"
            return
        if kind == _ERROR:
            self._errored = True
            self._error_code = self._error_code or _error_type(obj.get("error"))
        elif kind == _MESSAGE_START:
            self._on_start(obj.get("message"))
        else:
            self._on_delta(obj.get("usage"))

    def _on_start(self, message: object) -> None:
        self._started = True
        if not isinstance(message, dict):
            self._malformed = True
            return
        self._model = _str_or_none(message.get("model"))
        raw = message.get("usage")
        self.calls.read(raw)
        try:
            self._start = usage_from(raw, one_hour=self._one_hour)
        except ValueError:
            self._malformed = True

    def _on_block(self, data: str) -> None:
        try:
            obj = _loads(data)
        except orjson.JSONDecodeError:
            return
        block = obj.get("content_block") if isinstance(obj, dict) else None
        if isinstance(block, dict) and block.get("type") == "server_tool_use":
            name = block.get("name")
            if name in _SERVER_TOOL_NAMES:
                self._seen[name] = self._seen.get(name, 0) + 1

    def _on_delta(self, raw: object) -> None:
        self.calls.read(raw)
        try:
            self._final = usage_from(raw, start=self._start, one_hour=self._one_hour)
        except ValueError:
            self._malformed = True

    def finish(self, *, cut: bool) -> Metered:
        model, code = self._model, self._error_code
        if self._final is None:
            # No message_delta reported the calls: those the stream showed ran.
            counts = self.calls.counts
            for tool, seen in self._seen.items():
                counts[tool] = max(counts.get(tool, 0), seen)
        outcome: Outcome
        if self._final is not None:
            # message_delta's counts are the answer's, final or cumulative so far.
            outcome = "error" if self._errored else "complete"
            return Metered(None, None, None, self._final, outcome, error_code=code, model=model)
        usage: Usage | None = None
        if self._start is not None and (self._text_chars or not self._errored):
            # (An error before any text is charged nothing, as for OpenAI.)
            # The prompt as the upstream counted it; the output as far as it came.
            output = max(self._start.completion_tokens, estimate_tokens(self._text_chars))
            usage = Usage(
                prompt_tokens=self._start.prompt_tokens,
                completion_tokens=output,
                total_tokens=self._start.prompt_tokens + output,
                cached_tokens=self._start.cached_tokens,
                cache_write_tokens=self._start.cache_write_tokens,
                cache_write_1h_tokens=self._start.cache_write_1h_tokens,
                estimated=True,
            )
        elif self._text_chars or (self._started and (cut or not self._errored)):
            # A message the upstream began is charged at least its prompt, cut or
            # ended without usage (a compatible server's message_start without
            # one), as for OpenAI.
            usage = estimate_usage(self._prompt_chars, self._text_chars)
        if self._errored:
            return Metered(None, None, None, usage, "error", error_code=code, model=model)
        code = "malformed_usage" if self._malformed else None
        return Metered(None, None, None, usage, "cut", error_code=code, model=model)
