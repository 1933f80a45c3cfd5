"""The OpenAI dialect, sans-io: usage extraction, stream meters, the usage-chunk
filter, request preparation, errors and prices. Tables of cases."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.errors import BadRequest, ConfigError, Forbidden
from gateway.pricing import Price, PriceTable
from gateway.sse import SSEDecoder
from gateway.testing.openai_upstream import ANSWER_PIECES, FakeOpenAI, _Answer
from gateway.upstreams import get_upstream
from gateway.upstreams.openai import OpenAIUpstream
from gateway.upstreams.openai_wire import (
    ChatStreamMeter,
    ResponsesStreamMeter,
    has_usage_object,
    is_usage_only,
    meter_body,
    prompt_chars,
    usage_from,
)
from gateway.upstreams.transforms import DropEvents
from gateway.usage import Usage, estimate_tokens

PRICES = {
    "gpt-4o-mini": Price(
        input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.60")
    ),
    "o3": Price(input=Decimal("2"), output=Decimal("8")),
}


def dialect(prices: dict[str, Any] | None = None) -> OpenAIUpstream:
    table = {"gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60"}}
    return OpenAIUpstream(parse_config({"prices": prices or table}, env={}))


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
        {"prompt_tokens": 1.5},
        {"prompt_tokens": 1, "prompt_tokens_details": "cached"},
        {"input_tokens": 1, "output_tokens_details": {"reasoning_tokens": True}},
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
    assert not has_usage_object(chunk) and not is_usage_only(chunk)


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
def test_a_begun_stream_cut_before_any_text_is_charged_its_prompt(meter: Any, first: bytes) -> None:
    body = {"messages": [{"content": "x" * 40}], "input": "y" * 40}
    cut = meter(body)
    _feed(cut, first)
    usage = cut.finish(cut=True).usage
    assert usage is not None and usage.estimated and usage.prompt_tokens == 20
    ended = meter(body)
    _feed(ended, first)
    assert ended.finish(cut=False).usage is None  # ended without text: nothing produced


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
    # response.created (the model), the first text delta (its envelope's size) and
    # response.completed: the other deltas are measured unparsed.
    assert len(parsed) == 3


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
