"""Batches given up in flight: the task sending a batch cancelled while the batch
is on the wire or on SQLite's thread (asyncio.run's teardown cancels every
task), or a close given up while it drains.

The batch may commit all the same. Before, its callers were cancelled and its
answer dropped: an admission stayed reserved - its query counted, its lease
open - with nobody to release it, and a recovery later charged its pending row
for an answer never forwarded. Now what was made is given back (SQLite: by the
thread's answer when it comes; PostgreSQL: by the pending row, which only a
made admission left), and a drain cancelled leaves the batches alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.storage.group import GroupCommit, SplitBatch
from gateway.storage.postgres import PostgresStorage
from gateway.storage.sqlite import SQLiteStorage
from tests.conftest import _truncate, behind_proxy, pg_address
from tests.harness import until
from tests.storage.test_group_commit import DAY, NOW, Runner, admit, group, turns
from tests.tcpproxy import TCPProxy

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = pytest.mark.warm_connections

# --- the batcher ---------------------------------------------------------------------


def batch_tasks(batcher: GroupCommit[int, int]) -> list[asyncio.Task[None]]:
    return list(batcher._tasks)


def cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel them all at once, as asyncio.run's teardown does."""
    for task in tasks:
        task.cancel()


class Lost:
    """A ``lost`` that records the calls it is given."""

    def __init__(self) -> None:
        self.items: list[int] = []

    async def __call__(self, items: Sequence[int]) -> None:
        await asyncio.sleep(0)  # (an undo takes a round trip; the task waits for it)
        self.items.extend(items)


async def test_a_batch_whose_task_is_cancelled_in_flight_goes_to_lost() -> None:
    """The batch may have committed: its calls go to ``lost``, which finds out
    and undoes what was made, before the task ends (asyncio.run's teardown
    waits for the tasks it cancelled, no more); the callers are cancelled
    (they are going too)."""
    runner = Runner()
    runner.release.clear()
    lost = Lost()
    batcher = group(runner, lost=lost)
    calls = [asyncio.ensure_future(batcher(i)) for i in (1, 2)]
    assert await runner.entered.get() == [1, 2]
    tasks = batch_tasks(batcher)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    assert lost.items == [1, 2]
    assert all(call.cancelled() for call in calls)
    runner.release.set()
    assert await batcher(3) == 6  # and the batcher goes on
    assert lost.items == [1, 2]  # (nothing of an answered batch)


async def test_queued_calls_of_a_loop_going_away_are_not_sent() -> None:
    """As asyncio.run's teardown does: every task cancelled, the batch's and
    its callers'. The batch in flight goes to ``lost``; the calls queued behind
    it, their callers gone, are never sent."""
    runner = Runner()
    runner.release.clear()
    lost = Lost()
    batcher = group(runner, lost=lost, in_flight=1)
    first = asyncio.ensure_future(batcher(1))
    assert await runner.entered.get() == [1]
    queued = [asyncio.ensure_future(batcher(i)) for i in (2, 3)]
    await turns()
    for task in [*batch_tasks(batcher), first, *queued]:
        task.cancel()
    runner.release.set()
    await turns()
    await batcher.drain()
    assert runner.batches == [[1]] and runner.singles == []
    assert lost.items == [1]
    assert all(call.cancelled() for call in (first, *queued))


async def test_a_call_resent_on_its_own_given_up_in_flight_goes_to_lost() -> None:
    """The one-by-one resend after a split: the call in flight goes to
    ``lost``; those answered keep their answers (not lost), and those of its
    key behind it are never sent."""
    runner = Runner()
    held = asyncio.Event()
    real_one = runner.one

    async def one(item: int) -> int:
        if item == 2:  # a row lock held elsewhere
            await held.wait()
        return await real_one(item)

    async def many(items: Sequence[int]) -> list[int | Exception]:
        raise SplitBatch("refused")

    lost = Lost()
    batcher = GroupCommit("test", many, one, max_batch=64, key=lambda item: 0, lost=lost)
    callers = [asyncio.ensure_future(batcher(i)) for i in (1, 2, 3)]
    assert await callers[0] == 2
    await turns()
    for task in batch_tasks(batcher):
        task.cancel()
    await turns()
    assert callers[1].cancelled() and callers[2].cancelled()
    assert lost.items == [2] and runner.singles == [1]  # 2 never reached the runner; 3 never sent


