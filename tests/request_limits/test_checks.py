"""Request heads and bodies are bounded: too many or too large headers get 431, a
body promised and not sent gets 408, in the upstream's error shape. Raw sockets
against a real uvicorn server, since HTTP clients will not send such requests."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from gateway.config import ENV_CONFIG
from gateway.request_limits import protocol
from gateway.request_limits.checks import BodyDeadline
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway
from tests.servers import free_port, serve, start_gateway

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
        await h.probes.wait_finished(1)
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
        await h.probes.wait_finished(1)
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
        await h.probes.wait_finished(1)
    assert data.startswith(b"HTTP/1.1 200")
    assert fake.hits("/chat-messages") == 1


# --- the head bounded while it arrives (gateway serve's protocol) -----------------


async def echo_head_size(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the size of the headers it was given, after the whole body."""
    while (await receive()).get("more_body", False):
        pass
    body = str(sum(len(k) + len(v) for k, v in scope["headers"])).encode()
    length = str(len(body)).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]}
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def head_limit_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A configuration file for the protocol to read, as a `gateway serve` worker does."""
    config = tmp_path / "gateway.toml"
    config.write_text("[server]\nmax_header_bytes = 1000\n\n[plans.free]\n")
    monkeypatch.setenv(ENV_CONFIG, str(config))
    protocol._configured.cache_clear()
    yield
    protocol._configured.cache_clear()


PROTOCOL = "gateway.request_limits.protocol:BoundedHeadProtocol"


@pytest.mark.usefixtures("head_limit_config")
async def test_a_head_growing_without_end_is_cut_off_early() -> None:
    async with serve(echo_head_size, http=PROTOCOL) as url:
        data, sent = await flood_head(urlsplit(url).port or 0)
    assert_refused_head(data, 1000)
    assert sent < FLOOD_BOUND  # refused while the head was still coming


@pytest.mark.usefixtures("head_limit_config")
async def test_heads_within_the_limit_are_served_with_any_body_and_on_keep_alive() -> None:
    body = b"x" * 200_000  # arrives in the same reads as the head
    request = (
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 900 + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    async with serve(echo_head_size, http=PROTOCOL) as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            answers = []
            for _ in range(12):  # together far over the limit: each head counts alone
                writer.write(request)
                async with asyncio.timeout(10):
                    answers.append(await reader.readuntil(b"\r\n\r\n"))
                    length = int(
                        answers[-1].lower().split(b"content-length: ")[1].split(b"\r\n")[0]
                    )
                    await reader.readexactly(length)
        finally:
            writer.close()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)


# What a client can have sent when the refusal reaches it: the kernel's socket
# buffers on both sides (several MB on loopback) and the refusing side's linger.
FLOOD_BOUND = 16 * 1024 * 1024


def assert_refused_head(data: bytes, limit: int) -> None:
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2]) == {
        "code": "headers_too_large",
        "message": f"The request headers exceed {limit} bytes.",
        "status": 431,
    }


def _flood_head_blocking(port: int) -> tuple[bytes, int]:
    """Send a head that never ends, as a client would: checking before every write
    whether an answer has come, and reading what came even when a write fails
    (the refusing side may reset the connection once it stops reading; what it
    sent before stays readable)."""
    sent = 0
    data = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat-messages HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 65536
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except OSError:  # reset or closed by the server: read what it said
                break
            sent += len(chunk)
        with contextlib.suppress(OSError):
            while piece := sock.recv(65536):
                data += piece
    return bytes(data), sent


async def flood_head(port: int) -> tuple[bytes, int]:
    """Send a head that never ends; returns the answer and how much was sent
    before it came."""
    return await asyncio.to_thread(_flood_head_blocking, port)


async def test_gateway_serve_cuts_off_an_endless_head(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[server]\nmax_header_bytes = 2000\nreload_interval = 0\n\n"
        f'[database]\nurl = "sqlite:///{tmp_path}/gateway.db"\nspool_file = ""\n\n[plans.free]\n'
    )
    # Two workers: each is a spawned process that finds the limit in the configuration.
    proc = await start_gateway(config, port, workers=2)
    try:
        data, sent = await flood_head(port)
    finally:
        proc.terminate()
        await proc.wait()
    assert_refused_head(data, 2000)
    assert sent < FLOOD_BOUND


# --- the deadline's timer, only for a receive that waits (issue 24) ---------------


def _deadline(receive: Any, sent: list[Any], timeout: float = 0.05) -> BodyDeadline:
    async def send(message: Any) -> None:
        sent.append(message)

    return BodyDeadline(receive, send, timeout=timeout, error_body=lambda *_: b"{}")


async def test_a_body_the_server_has_is_taken_without_arming_a_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    armed: list[float] = []
    real = asyncio.timeout

    def timeout(delay: float) -> Any:
        armed.append(delay)
        return real(delay)

    monkeypatch.setattr(asyncio, "timeout", timeout)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    deadline = _deadline(receive, [])
    assert (await deadline.receive())["body"] == b"{}"
    assert armed == []  # on main: [0.05], a timer per receive
    assert deadline.body_done


async def test_a_receive_that_waits_gets_its_message_or_the_408() -> None:
    arrived = asyncio.Event()

    async def late() -> dict[str, Any]:
        await arrived.wait()
        await asyncio.sleep(0)  # (a second wait, after the first resumed)
        return {"type": "http.request", "body": b"late", "more_body": False}

    deadline = _deadline(late, [])
    waiting = asyncio.ensure_future(deadline.receive())
    await asyncio.sleep(0)
    arrived.set()
    assert (await waiting)["body"] == b"late"
    assert deadline.body_done

    sent: list[Any] = []
    silent = _deadline(asyncio.Event().wait, sent)
    assert await silent.receive() == {"type": "http.disconnect"}
    assert sent[0]["status"] == 408
    assert not silent.body_done
    assert await silent.receive() == {"type": "http.disconnect"}  # gone


async def test_a_receive_that_waits_is_cancelled_with_its_task() -> None:
    stopped = asyncio.Event()

    async def receive() -> dict[str, Any]:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
        raise AssertionError("not reached")

    deadline = _deadline(receive, [], timeout=3600)  # not what ends it here
    task = asyncio.ensure_future(deadline.receive())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stopped.is_set()  # the server's receive saw the cancellation


class _IterAwaitable:
    """An awaitable whose ``__await__`` is a plain iterator (``__next__`` only,
    no ``send``/``throw``), as PEP 492 allows and ``await`` takes: the shape of
    Granian's receive."""

    def __init__(self, message: dict[str, Any], waits: int) -> None:
        self.message = message
        self.waits = waits

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        if self.waits:
            self.waits -= 1
            return None  # a bare yield: the task steps it again
        raise StopIteration(self.message)


@pytest.mark.parametrize("waits", [0, 2])
async def test_a_receive_whose_await_is_a_plain_iterator_is_awaited(waits: int) -> None:
    """Review 7, R7-2: the receive was stepped by hand with ``send``, which such
    an awaitable has not: every body failed with an AttributeError, a 500."""
    message = {"type": "http.request", "body": b"z", "more_body": False}
    deadline = _deadline(lambda: _IterAwaitable(message, waits), [], timeout=3600)
    assert await deadline.receive() == message
    assert deadline.body_done


async def test_a_plain_iterator_receive_that_never_ends_is_answered_408() -> None:
    sent: list[Any] = []
    message = {"type": "http.request", "body": b"z", "more_body": False}
    deadline = _deadline(lambda: _IterAwaitable(message, 10**9), sent, timeout=0.01)
    assert await deadline.receive() == {"type": "http.disconnect"}
    assert sent[0]["status"] == 408
