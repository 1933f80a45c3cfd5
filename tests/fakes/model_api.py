"""What the fake OpenAI and Anthropic APIs share: recording each request, JSON and
SSE answers, and streaming a list of events with the scenarios both play.

A streamed answer stops being generated when its client closes the connection (as
both vendors' do); ``closed`` counts such answers. The scenarios
(``x-fake-scenario``, comma-separated): ``cut`` drops the connection before the
event that would carry the usage, ``error_midstream`` sends the vendor's error
event after the first piece of text and ends, ``hold`` pauses after the first
piece until the client closes the connection or `release_held` is called.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.demo_upstream import JSON_HEADERS, SSE_HEADERS, response_headers
from gateway.types import Receive, Scope, Send

JSON = dict[str, Any]

ANSWER_PIECES: Final = ("Xin chào", "!", " Tôi", " có thể", " giúp", " gì", "?")


class Cut(Exception):
    """Raised on purpose (scenario "cut") so uvicorn aborts the connection mid-body."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str  # without any /v1 prefix
    headers: dict[str, str]
    json: Any
    raw: bytes = b""  # the body as received


async def send_json(send: Send, status: int, body: bytes) -> None:
    start = {"type": "http.response.start", "status": status}
    await send(start | {"headers": response_headers(JSON_HEADERS, len(body))})
    await send({"type": "http.response.body", "body": body})


def data(obj: JSON) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def event(kind: str, obj: JSON) -> bytes:
    return b"event: " + kind.encode() + b"\n" + data(obj)


def scenario(headers: dict[str, str]) -> frozenset[str]:
    return frozenset(filter(None, headers.get("x-fake-scenario", "").split(",")))


async def _closed(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class FakeModelAPI:
    """The state and the plumbing of one fake vendor API."""

    def __init__(self, *, api_key: str, models: tuple[str, ...]) -> None:
        self.api_key = api_key
        self.models = models
        self.requests: list[RecordedRequest] = []
        self.sent: list[bytes] = []  # each streamed answer's body, as sent
        self.closed = 0  # streamed answers whose client closed the connection mid-answer
        self.closed_event = asyncio.Event()
        self._release = asyncio.Event()
        self._ids = itertools.count(1)

    def release_held(self) -> None:
        self._release.set()

    async def held(self, receive: Receive) -> None:
        """Wait until `release_held` is called or the client closes the connection."""
        gone = asyncio.ensure_future(_closed(receive))
        released = asyncio.ensure_future(self._release.wait())
        try:
            await asyncio.wait({gone, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            released.cancel()

    async def record(self, scope: Scope, receive: Receive) -> tuple[str, dict[str, str], Any]:
        """Read a request and record it: its path without /v1, headers, parsed body."""
        path = scope["path"].removeprefix("/v1")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        raw = bytearray()
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(RecordedRequest(scope["method"], path, headers, body, bytes(raw)))
        return path, headers, body

    async def stream(
        self,
        events: list[bytes],
        receive: Receive,
        send: Send,
        *,
        headers: dict[str, str],
        after: int,
        cut: int,
        error: bytes,
    ) -> None:
        """Send ``events`` as an SSE answer, ``x-fake-delay-ms`` apart; the scenarios
        act after event ``after`` (hold, error_midstream: ``error`` is sent) or drop
        the connection before event ``cut`` (cut)."""
        playing = scenario(headers)
        delay = int(headers.get("x-fake-delay-ms", "0")) / 1000
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        sent = bytearray()
        self.sent.append(b"")
        gone = asyncio.ensure_future(_closed(receive))
        try:
            for i, item in enumerate(events):
                if "cut" in playing and i >= cut:
                    raise Cut("scenario cut: the connection drops before the usage")
                if i and delay:
                    await asyncio.wait({gone}, timeout=delay)
                if gone.done():
                    # The client closed the stream: the answer stops.
                    self.closed += 1
                    self.closed_event.set()
                    return
                sent += item
                self.sent[-1] = bytes(sent)
                await send({"type": "http.response.body", "body": item, "more_body": True})
                if i == after and "error_midstream" in playing:
                    await send({"type": "http.response.body", "body": error})
                    return
                if i == after and "hold" in playing:
                    released = asyncio.ensure_future(self._release.wait())
                    await asyncio.wait({gone, released}, return_when=asyncio.FIRST_COMPLETED)
                    released.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