async def test_a_lone_call_given_up_in_flight_goes_to_lost_with_max_batch_one() -> None:
    """With ``max_batch`` 1 the caller's own task makes the call: cancelled in
    flight, the call's answer is lost as a batch's would be."""
    runner = Runner()
    runner.release.clear()
    lost = Lost()
    batcher = group(runner, max_batch=1, lost=lost)
    gone = asyncio.ensure_future(batcher(1))
    await until(lambda: runner.singles == [1])
    gone.cancel()
    await turns()
    assert gone.cancelled() and lost.items == [1]


async def test_a_drain_cancelled_leaves_the_batches_in_flight_alone() -> None:
    """A close given up while it drains (asyncio.wait_for around it, a second
    signal) cancelled the batches it gathered, and their answers with them."""
    runner = Runner()
    runner.release.clear()
    batcher = group(runner)
    calls = [asyncio.ensure_future(batcher(i)) for i in (1, 2)]
    assert await runner.entered.get() == [1, 2]
    draining = asyncio.ensure_future(batcher.drain())
    await turns()
    draining.cancel()
    await turns()
    assert draining.cancelled()
    runner.release.set()
    assert await asyncio.gather(*calls) == [2, 4]  # answered, as if nothing happened


# --- SQLite: the thread's answer -----------------------------------------------------


async def sqlite_store(path: str) -> SQLiteStorage:
    store = await SQLiteStorage.open(path)
    await store.migrate()
    await store.ensure_user("alice", plan="free")
    return store


async def nothing_reserved_sqlite(path: str) -> None:
    store = await SQLiteStorage.open(path)
    try:
        assert [d.queries for d in await store.daily(DAY, DAY)] in ([], [0])
        assert await store.open_streams("alice", now=NOW) == 0
        later = NOW + timedelta(hours=1)
        assert await store.recover(before=later, now=later) == []  # nothing to charge
    finally:
        await store.close()


def on_the_thread(store: SQLiteStorage) -> threading.Event:
    """Set when the writer thread begins the next call."""
    entered = threading.Event()
    threaded = store._threaded

    def spied(fn: Any, *args: Any) -> Any:
        entered.set()
        return threaded(fn, *args)

    store._threaded = spied  # type: ignore[method-assign]
    return entered


