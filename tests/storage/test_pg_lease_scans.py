"""PostgreSQL admission reads a user's open leases through an index scan of the
(user, expiry) index - never a bitmap scan, never a sequential scan (issue 24).

Settles delete leases; their entries stay in the index until a vacuum. A bitmap
scan of the open leases' range visits every one of them - all the answers
settled within a lease's lifetime, tens of thousands after a burst - at every
admission, and never marks them dead; an index scan marks them as it passes, so
the next admission skips them. A sequential scan reads every page of the table
at every admission, whoever the user. Which scan the planner picks depends on
the statistics and on when a connection plans the statement (its first five
calls get custom plans; an ANALYZE replans), so the functions that read leases
turn both other scans off: with 20,000 such leases, 7.3M server instructions an
admission against 0.73M (docs/performance.md).

Each test reads the plans a new connection makes (auto_explain, nested
statements), with the buffers they touched.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from gateway.storage.postgres import PostgresStorage
from tests.conftest import _truncate

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = [pytest.mark.postgres, pytest.mark.warm_connections]

NOW = datetime.now(UTC)
DAY = NOW.date()
MONTH = DAY.replace(day=1)
EXPIRES = NOW + timedelta(minutes=15)
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
# A team member's admission under the team's limit of open streams, and an
# upload reserved against the team's uploads per day.
_TEAM_ADMIT = (
    "SELECT * FROM gateway_admit($1, $2, $3, '{10}'::smallint[], '{3}'::smallint[], "
    "'{50}'::numeric[], '{2}'::smallint[], '{NULL}'::text[], $4, $5, $6, false, $4, "
    "'chat-messages', 0, 0, 0, 0, 'USD', false, false, 0, 't', 'default', true)"
)
_TEAM_UPLOAD = (
    "SELECT * FROM gateway_reserve_upload($1, $2, $3, $4, 10, '{4}', '{1}', '{1000}', '{2}', 't')"
)


@pytest.fixture
async def dsn(postgres_dsn: str) -> AsyncIterator[str]:
    """The run's database, emptied, its leases' table with no pages left by
    earlier tests; vacuumed after, so that the leases deleted here do not change
    later tests' plans."""
    await _truncate(postgres_dsn)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("TRUNCATE stream_leases")
    finally:
        await conn.close()
    yield postgres_dsn
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("TRUNCATE stream_leases")
        await conn.execute("VACUUM ANALYZE stream_leases")
    finally:
        await conn.close()


async def _users(dsn: str, *users: str, team: str | None = None) -> None:
    store = await PostgresStorage.open(dsn)
    try:
        if team is not None:
            await store.create_team(team, plan="free", now=NOW)
        for user in users:
            await store.ensure_user(user, plan="free")
            if team is not None:
                await store.set_team(user, team)
    finally:
        await store.close()


async def _settled(dsn: str, user: str, *, analyzed_with: int = 0) -> None:
    """``SETTLED`` leases of ``user``'s, deleted as settles delete them and not
    vacuumed. With ``analyzed_with``, first that many open leases spread over
    fifty users (u0-u49), analyzed as autovacuum would."""
    conn = await asyncpg.connect(dsn)
    try:
        if analyzed_with:
            await conn.execute(
                "INSERT INTO stream_leases SELECT 'live-' || g, 'u' || (g % 50), $1 "
                "FROM generate_series(1, $2) g",
                EXPIRES,
                analyzed_with,
            )
            await conn.execute("VACUUM ANALYZE stream_leases")
        await conn.execute(
            "INSERT INTO stream_leases SELECT 'settled-' || g, $1, $2 "
            "FROM generate_series(1, $3) g",
            user,
            EXPIRES,
            SETTLED,
        )
        await conn.execute("DELETE FROM stream_leases WHERE id LIKE 'settled-%'")
    finally:
        await conn.close()


async def _plans(dsn: str, calls: list[tuple[str, tuple[object, ...]]]) -> list[str]:
    """The plans of the statements ``calls`` ran, nested ones included, with the
    buffers each node touched, on a new connection (plans made afresh)."""
    conn = await asyncpg.connect(dsn)
    plans: list[str] = []
    conn.add_log_listener(lambda _conn, message: plans.append(str(message.message)))
    try:
        await conn.execute("LOAD 'auto_explain'")
        await conn.execute(
            "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
            " SET auto_explain.log_analyze = on; SET auto_explain.log_buffers = on;"
            " SET auto_explain.log_timing = off; SET client_min_messages = log"
        )
        for statement, args in calls:
            await conn.fetch(statement, *args)
        await conn.execute("SET client_min_messages = notice")
    finally:
        await conn.close()
    return plans


