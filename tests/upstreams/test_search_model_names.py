"""Search models behind names that do not say so, as reviews of the session
found them: the search-model checks keep short names only, a fallback that
searches is refused off a chat too, one answer by a search model changes
nothing for the next request, and a search no price covers is counted as an
unpriced call."""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from decimal import Decimal
from typing import Any

import httpx
import pytest

from gateway.config import parse_config
from gateway.errors import Forbidden
from gateway.upstreams.anthropic import AnthropicUpstream
from gateway.upstreams.openai import OpenAIUpstream
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, running_gateway
from tests.upstreams.test_sonar_routes import answered_by

_NAME_CHARS = 200_000  # well under the default max_json_body_bytes (1 MiB)
_REQUESTS = 40  # distinct names: 40 * 200 kB = 8 MB if each is kept


def _retained_by(send: Any, tag: str) -> int:
    """Bytes still allocated after ``send`` ran for every name and they were dropped."""
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(_REQUESTS):
            name = f"{tag}{i:04d}" + "x" * _NAME_CHARS  # distinct from other tests' names
            send(name)
            del name
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before


def test_anthropic_refused_model_names_are_not_kept_by_the_search_model_cache() -> None:
    """F1: `_check_router_options` asks `searches_every_answer(model)` of the
    client's model name before the price check; the lru_cache (maxsize 1024)
    keeps every distinct name, so refused requests pin up to 1024 bodies."""
    up = AnthropicUpstream(
        parse_config(
            {
                "upstream": {"kind": "anthropic"},
                "prices": {"claude-sonnet-4-5": {"input": "3", "output": "15"}},
            },
            env={},
        )
    )
    route = up.route("POST", "/messages")

    def send(name: str) -> None:
        body = {"model": name, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(Forbidden):
            up.prepare(route, body, b"", "alice", method="POST", request_id="r")

    retained = _retained_by(send, "anthropic-")
    assert retained < 2_000_000, f"{retained} bytes of refused model names kept"


def test_openai_model_names_are_not_kept_by_the_search_model_cache() -> None:
    """F1 on the OpenAI dialect: with a "*" price (or unpriced_models allowed)
    any name passes the price check and is cached by `_chat_calls`,
    `_check_sonar` and `priced_with`."""
    up = OpenAIUpstream(
        parse_config(
            {"upstream": {"kind": "openai"}, "prices": {"*": {"input": "1", "output": "2"}}},
            env={},
        )
    )
    route = up.route("POST", "/chat/completions")

    def send(name: str) -> None:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
        with contextlib.suppress(Forbidden):
            up.prepare(route, body, b"", "alice", method="POST", request_id="r")

    retained = _retained_by(send, "openai-")
    assert retained < 2_000_000, f"{retained} bytes of model names kept"


# --- a search model behind another name, or a fallback ------------------------------------

PRICES = {
    "gpt-4o": {"input": "2.5", "output": "10"},
    # OpenAI's search model, cheaper than gpt-4o at every rate.
    "gpt-4o-mini-search-preview": {"input": "0.15", "output": "0.6"},
}
SEARCH_MODEL = "gpt-4o-mini-search-preview"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "gpt-4o", "input": "hi", "models": [SEARCH_MODEL]}),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "hi", "models": [SEARCH_MODEL]}),
    ],
    ids=["responses", "completions"],
)
async def test_a_fallback_that_searches_on_every_answer_is_refused_off_a_chat(
    sqlite_url: str, path: str, body: dict[str, Any]
) -> None:
    # A router's fallback that searches on every answer makes a paid call the
    # model asked for does not: refused as dearer, as on a chat (a review of
    # the session: an answer by it was charged its search after the fact, and
    # web_searches_per_day never held it).
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "openai"},
        "prices": PRICES,
        "call_prices": {"openai.chat_web_search": {"price": "0.006"}},
    }
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            refused = await client.post(path, json=body, headers=h.auth())
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "model_fallback_not_allowed"
    assert fake.requests == []


async def test_a_name_a_search_model_answered_stays_what_it_was_for_the_next_request(
    sqlite_url: str,
) -> None:
    # One user's answer by a search model (whatever made it: a router's alias,
    # a fallback) charges that answer its search, and changes nothing for the
    # next request for the same name - another user's, answered by a plain
    # model, is neither refused nor charged a search.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {"upstream": {"kind": "openai"}, "prices": PRICES}
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        bob = await h.add_user("bob")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            searched = await client.post(
                "/v1/chat/completions", json=body, headers=h.auth(**answered_by(SEARCH_MODEL))
            )
            assert searched.status_code == 200
            await h.probes.wait_finished(1)
            plain = await client.post(
                "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {bob}", **answered_by("gpt-4o", 100, 10)},
            )
            assert plain.status_code == 200
            await h.probes.wait_finished(2)
        events = {event.user_id: event for event in await h.events()}
    assert events[USER].web_searches == 1  # counted (no price: not charged)
    assert events["bob"].web_searches == 0
    assert events["bob"].cost == Decimal("0.00035")  # 100 * 2.5 + 10 * 10 per million


# --- F3: an unpriced search fee an OpenAI answer ran is not in gateway_unpriced_calls_total


async def test_an_unpriced_search_an_alias_ran_is_counted_as_an_unpriced_call(
    sqlite_url: str,
) -> None:
    """An alias the router maps to Sonar, on a gateway with no
    `openai.chat_web_search` price: admission cannot refuse it (the name does
    not search), `priced_with` adds the search after the fact and
    `terms.calls_cost` drops it with a log line - the fee Perplexity billed is
    never charged, and the metric this round added for exactly that
    (`gateway_unpriced_calls_total`, "paid side calls answers made that no
    call price covers") stays at 0: only Dify's `_charge_speech` feeds
    `Metered.unpriced_calls`."""
    alias = "news-answers"
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {"upstream": {"kind": "openai"}, "prices": {alias: {"input": "1", "output": "5"}}}
    body: dict[str, Any] = {"model": alias, "messages": [{"role": "user", "content": "Tin tức?"}]}
    steer = answered_by("sonar", 700, 20)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post("/v1/chat/completions", json=body, headers=h.auth(**steer))
        assert answered.status_code == 200
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert event.web_searches == 1  # the search is known to have run
        assert event.cost == Decimal("0.0008")  # 700 * 1 + 20 * 5 per million: no fee
        unpriced = {"upstream": "default", "call": "openai.chat_web_search"}
        assert h.gateway.metrics.get("gateway_unpriced_calls_total", **unpriced) == 1
