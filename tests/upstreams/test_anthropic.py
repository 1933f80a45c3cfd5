"""The Anthropic dialect, sans-io: usage extraction, the stream meter, request
preparation, routes, errors and prices. Tables of cases."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.errors import BadRequest, Forbidden
from gateway.http import request_headers
from gateway.pricing import Price
from gateway.sse import ServerSentEvent, SSEDecoder
from gateway.upstreams import get_upstream
from gateway.upstreams.anthropic import AnthropicUpstream
from gateway.upstreams.anthropic_routes import anthropic_route
from gateway.upstreams.anthropic_wire import (
    MessageStreamMeter,
    meter_message,
    prompt_chars,
    usage_from,
)
from gateway.usage import Usage, estimate_tokens
from tests.fakes.anthropic import ANSWER_PIECES, FakeAnthropic, _Answer

MODEL = "claude-sonnet-4-5"
TABLE = {MODEL: {"input": "3", "cached_input": "0.30", "cache_write_input": "3.75", "output": "15"}}
STEER = {
    "x-fake-input-tokens": "1000",
    "x-fake-cache-read-tokens": "400",
    "x-fake-cache-creation-tokens": "200",
    "x-fake-output-tokens": "700",
}
USAGE = Usage(
    prompt_tokens=1600,
    completion_tokens=700,
    total_tokens=2300,
    cached_tokens=400,
    cache_write_tokens=200,
)
COST = Decimal("0.01437")  # 1000 * 3 + 400 * 0.30 + 200 * 3.75 + 700 * 15 per million
BODY: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Xin chào"}],
}


def dialect(**settings: Any) -> AnthropicUpstream:
    data = {"upstream": {"kind": "anthropic"}, "prices": TABLE, **settings}
    return AnthropicUpstream(parse_config(data, env={}))


def _fake(body: dict[str, Any], **headers: str) -> _Answer:
    return _Answer(FakeAnthropic(api_key="k"), headers, body, 1)


def _stream(**headers: str) -> bytes:
    events, _, _ = _fake({**BODY, "stream": True}, **STEER, **headers).events()
    return b"".join(events)


def _feed_any(meter: Any, raw: bytes) -> None:
    decoder = SSEDecoder()
    for event in [*decoder.feed(raw), *decoder.flush()]:
        meter.feed(event)


def _feed(meter: MessageStreamMeter, raw: bytes) -> None:
    decoder = SSEDecoder()
    for event in [*decoder.feed(raw), *decoder.flush()]:
        meter.feed(event)


# --- usage objects -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "start", "expected"),
    [
        (  # a message's usage: the prompt is every input token, cache reads and writes
            {
                "input_tokens": 1000,
                "cache_creation_input_tokens": 200,
                "cache_read_input_tokens": 400,
                "output_tokens": 700,
            },
            None,
            USAGE,
        ),
        (  # no cache fields (older models, or null): plain counts
            {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": None},
            None,
            Usage(10, 5, 15),
        ),
        (  # message_delta: the output is cumulative, the rest kept from message_start
            {"output_tokens": 700},
            Usage(1600, 1, 1601, cached_tokens=400, cache_write_tokens=200),
            USAGE,
        ),
        (  # message_delta with the full counts (as the API now sends them): they replace
            {
                "input_tokens": 1000,
                "cache_creation_input_tokens": 200,
                "cache_read_input_tokens": 400,
                "output_tokens": 700,
            },
            Usage(900, 1, 901, cached_tokens=0, cache_write_tokens=0),
            USAGE,
        ),
    ],
)
def test_usage_from(raw: dict[str, Any], start: Usage | None, expected: Usage) -> None:
    assert usage_from(raw, start=start) == expected


@pytest.mark.parametrize("raw", [None, [], "x", {"input_tokens": -1, "output_tokens": "x"}])
def test_malformed_usage_is_refused(raw: object) -> None:
    with pytest.raises(ValueError):
        usage_from(raw)


def test_a_bad_count_is_bounded_and_named() -> None:
    usage = usage_from({"input_tokens": 10, "output_tokens": 2.5})
    assert (usage.prompt_tokens, usage.completion_tokens) == (10, 3)
    assert usage.clamped == ("output_tokens=2.5",)


@pytest.mark.parametrize(
    ("body", "chars"),
    [
        ({"messages": [{"role": "user", "content": "abcd"}]}, 4),
        (
            {
                "system": "ab",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "cd"}]}],
            },
            4,
        ),
        ({"system": [{"type": "text", "text": "abc"}], "messages": []}, 3),
        (  # a tool result's content, and an earlier tool call's input
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "tool_use", "id": "t", "name": "n", "input": {"a": 1}}
                        ],
                    },
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t", "content": "xyz"}],
                    },
                ]
            },
            len(b'{"a":1}') + 3,
        ),
    ],
)
def test_prompt_chars(body: dict[str, Any], chars: int) -> None:
    assert prompt_chars(body) == chars


def test_deeply_nested_content_is_counted_without_recursion() -> None:
    content: Any = "x"
    for _ in range(5000):
        content = [{"type": "text", "content": content}]
    assert prompt_chars({"messages": content}) == 1


# --- blocking answers ------------------------------------------------------------------------


def test_blocking_message() -> None:
    answer = _fake(BODY, **STEER)
    body = answer.message(content=answer.blocks(), stop_reason="end_turn", output=700)
    metered = meter_message(BODY, orjson.dumps(body))
    assert metered.usage == USAGE and metered.outcome == "complete"
    assert metered.model == MODEL and metered.answer_id is None


def test_blocking_error_body_is_not_charged() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    metered = meter_message(BODY, orjson.dumps(error))
    assert metered.usage is None and metered.outcome == "error"
    assert metered.error_code == "overloaded_error"


@pytest.mark.parametrize("response", [b"not json", b'{"type": "message", "content": []'])
def test_an_unreadable_blocking_answer_is_charged_an_estimate(response: bytes) -> None:
    metered = meter_message(BODY, response)
    assert metered.usage is not None and metered.usage.estimated
    assert metered.error_code == "unreadable_answer"


def test_a_message_without_usage_is_estimated_from_its_text() -> None:
    body = {"type": "message", "model": MODEL, "content": [{"type": "text", "text": "x" * 40}]}
    metered = meter_message(BODY, orjson.dumps(body))
    assert metered.outcome == "cut" and metered.usage is not None
    assert metered.usage.completion_tokens == 10 and metered.usage.estimated


# --- streams ---------------------------------------------------------------------------------


def test_streamed_usage_comes_from_message_start_and_message_delta() -> None:
    meter = MessageStreamMeter(BODY)
    _feed(meter, _stream())
    metered = meter.finish(cut=False)
    assert metered.usage == USAGE and metered.outcome == "complete"
    assert metered.model == MODEL


@given(st.lists(st.integers(min_value=1, max_value=4000), max_size=12))
def test_any_chunking_meters_the_same(cuts: list[int]) -> None:
    raw = _stream(**{"x-fake-tool-use": "get_weather", "x-fake-web-searches": "2"})
    meter = MessageStreamMeter(BODY)
    decoder = SSEDecoder()
    at = 0
    for cut in sorted(set(cuts)):
        for event in decoder.feed(raw[at:cut]):
            meter.feed(event)
        at = max(at, cut)
    for event in [*decoder.feed(raw[at:]), *decoder.flush()]:
        meter.feed(event)
    assert meter.finish(cut=False).usage == USAGE
    assert meter.calls.counts == {"web_search": 2, "web_fetch": 0}


def test_only_message_start_and_message_delta_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.upstreams import anthropic_wire

    parsed: list[str] = []
    real = anthropic_wire._loads

    def counting(data: Any) -> Any:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(anthropic_wire, "_loads", counting)
    meter = MessageStreamMeter(BODY)
    _feed(meter, _stream(**{"x-fake-tool-use": "get_weather"}))
    assert len(parsed) == 2  # not the pings, blocks or deltas
    assert meter.finish(cut=False).usage == USAGE


def _events_until(name: bytes, **headers: str) -> bytes:
    raw = _stream(**headers)
    return raw[: raw.index(b"event: " + name)]


def test_a_stream_cut_before_message_delta_keeps_the_prompt_and_estimates_the_rest() -> None:
    meter = MessageStreamMeter(BODY)
    _feed(meter, _events_until(b"message_delta"))
    metered = meter.finish(cut=True)
    assert metered.outcome == "cut" and metered.usage is not None
    usage = metered.usage
    # The prompt as message_start counted it, cache parts and all.
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (1600, 400, 200)
    assert usage.completion_tokens == estimate_tokens(len("".join(ANSWER_PIECES)))
    assert usage.estimated


def test_a_stream_cut_after_message_delta_is_complete() -> None:
    meter = MessageStreamMeter(BODY)
    _feed(meter, _events_until(b"message_stop"))
    metered = meter.finish(cut=True)
    assert metered.usage == USAGE and metered.outcome == "complete"


_ERROR = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'


def test_an_error_event_after_text_is_charged() -> None:
    meter = MessageStreamMeter(BODY)
    raw = _events_until(b"content_block_stop")
    _feed(meter, raw + _ERROR)
    metered = meter.finish(cut=False)
    assert metered.outcome == "error" and metered.error_code == "overloaded_error"
    assert metered.usage is not None and metered.usage.prompt_tokens == 1600


def test_an_error_before_any_text_is_not_charged() -> None:
    meter = MessageStreamMeter(BODY)
    _feed(meter, _events_until(b"content_block_start") + _ERROR)
    metered = meter.finish(cut=False)
    assert metered.outcome == "error" and metered.usage is None


@pytest.mark.parametrize("cut", [True, False], ids=["cut", "ended-without-usage"])
def test_a_begun_message_without_usage_or_text_is_charged_its_prompt(cut: bool) -> None:
    """A compatible server's message_start without usage, and no text: the
    upstream read the prompt and bills it, cut or ended."""
    meter = MessageStreamMeter(BODY)
    _feed(
        meter, b'event: message_start\ndata: {"type":"message_start","message":{"model":"m"}}\n\n'
    )
    _feed(meter, b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    usage = meter.finish(cut=cut).usage
    assert usage is not None and usage.estimated and usage.completion_tokens == 0
    assert usage.prompt_tokens == estimate_tokens(prompt_chars(BODY))


def test_a_broken_message_start_is_named() -> None:
    meter = MessageStreamMeter(BODY)
    _feed(meter, b"event: message_start\ndata: {oops\n\n")
    _feed(
        meter,
        b'event: content_block_delta\ndata: {"delta":{"type":"text_delta","text":"abcd"}}\n\n',
    )
    metered = meter.finish(cut=False)
    assert metered.error_code == "malformed_usage" and metered.usage is not None
    assert metered.usage.estimated


# --- requests --------------------------------------------------------------------------------


def test_the_user_is_always_the_authenticated_one() -> None:
    up = dialect()
    route = up.route("POST", "/messages")
    for metadata in (None, {}, {"user_id": "mallory", "other": 1}):
        body = dict(BODY)
        if metadata is not None:
            body["metadata"] = dict(metadata)
        prepared = up.prepare(route, body, b"", "alice", method="POST", request_id="r")
        assert prepared.body is not None and prepared.body["metadata"]["user_id"] == "alice"
    assert prepared.body["metadata"]["other"] == 1  # the rest is kept


def test_count_tokens_is_passed_as_it_came() -> None:
    up = dialect()
    route = up.route("POST", "/messages/count_tokens")
    body = {"model": MODEL, "messages": []}
    prepared = up.prepare(route, dict(body), b"", "alice", method="POST", request_id="r")
    assert prepared.body == body


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stream": "true"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream": {}}, "stream"),
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"metadata": ["alice"]}, "metadata"),
    ],
)
def test_bodies_the_gateway_would_misread_are_refused(change: dict[str, Any], message: str) -> None:
    up = dialect()
    body = {**BODY, **change}
    with pytest.raises(BadRequest) as refused:
        up.prepare(up.route("POST", "/messages"), body, b"", "a", method="POST", request_id="r")
    assert message in refused.value.message


@pytest.mark.parametrize("stream", [True, False, None])
def test_a_real_boolean_stream_is_taken(stream: bool | None) -> None:
    up = dialect()
    body = {**BODY, "stream": stream}
    up.prepare(up.route("POST", "/messages"), body, b"", "a", method="POST", request_id="r")
    assert up.is_streaming(up.route("POST", "/messages"), body) is (stream is True)


@pytest.mark.parametrize(
    ("tools", "refused"),
    [
        ([{"name": "get_weather", "input_schema": {"type": "object"}}], None),
        ([{"type": "custom", "name": "x", "input_schema": {}}], None),
        ([{"type": "bash_20250124", "name": "bash"}], None),
        ([{"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}], None),
        ([{"type": "computer_20250124", "name": "computer"}], None),
        ([{"type": "memory_20250818", "name": "memory"}], None),
        ([{"type": "web_search_20250305", "name": "web_search"}], "web_search"),
        ([{"type": "web_search_20260209", "name": "web_search"}], "web_search"),
        ([{"type": "web_fetch_20250910", "name": "web_fetch"}], "web_fetch"),
        ([{"type": "code_execution_20250825", "name": "code_execution"}], "code_execution"),
        ([{"type": "some_new_server_tool_20270101", "name": "x"}], "some_new_server_tool"),
    ],
)
def test_server_tools_need_a_call_price(tools: list[dict[str, Any]], refused: str | None) -> None:
    up = dialect()
    body = {**BODY, "tools": tools}
    route = up.route("POST", "/messages")
    if refused is None:
        up.prepare(route, body, b"", "a", method="POST", request_id="r")
        return
    with pytest.raises(Forbidden) as error:
        up.prepare(route, body, b"", "a", method="POST", request_id="r")
    assert error.value.code == "tool_not_priced"
    assert f'call_prices."anthropic.{refused}"' in error.value.message
    priced = dialect(call_prices={f"anthropic.{refused}": {"price": "0.01"}})
    priced.prepare(route, {**BODY, "tools": tools}, b"", "a", method="POST", request_id="r")


def test_an_openai_call_price_does_not_price_an_anthropic_tool() -> None:
    up = dialect(call_prices={"openai.web_search": {"price": "0.01"}})
    body = {**BODY, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    with pytest.raises(Forbidden):
        up.prepare(up.route("POST", "/messages"), body, b"", "a", method="POST", request_id="r")


def test_an_unpriced_model_is_refused_unless_allowed() -> None:
    body = {**BODY, "model": "claude-opus-4-1"}
    route = dialect().route("POST", "/messages")
    with pytest.raises(Forbidden) as refused:
        dialect().prepare(route, dict(body), b"", "a", method="POST", request_id="r")
    assert refused.value.code == "model_not_priced"
    allowed = dialect(pricing={"unpriced_models": "allow"})
    allowed.prepare(route, dict(body), b"", "a", method="POST", request_id="r")


def test_a_dated_model_takes_its_base_price() -> None:
    up = dialect()
    body = {**BODY, "model": f"{MODEL}-20250929"}
    up.prepare(up.route("POST", "/messages"), body, b"", "a", method="POST", request_id="r")


# --- pricing -------------------------------------------------------------------------------------


def test_cache_reads_and_writes_are_priced_apart() -> None:
    price = Price(
        input=Decimal("3"),
        cached_input=Decimal("0.30"),
        cache_write_input=Decimal("3.75"),
        output=Decimal("15"),
    )
    assert price.cost(USAGE) == COST
    # Without the cache prices, every prompt token is billed as input.
    assert Price(input=Decimal("3"), output=Decimal("15")).cost(USAGE) == Decimal("0.0153")
    # Parts larger than the prompt are bounded by it, never billed twice.
    odd = Usage(100, 0, 100, cached_tokens=80, cache_write_tokens=80)
    assert price.cost(odd) == (80 * Decimal("0.30") + 20 * Decimal("3.75")) / 1_000_000


def test_the_dialect_prices_streams_and_web_searches() -> None:
    up = dialect(call_prices={"anthropic.web_search": {"price": "0.01"}})
    body = {**BODY, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    meter = up.stream_meter(up.route("POST", "/messages"), body)
    decoder = SSEDecoder()
    for event in [*decoder.feed(_stream(**{"x-fake-web-searches": "2"})), *decoder.flush()]:
        meter.feed(event)
    metered = meter.finish(cut=False)
    assert metered.usage is not None and metered.usage.cost == COST + Decimal("0.02")


def test_web_searches_of_a_stream_cut_before_its_usage_are_charged() -> None:
    """The searches ran (and Anthropic bills them) once their server_tool_use
    blocks streamed; a stream cut before message_delta, which alone reports
    them, is charged the searches it showed, not none."""
    raw = _events_until(b"message_delta", **{"x-fake-web-searches": "2"})

    def cut_cost(up: AnthropicUpstream, body: dict[str, Any]) -> Decimal:
        meter = up.stream_meter(up.route("POST", "/messages"), body)
        _feed_any(meter, raw)
        metered = meter.finish(cut=True)
        assert metered.outcome == "cut" and metered.usage is not None
        return metered.usage.cost

    tokens_only = cut_cost(dialect(), BODY)
    up = dialect(call_prices={"anthropic.web_search": {"price": "0.01"}})
    body = {**BODY, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    assert cut_cost(up, body) == tokens_only + Decimal("0.02")


def test_other_paid_server_tools_are_charged_once_per_answer() -> None:
    up = dialect(call_prices={"anthropic.code_execution": {"price": "0.05"}})
    body = {**BODY, "tools": [{"type": "code_execution_20250825", "name": "code_execution"}]}
    answer = _fake(body, **STEER)
    response = answer.message(content=answer.blocks(), stop_reason="end_turn", output=700)
    metered = up.meter_blocking(up.route("POST", "/messages"), body, orjson.dumps(response))
    assert metered.usage is not None and metered.usage.cost == COST + Decimal("0.05")


def test_an_answer_never_seen_is_charged_its_prompt() -> None:
    up = dialect()
    metered = up.unanswered(up.route("POST", "/messages"), BODY)
    assert metered.outcome == "timeout" and metered.usage is not None
    assert metered.usage.prompt_tokens == estimate_tokens(len("Xin chào"))
    assert metered.usage.cost == metered.usage.prompt_tokens * Decimal(3) / 1_000_000


# --- routes and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("POST", "/messages", "answer"),
        ("POST", "/messages/count_tokens", "passthrough"),
        ("GET", "/models", "passthrough"),
        ("GET", "/models/claude-sonnet-4-5", "passthrough"),
        ("DELETE", "/models/claude-sonnet-4-5", "unknown"),
        ("POST", "/messages/batches", "operator"),
        ("GET", "/messages/batches", "operator"),
        ("GET", "/messages/batches/msgbatch_1/results", "operator"),
        ("POST", "/messages/batches/msgbatch_1/cancel", "operator"),
        ("GET", "/files", "operator"),
        ("GET", "/files/file_1/content", "operator"),
        ("POST", "/complete", "operator"),
        ("GET", "/organizations/usage_report/messages", "operator"),
        ("POST", "/skills", "operator"),
        ("GET", "/messages", "unknown"),
        ("POST", "/messages/msg_1", "unknown"),
        ("POST", "/chat/completions", "unknown"),
    ],
)
def test_routes(method: str, path: str, role: str) -> None:
    assert anthropic_route(method, path).role == role


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),
    ],
)
def test_errors_in_anthropic_shape(status: int, kind: str) -> None:
    up = dialect()
    body = orjson.loads(up.error_body(status, "quota_exceeded", "No more today."))
    assert body == {
        "type": "error",
        "error": {"type": kind, "message": "No more today.", "code": "quota_exceeded"},
    }
    frame = up.stream_error(status, "upstream_error", "Broken.")
    (event,) = SSEDecoder().feed(frame)
    assert event.event == "error" and orjson.loads(event.data)["error"]["type"] == kind


def test_the_registry_builds_the_dialect() -> None:
    config = parse_config(
        {"upstream": {"kind": "anthropic", "api_key_env": "K"}, "prices": TABLE},
        env={"K": "sk-ant-x"},
    )
    up = get_upstream("anthropic", config)
    assert isinstance(up, AnthropicUpstream) and up.kind == "anthropic"
    assert up.upstream_credentials(config.upstream) == ((b"x-api-key", b"sk-ant-x"),)
    assert get_upstream("openai", config).upstream_credentials(config.upstream) == (
        (b"authorization", b"Bearer sk-ant-x"),
    )


# --- the client's key header ---------------------------------------------------------------------


def test_the_key_header_is_read_and_never_forwarded() -> None:
    raw = [
        (b"x-api-key", b"gw-secret"),
        (b"anthropic-version", b"2023-06-01"),
        (b"anthropic-beta", b"files-api-2025-04-14"),
    ]
    split = request_headers(raw, b"x-user", b"x-api-key")
    assert split.api_key == b"gw-secret" and split.credential == b"Bearer gw-secret"
    assert split.forward == raw[1:]
    # A dialect without a key header forwards it (and authenticates by Authorization only).
    plain = request_headers(raw, b"x-user")
    assert plain.api_key is None and plain.credential is None


def test_a_key_header_that_disagrees_with_authorization_is_refused() -> None:
    """Whichever one the gateway read, something in front of it may have judged
    the caller by the other."""
    for raw in (
        [(b"authorization", b"Bearer gw-a"), (b"x-api-key", b"gw-b")],
        [(b"x-api-key", b"gw-b"), (b"authorization", b"Bearer gw-a")],
        [(b"authorization", b"Basic gw-a"), (b"x-api-key", b"gw-a")],
    ):
        with pytest.raises(BadRequest, match="different credentials"):
            request_headers(raw, b"x-user", b"x-api-key")
    agreeing = [(b"authorization", b"bearer gw-a"), (b"x-api-key", b"gw-a")]
    assert request_headers(agreeing, b"x-user", b"x-api-key").credential == b"bearer gw-a"


def test_two_authorization_headers_are_refused() -> None:
    raw = [(b"authorization", b"Bearer gw-a"), (b"authorization", b"Bearer gw-b")]
    with pytest.raises(BadRequest, match="More than one Authorization"):
        request_headers(raw, b"x-user", None)


def test_two_key_headers_are_refused() -> None:
    with pytest.raises(BadRequest):
        request_headers([(b"x-api-key", b"a"), (b"x-api-key", b"b")], b"x-user", b"x-api-key")


# --- a shared mount's model list (issue 23) --------------------------------------------------


def test_each_upstream_of_a_shared_mount_is_asked_for_its_whole_model_list() -> None:
    """The client's paging parameters are the gateway's to apply to the union:
    each upstream is asked for its largest pages from the start, the other
    parameters (the beta list's ``beta``) passed on, until it has no more."""
    up = get_upstream("anthropic", parse_config({"upstream": {"kind": "anthropic"}}, env={}))
    query = b"beta=true&limit=5&after_id=claude-x&before_id=claude-y"
    assert up.model_list_query(query, None) == b"beta=true&limit=1000"
    more = {"data": [{"id": "a"}], "has_more": True, "first_id": "a", "last_id": "a"}
    assert up.model_list_query(query, more) == b"beta=true&limit=1000&after_id=a"
    assert up.model_list_query(b"", {**more, "has_more": False}) is None
    assert up.model_list_query(b"", {**more, "last_id": None}) is None  # no cursor to go on from
    # A page of the union, paged as Anthropic pages: the last page, and past it.
    union = {"data": [{"id": m} for m in "abcde"], "has_more": False}
    last = up.page_models(anthropic_route("GET", "/models"), union, b"limit=2&after_id=c")
    assert last == {
        "data": [{"id": "d"}, {"id": "e"}],
        "has_more": False,
        "first_id": "d",
        "last_id": "e",
    }
    first = up.page_models(anthropic_route("GET", "/models"), union, b"limit=3&before_id=c")
    assert (first["data"], first["has_more"]) == ([{"id": "a"}, {"id": "b"}], False)


# --- rates the price table does not hold (review-sec F2) --------------------------------


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"speed": "fast"}, "option_not_priced"),  # fast mode: up to 6x
        ({"inference_geo": "us"}, "option_not_priced"),  # US-only inference: 1.1x
        ({"inference_geo": ["us"]}, "option_not_priced"),
        ({"service_tier": "priority"}, "service_tier_not_priced"),
        ({"service_tier": 1}, "service_tier_not_priced"),
    ],
)
def test_an_option_billed_above_the_table_is_refused(change: dict[str, Any], code: str) -> None:
    up = dialect()
    route = up.route("POST", "/messages")
    with pytest.raises(Forbidden) as refused:
        up.prepare(route, {**BODY, **change}, b"", "a", method="POST", request_id="r")
    assert refused.value.code == code
    # What bills at the standard rates goes through.
    for harmless in ({"speed": "standard"}, {"inference_geo": "global"},
                     {"service_tier": "auto"}, {"service_tier": "standard_only"},
                     {"speed": None, "inference_geo": None, "service_tier": None}):  # fmt: skip
        up.prepare(route, {**BODY, **harmless}, b"", "a", method="POST", request_id="r")


