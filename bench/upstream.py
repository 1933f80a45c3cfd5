"""A fast fake Dify upstream: a hand-written asyncio protocol on uvloop + httptools.

Every ``POST .../chat-messages`` gets a streamed chat answer in Dify's wire format
(docs/upstreams/dify.md, "Example"): ``events`` ``message`` events of 40
bytes of answer text each, then ``message_end`` with ``metadata.usage`` (compact
JSON), each event its own HTTP chunk and its own write. The first event goes out
with the response head; the others follow ``delay_ms`` apart (0: one event per
turn of the event loop, so events still leave as separate writes, as they do
from Dify).

``POST .../chat/completions`` gets a streamed chat completion in OpenAI's format
instead (docs/upstreams/openai.md): ``events`` chunks of 40 bytes of content each,
the finish chunk, the usage-only chunk when the body asks for
``stream_options.include_usage``, then ``data: [DONE]``; ids unique per answer.
Without ``"stream": true`` in the body it gets the same answer as one JSON
``chat.completion`` (content-length, usage included), as OpenAI does.

A request can override the defaults with ``x-bench-events`` and
``x-bench-delay-ms``; all three proxies forward those headers unchanged, so one
upstream serves every phase of the benchmark.

Message, task and conversation ids are unique per answer (a random prefix per
process and a counter): the gateway settles each answer once per message id.

Several processes can serve one port (``SO_REUSEPORT``): the kernel spreads
connections across them, so the upstream outruns any single-worker proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import time
from collections import deque
from pathlib import Path
from typing import cast

import httptools
import uvloop

ANSWER_TEXT = b"Lorem ipsum dolor sit amet, consectetur "  # 40 bytes
# Dify's usage object, compact (newer builds); prices are decimal strings.
USAGE = (
    b'{"prompt_tokens":1033,"prompt_unit_price":"0.001","prompt_price_unit":"0.001",'
    b'"prompt_price":"0.0010330","completion_tokens":135,"completion_unit_price":"0.002",'
    b'"completion_price_unit":"0.001","completion_price":"0.0002700","total_tokens":1168,'
    b'"total_price":"0.0013030","currency":"USD","latency":1.38}'
)
_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)
_NOT_FOUND_BODY = b'{"code":"not_found","message":"The requested URL was not found.","status":404}'
_NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_NOT_FOUND_BODY), _NOT_FOUND_BODY)
)
_LAST_CHUNK = b"0\r\n\r\n"
_PREFIX = os.urandom(4).hex().encode()


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _Ids:
    """Unique ids per answer, shaped like Dify's UUIDs."""

    def __init__(self) -> None:
        self._n = 0

    def next(self) -> tuple[bytes, bytes, bytes]:
        self._n += 1
        n = self._n
        return (
            b"%s-0000-4000-8000-%012x" % (_PREFIX, n),  # message
            b"%s-0001-4000-8000-%012x" % (_PREFIX, n),  # conversation
            b"%s-0002-4000-8000-%012x" % (_PREFIX, n),  # task
        )


_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
OPENAI_USAGE = (
    b'{"prompt_tokens":1033,"completion_tokens":135,"total_tokens":1168,'
    b'"prompt_tokens_details":{"cached_tokens":512,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":64,"audio_tokens":0}}'
)


def openai_chunks(ids: tuple[bytes, bytes, bytes], *, usage: bool) -> tuple[bytes, bytes]:
    """One chat completion's content chunk (sent N times) and its closing chunks."""
    envelope = (
        b'"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,"model":"gpt-4o-mini"'
        % (
            ids[0],
            int(time.time()),
        )
    )
    message = (
        b'data: {%s,"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]%s}\n\n'
        % (
            envelope,
            ANSWER_TEXT,
            b',"usage":null' if usage else b"",
        )
    )
    end = _chunk(
        b'data: {%s,"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]%s}\n\n'
        % (envelope, b',"usage":null' if usage else b"")
    )
    if usage:
        end += _chunk(b'data: {%s,"choices":[],"usage":%s}\n\n' % (envelope, OPENAI_USAGE))
    return _chunk(message), end + _chunk(b"data: [DONE]\n\n")


