"""One gateway, many upstreams (issue 23): mounts, routing by model, shared mounts
and their model list, fallbacks and per-upstream keys - a real gateway in front
of real local fakes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.types import Receive, Scope, Send
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.dify import FakeDify
from tests.fakes.openai import ANSWER_PIECES, FakeOpenAI
from tests.harness import USER, Harness, running_gateway, to_toml
from tests.servers import free_port, read_body, serve
from tests.tcpproxy import TCPProxy

HOSTED_KEY = "sk-hosted-secret"
LOCAL_KEY = "sk-local-secret"
BACKUP_KEY = "sk-backup-secret"
SUPPORT_KEY = "app-support-secret"
RESEARCH_KEY = "app-research-secret"
ANTHROPIC_KEY = "sk-ant-secret"
KEYS = {
    "HOSTED_KEY": HOSTED_KEY,
    "LOCAL_KEY": LOCAL_KEY,
    "BACKUP_KEY": BACKUP_KEY,
    "SUPPORT_KEY": SUPPORT_KEY,
    "RESEARCH_KEY": RESEARCH_KEY,
    "ANTHROPIC_KEY": ANTHROPIC_KEY,
}
PRICES = {
    "gpt-4o-mini": {"input": "0.15", "output": "0.60"},
    "llama-3": {"input": "0", "output": "0"},
    "claude-sonnet-4-5": {"input": "3", "output": "15"},
}
CHAT = {"inputs": {}, "query": "Xin chào", "response_mode": "streaming", "user": "x"}


def chat(model: str, *, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


class Refuses:
    """An upstream that answers every request with one status, in OpenAI's shape,
    and records the headers it was sent."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        body = orjson.dumps({"error": {"message": f"refused {self.status}", "type": "x"}})
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Stalls:
    """An upstream that takes a request and never answers it (until it is left)."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        while (await receive())["type"] != "http.disconnect":
            pass


def openai(url: str, key_env: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "openai", "url": url, "api_key_env": key_env, **extra}


@contextlib.asynccontextmanager
async def gateway(
    database_url: str, upstreams: dict[str, Any], config_file: Path | None = None, **settings: Any
) -> AsyncIterator[Harness]:
    async with running_gateway(
        database_url,
        upstream_url="http://127.0.0.1:9/v1",  # no [upstream]: unused
        settings={"upstream": None, "upstreams": upstreams, "prices": PRICES, **settings},
        env=KEYS,
        config_file=config_file,
    ) as h:
        yield h


async def metric(h: Harness, name: str, **labels: str) -> float:
    return h.gateway.metrics.get(name, **labels)


async def queries_today(h: Harness) -> int:
    today = h.gateway.today()
    return sum(day.queries for day in await h.storage.daily(today, today))


# --- mounts ------------------------------------------------------------------------------


async def test_two_dify_apps_at_their_mounts_each_with_its_own_key(database_url: str) -> None:
    support, research = FakeDify(api_key=SUPPORT_KEY), FakeDify(api_key=RESEARCH_KEY)
    async with contextlib.AsyncExitStack() as stack:
        support_url = await stack.enter_async_context(serve(support))
        research_url = await stack.enter_async_context(serve(research))
        h = await stack.enter_async_context(
            gateway(
                database_url,
                {
                    "support": {"url": support_url + "/v1", "api_key_env": "SUPPORT_KEY"},
                    "research": {"url": research_url + "/v1", "api_key_env": "RESEARCH_KEY"},
                },
            )
        )
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            first = await client.post("/support/v1/chat-messages", json=CHAT, headers=h.auth())
            second = await client.post("/research/v1/chat-messages", json=CHAT, headers=h.auth())
            # No upstream is mounted at /v1 here.
            root = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(2)
        events = await h.events()
    assert first.status_code == second.status_code == 200
    assert b"message_end" in first.content and b"message_end" in second.content
    assert root.status_code == 404
    assert support.hits("/chat-messages") == research.hits("/chat-messages") == 1
    # Each app got its own key and the user's name, never the other's key.
    (s,) = support.requests
    (r,) = research.requests
    assert s.headers["authorization"] == f"Bearer {SUPPORT_KEY}"
    assert r.headers["authorization"] == f"Bearer {RESEARCH_KEY}"
    assert s.json["user"] == r.json["user"] == "alice"
    # Both answers are metered, for the one user, in the one ledger.
    assert len(events) == 2 and {e.user_id for e in events} == {"alice"}
    assert all(e.total_tokens > 0 for e in events)
    # The ledger says which app answered.
    assert sorted(e.upstream for e in events) == ["research", "support"]


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/supportx/v1/chat-messages",  # a prefix without its slash boundary
        b"/support/v1/../../research/v1/chat-messages",
        b"/support/v1/%2e%2e/%2e%2e/research/v1/chat-messages",
        b"/support/v1/..%2f..%2fresearch/v1/chat-messages",
        b"/support%2Fv1/chat-messages",
        b"//research/v1/chat-messages",
        b"/research/v1//chat-messages",
    ],
)
async def test_a_path_never_reaches_another_mounts_app_or_key(
    database_url: str, raw_path: bytes
) -> None:
    # The attack: a path that only looks like a mount, or steps out of one, to
    # reach an app unmetered or with another app's key. A user may use every
    # mount, so a path that resolves to one is answered as that mount's: metered
    # there, with that app's key; anything else is refused before any app hears it.
    support, research = FakeDify(api_key=SUPPORT_KEY), FakeDify(api_key=RESEARCH_KEY)
    async with contextlib.AsyncExitStack() as stack:
        support_url = await stack.enter_async_context(serve(support))
        research_url = await stack.enter_async_context(serve(research))
        upstreams = {
            "support": {"url": support_url + "/v1", "api_key_env": "SUPPORT_KEY"},
            "research": {"url": research_url + "/v1", "api_key_env": "RESEARCH_KEY"},
        }
        h = await stack.enter_async_context(gateway(database_url, upstreams))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            request = client.build_request("POST", "/", json=CHAT, headers=h.auth())
            request.url = request.url.copy_with(raw_path=raw_path)
            response = await client.send(request)
        if response.status_code == 200:
            await h.probes.wait_finished(1)
        events = await h.events()
        queries = await queries_today(h)
    heard = {"support": support.requests, "research": research.requests}
    if response.status_code != 200:
        assert 400 <= response.status_code < 500, (raw_path, response.status_code)
        assert heard == {"support": [], "research": []} and events == [] and queries == 0
        return
    ((name, (only,)),) = [(n, r) for n, r in heard.items() if r]  # one app, once
    key = SUPPORT_KEY if name == "support" else RESEARCH_KEY
    assert only.headers["authorization"] == f"Bearer {key}"
    assert [e.upstream for e in events] == [name] and queries == 1


async def test_the_single_upstream_table_is_served_at_v1_as_before(database_url: str) -> None:
    async with running_gateway(database_url) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        attempts = await metric(
            h, "gateway_upstream_attempts_total", upstream="default", outcome="answered"
        )
    assert response.status_code == 200 and event.total_tokens > 0
    assert event.upstream == "default" and attempts == 1


# --- routing by model ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def shared_mount(
    database_url: str, **settings: Any
) -> AsyncIterator[tuple[Harness, FakeOpenAI, FakeOpenAI]]:
    hosted = FakeOpenAI(api_key=HOSTED_KEY, models=("gpt-4o-mini", "gpt-4o", "llama-hosted"))
    local = FakeOpenAI(api_key=LOCAL_KEY, models=("llama-3", "qwen-2", "gpt-4o-mini"))
    async with contextlib.AsyncExitStack() as stack:
        hosted_url = await stack.enter_async_context(serve(hosted))
        local_url = await stack.enter_async_context(serve(local))
        h = await stack.enter_async_context(
            gateway(
                database_url,
                {
                    "hosted": openai(
                        hosted_url + "/v1", "HOSTED_KEY", mount="/v1", models=["gpt-*"]
                    ),
                    "local": openai(local_url + "/v1", "LOCAL_KEY", mount="/v1"),
                },
                **settings,
            )
        )
        yield h, hosted, local


async def test_a_request_goes_to_the_first_upstream_whose_models_match(database_url: str) -> None:
    async with shared_mount(database_url) as (h, hosted, local):
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            gpt = await client.post(
                "/v1/chat/completions", json=chat("gpt-4o-mini"), headers=h.auth()
            )
            llama = await client.post(
                "/v1/chat/completions", json=chat("llama-3"), headers=h.auth()
            )
        await h.probes.wait_finished(2)
        events = sorted(await h.events(), key=lambda e: e.model or "")
    assert gpt.status_code == llama.status_code == 200
    assert [r.json["model"] for r in hosted.requests] == ["gpt-4o-mini"]
    assert [r.json["model"] for r in local.requests] == ["llama-3"]
    assert [(e.model, e.upstream, e.cost > 0) for e in events] == [
        ("gpt-4o-mini", "hosted", True),
        ("llama-3", "local", False),
    ]


async def test_no_upstream_serving_the_model_is_refused_before_anything_is_reserved(
    database_url: str,
) -> None:
    hosted = FakeOpenAI(api_key=HOSTED_KEY)
    async with serve(hosted) as hosted_url:
        upstreams = {
            "hosted": openai(hosted_url + "/v1", "HOSTED_KEY", mount="/v1", models=["gpt-*"])
        }
        async with gateway(database_url, upstreams) as h:
            async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
                response = await client.post(
                    "/v1/chat/completions", json=chat("llama-3"), headers=h.auth()
                )
            await h.probes.wait_finished(1)
            assert await h.events() == [] and await queries_today(h) == 0
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "'llama-3'" in error["message"]
    assert hosted.requests == []


async def test_the_model_list_of_a_shared_mount_is_the_union_filtered_by_the_plan(
    database_url: str,
) -> None:
    plans = {"plans": {"free": {"models": ["gpt-4o-mini", "llama-*"]}}}
    async with shared_mount(database_url, **plans) as (h, hosted, local):
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.get("/v1/models", headers=h.auth())
    assert response.status_code == 200
    ids = [model["id"] for model in response.json()["data"]]
    # hosted's "llama-hosted" is not routed to it (its models are gpt-*); local's
    # "gpt-4o-mini" is a duplicate; gpt-4o and qwen-2 are not in the plan.
    assert ids == ["gpt-4o-mini", "llama-3"]
    # Each upstream was asked with its own key.
    assert [r.headers["authorization"] for r in hosted.requests] == [f"Bearer {HOSTED_KEY}"]
    assert [r.headers["authorization"] for r in local.requests] == [f"Bearer {LOCAL_KEY}"]


BIG = tuple(f"claude-a-{n:04}" for n in range(1005))  # more than one upstream page
SMALL = (*(f"claude-b-{n:02}" for n in range(12)), "claude-a-0003")


async def test_an_anthropic_shared_mount_reads_every_page_and_pages_the_union(
    sqlite_url: str,
) -> None:
    """Anthropic's model list is paged (``limit`` 1 to 1000, ``after_id``,
    ``before_id``): on a shared mount the gateway reads each upstream's whole
    list, page after page, and pages the union - routed, deduplicated, limited
    to the plan - with the client's own parameters, as Anthropic pages its list."""
    big, small = (
        FakeAnthropic(api_key=ANTHROPIC_KEY, models=BIG),
        FakeAnthropic(api_key=BACKUP_KEY, models=SMALL),
    )
    async with contextlib.AsyncExitStack() as stack:
        big_url = await stack.enter_async_context(serve(big))
        small_url = await stack.enter_async_context(serve(small))

        def claude(url: str, key_env: str, **extra: Any) -> dict[str, Any]:
            return {"kind": "anthropic", "url": url + "/v1", "api_key_env": key_env, **extra}

        upstreams = {
            "big": claude(big_url, "ANTHROPIC_KEY", mount="/claude/v1", models=["claude-a-*"]),
            "small": claude(small_url, "BACKUP_KEY", mount="/claude/v1"),
        }
        plans = {"plans": {"free": {"models": ["claude-a-*", "claude-b-0*"]}}}
        h = await stack.enter_async_context(gateway(sqlite_url, upstreams, **plans))
        headers = {"x-api-key": h.key, "anthropic-version": "2023-06-01"}
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:

            async def models(**params: Any) -> httpx.Response:
                return await client.get("/claude/v1/models", params=params, headers=headers)

            forward: list[dict[str, Any]] = []
            cursor: dict[str, Any] = {}
            while True:
                page = (await models(limit=400, **cursor)).json()
                forward.append(page)
                if not page["has_more"]:
                    break
                cursor = {"after_id": page["last_id"]}
            back = (await models(limit=400, before_id=forward[2]["first_id"])).json()
            first = (await models()).json()
            refused = [await models(limit=0), await models(limit=1001), await models(limit="x")]
            both = await models(after_id=BIG[0], before_id=BIG[9])
            gone = (await models(after_id="claude-z")).json()
    union = [*BIG, *(f"claude-b-{n:02}" for n in range(10))]
    assert [len(p["data"]) for p in forward] == [400, 400, 215]
    assert [p["has_more"] for p in forward] == [True, True, False]
    assert [m["id"] for p in forward for m in p["data"]] == union
    for page in forward:
        assert (page["first_id"], page["last_id"]) == (
            page["data"][0]["id"],
            page["data"][-1]["id"],
        )
    assert back == forward[1]  # has_more: more before it
    assert [m["id"] for m in first["data"]] == union[:20] and first["has_more"] is True
    assert gone == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    for response in (*refused, both):
        assert response.status_code == 400
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "invalid_request_error"
    # Each upstream's list was read whole for each list asked for: the big one in
    # two pages of 1000, never the client's page size or cursors.
    asked = 3 + 1 + 1 + 1  # the forward pages, back, first, gone (refusals ask none)
    assert sum(r.path == "/models" for r in big.requests) == 2 * asked
    assert sum(r.path == "/models" for r in small.requests) == asked


