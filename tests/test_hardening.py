"""Regression tests for holes an independent review found: path spellings that
dodged admission, JSON types that dodged the user rewrite, answers that went
unrecorded on timeouts and cancellation, leaked stream slots, unfiltered history."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from gateway.clock import FixedClock
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
    """An answer still running at ``upstream.total_timeout`` whose stop call
    ahead of it did nothing (Dify answered "success" and ran on): cut at the
    deadline, charged an estimate, and stopped once (not again at the cut)."""
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.2)
    fake.stops_ignored = True
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


async def test_an_answer_running_past_its_total_timeout_is_charged_its_money(
    database_url: str,
) -> None:
    """Attack: an answer made to run longer than ``upstream.total_timeout`` (an
    agent's tool loop), the client connected. Cut at the deadline it was charged
    an estimate, at no money for Dify. Now it is stopped by a call ahead of the
    deadline and read on: the client gets the end Dify gives a stopped answer,
    and the usage in it is charged."""
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.3)
    settings = {"upstream": {"total_timeout": 0.5}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            answer = await client.post(
                "/v1/chat-messages",
                json={"query": "Write a long essay.", "inputs": {}, "response_mode": "streaming"},
                headers=h.auth(),
            )
        await h.probes.wait_finished(1)
        await h.gateway.idle()
        (event,) = await h.events()
    assert fake.stops  # stopped by a call, before the deadline
    assert b'"event":"message_end"' in answer.content
    assert b"upstream_error" not in answer.content
    assert not event.estimated and event.completion_tokens > 0 and event.cost > 0
    assert len(fake.stops) == 1


async def test_an_answer_finishing_within_its_total_timeout_is_not_stopped(
    sqlite_url: str,
) -> None:
    """The stop call comes at ``upstream.total_timeout``, not before: an answer
    of about 2 s under a 3 s deadline reaches its end whole, unstopped (from a
    review: a first version stopped it at half a short deadline)."""
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.2, answer=tuple(f"piece{i} " for i in range(10)))
    settings = {"upstream": {"total_timeout": 3.0}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            answer = await client.post(
                "/v1/chat-messages",
                json={"query": "Hi", "inputs": {}, "response_mode": "streaming"},
                headers=h.auth(),
            )
        await h.probes.wait_finished(1)
        await h.gateway.idle()
        (event,) = await h.events()
    assert fake.stops == []
    assert b"piece9" in answer.content and event.outcome == "complete"


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


# --- Dify: text-to-audio of another user's message (review F8) ----------------------------


class _DifyWithTts:
    """Dify 1.x as its source reads: a blocking chat answer kept per end user,
    and ``POST /text-to-audio`` with a ``message_id`` speaking that message's
    answer after ``db.session.query(Message).where(Message.id == message_id)``
    (any spelling of the UUID), with no check of the end user nor the app; with
    ``text`` alone, speaking the text. The "audio" is the text, so the test can
    read it."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}
        self.spoken = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = orjson.loads(await read_body(receive) or b"{}")
        path = scope["path"].removeprefix("/v1")
        kind, status = b"application/json", 200
        if path == "/chat-messages":
            message_id = f"00000000-0000-4000-8000-{len(self.messages):012d}"
            answer = f"Private answer for {request['user']}: {request['query']}"
            self.messages[message_id] = answer
            usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20,
                     "total_price": "0.001", "currency": "USD"}  # fmt: skip
            raw = orjson.dumps(
                {
                    "event": "message",
                    "task_id": "t",
                    "id": message_id,
                    "message_id": message_id,
                    "conversation_id": "c",
                    "mode": "chat",
                    "answer": answer,
                    "metadata": {"usage": usage},
                    "created_at": 1,
                }
            )
        elif path == "/text-to-audio" and request.get("message_id"):
            answer = self.messages.get(str(uuid.UUID(request["message_id"])))  # no user check
            self.spoken += 1
            kind, raw = b"audio/mpeg", (answer or "").encode()
        elif path == "/text-to-audio" and isinstance(request.get("text"), str):
            self.spoken += 1
            kind, raw = b"audio/mpeg", request["text"].encode()
        else:
            status, raw = 404, orjson.dumps({"code": "not_found", "message": "no", "status": 404})
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}
        )
        await send({"type": "http.response.body", "body": raw})


