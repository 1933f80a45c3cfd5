"""The OpenAI dialect, sans-io: usage extraction, stream meters, the usage-chunk
filter, request preparation, errors and prices. Tables of cases."""

from __future__ import annotations

import copy
import dataclasses
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.errors import BadRequest, ConfigError, Forbidden
from gateway.http import request_headers
from gateway.messages import recognise
from gateway.pricing import Audio, Price, PriceTable
from gateway.sse import SSEDecoder
from gateway.upstreams import get_upstream, openai_wire
from gateway.upstreams.openai import OpenAIUpstream
from gateway.upstreams.openai_wire import (
    ChatStreamMeter,
    ResponsesStreamMeter,
    _answer_chars,
    has_usage_mark,
    is_usage_only,
    meter_body,
    prompt_chars,
    usage_from,
)
from gateway.upstreams.transforms import DropEvents
from gateway.usage import Metered, Usage, estimate_tokens
from tests.fakes.openai import ANSWER_PIECES, FakeOpenAI, _Answer

PRICES = {
    "gpt-4o-mini": Price(
        input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.60")
    ),
    "o3": Price(input=Decimal("2"), output=Decimal("8")),
}


def dialect(prices: dict[str, Any] | None = None, **settings: Any) -> OpenAIUpstream:
    """The dialect; unpriced models allowed unless ``settings`` say otherwise
    (most bodies here name no model)."""
    table = {"gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60"}}
    data = {"prices": prices or table, "pricing": {"unpriced_models": "allow"}, **settings}
    return OpenAIUpstream(parse_config(data, env={}))


# --- usage objects -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (  # chat completion, with details
            {
                "prompt_tokens": 100,
                "completion_tokens": 50,
                "total_tokens": 150,
                "prompt_tokens_details": {"cached_tokens": 40, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 30},
            },
            Usage(100, 50, 150, cached_tokens=40, reasoning_tokens=30),
        ),
        (  # details null, as compatible servers send
            {
                "prompt_tokens": 7,
                "completion_tokens": 3,
                "total_tokens": 10,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            Usage(7, 3, 10),
        ),
        ({"prompt_tokens": 7, "completion_tokens": 3}, Usage(7, 3, 10)),  # no total
        ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0, 8)),  # embeddings
        (  # responses API
            {
                "input_tokens": 20,
                "input_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 0},
                "output_tokens": 9,
                "output_tokens_details": {"reasoning_tokens": 4},
                "total_tokens": 29,
            },
            Usage(20, 9, 29, cached_tokens=5, reasoning_tokens=4),
        ),
        ({"input_tokens": 2, "output_tokens": 1}, Usage(2, 1, 3)),
    ],
)
def test_usage_from_every_endpoint_shape(raw: dict[str, Any], expected: Usage) -> None:
    assert usage_from(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"prompt_tokens": -1},
        {"prompt_tokens": "many"},
        # A usage with one bad field among good ones is kept, clamped
        # (tests/test_usage_fields.py); only one with nothing usable is refused.
    ],
)
def test_malformed_usage_is_refused(raw: object) -> None:
    with pytest.raises(ValueError):
        usage_from(raw)


@pytest.mark.parametrize(
    ("body", "chars"),
    [
        ({"messages": [{"role": "user", "content": "hello"}]}, 5),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}]}]}, 3),
        ({"prompt": ["ab", "cd"]}, 4),
        ({"input": "four", "instructions": "xy"}, 6),
        ({"input": [{"role": "user", "content": "abc"}]}, 3),
        ({"messages": "not a list of messages", "model": "x"}, 22),
        ({"model": "x"}, 0),
    ],
)
def test_prompt_chars(body: dict[str, Any], chars: int) -> None:
    assert prompt_chars(body) == chars


# --- blocking bodies -------------------------------------------------------------------


def _fake(path: str, body: dict[str, Any], **headers: str) -> _Answer:
    return _Answer(FakeOpenAI(api_key="k"), path, headers, body, 1)


def test_blocking_chat_completion() -> None:
    answer = _fake(
        "/chat/completions",
        {"model": "gpt-4o-mini"},
        **{"x-fake-cached-tokens": "4", "x-fake-reasoning-tokens": "2"},
    )
    result = meter_body({}, orjson.dumps(answer.chat_completion()))
    assert result.outcome == "complete"
    assert result.model == "gpt-4o-mini"
    assert result.usage == Usage(12, 7, 19, cached_tokens=4, reasoning_tokens=2)


@pytest.mark.parametrize(
    "odd",
    [b'"cost":NaN', b'"note":"\\ud800"', b'"note":"\xff"'],
    ids=["NaN", "lone-surrogate", "not-utf8"],
)
def test_a_blocking_body_only_pythons_json_reads_is_read_not_estimated(odd: bytes) -> None:
    # What the client's own parser (Python's json, with replacement for bytes
    # not UTF-8) reads is read here too, as in a stream: not an estimate.
    raw = orjson.dumps(_fake("/chat/completions", {"model": "m"}).chat_completion())
    raw = raw.replace(b'"usage":{', b'"usage":{' + odd + b",", 1)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    result = meter_body({}, raw)
    assert result.outcome == "complete"
    assert result.usage == Usage(12, 7, 19)


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/completions", "completion_body"),
        ("/embeddings", "embeddings"),
    ],
)
def test_blocking_completion_and_embeddings(path: str, method: str) -> None:
    body = getattr(_fake(path, {"model": "m", "input": ["a", "b"]}), method)()
    result = meter_body({}, orjson.dumps(body))
    assert result.outcome == "complete"
    assert result.model == "m"
    assert result.usage is not None and result.usage.prompt_tokens == 12


def test_blocking_response() -> None:
    answer = _fake("/responses", {"model": "o3"}, **{"x-fake-reasoning-tokens": "5"})
    result = meter_body({}, orjson.dumps(answer.response("completed", text="hi")))
    assert result.usage == Usage(12, 7, 19, reasoning_tokens=5)


@pytest.mark.parametrize(
    ("response", "outcome", "code", "charged"),
    [
        (
            b'{"error": {"message": "bad", "type": "x", "code": "context_length"}}',
            "error",
            "context_length",
            False,
        ),
        (
            b'{"error": {"message": "bad", "type": "server_error", "code": null}}',
            "error",
            "server_error",
            False,
        ),
        (
            b'{"object": "response", "status": "failed", "usage": null, "error": {"code": "rate"}}',
            "error",
            "rate",
            False,
        ),
        # No usage (some compatible servers): an estimate from the prompt and answer.
        (b'{"choices": [{"message": {"content": "abcdefgh"}}]}', "cut", None, True),
        (b"not json at all", "cut", "unreadable_answer", True),
    ],
)
def test_blocking_bodies_without_usage(
    response: bytes, outcome: str, code: str | None, charged: bool
) -> None:
    result = meter_body({"messages": [{"role": "user", "content": "abcd"}]}, response)
    assert (result.outcome, result.error_code) == (outcome, code)
    assert (result.usage is not None) == charged
    if result.usage is not None:
        assert result.usage.estimated


# --- streams -------------------------------------------------------------------------------


def _feed(meter: ChatStreamMeter | ResponsesStreamMeter, raw: bytes) -> None:
    decoder = SSEDecoder()
    for event in [*decoder.feed(raw), *decoder.flush()]:
        meter.feed(event)


def _chat_stream(include_usage: bool, path: str = "/chat/completions", **headers: str) -> bytes:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return b"".join(_fake(path, body, **headers).chunks())


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_streamed_usage_comes_from_the_final_chunk(path: str) -> None:
    meter = ChatStreamMeter({"messages": [{"role": "user", "content": "hi"}]})
    _feed(meter, _chat_stream(True, path, **{"x-fake-cached-tokens": "3"}))
    result = meter.finish(cut=False)
    assert result.outcome == "complete"
    assert result.model == "gpt-4o-mini"
    assert result.usage == Usage(12, 7, 19, cached_tokens=3)
    assert meter.task_id is None


def test_stream_without_usage_is_estimated_from_its_text() -> None:
    meter = ChatStreamMeter({"messages": [{"role": "user", "content": "x" * 40}]})
    _feed(meter, _chat_stream(False))
    result = meter.finish(cut=False)
    assert result.outcome == "cut"
    assert result.usage is not None and result.usage.estimated
    # 40 prompt characters are 10 tokens; the answer's text is about 30 characters.
    assert result.usage.prompt_tokens == 10
    assert 5 <= result.usage.completion_tokens <= 12


def test_only_chunks_that_can_carry_usage_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.upstreams import openai_wire

    parsed: list[str] = []
    real = openai_wire._loads

    def counting(data: Any) -> Any:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(openai_wire, "_loads", counting)
    meter = ChatStreamMeter({})
    _feed(meter, _chat_stream(True))
    # The first chunk (to learn the model and the envelope) and the usage chunk.
    assert len(parsed) == 2
    assert meter.finish(cut=False).usage == Usage(12, 7, 19)


def test_error_mid_stream() -> None:
    meter = ChatStreamMeter({})
    raw = _chat_stream(True).split(b"\n\n")
    error = (
        b'data: {"error": {"message": "overloaded", "type": "server_error", "code": "overloaded"}}'
    )
    _feed(meter, b"\n\n".join([raw[0], raw[1], error]) + b"\n\n")
    result = meter.finish(cut=False)
    assert (result.outcome, result.error_code) == ("error", "overloaded")
    assert result.usage is not None and result.usage.estimated


def test_error_before_any_text_is_not_charged() -> None:
    meter = ChatStreamMeter({})
    _feed(meter, b'data: {"error": {"message": "no", "type": "x", "code": "c"}}\n\n')
    result = meter.finish(cut=False)
    assert (result.outcome, result.usage) == ("error", None)


def test_malformed_usage_chunk_is_named() -> None:
    meter = ChatStreamMeter({})
    raw = _chat_stream(False) + b'data: {"choices": [], "usage": {"prompt_tokens": -3}}\n\n'
    _feed(meter, raw)
    result = meter.finish(cut=False)
    assert (result.outcome, result.error_code) == ("cut", "malformed_usage")


def _responses_stream(**headers: str) -> bytes:
    return b"".join(
        _fake("/responses", {"model": "o3", "stream": True}, **headers).response_events()
    )


def test_a_responses_message_item_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.upstreams import openai_wire

    parsed: list[Any] = []
    real = openai_wire._loads
    monkeypatch.setattr(openai_wire, "_loads", lambda data: parsed.append(data) or real(data))
    meter = ResponsesStreamMeter({"input": "hello"})
    _feed(meter, _responses_stream())
    # response.created (the model), the first text delta (its envelope's size) and
    # response.completed: the message item's added and done events (the done one
    # holds the whole text) carry no tool call, and are skipped unparsed.
    assert not any("response.output_item." in str(data) for data in parsed)
    assert len(parsed) == 3
    assert meter.finish(cut=False).usage == Usage(12, 7, 19)


def test_responses_stream_usage_comes_from_response_completed() -> None:
    meter = ResponsesStreamMeter({"input": "hello"})
    _feed(meter, _responses_stream(**{"x-fake-reasoning-tokens": "6", "x-fake-cached-tokens": "2"}))
    result = meter.finish(cut=False)
    assert result.outcome == "complete"
    assert result.model == "o3"
    assert result.usage == Usage(12, 7, 19, cached_tokens=2, reasoning_tokens=6)


def test_responses_stream_cut_before_completed_is_estimated() -> None:
    meter = ResponsesStreamMeter({"input": "hello"})
    events = _responses_stream().split(b"\n\n")
    _feed(meter, b"\n\n".join(events[:-2]) + b"\n\n")
    result = meter.finish(cut=True)
    assert result.outcome == "cut"
    assert result.model == "o3"  # from response.created
    assert result.usage is not None and result.usage.estimated


@pytest.mark.parametrize(
    ("event", "code", "charged"),
    [
        (
            b'event: error\ndata: {"type": "error", "code": "server_error", "message": "m", "param": null, "sequence_number": 9}\n\n',
            "server_error",
            False,
        ),
        (
            b'event: response.failed\ndata: {"type": "response.failed", "response": {"model": "o3", "usage": {"input_tokens": 4, "output_tokens": 1}, "error": {"code": "server_error"}}}\n\n',
            "server_error",
            True,
        ),
    ],
)
def test_responses_stream_errors(event: bytes, code: str, charged: bool) -> None:
    meter = ResponsesStreamMeter({})
    _feed(meter, event)
    result = meter.finish(cut=False)
    assert (result.outcome, result.error_code) == ("error", code)
    assert (result.usage is not None) == charged


# --- hiding the usage chunk ---------------------------------------------------------------


def _hiding_usage() -> DropEvents:
    up = dialect()
    route = up.route("POST", "/chat/completions")
    prepared = up.prepare(route, {"stream": True}, b"", "a", method="POST", request_id="r")
    transform = up.stream_transform(route, prepared)
    assert isinstance(transform, DropEvents)
    return transform


