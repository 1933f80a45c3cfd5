"""Perplexity's per-answer search fee, through the ways a review of the Sonar
change (R-SONAR-1 to 3) found it passed unmetered or under-charged: an
anthropic-kind upstream at a router's /v1/messages, a router's alias for a
Sonar deployment, and a Sonar model priced only by the "*" entry."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import parse_config
from gateway.sse import SSEDecoder
from gateway.upstreams.openai import OpenAIUpstream
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, running_gateway

# The prices an operator with OpenRouter sets for Sonar ([prices] is one table
# for every upstream kind) and its search fee, as the Sonar tests do.
SONAR_PRICES = {
    "perplexity/sonar": {"input": "1", "output": "1"},
    "perplexity/sonar-pro": {"input": "3", "output": "15"},
    "perplexity/sonar-deep-research": {"input": "2", "output": "8"},
}
SONAR_FEE = Decimal("0.006")
CALL_PRICES = {
    "openai.chat_web_search": {"price": str(SONAR_FEE)},
    "anthropic.web_search": {"price": "0.01"},
}
# No web search left today: a Sonar answer must not run.
NO_SEARCH_LEFT = {"free": {"web_searches_per_day": 0}}
VERSION = {"anthropic-version": "2023-06-01"}


def answered_by(model: str, prompt: int = 7000, completion: int = 200) -> dict[str, str]:
    """The fake's headers for an answer made Perplexity's way (its usage
    fields, citations) by ``model``, with these token counts."""
    return {
        "x-fake-prompt-tokens": str(prompt),
        "x-fake-completion-tokens": str(completion),
        "x-fake-scenario": "perplexity",
        "x-fake-model": model,
    }


# --- R-SONAR-1: an anthropic upstream at a router's /v1/messages ----------------------


@pytest.mark.parametrize(
    "model", ["perplexity/sonar", "perplexity/sonar-pro", "perplexity/sonar-deep-research"]
)
@pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "streamed"])
async def test_sonar_through_an_anthropic_upstream_is_not_searched_unmetered(
    sqlite_url: str, model: str, streamed: bool
) -> None:
    # Attack: an `anthropic` upstream pointed at OpenRouter's Anthropic-compatible
    # /v1/messages (or LiteLLM's, which serves every model) - the setup
    # anthropic.py's `_check_router_options` already guards (`:online`, plugins,
    # models, route). The body names a Sonar model that the shared [prices]
    # table prices: the anthropic dialect never asks whether it searches, so the
    # answer runs Perplexity's billed search with no fee charged, no
    # web_searches_per_day held (this user has none left), and Deep Research -
    # refused on the openai dialect as unbounded - passes too.
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "anthropic"},
        "prices": SONAR_PRICES,
        "call_prices": CALL_PRICES,
        "plans": NO_SEARCH_LEFT,
    }
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 200,
        "stream": streamed,
        "messages": [{"role": "user", "content": "Tin tức hôm nay?"}],
    }
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post("/v1/messages", json=body, headers=h.auth(**VERSION))
        if answered.status_code == 200:
            await h.probes.wait_finished(1)
        events = await h.events()
    # Fixed: refused before anything is forwarded (403: the model, or its
    # search, has no price on this dialect; 429: no web search left today).
    assert answered.status_code in (403, 429), (answered.status_code, events)
    assert fake.requests == []


# --- R-SONAR-2: a Sonar deployment the router names otherwise ----------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "streamed"])
async def test_a_routers_alias_of_sonar_is_charged_its_search(
    sqlite_url: str, streamed: bool
) -> None:
    # Attack: LiteLLM's own Perplexity example names its deployment
    # `perplexity-sonar-reasoning-model` (model_list, litellm_params.model:
    # perplexity/sonar-reasoning). `_SONAR` wants "sonar" at the start of the
    # name or after a "/", so the alias is a plain chat model: no fee, no
    # web_searches_per_day - though the answer says who answered ("model":
    # "sonar-reasoning") and carries Perplexity's search usage
    # (num_search_queries, search_context_size, citations). The operator has no
    # way to say the alias searches.
    alias = "perplexity-sonar-reasoning-model"
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "openai"},
        "prices": {alias: {"input": "1", "output": "5"}},
        "call_prices": CALL_PRICES,
        "plans": NO_SEARCH_LEFT,
    }
    body: dict[str, Any] = {
        "model": alias,
        "stream": streamed,
        "messages": [{"role": "user", "content": "Tin tức hôm nay?"}],
    }
    steer = answered_by("sonar-reasoning")
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post("/v1/chat/completions", json=body, headers=h.auth(**steer))
        if answered.status_code != 200:
            # Fixed at admission: refused, nothing forwarded.
            assert fake.requests == []
            return
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        day = h.gateway.today()
        (row,) = await h.storage.daily(day, day, user_id=USER)
    assert "citations" in answered.text  # Perplexity searched
    # Fixed at settlement: the search is charged and counted.
    tokens = Decimal("0.008")  # 7000 * 1 + 200 * 5 per million
    assert (event.web_searches, row.web_searches) == (1, 1)
    assert event.cost == tokens + SONAR_FEE


# --- R-SONAR-3: a Sonar model priced only by the "*" entry -------------------------------


async def test_a_sonar_model_priced_only_by_the_catch_all_is_refused(sqlite_url: str) -> None:
    # Attack: the operator follows docs/upstreams/openai.md - chat_web_search set
    # at the dearest default fee of the Sonar models [prices] names (sonar,
    # sonar-pro: 0.006) - and keeps a "*" entry for everything else. Every Sonar
    # name is then priced, so `perplexity/sonar-pro-search` (OpenRouter: $18 per
    # 1,000 requests, by the same docs) is admitted and charged the $6 fee: a
    # third of what the operator is billed, on every answer.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "openai"},
        "prices": {"*": {"input": "3", "output": "15"}, **SONAR_PRICES},
        "call_prices": CALL_PRICES,
    }
    body = {
        "model": "perplexity/sonar-pro-search",
        "messages": [{"role": "user", "content": "Tin tức hôm nay?"}],
    }
    steer = {"x-fake-scenario": "perplexity"}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post("/v1/chat/completions", json=body, headers=h.auth(**steer))
    # Pro Search, three times the fee, is refused whatever prices it.
    assert answered.status_code == 403, answered.text
    assert answered.json()["error"]["code"] == "option_not_priced"
    assert fake.requests == []


@pytest.mark.parametrize("model", ["perplexity/sonar-reasoning", "sonar-huge-2027"])
async def test_a_sonar_model_needs_a_price_of_its_own(sqlite_url: str, model: str) -> None:
    # The call price was set for the Sonar models [prices] names; a "*" entry
    # would take any other Sonar model - a dearer one Perplexity adds later - at
    # it. A Sonar model is refused unless the table names it.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "openai"},
        "prices": {"*": {"input": "3", "output": "15"}, **SONAR_PRICES},
        "call_prices": CALL_PRICES,
    }
    body = {"model": model, "messages": [{"role": "user", "content": "Tin tức hôm nay?"}]}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            refused = await client.post("/v1/chat/completions", json=body, headers=h.auth())
            named = await client.post(
                "/v1/chat/completions",
                json={**body, "model": "perplexity/sonar"},
                headers=h.auth(**{"x-fake-scenario": "perplexity"}),
            )
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "model_not_priced"
    assert named.status_code == 200
    assert len(fake.requests) == 1


@pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "streamed"])
async def test_an_answer_from_a_search_model_is_charged_its_search(
    sqlite_url: str, streamed: bool
) -> None:
    # A router's name that says nothing of Sonar ("news-bot"): the request
    # cannot tell, the answer does - it names the model that answered. Its
    # search is charged and counted then, as the model asked for would have been.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "openai"},
        "prices": {"news-bot": {"input": "1", "output": "5"}},
        "call_prices": CALL_PRICES,
    }
    body: dict[str, Any] = {
        "model": "news-bot",
        "stream": streamed,
        "messages": [{"role": "user", "content": "Tin tức hôm nay?"}],
    }
    steer = answered_by("sonar-reasoning")
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post("/v1/chat/completions", json=body, headers=h.auth(**steer))
        assert answered.status_code == 200
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        day = h.gateway.today()
        (row,) = await h.storage.daily(day, day, user_id=USER)
    assert (event.web_searches, row.web_searches) == (1, 1)
    assert event.cost == Decimal("0.008") + SONAR_FEE


@pytest.mark.parametrize("streamed", [False, True], ids=["blocking", "streamed"])
async def test_a_routers_alias_of_sonar_at_an_anthropic_upstream_is_charged_its_search(
    sqlite_url: str, streamed: bool
) -> None:
    """R-SONAR-2's attack through the anthropic dialect, the setup R-SONAR-1 is
    about (LiteLLM's /v1/messages serves every deployment): the alias "news-bot"
    is a Sonar deployment. `_check_router_options` refuses a search model by
    the name asked for only, and only the OpenAI dialect's `priced_with` looks
    at the model that answered: the answer says "sonar-reasoning" answered,
    and is recorded with no search - no fee, no web_searches_per_day count
    (this user has none left)."""
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "anthropic"},
        "prices": {"news-bot": {"input": "1", "output": "5"}},
        "call_prices": CALL_PRICES,
        "plans": {"free": {"web_searches_per_day": 0}},
    }
    body: dict[str, Any] = {
        "model": "news-bot",
        "max_tokens": 200,
        "stream": streamed,
        "messages": [{"role": "user", "content": "Tin tức hôm nay?"}],
    }
    steer = {**VERSION, "x-fake-model": "sonar-reasoning"}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as c:
            answered = await c.post("/v1/messages", json=body, headers=h.auth(**steer))
        assert answered.status_code == 200, answered.text
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert event.model == "sonar-reasoning"
    # The search the answering model ran is counted and charged, at the
    # anthropic dialect's web-search price (review F3).
    assert event.web_searches == 1, event
    # The fake's 12 prompt and 7 completion tokens at 1 and 5 per million.
    assert event.cost == Decimal("0.000047") + Decimal("0.01")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "news-bot", "input": "Tin tức hôm nay?"}),
        ("/v1/completions", {"model": "news-bot", "prompt": "Tin tức hôm nay?"}),
    ],
    ids=["responses", "completions"],
)
async def test_a_routers_alias_of_sonar_off_a_chat_is_charged_its_search(
    sqlite_url: str, path: str, body: dict[str, Any]
) -> None:
    """A router that serves every deployment on every endpoint (LiteLLM bridges
    /v1/responses and /v1/completions to any provider's chat API) answers the
    alias "news-bot" with its Sonar deployment. `_check_sonar` refuses a Sonar
    model off a chat by the name asked for only; `priced_with` adds the
    answering model's search on `route.kind == "chat"` only: here the search is
    neither charged nor counted (and the user has no search left)."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "openai"},
        "prices": {"news-bot": {"input": "1", "output": "5"}},
        "call_prices": CALL_PRICES,
        "plans": {"free": {"web_searches_per_day": 0}},
    }
    steer = {
        "x-fake-prompt-tokens": "7000",
        "x-fake-completion-tokens": "200",
        "x-fake-model": "sonar-reasoning",
    }
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as c:
            answered = await c.post(path, json=body, headers=h.auth(**steer))
        assert answered.status_code == 200, answered.text
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert event.model == "sonar-reasoning"
    assert event.web_searches == 1, event
    assert event.cost == Decimal("0.008") + SONAR_FEE


def _chunk(model: str, delta: dict[str, Any], **more: Any) -> bytes:
    chunk = {
        "id": "c-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}] if delta else [],
        **more,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@pytest.mark.parametrize("first", ["news-bot", "sonar-reasoning"])
def test_a_stream_that_names_a_search_model_after_its_first_chunk_is_charged_its_search(
    first: str,
) -> None:
    # A router that writes its alias on the chunk it builds itself (the role
    # chunk) and the deployment's name on the rest, the usage chunk included:
    # the model that answered is the one the later chunks name (review F4).
    up = OpenAIUpstream(
        parse_config(
            {
                "upstream": {"kind": "openai"},
                "prices": {"news-bot": {"input": "1", "output": "5"}},
                "call_prices": CALL_PRICES,
            },
            env={},
        )
    )
    body = {"model": "news-bot", "stream": True, "messages": [{"role": "user", "content": "?"}]}
    route = up.route("POST", "/chat/completions")
    meter = up.stream_meter(route, body)
    usage = {"prompt_tokens": 7000, "completion_tokens": 200, "total_tokens": 7200}
    stream = (
        _chunk(first, {"role": "assistant", "content": ""})
        + _chunk("sonar-reasoning", {"content": "Tin "})
        + _chunk("sonar-reasoning", {"content": "tức"})
        + _chunk("sonar-reasoning", {}, usage=usage)
        + b"data: [DONE]\n\n"
    )
    for event in SSEDecoder().feed(stream):
        meter.feed(event)
    result = meter.finish(cut=False)
    assert result.model == "sonar-reasoning"
    assert result.web_searches == 1
    assert result.usage is not None and result.usage.cost == Decimal("0.008") + SONAR_FEE
