"""Attacks on the OpenAI dialect's checks (issue 20), against a real gateway in front
of a real local fake upstream: lax booleans, unpriced models, paid tools. Each is
refused before anything is forwarded or reserved, or charged what it cost."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import parse_config
from gateway.errors import Forbidden
from gateway.upstreams.openai import OpenAIUpstream
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway
from tests.servers import read_body

PRICES = {
    "gpt-4o-mini": {"input": "0.15", "output": "0.60"},
    "o3": {"input": "2", "output": "8"},
}
CALL_PRICES = {
    "openai.web_search": {"price": "0.01"},
    "openai.chat_web_search": {"price": "0.03"},
    "openai.audio_output": {"price": "0.005"},
}
# The usage the fake reports for these headers: 7,000 prompt and 200 completion tokens.
STEER = {"x-fake-prompt-tokens": "7000", "x-fake-completion-tokens": "200"}
# gpt-4o-mini: 7000 * 0.15 + 200 * 0.60 = 1170 per million tokens
TOKENS_COST = Decimal("0.00117")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Xin chào"}]}


def settings(**extra: Any) -> dict[str, Any]:
    return {"upstream": {"kind": "openai"}, "prices": PRICES, **extra}


async def post(h: Harness, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post(path, json=body, headers=h.auth(**STEER))


async def nothing_reserved(h: Harness, fake: FakeOpenAI) -> None:
    assert fake.requests == []
    day = h.gateway.today()
    assert await h.storage.daily(day, day, user_id=USER) == []
    assert await h.events() == []


def openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


# --- lax booleans ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "stream": 1}),
        ("/v1/chat/completions", {**CHAT, "stream": "true"}),
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": 1}}),
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "stream": 1}),
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "background": 1}),
    ],
    ids=[
        "chat-stream-1",
        "chat-stream-true",
        "include-usage-1",
        "responses-stream-1",
        "background-1",
    ],
)
async def test_a_lax_boolean_is_refused_not_metered_as_an_estimate(
    sqlite_url: str, path: str, body: dict[str, Any]
) -> None:
    # Attack: a vLLM-like upstream takes "stream": 1 as true and streams 7,200
    # tokens; the gateway read "not streamed", asked for no usage and charged an
    # estimate of 14. Now the request never reaches it.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY, lax=True)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings()) as h:
        refused = await post(h, path, body)
        await nothing_reserved(h, fake)
    error = openai_error(refused, 400, "invalid_type")
    assert error["type"] == "invalid_request_error"
    assert "expected a boolean" in error["message"]


async def test_a_real_boolean_is_metered_with_the_real_tokens(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY, lax=True)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings()) as h:
        answered = await post(h, "/v1/chat/completions", {**CHAT, "stream": True})
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answered.status_code == 200
    assert (event.total_tokens, event.cost, event.estimated) == (7200, TOKENS_COST, False)


# --- model prices ------------------------------------------------------------------------


async def test_an_unpriced_model_is_refused_not_charged_0(sqlite_url: str) -> None:
    # Attack: "o3-pro" took o3's price (any "-" suffix made a snapshot), and a model
    # with no price at all cost 0.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings()) as h:
        pro = await post(h, "/v1/chat/completions", {**CHAT, "model": "o3-pro"})
        free = await post(h, "/v1/responses", {"model": "gpt-5-pro", "input": "hi"})
        await nothing_reserved(h, fake)
        snapshot = await post(h, "/v1/chat/completions", {**CHAT, "model": "o3-2025-04-16"})
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    for refused, model in ((pro, "o3-pro"), (free, "gpt-5-pro")):
        error = openai_error(refused, 403, "model_not_priced")
        assert error["type"] == "permission_error" and f"'{model}'" in error["message"]
    assert snapshot.status_code == 200
    assert event.cost == Decimal("0.0156")  # 7000 * 2 + 200 * 8 per million, o3's price


async def test_unpriced_models_allowed_are_recorded_at_cost_0(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    allow = settings(pricing={"unpriced_models": "allow"})
    async with running_gateway(sqlite_url, upstream=fake, settings=allow) as h:
        answered = await post(h, "/v1/chat/completions", {**CHAT, "model": "o3-pro"})
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answered.status_code == 200
    assert (event.model, event.total_tokens, event.cost) == ("o3-pro", 7200, Decimal(0))


# --- paid tools --------------------------------------------------------------------------

WEB_RESPONSE = {"model": "gpt-4o-mini", "input": "Tin tức?", "tools": [{"type": "web_search"}]}


@pytest.mark.parametrize(
    ("path", "body", "tool"),
    [
        ("/v1/responses", WEB_RESPONSE, "web_search"),
        (
            "/v1/responses",
            {
                **WEB_RESPONSE,
                "tools": [{"type": "function", "name": "f"}, {"type": "image_generation"}],
            },
            "image_generation",
        ),
        ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "audio_output"),
    ],
    ids=["web_search", "image_generation", "audio_output"],
)
async def test_a_tool_without_a_price_is_refused_naming_it(
    sqlite_url: str, path: str, body: dict[str, Any], tool: str
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings()) as h:
        refused = await post(h, path, body)
        await nothing_reserved(h, fake)
    error = openai_error(refused, 403, "tool_not_priced")
    assert f"'{tool}'" in error["message"]


@pytest.mark.parametrize("streamed", [False, True])
async def test_web_searches_a_response_ran_are_charged_per_call(
    sqlite_url: str, streamed: bool
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    priced = settings(call_prices=CALL_PRICES)
    async with running_gateway(sqlite_url, upstream=fake, settings=priced) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            headers = h.auth(**STEER, **{"x-fake-tool-calls": "web_search_call,web_search_call"})
            body = {**WEB_RESPONSE, "stream": streamed}
            answered = await client.post("/v1/responses", json=body, headers=headers)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answered.status_code == 200
    if streamed:
        # the two calls and the message (OpenAI's sequence since issue 25)
        assert answered.text.count("event: response.output_item.added") == 3
        assert answered.text.count('"item":{"id":"web_search_call_') == 4  # added, done
    else:
        assert [item["type"] for item in orjson.loads(answered.content)["output"]][:2] == [
            "web_search_call",
            "web_search_call",
        ]
    assert event.total_tokens == 7200
    assert event.cost == TOKENS_COST + 2 * Decimal("0.01")


async def test_a_chat_search_is_charged_once_per_answer(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    priced = settings(call_prices=CALL_PRICES)
    async with running_gateway(sqlite_url, upstream=fake, settings=priced) as h:
        answered = await post(h, "/v1/chat/completions", {**CHAT, "web_search_options": {}})
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answered.status_code == 200
    assert event.cost == TOKENS_COST + Decimal("0.03")


async def test_spoken_answers_are_charged_their_audio_tokens_at_the_audio_rate(
    sqlite_url: str,
) -> None:
    # Attack: audio tokens cost 8x text tokens, and were billed as text.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    prices = {
        **PRICES,
        "gpt-4o-audio-preview": {"input": "2.5", "output": "10", "audio_output": "80"},
    }
    priced = settings(prices=prices, call_prices=CALL_PRICES)
    body = {**CHAT, "model": "gpt-4o-audio-preview", "modalities": ["text", "audio"]}
    async with running_gateway(sqlite_url, upstream=fake, settings=priced) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            headers = h.auth(**STEER, **{"x-fake-audio-completion-tokens": "150"})
            answered = await client.post("/v1/chat/completions", json=body, headers=headers)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answered.status_code == 200
    # 7000 * 2.5 + 50 * 10 + 150 * 80 per million, and one audio answer
    assert event.cost == Decimal("0.03") + Decimal("0.005")


# --- Perplexity's Sonar models: a web search on every answer -----------------------------

# Perplexity's published rates (docs.perplexity.ai/getting-started/pricing): sonar
# $1 / $1 per million tokens and, at a "low" search context, a $5 per 1,000
# requests fee; sonar-pro $3 / $15 and $6. One chat_web_search price holds the
# dearer fee of the two.
SONAR_PRICES = {
    "sonar": {"input": "1", "output": "1"},
    "perplexity/sonar-pro": {"input": "3", "output": "15"},
    "sonar-deep-research": {"input": "2", "output": "8"},
    "perplexity/sonar-deep-research": {"input": "2", "output": "8"},
}
SONAR_FEE = Decimal("0.006")
SONAR_CALL_PRICES = {"openai.chat_web_search": {"price": str(SONAR_FEE)}}
# 7,000 prompt and 200 completion tokens (STEER)
SONAR_TOKENS_COST = {"sonar": Decimal("0.0072"), "perplexity/sonar-pro": Decimal("0.024")}
# The fake answers as Perplexity does: its usage (num_search_queries, cost...) on
# every chunk, citations beside the answer.
AS_PERPLEXITY = {"x-fake-scenario": "perplexity"}


def sonar_settings(**extra: Any) -> dict[str, Any]:
    return {"upstream": {"kind": "openai"}, "prices": SONAR_PRICES, **extra}


def sonar_chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Tin tức hôm nay?"}], **extra}


@pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "streamed"])
@pytest.mark.parametrize("model", ["sonar", "perplexity/sonar-pro"])
async def test_a_sonar_answer_is_charged_and_counted_as_a_web_search(
    database_url: str, model: str, streamed: bool
) -> None:
    # Attack: a Sonar model (Perplexity itself, or through OpenRouter) searches
    # the web before every answer and bills a request fee for it; the gateway
    # took it for a plain chat model: the fee was never charged, and a plan's
    # web_searches_per_day never held it (a user with no search left searched on).
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    config = sonar_settings(
        call_prices=SONAR_CALL_PRICES, plans={"free": {"web_searches_per_day": 1}}
    )
    body = sonar_chat(model, stream=streamed)
    async with running_gateway(database_url, upstream=fake, settings=config) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            headers = h.auth(**STEER, **AS_PERPLEXITY)
            answered = await client.post("/v1/chat/completions", json=body, headers=headers)
            await h.probes.wait_finished(1)
            (event,) = await h.events()
            day = h.gateway.today()
            (row,) = await h.storage.daily(day, day, user_id=USER)
            assert answered.status_code == 200
            assert "citations" in answered.text  # Perplexity's answer, passed on
            assert (event.total_tokens, event.estimated) == (7200, False)
            assert event.cost == SONAR_TOKENS_COST[model] + SONAR_FEE
            assert (event.web_searches, row.web_searches) == (1, 1)
            refused = await client.post("/v1/chat/completions", json=body, headers=headers)
    # The day's one search is spent: the next Sonar answer is refused, not searched.
    error = openai_error(refused, 429, "web_search_limit")
    assert refused.headers["x-ratelimit-resource"] == "web_searches_per_day"
    assert "web searches" in error["message"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "streamed"])
async def test_a_sonar_model_without_a_search_price_is_refused(
    sqlite_url: str, streamed: bool
) -> None:
    # The model has a token price; its search fee has none: refused, as any paid
    # call without a price is, before anything is reserved or forwarded.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=sonar_settings()) as h:
        refused = await post(h, "/v1/chat/completions", sonar_chat("sonar", stream=streamed))
        await nothing_reserved(h, fake)
    error = openai_error(refused, 403, "tool_not_priced")
    assert "'chat_web_search'" in error["message"]
    assert 'call_prices."openai.chat_web_search"' in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        sonar_chat("sonar-deep-research"),
        sonar_chat("perplexity/sonar-deep-research", stream=True),
        # a router's fallback, cheaper per token than the model it stands in for
        sonar_chat("perplexity/sonar-pro", models=["perplexity/sonar-deep-research"]),
    ],
    ids=["perplexity", "openrouter", "fallback"],
)
async def test_sonar_deep_research_is_refused_its_searches_cannot_be_bounded(
    sqlite_url: str, body: dict[str, Any]
) -> None:
    # Attack: Deep Research bills each search it decides to run ($5 per 1,000;
    # 30 in Perplexity's own example), which admission cannot bound: one call
    # price reserved, dozens billed. Refused, with nothing reserved.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    config = sonar_settings(call_prices=SONAR_CALL_PRICES)
    async with running_gateway(sqlite_url, upstream=fake, settings=config) as h:
        refused = await post(h, "/v1/chat/completions", body)
        await nothing_reserved(h, fake)
    error = openai_error(refused, 403, "model_not_bounded")
    assert "sonar-deep-research'" in error["message"]
    assert "web search" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", sonar_chat("sonar", web_search_options={"search_context_size": "high"})),
        ("/v1/chat/completions",
         sonar_chat("perplexity/sonar-pro", web_search_options={"search_type": "pro"})),
        ("/v1/completions", {"model": "sonar", "prompt": "Tin tức hôm nay?"}),
        ("/v1/responses", {"model": "perplexity/sonar-pro", "input": "Tin tức hôm nay?"}),
    ],
    ids=["context-high", "pro-search", "completions", "responses"],
)  # fmt: skip
async def test_a_sonar_search_dearer_than_its_price_is_refused(
    sqlite_url: str, path: str, body: dict[str, Any]
) -> None:
    # A "high" search context bills sonar $12 per 1,000 requests against the $5
    # the call price holds; Pro Search $14 to $22. Off a chat completion, the
    # search would be neither priced nor counted.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    config = sonar_settings(call_prices=SONAR_CALL_PRICES)
    async with running_gateway(sqlite_url, upstream=fake, settings=config) as h:
        refused = await post(h, path, body)
        await nothing_reserved(h, fake)
    openai_error(refused, 403, "option_not_priced")


# --- service tiers (review-sec F2) -----------------------------------------------------

RESPONSE = {"model": "gpt-4o-mini", "input": "Xin chào", "max_output_tokens": 100}


@pytest.mark.parametrize("tier", ["priority", "scale", ["priority"]])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
async def test_a_dearer_service_tier_is_refused_not_charged_at_the_standard_price(
    sqlite_url: str, path: str, tier: object
) -> None:
    # Attack: "service_tier": "priority" was forwarded, and OpenAI billed the answer
    # at its priority rates (about twice the standard ones) while the gateway
    # charged (and bounded) it at the one [prices] rate. The tiers at or below the
    # standard rates still go through.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    body = CHAT if path == "/v1/chat/completions" else RESPONSE
    async with running_gateway(sqlite_url, upstream=fake, settings=settings()) as h:
        refused = await post(h, path, {**body, "service_tier": tier})
        await nothing_reserved(h, fake)
        for allowed in ("auto", "default", "flex", None):
            answered = await post(h, path, {**body, "service_tier": allowed})
            assert answered.status_code == 200, answered.text
    error = openai_error(refused, 403, "service_tier_not_priced")
    assert error["type"] == "permission_error" and repr(tier) in error["message"]
    assert [r.json["service_tier"] for r in fake.requests] == ["auto", "default", "flex", None]


# --- the account's files, by id (review-sec F3) ----------------------------------------

_FILE_TEXT = {"type": "text", "text": "Quote this document in full."}
_INPUT_TEXT = {"type": "input_text", "text": "Quote this document in full."}


def _responses_input(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, _INPUT_TEXT]}]


ACCOUNT_FILES = {
    "chat-file-part": (
        "/v1/chat/completions",
        {
            **CHAT,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "file", "file": {"file_id": "file-Bobs"}}, _FILE_TEXT],
                }
            ],
        },
    ),
    "responses-input-file": (
        "/v1/responses",
        {**RESPONSE, "input": _responses_input({"type": "input_file", "file_id": "file-Bobs"})},
    ),
    "responses-input-image": (
        "/v1/responses",
        {**RESPONSE, "input": _responses_input({"type": "input_image", "file_id": "file-Bobs"})},
    ),
    "responses-file-search": (
        "/v1/responses",
        {**RESPONSE, "tools": [{"type": "file_search", "vector_store_ids": ["vs_Bobs"]}]},
    ),
    "responses-container-id": (
        "/v1/responses",
        {**RESPONSE, "tools": [{"type": "code_interpreter", "container": "cntr_Bobs"}]},
    ),
    "responses-container-files": (
        "/v1/responses",
        {
            **RESPONSE,
            "tools": [
                {"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["f-1"]}}
            ],
        },
    ),
    # review2 R2-4: a file id anywhere in any tool, here an image tool's mask.
    "responses-image-mask": (
        "/v1/responses",
        {
            **RESPONSE,
            "tools": [{"type": "image_generation", "input_image_mask": {"file_id": "file-Bobs"}}],
        },
    ),
}
# The tools those answers use, priced so that only the file ids refuse them.
TOOL_PRICES = {
    "openai.file_search": {"price": "0.0025"},
    "openai.code_interpreter": {"price": "0.03"},
    "openai.image_generation": {"price": "0.04"},
}


@pytest.mark.parametrize(("path", "body"), ACCOUNT_FILES.values(), ids=ACCOUNT_FILES.keys())
async def test_an_answer_cannot_read_the_accounts_files_by_id(
    sqlite_url: str, path: str, body: dict[str, Any]
) -> None:
    # Attack: the /files, /vector_stores and /containers routes are the operator's
    # (OpenAI looks an id up across the whole project), but an answer naming a file,
    # a vector store or a container by id was forwarded with the operator's key, and
    # the model read (and quoted) whatever the id held: the operator's file, another
    # app's, another user's upload. Refused like an item_reference.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        sqlite_url, upstream=fake, settings=settings(call_prices=TOOL_PRICES)
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            direct = await client.get("/v1/files/file-Bobs", headers=h.auth())
        refused = await post(h, path, body)
        await nothing_reserved(h, fake)
    openai_error(direct, 403, "endpoint_not_allowed")
    openai_error(refused, 403, "endpoint_not_allowed")


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "image_generation", "input_image_mask": {"file_id": None}},
        {"type": "function", "name": "read", "parameters": {
            "type": "object", "properties": {"file_id": {"type": "string"}}}},
    ],
    ids=["null-file-id", "function-argument-named-file-id"],
)  # fmt: skip
async def test_a_tool_naming_no_file_is_forwarded(sqlite_url: str, tool: dict[str, Any]) -> None:
    # The R2-4 check reads file ids, not the word: a null one names no file, and a
    # function tool's JSON Schema may well have an argument called file_id.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        sqlite_url, upstream=fake, settings=settings(call_prices=TOOL_PRICES)
    ) as h:
        answer = await post(h, "/v1/responses", {**RESPONSE, "tools": [tool]})
    assert answer.status_code == 200, answer.text
    assert len(fake.requests) == 1


# --- answer names a client chooses -------------------------------------------------------


class _NamesAnswersAsVllm:
    """An OpenAI-compatible server that names its answers as vLLM does -
    ``chatcmpl-{X-Request-Id header, else the body's request_id}`` - or, given
    SGLang's ``rid``, by that; each answer 1,000 + 1,000 tokens."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], dict[str, Any]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        request = orjson.loads(body)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.seen.append((headers, request))
        name = (
            request.get("rid")
            or headers.get("x-request-id")
            or request.get("request_id")
            or f"{len(self.seen):032d}"
        )
        answer = {
            "id": f"chatcmpl-{name}",
            "object": "chat.completion",
            "created": 1,
            "model": request["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "x"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000},
        }
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})


