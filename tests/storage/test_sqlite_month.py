"""SQLite admission late in the month: the month to date is summed exactly -
costs as Decimals, what answers under way reserved included - and without a
Python call per day row (such calls made an admission on the 30th cost about
600 us against 50 us on the 1st; bench/month.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.quota.limits import Limit
from gateway.storage import AdmissionLimits, Lease, Pending
from gateway.storage.sqlite import SQLiteStorage, _dec_add

MONTH = date(2026, 12, 1)
LAST = date(2026, 12, 30)
NOW = datetime(2026, 12, 30, 12, tzinfo=UTC)
# A day row for each day of the month to the 30th: costs with many places, an
# earlier day with a reservation left (an answer under way), and today's row.
ROWS = [
    (
        "alice",
        MONTH.replace(day=d).isoformat(),
        d,
        7 * d,
        1000 * d,
        f"{d}.00000000001",
        "0.3" if d == 7 else "0",
    )
    for d in range(1, 31)
]
TOKENS = sum(row[4] for row in ROWS)
# A per-model limit's counters: the same days, in its own rows.
GPT = Limit("cost_per_month[gpt-*]", "cost", "month", Decimal(10**6), models=("gpt-*",))
MODEL_ROWS = [(user, GPT.counter_key, day, q, tokens, cost, reserved)
              for user, day, q, _, tokens, cost, reserved in ROWS]  # fmt: skip
COST = sum((Decimal(row[5]) + Decimal(row[6]) for row in ROWS), Decimal(0))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    opened = await SQLiteStorage.open(str(tmp_path / "gateway.db"))
    try:
        await opened.migrate()
        await opened.ensure_user("alice", plan="free")

        def fill(conn: object) -> None:
            conn.executemany(  # type: ignore[attr-defined]
                "INSERT INTO usage_daily (user_id, day, queries, web_searches, total_tokens, "
                "cost, cost_reserved) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ROWS,
            )
            conn.executemany(  # type: ignore[attr-defined]
                "INSERT INTO usage_models (user_id, scope, day, queries, total_tokens, "
                "cost, cost_reserved) VALUES (?, ?, ?, ?, ?, ?, ?)",
                MODEL_ROWS,
            )

        await opened._tx(fill)
        yield opened
    finally:
        await opened.close()


async def _admit(store: SQLiteStorage, limits: AdmissionLimits, day: date = LAST) -> object:
    return await store.admit(
        "alice",
        day=day,
        month_start=MONTH,
        limits=limits,
        now=NOW,
        lease=Lease("r1", NOW + timedelta(minutes=5)),
        pending=Pending(id="r1", endpoint="chat-messages"),
    )


async def test_the_month_to_date_is_summed_exactly(store: SQLiteStorage) -> None:
    assert str(COST) == "465.30000000030"  # Decimals: no float rounding
    exact = AdmissionLimits(tokens_per_month=TOKENS, cost_per_month=COST + Decimal("1E-11"))
    refused = await store.admit("alice", day=LAST, month_start=MONTH, limits=exact, now=NOW)
    assert not refused.admitted and refused.refused_by == "tokens_per_month"
    assert refused.counters.of("tokens", "month") == TOKENS
    assert refused.counters.of("cost", "month") == COST
    assert refused.counters.of("queries", "month") == sum(row[2] for row in ROWS)
    assert refused.counters.of("web_searches", "month") == sum(row[3] for row in ROWS)
    assert refused.counters.of("tokens", "day") == 30_000
    assert refused.counters.of("cost", "day") == Decimal("30.00000000001")
    # The cost one part in 10^11 under its limit fits; the tokens one over refuse.
    fits = AdmissionLimits(tokens_per_month=TOKENS + 1, cost_per_month=COST + Decimal("1E-11"))
    assert (await _admit(store, fits)).admitted  # type: ignore[attr-defined]
    # Earlier in the month, the days after are not counted.
    mid = await store.admit(
        "alice", day=date(2026, 12, 7), month_start=MONTH, limits=exact, now=NOW
    )
    assert mid.counters.of("cost", "month") == Decimal("28.30000000007")
    assert mid.counters.of("cost", "day") == Decimal("7.30000000001")
    # On the 1st, the month is the day.
    first = await store.admit("alice", day=MONTH, month_start=MONTH, limits=exact, now=NOW)
    assert first.counters.of("tokens", "month") == first.counters.of("tokens", "day") == 1000


async def test_a_per_model_month_is_summed_exactly(store: SQLiteStorage) -> None:
    key = GPT.counter_key
    assert key is not None
    seen = await store.admit(
        "alice", day=LAST, month_start=MONTH, limits=AdmissionLimits([GPT]), now=NOW
    )
    models = seen.counters.models
    assert models[(key, "cost", "month")] == COST  # after this admission's charge: 1 query
    assert models[(key, "tokens", "month")] == TOKENS
    assert models[(key, "queries", "month")] == sum(row[2] for row in ROWS) + 1
    assert models[(key, "cost", "day")] == Decimal("30.00000000001")
    assert models[(key, "queries", "day")] == 31


async def test_no_python_call_per_day_row(store: SQLiteStorage) -> None:
    calls: list[str] = []

    def counted(name: str, fn: Callable[..., str]) -> Callable[..., str]:
        def call(*args: str | None) -> str:
            calls.append(name)
            return fn(*args)

        return call

    store._conn.create_function("dec_add", 2, counted("dec_add", _dec_add), deterministic=True)
    limits = AdmissionLimits([GPT], tokens_per_month=10**9, cost_per_month=Decimal(10**6))
    assert (await _admit(store, limits)).admitted  # type: ignore[attr-defined]
    # The day row's upsert adds the reservation, the per-model row's upsert the
    # cost and the reservation: three calls, none per day row.
    assert calls == ["dec_add"] * 3


async def test_a_day_without_its_row_counts_nothing_today(store: SQLiteStorage) -> None:
    """The admission's one read takes today's counters from the month's latest
    row only when that row is today's (issue 24): on the 31st, which has no row
    yet, the day counts nothing and the month every earlier day."""
    exact = AdmissionLimits(queries_per_day=1, tokens_per_month=TOKENS)
    seen = await store.admit(
        "alice", day=date(2026, 12, 31), month_start=MONTH, limits=exact, now=NOW
    )
    assert not seen.admitted and seen.refused_by == "tokens_per_month"
    assert seen.counters.of("queries", "day") == 0
    assert seen.counters.of("tokens", "day") == 0
    assert seen.counters.of("cost", "day") == 0
    assert seen.counters.of("tokens", "month") == TOKENS
    assert seen.counters.of("cost", "month") == COST
    # Without a monthly limit the month is not read, and today's row alone counts.
    daily = await store.admit(
        "alice", day=LAST, month_start=MONTH, limits=AdmissionLimits(queries_per_day=30), now=NOW
    )
    assert not daily.admitted and daily.counters.of("queries", "day") == 30