def held_write_lock(path: str) -> sqlite3.Connection:
    """Another connection holding the write lock: a batch waits for it on the
    writer thread (BEGIN IMMEDIATE), as long as the test likes."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


async def test_sqlite_an_admission_on_the_thread_when_its_batch_task_is_cancelled_is_given_back(
    tmp_path: Path,
) -> None:
    """The event loop going away cancels the batch's task (and the caller's)
    while the admission is on the thread; the thread commits it all the same.
    Its answer is handed over when it comes, and the admission given back:
    before, its query and lease stayed counted and a recovery charged its
    pending row."""
    path = str(tmp_path / "gateway.db")
    store = await sqlite_store(path)
    blocker = held_write_lock(path)
    entered = on_the_thread(store)
    caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
    await asyncio.to_thread(entered.wait, 30)  # on the thread, waiting for the lock
    [batch] = store._calls._tasks
    batch.cancel()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    blocker.execute("ROLLBACK")  # the thread's transaction goes on, and commits
    blocker.close()
    await store.close()  # waits for the thread's answer and the give-back
    await nothing_reserved_sqlite(path)


async def test_sqlite_an_admission_on_the_thread_at_asyncio_runs_teardown_is_given_back(
    tmp_path: Path,
) -> None:
    """The real thing: asyncio.run's main returns with an admission on the
    thread, and its teardown cancels every task, waits for those, and closes
    the loop. The batch's task waits for the thread's answer before it ends,
    so the give-back it starts is made before the loop closes (before, even
    with the answer handed over, it came after)."""
    path = str(tmp_path / "gateway.db")
    await (await sqlite_store(path)).close()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    stores: list[SQLiteStorage] = []
    tasks: list[asyncio.Future[None]] = []

    async def torn_down(started: asyncio.Event) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:  # the teardown has cancelled every task, the batch's with them
            blocker.execute("ROLLBACK")

    async def main() -> None:
        store = await SQLiteStorage.open(path)
        stores.append(store)
        entered = on_the_thread(store)
        admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
        await asyncio.to_thread(entered.wait, 30)
        started = asyncio.Event()
        tasks.append(asyncio.ensure_future(torn_down(started)))
        await started.wait()

    await asyncio.to_thread(asyncio.run, main())
    blocker.close()
    [store] = stores  # (never closed: what the process exiting would leave)
    store._executor.submit(store._conn.close).result()
    store._executor.shutdown()
    store._checkpoints.shutdown()
    await nothing_reserved_sqlite(path)


async def test_sqlite_a_batch_of_admissions_given_up_on_the_thread_is_given_back_whole(
    tmp_path: Path,
) -> None:
    """The same for a batch of several (``_batch`` on the thread): each call
    it made is given back; a call of it that failed (an unknown user) has
    nothing to give back."""
    path = str(tmp_path / "gateway.db")
    store = await sqlite_store(path)
    blocker = held_write_lock(path)
    entered = on_the_thread(store)
    store._calls.together()
    callers = [
        admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5),
        admit(store, "alice", "r2", queries_per_day=10, max_concurrent_streams=5),
        admit(store, "nobody", "r3", queries_per_day=10),
    ]
    await asyncio.to_thread(entered.wait, 30)
    assert store.group_commit["calls"][1] == 2 + 3  # migrate, ensure_user, one batch of 3
    cancel(*store._calls._tasks, *callers)
    await turns()
    assert all(caller.cancelled() for caller in callers)
    blocker.execute("ROLLBACK")
    blocker.close()
    await store.close()
    await nothing_reserved_sqlite(path)


async def test_sqlite_with_max_batch_one_a_caller_given_up_on_the_thread_gives_back(
    tmp_path: Path,
) -> None:
    """``database.max_batch`` 1: no batcher, the caller's own task waits for
    the thread. Cancelled meanwhile (the server shutting down), its admission
    was committed and kept; it is given back, as a batched one is."""
    path = str(tmp_path / "gateway.db")
    await (await sqlite_store(path)).close()
    store = await SQLiteStorage.open(path, max_batch=1)
    blocker = held_write_lock(path)
    entered = on_the_thread(store)
    caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
    await asyncio.to_thread(entered.wait, 30)
    caller.cancel()
    await turns()
    blocker.execute("ROLLBACK")
    blocker.close()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await store.close()
    await nothing_reserved_sqlite(path)


async def test_sqlite_a_close_given_up_lets_the_batch_in_flight_answer_its_caller(
    tmp_path: Path,
) -> None:
    """A close cancelled while it drains (a second Ctrl-C, a deadline) cancelled
    the batch on the thread with it: the caller, still there, was cancelled
    with an admission committed for it. The batch now answers it."""
    path = str(tmp_path / "gateway.db")
    store = await sqlite_store(path)
    blocker = held_write_lock(path)
    entered = on_the_thread(store)
    caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
    await asyncio.to_thread(entered.wait, 30)
    closing = asyncio.ensure_future(store.close())
    await turns()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    blocker.execute("ROLLBACK")
    blocker.close()
    admission = await caller
    assert admission.admitted  # the caller knows, and gives it back (or settles it)
    assert await store.refund("alice", day=DAY, lease_id="r1", pending_id="r1")
    await store.close()
    await nothing_reserved_sqlite(path)


# --- PostgreSQL: the answer held on the wire -----------------------------------------


class HeldProxy(TCPProxy):
    """A TCP forwarder whose answers from the server can be held (``flowing``
    cleared): a statement runs and commits, and its answer waits here."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.held = b""  # what the server answered while held

    def answered(self) -> bool:
        """The server's answer held ends with ReadyForQuery, idle: its
        statement and implicit transaction are done, committed."""
        return self.held.endswith(b"Z\x00\x00\x00\x05I")

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, from_server: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                if from_server and not self.flowing.is_set():
                    self.held += data
                    await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        dst.close()


