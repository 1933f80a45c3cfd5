"""The Anthropic dialect end to end: the official ``anthropic`` SDK against a real
gateway in front of a real local fake Messages API, on both databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.anthropic import ANSWER_PIECES, TOOL_INPUT, FakeAnthropic
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway
from tests.sdk import SDK, lazy
from tests.servers import serve

anthropic = lazy("anthropic")  # imported by the first test that uses it (tests/sdk.py)
pytestmark = SDK

ANSWER = "".join(ANSWER_PIECES)
MODEL = "claude-sonnet-4-5"
PRICES = {
    MODEL: {"input": "3", "cached_input": "0.30", "cache_write_input": "3.75", "output": "15"},
}
# The fake's usage for these headers: 1000 uncached input tokens, 400 read from
# the cache and 200 written to it, 700 output tokens.
STEER = {
    "x-fake-input-tokens": "1000",
    "x-fake-cache-read-tokens": "400",
    "x-fake-cache-creation-tokens": "200",
    "x-fake-output-tokens": "700",
}
# 1000 * 3 + 400 * 0.30 + 200 * 3.75 + 700 * 15 = 14370 per million tokens
COST = Decimal("0.01437")
VERSION = {"anthropic-version": "2023-06-01"}
MESSAGES = [{"role": "user", "content": "Xin chào"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather at a place.",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}


def anthropic_settings(**extra: Any) -> dict[str, Any]:
    return {"upstream": {"kind": "anthropic"}, "prices": PRICES, **extra}


@pytest.fixture
async def fake() -> FakeAnthropic:
    return FakeAnthropic(api_key=UPSTREAM_KEY)


@pytest.fixture
async def gw(database_url: str, fake: FakeAnthropic) -> AsyncIterator[Harness]:
    async with running_gateway(database_url, upstream=fake, settings=anthropic_settings()) as h:
        try:
            yield h
        finally:
            fake.release_held()


def client(h: Harness, key: str | None = None, **headers: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=h.url,
        api_key=key or h.key,
        max_retries=0,
        default_headers={**STEER, **headers},
    )


def x_api_key_client(h: Harness) -> anthropic.AsyncAnthropic:
    """A client that sends its key only in ``x-api-key``, as Anthropic's SDKs do."""
    return anthropic.AsyncAnthropic(
        base_url=h.url,
        api_key=None,
        auth_token=None,
        max_retries=0,
        default_headers={**STEER, "x-api-key": h.key},
    )


async def queries_today(h: Harness) -> int:
    today = h.gateway.today()
    return sum(day.queries for day in await h.storage.daily(today, today))


async def only_event(h: Harness) -> Any:
    await h.probes.wait_finished(1)
    (event,) = await h.events()
    assert event.user_id == USER
    return event


def assert_metered(event: Any, *, cost: Decimal = COST) -> None:
    assert event.endpoint == "messages"
    assert event.model == MODEL
    # Recorded as OpenAI records it: the prompt includes cache reads and writes.
    assert (event.prompt_tokens, event.completion_tokens, event.total_tokens) == (1600, 700, 2300)
    assert (event.cached_tokens, event.cache_write_tokens) == (400, 200)
    assert event.cost == cost and isinstance(event.cost, Decimal)
    assert event.outcome == "complete" and not event.estimated


# --- answers ------------------------------------------------------------------------------


async def test_streamed_message_is_metered_and_passed_on_in_order(
    gw: Harness, fake: FakeAnthropic
) -> None:
    async with client(gw) as sdk:
        stream = await sdk.messages.create(
            model=MODEL,
            max_tokens=1024,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            metadata={"user_id": "mallory"},
            extra_headers={
                "anthropic-version": "2023-06-01",
                "anthropic-beta": "prompt-caching-2024-07-31",
            },
        )
        events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == ANSWER
    (request,) = fake.requests
    assert request.json["metadata"] == {"user_id": USER}  # never what the client claimed
    assert request.headers["x-api-key"] == UPSTREAM_KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert "authorization" not in request.headers  # the gateway key stays at the gateway
    assert_metered(await only_event(gw))