TTS_PRICED = {"call_prices": {"dify.text_to_audio": {"price": "0.015", "currency": "USD"}}}


async def test_text_to_audio_does_not_read_another_users_message(database_url: str) -> None:
    """The attack: Bob sends ``POST /text-to-audio {"message_id": <Alice's>}``.
    Dify 1.x looks the message up by id alone (AudioService.transcript_tts), so
    it read Alice's answer out to him. The ledger knows whose each Dify message
    is (its answer id): the call is now refused 404 in Dify's shape, as another
    user's stored response is, before anything is forwarded or charged."""
    upstream = _DifyWithTts()
    async with running_gateway(database_url, upstream=upstream, settings=TTS_PRICED) as h:
        bob = await h.add_user("bob")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            mine = await client.post(
                "/v1/chat-messages",
                json={"query": "my diagnosis is X", "inputs": {}, "response_mode": "blocking"},
                headers=h.auth(),
            )
            message_id = mine.json()["message_id"]
            await h.probes.wait_finished(1)
            stolen = await client.post(
                "/v1/text-to-audio", json={"message_id": message_id}, headers=h.auth(bob)
            )
            # Any spelling of the same UUID is the same message to Dify.
            shouted = await client.post(
                "/v1/text-to-audio", json={"message_id": message_id.upper()}, headers=h.auth(bob)
            )
        events = await h.events()
    for refused in (stolen, shouted):
        assert refused.status_code == 404, refused.text
        assert refused.json()["code"] == "not_found" and refused.json()["status"] == 404
        assert b"my diagnosis is X" not in refused.content
    assert upstream.spoken == 0
    assert [event.user_id for event in events] == [USER]  # nothing charged to Bob


async def test_text_to_audio_reads_the_callers_own_message_and_any_text(sqlite_url: str) -> None:
    """The owner's read of their own answer (in any UUID spelling) and the
    text-only form (anyone's, nothing of another user in it) stay priced calls."""
    upstream = _DifyWithTts()
    async with running_gateway(sqlite_url, upstream=upstream, settings=TTS_PRICED) as h:
        bob = await h.add_user("bob")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            mine = await client.post(
                "/v1/chat-messages",
                json={"query": "my diagnosis is X", "inputs": {}, "response_mode": "blocking"},
                headers=h.auth(),
            )
            message_id = mine.json()["message_id"]
            await h.probes.wait_finished(1)
            own = await client.post(
                "/v1/text-to-audio", json={"message_id": message_id.upper()}, headers=h.auth()
            )
            await h.probes.wait_finished(2)
            text = await client.post(
                "/v1/text-to-audio",
                json={"text": "Xin chào", "message_id": ""},
                headers=h.auth(bob),
            )
            await h.probes.wait_finished(3)
            odd = await client.post(
                "/v1/text-to-audio", json={"message_id": 7}, headers=h.auth(bob)
            )
        events = await h.events()
    assert own.status_code == 200 and b"my diagnosis is X" in own.content
    assert text.status_code == 200 and text.content == "Xin chào".encode()
    assert odd.status_code == 400 and odd.json()["code"] == "invalid_param"
    spoken = [(e.user_id, e.cost) for e in events if e.endpoint == "text-to-audio"]
    assert spoken == [(USER, Decimal("0.015")), ("bob", Decimal("0.015"))]


# --- Dify: an answer attaching another user's upload (review F9) ---------------------------


def _attach(*file_ids: str, where: str = "files") -> dict[str, Any]:
    files = [
        {"type": "document", "transfer_method": "local_file", "upload_file_id": file_id}
        for file_id in file_ids
    ]
    body: dict[str, Any] = {"query": "Quote the attached document.", "inputs": {}}
    if where == "files":
        body["files"] = files
    elif where == "input":
        body["inputs"] = {"doc": files[0]}
    else:
        body["inputs"] = {"docs": files}
    return {**body, "response_mode": "blocking"}


async def _upload(client: httpx.AsyncClient, h: Harness, key: str | None = None) -> str:
    upload = await client.post(
        "/v1/files/upload",
        files={"file": ("payslip.pdf", b"%PDF-1.4 salary", "application/pdf")},
        headers=h.auth(key),
    )
    assert upload.status_code == 201, upload.text
    file_id: str = upload.json()["id"]
    return file_id


