"""PostgreSQL: a settle writes its ledger row without a foreign-key check
(migration 0025, issue 24).

The check was a query of its own at the end of the ledger insert (5.7% of a
lone settle's instructions, docs/performance.md). A settle that records its
answer updates the user's row in the same transaction; when that update finds
no row the settle fails as the key made it fail (foreign_key_violation: the
gateway's NotFound), and its ledger row goes with the transaction. What the
key's ON DELETE CASCADE did, 0024's trigger on users does.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.errors import NotFound, RecordRefused
from gateway.storage import UsageEvent, open_storage
from tests.harness import until_async

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)
DAY = NOW.date()
_LOCK_WAITS = """
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE a.datname = current_database() AND NOT l.granted
"""


@pytest.fixture
def dsn(own_database: str) -> str:
    return own_database


def _event(answer_id: str, user: str) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=DAY,
        created_at=NOW,
        endpoint="chat-messages",
        prompt_tokens=75,
        completion_tokens=25,
        total_tokens=100,
        cost=Decimal("0.001"),
    )


async def _ledger(conn: asyncpg.Connection, user: str) -> tuple[int, int]:
    """The user's ledger rows and day rows."""
    events = await conn.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", user)
    days = await conn.fetchval("SELECT count(*) FROM usage_daily WHERE user_id = $1", user)
    return events, days


async def test_the_ledger_has_no_key_and_a_deleted_users_rows_still_go(dsn: str) -> None:
    storage = await open_storage(DatabaseConfig(url=dsn))
    conn = await asyncpg.connect(dsn)
    try:
        await storage.ensure_user("alice", plan="free")
        await storage.ensure_user("bob", plan="free")
        assert await storage.settle(_event("a1", "alice"))
        assert await storage.settle(_event("b1", "bob"))
        keys = await conn.fetchval(
            "SELECT count(*) FROM pg_constraint "
            "WHERE conrelid = 'usage_events'::regclass AND contype = 'f'"
        )
        assert keys == 0
        await conn.execute("DELETE FROM users WHERE id = 'alice'")
        # The trigger took alice's ledger rows, as the key's cascade did.
        assert await _ledger(conn, "alice") == (0, 0)
        assert await _ledger(conn, "bob") == (1, 1)
    finally:
        await conn.close()
        await storage.close()


async def _deleting(
    dsn: str, user: str
) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """A user's delete under way, not committed: it holds the user's row."""
    conn = await asyncpg.connect(dsn)
    tx = conn.transaction()
    await tx.start()
    await conn.execute("DELETE FROM users WHERE id = $1", user)
    return conn, tx


async def _waiting(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(_LOCK_WAITS))


async def test_a_settle_for_a_user_deleted_meanwhile_fails_and_writes_nothing(dsn: str) -> None:
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    try:
        await storage.ensure_user("alice", plan="free")
        assert await storage.settle(_event("a1", "alice"))  # her day row exists
        deleter, tx = await _deleting(dsn, "alice")
        settle = asyncio.create_task(storage.settle(_event("a2", "alice")))
        # The settle waits for the delete (the key's check waited before 0025;
        # the update of the user's row does now) ...
        await until_async(lambda: _waiting(admin))
        await tx.commit()
        await deleter.close()
        # ... and then finds the user gone: the key's error, nothing written.
        with pytest.raises(NotFound):
            await settle
        assert await _ledger(admin, "alice") == (0, 0)
    finally:
        await admin.close()
        await storage.close()


async def test_a_user_deleted_before_the_settle_commits_takes_its_ledger_row(dsn: str) -> None:
    # The other order: the settle holds the user's row; the delete waits for
    # its commit, then deletes the answer's ledger row with the user's.
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    settler = await asyncpg.connect(dsn)
    try:
        await storage.ensure_user("alice", plan="free")
        tx = settler.transaction()
        await tx.start()
        await settler.execute(
            "SELECT gateway_settle($1, $2, $3, $4, 'chat-messages', 75, 25, 100, 0.001, 'USD', "
            "'complete', false, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, 0, NULL, "
            "'{}', '{}', '{}', '{}', '{}', 0)",
            "a1",
            "alice",
            DAY,
            NOW,
        )
        delete = asyncio.create_task(admin.execute("DELETE FROM users WHERE id = 'alice'"))
        watcher = await asyncpg.connect(dsn)
        try:
            await until_async(lambda: _waiting(watcher))
        finally:
            await watcher.close()
        await tx.commit()
        await delete
        assert await _ledger(admin, "alice") == (0, 0)
    finally:
        await settler.close()
        await admin.close()
        await storage.close()


