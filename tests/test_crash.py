"""Nothing lost when a gateway process dies or is stopped mid-answer: real
`gateway serve` processes in front of a fake Dify streaming slowly, killed with
SIGKILL or stopped with SIGTERM, on SQLite and on PostgreSQL (docs/quotas.md,
"Crash safety"; docs/proxy.md, "Shutting down")."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.clock import FixedClock
from gateway.config import parse_config
from gateway.keys import new_key
from gateway.runtime import Gateway
from gateway.storage import AdmissionLimits, Pending, Storage, UsageEvent
from gateway.usage import estimate_tokens
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, direct_request, running_gateway, to_toml
from tests.processes import GatewayProcess
from tests.servers import serve

CHAT = {"query": "Xin chào, hãy kể một câu chuyện", "inputs": {}, "response_mode": "streaming"}
ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
ALL_TIME = (date(2000, 1, 1), date(2100, 1, 1))


async def user_key(storage: Storage) -> str:
    await storage.ensure_user(USER, plan="free")
    key = new_key()
    await storage.create_key(
        USER, key_id=key.id, key_hash=key.hash, prefix=key.prefix, name="", now=datetime.now(UTC)
    )
    return key.secret


@dataclass
class Setup:
    fake: FakeDify
    client: httpx.AsyncClient
    config: Path  # the gateway processes' configuration file
    key: str  # a gateway key of USER


@contextlib.asynccontextmanager
async def setup(
    storage: Storage, database_url: str, tmp_path: Path, **sections: Any
) -> AsyncIterator[Setup]:
    """A fake Dify on a real socket, a client, and a configuration file for
    gateway processes in front of it (``sections`` merged in)."""
    key = await user_key(storage)
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with serve(fake) as upstream, httpx.AsyncClient(timeout=30) as client:
        data: dict[str, Any] = {
            "server": {"log_level": "info", "reload_interval": 0},
            "upstream": {"url": upstream + "/v1", "api_key_env": "TEST_UPSTREAM_KEY"},
            "database": {"url": database_url, "spool_file": str(tmp_path / "spool.jsonl")},
            "accounting": {"timezone": "UTC", "default_plan": "free"},
            "plans": {"free": {"max_concurrent_streams": 5}},
        }
        for name, values in sections.items():
            data[name] = {**data[name], **values}
        config = tmp_path / "gateway.toml"
        config.write_text(to_toml(data))
        try:
            yield Setup(fake, client, config, key)
        finally:
            # Held answers must end before the fake's server can shut down.
            fake.release_held()


async def events(storage: Storage) -> list[UsageEvent]:
    return [e async for e in storage.events(*ALL_TIME)]


async def open_answer(
    client: httpx.AsyncClient, url: str, key: str, **headers: str
) -> tuple[httpx.Response, AsyncIterator[bytes]]:
    """Start a streaming answer and wait for its first bytes (admitted, forwarded,
    the upstream answering)."""
    request = client.build_request(
        "POST",
        f"{url}/v1/chat-messages",
        json=CHAT,
        headers={"Authorization": f"Bearer {key}", **headers},
    )
    response = await client.send(request, stream=True)
    assert response.status_code == 200
    chunks = response.aiter_raw()
    await anext(chunks)
    return response, chunks


async def test_a_gateway_killed_mid_answer_leaves_it_to_be_recovered_as_an_estimate(
    database_url: str, storage: Storage, tmp_path: Path
) -> None:
    async with setup(
        storage,
        database_url,
        tmp_path,
        # An answer's limits bound how long before its pending row is taken for lost
        # (database.recover_after): short, so the second process need not wait long.
        upstream={"total_timeout": 1.0, "disconnect_grace": 0.2},
        database={"recover_after": 1.2, "recover_interval": 0.2},
    ) as s:
        first = await GatewayProcess.start(s.config, ENV)
        try:
            response, _ = await open_answer(
                s.client, first.url, s.key, **{"x-fake-scenario": "hold"}
            )
            # Mid-answer, the process dies without a chance to record anything.
            await first.kill()
            await response.aclose()
        finally:
            await first.kill()
        assert await events(storage) == []
        (day,) = await storage.daily(*ALL_TIME)
        assert day.queries == 1  # the query was spent at admission

        second = await GatewayProcess.start(s.config, ENV)
        try:
            await second.wait_for_line("recovered 1 pending answer")
        finally:
            assert await second.terminate() == 0
    (recovered,) = await events(storage)
    prompt = estimate_tokens(len(CHAT["query"]))  # type: ignore[arg-type]
    assert (recovered.outcome, recovered.estimated, recovered.endpoint) == (
        "recovered",
        True,
        "chat-messages",
    )
    assert (recovered.prompt_tokens, recovered.total_tokens) == (prompt, prompt)
    assert recovered.answer_id == f"gw-{recovered.request_id}"
    (day,) = await storage.daily(*ALL_TIME)
    assert (day.queries, day.total_tokens) == (1, prompt)  # the query stays spent
    user = await storage.get_user(USER)
    assert user is not None and user.lifetime_tokens == prompt
    # Nothing else pending, and its stream slot is free.
    assert (
        await storage.recover(before=datetime(2100, 1, 1, tzinfo=UTC), now=datetime.now(UTC)) == []
    )
    assert await storage.open_streams(USER, now=datetime.now(UTC)) == 0


async def test_sigterm_lets_open_answers_finish_within_the_grace_and_charges_the_rest(
    database_url: str, storage: Storage, tmp_path: Path
) -> None:
    async with setup(storage, database_url, tmp_path, server={"shutdown_grace": 1}) as s:
        client, key, fake = s.client, s.key, s.fake
        gateway = await GatewayProcess.start(s.config, ENV)
        try:
            # One answer that ends well within the grace (ten events 20 ms apart), one
            # that never would.
            quick, quick_rest = await open_answer(
                client, gateway.url, key, **{"x-fake-delay-ms": "20"}
            )
            held, held_rest = await open_answer(
                client, gateway.url, key, **{"x-fake-scenario": "hold"}
            )
            gateway.signal(signal.SIGTERM)
            await gateway.wait_for_line("Waiting for connections to close")
            # No new requests once shutting down.
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{gateway.url}/healthz")
            quick_body = b"".join([chunk async for chunk in quick_rest])
            held_body = b"".join([chunk async for chunk in held_rest])
            code = await gateway.wait()
        finally:
            await gateway.kill()
        await quick.aclose()
        await held.aclose()
    assert code == 0, gateway.log
    assert b"message_end" in quick_body and b"message_end" not in held_body
    assert b"shutting_down" in held_body  # told why, and the stream ended properly
    by_outcome = {e.outcome: e for e in await events(storage)}
    assert set(by_outcome) == {"complete", "shutdown"}
    finished, cut = by_outcome["complete"], by_outcome["shutdown"]
    # The answer that finished is recorded exactly as the upstream reported it...
    assert not finished.estimated
    assert (finished.prompt_tokens, finished.completion_tokens) == (
        fake.usage.prompt_tokens,
        fake.usage.completion_tokens,
    )
    assert finished.cost == fake.usage.total_price
    # ...the one cut at the end of the grace as an estimate of what was read.
    assert cut.estimated and cut.total_tokens > 0
    assert (
        await storage.recover(before=datetime(2100, 1, 1, tzinfo=UTC), now=datetime.now(UTC)) == []
    )
    assert not (tmp_path / "spool.jsonl").exists()  # nothing needed the spool
    (day,) = await storage.daily(*ALL_TIME)
    assert day.queries == 2


# --- cut before the upstream answered ------------------------------------------------------


class Arrivals:
    """An upstream wrapper that says when an answer request has reached it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.arrived = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/chat-messages"):
            self.arrived.set()
        await self.app(scope, receive, send)