class ModelPages:
    """An Anthropic-style upstream whose model list never ends: each page names
    one new model after the cursor (``stuck``: always the same one; ``fail_at``:
    the page, counted from 1, it answers 500)."""

    def __init__(self, *, stuck: bool = False, fail_at: int | None = None) -> None:
        self.stuck, self.fail_at = stuck, fail_at
        self.queries: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        self.queries.append(scope["query_string"].decode())
        headers = [(b"content-type", b"application/json")]
        if len(self.queries) == self.fail_at:
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        model = "m-1" if self.stuck else f"m-{len(self.queries)}"
        page = {"data": [{"type": "model", "id": model}], "has_more": True}
        body = orjson.dumps({**page, "first_id": model, "last_id": model})
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize(
    ("options", "asked", "listed"),
    [
        ({}, 10, [f"m-{n}" for n in range(1, 11)]),  # at most 10 pages
        ({"stuck": True}, 2, ["m-1"]),  # a cursor that does not move
        ({"fail_at": 3}, 3, ["m-1", "m-2"]),  # what it gave before it failed
    ],
    ids=["endless", "stuck", "failing"],
)
async def test_an_upstream_model_list_is_read_within_bounds(
    sqlite_url: str, options: dict[str, Any], asked: int, listed: list[str]
) -> None:
    upstream = ModelPages(**options)
    other = FakeAnthropic(api_key=BACKUP_KEY, models=("claude-b",))
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(upstream))
        other_url = await stack.enter_async_context(serve(other))
        anthropic = {"kind": "anthropic", "mount": "/claude/v1"}
        upstreams = {
            "pages": {**anthropic, "url": url + "/v1", "api_key_env": "ANTHROPIC_KEY"},
            "other": {**anthropic, "url": other_url + "/v1", "api_key_env": "BACKUP_KEY"},
        }
        h = await stack.enter_async_context(gateway(sqlite_url, upstreams))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.get(
                "/claude/v1/models",
                params={"limit": 1000},
                headers={"x-api-key": h.key, "anthropic-version": "2023-06-01"},
            )
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [*listed, "claude-b"]
    assert len(upstream.queries) == asked
    assert upstream.queries[:2] == ["limit=1000", "limit=1000&after_id=m-1"]