@pytest.mark.parametrize("where", ["request_id", "rid", "x-request-id"])
async def test_answers_named_by_the_client_are_each_charged(database_url: str, where: str) -> None:
    """Attack: a stored chat completion (``store: true``) is recorded under the
    name the upstream gives it, once. vLLM names it by the client's
    ``X-Request-Id`` or body ``request_id`` (SGLang by ``rid``): the same name
    sent three times made the second and third answers look like retries of
    the first - generated upstream, charged nothing. The gateway drops the
    body's fields and sends its own request id as ``X-Request-Id``."""
    upstream = _NamesAnswersAsVllm()
    config = {
        "upstream": {"kind": "openai"},
        "prices": {"gpt-4o-mini": {"input": "1000", "output": "1000"}},  # 1.00 per 1,000
    }
    body: dict[str, Any] = {**CHAT, "max_tokens": 1000, "store": True}
    extra: dict[str, str] = {}
    if where == "x-request-id":
        extra["X-Request-Id"] = "0123456789abcdef"
    else:
        body[where] = "0123456789abcdef"
    async with running_gateway(database_url, upstream=upstream, settings=config) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            for i in range(3):
                answer = await client.post(
                    "/v1/chat/completions", json=body, headers={**h.auth(), **extra}
                )
                assert answer.status_code == 200, answer.text
                await h.probes.wait_finished(i + 1)
                headers, forwarded = upstream.seen[-1]
                assert "request_id" not in forwarded and "rid" not in forwarded
                assert headers["x-request-id"] == answer.headers["x-request-id"]
        day = h.gateway.today()
        rows = await h.storage.daily(day, day)
    assert len(upstream.seen) == 3
    spent = sum((row.cost for row in rows), Decimal(0))
    tokens = sum(row.total_tokens for row in rows)
    queries = sum(row.queries for row in rows)
    assert (queries, tokens, spent) == (3, 6000, Decimal("6"))  # before: (3, 2000, 2)


