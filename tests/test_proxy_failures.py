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
from tests.servers import read_body, serve

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


class _RunFailsAfterItsModel:
    """A Dify chatflow whose LLM node runs (1,000 tokens, 0.5 USD billed), then a
    later node fails. Streamed: the node's usage, then an ``error`` event.
    Blocking: Dify raises the run's error - ``status``, with ``body`` (its own
    error shape, or a proxy's error page in front of it)."""

    def __init__(self, status: int = 500, body: bytes | None = None) -> None:
        self.status = status
        self.body = body or orjson.dumps(
            {"code": "internal_server_error", "message": "Code node failed", "status": 500}
        )
        self.answers = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        self.answers += 1
        if orjson.loads(body).get("response_mode") != "streaming":
            head = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": self.status, "headers": head})
            await send({"type": "http.response.body", "body": self.body})
            return
        ids = {"task_id": "t-1", "workflow_run_id": "run-1", "conversation_id": "c-1"}
        usage = {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1000}
        node = {
            "node_type": "llm",
            "status": "succeeded",
            "outputs": {"usage": usage},
            "execution_metadata": {"total_tokens": 1000, "total_price": "0.5", "currency": "USD"},
        }
        events = [
            {"event": "workflow_started", **ids, "message_id": "m-1", "data": {"id": "run-1"}},
            {"event": "node_finished", **ids, "data": node},
            {"event": "error", **ids, "message_id": "m-1", "status": 500,
             "code": "internal_server_error", "message": "Code node failed"},
        ]  # fmt: skip
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for event in events:
            chunk = b"data: " + orjson.dumps(event) + b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _ask(h: Harness, mode: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post(
            "/v1/chat-messages",
            json={"query": "hi", "inputs": {}, "response_mode": mode},
            headers=h.auth(),
        )


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
async def test_a_run_that_fails_after_its_model_ran_is_charged_however_it_was_asked(
    database_url: str, mode: str
) -> None:
    """Attack: a chatflow that can fail after its LLM node (a code node parsing
    the model's output, steered to break it) asked for ``blocking``. Dify then
    answers the run's error as HTTP 500 with no usage; the gateway took every
    HTTP error for "nothing generated" and gave the query back, so the run was
    free - streamed, the same run is charged its node's usage. Now the query
    stays spent and the prompt's estimate is charged (outcome ``error``)."""
    upstream = _RunFailsAfterItsModel()
    async with running_gateway(database_url, upstream=upstream) as h:
        answer = await _ask(h, mode)
        await h.probes.wait_finished(1)
        events = await h.events()
        queries = await today_queries(h)
    assert upstream.answers == 1
    (event,) = events
    assert queries == 1 and event.total_tokens > 0
    if mode == "blocking":
        assert answer.status_code == 500
        assert answer.json()["code"] == "internal_server_error"  # relayed unchanged
        assert event.outcome == "error" and event.estimated


async def test_an_error_too_large_to_read_is_charged_and_relayed_whole(sqlite_url: str) -> None:
    """A blocking answer's error body past the 64 KiB the gateway reads to tell
    whether the run began: charged (the prompt's estimate), and relayed whole -
    what was read, then the rest as it comes."""
    body = b'{"code": "internal_server_error", "message": "' + b"x" * 100_000 + b'"}'
    upstream = _RunFailsAfterItsModel(500, body)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        answer = await _ask(h, "blocking")
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert (answer.status_code, answer.content) == (500, body)
    assert event.outcome == "error" and event.estimated


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b'{"code": "invalid_param", "message": "query is required", "status": 400}'),
        (400, b'{"code": "provider_quota_exceeded", "message": "quota", "status": 400}'),
        (502, b"<html><body>502 Bad Gateway</body></html>"),
        (500, b"not json"),
    ],
    ids=["invalid-param", "provider-quota", "proxy-page", "unreadable"],
)
async def test_an_error_before_the_run_began_gives_the_query_back(
    sqlite_url: str, status: int, body: bytes
) -> None:
    """A blocking request Dify refuses before running anything (a parameter, the
    app's provider), or an error page of a proxy in front of Dify: nothing was
    generated, the query is given back and nothing recorded; the error reaches
    the client unchanged."""
    upstream = _RunFailsAfterItsModel(status, body)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        answer = await _ask(h, "blocking")
        await h.probes.wait_finished(1)
        events = await h.events()
        queries = await today_queries(h)
    assert (answer.status_code, answer.content) == (status, body)
    assert events == [] and queries == 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"code": "completion_request_error", "message": "timeout", "status": 400}',
        b'{"code": "invalid_param", "message": "Run failed: Code node failed", "status": 400}',
    ],
    ids=["model-failed", "chatflow-run-failed"],
)
async def test_a_400_after_the_run_began_is_charged(sqlite_url: str, body: bytes) -> None:
    """Dify's ``completion_request_error`` (the model call failed, maybe after
    it generated, and billed, part of the answer) and a chatflow's failed run,
    which Dify 1.x answers 400 ``invalid_param`` "Run failed: ..." (a later
    node failed after its LLM nodes ran: from a review, the first fix missed
    it): charged the prompt's estimate."""
    upstream = _RunFailsAfterItsModel(400, body)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        answer = await _ask(h, "blocking")
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        queries = await today_queries(h)
    assert answer.status_code == 400 and answer.content == body
    assert queries == 1 and event.outcome == "error" and event.estimated
