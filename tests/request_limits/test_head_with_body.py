"""`gateway serve` writes the head of a response that has a length in one write
with its first body piece (HeadWithBodyCycle): the same bytes, in the same order,
one system call fewer per answer; a head whose body does not follow at once
still goes out on the loop's next turn, and streamed heads at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.config import ENV_CONFIG
from gateway.request_limits import protocol
from gateway.request_limits.protocol import HeadWithBodyCycle
from tests.request_limits.test_protocol import PROTOCOL, read_all
from tests.servers import serve

LENGTH = [(b"content-type", b"application/json"), (b"content-length", b"11")]
START = {"type": "http.response.start", "status": 200, "headers": LENGTH}
BODY = {"type": "http.response.body", "body": b'{"ok":true}'}


class Recording:
    """A transport that records what is written to it, and its closing, in order."""

    def __init__(self) -> None:
        self.events: list[bytes | str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.events.append(bytes(data))

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def cycle(transport: Recording, *, keep_alive: bool = True, method: str = "POST") -> Any:
    made = RequestResponseCycle(
        scope={"method": method, "http_version": "1.1"},  # type: ignore[arg-type]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )
    made.__class__ = HeadWithBodyCycle  # as BoundedHeadProtocol does
    return made


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"


async def test_a_head_with_a_length_is_written_with_its_body() -> None:
    transport = Recording()
    c = cycle(transport)
    await c.send(START)
    assert transport.events == []  # held for the body
    await c.send(BODY)
    assert transport.events == [HEAD + b'{"ok":true}']
    assert c.response_complete
    await asyncio.sleep(0)  # the loop turns: nothing more is written
    assert transport.events == [HEAD + b'{"ok":true}']


async def test_a_head_whose_body_does_not_follow_at_once_goes_out_on_the_next_turn() -> None:
    transport = Recording()
    c = cycle(transport)
    await c.send(START)
    await asyncio.sleep(0)  # one turn of the loop
    assert transport.events == [HEAD]
    await c.send({"type": "http.response.body", "body": b'{"ok":', "more_body": True})
    await c.send({"type": "http.response.body", "body": b"true}"})
    assert transport.events == [HEAD, b'{"ok":', b"true}"]


async def test_a_streamed_head_is_written_at_once() -> None:
    transport = Recording()
    c = cycle(transport)
    sse = [(b"content-type", b"text/event-stream")]
    await c.send({"type": "http.response.start", "status": 200, "headers": sse})
    assert transport.events == [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    ]


async def test_an_answer_that_closes_the_connection_is_written_then_closed() -> None:
    transport = Recording()
    c = cycle(transport, keep_alive=False)
    await c.send(START)
    await c.send(BODY)
    assert transport.events == [
        HEAD.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n") + b'{"ok":true}',
        "close",
    ]


async def test_a_head_request_gets_its_head_alone() -> None:
    transport = Recording()
    c = cycle(transport, method="HEAD")
    await c.send(START)
    await c.send({"type": "http.response.body", "body": b""})
    assert transport.events == [HEAD]


async def test_a_client_gone_before_the_head_went_out_is_written_nothing() -> None:
    transport = Recording()
    c = cycle(transport)
    await c.send(START)
    c.disconnected = True  # what uvicorn's connection_lost does
    await asyncio.sleep(0)
    await c.send(BODY)
    assert transport.events == []


async def test_a_body_longer_than_its_length_still_raises_after_the_head_is_written() -> None:
    transport = Recording()
    c = cycle(transport)
    await c.send(START)
    with pytest.raises(RuntimeError, match="longer than Content-Length"):
        await c.send({"type": "http.response.body", "body": b"x" * 12})
    assert transport.events == [HEAD]  # as uvicorn had written it, before its error


@pytest.fixture
def limits_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    config = tmp_path / "gateway.toml"
    config.write_text("[plans.free]\n")
    monkeypatch.setenv(ENV_CONFIG, str(config))
    protocol._configured.cache_clear()
    yield
    protocol._configured.cache_clear()


@pytest.mark.usefixtures("limits_config")
async def test_served_a_held_head_reaches_the_client_before_its_late_body() -> None:
    body_may_go = asyncio.Event()

    async def late(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body", False):
            pass
        await send(START)
        await body_may_go.wait()
        await send(BODY)

    async def quick(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body", False):
            pass
        await send(START)
        await send(BODY)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await (late if scope["path"] == "/late" else quick)(scope, receive, send)

    async with serve(app, http=PROTOCOL) as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")  # the body is not sent yet
            body_may_go.set()
            async with asyncio.timeout(5):
                body = await reader.readexactly(11)
            writer.write(b"GET /quick HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            rest = await read_all(reader)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 11\r\n" in head
    assert body == b'{"ok":true}'
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b'\r\n\r\n{"ok":true}')


@pytest.mark.usefixtures("limits_config")
async def test_served_a_request_pipelined_behind_an_answer_that_closes_is_not_run() -> None:
    """An answer that ends its connection (``Connection: close``: the gateway's
    refusals of a head or a body it cannot trust) is written and closed before
    uvicorn looks for the next pipelined request, which is then never run: its
    answer could not be delivered (a paid one would be charged, unseen)."""
    ran: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        assert type(send.__self__) is HeadWithBodyCycle  # made one as its task started
        while (await receive()).get("more_body", False):
            pass
        close = [(b"connection", b"close")] if scope["path"] == "/refused" else []
        await send({**START, "headers": LENGTH + close})
        await send(BODY)

    async with serve(app, http=PROTOCOL) as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(
                b"GET /refused HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /paid HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            )
            answer = await read_all(reader)
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b'{"ok":true}')
    assert answer.count(b"HTTP/1.1") == 1
    assert ran == ["/refused"]


@pytest.mark.parametrize("ending", ["raises", "returns"])
@pytest.mark.usefixtures("limits_config")
async def test_served_a_held_head_goes_out_when_the_application_ends_without_its_body(
    ending: str,
) -> None:
    """A head held for its body still reaches the client when the application
    fails (or returns) right after sending it, before the loop turns: as uvicorn
    writes it, then cuts the connection (not an empty reply, which a client may
    take for a stale keep-alive connection and send the request again)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body", False):
            pass
        await send(START)
        if ending == "raises":
            raise RuntimeError("a bug after the head")

    async with serve(app, http=PROTOCOL) as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await read_all(reader)
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(
        b"content-length: 11\r\n\r\n"
    )
