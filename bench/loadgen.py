"""Python load generators (aiohttp): latency at a fixed rate, open streams, counted answers.

Saturation throughput is wrk's job (bench/post.lua); these measure what wrk
cannot: time to first and last byte at a fixed rate, holding thousands of
streams open, and sending an exact number of answers.

The latency generator is open loop: requests start on schedule whether or not
earlier ones have finished (each on its own connection from a pool, a new one
when none is free), so a slow server's queueing shows in its latency instead of
slowing the generator down. Each request is timed from the moment it is
actually sent; how late the generator itself started it is kept as ``lag``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

T = TypeVar("T")

_END = b'"event":"message_end"'


@dataclass(frozen=True, slots=True)
class Sample:
    ok: bool
    ttfb: float  # seconds from sending the request to the first body byte
    ttlb: float  # seconds from sending the request to the end of the answer
    error: str = ""
    lag: float = 0.0  # how late the generator started it (open loop only)
    request_id: str = ""  # the gateway's X-Request-Id, to find the answer in its ledger


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
        auto_decompress=False,
    )


async def _answer(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    scheduled: float | None = None,
) -> Sample:
    start = time.perf_counter()
    lag = start - scheduled if scheduled is not None else 0.0
    try:
        async with session.post(url, data=body, headers=headers) as response:
            first = await response.content.readany()
            ttfb = time.perf_counter() - start
            tail = first
            while chunk := await response.content.readany():
                tail = (tail + chunk)[-4096:]
            ttlb = time.perf_counter() - start
            request_id = response.headers.get("x-request-id", "")
            if response.status != 200:
                return Sample(False, ttfb, ttlb, f"HTTP {response.status}", lag, request_id)
            if _END not in tail:
                return Sample(False, ttfb, ttlb, "answer without message_end", lag, request_id)
            return Sample(True, ttfb, ttlb, "", lag, request_id)
    except (aiohttp.ClientError, TimeoutError) as exc:
        elapsed = time.perf_counter() - start
        return Sample(False, elapsed, elapsed, f"{type(exc).__name__}: {exc}", lag)


async def fetch(
    url: str, headers: Mapping[str, str], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One request, whole body: to check that a path really streams a full answer."""
    async with (
        _session() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def open_loop(
    url: str,
    headers: Sequence[Mapping[str, str]],
    body: bytes,
    *,
    rate: float,
    duration: float,
    warmup: float = 0.5,
) -> list[Sample]:
    """Start ``rate`` answers per second for ``warmup + duration`` seconds; return the
    samples of the last ``duration`` seconds."""
    async with _session() as session:
        total = int((warmup + duration) * rate)
        skip = int(warmup * rate)
        tasks: list[asyncio.Task[Sample]] = []
        origin = time.perf_counter() + 0.01
        for i in range(total):
            scheduled = origin + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request_headers = headers[i % len(headers)]
            tasks.append(
                asyncio.create_task(_answer(session, url, request_headers, body, scheduled))
            )
        samples = await asyncio.gather(*tasks)
    return list(samples[skip:])


async def answers(
    url: str,
    headers: Sequence[Mapping[str, str]],
    body: bytes,
    *,
    count: int,
    concurrency: int = 1,
) -> list[Sample]:
    """Exactly ``count`` answers, ``concurrency`` at a time, each read to the end."""
    queue = iter(range(count))
    samples: list[Sample] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            samples.append(await _answer(session, url, headers[i % len(headers)], body))

    async with _session() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return samples


async def hold_streams(
    url: str,
    headers: Sequence[Mapping[str, str]],
    body: bytes,
    *,
    count: int,
    measure: Callable[[], Awaitable[T]],
    open_timeout: float = 60.0,
    connecting: int = 100,
) -> tuple[int, T]:
    """Open ``count`` streams (each until its first body byte), call ``measure`` while
    they are all open, then drop them. Returns how many were open, and what
    ``measure`` returned."""
    opened = failed = 0
    all_settled = asyncio.Event()
    release = asyncio.Event()
    gate = asyncio.Semaphore(connecting)  # do not flood the listen backlog

    def settled(ok: bool) -> None:
        nonlocal opened, failed
        if ok:
            opened += 1
        else:
            failed += 1
        if opened + failed == count:
            all_settled.set()

    async def one(session: aiohttp.ClientSession, headers: Mapping[str, str]) -> None:
        async with gate:
            try:
                response = await session.post(url, data=body, headers=headers)
            except (aiohttp.ClientError, TimeoutError):
                settled(False)
                return
            try:
                await response.content.readany()
            except (aiohttp.ClientError, TimeoutError):
                response.close()
                settled(False)
                return
        try:
            settled(response.status == 200)
            await release.wait()
        finally:
            response.close()  # drop the connection mid-answer

    async with _session() as session:
        tasks = [asyncio.create_task(one(session, headers[i % len(headers)])) for i in range(count)]
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_settled.wait(), open_timeout)
            result = await measure()
            return opened, result
        finally:
            release.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