async def test_the_client_gets_every_upstream_byte(gw: Harness, fake: FakeAnthropic) -> None:
    body = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        async with http.stream(
            "POST",
            "/v1/messages",
            json=body,
            headers={"x-api-key": gw.key, "anthropic-version": "2023-06-01", **STEER},
        ) as response:
            received = b"".join([chunk async for chunk in response.aiter_raw()])
    (sent,) = fake.sent
    assert received == sent  # ping events and framing untouched
    assert b"event: ping\n" in received
    assert_metered(await only_event(gw))


async def test_stream_helper_accumulates_the_final_message(gw: Harness) -> None:
    async with (
        client(gw) as sdk,
        sdk.messages.stream(model=MODEL, max_tokens=1024, messages=MESSAGES) as stream,  # type: ignore[arg-type]
    ):
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == ANSWER
    assert final.usage.output_tokens == 700 and final.usage.cache_read_input_tokens == 400
    assert_metered(await only_event(gw))


async def test_blocking_message(gw: Harness, fake: FakeAnthropic) -> None:
    async with client(gw) as sdk:
        message = await sdk.messages.create(
            model=MODEL,
            max_tokens=1024,
            messages=MESSAGES,  # type: ignore[arg-type]
        )
    assert message.content[0].type == "text" and message.content[0].text == ANSWER
    assert message.usage.input_tokens == 1000
    assert fake.requests[0].json["metadata"] == {"user_id": USER}
    assert_metered(await only_event(gw))


@pytest.mark.parametrize("streamed", [True, False])
async def test_tool_use(gw: Harness, fake: FakeAnthropic, streamed: bool) -> None:
    """A client tool (the caller's own) costs nothing past the tokens: no call price
    is needed, and the tool call reaches the SDK whole."""
    async with client(gw, **{"x-fake-tool-use": "get_weather"}) as sdk:
        if streamed:
            async with sdk.messages.stream(
                model=MODEL,
                max_tokens=1024,
                messages=MESSAGES,  # type: ignore[arg-type]
                tools=[WEATHER_TOOL],  # type: ignore[list-item]
            ) as stream:
                message = await stream.get_final_message()
        else:
            message = await sdk.messages.create(
                model=MODEL,
                max_tokens=1024,
                messages=MESSAGES,  # type: ignore[arg-type]
                tools=[WEATHER_TOOL],  # type: ignore[list-item]
            )
    assert message.stop_reason == "tool_use"
    call = message.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == TOOL_INPUT
    assert fake.requests[0].json["tools"] == [WEATHER_TOOL]
    assert_metered(await only_event(gw))


# --- the web search server tool ---------------------------------------------------------------


async def test_an_unpriced_web_search_is_refused_before_anything_is_forwarded(
    gw: Harness, fake: FakeAnthropic
) -> None:
    async with client(gw) as sdk:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await sdk.messages.create(
                model=MODEL,
                max_tokens=1024,
                messages=MESSAGES,  # type: ignore[arg-type]
                tools=[WEB_SEARCH],  # type: ignore[list-item]
            )
    assert refused.value.status_code == 403
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "permission_error" and error["code"] == "tool_not_priced"
    assert "anthropic.web_search" in error["message"]
    assert fake.requests == []
    assert await gw.events() == []


