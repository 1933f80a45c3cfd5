"""The teams directory (issue 21) in the storage contract: both backends."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.errors import Conflict, NotFound
from gateway.storage import Storage, UsageEvent, migrations, open_storage
from gateway.storage import postgres as postgres_backend
from gateway.storage import sqlite as sqlite_backend

NOW = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
DAY = date(2026, 11, 21)


def event(answer_id: str, user: str, *, day: date = DAY, tokens: int, cost: str) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=day,
        created_at=NOW,
        endpoint="chat-messages",
        prompt_tokens=tokens - 1,
        completion_tokens=1,
        total_tokens=tokens,
        cost=Decimal(cost),
        web_searches=1,
    )


async def test_a_team_is_created_once_and_read_back(storage: Storage) -> None:
    team = await storage.create_team("acme", plan="pro", now=NOW)
    assert (team.id, team.plan, dict(team.overrides), team.created_at) == ("acme", "pro", {}, NOW)
    assert await storage.get_team("acme") == team
    with pytest.raises(Conflict):
        await storage.create_team("acme", plan="free", now=NOW)
    assert (await storage.get_team("acme")).plan == "pro"  # type: ignore[union-attr]
    assert await storage.get_team("nobody") is None


async def test_team_plan_and_overrides(storage: Storage) -> None:
    await storage.create_team("acme", plan="free", now=NOW)
    await storage.set_team_plan("acme", "pro")
    await storage.set_team_override("acme", "queries_per_day", 500)
    await storage.set_team_override("acme", "tokens_per_day", None)
    team = await storage.get_team("acme")
    assert team is not None and team.plan == "pro"
    assert dict(team.overrides) == {"queries_per_day": 500, "tokens_per_day": None}
    await storage.clear_team_override("acme", "queries_per_day")
    team = await storage.get_team("acme")
    assert team is not None and dict(team.overrides) == {"tokens_per_day": None}
    for call in (
        storage.set_team_plan("nobody", "pro"),
        storage.set_team_override("nobody", "queries_per_day", 1),
        storage.clear_team_override("nobody", "queries_per_day"),
    ):
        with pytest.raises(NotFound):
            await call


async def test_users_join_and_leave_a_team(storage: Storage) -> None:
    await storage.create_team("acme", plan="pro", now=NOW)
    await storage.create_team("zeta", plan="free", now=NOW)
    for user in ("carol", "alice", "bob"):
        await storage.ensure_user(user, plan="free")
    assert (await storage.get_user("alice")).team is None  # type: ignore[union-attr]
    await storage.set_team("alice", "acme")
    await storage.set_team("carol", "acme")
    await storage.set_team("bob", "zeta")
    alice = await storage.get_user("alice")
    assert alice is not None and alice.team == "acme" and alice.plan == "free"
    assert [u.id for u in await storage.team_members("acme")] == ["alice", "carol"]
    assert [(s.team.id, s.members) for s in await storage.list_teams(day=DAY)] == [
        ("acme", 2),
        ("zeta", 1),
    ]
    # The team travels with the user record everywhere it is read.
    listed = {s.user.id: s.user.team for s in await storage.list_users(day=DAY)}
    assert listed == {"alice": "acme", "bob": "zeta", "carol": "acme"}
    assert (await storage.ensure_user("carol", plan="pro")).team == "acme"
    assert await storage.user_teams() == {"alice": "acme", "bob": "zeta", "carol": "acme"}

    await storage.set_team("carol", None)
    assert (await storage.get_user("carol")).team is None  # type: ignore[union-attr]
    assert [u.id for u in await storage.team_members("acme")] == ["alice"]
    with pytest.raises(NotFound, match="team"):
        await storage.set_team("alice", "nobody")
    assert (await storage.get_user("alice")).team == "acme"  # type: ignore[union-attr]
    with pytest.raises(NotFound, match="user"):
        await storage.set_team("nobody", "acme")


async def test_team_usage_is_its_members_day_rows_summed(storage: Storage) -> None:
    await storage.create_team("acme", plan="pro", now=NOW)
    for user in ("alice", "bob", "outsider"):
        await storage.ensure_user(user, plan="free")
    await storage.set_team("alice", "acme")
    await storage.set_team("bob", "acme")
    yesterday = DAY - timedelta(days=1)
    await storage.settle(event("a1", "alice", tokens=100, cost="0.1000001"))
    await storage.settle(event("a2", "alice", day=yesterday, tokens=10, cost="0.2"))
    await storage.settle(event("b1", "bob", tokens=50, cost="0.0000002"))
    await storage.settle(event("o1", "outsider", tokens=1000, cost="9"))

    rows = await storage.team_daily("acme", start=yesterday, end=DAY)
    assert [(r.user_id, r.day, r.total_tokens, r.cost, r.web_searches) for r in rows] == [
        ("acme", yesterday, 10, Decimal("0.2"), 1),
        ("acme", DAY, 150, Decimal("0.1000003"), 2),
    ]
    assert rows[1].prompt_tokens == 148 and rows[1].completion_tokens == 2
    assert await storage.team_daily("acme", start=DAY + timedelta(days=1), end=DAY) == []
    # The teams list sums one day the same way, teams without usage at zero.
    await storage.create_team("empty", plan="free", now=NOW)
    listed = await storage.list_teams(day=DAY)
    assert [(s.team.id, s.members) for s in listed] == [("acme", 2), ("empty", 0)]
    assert listed[0].today == rows[1]
    assert listed[1].today.total_tokens == 0 and listed[1].today.cost == Decimal(0)
    assert listed[1].today.day == DAY and listed[1].today.user_id == "empty"
    (yesterday_row,) = [s.today for s in await storage.list_teams(day=yesterday)][:1]
    assert (yesterday_row.total_tokens, yesterday_row.cost) == (10, Decimal("0.2"))
    assert await storage.team_daily("nobody", start=yesterday, end=DAY) == []


async def test_a_database_of_the_last_release_migrates_in_place(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The teams migration (PostgreSQL 0013, SQLite 0009) on a database that has
    users and usage: nothing is lost, every user is in no team."""
    if database_url.startswith("sqlite"):
        url, backend, teams_version = f"sqlite:///{tmp_path / 'old.db'}", "sqlite", 9
    else:
        url = await request.getfixturevalue("postgres").new_database_async()
        backend, teams_version = "postgres", 13
    module = sqlite_backend if backend == "sqlite" else postgres_backend
    before = [(v, sql) for v, sql in migrations(backend) if v < teams_version]
    monkeypatch.setattr(module, "migrations", lambda _backend: before)
    old = await open_storage(DatabaseConfig(url=url))
    try:
        assert await old.migrate() == len(before)
        # The user and their usage as the last release wrote them, in SQL (this
        # release's reads and writes name columns the old schema lacks).
        if backend == "sqlite":
            with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
                conn.execute(
                    "INSERT INTO users (id, plan, created_at, lifetime_tokens, lifetime_cost)"
                    " VALUES ('alice', 'pro', ?, 100, '0.25')",
                    (NOW.isoformat(),),
                )
                conn.execute(
                    "INSERT INTO usage_daily (user_id, day, queries, total_tokens, cost)"
                    " VALUES ('alice', ?, 1, 100, '0.25')",
                    (DAY.isoformat(),),
                )
                conn.commit()
        else:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(
                    "INSERT INTO users (id, plan, lifetime_tokens, lifetime_cost)"
                    " VALUES ('alice', 'pro', 100, 0.25)"
                )
                await conn.execute(
                    "INSERT INTO usage_daily (user_id, day, queries, total_tokens, cost)"
                    " VALUES ('alice', $1, 1, 100, 0.25)",
                    DAY,
                )
            finally:
                await conn.close()
    finally:
        await old.close()

    monkeypatch.undo()
    store = await open_storage(DatabaseConfig(url=url))
    try:
        assert await store.migrate() == len(migrations(backend)) - len(before)
        alice = await store.get_user("alice")
        assert alice is not None
        assert (alice.plan, alice.team, alice.lifetime_tokens, alice.lifetime_cost) == (
            "pro",
            None,
            100,
            Decimal("0.25"),
        )
        (row,) = await store.daily(DAY, DAY)
        assert row.total_tokens == 100
        await store.create_team("acme", plan="pro", now=NOW)
        await store.set_team("alice", "acme")
        (summed_row,) = await store.team_daily("acme", start=DAY, end=DAY)
        assert summed_row.cost == Decimal("0.25")
    finally:
        await store.close()