def _filtered(chunks: list[bytes]) -> bytes:
    f = _hiding_usage()
    return b"".join(f.feed(chunk) for chunk in chunks) + f.flush()


def test_the_usage_chunk_is_hidden_and_every_other_byte_kept() -> None:
    with_usage = _chat_stream(True)
    events = with_usage.split(b"\n\n")
    expected = b"\n\n".join(e for e in events if b'"choices":[]' not in e)
    assert _filtered([with_usage]) == expected
    assert b"[DONE]" in expected
    assert b'"usage":null' in expected  # the other chunks are passed on as they came


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=30))
def test_any_chunking_gives_the_same_bytes(cuts: list[int]) -> None:
    raw = _chat_stream(True).replace(b"\n\n", b"\r\n\r\n", 2)
    expected = _filtered([raw])
    assert b'"choices":[]' not in expected
    chunks, rest = [], raw
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    assert _filtered(chunks) == expected


def test_a_chunk_without_usage_is_passed_as_it_is() -> None:
    f = _hiding_usage()
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    assert f.feed(chunk) is chunk
    assert not has_usage_mark(chunk) and not is_usage_only(chunk)


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}\n\n',  # has content
        b'data: {"choices": [], "usage": null}\n\n',
        b"data: [DONE]\n\n",
        b'data: {"usage": {broken\n\n',
    ],
)
def test_only_the_usage_only_chunk_is_hidden(event: bytes) -> None:
    assert _filtered([event]) == event


def test_an_unterminated_usage_chunk_at_the_end_is_hidden_too() -> None:
    assert _filtered([b'data: {"choices":[],"usage":{"prompt_tokens":1}}']) == b""


# The usage chunk as an unusual upstream may write it: its data split over two
# lines after the key, or its key escaped. Each was forwarded to a client that had
# not asked for usage (review of the streamed path); the meter reads each.
_ODDLY_WRITTEN_USAGE = [
    b'data: {"choices":[],"usage":\ndata: {"prompt_tokens":3,"completion_tokens":4,'
    b'"total_tokens":7}}\n\n',
    b'data: {"choices":[],"usage"\ndata: : {"prompt_tokens":3,"completion_tokens":4,'
    b'"total_tokens":7}}\n\n',
    b'data: {"choices":[],"\\u0075sage":{"prompt_tokens":3,"completion_tokens":4,'
    b'"total_tokens":7}}\n\n',
    b'data: {"choices":[],"us\\u0061g\\u0065":{"prompt_tokens":3,"completion_tokens":4,'
    b'"total_tokens":7}}\r\n\r\n',
]


@pytest.mark.parametrize("usage", _ODDLY_WRITTEN_USAGE)
def test_an_oddly_written_usage_chunk_is_hidden_and_read(usage: bytes) -> None:
    text = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    stream = text * 2 + usage + b"data: [DONE]\n\n"
    assert _filtered([stream]) == text * 2 + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        assert _filtered([stream[:cut], stream[cut:]]) == text * 2 + b"data: [DONE]\n\n"
    meter = ChatStreamMeter({})
    _feed(meter, stream)
    assert meter.finish(cut=False).usage == Usage(3, 4, 7)


def test_a_usage_key_as_a_string_value_is_kept() -> None:
    chunk = b'data: {"choices":[{"delta":{"content":"usage"}}],"type":"usage"}\n\n'
    assert has_usage_mark(chunk) and not is_usage_only(chunk)
    assert _filtered([chunk]) == chunk


# --- preparing requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "memo", "options"),
    [
        ({"stream": True}, "hide-usage-chunk", {"include_usage": True}),
        ({"stream": True, "stream_options": None}, "hide-usage-chunk", {"include_usage": True}),
        (
            {"stream": True, "stream_options": {"include_obfuscation": False}},
            "hide-usage-chunk",
            {"include_obfuscation": False, "include_usage": True},
        ),
        (
            {"stream": True, "stream_options": {"include_usage": False}},
            "hide-usage-chunk",
            {"include_usage": True},
        ),
        (
            {"stream": True, "stream_options": {"include_usage": True}},
            None,
            {"include_usage": True},
        ),
        ({"stream": False}, None, None),
        ({}, None, None),
    ],
)
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_streamed_completions_ask_for_usage(
    path: str, body: dict[str, Any], memo: str | None, options: dict[str, Any] | None
) -> None:
    up = dialect()
    route = up.route("POST", path)
    prepared = up.prepare(route, copy.deepcopy(body), b"", "alice", method="POST", request_id="r1")
    assert prepared.memo == memo
    assert prepared.body is not None
    assert prepared.body.get("stream_options") == options
    assert prepared.body["user"] == "alice"
    assert (up.stream_transform(route, prepared) is not None) == (memo is not None)


def test_the_user_is_always_the_authenticated_one() -> None:
    up = dialect()
    for path in ("/chat/completions", "/embeddings", "/responses", "/completions"):
        prepared = up.prepare(
            up.route("POST", path), {"user": "mallory"}, b"", "alice", method="POST", request_id="r"
        )
        assert prepared.body == {"user": "alice"} | (prepared.body or {}) and prepared.body
        assert prepared.body["user"] == "alice"


@pytest.mark.parametrize("path", ["/chat/completions", "/responses"])
def test_the_safety_identifier_is_the_authenticated_user_too(path: str) -> None:
    up = dialect()
    route = up.route("POST", path)
    body = {"user": "mallory", "safety_identifier": "victim", "prompt_cache_key": "k1"}
    prepared = up.prepare(route, body, b"", "alice", method="POST", request_id="r")
    assert prepared.body is not None
    assert (prepared.body["user"], prepared.body["safety_identifier"]) == ("alice", "alice")
    assert prepared.body["prompt_cache_key"] == "k1"  # a routing hint, kept (docs)
    # Not added where the client sent none: not every endpoint or server takes it.
    plain = up.prepare(route, {}, b"", "alice", method="POST", request_id="r")
    assert plain.body == {"user": "alice"}


@pytest.mark.parametrize(
    ("method", "path", "kind", "role", "owned"),
    [
        ("POST", "/chat/completions", "chat", "answer", None),
        ("POST", "/completions", "completion", "answer", None),
        ("POST", "/embeddings", "embedding", "answer", None),
        ("POST", "/responses", "response", "answer", None),
        ("GET", "/models", "models", "passthrough", None),
        ("GET", "/models/gpt-4o-mini", "models", "passthrough", None),
        ("POST", "/moderations", "moderation", "passthrough", None),
        # Objects an answer created: the ledger must name the caller.
        ("GET", "/responses/resp_1", "stored_response", "scoped", "resp_1"),
        ("DELETE", "/responses/resp_1", "stored_response", "scoped", "resp_1"),
        ("GET", "/responses/resp_1/input_items", "stored_response", "scoped", "resp_1"),
        ("POST", "/responses/resp_1/cancel", "stored_response", "scoped", "resp_1"),
        ("GET", "/chat/completions/chatcmpl-1", "stored_chat", "scoped", "chatcmpl-1"),
        ("POST", "/chat/completions/chatcmpl-1", "stored_chat", "scoped", "chatcmpl-1"),
        ("DELETE", "/chat/completions/chatcmpl-1", "stored_chat", "scoped", "chatcmpl-1"),
        ("GET", "/chat/completions/chatcmpl-1/messages", "stored_chat", "scoped", "chatcmpl-1"),
        # Every user's objects, or paid calls the gateway cannot meter.
        ("GET", "/chat/completions", "operator", "operator", None),
        ("GET", "/responses", "operator", "operator", None),
        ("DELETE", "/models/ft:gpt-4o-mini:org::abc", "operator", "operator", None),
        ("GET", "/files", "operator", "operator", None),
        ("DELETE", "/files/file-abc", "operator", "operator", None),
        ("GET", "/files/file-abc/content", "operator", "operator", None),
        ("POST", "/fine_tuning/jobs", "operator", "operator", None),
        ("DELETE", "/vector_stores/vs_1", "operator", "operator", None),
        ("POST", "/batches", "operator", "operator", None),
        ("POST", "/images/generations", "operator", "operator", None),
        ("POST", "/audio/speech", "operator", "operator", None),
        ("GET", "/conversations/conv_1", "operator", "operator", None),
        ("GET", "/organization/costs", "operator", "operator", None),
        # Not in the table at all.
        ("GET", "/chat/completions/c/messages/x", "unknown", "unknown", None),
        ("PUT", "/models", "unknown", "unknown", None),
        ("GET", "/responses/r/other", "unknown", "unknown", None),
        ("GET", "/anything", "unknown", "unknown", None),
    ],
)
def test_routes(method: str, path: str, kind: str, role: str, owned: str | None) -> None:
    route = dialect().route(method, path)
    assert (route.kind, route.role, route.owned_answer) == (kind, role, owned)
    assert route.produces_answer == (role == "answer")


def test_unmeterable_posts_and_background_responses_are_refused() -> None:
    up = dialect()
    # The proxy refuses operator routes before prepare; prepare refuses one too.
    with pytest.raises(Forbidden) as refused:
        up.prepare(
            up.route("POST", "/images/generations"), {}, b"", "a", method="POST", request_id="r"
        )
    assert refused.value.code == "endpoint_not_metered"
    with pytest.raises(BadRequest):
        up.prepare(
            up.route("POST", "/responses"),
            {"background": True},
            b"",
            "a",
            method="POST",
            request_id="r",
        )
    with pytest.raises(BadRequest):
        up.prepare(
            up.route("POST", "/chat/completions"),
            {"stream": True, "stream_options": "yes"},
            b"",
            "a",
            method="POST",
            request_id="r",
        )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "invalid_request_error"),
        (429, "insufficient_quota"),
        (503, "server_error"),
    ],
)
def test_errors_in_openai_shape(status: int, kind: str) -> None:
    up = dialect()
    body = orjson.loads(up.error_body(status, "quota_exceeded", "No queries left today."))
    assert body == {
        "error": {
            "message": "No queries left today.",
            "type": kind,
            "param": None,
            "code": "quota_exceeded",
        }
    }
    frame = up.stream_error(502, "upstream_error", "lost")
    assert frame.startswith(b"data: {") and frame.endswith(b"\n\n")
    assert orjson.loads(frame[6:])["error"]["code"] == "upstream_error"


def test_the_registry_builds_the_dialect_from_the_configuration() -> None:
    config = parse_config({"upstream": {"kind": "openai"}, "prices": {"*": {"input": 1}}}, env={})
    up = get_upstream("openai", config)
    assert isinstance(up, OpenAIUpstream) and up.stops_by_closing
    metered = up.meter_blocking(
        up.route("POST", "/embeddings"),
        {"model": "text-embedding-3-small"},
        b'{"model": "text-embedding-3-small", "usage": {"prompt_tokens": 1000000, "total_tokens": 1000000}}',
    )
    assert metered.usage is not None and metered.usage.cost == Decimal(1)


# --- prices ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "usage", "cost"),
    [
        # 600 * 0.15 + 400 * 0.075 + 500 * 0.60 = 420 per million
        (("gpt-4o-mini",), Usage(1000, 500, 1500, cached_tokens=400), Decimal("0.00042")),
        (("gpt-4o-mini-2024-07-18",), Usage(1000, 0, 1000), Decimal("0.00015")),  # snapshot
        (("gpt-4o-minimal",), Usage(1000, 0, 1000), None),  # not a snapshot of it
        (
            (None, "o3"),
            Usage(1_000_000, 1_000_000, 2_000_000, reasoning_tokens=900_000),
            Decimal(10),
        ),
        (("o3",), Usage(1, 0, 1, cached_tokens=1), Decimal("0.000002")),  # cached at input price
        (("unknown",), Usage(10, 10, 20), None),
        (
            ("gpt-4o-mini",),
            Usage(10, 0, 10, cached_tokens=99),
            Decimal("0.00000075"),
        ),  # cached capped
    ],
)
def test_prices(models: tuple[str | None, ...], usage: Usage, cost: Decimal | None) -> None:
    priced, found = PriceTable(PRICES).priced(usage, *models)
    assert found == (cost is not None)
    assert priced.cost == (cost if cost is not None else Decimal(0))
    assert isinstance(priced.cost, Decimal)


def test_the_star_entry_prices_the_rest() -> None:
    table = PriceTable({**PRICES, "*": Price(input=Decimal(1), currency="EUR")})
    priced, found = table.priced(Usage(2, 0, 2), "mystery")
    assert found and (priced.cost, priced.currency) == (Decimal("0.000002"), "EUR")
    # A named model wins over "*" even when it is only the model asked for.
    assert table.find("mystery-2", "o3") is PRICES["o3"]


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # a snapshot: its base name
        ("gpt-4o-minimal", "other"),
        ("mystery", "other"),  # priced by "*", but not one of the table's names
        ("*", "other"),
        (None, ""),  # Dify's answers name no model
    ],
)
def test_metrics_labels_are_the_tables_names(model: str | None, label: str) -> None:
    table = PriceTable({**PRICES, "*": Price(input=Decimal(1))})
    assert table.label(model) == label