@pytest.mark.parametrize("streamed", [True, False])
async def test_web_searches_are_charged_per_call(
    database_url: str, fake: FakeAnthropic, streamed: bool
) -> None:
    settings = anthropic_settings(call_prices={"anthropic.web_search": {"price": "0.01"}})
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        async with client(h, **{"x-fake-web-searches": "3"}) as sdk:
            if streamed:
                async with sdk.messages.stream(
                    model=MODEL,
                    max_tokens=1024,
                    messages=MESSAGES,  # type: ignore[arg-type]
                    tools=[WEB_SEARCH],  # type: ignore[list-item]
                ) as stream:
                    message = await stream.get_final_message()
            else:
                message = await sdk.messages.create(
                    model=MODEL,
                    max_tokens=1024,
                    messages=MESSAGES,  # type: ignore[arg-type]
                    tools=[WEB_SEARCH],  # type: ignore[list-item]
                )
        assert [b.type for b in message.content].count("server_tool_use") == 3
        event = await only_event(h)
    # The tokens, plus three searches at 0.01 each.
    assert_metered(event, cost=COST + Decimal("0.03"))


# --- authentication and refusals in Anthropic's shape ------------------------------------------


async def test_the_gateway_key_in_x_api_key_authenticates(gw: Harness, fake: FakeAnthropic) -> None:
    async with x_api_key_client(gw) as sdk:
        message = await sdk.messages.create(
            model=MODEL,
            max_tokens=1024,
            messages=MESSAGES,  # type: ignore[arg-type]
        )
    assert message.content[0].type == "text"
    (request,) = fake.requests
    # The client's x-api-key (its gateway key) is replaced, never passed on.
    assert fake.key_headers == [[UPSTREAM_KEY]]
    assert_metered(await only_event(gw))


async def test_a_bad_key_is_a_401_in_anthropic_shape(gw: Harness, fake: FakeAnthropic) -> None:
    async with client(gw, key="gw-not-a-key") as sdk:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await sdk.messages.create(
                model=MODEL,
                max_tokens=1024,
                messages=MESSAGES,  # type: ignore[arg-type]
            )
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert fake.requests == []


async def test_no_credential_at_all_is_refused(gw: Harness, fake: FakeAnthropic) -> None:
    body = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        response = await http.post(
            "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}
        )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert fake.requests == []


async def test_quota_refusal_is_a_rate_limit_error_with_headers(
    database_url: str, fake: FakeAnthropic
) -> None:
    settings = anthropic_settings(plans={"free": {"queries_per_day": 1}})
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        async with client(h) as sdk:
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
            with pytest.raises(anthropic.RateLimitError) as refused:
                await sdk.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
        await h.probes.wait_finished(2)
    response = refused.value.response
    assert response.status_code == 429
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["x-ratelimit-limit"] == "1"
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert len(fake.requests) == 1


async def test_upstream_errors_pass_through_and_the_query_is_returned(
    gw: Harness, fake: FakeAnthropic
) -> None:
    async with client(gw, **{"x-fake-status": "529"}) as sdk:
        with pytest.raises(anthropic.APIStatusError) as failed:
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
    assert failed.value.status_code == 529
    assert failed.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    await gw.probes.wait_finished(1)
    assert await gw.events() == []
    assert await queries_today(gw) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "stream": "true"}, "stream"),
        ({"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "stream": 1}, "stream"),
        ({"model": MODEL, "messages": MESSAGES}, "max_tokens"),
        ({"model": MODEL, "max_tokens": "64", "messages": MESSAGES}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "metadata": "x"}, "metadata"),
    ],
)
async def test_requests_the_gateway_would_misread_are_refused(
    gw: Harness, fake: FakeAnthropic, body: dict[str, Any], field: str
) -> None:
    """A "stream" that is not a JSON boolean would be read as not streaming (and a
    lax server might stream it unmetered): refused with nothing reserved."""
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        response = await http.post("/v1/messages", json=body, headers={"x-api-key": gw.key})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and field in error["message"]
    assert fake.requests == []
    assert await queries_today(gw) == 0


