"""Web-search allowance, advanced-RAG gating, upload limits, the history window."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.errors import StorageError
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.dify import FakeDify
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway
from tests.servers import serve
from tests.test_admission import two_gateways

CHAT = {"query": "Tin tức hôm nay?", "inputs": {}, "response_mode": "streaming", "user": "x"}
WEB = {**CHAT, "inputs": {"search_mode": "web"}}
WEB_ANSWER = {"x-fake-metadata": orjson.dumps({"source": "web_search"}).decode()}
FALLBACK_ANSWER = {"x-fake-metadata": orjson.dumps({"source": "kb_fallback_web"}).decode()}


def plans(**free: Any) -> dict[str, Any]:
    return {"plans": {"free": free}}


async def post(h: Harness, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post(path, json=body, headers=h.auth(**headers))


async def today_row(h: Harness) -> Any:
    day = h.gateway.today()
    rows = await h.storage.daily(day, day, user_id=USER)
    return rows[0] if rows else None


# --- web searches ------------------------------------------------------------------------


async def test_web_searches_are_counted_from_chat_and_workflow_answers(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url, settings=plans()) as h:
        await post(h, "/v1/chat-messages", CHAT, **WEB_ANSWER)
        await post(
            h, "/v1/workflows/run", {"inputs": {}, "response_mode": "streaming"}, **FALLBACK_ANSWER
        )
        await post(h, "/v1/chat-messages", {**CHAT, "response_mode": "blocking"}, **WEB_ANSWER)
        await post(h, "/v1/chat-messages", CHAT)  # an answer from the knowledge base
        await h.probes.wait_finished(4)
        events = await h.events()
        row = await today_row(h)
    assert [e.web_searches for e in events] == [1, 1, 1, 0]
    assert row.web_searches == 3 and row.queries == 4


async def test_web_search_requests_are_refused_once_the_allowance_is_spent(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans(web_searches_per_day=1)) as h:
        first = await post(h, "/v1/chat-messages", WEB, **WEB_ANSWER)
        await h.probes.wait_finished(1)
        refused = await post(h, "/v1/chat-messages", WEB, **WEB_ANSWER)
        plain = await post(h, "/v1/chat-messages", CHAT)  # not asking for the web: still fine
        await h.probes.wait_finished(3)
        row = await today_row(h)
    assert first.status_code == 200 and plain.status_code == 200
    assert refused.status_code == 429
    assert refused.json()["code"] == "web_search_limit"
    assert refused.json()["message"].startswith(
        "You have used all 1 web searches of your plan for today."
    )
    assert refused.headers["x-ratelimit-resource"] == "web_searches_per_day"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert int(refused.headers["retry-after"]) > 0
    assert fake.hits("/chat-messages") == 2
    assert row.queries == 2  # the refusal reserved nothing


async def test_spent_allowance_can_disable_web_search_instead_of_refusing(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {**plans(web_searches_per_day=1), "web_search": {"when_exhausted": "disable"}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        await post(h, "/v1/chat-messages", WEB, **FALLBACK_ANSWER)
        await h.probes.wait_finished(1)
        asked = await post(h, "/v1/chat-messages", WEB)
        plain = await post(h, "/v1/chat-messages", CHAT)
    assert asked.status_code == 200 and plain.status_code == 200
    first, second, third = (r.json for r in fake.requests)
    assert "allow_web_fallback" not in first["inputs"]  # type: ignore[index]
    assert second["inputs"] == {"search_mode": "web", "allow_web_fallback": False}  # type: ignore[index]
    assert third["inputs"] == {"allow_web_fallback": False}  # type: ignore[index]


@pytest.mark.parametrize(
    ("limits", "expected"),
    [({}, 200), ({"queries_per_day": 10}, 503)],
    ids=["web-limit-only", "queries-closed"],
)
async def test_the_web_search_allowance_fails_open_with_admission(
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    limits: dict[str, int],
    expected: int,
) -> None:
    """The allowance is checked in the admission step, so it follows admission's
    storage-error policy: open for the web search itself (a storage hiccup never
    blocks a user wrongly), refused when another check that applies is closed."""
    async with running_gateway(sqlite_url, settings=plans(web_searches_per_day=1, **limits)) as h:
        await post(h, "/v1/chat-messages", WEB, **WEB_ANSWER)
        await h.probes.wait_finished(1)

        async def broken(*args: object, **kwargs: object) -> None:
            raise StorageError("database unreachable")

        # Only admission fails; settle still works.
        monkeypatch.setattr(h.storage, "admit", broken)
        response = await post(h, "/v1/chat-messages", WEB, **WEB_ANSWER)
        await h.probes.wait_finished(2)
        failures = h.gateway.metrics.get("gateway_web_search_count_failures_total")
        row = await today_row(h)
    assert response.status_code == expected
    if expected == 200:
        assert failures == 1
        assert row.web_searches == 2  # over the allowance: never blocked wrongly
        assert any(
            "fail-open" in r.message and "web-search" in r.message
            for r in caplog.records
            if r.levelno == logging.WARNING
        )
    else:
        assert response.json()["code"] == "storage_unavailable"
        assert failures == 0
        assert row.web_searches == 1


# --- web searches reserved in the admission step (issue 20) ----------------------------


SLOW = {"x-fake-delay-ms": "20"}  # answers under way while the others are admitted


@pytest.mark.parametrize("mode", ["refuse", "disable"])
async def test_twenty_parallel_requests_with_one_search_left_run_one_search(
    database_url: str, mode: str
) -> None:
    """The attack of issue 20: the allowance was read apart from the atomic
    admission, so 20 parallel requests with one search left ran 20 searches."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {**plans(web_searches_per_day=1), "web_search": {"when_exhausted": mode}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/v1/chat-messages", json=WEB, headers=h.auth(**WEB_ANSWER, **SLOW))
                    for _ in range(20)
                )
            )
        await h.probes.wait_finished(20)
        row = await today_row(h)
        events = await h.events()
    with_web = [
        r.json
        for r in fake.requests
        if r.path.endswith("/chat-messages") and "allow_web_fallback" not in r.json["inputs"]  # type: ignore[index]
    ]
    assert len(with_web) == 1  # exactly one request reached the app with web search on
    if mode == "refuse":
        assert sorted(r.status_code for r in responses) == [200] + [429] * 19
        assert {r.json()["code"] for r in responses if r.status_code == 429} == {"web_search_limit"}
        assert fake.hits("/chat-messages") == 1
        assert (row.queries, row.web_searches) == (1, 1)
    else:
        assert [r.status_code for r in responses] == [200] * 20
        assert fake.hits("/chat-messages") == 20
        # The fake says every answer searched (it ignores the input): the ledger
        # counts what the answers say, and the day row agrees with it.
        assert row.queries == 20
        assert row.web_searches == sum(e.web_searches for e in events) == 20


