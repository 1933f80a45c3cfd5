"""An admission given up in flight whose cancellation the server never
acknowledged (review of the shutdown fix).

asyncpg's pool waits for a cancelled statement only until its cancellation is
acknowledged, at most ``command_timeout``; then it closes the connection and
returns, while the server goes on with the statement (a backend waiting for a
lock does not notice its client went away, and the Sync it already received
commits it). The give-back of a lost admission, by its pending row, ran at once
on another connection: the row was not there yet, the give-back did nothing,
and the admission committed afterwards - its query and lease reserved, its
pending row charged by a recovery for an answer never forwarded. The give-back
now takes the user's admission lock first, which the admission holds or waits
for ahead of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import pytest

from gateway.storage.postgres import PostgresStorage
from tests.harness import until_async
from tests.storage.test_group_commit import DAY, admit
from tests.tcpproxy import TCPProxy

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = [pytest.mark.postgres, pytest.mark.warm_connections]


def _waiting_admissions(waiting: str) -> str:
    return (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        f"AND query LIKE '{waiting}' AND datname = current_database()"
    )


@pytest.mark.parametrize("max_batch", [1, 64], ids=["callers-own-task", "batch-task-at-teardown"])
async def test_a_lost_admission_is_given_back_after_it_commits_not_before(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy], max_batch: int
) -> None:
    dsn, proxy = lost_cancels
    store = await PostgresStorage.open(
        dsn, max_batch=max_batch, min_size=1, max_size=3, command_timeout=1.0
    )
    await store.ensure_user("alice", plan="free")
    await store.ensure_user("bob", plan="free")
    # Statements prepared on every connection: alice's admission is one round trip.
    warm = [admit(store, "bob", f"warm{i}", queries_per_day=10) for i in range(3)]
    assert all(a.admitted for a in await asyncio.gather(*warm))
    # Alice's admission lock held elsewhere (as by her other admission): hers waits.
    blocker = await asyncpg.connect(postgres_dsn)
    hold = blocker.transaction()
    await hold.start()
    await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('alice', 24))")
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)

        async def admission_waits() -> bool:
            # gateway_admit without the batches' lock timeout (which would roll
            # it back in 250 ms): with max_batch 1, or the resend of the batch
            # of one that timeout split. It waits as long as the lock is held.
            n: int = await watcher.fetchval(
                _waiting_admissions("SELECT % gateway_admit%") + " AND query NOT LIKE '%, true)'"
            )
            return n == 1

        await until_async(admission_waits)
        # The request goes away (max_batch 1: the caller's own task), or
        # asyncio.run's teardown cancels every task, the batch's and its caller's.
        batches = list(store._admits._tasks)
        for task in batches:
            task.cancel()
        caller.cancel()
        given_up: list[asyncio.Future[Any]] = [caller, *batches]
        ending = asyncio.ensure_future(asyncio.wait(given_up))

        async def given_back_or_waiting() -> bool:
            # Before: the give-back found no pending row at once and was done.
            # Now: it waits for the admission lock behind the admission.
            if ending.done():
                return True
            n: int = await watcher.fetchval(
                _waiting_admissions("SELECT count(pg_advisory_xact_lock(%")
            )
            return n == 1

        await until_async(given_back_or_waiting)
        # (Its CancelRequest, if one went out, was lost: the statement would stay on
        # the server but for the give-back, which ends its backend first.)
        await hold.rollback()  # the admission, still on the server, goes on and commits
        await ending
        with pytest.raises(asyncio.CancelledError):
            await caller

        async def admission_ended() -> bool:
            n: int = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT % gateway_admit%' "
                "AND state = 'active' AND pid <> pg_backend_pid() AND datname = current_database()"
            )
            return n == 0

        await until_async(admission_ended)
        pending = await watcher.fetchval("SELECT count(*) FROM pending_answers WHERE id = 'r1'")
        lease = await watcher.fetchval("SELECT count(*) FROM stream_leases WHERE id = 'r1'")
        queries = await watcher.fetchval(
            "SELECT coalesce(sum(queries), 0) FROM usage_daily WHERE user_id = 'alice' AND day = $1",
            DAY,
        )
        # Nobody got this admission: nothing of it may stay reserved (a recovery
        # would charge its pending row for an answer never forwarded).
        assert (pending, lease, queries) == (0, 0, 0)
    finally:
        with contextlib.suppress(Exception):
            await hold.rollback()
        await blocker.close()
        await watcher.close()
        await store.close()
