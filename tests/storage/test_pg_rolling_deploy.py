"""PostgreSQL: a rolling update with pods of two releases on one database.

Every gateway runs `migrate` at start-up, and `migrate` installs its own set of
functions whenever their hash differs from the one recorded. Migration 0023
changed usage_daily's primary key: the previous release's functions
(``ON CONFLICT (user_id, day)``) no longer match it, so a pod of that release
restarting during the rollout must not put them back. 0023 renamed the record
(``schema_functions`` -> ``schema_function_set``), and the previous release
installs functions only when ``schema_functions`` exists; and `migrate` now
refuses a database migrated by a release newer than itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.errors import StorageError
from gateway.storage import AdmissionLimits, Pending, functions, migrations, open_storage
from gateway.storage.base import Lease, UsageEvent
from tests.conftest import PostgresServer

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)
DAY = NOW.date()
MONTH = DAY.replace(day=1)
EXPIRES = NOW + timedelta(minutes=15)
# The function set a previous-release pod would install: one marker function
# stands for it (its real set is gone from this tree; what matters is whether
# it drops this release's set and installs its own).
_PREVIOUS_SET = [
    "CREATE FUNCTION gateway_previous_release() RETURNS integer LANGUAGE sql AS $$ SELECT 22 $$"
]
# _DROP_FUNCTIONS of the previous release (fa1ad30), unchanged.
_PREVIOUS_DROP_FUNCTIONS = """
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema() AND p.proname LIKE 'gateway\\_%'
    LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$
"""
_PREVIOUS_MIGRATION_LOCK = 0x6761_7465_7761_79


async def _previous_release_migrate(conn: asyncpg.Connection) -> int:
    """PostgresStorage.migrate of the previous release (fa1ad30), line for
    line, on one connection: its migrations are this tree's up to 0022, its
    functions `_PREVIOUS_SET` under another hash."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _PREVIOUS_MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        count = 0
        for version, sql in [(v, s) for v, s in migrations("postgres") if v <= 22]:
            if version in applied:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            count += 1
        digest, texts = "previous-release", _PREVIOUS_SET
        if await conn.fetchval("SELECT to_regclass('schema_functions')") is None:
            return count
        applied_hash = await conn.fetchval("SELECT hash FROM schema_functions")
        if applied_hash != digest:
            await conn.execute("SET LOCAL check_function_bodies = off")
            await conn.execute(_PREVIOUS_DROP_FUNCTIONS)
            for text in texts:
                await conn.execute(text)
            await conn.execute(
                "INSERT INTO schema_functions (id, hash) VALUES (1, $1) "
                "ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, applied_at = now()",
                digest,
            )
        return count


@pytest.fixture
def dsn(own_database: str) -> str:
    """A database of its own: the tests change its functions' record."""
    return own_database


async def _gateway_functions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = current_schema() AND p.proname LIKE 'gateway\\_%'"
    )
    return {row[0] for row in rows}


async def test_a_previous_release_pod_restarting_leaves_this_releases_functions(
    dsn: str,
) -> None:
    """The rollout: a new pod migrated, then an old pod restarts (its migrate
    runs). Admissions and settles of both still work: the old pod's migrate
    found no ``schema_functions`` and installed nothing."""
    conn = await asyncpg.connect(dsn)
    storage = await open_storage(DatabaseConfig(url=dsn))
    try:
        before = await _gateway_functions(conn)
        assert await _previous_release_migrate(conn) == 0
        # Before 0023 renamed the record, the old pod dropped every function
        # of this release and installed its own.
        assert await _gateway_functions(conn) == before, "an old pod replaced the functions"
        await storage.ensure_user("alice", plan="free")
        limits = AdmissionLimits(queries_per_day=10, cost_per_day=Decimal("1"))
        admitted = await storage.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            limits=limits,
            now=NOW,
            lease=Lease("r1", EXPIRES),
            pending=Pending("r1", "chat-messages", reserved_cost=Decimal("0.5")),
        )
        assert admitted.admitted
        answer = UsageEvent(
            "a-r1",
            "alice",
            DAY,
            NOW,
            "chat-messages",
            prompt_tokens=10,
            completion_tokens=20,
            total_tokens=30,
            cost=Decimal("0.25"),
            request_id="r1",
        )
        assert await storage.settle(answer, lease_id="r1", pending_id="r1")
        (today,) = await storage.daily(DAY, DAY, user_id="alice")
        assert (today.queries, today.total_tokens, today.cost) == (1, 30, Decimal("0.25"))
        # A new pod restarting afterwards finds its own set in place.
        assert await storage.migrate() == 0
        assert await _gateway_functions(conn) == before
    finally:
        await storage.close()
        await conn.close()


