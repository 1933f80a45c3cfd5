"""Every exception httpx, aiohttp, anyio and the standard library can raise from an
upstream request or body becomes a gateway error at gateway/upstream_client.py.

The classes are enumerated from the libraries as installed, not listed by hand: a
class a new version adds that the boundary does not map fails here, and so does a
new timeout (whose phase, connect or read, someone must decide: it says whether
the upstream may be billing an answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import inspect
import random
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import aiohttp.client_exceptions
import aiohttp.http_exceptions
import anyio
import httpx
import pytest
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

import gateway.upstream_client as upstream_client
from gateway.bodies import BodyFailure
from gateway.errors import UpstreamBroken, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream_client import (
    AiohttpBody,
    AiohttpStream,
    MappedStream,
    UpstreamClient,
    direct_response,
    drain,
    error_kind,
    timeout_phase,
)
from tests.harness import until

# The timeouts, and their phase: "connect" when the request never reached the
# upstream, "read" when it did (and the answer may be running, and billed).
TIMEOUTS: dict[type[BaseException], str] = {
    httpx.TimeoutException: "read",
    httpx.ConnectTimeout: "connect",
    httpx.PoolTimeout: "connect",
    httpx.ReadTimeout: "read",
    httpx.WriteTimeout: "read",
    aiohttp.ServerTimeoutError: "read",
    aiohttp.ConnectionTimeoutError: "connect",
    aiohttp.SocketTimeoutError: "read",
    TimeoutError: "read",
}

# Exception classes of these libraries that no upstream request or body raises,
# and why; everything else they define is enumerated below and must be mapped.
NOT_TRANSPORT: dict[str, str] = {
    # misuse of a response or request object: a gateway bug, reported as one
    "httpx.StreamError": "bug",
    "httpx.StreamConsumed": "bug",
    "httpx.StreamClosed": "bug",
    "httpx.ResponseNotRead": "bug",
    "httpx.RequestNotRead": "bug",
    # refused as a bad request before anything is sent (UpstreamClient.open)
    "httpx.InvalidURL": "400",
    # the cookie jar's API; the shared client keeps no cookies (runtime.SharedClient)
    "httpx.CookieConflict": "no cookies",
    # websockets, which the gateway does not open
    "aiohttp.WebSocketError": "websockets",
    "aiohttp.WSMessageTypeError": "websockets",
    # anyio's task groups, workers, futures and event loops: not its streams
    "anyio.BrokenWorkerInterpreter": "workers",
    "anyio.BrokenWorkerProcess": "workers",
    "anyio.FutureAlreadyFinished": "futures",
    "anyio.FutureCancelled": "futures",
    "anyio.FutureFailed": "futures",
    "anyio.FutureNotFinished": "futures",
    "anyio.NoEventLoopError": "event loops",
    "anyio.RunFinishedError": "event loops",
    "anyio.TaskCancelled": "tasks",
    "anyio.TaskFailed": "tasks",
    "anyio.TaskNotFinished": "tasks",
    "anyio.TypedAttributeLookupError": "typed attributes",
}

_LIBRARIES = ("httpx", "aiohttp", "anyio", "builtins", "ssl", "socket", "asyncio")


def _name(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def _exported(module: Any) -> set[type[BaseException]]:
    """The exception classes a module offers (anyio loads some on first access)."""
    values = (getattr(module, name) for name in dir(module))
    return {v for v in values if inspect.isclass(v) and issubclass(v, BaseException)}


def _subclasses(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def _foreign_classes() -> list[type[BaseException]]:
    found: set[type[BaseException]] = set()
    for module in (httpx, aiohttp, aiohttp.client_exceptions, aiohttp.http_exceptions, anyio):
        found |= {cls for cls in _exported(module) if not issubclass(cls, Warning)}
    roots = (
        httpx.HTTPError,
        aiohttp.ClientError,
        aiohttp.http_exceptions.HttpProcessingError,
        OSError,  # TimeoutError, ConnectionError, ssl.SSLError, socket.gaierror, ...
        EOFError,  # asyncio.IncompleteReadError
    )
    for root in roots:
        found |= set(_subclasses(root))
    found.add(asyncio.TimeoutError)
    found.add(ssl.SSLError)
    found.add(socket.gaierror)
    foreign = {
        cls
        for cls in found
        if cls.__module__.split(".")[0] in _LIBRARIES and _name(cls) not in NOT_TRANSPORT
    }
    return sorted(foreign, key=_name)


FOREIGN = _foreign_classes()


_KEY = ConnectionKey("upstream", 443, True, True, None, None, None)
_REQUEST = RequestInfo(URL("https://upstream/v1/x"), "POST", CIMultiDictProxy(CIMultiDict()))
_REFUSED = ConnectionRefusedError(111, "Connection refused")
_HTTPX_REQUEST = httpx.Request("POST", "https://upstream/v1/x")
# Constructor arguments that make a working instance (one whose str() works, as
# httpx-aiohttp's mapping needs), tried in turn.
_ARGUMENTS: tuple[tuple[tuple[Any, ...], dict[str, Any]], ...] = (
    (("boom",), {}),
    ((), {}),
    ((_KEY, _REFUSED), {}),  # aiohttp's connector errors
    (("/run/upstream.sock", _KEY, _REFUSED), {}),  # ... over a Unix socket
    ((_REQUEST, ()), {}),  # aiohttp's response errors
    ((b"expected", b"got", "upstream", 443), {}),  # aiohttp's fingerprint mismatch
    (
        ("boom",),
        {"request": _HTTPX_REQUEST, "response": httpx.Response(500, request=_HTTPX_REQUEST)},
    ),
)


def _instance(cls: type[BaseException]) -> BaseException:
    for arguments, keywords in _ARGUMENTS:
        try:
            exc = cls(*arguments, **keywords)
            str(exc)
        except Exception:
            continue
        return exc
    raise AssertionError(f"no way to build a {_name(cls)} to test")


def _expected_timeout(cls: type[BaseException]) -> str | None:
    for base in cls.__mro__:
        if base in TIMEOUTS:
            return TIMEOUTS[base]
    return None


def test_the_enumeration_finds_every_family() -> None:
    names = {_name(cls) for cls in FOREIGN}
    for expected in (
        "httpx.ReadError",
        "httpx.DecodingError",
        "aiohttp.ClientPayloadError",
        "aiohttp.ServerDisconnectedError",
        "aiohttp.ContentLengthError",
        "anyio.BrokenResourceError",
        "anyio.EndOfStream",
        "builtins.ConnectionResetError",
        "builtins.TimeoutError",
        "ssl.SSLError",
        "asyncio.IncompleteReadError",
    ):
        assert expected in names
    # Every name excluded is still a class of the library (a stale entry fails).
    everything = {_name(cls) for module in (httpx, aiohttp, anyio) for cls in _exported(module)}
    assert set(NOT_TRANSPORT) <= everything


def test_every_foreign_class_is_mapped_and_every_timeout_has_its_phase() -> None:
    unmapped = [_name(cls) for cls in FOREIGN if error_kind(_instance(cls)) is None]
    assert unmapped == []
    # The classes the boundary takes for timeouts are exactly the pinned ones and
    # their subclasses: a new timeout class shows up here until its phase is chosen.
    timeouts = {cls for cls in FOREIGN if error_kind(_instance(cls)) in ("connect", "read")}
    pinned = {cls for cls in FOREIGN if _expected_timeout(cls) is not None}
    assert {_name(c) for c in timeouts} == {_name(c) for c in pinned}
    new = {_name(c) for c in pinned - set(TIMEOUTS) if c is not asyncio.TimeoutError}
    assert new == set(), f"timeout classes whose phase nobody chose: {new}"


# --- the boundary, end to end through UpstreamClient --------------------------------


class _Failing(httpx.AsyncByteStream):
    """A body that sends one chunk, then fails (or fails when closed)."""

    def __init__(self, exc: BaseException, *, on_close: bool = False) -> None:
        self.exc, self.on_close = exc, on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        if not self.on_close:
            raise self.exc

    async def aclose(self) -> None:
        if self.on_close:
            raise self.exc


class _Transport(httpx.AsyncBaseTransport):
    def __init__(self, *, send: BaseException | None = None, body: Any = None) -> None:
        self.send, self.body = send, body

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.send is not None:
            raise self.send
        return httpx.Response(200, stream=self.body)


@contextlib.asynccontextmanager
async def _client(transport: httpx.AsyncBaseTransport) -> AsyncIterator[UpstreamClient]:
    async with httpx.AsyncClient(transport=transport) as http:
        yield UpstreamClient(http)


async def _open(client: UpstreamClient, url: str = "http://upstream/v1/x") -> httpx.Response:
    return await client.open(
        "GET", url, headers=[], content=None, timeout=httpx.Timeout(5.0), failure=BodyFailure()
    )


async def _read_all(response: httpx.Response) -> list[bytes]:
    chunks = []
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
    return chunks


def _as_httpx_aiohttp_raises(exc: BaseException) -> BaseException:
    """``exc`` as httpx-aiohttp's transport passes it on: an httpx error raised from
    it when its table has one, else itself."""
    try:
        with map_aiohttp_exceptions():
            raise exc
    except BaseException as raised:
        return raised
    raise AssertionError("unreachable")


@pytest.mark.parametrize("cls", FOREIGN, ids=_name)
async def test_a_foreign_error_in_a_body_is_upstream_broken(cls: type[BaseException]) -> None:
    exc = _instance(cls)
    async with _client(_Transport(body=_Failing(exc))) as client:
        response = await _open(client)
        assert isinstance(response.stream, MappedStream)
        chunks: list[bytes] = []
        with pytest.raises(UpstreamBroken) as info:
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
    assert chunks == [b"data: first\n\n"]  # what came before the failure came through
    assert info.value.__cause__ is exc
    assert info.value.timed_out is (_expected_timeout(cls) is not None)


@pytest.mark.parametrize("cls", FOREIGN, ids=_name)
async def test_a_foreign_error_closing_a_body_is_upstream_broken(cls: type[BaseException]) -> None:
    exc = _instance(cls)
    async with _client(_Transport(body=_Failing(exc, on_close=True))) as client:
        response = await _open(client)
        with pytest.raises(UpstreamBroken) as info:
            await _read_all(response)  # httpx closes the stream at its end
    assert info.value.__cause__ is exc


@pytest.mark.parametrize("cls", FOREIGN, ids=_name)
async def test_a_foreign_error_sending_is_a_timeout_or_unavailable(
    cls: type[BaseException],
) -> None:
    raw = _instance(cls)
    passed_on = [raw]
    if issubclass(cls, aiohttp.ClientError | aiohttp.http_exceptions.HttpProcessingError):
        # httpx-aiohttp wraps aiohttp's errors coarsely (a refused connection is its
        # ConnectTimeout): the boundary reads the aiohttp error under it.
        passed_on.append(_as_httpx_aiohttp_raises(raw))
    phase = _expected_timeout(cls)
    for exc in passed_on:
        async with _client(_Transport(send=exc)) as client:
            with pytest.raises(UpstreamTimeout if phase else UpstreamUnavailable) as info:
                await _open(client)
        if phase is not None:
            assert isinstance(info.value, UpstreamTimeout)
            assert info.value.phase == phase


@pytest.mark.parametrize("cls", FOREIGN, ids=_name)
async def test_a_foreign_error_in_a_whole_request_is_unavailable(cls: type[BaseException]) -> None:
    async with _client(_Transport(send=_instance(cls))) as client:
        with pytest.raises(UpstreamUnavailable):
            await client.request("POST", "http://upstream/v1/stop", headers=[])


# --- httpx-aiohttp: read from aiohttp directly ---------------------------------------


class _Content:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc
        self.sizes: list[int] = []

    async def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        self.sizes.append(size)
        yield b"data: first\n\n"
        if self.exc is not None:
            raise self.exc


class _AiohttpResponse(aiohttp.ClientResponse):
    """An aiohttp response with nothing behind it but its content."""

    def __init__(self, exc: BaseException | None) -> None:
        self.content = _Content(exc)  # type: ignore[assignment]
        self.exited = False

    async def __aexit__(self, *exc_info: object) -> None:
        self.exited = True


@pytest.mark.parametrize("cls", FOREIGN, ids=_name)
async def test_a_foreign_error_from_aiohttp_read_directly_is_upstream_broken(
    cls: type[BaseException],
) -> None:
    exc = _instance(cls)
    upstream = _AiohttpResponse(exc)
    body = AiohttpResponseStream(upstream)
    async with _client(_Transport(body=body)) as client:
        response = await _open(client)
        assert type(response.stream) is AiohttpStream
        with pytest.raises(UpstreamBroken) as info:
            await _read_all(response)
        await response.aclose()
    assert info.value.__cause__ is exc
    assert info.value.timed_out is (_expected_timeout(cls) is not None)
    assert upstream.exited  # closed through httpx-aiohttp's stream, as before
    assert upstream.content.sizes == [AiohttpResponseStream.CHUNK_SIZE]  # type: ignore[attr-defined]


async def _serve_raw(answer: bytes, *, hold: asyncio.Event) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await hold.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/x"


_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100\r\n\r\n"


async def test_the_default_transport_takes_the_direct_path_and_maps_a_cut() -> None:
    # The installed httpx and httpx-aiohttp keep their inner streams where
    # mapped_stream looks: if an upgrade moves them, the gateway still maps errors
    # (through a wrapper) but each chunk pays one step more - this says so.
    hold = asyncio.Event()
    server, url = await _serve_raw(_HEAD + b"data: first\n\n", hold=hold)
    async with server, _client(AiohttpTransport()) as client:
        response = await _open(client, url)
        assert type(response.stream) is AiohttpBody  # httpx's request machinery skipped too
        hold.set()  # the server closes with 87 promised bytes unsent
        with pytest.raises(UpstreamBroken) as info:
            await _read_all(response)
        await response.aclose()
    assert info.value.timed_out is False
    assert isinstance(info.value.__cause__, aiohttp.ClientPayloadError)


async def test_a_cut_read_through_raw_is_upstream_broken() -> None:
    # UpstreamClient.raw reads a direct answer from its stream (no httpx generator
    # between): the same chunks, the same mapped error.
    hold = asyncio.Event()
    server, url = await _serve_raw(_HEAD + b"data: first\n\n", hold=hold)
    async with server, _client(AiohttpTransport()) as client:
        response = await _open(client, url)
        chunks: list[bytes] = []
        hold.set()
        with pytest.raises(UpstreamBroken) as info:
            async for chunk in client.raw(response):
                chunks.append(chunk)
        await response.aclose()
    assert chunks == [b"data: first\n\n"]
    assert info.value.timed_out is False
    assert isinstance(info.value.__cause__, aiohttp.ClientPayloadError)


async def test_complete_says_when_the_whole_body_is_here() -> None:
    # The relay starts no disconnect watcher for an answer that is complete when
    # it opens (gateway/proxy.py): reading it waits for nothing. A body still
    # arriving is not complete; one read to its end is.
    hold = asyncio.Event()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\n"
    server, url = await _serve_raw(head + b"{}", hold=hold)
    async with server, _client(AiohttpTransport()) as client:
        response = await _open(client, url)
        assert not client.complete(response)
        reader = client.raw(response)
        assert await anext(reader) == b"{}"
        assert not client.complete(response)  # two bytes still to come
        hold.set()
        server.close()
        with pytest.raises(UpstreamBroken):  # ... and they never do: cut, not complete
            await anext(reader)
        assert not client.complete(response)
        await response.aclose()
    whole = asyncio.Event()
    server, url = await _serve_raw(head + b"{}{}", hold=whole)
    async with server, _client(AiohttpTransport()) as client:
        response = await _open(client, url)
        chunks = [chunk async for chunk in client.raw(response)]
        assert b"".join(chunks) == b"{}{}"
        assert client.complete(response)
        await response.aclose()
        whole.set()


async def test_whole_reads_a_body_that_is_here_and_fits_one_read() -> None:
    # The relay's path for a body already here whole (gateway/proxy.py): the one
    # chunk raw would yield, read at once, the stream left at its end.
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    body = b'{"id": "x"}'
    whole = asyncio.Event()
    server, url = await _serve_raw(head % len(body) + body, hold=whole)
    async with server, _client(AiohttpTransport()) as client:
        response = await _open(client, url)
        await until(lambda: client.complete(response))
        assert client.whole(response) == body
        assert [chunk async for chunk in client.raw(response)] == []  # at its end
        await response.aclose()
        whole.set()


async def test_whole_reads_nothing_of_a_body_still_arriving() -> None:
    hold = asyncio.Event()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\n"
    server, url = await _serve_raw(head + b"{}", hold=hold)
    async with server, _client(AiohttpTransport()) as client:
        response = await _open(client, url)
        stream = response.stream
        assert isinstance(stream, AiohttpBody)
        await until(lambda: stream._aiohttp.content.total_bytes == 2)
        assert client.whole(response) is None
        assert await anext(client.raw(response)) == b"{}"  # nothing was taken
        await response.aclose()
        hold.set()


@pytest.mark.parametrize("size", [0, AiohttpResponseStream.CHUNK_SIZE + 1])
async def test_whole_reads_nothing_of_a_body_empty_or_longer_than_one_read(size: int) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    body = b"x" * size
    whole = asyncio.Event()
    server, url = await _serve_raw(head % size + body, hold=whole)
    async with server, _client(AiohttpTransport()) as client:
        response = await _open(client, url)
        await until(lambda: client.complete(response))
        assert client.whole(response) is None
        chunks = [chunk async for chunk in client.raw(response)]
        assert b"".join(chunks) == body  # read as before, in reads of CHUNK_SIZE
        assert len(chunks) == (2 if size else 0)
        await response.aclose()
        whole.set()


async def test_whole_is_none_for_answers_read_through_httpx() -> None:
    async with _client(_Transport(body=_Failing(_instance(aiohttp.ClientPayloadError)))) as client:
        response = await _open(client)
        assert client.whole(response) is None
        await response.aclose()


async def test_complete_is_false_for_answers_read_through_httpx() -> None:
    async with _client(_Transport(body=_Failing(_instance(aiohttp.ClientPayloadError)))) as client:
        response = await _open(client)
        assert not client.complete(response)
        await response.aclose()


async def test_raw_reads_other_answers_through_httpx() -> None:
    async with _client(_Transport(body=_Failing(_instance(aiohttp.ClientPayloadError)))) as client:
        response = await _open(client)
        with pytest.raises(UpstreamBroken):
            async for _chunk in client.raw(response):
                pass
        assert response.is_stream_consumed  # aiter_raw's own bookkeeping: it was used


async def test_the_default_transport_maps_a_read_timeout_as_timed_out() -> None:
    hold = asyncio.Event()  # never set: the upstream goes silent after one event
    server, url = await _serve_raw(_HEAD + b"data: first\n\n", hold=hold)
    async with server, httpx.AsyncClient(transport=AiohttpTransport()) as http:
        client = UpstreamClient(http)
        response = await client.open(
            "GET",
            url,
            headers=[],
            content=None,
            timeout=httpx.Timeout(5.0, read=0.2),
            failure=BodyFailure(),
        )
        with pytest.raises(UpstreamBroken) as info:
            await _read_all(response)
        await response.aclose()
        hold.set()
    assert info.value.timed_out is True
    assert isinstance(info.value.__cause__, aiohttp.SocketTimeoutError)


async def test_the_default_transport_maps_a_refused_connection_as_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with _client(AiohttpTransport()) as client:
        with pytest.raises(UpstreamUnavailable):  # not the ConnectTimeout it arrives as
            await _open(client, f"http://127.0.0.1:{port}/v1/x")


# --- httpx-aiohttp: the request sent to aiohttp directly --------------------------------


class _Refusing(aiohttp.BaseConnector):
    """A connector whose every connection fails with ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