@pytest.mark.parametrize(
    ("betas", "refused"),
    [
        ([b"context-1m-2025-08-07"], True),
        ([b"prompt-caching-2024-07-31, Context-1M-2025-08-07"], True),
        ([b"token-efficient-tools-2025-02-19", b"context-1m-2025-08-07"], True),
        ([b"token-efficient-tools-2025-02-19,interleaved-thinking-2025-05-14"], False),
        ([], False),
    ],
)
def test_the_long_context_beta_is_refused(betas: list[bytes], refused: bool) -> None:
    """``anthropic-beta: context-1m-*`` opens the 1M-token context, whose prompts
    over 200K tokens Anthropic bills at its long-context rates; other betas are
    passed on as sent."""
    up = dialect()
    headers = request_headers(
        [(b"anthropic-version", b"2023-06-01"), *((b"anthropic-beta", b) for b in betas)],
        b"x-user",
        up.key_header,
    )
    route = up.route("POST", "/messages")
    if not refused:
        up.check_headers(route, headers.forward)
        return
    with pytest.raises(Forbidden) as error:
        up.check_headers(route, headers.forward)
    assert error.value.code == "option_not_priced"
    assert "context-1" in error.value.message.lower()


# --- messages that name the account's objects (review-sec F3) -----------------------------