# --- Anthropic's prompt cache through a router (review4 R4-2) ----------------------------
# An upstream of kind openai that is an LLM router in front of Claude (LiteLLM,
# Portkey, OpenRouter) passes the cache_control of OpenAI-format messages and
# tools on to Anthropic, ttl included. Anthropic bills the cache writes at 1.25x
# input (5 minutes, the default) or 2x (1 hour); the router reports them
# (LiteLLM: counted in prompt_tokens and named in
# usage.cache_creation_input_tokens, docs.litellm.ai/docs/completion/prompt_caching).

CLAUDE = "claude-sonnet-4-5"
CLAUDE_PRICE = {"input": "3", "cached_input": "0.30", "cache_write_input": "3.75", "output": "15"}
ROUTER_PRICES = {CLAUDE: {**CLAUDE_PRICE, "cache_write_1h_input": "6"}}
BIG = "lorem ipsum " * 30_000
REVIEW_BODY = {
    "model": CLAUDE,
    "max_tokens": 20,
    "messages": [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": BIG, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
            ],
        },
        {"role": "user", "content": "hi"},
    ],
}
# LiteLLM's answer for Claude: prompt_tokens counts every prompt token; the
# cache writes are named apart.
REVIEW_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": CLAUDE,
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {
        "prompt_tokens": 100_010,
        "completion_tokens": 20,
        "total_tokens": 100_030,
        "prompt_tokens_details": {"cached_tokens": 0},
        "cache_creation_input_tokens": 100_000,
    },
}


