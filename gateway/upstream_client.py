"""The one boundary where httpx, aiohttp and anyio errors become gateway errors.

The proxy asks this module to open, read and stop upstream requests and sees only
`gateway.errors` exceptions: `UpstreamTimeout` (with the phase it happened in),
`UpstreamUnavailable`, `UpstreamBroken` for a body that ended abnormally, and
the request body's own failures (a client gone, a malformed or oversized upload).

A response's body maps its errors itself, as httpx's transports map their
backend's (httpx/_transports/default.py): `UpstreamClient.open` hands back the
response with its byte stream replaced by one that raises `UpstreamBroken`, so
every reader of it (``aiter_raw``, ``aiter_bytes``, ``aclose``) gets gateway
errors without remembering to ask. On the default transport (httpx-aiohttp) the
replacement reads aiohttp directly, in place of httpx-aiohttp's own stream: no
layer is added per chunk. Other transports (``upstream.transport = "httpx"``,
tests) get a wrapping stream, one async generator step per chunk.

On httpx-aiohttp, the hot request itself (`UpstreamClient.open` with a body in
hand) goes to aiohttp directly too: the request head the upstream sees is the
one httpx would have built (the client's default headers, then the request's),
and the answer comes back as an ``httpx.Response`` around aiohttp's, so callers
see no difference; httpx's request and response machinery (build, auth,
redirects, the transport's conversions) is skipped. A streamed request body
still goes through httpx.

Which foreign exception means what is one table, `_KINDS`, looked up along the
exception's class hierarchy (never by class name); tests/test_upstream_client.py
checks that every exception class these libraries define is in it.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Final, Literal

import aiohttp
import aiohttp.http_exceptions
import anyio
import httpx
import yarl
from httpx._client import BoundAsyncStream
from httpx_aiohttp.transport import AiohttpResponseStream, AiohttpTransport

from gateway.bodies import BodyFailure, ClientGone
from gateway.errors import (
    BadRequest,
    PayloadTooLarge,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.multipart import MultipartError

log = logging.getLogger("gateway.proxy")

Headers = list[tuple[bytes, bytes]]

# What a foreign exception means: a timeout before the request reached the upstream
# ("connect"), a timeout after it did ("read": the upstream may be answering, and
# billing, still), or a failure that is no timeout ("failed": refused, reset, a
# malformed answer). Looked up along the exception's MRO, so a subclass a library
# adds later is read as its nearest listed base (the test names every class).
Kind = Literal["connect", "read", "failed"]
_KINDS: Final[Mapping[type[Exception], Kind]] = {
    # httpx (its own transport maps httpcore's, anyio's and h11's errors to these)
    httpx.ConnectTimeout: "connect",
    httpx.PoolTimeout: "connect",
    httpx.TimeoutException: "read",  # ReadTimeout, WriteTimeout
    httpx.HTTPError: "failed",  # NetworkError, ProtocolError, DecodingError, ...
    # aiohttp, as raised by its streams (httpx-aiohttp passes some through unmapped)
    aiohttp.ConnectionTimeoutError: "connect",
    aiohttp.ServerTimeoutError: "read",  # SocketTimeoutError: sock_read
    aiohttp.ClientError: "failed",
    aiohttp.http_exceptions.HttpProcessingError: "failed",
    aiohttp.EofStream: "failed",  # its queues' end marker, should one ever escape
    # anyio's stream errors, which httpcore does not map everywhere (closing a stream)
    anyio.BrokenResourceError: "failed",
    anyio.ClosedResourceError: "failed",
    anyio.EndOfStream: "failed",
    anyio.IncompleteRead: "failed",
    anyio.BusyResourceError: "failed",
    anyio.WouldBlock: "failed",
    anyio.DelimiterNotFound: "failed",
    # the standard library's, under any of them (asyncio.TimeoutError is TimeoutError)
    TimeoutError: "read",
    OSError: "failed",  # ConnectionResetError, ssl.SSLError, socket.gaierror, ...
    EOFError: "failed",  # asyncio.IncompleteReadError
}

# The foreign exceptions that a transport raises: caught at this boundary, mapped by kind.
FOREIGN: Final[tuple[type[Exception], ...]] = tuple(_KINDS)
# httpx-aiohttp raises an httpx error "from" aiohttp's, chosen coarsely: every
# aiohttp connection error, a refusal or a disconnect included, becomes
# httpx.ConnectTimeout. Its cause tells the truth.
_AIOHTTP: Final = (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError)


def error_kind(exc: BaseException) -> Kind | None:
    """What a foreign exception means (see `_KINDS`); None for one that is not a
    transport's (a bug, or a gateway error)."""
    cause = exc.__cause__
    if isinstance(exc, httpx.HTTPError) and isinstance(cause, _AIOHTTP):
        exc = cause
    for cls in type(exc).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def timeout_phase(exc: BaseException) -> Literal["connect", "read"] | None:
    """For an upstream failure: "connect" or "read" if it was a timeout (504) and
    in which phase, None if it was a refusal or a broken connection (502)."""
    kind = error_kind(exc)
    return None if kind is None or kind == "failed" else kind


