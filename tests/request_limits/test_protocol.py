"""`gateway serve` times out request heads (server.head_timeout) and caps the
connections a worker holds (server.max_connections), so idle or slowly written
heads cannot hold a worker's file descriptors for ever."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from gateway.config import ENV_CONFIG
from gateway.request_limits import protocol
from tests.processes import GatewayProcess
from tests.servers import serve

PROTOCOL = "gateway.request_limits.protocol:BoundedHeadProtocol"
HEAD_TIMEOUT = 0.5


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body", False):
        pass
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def limits_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A configuration file for the protocol to read, as a `gateway serve` worker does."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[server]\nhead_timeout = {HEAD_TIMEOUT}\nmax_connections = 20\n\n[plans.free]\n"
    )
    monkeypatch.setenv(ENV_CONFIG, str(config))
    monkeypatch.setattr(protocol._Refusals, "warned_at", None)
    monkeypatch.setattr(protocol._Refusals, "count", 0)
    protocol._configured.cache_clear()
    yield
    protocol._configured.cache_clear()


def most_admitted(cap: int, head_timeout: float, accepting: float) -> int:
    """The most connections a worker capped at ``cap`` can have taken while it
    spent ``accepting`` seconds accepting idle ones: each taken one is closed
    after ``head_timeout``, freeing its slot. On a machine that accepts them at
    once this is ``cap``; on a loaded one, a slot more per timeout elapsed."""
    return cap * (1 + int(accepting // head_timeout))


async def read_all(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionError):
            while piece := await reader.read(65536):
                data += piece
    return data


@pytest.mark.usefixtures("limits_config")
async def test_a_slowly_written_head_is_answered_408_and_closed() -> None:
    async with serve(hello, http=PROTOCOL) as url:
        parts = urlsplit(url)
        # Timed from before the connection: the server's clock starts when it
        # accepts, which a loaded machine may report to the client much later.
        began = time.monotonic()
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")

        async def trickle() -> None:
            # A header byte every 50 ms: data keeps coming, the head never ends.
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b"a")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        dribbler = asyncio.create_task(trickle())
        try:
            data = await read_all(reader)
        finally:
            dribbler.cancel()
            writer.close()
        elapsed = time.monotonic() - began
    status, _, rest = data.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2]) == {
        "code": "request_timeout",
        "message": f"The request head did not arrive within {HEAD_TIMEOUT:g} seconds.",
        "status": 408,
    }
    assert HEAD_TIMEOUT <= elapsed < HEAD_TIMEOUT + 5


@pytest.mark.usefixtures("limits_config")
async def test_idle_connections_are_closed_after_the_head_timeout() -> None:
    async with serve(hello, http=PROTOCOL) as url:
        parts = urlsplit(url)
        connections = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(10)]
        try:
            answers = await asyncio.gather(*(read_all(r) for r, _ in connections))
        finally:
            for _, writer in connections:
                writer.close()
    assert answers == [b""] * 10  # closed, without an answer to a question not asked


@pytest.mark.usefixtures("limits_config")
async def test_a_kept_alive_connection_gets_the_head_timeout_for_each_head() -> None:
    async with serve(hello, http=PROTOCOL) as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                first = await reader.readuntil(b"ok")
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never ends it
            data = await read_all(reader)
        finally:
            writer.close()
    assert first.startswith(b"HTTP/1.1 200")
    assert data.startswith(b"HTTP/1.1 408")


@pytest.mark.usefixtures("limits_config")
async def test_connections_past_the_cap_are_refused_503_and_the_rest_served(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with serve(hello, http=PROTOCOL) as url:
        parts = urlsplit(url)
        held = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(20)]
        try:
            # The 21st and later: refused at once, in the upstream's error shape.
            extra = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(5)]
            refusals = await asyncio.gather(*(read_all(r, timeout=5) for r, _ in extra))
            for _, writer in extra:
                writer.close()
            # A held connection still gets its answer.
            reader, writer = held[0]
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                served = await reader.readuntil(b"ok")
        finally:
            for _, writer in held:
                writer.close()
    for data in refusals:
        status, _, rest = data.partition(b"\r\n")
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert b"retry-after: 5" in rest
        assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["code"] == "too_many_connections"
    assert served.startswith(b"HTTP/1.1 200")
    # uvicorn configures its own logger (to stderr, not propagated to caplog's).
    warnings = [line for line in capsys.readouterr().err.splitlines() if "connection limit" in line]
    assert len(warnings) == 1  # once, not once per connection
    assert "server.max_connections = 20" in warnings[0]


def test_the_default_cap_leaves_room_under_the_open_files_limit() -> None:
    cap = protocol.derived_max_connections(10)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert cap >= 16 and (soft == resource.RLIM_INFINITY or 2 * cap + 10 < soft)


async def flood(
    gateway: GatewayProcess, count: int, head_timeout: float
) -> tuple[list[bytes], float, str, bytes]:
    """Open ``count`` idle connections to ``gateway serve`` one after another and
    read each to its end: their answers, an upper bound on the seconds the worker
    spent accepting them, the worker's connection-limit warning, and a health
    check's answer made after.

    The bound is not the time the client took to open them: the kernel completes
    a connection before the worker accepts it from the backlog, so a loaded
    worker may still be accepting after the last one is open, and slots freed
    meanwhile admit more (once seen: 92 admitted with a cap of 91). A refused
    connection is answered when it is accepted, and a taken one closed
    ``head_timeout`` after: each answer's end, less that timeout for a closed
    one, is at or after its accept."""
    started = time.monotonic()
    idle = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(count)]

    async def answer(reader: asyncio.StreamReader) -> tuple[bytes, float]:
        data = await read_all(reader)
        accepted_by = time.monotonic() - started - (0 if data else head_timeout)
        return data, accepted_by

    read = await asyncio.gather(*(answer(r) for r, _ in idle))
    for _, writer in idle:
        writer.close()
    answers = [data for data, _ in read]
    accepting = max(accepted_by for _, accepted_by in read)
    warning = await gateway.wait_for_line("connection limit reached")
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    health = await read_all(reader)
    writer.close()
    return answers, accepting, warning, health


# The flood tests' head timeout: the time they wait for the idle connections to
# be closed. Far longer than opening the connections takes, even under load.
FLOOD_HEAD_TIMEOUT = 0.25


async def test_gateway_serve_times_out_heads_and_caps_connections(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[server]\nhead_timeout = {FLOOD_HEAD_TIMEOUT}\nmax_connections = 50\n"
        "reload_interval = 0\n\n"
        f'[database]\nurl = "sqlite:///{tmp_path}/gateway.db"\nspool_file = ""\n\n[plans.free]\n'
    )
    gateway = await GatewayProcess.start(config, {})
    try:
        # 200 idle connections, far past the cap: the worker keeps serving.
        answers, accepting, warning, health = await flood(gateway, 200, FLOOD_HEAD_TIMEOUT)
    finally:
        await gateway.terminate()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    closed = [a for a in answers if a == b""]
    assert len(refused) + len(closed) == 200
    assert len(refused) >= 1 and len(closed) <= most_admitted(50, FLOOD_HEAD_TIMEOUT, accepting)
    assert "server.max_connections = 50" in warning
    assert health.startswith(b"HTTP/1.1 200")


async def test_gateway_serve_under_a_low_open_files_limit_keeps_serving(tmp_path: Path) -> None:
    """The audit's case: more idle connections than the open-files limit allows.
    With the derived cap, extras are refused at once and the idle ones time out,
    so the worker never runs out of descriptors and keeps serving."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[server]\nhead_timeout = {2 * FLOOD_HEAD_TIMEOUT}\nreload_interval = 0\n\n"
        f'[database]\nurl = "sqlite:///{tmp_path}/gateway.db"\nspool_file = ""\n\n[plans.free]\n'
    )
    gateway = await GatewayProcess.start(config, {})
    try:
        # The cap is derived at the first connection, from the limit then in force:
        # (256 - 10 database connections - 64) // 2 = 91.
        _, hard = resource.prlimit(gateway.proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(gateway.proc.pid, resource.RLIMIT_NOFILE, (256, hard))
        answers, accepting, warning, health = await flood(gateway, 400, 2 * FLOOD_HEAD_TIMEOUT)
    finally:
        await gateway.terminate()
    assert "server.max_connections = 91" in warning
    refused = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
    assert refused >= 1 and 400 - refused <= most_admitted(91, 2 * FLOOD_HEAD_TIMEOUT, accepting)
    assert health.startswith(b"HTTP/1.1 200")


# --- a client that stops reading (server.send_timeout) -------------------------------

SEND_TIMEOUT = 0.5
BIG = 8_000_000  # more than the sockets on both ends hold


class Watched(protocol.BoundedHeadProtocol):
    """The protocol, telling a test when a connection ends."""

    settings = protocol.HeadSettings(
        head_limit=65536,
        refusal=b"",
        head_timeout=10.0,
        timeout=b"",
        max_connections=20,
        busy=b"",
        send_timeout=SEND_TIMEOUT,
    )
    lost: asyncio.Event | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if Watched.lost is not None:
            Watched.lost.set()


class Impatient(Watched):
    """`Watched` with a short send timeout, for a client that reads nothing at all:
    no lower bound to keep, only the timeout firing to see."""

    settings = dataclasses.replace(Watched.settings, send_timeout=0.1)


class Looked(Watched):
    """`Watched`, counting the send timer's looks that found the client had read
    some (and so let it go on)."""

    looks_with_progress = 0

    def _send_timed_out(self) -> None:
        before = self._send_timer
        super()._send_timed_out()
        if self._send_timer is not None and self._send_timer is not before:
            Looked.looks_with_progress += 1


async def _stalled_client(url: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request from a client that never reads its answer (a small receive
    buffer, so the server's writes back up at once); the connection stays open."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


def _whole(body: bytes) -> Any:
    """An application answering ``body`` whole, in one send, with its length."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize("pieces", [1, 16], ids=["written-then-returned", "sends-waiting"])
async def test_a_client_that_stops_reading_is_disconnected_after_the_send_timeout(
    pieces: int,
) -> None:
    """A client that keeps its connection but reads nothing: once the server's writes
    have waited server.send_timeout, the connection is aborted. A send waiting for
    the client returns (as for a client that left), and an answer already handed to
    the transport (the application done) no longer holds the connection."""
    Watched.lost = asyncio.Event()
    ended = asyncio.Event()
    size = BIG // pieces

    async def big(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            headers = [(b"content-length", str(size * pieces).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for i in range(pieces):
                more = i < pieces - 1
                await send({"type": "http.response.body", "body": b"x" * size, "more_body": more})
        finally:
            ended.set()

    async with serve(big, http=f"{__name__}:Impatient") as url:
        _, writer = await _stalled_client(url, "/")
        try:
            async with asyncio.timeout(15):
                await ended.wait()  # the application is not held by the client
                await Watched.lost.wait()  # nor is the connection
            assert not writer.transport.is_closing()  # the client did not leave
        finally:
            writer.transport.abort()


async def test_a_client_that_reads_slowly_gets_its_whole_answer() -> None:
    """The send timeout counts one stop of the client's reading, not the whole
    answer (one write, so the server's writes stay paused throughout): a client
    that stops several times, each time for less than it, and for more than it in
    all, reads the whole answer."""
    Watched.lost = asyncio.Event()
    body = b"x" * BIG
    async with serve(_whole(body), http=f"{__name__}:Watched") as url:
        reader, writer = await _stalled_client(url, "/")
        try:
            await reader.readuntil(b"\r\n\r\n")
            read = 0
            for _ in range(3):
                # Pacing the client (not waiting for something): each stop shorter
                # than the timeout, all of them longer.
                await asyncio.sleep(SEND_TIMEOUT * 0.4)
                read += len(await reader.readexactly(len(body) // 8))
            read += len(await reader.readexactly(len(body) - read))
        finally:
            writer.close()
    assert read == len(body)


def test_the_send_timeout_is_read_from_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[server]\nsend_timeout = 2.5\n\n[plans.free]\n")
    monkeypatch.setenv(ENV_CONFIG, str(config))
    protocol._configured.cache_clear()
    try:
        assert protocol._configured().send_timeout == 2.5
    finally:
        protocol._configured.cache_clear()


async def test_a_client_that_reads_steadily_but_slowly_is_not_cut() -> None:
    """A client that never stops reading, only reads slower than the server
    writes: each look of the send timeout finds it has read some, so it is not
    cut. (The kernel's send buffer, several times what it reads in one send
    timeout, holds what it reads: the transport's own buffer shrinks only once
    the kernel has room for a large part of it.)"""
    Watched.lost = asyncio.Event()
    Looked.looks_with_progress = 0
    body = b"x" * BIG
    async with serve(_whole(body), http=f"{__name__}:Looked") as url:
        reader, writer = await _stalled_client(url, "/")
        try:
            await reader.readuntil(b"\r\n\r\n")
            read = 0
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while Looked.looks_with_progress < 3:
                    # Pacing the client (not waiting for something): it reads
                    # 16 KiB twenty times per send timeout.
                    await asyncio.sleep(SEND_TIMEOUT / 20)
                    read += len(await reader.readexactly(16384))
            cut = Watched.lost.is_set()
        finally:
            writer.close()
    assert Looked.looks_with_progress >= 3 and not cut