# --- fallbacks -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def with_fallback(
    database_url: str, primary: Any, **primary_settings: Any
) -> AsyncIterator[tuple[Harness, FakeOpenAI]]:
    """``primary`` (an ASGI app, or None: nothing listens) at /v1, falling back to
    a working backup mounted apart."""
    backup = FakeOpenAI(api_key=BACKUP_KEY)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(backup.release_held)  # a held answer must end before shutdown
        if primary is None:
            primary_url = f"http://127.0.0.1:{free_port()}/v1"
        elif isinstance(primary, str):
            primary_url = primary
        else:
            primary_url = await stack.enter_async_context(serve(primary)) + "/v1"
        backup_url = await stack.enter_async_context(serve(backup))
        h = await stack.enter_async_context(
            gateway(
                database_url,
                {
                    "primary": openai(
                        primary_url,
                        "HOSTED_KEY",
                        mount="/v1",
                        fallbacks=["backup"],
                        **primary_settings,
                    ),
                    "backup": openai(backup_url + "/v1", "BACKUP_KEY"),
                },
            )
        )
        yield h, backup


async def answered_by_backup(h: Harness, backup: FakeOpenAI, *, stream: bool) -> None:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat("gpt-4o-mini", stream=stream), headers=h.auth()
        )
    await h.probes.wait_finished(1)
    assert response.status_code == 200
    if stream:
        assert "".join(ANSWER_PIECES) in _text(response.content)
    (event,) = await h.events()  # one answer, charged once, to the upstream that gave it
    assert (event.model, event.upstream) == ("gpt-4o-mini", "backup") and event.cost > 0
    assert await queries_today(h) == 1
    (request,) = backup.requests
    assert request.headers["authorization"] == f"Bearer {BACKUP_KEY}"
    assert (
        await metric(h, "gateway_upstream_fallbacks_total", **{"from": "primary", "to": "backup"})
        == 1
    )
    assert (
        await metric(h, "gateway_upstream_attempts_total", upstream="backup", outcome="answered")
        == 1
    )


def _text(sse: bytes) -> str:
    pieces = []
    for line in sse.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:]).get("choices", []):
                pieces.append(choice.get("delta", {}).get("content") or "")
    return "".join(pieces)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_an_unreachable_upstream_falls_back(database_url: str, transport: str) -> None:
    # Refused: the request surely never reached it (upstream_client.request_taken).
    async with with_fallback(database_url, None, transport=transport) as (h, backup):
        await answered_by_backup(h, backup, stream=True)
        assert (
            await metric(
                h, "gateway_upstream_attempts_total", upstream="primary", outcome="unreachable"
            )
            == 1
        )


@pytest.mark.parametrize(
    ("status", "outcome"), [(429, "rate_limited"), (500, "server_error"), (503, "server_error")]
)
async def test_a_429_or_5xx_before_the_answer_falls_back_and_keys_stay_apart(
    database_url: str, status: int, outcome: str
) -> None:
    primary = Refuses(status)
    async with with_fallback(database_url, primary) as (h, backup):
        await answered_by_backup(h, backup, stream=False)
        assert (
            await metric(h, "gateway_upstream_attempts_total", upstream="primary", outcome=outcome)
            == 1
        )
    # Per-upstream keys: each upstream saw its own key only - never the other's,
    # nor the user's gateway key.
    (seen,) = primary.headers
    assert seen["authorization"] == f"Bearer {HOSTED_KEY}"
    (request,) = backup.requests
    for headers, foreign in ((seen, (BACKUP_KEY, h.key)), (request.headers, (HOSTED_KEY, h.key))):
        for value in headers.values():
            assert not any(key in value for key in foreign)


async def test_a_read_timeout_is_charged_there_not_fallen_back_from(database_url: str) -> None:
    # Review of issue 23: the primary took the request (it was written, then no
    # headers came in time), so it may be generating - and billing - the answer
    # still. By default the request ends there, as at the last upstream: the
    # usual estimate, under the upstream that took it; nothing goes to the backup.
    stalls = Stalls()
    fast = {"read_timeout": 0.2, "total_timeout": 0.2}
    async with with_fallback(database_url, stalls, **fast) as (h, backup):
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post(
                "/v1/chat/completions", json=chat("gpt-4o-mini", stream=False), headers=h.auth()
            )
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        abandoned = await metric(h, "gateway_upstream_abandoned_total", upstream="primary")
    assert response.status_code == 504 and stalls.requests == 1
    assert (event.upstream, event.estimated) == ("primary", True)
    assert backup.requests == [] and abandoned == 0


async def test_fallback_after_timeout_falls_back_and_counts_the_abandoned_attempt(
    database_url: str,
) -> None:
    stalls = Stalls()
    settings = {"read_timeout": 0.2, "total_timeout": 0.2, "fallback_after_timeout": True}
    async with with_fallback(database_url, stalls, **settings) as (h, backup):
        await answered_by_backup(h, backup, stream=False)
        assert (
            await metric(
                h, "gateway_upstream_attempts_total", upstream="primary", outcome="timeout"
            )
            == 1
        )
        assert await metric(h, "gateway_upstream_abandoned_total", upstream="primary") == 1
    assert stalls.requests == 1


