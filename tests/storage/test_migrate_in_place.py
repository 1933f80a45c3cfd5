"""Issue 21: a database of the schema before limits-as-data (PostgreSQL
migrations up to 0012, SQLite up to 0008) migrates in place with nothing lost:
its counters, pending answers and leases admit, settle and refund as before."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.quota.limits import Limit
from gateway.storage import (
    AdmissionLimits,
    AlertCheck,
    AlertRequest,
    Lease,
    Pending,
    Storage,
    UsageEvent,
    WebSearch,
    functions,
    migrations,
    open_storage,
)
from gateway.storage.sqlite import _statements, _ts
from tests.conftest import PostgresServer

NOW = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
DAY = date(2026, 11, 21)
EARLIER = date(2026, 11, 3)
MONTH = date(2026, 11, 1)
# The last migration of the schema before this change, per backend.
BEFORE = {"postgres": 12, "sqlite": 8}
# The last migration before issue 23's upstream columns (PostgreSQL 0017, SQLite 0013).
BEFORE_UPSTREAMS = {"postgres": 16, "sqlite": 12}

# The data: alice's two day rows this month, an answer of hers under way today
# (its pending row holds the web search it reserved) with a stream lease.
ROWS = [
    ("users", ("id", "plan", "created_at"), ("alice", "pro", NOW)),
    (
        "usage_daily",
        ("user_id", "day", "queries", "web_searches", "total_tokens", "prompt_tokens", "cost"),
        ("alice", EARLIER, 4, 1, 700, 500, Decimal("0.50")),
    ),
    (
        "usage_daily",
        ("user_id", "day", "queries", "web_searches", "total_tokens", "prompt_tokens", "cost"),
        ("alice", DAY, 2, 1, 300, 200, Decimal("0.25")),
    ),
    (
        "pending_answers",
        ("id", "user_id", "day", "created_at", "endpoint", "prompt_tokens", "total_tokens",
         "web_searches"),
        ("req-old", "alice", DAY, NOW, "chat-messages", 20, 20, 1),
    ),
    ("stream_leases", ("id", "user_id", "expires_at"), ("req-old", "alice", NOW + timedelta(hours=1))),
    (
        "usage_events",
        ("answer_id", "user_id", "day", "created_at", "endpoint", "prompt_tokens", "total_tokens",
         "cost", "outcome"),
        ("msg-before", "alice", EARLIER, NOW, "chat-messages", 500, 700, Decimal("0.50"), "complete"),
    ),
]  # fmt: skip


def _sqlite_value(value: object) -> object:
    if isinstance(value, datetime):
        return _ts(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def old_sqlite(path: Path, before: int = BEFORE["sqlite"]) -> str:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    for version, sql in migrations("sqlite"):
        if version <= before:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, _ts(NOW)))
    for table, columns, values in ROWS:
        marks = ", ".join("?" for _ in columns)
        conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
            [_sqlite_value(v) for v in values],
        )
    conn.close()
    return f"sqlite:///{path}"


async def old_postgres(server: PostgresServer, before: int = BEFORE["postgres"]) -> str:
    dsn = await server.new_database_async()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in migrations("postgres"):
            if version <= before:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        for table, columns, values in ROWS:
            marks = ", ".join(f"${i + 1}" for i in range(len(columns)))
            await conn.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", *values
            )
    finally:
        await conn.close()
    return dsn


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def old_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return old_sqlite(tmp_path / "old.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return asyncio.run(old_postgres(server))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_before_upstreams(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same data in a database of the schema just before issue 23's columns."""
    if request.param == "sqlite":
        return old_sqlite(tmp_path / "old.db", BEFORE_UPSTREAMS["sqlite"])
    server: PostgresServer = request.getfixturevalue("postgres")
    return asyncio.run(old_postgres(server, BEFORE_UPSTREAMS["postgres"]))


async def migrated(url: str) -> Storage:
    storage = await open_storage(DatabaseConfig(url=url))
    await storage.migrate()
    return storage