def _document(source: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "document", "source": source}, {"type": "text", "text": "Quote it."}]
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("change", "operator"),
    [
        ({}, False),
        (_document({"type": "file", "file_id": "file_1"}), True),
        (_document({"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}), False),
        (_document({"type": "url", "url": "https://example.com/a.pdf"}), False),
        ({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]}, True),
        ({"messages": [{"role": "user", "content": [
            {"type": "container_upload", "file_id": "file_1"}]}]}, True),
        ({"container": "container_1"}, True),
        ({"container": {"id": "container_1"}}, True),
        ({"container": {"skills": [{"type": "custom", "skill_id": "skill_1"}]}}, True),
        ({"container": {"skills": [{"type": "anthropic", "skill_id": "pptx"}]}}, False),
        ({"container": None}, False),
    ],
)  # fmt: skip
def test_a_message_naming_the_accounts_files_is_the_operators(
    change: dict[str, Any], operator: bool
) -> None:
    up = dialect()
    route = up.route("POST", "/messages")
    assert route.by_body
    refined = up.refine(route, {**BODY, **change})
    assert (refined.role == "operator") is operator
    assert refined is route or operator


def test_a_message_counts_the_web_searches_it_ran() -> None:
    """Review-sec F4: a message may search when it lists the web search tool, and
    its searches are the ones its usage reports."""
    up = dialect(call_prices={"anthropic.web_search": {"price": "0.01"}})
    route = up.route("POST", "/messages")
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
    assert up.asks_for_web_search(route, {**BODY, "tools": tools})
    assert not up.asks_for_web_search(route, BODY)
    assert not up.asks_for_web_search(up.route("POST", "/messages/count_tokens"), BODY)
    raw = orjson.dumps(
        {"type": "message", "id": "msg_1", "model": MODEL, "content": [],
         "usage": {"input_tokens": 10, "output_tokens": 5,
                   "server_tool_use": {"web_search_requests": 3}}}
    )  # fmt: skip
    body = {**BODY, "tools": tools}
    assert up.meter_blocking(route, body, raw).web_searches == 3
    raw = orjson.dumps({"type": "message", "id": "msg_2", "model": MODEL, "content": [],
                        "usage": {"input_tokens": 10, "output_tokens": 5}})  # fmt: skip
    assert up.meter_blocking(route, body, raw).web_searches == 0


# --- the 1-hour prompt cache (cache_write_1h_input) ---------------------------------------------

ONE_HOUR_TABLE = {MODEL: {**TABLE[MODEL], "cache_write_1h_input": "6"}}
# Of STEER's 200 cache writes, 150 to a 1-hour cache (usage.cache_creation).
STEER_1H = {"x-fake-cache-creation-1h-tokens": "150"}
USAGE_1H = Usage(
    1600, 700, 2300, cached_tokens=400, cache_write_tokens=200, cache_write_1h_tokens=150
)
# COST with 150 of the 200 writes at 6, not 3.75.
COST_1H = COST + 150 * (Decimal("6") - Decimal("3.75")) / 1_000_000
SPLIT = {"ephemeral_5m_input_tokens": 50, "ephemeral_1h_input_tokens": 150}
COUNTS = {"input_tokens": 1000, "cache_read_input_tokens": 400, "output_tokens": 700}


@pytest.mark.parametrize(
    ("raw", "start", "expected"),
    [
        (  # a message's usage (the SDK's Usage.cache_creation: CacheCreation)
            {**COUNTS, "cache_creation_input_tokens": 200, "cache_creation": SPLIT},
            None,
            USAGE_1H,
        ),
        (  # message_delta without cache_creation (MessageDeltaUsage has none): kept
            {**COUNTS, "cache_creation_input_tokens": 200},
            USAGE_1H,
            USAGE_1H,
        ),
        (  # a later cache_creation replaces message_start's, as the other counts do
            {**COUNTS, "cache_creation_input_tokens": 200, "cache_creation": SPLIT},
            Usage(1400, 1, 1401, cached_tokens=400, cache_write_tokens=0),
            USAGE_1H,
        ),
        (  # a split that sums past the total: the writes are never fewer than their parts
            {**COUNTS, "cache_creation_input_tokens": 100, "cache_creation": SPLIT},
            None,
            USAGE_1H,
        ),
        (  # no total at all, only the split
            {**COUNTS, "cache_creation": SPLIT},
            None,
            USAGE_1H,
        ),
        (  # a null split, or a null 1-hour count in it, keeps what was read before
            {**COUNTS, "cache_creation": {"ephemeral_1h_input_tokens": None}},
            USAGE_1H,
            USAGE_1H,
        ),
        (  # all to the 5-minute cache
            {
                **COUNTS,
                "cache_creation_input_tokens": 200,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 200,
                    "ephemeral_1h_input_tokens": 0,
                },
            },
            None,
            USAGE,
        ),
    ],
)
def test_usage_from_reads_the_one_hour_writes(
    raw: dict[str, Any], start: Usage | None, expected: Usage
) -> None:
    assert usage_from(raw, start=start) == expected