@contextlib.asynccontextmanager
async def hangs_up() -> AsyncIterator[str]:
    """A server that reads a request's head and closes the connection unanswered
    (an upstream that crashed after it took the request)."""
    taken: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("opt_in", [False, True])
async def test_a_disconnect_after_the_request_was_sent_falls_back_only_when_opted_in(
    database_url: str, opt_in: bool, transport: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(hangs_up())
        h, backup = await stack.enter_async_context(
            with_fallback(database_url, url, fallback_after_timeout=opt_in, transport=transport)
        )
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post(
                "/v1/chat/completions", json=chat("gpt-4o-mini", stream=False), headers=h.auth()
            )
        await h.probes.wait_finished(1)
        events = await h.events()
        abandoned = await metric(h, "gateway_upstream_abandoned_total", upstream="primary")
    if opt_in:
        assert response.status_code == 200 and len(backup.requests) == 1 and abandoned == 1
        assert [e.upstream for e in events] == ["backup"]
    else:
        assert response.status_code == 502 and backup.requests == [] and abandoned == 0


async def test_no_fallback_after_the_first_byte(database_url: str) -> None:
    primary = FakeOpenAI(api_key=HOSTED_KEY)
    async with with_fallback(database_url, primary) as (h, backup):
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post(
                "/v1/chat/completions",
                json=chat("gpt-4o-mini"),
                headers=h.auth(**{"x-fake-scenario": "cut"}),
            )
        await h.probes.wait_finished(1)
        (event,) = await h.events()  # charged once, for what the first upstream sent
        fallbacks = await metric(
            h, "gateway_upstream_fallbacks_total", **{"from": "primary", "to": "backup"}
        )
    # The client got the first upstream's partial answer, then the error event.
    assert response.status_code == 200
    assert "".join(ANSWER_PIECES) in _text(response.content)
    assert b"error" in response.content.rsplit(b"data: ", 1)[-1]
    assert event.outcome != "complete" and event.prompt_tokens > 0
    assert event.upstream == "primary"
    assert backup.requests == [] and fallbacks == 0


async def test_when_every_upstream_fails_the_last_failure_is_the_answer_uncharged(
    database_url: str,
) -> None:
    primary, second = Refuses(503), Refuses(429)
    async with contextlib.AsyncExitStack() as stack:
        primary_url = await stack.enter_async_context(serve(primary))
        second_url = await stack.enter_async_context(serve(second))
        upstreams = {
            "primary": openai(primary_url, "HOSTED_KEY", mount="/v1", fallbacks=["second"]),
            # a cycle back to primary: each is tried once
            "second": openai(second_url, "BACKUP_KEY", fallbacks=["primary"]),
        }
        h = await stack.enter_async_context(gateway(database_url, upstreams))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post(
                "/v1/chat/completions", json=chat("gpt-4o-mini"), headers=h.auth()
            )
        await h.probes.wait_finished(1)
        assert await h.events() == [] and await queries_today(h) == 0
    assert response.status_code == 429
    assert response.json()["error"]["message"] == "refused 429"
    assert len(primary.headers) == len(second.headers) == 1


class DownFirst:
    """An upstream that refuses its first ``n`` requests with 503, then is ``app``."""

    def __init__(self, app: FakeDify, n: int = 1) -> None:
        self.app, self.n = app, n

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.n > 0:
            self.n -= 1
            await Refuses(503)(scope, receive, send)
            return
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def dify_with_fallback(
    database_url: str, support: FakeDify, research: FakeDify
) -> AsyncIterator[Harness]:
    """support (down for its first request) at /support/v1, research its fallback."""
    async with contextlib.AsyncExitStack() as stack:
        support_url = await stack.enter_async_context(serve(DownFirst(support)))
        research_url = await stack.enter_async_context(serve(research))
        upstreams = {
            "support": {
                "url": support_url + "/v1",
                "api_key_env": "SUPPORT_KEY",
                "fallbacks": ["research"],
            },
            "research": {"url": research_url + "/v1", "api_key_env": "RESEARCH_KEY"},
        }
        yield await stack.enter_async_context(gateway(database_url, upstreams))


async def test_a_dify_conversation_begun_on_a_fallback_app_is_continued_there(
    database_url: str,
) -> None:
    # Dify conversations live in the app that made them (real Dify answers 404
    # "Conversation Not Exists" elsewhere). The support app is down for the first
    # message, so research (its fallback) starts the conversation; what names it
    # next goes to research, the app the ledger records.
    support, research = FakeDify(api_key=SUPPORT_KEY), FakeDify(api_key=RESEARCH_KEY)
    async with dify_with_fallback(database_url, support, research) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            blocking = {**CHAT, "response_mode": "blocking"}
            first = await client.post("/support/v1/chat-messages", json=blocking, headers=h.auth())
            conversation = first.json()["conversation_id"]
            await h.probes.wait_finished(1)
            second = await client.post(
                "/support/v1/chat-messages",
                json={**blocking, "conversation_id": conversation},
                headers=h.auth(),
            )
            history = await client.get(
                "/support/v1/messages", params={"conversation_id": conversation}, headers=h.auth()
            )
            renamed = await client.post(
                f"/support/v1/conversations/{conversation}/name",
                json={"name": "x"},
                headers=h.auth(),
            )
            # A new conversation goes to the mount's first app, as before.
            fresh = await client.post("/support/v1/chat-messages", json=blocking, headers=h.auth())
        await h.probes.wait_finished(5)  # the history read and rename count too
        events = await h.events()
    assert first.status_code == second.status_code == fresh.status_code == 200
    assert history.status_code < 500 and renamed.status_code < 500
    by_answer = {e.answer_id: e.upstream for e in events}
    answers = [r.json()["message_id"] for r in (first, second, fresh)]
    assert [by_answer[a] for a in answers] == ["research", "research", "support"]
    assert [(r.method, r.path) for r in support.requests] == [("POST", "/v1/chat-messages")]
    assert [r.path for r in research.requests] == [
        "/v1/chat-messages",
        "/v1/chat-messages",
        "/v1/messages",
        f"/v1/conversations/{conversation}/name",
    ]


async def test_a_request_naming_a_conversation_never_falls_back(database_url: str) -> None:
    # The conversation is support's (the ledger says so); support is down for the
    # next message: research has no such conversation, so nothing is sent there.
    support, research = FakeDify(api_key=SUPPORT_KEY), FakeDify(api_key=RESEARCH_KEY)
    gate = DownFirst(support, n=0)
    async with contextlib.AsyncExitStack() as stack:
        support_url = await stack.enter_async_context(serve(gate))
        research_url = await stack.enter_async_context(serve(research))
        upstreams = {
            "support": {
                "url": support_url + "/v1",
                "api_key_env": "SUPPORT_KEY",
                "fallbacks": ["research"],
            },
            "research": {"url": research_url + "/v1", "api_key_env": "RESEARCH_KEY"},
        }
        h = await stack.enter_async_context(gateway(database_url, upstreams))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            blocking = {**CHAT, "response_mode": "blocking"}
            first = await client.post("/support/v1/chat-messages", json=blocking, headers=h.auth())
            await h.probes.wait_finished(1)
            gate.n = 1
            second = await client.post(
                "/support/v1/chat-messages",
                json={**blocking, "conversation_id": first.json()["conversation_id"]},
                headers=h.auth(),
            )
    assert first.status_code == 200 and second.status_code == 503
    assert research.requests == []


async def test_a_stop_after_a_fallback_reaches_the_app_running_the_task(
    database_url: str,
) -> None:
    # The answer runs on research (support was down); the gateway does not know
    # where a task runs before its answer settles, so the stop goes to every app
    # the mount's answers may go to, each with its own key and the caller as user.
    support, research = FakeDify(api_key=SUPPORT_KEY), FakeDify(api_key=RESEARCH_KEY)
    async with dify_with_fallback(database_url, support, research) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answer = await client.post("/support/v1/chat-messages", json=CHAT, headers=h.auth())
            task = orjson.loads(answer.content.split(b"data: ", 2)[1].split(b"\n", 1)[0])["task_id"]
            stop = await client.post(
                f"/support/v1/chat-messages/{task}/stop", json={"user": "x"}, headers=h.auth()
            )
        await h.probes.wait_finished(1)
    assert answer.status_code == 200 and stop.status_code == 200
    assert stop.json() == {"result": "success"}
    assert research.stops == [task]
    (stopped,) = [r for r in research.requests if r.path.endswith("/stop")]
    assert stopped.headers["authorization"] == f"Bearer {RESEARCH_KEY}"
    assert stopped.json["user"] == USER


async def test_a_recovery_after_a_fallback_charges_the_fallback(database_url: str) -> None:
    """The gateway is taken for dead (a recovery runs) while a fallback is
    answering: the estimate is charged to the fallback, the upstream that was
    answering, not to the one admission chose; the real record, arriving
    later, replaces it there."""
    async with with_fallback(database_url, Refuses(503)) as (h, backup):
        held = h.auth(**{"x-fake-scenario": "hold"})
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat("gpt-4o-mini"), headers=held
            ) as response:
                chunks = response.aiter_raw()
                assert b"data: " in await asyncio.wait_for(anext(chunks), timeout=5)
                request_id = response.headers["x-request-id"]
                later = h.gateway.clock.now() + timedelta(hours=1)
                recovered_ids = await h.storage.recover(before=later, now=later)
                recovered = [(e.answer_id, e.upstream, e.outcome) for e in await h.events()]
                backup.release_held()
                rest = b"".join([chunk async for chunk in chunks])
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        moves_failed = await metric(h, "gateway_storage_errors_total", operation="move_pending")
    assert response.status_code == 200 and b"[DONE]" in rest
    assert recovered_ids == [request_id]
    assert recovered == [(f"gw-{request_id}", "backup", "recovered")]
    assert (event.upstream, event.outcome, event.request_id) == ("backup", "complete", request_id)
    assert moves_failed == 0