def test_a_one_hour_cache_through_a_router_is_refused_or_charged_its_price() -> None:
    # Review4 R4-2 (the reviewer's test): 100,000 tokens written to a 1-hour
    # cache were charged at input, 0.30033 against the 0.60033 Anthropic bills.
    up = OpenAIUpstream(
        parse_config({"upstream": {"kind": "openai"}, "prices": ROUTER_PRICES}, env={})
    )
    route = up.refine(up.route("POST", "/chat/completions"), REVIEW_BODY)
    body = orjson.loads(orjson.dumps(REVIEW_BODY))
    try:
        prepared = up.prepare(route, body, b"", "attacker", method="POST", request_id="r")
    except Forbidden:
        return  # refused before anything is spent: fine
    metered = up.meter_blocking(route, prepared.body, orjson.dumps(REVIEW_ANSWER))
    assert metered.usage is not None
    billed = (10 * Decimal(3) + 100_000 * Decimal(6) + 20 * Decimal(15)) / Decimal(1_000_000)
    assert metered.usage.cost >= billed, (
        f"forwarded with cache_control ttl 1h and charged {metered.usage.cost}; "
        f"Anthropic bills {billed}"
    )


def router_settings(prices: dict[str, Any] = ROUTER_PRICES, **extra: Any) -> dict[str, Any]:
    return {"upstream": {"kind": "openai"}, "prices": prices, **extra}