async def test_the_reserved_search_becomes_what_the_answer_used(database_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(
        database_url, fake=fake, settings=plans(web_searches_per_day=2)
    ) as h:
        # Asked, but answered from the knowledge base: the reservation goes.
        assert (await post(h, "/v1/chat-messages", WEB)).status_code == 200
        await h.probes.wait_finished(1)
        assert (await today_row(h)).web_searches == 0
        # Asked and the upstream failed: the query and the search are given back.
        failed = await post(h, "/v1/chat-messages", WEB, **{"x-fake-status": "500"})
        await h.probes.wait_finished(2)
        assert failed.status_code == 500
        row = await today_row(h)
        assert (row.queries, row.web_searches) == (1, 0)
        # Both searches are still there to use.
        for _ in range(2):
            assert (await post(h, "/v1/chat-messages", WEB, **WEB_ANSWER)).status_code == 200
        await h.probes.wait_finished(4)
        refused = await post(h, "/v1/chat-messages", WEB, **WEB_ANSWER)
        row = await today_row(h)
        events = await h.events()
    assert refused.status_code == 429
    assert (row.queries, row.web_searches) == (3, 2)
    assert [e.web_searches for e in events] == [0, 1, 1]


# --- web searches on OpenAI and Anthropic upstreams (review-sec F4) ------------------------

OPENAI = {
    "upstream": {"kind": "openai"},
    "prices": {"gpt-4o-mini": {"input": "1", "output": "1"}},
    "call_prices": {
        "openai.web_search": {"price": "0.01"},
        "openai.chat_web_search": {"price": "0.03"},
    },
}
SEARCHING_RESPONSE = {
    "model": "gpt-4o-mini",
    "input": "news today?",
    "tools": [{"type": "web_search"}],
}
RAN_SEARCHES = {"x-fake-tool-calls": "web_search_call,web_search_call"}


async def test_the_daily_web_search_allowance_holds_openai_web_searches(
    database_url: str,
) -> None:
    """The attack: with ``web_searches_per_day = 1`` on an OpenAI upstream, three
    answers with the Responses ``web_search`` tool were all forwarded and the
    day's ``web_searches`` stayed 0: the allowance was read only from Dify's
    inputs and answer metadata. Now a request listing the tool reserves a search,
    the answer's web_search_call items settle it (an answer that searched counts
    once, however many calls it made), and the next is refused; a request that
    cannot search is not held."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {**OPENAI, **plans(web_searches_per_day=1)}
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        first = await post(h, "/v1/responses", SEARCHING_RESPONSE, **RAN_SEARCHES)
        await h.probes.wait_finished(1)
        refused = [
            await post(h, "/v1/responses", SEARCHING_RESPONSE, **RAN_SEARCHES) for _ in range(2)
        ]
        plain = await post(h, "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"})
        # Four: the refusals finish too (a wait for two returned before the
        # plain answer was settled, and its event was missing under load).
        await h.probes.wait_finished(4)
        row = await today_row(h)
        events = await h.events()
    assert first.status_code == 200 and plain.status_code == 200
    assert [r.status_code for r in refused] == [429, 429]
    assert refused[0].json()["error"]["code"] == "web_search_limit"
    assert refused[0].headers["x-ratelimit-resource"] == "web_searches_per_day"
    assert len(fake.requests) == 2
    assert (row.queries, row.web_searches) == (2, 1)
    assert sorted(e.web_searches for e in events) == [0, 1]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "news?"}],
         "web_search_options": {}},
        {"model": "gpt-4o-mini-search-preview",
         "messages": [{"role": "user", "content": "news?"}]},
    ],
    ids=["web_search_options", "search-model"],
)  # fmt: skip
async def test_the_allowance_holds_chat_completions_that_search(
    sqlite_url: str, body: dict[str, Any]
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {**OPENAI, **plans(web_searches_per_day=1)}
    settings["prices"] = {**OPENAI["prices"], "gpt-4o-mini-search-preview": {"input": "1"}}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        first = await post(h, "/v1/chat/completions", body)
        await h.probes.wait_finished(1)
        refused = await post(h, "/v1/chat/completions", body)
        row = await today_row(h)
    assert (first.status_code, refused.status_code) == (200, 429)
    assert (row.queries, row.web_searches) == (1, 1)


async def test_a_response_that_did_not_search_gives_its_reservation_back(sqlite_url: str) -> None:
    """A request listing the tool reserves a search; an answer that ran none is
    settled at 0, so the allowance is still there for the next one."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {**OPENAI, **plans(web_searches_per_day=1)}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        unused = await post(h, "/v1/responses", SEARCHING_RESPONSE)  # answered without searching
        await h.probes.wait_finished(1)
        assert (await today_row(h)).web_searches == 0
        searched = await post(h, "/v1/responses", SEARCHING_RESPONSE, **RAN_SEARCHES)
        await h.probes.wait_finished(2)
        refused = await post(h, "/v1/responses", SEARCHING_RESPONSE)
        row = await today_row(h)
    assert [r.status_code for r in (unused, searched, refused)] == [200, 200, 429]
    assert (row.queries, row.web_searches) == (2, 1)


async def test_a_spent_allowance_refuses_openai_searches_even_in_disable_mode(
    sqlite_url: str,
) -> None:
    """``when_exhausted = "disable"`` turns a Dify app's search off through one of
    its inputs; an OpenAI request has no such input (an ``inputs`` member would
    only make OpenAI refuse it), so a search it has no allowance for is refused,
    and the other requests are forwarded as they came."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {
        **OPENAI,
        **plans(web_searches_per_day=1),
        "web_search": {"when_exhausted": "disable"},
    }
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        first = await post(h, "/v1/responses", SEARCHING_RESPONSE, **RAN_SEARCHES)
        await h.probes.wait_finished(1)
        refused = await post(h, "/v1/responses", SEARCHING_RESPONSE, **RAN_SEARCHES)
        plain = await post(h, "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"})
    assert [r.status_code for r in (first, refused, plain)] == [200, 429, 200]
    assert refused.json()["error"]["code"] == "web_search_limit"
    assert [("inputs" in r.json) for r in fake.requests] == [False, False]  # type: ignore[operator]


async def test_the_daily_web_search_allowance_holds_anthropic_web_searches(
    sqlite_url: str,
) -> None:
    """The same on an Anthropic upstream: a message listing the ``web_search``
    server tool reserves a search, settled from the answer's
    ``usage.server_tool_use.web_search_requests``."""
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "anthropic"},
        "prices": {"claude-sonnet-4-5": {"input": "3", "output": "15"}},
        "call_prices": {"anthropic.web_search": {"price": "0.01"}},
        **plans(web_searches_per_day=1),
    }
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "news today?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    }
    steer = {"anthropic-version": "2023-06-01", "x-fake-web-searches": "2"}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        first = await post(h, "/v1/messages", body, **steer)
        await h.probes.wait_finished(1)
        refused = await post(h, "/v1/messages", body, **steer)
        row = await today_row(h)
        (event,) = await h.events()
    assert (first.status_code, refused.status_code) == (200, 429)
    assert refused.json()["error"]["code"] == "web_search_limit"
    assert (row.queries, row.web_searches, event.web_searches) == (1, 1, 1)


# --- advanced RAG ---------------------------------------------------------------------


ADVANCED = {**CHAT, "inputs": {"rag_mode": "advanced"}}


async def test_advanced_rag_refused_when_not_in_the_plan(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans(advanced_rag=False)) as h:
        refused = await post(h, "/v1/chat-messages", ADVANCED)
        plain = await post(h, "/v1/chat-messages", CHAT)
        await h.probes.wait_finished(2)
        row = await today_row(h)
    assert refused.status_code == 403
    assert refused.json() == {
        "code": "feature_not_in_plan",
        "message": "Advanced RAG is not included in your plan.",
        "status": 403,
    }
    assert plain.status_code == 200 and fake.hits("/chat-messages") == 1
    assert (row.queries, row.advanced_rag) == (1, 0)


async def test_advanced_rag_counted_when_allowed(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url, settings=plans(advanced_rag=True)) as h:
        await post(h, "/v1/chat-messages", ADVANCED)
        await post(h, "/v1/chat-messages", CHAT)
        await h.probes.wait_finished(2)
        row = await today_row(h)
    assert (row.queries, row.advanced_rag) == (2, 1)


# --- values as Dify reads them (issue 20) -------------------------------------------------


async def test_a_nul_does_not_get_advanced_rag_past_the_plan(sqlite_url: str) -> None:
    # Attack: Dify strips the NUL, so the app runs advanced RAG for "advanced\u0000".
    fake = FakeDify(api_key=UPSTREAM_KEY)
    sneaky = {**CHAT, "inputs": {"rag_mode": "advanced\x00"}}
    async with running_gateway(sqlite_url, fake=fake, settings=plans(advanced_rag=False)) as h:
        refused = await post(h, "/v1/chat-messages", sneaky)
        inner = await post(
            h, "/v1/chat-messages", {**CHAT, "inputs": {"rag_mode": "\x00adv\x00anced"}}
        )
    assert refused.status_code == 403 and refused.json()["code"] == "feature_not_in_plan"
    assert inner.status_code == 403
    assert fake.hits("/chat-messages") == 0


async def test_a_nul_does_not_get_a_web_search_past_a_spent_allowance(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans(web_searches_per_day=1)) as h:
        await post(h, "/v1/chat-messages", WEB, **WEB_ANSWER)
        await h.probes.wait_finished(1)
        sneaky = {**CHAT, "inputs": {"search_mode": "web\x00"}}
        refused = await post(h, "/v1/chat-messages", sneaky, **WEB_ANSWER)
        row = await today_row(h)
    assert refused.status_code == 429 and refused.json()["code"] == "web_search_limit"
    assert fake.hits("/chat-messages") == 1
    assert (row.queries, row.web_searches) == (1, 1)


async def test_an_allowed_value_with_a_nul_is_forwarded_and_counted_as_judged(
    sqlite_url: str,
) -> None:
    # What is forwarded is what was judged: Dify reads "advanced\u0000" as "advanced",
    # and the gateway counted it as an advanced-RAG query.
    fake = FakeDify(api_key=UPSTREAM_KEY)
    sneaky = {**CHAT, "inputs": {"rag_mode": "advanced\x00"}}
    async with running_gateway(sqlite_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        allowed = await post(h, "/v1/chat-messages", sneaky)
        await h.probes.wait_finished(1)
        row = await today_row(h)
    assert allowed.status_code == 200
    (forwarded,) = fake.requests
    assert forwarded.json["inputs"]["rag_mode"].replace("\x00", "") == "advanced"  # type: ignore[index]
    assert (row.queries, row.advanced_rag) == (1, 1)


# --- uploads ------------------------------------------------------------------------------

BOUNDARY = "gatewaytestboundary"


def multipart(size: int, user: str = "mallory") -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + b"\x00" * size
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


async def upload(
    h: Harness, body: bytes, *, chunked: bool, headers: dict[str, str] | None = None
) -> httpx.Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    headers = h.auth(
        **{"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, **(headers or {})
    )
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post(
            "/v1/files/upload", content=chunks() if chunked else body, headers=headers
        )


MB = 1024 * 1024


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_uploads_over_the_plan_limit_are_refused_without_forwarding(
    sqlite_url: str, chunked: bool
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans(file_size_mb=1)) as h:
        over = await upload(h, multipart(MB + 1), chunked=chunked)
        far_over = await upload(h, multipart(3 * MB), chunked=chunked)
        row = await today_row(h)
    for response in (over, far_over):
        assert response.status_code == 413
        assert response.json() == {
            "code": "file_too_large",
            "message": "The file is larger than your plan allows (1 MB).",
            "status": 413,
        }
    assert fake.requests == []  # the upstream received nothing
    assert row is None  # nothing counted


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_uploads_under_the_limit_are_forwarded_and_counted(
    sqlite_url: str, chunked: bool
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans(file_size_mb=1)) as h:
        exact = await upload(h, multipart(MB), chunked=chunked)  # exactly at the limit
        small = await upload(h, multipart(1000), chunked=chunked)
        row = await today_row(h)
    assert exact.status_code == 201 and small.status_code == 201
    assert fake.uploaded_bytes == [MB, 1000]
    assert [f["user"] for f in fake.upload_fields] == [USER, USER]
    assert row.uploads == 2
    assert row.upload_bytes == MB + 1000  # the files, not the form fields


async def test_json_body_cap_is_configurable(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(
        sqlite_url, fake=fake, settings={"server": {"max_json_body_bytes": 200}}
    ) as h:
        refused = await post(h, "/v1/chat-messages", {**CHAT, "query": "x" * 300})
        fine = await post(h, "/v1/chat-messages", CHAT)
    assert refused.status_code == 413 and refused.json()["code"] == "request_too_large"
    assert fine.status_code == 200 and fake.hits("/chat-messages") == 1


# --- the chat-history window -----------------------------------------------------------------


async def test_conversation_history_is_limited_to_the_window(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    now = int(time.time())
    day = 86400
    fake.conversations = [
        {
            "id": f"c{age}",
            "name": "",
            "inputs": {},
            "status": "normal",
            "introduction": "",
            "created_at": now - 60 * day,
            "updated_at": now - age * day,
        }
        for age in (1, 29, 31, 45)
    ]
    fake.messages = [
        {
            "id": f"m{age}",
            "conversation_id": "old",
            "query": "q",
            "answer": "a",
            "created_at": now - age * day,
        }
        for age in (40, 35)
    ] + [
        {
            "id": f"n{age}",
            "conversation_id": "edge",
            "query": "q",
            "answer": "a",
            "created_at": now - age * day,
        }
        for age in (31, 29, 2)
    ]
    async with running_gateway(sqlite_url, fake=fake, settings=plans(chat_history_days=30)) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            conversations = await client.get(
                "/v1/conversations", params={"limit": "4"}, headers=h.auth()
            )
            old = await client.get(
                "/v1/messages", params={"conversation_id": "old"}, headers=h.auth()
            )
            edge = await client.get(
                "/v1/messages", params={"conversation_id": "edge", "limit": "3"}, headers=h.auth()
            )
    assert conversations.status_code == 200
    page = conversations.json()
    assert [c["id"] for c in page["data"]] == ["c1", "c29"]
    assert (page["limit"], page["has_more"]) == (4, False)
    assert int(conversations.headers["content-length"]) == len(conversations.content)
    assert old.json()["data"] == [] and old.json()["has_more"] is False
    assert [m["id"] for m in edge.json()["data"]] == ["n29", "n2"]
    assert edge.json()["has_more"] is False


async def test_history_is_untouched_without_a_window(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans()) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            response = await client.get("/v1/conversations", headers=h.auth())
    assert len(response.json()["data"]) == len(fake.conversations)


async def test_large_non_file_fields_do_not_get_around_the_limit(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    smuggled = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="padding"\r\n\r\n'.encode()
        + b"x" * (200 * 1024)
        + b"\r\n"
        + multipart(10)
    )
    async with running_gateway(sqlite_url, fake=fake, settings=plans(file_size_mb=1)) as h:
        response = await upload(h, smuggled, chunked=True)
    assert response.status_code == 413 and fake.requests == []


@pytest.mark.parametrize(
    ("limit", "sizes", "statuses"),
    [
        ({"meter": "uploads", "per": "day", "max": 2}, [100, 100, 100], [201, 201, 429]),
        # The file's own bytes count, not the multipart framing: 2 x 1250 fits.
        ({"meter": "upload_bytes", "per": "month", "max": 2500}, [1250, 1250, 1], [201, 201, 429]),
    ],
)  # fmt: skip
async def test_upload_limits_are_checked_when_the_upload_is_asked(
    database_url: str, limit: dict[str, Any], sizes: list[int], statuses: list[int]
) -> None:
    """Issue 21: uploads and upload bytes per day or month ([[plans.NAME.limits]])
    refuse an upload they leave no room for, before it is forwarded."""
    settings = {"plans": {"free": {"limits": [limit]}}}
    async with running_gateway(database_url, settings=settings) as h:
        results = []
        async with httpx.AsyncClient(base_url=h.url) as client:
            for size in sizes:
                results.append(
                    await client.post(
                        "/v1/files/upload",
                        files={"file": ("notes.txt", b"x" * size, "text/plain")},
                        headers=h.auth(),
                    )
                )
                # Counted once the upstream has taken it, after the answer.
                await h.probes.wait_finished(len(results))
        assert h.fake is not None
        forwarded = list(h.fake.uploaded_bytes)
    assert [r.status_code for r in results] == statuses
    refused = results[-1]
    assert refused.json()["code"] == "plan_limit"
    assert refused.headers["x-ratelimit-resource"] == f"{limit['meter']}_per_{limit['per']}"
    assert forwarded == sizes[:2]  # the refused upload never reached the upstream


# --- upload limits are reserved, exactly (issue 21) -------------------------------------

UPLOAD_LIMITS = {
    "uploads": ({"meter": "uploads", "per": "day", "max": 3}, 100),
    "upload_bytes": ({"meter": "upload_bytes", "per": "day", "max": 1000}, 300),
}


@pytest.mark.parametrize("meter", list(UPLOAD_LIMITS))
async def test_parallel_uploads_across_two_processes_never_pass_the_limit(
    database_url: str, tmp_path: Path, meter: str
) -> None:
    """Twelve uploads at once through two gateway processes, each held by the
    upstream a while: three fit (3 uploads; 3 x 300 of 1000 bytes) and only
    those reach it. Counters read at the check and written after the upstream
    took the file let all twelve through."""
    limit, size = UPLOAD_LIMITS[meter]
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {"plans": {"free": {"limits": [limit]}}}
    async with two_gateways(database_url, tmp_path, fake, {}, settings=settings) as (
        ports,
        key,
        storage,
    ):
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"http://127.0.0.1:{ports[i % 2]}/v1/files/upload",
                        files={"file": ("notes.txt", b"x" * size, "text/plain")},
                        headers={"Authorization": f"Bearer {key}", "x-fake-delay-ms": "100"},
                    )
                    for i in range(12)
                )
            )
        rows = await storage.daily(date.min, date.max, user_id=USER)
    assert sorted(r.status_code for r in responses) == [201] * 3 + [429] * 9
    assert {r.json()["code"] for r in responses if r.status_code == 429} == {"plan_limit"}
    assert fake.uploaded_bytes == [size] * 3
    assert [(row.uploads, row.upload_bytes) for row in rows] == [(3, 3 * size)]


async def test_large_non_file_fields_do_not_get_around_the_upload_limits(
    sqlite_url: str,
) -> None:
    """Under upload limits (and no file size limit) the body is read whole
    before its file is reserved: other fields may add 64 KiB, no more."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    smuggled = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="padding"\r\n\r\n'.encode()
        + b"x" * (200 * 1024)
        + b"\r\n"
        + multipart(10)
    )
    limits = [{"meter": "upload_bytes", "per": "day", "max": 1000}]
    async with running_gateway(sqlite_url, fake=fake, settings=plans(limits=limits)) as h:
        response = await upload(h, smuggled, chunked=True)
        row = await today_row(h)
    assert response.status_code == 413
    assert response.json() == {
        "code": "request_too_large",
        "message": "The upload's other form fields exceed 65536 bytes.",
        "status": 413,
    }
    assert fake.requests == [] and row is None


