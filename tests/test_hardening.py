"""Regression tests for holes an independent review found: path spellings that
dodged admission, JSON types that dodged the user rewrite, answers that went
unrecorded on timeouts and cancellation, leaked stream slots, unfiltered history."""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Any

import httpx
import orjson
import pytest

from gateway.errors import StorageError
from gateway.metrics import Metrics
from gateway.settle import Settler
from gateway.storage import Lease, Storage, UsageEvent
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, direct_request, running_gateway
from tests.servers import read_body

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
ONE_A_DAY = {
    "plans": {
        "free": {
            "queries_per_day": 1,
            "max_concurrent_streams": 1,
            "file_size_mb": 1,
            "chat_history_days": 1,
        }
    }
}


async def raw_request(
    h: Harness, method: str, target: str, body: bytes = b"", **headers: str
) -> tuple[int, bytes]:
    """An HTTP/1.1 request with the target exactly as given (clients normalise paths)."""
    host, port = h.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host}",
        f"Authorization: Bearer {h.key}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/chat-messages%3F",
        "/v1/chat-messages%23",
        "/v1/%2E/chat-messages",
        "/v1/x/%2E%2E/chat-messages",
        "/v1/x/../chat-messages",
        "/v1//chat-messages",
        "/v1/workflows/%00/run",
        "/v1/parameters%7F",
        "/v1/files%5Cupload",
    ],
)
async def test_paths_that_could_reach_another_endpoint_are_refused(
    sqlite_url: str, target: str
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=ONE_A_DAY) as h:
        status, body = await raw_request(
            h, "POST", target, orjson.dumps(CHAT), **{"Content-Type": "application/json"}
        )
        rows = await h.storage.daily(h.gateway.today(), h.gateway.today())
    assert status == 400 and orjson.loads(body)["code"] == "invalid_param"
    assert fake.requests == [] and rows == []  # nothing forwarded, nothing reserved