def test_dialect_prices_by_the_answering_model_then_the_requested_one() -> None:
    up = dialect()
    route = up.route("POST", "/chat/completions")
    answer = _fake(
        "/chat/completions", {"model": "x"}, **{"x-fake-model": "gpt-4o-mini-2024-07-18"}
    )
    result = up.meter_blocking(route, {"model": "x"}, orjson.dumps(answer.chat_completion()))
    assert result.model == "gpt-4o-mini-2024-07-18"
    assert result.usage is not None and result.usage.cost == Decimal("0.0000060")
    # An upstream that names no model: the one asked for is recorded and priced.
    result = up.meter_blocking(
        route,
        {"model": "gpt-4o-mini"},
        b'{"usage": {"prompt_tokens": 1000000, "completion_tokens": 0}}',
    )
    assert (result.model, result.usage and result.usage.cost) == ("gpt-4o-mini", Decimal("0.15"))


def test_counts_past_the_per_answer_cap_are_priced_at_the_cap() -> None:
    config = parse_config(
        {
            "prices": {"gpt-4o-mini": {"input": "1", "cached_input": "0.5", "output": "2"}},
            "accounting": {"max_tokens_per_answer": 1000},
        },
        env={},
    )
    up = OpenAIUpstream(config)
    usage = {"prompt_tokens": 1e20, "completion_tokens": 2**63, "total_tokens": 5}
    usage["prompt_tokens_details"] = {"cached_tokens": 10**19}
    body = orjson.dumps({"model": "gpt-4o-mini", "usage": usage})
    result = up.meter_blocking(up.route("POST", "/chat/completions"), {}, body)
    assert result.usage is not None
    # 1000 cached prompt tokens at 0.5 and 1000 output tokens at 2, per million.
    assert result.usage.cost == Decimal("0.0025")
    # The counts stay as reported, for the ledger's bounds to clamp and mark.
    assert result.usage.prompt_tokens == 10**20


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"m": {"input": "abc"}}, "prices.m.input: expected a decimal number"),
        ({"m": {"input": "-1"}}, "prices.m.input: expected a number >= 0"),
        ({"m": {"output": "NaN"}}, "prices.m.output: expected a finite decimal"),
        ({"m": {"output": True}}, "prices.m.output: expected a decimal string"),
        ({"m": {"inptu": "1"}}, "did you mean 'input'"),
        ({"m": "cheap"}, "prices.m: expected a table"),
    ],
)
def test_bad_prices_are_refused_with_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"prices": table}, env={})
    assert message in info.value.message


def test_toml_numbers_are_read_as_their_decimal_text() -> None:
    config = parse_config({"prices": {"m": {"input": 0.1, "output": 3}}}, env={})
    assert config.prices["m"].input == Decimal("0.1")
    assert config.prices["m"].output == Decimal(3)


@pytest.mark.parametrize(
    ("meter", "first"),
    [
        (
            ChatStreamMeter,
            b'data: {"id":"c","model":"m","choices":[{"delta":{"role":"assistant"}}]}\n\n',
        ),
        (
            ResponsesStreamMeter,
            b'event: response.created\ndata: {"type":"response.created","response":{"model":"m"}}\n\n',
        ),
    ],
)
def test_a_begun_stream_without_text_or_usage_is_charged_its_prompt(
    meter: Any, first: bytes
) -> None:
    """Cut, or ended by a server that ignores include_usage: the upstream read the
    prompt and bills it either way."""
    body = {"messages": [{"content": "x" * 40}], "input": "y" * 40}
    for cut in (True, False):
        begun = meter(body)
        _feed(begun, first)
        usage = begun.finish(cut=cut).usage
        assert usage is not None and usage.estimated and usage.prompt_tokens == 20
        assert usage.completion_tokens == 0


# Model output besides delta.content, about 1,000 tokens' worth (4,000 characters).
_NOT_CONTENT = [
    pytest.param(
        {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "x" * 4000}}]},
        id="tool_calls",
    ),
    pytest.param({"function_call": {"arguments": "x" * 4000}}, id="function_call"),
    pytest.param({"reasoning_content": "x" * 4000}, id="reasoning_content"),  # vLLM, DeepSeek
    pytest.param({"reasoning": "x" * 4000}, id="reasoning"),  # OpenRouter, Ollama
    pytest.param({"refusal": "x" * 4000}, id="refusal"),
    pytest.param({"audio": {"transcript": "x" * 4000}}, id="audio"),
]


@pytest.mark.parametrize("delta", _NOT_CONTENT)
@pytest.mark.parametrize("first", [True, False], ids=["parsed", "unparsed"])
@pytest.mark.parametrize("cut", [False, True], ids=["ended-without-usage", "cut"])
def test_a_stream_without_usage_is_estimated_from_what_the_model_wrote_besides_content(
    delta: dict[str, Any], first: bool, cut: bool
) -> None:
    """A compatible server that ignores include_usage, or a stream cut before its
    usage: a tool call, a refusal, reasoning or an audio transcript was written
    by the model and is billed; the estimate counts it (in the first chunk,
    which is parsed, and in the later ones, which are not)."""
    meter = ChatStreamMeter({"messages": [{"content": "x" * 40}]})
    chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta}]}
    if not first:
        _feed(meter, b'data: {"id":"c","model":"m","choices":[{"delta":{"role":"assistant"}}]}\n\n')
    _feed(meter, b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
    usage = meter.finish(cut=cut).usage
    assert usage is not None and usage.estimated
    assert usage.completion_tokens >= 1000 and usage.prompt_tokens == 10


@pytest.mark.parametrize("delta", _NOT_CONTENT)
def test_a_blocking_body_without_usage_is_estimated_from_what_the_model_wrote(
    delta: dict[str, Any],
) -> None:
    body = {"choices": [{"index": 0, "message": delta}]}
    assert _answer_chars(body) >= 4000


# --- responses streams without "event:" lines ----------------------------------------------


def _unnamed(raw: bytes) -> bytes:
    """The stream as a compatible server may send it: data lines only."""
    return b"\n".join(line for line in raw.split(b"\n") if not line.startswith(b"event:"))


@pytest.mark.parametrize("name", [b"", b"event: message\n"], ids=["no-event-line", "message"])
def test_a_responses_stream_of_data_lines_only_is_metered_the_same(
    monkeypatch: pytest.MonkeyPatch, name: bytes
) -> None:
    from gateway.upstreams import openai_wire

    parsed: list[Any] = []
    real = openai_wire._loads
    monkeypatch.setattr(openai_wire, "_loads", lambda data: parsed.append(data) or real(data))
    raw = _responses_stream(**{"x-fake-reasoning-tokens": "6", "x-fake-cached-tokens": "2"})
    stream = b"\n\n".join(name + e for e in _unnamed(raw).split(b"\n\n") if e) + b"\n\n"
    meter = ResponsesStreamMeter({"input": "hello"})
    _feed(meter, stream)
    result = meter.finish(cut=False)
    assert result.outcome == "complete"
    assert result.model == "o3"
    assert result.usage == Usage(12, 7, 19, cached_tokens=2, reasoning_tokens=6)
    # response.created (the model), the message's output_item.added and .done (an
    # item might be a tool call), the first text delta (its envelope's size) and
    # response.completed: the other deltas and parts are measured unparsed.
    assert len(parsed) == 5


@pytest.mark.parametrize("named", [True, False], ids=["event-lines", "data-only"])
def test_a_responses_stream_that_ends_with_text_and_no_usage_is_estimated(named: bool) -> None:
    events = [e for e in _responses_stream().split(b"\n\n") if e][:-1]  # no response.completed
    raw = b"\n\n".join(events) + b"\n\n"
    meter = ResponsesStreamMeter({"input": "x" * 40})
    _feed(meter, raw if named else _unnamed(raw))
    result = meter.finish(cut=False)  # the upstream ended the stream itself
    assert result.outcome == "cut"
    usage = result.usage
    assert usage is not None and usage.estimated
    assert usage.prompt_tokens == 10
    assert usage.completion_tokens == estimate_tokens(len("".join(ANSWER_PIECES)))


def test_the_chat_stream_that_ends_with_text_and_no_usage_is_estimated_alike() -> None:
    meter = ChatStreamMeter({"messages": [{"content": "x" * 40}]})
    _feed(meter, _chat_stream(False))
    usage = meter.finish(cut=False).usage
    assert usage is not None and usage.estimated
    assert usage.completion_tokens == estimate_tokens(len("".join(ANSWER_PIECES)))


@pytest.mark.parametrize(
    ("data", "outcome", "code"),
    [
        (b'{"type": "error", "code": "server_error", "message": "m"}', "error", "server_error"),
        (
            b'{"type": "response.failed", "response": {"model": "o3", "error": {"code": "x"}}}',
            "error",
            "x",
        ),
        # A nested "type" naming a final event is not the event's own.
        (b'{"type": "response.output_item.added", "item": {"type": "error"}}', "cut", None),
        (b'{"item": {"type": "response.completed"}}', "cut", None),
        (b'{"type": "response.completed", "response": 3}', "cut", "malformed_usage"),
        (b'{"type": "response.completed", "response": {"usage": {', "cut", "malformed_usage"),
    ],
)
def test_data_only_responses_events_are_told_by_their_own_type(
    data: bytes, outcome: str, code: str | None
) -> None:
    meter = ResponsesStreamMeter({})
    _feed(meter, b"data: " + data + b"\n\n")
    result = meter.finish(cut=False)
    assert (result.outcome, result.error_code, result.usage) == (outcome, code, None)


# --- bodies nested deeply ------------------------------------------------------------------


def test_deeply_nested_text_is_counted_without_recursion() -> None:
    content: Any = "abc"
    for _ in range(100_000):
        content = [{"content": content}]
    assert prompt_chars({"messages": content, "input": [[["de"]]]}) == 5


def test_a_blocking_answer_nested_a_thousand_deep_is_estimated() -> None:
    deep = b"[" * 1000 + b'"abcd"' + b"]" * 1000
    response = b'{"model":"gpt-4o-mini","choices":[{"message":{"content":' + deep + b"}}]}"
    result = meter_body({"messages": [{"content": "x" * 40}]}, response)
    assert result.outcome == "cut"
    assert result.usage == Usage(10, 1, 11, estimated=True)


# --- booleans as the upstream reads them (issue 20) --------------------------------------


def _prepare(up: OpenAIUpstream, path: str, body: dict[str, Any]) -> Any:
    return up.prepare(up.route("POST", path), body, b"", "alice", method="POST", request_id="r")


@pytest.mark.parametrize("path", ["/chat/completions", "/completions", "/responses", "/embeddings"])
@pytest.mark.parametrize(
    ("body", "name"),
    [
        ({"stream": 1}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"stream": 0}, "stream"),
        ({"stream": [True]}, "stream"),
        ({"background": 1}, "background"),
        ({"background": "yes"}, "background"),
        ({"store": "false"}, "store"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ],
)
def test_a_boolean_the_gateway_reads_must_be_a_json_boolean(
    path: str, body: dict[str, Any], name: str
) -> None:
    # Lax servers (vLLM) take 1 or "true" as true; the gateway would read "not true"
    # and meter the answer as unstreamed, or forward a background response.
    with pytest.raises(BadRequest) as refused:
        _prepare(dialect(), path, {"model": "gpt-4o-mini", **body})
    assert refused.value.code == "invalid_type"
    assert f"'{name}'" in refused.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"stream": True, "store": False, "stream_options": {"include_usage": None}},
        {"stream": None, "background": False, "store": None},
        {"stream": False, "stream_options": None},
    ],
)
def test_json_booleans_and_null_pass(body: dict[str, Any]) -> None:
    for path in ("/chat/completions", "/responses"):
        _prepare(dialect(), path, {"model": "gpt-4o-mini", **copy.deepcopy(body)})


# --- model prices: only a date makes a snapshot (issue 20) -------------------------------


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("o3", "o3"),
        ("o3-2025-04-16", "o3"),
        ("o3-pro", None),  # another model, dearer: not o3's price
        ("o3-pro-2025-06-10", None),
        ("o3-mini", None),
        ("gpt-4-0613", "gpt-4"),  # OpenAI's older month-and-day snapshots
        ("gpt-4-1106-preview", None),  # GPT-4 Turbo, priced otherwise
        ("gpt-4-0125-preview", None),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-16k-0613", "gpt-3.5-turbo-16k"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-mini-tts", None),
        ("gpt-4o-mini-tts-2025-03-20", None),
        ("gpt-4o-2024-13-06", None),  # no month 13
        ("gpt-4-1306", None),
        ("gpt-4-0631", "gpt-4"),  # a day of 31, any month: close enough to a date
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-latest", None),
        ("gpt-4o-2024-08-06-ft", None),
    ],
)
def test_only_a_dated_snapshot_takes_its_models_price(model: str, priced_as: str | None) -> None:
    names = ("o3", "gpt-4", "gpt-3.5-turbo", "gpt-3.5-turbo-16k", "gpt-4o", "gpt-4o-mini")
    table = PriceTable(dict.fromkeys((*names, "claude-3-5-sonnet"), Price(input=Decimal(1))))
    assert table.name(model) == priced_as