async def test_an_old_database_migrates_in_place_with_nothing_lost(old_database: str) -> None:
    storage = await migrated(old_database)
    try:
        rows = {r.day: r for r in await storage.daily(MONTH, DAY, user_id="alice")}
        assert (rows[EARLIER].queries, rows[EARLIER].total_tokens, rows[EARLIER].cost) == (
            4,
            700,
            Decimal("0.50"),
        )
        assert (rows[DAY].queries, rows[DAY].web_searches, rows[DAY].total_tokens) == (2, 1, 300)

        # The counters admission reads are the old ones: a query limit of 3 has
        # one left today, the month's tokens are both rows', the old answer's
        # lease holds one of two stream slots and its web search one of two.
        limits = AdmissionLimits(queries_per_day=3, tokens_per_month=2000, max_concurrent_streams=2)
        admitted = await storage.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            limits=limits,
            now=NOW,
            lease=Lease("req-new", NOW + timedelta(hours=1)),
            pending=Pending("req-new", "chat-messages"),
            web_search=WebSearch(2),
        )
        assert admitted.admitted and admitted.web_search_reserved
        counters = admitted.counters
        assert (counters.queries_today, counters.tokens_month, counters.open_streams) == (
            3,
            1000,
            2,
        )
        assert counters.web_searches_today == 2
        refused = await storage.admit("alice", day=DAY, month_start=MONTH, limits=limits, now=NOW)
        assert refused.refused_by == "queries_per_day"

        # The answer admitted before the migration settles once, its web-search
        # reservation replaced by what it used; a second settle changes nothing.
        answer = UsageEvent(
            answer_id="msg-old",
            user_id="alice",
            day=DAY,
            created_at=NOW,
            endpoint="chat-messages",
            prompt_tokens=80,
            completion_tokens=20,
            total_tokens=100,
            cost=Decimal("0.10"),
        )
        assert await storage.settle(answer, lease_id="req-old", pending_id="req-old")
        assert not await storage.settle(answer, lease_id="req-old", pending_id="req-old")
        assert await storage.refund("alice", day=DAY, lease_id="req-new", pending_id="req-new")
        today = {r.day: r for r in await storage.daily(DAY, DAY, user_id="alice")}[DAY]
        assert (today.queries, today.web_searches, today.total_tokens, today.cost) == (
            2,
            0,
            400,
            Decimal("0.35"),
        )
        assert await storage.open_streams("alice", now=NOW) == 0
        # Nothing is reserved any more: the whole cost budget is spendable.
        budget = AdmissionLimits(cost_per_day=Decimal("0.36"))
        spend = await storage.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            limits=budget,
            now=NOW,
            pending=Pending("req-3", "chat-messages", reserved_cost=Decimal("0.01")),
        )
        assert spend.admitted and spend.counters.of("cost", "day") == Decimal("0.36")
        # Issue 23: the ledger's rows from before are the default upstream's.
        events = {e.answer_id: e.upstream async for e in storage.events(MONTH, DAY)}
        assert events == {"msg-before": "default", "msg-old": "default"}
        by_upstream = await storage.usage_by_upstream("alice", start=MONTH, end=DAY)
        assert [(u.key, u.answers, u.total_tokens, u.cost) for u in by_upstream] == [
            ("default", 2, 800, Decimal("0.60"))
        ]
        # Review of issue 21: an upload is reserved on the old day row under
        # its request id (upload_reservations, PostgreSQL 0022, SQLite 0018):
        # counted again under it, once; given back under it, once.
        uploads = (Limit("uploads_per_day", "uploads", "day", Decimal(1)),)
        for size in (0, 70, 70):
            got = await storage.reserve_upload(
                "alice", key="req-up", day=DAY, month_start=MONTH, size=size, limits=uploads
            )
            assert got.admitted
        today = {r.day: r for r in await storage.daily(DAY, DAY, user_id="alice")}[DAY]
        assert (today.queries, today.uploads, today.upload_bytes) == (3, 1, 70)
        for _ in range(2):
            await storage.release_upload("alice", key="req-up")
        today = {r.day: r for r in await storage.daily(DAY, DAY, user_id="alice")}[DAY]
        assert (today.uploads, today.upload_bytes) == (0, 0)
    finally:
        await storage.close()