async def test_escaped_characters_in_ids_still_work(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake) as h:
        status, _ = await raw_request(h, "GET", "/v1/conversations/a%20b/variables")
        assert status == 404  # the fake has no such route: what matters is what it was asked
        assert [r.path for r in fake.requests] == ["/v1/conversations/a b/variables"]
        # An escaped slash makes another path, which the route table does not know.
        status, body = await raw_request(h, "GET", "/v1/conversations/a%2Fc/variables")
    assert status == 404 and orjson.loads(body)["code"] == "not_found"
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "content_type", ["application/merge-patch+json", "application/vnd.api+json; charset=utf-8"]
)
async def test_json_flavours_get_the_user_rewritten(sqlite_url: str, content_type: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            await client.post(
                "/v1/chat-messages/t1/stop",
                content=b'{"user":"victim"}',
                headers=h.auth(**{"Content-Type": content_type}),
            )
            await client.request(
                "DELETE",
                "/v1/conversations/c1",
                content=b'{"user":"victim"}',
                headers=h.auth(**{"Content-Type": content_type}),
            )
    assert [r.json["user"] for r in fake.requests if r.json] == [USER, USER]  # type: ignore[index]


async def test_urlencoded_forms_get_the_user_rewritten(sqlite_url: str) -> None:
    upstream = Recorder()
    # audio-to-text is a paid side call: it is forwarded once it has a price.
    priced = {"call_prices": {"dify.audio_to_text": {"price": "0.01"}}}
    async with running_gateway(sqlite_url, upstream=upstream, settings=priced) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            await client.post(
                "/v1/audio-to-text", data={"user": "victim", "other": "a%b"}, headers=h.auth()
            )
    assert upstream.bodies == [b"other=a%25b&user=" + USER.encode()]


async def test_two_content_types_are_refused(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake) as h:
        status, body = await raw_request(
            h,
            "POST",
            "/v1/conversations/c1/name",
            b'{"user":"victim"}',
            **{"Content-Type": "application/json"},
            **{"content-type": "text/plain"},
        )
    assert status == 400 and fake.requests == []


class Recorder:
    """An upstream that records request bodies and answers 200 {}."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        self.bodies.append(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})


# --- answers that must not go unrecorded ------------------------------------------------


async def test_a_blocking_answer_slower_than_the_read_timeout_is_recorded(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.1)  # ~1 s to complete a blocking answer
    settings = {**ONE_A_DAY, "upstream": {"read_timeout": 0.3}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.post(
                "/v1/chat-messages", json={**CHAT, "response_mode": "blocking"}, headers=h.auth()
            )
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert response.status_code == 200 and event.total_tokens == 1168


async def test_a_cancelled_request_still_records_its_answer_and_frees_its_slot(
    sqlite_url: str,
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.05)
    async with running_gateway(sqlite_url, fake=fake, settings=ONE_A_DAY) as h:
        proxy = h.gateway
        app = h.app  # driven directly, so that the request task can be cancelled
        sent: list[dict[str, Any]] = []
        first_chunk = asyncio.Event()
        scope, receive = direct_request(h.key, orjson.dumps(CHAT))

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message.get("body"):
                first_chunk.set()

        task = asyncio.create_task(app(scope, receive, send))
        await first_chunk.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        open_streams = await h.storage.open_streams(USER, now=proxy.clock.now())
        await proxy.idle()
    assert event.estimated and event.outcome == "shutdown" and event.total_tokens > 0
    assert open_streams == 0  # the stream slot is free again
    assert len(fake.stops) == 1  # and the upstream was told to stop generating


async def test_an_answer_abandoned_at_the_total_timeout_is_stopped_upstream(
    sqlite_url: str,
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.2)
    async with running_gateway(
        sqlite_url, fake=fake, settings={"upstream": {"total_timeout": 0.5}}
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(1)
        await h.gateway.idle()
        (event,) = await h.events()
    assert response.status_code == 200 and b"upstream_error" in response.content
    assert event.outcome == "cut" and event.estimated
    assert len(fake.stops) == 1


# --- leases and refunds survive storage blips ----------------------------------------------


class Blip:
    """A real storage whose next N settles (or refunds) fail."""

    def __init__(
        self, storage: Storage, *, settles: int = 0, refunds: int = 0, releases: int = 0
    ) -> None:
        self.storage, self.settles, self.refunds = storage, settles, refunds
        self.releases = releases

    async def settle(
        self,
        event: UsageEvent,
        *,
        lease_id: str | None = None,
        pending_id: str | None = None,
        alerts: Any = None,
    ) -> bool:
        if self.settles:
            self.settles -= 1
            raise StorageError("blip")
        return await self.storage.settle(
            event, lease_id=lease_id, pending_id=pending_id, alerts=alerts
        )

    async def refund(
        self,
        user_id: str,
        *,
        day: date,
        lease_id: str | None = None,
        pending_id: str | None = None,
    ) -> bool:
        if self.refunds:
            self.refunds -= 1
            raise StorageError("blip")
        return await self.storage.refund(user_id, day=day, lease_id=lease_id, pending_id=pending_id)

    async def release_upload(self, user_id: str, *, key: str) -> None:
        if self.releases:
            self.releases -= 1
            raise StorageError("blip")
        await self.storage.release_upload(user_id, key=key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


async def test_a_retried_settle_still_releases_the_stream_lease(storage: Storage) -> None:
    from tests.storage.test_contract import DAY, MONTH, NOW, event, lease

    await storage.ensure_user("alice", plan="free")
    from gateway.storage import AdmissionLimits

    limits = AdmissionLimits(max_concurrent_streams=1)
    assert (
        await storage.admit(
            "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("l1")
        )
    ).admitted
    settler = Settler(Blip(storage, settles=1), metrics=Metrics(), spool=None, retry_delays=(0,))  # type: ignore[arg-type]
    await settler.record(event("m1"), lease_id="l1")
    await next(iter(settler._tasks))
    assert await storage.open_streams("alice", now=NOW) == 0


async def test_a_failed_refund_is_retried(storage: Storage) -> None:
    from gateway.storage import AdmissionLimits
    from tests.storage.test_contract import DAY, MONTH, NOW

    await storage.ensure_user("alice", plan="free")
    await storage.admit(
        "alice",
        day=DAY,
        month_start=MONTH,
        now=NOW,
        limits=AdmissionLimits(),
        lease=Lease("l1", NOW.replace(year=2030)),
    )
    settler = Settler(Blip(storage, refunds=1), metrics=Metrics(), spool=None, retry_delays=(0,))  # type: ignore[arg-type]
    await settler.refund("alice", day=DAY, lease_id="l1")
    await next(iter(settler._tasks))
    (row,) = await storage.daily(DAY, DAY)
    assert row.queries == 0 and await storage.open_streams("alice", now=NOW) == 0


async def test_a_failed_upload_give_back_is_retried(storage: Storage) -> None:
    """An upload the upstream did not take goes back even when the database
    refused the first give-back (it stayed counted against the user before)."""
    from tests.storage.test_contract import DAY, MONTH

    await storage.ensure_user("alice", plan="free")
    reserved = await storage.reserve_upload(
        "alice", key="up-1", day=DAY, month_start=MONTH, size=300
    )
    assert reserved.admitted
    metrics = Metrics()
    settler = Settler(Blip(storage, releases=2), metrics=metrics, spool=None, retry_delays=(0, 0))  # type: ignore[arg-type]
    await settler.release_upload("alice", key="up-1", size=300)
    await next(iter(settler._tasks))
    (row,) = await storage.daily(DAY, DAY)
    assert (row.uploads, row.upload_bytes) == (0, 0)
    assert 'operation="release_upload"' in metrics.render().decode()


# --- history fails closed ---------------------------------------------------------------------


class Garbled:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-encoding", b"br")],
            }
        )
        await send({"type": "http.response.body", "body": b"\x1b\x03\x00\xf8\xa5not json"})


async def test_a_history_page_that_cannot_be_read_is_not_passed_on(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url, upstream=Garbled(), settings=ONE_A_DAY) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            response = await client.get(
                "/v1/conversations", headers=h.auth(**{"Accept-Encoding": "br, gzip"})
            )
    assert response.status_code == 502 and response.json()["code"] == "upstream_error"


# --- CORS preflight ---------------------------------------------------------------------


async def test_cors_preflight_is_forwarded_without_credentials(sqlite_url: str) -> None:
    upstream = Recorder()
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            response = await client.options(
                "/v1/chat-messages",
                headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
            )
    assert response.status_code == 200 and upstream.bodies == [b""]


class CookieSetter:
    """An upstream that sets a cookie on every answer and records the cookies it got."""

    def __init__(self) -> None:
        self.cookies: list[bytes | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        self.cookies.append(dict(scope["headers"]).get(b"cookie"))
        headers = [
            (b"content-type", b"application/json"),
            (b"set-cookie", b"session=secret-of-the-first-user; Path=/"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_cookies_set_by_the_upstream_never_reach_other_users(
    sqlite_url: str, transport: str
) -> None:
    upstream = CookieSetter()
    async with running_gateway(
        sqlite_url, upstream=upstream, settings={"upstream": {"transport": transport}}
    ) as h:
        other = await h.add_user("bob")
        async with (
            httpx.AsyncClient(base_url=h.url) as alice_client,
            httpx.AsyncClient(base_url=h.url) as bob_client,
        ):
            first = await alice_client.get("/v1/parameters", headers=h.auth())
            await bob_client.get("/v1/parameters", headers={"Authorization": f"Bearer {other}"})
    assert first.headers["set-cookie"].startswith("session=")  # passed back to its own client
    assert upstream.cookies == [None, None]  # but never sent upstream again


async def test_a_cancellation_during_the_ledger_write_does_not_lose_the_answer(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake) as h:
        writing, release = asyncio.Event(), asyncio.Event()
        real_settle = h.storage.settle

        async def slow_settle(
            event: UsageEvent,
            *,
            lease_id: str | None = None,
            pending_id: str | None = None,
            alerts: Any = None,
        ) -> bool:
            writing.set()
            await release.wait()
            return await real_settle(event, lease_id=lease_id, pending_id=pending_id, alerts=alerts)

        monkeypatch.setattr(h.storage, "settle", slow_settle)
        scope, receive = direct_request(h.key, orjson.dumps(CHAT))

        async def send(message: dict[str, Any]) -> None:
            pass

        task = asyncio.create_task(h.app(scope, receive, send))
        await writing.wait()  # the answer is complete and being recorded
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await h.gateway.idle()
        (event,) = await h.events()
    assert event.total_tokens == 1168 and not event.estimated


# --- OpenAI-compatible answers in shapes the dialect must still meter ------------------


class _OneAnswer:
    """An OpenAI-compatible upstream that gives every request the same answer."""

    def __init__(self, content_type: bytes, body: bytes) -> None:
        self.content_type, self.body = content_type, body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        headers = [(b"content-type", self.content_type)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


_DEEP = b"[" * 1000 + b'"abcd"' + b"]" * 1000
_DATA_ONLY = b"".join(
    b"data: " + orjson.dumps(event) + b"\n\n"
    for event in [
        {"type": "response.created", "response": {"model": "o3", "status": "in_progress"}},
        {"type": "response.output_text.delta", "delta": "Hello", "output_index": 0},
        {
            "type": "response.completed",
            "response": {"model": "o3", "usage": {"input_tokens": 21, "output_tokens": 2}},
        },
    ]
)


@pytest.mark.parametrize(
    ("path", "request_body", "answer", "tokens"),
    [
        (
            "chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            _OneAnswer(
                b"application/json",
                b'{"model":"gpt-4o-mini","choices":[{"message":{"content":' + _DEEP + b"}}]}",
            ),
            (1, 1),  # an estimate: the answer reports no usage
        ),
        (
            "responses",
            {"model": "o3", "input": "hi", "stream": True},
            _OneAnswer(b"text/event-stream", _DATA_ONLY),
            (21, 2),  # a stream without "event:" lines
        ),
    ],
    ids=["blocking-nested-1000-deep", "responses-data-lines-only"],
)
async def test_odd_openai_answers_are_recorded(
    sqlite_url: str,
    path: str,
    request_body: dict[str, Any],
    answer: _OneAnswer,
    tokens: tuple[int, int],
) -> None:
    settings = {"upstream": {"kind": "openai"}, "pricing": {"unpriced_models": "allow"}}
    async with running_gateway(sqlite_url, upstream=answer, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
            response = await http.post(f"/v1/{path}", json=request_body, headers=h.auth())
        await h.probes.wait_finished(1)
        events = await h.events()
    assert response.status_code == 200
    (event,) = events
    assert (event.prompt_tokens, event.completion_tokens) == tokens


@pytest.mark.parametrize("policy", ["stop", "drain"])
@pytest.mark.parametrize("shape", ["chatflow", "agent"])
async def test_leaving_after_the_first_event_is_never_free(
    sqlite_url: str, policy: str, shape: str
) -> None:
    """Attack: read a streamed answer up to its first event (workflow_started, an
    agent's first thought: no text, no node usage yet), then disconnect, again and
    again. The upstream has the prompt (and bills it): each answer is charged,
    never given back."""
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.05)
    settings = {"upstream": {"on_client_disconnect": policy, "disconnect_grace": 5.0}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        async with (
            httpx.AsyncClient(base_url=h.url, timeout=10) as client,
            client.stream(
                "POST",
                "/v1/chat-messages",
                json=CHAT,
                headers=h.auth(**{"x-fake-scenario": shape}),
            ) as response,
        ):
            first = await anext(response.aiter_raw())
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert b"workflow_started" in first or b"agent_thought" in first  # no text yet
    assert event.total_tokens > 0


async def test_an_answer_drained_past_its_grace_is_charged_its_money(database_url: str) -> None:
    """Attack: leave a long answer (an essay, an agent's tool loop) right after
    its first text, so that it outlasts ``disconnect_grace`` (default drain).
    Cut at the grace's end it was charged an estimate, which prices no money
    for Dify (docs/proxy.md, "Estimates"): a money budget never saw it, while
    Dify billed all it generated. The gateway now stops the answer by a call
    before the grace ends and reads the usage Dify ends it with."""
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.3)
    settings = {"upstream": {"disconnect_grace": 0.2}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        async with (
            httpx.AsyncClient(base_url=h.url, timeout=10) as client,
            client.stream(
                "POST",
                "/v1/chat-messages",
                json={"query": "Write a long essay.", "inputs": {}, "response_mode": "streaming"},
                headers=h.auth(),
            ) as response,
        ):
            async for chunk in response.aiter_raw():
                if b'"event":"message"' in chunk:
                    break  # the client leaves mid-answer
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert fake.stops  # stopped by a call, within the grace
    assert event.outcome == "disconnected" and not event.estimated
    assert event.completion_tokens > 0 and event.cost > 0


class _ToolCallsWithoutUsage:
    """An OpenAI-compatible server that ignores stream_options.include_usage and
    answers with one tool call only: no delta.content, no usage chunk."""

    def __init__(self, arguments: str) -> None:
        self.arguments = arguments
        self.answered = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.answered += 1
        base = {"id": f"chatcmpl-{self.answered}", "object": "chat.completion.chunk"}
        call = {"index": 0, "id": "call_1", "type": "function"}
        deltas: list[dict[str, Any]] = [
            {"role": "assistant", "content": None},
            {"tool_calls": [{**call, "function": {"name": "f", "arguments": ""}}]},
            *(
                {
                    "tool_calls": [
                        {"index": 0, "function": {"arguments": self.arguments[i : i + 500]}}
                    ]
                }
                for i in range(0, len(self.arguments), 500)
            ),
        ]
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for delta in deltas:
            chunk = {**base, "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": delta}]}
            body = b"data: " + orjson.dumps(chunk) + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def test_tool_call_answers_from_a_server_that_reports_no_usage_are_charged_and_capped(
    database_url: str,
) -> None:
    """The attack: against a compatible server that ignores include_usage, ask
    for tool calls only (tool_choice "required"). The answer has no text in
    delta.content; it was refunded, so every one was free and the daily query
    cap never bit. Now it is charged an estimate of its prompt and its tool
    call's arguments, and counts against the cap."""
    arguments = "x" * 8000  # about 2,000 completion tokens
    upstream = _ToolCallsWithoutUsage(arguments)
    settings = {
        "upstream": {"kind": "openai"},
        "prices": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}},
        "plans": {"free": {"queries_per_day": 1}},
    }
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "required",
        "messages": [{"role": "user", "content": "call f"}],
    }
    async with running_gateway(database_url, upstream=upstream, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            first = await client.post("/v1/chat/completions", json=body, headers=h.auth())
            assert first.status_code == 200 and arguments[:500] in first.text
            await h.probes.wait_finished(1)
            again = await client.post("/v1/chat/completions", json=body, headers=h.auth())
        events = await h.events()
    assert again.status_code == 429 and upstream.answered == 1
    assert len(events) == 1
    assert events[0].estimated and events[0].completion_tokens >= 1000
    assert events[0].cost > 0