async def test_a_chat_request_cannot_attach_another_users_upload(database_url: str) -> None:
    """The attack: Alice's chat request names Bob's upload by its
    ``upload_file_id``. Dify 1.x finds the file within the whole workspace
    (``UploadFile.id == id AND tenant_id == tenant``: no end-user check), so the
    model read Bob's file to her. The gateway now keeps whose each upload is and
    refuses the request 404 in Dify's shape, before anything is forwarded."""
    async with running_gateway(database_url) as h:
        assert h.fake is not None
        bob = await h.add_user("bob")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            bobs_file = await _upload(client, h, bob)
            answer = await client.post(
                "/v1/chat-messages", json=_attach(bobs_file), headers=h.auth()
            )
        sent = [r for r in h.fake.requests if r.path.endswith("/chat-messages")]
    assert answer.status_code == 404, answer.text
    assert answer.json() == {
        "code": "not_found",
        "message": f"No object found with id '{bobs_file}'.",
        "status": 404,
    }
    assert sent == []


async def _delete_user(url: str, user: str) -> None:
    """Delete a user as an operator does, by hand (the gateway has no command
    for it); on SQLite with foreign keys on, so the user's keys go too."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("DELETE FROM users WHERE id = ?", (user,))
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await pg.execute("DELETE FROM users WHERE id = $1", user)
    finally:
        await pg.close()


async def test_a_user_made_again_under_a_deleted_users_id_cannot_attach_their_uploads(
    database_url: str,
) -> None:
    """The attack: Bob uploads his payslip, and is deleted; the id "bob" is
    later given to somebody else (a reused login, a token subject issued anew),
    who names the old upload's id. The gateway knows users by id alone: the
    upload's record outlived Bob and made the new bob its owner. A user's
    deletion now takes the records with it (PostgreSQL 0029, SQLite 0022)."""
    async with running_gateway(database_url) as h:
        assert h.fake is not None
        bob = await h.add_user("bob")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            bobs_file = await _upload(client, h, bob)
            before = await client.post(
                "/v1/chat-messages", json=_attach(bobs_file), headers=h.auth(bob)
            )
            await _delete_user(database_url, "bob")
            new_bob = await h.add_user("bob")
            answer = await client.post(
                "/v1/chat-messages", json=_attach(bobs_file), headers=h.auth(new_bob)
            )
        sent = [r for r in h.fake.requests if r.path.endswith("/chat-messages")]
    assert before.status_code == 200, before.text
    assert answer.status_code == 404, answer.text
    assert answer.json()["code"] == "not_found"
    assert len(sent) == 1  # the old Bob's own answer only


@pytest.mark.parametrize(
    ("path", "where"),
    [
        ("/v1/chat-messages", "input"),
        ("/v1/completion-messages", "inputs"),
        ("/v1/workflows/run", "input"),
        ("/v1/workflows/run", "inputs"),
    ],
)
async def test_no_answer_route_attaches_another_users_upload(
    sqlite_url: str, path: str, where: str
) -> None:
    """The same through a file-typed input (one file, or a list of them), on every
    answer route. The caller's own uploads (several, in any UUID spelling) are
    forwarded as sent; one of Bob's beside them is refused."""
    async with running_gateway(sqlite_url) as h:
        assert h.fake is not None
        bob = await h.add_user("bob")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            bobs_file = await _upload(client, h, bob)
            own, more = await _upload(client, h), await _upload(client, h)
            mine = (own.upper(),) if where == "input" else (own.upper(), more)
            allowed = await client.post(path, json=_attach(*mine, where=where), headers=h.auth())
            theirs = (bobs_file,) if where == "input" else (own, bobs_file)
            answer = await client.post(path, json=_attach(*theirs, where=where), headers=h.auth())
        sent = [r for r in h.fake.requests if not r.path.endswith("/files/upload")]
    assert allowed.status_code == 200, allowed.text
    assert answer.status_code == 404, answer.text
    (forwarded,) = sent
    value = forwarded.json["inputs"]["doc" if where == "input" else "docs"]
    assert value == _attach(*mine, where=where)["inputs"]["doc" if where == "input" else "docs"]