async def test_migrate_refuses_a_database_migrated_by_a_newer_release(dsn: str) -> None:
    """A database holding a migration this code does not know was migrated by
    a newer release: migrate stops the start-up with a clear error and changes
    nothing - above all, it does not put its older functions back."""
    conn = await asyncpg.connect(dsn)
    storage = await open_storage(DatabaseConfig(url=dsn))
    newer = migrations("postgres")[-1][0] + 1
    try:
        # What a newer release would have left: its migration recorded, its
        # own function set (another hash; here one more function).
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", newer)
        await conn.execute("UPDATE schema_function_set SET hash = 'newer'")
        await conn.execute(
            "CREATE FUNCTION gateway_newer_release() RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$"
        )
        before = await _gateway_functions(conn)
        with pytest.raises(StorageError) as refused:
            await storage.migrate()
        assert f"migration {newer:04d} is unknown" in refused.value.message
        assert "newer release" in refused.value.message
        assert await _gateway_functions(conn) == before
        assert await conn.fetchval("SELECT hash FROM schema_function_set") == "newer"
        # The database as it was: the newer release keeps working on it.
        await conn.execute("DELETE FROM schema_migrations WHERE version = $1", newer)
        digest, _texts = functions("postgres")
        assert await storage.migrate() == 0
        assert await conn.fetchval("SELECT hash FROM schema_function_set") == digest
    finally:
        await storage.close()
        await conn.close()


async def test_a_migration_longer_than_the_command_timeout_completes(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration's statement may take longer than database.command_timeout
    (5 s, meant for requests): 0023 rebuilds usage_daily's primary key, about
    2.5 s per 1.5 million rows. Under the request timeout it was cancelled and
    rolled back at every start-up, and the new release never started."""
    url = await postgres.new_database_async()
    slow = [*migrations("postgres"), (9999, "SELECT pg_sleep(0.6)")]
    monkeypatch.setattr("gateway.storage.postgres.migrations", lambda _backend: slow)
    storage = await open_storage(DatabaseConfig(url=url, command_timeout=0.2))
    try:
        assert await storage.migrate() == len(slow)
    finally:
        await storage.close()


def _release_before_0032() -> tuple[list[tuple[int, str]], tuple[str, list[str]]]:
    """The migrations and function set of a release before 0032 whose functions
    differ from this one's: review-once F1's (d30b531) against the release
    before it (94f0c96), which had the same migrations. Modelled on this tree:
    its migrations up to 0031, its set with gateway_answer_id's rule before F1
    (an id the ledger holds is a duplicate, whoever's it is) under another
    hash."""
    before_f1 = """
CREATE OR REPLACE FUNCTION gateway_answer_id(p_answer_id text, p_request text)
 RETURNS text LANGUAGE sql
AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM usage_events e WHERE e.answer_id = p_answer_id)
        THEN NULL ELSE p_answer_id END
$$;
"""
    _digest, texts = functions("postgres")
    kept = [t for t in texts if "FUNCTION gateway_answer_id(" not in t]
    known = [(v, sql) for v, sql in migrations("postgres") if v < 32]
    return known, ("release-94f0c96", [*kept, before_f1])


async def test_an_older_pod_restarting_refuses_and_leaves_the_answer_id_rule_alone(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review-rec REC-4: in the rollout of a release that changed only functions,
    a pod of the release before it restarts (Kubernetes restarts it, a node
    drains). Its migrate found every migration applied and the function set not
    its own, so it dropped this release's functions and installed its own: from
    then on every pod, new ones too, dropped an answer under an id another
    request's answer holds, uncharged. Migration 0032 marks this set: the older
    pod now refuses the database and changes nothing."""
    digest, _texts = functions("postgres")
    new_pod = await open_storage(DatabaseConfig(url=dsn))
    try:
        assert await new_pod.migrate() == 0
        known, older_set = _release_before_0032()
        with monkeypatch.context() as old:
            old.setattr("gateway.storage.postgres.migrations", lambda _b: known)
            old.setattr("gateway.storage.postgres.functions", lambda _b: older_set)
            old_pod = await open_storage(DatabaseConfig(url=dsn))
            try:
                with pytest.raises(StorageError) as refused:
                    await old_pod.migrate()
            finally:
                await old_pod.close()
        assert "migration 0032" in refused.value.message  # (and any later one)
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT hash FROM schema_function_set") == digest
        finally:
            await conn.close()
        # The new pod's settles keep this release's rule: bob's answer under
        # the id alice's holds is charged.
        for user in ("alice", "bob"):
            await new_pod.ensure_user(user, plan="free")
        assert await new_pod.settle(_answer("x", "alice", "ra"))
        assert await new_pod.settle(_answer("x", "bob", "rb"))
        bob = await new_pod.get_user("bob")
        assert bob is not None and bob.lifetime_tokens == 7
    finally:
        await new_pod.close()


def _answer(answer_id: str, user: str, request_id: str) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=DAY,
        created_at=NOW,
        endpoint="chat-messages",
        prompt_tokens=5,
        completion_tokens=2,
        total_tokens=7,
        cost=Decimal("0.001"),
        request_id=request_id,
    )