# Failures that leave no doubt the request never reached the upstream: refused,
# unresolved, or no connection (or pool slot) in time.
_NOT_SENT_AIOHTTP: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_NOT_SENT_HTTPX: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def request_taken(exc: UpstreamTimeout | UpstreamUnavailable) -> bool:
    """Whether the upstream may have taken the request a failure ended before its
    response headers - and may be generating (and billing) its answer still: a
    read timeout, or a connection lost after it was made. False only when the
    request surely never reached it. The one rule for fallbacks and estimates."""
    if isinstance(exc, UpstreamTimeout):
        return exc.phase == "read"
    cause = exc.__cause__
    seen_httpx_connect = False
    while cause is not None:
        if isinstance(cause, _AIOHTTP):
            # httpx-aiohttp wraps every aiohttp error as ConnectTimeout: aiohttp's is the truth.
            return not isinstance(cause, _NOT_SENT_AIOHTTP)
        seen_httpx_connect = seen_httpx_connect or isinstance(cause, _NOT_SENT_HTTPX)
        cause = cause.__cause__
    return not seen_httpx_connect


def _broken(exc: BaseException) -> UpstreamBroken:
    """The gateway's error for a foreign one (of `FOREIGN`) raised by a body."""
    return UpstreamBroken(
        "The upstream connection was lost.", timed_out=timeout_phase(exc) is not None
    )


class MappedStream(httpx.AsyncByteStream):
    """A response body that raises `UpstreamBroken` for its transport's errors."""

    __slots__ = ("_stream",)

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except FOREIGN as exc:
            raise _broken(exc) from exc

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        except FOREIGN as exc:
            raise _broken(exc) from exc


class AiohttpStream(MappedStream):
    """The body of an answer on httpx-aiohttp, read from aiohttp directly, as that
    transport's own stream reads it (``iter_chunked``, of the same size), with
    aiohttp's errors mapped here. It takes the place of two steps per chunk (httpx's
    stream that times the response, then httpx-aiohttp's) and adds one: a chunk
    passes fewer steps than without this boundary. Closing goes through both, as
    before (the response's ``elapsed`` is set, the connection released)."""

    __slots__ = ("_aiohttp",)

    def __init__(self, stream: httpx.AsyncByteStream, response: aiohttp.ClientResponse) -> None:
        super().__init__(stream)
        self._aiohttp = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._aiohttp.content.iter_chunked(AiohttpResponseStream.CHUNK_SIZE):
                yield chunk
        except FOREIGN as exc:
            raise _broken(exc) from exc