def cached_chat(ttl: str | None = "1h", *, where: str = "message", **body: Any) -> dict[str, Any]:
    """A chat completion with a cache breakpoint (a ttl, none, or absent) in one
    of the places a router reads one."""
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl != "absent":
        control["ttl"] = ttl
    part = {"type": "text", "text": "a very long document ...", "cache_control": control}
    chat: dict[str, Any] = {"model": CLAUDE, "max_tokens": 20, **body}
    if where == "injected":
        # LiteLLM puts the control on the messages the point names (review5 R5-7).
        del part["cache_control"]
        chat["messages"] = [
            {"role": "system", "content": [part]},
            {"role": "user", "content": "hi"},
        ]
        point = {"location": "message", "role": "system", "control": control}
        chat["cache_control_injection_points"] = [point]
        return chat
    if where == "message":
        chat["messages"] = [
            {"role": "system", "content": [part]},
            {"role": "user", "content": "hi"},
        ]
        return chat
    chat["messages"] = [{"role": "user", "content": "hi"}]
    if where == "tool":
        function = {"name": "read", "parameters": {"type": "object"}}
        chat["tools"] = [{"type": "function", "function": function, "cache_control": control}]
    else:  # the top level
        chat["cache_control"] = control
    return chat


async def post_router(
    h: Harness, path: str, body: dict[str, Any], **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post(path, json=body, headers=h.auth(**headers))


def router_steer(extra: dict[str, Any], prompt: int = 100_010) -> dict[str, str]:
    """The fake as a router reporting ``prompt`` prompt tokens, 20 completion
    tokens and ``extra`` in its usage."""
    return {
        "x-fake-prompt-tokens": str(prompt),
        "x-fake-completion-tokens": "20",
        "x-fake-usage-extra": orjson.dumps(extra).decode(),
    }


LITELLM_WRITES = {"cache_creation_input_tokens": 100_000}
LITELLM_SPLIT = {
    "cache_creation_input_tokens": 100_000,
    "prompt_tokens_details": {
        "cached_tokens": 0,
        "cache_creation_tokens": 100_000,
        "cache_creation_token_details": {
            "ephemeral_5m_input_tokens": 40_000,
            "ephemeral_1h_input_tokens": 60_000,
        },
    },
}


def micro(*terms: tuple[int, str]) -> Decimal:
    return sum((count * Decimal(rate) for count, rate in terms), Decimal(0)).scaleb(-6)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "blocking"])