def test_a_cache_creation_that_is_not_an_object_is_named_and_bounded() -> None:
    usage = usage_from({**COUNTS, "cache_creation_input_tokens": 200, "cache_creation": "1h"})
    assert usage.clamped == ("cache_creation='1h'",)
    # The split is unknown: every write is taken as the dearest, a 1-hour one.
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (200, 200)


def test_one_hour_writes_are_metered_from_the_stream_and_the_body() -> None:
    up = dialect(prices=ONE_HOUR_TABLE)
    route = up.route("POST", "/messages")
    meter = up.stream_meter(route, BODY)
    _feed_any(meter, _stream(**STEER_1H))
    streamed = meter.finish(cut=False)
    assert streamed.usage is not None and streamed.outcome == "complete"
    assert streamed.usage.cache_write_1h_tokens == 150
    assert streamed.usage.cost == COST_1H == Decimal("0.0147075")
    answer = _fake(BODY, **STEER, **STEER_1H)
    body = orjson.dumps(answer.message(content=answer.blocks(), stop_reason="end_turn", output=700))
    blocking = up.meter_blocking(route, BODY, body)
    assert blocking.usage is not None and blocking.usage.cost == COST_1H


def test_a_stream_cut_before_message_delta_keeps_its_one_hour_writes() -> None:
    up = dialect(prices=ONE_HOUR_TABLE)
    meter = up.stream_meter(up.route("POST", "/messages"), BODY)
    _feed_any(meter, _events_until(b"message_delta", **STEER_1H))
    metered = meter.finish(cut=True)
    assert metered.outcome == "cut" and metered.usage is not None and metered.usage.estimated
    assert metered.usage.cache_write_1h_tokens == 150