@pytest.fixture
async def held(postgres_dsn: str) -> AsyncIterator[tuple[str, HeldProxy]]:
    """The test database through a HeldProxy: (its DSN, the proxy)."""
    proxy = HeldProxy(*pg_address(postgres_dsn))
    async with behind_proxy(postgres_dsn, proxy) as dsn:
        yield dsn, proxy


async def pending_rows(conn: asyncpg.Connection, name: str) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM pending_answers WHERE id = $1", name)
    return count


@pytest.mark.postgres
async def test_postgres_an_admission_committed_when_its_batch_task_is_cancelled_is_given_back(
    postgres_dsn: str, held: tuple[str, HeldProxy]
) -> None:
    """The admission committed, its answer on its way back, when the event
    loop going away cancels the batch's task (and the caller's): asyncpg
    drops the answer. Before, the admission stayed reserved and a recovery
    charged its pending row; now it is given back by that row."""
    dsn, proxy = held
    store = await PostgresStorage.open(dsn)
    await store.ensure_user("alice", plan="free")
    await store.ensure_user("bob", plan="free")
    # bob's admission prepares the statement on the kept connection: alice's
    # is then one round trip, whose answer the proxy holds.
    assert (await admit(store, "bob", "warm", queries_per_day=10)).admitted
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        proxy.flowing.clear()
        caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
        await until(proxy.answered)  # committed: the server said it is idle again
        assert await pending_rows(watcher, "r1") == 1
        batches = list(store._admits._tasks)
        cancel(*batches, caller)
        await turns()
        proxy.flowing.set()  # the answer arrives, to nobody
        with pytest.raises(asyncio.CancelledError):
            await caller
        # The batch's task ends once the give-back is made: asyncio.run's
        # teardown, which waits for the tasks it cancelled, waits for it too.
        await asyncio.wait(batches)
        assert await pending_rows(watcher, "r1") == 0
        assert await watcher.fetchval("SELECT count(*) FROM stream_leases WHERE id = 'r1'") == 0
        queries = await watcher.fetchval(
            "SELECT queries FROM usage_daily WHERE user_id = 'alice' AND day = $1", DAY
        )
        assert queries in (None, 0)
        bob = await watcher.fetchval(
            "SELECT queries FROM usage_daily WHERE user_id = 'bob' AND day = $1", DAY
        )
        assert bob == 1  # (given back by its own row only)
    finally:
        proxy.flowing.set()
        await store.close()
        await watcher.close()


@pytest.mark.postgres
async def test_postgres_an_admission_given_up_before_it_committed_gives_back_nothing_else(
    postgres_dsn: str,
) -> None:
    """The same cancellation while the admission waits for a row lock: asyncpg
    cancels the statement, nothing is written, and the give-back by its
    pending row finds none - it gives back no query another admission holds."""
    await _truncate(postgres_dsn)
    store = await PostgresStorage.open(postgres_dsn)
    await store.ensure_user("alice", plan="free")
    assert (await admit(store, "alice", "kept", queries_per_day=10)).admitted
    blocker = await asyncpg.connect(postgres_dsn)
    hold = blocker.transaction()
    await hold.start()
    await blocker.execute("SELECT 1 FROM users WHERE id = 'alice' FOR UPDATE")
    # (Since 0024 an admission's rows take no key lock on the user's row: it
    # is held by the user's admission lock.)
    await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('alice', 24))")
    caller = admit(store, "alice", "r1", queries_per_day=10)
    await until(lambda: store.group_commit["admit"] == (2, 2))
    await turns()
    cancel(*store._admits._tasks, caller)
    with pytest.raises(asyncio.CancelledError):
        await caller
    await store.close()
    await hold.rollback()
    try:
        assert await pending_rows(blocker, "r1") == 0
        assert await pending_rows(blocker, "kept") == 1
        queries = await blocker.fetchval(
            "SELECT queries FROM usage_daily WHERE user_id = 'alice' AND day = $1", DAY
        )
        assert queries == 1  # "kept"'s, still counted
    finally:
        await blocker.close()


