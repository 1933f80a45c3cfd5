"""Request heads and bodies are bounded: too many or too large headers get 431, a
body promised and not sent gets 408, in the upstream's error shape. Raw sockets
against a real uvicorn server, since HTTP clients will not send such requests."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from gateway.fake_upstream import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway

TODAY = datetime.now(UTC).date()


async def exchange(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """Send ``head`` and ``body`` on a fresh connection, read until the server
    closes it; returns the status, the headers and the JSON body."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()  # to EOF: the refusal closes the connection
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.decode().partition(":") for line in header_block.split(b"\r\n"))
    )
    return int(status_line.split()[1]), headers, orjson.loads(payload)


def head(h: Harness, path: str, *lines: str) -> bytes:
    base = [f"POST {path} HTTP/1.1", "Host: gateway", f"Authorization: Bearer {h.key}"]
    return "".join(f"{line}\r\n" for line in [*base, *lines]).encode()


async def queries_today(h: Harness) -> int:
    rows = await h.storage.daily(TODAY, TODAY, user_id=USER)
    return sum(r.queries for r in rows)


SETTINGS: dict[str, Any] = {"server": {"body_timeout": 0.3, "max_headers": 20}}


async def test_a_json_body_never_sent_is_answered_408(database_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, fake=fake, settings=SETTINGS) as h:
        status, headers, body = await exchange(
            h.url,
            head(h, "/v1/chat-messages", "Content-Type: application/json", "Content-Length: 500"),
            b'{"query": "hi", ',
        )
        await h.gateway.wait_finished(1)
        spent = await queries_today(h)
        timeouts = h.gateway.metrics.get("gateway_refusals_total", code="request_timeout")
    assert status == 408
    assert headers["connection"] == "close"
    assert body == {
        "code": "request_timeout",
        "message": "The request body was not received within 0.3 seconds.",
        "status": 408,
    }
    assert fake.hits("/chat-messages") == 0
    assert spent == 0
    assert timeouts == 1


async def test_an_upload_that_stalls_is_answered_408_and_costs_nothing(
    sqlite_url: str,
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=SETTINGS) as h:
        part = (
            b"--b\r\nContent-Disposition: form-data; name=file; filename=a.txt\r\n"
            b"Content-Type: text/plain\r\n\r\n" + b"x" * 1000
        )
        status, _, body = await exchange(
            h.url,
            head(
                h,
                "/v1/files/upload",
                "Content-Type: multipart/form-data; boundary=b",
                "Content-Length: 100000",
            ),
            part,
        )
        await h.gateway.wait_finished(1)
        uploads = sum(r.uploads for r in await h.storage.daily(TODAY, TODAY, user_id=USER))
    assert (status, body["code"]) == (408, "request_timeout")
    assert uploads == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([f"X-Filler-{i}: {i}" for i in range(20)], "The request has more than 20 headers."),
        ([f"X-Big: {'a' * 40_000}"], "The request headers exceed 32768 bytes."),
    ],
    ids=["count", "bytes"],
)
async def test_too_many_or_too_large_headers_are_answered_431(
    sqlite_url: str, extra: list[str], message: str
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=SETTINGS) as h:
        status, headers, body = await exchange(
            h.url, head(h, "/v1/chat-messages", "Content-Length: 0", *extra)
        )
        spent = await queries_today(h)
    assert status == 431
    assert headers["connection"] == "close"
    assert body == {"code": "headers_too_large", "message": message, "status": 431}
    assert fake.hits("/chat-messages") == 0
    assert spent == 0


async def test_a_body_within_the_deadline_goes_through(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=SETTINGS) as h:
        payload = orjson.dumps({"query": "hi", "inputs": {}, "response_mode": "blocking"})
        reader, writer = await asyncio.open_connection(
            urlsplit(h.url).hostname, urlsplit(h.url).port
        )
        try:
            writer.write(
                head(
                    h,
                    "/v1/chat-messages",
                    "Content-Type: application/json",
                    f"Content-Length: {len(payload)}",
                    "Connection: close",
                )
                + b"\r\n"
                + payload
            )
            async with asyncio.timeout(10):
                data = await reader.read()
        finally:
            writer.close()
        await h.gateway.wait_finished(1)
    assert data.startswith(b"HTTP/1.1 200")
    assert fake.hits("/chat-messages") == 1