async def test_a_team_mate_or_an_unknown_upload_is_not_attached(sqlite_url: str) -> None:
    """A team shares limits, not files: Bob's upload is his even to his team
    mate. A file the gateway never saw uploaded (one uploaded before it kept
    uploads, at Dify directly, or a tool's file) is refused too: nothing
    shows it is the caller's."""
    async with running_gateway(sqlite_url, settings={"plans": {"team": {}}}) as h:
        assert h.fake is not None
        bob = await h.add_user("bob")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_team("bob", "acme")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            bobs_file = await _upload(client, h, bob)
            mate = await client.post("/v1/chat-messages", json=_attach(bobs_file), headers=h.auth())
            unknown = await client.post(
                "/v1/chat-messages", json=_attach(str(uuid.uuid4())), headers=h.auth()
            )
            tool = _attach()
            tool["files"] = [{"type": "image", "transfer_method": "tool_file",
                              "tool_file_id": str(uuid.uuid4())}]  # fmt: skip
            tools = await client.post("/v1/chat-messages", json=tool, headers=h.auth())
        sent = [r for r in h.fake.requests if r.path.endswith("/chat-messages")]
    assert [r.status_code for r in (mate, unknown, tools)] == [404, 404, 404]
    assert sent == []


async def test_an_upload_that_cannot_be_kept_is_refused_to_answers(sqlite_url: str) -> None:
    """Fails closed: when the upload's record cannot be written, the upload
    stands (the upstream has it) but no answer may attach it."""
    async with running_gateway(sqlite_url) as h:
        storage = h.storage

        async def down(*args: Any, **kwargs: Any) -> None:
            raise StorageError("down")

        original = storage.remember_upload
        storage.remember_upload = down  # type: ignore[method-assign]
        try:
            async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
                file_id = await _upload(client, h)
                storage.remember_upload = original  # type: ignore[method-assign]
                answer = await client.post(
                    "/v1/chat-messages", json=_attach(file_id), headers=h.auth()
                )
        finally:
            storage.remember_upload = original  # type: ignore[method-assign]
    assert answer.status_code == 404


class _LargeUploadReply:
    """A Dify whose upload reply runs past the 64 KiB the gateway reads to keep
    whose the file is (a long name, say), then answers chats as Dify does."""

    FILE_ID = "7c0e6a2e-0d4b-4f7e-9a51-3b1a5d9e8c10"

    def __init__(self) -> None:
        self.reply = orjson.dumps({"id": self.FILE_ID, "name": "x" * 100_000, "size": 15})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        head = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 201, "headers": head})
        await send({"type": "http.response.body", "body": self.reply})


async def test_an_upload_reply_too_large_to_read_is_passed_on_and_its_file_not_kept(
    sqlite_url: str,
) -> None:
    """Past 64 KiB, an upload's reply is passed on whole as it comes, unread: its
    file is nobody's on record, so no answer may attach it (fails closed)."""
    upstream = _LargeUploadReply()
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            upload = await client.post(
                "/v1/files/upload",
                files={"file": ("payslip.pdf", b"%PDF-1.4 salary", "application/pdf")},
                headers=h.auth(),
            )
        owners = await h.storage.upload_owners([upstream.FILE_ID])
    assert (upload.status_code, upload.content) == (201, upstream.reply)
    assert owners == {}


# --- Dify: files given by URL past the plan's upload limits (review F5) ---------------------

BY_URL = {
    "query": "Summarise the attached report.",
    "inputs": {},
    "response_mode": "blocking",
    "files": [
        {
            "type": "document",
            "transfer_method": "remote_url",
            "url": "https://attacker.example/report-2MB.pdf",
        }
    ]
    * 5,
}