def test_one_hour_writes_of_a_model_without_the_price_cost_twice_the_input() -> None:
    """Not the 5-minute 3.75: Anthropic's 1-hour rate, 2x input."""
    meter = dialect().stream_meter(dialect().route("POST", "/messages"), BODY)
    _feed_any(meter, _stream(**STEER_1H))
    metered = meter.finish(cut=False)
    assert metered.usage is not None
    assert metered.usage.cost == COST + 150 * (Decimal("6") - Decimal("3.75")) / 1_000_000


def _one_hour_body(ttl: object = "1h") -> dict[str, Any]:
    block = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": ttl}}
    return {**BODY, "system": [block]}


def test_a_one_hour_cache_is_taken_for_a_model_with_its_price_only() -> None:
    up = dialect(prices=ONE_HOUR_TABLE)
    route = up.route("POST", "/messages")
    up.prepare(route, _one_hour_body(), b"", "a", method="POST", request_id="r")
    # A dated model takes its base name's price, the 1-hour one included.
    dated = {**_one_hour_body(), "model": f"{MODEL}-20250929"}
    up.prepare(route, dated, b"", "a", method="POST", request_id="r")
    # No price opens any other ttl.
    with pytest.raises(Forbidden) as other:
        up.prepare(route, _one_hour_body("2h"), b"", "a", method="POST", request_id="r")
    assert other.value.code == "option_not_priced"
    assert "'2h'" in str(other.value) and "cache_write_1h_input" not in str(other.value)