class AiohttpBody(httpx.AsyncByteStream):
    """The body of an answer requested from aiohttp directly (`UpstreamClient.open`
    on httpx-aiohttp): read as `AiohttpStream` reads it, closed as httpx-aiohttp's
    stream closes it (the connection released, or dropped if the body was not
    read to its end), aiohttp's errors mapped here."""

    __slots__ = ("_aiohttp",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._aiohttp = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        # What iter_chunked does, without its iterator object between: read() gives
        # what is buffered, up to the size, and b"" at the end.
        read = self._aiohttp.content.read
        size = AiohttpResponseStream.CHUNK_SIZE
        try:
            while chunk := await read(size):
                yield chunk
        except FOREIGN as exc:
            raise _broken(exc) from exc

    async def aclose(self) -> None:
        try:
            await self._aiohttp.__aexit__(None, None, None)
        except FOREIGN as exc:
            raise _broken(exc) from exc


def mapped_stream(stream: httpx.AsyncByteStream) -> MappedStream:
    """A response's ``stream`` (httpx's, around the transport's), raising gateway
    errors. On httpx-aiohttp it is read from aiohttp directly: the attributes the
    two libraries keep their inner streams in are checked, not assumed, and any
    other shape is wrapped instead (tests/test_upstream_client.py fails if the
    installed versions stop taking the direct path)."""
    if type(stream) is BoundAsyncStream:
        inner = getattr(stream, "_stream", None)
        if type(inner) is AiohttpResponseStream:
            response = getattr(inner, "_aiohttp_response", None)
            if isinstance(response, aiohttp.ClientResponse):
                return AiohttpStream(stream, response)
    return MappedStream(stream)


# What sending a request may raise: the transport's errors, and what the request
# body raised (which the transport may pass on unwrapped).
_OPEN_ERRORS: Final[tuple[type[Exception], ...]] = (
    *FOREIGN,
    httpx.InvalidURL,
    ClientGone,
    MultipartError,
    PayloadTooLarge,
)

# Methods httpx sends "Content-Length: 0" with when they carry no body.
_EMPTY_LENGTH: Final = frozenset({"POST", "PUT", "PATCH"})

# Parsed upstream URLs kept (answers go to a handful; the bound covers query
# strings that name users).
_MAX_URLS = 1024


_HTTP11: Final = {"http_version": b"HTTP/1.1"}


def _header_text(raw: bytes) -> str:
    """A header name or value as aiohttp takes it (str, written back as UTF-8)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _joined(headers: Headers) -> list[tuple[str, str]]:
    """Headers with each repeated name once, where it first appears, its values
    joined with ", "."""
    at: dict[bytes, int] = {}
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        index = at.get(lower)
        if index is None:
            at[lower] = len(out)
            out.append((_header_text(name), _header_text(value)))
        else:
            out[index] = (out[index][0], f"{out[index][1]}, {_header_text(value)}")
    return out


# The StreamReader attributes `drain` reads and sets (aiohttp 3.14's; any other
# shape reads through read_nowait).
_DRAINED: Final = (
    "_buffer",
    "_buffer_offset",
    "_cursor",
    "_exception",
    "_http_chunk_splits",
    "_low_water",
    "_low_water_chunks",
    "_protocol",
    "_size",
    "_timer",
    "_waiter",
)
_DRAINABLE: Final = all(
    name in getattr(aiohttp.StreamReader, "__slots__", ()) for name in _DRAINED
) and callable(getattr(aiohttp.StreamReader, "_read_nowait_chunk", None))


def drain(content: aiohttp.StreamReader) -> bytes:
    """``content.read_nowait(n)`` for an ``n`` at least what is buffered, of a
    reader at the end of its body (fed its end: resuming the connection's
    reading parses nothing more into it): all of it, as one bytes, and the
    reader left as that read leaves it. aiohttp reads
    one chunk at a time, each with its bookkeeping and a call to resume the
    connection's reading (which parses again what is left, nothing at the end
    of a body): an answer of 20 events is 20 chunks. Here the chunks are
    joined at once, the bookkeeping done once, and reading resumed once if the
    last of those calls would have resumed it (each call's condition holds
    from the first that holds on: the buffer only shrinks).
    tests/test_upstream_client.py compares the two, attribute by attribute."""
    if content._exception is not None:
        raise content._exception
    waiter = content._waiter
    if waiter and not waiter.done():
        raise RuntimeError("Called while some coroutine is waiting for incoming data.")
    content._timer.assert_timeout()
    buffer = content._buffer
    if not buffer:
        return b""
    offset = content._buffer_offset
    data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
    if offset:
        data = data[offset:]
        content._buffer_offset = 0
    buffer.clear()
    size = len(data)
    content._size -= size
    cursor = content._cursor = content._cursor + size
    splits = content._http_chunk_splits
    if splits:
        # The ends of the chunks passed (all but the last, at the end of a
        # body), dropped at once: the ends only grow, as the reader appends them.
        passed = bisect.bisect_left(splits, cursor)
        if passed == len(splits):
            splits.clear()
        elif passed:
            splits = content._http_chunk_splits = collections.deque(
                itertools.islice(splits, passed, None)
            )
    if content._size < content._low_water and (
        splits is None or len(splits) < content._low_water_chunks
    ):
        content._protocol.resume_reading()
    return data


def direct_response(
    status: int, raw: Sequence[tuple[bytes, bytes]], stream: AiohttpBody
) -> httpx.Response:
    """``httpx.Response(status, headers=raw, stream=stream, extensions=_HTTP11)``,
    its attributes set as that constructor sets them from these arguments, without
    its checks of what kind each argument is (raw headers as aiohttp gives them:
    byte pairs, their names lower-cased once as httpx.Headers does).
    tests/test_upstream_client.py compares the two, attribute by attribute."""
    headers = httpx.Headers.__new__(httpx.Headers)
    headers._list = [(name, name.lower(), value) for name, value in raw]
    headers._encoding = None
    response = httpx.Response.__new__(httpx.Response)
    response.status_code = status
    response.headers = headers
    response._request = None
    response.next_request = None
    response.extensions = dict(_HTTP11)
    response.history = []
    response.is_closed = False
    response.is_stream_consumed = False
    response.default_encoding = "utf-8"
    response.stream = stream
    response._num_bytes_downloaded = 0
    return response


class UpstreamClient:
    """One upstream's httpx client, as the proxy uses it (shared by all users)."""

    __slots__ = ("_aiohttp", "_client", "_defaults", "_timeouts", "_urls", "_yarl")

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client
        # httpx parses (and checks, and re-quotes) a URL string on every request:
        # a tenth of the cost of building one. httpx.URL objects are immutable.
        self._urls: dict[str, httpx.URL] = {}
        # The direct path to aiohttp, when the client's transport is httpx-aiohttp's
        # (the default): what httpx would add to every request (its default
        # headers), the URLs as aiohttp takes them, and aiohttp's timeouts.
        transport = getattr(client, "_transport", None)
        self._aiohttp = transport if type(transport) is AiohttpTransport else None
        # By lower-case name, with the name and value as aiohttp takes them
        # (decoded once here, not on every request).
        self._defaults = [
            (name.lower(), _header_text(name), _header_text(value))
            for name, value in client.headers.raw
        ]
        # By the URL's text, as given: an httpx.URL hashes by building its text
        # again, and compares by parsing the other one.
        self._yarl: dict[str, yarl.URL] = {}
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    @property
    def streaming_timeout(self) -> httpx.Timeout:
        return self._client.timeout

    async def aclose(self) -> None:
        """Close the connection pool (at shutdown)."""
        await self._client.aclose()

    async def open(
        self,
        method: str,
        url: str,
        *,
        headers: Headers,
        content: bytes | AsyncIterator[bytes] | None,
        timeout: httpx.Timeout,
        failure: BodyFailure,
    ) -> httpx.Response:
        """Send a request; the response's headers are read, its body is not. The
        body, read or closed, raises `UpstreamBroken` for a transport's errors."""
        client = self._client
        try:
            if self._aiohttp is not None and not isinstance(content, AsyncIterator):
                return await self._open_aiohttp(
                    self._aiohttp, method, self._target(url), headers, content, timeout
                )
            request = client.build_request(
                method, self._url(url), headers=headers, content=content, timeout=timeout
            )
            response = await client.send(request, stream=True)
        except _OPEN_ERRORS as exc:
            # The transport wraps what the request body raised: the body's own
            # record says what really happened.
            error = failure.error
            if isinstance(error, MultipartError):
                raise BadRequest(f"Malformed multipart body: {error}") from exc
            if isinstance(error, ClientGone | PayloadTooLarge):
                raise error from exc
            if isinstance(exc, httpx.InvalidURL):
                raise BadRequest("The request URL is not valid.") from exc
            phase = timeout_phase(exc)
            if phase is not None:
                raise UpstreamTimeout("The upstream did not answer in time.", phase=phase) from exc
            raise UpstreamUnavailable("The upstream service is unreachable.") from exc
        if isinstance(response.stream, httpx.AsyncByteStream):  # always, on an async client
            response.stream = mapped_stream(response.stream)
        return response

    async def _open_aiohttp(
        self,
        transport: AiohttpTransport,
        method: str,
        target: yarl.URL,
        headers: Headers,
        content: bytes | None,
        timeout: httpx.Timeout,
    ) -> httpx.Response:
        """`open` on httpx-aiohttp, without httpx's request and response machinery:
        the same request as httpx-aiohttp's transport makes of aiohttp, from the
        same head httpx would build."""
        session = transport.client
        if not isinstance(session, aiohttp.ClientSession):
            session = transport.client = transport.get_client()
        key = (timeout.connect, timeout.read, timeout.pool)
        limits = self._timeouts.get(key)
        if limits is None:
            limits = self._timeouts[key] = aiohttp.ClientTimeout(
                sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
            )
        # httpx's head: its default headers that the request does not set, then the
        # request's own, in order (a repeated one once, its values joined with ", ",
        # as httpx hands them to aiohttp); a POST, PUT or PATCH without a length says 0.
        given = {name.lower() for name, _ in headers}
        head = [(name, value) for lower, name, value in self._defaults if lower not in given]
        if len(given) == len(headers):
            try:  # UTF-8, as nearly every header is: no call per name and value
                head += [(k.decode(), v.decode()) for k, v in headers]
            except UnicodeDecodeError:
                head += [(_header_text(k), _header_text(v)) for k, v in headers]
        else:
            head += _joined(headers)
        if (
            method in _EMPTY_LENGTH
            and b"content-length" not in given
            and b"transfer-encoding" not in given
            and not content
        ):
            head.append(("Content-Length", "0"))
        answer = await session.request(
            method,
            target,
            headers=head,
            data=content or None,
            allow_redirects=False,
            auto_decompress=False,
            compress=False,
            timeout=limits,
        )
        return direct_response(answer.status, answer.raw_headers, AiohttpBody(answer))

    def _target(self, url: str) -> yarl.URL:
        """The URL as aiohttp takes it: the one httpx would send (checked, and
        quoted, by httpx.URL; raises httpx.InvalidURL as `_url` does)."""
        target = self._yarl.get(url)
        if target is None:
            target = yarl.URL(str(self._url(url)))
            if len(self._yarl) >= _MAX_URLS:
                self._yarl.clear()
            self._yarl[url] = target
        return target

    def _url(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = httpx.URL(url)  # raises httpx.InvalidURL, mapped by the caller
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    async def request(
        self, method: str, url: str, *, headers: Headers, content: bytes | None = None
    ) -> httpx.Response:
        """A small request read whole (a CORS preflight, a stop call)."""
        try:
            return await self._client.request(method, url, headers=headers, content=content)
        except FOREIGN as exc:
            raise UpstreamUnavailable("The upstream service is unreachable.") from exc

    @staticmethod
    def raw(response: httpx.Response) -> AsyncIterator[bytes]:
        """The body as it arrives, Content-Encoding and all, like ``aiter_raw``;
        an answer requested directly (`AiohttpBody`) is read from its stream,
        without httpx's generator around it. The caller closes the response."""
        stream = response.stream
        if type(stream) is AiohttpBody:
            return stream.__aiter__()
        return response.aiter_raw()

    @staticmethod
    async def close(response: httpx.Response) -> None:
        """``response.aclose()``; an answer requested directly (`AiohttpBody`) is
        closed as aclose closes it, without httpx's context that names the
        request in an httpx error: it has no request, and its stream raises
        gateway errors."""
        stream = response.stream
        if type(stream) is AiohttpBody:
            if not response.is_closed:
                response.is_closed = True
                await stream.aclose()
            return
        await response.aclose()

    @staticmethod
    def ended(response: httpx.Response) -> Callable[[], bool] | None:
        """For an answer read from aiohttp's stream (`raw`): a test of whether its
        body is over, nothing left to read - true as soon as the last chunk came
        with the end of the body, before the reader asks for more. None for other
        streams (they do not tell)."""
        stream = response.stream
        if type(stream) is AiohttpBody:
            return stream._aiohttp.content.at_eof
        return None

    @staticmethod
    def complete(response: httpx.Response) -> bool:
        """Whether the whole body of an answer read from aiohttp's stream (`raw`)
        is already here: reading it to its end waits for nothing. False for other
        streams (they do not tell) and for a body still arriving."""
        stream = response.stream
        return type(stream) is AiohttpBody and stream._aiohttp.content.is_eof()

    @staticmethod
    def whole(response: httpx.Response) -> bytes | None:
        """For an answer read from aiohttp's stream (`raw`): its whole body, when
        all of it is already here and fits in one read - the one chunk `raw` would
        yield, taken without its generator (the stream is then at its end). None,
        with nothing read, for an empty body, a body still arriving or longer than
        one read, a failed stream, and other streams."""
        stream = response.stream
        if type(stream) is not AiohttpBody:
            return None
        content = stream._aiohttp.content
        if (
            not content.is_eof()
            or content.exception() is not None
            or not 0 < content.total_bytes <= AiohttpResponseStream.CHUNK_SIZE
        ):
            return None
        try:
            # What is buffered is at most all the body received (total_bytes):
            # this one read leaves the stream at its end.
            if _DRAINABLE and type(content) is aiohttp.StreamReader:
                return drain(content) or None
            return content.read_nowait(AiohttpResponseStream.CHUNK_SIZE) or None
        except FOREIGN as exc:
            raise _broken(exc) from exc

    @staticmethod
    async def decoded(response: httpx.Response) -> AsyncIterator[bytes]:
        """A body with its Content-Encoding undone (httpx decodes above the stream,
        so its DecodingError is mapped here: `UpstreamBroken`)."""
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.DecodingError as exc:
            raise UpstreamBroken("The upstream connection was lost.", timed_out=False) from exc