async def test_a_remote_url_file_does_not_get_around_the_upload_limits(database_url: str) -> None:
    """The attack: a plan refuses a 2 MB upload (``file_size_mb = 1``) and allows
    one upload a day; the user names five 2 MB files by URL in the chat request
    itself (``transfer_method: "remote_url"``), which Dify fetches server-side
    up to its own limits: no size checked, nothing counted. Refused 403 in
    Dify's shape: under upload limits, files come as uploads."""
    limits = {"file_size_mb": 1, "limits": [{"meter": "uploads", "per": "day", "max": 1}]}
    async with running_gateway(database_url, settings={"plans": {"free": limits}}) as h:
        assert h.fake is not None
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            big = await client.post(
                "/v1/files/upload",
                files={"file": ("report.pdf", b"x" * (2 * 1024 * 1024), "application/pdf")},
                headers=h.auth(),
            )
            assert big.status_code == 413  # the plan's file size
            answer = await client.post("/v1/chat-messages", json=BY_URL, headers=h.auth())
        sent = [r for r in h.fake.requests if r.path.endswith("/chat-messages")]
    assert answer.status_code == 403, answer.text
    assert answer.json()["code"] == "file_transfer_not_allowed"
    assert answer.json()["status"] == 403
    assert sent == []


@pytest.mark.parametrize(
    "plans",
    [
        {"free": {"file_size_mb": 5}},
        {"free": {"limits": [{"meter": "upload_bytes", "per": "month", "max": 10**6}]}},
        # A team's upload limit holds its members' uploads too.
        {"team": {"limits": [{"meter": "uploads", "per": "day", "max": 3}]}},
    ],
)
async def test_files_by_url_are_refused_only_under_upload_limits(
    sqlite_url: str, plans: dict[str, Any]
) -> None:
    """A file-typed input given by URL, under each kind of upload limit; a plan
    without one (Bob's) leaves URLs to Dify, as before."""
    settings = {"plans": {"free": {}, "team": {}, "open": {}, **plans}}
    async with running_gateway(sqlite_url, settings=settings) as h:
        bob = await h.add_user("bob", plan="open")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            as_input = {**BY_URL, "files": [], "inputs": {"report": BY_URL["files"][0]}}
            free = await client.post("/v1/workflows/run", json=as_input, headers=h.auth(bob))
            answer = await client.post("/v1/workflows/run", json=as_input, headers=h.auth())
    assert free.status_code == 200, free.text
    assert answer.status_code == 403, answer.text


# --- Dify: the title generated for a new conversation (review F6) --------------------------

TITLE_PRICED = {"call_prices": {"dify.auto_generate_name": {"price": "0.001", "currency": "USD"}}}


async def test_the_title_generated_for_a_new_conversation_is_charged_like_a_rename(
    database_url: str,
) -> None:
    """The attack: a client starts a new conversation with every request. Dify
    then generates a title with the app's model each time (``auto_generate_name``
    defaults to true) and leaves it out of the answer's usage, while the same
    call made as a rename is the priced side cost ``dify.auto_generate_name``.
    With that price set, such an answer is now charged it on top of its usage."""
    async with running_gateway(database_url, settings=TITLE_PRICED) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answer = await client.post(
                "/v1/chat-messages",
                json={"query": "hi", "inputs": {}, "response_mode": "blocking"},
                headers=h.auth(),
            )
        assert answer.status_code == 200
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    usage_price = Decimal(answer.json()["metadata"]["usage"]["total_price"])
    assert event.cost == usage_price + Decimal("0.001")


async def test_only_answers_that_make_a_title_are_charged_for_one(sqlite_url: str) -> None:
    """Dify makes a title for a chat without a conversation (absent or empty)
    unless ``auto_generate_name`` is false to every version; streamed or
    blocking alike. A default configuration (no such price) forwards these
    answers as before and charges what Dify reports: the gap
    docs/security.md names."""
    cases = [
        ({}, "streaming", True),
        ({"conversation_id": ""}, "blocking", True),
        ({"auto_generate_name": "false"}, "blocking", True),  # true to reqparse's bool()
        ({"auto_generate_name": False}, "streaming", False),
        ({"auto_generate_name": 0}, "blocking", False),
        ({"conversation_id": "c-1"}, "streaming", False),  # no new conversation
    ]
    # The fake's usage costs 0.0013030 (docs/upstreams/dify.md's example).
    usage, title = Decimal("0.0013030"), Decimal("0.001")
    for settings, priced in ((TITLE_PRICED, True), (None, False)):
        async with running_gateway(sqlite_url, settings=settings) as h:
            assert h.fake is not None
            async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
                for n, (body, mode, _) in enumerate(cases, 1):
                    ask = {"query": "hi", "inputs": {}, "response_mode": mode, **body}
                    answer = await client.post("/v1/chat-messages", json=ask, headers=h.auth())
                    assert answer.status_code == 200
                    await h.probes.wait_finished(n)
            events = (await h.events())[-len(cases) :]  # this gateway's, in order
            sent = [r.json for r in h.fake.requests if r.path.endswith("/chat-messages")]
        expected = [usage + (title if titled and priced else 0) for _, _, titled in cases]
        assert [event.cost for event in events] == expected, priced
        assert [{k: v for k, v in r.items() if k in ("auto_generate_name", "conversation_id")}
                for r in sent] == [body for body, _, _ in cases]  # fmt: skip