async def send_file(h: Harness, size: int) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post(
            "/v1/files/upload",
            files={"file": ("notes.txt", b"x" * size, "text/plain")},
            headers=h.auth(),
        )


ONE_UPLOAD = plans(limits=[{"meter": "uploads", "per": "day", "max": 1}])


async def test_an_upload_the_upstream_refuses_is_given_back(database_url: str) -> None:
    """The reservation is the upload's record only once the upstream has taken
    the file: refused (413 here), it is given back at once."""
    fake = FakeDify(api_key=UPSTREAM_KEY, max_upload_bytes=500)
    async with running_gateway(database_url, fake=fake, settings=ONE_UPLOAD) as h:
        refused = await send_file(h, 600)  # over the upstream's own limit
        await h.probes.wait_finished(1)
        after_refusal = await today_row(h)
        taken = await send_file(h, 100)
        await h.probes.wait_finished(2)
        over = await send_file(h, 100)
        row = await today_row(h)
    assert (refused.status_code, refused.json()["code"]) == (413, "file_too_large")
    assert after_refusal.uploads == 0  # reserved (the row), then given back
    assert taken.status_code == 201
    assert taken.headers["x-ratelimit-resource"] == "uploads_per_day"
    assert taken.headers["x-ratelimit-remaining"] == "0"
    assert over.status_code == 429
    assert fake.uploaded_bytes == [600, 100]
    assert (row.uploads, row.upload_bytes) == (1, 100)