PRICED = {"o3": {"input": "2", "output": "8"}}


def test_an_unpriced_model_is_refused_before_admission_by_default() -> None:
    up = OpenAIUpstream(parse_config({"prices": PRICED}, env={}))
    for path in ("/chat/completions", "/completions", "/responses", "/embeddings"):
        with pytest.raises(Forbidden) as refused:
            _prepare(up, path, {"model": "o3-pro"})
        assert refused.value.code == "model_not_priced"
        assert "'o3-pro'" in refused.value.message
        with pytest.raises(Forbidden):
            _prepare(up, path, {})  # no model at all: nothing to price it by
    _prepare(up, "/chat/completions", {"model": "o3-2025-04-16"})
    # Requests that are not answers name no model and are not priced.
    _prepare(up, "/moderations", {"input": "x"})


def test_unpriced_models_may_be_allowed_at_cost_0() -> None:
    up = OpenAIUpstream(
        parse_config({"prices": PRICED, "pricing": {"unpriced_models": "allow"}}, env={})
    )
    route = up.route("POST", "/chat/completions")
    body = {"model": "o3-pro"}
    _prepare(up, "/chat/completions", body)
    answer = _fake("/chat/completions", body)
    result = up.meter_blocking(route, body, orjson.dumps(answer.chat_completion()))
    assert result.usage is not None and result.usage.cost == 0 and result.usage.prompt_tokens == 12
    # The "*" entry prices every model, so nothing is unpriced.
    star = OpenAIUpstream(parse_config({"prices": {"*": {"input": "1"}}}, env={}))
    _prepare(star, "/chat/completions", {"model": "o3-pro"})


def test_the_unpriced_models_setting_is_checked() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"pricing": {"unpriced_models": "free"}}, env={})
    assert "pricing.unpriced_models" in info.value.message


# --- paid tools (issue 20) --------------------------------------------------------------

CALL_PRICES = {
    "openai.web_search": {"price": "0.01"},
    "openai.web_search_preview": {"price": "0.025"},
    "openai.image_generation": {"price": "0.04"},
    "openai.code_interpreter": {"price": "0.03"},
    "openai.file_search": {"price": "0.0025"},
    "openai.chat_web_search": {"price": "0.03"},
    "openai.audio_output": {"price": "0.005"},
}
TOOL_PRICES = {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}}


def tooled(call_prices: dict[str, Any] | None = None) -> OpenAIUpstream:
    data = {
        "prices": TOOL_PRICES,
        "call_prices": CALL_PRICES if call_prices is None else call_prices,
    }
    return OpenAIUpstream(parse_config(data, env={}))


@pytest.mark.parametrize(
    ("path", "body", "tool"),
    [
        ("/responses", {"tools": [{"type": "web_search"}]}, "web_search"),
        (
            "/responses",
            {"tools": [{"type": "web_search_preview_2025_03_11"}]},
            "web_search_preview",
        ),
        (
            "/responses",
            {"tools": [{"type": "function", "name": "f"}, {"type": "image_generation"}]},
            "image_generation",
        ),
        (
            "/responses",
            {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
            "code_interpreter",
        ),
        (
            "/responses",
            {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]},
            "file_search",
        ),
        ("/responses", {"tools": [{"type": "computer_use_preview"}]}, "computer_use_preview"),
        ("/responses", {"tools": [{"type": "some_new_hosted_tool"}]}, "some_new_hosted_tool"),
        ("/chat/completions", {"web_search_options": {}}, "chat_web_search"),
        ("/chat/completions", {"model": "gpt-4o-mini-search-preview"}, "chat_web_search"),
        ("/chat/completions", {"model": "gpt-4o-search-preview-2025-03-11"}, "chat_web_search"),
        # OpenRouter's web search: its plugin, or a model named ":online" (review 9).
        ("/chat/completions", {"plugins": [{"id": "web"}]}, "chat_web_search"),
        ("/chat/completions", {"model": "gpt-4o-mini:online"}, "chat_web_search"),
        # Perplexity's Sonar models search before every answer, itself or via OpenRouter.
        ("/chat/completions", {"model": "sonar"}, "chat_web_search"),
        ("/chat/completions", {"model": "perplexity/sonar-reasoning-pro"}, "chat_web_search"),
        (
            "/chat/completions",
            {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
            "audio_output",
        ),
        ("/chat/completions", {"audio": {"voice": "alloy"}}, "audio_output"),
    ],
)
def test_a_paid_tool_without_a_price_is_refused_naming_it(
    path: str, body: dict[str, Any], tool: str
) -> None:
    prices = {
        **TOOL_PRICES,
        "gpt-4o-mini-search-preview": {},
        "gpt-4o-search-preview": {},
        "gpt-4o-mini:online": {},
        "sonar": {},
        "perplexity/sonar-reasoning-pro": {},
    }
    up = OpenAIUpstream(parse_config({"prices": prices}, env={}))
    with pytest.raises(Forbidden) as refused:
        _prepare(up, path, {"model": "gpt-4o-mini", **body})
    assert refused.value.code == "tool_not_priced"
    assert f"'{tool}'" in refused.value.message
    assert f'call_prices."openai.{tool}"' in refused.value.message


@pytest.mark.parametrize(
    "tools",
    [
        [{"type": "function", "name": "f", "parameters": {}}],
        [
            {"type": "custom", "name": "c"},
            {"type": "local_shell"},
            {"type": "mcp", "server_label": "x"},
        ],
        [],
    ],
)
def test_free_tools_need_no_price(tools: list[dict[str, Any]]) -> None:
    _prepare(tooled({}), "/responses", {"model": "gpt-4o-mini", "tools": tools})
    _prepare(
        tooled({}),
        "/chat/completions",
        {"model": "gpt-4o-mini", "tools": tools, "modalities": ["text"]},
    )


# 12 prompt and 7 completion tokens of gpt-4o-mini: 12 * 0.15 + 7 * 0.60 = 6 per million.
TOKENS_COST = Decimal("0.000006")


def _response_with_calls(calls: str, **headers: str) -> _Answer:
    return _fake("/responses", {"model": "gpt-4o-mini"}, **{"x-fake-tool-calls": calls, **headers})


CALLS = "web_search_call,web_search_call,image_generation_call,code_interpreter_call,code_interpreter_call,function_call"
# two searches, one image, one container (two code runs in it), a free function call
CALLS_COST = 2 * Decimal("0.01") + Decimal("0.04") + Decimal("0.03")


def test_a_blocking_responses_tool_calls_are_priced_per_call() -> None:
    up = tooled()
    body = {
        "model": "gpt-4o-mini",
        "tools": [
            {"type": "web_search"},
            {"type": "image_generation"},
            {"type": "code_interpreter"},
        ],
    }
    _prepare(up, "/responses", body)
    answer = _response_with_calls(CALLS)
    result = up.meter_blocking(
        up.route("POST", "/responses"), body, orjson.dumps(answer.response("completed", text="hi"))
    )
    assert result.usage is not None
    assert result.usage.cost == TOKENS_COST + CALLS_COST
    assert isinstance(result.usage.cost, Decimal) and result.usage.currency == "USD"


def test_a_streamed_responses_tool_calls_are_priced_once_each() -> None:
    up = tooled()
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "tools": [
            {"type": "web_search"},
            {"type": "image_generation"},
            {"type": "code_interpreter"},
        ],
    }
    meter = up.stream_meter(up.route("POST", "/responses"), body)
    for event in SSEDecoder().feed(b"".join(_response_with_calls(CALLS).response_events())):
        meter.feed(event)
    result = meter.finish(cut=False)
    # Each call is shown three times (added, done, in the final response): counted once.
    assert result.usage is not None and result.usage.cost == TOKENS_COST + CALLS_COST


def test_a_stream_cut_after_a_tool_call_is_charged_the_call() -> None:
    up = tooled()
    body = {"model": "gpt-4o-mini", "stream": True, "tools": [{"type": "web_search_preview"}]}
    meter = up.stream_meter(up.route("POST", "/responses"), body)
    events = _response_with_calls("web_search_call").response_events()
    for event in SSEDecoder().feed(b"".join(events[:3])):  # created, in progress, call added
        meter.feed(event)
    result = meter.finish(cut=True)
    assert result.usage is not None and result.usage.estimated
    # The call of the tool the request listed (web_search_preview: 0.025), plus the
    # prompt's estimate (no text came).
    assert result.usage.cost - Decimal("0.025") < Decimal("0.0001")
    assert result.usage.cost >= Decimal("0.025")


def test_web_search_calls_are_priced_as_the_tool_listed_the_dearer_of_two() -> None:
    up = tooled()
    both = {
        "model": "gpt-4o-mini",
        "tools": [{"type": "web_search"}, {"type": "web_search_preview"}],
    }
    answer = _response_with_calls("web_search_call")
    route = up.route("POST", "/responses")
    result = up.meter_blocking(route, both, orjson.dumps(answer.response("completed", text="hi")))
    assert result.usage is not None and result.usage.cost == TOKENS_COST + Decimal("0.025")


