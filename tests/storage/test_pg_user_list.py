"""PostgreSQL: the admin's user list reads the page's day rows only.

Since migration 0023 a user's day is two rows (admissions' and settles'), which
the list sums. Joined with the day's sums grouped beforehand, PostgreSQL summed
every active user's rows before LIMIT cut the page (103 ms against 0.07 ms at
50,000 users active today); a lateral subquery reads each page user's rows
through the primary key.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from gateway.storage.postgres import PostgresStorage
from tests.conftest import _truncate

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = [pytest.mark.postgres, pytest.mark.warm_connections]

NOW = datetime.now(UTC)
DAY = NOW.date()
USERS = 3000


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    """The run's database, emptied."""
    await _truncate(postgres_dsn)
    return postgres_dsn


class _Recording:
    """The pool, recording the statements fetched through it."""

    def __init__(self, pool: Any) -> None:
        self._real = pool
        self.fetched: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.fetched.append((sql, args))
        return await self._real.fetch(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _rows_read(node: dict[str, Any], relation: str) -> int:
    """Rows the plan's scans of ``relation`` returned, over all their loops."""
    own = 0
    if node.get("Relation Name") == relation:
        own = int(node.get("Actual Rows", 0)) * int(node.get("Actual Loops", 1))
    return own + sum(_rows_read(child, relation) for child in node.get("Plans", []))


async def test_the_user_list_reads_the_pages_day_rows_not_every_users(dsn: str) -> None:
    store = await PostgresStorage.open(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO users (id, plan, created_at) "
            "SELECT 'u' || lpad(g::text, 6, '0'), 'free', $2 FROM generate_series(1, $1) g",
            USERS,
            NOW,
        )
        # Every user asked and was answered today: both of the day's rows.
        await conn.execute(
            "INSERT INTO usage_daily (user_id, day, queries) SELECT id, $1, 3 FROM users", DAY
        )
        await conn.execute(
            "INSERT INTO usage_daily (user_id, day, part, total_tokens, cost) "
            "SELECT id, $1, 1, 100, 0.01 FROM users",
            DAY,
        )
        await conn.execute("ANALYZE")
        recording = _Recording(store._pool)
        store._pool = recording  # type: ignore[assignment]
        page = await store.list_users(day=DAY, limit=50, offset=0)
        assert [s.user.id for s in page][:2] == ["u000001", "u000002"]
        assert len(page) == 50
        # The two rows summed.
        assert (page[0].today.queries, page[0].today.total_tokens) == (3, 100)
        (sql, args) = recording.fetched[-1]
        plan_json = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
        plan = json.loads(plan_json)[0]["Plan"]
        read = _rows_read(plan, "usage_daily")
        # A page of fifty users: their day rows (two each), not every active user's.
        assert read <= 4 * 50, f"the user list read {read} day rows for a page of 50"
        # Sorted by today's tokens, the sums still order the page (every row
        # is read: the sort needs them all, as it did with one row a day).
        await conn.execute(
            "UPDATE usage_daily SET total_tokens = 500 WHERE user_id = 'u002999' AND part = 1"
        )
        top = await store.list_users(day=DAY, sort="tokens_today", descending=True, limit=2)
        assert [(s.user.id, s.today.total_tokens) for s in top] == [
            ("u002999", 500),
            ("u000001", 100),
        ]
    finally:
        await conn.close()
        await store.close()