async def test_an_upload_whose_upstream_is_unreachable_is_given_back(database_url: str) -> None:
    async with serve(FakeDify(api_key=UPSTREAM_KEY)) as dead:  # closed afterwards
        pass
    async with running_gateway(database_url, upstream_url=dead + "/v1", settings=ONE_UPLOAD) as h:
        failed = [await send_file(h, 100) for _ in range(2)]
        await h.probes.wait_finished(2)
        row = await today_row(h)
    # Both were reserved in turn (the second fits only once the first is back).
    assert [r.status_code for r in failed] == [502, 502]
    assert (row.uploads, row.upload_bytes) == (0, 0)


async def test_an_upload_not_reserved_while_the_database_is_away_is_counted_once_taken(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail-open, as before: the counters cannot be read nor the reservation
    made, the upload goes through and is counted once the upstream has taken
    it - unless the file alone is past a limit's maximum, which no upload can
    fit (a read-only check let it through)."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    limits = [{"meter": "upload_bytes", "per": "day", "max": 1000}]
    async with running_gateway(sqlite_url, fake=fake, settings=plans(limits=limits)) as h:
        reserve, daily = h.storage.reserve_upload, h.storage.daily

        async def away(*args: Any, **kwargs: Any) -> Any:
            raise StorageError("database unreachable")

        async def count_only(user_id: str, **kwargs: Any) -> Any:
            if kwargs.get("limits"):
                raise StorageError("database unreachable")
            return await reserve(user_id, **kwargs)  # the count after the upload

        monkeypatch.setattr(h.storage, "daily", away)
        monkeypatch.setattr(h.storage, "reserve_upload", count_only)
        through = await send_file(h, 600)
        await h.probes.wait_finished(1)
        too_large = await send_file(h, 1001)
        await h.probes.wait_finished(2)
        day = h.gateway.today()
        (row,) = await daily(day, day, user_id=USER)
    assert through.status_code == 201
    assert (too_large.status_code, too_large.json()["code"]) == (429, "plan_limit")
    assert fake.uploaded_bytes == [600]
    assert (row.uploads, row.upload_bytes) == (1, 600)


async def test_parallel_uploads_of_a_teams_members_never_pass_the_team_limit(
    database_url: str,
) -> None:
    """Two members upload at once, twelve files, each held by the upstream a
    while: the team's limit of two is reserved over both, in the same step as
    their own (of three each)."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    uploads = {"meter": "uploads", "per": "day"}
    settings = {
        "plans": {
            "free": {"limits": [{**uploads, "max": 3}]},
            "team": {"limits": [{**uploads, "max": 2}]},
        }
    }
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        keys = [None, await h.add_user("bob")]
        await h.gateway.accounts.create_team("acme", plan="team")
        for member in (USER, "bob"):
            await h.gateway.accounts.set_team(member, "acme")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/files/upload",
                        files={"file": ("notes.txt", b"x" * 10, "text/plain")},
                        headers={
                            "x-fake-delay-ms": "100",
                            **(h.auth() if key is None else {"Authorization": f"Bearer {key}"}),
                        },
                    )
                    for key in keys * 6
                )
            )
        await h.probes.wait_finished(12)
        rows = await h.storage.daily(h.gateway.today(), h.gateway.today())
    assert sorted(r.status_code for r in responses) == [201] * 2 + [429] * 10
    assert {r.json()["code"] for r in responses if r.status_code == 429} == {"team_limit"}
    assert refused_by(responses) == {"team_uploads_per_day"}
    assert len(fake.uploaded_bytes) == 2
    assert sum(row.uploads for row in rows) == 2


def refused_by(responses: list[httpx.Response]) -> set[str]:
    return {r.headers["x-ratelimit-resource"] for r in responses if r.status_code == 429}


async def test_an_attackers_parallel_uploads_past_the_limits_are_refused(
    sqlite_url: str,
) -> None:
    """Forty uploads at once from one user, chunked (no Content-Length), of
    sizes chosen to squeeze past the byte limit, and one far larger than it:
    what reaches the upstream fits both limits, and is exactly what is counted."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    limits = [
        {"meter": "uploads", "per": "day", "max": 10},
        {"meter": "upload_bytes", "per": "day", "max": 5000},
    ]
    sizes = [700, 1, 999, 250, 0, 1300] * 6 + [4999, 5001, 120, 80]
    async with running_gateway(sqlite_url, fake=fake, settings=plans(limits=limits)) as h:
        delayed = {"x-fake-delay-ms": "50"}
        responses = await asyncio.gather(
            *(upload(h, multipart(size), chunked=True, headers=delayed) for size in sizes),
            upload(h, multipart(50 * MB), chunked=True),
        )
        await h.probes.wait_finished(len(sizes) + 1)
        row = await today_row(h)
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {201, 429}
    assert statuses[-1] == 429 and responses[-1].json()["code"] == "plan_limit"
    forwarded = fake.uploaded_bytes
    assert statuses.count(201) == len(forwarded) <= 10
    assert sum(forwarded) <= 5000
    assert (row.uploads, row.upload_bytes) == (len(forwarded), sum(forwarded))


