"""uvicorn's httptools protocol with bounds on the request head and on connections,
for `gateway serve`.

httptools keeps every byte of an unfinished head in memory, without limit (a
20 MB header is taken whole), and the gateway's own header check (gateway/request_limits/checks.py)
can only look at a head once it is complete. This protocol counts the bytes of the
head as they arrive and, once an unfinished head passes ``server.max_header_bytes``
(plus room for the request line), answers 431 in the upstream's error shape and
closes the connection, so no client can make a worker hold more than that.

Nor does uvicorn time out a head: a connection that sends nothing, or a head a
byte at a time, is held for ever (its keep-alive timeout runs only between
requests, and any byte stops it). So the whole head must arrive within
``server.head_timeout`` seconds of the connection (or, on a kept-alive
connection, of its first byte): else the client gets 408, or, if it sent
nothing, the connection is closed. And a worker holds at most
``server.max_connections`` connections: one past it is answered 503 and closed at
once, with a warning in the log, so a flood of connections cannot take the file
descriptors the worker needs for its upstream and database connections. (uvicorn's
own ``limit_concurrency`` does not do this: it answers 503 only once a request's
head is complete, so idle connections still pile up, and in plain text.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import functools
import logging
import resource
import struct
import termios
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.types import Message

# Room for the request line and the header framing beside the header bytes.
REQUEST_LINE_ALLOWANCE = 8192
# After the refusal, what the client still sends is read and dropped for a while
# before the connection is closed: closing with unread data resets the connection,
# and a reset can destroy the refusal before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


# File descriptors a worker keeps for itself beside its connections: the database
# pool's are added, and the rest (log files, the metrics directory, the listening
# socket, the event loop) fit in this.
FD_RESERVE = 64
# While connections are being refused, a warning at most this often.
CAP_WARNING_INTERVAL = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class HeadSettings:
    head_limit: int  # bytes of an unfinished head, with the request line
    refusal: bytes  # the 431 response, on the wire (gateway/error_response.py)
    head_timeout: float  # seconds for a whole head to arrive
    timeout: bytes  # the 408 response
    max_connections: int  # open connections a worker holds at most
    busy: bytes  # the 503 response
    send_timeout: float  # seconds a client may leave the gateway's writes unread


def derived_max_connections(pool_size: int) -> int:
    """The connection cap when none is configured: half of what the open-files
    limit leaves beside the worker's own descriptors, since each client connection
    may need an upstream connection too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max((soft - pool_size - FD_RESERVE) // 2, 16)


@functools.cache
def _configured() -> HeadSettings:
    """The limits and the refusal bodies, from the configuration the worker process
    serves (a worker finds it through the environment, as create_app does)."""
    from gateway.config import load_config
    from gateway.error_response import render
    from gateway.upstreams import get_upstream

    config = load_config()
    server = config.server
    limit = server.max_header_bytes
    error_body = get_upstream(config.primary.kind).error_body
    return HeadSettings(
        head_limit=limit + REQUEST_LINE_ALLOWANCE,
        refusal=render(
            error_body,
            431,
            "headers_too_large",
            f"The request headers exceed {limit} bytes.",
            close=True,
        ).http11(b"Request Header Fields Too Large"),
        head_timeout=server.head_timeout,
        timeout=render(
            error_body,
            408,
            "request_timeout",
            f"The request head did not arrive within {server.head_timeout:g} seconds.",
            close=True,
        ).http11(b"Request Timeout"),
        max_connections=server.max_connections
        or derived_max_connections(config.database.pool_max_size),
        busy=render(
            error_body,
            503,
            "too_many_connections",
            "The gateway has too many open connections; retry shortly.",
            headers=[(b"retry-after", b"5")],
            close=True,
        ).http11(b"Service Unavailable"),
        send_timeout=server.send_timeout,
    )


class _Collected:
    """Stands in for the transport while uvicorn frames a message: keeps what it
    writes. Its closing (after the last piece of an answer that ends the
    connection, ``Connection: close``) writes what it kept to the transport and
    closes that at once: uvicorn goes on to start the next pipelined request
    unless the connection is closing by then (``on_response_complete``), and
    that request's answer could never be delivered."""

    __slots__ = ("closed", "parts", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.parts: list[bytes] = []
        self.closed = False
        self.transport = transport

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.closed = True
        if self.parts:
            self.transport.write(b"".join(self.parts))
            self.parts.clear()
        self.transport.close()


class HeadWithBodyCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, writing the head of a response that has
    a length (``Content-Length``) in one write with its first body piece, when the
    application sends that piece before the event loop turns: a whole answer in
    one write to the client instead of two (one system call, and on loopback one
    wake-up of the reader, fewer). A head whose body does not follow at once goes
    out on the loop's next turn, on its own, as uvicorn would have sent it.
    Streamed (chunked) heads are written at once, as uvicorn writes them. uvicorn
    still frames every message (its checks, its errors): only where the bytes go
    in between changes."""

    # Class-level defaults: a cycle becomes one by a change of class (see
    # BoundedHeadProtocol._start_asgi_task), without running an __init__.
    _held: bytes | None = None
    _flush: asyncio.Handle | None = None
    # A send of the head given up (cancelled: the application's deadline) while it
    # waited for a client that read nothing: see run_asgi.
    _stalled = False

    async def send(self, message: Message) -> None:  # type: ignore[override]
        if self.flow.write_paused and not self.disconnected:
            try:
                await self.flow.drain()  # first, so the framing below runs without a pause
            except asyncio.CancelledError:
                if not self.response_started:
                    self._stalled = True
                raise
        held = self._held
        if held is None and self.response_started:
            await super().send(message)  # type: ignore[arg-type]
            return
        transport = self.transport
        collected = _Collected(transport)
        if held is not None:
            # Before what uvicorn writes now (written by the collector's closing too).
            self._held = None
            if self._flush is not None:
                self._flush.cancel()
                self._flush = None
            collected.parts.append(held)
        self.transport = collected  # type: ignore[assignment]
        try:
            await super().send(message)  # type: ignore[arg-type]
        finally:
            self.transport = transport
            if collected.parts:
                out = b"".join(collected.parts)
                if held is None and self.chunked_encoding is False and not self.response_complete:
                    # A head with a length: held for its first body piece.
                    self._held = out
                    self._flush = asyncio.get_running_loop().call_soon(self._write_held)
                elif not self.disconnected:
                    transport.write(out)

    async def run_asgi(self, app: Any) -> None:
        async def run(scope: Any, receive: Any, send: Any) -> Any:
            try:
                return await app(scope, receive, send)
            finally:
                # An application that ends (or fails) with its head still held:
                # the head goes out before uvicorn ends the response (it closes the
                # connection), as it would have gone without the holding.
                if self._held is not None:
                    if self._flush is not None:
                        self._flush.cancel()
                    self._write_held()
                elif self._stalled and not self.response_started and not self.disconnected:
                    # An application that gave up on its head (the client read
                    # nothing in time) and ends without a response: the connection
                    # is closed. uvicorn would answer 500 instead, a write waiting
                    # on that client without a limit, and a misleading answer for a
                    # request that may have been served (and charged) all the same.
                    # Closed, not aborted: what the transport still holds of the
                    # answer before it (handed over whole, and recorded so) goes
                    # out first; a client that reads none of it is cut by the
                    # send timeout.
                    self.transport.close()
                    self.disconnected = True  # uvicorn sends nothing more

        await super().run_asgi(run)

    def _write_held(self) -> None:
        self._flush = None
        held, self._held = self._held, None
        if held is not None and not self.disconnected:
            self.transport.write(held)


class _Refusals:
    """Connections refused at the cap in this worker, for the log's warning."""

    count = 0
    since = 0.0
    warned_at: float | None = None


class BoundedHeadProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol`, refusing a head that grows past the limit or takes too
    long, and connections past the cap."""

    # None: from the configuration (see _configured); a subclass may fix them.
    settings: HeadSettings | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._settings = self.settings if self.settings is not None else _configured()
        self._limit, self._refusal = self._settings.head_limit, self._settings.refusal
        # uvicorn formats an access-log line (path, client address) for every
        # response whenever its access logger has handlers, and only then drops it
        # by level; at the usual log levels (warning and up) none is ever written.
        self.access_log = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        self._in_head = True  # until the parser completes a head; again after each message
        self._head_bytes = 0
        self._refused = False
        self._dropped = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # the write buffer's size at the send timer's last look

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self._settings.max_connections
        if len(self.connections) > cap:
            self._refuse_connection(cap)
            return
        # The first head must arrive in time, from the moment of connecting: a
        # connection that sends nothing is held no longer than a slow head.
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    # A client that stops reading: the transport pauses the gateway's writes when
    # its buffer passes the high-water mark (the client's socket buffers full), and
    # resumes them once the client has read nearly all of it. While they are
    # paused, a timer looks every server.send_timeout at what the buffer still
    # holds: a client that read nothing since the last look has its connection
    # aborted (like nginx's send_timeout). Its buffers and file descriptor are
    # freed, and a send waiting for it returns as for a client that left (what it
    # was sending is settled as such). No timer unless writes are paused.

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._unsent = self._unread()
            self._send_timer = self.loop.call_later(
                self._settings.send_timeout, self._send_timed_out
            )

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def _unread(self) -> int:
        """What the client has not yet taken of the gateway's writes: the
        transport's buffer and the kernel's send queue (SIOCOUTQ: sent bytes not
        yet acknowledged, and bytes not yet sent). The transport's buffer alone
        shrinks only once the kernel's send buffer (megabytes, autotuned) has room
        for a large part of it: a client reading steadily but slower than that in
        one send_timeout looked as if it read nothing, and was cut."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            except OSError:  # not a TCP socket, or no such ioctl here
                return unsent
            unsent += struct.unpack("i", queued)[0]
        return unsent

    def _send_timed_out(self) -> None:
        unsent = self._unread()
        if unsent < self._unsent:  # the client read some: it has another while
            self._unsent = unsent
            self._send_timer = self.loop.call_later(
                self._settings.send_timeout, self._send_timed_out
            )
            return
        self._send_timer = None
        self.logger.warning(
            "client read nothing for %g s; connection closed", self._settings.send_timeout
        )
        self.transport.abort()

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self._settings.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._refused or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined head, behind an answer still being sent: not idle
        if not self._head_bytes:
            self.transport.close()  # nothing was asked: nothing to answer
            return
        self.logger.warning(
            "request head not complete within %g s; answered 408", self._settings.head_timeout
        )
        self._refuse(self._settings.timeout)

    def _refuse_connection(self, cap: int) -> None:
        """Answer a connection past the cap 503 and close it at once: its file
        descriptor is what the cap is there to keep free."""
        self._refused = True
        refusals = _Refusals
        now = time.monotonic()
        if refusals.count == 0:
            refusals.since = now
        refusals.count += 1
        if refusals.warned_at is None or now - refusals.warned_at >= CAP_WARNING_INTERVAL:
            self.logger.warning(
                "connection limit reached: %d open connections (server.max_connections = %d); "
                "refused %d new connection(s) with 503 in the last %.0f s",
                len(self.connections) - 1,
                cap,
                refusals.count,
                now - refusals.since,
            )
            refusals.warned_at, refusals.count, refusals.since = now, 0, now
        self.transport.write(self._settings.busy)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        if not self._in_head:
            super().data_received(data)
            return
        if not self._head_bytes and self._head_timer is None:
            self._start_head_timer()  # a new head on a kept-alive connection
        self._head_bytes += len(data)
        super().data_received(data)
        # Counted after parsing: a read that completes the head and carries body
        # bytes too is not mistaken for a large head.
        if self._in_head and self._head_bytes > self._limit and not self.transport.is_closing():
            self.logger.warning("request head over %d bytes refused", self._limit)
            self._refuse()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if type(cycle) is RequestResponseCycle:
            # A cycle uvicorn made, about to run (now, or once the answers pipelined
            # before it are sent): the head of a response with a length is written
            # with its body (HeadWithBodyCycle, its run_asgi included).
            cycle.__class__ = HeadWithBodyCycle
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def _refuse(self, response: bytes | None = None) -> None:
        """Send a refusal (the 431 by default), then close."""
        self._refused = True
        self._stop_head_timer()
        transport: asyncio.Transport = self.transport
        transport.write(self._refusal if response is None else response)
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, transport.close)
