"""What the proxy does when something goes wrong that is nobody's refusal: a
request method the dialects cannot route, a bug while an answer is relayed or
metered, a client that leaves before the first token of an answer stopped by
closing. Each answer the upstream began is charged; no traceback reaches a client."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

import gateway.proxy
from gateway.sse import ServerSentEvent, SSEDecoder
from gateway.upstreams.dify import DifyUpstream
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway
from tests.servers import serve

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}


async def today_queries(h: Harness) -> int:
    day = h.gateway.today()
    rows = await h.storage.daily(day, day, user_id=USER)
    return rows[0].queries if rows else 0


async def raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/v1/chat-messages"), ("Post", "/v1/chat-messages"), ("get", "/v1/conversations")],
)
async def test_a_method_not_in_upper_case_is_refused_not_forwarded(
    sqlite_url: str, method: str, path: str
) -> None:
    # httptools refuses such a request line itself; h11 (uvicorn --http h11, other
    # ASGI servers) hands it to the app, and the upstream client would send it as
    # the upper-case method: an unmetered answer.
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake) as h:
        async with serve(h.app, http="h11") as url:
            body = orjson.dumps(CHAT)
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {h.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            answer = await raw_request(url, head, body)
        await h.probes.wait_finished(1)
        events = await h.events()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 400 Bad Request"
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2]) == {
        "code": "invalid_param",
        "message": "The request method must be written in upper case.",
        "status": 400,
    }
    assert fake.hits("/chat-messages") == fake.hits("/conversations") == 0
    assert events == []


async def test_a_bug_before_the_answer_starts_is_a_500_in_the_upstreams_shape(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: DifyUpstream, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the dialect")

    monkeypatch.setattr(DifyUpstream, "prepare", broken)
    async with running_gateway(sqlite_url) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            failed = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
    assert failed.status_code == 500
    assert failed.json() == {
        "code": "internal_server_error",
        "message": "The gateway failed to handle the request.",
        "status": 500,
    }
    assert failed.headers["x-request-id"]


class FailingDecoder(SSEDecoder):
    """An SSE decoder with a bug that shows on the answer's last event."""

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if b"message_end" in chunk:
            raise RuntimeError("a bug while metering")
        return super().feed(chunk)


async def test_a_bug_while_relaying_an_answer_charges_it_and_ends_the_stream_with_an_error(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.proxy, "SSEDecoder", FailingDecoder)
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answer = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(1)
        events = await h.events()
        queries = await today_queries(h)
    assert answer.status_code == 200
    last = answer.content.rstrip().rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ")
    assert orjson.loads(last[len(b"data: ") :])["code"] == "internal_server_error"
    assert [(e.outcome, e.estimated) for e in events] == [("cut", True)]
    assert events[0].prompt_tokens > 0  # the prompt, estimated from the request
    assert queries == 1  # charged, not given back


async def test_a_blocking_answer_the_meter_fails_on_is_charged_an_estimate(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: DifyUpstream, *args: Any) -> Any:
        raise RecursionError("a bug in the dialect's reader")

    monkeypatch.setattr(DifyUpstream, "meter_blocking", broken)
    async with running_gateway(sqlite_url) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answer = await client.post(
                "/v1/chat-messages",
                json={**CHAT, "response_mode": "blocking"},
                headers=h.auth(),
            )
        await h.probes.wait_finished(1)
        events = await h.events()
    assert answer.status_code == 200
    assert answer.json()["event"] == "message"  # the answer itself went through whole
    assert [(e.outcome, e.estimated) for e in events] == [("cut", True)]


FIRST = b"data: " + orjson.dumps(
    {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    }
)


class FirstTokenAfter:
    """An OpenAI-compatible upstream that sends its headers at once and its first
    chunk only when told (a long prompt, a reasoning model)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        await self.go.wait()
        for _ in range(50):
            await send({"type": "http.response.body", "body": FIRST + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def call_app(
    app: Callable[..., Awaitable[None]], scope: dict[str, Any], body: bytes, gone: asyncio.Event
) -> list[dict[str, Any]]:
    """Drive the gateway's ASGI app directly: the client sends ``body`` and is gone
    right after (``gone`` is set once the app has been told)."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        gone.set()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_client_gone_before_the_first_token_of_an_answer_stopped_by_closing_is_charged(
    sqlite_url: str,
) -> None:
    upstream = FirstTokenAfter()
    settings = {
        "upstream": {"kind": "openai", "on_client_disconnect": "stop"},
        "pricing": {"unpriced_models": "allow"},
    }
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        body = orjson.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "x" * 20_000}],
                "stream": True,
            }
        )
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "headers": [
                (b"host", b"gateway"),
                (b"authorization", f"Bearer {h.key}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 80),
        }
        # The first chunk leaves the upstream only once the gateway has heard that
        # its client is gone: the chunk that shows the answer began is the one the
        # gateway stops on.
        gone = asyncio.Event()
        relay = asyncio.create_task(call_app(h.app, scope, body, gone))
        await gone.wait()
        upstream.go.set()
        sent = await relay
        await h.probes.wait_finished(1)
        events = await h.events()
        queries = await today_queries(h)
    assert sent[0]["status"] == 200
    assert len(events) == 1, "an answer the upstream began (and bills the prompt of) is charged"
    assert events[0].estimated
    assert events[0].prompt_tokens >= 20_000 // 4
    assert queries == 1


def test_a_forked_worker_draws_request_ids_of_its_own() -> None:
    # Request ids key the ledger rows of answers whose upstream names no unique id:
    # a worker forked from a parent that had imported the proxy must not repeat
    # the parent's (or a sibling's) ids.
    parent = gateway.proxy.new_request_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write_end, gateway.proxy.new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 200).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    prefix = parent.rpartition("-")[0]
    assert len(prefix) == 24
    assert child.rpartition("-")[0] != prefix