async def test_a_database_from_before_upstreams_migrates_in_place(
    database_before_upstreams: str,
) -> None:
    """Issue 23: the ledger's rows and the pending answers of a database from
    before the upstream columns are the default upstream's; what is admitted and
    settled after the migration records its own."""
    storage = await migrated(database_before_upstreams)
    try:
        assert {e.upstream async for e in storage.events(MONTH, DAY)} == {"default"}
        limits = AdmissionLimits(queries_per_day=100)
        admitted = await storage.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            limits=limits,
            now=NOW,
            pending=Pending("req-new", "chat-messages", total_tokens=9, upstream="research"),
        )
        assert admitted.admitted
        # The answer admitted before the migration is lost, the new one too:
        # recovered, each charged to its own upstream.
        later = NOW + timedelta(hours=1)
        assert sorted(await storage.recover(before=later, now=later)) == ["req-new", "req-old"]
        events = {e.answer_id: e.upstream async for e in storage.events(MONTH, DAY)}
        assert events == {
            "msg-before": "default",
            "gw-req-old": "default",
            "gw-req-new": "research",
        }
        answer = UsageEvent(
            answer_id="msg-new",
            user_id="alice",
            day=DAY,
            created_at=later,
            endpoint="chat-messages",
            total_tokens=40,
            request_id="req-new",
            upstream="backup",
        )
        assert await storage.settle(answer, pending_id="req-new")  # supersedes the estimate
        by_upstream = await storage.usage_by_upstream("alice", start=MONTH, end=DAY)
        assert [(u.key, u.answers, u.total_tokens) for u in by_upstream] == [
            ("default", 2, 720),
            ("backup", 1, 40),
        ]
    finally:
        await storage.close()


@pytest.mark.postgres
async def test_postgres_functions_are_applied_when_their_files_change(
    postgres: PostgresServer,
) -> None:
    """The live functions come from sql/postgres/functions/, applied by every
    migrate whose files differ from those applied last (their hash)."""
    dsn = await postgres.new_database_async()
    storage = await migrated(dsn)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            digest, texts = functions("postgres")
            assert await conn.fetchval("SELECT hash FROM schema_function_set") == digest
            names = await conn.fetch(
                "SELECT p.proname, count(*) FROM pg_proc p JOIN pg_namespace n "
                "ON n.oid = p.pronamespace WHERE n.nspname = current_schema() "
                "AND p.proname LIKE 'gateway\\_%' GROUP BY p.proname"
            )
            # One definition each (no overload left over from a migration), one
            # file each.
            assert all(row[1] == 1 for row in names)
            assert len(names) == len(texts)
            # Unchanged files: a migrate leaves the functions alone.
            await conn.execute("DROP FUNCTION gateway_release(text, date, integer, numeric)")
            assert await storage.migrate() == 0
            assert not await conn.fetchval(
                "SELECT count(*) FROM pg_proc WHERE proname = 'gateway_release'"
            )
            # Other files (here: a database whose hash is another's) are applied.
            await conn.execute("UPDATE schema_function_set SET hash = 'older'")
            assert await storage.migrate() == 0
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_proc WHERE proname = 'gateway_release'"
            )
            assert await conn.fetchval("SELECT hash FROM schema_function_set") == digest
        finally:
            await conn.close()
    finally:
        await storage.close()