@pytest.mark.parametrize(
    ("prices", "model", "key"),
    [
        (TABLE, MODEL, f'prices."{MODEL}".cache_write_1h_input'),
        (TABLE, f"{MODEL}-20250929", f'prices."{MODEL}".cache_write_1h_input'),
        ({"*": TABLE[MODEL]}, MODEL, 'prices."*".cache_write_1h_input'),
    ],
)
def test_the_refusal_of_a_one_hour_cache_names_the_price_to_set(
    prices: dict[str, Any], model: str, key: str
) -> None:
    up = dialect(prices=prices)
    with pytest.raises(Forbidden) as refused:
        up.prepare(
            up.route("POST", "/messages"),
            {**_one_hour_body(), "model": model},
            b"",
            "a",
            method="POST",
            request_id="r",
        )
    assert refused.value.code == "option_not_priced"
    assert "cache_control.ttl: '1h'" in str(refused.value) and key in str(refused.value)


# --- cache writes no lifetime accounts for (review 4, R4-1) -------------------------------

_ONE_HOUR_PRICES = {
    MODEL: {
        "input": "3",
        "cached_input": "0.30",
        "cache_write_input": "3.75",
        "cache_write_1h_input": "6",
        "output": "15",
    }
}
_MILLION = Decimal(1_000_000)


