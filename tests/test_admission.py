"""Plans enforced before forwarding: exact under concurrency, calendar resets in
the configured time zone, refusals a frontend can show, failure policies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.clock import FixedClock
from gateway.config import DatabaseConfig
from gateway.keys import new_key
from gateway.storage import Storage, open_storage
from tests.conftest import _truncate
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway, to_toml
from tests.processes import GatewayProcess
from tests.servers import serve
from tests.spool import spooled_lines
from tests.tcpproxy import TCPProxy

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = pytest.mark.warm_connections

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
HCM = "Asia/Ho_Chi_Minh"  # UTC+7, no daylight saving


def plans(**free: Any) -> dict[str, Any]:
    return {"plans": {"free": free}, "accounting": {"timezone": HCM, "default_plan": "free"}}


async def ask(client: httpx.AsyncClient, h: Harness, **headers: str) -> httpx.Response:
    return await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth(**headers))


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as c:
        yield c


# --- exactness under concurrency ----------------------------------------------------


async def test_forty_parallel_requests_with_five_left_forward_exactly_five_sqlite(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans(queries_per_day=5)) as h:
        responses = await asyncio.gather(*(ask(client, h) for _ in range(40)))
        await h.probes.wait_finished(40)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 35
    assert fake.hits("/chat-messages") == 5
    assert {r.json()["code"] for r in responses if r.status_code == 429} == {"daily_query_limit"}


@contextlib.asynccontextmanager
async def two_gateways(
    database: str,
    tmp_path: Path,
    fake: Any,
    limits: dict[str, Any],
    *,
    upstream: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[list[int], str, Storage]]:
    """Two `gateway serve` processes on one database - PostgreSQL (emptied
    first) or a migrated SQLite file - in front of ``fake``, with USER on a plan
    of ``limits``: (their ports, USER's key, storage). ``upstream`` adds
    [upstream] settings, ``settings`` other sections."""
    if database.startswith("postgres"):
        # Every table, as the fixtures empty it: a list of tables here missed
        # pending_answers once 0024 dropped its key to users (no CASCADE left to
        # reach it), and a second test's pending row "after" met the first's.
        await _truncate(database)
    storage = await open_storage(DatabaseConfig(url=database))
    try:
        await storage.ensure_user(USER, plan="free")
        key = new_key()
        await storage.create_key(
            USER,
            key_id=key.id,
            key_hash=key.hash,
            prefix=key.prefix,
            name="",
            now=datetime.now(UTC),
        )
        async with serve(fake) as url:
            config = tmp_path / "gateway.toml"
            config.write_text(
                to_toml(
                    {
                        "server": {"log_level": "info", "reload_interval": 0},
                        "upstream": {
                            "url": url + "/v1",
                            "api_key_env": "TEST_UPSTREAM_KEY",
                            **(upstream or {}),
                        },
                        "database": {"url": database, "spool_file": ""},
                        **plans(**limits),
                        **(settings or {}),
                    }
                )
            )
            procs = await GatewayProcess.start_all(config, {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}, 2)
            try:
                yield [proc.port for proc in procs], key.secret, storage
            finally:
                await asyncio.gather(*(proc.terminate() for proc in procs))
    finally:
        await storage.close()


@pytest.mark.postgres
async def test_forty_parallel_requests_across_two_processes_on_postgres(
    postgres_dsn: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    limits = {"queries_per_day": 5}
    async with two_gateways(postgres_dsn, tmp_path, fake, limits) as (ports, key, _):
        responses = await asyncio.gather(
            *(
                client.post(
                    f"http://127.0.0.1:{ports[i % 2]}/v1/chat-messages",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {key}"},
                )
                for i in range(40)
            )
        )
    assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 35
    assert fake.hits("/chat-messages") == 5


@pytest.mark.postgres
async def test_twenty_parallel_web_searches_with_one_left_across_two_processes_on_postgres(
    postgres_dsn: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """Issue 20: the web-search allowance is reserved in the atomic admission
    step, so two gateway processes sharing the database run one search between
    them when one is left."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    web = {**CHAT, "inputs": {"search_mode": "web"}}
    limits = {"web_searches_per_day": 1}
    async with two_gateways(postgres_dsn, tmp_path, fake, limits) as (ports, key, storage):
        responses = await asyncio.gather(
            *(
                client.post(
                    f"http://127.0.0.1:{ports[i % 2]}/v1/chat-messages",
                    json=web,
                    headers={
                        "Authorization": f"Bearer {key}",
                        "x-fake-metadata": '{"source": "web_search"}',
                        "x-fake-delay-ms": "20",
                    },
                )
                for i in range(20)
            )
        )
        rows = await storage.daily(datetime.now(UTC).date() - timedelta(days=1), date.max)
    assert sorted(r.status_code for r in responses) == [200] + [429] * 19
    assert {r.json()["code"] for r in responses if r.status_code == 429} == {"web_search_limit"}
    assert fake.hits("/chat-messages") == 1
    assert [(row.queries, row.web_searches) for row in rows] == [(1, 1)]


# --- what a refusal looks like ------------------------------------------------------------


async def test_daily_query_refusal_status_body_and_headers(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(datetime(2026, 11, 21, 16, 0, tzinfo=UTC))  # 23:00 in Ho Chi Minh City
    async with running_gateway(sqlite_url, settings=plans(queries_per_day=2), clock=clock) as h:
        first = await ask(client, h)
        second = await ask(client, h)
        refused = await ask(client, h)
    midnight = datetime(2026, 11, 21, 17, 0, tzinfo=UTC)  # 00:00 on the 22nd, local
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining"] == "1"
    assert second.headers["x-ratelimit-remaining"] == "0"
    assert refused.status_code == 429
    assert refused.json() == {
        "code": "daily_query_limit",
        "message": "You have used all 2 questions of your plan for today. It resets at 2026-11-22 00:00 +07.",
        "status": 429,
    }
    assert refused.headers["retry-after"] == "3600"
    assert refused.headers["x-ratelimit-limit"] == "2"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-used"] == "2"
    assert refused.headers["x-ratelimit-resource"] == "queries_per_day"
    assert refused.headers["x-ratelimit-reset"] == str(int(midnight.timestamp()))
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["x-request-id"]


async def test_token_limits_refuse_after_the_answer_that_crossed_them(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(sqlite_url, settings=plans(tokens_per_day=1000)) as h:
        crossing = await ask(client, h)
        await h.probes.wait_finished(1)
        refused = await ask(client, h)
        (event,) = await h.events()
    # The answer that crossed the limit completes and is charged in full...
    assert crossing.status_code == 200 and event.total_tokens == 1168
    # ...and the next one is refused.
    assert refused.status_code == 429 and refused.json()["code"] == "daily_token_limit"
    assert refused.headers["x-ratelimit-resource"] == "tokens_per_day"
    assert refused.headers["x-ratelimit-used"] == "1168"


async def test_concurrent_stream_limit(sqlite_url: str, client: httpx.AsyncClient) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(
        sqlite_url, fake=fake, settings=plans(max_concurrent_streams=1)
    ) as h:
        async with client.stream(
            "POST",
            f"{h.url}/v1/chat-messages",
            json=CHAT,
            headers=h.auth(**{"x-fake-scenario": "hold"}),
        ) as held:
            chunks = held.aiter_raw()
            await anext(chunks)  # the first answer is open upstream
            refused = await ask(client, h)
            fake.release_held()
            async for _ in chunks:
                pass
        await h.probes.wait_finished(2)
        after = await ask(client, h)  # the slot is free again
    assert refused.status_code == 429
    assert refused.json()["code"] == "concurrent_stream_limit"
    assert (
        refused.json()["message"]
        == "You already have 1 answers in progress. Wait for one to finish and try again."
    )
    assert refused.headers["retry-after"] == "5"
    assert after.status_code == 200


# --- calendar periods in the configured time zone -----------------------------------------


async def test_daily_limits_reset_at_local_midnight(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(datetime(2026, 11, 21, 16, 59, 59, tzinfo=UTC))  # 23:59:59 local
    async with running_gateway(sqlite_url, settings=plans(queries_per_day=1), clock=clock) as h:
        assert (await ask(client, h)).status_code == 200
        assert (await ask(client, h)).status_code == 429
        clock.advance(timedelta(seconds=2))  # 00:00:01 local, still the 21st in UTC
        assert (await ask(client, h)).status_code == 200
        await h.probes.wait_finished(3)
        days = sorted(e.day.isoformat() for e in await h.events())
    assert days == ["2026-11-21", "2026-11-22"]


async def test_monthly_limits_reset_at_the_local_first_of_the_month(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(datetime(2026, 11, 30, 16, 30, tzinfo=UTC))  # 23:30 on Nov 30, local
    async with running_gateway(sqlite_url, settings=plans(tokens_per_month=1000), clock=clock) as h:
        assert (await ask(client, h)).status_code == 200
        await h.probes.wait_finished(1)
        refused = await ask(client, h)
        assert refused.json()["code"] == "monthly_token_limit"
        assert refused.headers["retry-after"] == "1800"
        clock.advance(timedelta(minutes=31))  # 00:01 on Dec 1 local
        assert (await ask(client, h)).status_code == 200


# --- refunds and overrides ---------------------------------------------------------------


async def test_a_failed_upstream_gives_the_query_back(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(sqlite_url, settings=plans(queries_per_day=1)) as h:
        failed = await ask(client, h, **{"x-fake-status": "500"})
        await h.probes.wait_finished(1)
        ok = await ask(client, h)
    assert failed.status_code == 500 and ok.status_code == 200


async def test_per_user_overrides_replace_plan_limits(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(sqlite_url, settings=plans(queries_per_day=1)) as h:
        await h.storage.set_override(USER, "queries_per_day", 3)
        results = [(await ask(client, h)).status_code for _ in range(4)]
        bob = await h.add_user("bob")
        bob_results = [
            (await ask(client, h, Authorization=f"Bearer {bob}")).status_code for _ in range(2)
        ]
    assert results == [200, 200, 200, 429]
    assert bob_results == [200, 429]  # the plan's limit for everyone else


# --- the database going away during admission ---------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, 503),  # the default: closed for queries and tokens
        ({"queries": "open", "tokens": "open"}, 200),
        ({"queries": "open", "tokens": "closed"}, 503),
    ],
    ids=["default-closed", "all-open", "tokens-closed"],
)
async def test_database_down_during_admission(
    pg_behind_proxy: tuple[str, TCPProxy],
    tmp_path: Path,
    client: httpx.AsyncClient,
    policy: dict[str, str],
    expected: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, proxy = pg_behind_proxy
    settings = {
        **plans(queries_per_day=10, tokens_per_day=100_000),
        "admission": {"on_storage_error": policy},
        "database": {
            "connect_timeout": 1.0,
            "command_timeout": 2.0,
            "spool_file": str(tmp_path / "spool.jsonl"),
        },
    }
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(url, fake=fake, settings=settings) as h:
        assert (await ask(client, h)).status_code == 200  # warms the key and user caches
        await h.probes.wait_finished(1)
        await proxy.cut()
        response = await ask(client, h)
        await h.probes.wait_finished(2)
        failures = h.gateway.metrics.get(
            "gateway_admission_storage_failures_total",
            policy="closed" if expected == 503 else "open",
        )
        await h.gateway.settler.close()  # a pending ledger retry goes to the spool
        await proxy.restore()
    assert response.status_code == expected
    assert failures == 1
    assert any("admission could not reach the database" in r.message for r in caplog.records)
    if expected == 503:
        assert response.json() == {
            "code": "storage_unavailable",
            "message": "The usage database is unavailable; try again shortly.",
            "status": 503,
        }
        assert response.headers["retry-after"] == "5"
        assert fake.hits("/chat-messages") == 1
    else:
        assert fake.hits("/chat-messages") == 2
        # the answer went through; its usage could not be written, so it was spooled
        spooled = [orjson.loads(line) for line in spooled_lines(tmp_path / "spool.jsonl")]
        assert [s["total_tokens"] for s in spooled] == [1168]