@pytest.mark.parametrize(
    ("extra", "cost"),
    [
        # Without a split, every write taken as a 1-hour one (the request asked for it).
        (LITELLM_WRITES, micro((10, "3"), (100_000, "6"), (20, "15"))),
        (LITELLM_SPLIT, micro((10, "3"), (40_000, "3.75"), (60_000, "6"), (20, "15"))),
    ],
    ids=["litellm", "litellm-split"],
)
async def test_a_one_hour_cache_through_a_router_is_charged_its_price(
    database_url: str, stream: bool, extra: dict[str, Any], cost: Decimal
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, upstream=fake, settings=router_settings()) as h:
        body = cached_chat("1h", stream=stream)
        answer = await post_router(h, "/v1/chat/completions", body, **router_steer(extra))
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answer.status_code == 200, answer.text
    control = fake.requests[0].json["messages"][0]["content"][0]["cache_control"]
    assert control == {"type": "ephemeral", "ttl": "1h"}
    assert cost in (Decimal("0.60033"), Decimal("0.51033"))
    assert event.cost == cost
    assert (event.prompt_tokens, event.cache_write_tokens) == (100_010, 100_000)
    assert event.outcome == "complete"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "blocking"])
async def test_a_one_hour_cache_through_a_routers_responses_is_charged_its_price(
    sqlite_url: str, stream: bool
) -> None:
    # The Responses API's usage, the writes named in input_tokens_details.
    part = {"type": "input_text", "text": "a very long document ...",
            "cache_control": {"type": "ephemeral", "ttl": "1h"}}  # fmt: skip
    body = {"model": CLAUDE, "max_output_tokens": 20, "stream": stream,
            "input": [{"role": "user", "content": [part]}]}  # fmt: skip
    extra = {"input_tokens_details": {"cached_tokens": 0, "cache_creation_tokens": 100_000}}
    steer = {"x-fake-prompt-tokens": "100010", "x-fake-completion-tokens": "20",
             "x-fake-usage-extra": orjson.dumps(extra).decode()}  # fmt: skip
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=router_settings()) as h:
        answer = await post_router(h, "/v1/responses", body, **steer)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answer.status_code == 200, answer.text
    assert event.cost == micro((10, "3"), (100_000, "6"), (20, "15")) == Decimal("0.60033")


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "blocking"])
@pytest.mark.parametrize("ttl", ["5m", None, "absent"])
async def test_a_five_minute_cache_through_a_router_is_charged_its_price(
    sqlite_url: str, stream: bool, ttl: str | None
) -> None:
    # Charged at input (0.30033) before: the writes at cache_write_input (1.25x).
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=router_settings()) as h:
        body = cached_chat(ttl, stream=stream)
        steer = router_steer(LITELLM_WRITES)
        answer = await post_router(h, "/v1/chat/completions", body, **steer)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answer.status_code == 200, answer.text
    assert event.cost == micro((10, "3"), (100_000, "3.75"), (20, "15")) == Decimal("0.37533")


@pytest.mark.parametrize("where", ["message", "tool", "top-level", "injected"])
async def test_a_one_hour_cache_through_a_router_is_refused_where_it_has_no_price(
    sqlite_url: str, where: str
) -> None:
    # Review4 R4-2: docs/configuration.md promises the refusal for any upstream.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    unpriced = router_settings({CLAUDE: CLAUDE_PRICE})
    async with running_gateway(sqlite_url, upstream=fake, settings=unpriced) as h:
        one_hour = await post_router(h, "/v1/chat/completions", cached_chat("1h", where=where))
        in_vietnamese = await post_router(
            h, "/v1/chat/completions", cached_chat("1h", where=where), **{"accept-language": "vi"}
        )
        other = await post_router(h, "/v1/chat/completions", cached_chat("2h", where=where))
        await nothing_reserved(h, fake)
    error = openai_error(one_hour, 403, "option_not_priced")
    assert error["type"] == "permission_error"
    assert error["message"] == (
        "The option cache_control.ttl: '1h' has no price on this gateway "
        f'(prices."{CLAUDE}".cache_write_1h_input), so it is not available.'
    )
    assert openai_error(in_vietnamese, 403, "option_not_priced")["message"] == (
        "Tùy chọn cache_control.ttl: '1h' chưa được định giá trên gateway này "
        f'(prices."{CLAUDE}".cache_write_1h_input) nên không dùng được.'
    )
    assert "'2h'" in openai_error(other, 403, "option_not_priced")["message"]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "blocking"])