# --- review of the upload reservation (issue 21) --------------------------------------------


async def test_an_upload_whose_reservation_outcome_is_unknown_is_counted_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reservation that committed but whose answer was lost (PostgreSQL: the
    connection dropped or the command timed out after the commit) takes the
    fail-open path: the upload is forwarded and counted again once the upstream
    took it. One upload must be counted once."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = plans(limits=[{"meter": "uploads", "per": "day", "max": 5}])
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        real = h.storage.reserve_upload

        async def answer_lost(*args: Any, **kwargs: Any) -> Any:
            counted = await real(*args, **kwargs)
            if kwargs.get("limits"):  # the reservation, not the count after the upload
                raise StorageError("connection lost after the commit")
            return counted

        monkeypatch.setattr(h.storage, "reserve_upload", answer_lost)
        taken = await send_file(h, 100)
        await h.probes.wait_finished(1)
        row = await today_row(h)
    assert taken.status_code == 201
    assert fake.uploaded_bytes == [100]
    assert (row.uploads, row.upload_bytes) == (1, 100)


async def test_an_upload_held_only_by_a_count_is_never_spooled_without_a_bound(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``uploads`` limit alone (no ``upload_bytes`` limit, no ``file_size_mb``)
    needs no size to reserve, yet the body is read whole into a temporary file
    with no bound at all before the first byte is forwarded: one user with a
    count allowance can fill the gateway's disk (bounded only by the time
    between pieces, ``server.body_timeout``), where without the limit the body
    streamed through."""
    import gateway.proxy

    spooled: list[tuple[int | None, int | None]] = []
    real = gateway.proxy.spool_multipart

    async def watched(receive: Any, rewriter: Any, *, limit: Any, most_bytes: Any = None) -> Any:
        spooled.append((limit, most_bytes))
        return await real(receive, rewriter, limit=limit, most_bytes=most_bytes)

    monkeypatch.setattr(gateway.proxy, "spool_multipart", watched)
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = plans(limits=[{"meter": "uploads", "per": "day", "max": 5}])
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        taken = await upload(h, multipart(2 * MB), chunked=True)
        await h.probes.wait_finished(1)
    assert taken.status_code == 201
    assert [bounds for bounds in spooled if bounds == (None, None)] == []


@pytest.mark.parametrize("where", ["preamble", "epilogue"])
async def test_an_upload_under_a_byte_limit_cannot_pad_its_body_past_every_bound(
    sqlite_url: str, where: str
) -> None:
    """Under an ``upload_bytes`` limit the body is spooled whole before it is
    forwarded, bounded (docs/quotas.md) by the limit's maximum for the files
    and 64 KiB for the other fields. Bytes before the first boundary or after
    the closing one are neither: the multipart scanner counts them nowhere, so a
    body of any size (20 MB here, around a 100-byte file) is written to the
    gateway's temporary file and then forwarded."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = plans(limits=[{"meter": "upload_bytes", "per": "day", "max": 5000}])
    padding = b"x" * (20 * MB)
    body = multipart(100)
    body = padding + b"\r\n" + body if where == "preamble" else body + padding
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        response = await upload(h, body, chunked=True)
        await h.probes.wait_finished(1)
    assert response.status_code == 413, (response.status_code, fake.uploaded_bytes)