@pytest.mark.postgres
async def test_a_gateway_of_the_previous_version_still_admits_and_settles_after_0017(
    postgres: PostgresServer,
) -> None:
    """A rolling upgrade: the live functions take the upstream as a last argument
    with a default, so a gateway still calling them as the previous version did
    (gateway_admit with 23 arguments, gateway_settle with 29) admits and settles,
    its answers recorded as the default upstream's."""
    dsn = await postgres.new_database_async()
    storage = await migrated(dsn)
    await storage.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO users (id, plan) VALUES ('alice', 'free')")
        admitted = await conn.fetchrow(
            "SELECT * FROM gateway_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
            "$13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)",
            "alice", DAY, MONTH, [1], [1], [Decimal(5)], [1], [None], None, None, NOW, False,
            "req-1", "chat-messages", 9, 0, 9, Decimal(0), "USD", False, False, Decimal(0), None,
        )  # fmt: skip
        assert admitted is not None and admitted["refused"] is None
        assert await conn.fetchval("SELECT upstream FROM pending_answers") == "default"
        settled = await conn.fetchval(
            "SELECT gateway_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, "
            "$14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29)",
            "msg-1", "alice", DAY, NOW, "chat-messages", 80, 20, 100, Decimal("0.1"), "USD",
            "complete", False, 0, None, "req-1", 1.0, 1.0, None, "req-1", None, 0, 0, None,
            [], [], [], [], [], 0,
        )  # fmt: skip
        assert settled is True
        row = await conn.fetchrow("SELECT answer_id, upstream, total_tokens FROM usage_events")
        assert tuple(row) == ("msg-1", "default", 100)
        assert await conn.fetchval("SELECT count(*) FROM pending_answers") == 0
        # And a batch of two (gateway_settle_many with 33 arguments, set by set).
        two = [("msg-2", "msg-3"), ("alice", "alice"), (DAY, DAY), (NOW, NOW)]
        settled_many = await conn.fetch(
            "SELECT * FROM gateway_settle_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
            "$12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, "
            "$28, $29, $30, $31, $32, $33)",
            *[list(column) for column in two],
            ["chat-messages"] * 2, [8, 8], [2, 2], [10, 10], [Decimal(0)] * 2, ["USD"] * 2,
            ["complete"] * 2, [False] * 2, [0, 0], [None] * 2, [None] * 2, [1.0] * 2, [1.0] * 2,
            [None] * 2, [None] * 2, [None] * 2, [0, 0], [0, 0], [None] * 2, [1, 1], [0, 0],
            [1, 1], [0, 0], [], [], [], [], [], [0, 0],
        )  # fmt: skip
        assert sorted(tuple(r) for r in settled_many) == [(1, True), (2, True)]
        rows = await conn.fetch("SELECT answer_id, upstream FROM usage_events ORDER BY answer_id")
        assert [tuple(r) for r in rows] == [
            ("msg-1", "default"),
            ("msg-2", "default"),
            ("msg-3", "default"),
        ]
    finally:
        await conn.close()


async def test_sqlite_alerts_keep_their_rows_and_take_exact_money_after_0014(
    tmp_path: Path,
) -> None:
    """SQLite 0014 rebuilds notifications with TEXT amounts: the crossings
    recorded before it and their outbox rows (ids, attempts) are kept, and a
    money crossing recorded after it is exact."""
    url = old_sqlite(tmp_path / "old.db", 13)
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    conn.execute(
        "INSERT INTO notifications (user_id, kind, period, threshold, created_at, limit_value, "
        "used) VALUES ('alice', 'cost_per_day', ?, 50, ?, '1', '0.5')",
        (DAY.isoformat(), _ts(NOW)),
    )
    conn.execute(
        "INSERT INTO alert_outbox (id, user_id, kind, period, threshold, channel, created_at, "
        "attempts, next_attempt_at) VALUES (7, 'alice', 'cost_per_day', ?, 50, 'webhook', ?, 2, ?)",
        (DAY.isoformat(), _ts(NOW), _ts(NOW)),
    )
    conn.close()
    storage = await migrated(url)
    try:
        (old,) = await storage.list_alerts()
        assert (old.crossing.value, old.crossing.used) == (1, Decimal("0.5"))
        assert [(d.channel, d.attempts) for d in old.deliveries] == [("webhook", 2)]
        (item,) = await storage.claim_outbox(now=NOW, claim_until=NOW + timedelta(minutes=1))
        assert (item.id, item.crossing.used) == (7, Decimal("0.5"))
        budget = Decimal("12345678901234.56789")
        request = AlertRequest(
            (AlertCheck("cost_per_month", "2026-11", budget, (1,), "9:2:1:"),), MONTH, ("email",)
        )
        answer = UsageEvent(
            answer_id="msg-big",
            user_id="alice",
            day=DAY,
            created_at=NOW,
            endpoint="chat-messages",
            total_tokens=10,
            cost=Decimal("123456789012.3456789"),
        )
        assert await storage.settle(answer, alerts=request)
        new = [a for a in await storage.list_alerts() if a.crossing.limit == "cost_per_month"]
        # The month: 0.50 + 0.25 before, and this answer's cost.
        assert [(a.crossing.value, a.crossing.used) for a in new] == [
            (budget, Decimal("123456789013.0956789"))
        ]
    finally:
        await storage.close()