@pytest.mark.parametrize(
    ("extra", "calls_cost"),
    [
        ({"web_search_options": {"search_context_size": "low"}}, Decimal("0.03")),
        (
            {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
            Decimal("0.005"),
        ),
        ({"web_search_options": {}, "audio": {"voice": "alloy"}}, Decimal("0.035")),
        ({"web_search_options": None, "modalities": ["text"]}, Decimal(0)),
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
def test_chat_web_search_and_audio_are_priced_per_answer(
    extra: dict[str, Any], calls_cost: Decimal, streamed: bool
) -> None:
    up = tooled()
    body = {"model": "gpt-4o-mini", **extra}
    route = up.route("POST", "/chat/completions")
    _prepare(up, "/chat/completions", body)
    answer = _fake("/chat/completions", body)
    if streamed:
        meter = up.stream_meter(
            route, {**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        answer.body = {**body, "stream_options": {"include_usage": True}}
        for event in SSEDecoder().feed(b"".join(answer.chunks())):
            meter.feed(event)
        result = meter.finish(cut=False)
    else:
        result = up.meter_blocking(route, body, orjson.dumps(answer.chat_completion()))
    assert result.usage is not None and result.usage.cost == TOKENS_COST + calls_cost


def test_a_search_model_is_charged_its_search_even_unanswered() -> None:
    prices = {**TOOL_PRICES, "gpt-4o-mini-search-preview": {"input": "0.15", "output": "0.60"}}
    up = OpenAIUpstream(parse_config({"prices": prices, "call_prices": CALL_PRICES}, env={}))
    body = {
        "model": "gpt-4o-mini-search-preview",
        "messages": [{"role": "user", "content": "x" * 4000}],
    }
    result = up.unanswered(up.route("POST", "/chat/completions"), body)
    assert result.usage is not None and result.usage.cost == Decimal("0.00015") + Decimal("0.03")


SONAR_MODELS = [
    "sonar",
    "sonar-pro",
    "sonar-reasoning",
    "sonar-reasoning-pro",
    "Sonar-Pro",
    "perplexity/sonar",
    "perplexity/sonar-pro",
    "perplexity/sonar-reasoning-pro",
    "perplexity/sonar:nitro",
    "openrouter/perplexity/sonar",  # LiteLLM's provider/model
    # A router's name for its deployment (LiteLLM's own example, review
    # R-SONAR-2), and Perplexity's earlier names.
    "perplexity-sonar-reasoning-model",
    "llama-3.1-sonar-small-128k-online",
    "sonar_clone",
]
# Names that hold the letters, not the word, and are no Perplexity model: priced
# by their tokens alone.
NOT_SONAR = ["sonarqube-coder", "acme/mysonar-7b", "personar-8b", "gpt-4o-mini"]


@pytest.mark.parametrize("model", SONAR_MODELS + NOT_SONAR)
@pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "streamed"])
def test_a_sonar_answer_is_charged_one_search_and_counts_one(model: str, streamed: bool) -> None:
    # Perplexity bills a Sonar answer its tokens plus one request fee
    # (docs.perplexity.ai/getting-started/pricing), whatever number of queries
    # the usage reports it ran (num_search_queries): one chat_web_search.
    prices = {model: {"input": "0.15", "output": "0.60"}}
    up = OpenAIUpstream(parse_config({"prices": prices, "call_prices": CALL_PRICES}, env={}))
    body = {"model": model, "messages": [{"role": "user", "content": "news?"}]}
    route = up.route("POST", "/chat/completions")
    _prepare(up, "/chat/completions", dict(body))
    headers = {"x-fake-scenario": "perplexity", "x-fake-usage-extra": '{"num_search_queries": 3}'}
    answer = _fake("/chat/completions", body, **headers)
    if streamed:
        meter = up.stream_meter(route, {**body, "stream": True})
        for event in SSEDecoder().feed(b"".join(answer.chunks())):
            meter.feed(event)
        result = meter.finish(cut=False)
    else:
        result = up.meter_blocking(route, body, orjson.dumps(answer.chat_completion()))
    searches = 0 if model in NOT_SONAR else 1
    assert result.usage is not None and result.usage.total_tokens == 19
    assert result.usage.cost == TOKENS_COST + searches * Decimal("0.03")
    assert result.web_searches == searches
    assert up.asks_for_web_search(route, body) is bool(searches)
    assert up.unanswered(route, body).web_searches == searches


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/chat/completions", {"model": "sonar-deep-research"}, "model_not_bounded"),
        ("/chat/completions", {"model": "perplexity/sonar-deep-research"}, "model_not_bounded"),
        ("/chat/completions", {"model": "Sonar-Deep-Research"}, "model_not_bounded"),
        ("/chat/completions", {"model": "sonar-pro", "models": ["sonar-deep-research"]},
         "model_not_bounded"),
        ("/responses", {"model": "sonar-deep-research"}, "model_not_bounded"),
        ("/completions", {"model": "sonar"}, "option_not_priced"),
        ("/chat/completions", {"model": "perplexity/sonar-pro-search"}, "option_not_priced"),
        ("/responses", {"model": "perplexity/sonar"}, "option_not_priced"),
        # (A fallback that searches, off a chat: dearer than the model, refused first.)
        ("/responses", {"model": "gpt-4o-mini", "models": ["perplexity/sonar"]},
         "model_fallback_not_allowed"),
        ("/chat/completions",
         {"model": "sonar", "web_search_options": {"search_context_size": "medium"}},
         "option_not_priced"),
        ("/chat/completions",
         {"model": "sonar-pro", "web_search_options": {"search_context_size": "high"}},
         "option_not_priced"),
        ("/chat/completions",
         {"model": "sonar-pro", "web_search_options": {"search_type": "pro"}},
         "option_not_priced"),
        ("/chat/completions",
         {"model": "sonar-pro", "web_search_options": {"search_type": "auto"}},
         "option_not_priced"),
        ("/chat/completions",
         {"model": "sonar", "web_search_options": {"search_context_size": 3}},
         "option_not_priced"),
    ],
)  # fmt: skip
def test_a_sonar_search_that_one_call_price_cannot_hold_is_refused(
    path: str, body: dict[str, Any], code: str
) -> None:
    # Deep Research bills each of the searches it decides to run; "medium" and
    # "high" search contexts and Pro Search bill a dearer request fee; off a chat
    # completion, the search would be neither charged nor counted.
    names = [body["model"], *body.get("models", [])]
    prices = {name: {"input": "3", "output": "15"} for name in names}
    up = OpenAIUpstream(parse_config({"prices": prices, "call_prices": CALL_PRICES}, env={}))
    with pytest.raises(Forbidden) as refused:
        _prepare(up, path, {**body, "messages": [{"role": "user", "content": "hi"}]})
    assert refused.value.code == code
    assert recognise(refused.value.message) is not None  # a catalogued message


@pytest.mark.parametrize(
    "options",
    [{}, {"search_context_size": "low"}, {"search_type": "fast"}, {"search_context_size": None},
     {"user_location": {"country": "VN"}}],
)  # fmt: skip
def test_a_sonar_search_at_the_default_fee_is_forwarded(options: dict[str, Any]) -> None:
    up = OpenAIUpstream(
        parse_config({"prices": {"sonar-pro": {"input": "3"}}, "call_prices": CALL_PRICES}, env={})
    )
    body = {"model": "sonar-pro", "messages": [], "web_search_options": options}
    assert _prepare(up, "/chat/completions", body).body is not None
    # The same options on an OpenAI search model are OpenAI's to bill, as before.
    up = tooled()
    body = {"model": "gpt-4o-mini", "web_search_options": {"search_context_size": "high"}}
    assert _prepare(up, "/chat/completions", body).body is not None


def test_a_call_price_in_another_currency_than_the_models_is_refused_at_load() -> None:
    data = {
        "prices": {"gpt-4o-mini": {"input": "1", "currency": "EUR"}},
        "call_prices": {"openai.web_search": {"price": "0.01"}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert "call_prices.openai.web_search.currency" in info.value.message
    assert "prices.gpt-4o-mini.currency" in info.value.message
    # Another dialect's call prices are not added to OpenAI's answers, but they are
    # added into the same totals per user: one currency for them too (issue 25).
    other = {**data, "call_prices": {"dify.text_to_audio": {"price": "0.01"}}}
    with pytest.raises(ConfigError, match=r"call_prices\.dify\.text_to_audio\.currency"):
        parse_config(other, env={})
    euro = {**data, "call_prices": {"dify.text_to_audio": {"price": "0.01", "currency": "EUR"}}}
    parse_config(euro, env={})


def test_tool_calls_a_failed_response_ran_are_charged_but_a_failed_chats_search_is_not() -> None:
    up = tooled()
    body = {"model": "gpt-4o-mini", "stream": True, "tools": [{"type": "web_search"}]}
    meter = up.stream_meter(up.route("POST", "/responses"), body)
    events = _response_with_calls("web_search_call").response_events()[:3]
    error = b'event: error\ndata: {"type": "error", "code": "server_error", "message": "x"}\n\n'
    for event in SSEDecoder().feed(b"".join(events) + error):
        meter.feed(event)
    result = meter.finish(cut=False)
    assert result.outcome == "error"
    assert result.usage is not None and result.usage.cost == Decimal("0.01")
    assert result.usage.total_tokens == 0 and result.usage.estimated
    # A chat completion that failed before any text: its per-answer search is not charged.
    chat = {"model": "gpt-4o-mini", "stream": True, "web_search_options": {}}
    meter = up.stream_meter(up.route("POST", "/chat/completions"), chat)
    for event in SSEDecoder().feed(
        b'data: {"error": {"message": "x", "code": "server_error"}}\n\n'
    ):
        meter.feed(event)
    result = meter.finish(cut=False)
    assert result.outcome == "error" and result.usage is None


# --- audio tokens at the audio rate (issue 20) ------------------------------------------

AUDIO_PRICES = {
    "gpt-4o-audio-preview": {
        "input": "2.50",
        "output": "10",
        "audio_input": "40",
        "audio_output": "80",
    }
}
AUDIO = {"x-fake-audio-prompt-tokens": "4", "x-fake-audio-completion-tokens": "5"}
# 12 prompt tokens (4 of them audio), 7 completion tokens (5 of them audio):
# 8 * 2.50 + 4 * 40 + 2 * 10 + 5 * 80 = 600 per million, and one audio answer.
AUDIO_COST = Decimal("0.0006") + Decimal("0.005")


@pytest.mark.parametrize("streamed", [False, True])
def test_audio_tokens_are_priced_at_the_models_audio_rates(streamed: bool) -> None:
    data = {"prices": AUDIO_PRICES, "call_prices": CALL_PRICES}
    up = OpenAIUpstream(parse_config(data, env={}))
    body: dict[str, Any] = {
        "model": "gpt-4o-audio-preview",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "pcm16"},
    }
    route = up.route("POST", "/chat/completions")
    if streamed:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    _prepare(up, "/chat/completions", body)
    answer = _fake("/chat/completions", body, **AUDIO)
    if streamed:
        meter = up.stream_meter(route, body)
        for event in SSEDecoder().feed(b"".join(answer.chunks())):
            meter.feed(event)
        result = meter.finish(cut=False)
    else:
        result = up.meter_blocking(route, body, orjson.dumps(answer.chat_completion()))
    assert result.usage is not None and result.usage.cost == AUDIO_COST


@pytest.mark.parametrize(
    ("price", "cost"),
    [
        # audio tokens at the text rate when no audio price is set
        (Price(input=Decimal(1), output=Decimal(2)), Decimal(10 * 1 + 6 * 2)),
        (
            Price(
                input=Decimal(1), output=Decimal(2), audio_input=Decimal(5), audio_output=Decimal(9)
            ),
            Decimal(7 * 1 + 3 * 5 + 2 * 2 + 4 * 9),
        ),
        # more audio reported than tokens: no more than the tokens are re-priced
        (
            Price(input=Decimal(1), output=Decimal(2), audio_output=Decimal(9)),
            Decimal(10 * 1 + 6 * 9),
        ),
    ],
)
def test_price_cost_with_audio(price: Price, cost: Decimal) -> None:
    usage = Usage(10, 6, 16)
    audio = Audio(3, 4) if price.audio_input is not None else Audio(3, 99)
    assert price.cost(usage, audio=audio) == cost.scaleb(-6)


def test_priced_keeps_every_field_of_the_metered_answer() -> None:
    # Every field away from its default, so a field priced() forgets to pass on shows.
    metered = Metered(
        "chatcmpl-answer-id",
        "task",
        "conversation",
        Usage(10, 5, 15),
        "cut",
        error_code="code",
        metadata={"k": "v"},
        model=None,
        unpriced_calls=("a.call",),
    )
    for f in dataclasses.fields(Metered):
        if f.name not in ("model", "web_searches"):  # set by priced() itself
            assert getattr(metered, f.name) != f.default, f.name
    priced = dialect().priced(metered, "gpt-4o-mini")
    cost = (10 * Decimal("0.15") + 5 * Decimal("0.60")).scaleb(-6)
    assert priced == dataclasses.replace(
        metered, usage=Usage(10, 5, 15, cost=cost), model="gpt-4o-mini", web_searches=0
    )


# --- answers that name the account's objects (review-sec F3) ---------------------------


_FILE_PART = {"type": "file", "file": {"file_id": "file-1"}}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("chat/completions", {"messages": [{"role": "user", "content": [_FILE_PART]}]}),
        ("responses", {"input": [{"role": "user", "content": [
            {"type": "input_file", "file_id": "file-1"}]}]}),
        ("responses", {"input": [{"role": "user", "content": [
            {"type": "input_image", "file_id": "file-1"}]}]}),
        ("responses", {"input": [{"type": "function_call_output", "call_id": "c", "output": [
            {"type": "input_file", "file_id": "file-1"}]}]}),
        ("responses", {"prompt": {"id": "pmpt_1", "variables": {
            "doc": {"type": "input_file", "file_id": "file-1"}}}}),
        ("responses", {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}),
        ("responses", {"tools": [{"type": "code_interpreter", "container": "cntr_1"}]}),
        ("responses", {"tools": [{"type": "code_interpreter",
                                  "container": {"type": "auto", "file_ids": ["f"]}}]}),
    ],
)  # fmt: skip
def test_an_answer_naming_the_accounts_files_is_the_operators(
    path: str, body: dict[str, Any]
) -> None:
    up = dialect()
    route = up.route("POST", path)
    assert route.by_body
    assert up.refine(route, {"model": "gpt-4o-mini", **body}).role == "operator"