async def test_an_upload_whose_reservation_outcome_is_unknown_is_given_back_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other way round: the reservation committed, its answer was lost, and
    the upstream refuses the file. What may have been counted is given back -
    by the request's key, so once, and only if it was counted."""
    fake = FakeDify(api_key=UPSTREAM_KEY, max_upload_bytes=50)
    settings = plans(limits=[{"meter": "uploads", "per": "day", "max": 5}])
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        real = h.storage.reserve_upload
        landed = True

        async def answer_lost(*args: Any, **kwargs: Any) -> Any:
            if landed:
                await real(*args, **kwargs)
            raise StorageError("connection lost after the commit")

        monkeypatch.setattr(h.storage, "reserve_upload", answer_lost)
        refused = await send_file(h, 100)  # landed, then refused upstream
        await h.probes.wait_finished(1)
        landed = False
        refused_too = await send_file(h, 100)  # never landed, refused upstream
        await h.probes.wait_finished(2)
        row = await today_row(h)
    assert [refused.status_code, refused_too.status_code] == [413, 413]
    assert (row.uploads, row.upload_bytes) == (0, 0)


async def test_uploads_held_by_a_count_stream_through_and_are_counted_exactly(
    sqlite_url: str,
) -> None:
    """An attacker's twenty parallel chunked uploads against an ``uploads``
    limit of five: the count is reserved before each body is read, so exactly
    five reach the upstream (streamed, never spooled), and each is counted once
    with its file's bytes once the upstream has taken it. One the upstream
    refuses is given back."""
    fake = FakeDify(api_key=UPSTREAM_KEY, max_upload_bytes=2 * MB)
    settings = plans(limits=[{"meter": "uploads", "per": "day", "max": 5}])
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        refused = await upload(h, multipart(3 * MB), chunked=True)  # the upstream's 413
        await h.probes.wait_finished(1)
        delayed = {"x-fake-delay-ms": "50"}
        responses = await asyncio.gather(
            *(upload(h, multipart(1000 + i), chunked=True, headers=delayed) for i in range(20))
        )
        await h.probes.wait_finished(21)
        row = await today_row(h)
    assert (refused.status_code, refused.json()["code"]) == (413, "file_too_large")
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [201] * 5 + [429] * 15
    taken = fake.uploaded_bytes[1:]
    assert len(taken) == 5
    assert (row.uploads, row.upload_bytes) == (5, sum(taken))