async def test_sqlite_leases_and_pending_rows_keep_one_btree_after_0019(tmp_path: Path) -> None:
    """Issue 24: a lease and a pending row, inserted and deleted by every
    admission and settle, live in their primary key's b-tree alone (WITHOUT
    ROWID): a page fewer to write per table and commit. The rows of a database
    from before are kept, and admit and settle as before (the tests above)."""
    url = old_sqlite(tmp_path / "old.db", 18)
    storage = await migrated(url)
    await storage.close()
    conn = sqlite3.connect(tmp_path / "old.db")
    try:
        layout = {
            name: sql
            for name, sql in conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table' "
                "AND name IN ('stream_leases', 'pending_answers')"
            )
        }
        leases = conn.execute("SELECT id, user_id FROM stream_leases").fetchall()
        pending = conn.execute("SELECT id, user_id, web_searches FROM pending_answers").fetchall()
        indexes = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name IN ('stream_leases', 'pending_answers') AND sql IS NOT NULL"
            )
        }
    finally:
        conn.close()
    assert set(layout) == {"stream_leases", "pending_answers"}
    assert all(sql.rstrip().endswith("WITHOUT ROWID") for sql in layout.values())
    assert leases == [("req-old", "alice")]
    assert pending == [("req-old", "alice", 1)]
    assert indexes == {"stream_leases_user_idx", "pending_answers_created_idx"}


async def test_0019_drops_what_a_user_deleted_by_hand_left_behind(tmp_path: Path) -> None:
    """A user deleted with the sqlite3 shell (foreign keys off there: nothing
    cascades) leaves their lease and pending row behind. 0019's copy into the
    new tables checked each row's user, and the upgrade failed: the gateway did
    not start. Such rows, which no user owns, are not copied."""
    url = old_sqlite(tmp_path / "old.db", 18)
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)  # the shell's way
    try:
        conn.execute("INSERT INTO users (id, plan, created_at) VALUES ('gone', 'free', 'z')")
        conn.execute("INSERT INTO stream_leases VALUES ('l-gone', 'gone', 'z')")
        conn.execute("DELETE FROM users WHERE id = 'gone'")
    finally:
        conn.close()
    storage = await migrated(url)
    await storage.close()
    conn = sqlite3.connect(tmp_path / "old.db")
    try:
        leases = conn.execute("SELECT id FROM stream_leases").fetchall()
    finally:
        conn.close()
    assert ("l-gone",) not in leases and ("req-old",) in leases


# The releases before PostgreSQL 0029 and SQLite 0022 (whose upload records
# outlived their users).
BEFORE_UPLOADS_GO = {"postgres": 28, "sqlite": 21}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_before_uploads_go(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same data, and an upload kept for alice and one for a user deleted
    since, in a database of the schema before PostgreSQL 0029 / SQLite 0022."""
    insert = (
        "INSERT INTO upload_owners (upload_id, user_id, upstream, created_at) "
        "VALUES ('u-alice', 'alice', 'default', '2026-11-20'), "
        "('u-gone', 'gone', 'default', '2026-11-20')"
    )
    if request.param == "sqlite":
        url = old_sqlite(tmp_path / "old.db", BEFORE_UPLOADS_GO["sqlite"])
        conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
        try:
            conn.execute(insert)
        finally:
            conn.close()
        return url
    server: PostgresServer = request.getfixturevalue("postgres")

    async def make() -> str:
        dsn = await old_postgres(server, BEFORE_UPLOADS_GO["postgres"])
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(insert)
        finally:
            await conn.close()
        return dsn

    return asyncio.run(make())


async def test_uploads_of_users_deleted_before_the_upgrade_are_dropped(
    database_before_uploads_go: str,
) -> None:
    """A user deleted before the release left their upload records behind: the
    migration drops them (else one made again under that id owned the files),
    and keeps those of the users that are there."""
    storage = await migrated(database_before_uploads_go)
    try:
        await storage.ensure_user("gone", plan="free")  # made again
        assert await storage.upload_owners(["u-alice", "u-gone"]) == {"u-alice": "alice"}
    finally:
        await storage.close()