def _priced_dialect() -> AnthropicUpstream:
    config = {"upstream": {"kind": "anthropic"}, "prices": _ONE_HOUR_PRICES}
    return AnthropicUpstream(parse_config(config, env={}))


def _cached_body(*ttls: str) -> dict[str, Any]:
    blocks = [
        {"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral", "ttl": ttl}}
        for i, ttl in enumerate(ttls)
    ]
    return {
        "model": MODEL,
        "max_tokens": 100,
        "system": blocks,
        "messages": [{"role": "user", "content": "hi"}],
    }


def _streamed_cost(body: dict[str, Any], start: dict[str, Any], delta: dict[str, Any]) -> Usage:
    up = _priced_dialect()
    meter = up.stream_meter(up.route("POST", "/messages"), {**body, "stream": True})
    message = {"id": "msg_1", "model": MODEL, "usage": start}
    for kind, data in (
        ("message_start", {"type": "message_start", "message": message}),
        ("message_delta", {"type": "message_delta", "delta": {}, "usage": delta}),
        ("message_stop", {"type": "message_stop"}),
    ):
        meter.feed(ServerSentEvent(event=kind, data=orjson.dumps(data).decode()))
    metered = meter.finish(cut=False)
    assert metered.usage is not None
    return metered.usage


@pytest.mark.parametrize(
    ("ttls", "split", "writes_1h"),
    [
        # Asked for one lifetime, 1 hour: all 5000 cumulative writes are 1-hour.
        pytest.param(("1h",), (0, 1000), 5000, id="one-hour-only"),
        # Both: the 300 five-minute ones stay, the 4700 others are 1-hour (dearest).
        pytest.param(("5m", "1h"), (300, 700), 4700, id="both"),
        # 5 minutes only: Anthropic writes no 1-hour cache for it.
        pytest.param(("5m",), (1000, 0), 0, id="five-minutes-only"),
    ],
)
def test_cumulative_writes_past_message_starts_split_are_the_requests_dearest_lifetime(
    ttls: tuple[str, ...], split: tuple[int, int], writes_1h: int
) -> None:
    """Attack (review 4, R4-1): message_delta's counts are cumulative and carry no
    ``cache_creation`` (the SDK's MessageDeltaUsage); writes past message_start's
    split (a server-tool loop under automatic caching moves the breakpoint) were
    priced at the 5-minute rate, 1.25x, where a request asking for a 1-hour cache
    is billed 2x."""
    five, hour = split
    start = {
        "input_tokens": 10,
        "cache_creation_input_tokens": five + hour,
        "cache_creation": {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": hour},
        "output_tokens": 1,
    }
    delta = {"input_tokens": 10, "cache_creation_input_tokens": 5000, "output_tokens": 20}
    usage = _streamed_cost(_cached_body(*ttls), start, delta)
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (5000, writes_1h)
    billed = 10 * Decimal(3) + (5000 - writes_1h) * Decimal("3.75") + writes_1h * Decimal(6)
    assert usage.cost == (billed + 20 * Decimal(15)) / _MILLION


@pytest.mark.parametrize(("ttls", "writes_1h"), [(("1h",), 4000), (("5m",), 0)])
def test_a_blocking_answer_without_the_split_prices_writes_at_the_requests_lifetime(
    ttls: tuple[str, ...], writes_1h: int
) -> None:
    """Attack (review 4, R4-1): an answer whose usage leaves ``cache_creation`` out
    (an Anthropic-compatible server) had every write priced at 1.25x: 0.01533
    charged for a 1-hour-only request billed 0.02433."""
    up = _priced_dialect()
    answer = {
        "id": "msg_2",
        "type": "message",
        "model": MODEL,
        "content": [{"type": "text", "text": "hello"}],
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 4000, "output_tokens": 20},
    }
    metered = up.meter_blocking(
        up.route("POST", "/messages"), _cached_body(*ttls), orjson.dumps(answer)
    )
    assert metered.usage is not None
    assert metered.usage.cache_write_1h_tokens == writes_1h
    writes = (4000 - writes_1h) * Decimal("3.75") + writes_1h * Decimal(6)
    assert metered.usage.cost == (10 * Decimal(3) + writes + 20 * Decimal(15)) / _MILLION


