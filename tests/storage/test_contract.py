"""The storage contract: one suite, run against SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from gateway import storage as storage_package
from gateway.config import DatabaseConfig
from gateway.errors import NotFound, StorageError
from gateway.quota.limits import Limit
from gateway.storage import (
    Admission,
    AdmissionLimits,
    AlertCheck,
    AlertRequest,
    AnswerOwner,
    ConversationFeatures,
    Lease,
    Pending,
    Storage,
    UsageEvent,
    UsageGroup,
    WebSearch,
    functions,
    migrations,
    open_storage,
)
from gateway.storage.base import stored_id

NOW = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
DAY = date(2026, 11, 21)
MONTH = date(2026, 11, 1)
BACKENDS = ("sqlite", "postgres")


def event(
    answer_id: str,
    *,
    user: str = "alice",
    day: date = DAY,
    tokens: int = 100,
    cost: str = "0.0013030",
    **kw: object,
) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=day,
        created_at=NOW,
        endpoint="chat-messages",
        prompt_tokens=tokens - tokens // 4,
        completion_tokens=tokens // 4,
        total_tokens=tokens,
        cost=Decimal(cost),
        **kw,  # type: ignore[arg-type]
    )


async def test_migrate_is_idempotent(storage: Storage) -> None:
    assert await storage.migrate() == 0
    assert await storage.migrate() == 0


async def test_ensure_user_creates_once(storage: Storage) -> None:
    created = await storage.ensure_user("alice", plan="free")
    assert (created.id, created.plan, created.lifetime_tokens, created.lifetime_cost) == (
        "alice",
        "free",
        0,
        0,
    )
    assert created.created_at.tzinfo is not None
    again = await storage.ensure_user("alice", plan="pro")
    assert again.plan == "free"
    assert await storage.get_user("nobody") is None


async def test_set_plan(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    await storage.set_plan("alice", "pro")
    user = await storage.get_user("alice")
    assert user is not None and user.plan == "pro"
    with pytest.raises(NotFound):
        await storage.set_plan("nobody", "pro")


async def test_overrides(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    await storage.set_override("alice", "tokens_per_day", 5000)
    await storage.set_override("alice", "advanced_rag", True)
    await storage.set_override("alice", "queries_per_day", None)
    user = await storage.get_user("alice")
    assert user is not None
    assert dict(user.overrides) == {
        "tokens_per_day": 5000,
        "advanced_rag": True,
        "queries_per_day": None,
    }
    await storage.clear_override("alice", "tokens_per_day")
    await storage.clear_override("alice", "not_set")
    user = await storage.get_user("alice")
    assert user is not None
    assert dict(user.overrides) == {"advanced_rag": True, "queries_per_day": None}
    with pytest.raises(NotFound):
        await storage.set_override("nobody", "tokens_per_day", 1)
    with pytest.raises(NotFound):
        await storage.clear_override("nobody", "tokens_per_day")


async def test_keys(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    key = await storage.create_key(
        "alice", key_id="key_1", key_hash="h1", prefix="gwk_abcd", name="laptop", now=NOW
    )
    assert (key.id, key.user_id, key.name, key.prefix, key.revoked_at) == (
        "key_1",
        "alice",
        "laptop",
        "gwk_abcd",
        None,
    )
    found = await storage.find_key("h1")
    assert found is not None and found.id == "key_1" and found.created_at == NOW
    assert await storage.find_key("h2") is None

    revoked = await storage.revoke_key("key_1", now=NOW + timedelta(hours=1))
    assert revoked.revoked_at == NOW + timedelta(hours=1)
    again = await storage.revoke_key("key_1", now=NOW + timedelta(hours=2))
    assert again.revoked_at == NOW + timedelta(hours=1)
    found = await storage.find_key("h1")
    assert found is not None and found.revoked_at is not None

    await storage.create_key(
        "alice", key_id="key_2", key_hash="h2", prefix="gwk_efgh", name="", now=NOW
    )
    assert [k.id for k in await storage.list_keys("alice")] == ["key_1", "key_2"]
    with pytest.raises(NotFound):
        await storage.revoke_key("key_404", now=NOW)
    with pytest.raises(NotFound):
        await storage.create_key(
            "nobody", key_id="key_3", key_hash="h3", prefix="p", name="", now=NOW
        )


async def test_admit_reserves_until_the_daily_limit(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits(queries_per_day=3)
    results = [
        await storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits)
        for _ in range(5)
    ]
    assert [r.admitted for r in results] == [True, True, True, False, False]
    assert [r.counters.queries_today for r in results] == [1, 2, 3, 3, 3]
    assert results[3].refused_by == "queries_per_day"
    # another day starts from zero
    tomorrow = await storage.admit(
        "alice", day=DAY + timedelta(days=1), month_start=MONTH, now=NOW, limits=limits
    )
    assert tomorrow.admitted and tomorrow.counters.queries_today == 1


async def test_admit_with_zero_and_unlimited(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    refused = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=AdmissionLimits(queries_per_day=0)
    )
    assert not refused.admitted and refused.refused_by == "queries_per_day"
    assert refused.counters.queries_today == 0
    for _ in range(3):
        ok = await storage.admit(
            "alice", day=DAY, month_start=MONTH, now=NOW, limits=AdmissionLimits()
        )
        assert ok.admitted
    assert ok.counters.queries_today == 3


async def test_admit_checks_tokens_today_and_this_month(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    # last month's usage does not count; earlier this month does
    await storage.settle(event("old", day=date(2026, 10, 31), tokens=10_000))
    await storage.settle(event("earlier", day=date(2026, 11, 2), tokens=600))
    await storage.settle(event("today", tokens=300))

    admission = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=AdmissionLimits(tokens_per_month=1000)
    )
    assert admission.admitted
    assert (admission.counters.tokens_today, admission.counters.tokens_month) == (300, 900)

    refused = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=AdmissionLimits(tokens_per_month=900)
    )
    assert not refused.admitted and refused.refused_by == "tokens_per_month"
    assert refused.counters.tokens_month == 900 and refused.counters.queries_today == 1

    refused = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=AdmissionLimits(tokens_per_day=300)
    )
    assert not refused.admitted and refused.refused_by == "tokens_per_day"

    # a new day row respects the month limit too
    refused = await storage.admit(
        "alice",
        day=date(2026, 11, 22),
        month_start=MONTH,
        now=NOW,
        limits=AdmissionLimits(tokens_per_month=900),
    )
    assert not refused.admitted and refused.refused_by == "tokens_per_month"
    assert refused.counters.queries_today == 0


async def test_refund(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits(queries_per_day=1)
    assert (
        await storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits)
    ).admitted
    assert not (
        await storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits)
    ).admitted
    await storage.refund("alice", day=DAY)
    await storage.refund("alice", day=DAY)  # never below zero
    (row,) = await storage.daily(DAY, DAY)
    assert row.queries == 0
    assert (
        await storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits)
    ).admitted


async def test_settle_records_once_with_exact_money(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    assert await storage.settle(event("m1", tokens=1168, cost="0.0013030", web_searches=1))
    assert not await storage.settle(event("m1", tokens=1168, cost="0.0013030", web_searches=1))
    assert await storage.settle(event("m2", tokens=100, cost="0E-7"))
    assert await storage.settle(event("m3", tokens=32, cost="0.1"))
    assert await storage.settle(event("m4", tokens=0, cost="0.2", estimated=True, outcome="cut"))

    (row,) = await storage.daily(DAY, DAY)
    assert row.total_tokens == 1300
    assert row.prompt_tokens + row.completion_tokens == 1300
    assert row.cost == Decimal("0.3013030")
    assert row.web_searches == 1
    user = await storage.get_user("alice")
    assert user is not None
    assert user.lifetime_tokens == 1300 and user.lifetime_cost == Decimal("0.3013030")
    assert user.lifetime_prompt_tokens + user.lifetime_completion_tokens == 1300

    events = [e async for e in storage.events(DAY, DAY)]
    assert [e.answer_id for e in events] == ["m1", "m2", "m3", "m4"]
    assert events[3].estimated and events[3].outcome == "cut"
    assert events[0].cost == Decimal("0.0013030") and events[0].created_at == NOW


async def test_the_ledger_keeps_model_and_token_parts_and_sums_them_per_model(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    parts = {"cached_tokens": 30, "reasoning_tokens": 10}
    assert await storage.settle(
        event("a1", tokens=100, cost="0.1", model="o3", cache_write_tokens=20, **parts)
    )
    assert await storage.settle(event("a2", tokens=200, cost="0.0000001", model="o3", **parts))
    assert await storage.settle(event("a3", tokens=50, cost="0.3", model="gpt-4o-mini"))
    assert await storage.settle(event("a4", tokens=7, cost="0"))  # names no model (Dify)
    assert await storage.settle(event("a5", day=DAY - timedelta(days=1), model="o3"))
    assert await storage.settle(event("b1", user="bob", model="o3"))
    # The settle with the extra columns is as idempotent as the plain one.
    assert not await storage.settle(event("a1", tokens=100, cost="0.1", model="o3", **parts))

    events = {e.answer_id: e async for e in storage.events(DAY, DAY)}
    assert (events["a1"].model, events["a1"].cached_tokens, events["a1"].reasoning_tokens) == (
        "o3",
        30,
        10,
    )
    assert events["a1"].cache_write_tokens == 20  # Anthropic's cache writes (0014/0010)
    assert events["a2"].cache_write_tokens == 0
    assert (events["a4"].model, events["a4"].cached_tokens) == (None, 0)
    assert await storage.usage_by_model("alice", start=DAY, end=DAY) == [
        UsageGroup("o3", 2, 225, 60, 75, 20, 300, Decimal("0.1000001")),
        UsageGroup("gpt-4o-mini", 1, 38, 0, 12, 0, 50, Decimal("0.3")),
        UsageGroup(None, 1, 6, 0, 1, 0, 7, Decimal("0")),
    ]
    assert await storage.usage_by_model("carol", start=DAY, end=DAY) == []


async def test_settle_for_an_unknown_user(storage: Storage) -> None:
    with pytest.raises(NotFound):
        await storage.settle(event("m1", user="nobody"))


async def test_daily_range_and_user_filter(storage: Storage) -> None:
    for user in ("alice", "bob"):
        await storage.ensure_user(user, plan="free")
    for offset in range(5):
        await storage.settle(event(f"a{offset}", day=DAY - timedelta(days=offset)))
    await storage.settle(event("b0", user="bob"))
    rows = await storage.daily(DAY - timedelta(days=2), DAY)
    assert [(r.day, r.user_id) for r in rows] == [
        (DAY - timedelta(days=2), "alice"),
        (DAY - timedelta(days=1), "alice"),
        (DAY, "alice"),
        (DAY, "bob"),
    ]
    assert [r.user_id for r in await storage.daily(DAY, DAY, user_id="bob")] == ["bob"]


async def test_events_stream_in_batches(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    for i in range(1100):  # more than one batch of 1000
        await storage.settle(event(f"a{i:05}", user="alice" if i % 3 else "bob", tokens=1))
    seen = [e.answer_id async for e in storage.events(DAY, DAY)]
    assert seen == [f"a{i:05}" for i in range(1100)]
    bob = [e async for e in storage.events(DAY, DAY, user_id="bob")]
    assert len(bob) == 367 and {e.user_id for e in bob} == {"bob"}
    assert [e async for e in storage.events(DAY + timedelta(days=1), DAY + timedelta(days=9))] == []


async def test_list_users(storage: Storage) -> None:
    for name, plan, tokens in (
        ("carol", "pro", 50),
        ("alice", "free", 10),
        ("bob", "free", 500),
        ("Alina", "pro", 0),
    ):
        await storage.ensure_user(name, plan=plan)
        if tokens:
            await storage.settle(
                event(f"old-{name}", user=name, day=DAY - timedelta(days=1), tokens=tokens)
            )
    await storage.settle(event("today-alice", user="alice", tokens=7))

    listed = await storage.list_users(day=DAY)
    assert [s.user.id for s in listed] == ["Alina", "alice", "bob", "carol"]
    by_tokens = await storage.list_users(day=DAY, sort="lifetime_tokens", descending=True)
    assert [s.user.id for s in by_tokens] == ["bob", "carol", "alice", "Alina"]
    today = await storage.list_users(day=DAY, sort="tokens_today", descending=True, limit=1)
    assert [(s.user.id, s.today.total_tokens) for s in today] == [("alice", 7)]
    assert [s.user.id for s in await storage.list_users(day=DAY, plan="pro")] == ["Alina", "carol"]
    assert [s.user.id for s in await storage.list_users(day=DAY, search="ali")] == [
        "Alina",
        "alice",
    ]
    page = await storage.list_users(day=DAY, limit=2, offset=2)
    assert [s.user.id for s in page] == ["bob", "carol"]
    assert page[0].today.total_tokens == 0 and page[0].today.day == DAY
    assert await storage.count_users() == 4
    assert await storage.count_users(plan="free", search="b") == 1


# --- concurrency: exactness across connections and processes ------------------------


async def _two_stores(url: str) -> tuple[Storage, Storage]:
    """Two independent connections (SQLite) / pools (PostgreSQL): stand-ins for two replicas."""
    return await open_storage(DatabaseConfig(url=url)), await open_storage(DatabaseConfig(url=url))


async def test_admission_race_is_exact(storage: Storage, database_url: str) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits(queries_per_day=10)
    for _ in range(5):  # 5 of 10 used: 5 left
        assert (
            await storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits)
        ).admitted
    first, second = await _two_stores(database_url)
    try:
        results = await asyncio.gather(
            *(
                (first if i % 2 else second).admit(
                    "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits
                )
                for i in range(50)
            )
        )
    finally:
        await first.close()
        await second.close()
    assert sum(r.admitted for r in results) == 5
    refused = [r for r in results if not r.admitted]
    assert all(
        r.refused_by == "queries_per_day" and r.counters.queries_today == 10 for r in refused
    )
    (row,) = await storage.daily(DAY, DAY)
    assert row.queries == 10


async def test_settle_race_records_once(storage: Storage, database_url: str) -> None:
    await storage.ensure_user("alice", plan="free")
    first, second = await _two_stores(database_url)
    try:
        results = await asyncio.gather(
            *(
                (first if i % 2 else second).settle(event(f"m{i // 10}", tokens=10))
                for i in range(40)
            )
        )
    finally:
        await first.close()
        await second.close()
    assert sum(results) == 4
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 40
    assert user.lifetime_cost == Decimal("0.0013030") * 4
    (row,) = await storage.daily(DAY, DAY)
    assert row.total_tokens == 40


async def test_concurrent_migrations_on_a_fresh_database(
    tmp_path, request: pytest.FixtureRequest, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
        backend = "sqlite"
    else:
        url = await request.getfixturevalue("postgres").new_database_async()
        backend = "postgres"
    first, second = await _two_stores(url)
    try:
        counts = await asyncio.gather(first.migrate(), second.migrate())
        assert sorted(counts) == [0, len(migrations(backend))]
        assert await first.migrate() == 0
    finally:
        await first.close()
        await second.close()


def test_the_migrations_and_functions_are_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every start migrates; the package's SQL files are read by the first.
    first = {backend: (migrations(backend), functions(backend)) for backend in BACKENDS}

    def unread(*args: object) -> None:
        raise AssertionError("the SQL files were read again")

    monkeypatch.setattr(storage_package.resources, "files", unread)
    for backend in BACKENDS:
        assert (migrations(backend), functions(backend)) == first[backend]
        # Each caller gets lists of its own: changing one changes no later answer.
        migrations(backend).clear()
        functions(backend)[1].clear()
        assert (migrations(backend), functions(backend)) == first[backend]
    assert first["postgres"][1][1], "no PostgreSQL functions found"


async def test_a_migrated_sqlite_database_migrates_beside_a_writer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A restart finds its database migrated with one read: it does not wait for
    # the write lock another process holds (a replica's long transaction).
    path = tmp_path / "gateway.db"
    url = f"sqlite:///{path}"
    store = await open_storage(DatabaseConfig(url=url))
    await store.migrate()
    await store.close()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        store = await open_storage(DatabaseConfig(url=url, command_timeout=0.5))
        try:
            assert await store.migrate() == 0
        finally:
            await store.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


async def test_a_migrated_postgres_database_migrates_with_reads_alone(own_database: str) -> None:
    # A restart finds its database migrated with one statement: a role that may
    # only read the migrations' record (no CREATE on the schema) starts the
    # gateway; the full path's CREATE TABLE IF NOT EXISTS is refused to it.
    role = f"gateway_reader_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(own_database)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        await admin.execute(f"GRANT SELECT ON schema_migrations, schema_function_set TO {role}")
        base, _, rest = own_database.partition("://")
        dsn = f"{base}://{role}@{rest.split('@', 1)[1]}"
        store = await open_storage(DatabaseConfig(url=dsn))
        try:
            assert await store.migrate() == 0
            # Not a migrate that lets anything through: a missing migration takes
            # the full path (and this role may not make it).
            await admin.execute(
                "DELETE FROM schema_migrations WHERE version = "
                "(SELECT max(version) FROM schema_migrations)"
            )
            with pytest.raises(StorageError):
                await store.migrate()
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


# --- concurrent-stream leases -------------------------------------------------------


def lease(name: str, *, minutes: int = 10) -> Lease:
    return Lease(id=name, expires_at=NOW + timedelta(minutes=minutes))


async def test_stream_leases_limit_open_answers(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits(max_concurrent_streams=2)
    first = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("r1")
    )
    second = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("r2")
    )
    third = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("r3")
    )
    assert (first.admitted, second.admitted, third.admitted) == (True, True, False)
    assert second.counters.open_streams == 2
    assert third.refused_by == "max_concurrent_streams" and third.counters.open_streams == 2
    assert third.counters.queries_today == 2  # a refusal reserves nothing

    await storage.settle(event("m1"), lease_id="r1")  # an answer ends: its slot frees
    assert (
        await storage.admit(
            "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("r4")
        )
    ).admitted
    await storage.refund("alice", day=DAY, lease_id="r2")  # so does a refunded one
    assert (
        await storage.admit(
            "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("r5")
        )
    ).admitted
    assert not (
        await storage.admit(
            "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("r6")
        )
    ).admitted


async def test_expired_leases_do_not_count(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits(max_concurrent_streams=1)
    assert (
        await storage.admit(
            "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("a", minutes=1)
        )
    ).admitted
    later = NOW + timedelta(minutes=2)  # the gateway holding "a" died
    admission = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=later, limits=limits, lease=lease("b")
    )
    assert admission.admitted and admission.counters.open_streams == 1
    # The expired lease is gone, the new one counts: a third is refused.
    assert await storage.open_streams("alice", now=later) == 1
    assert not (
        await storage.admit(
            "alice", day=DAY, month_start=MONTH, now=later, limits=limits, lease=lease("c")
        )
    ).admitted


@pytest.mark.parametrize(
    "limits",
    [AdmissionLimits(), AdmissionLimits(max_concurrent_streams=1)],
    ids=["no-stream-limit", "stream-limit"],
)
async def test_admitting_an_unknown_user_fails(storage: Storage, limits: AdmissionLimits) -> None:
    # (With a stream limit SQLite asks whether the user exists in the statement
    # that counts their leases.)
    with pytest.raises(NotFound):
        await storage.admit(
            "nobody", day=DAY, month_start=MONTH, now=NOW, limits=limits, lease=lease("n")
        )


async def test_stream_limit_race_is_exact(storage: Storage, database_url: str) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits(max_concurrent_streams=3)
    first, second = await _two_stores(database_url)
    try:
        results = await asyncio.gather(
            *(
                (first if i % 2 else second).admit(
                    "alice",
                    day=DAY,
                    month_start=MONTH,
                    now=NOW,
                    limits=limits,
                    lease=lease(f"r{i}"),
                )
                for i in range(30)
            )
        )
    finally:
        await first.close()
        await second.close()
    assert sum(r.admitted for r in results) == 3


async def test_one_users_admissions_made_together_are_decided_in_the_order_made(
    storage: Storage,
) -> None:
    """A user's admissions made at once (a batch on PostgreSQL), one with the
    team's limits and one without (a reload between them), are decided in the
    order they were made: the first takes the last request of the minute."""
    await storage.create_team("acme", plan="free", now=NOW)
    await storage.ensure_user("alice", plan="free")
    await storage.set_team("alice", "acme")
    rate = Limit("requests_per_minute", "queries", "minute", Decimal(1))
    team = Limit("team_queries_per_day", "queries", "day", Decimal(100), "team")
    results = await asyncio.gather(
        *(
            storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, team="acme")
            for limits in (AdmissionLimits([rate, team]), AdmissionLimits([rate]))
        )
    )
    assert [r.refused_by for r in results] == [None, "requests_per_minute"]


async def test_admissions_and_settles_interleave_without_deadlock(
    storage: Storage, database_url: str
) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits(queries_per_day=1000, max_concurrent_streams=1000)
    first, second = await _two_stores(database_url)
    try:
        work = []
        for i in range(40):
            store = first if i % 2 else second
            work.append(
                store.admit(
                    "alice",
                    day=DAY,
                    month_start=MONTH,
                    now=NOW,
                    limits=limits,
                    lease=lease(f"l{i}"),
                )
            )
            work.append(store.settle(event(f"s{i}", tokens=1), lease_id=f"l{i - 1}"))
        results = await asyncio.gather(*work)
    finally:
        await first.close()
        await second.close()
    assert all(results)
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 40


async def test_advanced_rag_web_searches_and_uploads_are_counted(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits()
    await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits, advanced_rag=True
    )
    await storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits)
    assert [row.web_searches for row in await storage.daily(DAY, DAY)] == [0]
    await storage.settle(event("w1", web_searches=1))
    await storage.settle(event("w2", web_searches=1))
    assert [row.web_searches for row in await storage.daily(DAY, DAY)] == [2]
    next_day = DAY + timedelta(days=1)
    assert await storage.daily(next_day, next_day) == []
    await storage.reserve_upload("alice", key="u1", day=DAY, month_start=MONTH, size=1000)
    await storage.reserve_upload("alice", key="u2", day=DAY, month_start=MONTH, size=24)
    (row,) = await storage.daily(DAY, DAY)
    assert (row.queries, row.advanced_rag, row.web_searches, row.uploads, row.upload_bytes) == (
        2,
        1,
        2,
        2,
        1024,
    )
    admission = await storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits)
    assert admission.counters.web_searches_today == 2


UPLOADS_PER_DAY = Limit("uploads_per_day", "uploads", "day", Decimal(3))
BYTES_PER_MONTH = Limit("upload_bytes_per_month", "upload_bytes", "month", Decimal(1000))


async def test_an_upload_is_reserved_only_while_its_limits_allow_it(storage: Storage) -> None:
    """Issue 21: uploads and upload bytes are checked and counted in one step;
    a refusal counts nothing and says which limit, with the counters."""
    await storage.ensure_user("alice", plan="free")
    earlier = DAY - timedelta(days=3)  # in the month, not today
    assert (
        await storage.reserve_upload("alice", key="e", day=earlier, month_start=MONTH, size=600)
    ).admitted
    limits = (UPLOADS_PER_DAY, BYTES_PER_MONTH)

    keys = iter(range(100))

    async def reserve(size: int, key: str | None = None) -> tuple[str | None, int, int]:
        got = await storage.reserve_upload(
            "alice",
            key=key or f"k{next(keys)}",
            day=DAY,
            month_start=MONTH,
            size=size,
            limits=limits,
        )
        used = got.counters
        return got.refused_by, int(used.of("uploads", "day")), int(used.of("upload_bytes", "month"))

    assert await reserve(401) == ("upload_bytes_per_month", 0, 600)  # 1001 > 1000
    assert await reserve(400, "big") == (None, 1, 1000)  # exactly at the limit
    assert await reserve(0) == (None, 2, 1000)  # an empty file adds no bytes
    assert await reserve(0) == (None, 3, 1000)
    assert await reserve(0) == ("uploads_per_day", 3, 1000)
    (row,) = await storage.daily(DAY, DAY)
    assert (row.uploads, row.upload_bytes, row.queries) == (3, 400, 0)
    await storage.release_upload("alice", key="big")
    (row,) = await storage.daily(DAY, DAY)
    assert (row.uploads, row.upload_bytes) == (2, 0)
    await storage.release_upload("alice", key="big")  # given back once, however often asked
    await storage.release_upload("alice", key="never")
    (row,) = await storage.daily(DAY, DAY)
    assert (row.uploads, row.upload_bytes) == (2, 0)
    assert await reserve(400) == (None, 3, 1000)  # what was given back is usable at once
    with pytest.raises(NotFound):
        await storage.reserve_upload(
            "nobody", key="n", day=DAY, month_start=MONTH, size=1, limits=limits
        )


async def test_an_upload_counted_again_under_its_key_is_counted_once(storage: Storage) -> None:
    """Review of issue 21: the count after a reservation whose answer was lost,
    or the bytes of a file reserved by its count alone, go by the request's
    key: the upload is counted once, its bytes become the file's (on the day it
    was reserved), and a give-back gives back what is counted."""
    await storage.ensure_user("alice", plan="free")
    limits = (UPLOADS_PER_DAY,)
    yesterday = DAY - timedelta(days=1)
    got = await storage.reserve_upload(
        "alice", key="a", day=yesterday, month_start=MONTH, size=0, limits=limits
    )
    assert got.admitted
    for size in (700, 700):  # the file's bytes once it was taken, asked twice
        assert (
            await storage.reserve_upload("alice", key="a", day=DAY, month_start=MONTH, size=size)
        ).admitted
    assert [(r.day, r.uploads, r.upload_bytes) for r in await storage.daily(yesterday, DAY)] == [
        (yesterday, 1, 700)
    ]
    # A reservation that landed, counted again with its size: nothing more.
    await storage.reserve_upload(
        "alice", key="b", day=DAY, month_start=MONTH, size=50, limits=limits
    )
    await storage.reserve_upload("alice", key="b", day=DAY, month_start=MONTH, size=50)
    # One that never landed is counted by the later count.
    await storage.reserve_upload("alice", key="c", day=DAY, month_start=MONTH, size=5)
    (row,) = await storage.daily(DAY, DAY)
    assert (row.uploads, row.upload_bytes) == (2, 55)
    await storage.release_upload("alice", key="b")
    await storage.release_upload("alice", key="b")
    await storage.release_upload("bob", key="c")  # another user's key: not theirs
    (row,) = await storage.daily(DAY, DAY)
    assert (row.uploads, row.upload_bytes) == (1, 5)


async def test_a_team_upload_limit_counts_every_member(storage: Storage) -> None:
    await storage.create_team("acme", plan="free", now=NOW)
    for user in ("alice", "bob"):
        await storage.ensure_user(user, plan="free")
        await storage.set_team(user, "acme")
    team = Limit("team_uploads_per_day", "uploads", "day", Decimal(2), "team")
    results = [
        await storage.reserve_upload(
            user, key=f"t{i}", day=DAY, month_start=MONTH, size=10, limits=(team,), team="acme"
        )
        for i, user in enumerate(("alice", "bob", "alice"))
    ]
    assert [r.refused_by for r in results] == [None, None, "team_uploads_per_day"]
    assert results[2].counters.of("uploads", "day", "team") == 2
    assert results[2].counters.of("uploads", "day") == 1  # alice's own


@pytest.mark.parametrize(
    ("limit", "size", "admitted"),
    [(Limit("uploads_per_day", "uploads", "day", Decimal(5)), 100, 5),
     (Limit("upload_bytes_per_day", "upload_bytes", "day", Decimal(1000)), 300, 3)],
    ids=["uploads", "upload_bytes"],
)  # fmt: skip
async def test_upload_race_is_exact(
    storage: Storage, database_url: str, limit: Limit, size: int, admitted: int
) -> None:
    """Parallel uploads on two connections (two replicas) never pass the limit."""
    await storage.ensure_user("alice", plan="free")
    first, second = await _two_stores(database_url)
    try:
        results = await asyncio.gather(
            *(
                (first if i % 2 else second).reserve_upload(
                    "alice", key=f"r{i}", day=DAY, month_start=MONTH, size=size, limits=(limit,)
                )
                for i in range(30)
            )
        )
    finally:
        await first.close()
        await second.close()
    assert sum(r.admitted for r in results) == admitted
    (row,) = await storage.daily(DAY, DAY)
    assert (row.uploads, row.upload_bytes) == (admitted, admitted * size)


async def test_an_upload_whose_caller_is_cancelled_in_flight_is_given_back(
    storage: Storage, database_url: str
) -> None:
    """A caller cancelled (a server shutting down) while its reservation is in
    the database never forwards the file: what was counted is given back."""
    await storage.ensure_user("alice", plan="free")
    other = await open_storage(DatabaseConfig(url=database_url))
    async with _holding_alice(database_url):  # the calls wait in the database
        kept, gone = (
            asyncio.ensure_future(
                other.reserve_upload(
                    "alice",
                    key=f"c{size}",
                    day=DAY,
                    month_start=MONTH,
                    size=size,
                    limits=(UPLOADS_PER_DAY,),
                )
            )
            for size in (10, 50)
        )
        for _ in range(10):
            await asyncio.sleep(0)  # both calls made, neither answered
        assert not kept.done() and not gone.done()
        gone.cancel()
    assert (await kept).admitted
    with pytest.raises(asyncio.CancelledError):
        await gone
    await other.close()  # waits for the give-back
    (row,) = await storage.daily(DAY, DAY)
    assert (row.uploads, row.upload_bytes) == (1, 10)


@contextlib.asynccontextmanager
async def _holding_alice(url: str) -> AsyncIterator[None]:
    """Another transaction holds what a write of alice's waits for: her row
    (PostgreSQL), the database's write lock (SQLite)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    blocker = await asyncpg.connect(url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM users WHERE id = 'alice' FOR UPDATE")
            # (Since 0024 an admission's rows take no key lock on the user's row: it
            # is held by the user's admission lock.)
            await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('alice', 24))")
            yield
    finally:
        await blocker.close()