def test_files_sent_inline_and_new_containers_stay_the_callers() -> None:
    """What names no stored object of the account is the caller's own: a file
    sent inline, a fresh container, a tool's JSON arguments (text to the
    upstream), a file part whose id is null."""
    up = dialect()
    inline = {"type": "file", "file": {"file_data": "data:...", "filename": "a.pdf"}}
    null_id = {"type": "file", "file": {"file_id": None, "file_data": "data:..."}}
    call = {"id": "c", "type": "function",
            "function": {"name": "f", "arguments": '{"file_id": "x"}'}}  # fmt: skip
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": [inline, null_id]}],
        [{"role": "assistant", "tool_calls": [call]}],
    ]
    responses = [
        {"input": "hi"},
        {"input": [{"role": "user", "content": [
            {"type": "input_file", "file_data": "data:...", "filename": "a.pdf"}]}]},
        {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
        {"tools": [{"type": "web_search"}]},
    ]  # fmt: skip
    chat = up.route("POST", "chat/completions")
    assert chat.by_body
    for messages in chats:
        assert up.refine(chat, {"model": "gpt-4o-mini", "messages": messages}) is chat
    response = up.route("POST", "responses")
    for body in responses:
        assert up.refine(response, {"model": "gpt-4o-mini", **body}) is response


# --- web search, for web_searches_per_day (review-sec F4) --------------------------------


@pytest.mark.parametrize(
    ("path", "body", "asks"),
    [
        ("chat/completions", {"model": "gpt-4o-mini"}, False),
        ("chat/completions", {"model": "gpt-4o-mini", "web_search_options": {}}, True),
        ("chat/completions", {"model": "gpt-4o-mini-search-preview"}, True),
        ("chat/completions", {"model": "gpt-5-search-api-2025-10-14"}, True),
        ("chat/completions", {"model": "sonar"}, True),
        ("chat/completions", {"model": "sonar-reasoning-pro"}, True),
        ("chat/completions", {"model": "perplexity/sonar-pro"}, True),
        ("chat/completions", {"model": "perplexity/sonar:floor"}, True),
        ("chat/completions", {"model": "sonarqube-coder"}, False),
        ("chat/completions", {"model": "acme/mysonar-7b"}, False),
        ("responses", {"model": "gpt-4o-mini", "tools": [{"type": "function", "name": "f"}]}, False),
        ("responses", {"model": "gpt-4o-mini", "tools": [{"type": "web_search"}]}, True),
        ("responses", {"model": "gpt-4o-mini",
                       "tools": [{"type": "web_search_preview_2025_03_11"}]}, True),
        ("completions", {"model": "gpt-4o-mini", "web_search_options": {}}, False),
        ("embeddings", {"model": "text-embedding-3-small"}, False),
    ],
)  # fmt: skip
def test_the_requests_that_may_search_the_web(path: str, body: dict[str, Any], asks: bool) -> None:
    up = dialect()
    assert up.asks_for_web_search(up.route("POST", path), body) is asks


def test_an_answer_counts_the_web_searches_it_ran() -> None:
    """A response's web_search_call items, and a chat completion's search (one per
    answer), as the settle counts them against web_searches_per_day."""
    up = dialect(call_prices={"openai.web_search": {"price": "0.01"},
                              "openai.chat_web_search": {"price": "0.03"}})  # fmt: skip
    metered = Metered(None, None, None, Usage(10, 5, 15), "complete")
    response = up.route("POST", "responses")
    body = {"model": "gpt-4o-mini", "tools": [{"type": "web_search"}]}
    calls = up.calls(response, body, {"web_search": 3, "code_interpreter": 1})
    assert up.priced(metered, "gpt-4o-mini", calls=calls).web_searches == 3
    assert up.priced(metered, "gpt-4o-mini", calls={}).web_searches == 0
    chat = up.route("POST", "chat/completions")
    calls = up.calls(chat, {"model": "gpt-4o-mini", "web_search_options": {}}, {})
    assert up.priced(metered, "gpt-4o-mini", calls=calls).web_searches == 1


# --- Anthropic's prompt cache reported by a router (review4 R4-2) -------------------------

# The usage objects of routers in front of Claude for one answer: 10 uncached
# prompt tokens, 300 read from the cache, 1,000 written to it (400 for 5
# minutes, 600 for an hour), 20 output tokens. LiteLLM (litellm/types/utils.py)
# and OpenRouter count every prompt token in prompt_tokens; Portkey only the
# uncached ones (Anthropic's input_tokens), and all of them in total_tokens.
_SPLIT = {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600}
ROUTER_USAGES: dict[str, tuple[dict[str, Any], tuple[int, int, int, int, int]]] = {
    "litellm": (
        {"prompt_tokens": 1310, "completion_tokens": 20, "total_tokens": 1330,
         "prompt_tokens_details": {"cached_tokens": 300, "cache_creation_tokens": 1000,
                                   "cache_creation_token_details": _SPLIT},
         "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 300},
        (1310, 1330, 300, 1000, 600),
    ),
    "litellm-no-split": (
        {"prompt_tokens": 1310, "completion_tokens": 20, "total_tokens": 1330,
         "prompt_tokens_details": {"cached_tokens": 300}, "cache_creation_input_tokens": 1000},
        (1310, 1330, 300, 1000, 0),
    ),
    # Portkey from 1.14.0 (src/providers/anthropic/chatComplete.ts): the reads
    # in cached_tokens and named apart, the writes named apart.
    "portkey": (
        {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 1330,
         "prompt_tokens_details": {"cached_tokens": 300},
         "cache_read_input_tokens": 300, "cache_creation_input_tokens": 1000},
        (1310, 1330, 300, 1000, 0),
    ),
    "portkey-reads-only": (
        {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 330,
         "prompt_tokens_details": {"cached_tokens": 300},
         "cache_read_input_tokens": 300, "cache_creation_input_tokens": 0},
        (310, 330, 300, 0, 0),
    ),
    # Portkey before 1.14.0: no prompt_tokens_details, the reads named only
    # apart (review5 R5-6: they were read as uncached prompt tokens).
    "portkey-before-1.14": (
        {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 1330,
         "cache_read_input_tokens": 300, "cache_creation_input_tokens": 1000},
        (1310, 1330, 300, 1000, 0),
    ),
    "portkey-before-1.14-reads-only": (
        {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 330,
         "cache_read_input_tokens": 300},
        (310, 330, 300, 0, 0),
    ),
    "openrouter": (
        {"prompt_tokens": 1310, "completion_tokens": 20, "total_tokens": 1330,
         "prompt_tokens_details": {"cached_tokens": 300, "cache_write_tokens": 1000}},
        (1310, 1330, 300, 1000, 0),
    ),
    "anthropic-split-passed-on": (
        {"prompt_tokens": 1310, "completion_tokens": 20, "total_tokens": 1330,
         "prompt_tokens_details": {"cached_tokens": 300},
         "cache_creation_input_tokens": 1000, "cache_creation": _SPLIT},
        (1310, 1330, 300, 1000, 600),
    ),
    # A prompt fewer than its own cache counts, the total no help: they are not in it.
    "prompt-without-its-cache": (
        {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
         "prompt_tokens_details": {"cached_tokens": 300}, "cache_creation_input_tokens": 1000},
        (1310, 1330, 300, 1000, 0),
    ),
    "split-past-the-total": (
        {"prompt_tokens": 1310, "completion_tokens": 20, "total_tokens": 1330,
         "prompt_tokens_details": {"cached_tokens": 300, "cache_creation_tokens": 900,
                                   "cache_creation_token_details": _SPLIT}},
        (1310, 1330, 300, 1000, 600),
    ),
    "responses": (
        {"input_tokens": 1310, "output_tokens": 20, "total_tokens": 1330,
         "input_tokens_details": {"cached_tokens": 300, "cache_creation_tokens": 1000}},
        (1310, 1330, 300, 1000, 0),
    ),
    # OpenAI itself: no cache writes named, every count as it was.
    "openai": (
        {"prompt_tokens": 1310, "completion_tokens": 20, "total_tokens": 1330,
         "prompt_tokens_details": {"cached_tokens": 300, "audio_tokens": 0}},
        (1310, 1330, 300, 0, 0),
    ),
}  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), ROUTER_USAGES.values(), ids=ROUTER_USAGES.keys())
def test_a_routers_cache_writes_are_read_as_parts_of_the_prompt(
    raw: dict[str, Any], expected: tuple[int, int, int, int, int]
) -> None:
    usage = usage_from(raw)
    counts = (
        usage.prompt_tokens,
        usage.total_tokens,
        usage.cached_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
    )
    assert counts == expected
    assert usage.completion_tokens == 20 and usage.clamped == ()


def test_a_cache_split_that_is_not_an_object_is_named_and_taken_as_one_hour() -> None:
    raw = {"prompt_tokens": 1310, "completion_tokens": 20, "cache_creation_input_tokens": 1000,
           "cache_creation": "1h"}  # fmt: skip
    usage = usage_from(raw)
    assert usage.clamped == ("cache_creation='1h'",)
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (1000, 1000)
    assert openai_wire.unattributed_cache_writes(raw) == 0


@pytest.mark.parametrize(
    ("name", "unattributed"),
    [("litellm", 0), ("litellm-no-split", 1000), ("portkey", 1000),
     ("portkey-before-1.14", 1000), ("openrouter", 1000), ("split-past-the-total", 0),
     ("openai", 0)],
)  # fmt: skip
def test_unattributed_cache_writes(name: str, unattributed: int) -> None:
    assert openai_wire.unattributed_cache_writes(ROUTER_USAGES[name][0]) == unattributed


# Claude Sonnet's prices, per million tokens.
_CLAUDE_PRICE = {"input": "3", "cached_input": "0.30", "cache_write_input": "3.75",
                 "cache_write_1h_input": "6", "output": "15"}  # fmt: skip
_UNCACHED, _READ, _WRITE_5M, _WRITE_1H, _OUT = (
    Decimal(r) for r in ("3", "0.30", "3.75", "6", "15")
)


def _charged(raw: dict[str, Any], ttl: str | None) -> Decimal:
    """What the dialect charges a blocking chat completion with usage ``raw``
    whose request set a cache breakpoint of ``ttl`` (None: no breakpoint)."""
    up = OpenAIUpstream(
        parse_config({"upstream": {"kind": "openai"}, "prices": {"claude": _CLAUDE_PRICE}}, env={})
    )
    content: list[dict[str, Any]] = [{"type": "text", "text": "a document"}]
    if ttl is not None:
        content[0]["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    body = {"model": "claude", "messages": [{"role": "user", "content": content}]}
    route = up.refine(up.route("POST", "/chat/completions"), body)
    prepared = up.prepare(route, body, b"", "u", method="POST", request_id="r")
    answer = {"object": "chat.completion", "model": "claude", "usage": raw}
    metered = up.meter_blocking(route, prepared.body, orjson.dumps(answer))
    assert metered.usage is not None
    return metered.usage.cost


@pytest.mark.parametrize(
    ("name", "ttl", "terms"),
    [
        # The split says which writes are whose: 400 at 3.75, 600 at 6.
        ("litellm", "1h", ((10, _UNCACHED), (300, _READ), (400, _WRITE_5M), (600, _WRITE_1H))),
        ("litellm", "5m", ((10, _UNCACHED), (300, _READ), (400, _WRITE_5M), (600, _WRITE_1H))),
        # No split: a 1-hour request's writes are all taken as 1-hour ones...
        ("litellm-no-split", "1h", ((10, _UNCACHED), (300, _READ), (1000, _WRITE_1H))),
        ("portkey", "1h", ((10, _UNCACHED), (300, _READ), (1000, _WRITE_1H))),
        ("openrouter", "1h", ((10, _UNCACHED), (300, _READ), (1000, _WRITE_1H))),
        # ...a 5-minute one's as 5-minute ones.
        ("litellm-no-split", "5m", ((10, _UNCACHED), (300, _READ), (1000, _WRITE_5M))),
        ("portkey", None, ((10, _UNCACHED), (300, _READ), (1000, _WRITE_5M))),
        ("openrouter", "5m", ((10, _UNCACHED), (300, _READ), (1000, _WRITE_5M))),
        ("portkey-reads-only", None, ((10, _UNCACHED), (300, _READ))),
        ("portkey-before-1.14", "1h", ((10, _UNCACHED), (300, _READ), (1000, _WRITE_1H))),
        ("portkey-before-1.14", None, ((10, _UNCACHED), (300, _READ), (1000, _WRITE_5M))),
        ("portkey-before-1.14-reads-only", None, ((10, _UNCACHED), (300, _READ))),
    ],
)
def test_a_routers_cache_writes_are_charged_once_at_their_rate(
    name: str, ttl: str | None, terms: tuple[tuple[int, Decimal], ...]
) -> None:
    # Each prompt token once: the writes and reads are parts of the prompt
    # (LiteLLM's prompt_tokens holds them; Anthropic's input_tokens does not).
    expected = (sum(count * rate for count, rate in terms) + 20 * _OUT) / Decimal(1_000_000)
    assert _charged(ROUTER_USAGES[name][0], ttl) == expected


def test_the_charge_of_a_routers_cache_writes_in_figures() -> None:
    # 10 x 3 + 300 x 0.30 + 1,000 x 6 + 20 x 15 = 6,420 per million (5 minutes:
    # 1,000 x 3.75, 4,170); before, the writes at input: 1,010 x 3 + 300 x 0.30
    # + 20 x 15 = 3,420.
    assert _charged(ROUTER_USAGES["litellm-no-split"][0], "1h") == Decimal("0.00642")
    assert _charged(ROUTER_USAGES["litellm-no-split"][0], "5m") == Decimal("0.00417")


def test_portkeys_cache_reads_named_apart_are_charged_in_figures() -> None:
    # Review5 R5-6: Portkey before 1.14 names its reads only in
    # cache_read_input_tokens. 10 x 3 + 300 x 0.30 + 1,000 x 3.75 + 20 x 15 =
    # 4,170 per million; before, the reads at input: 310 x 3 + 1,000 x 3.75 +
    # 20 x 15 = 4,980.
    assert _charged(ROUTER_USAGES["portkey-before-1.14"][0], None) == Decimal("0.00417")
    # The same reads in both places (LiteLLM, Portkey 1.14) are charged once.
    assert _charged(ROUTER_USAGES["portkey"][0], None) == Decimal("0.00417")


def test_reads_named_apart_and_in_cached_tokens_are_read_once_the_larger() -> None:
    raw = {"prompt_tokens": 1310, "completion_tokens": 20, "total_tokens": 1330,
           "prompt_tokens_details": {"cached_tokens": 200},
           "cache_read_input_tokens": 300, "cache_creation_input_tokens": 1000}  # fmt: skip
    usage = usage_from(raw)
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (1310, 300, 1000)
    raw["prompt_tokens_details"] = {"cached_tokens": 400}
    assert usage_from(raw).cached_tokens == 400


def test_unreadable_reads_named_apart_are_named_and_bounded() -> None:
    raw = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 1330,
           "cache_read_input_tokens": "many", "cache_creation_input_tokens": 1000}  # fmt: skip
    usage = usage_from(raw)
    assert usage.clamped == ("cache_read_input_tokens='many'",)
    # Read as none: the prompt from the total, every token not written as input.
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (1310, 0, 1000)