class Then:
    """An upstream that runs ``first`` (a coroutine function: the database goes
    away, or comes back) and then answers as ``app`` does."""

    def __init__(self, first: Callable[[], Awaitable[None]], app: Any) -> None:
        self.first, self.app = first, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.first()
        await self.app(scope, receive, send)


async def test_a_fallback_with_the_database_away_goes_on_and_records_the_fallback(
    pg_behind_proxy: tuple[str, TCPProxy],
) -> None:
    """The database goes away between the admission and the fallback, so the
    pending row cannot follow the answer: the request goes on (fail-open), the
    failure is logged and counted, and the settle, once the database is back,
    still records the fallback."""
    url, proxy = pg_behind_proxy
    backup = FakeOpenAI(api_key=BACKUP_KEY)
    async with contextlib.AsyncExitStack() as stack:
        primary_url = await stack.enter_async_context(serve(Then(proxy.cut, Refuses(503))))
        backup_url = await stack.enter_async_context(serve(Then(proxy.restore, backup)))
        upstreams = {
            "primary": openai(primary_url, "HOSTED_KEY", mount="/v1", fallbacks=["backup"]),
            "backup": openai(backup_url + "/v1", "BACKUP_KEY"),
        }
        database = {"database": {"connect_timeout": 1.0, "command_timeout": 2.0}}
        h = await stack.enter_async_context(gateway(url, upstreams, **database))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post(
                "/v1/chat/completions", json=chat("gpt-4o-mini"), headers=h.auth()
            )
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        moves_failed = await metric(h, "gateway_storage_errors_total", operation="move_pending")
        later = h.gateway.clock.now() + timedelta(hours=1)
        left = await h.storage.recover(before=later, now=later)
    assert response.status_code == 200 and "".join(ANSWER_PIECES) in _text(response.content)
    assert moves_failed == 1
    assert (event.upstream, event.outcome) == ("backup", "complete") and event.cost > 0
    assert left == []  # the settle took the pending row


# --- kinds side by side ------------------------------------------------------------------------


