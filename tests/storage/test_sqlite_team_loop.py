"""SQLite: a small team's admission is made on the event loop, as a lone
user's is (issue 24: on the connection's thread it waited for the hop and for
the GIL); a larger team's goes to the thread, whose statements do not hold up
the event loop, with the same counters either way."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.quota.limits import Limit
from gateway.storage import AdmissionLimits, Lease, Pending
from gateway.storage.sqlite import TEAM_NOW_MOST, SQLiteStorage

NOW = datetime(2026, 12, 7, 9, tzinfo=UTC)
DAY = date(2026, 12, 7)
MONTH = date(2026, 12, 1)
# Three queries a day for the whole team, streams and a month for its members.
LIMITS = AdmissionLimits(
    [
        Limit("team_queries_per_day", "queries", "day", Decimal(3), scope="team"),
        Limit("team_tokens_per_month", "tokens", "month", Decimal(10**9), scope="team"),
    ],
    max_concurrent_streams=10,
)


async def _store(tmp_path: Path, members: int) -> tuple[SQLiteStorage, list[int]]:
    store = await SQLiteStorage.open(str(tmp_path / "gateway.db"))
    await store.migrate()
    await store.create_team("t", plan="free", now=NOW)
    for at in range(members):
        await store.ensure_user(f"u{at}", plan="free")
        await store.set_team(f"u{at}", "t")
    hops: list[int] = []
    submit: Callable[..., Any] = store._executor.submit

    def counted(*args: Any, **kwargs: Any) -> Any:
        hops.append(1)
        return submit(*args, **kwargs)

    store._executor.submit = counted  # type: ignore[method-assign]
    return store, hops


def _admit(store: SQLiteStorage, user: str, request: str) -> Any:
    return store.admit(
        user,
        day=DAY,
        month_start=MONTH,
        limits=LIMITS,
        now=NOW,
        lease=Lease(request, NOW + timedelta(minutes=5)),
        pending=Pending(id=request, endpoint="chat-messages"),
        team="t",
    )


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStorage, list[int]]]:
    store, hops = await _store(tmp_path, TEAM_NOW_MOST)
    yield store, hops
    await store.close()


@pytest.fixture
async def large(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStorage, list[int]]]:
    store, hops = await _store(tmp_path, TEAM_NOW_MOST + 1)
    yield store, hops
    await store.close()


async def test_a_small_teams_admission_is_made_on_the_event_loop(
    small: tuple[SQLiteStorage, list[int]],
) -> None:
    store, hops = small
    first = await _admit(store, "u0", "r0")
    await store._calls.drain()
    assert first.admitted and hops == []  # no hop to the connection's thread
    # Two at once go together as a batch, on the event loop too; the team's
    # limit holds across them: the third query of the day is the last.
    second, third = await asyncio.gather(_admit(store, "u1", "r1"), _admit(store, "u2", "r2"))
    fourth = await _admit(store, "u3", "r3")
    assert [second.admitted, third.admitted, fourth.admitted] == [True, True, False]
    assert fourth.refused_by == "team_queries_per_day"
    assert fourth.counters.of("queries", "day", "team") == 3
    assert hops == []


async def test_a_larger_teams_admission_goes_to_the_thread(
    large: tuple[SQLiteStorage, list[int]],
) -> None:
    store, hops = large
    first = await _admit(store, "u0", "r0")
    assert first.admitted and len(hops) == 1
    # Once found larger, its admissions go straight to the thread, alone or
    # together, and the team's limit holds as on the event loop.
    second, third = await asyncio.gather(_admit(store, "u1", "r1"), _admit(store, "u2", "r2"))
    fourth = await _admit(store, "u4", "r4")
    assert [second.admitted, third.admitted, fourth.admitted] == [True, True, False]
    assert fourth.refused_by == "team_queries_per_day"
    assert fourth.counters.of("queries", "day", "team") == 3
    assert store._large_teams == {"t"}
    # Nothing of the attempts made on the event loop was written: each query
    # is counted once, on its member's day row.
    rows = await store._run(
        lambda conn: conn.execute(
            "SELECT user_id, queries FROM usage_daily ORDER BY user_id"
        ).fetchall()
    )
    assert rows == [("u0", 1), ("u1", 1), ("u2", 1)]


async def test_a_batch_found_to_hold_a_larger_team_goes_to_the_thread_whole(
    large: tuple[SQLiteStorage, list[int]],
) -> None:
    """Two admissions of a team not yet known to be large, sent together: the
    batch begun on the event loop is given up when it meets the team, having
    written nothing, and made on the thread."""
    store, hops = large
    sent = (store._calls.batches, store._calls.calls)
    both = asyncio.gather(_admit(store, "u0", "r0"), _admit(store, "u1", "r1"))
    store._calls.together()  # (the two go as one batch, on the next turn)
    first, second = await both
    assert first.admitted and second.admitted
    assert second.counters.of("queries", "day", "team") == 2
    # One batch of the two, on the thread.
    assert len(hops) == 1
    assert (store._calls.batches - sent[0], store._calls.calls - sent[1]) == (1, 2)
    rows = await store._run(
        lambda conn: conn.execute(
            "SELECT user_id, queries FROM usage_daily ORDER BY user_id"
        ).fetchall()
    )
    assert rows == [("u0", 1), ("u1", 1)]


async def test_a_large_teams_members_are_not_read_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large team's first admission in a process: its size is found first, by
    a bounded count, before any member's rate window is summed or any member's
    id fetched: those reads (~60 ms of the event loop for 50,000 members) stay
    on the thread."""
    import gateway.storage.sqlite as lite

    store = await SQLiteStorage.open(str(tmp_path / "g.db"))
    await store.migrate()
    try:
        await store.create_team("t", plan="free", now=NOW)

        def fill(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO users (id, plan, created_at, team_id) VALUES (?, 'free', 'z', 't')",
                [(f"u{i}",) for i in range(200)],
            )

        await store._tx(fill)
        on_loop: list[str] = []
        rate_buckets = lite._rate_buckets

        def watched(conn: Any, user_id: str, limit: Limit, epoch: Any, team: Any = None) -> Any:
            if limit.scope == "team" and not store._on_thread:
                on_loop.append(limit.name)
            return rate_buckets(conn, user_id, limit, epoch, team)

        monkeypatch.setattr(lite, "_rate_buckets", watched)
        limits = AdmissionLimits(
            [
                Limit("team_rpm", "queries", "minute", Decimal(10**6), scope="team"),
                Limit("team_q", "queries", "day", Decimal(10**6), scope="team"),
            ]
        )
        admission = await store.admit(
            "u0", day=DAY, month_start=MONTH, limits=limits, now=NOW, team="t"
        )
        assert admission.admitted
        assert on_loop == []
    finally:
        await store.close()
