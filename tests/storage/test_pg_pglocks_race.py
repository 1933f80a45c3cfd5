"""PostgreSQL (0023, from its review): a race of everything that writes a
user's day rows - admissions (money cap, team money cap, web searches, per-model limits,
open streams with leases that expire while their answers run), settles,
refunds, recoveries and the settles that supersede them, upload reservations
and releases - from three replicas at once. Afterwards the day rows, summed,
must agree with the ledger (the per-model counters' too), nothing may stay
reserved, no cap may have been passed, and the database must have detected no
deadlock.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.errors import StorageError
from gateway.quota.limits import Limit
from gateway.storage import AdmissionLimits, Pending, open_storage
from gateway.storage.base import Lease, Storage, UsageEvent, WebSearch
from tests.conftest import _truncate

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = [pytest.mark.postgres, pytest.mark.warm_connections]

NOW = datetime.now(UTC)
DAY = NOW.date()
MONTH = DAY.replace(day=1)
USERS = ("u0", "u1", "u2", "u3")
CAP = Decimal("1.00")
TEAM_CAP = Decimal("2.50")
WEB_CAP = 6
UPLOAD_CAP = 5
MODEL_CAP = Decimal("0.80")


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    """The run's database, emptied."""
    await _truncate(postgres_dsn)
    return postgres_dsn


async def test_a_race_of_every_writer_of_the_day_rows_keeps_them_exact(dsn: str) -> None:
    stores: list[Storage] = [await open_storage(DatabaseConfig(url=dsn)) for _ in range(3)]
    rng = random.Random(23)
    own = [
        Limit("cost_per_day", "cost", "day", CAP),
        Limit("cost_per_day_team", "cost", "day", TEAM_CAP, scope="team"),
        Limit("max_concurrent_streams", "streams", "open", Decimal(40)),
    ]
    per_model = Limit("cost_per_day[gpt*]", "cost", "day", MODEL_CAP, models=("gpt*",))
    plain = AdmissionLimits(own)
    modelled = AdmissionLimits([*own, per_model])
    errors: list[BaseException] = []
    seen_over: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        await stores[0].create_team("t", plan="free", now=NOW)
        for user in USERS:
            await stores[0].ensure_user(user, plan="free")
            await stores[0].set_team(user, "t")
        deadlocks_before = await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )

        async def request(store: Storage, user: str, rid: str) -> None:
            kind = rng.choice(["settle", "settle", "settle", "refund", "recover", "upload"])
            if kind == "upload":
                key = f"up-{rid}"
                a = await store.reserve_upload(
                    user, key=key, day=DAY, month_start=MONTH, size=100,
                    limits=[Limit("uploads_per_day", "uploads", "day", Decimal(UPLOAD_CAP))],
                    team="t",
                )  # fmt: skip
                if a.admitted and rng.random() < 0.5:
                    await store.release_upload(user, key=key)
                return
            expired = rng.random() < 0.3
            lease = Lease(
                rid, NOW - timedelta(seconds=1) if expired else NOW + timedelta(minutes=15)
            )
            limits = modelled if user in ("u0", "u1") else plain
            at = NOW - timedelta(hours=1) if kind == "recover" else NOW
            a = await store.admit(
                user, day=DAY, month_start=MONTH, limits=limits, now=at, lease=lease,
                pending=Pending(rid, "chat-messages", total_tokens=7, cost=Decimal("0.10"),
                                reserved_cost=Decimal("0.10")),
                web_search=WebSearch(WEB_CAP, "disable") if rng.random() < 0.5 else None,
                team="t",
            )  # fmt: skip
            if a.counters.of("cost", "day") > CAP:
                seen_over.append(f"{rid}: {a.counters.of('cost', 'day')}")
            if not a.admitted:
                return
            used = rng.randint(0, 1) if a.web_search_reserved else 0
            answer = UsageEvent(
                f"a-{rid}", user, DAY, NOW, "chat-messages", prompt_tokens=3,
                completion_tokens=4, total_tokens=7, cost=Decimal(f"0.0{rng.randint(1, 9)}"),
                request_id=rid, web_searches=used,
            )  # fmt: skip
            if kind == "refund":
                await store.refund(user, day=DAY, lease_id=rid, pending_id=rid)
            elif kind == "recover":
                await store.recover(before=NOW - timedelta(minutes=30), now=NOW)
                await store.settle(answer, lease_id=rid, pending_id=rid)  # supersedes, or settles
            else:
                await store.settle(answer, lease_id=rid, pending_id=rid)

        async def client(c: int) -> None:
            for n in range(25):
                try:
                    await request(stores[c % 3], USERS[c % len(USERS)], f"q{c}-{n}")
                except (StorageError, asyncpg.PostgresError) as exc:
                    errors.append(exc)

        await asyncio.gather(*(client(c) for c in range(16)))
        assert not errors, errors[:3]
        assert not seen_over, seen_over[:3]
        deadlocks = await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
        assert deadlocks == deadlocks_before, f"{deadlocks - deadlocks_before} deadlocks"
        assert await conn.fetchval("SELECT count(*) FROM pending_answers") == 0
        assert await conn.fetchval("SELECT coalesce(sum(cost_reserved), 0) FROM usage_daily") == 0
        team_cost = Decimal(0)
        for user in USERS:
            (today,) = await stores[0].daily(DAY, DAY, user_id=user)
            ledger = await conn.fetchrow(
                "SELECT coalesce(sum(cost), 0) AS cost, coalesce(sum(web_searches), 0) AS web, "
                "coalesce(sum(total_tokens), 0) AS tokens FROM usage_events WHERE user_id = $1",
                user,
            )
            assert ledger is not None
            assert today.cost == ledger["cost"] <= CAP, user
            assert today.web_searches == ledger["web"], user
            assert 0 <= today.web_searches <= WEB_CAP, user
            assert today.total_tokens == ledger["tokens"], user
            held = await conn.fetchval(
                "SELECT count(*) FROM upload_reservations WHERE user_id = $1", user
            )
            assert today.uploads == held, user
            team_cost += today.cost
        assert team_cost <= TEAM_CAP
        # The per-model counters (two rows a key and day, 0023), summed, agree
        # with the ledger too, reserve nothing and stayed within their cap.
        for user in ("u0", "u1"):
            (today,) = await stores[0].daily(DAY, DAY, user_id=user)
            models = await conn.fetchrow(
                "SELECT coalesce(sum(queries), 0) AS queries, coalesce(sum(cost), 0) AS cost, "
                "coalesce(sum(cost_reserved), 0) AS reserved, "
                "coalesce(sum(total_tokens), 0) AS tokens FROM usage_models "
                "WHERE user_id = $1 AND scope = $2 AND day = $3",
                user,
                per_model.counter_key,
                DAY,
            )
            assert models is not None
            assert models["reserved"] == 0, user
            assert models["cost"] == today.cost <= MODEL_CAP, user
            assert models["tokens"] == today.total_tokens, user
            assert models["queries"] == today.queries, user
        # No negative amount shows in a day's sums.
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM (SELECT user_id, day, sum(web_searches) w, sum(cost) c, "
                "sum(cost_reserved) r FROM usage_daily GROUP BY 1, 2) s WHERE w < 0 OR c < 0 OR r < 0"
            )
            == 0
        )
    finally:
        await conn.close()
        for store in stores:
            await store.close()