def _claude_without_one_hour() -> OpenAIUpstream:
    price = {k: v for k, v in _CLAUDE_PRICE.items() if k != "cache_write_1h_input"}
    return OpenAIUpstream(
        parse_config({"upstream": {"kind": "openai"}, "prices": {"claude": price}}, env={})
    )


# LiteLLM's cache_control_injection_points (AnthropicCacheControlHook): LiteLLM
# sets each point's control - ttl included - as the cache_control of the
# messages it names, before the call to Claude (review5 R5-7).
_INJECTED_ONE_HOUR: dict[str, Any] = {
    "model": "claude",
    "messages": [
        {"role": "system", "content": "a long document"},
        {"role": "user", "content": "hi"},
    ],
    "cache_control_injection_points": [
        {"location": "message", "role": "system", "control": {"type": "ephemeral", "ttl": "1h"}}
    ],
}


def test_a_one_hour_ttl_litellm_injects_is_refused_where_it_has_no_price() -> None:
    up = _claude_without_one_hour()
    route = up.refine(up.route("POST", "/chat/completions"), _INJECTED_ONE_HOUR)
    with pytest.raises(Forbidden) as refused:
        up._check_priced(route, _INJECTED_ONE_HOUR)
    assert refused.value.code == "option_not_priced"
    assert "cache_control.ttl: '1h'" in str(refused.value)


@pytest.mark.parametrize(
    ("points", "refused"),
    [
        ([{"location": "message", "index": -1, "control": {"type": "ephemeral", "ttl": "2h"}}],
         True),
        ([{"location": "tool_config", "control": {"type": "ephemeral", "ttl": 3600}}], True),
        ([{"location": "message", "role": "system", "control": {"type": "ephemeral",
                                                               "ttl": "5m"}}], False),
        ([{"location": "message", "role": "system"}], False),  # LiteLLM's default: 5 minutes
        ([{"location": "message", "role": "system", "control": None}], False),
        ("not a list", False),
        (["not a point"], False),
    ],
)  # fmt: skip
def test_the_ttls_litellm_injects_are_checked_as_cache_controls_are(
    points: object, refused: bool
) -> None:
    up = _claude_without_one_hour()
    body = {**_INJECTED_ONE_HOUR, "cache_control_injection_points": points}
    route = up.refine(up.route("POST", "/chat/completions"), body)
    if refused:
        with pytest.raises(Forbidden):
            up._check_priced(route, body)
    else:
        up._check_priced(route, body)
    assert not up.asks_for_one_hour_cache(body)


def test_a_one_hour_ttl_litellm_injects_charges_its_writes_at_the_one_hour_rate() -> None:
    # LiteLLM without cache_creation_token_details leaves its writes unattributed:
    # a request that asked for 1 hour has them charged as 1-hour writes.
    # 10 x 3 + 300 x 0.30 + 1,000 x 6 + 20 x 15 = 6,420 per million; before,
    # as 5-minute writes (the ttl not seen), 4,170.
    up = OpenAIUpstream(
        parse_config({"upstream": {"kind": "openai"}, "prices": {"claude": _CLAUDE_PRICE}}, env={})
    )
    assert up.asks_for_one_hour_cache(_INJECTED_ONE_HOUR)
    body = orjson.loads(orjson.dumps(_INJECTED_ONE_HOUR))
    route = up.refine(up.route("POST", "/chat/completions"), body)
    prepared = up.prepare(route, body, b"", "u", method="POST", request_id="r")
    usage = ROUTER_USAGES["litellm-no-split"][0]
    answer = {"object": "chat.completion", "model": "claude", "usage": usage}
    metered = up.meter_blocking(route, prepared.body, orjson.dumps(answer))
    assert metered.usage is not None
    assert metered.usage.cost == Decimal("0.00642")


# --- review 8: a router's routing chosen in the body ---------------------------------------


def _sent_or_refused(extra: dict[str, Any]) -> dict[str, Any] | None:
    """The body a chat completion with ``extra`` is sent upstream with, or None
    when the gateway refuses it (reviews 8 and 9: either is a fix)."""
    up = dialect()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
    try:
        prepared = up.prepare(
            up.route("POST", "/chat/completions"), body, b"", "alice", method="POST", request_id="r"
        )
    except (BadRequest, Forbidden):
        return None
    assert prepared.body is not None
    return prepared.body


@pytest.mark.parametrize(
    "extra",
    [
        {"tags": ["premium-deployments"]},
        {"metadata": {"tags": ["premium-deployments"]}},
        {"litellm_metadata": {"tags": ["premium-deployments"]}},
    ],
)
def test_a_client_cannot_choose_a_routers_tags_in_the_body(extra: dict[str, Any]) -> None:
    # R8-6. x-litellm-tags is dropped as routing a client must not choose
    # (gateway/http.py, the routers' families; docs/security.md). LiteLLM reads
    # the same tags from the body ("tags", and "tags" in its metadata,
    # litellm/proxy/litellm_pre_call_utils.py / get_tags_from_request_body):
    # tag-based routing picks the deployments tagged so, and tag budgets and
    # spend are charged to them. Either they are not forwarded, or refused.
    sent = _sent_or_refused(extra)
    if sent is None:
        return  # refused
    tags = [sent.get("tags")]
    for name in ("metadata", "litellm_metadata"):
        if isinstance(sent.get(name), dict):
            tags.append(sent[name].get("tags"))
    assert [t for t in tags if t is not None] == []


# --- review 9: what LiteLLM reads from the body beyond tags and the end user -------------


def _as_litellm_sends(body: dict[str, Any]) -> dict[str, Any]:
    """The body LiteLLM's proxy sends on to an OpenAI-compatible deployment:
    ``extra_body`` (and every non-OpenAI key) goes to the OpenAI SDK's
    ``extra_body`` (litellm/utils.py, ``add_provider_specific_params_to_optional_params``:
    ``extra_body = dict(passed_params.pop("extra_body", None) or {})``), which
    the SDK merges over the request's own fields (openai-python: extra_body
    wins over ``model``, ``user``, ``service_tier``; checked with the openai
    package in this venv)."""
    sent = {k: v for k, v in body.items() if k != "extra_body"}
    extra = body.get("extra_body")
    if isinstance(extra, dict):
        sent.update(extra)
    return sent


@pytest.mark.parametrize(
    "extra_body",
    [
        {"model": "o1-pro"},  # a model the plan and the price table never allowed
        {"service_tier": "priority"},  # a tier the gateway refuses top-level
        {"user": "victim"},  # the end user the provider (and its abuse checks) sees
        {"web_search_options": {}},  # a paid search without its call price
    ],
)
def test_extra_body_cannot_override_what_the_gateway_checked(extra_body: dict[str, Any]) -> None:
    # R9-1. LiteLLM's proxy passes a request body's `extra_body` to the
    # deployment's OpenAI client, which merges it over the top-level fields.
    # The gateway checks `model`, `service_tier`, `user`, the tools, at top
    # level only and forwards `extra_body` unread: every check is bypassed.
    up = dialect(pricing={"unpriced_models": "refuse"})
    route = up.route("POST", "/chat/completions")
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "extra_body": extra_body,
    }
    try:
        prepared = up.prepare(route, body, b"", "alice", method="POST", request_id="r")
    except (BadRequest, Forbidden):
        return
    assert prepared.body is not None
    sent = _as_litellm_sends(prepared.body)
    assert sent["model"] == "gpt-4o-mini"
    assert sent["user"] == "alice"
    assert sent.get("service_tier") is None
    assert "web_search_options" not in sent


@pytest.mark.parametrize(
    "metadata",
    [
        '{"tags": ["premium-deployments"]}',
        '{"tags": ["premium-deployments"], "purpose": "x"}',
    ],
)
def test_metadata_as_a_json_string_cannot_carry_a_routers_tags(metadata: str) -> None:
    # R9-2. LiteLLM's proxy parses a `metadata` that is a string as JSON
    # (litellm_pre_call_utils.py, "Parse metadata if it's a string"), then
    # routes and budgets by its `tags` (before the versions that strip client
    # tags). drop_router_fields looks only into a dict `metadata`.
    up = dialect()
    route = up.route("POST", "/chat/completions")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body["metadata"] = metadata
    try:
        prepared = up.prepare(route, body, b"", "alice", method="POST", request_id="r")
    except (BadRequest, Forbidden):
        return
    assert prepared.body is not None
    sent = prepared.body.get("metadata")
    if isinstance(sent, str):
        try:
            sent = orjson.loads(sent)
        except orjson.JSONDecodeError:
            sent = None
    assert not (isinstance(sent, dict) and "tags" in sent)


@pytest.mark.parametrize(
    "extra",
    [
        {"input_cost_per_token": 0, "output_cost_per_token": 0},
        {"input_cost_per_second": 0},
        {"metadata": {"model_info": {"input_cost_per_token": 0, "output_cost_per_token": 0}}},
    ],
)
def test_a_client_cannot_set_the_routers_prices(extra: dict[str, Any]) -> None:
    # R9-3. LiteLLM's completion() registers per-request prices process-wide
    # (litellm/main.py, "REGISTER CUSTOM MODEL PRICING -- IF GIVEN":
    # litellm.register_model), and reads `model_info` in metadata as the
    # deployment's prices: every later call of that model through the router
    # is costed at the client's price - the operator's key, team and end-user
    # budgets at LiteLLM stop counting. (LiteLLM's newest proxy strips them,
    # `_CLIENT_PRICING_CONTROL_FIELDS`; the versions before do not.)
    sent = _sent_or_refused(extra)
    if sent is None:
        return  # refused
    metadata = sent.get("metadata")
    found = [k for k in sent if k.endswith(("_cost_per_token", "_cost_per_second"))]
    if isinstance(metadata, dict) and "model_info" in metadata:
        found.append("metadata.model_info")
    assert found == []


@pytest.mark.parametrize(
    "extra",
    [
        {"timeout": 0.5},  # x-litellm-timeout, dropped
        {"stream_timeout": 0.5},  # x-litellm-stream-timeout, dropped
        {"num_retries": 50},  # x-litellm-num-retries, dropped
        {"metadata": {"spend_logs_metadata": {"team": "victim"}}},  # x-litellm-spend-logs-metadata
        {"api_base": "http://169.254.169.254/latest", "api_key": "x"},  # LiteLLM lets both through
    ],
)
def test_the_body_twins_of_litellms_dropped_headers_are_not_forwarded(
    extra: dict[str, Any],
) -> None:
    # R9-4. The gateway drops x-litellm-timeout, -stream-timeout, -num-retries
    # and -spend-logs-metadata (the x-litellm-* family, docs/security.md).
    # LiteLLM reads the same controls from the body as call parameters
    # (Router: kwargs["num_retries"] = kwargs.get("num_retries", ...);
    # completion(timeout=...)), and takes `api_base` when `api_key` comes with
    # it (auth_utils.py, is_request_body_safe / check_complete_credentials).
    sent = _sent_or_refused(extra)
    if sent is None:
        return  # refused
    metadata = sent.get("metadata")
    left = [k for k in ("timeout", "stream_timeout", "num_retries", "api_base") if k in sent]
    if isinstance(metadata, dict) and "spend_logs_metadata" in metadata:
        left.append("metadata.spend_logs_metadata")
    assert left == []


def test_a_router_in_front_of_claude_gets_no_unpriced_beta_header() -> None:
    # R9-6. LiteLLM's proxy forwards a client's anthropic-beta header to its
    # Anthropic, Bedrock and Vertex deployments on every route, /chat/completions
    # included, with no setting needed (litellm_pre_call_utils.py,
    # `add_provider_specific_headers_to_request`, ANTHROPIC_API_HEADERS). The
    # Anthropic dialect refuses `context-1m-*` (R8-7); the OpenAI dialect, the
    # one used for a router in front of Claude (cache_ttl.py), checks nothing:
    # the 1M-token context is answered at Anthropic's long-context rates and
    # charged at the table's.
    up = dialect()
    headers = request_headers(
        [(b"authorization", b"Bearer k"), (b"anthropic-beta", b"context-1m-2025-08-07")],
        b"x-user",
        up.key_header,
    )
    try:
        up.check_headers(up.route("POST", "/chat/completions"), headers.forward)
    except Forbidden:
        return
    assert [v for k, v in headers.forward if k.replace(b"_", b"-") == b"anthropic-beta"] == []


@pytest.mark.parametrize(
    "plugins",
    [
        [{"id": "web"}],  # $4 per 1,000 results, 5 by default
        [{"id": "web", "max_results": 50}],  # $0.20 a request
    ],
)
def test_openrouters_paid_web_plugin_is_priced_or_refused(plugins: list[Any]) -> None:
    # R9-7. OpenRouter runs a web search for any model when the body lists
    # its `web` plugin (openrouter.ai/docs/features/web-search: "$4 per 1000
    # results", `max_results` chosen by the request). The gateway refuses a
    # chat's `web_search_options` without [call_prices."openai.chat_web_search"]
    # and counts it against web_searches_per_day; `plugins` is forwarded
    # unread: an unpriced, uncounted search on the operator's credits.
    up = dialect()
    route = up.route("POST", "/chat/completions")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body["plugins"] = plugins
    try:
        prepared = up.prepare(route, body, b"", "alice", method="POST", request_id="r")
    except Forbidden:
        return
    assert prepared.body is not None
    assert "plugins" not in prepared.body or up.asks_for_web_search(route, prepared.body)