async def test_openai_and_anthropic_side_by_side_each_in_its_own_shape(database_url: str) -> None:
    hosted, claude = FakeOpenAI(api_key=HOSTED_KEY), FakeAnthropic(api_key=ANTHROPIC_KEY)
    async with contextlib.AsyncExitStack() as stack:
        hosted_url = await stack.enter_async_context(serve(hosted))
        claude_url = await stack.enter_async_context(serve(claude))
        upstreams = {
            "hosted": openai(hosted_url + "/v1", "HOSTED_KEY", mount="/v1"),
            "anthropic": {
                "kind": "anthropic",
                "url": claude_url + "/v1",
                "api_key_env": "ANTHROPIC_KEY",
            },
        }
        h = await stack.enter_async_context(gateway(database_url, upstreams))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            message = await client.post(
                "/anthropic/v1/messages",
                json={
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 50,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                headers={"x-api-key": h.key, "anthropic-version": "2023-06-01"},
            )
            completion = await client.post(
                "/v1/chat/completions", json=chat("gpt-4o-mini", stream=False), headers=h.auth()
            )
            # An Anthropic route under the OpenAI mount is refused in OpenAI's shape.
            wrong = await client.post("/v1/messages", json={}, headers=h.auth())
        await h.probes.wait_finished(3)
        events = await h.events()
    assert message.status_code == 200 and message.json()["type"] == "message"
    assert completion.status_code == 200
    assert wrong.status_code == 404 and "error" in wrong.json()
    assert "type" not in wrong.json()  # not Anthropic's {"type": "error", ...}
    (sent,) = claude.requests
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY and "authorization" not in sent.headers
    (sent_openai,) = hosted.requests
    assert sent_openai.headers["authorization"] == f"Bearer {HOSTED_KEY}"
    assert sorted(e.model or "" for e in events) == ["claude-sonnet-4-5", "gpt-4o-mini"]


async def test_a_message_with_two_credentials_that_disagree_is_refused_unsent(
    sqlite_url: str,
) -> None:
    """Attack: a valid gateway key in one header and another user's key (or
    anything else) in the other, or two Authorization headers. Whichever the
    gateway read, a proxy, log or rate limiter in front of it may have judged
    the caller by the other: refused in Anthropic's error shape, never forwarded
    and never charged to anyone."""
    claude = FakeAnthropic(api_key=ANTHROPIC_KEY)
    async with contextlib.AsyncExitStack() as stack:
        claude_url = await stack.enter_async_context(serve(claude))
        upstreams = {
            "anthropic": {
                "kind": "anthropic",
                "url": claude_url + "/v1",
                "api_key_env": "ANTHROPIC_KEY",
                "mount": "/claude/v1",
            },
        }
        h = await stack.enter_async_context(gateway(sqlite_url, upstreams))
        other = await h.add_user("bob")
        version = ("anthropic-version", "2023-06-01")
        attempts: list[list[tuple[str, str]]] = [
            [("authorization", f"Bearer {h.key}"), ("x-api-key", other)],
            [("x-api-key", other), ("authorization", f"Bearer {h.key}")],
            [("authorization", f"Bearer {other}"), ("x-api-key", h.key)],
            [("authorization", f"Basic {h.key}"), ("x-api-key", h.key)],
            [("authorization", f"Bearer {h.key}"), ("authorization", f"Bearer {other}")],
        ]
        body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            refused = [
                await client.post("/claude/v1/messages", json=body, headers=[*headers, version])
                for headers in attempts
            ]
            agreeing = await client.post(
                "/claude/v1/messages",
                json=body,
                headers=[("authorization", f"Bearer {h.key}"), ("x-api-key", h.key), version],
            )
        await h.probes.wait_finished(len(attempts) + 1)  # refusals finish too
        events = await h.events()
    for response in refused:
        assert response.status_code == 400, response.text
        assert response.json()["type"] == "error"  # Anthropic's shape
        assert USER not in response.text and "bob" not in response.text
    assert "different credentials" in refused[0].text
    assert "More than one Authorization" in refused[-1].text
    assert agreeing.status_code == 200, agreeing.text
    assert len(claude.requests) == 1  # only the agreeing one went upstream
    assert [e.user_id for e in events] == [USER]


# --- the usage API ---------------------------------------------------------------------------

DEAD = "http://127.0.0.1:9/v1"  # the usage API asks no upstream


def with_claude_at(mount: str) -> dict[str, Any]:
    return {
        "hosted": openai(DEAD, "HOSTED_KEY", mount="/v1"),
        "claude": {
            "kind": "anthropic",
            "url": DEAD,
            "api_key_env": "ANTHROPIC_KEY",
            "mount": mount,
        },
    }


async def test_the_usage_api_takes_the_key_in_x_api_key_when_anthropic_is_mounted_anywhere(
    sqlite_url: str,
) -> None:
    """An Anthropic SDK user at /claude/v1 sends the gateway key in x-api-key:
    /v1/usage (the gateway's own path, under the OpenAI mount) reads it there
    too, or in Authorization, or in both when they agree."""
    async with gateway(sqlite_url, with_claude_at("/claude/v1")) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            by_key_header = await client.get("/v1/usage", headers={"x-api-key": h.key})
            daily = await client.get("/v1/usage/daily", headers={"x-api-key": h.key})
            by_bearer = await client.get("/v1/usage", headers=h.auth())
            both = await client.get("/v1/usage", headers=h.auth(**{"x-api-key": h.key}))
            nothing = await client.get("/v1/usage")
            wrong = await client.get("/v1/usage", headers={"x-api-key": "gwk_not-a-key"})
    for response in (by_key_header, daily, by_bearer, both):
        assert response.status_code == 200, response.text
        assert response.json()["user"] == USER
        # One user's figures: no cache on the way keeps them (x-api-key is no
        # header an HTTP cache knows to keep responses of apart).
        assert response.headers["cache-control"] == "no-store"
    assert nothing.status_code == 401 and wrong.status_code == 401


@pytest.mark.parametrize("key_first", [True, False])
async def test_the_usage_api_refuses_a_key_in_each_header_that_disagree(
    sqlite_url: str, key_first: bool
) -> None:
    """Attack: a valid key in Authorization and another in x-api-key (another
    user's, or any other value). Whichever the gateway read, something in front
    of it may have judged the caller by the other: refused, naming no user."""
    async with gateway(sqlite_url, with_claude_at("/claude/v1")) as h:
        other = await h.add_user("bob")
        attempts = [
            {"authorization": f"Bearer {h.key}", "x-api-key": other},
            {"authorization": f"Bearer {other}", "x-api-key": h.key},
            {"authorization": f"Bearer {h.key}", "x-api-key": "sk-ant-someone-elses"},
            {"authorization": f"Basic {h.key}", "x-api-key": h.key},
        ]
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            responses = []
            for headers in attempts:
                ordered = dict(reversed(headers.items())) if key_first else headers
                for path in ("/v1/usage", "/v1/usage/daily"):
                    responses.append(await client.get(path, headers=ordered))
    for response in responses:
        assert response.status_code == 400, response.text
        assert "different credentials" in response.text
        assert USER not in response.text and "bob" not in response.text


async def test_the_usage_api_reads_no_key_header_when_no_upstream_sends_one(
    sqlite_url: str,
) -> None:
    """Without an Anthropic upstream no client sends its key in x-api-key, and
    intermediaries in front of the gateway know its credentials in
    Authorization only: x-api-key is no credential here, agreeing or not."""
    upstreams = {"hosted": openai(DEAD, "HOSTED_KEY", mount="/v1")}
    async with gateway(sqlite_url, upstreams) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            alone = await client.get("/v1/usage", headers={"x-api-key": h.key})
            beside = await client.get("/v1/usage", headers=h.auth(**{"x-api-key": "other"}))
    assert alone.status_code == 401
    assert beside.status_code == 200 and beside.json()["user"] == USER


# --- reload --------------------------------------------------------------------------------


async def test_models_and_fallbacks_follow_a_reload_addresses_need_a_restart(
    sqlite_url: str, tmp_path: Path
) -> None:
    hosted = FakeOpenAI(api_key=HOSTED_KEY, models=("gpt-4o-mini",))
    local = FakeOpenAI(api_key=LOCAL_KEY, models=("llama-3",))
    path = tmp_path / "gateway.toml"
    async with contextlib.AsyncExitStack() as stack:
        hosted_url = await stack.enter_async_context(serve(hosted)) + "/v1"
        local_url = await stack.enter_async_context(serve(local)) + "/v1"
        upstreams = {
            "hosted": openai(hosted_url, "HOSTED_KEY", mount="/v1", models=["gpt-*"]),
            "local": openai(local_url, "LOCAL_KEY", mount="/v1"),
        }
        h = await stack.enter_async_context(gateway(sqlite_url, upstreams, config_file=path))

        async def ask(model: str) -> None:
            async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
                response = await client.post(
                    "/v1/chat/completions", json=chat(model, stream=False), headers=h.auth()
                )
            assert response.status_code == 200

        def rewrite(**hosted_settings: Any) -> None:
            data = {
                "upstreams": {
                    **upstreams,
                    "hosted": {**upstreams["hosted"], **hosted_settings},
                },
                "database": {"url": sqlite_url, "spool_file": ""},
                "accounting": {"timezone": "UTC", "default_plan": "free"},
                "plans": {"free": {}},
                "prices": PRICES,
            }
            path.write_text(to_toml(data))

        await ask("llama-3")
        rewrite(models=["gpt-*", "llama-*"])
        assert await h.gateway.reload()
        await ask("llama-3")  # now hosted's
        # An address is a connection: a change waits for a restart, and the
        # routing of that reload with it.
        rewrite(models=["gpt-*"], url="http://127.0.0.1:9/v1")
        assert await h.gateway.reload()
        await ask("llama-3")  # still hosted's, at its old address
        await h.probes.wait_finished(3)
    assert [r.json["model"] for r in local.requests] == ["llama-3"]
    assert [r.json["model"] for r in hosted.requests] == ["llama-3", "llama-3"]


async def test_the_cors_policy_covers_every_mount(sqlite_url: str) -> None:
    support = FakeDify(api_key=SUPPORT_KEY)
    page = "https://app.example.com"
    preflight = {"origin": page, "access-control-request-method": "POST"}
    async with serve(support) as support_url:
        upstreams = {"support": {"url": support_url + "/v1", "api_key_env": "SUPPORT_KEY"}}
        async with gateway(sqlite_url, upstreams, cors={"allow_origins": [page]}) as h:
            async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
                mounted = await client.options("/support/v1/chat-messages", headers=preflight)
                usage = await client.options("/v1/usage", headers=preflight)
                admin = await client.options("/admin/users", headers=preflight)
    assert mounted.status_code == usage.status_code == 204
    assert mounted.headers["access-control-allow-origin"] == page
    assert "access-control-allow-origin" not in admin.headers
    assert support.requests == []  # answered by the gateway's policy


async def test_an_allowed_route_goes_to_the_upstream_whose_own_list_allows_it(
    sqlite_url: str,
) -> None:
    hosted, local = FakeOpenAI(api_key=HOSTED_KEY), FakeOpenAI(api_key=LOCAL_KEY)
    async with contextlib.AsyncExitStack() as stack:
        hosted_url = await stack.enter_async_context(serve(hosted))
        local_url = await stack.enter_async_context(serve(local))
        upstreams = {
            "hosted": openai(hosted_url + "/v1", "HOSTED_KEY", mount="/v1", models=["gpt-*"]),
            "local": openai(local_url + "/v1", "LOCAL_KEY", mount="/v1", allow=["GET /files/*"]),
        }
        h = await stack.enter_async_context(gateway(sqlite_url, upstreams))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            await client.get("/v1/files/file-1", headers=h.auth())
            refused = await client.get("/v1/batches", headers=h.auth())  # allowed by none
    # The operator opened /files on local only: hosted, first on the mount, never sees it.
    assert hosted.requests == []
    assert [(r.method, r.path) for r in local.requests] == [("GET", "/files/file-1")]
    assert refused.status_code == 403


async def test_a_refusal_before_the_path_is_routed_takes_the_mounts_shape(sqlite_url: str) -> None:
    hosted, claude = FakeOpenAI(api_key=HOSTED_KEY), FakeAnthropic(api_key=ANTHROPIC_KEY)
    async with contextlib.AsyncExitStack() as stack:
        hosted_url = await stack.enter_async_context(serve(hosted))
        claude_url = await stack.enter_async_context(serve(claude))
        upstreams = {
            "hosted": openai(hosted_url + "/v1", "HOSTED_KEY", mount="/v1"),
            "claude": {
                "kind": "anthropic",
                "url": claude_url + "/v1",
                "api_key_env": "ANTHROPIC_KEY",
            },
        }
        h = await stack.enter_async_context(
            gateway(sqlite_url, upstreams, server={"max_header_bytes": 1024})
        )
        big = {"x-padding": "x" * 2048}
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            on_claude = await client.post("/claude/v1/messages", json={}, headers=big)
            on_openai = await client.post("/v1/chat/completions", json={}, headers=big)
    assert on_claude.status_code == on_openai.status_code == 431
    assert on_claude.json()["type"] == "error"  # Anthropic's shape
    assert "type" not in on_openai.json() and "error" in on_openai.json()  # OpenAI's


async def test_a_stored_answer_made_at_another_mount_is_not_found_here(database_url: str) -> None:
    # Review of issue 23: a's answer, read or continued at /b/v1, was looked up
    # at b with b's key. It is not at /b/v1: 404, as for a missing object, in
    # the mount's shape, and nothing is sent to b.
    a, b = FakeOpenAI(api_key=HOSTED_KEY), FakeOpenAI(api_key=LOCAL_KEY)
    async with contextlib.AsyncExitStack() as stack:
        a_url = await stack.enter_async_context(serve(a))
        b_url = await stack.enter_async_context(serve(b))
        upstreams = {
            "a": openai(a_url + "/v1", "HOSTED_KEY"),
            "b": openai(b_url + "/v1", "LOCAL_KEY"),
        }
        h = await stack.enter_async_context(gateway(database_url, upstreams))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            created = await client.post(
                "/a/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"}, headers=h.auth()
            )
            await h.probes.wait_finished(1)
            (event,) = await h.events()
            read = await client.get(f"/b/v1/responses/{event.answer_id}", headers=h.auth())
            more = {
                "model": "gpt-4o-mini",
                "input": "more",
                "previous_response_id": event.answer_id,
            }
            cont = await client.post("/b/v1/responses", json=more, headers=h.auth())
            here = await client.get(f"/a/v1/responses/{event.answer_id}", headers=h.auth())
    assert created.status_code == 200 and event.upstream == "a"
    assert read.status_code == cont.status_code == 404
    for refused in (read, cont):
        assert refused.json()["error"]["code"] == "not_found"
        assert event.answer_id in refused.json()["error"]["message"]
    assert b.requests == []
    # Where it was made, it is looked up, with a's key.
    last = a.requests[-1]
    assert (last.method, last.path.endswith(f"/responses/{event.answer_id}")) == ("GET", True)
    assert last.headers["authorization"] == f"Bearer {HOSTED_KEY}" and here.status_code > 0


