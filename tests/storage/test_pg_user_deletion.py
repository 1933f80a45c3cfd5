"""A user's rows go with the user as the foreign keys' cascades took them
before 0024 and 0025 dropped the keys: whoever deletes (any search_path, a
role allowed only to delete users), TRUNCATE included; recovery drops a gone
user's pending row with its lease, and a round is not ended early by such rows.
(From a review of 0024/0025: each test failed on them.) A user's uploads
(upload_owners) go the same way since 0029, and an upload answered while its
user's deletion is under way is not kept.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.storage import open_storage
from gateway.storage.base import Storage
from tests.harness import until_async
from tests.storage.test_pg_settle_rows import NOW, _deleting, _event, _waiting

pytestmark = pytest.mark.postgres


@pytest.fixture
def dsn(own_database: str) -> str:
    return own_database


async def _lease_and_pending(conn: asyncpg.Connection, user: str, at: datetime) -> None:
    """An admitted request's lease and pending row (as gateway_admit writes them)."""
    await conn.execute(
        "INSERT INTO stream_leases (id, user_id, expires_at) VALUES ($1, $2, $3)",
        f"req-{user}",
        user,
        at + timedelta(hours=1),
    )
    await conn.execute(
        "INSERT INTO pending_answers (id, user_id, day, created_at, endpoint, prompt_tokens, "
        "completion_tokens, total_tokens, cost) VALUES ($1, $2, $3, $4, 'chat-messages', "
        "75, 25, 100, 0.001)",
        f"req-{user}",
        user,
        at.date(),
        at,
    )


async def _rows(conn: asyncpg.Connection, user: str) -> dict[str, int]:
    return {
        table: await conn.fetchval(f"SELECT count(*) FROM {table} WHERE user_id = $1", user)
        for table in (
            "usage_events",
            "stream_leases",
            "pending_answers",
            "usage_daily",
            "upload_owners",
        )
    }


_NONE = {
    "usage_events": 0,
    "stream_leases": 0,
    "pending_answers": 0,
    "usage_daily": 0,
    "upload_owners": 0,
}


async def _answered_and_uploaded(storage: Storage, user: str) -> None:
    """A user with a ledger row (and so a day row) and a kept upload."""
    await storage.ensure_user(user, plan="free")
    assert await storage.settle(_event("a1", user))
    await storage.remember_upload(f"u-{user}", user_id=user, upstream="default", now=NOW)


async def test_truncate_users_cascade_still_takes_the_ledger_leases_and_pending_rows(
    dsn: str,
) -> None:
    # Before 0024/0025 the three tables' keys made TRUNCATE users CASCADE empty
    # them; a row trigger does not fire on TRUNCATE, so now they stay, owned by
    # no one - and by whoever is created again under the same id.
    storage = await open_storage(DatabaseConfig(url=dsn))
    conn = await asyncpg.connect(dsn)
    try:
        await _answered_and_uploaded(storage, "alice")
        await _lease_and_pending(conn, "alice", NOW - timedelta(hours=2))
        await conn.execute("TRUNCATE users CASCADE")
        assert await _rows(conn, "alice") == _NONE
        # A new alice must not inherit the old one's pending answer: recovery
        # would charge its estimate to her.
        await storage.ensure_user("alice", plan="free")
        assert await storage.recover(before=NOW, now=NOW) == []
        alice = await storage.get_user("alice")
        assert alice is not None and alice.lifetime_tokens == 0
    finally:
        await conn.close()
        await storage.close()


async def test_a_deleted_users_rows_go_whatever_the_deleters_search_path(dsn: str) -> None:
    # The keys' cascades named their tables by OID; the trigger's statements
    # name them by the deleting session's search_path. A session whose path
    # puts another schema (a second deployment, a scratch copy) first deletes
    # that schema's rows of the same user id, and leaves the gateway's behind.
    storage = await open_storage(DatabaseConfig(url=dsn))
    conn = await asyncpg.connect(dsn)
    try:
        await _answered_and_uploaded(storage, "alice")
        await _lease_and_pending(conn, "alice", NOW)
        await conn.execute(
            "CREATE SCHEMA other;"
            "CREATE TABLE other.usage_events (user_id text);"
            "CREATE TABLE other.stream_leases (user_id text);"
            "CREATE TABLE other.pending_answers (user_id text);"
            "CREATE TABLE other.upload_owners (user_id text);"
            "INSERT INTO other.usage_events VALUES ('alice');"
            "INSERT INTO other.stream_leases VALUES ('alice');"
            "INSERT INTO other.pending_answers VALUES ('alice');"
            "INSERT INTO other.upload_owners VALUES ('alice');"
        )
        await conn.execute("SET search_path = other, public")
        await conn.execute("DELETE FROM public.users WHERE id = 'alice'")
        await conn.execute("RESET search_path")
        assert await _rows(conn, "alice") == _NONE
        for table in ("usage_events", "stream_leases", "pending_answers", "upload_owners"):
            assert await conn.fetchval(f"SELECT count(*) FROM other.{table}") == 1, table
    finally:
        await conn.close()
        await storage.close()