def openai_completion(ids: tuple[bytes, bytes, bytes], events: int) -> bytes:
    """A whole non-streamed chat completion: the response head and its JSON body, the
    content being the ``events`` pieces of a streamed one joined."""
    body = (
        b'{"id":"chatcmpl-%s","object":"chat.completion","created":%d,"model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"%s"},'
        b'"finish_reason":"stop"}],"usage":%s}'
        % (ids[0], int(time.time()), ANSWER_TEXT * events, OPENAI_USAGE)
    )
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def answer_chunks(ids: tuple[bytes, bytes, bytes]) -> tuple[bytes, bytes]:
    """One answer's ``message`` chunk (sent N times) and its ``message_end`` chunk."""
    message_id, conversation_id, task_id = ids
    envelope = (
        b'"conversation_id":"%s","message_id":"%s","created_at":%d,"task_id":"%s","id":"%s"'
        % (
            conversation_id,
            message_id,
            int(time.time()),
            task_id,
            message_id,
        )
    )
    message = b'data: {"event":"message",%s,"answer":"%s"}\n\n' % (envelope, ANSWER_TEXT)
    end = (
        b'data: {"event":"message_end",%s,"metadata":{"usage":%s,"retriever_resources":[]},'
        b'"files":null}\n\n' % (envelope, USAGE)
    )
    return _chunk(message), _chunk(end)


class _Request:
    __slots__ = ("blocking", "delay", "events", "keep_alive", "openai", "stream", "usage")

    def __init__(
        self,
        *,
        stream: bool,
        events: int,
        delay: float,
        keep_alive: bool,
        openai: bool = False,
        usage: bool = False,
        blocking: bool = False,
    ) -> None:
        self.stream = stream
        self.blocking = blocking
        self.events = events
        self.delay = delay
        self.keep_alive = keep_alive
        self.openai = openai
        self.usage = usage


class _Connection(asyncio.Protocol):
    """One client connection: requests answered in order, one at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ids: _Ids, events: int, delay: float):
        self._loop = loop
        self._ids = ids
        self._default_events = events
        self._default_delay = delay
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[_Request] = deque()
        self._busy = False
        self._timer: asyncio.Handle | None = None
        # Per request being parsed.
        self._url = b""
        self._body = b""
        self._events = events
        self._delay = delay
        # Per answer being streamed.
        self._current: _Request | None = None
        self._left = 0
        self._message = b""
        self._end = b""

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._body = b""
        self._events = self._default_events
        self._delay = self._default_delay

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"x-bench-events":
            self._events = max(0, int(value))
        elif name == b"x-bench-delay-ms":
            self._delay = max(0.0, float(value) / 1000)

    def on_message_complete(self) -> None:
        path = self._url.split(b"?", 1)[0]
        post = self._parser.get_method() == b"POST"
        openai = post and path.endswith(b"/chat/completions")
        stream = openai or (post and path.endswith(b"/chat-messages"))
        self._queue.append(
            _Request(
                stream=stream,
                events=self._events,
                delay=self._delay,
                keep_alive=self._parser.should_keep_alive(),
                openai=openai,
                usage=openai and _INCLUDE_USAGE.search(self._body) is not None,
                blocking=openai and _STREAM_TRUE.search(self._body) is None,
            )
        )
        if not self._busy:
            self._next()

    # --- answering ----------------------------------------------------------------------

    def _next(self) -> None:
        transport = self._transport
        if transport is None or not self._queue:
            self._busy = False
            return
        self._busy = True
        request = self._queue.popleft()
        if not request.stream:
            transport.write(_NOT_FOUND)
            self._done(request)
            return
        if request.blocking:
            transport.write(openai_completion(self._ids.next(), request.events))
            self._done(request)
            return
        self._current = request
        if request.openai:
            self._message, self._end = openai_chunks(self._ids.next(), usage=request.usage)
        else:
            self._message, self._end = answer_chunks(self._ids.next())
        self._left = request.events
        if self._left:
            self._left -= 1
            transport.write(_HEAD + self._message)
        else:
            transport.write(_HEAD)
        self._schedule()

    def _schedule(self) -> None:
        assert self._current is not None
        if self._current.delay:
            self._timer = self._loop.call_later(self._current.delay, self._step)
        else:
            self._timer = self._loop.call_soon(self._step)

    def _step(self) -> None:
        self._timer = None
        transport = self._transport
        request = self._current
        if transport is None or request is None:
            return
        if self._left:
            self._left -= 1
            transport.write(self._message)
            self._schedule()
            return
        transport.write(self._end + _LAST_CHUNK)
        self._current = None
        self._done(request)

    def _done(self, request: _Request) -> None:
        if not request.keep_alive and self._transport is not None:
            self._transport.close()
            return
        self._next()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(
    host: str, port: int, *, events: int, delay: float, ready_file: Path | None = None
) -> None:
    loop = asyncio.get_running_loop()
    ids = _Ids()
    server = await loop.create_server(
        lambda: _Connection(loop, ids, events, delay), sock=_listen(host, port), backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, str(os.getpid()))
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=20, help="message events per answer")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause between events")
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args()
    uvloop.run(
        serve(
            args.host,
            args.port,
            events=args.events,
            delay=args.delay_ms / 1000,
            ready_file=args.ready_file,
        )
    )


if __name__ == "__main__":
    main()
