"""The proxy pipeline's guarantees, end to end: nothing is reserved for a body that
cannot be forwarded, no spelling of the user parameter reaches the upstream, an
answer the gateway cannot read is still charged, and a missing row is not an outage."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import httpx
import orjson
import pytest

import gateway.proxy
from gateway.errors import NotFound, StorageError
from gateway.upstreams import Prepared, Route
from gateway.upstreams.dify import DifyUpstream
from gateway.upstreams.transforms import DropEvents
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
ONE_AT_A_TIME = {"plans": {"free": {"queries_per_day": 1, "max_concurrent_streams": 1}}}


async def today_row(h: Harness) -> Any:
    day = h.gateway.today()
    rows = await h.storage.daily(day, day, user_id=USER)
    return rows[0] if rows else None


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"{}" + b"}" * depth


async def test_a_body_too_deep_to_forward_is_refused_before_admission(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    # orjson reads this depth but refuses to write it again.
    deep = orjson.dumps(CHAT)[:-1] + b',"deep":' + nested(300) + b"}"
    assert orjson.loads(deep)["query"] == CHAT["query"]
    async with running_gateway(sqlite_url, fake=fake, settings=ONE_AT_A_TIME) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            refused = await client.post(
                "/v1/chat-messages",
                content=deep,
                headers=h.auth(**{"Content-Type": "application/json"}),
            )
            # The one query of the day and the one stream slot are still free.
            answered = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(2)
        row = await today_row(h)
    assert refused.status_code == 400
    body = refused.json()
    assert set(body) == {"code", "message", "status"}
    assert (body["code"], body["status"]) == ("invalid_param", 400)
    assert "nested too deeply" in body["message"]
    assert answered.status_code == 200
    assert fake.hits("/chat-messages") == 1
    assert row.queries == 1


async def test_a_failure_after_admission_gives_the_reservation_back(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=ONE_AT_A_TIME) as h:
        calls = 0
        original = gateway.proxy.Proxy._forward

        async def broken(self: gateway.proxy.Proxy, x: gateway.proxy.Exchange) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug after admission")
            return await original(self, x)

        monkeypatch.setattr(gateway.proxy.Proxy, "_forward", broken)
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            failed = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
            answered = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(2)
        row = await today_row(h)
    assert failed.status_code == 500
    assert answered.status_code == 200
    assert row.queries == 1  # the broken request's query came back


class QueryRecorder:
    """An upstream that records each request's raw query string and answers 200 {}."""

    def __init__(self) -> None:
        self.queries: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        self.queries.append(scope["query_string"])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize(
    "query", ["%75ser=victim", "us%65r=victim", "user=victim", "%75%73%65%72=victim&x=1"]
)
async def test_no_spelling_of_the_user_parameter_reaches_the_upstream(
    sqlite_url: str, query: str
) -> None:
    upstream = QueryRecorder()
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            await client.post(
                f"/v1/conversations/c1/name?{query}", json={"name": "n"}, headers=h.auth()
            )
    (sent,) = upstream.queries
    assert b"victim" not in sent
    assert sent.endswith(b"user=" + USER.encode())


class Unreadable:
    """An upstream that answers every request 200 with a body the gateway cannot read."""

    def __init__(self, body: bytes, content_type: bytes) -> None:
        self.body = body
        self.content_type = content_type

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", self.content_type)],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


@pytest.mark.parametrize(
    ("body", "content_type", "limit"),
    [
        (b"<html>the answer, somehow</html>", b"text/html", None),
        (orjson.dumps({"answer": "x" * 4000, "metadata": {}}), b"application/json", 1000),
    ],
    ids=["not-json", "over-the-buffer"],
)
async def test_an_answer_that_cannot_be_read_is_charged_an_estimate(
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    content_type: bytes,
    limit: int | None,
) -> None:
    if limit is not None:
        monkeypatch.setattr(gateway.proxy, "_MAX_BUFFERED_BODY", limit)
    upstream = Unreadable(body, content_type)
    async with running_gateway(sqlite_url, upstream=upstream, settings=ONE_AT_A_TIME) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post(
                "/v1/chat-messages",
                json={**CHAT, "response_mode": "blocking"},
                headers=h.auth(),
            )
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        row = await today_row(h)
    assert response.status_code == 200 and response.content == body  # passed on as it came
    assert event.estimated and event.outcome == "cut"
    assert event.completion_tokens > 0 and event.total_tokens > event.completion_tokens
    assert row.queries == 1  # spent, not refunded
    assert any("charging an estimate" in r.message for r in caplog.records)


def test_not_found_is_not_a_storage_error() -> None:
    assert not issubclass(NotFound, StorageError)


async def test_a_missing_user_row_is_not_a_database_outage(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    all_open = {"queries": "open", "tokens": "open", "streams": "open"}
    settings = {**ONE_AT_A_TIME, "admission": {"on_storage_error": all_open}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:

        async def missing(*args: Any, **kwargs: Any) -> Any:
            raise NotFound("unknown user")

        monkeypatch.setattr(h.storage, "admit", missing)
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
    # Not let through unmetered (fail-open is for outages), and not forwarded.
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert fake.hits("/chat-messages") == 0
    assert not any("fail-open" in r.message for r in caplog.records if r.levelno >= logging.WARNING)


# --- the dialect seam, driven by a dialect unlike Dify ----------------------------------


class HidesUsage(DifyUpstream):
    """Dify, except that the client never sees the usage event (as a dialect hides
    a usage chunk it asked the upstream for) and answers stop by closing."""

    __slots__ = ()
    stops_by_closing = True

    def stream_transform(self, route: Route, prepared: Prepared) -> DropEvents:
        return DropEvents(lambda event: b'"event":"message_end"' in event)

    def stop_request(self, route: Route, task_id: str, user_id: str) -> None:
        return None


def hide_usage(h: Harness) -> None:
    """Put HidesUsage in force, as a reload puts a new dialect: in a new snapshot."""
    current = h.gateway.running.current
    dialect = HidesUsage()
    current.install(
        dataclasses.replace(current.snapshot, upstream=dialect, dialects={"dify": dialect})
    )


async def test_a_stream_transform_hides_an_event_from_the_client_not_from_the_meter(
    sqlite_url: str,
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake) as h:
        hide_usage(h)
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert response.status_code == 200
    assert b'"event":"message"' in response.content
    assert b"message_end" not in response.content
    assert response.content.endswith(b"\n\n")  # whole events only
    assert event.outcome == "complete" and not event.estimated and event.total_tokens > 0


async def test_a_dialect_without_a_stop_endpoint_stops_by_closing(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.05)
    settings = {"upstream": {"on_client_disconnect": "stop"}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        hide_usage(h)
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            async with client.stream(
                "POST", "/v1/chat-messages", json=CHAT, headers=h.auth()
            ) as response:
                async for chunk in response.aiter_raw():
                    if b'"event":"message"' in chunk:
                        break  # leaving the block closes the connection mid-answer
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert fake.stops == []  # no stop call: the upstream connection was closed instead
    assert (
        fake.disconnects == 1
    )  # the gateway left mid-answer (the fake, like Dify, finishes anyway)
    assert event.outcome == "disconnected" and event.estimated
