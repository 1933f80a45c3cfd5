"""The OpenAI dialect end to end: the official ``openai`` SDK against a real gateway
in front of a real local fake OpenAI-compatible upstream, on both databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.openai import ANSWER_PIECES, FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway
from tests.sdk import SDK, lazy

openai = lazy("openai")  # imported by the first test that uses it (tests/sdk.py)
pytestmark = SDK

ANSWER = "".join(ANSWER_PIECES)
PRICES = {
    "gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60"},
    "o3": {"input": "2", "cached_input": "0.5", "output": "8"},
}
# The fake's usage for these headers: 1200 prompt tokens (400 cached), 700 completion
# tokens (300 of them reasoning).
STEER = {
    "x-fake-prompt-tokens": "1200",
    "x-fake-cached-tokens": "400",
    "x-fake-completion-tokens": "700",
    "x-fake-reasoning-tokens": "300",
}
# gpt-4o-mini: 800 * 0.15 + 400 * 0.075 + 700 * 0.60 = 570 per million tokens
MINI_COST = Decimal("0.00057")
# o3: 800 * 2 + 400 * 0.5 + 700 * 8 = 7400 per million tokens
O3_COST = Decimal("0.0074")


def openai_settings(**extra: Any) -> dict[str, Any]:
    return {"upstream": {"kind": "openai"}, "prices": PRICES, **extra}


@pytest.fixture
async def fake() -> FakeOpenAI:
    return FakeOpenAI(api_key=UPSTREAM_KEY)


@pytest.fixture
async def gw(database_url: str, fake: FakeOpenAI) -> AsyncIterator[Harness]:
    async with running_gateway(database_url, upstream=fake, settings=openai_settings()) as h:
        try:
            yield h
        finally:
            fake.release_held()


def client(h: Harness, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=h.url + "/v1", api_key=key or h.key, max_retries=0, default_headers=STEER
    )


async def only_event(h: Harness) -> Any:
    await h.probes.wait_finished(1)
    (event,) = await h.events()
    assert event.user_id == USER
    return event


def assert_metered(event: Any, *, endpoint: str, model: str, cost: Decimal) -> None:
    assert event.endpoint == endpoint
    assert event.model == model
    assert (event.prompt_tokens, event.completion_tokens, event.total_tokens) == (1200, 700, 1900)
    assert (event.cached_tokens, event.reasoning_tokens) == (400, 300)
    assert event.cost == cost and isinstance(event.cost, Decimal)
    assert event.outcome == "complete" and not event.estimated


# --- chat completions ------------------------------------------------------------------


async def test_streamed_chat_is_metered_and_the_usage_chunk_hidden(
    gw: Harness, fake: FakeOpenAI
) -> None:
    async with client(gw) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Xin chào"}],
            stream=True,
            user="mallory",
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert all(c.choices and c.usage is None for c in chunks)  # no usage-only chunk
    (request,) = fake.requests
    assert request.json["user"] == USER  # never what the client claimed
    assert request.json["stream_options"] == {"include_usage": True}
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    event = await only_event(gw)
    assert_metered(event, endpoint="chat/completions", model="gpt-4o-mini", cost=MINI_COST)


async def test_the_client_gets_every_upstream_byte_but_the_usage_chunk(
    gw: Harness, fake: FakeOpenAI
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [], "stream": True}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers=gw.auth()
        ) as response:
            received = b"".join([chunk async for chunk in response.aiter_raw()])
    (sent,) = fake.sent
    events = sent.split(b"\n\n")
    assert sum(b'"choices":[]' in e for e in events) == 1
    assert received == b"\n\n".join(e for e in events if b'"choices":[]' not in e)
    assert received.endswith(b"data: [DONE]\n\n")


async def test_a_client_that_asked_for_usage_gets_it(gw: Harness, fake: FakeOpenAI) -> None:
    async with client(gw) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 400
    (sent,) = fake.sent
    event = await only_event(gw)
    assert_metered(event, endpoint="chat/completions", model="gpt-4o-mini", cost=MINI_COST)


async def test_blocking_chat(gw: Harness, fake: FakeOpenAI) -> None:
    async with client(gw) as sdk:
        answer = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert answer.choices[0].message.content == ANSWER
    assert answer.usage is not None and answer.usage.total_tokens == 1900
    assert "stream_options" not in fake.requests[0].json
    event = await only_event(gw)
    assert_metered(event, endpoint="chat/completions", model="gpt-4o-mini", cost=MINI_COST)


@pytest.mark.parametrize("streamed", [True, False])
async def test_completions(gw: Harness, streamed: bool) -> None:
    async with client(gw) as sdk:
        if streamed:
            stream = await sdk.completions.create(model="o3", prompt="Say hi", stream=True)
            text = "".join([c.choices[0].text async for c in stream if c.choices])
        else:
            answer = await sdk.completions.create(model="o3", prompt="Say hi")
            text = answer.choices[0].text
    assert text == ANSWER
    event = await only_event(gw)
    assert_metered(event, endpoint="completions", model="o3", cost=O3_COST)


# --- responses and embeddings -------------------------------------------------------------


async def test_streamed_response(gw: Harness, fake: FakeOpenAI) -> None:
    async with client(gw) as sdk:
        stream = await sdk.responses.create(model="o3", input="Say hi", stream=True)
        events = [event async for event in stream]
    assert events[0].type == "response.created"
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None and completed.response.usage.total_tokens == 1900
    assert fake.requests[0].json["user"] == USER
    assert "stream_options" not in fake.requests[0].json  # not a chat completion
    event = await only_event(gw)
    assert_metered(event, endpoint="responses", model="o3", cost=O3_COST)


@pytest.mark.parametrize("tools", ["", "web_search_call"])
async def test_responses_stream_helper(gw: Harness, fake: FakeOpenAI, tools: str) -> None:
    """The SDK's ``responses.stream()`` assembles the response from the events and
    fails on any item or part it was not told about first (issue 25)."""
    headers = {"x-fake-tool-calls": tools} if tools else {}
    async with (
        client(gw) as sdk,
        sdk.responses.stream(model="o3", input="Say hi", extra_headers=headers) as stream,
    ):
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == ANSWER
    assert final.output_text == ANSWER
    assert final.usage is not None and final.usage.total_tokens == 1900
    assert [item.type for item in final.output] == ([tools] if tools else []) + ["message"]
    event = await only_event(gw)
    assert event.endpoint == "responses" and event.model == "o3"
    assert (event.prompt_tokens, event.completion_tokens, event.total_tokens) == (1200, 700, 1900)


async def test_blocking_response(gw: Harness) -> None:
    async with client(gw) as sdk:
        response = await sdk.responses.create(model="o3", input="Say hi")
    assert response.output_text == ANSWER
    event = await only_event(gw)
    assert_metered(event, endpoint="responses", model="o3", cost=O3_COST)


async def test_embeddings(gw: Harness, fake: FakeOpenAI) -> None:
    async with client(gw) as sdk:
        result = await sdk.embeddings.create(model="gpt-4o-mini", input=["a", "b"])
    assert len(result.data) == 2
    assert fake.requests[0].json["user"] == USER
    event = await only_event(gw)
    assert (event.endpoint, event.model) == ("embeddings", "gpt-4o-mini")
    # Embeddings report prompt tokens only: 1200 at the input price (no cache detail).
    assert (event.prompt_tokens, event.completion_tokens, event.total_tokens) == (1200, 0, 1200)
    assert event.cost == Decimal("0.00018")


async def test_models_pass_through_unmetered(gw: Harness, fake: FakeOpenAI) -> None:
    async with client(gw) as sdk:
        models = [m.id async for m in sdk.models.list()]
    assert models == ["gpt-4o-mini"]
    assert fake.requests[0].path == "/models"
    assert await gw.events() == []


async def test_usage_admin_and_exports_show_model_and_token_parts(
    database_url: str, fake: FakeOpenAI
) -> None:
    env = {"GATEWAY_ADMIN_TOKEN": "admin-token-0123456789"}
    async with running_gateway(
        database_url, upstream=fake, settings=openai_settings(), env=env
    ) as h:
        async with client(h) as sdk:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=[])
        await h.probes.wait_finished(1)
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
            admin = {"Authorization": "Bearer admin-token-0123456789"}
            as_json = await http.get("/admin/export/events?format=json", headers=admin)
            as_csv = await http.get("/admin/export/events?format=csv", headers=admin)
            mine = (await http.get("/v1/usage", headers=h.auth())).json()
            detail = (await http.get(f"/admin/users/{USER}", headers=admin)).json()
    by_model = {
        "model": "gpt-4o-mini",
        "answers": 1,
        "prompt_tokens": 1200,
        "cached_tokens": 400,
        "completion_tokens": 700,
        "reasoning_tokens": 300,
        "total_tokens": 1900,
        "cost": "0.00057",
        "currency": "USD",
    }
    assert mine["month_by_model"] == [by_model]  # what the end user sees
    assert detail["month_by_model"] == [by_model]  # and the admin
    (row,) = orjson.loads(as_json.content)
    assert (row["model"], row["cached_tokens"], row["reasoning_tokens"]) == (
        "gpt-4o-mini",
        400,
        300,
    )
    assert row["cost"] == "0.00057"
    header, line = as_csv.text.splitlines()
    assert dict(zip(header.split(","), line.split(","), strict=True))["model"] == "gpt-4o-mini"


# --- refusals and errors ---------------------------------------------------------------------


async def test_quota_refusal_is_a_429_in_openai_shape_with_rate_headers(
    database_url: str, fake: FakeOpenAI
) -> None:
    settings = openai_settings(plans={"free": {"queries_per_day": 1}})
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        async with client(h) as sdk:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=[])
            with pytest.raises(openai.RateLimitError) as refused:
                await sdk.chat.completions.create(model="gpt-4o-mini", messages=[])
    error = refused.value
    assert error.status_code == 429
    assert error.body == {
        "message": error.body["message"],  # type: ignore[index]
        "type": "insufficient_quota",
        "param": None,
        "code": error.body["code"],  # type: ignore[index]
    }
    headers = error.response.headers
    assert int(headers["retry-after"]) > 0
    assert headers["x-ratelimit-limit"] == "1"
    assert headers["x-ratelimit-remaining"] == "0"
    assert len(fake.requests) == 1  # the refused request never reached the upstream


async def test_bad_gateway_key_is_a_401_in_openai_shape(gw: Harness, fake: FakeOpenAI) -> None:
    async with client(gw, key="gwk_not-a-real-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as refused:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert refused.value.body == {
        "message": "Invalid gateway key.",
        "type": "invalid_request_error",
        "param": None,
        "code": "unauthorized",
    }
    assert fake.requests == []


async def test_upstream_errors_pass_through_and_the_query_is_returned(
    gw: Harness, fake: FakeOpenAI
) -> None:
    async with client(gw) as sdk:
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[], extra_headers={"x-fake-status": "400"}
            )
    assert refused.value.body == {
        "message": "Fake error 400.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    await gw.probes.wait_finished(1)
    assert await gw.events() == []
    (day,) = await gw.storage.daily(gw.gateway.today(), gw.gateway.today())
    assert day.queries == 0


async def test_unmeterable_endpoints_are_refused(gw: Harness, fake: FakeOpenAI) -> None:
    async with client(gw) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await sdk.images.generate(prompt="a cat", model="gpt-image-1")
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.create(model="o3", input="hi", background=True)
    assert refused.value.body["code"] == "endpoint_not_allowed"  # type: ignore[index]
    assert fake.requests == []


async def test_error_mid_stream_reaches_the_sdk_and_text_is_charged(gw: Harness) -> None:
    async with client(gw) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-fake-scenario": "error_midstream"},
        )
        with pytest.raises(openai.APIError):
            _ = [chunk async for chunk in stream]
    event = await only_event(gw)
    assert event.outcome == "error" and event.estimated and event.model == "gpt-4o-mini"
    assert event.completion_tokens > 0


async def test_upstream_cut_before_usage_ends_in_an_error_and_an_estimate(gw: Harness) -> None:
    async with client(gw) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-fake-scenario": "cut"},
        )
        with pytest.raises(openai.APIError) as broken:
            _ = [chunk async for chunk in stream]
    assert "upstream connection was lost" in str(broken.value)
    event = await only_event(gw)
    assert event.outcome == "cut" and event.estimated
    assert event.cost > 0  # an estimate is priced too


# --- disconnects: stop by closing -------------------------------------------------------------


async def _leave_after_first_chunk(h: Harness, path: str, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
        async with http.stream(
            "POST", path, json=body, headers=h.auth(**{"x-fake-delay-ms": "50"})
        ) as response:
            await anext(response.aiter_raw())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Xin chào"}],
                "stream": True,
            },
        ),
        ("/v1/responses", {"model": "o3", "input": "Say hi", "stream": True}),
    ],
)
async def test_stop_policy_stops_the_answer_by_closing_it(
    sqlite_url: str, fake: FakeOpenAI, path: str, body: dict[str, Any]
) -> None:
    settings = openai_settings(upstream={"kind": "openai", "on_client_disconnect": "stop"})
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        await _leave_after_first_chunk(h, path, body)
        await asyncio.wait_for(fake.closed_event.wait(), timeout=10)
        event = await only_event(h)
    assert fake.closed == 1  # the gateway closed the upstream stream: OpenAI stops there
    assert event.outcome == "disconnected" and event.estimated
    # At least the prompt, which OpenAI bills for a stopped answer, is charged.
    assert event.prompt_tokens > 0 and event.cost > 0


async def test_drain_policy_reads_on_and_records_the_reported_usage(
    sqlite_url: str, fake: FakeOpenAI
) -> None:
    async with running_gateway(sqlite_url, upstream=fake, settings=openai_settings()) as h:
        body = {"model": "gpt-4o-mini", "messages": [], "stream": True}
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
            hold = h.auth(**STEER, **{"x-fake-scenario": "hold"})
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers=hold
            ) as response:
                await anext(response.aiter_raw())
        fake.release_held()
        event = await only_event(h)
    assert fake.closed == 0
    assert event.outcome in ("complete", "disconnected") and not event.estimated
    assert event.cost == MINI_COST


async def test_prices_follow_a_reload(sqlite_url: str, fake: FakeOpenAI, tmp_path: Any) -> None:
    path = tmp_path / "gateway.toml"
    async with running_gateway(
        sqlite_url, upstream=fake, settings=openai_settings(), config_file=path
    ) as h:
        async with client(h) as sdk:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=[])
            await h.probes.wait_finished(1)
            path.write_text(path.read_text().replace('output = "0.60"', 'output = "1.20"'))
            assert await h.gateway.reload()
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=[])
            await h.probes.wait_finished(2)
        first, second = await h.events()
    # 700 more output tokens at 0.60 more per million.
    assert (first.cost, second.cost) == (MINI_COST, MINI_COST + Decimal("0.00042"))