@pytest.mark.parametrize("where", ["preamble", "epilogue"])
async def test_padding_around_the_parts_does_not_get_around_a_file_size_limit(
    sqlite_url: str, where: str
) -> None:
    """Under ``file_size_mb`` a body whose size Content-Length does not settle
    is spooled while it is counted: the bytes around its parts count as other
    fields, so 20 MB of them around a small file are not spooled nor sent."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    padding = b"x" * (20 * MB)
    body = multipart(100)
    body = padding + b"\r\n" + body if where == "preamble" else body + padding
    async with running_gateway(sqlite_url, fake=fake, settings=plans(file_size_mb=1)) as h:
        response = await upload(h, body, chunked=True)
    assert response.status_code == 413 and fake.requests == []


@pytest.mark.parametrize("limit", ["uploads", "upload_bytes"])
async def test_an_upload_the_upstream_took_then_timed_out_on_stays_counted(
    sqlite_url: str, limit: str
) -> None:
    """Review of issue 21: an upstream that read the whole file and then took
    too long to answer may have stored it (as an answer it may be generating
    is charged): the reservation stays, with the file's bytes."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {
        **plans(limits=[{"meter": limit, "per": "day", "max": 5 if limit == "uploads" else 5000}]),
        "upstream": {"read_timeout": 0.2},
    }
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        slow = {"x-fake-delay-ms": "1500"}
        response = await upload(h, multipart(700), chunked=True, headers=slow)
        await h.probes.wait_finished(1)
        row = await today_row(h)
    assert response.status_code == 504
    assert (row.uploads, row.upload_bytes) == (1, 700)