@pytest.mark.parametrize("cls", FOREIGN, ids=_name)
async def test_a_foreign_error_sending_directly_is_a_timeout_or_unavailable(
    cls: type[BaseException],
) -> None:
    exc = _instance(cls)
    session = aiohttp.ClientSession(connector=_Refusing(exc))
    async with _client(AiohttpTransport(client=session)) as client:
        with pytest.raises((UpstreamTimeout, UpstreamUnavailable)) as info:
            await _open(client)
    raised = info.value.__cause__
    assert raised is not None  # what aiohttp passed on: the error, or its own for it
    phase = timeout_phase(raised)
    assert isinstance(info.value, UpstreamTimeout if phase else UpstreamUnavailable)
    if isinstance(info.value, UpstreamTimeout):
        assert info.value.phase == phase


async def _heads(count: int) -> tuple[asyncio.Server, str, list[bytes]]:
    """A server that records each request head and answers it with an empty 200."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(count):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat-messages?user=a%20b", heads


def _lines(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:-2]
    return sorted((k.lower(), v.strip()) for k, v in (line.split(b":", 1) for line in lines))


_REQUESTS: list[tuple[str, list[tuple[bytes, bytes]], bytes | None]] = [
    ("GET", [(b"authorization", b"Bearer app-x")], None),
    ("POST", [(b"content-type", b"application/json"), (b"content-length", b"2")], b"{}"),
    ("POST", [(b"accept-encoding", b"identity"), (b"x-twice", b"1"), (b"x-twice", b"2")], None),
    ("DELETE", [(b"user-agent", b"client/1"), (b"accept", b"text/event-stream")], b""),
    ("PATCH", [(b"x-name", "Đà Nẵng".encode())], b"abc"),
    ("PUT", [(b"x-latin", b"caf\xe9")], b"x"),  # not UTF-8: read as latin-1
]


async def test_the_direct_request_sends_the_head_httpx_would() -> None:
    """What the upstream receives is what httpx's request machinery sent through
    httpx-aiohttp: the request line and every header (order aside), the body."""
    server, url, heads = await _heads(2 * len(_REQUESTS))
    async with server, httpx.AsyncClient(transport=AiohttpTransport()) as http:
        client = UpstreamClient(http)
        for method, headers, content in _REQUESTS:
            request = http.build_request(method, url, headers=headers, content=content)
            await (await http.send(request, stream=True)).aclose()
            response = await client.open(
                method,
                url,
                headers=headers,
                content=content,
                timeout=httpx.Timeout(5.0),
                failure=BodyFailure(),
            )
            assert type(response.stream) is AiohttpBody
            assert response.status_code == 200
            await response.aclose()
    assert len(heads) == 2 * len(_REQUESTS)
    for before, direct in zip(heads[::2], heads[1::2], strict=True):
        assert direct.split(b"\r\n")[0] == before.split(b"\r\n")[0]
        assert _lines(direct) == _lines(before)


async def test_a_streamed_request_body_still_goes_through_httpx() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"part"

    server, url, heads = await _heads(1)
    async with server, _client(AiohttpTransport()) as client:
        response = await client.open(
            "POST",
            url,
            headers=[],
            content=body(),
            timeout=httpx.Timeout(5.0),
            failure=BodyFailure(),
        )
        assert type(response.stream) is AiohttpStream
        await response.aclose()
    assert heads[0].startswith(b"POST /v1/chat-messages?user=a%20b HTTP/1.1")


# --- a body httpx decodes --------------------------------------------------------------


class _Encoded(httpx.AsyncBaseTransport):
    """Answers with a gzip-encoded body (or one that claims to be)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = {"content-encoding": "gzip"}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(self.body))