def test_whether_the_request_asked_for_a_one_hour_cache_is_asked_only_for_unsplit_writes() -> None:
    """Reading the request for its cache lifetimes walks its whole body (tens of
    microseconds for a long chat): the meter asks only when the usage has cache
    writes its split does not account for."""
    asked: list[bool] = []

    def one_hour() -> bool:
        asked.append(True)
        return True

    split = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 40}
    usage_from({"input_tokens": 5, "output_tokens": 1}, one_hour=one_hour)
    usage_from(
        {"input_tokens": 5, "cache_creation_input_tokens": 40, "cache_creation": split},
        one_hour=one_hour,
    )
    assert asked == []
    usage = usage_from({"input_tokens": 5, "cache_creation_input_tokens": 40}, one_hour=one_hour)
    assert asked == [True] and usage.cache_write_1h_tokens == 40


# --- review 8: the end user a router in front of Claude reads ----------------------------


def _litellm_end_user(body: dict[str, Any]) -> str | None:
    """The end user LiteLLM's proxy reads from a request body when no header
    names one (litellm/proxy/auth/auth_utils.py,
    ``get_end_user_id_from_request_body``, checks 3-5): the body's ``user``,
    then ``litellm_metadata.user`` (an object, or a JSON string of one), then
    ``metadata.user_id``."""
    if body.get("user") is not None:
        return str(body["user"])
    litellm_metadata = body.get("litellm_metadata")
    if isinstance(litellm_metadata, str):
        try:
            litellm_metadata = orjson.loads(litellm_metadata)
        except orjson.JSONDecodeError:
            litellm_metadata = None
    if isinstance(litellm_metadata, dict) and litellm_metadata.get("user") is not None:
        return str(litellm_metadata["user"])
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id") is not None:
        return str(metadata["user_id"])
    return None


@pytest.mark.parametrize(
    "extra",
    [
        {"user": "victim"},
        {"litellm_metadata": {"user": "victim"}},
        {"litellm_metadata": '{"user": "victim"}'},
        {"user": "victim", "metadata": {"user_id": "mallory"}},
    ],
)
def test_a_router_in_front_of_claude_reads_the_authenticated_user_from_the_body(
    extra: dict[str, Any],
) -> None:
    # R8-3. The gateway drops x-litellm-end-user-id (docs/security.md, "Routers'
    # headers") and sets metadata.user_id, which the docs say LiteLLM reads.
    # LiteLLM reads the body's "user" and "litellm_metadata.user" first: a
    # client naming another user there is that user at LiteLLM (their spend,
    # their end-user budget and rate limits), exactly what the dropped header
    # did. Either the gateway's user wins there too, or the request is refused.
    up = dialect()
    body = {**BODY, **extra}
    try:
        prepared = up.prepare(
            up.route("POST", "/messages"), body, b"", "alice", method="POST", request_id="r"
        )
    except BadRequest:
        return
    assert prepared.body is not None
    assert _litellm_end_user(prepared.body) == "alice"


@pytest.mark.parametrize("name", [b"anthropic_beta", b"anthropic.beta"])
def test_the_long_context_beta_in_another_spelling_is_refused_or_dropped(name: bytes) -> None:
    # R8-7. A router behind a server reading headers as CGI variables takes
    # anthropic_beta for anthropic-beta (both HTTP_ANTHROPIC_BETA), and lighttpd
    # anthropic.beta too, the reason the gateway drops those spellings of what
    # it drops or reads (`http._dropped_as_cgi_reads`). anthropic-beta is read
    # (checked per request, `check_headers`) but not dropped: in another
    # spelling it was neither dropped nor checked, and opened the 1M-token
    # context unpriced.
    up = dialect()
    headers = request_headers(
        [(b"anthropic-version", b"2023-06-01"), (name, b"context-1m-2025-08-07")],
        b"x-user",
        up.key_header,
    )
    try:
        up.check_headers(up.route("POST", "/messages"), headers.forward)
    except Forbidden as refused:
        assert refused.code == "option_not_priced"
        return
    # (As lighttpd names the variable, written out: not the gateway's own rule.)
    as_cgi = [v for k, v in headers.forward if re.sub(rb"[^a-z0-9]", b"-", k) == b"anthropic-beta"]
    assert as_cgi == []


@pytest.mark.parametrize("field", ["api_base", "base_url", "extra_body"])
def test_count_tokens_refuses_a_field_a_router_reads_over_the_checked_ones(field: str) -> None:
    # R10-5. Review 9 refuses api_base/base_url/extra_body in every OpenAI body
    # and in an Anthropic answer, but Anthropic's count_tokens returns before
    # drop_router_fields: a router in front of Anthropic (LiteLLM serves
    # /v1/messages/count_tokens with the deployment's credentials) is handed a
    # host of the client's choice for a call made with the operator's key.
    up = dialect()
    route = up.route("POST", "/messages/count_tokens")
    body = {"model": MODEL, "messages": [], field: "https://attacker.example/v1"}
    with pytest.raises(BadRequest):
        up.prepare(route, body, b"", "alice", method="POST", request_id="r")


# --- OpenRouter's Anthropic-compatible endpoint ---------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"plugins": [{"id": "web"}]},  # a web search billed per result
        {"plugins": [{"id": "file-parser"}]},  # OCR per page
        {"provider": {"order": ["the-dearest-host"], "allow_fallbacks": False}},
        {"models": ["claude-opus-4-1"]},  # a fallback no price here was checked for
        {"route": "fallback"},
        {"model": "claude-sonnet-4-5:online"},  # a web search on every answer
    ],
)
def test_a_routers_paid_options_on_the_messages_route_are_refused(extra: dict[str, Any]) -> None:
    """An ``anthropic`` upstream pointed at OpenRouter's /v1/messages: its
    plugins, host routing, fallback models and ``:online`` models are paid work
    or a dearer choice the table does not price (review 11's notes). None is
    Anthropic's API."""
    up = dialect()
    body = {**BODY, **extra}
    with pytest.raises(Forbidden) as refused:
        up.prepare(up.route("POST", "/messages"), body, b"", "alice", method="POST", request_id="r")
    assert refused.value.code in ("option_not_priced", "tool_not_priced")