async def test_in_a_batch_only_the_deleted_users_settle_fails(dsn: str) -> None:
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    try:
        for user in ("alice", "bob", "carol"):
            await storage.ensure_user(user, plan="free")
            assert await storage.settle(_event(f"{user}-0", user))
        deleter, tx = await _deleting(dsn, "bob")
        settles = [
            asyncio.ensure_future(storage.settle(_event(f"{user}-1", user)))
            for user in ("alice", "bob", "carol", "alice")
        ]
        await until_async(lambda: _waiting(admin))
        await tx.commit()
        await deleter.close()
        results = await asyncio.gather(*settles, return_exceptions=True)
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], NotFound)
        assert results[3] is False  # alice-1 again: recorded once
        assert await _ledger(admin, "bob") == (0, 0)
        assert await _ledger(admin, "alice") == (2, 1)
        assert await _ledger(admin, "carol") == (2, 1)
        alice = await storage.get_user("alice")
        assert alice is not None and alice.lifetime_tokens == 200
    finally:
        await admin.close()
        await storage.close()


async def test_the_users_update_alone_refuses_an_unknown_user(dsn: str) -> None:
    # The day rows' own key would refuse a user with no row as well (their
    # first row of a day is an insert); without it, the settle's update of the
    # user's row still does, alone and in a batch.
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("ALTER TABLE usage_daily DROP CONSTRAINT usage_daily_user_id_fkey")
        await storage.ensure_user("alice", plan="free")
        with pytest.raises(NotFound):
            await storage.settle(_event("g1", "ghost"))
        results = await asyncio.gather(
            storage.settle(_event("a1", "alice")),
            storage.settle(_event("g2", "ghost")),
            storage.settle(_event("a2", "alice")),
            return_exceptions=True,
        )
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], NotFound)
        assert await _ledger(admin, "ghost") == (0, 0)
        assert await _ledger(admin, "alice") == (2, 1)
    finally:
        await admin.close()
        await storage.close()


async def test_a_record_the_database_cannot_take_is_refused_and_its_batch_settles(
    dsn: str,
) -> None:
    """A value PostgreSQL refuses for what it is - an id past a b-tree entry's
    size (class 54, program limit exceeded), a NUL character (class 22, a data
    exception) - is a refusal of that record (RecordRefused: set aside as
    ``<spool>.rejected``), not the database down, and the others settled in
    the same batch are recorded. Before (review-rec REC-2) the over-long id
    failed its whole batch, and the record was retried and spooled as if the
    database were down, holding back every replay behind it. (The settler
    bounds ids before they come here; this is the backstop.)"""
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    try:
        for user in ("alice", "bob"):
            await storage.ensure_user(user, plan="free")
        over_long = "".join(f"{i:x}{i * 7919 % 65521:x}" for i in range(1200))
        results = await asyncio.gather(
            storage.settle(_event(over_long, "alice")),
            storage.settle(_event("bob-1", "bob")),
            storage.settle(_event("with\x00nul", "alice")),
            storage.settle(_event("bob-2", "bob")),
            return_exceptions=True,
        )
        assert isinstance(results[0], RecordRefused), results[0]
        assert isinstance(results[2], RecordRefused), results[2]
        assert results[1] is True and results[3] is True
        assert await _ledger(admin, "alice") == (0, 0)
        assert await _ledger(admin, "bob") == (2, 1)
        # On its own too (a batch of one, as a replay sends it).
        with pytest.raises(RecordRefused):
            await storage.settle(_event(over_long, "alice"))
    finally:
        await admin.close()
        await storage.close()
