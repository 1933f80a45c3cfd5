"""PostgreSQL admission reads a user's open leases through an index scan, never a
bitmap scan (issue 24).

Settles delete leases; their entries stay in the (user, expiry) index until a
vacuum. A bitmap scan of the open leases' range visits every one of them - all
the answers settled within a lease's lifetime, tens of thousands after a burst -
at every admission, and never marks them dead; an index scan marks them as it
passes, so the next admission skips them. Which scan the planner picks depended
on the table's size when a connection first planned the statement: with 20,000
such leases, 7.3M server instructions an admission against 0.73M
(docs/performance.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from gateway.storage.postgres import PostgresStorage
from tests.conftest import _truncate

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)
# Leases of answers settled within the last lease lifetime: deleted, unvacuumed.
SETTLED = 20_000
# gateway_admit's arguments for one request under a limit of open streams.
_ADMIT = (
    "SELECT * FROM gateway_admit($1, $2, $3, '{10}'::smallint[], '{3}'::smallint[], "
    "'{5}'::numeric[], '{1}'::smallint[], '{NULL}'::text[], $4, $5, $6, false, $7, "
    "'chat-messages', 0, 0, 0, 0, 'USD', false, false, 0, NULL, 'default', $8)"
)
_ADMIT_MANY = (
    "SELECT * FROM gateway_admit_many(ARRAY[$1, $1], ARRAY[$2, $2]::date[], "
    "ARRAY[$3, $3]::date[], '{1,1}', '{1,1}', '{10}', '{3}', '{5}', '{1}', '{NULL}', "
    "ARRAY[$4 || '-a', $4 || '-b'], ARRAY[$5, $5]::timestamptz[], ARRAY[$6, $6]::timestamptz[], "
    "'{f,f}', ARRAY[$7 || '-a', $7 || '-b'], '{chat-messages,chat-messages}', '{0,0}', "
    "'{0,0}', '{0,0}', '{0,0}', '{USD,USD}', '{f,f}', '{f,f}', '{0,0}', '{NULL,NULL}')"
)


@pytest.fixture
async def dsn(postgres_dsn: str) -> AsyncIterator[str]:
    await _truncate(postgres_dsn)
    store = await PostgresStorage.open(postgres_dsn)
    try:
        await store.ensure_user("alice", plan="free")
    finally:
        await store.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(
            "INSERT INTO stream_leases SELECT 'settled-' || g, 'alice', $1 "
            "FROM generate_series(1, $2) g",
            NOW + timedelta(minutes=15),
            SETTLED,
        )
        await conn.execute("DELETE FROM stream_leases")
    finally:
        await conn.close()
    yield postgres_dsn


async def _plans(dsn: str, statement: str, *args: object) -> list[str]:
    """The plans of the statements `statement` ran, nested ones included
    (auto_explain), in a new connection (plans made afresh)."""
    conn = await asyncpg.connect(dsn)
    plans: list[str] = []
    conn.add_log_listener(lambda _conn, message: plans.append(str(message.message)))
    try:
        await conn.execute("LOAD 'auto_explain'")
        await conn.execute(
            "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on; "
            "SET client_min_messages = log"
        )
        await conn.fetch(statement, *args)
        await conn.execute("SET client_min_messages = notice")
    finally:
        await conn.close()
    return plans


@pytest.mark.parametrize("batched", [False, True])
async def test_a_lone_admission_reads_the_leases_without_a_bitmap_scan(
    dsn: str, batched: bool
) -> None:
    args = ("alice", NOW.date(), NOW.date().replace(day=1), "r1", NOW + timedelta(minutes=15))
    plans = await _plans(dsn, _ADMIT, *args, NOW, "p1", batched)
    leases = [p for p in plans if "stream_leases s" in p]
    assert leases  # the lease reads were planned (and logged)
    assert not [p for p in leases if "Bitmap" in p]


async def test_a_batch_of_admissions_reads_the_leases_without_a_bitmap_scan(dsn: str) -> None:
    args = ("alice", NOW.date(), NOW.date().replace(day=1), "r", NOW + timedelta(minutes=15))
    plans = await _plans(dsn, _ADMIT_MANY, *args, NOW, "p")
    leases = [p for p in plans if "stream_leases s" in p]
    assert leases
    assert not [p for p in leases if "Bitmap" in p]