# --- the chat-history window beyond the lists (review-limits F3) --------------------


class _OldHistoryDify(_DifyWithTts):
    """Dify with the caller's answers stored at ``created_at`` (set by the test,
    in the past): ``GET /messages`` lists them, ``GET
    /conversations/{id}/variables`` returns a conversation variable holding
    the last answer (as a chatflow's memory variable does), and ``POST
    /text-to-audio {"message_id"}`` speaks one (the "audio" is its text)."""

    def __init__(self) -> None:
        super().__init__()
        self.created_at = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "").removeprefix("/v1")
        if (
            scope.get("type") == "http"
            and scope["method"] == "GET"
            and path
            in (
                "/messages",
                "/conversations/c/variables",
            )
        ):
            if path == "/messages":
                data = [
                    {"id": mid, "conversation_id": "c", "query": "q", "answer": answer,
                     "created_at": self.created_at}
                    for mid, answer in self.messages.items()
                ]  # fmt: skip
            else:
                data = [
                    {"id": "v", "name": "memory", "value_type": "string",
                     "value": "\n".join(self.messages.values()),
                     "created_at": self.created_at, "updated_at": self.created_at}
                    for _ in [1]
                ]  # fmt: skip
            raw = orjson.dumps({"limit": 20, "has_more": False, "data": data})
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": raw})
            return
        await super().__call__(scope, receive, send)


async def test_an_answer_outside_the_history_window_is_read_through_other_routes(
    database_url: str,
) -> None:
    """Review-limits F3, the attack: ``chat_history_days`` filtered only ``GET
    /conversations`` and ``GET /messages``. An answer 40 days old was hidden
    from the message list of a 7-day plan, yet ``POST /text-to-audio
    {"message_id": <it>}`` read it out whole (the ledger says it is the
    caller's), and ``GET /conversations/{id}/variables`` returned the
    conversation's variables (a chatflow's memory of it) unfiltered."""
    upstream = _OldHistoryDify()
    old = datetime.now(UTC) - timedelta(days=40)
    clock = FixedClock(old)
    settings = {**TTS_PRICED, "plans": {"free": {"chat_history_days": 7}}}
    async with running_gateway(
        database_url, upstream=upstream, settings=settings, clock=clock
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            asked = await client.post(
                "/v1/chat-messages",
                json={"query": "my diagnosis is X", "inputs": {}, "response_mode": "blocking"},
                headers=h.auth(),
            )
            assert asked.status_code == 200, asked.text
            message_id = asked.json()["message_id"]
            await h.probes.wait_finished(1)
            upstream.created_at = int(old.timestamp())
            clock.set(datetime.now(UTC))  # 40 days later
            listed = await client.get(
                "/v1/messages", params={"conversation_id": "c"}, headers=h.auth()
            )
            spoken = await client.post(
                "/v1/text-to-audio", json={"message_id": message_id}, headers=h.auth()
            )
            variables = await client.get("/v1/conversations/c/variables", headers=h.auth())
    # The window hides the old answer from the list...
    assert listed.status_code == 200 and listed.json()["data"] == []
    # ...and everywhere else: the old message is not spoken (as if not there).
    assert spoken.status_code == 404, spoken.text
    leaks = [
        name
        for name, response in (("text-to-audio", spoken), ("variables", variables))
        if b"my diagnosis is X" in response.content
    ]
    assert leaks == []