async def test_a_body_that_does_not_decode_is_upstream_broken() -> None:
    async with _client(_Encoded(b"not gzip at all")) as client:
        response = await _open(client)
        with pytest.raises(UpstreamBroken) as info:
            async for _chunk in client.decoded(response):
                pass
    assert isinstance(info.value.__cause__, httpx.DecodingError)


async def test_a_body_that_decodes_is_passed_on_decoded() -> None:
    async with _client(_Encoded(gzip.compress(b'{"data": []}'))) as client:
        response = await _open(client)
        assert b"".join([c async for c in client.decoded(response)]) == b'{"data": []}'


# --- a direct answer's httpx.Response -------------------------------------------------


def _attributes(response: httpx.Response) -> dict[str, Any]:
    out = dict(vars(response))
    out["headers"] = vars(out["headers"])
    return out


def test_a_direct_response_is_the_one_httpx_would_build() -> None:
    # direct_response sets what httpx.Response's constructor sets, without its
    # checks: if an httpx release adds, drops or renames an attribute, this fails.
    raw = (
        (b"Content-Type", b"application/json"),
        (b"X-Twice", b"1"),
        (b"x-twice", b"2"),
        (b"X-Latin", b"caf\xe9"),
    )
    stream = AiohttpBody(None)  # type: ignore[arg-type]
    built = direct_response(200, raw, stream)
    expected = httpx.Response(
        200, headers=raw, stream=stream, extensions={"http_version": b"HTTP/1.1"}
    )
    assert _attributes(built) == _attributes(expected)
    assert built.headers.get_list("x-twice") == ["1", "2"]
    assert built.headers.raw == list(raw)