def _lease_reads(plans: list[str], alias: str) -> list[tuple[str, int]]:
    """(scan node, shared buffers hit) of each read of ``stream_leases <alias>``."""
    reads = []
    for plan in plans:
        lines = plan.splitlines()
        for at, line in enumerate(lines):
            if f"on stream_leases {alias}" in line:
                node = line.split("->")[-1].split(" on ")[0].strip()
                buffers = re.search(r"shared hit=(\d+)", "\n".join(lines[at + 1 : at + 4]))
                reads.append((node, int(buffers.group(1)) if buffers else 0))
    return reads


def _admissions(
    user: str, count: int, statement: str = _ADMIT
) -> list[tuple[str, tuple[object, ...]]]:
    return [
        (statement, (user, DAY, MONTH, f"r{i}", EXPIRES, NOW, f"p{i}", True)) for i in range(count)
    ]


def _index_scans(reads: list[tuple[str, int]]) -> bool:
    return bool(reads) and all(node.startswith("Index") for node, _ in reads)


@pytest.mark.parametrize("batched", [False, True])
async def test_a_lone_admission_reads_the_leases_by_an_index_scan(dsn: str, batched: bool) -> None:
    await _users(dsn, "alice")
    await _settled(dsn, "alice")
    args = ("alice", DAY, MONTH, "r1", EXPIRES, NOW, "p1", batched)
    reads = _lease_reads(await _plans(dsn, [(_ADMIT, args)]), "s")
    assert _index_scans(reads), reads


async def test_a_batch_of_admissions_reads_the_leases_by_an_index_scan(dsn: str) -> None:
    await _users(dsn, "alice")
    await _settled(dsn, "alice")
    args = ("alice", DAY, MONTH, "r", EXPIRES, NOW, "p")
    reads = _lease_reads(await _plans(dsn, [(_ADMIT_MANY, args)]), "s")
    assert _index_scans(reads), reads


async def test_under_analyzed_statistics_the_leases_are_read_by_an_index_scan(dsn: str) -> None:
    """Statistics taken before a burst (as autovacuum takes them): the planner
    then costs a sequential scan below an index scan. (Whether the first index
    scan's marks spare the next ones depends on every other transaction of the
    database having ended: not asserted here.)"""
    await _users(dsn, *(f"u{i}" for i in range(50)))
    await _settled(dsn, "u0", analyzed_with=100)
    reads = _lease_reads(await _plans(dsn, _admissions("u0", 3)), "s")
    assert len(reads) == 3 and _index_scans(reads), reads


async def test_a_bystander_does_not_read_another_users_burst(dsn: str) -> None:
    """After one user's burst, another user's admission reads its own few index
    entries, not the whole table (a sequential scan: 138 buffers each)."""
    await _users(dsn, *(f"u{i}" for i in range(50)))
    await _settled(dsn, "u0", analyzed_with=100)
    reads = _lease_reads(await _plans(dsn, _admissions("u1", 3)), "s")
    assert len(reads) == 3 and all(buffers < 20 for _, buffers in reads), reads


async def test_a_team_admission_reads_the_leases_by_an_index_scan_after_uploads(dsn: str) -> None:
    """A PL/pgSQL function's plans are cached per connection, whoever calls it:
    gateway_team_counters' plan made during a connection's upload reservations
    (gateway_reserve_upload) is the one team admissions there then use, so the
    function itself keeps bitmap and sequential scans off."""
    await _users(dsn, "u0", "u1", team="t")
    await _settled(dsn, "u0")
    uploads = [(_TEAM_UPLOAD, ("u1", f"up{i}", DAY, MONTH)) for i in range(6)]
    admits = [(_TEAM_ADMIT, ("u1", DAY, MONTH, f"m{i}", EXPIRES, NOW)) for i in range(2)]
    reads = _lease_reads(await _plans(dsn, uploads + admits), "l")
    assert _index_scans(reads), reads