async def test_an_answer_cut_by_shutdown_before_its_headers_is_charged_the_prompt_estimate(
    sqlite_url: str,
) -> None:
    """The upstream has the request (and may be generating, and billing, the
    answer) when the shutdown grace runs out: the query stays spent and the
    prompt estimate is recorded, as for an upstream timeout."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    upstream = Arrivals(fake)
    blocking = {**CHAT, "response_mode": "blocking"}
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        # A blocking answer, held: the upstream sends no headers.
        scope, receive = direct_request(
            h.key, orjson.dumps(blocking), (b"x-fake-scenario", b"hold")
        )

        async def send(message: dict[str, Any]) -> None:
            raise AssertionError(f"nothing is sent before the upstream answers: {message}")

        task = asyncio.create_task(h.app(scope, receive, send))
        await upstream.arrived.wait()
        task.cancel()  # what uvicorn does when server.shutdown_grace runs out
        with pytest.raises(asyncio.CancelledError):
            await task
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        (day,) = await h.storage.daily(*ALL_TIME)
        fake.release_held()
    prompt = estimate_tokens(len(CHAT["query"]))  # type: ignore[arg-type]
    assert (event.outcome, event.estimated, event.total_tokens) == ("shutdown", True, prompt)
    assert day.queries == 1
    assert h.gateway.metrics.get("gateway_answers_cut_at_shutdown_total") == 1


# --- recovery in a running gateway ---------------------------------------------------------


async def test_a_running_gateway_recovers_answers_once_they_are_older_than_the_bound(
    sqlite_url: str,
) -> None:
    """Periodically, not only at start-up: another process's answer, admitted and
    never settled, is recovered once older than database.recover_after."""
    clock = FixedClock(datetime(2026, 11, 21, 9, 0, tzinfo=UTC))
    settings = {
        "upstream": {"total_timeout": 5.0, "disconnect_grace": 1.0},
        "database": {"recover_after": 20.0, "recover_interval": 0.01},
    }
    async with running_gateway(sqlite_url, settings=settings, clock=clock) as h:
        admitted = await h.storage.admit(
            USER,
            day=clock.now().date(),
            month_start=clock.now().date().replace(day=1),
            limits=AdmissionLimits(),
            now=clock.now(),
            pending=Pending(id="elsewhere-1", endpoint="chat-messages", total_tokens=7),
        )
        assert admitted.admitted
        passes = h.probes.recoveries
        await passes.wait_for(passes.value + 2)
        assert await h.events() == []  # too young to be taken for lost
        clock.advance(timedelta(seconds=21))
        await passes.wait_for(passes.value + 2)
        (event,) = await h.events()
        assert h.gateway.metrics.get("gateway_answers_recovered_total") == 1
    assert (event.answer_id, event.outcome, event.total_tokens) == (
        "gw-elsewhere-1",
        "recovered",
        7,
    )


def test_the_recovery_bound_is_never_shorter_than_the_longest_answer() -> None:
    def bound(**database: float) -> timedelta:
        config = parse_config(
            {
                "upstream": {"total_timeout": 30.0, "disconnect_grace": 5.0},
                "database": database,
            },
            env={},
        )
        return Gateway(config).recover_after

    # The answer's limits, each read on after the stop call it brings (10 s, at
    # most its own length: relay.STOP_LEAD): 30 + 10 + 5 + 5.
    assert bound() == timedelta(seconds=110)  # derived: the longest answer plus a minute
    assert bound(recover_after=120.0) == timedelta(seconds=120)
    assert bound(recover_after=10.0) == timedelta(seconds=50)  # raised to the longest


def test_the_recovery_bound_and_lease_cover_a_request_that_walks_its_fallbacks() -> None:
    # Review of issue 23: each attempt of a blocking answer may wait connect_timeout
    # and then total_timeout for its headers before a fallback is tried, so a
    # request with one fallback may be pending twice as long (+ grace) before it
    # settles; its pending row and stream lease were taken for lost after one.
    from gateway.snapshot import longest_answer

    up = {"kind": "openai", "total_timeout": 300.0, "disconnect_grace": 30.0}
    config = parse_config(
        {
            "upstreams": {
                "a": {
                    **up,
                    "url": "http://a/v1",
                    "api_key_env": "A",
                    "mount": "/v1",
                    "fallbacks": ["b"],
                },
                "b": {**up, "url": "http://b/v1", "api_key_env": "B", "fallbacks": ["c"]},
                # c is b's fallback: a's requests may walk a, b, c
                "c": {**up, "url": "http://c/v1", "api_key_env": "C", "disconnect_grace": 90.0},
            }
        },
        env={},
    )
    walk = 2 * (5.0 + 300.0) + 300.0 + 90.0  # two header waits, then c's deadline and grace
    assert longest_answer(config) == walk
    # The stream lease (Snapshot.lease_ttl) is longest_answer + 60 too.
    assert Gateway(config).recover_after == timedelta(seconds=walk + 60)