async def test_close_closes_an_answer_once_a_direct_one_as_httpx_would() -> None:
    closed: list[str] = []

    class Aiohttp:
        async def __aexit__(self, *exc: object) -> None:
            closed.append("direct")

    class Stream(httpx.AsyncByteStream):
        async def aclose(self) -> None:
            closed.append("httpx")

    direct = direct_response(200, (), AiohttpBody(Aiohttp()))  # type: ignore[arg-type]
    other = httpx.Response(200, stream=Stream())
    for _ in range(2):
        await UpstreamClient.close(direct)
        await UpstreamClient.close(other)
    assert direct.is_closed and other.is_closed
    assert closed == ["direct", "httpx"]  # each once


class _ReadingProtocol:
    """What a StreamReader asks of its connection: resumed (and paused) reading."""

    connected = True

    def __init__(self) -> None:
        self.resumed = 0
        self.paused = 0

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.resumed += resume_parser  # (feed_eof resumes it without the parser)

    def pause_reading(self) -> None:
        self.paused += 1


def _reader_state(reader: aiohttp.StreamReader) -> dict[str, Any]:
    state = {name: getattr(reader, name) for name in aiohttp.StreamReader.__slots__}
    for name in ("_buffer", "_http_chunk_splits"):
        state[name] = None if state[name] is None else list(state[name])
    del state["_protocol"], state["_loop"], state["_timer"]
    return state