async def test_iter_daily_and_count_events(storage: Storage) -> None:
    for user in ("alice", "bob"):
        await storage.ensure_user(user, plan="free")
    # 2 users x 550 days: more than one batch of 1000
    for offset in range(550):
        for user in ("alice", "bob"):
            day = DAY - timedelta(days=offset)
            await storage.reserve_upload(
                user, key=f"{user}{offset}", day=day, month_start=MONTH, size=offset
            )
    start, end = DAY - timedelta(days=549), DAY
    rows = [r async for r in storage.iter_daily(start, end)]
    assert len(rows) == 1100
    assert [(r.day, r.user_id) for r in rows] == sorted((r.day, r.user_id) for r in rows)
    assert rows == await storage.daily(start, end)
    bob = [r async for r in storage.iter_daily(start, end, user_id="bob")]
    assert len(bob) == 550 and {r.user_id for r in bob} == {"bob"}
    for i in range(3):
        await storage.settle(event(f"e{i}", user="alice" if i else "bob"))
    assert await storage.count_events(start, end) == 3
    assert await storage.count_events(DAY, DAY, user_id="bob") == 1


# --- pending answers: crash safety (docs/quotas.md, "Crash safety") ------------------------

LATER = NOW + timedelta(hours=1)  # a recovery bound every pending answer is older than