@pytest.mark.parametrize(
    ("ttl", "rate"), [("1h", "6"), ("5m", "3.75"), (None, "3.75")], ids=["1h", "5m", "none"]
)
async def test_a_cache_litellm_injects_is_charged_at_its_ttls_rate(
    sqlite_url: str, stream: bool, ttl: str | None, rate: str
) -> None:
    # Attack (review5 R5-7): the ttl in cache_control_injection_points, which
    # LiteLLM puts on the system message, was not read: 100,000 writes LiteLLM
    # leaves unattributed (no cache_creation_token_details) were charged at
    # 3.75 (0.37533) where Anthropic bills a 1-hour cache's at 6 (0.60033).
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=router_settings()) as h:
        body = cached_chat(ttl, where="injected", stream=stream)
        steer = router_steer(LITELLM_WRITES)
        answer = await post_router(h, "/v1/chat/completions", body, **steer)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answer.status_code == 200, answer.text
    (point,) = fake.requests[0].json["cache_control_injection_points"]
    assert point["control"] == {"type": "ephemeral", "ttl": ttl}  # passed on as it was
    assert event.cost == micro((10, "3"), (100_000, rate), (20, "15"))
    assert event.cost == (Decimal("0.60033") if ttl == "1h" else Decimal("0.37533"))


async def test_a_one_hour_cache_litellm_injects_is_reserved_at_the_one_hour_rate(
    sqlite_url: str,
) -> None:
    # Review5 R5-7: the money bound held no 1-hour write for an injected ttl.
    # With 0.50 left, a 100 KB prompt is bound near 0.38 as 5-minute writes and
    # near 0.60 as 1-hour ones: refused before anything is sent.
    settings = router_settings(plans={"free": {"cost_per_day": "0.50"}})
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        body = cached_chat("1h", where="injected")
        body["messages"][0]["content"][0]["text"] = "x" * 100_000
        refused = await post_router(h, "/v1/chat/completions", body)
    assert refused.status_code == 429, refused.text
    assert refused.headers["x-ratelimit-resource"] == "cost_per_day"
    assert fake.requests == []


async def test_a_ttl_in_a_functions_schema_is_not_a_cache(sqlite_url: str) -> None:
    # The client's JSON Schema may name a property "cache_control": not a block.
    schema = {"type": "object", "cache_control": {"ttl": "1h"}}
    tool = {"type": "function", "function": {"name": "read", "parameters": schema}}
    body = {"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        sqlite_url, upstream=fake, settings=router_settings({CLAUDE: CLAUDE_PRICE})
    ) as h:
        answer = await post_router(h, "/v1/chat/completions", body)
        await h.probes.wait_finished(1)
    assert answer.status_code == 200, answer.text


async def test_a_one_hour_cache_through_a_router_is_reserved_at_the_one_hour_rate(
    sqlite_url: str,
) -> None:
    # The money bound held the prompt as 5-minute writes (3.75): with 0.50 left, a
    # 100 KB prompt is bound near 0.38 so, and near 0.60 as 1-hour writes (6).
    text = "x" * 100_000
    settings = router_settings(plans={"free": {"cost_per_day": "0.50"}})
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        one_hour = cached_chat("1h")
        one_hour["messages"][0]["content"][0]["text"] = text
        refused = await post_router(h, "/v1/chat/completions", one_hour)
        assert refused.status_code == 429, refused.text
        assert refused.headers["x-ratelimit-resource"] == "cost_per_day"
        assert fake.requests == []
        five_minutes = cached_chat("5m")
        five_minutes["messages"][0]["content"][0]["text"] = text
        admitted = await post_router(h, "/v1/chat/completions", five_minutes)
        await h.probes.wait_finished(1)
    assert admitted.status_code == 200, admitted.text
    assert len(fake.requests) == 1


# --- review 9: a router's extra_body -------------------------------------------------------


class _LiteLLMExtraBody:
    """An OpenAI-compatible router in front of the fake as LiteLLM's proxy is:
    the request's ``extra_body`` goes to the deployment's OpenAI client
    (litellm/utils.py, ``add_provider_specific_params_to_optional_params``),
    which merges it over the request's own fields (the openai package does:
    ``extra_body`` wins over ``model``)."""

    def __init__(self, inner: FakeOpenAI) -> None:
        self.inner = inner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("extra_body"), dict):
            body.update(body.pop("extra_body"))
            raw = orjson.dumps(body)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        given = False

        async def replay() -> Any:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.inner({**scope, "headers": headers}, replay, send)


