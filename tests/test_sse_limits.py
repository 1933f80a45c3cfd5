"""An upstream SSE line with no end, or an event past upstream.max_event_bytes, costs
linear time, ends the answer as an upstream error, and is still charged."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from gateway.sse import DEFAULT_MAX_EVENT_BYTES, EventTooLarge, ServerSentEvent, SSEDecoder
from tests.harness import USER, running_gateway
from tests.servers import read_body
from tests.upstreams.test_openai_sdk import PRICES


def test_a_long_line_costs_linear_time() -> None:
    # 7.5 MB in 2 KB chunks: re-scanning the held line for every chunk copies and
    # searches about 15 GB (seconds); buffering it in pieces, a few milliseconds.
    # Shown, not timed: each chunk is held as it came, not joined to what was held.
    decoder = SSEDecoder()
    chunks = [b"x" * 2048 for _ in range(7_500_000 // 2048)]
    decoder.feed(b"data: ")
    for chunk in chunks:
        assert decoder.feed(chunk) == []
    assert all(held is chunk for held, chunk in zip(decoder._buf[1:], chunks, strict=True))
    (event,) = decoder.feed(b"\n\n")
    assert len(event.data) == 7_500_000 // len(chunk) * len(chunk)


def test_a_line_past_the_cap_is_refused() -> None:
    decoder = SSEDecoder(max_event_bytes=10_000)
    assert decoder.feed(b"data: a\n\ndata: ") == [ServerSentEvent("message", "a")]
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            decoder.feed(b"y" * 1000)
    assert decoder.flush() == []  # the overlong line is dropped


def test_an_event_past_the_cap_is_refused_with_the_events_before_it() -> None:
    decoder = SSEDecoder(max_event_bytes=10_000)
    many_lines = b"".join(b"data: " + b"z" * 900 + b"\n" for _ in range(20))
    with pytest.raises(EventTooLarge) as caught:
        decoder.feed(b"data: usage\n\n" + many_lines + b"\n")
    assert caught.value.events == [ServerSentEvent("message", "usage")]
    # One complete line longer than the cap, in one chunk.
    with pytest.raises(EventTooLarge):
        decoder.feed(b"data: " + b"w" * 20_000 + b"\n\n")
    # The decoder still reads what follows.
    assert decoder.feed(b"data: next\n\n") == [ServerSentEvent("message", "next")]


def test_events_under_the_cap_pass() -> None:
    decoder = SSEDecoder(max_event_bytes=DEFAULT_MAX_EVENT_BYTES)
    data = b"q" * (DEFAULT_MAX_EVENT_BYTES - 100)
    (event,) = decoder.feed(b"data: " + data + b"\n\n")
    assert len(event.data) == len(data)


class EndlessLine:
    """A Dify upstream whose answer starts, then sends one line with no end, and
    then holds the connection open."""

    def __init__(self, line_bytes: int) -> None:
        self.line_bytes = line_bytes
        self.stops = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        if scope["path"].endswith("/stop"):
            self.stops += 1
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'{"result":"success"}'})
            return
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        first = {
            "event": "message",
            "task_id": "t1",
            "message_id": "m1",
            "conversation_id": "c1",
            "answer": "Hello there, " * 10,
        }
        body = b"data: " + orjson.dumps(first) + b"\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await send(
            {
                "type": "http.response.body",
                "body": b'data: {"event": "message", "answer": "',
                "more_body": True,
            }
        )
        chunk = b"a" * 65536
        for _ in range(self.line_bytes // len(chunk)):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # Held open: only the gateway can end it (by closing the connection).
        while (await receive())["type"] != "http.disconnect":
            pass


async def test_an_endless_line_ends_the_answer_with_an_error_and_is_charged(
    sqlite_url: str,
) -> None:
    upstream = EndlessLine(line_bytes=8 * 1024 * 1024)
    settings = {"upstream": {"max_event_bytes": 1024 * 1024}}
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        body = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
        # The upstream holds its answer open: only the gateway can end it.
        async with httpx.AsyncClient(timeout=20) as client:
            reply = await client.post(f"{h.url}/v1/chat-messages", json=body, headers=h.auth())
        await h.probes.wait_finished(1)
        await h.gateway.idle()
        (event,) = await h.events()
        errors = h.gateway.metrics.get("gateway_upstream_errors_total", kind="event_too_large")
    assert reply.status_code == 200
    # The answer ended with an SSE error event in Dify's shape.
    last = reply.content.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    assert last.startswith(b"data: ")
    error = orjson.loads(last[len(b"data: ") :])
    assert (error["code"], error["status"]) == ("upstream_error", 502)
    assert len(reply.content) < 2 * 1024 * 1024  # not the whole endless line
    # Charged: the text that came, estimated.
    assert (event.user_id, event.outcome, event.estimated) == (USER, "cut", True)
    assert event.completion_tokens > 0 and event.answer_id == "m1"
    assert errors == 1
    assert upstream.stops == 1  # the upstream was asked to stop generating


class EndlessOpenAILine:
    """An OpenAI-compatible upstream: a first chunk, then a line with no end."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        first = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": "Hello there, " * 10}}],
        }
        body = b"data: " + orjson.dumps(first) + b"\n\ndata: {"
        await send({"type": "http.response.body", "body": body, "more_body": True})
        for _ in range(8 * 16):
            await send({"type": "http.response.body", "body": b"b" * 65536, "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass


async def test_an_endless_line_from_an_openai_upstream_is_cut_and_charged(
    sqlite_url: str,
) -> None:
    settings = {
        "upstream": {"kind": "openai", "max_event_bytes": 1024 * 1024},
        "prices": PRICES,
    }
    async with running_gateway(sqlite_url, upstream=EndlessOpenAILine(), settings=settings) as h:
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        async with httpx.AsyncClient(timeout=20) as client:
            reply = await client.post(f"{h.url}/v1/chat/completions", json=body, headers=h.auth())
        await h.probes.wait_finished(1)
        await h.gateway.idle()
        (event,) = await h.events()
    assert reply.status_code == 200
    last = reply.content.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    error = orjson.loads(last[len(b"data: ") :])["error"]
    assert (error["code"], error["type"]) == ("upstream_error", "server_error")
    # The client got the first chunk, not the endless line (held back by the
    # transform that hides the usage chunk, then dropped).
    assert b"bbbb" not in reply.content and b"Hello there" in reply.content
    assert (event.user_id, event.outcome, event.estimated) == (USER, "cut", True)
    assert event.completion_tokens > 0 and event.cost > 0