def pending(name: str, *, tokens: int = 25) -> Pending:
    return Pending(
        id=name,
        endpoint="chat-messages",
        prompt_tokens=tokens,
        total_tokens=tokens,
        cost=Decimal("0.0000010"),
    )


async def admit_pending(
    storage: Storage, name: str, *, tokens: int = 25, streams: int | None = None
) -> None:
    limits = AdmissionLimits(queries_per_day=1000, max_concurrent_streams=streams)
    admission = await storage.admit(
        "alice",
        day=DAY,
        month_start=MONTH,
        now=NOW,
        limits=limits,
        lease=lease(name) if streams else None,
        pending=pending(name, tokens=tokens),
    )
    assert admission.admitted


async def all_events(storage: Storage) -> list[UsageEvent]:
    return [e async for e in storage.events(DAY, DAY)]


async def test_a_settle_claims_its_pending_answer_once(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    await admit_pending(storage, "r1")
    assert await storage.settle(event("m1", tokens=100), pending_id="r1")
    # A retry of the same write, and a second write for the same admission under
    # another answer id, both change nothing.
    assert not await storage.settle(event("m1", tokens=100), pending_id="r1")
    assert not await storage.settle(event("m2", tokens=100), pending_id="r1")
    assert await storage.recover(before=LATER, now=LATER) == []
    assert [e.answer_id for e in await all_events(storage)] == ["m1"]
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 100


async def test_recovery_charges_the_admission_estimate_and_keeps_the_query(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    await admit_pending(storage, "r1", tokens=25, streams=5)
    assert await storage.open_streams("alice", now=NOW) == 1
    # Not older than the bound: left alone.
    assert await storage.recover(before=NOW, now=NOW) == []
    assert await storage.recover(before=NOW + timedelta(seconds=1), now=LATER) == ["r1"]
    (recovered,) = await all_events(storage)
    assert (recovered.answer_id, recovered.outcome, recovered.estimated) == (
        "gw-r1",
        "recovered",
        True,
    )
    assert (recovered.prompt_tokens, recovered.total_tokens, recovered.cost) == (
        25,
        25,
        Decimal("0.0000010"),
    )
    assert recovered.request_id == "r1" and recovered.created_at == LATER
    assert await storage.open_streams("alice", now=NOW) == 0  # its lease went with it
    # A late refund of the same answer changes nothing (a late settle supersedes
    # the estimate: see test_a_real_record_supersedes_a_recovered_estimate_once).
    assert not await storage.refund("alice", day=DAY, lease_id="r1", pending_id="r1")
    (row,) = await storage.daily(DAY, DAY)
    assert (row.queries, row.total_tokens) == (1, 25)  # the query stays spent
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 25
    assert await storage.recover(before=LATER, now=LATER) == []


async def test_a_recovered_estimate_counts_in_the_token_rates(storage: Storage) -> None:
    """Issue 21: a recovered answer's estimated tokens go into the token rates its
    admission counted it in (in the buckets of the recovery), as settled tokens."""
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits([Limit("tokens_per_minute", "tokens", "minute", Decimal(100))])
    assert (
        await storage.admit(
            "alice", day=DAY, month_start=MONTH, now=NOW, limits=limits,
            pending=pending("r1", tokens=60),
        )
    ).admitted  # fmt: skip
    at = NOW + timedelta(seconds=30)
    assert await storage.recover(before=at, now=at) == ["r1"]
    assert (await storage.rate_counts("alice", now=at))[("tokens", "minute")] == 60
    refused = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=at, limits=AdmissionLimits(
            [Limit("tokens_per_minute", "tokens", "minute", Decimal(60))]
        ),
    )  # fmt: skip
    assert refused.refused_by == "tokens_per_minute"


async def test_a_refund_closes_the_pending_answer_once(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    await admit_pending(storage, "r1")
    await admit_pending(storage, "r2")
    assert await storage.refund("alice", day=DAY, pending_id="r1")
    # Retried: the first one already gave the query back.
    assert not await storage.refund("alice", day=DAY, pending_id="r1")
    (row,) = await storage.daily(DAY, DAY)
    assert row.queries == 1
    assert not await storage.settle(event("m1"), pending_id="r1")
    assert await storage.recover(before=LATER, now=LATER) == ["r2"]
    assert [e.answer_id for e in await all_events(storage)] == ["gw-r2"]


async def test_admission_without_a_pending_answer_leaves_none(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    limits = AdmissionLimits(queries_per_day=10)
    assert (
        await storage.admit("alice", day=DAY, month_start=MONTH, now=NOW, limits=limits)
    ).admitted
    refused = await storage.admit(
        "alice",
        day=DAY,
        month_start=MONTH,
        now=NOW,
        limits=AdmissionLimits(queries_per_day=1),
        pending=pending("r1"),
    )
    assert not refused.admitted  # a refused request leaves no pending answer either
    assert await storage.recover(before=LATER, now=LATER) == []


async def test_recovery_takes_batches(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    for i in range(5):
        await admit_pending(storage, f"r{i}")
    first = await storage.recover(before=LATER, now=LATER, limit=3)
    rest = await storage.recover(before=LATER, now=LATER, limit=3)
    assert len(first) == 3 and sorted(first + rest) == [f"r{i}" for i in range(5)]


async def test_recoveries_racing_late_settles_count_each_answer_once(
    storage: Storage, database_url: str
) -> None:
    """Two replicas recover while the answers' own settles arrive: every answer
    ends up in the ledger exactly once, with its real figures - its settle came
    first, or superseded the estimate a recovery charged."""
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    count = 30
    limits = AdmissionLimits(queries_per_day=1000, max_concurrent_streams=1000)
    for i in range(count):
        user = "alice" if i % 2 else "bob"
        admission = await storage.admit(
            user,
            day=DAY,
            month_start=MONTH,
            now=NOW,
            limits=limits,
            lease=lease(f"r{i}"),
            pending=pending(f"r{i}", tokens=1),
        )
        assert admission.admitted
    first, second = await _two_stores(database_url)
    try:
        settles = [
            (first if i % 2 else second).settle(
                event(f"m{i}", user="alice" if i % 2 else "bob", tokens=100),
                lease_id=f"r{i}",
                pending_id=f"r{i}",
            )
            for i in range(count)
        ]
        recoveries = [
            (second if i % 2 else first).recover(before=LATER, now=LATER, limit=1)
            for i in range(count)
        ]
        results = await asyncio.gather(
            *[x for pair in zip(settles, recoveries, strict=True) for x in pair]
        )
    finally:
        await first.close()
        await second.close()
    settled = sum(1 for r in results if r is True)
    recovered = [pid for r in results if isinstance(r, list) for pid in r]
    assert len(recovered) == len(set(recovered))  # no answer recovered twice
    assert settled == count  # each settle recorded its answer, or superseded the estimate
    events = await all_events(storage)
    assert sorted(e.answer_id for e in events) == sorted(f"m{i}" for i in range(count))
    assert {(e.total_tokens, e.outcome, e.estimated) for e in events} == {(100, "complete", False)}
    tokens = sum(e.total_tokens for e in events)
    assert tokens == 100 * count
    users = [await storage.get_user(u) for u in ("alice", "bob")]
    assert sum(u.lifetime_tokens for u in users if u is not None) == tokens
    assert sum(row.total_tokens for row in await storage.daily(DAY, DAY)) == tokens
    assert sum(row.queries for row in await storage.daily(DAY, DAY)) == count
    assert await storage.recover(before=LATER, now=LATER) == []


async def test_a_settle_claims_records_the_model_and_decides_alerts_together_once(
    storage: Storage, database_url: str
) -> None:
    """One settle claims the pending answer, writes the ledger row with its model
    and token parts, the day row and lifetime totals, releases the lease and
    records the crossings; retried, racing or after a recovery it does none of it."""
    await storage.ensure_user("alice", plan="free")
    await admit_pending(storage, "r1", streams=5)
    await admit_pending(storage, "r2", streams=5)
    assert await storage.open_streams("alice", now=NOW) == 2
    alerts = AlertRequest(
        (AlertCheck("tokens_per_day", DAY.isoformat(), 1000, (50, 100)),),
        MONTH,
        ("webhook", "email"),
    )
    answer = event(
        "m1", tokens=600, model="o3", cached_tokens=100, reasoning_tokens=50, cache_write_tokens=7
    )
    first, second = await _two_stores(database_url)
    try:
        # Two replicas settling the same answer at once: one of them does it all.
        results = await asyncio.gather(
            *[
                store.settle(answer, lease_id="r1", pending_id="r1", alerts=alerts)
                for store in (first, second)
            ]
        )
    finally:
        await first.close()
        await second.close()
    assert sorted(results) == [False, True]
    assert await storage.open_streams("alice", now=NOW) == 1
    # Retried, or written again under another answer id: nothing more.
    assert not await storage.settle(answer, lease_id="r1", pending_id="r1", alerts=alerts)
    again = event("m9", tokens=600, model="o3")
    assert not await storage.settle(again, lease_id="r1", pending_id="r1", alerts=alerts)
    # r2 is recovered as its estimate (no alert check); its late settle
    # supersedes the estimate, with its model, and crosses 100% on the real totals.
    assert await storage.recover(before=LATER, now=LATER) == ["r2"]
    assert len(await storage.list_alerts()) == 1
    late = event("m2", tokens=500, model="o3", reasoning_tokens=5, cache_write_tokens=9)
    assert await storage.settle(late, lease_id="r2", pending_id="r2", alerts=alerts)
    assert not await storage.settle(late, lease_id="r2", pending_id="r2", alerts=alerts)

    events = {e.answer_id: e for e in await all_events(storage)}
    assert sorted(events) == ["m1", "m2"]
    settled = events["m1"]
    assert (settled.model, settled.cached_tokens, settled.reasoning_tokens) == ("o3", 100, 50)
    assert settled.cache_write_tokens == 7
    assert (settled.total_tokens, settled.outcome, settled.estimated) == (600, "complete", False)
    superseded = events["m2"]
    assert (superseded.model, superseded.cached_tokens, superseded.reasoning_tokens) == (
        "o3",
        0,
        5,
    )
    assert superseded.cache_write_tokens == 9  # the real record's, not the estimate's 0
    assert (superseded.total_tokens, superseded.outcome, superseded.estimated) == (
        500,
        "complete",
        False,
    )
    assert await storage.open_streams("alice", now=NOW) == 0
    (row,) = await storage.daily(DAY, DAY)
    assert (row.queries, row.total_tokens) == (2, 1100)
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 1100
    assert [
        (m.key, m.answers, m.reasoning_tokens)
        for m in await storage.usage_by_model("alice", start=DAY, end=DAY)
    ] == [("o3", 2, 55)]
    alerts_found = sorted(await storage.list_alerts(), key=lambda a: a.crossing.threshold)
    assert [(a.crossing.limit, a.crossing.threshold, a.crossing.used) for a in alerts_found] == [
        ("tokens_per_day", 50, 600),
        ("tokens_per_day", 100, 1100),
    ]
    assert [(d.channel, d.status) for d in alerts_found[0].deliveries] == [
        ("email", "pending"),
        ("webhook", "pending"),
    ]
    claimed = await storage.claim_outbox(now=NOW, claim_until=LATER, limit=10)
    assert sorted(i.channel for i in claimed) == ["email", "email", "webhook", "webhook"]


# --- web searches reserved at admission (issue 20) -----------------------------------


async def admit_web(
    storage: Storage,
    name: str,
    *,
    limit: int | None = 1,
    when_exhausted: str = "refuse",
    user: str = "alice",
    queries: int | None = 1000,
) -> Admission:
    return await storage.admit(
        user,
        day=DAY,
        month_start=MONTH,
        now=NOW,
        limits=AdmissionLimits(queries_per_day=queries),
        pending=pending(name),
        web_search=WebSearch(limit, when_exhausted),  # type: ignore[arg-type]
    )


async def day_row(storage: Storage, user: str = "alice") -> tuple[int, int, int]:
    rows = [r for r in await storage.daily(DAY, DAY) if r.user_id == user]
    return (rows[0].queries, rows[0].web_searches, rows[0].total_tokens) if rows else (0, 0, 0)


async def test_admission_reserves_a_web_search_in_its_atomic_step(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    first = await admit_web(storage, "r1", limit=2)
    assert first.admitted and first.web_search_reserved
    assert first.counters.web_searches_today == 1
    second = await admit_web(storage, "r2", limit=2)
    assert second.web_search_reserved and second.counters.web_searches_today == 2
    # None left: refused without reserving anything...
    refused = await admit_web(storage, "r3", limit=2)
    assert (refused.admitted, refused.refused_by, refused.web_search_reserved) == (
        False,
        "web_searches_per_day",
        False,
    )
    assert refused.counters.web_searches_today == 2
    assert await day_row(storage) == (2, 2, 0)
    # ...or, in "disable" mode, admitted without one.
    disabled = await admit_web(storage, "r4", limit=2, when_exhausted="disable")
    assert disabled.admitted and not disabled.web_search_reserved
    assert await day_row(storage) == (3, 2, 0)
    # A request that does not ask reserves none, and is not refused for it.
    plain = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=AdmissionLimits()
    )
    assert plain.admitted and not plain.web_search_reserved
    # Unlimited: reserved all the same (settle replaces it with what was used).
    unlimited = await admit_web(storage, "r5", limit=None)
    assert unlimited.web_search_reserved
    assert await day_row(storage) == (5, 3, 0)


async def test_a_spent_web_search_allowance_refuses_before_the_query_limit(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    assert (await admit_web(storage, "r1", limit=1, queries=1)).admitted
    refused = await admit_web(storage, "r2", limit=1, queries=1)
    assert refused.refused_by == "web_searches_per_day"
    # With a search left, the query limit refuses, and nothing is reserved.
    refused = await admit_web(storage, "r3", limit=5, queries=1)
    assert refused.refused_by == "queries_per_day" and not refused.web_search_reserved
    assert await day_row(storage) == (1, 1, 0)


async def test_settle_replaces_the_web_search_reservation_with_what_was_used(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    for name in ("r1", "r2", "r3"):
        assert (await admit_web(storage, name, limit=None)).web_search_reserved
    assert await day_row(storage) == (3, 3, 0)
    # Asked, but the answer did not search: the reservation goes.
    assert await storage.settle(event("m1", tokens=10, web_searches=0), pending_id="r1")
    assert await day_row(storage) == (3, 2, 10)
    # Searched: the reservation becomes the count.
    assert await storage.settle(event("m2", tokens=10, web_searches=1), pending_id="r2")
    assert await day_row(storage) == (3, 2, 20)
    # Retried: nothing more.
    assert not await storage.settle(event("m2", tokens=10, web_searches=1), pending_id="r2")
    # A settle under an answer id already recorded still ends the reservation.
    assert not await storage.settle(event("m2", tokens=10, web_searches=1), pending_id="r3")
    assert await day_row(storage) == (3, 1, 20)
    # Admitted without a reservation (spent, "disable"), and searched anyway: counted.
    assert not (
        await admit_web(storage, "r4", limit=1, when_exhausted="disable")
    ).web_search_reserved
    assert await storage.settle(event("m4", tokens=10, web_searches=1), pending_id="r4")
    assert await day_row(storage) == (4, 2, 30)
    ledger = {e.answer_id: e.web_searches for e in await all_events(storage)}
    assert ledger == {"m1": 0, "m2": 1, "m4": 1}
    assert sum(ledger.values()) == (await day_row(storage))[1]


async def test_an_answer_settled_after_midnight_ends_its_reservations_on_the_day_it_made_them(
    storage: Storage,
) -> None:
    """The reservations end on the day row admission made them on; what the
    answer used goes to the day it is recorded on."""
    await storage.ensure_user("alice", plan="free")
    budget = AdmissionLimits(cost_per_day=Decimal("1.00"))
    reserving = replace(pending("r1"), reserved_cost=Decimal("0.40"))
    first = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=budget, pending=reserving,
        web_search=WebSearch(None),
    )  # fmt: skip
    assert first.admitted and first.web_search_reserved
    next_day = DAY + timedelta(days=1)
    assert await storage.settle(
        event("m1", day=next_day, tokens=10, cost="0.10", web_searches=0), pending_id="r1"
    )
    assert await day_row(storage) == (1, 0, 0)
    (row,) = await storage.daily(next_day, next_day)
    assert (row.web_searches, row.total_tokens, row.cost) == (0, 10, Decimal("0.10"))
    # The 0.40 reserved on DAY is free again: 0.90 more fits its budget.
    again = await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=budget,
        pending=replace(pending("r2"), reserved_cost=Decimal("0.90")),
    )  # fmt: skip
    assert again.admitted


async def test_a_refund_gives_the_web_search_back_and_a_recovery_keeps_it(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    await admit_web(storage, "r1", limit=2)
    await admit_web(storage, "r2", limit=2)
    assert await storage.refund("alice", day=DAY, pending_id="r1")
    assert not await storage.refund("alice", day=DAY, pending_id="r1")  # once
    assert await day_row(storage) == (1, 1, 0)
    assert (await admit_web(storage, "r3", limit=2)).web_search_reserved  # given back
    assert await storage.recover(before=LATER, now=LATER) == ["r2", "r3"]
    # Spent, like the query: the ledger rows say so, as the day row does.
    assert await day_row(storage) == (2, 2, 50)
    assert {e.answer_id: e.web_searches for e in await all_events(storage)} == {
        "gw-r2": 1,
        "gw-r3": 1,
    }


async def test_parallel_admissions_reserve_the_last_web_search_once(
    storage: Storage, database_url: str
) -> None:
    """The attack of issue 20: 20 parallel requests with one search left ran 20
    searches. Through two stores (two replicas): exactly one gets it."""
    for mode in ("refuse", "disable"):
        await storage.ensure_user(mode, plan="free")
        await admit_web(storage, f"{mode}-a", limit=3, user=mode)
        await admit_web(storage, f"{mode}-b", limit=3, user=mode)  # 2 of 3 used: 1 left
        first, second = await _two_stores(database_url)
        try:
            results = await asyncio.gather(
                *(
                    admit_web(
                        first if i % 2 else second,
                        f"{mode}{i}",
                        limit=3,
                        when_exhausted=mode,
                        user=mode,
                    )
                    for i in range(20)
                )
            )
        finally:
            await first.close()
            await second.close()
        assert sum(r.web_search_reserved for r in results) == 1
        if mode == "refuse":
            assert sum(r.admitted for r in results) == 1
            assert {r.refused_by for r in results if not r.admitted} == {"web_searches_per_day"}
            assert await day_row(storage, mode) == (3, 3, 0)
        else:
            assert all(r.admitted for r in results)  # the others without web search
            assert await day_row(storage, mode) == (22, 3, 0)


# --- a real record supersedes a recovered estimate (issue 20) -------------------------


async def test_a_real_record_supersedes_a_recovered_estimate_once(storage: Storage) -> None:
    """A record spooled through a long outage, replayed after a recovery charged
    its pending row the prompt-only estimate: the real usage wins, once."""
    await storage.ensure_user("alice", plan="free")
    await admit_web(storage, "r1", limit=5)  # asks for web search: one reserved
    await admit_pending(storage, "r2", tokens=7)
    assert await storage.recover(before=LATER, now=LATER) == ["r1", "r2"]
    assert await day_row(storage) == (2, 1, 32)
    real = event(
        "m1",
        tokens=2336,
        cost="0.0123",
        web_searches=0,  # it did not search in the end
        request_id="r1",
        model="o3",
        reasoning_tokens=9,
        conversation_id="c1",
        outcome="disconnected",
    )
    assert await storage.settle(real, lease_id="r1", pending_id="r1")
    events = {e.answer_id: e for e in await all_events(storage)}
    assert sorted(events) == ["gw-r2", "m1"]
    row = events["m1"]
    assert (row.total_tokens, row.prompt_tokens, row.completion_tokens, row.cost) == (
        2336,
        1752,
        584,
        Decimal("0.0123"),
    )
    assert (row.outcome, row.estimated, row.web_searches, row.model, row.reasoning_tokens) == (
        "disconnected",
        False,
        0,
        "o3",
        9,
    )
    assert (row.request_id, row.conversation_id, row.day) == ("r1", "c1", DAY)
    assert await day_row(storage) == (2, 0, 2336 + 7)
    (daily,) = await storage.daily(DAY, DAY)
    assert daily.cost == Decimal("0.0123") + Decimal("0.0000010")
    assert (daily.prompt_tokens, daily.completion_tokens) == (1752 + 7, 584)
    user = await storage.get_user("alice")
    assert user is not None
    assert (user.lifetime_tokens, user.lifetime_prompt_tokens, user.lifetime_cost) == (
        2343,
        1759,
        Decimal("0.0123") + Decimal("0.0000010"),
    )
    # Replayed again, or under another answer id: nothing changes.
    assert not await storage.settle(real, lease_id="r1", pending_id="r1")
    other = event("m9", tokens=50, request_id="r1")
    assert not await storage.settle(other, lease_id="r1", pending_id="r1")
    assert await day_row(storage) == (2, 0, 2343)
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 2343
    assert sorted(e.answer_id for e in await all_events(storage)) == ["gw-r2", "m1"]
    # Nothing left to recover, nor to refund.
    assert await storage.recover(before=LATER, now=LATER) == []
    assert not await storage.refund("alice", day=DAY, pending_id="r1")


async def test_a_real_estimate_under_the_gateway_id_supersedes_the_recovered_one(
    storage: Storage,
) -> None:
    """An answer the gateway itself estimated (no upstream id: ``gw-<request
    id>``, the recovered row's id too) still replaces the prompt-only estimate."""
    await storage.ensure_user("alice", plan="free")
    await admit_pending(storage, "r1", tokens=5)
    assert await storage.recover(before=LATER, now=LATER) == ["r1"]
    cut = event("gw-r1", tokens=80, outcome="cut", estimated=True, request_id="r1")
    assert await storage.settle(cut, pending_id="r1")
    assert not await storage.settle(cut, pending_id="r1")
    (row,) = await all_events(storage)
    assert (row.answer_id, row.total_tokens, row.outcome) == ("gw-r1", 80, "cut")
    assert await day_row(storage) == (1, 0, 80)


async def test_the_ledger_records_the_upstream_that_answered_and_sums_per_upstream(
    storage: Storage,
) -> None:
    """Issue 23: each ledger row names its upstream ("default" unless told), summed
    per upstream and currency as per model."""
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    await storage.create_team("ops", plan="free", now=NOW)
    await storage.set_team("alice", "ops")
    await storage.set_team("bob", "ops")
    parts = {"cached_tokens": 30, "reasoning_tokens": 10}
    assert await storage.settle(event("a1", tokens=100, cost="0.1", upstream="research", **parts))
    assert await storage.settle(event("a2", tokens=200, cost="0.0000001", upstream="research"))
    assert await storage.settle(event("a3", tokens=50, cost="0.3", upstream="support"))
    assert await storage.settle(event("a4", tokens=8, cost="2", upstream="support", currency="EUR"))
    assert await storage.settle(event("a5", tokens=7, cost="0"))  # names none: "default"
    assert await storage.settle(event("a6", day=DAY - timedelta(days=1), upstream="support"))
    assert await storage.settle(event("b1", user="bob", tokens=40, cost="1", upstream="support"))
    # A retry naming another upstream changes nothing.
    assert not await storage.settle(event("a1", tokens=100, cost="0.1", upstream="support"))

    events = {e.answer_id: e for e in await all_events(storage)}
    assert {k: e.upstream for k, e in events.items()} == {
        "a1": "research",
        "a2": "research",
        "a3": "support",
        "a4": "support",
        "a5": "default",
        "b1": "support",
    }
    assert await storage.usage_by_upstream("alice", start=DAY, end=DAY) == [
        UsageGroup("research", 2, 225, 30, 75, 10, 300, Decimal("0.1000001")),
        UsageGroup("support", 1, 38, 0, 12, 0, 50, Decimal("0.3")),
        UsageGroup("support", 1, 6, 0, 2, 0, 8, Decimal("2"), "EUR"),
        UsageGroup("default", 1, 6, 0, 1, 0, 7, Decimal("0")),
    ]
    month = await storage.usage_by_upstream("alice", start=MONTH, end=DAY)
    assert [(u.key, u.currency, u.answers) for u in month] == [
        ("research", "USD", 2),
        ("support", "USD", 2),
        ("support", "EUR", 1),
        ("default", "USD", 1),
    ]
    assert await storage.usage_by_upstream("carol", start=DAY, end=DAY) == []
    # A team's: its current members' rows.
    team = await storage.team_usage_by_upstream("ops", start=DAY, end=DAY)
    assert [(u.key, u.currency, u.answers, u.total_tokens, u.cost) for u in team] == [
        ("research", "USD", 2, 300, Decimal("0.1000001")),
        ("support", "USD", 2, 90, Decimal("1.3")),
        ("support", "EUR", 1, 8, Decimal("2")),
        ("default", "USD", 1, 7, Decimal("0")),
    ]
    await storage.set_team("bob", None)
    team = await storage.team_usage_by_upstream("ops", start=DAY, end=DAY)
    assert [(u.key, u.answers) for u in team if u.currency == "USD"] == [
        ("research", 2),
        ("support", 1),
        ("default", 1),
    ]
    assert await storage.team_usage_by_upstream("nobody", start=DAY, end=DAY) == []


async def test_a_recovered_estimate_is_charged_to_the_upstream_admission_named(
    storage: Storage,
) -> None:
    """The pending row keeps the upstream the answer was sent to; a recovery
    charges its estimate there, and the real record, superseding it, puts the
    answer where it was answered (a fallback) - "default" included."""
    await storage.ensure_user("alice", plan="free")
    for name, upstream in (("r1", "research"), ("r2", "research"), ("r3", "support")):
        admission = await storage.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            now=NOW,
            limits=AdmissionLimits(queries_per_day=1000),
            pending=replace(pending(name), upstream=upstream),
        )
        assert admission.admitted
    await admit_pending(storage, "r4")  # admitted naming no upstream
    assert await storage.recover(before=LATER, now=LATER) == ["r1", "r2", "r3", "r4"]
    recovered = {e.answer_id: e.upstream for e in await all_events(storage)}
    assert recovered == {
        "gw-r1": "research",
        "gw-r2": "research",
        "gw-r3": "support",
        "gw-r4": "default",
    }
    # r1 was answered by its fallback, r2 by the upstream it was sent to, r3 by
    # the default one.
    assert await storage.settle(event("m1", request_id="r1", upstream="backup"), pending_id="r1")
    assert await storage.settle(event("m2", request_id="r2", upstream="research"), pending_id="r2")
    assert await storage.settle(event("m3", request_id="r3"), pending_id="r3")
    superseded = {e.answer_id: e.upstream for e in await all_events(storage)}
    assert superseded == {"m1": "backup", "m2": "research", "m3": "default", "gw-r4": "default"}
    by_upstream = await storage.usage_by_upstream("alice", start=DAY, end=DAY)
    assert [(u.key, u.answers, u.total_tokens) for u in by_upstream] == [
        ("default", 2, 125),
        ("backup", 1, 100),
        ("research", 1, 100),
    ]


async def test_a_settled_pending_answer_records_the_upstream_the_event_names(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    admission = await storage.admit(
        "alice",
        day=DAY,
        month_start=MONTH,
        now=NOW,
        limits=AdmissionLimits(queries_per_day=1000),
        pending=replace(pending("r1"), upstream="research"),
    )
    assert admission.admitted
    # The answer came from a fallback: the settle's upstream is the one recorded.
    assert await storage.settle(event("m1", upstream="backup"), pending_id="r1")
    ((answer_id, upstream),) = [(e.answer_id, e.upstream) for e in await all_events(storage)]
    assert (answer_id, upstream) == ("m1", "backup")
    assert await storage.recover(before=LATER, now=LATER) == []


async def test_a_pending_answer_moved_to_a_fallback_is_recovered_there(storage: Storage) -> None:
    """A fallback took the answer (issue 23): its pending row names the fallback
    from then on, so a recovery charges the estimate there; a row already gone
    is left alone (False)."""
    await storage.ensure_user("alice", plan="free")
    for name in ("r1", "r2"):
        admission = await storage.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            now=NOW,
            limits=AdmissionLimits(queries_per_day=1000),
            pending=replace(pending(name), upstream="primary"),
        )
        assert admission.admitted
    assert await storage.move_pending("r1", upstream="backup")
    assert await storage.move_pending("r1", upstream="last-resort")
    assert not await storage.move_pending("nobody", upstream="backup")
    assert await storage.recover(before=LATER, now=LATER) == ["r1", "r2"]
    recovered = {e.answer_id: e.upstream for e in await all_events(storage)}
    assert recovered == {"gw-r1": "last-resort", "gw-r2": "primary"}
    # Recovered: the row is gone, nothing to move (and the ledger stays).
    assert not await storage.move_pending("r2", upstream="backup")
    assert {e.answer_id: e.upstream for e in await all_events(storage)} == recovered


async def test_recover_after_settle_does_nothing(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    await admit_web(storage, "r1", limit=5)
    assert await storage.settle(event("m1", tokens=40, web_searches=1), pending_id="r1")
    assert await storage.recover(before=LATER, now=LATER) == []
    (row,) = await all_events(storage)
    assert (row.answer_id, row.total_tokens, row.outcome, row.web_searches) == (
        "m1",
        40,
        "complete",
        1,
    )
    assert await day_row(storage) == (1, 1, 40)


async def test_only_the_estimate_of_the_same_request_and_user_is_superseded(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    await admit_pending(storage, "r1", tokens=5)
    await admit_pending(storage, "r2", tokens=5)
    assert await storage.recover(before=LATER, now=LATER) == ["r1", "r2"]
    # Another user's record naming alice's request: not hers to replace.
    assert not await storage.settle(event("m1", user="bob", tokens=70), pending_id="r1")
    # A real answer id already in the ledger as another row, by a record that
    # names no request (so cannot be told from that row's): the estimate stays.
    assert await storage.settle(event("m2", tokens=30))
    assert not await storage.settle(event("m2", tokens=30), pending_id="r2")
    assert sorted((e.answer_id, e.total_tokens) for e in await all_events(storage)) == [
        ("gw-r1", 5),
        ("gw-r2", 5),
        ("m2", 30),
    ]
    assert await day_row(storage) == (2, 0, 40)
    assert await day_row(storage, "bob") == (0, 0, 0)


async def test_racing_replays_of_a_record_supersede_its_estimate_once(
    storage: Storage, database_url: str
) -> None:
    """Two replicas replaying the same spooled records at once, each record
    several times (on PostgreSQL in batches): each estimate is replaced once."""
    await storage.ensure_user("alice", plan="free")
    for i in range(10):
        await admit_web(storage, f"r{i}", limit=None)
    assert len(await storage.recover(before=LATER, now=LATER)) == 10
    assert await day_row(storage) == (10, 10, 250)
    first, second = await _two_stores(database_url)
    try:
        results = await asyncio.gather(
            *(
                (first if k % 2 else second).settle(
                    event(f"m{i}", tokens=100, web_searches=i % 2, request_id=f"r{i}"),
                    pending_id=f"r{i}",
                )
                for k in range(4)
                for i in range(10)
            )
        )
    finally:
        await first.close()
        await second.close()
    assert sum(results) == 10
    assert sorted(e.answer_id for e in await all_events(storage)) == sorted(
        f"m{i}" for i in range(10)
    )
    assert await day_row(storage) == (10, 5, 1000)
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 1000


# --- answers under one upstream id (review-once F1) -----------------------------------------


async def test_another_requests_answer_under_a_taken_id_is_charged(storage: Storage) -> None:
    """Attack: an upstream (buggy or hostile) that repeats an answer id. Only a
    record of the same request is a duplicate (a retried write, a replayed
    spool line); another request's answer under the id is a new answer,
    charged under ``<id>#<request id>``, and the id stays the first answer's."""
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    for name in ("r2", "r4"):
        await admit_pending(storage, name)
    assert await storage.settle(event("x", tokens=100, request_id="r1"))
    # Alice's next answer and bob's, under the same id: each charged.
    assert await storage.settle(event("x", tokens=40, request_id="r2"), pending_id="r2")
    assert await storage.settle(event("x", user="bob", tokens=7, request_id="r3"))
    # Replays of each record (with its pending row, or none: a fail-open
    # answer): nothing more.
    assert not await storage.settle(event("x", tokens=100, request_id="r1"))
    assert not await storage.settle(event("x", tokens=40, request_id="r2"), pending_id="r2")
    assert not await storage.settle(event("x", tokens=40, request_id="r2"))
    assert not await storage.settle(event("x", user="bob", tokens=7, request_id="r3"))
    # An upstream that named an answer of its own the id this request's would
    # take (it may know request ids: they are passed on as trace ids).
    assert await storage.settle(event("y#r4", user="bob", tokens=3, request_id="r9"))
    assert await storage.settle(event("y", tokens=1, request_id="r8"))
    assert await storage.settle(event("y", tokens=5, request_id="r4"), pending_id="r4")
    assert not await storage.settle(event("y", tokens=5, request_id="r4"))
    rows = sorted(
        (e.answer_id, e.user_id, e.request_id, e.total_tokens) for e in await all_events(storage)
    )
    assert rows == [
        ("x", "alice", "r1", 100),
        ("x#r2", "alice", "r2", 40),
        ("x#r3", "bob", "r3", 7),
        ("y", "alice", "r8", 1),
        ("y#r4", "bob", "r9", 3),
        ("y#r4#r4", "alice", "r4", 5),
    ]
    users = {u: await storage.get_user(u) for u in ("alice", "bob")}
    assert {u: user.lifetime_tokens for u, user in users.items() if user} == {
        "alice": 146,
        "bob": 10,
    }
    assert await day_row(storage) == (2, 0, 146)
    assert await day_row(storage, "bob") == (0, 0, 10)
    # Whose the object is: the first answer's user, not the one the upstream
    # gave the same id later.
    owner = await storage.answer_owner("x")
    assert owner is not None and owner.user_id == "alice"
    owner = await storage.answer_owner("y#r4")
    assert owner is not None and owner.user_id == "bob"


async def test_a_record_under_an_id_another_request_took_supersedes_its_estimate(
    storage: Storage,
) -> None:
    """A recovered estimate whose real record comes back under an id another
    request's answer took meanwhile: the record replaces the estimate (under its
    own id), once; it neither doubles it nor leaves it."""
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    await admit_web(storage, "r1", limit=5)  # one web search reserved
    assert await storage.recover(before=LATER, now=LATER) == ["r1"]
    assert await day_row(storage) == (1, 1, 25)
    assert await storage.settle(event("x", user="bob", tokens=70, request_id="r9"))
    real = event("x", tokens=300, web_searches=0, request_id="r1", model="o3", cached_tokens=4)
    assert await storage.settle(real, lease_id="r1", pending_id="r1")
    # Replayed: nothing changes.
    assert not await storage.settle(real, lease_id="r1", pending_id="r1")
    assert not await storage.settle(real)
    rows = {e.answer_id: e for e in await all_events(storage)}
    assert sorted(rows) == ["x", "x#r1"]
    mine = rows["x#r1"]
    assert (mine.user_id, mine.request_id, mine.total_tokens, mine.outcome) == (
        "alice",
        "r1",
        300,
        "complete",
    )
    assert (mine.model, mine.cached_tokens, mine.web_searches) == ("o3", 4, 0)
    assert (rows["x"].user_id, rows["x"].total_tokens) == ("bob", 70)
    assert await day_row(storage) == (1, 0, 300)
    assert await day_row(storage, "bob") == (0, 0, 70)
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 300
    owner = await storage.answer_owner("x")
    assert owner is not None and owner.user_id == "bob"


async def test_an_estimate_under_an_id_another_answer_took_is_charged(storage: Storage) -> None:
    """An upstream that named bob's answer ``gw-<alice's request id>``: alice's
    recovered estimate is charged all the same, and bob's row is left as it is."""
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    await admit_web(storage, "r1", limit=5)
    assert await storage.settle(event("gw-r1", user="bob", tokens=70, request_id="r9"))
    assert await storage.recover(before=LATER, now=LATER) == ["r1"]
    rows = sorted(
        (e.answer_id, e.user_id, e.total_tokens, e.outcome, e.web_searches)
        for e in await all_events(storage)
    )
    assert rows == [
        ("gw-r1", "bob", 70, "complete", 0),
        ("gw-r1#r1", "alice", 25, "recovered", 0),
    ]
    assert await day_row(storage) == (1, 1, 25)
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 25


# --- ownership (issue 20, default deny) ----------------------------------------------------


async def test_a_conversation_with_an_id_too_long_to_index_is_kept_and_read(
    storage: Storage,
) -> None:
    """A Dify conversation id past what PostgreSQL can index (review-rec REC-2: an
    upstream's, buggy or hostile): what the conversation asked for is kept and
    read by that same id, under its bounded form (`stored_id`), on both
    backends. Before, PostgreSQL refused to keep it."""
    await storage.ensure_user("alice", plan="free")
    long_id = "".join(f"{i:x}{i * 7919 % 65521:x}" for i in range(1200))
    asked = ConversationFeatures(advanced_rag=True, web_search=False)
    await storage.remember_conversation("alice", long_id, asked, upstream="default", now=NOW)
    assert await storage.conversation_features("alice", long_id) == asked
    assert await storage.conversation_features("alice", long_id[:-1]) is None
    assert await storage.conversation_features("alice", stored_id(long_id)) == asked


async def test_answer_owner_names_the_user_whose_ledger_row_it_is(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    assert await storage.settle(event("resp_alice", user="alice"))
    assert await storage.settle(event("chatcmpl-bob", user="bob"))
    assert await storage.settle(replace(event("resp_carol", user="alice"), upstream="research"))
    given = event("resp_alice").created_at  # when each answer was given (its ledger row's)
    assert await storage.answer_owner("resp_alice") == AnswerOwner("alice", "default", given)
    assert await storage.answer_owner("chatcmpl-bob") == AnswerOwner("bob", "default", given)
    # The upstream that gave it (issue 23): where the object is kept.
    assert await storage.answer_owner("resp_carol") == AnswerOwner("alice", "research", given)
    assert await storage.answer_owner("resp_nobody") is None
    # Exact match only: no pattern or prefix reading of the id.
    assert await storage.answer_owner("resp_%") is None
    assert await storage.answer_owner("") is None


async def test_conversation_upstream_is_where_the_users_conversation_began(
    storage: Storage,
) -> None:
    # Review of issue 23: a Dify conversation lives in the app that made it.
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    began = replace(event("m1", user="alice"), conversation_id="c-1", upstream="research")
    assert await storage.settle(began)
    later = replace(event("m2", user="alice"), conversation_id="c-1", upstream="support")
    assert await storage.settle(later)
    assert await storage.conversation_upstream("alice", "c-1") == "research"
    # Another user's conversation of the same id is not read; nor an unknown one.
    assert await storage.conversation_upstream("bob", "c-1") is None
    assert await storage.conversation_upstream("alice", "c-%") is None


async def test_upload_owners_are_read_back_in_one_query(storage: Storage) -> None:
    # Review F9: whose each upload is, for the answers that attach it by id.
    for user in ("alice", "bob", "mallory"):
        await storage.ensure_user(user, plan="free")
    await storage.remember_upload("u-1", user_id="alice", upstream="default", now=NOW)
    await storage.remember_upload("u-2", user_id="bob", upstream="research", now=NOW)
    # The first record of an id wins: a later claim does not take it over.
    await storage.remember_upload("u-1", user_id="mallory", upstream="default", now=NOW)
    many = [f"u-{n}" for n in range(5000)]  # past SQLite's parameter bound of old builds
    assert await storage.upload_owners(many) == {"u-1": "alice", "u-2": "bob"}
    assert await storage.upload_owners({"u-2"}) == {"u-2": "bob"}
    # Exact match only; nothing asked, nothing read.
    assert await storage.upload_owners(["u-%", "U-1", ""]) == {}
    assert await storage.upload_owners([]) == {}


async def _delete_user(url: str, user: str) -> None:
    """Delete a user by hand, as an operator does (the gateway has no command
    for it): on SQLite with the sqlite3 shell's defaults, foreign keys off."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("DELETE FROM users WHERE id = ?", (user,))
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await pg.execute("DELETE FROM users WHERE id = $1", user)
    finally:
        await pg.close()


async def test_a_deleted_users_uploads_go_with_the_user(
    storage: Storage, database_url: str
) -> None:
    # The attack: alice is deleted; somebody is later given the id "alice"
    # again (a reused login, a JWT subject issued anew, `gateway users add`).
    # The gateway knows users by id alone: the old alice's upload rows made the
    # new one the owner of her files, and her answers could attach them.
    for user in ("alice", "bob"):
        await storage.ensure_user(user, plan="free")
    await storage.remember_upload("u-1", user_id="alice", upstream="default", now=NOW)
    await storage.remember_upload("u-2", user_id="bob", upstream="default", now=NOW)
    await _delete_user(database_url, "alice")
    assert await storage.upload_owners(["u-1", "u-2"]) == {"u-2": "bob"}
    await storage.ensure_user("alice", plan="free")
    assert await storage.upload_owners(["u-1", "u-2"]) == {"u-2": "bob"}
    # The new alice's own uploads are hers.
    await storage.remember_upload("u-3", user_id="alice", upstream="default", now=NOW)
    assert await storage.upload_owners(["u-1", "u-3"]) == {"u-3": "alice"}


async def test_an_upload_of_a_user_deleted_meanwhile_is_not_kept(
    storage: Storage, database_url: str
) -> None:
    # The upstream's reply to an upload comes after its user was deleted (the
    # upload was admitted before): the record would outlive the deletion, for
    # whoever is made again under the id.
    await storage.ensure_user("alice", plan="free")
    await _delete_user(database_url, "alice")
    await storage.remember_upload("u-1", user_id="alice", upstream="default", now=NOW)
    await storage.ensure_user("alice", plan="free")
    assert await storage.upload_owners(["u-1"]) == {}
