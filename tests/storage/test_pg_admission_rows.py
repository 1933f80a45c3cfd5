"""PostgreSQL: an admission's lease and pending row go in without foreign-key
checks (migration 0024, issue 24).

Each check was a query of its own that locked the user's row FOR KEY SHARE
(8% of a lone admission's instructions, docs/performance.md); the admission
has just found the user under its admission lock. What the keys' ON DELETE
CASCADE did, a trigger on users does; a pending row left behind by a user
deleted during its admission is dropped by recovery, not charged to no one.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.storage import AdmissionLimits, Pending, open_storage
from gateway.storage.base import Lease
from tests.harness import until_async

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)
DAY = NOW.date()
MONTH = DAY.replace(day=1)
EXPIRES = NOW + timedelta(minutes=15)
LIMITS = AdmissionLimits(queries_per_day=100, tokens_per_day=10_000, max_concurrent_streams=5)
_LOCK_WAITS = """
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE a.datname = current_database() AND NOT l.granted
"""


@pytest.fixture
def dsn(own_database: str) -> str:
    return own_database


def _pending(request: str) -> Pending:
    return Pending(request, "chat-messages", reserved_cost=Decimal("0.5"))


async def test_an_admission_takes_no_lock_on_the_users_row(dsn: str) -> None:
    storage = await open_storage(DatabaseConfig(url=dsn))
    holder = await asyncpg.connect(dsn)
    admin = await asyncpg.connect(dsn)
    try:
        await storage.ensure_user("alice", plan="free")
        # The day's admissions row exists: the upsert below updates it (no key
        # check there either way).
        first = await storage.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            limits=LIMITS,
            now=NOW,
            lease=Lease("r1", EXPIRES),
            pending=_pending("r1"),
        )
        assert first.admitted
        # The user's row locked as a DELETE of it locks it, which conflicts
        # with the FOR KEY SHARE of a foreign-key check.
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM users WHERE id = 'alice' FOR UPDATE")
        admit = asyncio.create_task(
            storage.admit(
                "alice",
                day=DAY,
                month_start=MONTH,
                limits=LIMITS,
                now=NOW,
                lease=Lease("r2", EXPIRES),
                pending=_pending("r2"),
            )
        )

        async def ended_or_waiting() -> bool:
            return admit.done() or bool(await admin.fetchval(_LOCK_WAITS))

        await until_async(ended_or_waiting)
        waited = not admit.done()
        await tx.rollback()
        second = await admit
        # Before 0024: the lease's and the pending row's key checks waited for
        # the row lock.
        assert not waited, "the admission waited for a lock on the user's row"
        assert second.admitted
        counts = await admin.fetchrow(
            "SELECT (SELECT count(*) FROM stream_leases) AS leases, "
            "(SELECT count(*) FROM pending_answers) AS pending"
        )
        assert (counts["leases"], counts["pending"]) == (2, 2)
    finally:
        await holder.close()
        await admin.close()
        await storage.close()


async def test_deleting_a_user_deletes_its_leases_and_pending_rows(dsn: str) -> None:
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    try:
        for user in ("alice", "bob"):
            await storage.ensure_user(user, plan="free")
            admitted = await storage.admit(
                user,
                day=DAY,
                month_start=MONTH,
                limits=LIMITS,
                now=NOW,
                lease=Lease(f"{user}-r1", EXPIRES),
                pending=_pending(f"{user}-r1"),
            )
            assert admitted.admitted
        # The usage rows go by their own keys' cascade.
        await admin.execute("DELETE FROM users WHERE id = 'alice'")
        rows = await admin.fetch(
            "SELECT 'lease' AS kind, user_id FROM stream_leases "
            "UNION ALL SELECT 'pending', user_id FROM pending_answers ORDER BY 1"
        )
        assert [(r["kind"], r["user_id"]) for r in rows] == [("lease", "bob"), ("pending", "bob")]
    finally:
        await admin.close()
        await storage.close()


async def test_recovery_drops_a_pending_row_whose_user_is_gone(dsn: str) -> None:
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    try:
        await storage.ensure_user("bob", plan="free")
        for user in ("bob", "gone"):
            # A pending row admitted while its user was being deleted (the
            # race the trigger cannot see): its user is not there.
            await admin.execute(
                "INSERT INTO pending_answers (id, user_id, day, created_at, endpoint, "
                "prompt_tokens, completion_tokens, total_tokens, cost, currency) "
                "VALUES ($1, $2, $3, $4, 'chat-messages', 10, 0, 10, 0.01, 'USD')",
                f"{user}-r1",
                user,
                DAY,
                NOW,
            )
        later = NOW + timedelta(hours=1)
        # Before 0024 the row could not be there; a recovery charging its
        # estimate would fail on the ledger's key at every pass, and hold up
        # the rows after it.
        assert await storage.recover(before=later, now=later) == ["bob-r1"]
        assert await admin.fetchval("SELECT count(*) FROM pending_answers") == 0
        events = await admin.fetch("SELECT user_id FROM usage_events")
        assert [r["user_id"] for r in events] == ["bob"]
    finally:
        await admin.close()
        await storage.close()