async def test_an_upload_whose_plan_cannot_be_read_is_not_let_past_its_limits(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 21: when the user's plan cannot be read as the upload is
    asked, its limits are unknown, so a file larger than any of them must not
    be let through (it was: no limits, then the body streamed and counted)."""
    from gateway.admission import Admitter

    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = plans(limits=[{"meter": "upload_bytes", "per": "day", "max": 1000}])
    real = Admitter._plan
    failures = [StorageError("the database went away")]

    async def flaky(self: Admitter, snap: Any, user_id: str) -> Any:
        if failures:
            raise failures.pop()
        return await real(self, snap, user_id)

    monkeypatch.setattr(Admitter, "_plan", flaky)
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        response = await send_file(h, 5000)
        row = await today_row(h)
    assert response.status_code == 503
    assert response.json()["code"] == "storage_unavailable"
    assert response.headers["retry-after"] == "5"
    assert fake.uploaded_bytes == [] and row is None


@pytest.mark.parametrize("limit", ["file_size_mb", "upload_bytes"])
async def test_many_empty_parts_do_not_carry_a_body_past_every_bound(
    sqlite_url: str, limit: str
) -> None:
    """Part delimiters and header blocks are no field's content either: two
    thousand empty parts, each with 15 KB of headers (30 MB), around a small
    file are refused once past the 64 KiB allowance, not spooled and sent."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    empty = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="p"\r\n'
        f"X-Pad: {'x' * 15000}\r\n\r\n\r\n"
    ).encode()
    body = empty * 2000 + multipart(100)
    settings = (
        plans(file_size_mb=1)
        if limit == "file_size_mb"
        else plans(limits=[{"meter": "upload_bytes", "per": "day", "max": 5000}])
    )
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        response = await upload(h, body, chunked=True)
    assert response.status_code == 413 and fake.requests == []