def _fed_reader(
    loop: asyncio.AbstractEventLoop,
    chunks: list[bytes],
    *,
    limit: int,
    http_chunks: bool,
    unfinished: bool = False,
) -> tuple[aiohttp.StreamReader, _ReadingProtocol]:
    """A reader fed ``chunks`` (as HTTP chunks: ``http_chunks``; the last one's
    end never seen: ``unfinished``), then its end."""
    protocol = _ReadingProtocol()
    reader = aiohttp.StreamReader(protocol, limit, loop=loop)  # type: ignore[arg-type]
    for at, chunk in enumerate(chunks):
        if http_chunks:
            reader.begin_http_chunk_receiving()
        reader.feed_data(chunk)
        if http_chunks and not (unfinished and at == len(chunks) - 1):
            reader.end_http_chunk_receiving()
    reader.feed_eof()
    return reader, protocol


@pytest.mark.parametrize("seed", range(40))
async def test_drain_reads_and_leaves_the_reader_as_read_nowait_does(seed: int) -> None:
    # drain is read_nowait(n) for an n at least what is buffered, at the end of
    # a body: the same bytes, every attribute of the reader the same after, and
    # the connection's reading resumed when read_nowait would have resumed it.
    # Drawn: how the body came in chunks (HTTP chunks or not), the reader's
    # limit (reading resumed or not), a first read of part of it (an offset
    # into the first chunk, chunk splits already passed).
    rng = random.Random(seed)
    chunks = [rng.randbytes(rng.randint(1, 300)) for _ in range(rng.randint(1, 25))]
    limit = rng.choice([0, 1, 16, 2**8, 2**16])  # 0: reading never resumed
    http_chunks = rng.random() < 0.7
    fed = {"limit": limit, "http_chunks": http_chunks, "unfinished": rng.random() < 0.3}
    first = rng.choice([0, 0, 1, rng.randint(1, len(chunks[0]))])
    loop = asyncio.get_running_loop()
    general, general_protocol = _fed_reader(loop, chunks, **fed)  # type: ignore[arg-type]
    fast, fast_protocol = _fed_reader(loop, chunks, **fed)  # type: ignore[arg-type]
    if first:
        assert general.read_nowait(first) == fast.read_nowait(first)
        general_protocol.resumed = fast_protocol.resumed = 0
    assert _reader_state(fast) == _reader_state(general)
    expected = general.read_nowait(AiohttpResponseStream.CHUNK_SIZE * 100)
    assert drain(fast) == expected == b"".join(chunks)[first:]
    assert _reader_state(fast) == _reader_state(general)
    assert fast.at_eof()
    assert bool(fast_protocol.resumed) == bool(general_protocol.resumed)
    assert fast_protocol.resumed <= 1
    assert drain(fast) == general.read_nowait(10) == b""  # nothing left
    assert _reader_state(fast) == _reader_state(general)