async def test_a_stored_answer_is_read_from_the_upstream_that_gave_it(sqlite_url: str) -> None:
    # The read names no model: without the ledger's upstream it would go to the
    # mount's first upstream, which does not have the object.
    async with shared_mount(sqlite_url) as (h, hosted, local):
        body = {"model": "llama-3", "input": "hi"}
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            created = await client.post("/v1/responses", json=body, headers=h.auth())
            await h.probes.wait_finished(1)
            (event,) = await h.events()
            await client.get(f"/v1/responses/{event.answer_id}", headers=h.auth())
    assert created.status_code == 200
    assert event.answer_id.startswith("resp_") and event.upstream == "local"
    assert hosted.requests == []
    assert [(r.method, r.path) for r in local.requests] == [
        ("POST", "/responses"),
        ("GET", f"/responses/{event.answer_id}"),
    ]


async def _blocking_through_fallback(
    database_url: str, primary: Any
) -> tuple[httpx.Response, list[Any], int, FakeDify]:
    """A blocking chat to mount ``primary`` (the app given), whose fallback is a
    fake Dify: (the answer, the ledger's events, today's queries, the fallback)."""
    backup = FakeDify(api_key=RESEARCH_KEY)
    async with contextlib.AsyncExitStack() as stack:
        primary_url = await stack.enter_async_context(serve(primary))
        backup_url = await stack.enter_async_context(serve(backup))
        upstreams = {
            "primary": {"url": primary_url + "/v1", "api_key_env": "SUPPORT_KEY",
                        "fallbacks": ["backup"]},
            "backup": {"url": backup_url + "/v1", "api_key_env": "RESEARCH_KEY"},
        }  # fmt: skip
        h = await stack.enter_async_context(gateway(database_url, upstreams))
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answer = await client.post(
                "/primary/v1/chat-messages",
                json={"query": "hi", "inputs": {}, "response_mode": "blocking"},
                headers=h.auth(),
            )
        await h.probes.wait_finished(1)
        return answer, await h.events(), await queries_today(h), backup


