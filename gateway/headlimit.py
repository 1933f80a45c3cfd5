"""uvicorn's httptools protocol with a bound on the request head, for `gateway serve`.

httptools keeps every byte of an unfinished head in memory, without limit (a
20 MB header is taken whole), and the gateway's own header check (gateway/limits.py)
can only look at a head once it is complete. This protocol counts the bytes of the
head as they arrive and, once an unfinished head passes ``server.max_header_bytes``
(plus room for the request line), answers 431 in the upstream's error shape and
closes the connection, so no client can make a worker hold more than that.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Room for the request line and the header framing beside the header bytes.
REQUEST_LINE_ALLOWANCE = 8192
# After the refusal, what the client still sends is read and dropped for a while
# before the connection is closed: closing with unread data resets the connection,
# and a reset can destroy the refusal before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


@functools.cache
def _configured() -> tuple[int, bytes]:
    """The head limit and the refusal body, from the configuration the worker
    process serves (a worker finds it through the environment, as create_app does)."""
    from gateway.config import load_config
    from gateway.upstreams import get_upstream

    config = load_config()
    limit = config.server.max_header_bytes
    body = get_upstream(config.upstream.kind).error_body(
        431, "headers_too_large", f"The request headers exceed {limit} bytes."
    )
    return limit + REQUEST_LINE_ALLOWANCE, body


class BoundedHeadProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol`, refusing a head that grows past the limit."""

    # None: from the configuration (see _configured); a subclass may fix them.
    head_limit: int | None = None
    refusal_body: bytes | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.head_limit is None or self.refusal_body is None:
            self._limit, self._refusal = _configured()
        else:
            self._limit, self._refusal = self.head_limit, self.refusal_body
        # uvicorn formats an access-log line (path, client address) for every
        # response whenever its access logger has handlers, and only then drops it
        # by level; at the usual log levels (warning and up) none is ever written.
        self.access_log = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        self._in_head = True  # until the parser completes a head; again after each message
        self._head_bytes = 0
        self._refused = False
        self._dropped = 0

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        if not self._in_head:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        super().data_received(data)
        # Counted after parsing: a read that completes the head and carries body
        # bytes too is not mistaken for a large head.
        if self._in_head and self._head_bytes > self._limit and not self.transport.is_closing():
            self.logger.warning("request head over %d bytes refused", self._limit)
            self._refuse()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def _refuse(self) -> None:
        self._refused = True
        transport: asyncio.Transport = self.transport
        transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(self._refusal)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + self._refusal
        )
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, transport.close)