async def test_drain_refuses_as_read_nowait_does() -> None:
    loop = asyncio.get_running_loop()
    for reader in (_fed_reader(loop, [b"x"], limit=16, http_chunks=True)[0] for _ in range(2)):
        failure = aiohttp.ClientPayloadError("broken")
        reader.set_exception(failure)
        with pytest.raises(aiohttp.ClientPayloadError):
            reader.read_nowait(10)
        with pytest.raises(aiohttp.ClientPayloadError):
            drain(reader)

    class TimedOut:
        def assert_timeout(self) -> None:
            raise TimeoutError

    for _ in range(2):
        timed_out = aiohttp.StreamReader(
            _ReadingProtocol(),  # type: ignore[arg-type]
            16,
            timer=TimedOut(),  # type: ignore[arg-type]
            loop=loop,
        )
        timed_out.feed_data(b"x")
        timed_out.feed_eof()
        with pytest.raises(TimeoutError):
            timed_out.read_nowait(10)
        with pytest.raises(TimeoutError):
            drain(timed_out)
    waiting = aiohttp.StreamReader(_ReadingProtocol(), 16, loop=loop)  # type: ignore[arg-type]
    task = asyncio.ensure_future(waiting.read(1))
    await until(lambda: waiting._waiter is not None)
    with pytest.raises(RuntimeError):
        waiting.read_nowait(1)
    with pytest.raises(RuntimeError):
        drain(waiting)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_whole_drains_a_body_of_many_chunks_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The installed aiohttp is one drain knows (else every body goes through
    # read_nowait, chunk by chunk): a chunked body here whole is read by it.

    assert upstream_client._DRAINABLE
    drained: list[bytes] = []

    def spied(content: aiohttp.StreamReader) -> bytes:
        drained.append(data := drain(content))
        return data

    monkeypatch.setattr(upstream_client, "drain", spied)
    events = [b'data: {"n": %d}\n\n' % n for n in range(20)]
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    body = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events) + b"0\r\n\r\n"
    whole = asyncio.Event()
    server, url = await _serve_raw(head + body, hold=whole)
    async with server, _client(AiohttpTransport()) as client:
        response = await _open(client, url)
        await until(lambda: client.complete(response))
        assert client.whole(response) == b"".join(events)
        assert drained == [b"".join(events)]
        assert [chunk async for chunk in client.raw(response)] == []  # at its end
        await response.aclose()
        whole.set()