async def test_a_deleted_users_rows_go_with_a_search_path_without_the_schema(dsn: str) -> None:
    # The plain case of the one above: an operator's session without the
    # gateway's schema on its path (schema-qualified DELETE) now fails.
    storage = await open_storage(DatabaseConfig(url=dsn))
    conn = await asyncpg.connect(dsn)
    try:
        await _answered_and_uploaded(storage, "alice")
        await conn.execute("SET search_path = pg_catalog")
        await conn.execute("DELETE FROM public.users WHERE id = 'alice'")
        await conn.execute("RESET search_path")
        assert await _rows(conn, "alice") == _NONE
    finally:
        await conn.close()
        await storage.close()


async def test_a_role_that_may_delete_users_still_can(dsn: str) -> None:
    # The keys' cascades ran as the referencing tables' owner: a role granted
    # DELETE on users alone could delete one (usage_daily's key still does so).
    # The trigger runs as the deleting role, which now needs DELETE on the
    # ledger, the leases and the pending answers too.
    role = f"gateway_test_deleter_{uuid.uuid4().hex[:12]}"
    storage = await open_storage(DatabaseConfig(url=dsn))
    conn = await asyncpg.connect(dsn)
    try:
        await _answered_and_uploaded(storage, "alice")
        await conn.execute(f"CREATE ROLE {role}")
        try:
            await conn.execute(f"GRANT SELECT, DELETE ON users TO {role}")
            await conn.execute(f"SET ROLE {role}")
            try:
                await conn.execute("DELETE FROM users WHERE id = 'alice'")
            finally:
                await conn.execute("RESET ROLE")
            assert await _rows(conn, "alice") == _NONE
        finally:
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
    finally:
        await conn.close()
        await storage.close()


async def test_recovery_of_a_gone_users_pending_row_takes_its_lease_too(dsn: str) -> None:
    # gateway_recover drops the pending row of a user who is gone (0024) but
    # CONTINUEs before gateway_settle, which is what deletes the answer's
    # lease (p_lease = the pending id): the lease stays for good (only that
    # user's admissions delete expired leases). Orphans come from TRUNCATE
    # (above) or deletes with triggers off (session_replication_role replica).
    storage = await open_storage(DatabaseConfig(url=dsn))
    conn = await asyncpg.connect(dsn)
    try:
        await _lease_and_pending(conn, "ghost", NOW - timedelta(hours=2))
        assert await storage.recover(before=NOW, now=NOW) == []
        assert await _rows(conn, "ghost") == _NONE
    finally:
        await conn.close()
        await storage.close()


async def test_a_recovery_round_does_not_stop_at_a_batch_of_dropped_rows(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Recovery.run_once takes a batch shorter than BATCH for the end of the
    # stale rows. gateway_recover returns only the ids it charged: a batch that
    # dropped gone users' rows (0024) comes back short, and the round ends with
    # stale rows of live users left for the next round. (BATCH 1 here: one
    # dropped row stands for a batch of 100 with one of them.)
    from gateway.clock import FixedClock
    from gateway.metrics import Metrics
    from gateway.recovery import Recovery

    monkeypatch.setattr("gateway.recovery.BATCH", 1)
    storage = await open_storage(DatabaseConfig(url=dsn))
    conn = await asyncpg.connect(dsn)
    try:
        await storage.ensure_user("bob", plan="free")
        await _lease_and_pending(conn, "a-ghost", NOW - timedelta(hours=2))  # before bob's
        await _lease_and_pending(conn, "bob", NOW - timedelta(hours=2))
        recovery = Recovery(
            storage, clock=FixedClock(NOW), metrics=Metrics(), after=timedelta(minutes=10)
        )
        await recovery.run_once()
        assert (await _rows(conn, "bob"))["pending_answers"] == 0
    finally:
        await conn.close()
        await storage.close()


async def test_an_upload_answered_while_its_user_is_deleted_is_not_kept(dsn: str) -> None:
    # The upload's reply comes while a delete of its user is under way: the
    # trigger has deleted the user's rows already (in the delete's snapshot),
    # and a record written next to it outlived the user, for whoever is made
    # again under the id. The record waits for the delete, then finds no user.
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    try:
        await storage.ensure_user("alice", plan="free")
        deleter, tx = await _deleting(dsn, "alice")
        kept = asyncio.create_task(
            storage.remember_upload("u-late", user_id="alice", upstream="default", now=NOW)
        )
        await until_async(lambda: _waiting(admin))
        await tx.commit()
        await deleter.close()
        await kept
        await storage.ensure_user("alice", plan="free")
        assert await storage.upload_owners(["u-late"]) == {}
    finally:
        await admin.close()
        await storage.close()


async def test_a_delete_waits_for_an_upload_being_kept_and_takes_it(dsn: str) -> None:
    # The other order: the record holds its key share on the user's row; the
    # delete waits for its commit, then its trigger deletes the record.
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    keeper = await asyncpg.connect(dsn)
    try:
        await storage.ensure_user("alice", plan="free")
        tx = keeper.transaction()
        await tx.start()
        await keeper.execute(
            "INSERT INTO upload_owners (upload_id, user_id, upstream, created_at) "
            "SELECT 'u-1', id, 'default', now() FROM users WHERE id = 'alice' FOR KEY SHARE"
        )
        delete = asyncio.create_task(admin.execute("DELETE FROM users WHERE id = 'alice'"))
        watcher = await asyncpg.connect(dsn)
        try:
            await until_async(lambda: _waiting(watcher))
        finally:
            await watcher.close()
        await tx.commit()
        await delete
        assert await _rows(admin, "alice") == _NONE
    finally:
        await keeper.close()
        await admin.close()
        await storage.close()