@pytest.mark.postgres
async def test_postgres_a_close_given_up_leaves_a_give_back_waiting_for_a_connection_alone(
    postgres_dsn: str,
) -> None:
    """A close cancelled while it waits for the give-backs (its admission's
    caller went away mid-call) cancelled them with it: one still waiting for a
    pool connection was never sent, and the admission stayed reserved. It now
    goes on, and a later close waits for it."""
    await _truncate(postgres_dsn)
    store = await PostgresStorage.open(postgres_dsn, min_size=1, max_size=1)
    await store.ensure_user("alice", plan="free")
    blocker = await asyncpg.connect(postgres_dsn)
    hold = blocker.transaction()
    await hold.start()
    await blocker.execute("SELECT 1 FROM users WHERE id = 'alice' FOR UPDATE")
    # (Since 0024 an admission's rows take no key lock on the user's row: it
    # is held by the user's admission lock.)
    await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('alice', 24))")
    try:
        gone = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
        await until(lambda: store.group_commit["admit"] == (1, 1))
        await turns()  # in the database, on the pool's one connection
        gone.cancel()  # its caller went away mid-call: the batch goes on
        # The test queues for the pool's connection first: the give-back waits.
        taken = asyncio.ensure_future(store._pool.acquire())
        await turns()
        closing = asyncio.ensure_future(store.close())
        await hold.rollback()
        await until(lambda: bool(store._background) and taken.done())
        await turns()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await store._pool.release(await taken)
        await store.close()
        assert await pending_rows(blocker, "r1") == 0
        queries = await blocker.fetchval(
            "SELECT queries FROM usage_daily WHERE user_id = 'alice' AND day = $1", DAY
        )
        assert queries in (None, 0)
    finally:
        await blocker.close()


async def test_sqlite_a_close_given_up_leaves_a_give_back_alone(tmp_path: Path) -> None:
    """SQLiteStorage.close() given up while it waits for the give-backs
    cancelled them (PostgreSQL's close shields that wait): a give-back still
    waiting - here for a checkpoint fallen behind the writes - when the close
    is given up was never made, and the admission stayed reserved (review of
    the shutdown fix)."""
    path = str(tmp_path / "gateway.db")
    store = await sqlite_store(path)
    blocker = held_write_lock(path)
    entered = on_the_thread(store)
    caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
    await asyncio.to_thread(entered.wait, 30)
    caller.cancel()  # its caller went away mid-call: the batch goes on
    with pytest.raises(asyncio.CancelledError):
        await caller
    # A checkpoint fallen behind the writes: the next write waits for it.
    slow = asyncio.Event()

    async def checkpointing() -> None:
        await slow.wait()

    checkpoint = asyncio.ensure_future(checkpointing())
    store._checkpointing = checkpoint
    store._in_wal = 10**9
    blocker.execute("ROLLBACK")  # the admission commits; its give-back starts, and waits
    blocker.close()
    await until(lambda: bool(store._background))
    closing = asyncio.ensure_future(store.close())
    await turns()
    closing.cancel()  # the close given up
    with pytest.raises(asyncio.CancelledError):
        await closing
    slow.set()
    await checkpoint
    store._checkpointing = None
    await store.close()
    await nothing_reserved_sqlite(path)