async def test_extra_body_runs_a_model_the_gateway_refuses_charged_as_the_cheap_one(
    sqlite_url: str,
) -> None:
    # R9-1. "o1-pro" has no price: asked for at top level it is refused, 403,
    # nothing forwarded. Asked for in extra_body behind LiteLLM, the router
    # runs it on the operator's key, and the gateway charges gpt-4o-mini's
    # price (an answer naming a model the table does not know is charged as
    # the requested one). Expected once fixed: refused like the top-level ask,
    # or the router answers with the model the gateway checked.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    router = _LiteLLMExtraBody(fake)
    async with running_gateway(sqlite_url, upstream=router, settings=settings()) as h:
        direct = await post(h, "/v1/chat/completions", {**CHAT, "model": "o1-pro"})
        openai_error(direct, 403, "model_not_priced")
        await nothing_reserved(h, fake)
        smuggled = await post(
            h, "/v1/chat/completions", {**CHAT, "extra_body": {"model": "o1-pro"}}
        )
        charged = []
        if smuggled.status_code == 200:
            await h.probes.wait_finished(1)
            charged = [(e.model, e.cost) for e in await h.events()]
    ran = [r.json.get("model") for r in fake.requests if isinstance(r.json, dict)]
    assert "o1-pro" not in ran, f"the router ran {ran}; charged {charged}"


# --- review-meter F3, F4: a paid tool's options past its one call price ---------------

# The one call price of each (the 1 GB container's session, the dearest image).
_PAID_TOOLS: dict[str, Any] = {
    "upstream": {"kind": "openai"},
    "prices": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}},
    "call_prices": {
        "openai.code_interpreter": {"price": "0.03"},
        "openai.image_generation": {"price": "0.25"},
    },
}


async def test_the_unpriced_option_refusals_are_in_the_users_language(database_url: str) -> None:
    """The refusals of an option, a plugin and a tool that runs its own model
    name their message (gateway/messages.py): a Vietnamese caller reads them in
    Vietnamese, as every other refusal."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    vi = {"accept-language": "vi"}
    advisor = {"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-8"}
    price = _PAID_TOOLS["prices"]["gpt-4o-mini"]
    settings = {**_PAID_TOOLS, "prices": {"gpt-4o-mini": price, "gpt-4o-mini:online": price}}
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            bodies = [
                {"model": "gpt-4o-mini", "input": "Go.", "tools": [{"type": "image_generation", "partial_images": 2}]},
                {"model": "gpt-4o-mini:online", "input": "Go."},
                {"model": "gpt-4o-mini", "input": "Go.", "tools": [advisor]},
            ]  # fmt: skip
            answers = [
                await client.post("/v1/responses", json=body, headers=h.auth(**vi))
                for body in bodies
            ]
    assert [a.status_code for a in answers] == [403, 403, 403]
    assert [a.json()["error"]["code"] for a in answers] == [
        "option_not_priced",
        "tool_not_priced",
        "tool_not_bounded",
    ]
    messages = [a.json()["error"]["message"] for a in answers]
    assert messages[0] == (
        "Tùy chọn partial_images: 2 chưa được định giá trên gateway này nên không dùng được."
    )
    assert messages[1] == "Plugin 'web' chưa được định giá trên gateway này nên không dùng được."
    assert messages[2].startswith("Công cụ 'advisor_20260301' chạy mô hình 'claude-opus-4-8'")
    assert fake.requests == []


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "64g"}},
        {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4G"}},
        {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": 4}},
        {"type": "image_generation", "partial_images": 3},
        {"type": "image_generation", "partial_images": "1"},
    ],
    ids=["container-64g", "container-4G", "container-number", "previews", "previews-text"],
)
async def test_a_paid_tools_dearer_options_are_refused(
    database_url: str, tool: dict[str, Any]
) -> None:
    """The attacks: a 64 GB container session (billed 64 times the 1 GB one the
    call price was set for) and three streamed image previews (100 image output
    tokens each, in no usage), charged the one call price."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    body = {"model": "gpt-4o-mini", "input": "Go.", "tools": [tool]}
    async with running_gateway(database_url, upstream=fake, settings=_PAID_TOOLS) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answer = await client.post("/v1/responses", json=body, headers=h.auth())
        events = await h.events()
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == "option_not_priced"
    assert fake.requests == [] and events == []


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "1g"}},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "image_generation", "partial_images": 0},
    ],
    ids=["container-1g", "container-default", "no-previews"],
)
async def test_a_paid_tools_default_options_are_forwarded(
    database_url: str, tool: dict[str, Any]
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    body = {"model": "gpt-4o-mini", "input": "Go.", "tools": [tool]}
    async with running_gateway(database_url, upstream=fake, settings=_PAID_TOOLS) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answer = await client.post("/v1/responses", json=body, headers=h.auth())
        assert answer.status_code == 200, answer.text
        await h.probes.wait_finished(1)
    assert len(fake.requests) == 1
