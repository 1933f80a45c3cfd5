"""`python -m bench.chunks`: what reading one upstream chunk costs the gateway.

A micro-benchmark of the read loop alone (no client, no meter): an answer of many
small chunks is read through `UpstreamClient.open` and `Response.aiter_raw`, as
the proxy reads it, from two transports:

- ``memory``: a transport whose body is a list in memory, so what is timed is the
  gateway's and httpx's own work per chunk (the layers a chunk passes through);
- ``aiohttp-memory``: httpx-aiohttp's response stream over an aiohttp response
  whose content is that list: the layers of the default transport, timed alone;
- ``aiohttp``: the default transport (httpx-aiohttp) over loopback, from a local
  server in another process that writes the body in small pieces (the kernel may
  merge some, so the count of chunks read is printed too); the reader's CPU time
  per chunk, which includes the event loop's and aiohttp's work.

Prints the best of several rounds, in nanoseconds per chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx
import uvloop
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

from gateway.bodies import BodyFailure
from gateway.upstream_client import UpstreamClient

CHUNK = b'data: {"event": "message", "answer": "xin chao"}\n\n'
TIMEOUT = httpx.Timeout(60.0)


class _Body(httpx.AsyncByteStream):
    def __init__(self, count: int) -> None:
        self.count = count

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            yield CHUNK


class _Memory(httpx.AsyncBaseTransport):
    def __init__(self, count: int) -> None:
        self.count = count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Body(self.count))


class _AiohttpContent:
    def __init__(self, count: int) -> None:
        self.count = count

    async def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            yield CHUNK


class _AiohttpResponse(aiohttp.ClientResponse):
    """An aiohttp response with nothing behind it but its content."""

    def __init__(self, count: int) -> None:
        self.content = _AiohttpContent(count)  # type: ignore[assignment]

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class _AiohttpMemory(_Memory):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        stream = AiohttpResponseStream(_AiohttpResponse(self.count))
        return httpx.Response(200, stream=stream)


def _reading(client: UpstreamClient) -> Any:
    # Before issue 22 the caller mapped errors around the loop (`with client.reading()`);
    # after it, the stream maps them itself.
    reading = getattr(client, "reading", None)
    return reading() if reading is not None else contextlib.nullcontext()


async def _read(
    client: UpstreamClient, url: str, *, clock: Callable[[], float] = time.perf_counter
) -> tuple[int, float]:
    response = await client.open(
        "GET", url, headers=[], content=None, timeout=TIMEOUT, failure=BodyFailure()
    )
    count = 0
    started = clock()
    try:
        with _reading(client):
            async for _chunk in response.aiter_raw():
                count += 1
    finally:
        await response.aclose()
    return count, clock() - started


def _upstream_client(transport: httpx.AsyncBaseTransport) -> tuple[UpstreamClient, Any]:
    http = httpx.AsyncClient(transport=transport, timeout=TIMEOUT)
    return UpstreamClient(SimpleNamespace(client=http)), http  # type: ignore[arg-type]


_SERVER = """
import asyncio, sys
count, piece = int(sys.argv[1]), int(sys.argv[2])
body = sys.argv[3].encode() * count

async def answer(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(
        b"HTTP/1.1 200 OK\\r\\ncontent-type: text/event-stream\\r\\n"
        b"content-length: " + str(len(body)).encode() + b"\\r\\n\\r\\n"
    )
    for start in range(0, len(body), piece):
        writer.write(body[start : start + piece])
        await writer.drain()
        await asyncio.sleep(0.00002)  # small pieces, read one by one
    await reader.read()

async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def _server(count: int, piece: int) -> AsyncIterator[str]:
    """A local upstream in its own process, so only the reader's CPU is timed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVER,
        str(count),
        str(piece),
        CHUNK.decode(),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        port = int(await process.stdout.readline())
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        await process.wait()


async def main(count: int, rounds: int) -> None:
    memory: tuple[type[_Memory], ...] = (_Memory, _AiohttpMemory)
    for name, transport in zip(("memory", "aiohttp-memory"), memory, strict=True):
        client, http = _upstream_client(transport(count))
        runs = [(await _read(client, "http://upstream/")) for _ in range(rounds)]
        await http.aclose()
        best = min(runs, key=lambda r: r[1])
        print(f"{name:<15} {best[0]:>8} chunks  {best[1] / best[0] * 1e9:8.0f} ns/chunk")

    client, http = _upstream_client(AiohttpTransport())
    results = []
    for _ in range(rounds):
        async with _server(count // 20, len(CHUNK)) as url:
            results.append(await _read(client, url, clock=time.process_time))
    await http.aclose()
    best = min(results, key=lambda r: r[1] / r[0])
    print(f"{'aiohttp':<15} {best[0]:>8} chunks  {best[1] / best[0] * 1e9:8.0f} ns/chunk (CPU)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    uvloop.run(main(args.chunks, args.rounds))