async def test_an_unpriced_model_is_refused(gw: Harness, fake: FakeAnthropic) -> None:
    async with client(gw) as sdk:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await sdk.messages.create(model="claude-opus-4-1", max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
    assert refused.value.body["error"]["code"] == "model_not_priced"  # type: ignore[index]
    assert fake.requests == []


# --- other routes ---------------------------------------------------------------------------


async def test_count_tokens_and_models_pass_through_unmetered(
    gw: Harness, fake: FakeAnthropic
) -> None:
    async with client(gw) as sdk:
        counted = await sdk.messages.count_tokens(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        models = [m.id async for m in sdk.models.list()]
        model = await sdk.models.retrieve(MODEL)
    assert counted.input_tokens == 14
    assert models == [MODEL] and model.id == MODEL
    # count_tokens takes no metadata: the body reaches the upstream as sent.
    assert fake.requests[0].json == {"model": MODEL, "messages": MESSAGES}
    assert all(r.headers["x-api-key"] == UPSTREAM_KEY for r in fake.requests)
    await gw.probes.wait_finished(3)
    assert await gw.events() == []


async def test_a_plans_model_allow_list_holds_for_claude(sqlite_url: str) -> None:
    """A model outside the plan's ``models`` is refused in Anthropic's shape
    before anything is reserved or forwarded; the model list and model reads
    show only the plan's models."""
    haiku = "claude-haiku-4-5"
    fake = FakeAnthropic(api_key=UPSTREAM_KEY, models=(MODEL, haiku))
    prices = {**PRICES, haiku: {"input": "1", "output": "5"}}
    settings = anthropic_settings(prices=prices, plans={"free": {"models": ["claude-haiku-*"]}})
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h, client(h) as sdk:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
        body: Any = refused.value.body
        assert body["type"] == "error"
        assert body["error"]["type"] == "permission_error"
        assert body["error"]["code"] == "model_not_in_plan"
        assert MODEL in body["error"]["message"]
        assert fake.requests == [] and await queries_today(h) == 0

        listed = [m.id async for m in sdk.models.list()]
        assert listed == [haiku]
        with pytest.raises(anthropic.PermissionDeniedError):
            await sdk.models.retrieve(MODEL)
        assert (await sdk.models.retrieve(haiku)).id == haiku

        answer = await sdk.messages.create(model=haiku, max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
        assert answer.model == haiku
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert event.model == haiku


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/messages/batches", 403),
        ("GET", "/v1/messages/batches/msgbatch_01", 403),
        ("GET", "/v1/messages/batches/msgbatch_01/results", 403),
        ("GET", "/v1/files", 403),
        ("POST", "/v1/complete", 403),
        ("GET", "/v1/organizations/api_keys", 403),
        ("DELETE", "/v1/models/claude-sonnet-4-5", 404),
        ("GET", "/v1/messages", 404),
        ("POST", "/v1/something-new", 404),
    ],
)
async def test_other_routes_are_refused(
    gw: Harness, fake: FakeAnthropic, method: str, path: str, status: int
) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        response = await http.request(method, path, json={}, headers={"x-api-key": gw.key})
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == ("permission_error" if status == 403 else "not_found_error")
    assert fake.requests == []


# --- failures mid-answer -------------------------------------------------------------------------


async def test_an_error_event_mid_stream_reaches_the_sdk_and_text_is_charged(
    gw: Harness,
) -> None:
    async with client(gw, **{"x-fake-scenario": "error_midstream"}) as sdk:
        stream = await sdk.messages.create(
            model=MODEL,
            max_tokens=1024,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        with pytest.raises(anthropic.APIStatusError) as failed:
            _ = [event async for event in stream]
    assert "overloaded_error" in str(failed.value)
    event = await only_event(gw)
    assert event.outcome == "error" and event.estimated
    # The prompt as message_start counted it, and the text that came.
    assert event.prompt_tokens == 1600 and event.cached_tokens == 400
    assert event.completion_tokens >= 1 and event.cost > 0


async def test_a_stream_cut_before_its_usage_ends_in_an_error_event_and_an_estimate(
    gw: Harness,
) -> None:
    async with client(gw, **{"x-fake-scenario": "cut"}) as sdk:
        stream = await sdk.messages.create(
            model=MODEL,
            max_tokens=1024,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        with pytest.raises(anthropic.APIStatusError) as broken:
            _ = [event async for event in stream]
    assert "upstream" in str(broken.value)
    event = await only_event(gw)
    assert event.outcome == "cut" and event.estimated
    assert event.prompt_tokens == 1600 and event.cache_write_tokens == 200 and event.cost > 0


async def test_web_searches_of_a_stream_cut_before_its_usage_are_charged(
    database_url: str, fake: FakeAnthropic
) -> None:
    """Attack: searches stream, then the answer breaks before message_delta (the
    only event that reports them). Anthropic billed the searches; so does the
    gateway, from the server_tool_use blocks the stream showed."""
    settings = anthropic_settings(call_prices={"anthropic.web_search": {"price": "0.01"}})
    steer = {"x-fake-web-searches": "3", "x-fake-scenario": "cut"}
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        async with client(h, **steer) as sdk:
            stream = await sdk.messages.create(
                model=MODEL,
                max_tokens=1024,
                messages=MESSAGES,  # type: ignore[arg-type]
                tools=[WEB_SEARCH],  # type: ignore[list-item]
                stream=True,
            )
            with pytest.raises(anthropic.APIStatusError):
                _ = [event async for event in stream]
        event = await only_event(h)
    assert event.outcome == "cut" and event.estimated
    assert (event.prompt_tokens, event.cached_tokens, event.cache_write_tokens) == (1600, 400, 200)
    # The tokens (output estimated from the text seen), plus three searches at 0.01.
    tokens = (1000 * 3 + 400 * Decimal("0.30") + 200 * Decimal("3.75")) / 1_000_000
    tokens += event.completion_tokens * Decimal(15) / 1_000_000
    assert event.cost == tokens + Decimal("0.03")


# --- disconnects ---------------------------------------------------------------------------------


async def test_stop_policy_stops_the_answer_by_closing_it(
    sqlite_url: str, fake: FakeAnthropic
) -> None:
    settings = anthropic_settings(upstream={"kind": "anthropic", "on_client_disconnect": "stop"})
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        body = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "stream": True}
        headers = {**VERSION, "x-api-key": h.key, "x-fake-delay-ms": "50", **STEER}
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
            async with http.stream("POST", "/v1/messages", json=body, headers=headers) as response:
                await anext(response.aiter_raw())
        await asyncio.wait_for(fake.closed_event.wait(), timeout=10)
        event = await only_event(h)
    assert fake.closed == 1  # the gateway closed the upstream stream: Anthropic stops there
    assert event.outcome == "disconnected" and event.estimated
    # The prompt message_start reported is charged, cache parts and all.
    assert (event.prompt_tokens, event.cached_tokens, event.cache_write_tokens) == (1600, 400, 200)
    assert event.cost > 0


async def test_drain_policy_reads_on_and_records_the_reported_usage(
    sqlite_url: str, fake: FakeAnthropic
) -> None:
    async with running_gateway(sqlite_url, upstream=fake, settings=anthropic_settings()) as h:
        body = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES, "stream": True}
        headers = {**VERSION, "x-api-key": h.key, "x-fake-scenario": "hold", **STEER}
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
            async with http.stream("POST", "/v1/messages", json=body, headers=headers) as response:
                await anext(response.aiter_raw())
        fake.release_held()
        event = await only_event(h)
    assert fake.closed == 0
    assert event.outcome in ("complete", "disconnected") and not event.estimated
    assert (event.prompt_tokens, event.completion_tokens) == (1600, 700)
    assert event.cost == COST


async def test_usage_endpoint_takes_the_key_in_x_api_key(gw: Harness) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        response = await http.get("/v1/usage", headers={"x-api-key": gw.key})
    assert response.status_code == 200
    assert orjson.loads(response.content)["user"] == USER


@pytest.mark.parametrize("policy", ["stop", "drain"])
async def test_an_sdk_client_that_closes_its_stream_mid_answer(
    sqlite_url: str, fake: FakeAnthropic, policy: str
) -> None:
    """The SDK's own way to leave: close the stream after the first event. Stop
    closes the upstream answer (an estimate with the prompt message_start
    reported); drain reads on to the reported usage."""
    settings = anthropic_settings(upstream={"kind": "anthropic", "on_client_disconnect": policy})
    scenario = {"x-fake-delay-ms": "50"} if policy == "stop" else {"x-fake-scenario": "hold"}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with client(h, **scenario) as sdk:
            stream = await sdk.messages.create(
                model=MODEL,
                max_tokens=1024,
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
            )
            first = await stream.__anext__()
            await stream.close()
        assert first.type == "message_start"
        if policy == "stop":
            await asyncio.wait_for(fake.closed_event.wait(), timeout=10)
        else:
            fake.release_held()
        event = await only_event(h)
    if policy == "stop":
        assert fake.closed == 1
        assert event.outcome == "disconnected" and event.estimated
        assert (event.prompt_tokens, event.cached_tokens, event.cache_write_tokens) == (
            1600,
            400,
            200,
        )
    else:
        assert fake.closed == 0
        assert not event.estimated and event.cost == COST


async def test_a_wrong_key_in_x_api_key_is_refused_and_nothing_forwarded(
    gw: Harness, fake: FakeAnthropic
) -> None:
    body = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        # An attacker trying the upstream's own key, or a made-up gateway key.
        for key in (UPSTREAM_KEY, gw.key + "x"):
            response = await http.post(
                "/v1/messages", json=body, headers={**VERSION, "x-api-key": key}
            )
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
    assert fake.requests == []


async def test_a_key_header_beside_a_valid_bearer_never_reaches_the_upstream(
    gw: Harness, fake: FakeAnthropic
) -> None:
    """The client's x-api-key never reaches the upstream: one that agrees with
    the bearer is read as the same credential (the upstream sees one x-api-key,
    the operator's); one that disagrees is refused before anything is sent."""
    body = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES}
    agreeing = {**VERSION, **gw.auth(), "x-api-key": gw.key}
    disagreeing = {**VERSION, **gw.auth(), "x-api-key": "sk-ant-someone-elses"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        response = await http.post("/v1/messages", json=body, headers=agreeing)
        refused = await http.post("/v1/messages", json=body, headers=disagreeing)
    assert response.status_code == 200
    assert refused.status_code == 400 and refused.json()["type"] == "error"
    assert "sk-ant-someone-elses" not in refused.text
    (request,) = fake.requests
    assert fake.key_headers == [[UPSTREAM_KEY]]
    assert "authorization" not in request.headers
    # The refusal finishes too, and can finish before the answer has settled.
    await gw.probes.wait_finished(2)
    await only_event(gw)


async def test_refusals_speak_the_users_language(gw: Harness, fake: FakeAnthropic) -> None:
    body = {**{"model": MODEL, "max_tokens": 64, "messages": MESSAGES}, "tools": [WEB_SEARCH]}
    headers = {**VERSION, "x-api-key": gw.key, "accept-language": "vi"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        refused = await http.post("/v1/messages", json=body, headers=headers)
        bad = await http.post("/v1/messages", json={"model": MODEL}, headers=headers)
    assert refused.status_code == 403 and refused.headers["content-language"] == "vi"
    error = refused.json()["error"]
    assert error["type"] == "permission_error" and error["code"] == "tool_not_priced"
    assert error["message"] == (
        "Công cụ 'web_search' chưa được định giá trên gateway này "
        '([call_prices."anthropic.web_search"]) nên không dùng được.'
    )
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
    assert bad.headers["content-language"] == "vi"
    assert fake.requests == []


async def test_exports_carry_the_cache_writes(database_url: str, fake: FakeAnthropic) -> None:
    env = {"GATEWAY_ADMIN_TOKEN": "admin-token-0123456789"}
    async with running_gateway(
        database_url, upstream=fake, settings=anthropic_settings(), env=env
    ) as h:
        async with client(h) as sdk:
            await sdk.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
        await h.probes.wait_finished(1)
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
            admin = {"Authorization": "Bearer admin-token-0123456789"}
            as_json = await http.get("/admin/export/events?format=json", headers=admin)
            as_csv = await http.get("/admin/export/events?format=csv", headers=admin)
    (row,) = orjson.loads(as_json.content)
    assert (row["prompt_tokens"], row["cached_tokens"], row["cache_write_tokens"]) == (
        1600,
        400,
        200,
    )
    assert row["cost"] == str(COST)
    header, line = as_csv.text.splitlines()
    cells = dict(zip(header.split(","), line.split(","), strict=True))
    assert (cells["cached_tokens"], cells["cache_write_tokens"]) == ("400", "200")


@pytest.mark.parametrize("streamed", [True, False])
async def test_a_one_hour_cache_through_the_sdk_is_charged_its_price(
    sqlite_url: str, fake: FakeAnthropic, streamed: bool
) -> None:
    """The SDK's own types read the usage the gateway meters: 150 of the 200
    cache writes to a 1-hour cache (Usage.cache_creation), charged at
    cache_write_1h_input, the 50 others at cache_write_input."""
    prices = {MODEL: {**PRICES[MODEL], "cache_write_1h_input": "6"}}
    system = [{"type": "text", "text": "A long document.",
               "cache_control": {"type": "ephemeral", "ttl": "1h"}}]  # fmt: skip
    settings = anthropic_settings(prices=prices)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        headers = {"x-fake-cache-creation-1h-tokens": "150"}
        async with client(h, **headers) as sdk:
            if streamed:
                async with sdk.messages.stream(
                    model=MODEL,
                    max_tokens=1024,
                    system=system,  # type: ignore[arg-type]
                    messages=MESSAGES,  # type: ignore[arg-type]
                ) as stream:
                    message = await stream.get_final_message()
            else:
                message = await sdk.messages.create(
                    model=MODEL,
                    max_tokens=1024,
                    system=system,  # type: ignore[arg-type]
                    messages=MESSAGES,  # type: ignore[arg-type]
                )
        event = await only_event(h)
    split = message.usage.cache_creation
    assert split is not None
    assert (split.ephemeral_5m_input_tokens, split.ephemeral_1h_input_tokens) == (50, 150)
    assert message.usage.cache_creation_input_tokens == 200
    assert fake.requests[0].json["system"] == system
    # 150 writes at 6 instead of 3.75.
    assert_metered(event, cost=COST + 150 * (Decimal(6) - Decimal("3.75")) / 1_000_000)


async def test_an_unreachable_upstream_is_a_502_in_anthropic_shape(sqlite_url: str) -> None:
    async with serve(FakeAnthropic(api_key=UPSTREAM_KEY)) as dead:  # closed afterwards
        pass
    settings = anthropic_settings()
    async with running_gateway(sqlite_url, upstream_url=dead + "/v1", settings=settings) as h:
        async with client(h) as sdk:
            with pytest.raises(anthropic.APIStatusError) as failed:
                await sdk.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
        assert await queries_today(h) == 0
    assert failed.value.status_code == 502
    assert failed.value.body == {  # type: ignore[comparison-overlap]
        "type": "error",
        "error": {
            "type": "api_error",
            "message": "The upstream service is unreachable.",
            "code": "upstream_unavailable",
        },
    }
    assert failed.value.response.headers["retry-after"] == "5"