async def test_a_billed_failed_run_is_charged_not_run_again_at_the_fallback(
    sqlite_url: str,
) -> None:
    """Attack: a blocking Dify run that fails after its LLM node (Dify answers
    500 ``internal_server_error``, billed) at an upstream with a fallback. It
    was closed unread and the request sent on to the fallback: a second billed
    run, and the first one recorded nowhere. It is now the request's answer:
    relayed, charged the prompt's estimate, and not run again."""
    from tests.test_proxy_failures import _RunFailsAfterItsModel

    primary = _RunFailsAfterItsModel()
    answer, (event,), queries, backup = await _blocking_through_fallback(sqlite_url, primary)
    assert answer.status_code == 500 and answer.json()["code"] == "internal_server_error"
    assert (primary.answers, backup.answers_started) == (1, 0)
    assert (event.upstream, event.outcome, event.estimated) == ("primary", "error", True)
    assert queries == 1


async def test_a_billed_failed_run_gzipped_is_read_decoded_and_charged(sqlite_url: str) -> None:
    """The same billed failure gzip-encoded (the upstream ignored the identity
    it was asked for): it is read decoded, a step at a time (`_inflated`, no
    longer httpx's inflating whole), and charged, not run again - its raw
    bytes were read, taken for no billed error, and the run made twice."""
    from tests.test_proxy_failures import _RunFailsAfterItsModel

    class Gzipped(_RunFailsAfterItsModel):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def gzipped(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    headers = [*message["headers"], (b"content-encoding", b"gzip")]
                    message = {**message, "headers": headers}
                elif message["type"] == "http.response.body":
                    message = {**message, "body": gzip.compress(message["body"])}
                await send(message)

            await super().__call__(scope, receive, gzipped)

    primary = Gzipped()
    answer, (event,), queries, backup = await _blocking_through_fallback(sqlite_url, primary)
    assert answer.status_code == 500 and answer.json()["code"] == "internal_server_error"
    assert "content-encoding" not in answer.headers
    assert (primary.answers, backup.answers_started) == (1, 0)
    assert (event.upstream, event.outcome, event.estimated) == ("primary", "error", True)
    assert queries == 1


async def test_an_error_page_before_any_run_still_falls_back(sqlite_url: str) -> None:
    """A 502 page of a proxy in front of the first Dify (no run began): the
    request goes on to the fallback, which answers it, charged once."""
    from tests.test_proxy_failures import _RunFailsAfterItsModel

    primary = _RunFailsAfterItsModel(502, b"<html><body>502 Bad Gateway</body></html>")
    answer, (event,), _, _ = await _blocking_through_fallback(sqlite_url, primary)
    assert answer.status_code == 200 and primary.answers == 1
    assert (event.upstream, event.estimated) == ("backup", False)


async def test_a_failed_run_in_an_encoding_the_gateway_cannot_read_is_charged_not_run_again(
    sqlite_url: str,
) -> None:
    """Attack (review 6, R6-1): the same billed failure labelled ``br`` (an
    upstream or a CDN that ignored the identity it was asked for). It was taken
    unread for no billed error: the run was made again at the fallback, paid
    twice upstream and the first never charged; at the last upstream it was
    refunded, while an error too large to read whole is charged. Now it is
    taken as billed: charged, not run again, replaced by the gateway's error."""
    from tests.test_proxy_failures import _RunFailsAfterItsModel

    class Brotli(_RunFailsAfterItsModel):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def labelled(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    headers = [*message["headers"], (b"content-encoding", b"br")]
                    message = {**message, "headers": headers}
                await send(message)

            await super().__call__(scope, receive, labelled)

    primary = Brotli()
    answer, (event,), queries, backup = await _blocking_through_fallback(sqlite_url, primary)
    assert answer.status_code == 500 and "could not be read" in answer.json()["message"]
    assert (primary.answers, backup.answers_started) == (1, 0)
    assert (event.upstream, event.outcome, event.estimated) == ("primary", "error", True)
    assert queries == 1


class _Labelled:
    """``inner``'s reply, its head labelled Content-Encoding ``br`` (an upstream
    or a CDN that ignored the identity it was asked for)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def answers(self) -> int:
        return int(self.inner.answers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def labelled(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [*message["headers"], (b"content-encoding", b"br")]
                message = {**message, "headers": headers}
            await send(message)

        await self.inner(scope, receive, labelled)


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_an_unreadable_proxy_error_page_before_any_run_still_falls_back(
    sqlite_url: str, status: int
) -> None:
    """Review 7, R7-1: a 502/503/504 page of a proxy in front of the first Dify,
    labelled br, was taken for a billed run (the fix of R6-1 took every
    unreadable error so): charged, and the fallback never tried. Dify's billed
    errors are a 500 or a 400, which the status alone rules out."""
    from tests.test_proxy_failures import _RunFailsAfterItsModel

    primary = _Labelled(_RunFailsAfterItsModel(status, b"<html><body>down</body></html>"))
    answer, (event,), _, _ = await _blocking_through_fallback(sqlite_url, primary)
    assert (answer.status_code, event.upstream, event.estimated) == (200, "backup", False)


class _AlwaysFails:
    """Answers every request ``status`` with an HTML page labelled ``br``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.answers = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        self.answers += 1
        head = [(b"content-type", b"text/html"), (b"content-encoding", b"br")]
        await send({"type": "http.response.start", "status": self.status, "headers": head})
        await send({"type": "http.response.body", "body": b"<html>down</html>"})


@pytest.mark.parametrize(
    ("mode", "status"), [("streaming", 500), ("streaming", 503), ("blocking", 503)]
)
async def test_an_unreadable_error_that_was_no_run_is_not_charged(
    sqlite_url: str, mode: str, status: int
) -> None:
    """Review 7, R7-1: one upstream, an error labelled br. A streaming request's
    HTTP error comes before any run (a run that began answers 200 and streams its
    usage), and a 503 is a proxy's page: refunded, as before R6-1's fix."""
    upstream = _AlwaysFails(status)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answer = await client.post(
                "/v1/chat-messages",
                json={"query": "hi", "inputs": {}, "response_mode": mode},
                headers=h.auth(),
            )
        await h.probes.wait_finished(1)
        events, queries = await h.events(), await queries_today(h)
    assert answer.status_code == status and upstream.answers == 1
    assert (events, queries) == ([], 0)