@pytest.mark.parametrize(
    ("path", "plugins"),
    [
        ("/chat/completions", [{"id": "file-parser", "pdf": {"engine": "mistral-ocr"}}]),
        ("/chat/completions", [{"id": "web"}, {"id": "response-healing"}]),
        ("/chat/completions", ["web"]),
        ("/responses", [{"id": "web"}]),
    ],
)
def test_an_openrouter_plugin_no_price_covers_is_refused(path: str, plugins: list[Any]) -> None:
    """Review 9, R9-7: OpenRouter bills its plugins beside the model (OCR per
    page, search per result); only a chat's web search has a price here."""
    up = dialect()
    with pytest.raises(Forbidden) as refused:
        _prepare(up, path, {"model": "gpt-4o-mini", "plugins": plugins})
    assert refused.value.code == "tool_not_priced"


@pytest.mark.parametrize("field", ["extra_body", "api_base", "base_url", "api_key"])
def test_a_field_a_router_reads_over_the_checked_ones_is_refused(field: str) -> None:
    """Review 9, R9-1 and R9-4: refused with a clear error, not forwarded."""
    up = dialect()
    with pytest.raises(BadRequest) as refused:
        _prepare(up, "/chat/completions", {"model": "gpt-4o-mini", field: {"model": "o1-pro"}})
    assert refused.value.code == "invalid_param" and field in refused.value.message


# --- review 10: OpenRouter's web search by other roads ------------------------------------


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "openrouter:web_search"},
        {"type": "openrouter:web_search", "parameters": {"max_results": 25}},
        {"type": "openrouter:web_fetch"},
        {"type": "openrouter:image_generation"},
        # LiteLLM passes Anthropic's server tools on from a chat to Claude.
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 20},
    ],
    ids=["web_search", "web_search-25", "web_fetch", "image_generation", "claude-web_search"],
)
def test_a_server_tool_on_a_chat_is_priced_or_refused(tool: dict[str, Any]) -> None:
    # R10-1. OpenRouter's server tools are listed in a chat's `tools` array
    # (openrouter.ai/docs/guides/features/server-tools: type prefix
    # `openrouter:*`; web search "0 to N times per request", Exa at $0.004 a
    # result, native engines at the provider's price). The Responses path refuses
    # an unpriced hosted tool by its type; the chat path reads no tool type, so
    # the search (or fetch, or image) is run on the operator's credits, neither
    # priced nor counted against web_searches_per_day. R9-7 closed `plugins`,
    # which OpenRouter now calls deprecated in favour of this tool.
    up = tooled()  # every OpenAI call priced, chat_web_search included
    route = up.route("POST", "/chat/completions")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body["tools"] = [tool]
    try:
        prepared = up.prepare(route, body, b"", "alice", method="POST", request_id="r")
    except Forbidden as refused:
        assert refused.code == "tool_not_priced"
        return
    assert prepared.body is not None
    assert up.calls(route, prepared.body, {}), "forwarded, charged nothing"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/responses", {"model": "gpt-4o-mini:online", "input": "hi"}),
        ("/responses", {"model": "gpt-4o-mini", "input": "hi", "models": ["gpt-4o-mini:online"]}),
        ("/completions", {"model": "gpt-4o-mini:online", "prompt": "hi"}),
    ],
    ids=["responses-online", "responses-online-fallback", "completions-online"],
)
def test_an_online_model_off_the_chat_route_is_priced_or_refused(
    path: str, body: dict[str, Any]
) -> None:
    # R10-2. `:online` is OpenRouter's shorthand for its web plugin on any of
    # its answer endpoints (openrouter.ai/docs/api_reference/responses/web-search
    # documents the plugin on /responses). R9-7 counts `:online` only in
    # `_chat_calls`; on /responses and /completions the model is priced by its
    # name and its web search ($4 per 1,000 results) is neither refused without
    # [call_prices."openai.chat_web_search"] nor counted against
    # web_searches_per_day. A fallback in `models` is compared with `calls`
    # only on chats (check_fallbacks gets calls=None elsewhere).
    prices = {**TOOL_PRICES, "gpt-4o-mini:online": {"input": "0.15", "output": "0.60"}}
    up = OpenAIUpstream(parse_config({"prices": prices}, env={}))  # no call prices
    with pytest.raises(Forbidden):
        _prepare(up, path, body)


@pytest.mark.parametrize(
    "plugin",
    [
        {"id": "web", "max_results": 100},  # $0.40 of Exa results for one call price
        {"id": "web", "engine": "native", "search_context_size": "high"},
    ],
    ids=["max_results-100", "native-high"],
)
def test_a_web_plugin_costlier_than_its_call_price_is_refused(plugin: dict[str, Any]) -> None:
    # R10-3. OpenRouter bills the web plugin per result ($4 per 1,000, 5 by
    # default: $0.02) or, with engine "native", at the provider's search price.
    # The gateway charges one chat_web_search call price whatever the plugin
    # asks: a client multiplies the operator's cost by max_results / 5 for the
    # price of one search.
    up = tooled()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(Forbidden):
        _prepare(up, "/chat/completions", {**body, "plugins": [plugin]})


def test_a_body_extra_headers_cannot_carry_an_unpriced_beta() -> None:
    # R10-4. R9-6 refuses `anthropic-beta: context-1m-*` as a header on the
    # OpenAI routes. LiteLLM's proxy passes the request body to
    # litellm.acompletion(**data), whose `extra_headers` become the provider
    # call's headers: the same beta written in the body is forwarded unread.
    up = tooled()
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "extra_headers": {"anthropic-beta": "context-1m-2025-08-07"},
    }
    try:
        prepared = _prepare(up, "/chat/completions", body)
    except (Forbidden, BadRequest):
        return
    assert "extra_headers" not in prepared.body


def test_a_refused_plugin_is_named_as_a_model_is_shortened() -> None:
    # R10-6. `_check_plugins` quotes the client's plugin id whole (`{name!r}`),
    # where a refused model is shown through model_access.shown_model (cut to
    # its first characters): a 100,000-character id comes back, and goes to the
    # logs, as a 100,000-character message; a non-string id is shown as its
    # Python repr.
    up = dialect()
    body = {"model": "gpt-4o-mini", "messages": [], "plugins": [{"id": "x" * 100_000}]}
    with pytest.raises(Forbidden) as refused:
        _prepare(up, "/chat/completions", body)
    assert len(refused.value.message) < 500


@pytest.mark.parametrize(
    "provider",
    [
        {"order": ["the-dearest-host"], "allow_fallbacks": False},
        {"only": ["the-dearest-host"]},
        {"sort": "throughput"},
        {"max_price": {"prompt": 1000, "completion": 1000}},
    ],
    ids=["order", "only", "sort-throughput", "max_price-raised"],
)
def test_a_routers_provider_choice_cannot_cost_more_than_the_table(
    provider: dict[str, Any],
) -> None:
    # R10-7. OpenRouter's `provider` object (openrouter.ai/docs/features/
    # provider-routing: order, only, allow_fallbacks, sort, max_price) picks which
    # host serves the model; hosts of one open model are priced differently,
    # and OpenRouter bills the one that answered. By default it "load balances
    # ... prioritizing price"; with order/only/sort a client sends every call
    # to the dearest host while the gateway charges the table's one price for
    # the model's name. Forwarded unread on main.
    up = dialect()
    body = {"model": "gpt-4o-mini", "messages": [], "provider": provider}
    try:
        prepared = _prepare(up, "/chat/completions", body)
    except (Forbidden, BadRequest):
        return
    sent = prepared.body.get("provider")
    assert isinstance(sent, dict)
    # Accepted only under a ceiling at the table's price (per million tokens).
    ceiling = sent.get("max_price")
    assert isinstance(ceiling, dict)
    assert Decimal(str(ceiling.get("prompt"))) <= Decimal("0.15")
    assert Decimal(str(ceiling.get("completion"))) <= Decimal("0.60")


# --- review 11: the chat's server tools and OpenRouter's provider filters ----------------

_SERVER_SEARCH_PRICES = {
    **CALL_PRICES,
    "openai.web_search_20250305": {"price": "0.01"},
    "openai.openrouter:web_search": {"price": "0.02"},
}
_CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "tool",
    [
        # (max_uses 1: one search an answer, what one call price holds - R11-2)
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 1},
        {"type": "openrouter:web_search"},
    ],
    ids=["claude-web_search", "openrouter-web_search"],
)
def test_a_chat_server_search_counts_against_web_searches_per_day(tool: dict[str, Any]) -> None:
    # R11-1. Review 10 prices a chat's server tool by its type and
    # asks_for_web_search reads any call with "web_search" in its name, so
    # admission reserves a search; but `priced` counts only `_SEARCH_CALLS`
    # (web_search, web_search_preview, chat_web_search) into
    # Metered.web_searches, which is what the usage event records
    # (proxy.py: int(result.web_searches > 0)). The answer settles with 0
    # searches: the day's count never grows, web_searches_per_day never refuses.
    up = tooled(_SERVER_SEARCH_PRICES)
    route = up.route("POST", "/chat/completions")
    prepared = _prepare(up, "/chat/completions", {**_CHAT, "tools": [tool]})
    assert up.asks_for_web_search(route, prepared.body)
    calls = up.calls(route, prepared.body, {})
    metered = up.priced(
        Metered(None, None, None, Usage(10, 5, 15), "ok"), "gpt-4o-mini", calls=calls
    )
    assert metered.web_searches, "searched, charged, but counted as no web search"


@pytest.mark.parametrize(
    ("tool", "searches"),
    [
        # Anthropic runs up to max_uses searches an answer ($10 per 1,000), none
        # set: as many as the model likes.
        ({"type": "web_search_20250305", "name": "web_search", "max_uses": 20}, 20),
        # OpenRouter bills its search per result ($4 per 1,000); 25 results is
        # five times the default R10-3 bounds the web plugin to.
        ({"type": "openrouter:web_search", "parameters": {"max_results": 25}}, 5),
    ],
    ids=["claude-max_uses-20", "openrouter-max_results-25"],
)
def test_a_chat_server_search_is_bounded_like_the_web_plugin(
    tool: dict[str, Any], searches: int
) -> None:
    # R11-2. A chat's calls are one per answer (`calls` ignores `reported` on
    # chats): the server tool is charged, and held in the money bound, as one
    # call whatever it runs. R10-3 refuses plugins [{"id": "web",
    # "max_results": 25}] for exactly this; the same search as a tool passes.
    up = tooled(_SERVER_SEARCH_PRICES)
    route = up.route("POST", "/chat/completions")
    try:
        prepared = _prepare(up, "/chat/completions", {**_CHAT, "tools": [tool]})
    except Forbidden:
        return
    assert sum(up.calls(route, prepared.body, {}).values()) >= searches


def test_a_responses_server_search_is_held_by_the_web_search_allowance() -> None:
    # R11-3. The same tool on /responses: priced by type at prepare, but
    # asks_for_web_search reads `tool.startswith("web_search")` there, so
    # admission neither checks nor reserves the user's web-search allowance
    # (the chat path says True for the same tool).
    up = tooled(_SERVER_SEARCH_PRICES)
    route = up.route("POST", "/responses")
    body = {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "openrouter:web_search"}]}
    prepared = _prepare(up, "/responses", body)
    assert up.asks_for_web_search(route, prepared.body)


@pytest.mark.parametrize(
    "provider",
    [{"zdr": True}, {"data_collection": "deny"}, {"require_parameters": True}],
    ids=["zdr", "data_collection-deny", "require_parameters"],
)
def test_a_provider_filter_that_can_leave_only_dearer_hosts_is_refused(
    provider: dict[str, Any],
) -> None:
    # R11-4. R10-7 refuses `ignore` and `only` because they can leave OpenRouter
    # only hosts dearer than the one the table prices. zdr ("restrict routing
    # to only ZDR endpoints"), data_collection "deny" ("use only providers which
    # do not collect user data") and require_parameters ("only use providers
    # that support all parameters") filter the same host list the same way
    # (openrouter.ai/docs/features/provider-routing): `ignore` by another name.
    up = tooled()
    with pytest.raises(Forbidden):
        _prepare(up, "/chat/completions", {**_CHAT, "provider": provider})


@pytest.mark.parametrize(
    "provider",
    [{"zdr": False}, {"data_collection": "allow"}, {"require_parameters": False}, {}],
)
def test_provider_choices_that_filter_nothing_pass(provider: dict[str, Any]) -> None:
    # The fix must not refuse the defaults a client library writes out.
    assert _prepare(tooled(), "/chat/completions", {**_CHAT, "provider": provider}).body
