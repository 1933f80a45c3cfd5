"""A give-back of an admission (or upload reservation) whose outcome was lost
comes after its commit or rollback, never before, however the statement was
held: not yet at its first lock (waiting for a table lock on ``users``, or
still on its way to the server), under a team the user has since left; and
give-backs neither hold other users' locks nor take the pool while they wait.
(From a review of the first give-back, which ordered itself by the admission's
locks: each test here failed on it. The give-back now ends the statement's
backend, and waits for it, before it gives anything back.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from gateway.errors import StorageError
from gateway.quota.limits import Limit
from gateway.storage import UsageEvent
from gateway.storage.postgres import PostgresStorage
from tests.conftest import behind_proxy, pg_address
from tests.harness import until, until_async
from tests.storage.test_given_up_batches import HeldProxy
from tests.storage.test_group_commit import DAY, MONTH, NOW, admit
from tests.storage.test_pg_admission_unknown import (
    ADMISSION_WAITS,
    RESERVATION_RUNS,
    RESERVATION_WAITS,
    Blocked,
    _holds,
    _none,
    count,
    given_back,
    left_of,
    reserve,
    uploads_left,
)
from tests.tcpproxy import TCPProxy

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = [pytest.mark.postgres, pytest.mark.warm_connections]

TIMEOUT = 1.0  # the command timeout: long enough for the 250 ms batch lock timeout under load
LATER = NOW + timedelta(days=1)

# Any statement of the test database waiting for a lock, but ``Blocked``'s own
# (which holds, never waits) and the watcher's.
LOCK_WAITERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
    "AND datname = current_database() AND pid <> pg_backend_pid()"
)


class HoldsNextStatement(TCPProxy):
    """A forwarder that holds the next bytes a client sends (``hold_next``) until
    ``let_go`` is set - a statement slow on its way to the server (a congested
    link, TCP retransmissions) - and passes everything else. The CancelRequest
    asyncpg sends at the command timeout then reaches a backend still idle,
    which ignores it (PostgreSQL drops a cancel that comes while it reads a
    command): a cancellation lost without the forwarder losing it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.hold_next = False
        self.holding = False
        self.let_go = asyncio.Event()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, from_server: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                if not from_server and self.hold_next:
                    self.hold_next = False
                    self.holding = True
                    await self.let_go.wait()
                dst.write(data)
                await dst.drain()
        dst.close()


@pytest.fixture
async def slow_link(postgres_dsn: str) -> AsyncIterator[tuple[str, HoldsNextStatement]]:
    proxy = HoldsNextStatement(*pg_address(postgres_dsn))
    async with behind_proxy(postgres_dsn, proxy, query="sslmode=disable") as dsn:
        yield dsn, proxy
    proxy.let_go.set()


@pytest.fixture
async def held(postgres_dsn: str) -> AsyncIterator[tuple[str, HeldProxy]]:
    proxy = HeldProxy(*pg_address(postgres_dsn))
    async with behind_proxy(postgres_dsn, proxy) as dsn:
        yield dsn, proxy
    proxy.flowing.set()


async def open_store(
    dsn: str, *, command_timeout: float = TIMEOUT, max_size: int = 4
) -> PostgresStorage:
    store = await PostgresStorage.open(
        dsn, min_size=2, max_size=max_size, command_timeout=command_timeout
    )
    for user in ("alice", "bob", "warm"):
        await store.ensure_user(user, plan="free")
    return store


async def warm_up(store: PostgresStorage) -> None:
    """Statements prepared on the connections the admissions use."""
    for i in range(3):  # one after another: each a batch of one, on the kept connection
        assert (await admit(store, "warm", f"warm-s{i}", queries_per_day=100)).admitted
    warm = [admit(store, "warm", f"warm{i}", queries_per_day=100) for i in range(4)]
    assert all(a.admitted for a in await asyncio.gather(*warm))


async def give_back_done_or_waiting(
    store: PostgresStorage, watcher: asyncpg.Connection, *, waiters: int = 2
) -> None:
    """Until the give-back has ended, or waits for a lock (``waiters``: the
    statements then waiting, it among them), whichever the code under test
    does."""

    async def done_or_waiting() -> bool:
        return not store._background or await count(watcher, LOCK_WAITERS) >= waiters

    await until_async(done_or_waiting)


# --- 1. a give-back before the admission reached its first lock -------------------


async def nothing_charged(store: PostgresStorage, watcher: asyncpg.Connection) -> None:
    """Alice's request ``r1`` was refused (fail-closed; fail-open settles its
    answer by its own record): no query, no lease, nothing for a recovery to
    charge. (Its pending row itself is not checked: a fix may fence it.)"""
    _, lease, queries = await left_of(watcher, "alice", "r1")
    assert (lease, queries) == (0, 0)  # main: (1, 1)
    assert "r1" not in await store.recover(before=LATER, now=LATER)
    assert await count(watcher, "SELECT count(*) FROM usage_events WHERE user_id = 'alice'") == 0


async def test_a_give_back_comes_after_an_admission_waiting_for_the_users_table(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy]
) -> None:
    """The admission's first lock is not the user's advisory lock: it reads
    ``users`` to take it (``... FROM users WHERE id = p_user``), and waits for
    that table behind any ACCESS EXCLUSIVE lock (a migration's ALTER TABLE
    users at a rolling deploy, VACUUM FULL, ...). It times out there, its
    cancellation lost; the give-back takes the advisory lock directly (no
    ``users``), finds no pending row, commits - and then the admission gets the
    table, takes the lock, and lands: its pending row stays for a recovery to
    charge, for an answer refused (fail-closed) or already charged (fail-open)."""
    dsn, proxy = lost_cancels
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        await warm_up(store)
        async with Blocked(postgres_dsn, "LOCK TABLE users IN ACCESS EXCLUSIVE MODE") as blocked:
            caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
            await until_async(lambda: _holds(watcher, ADMISSION_WAITS))
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
            # (Its CancelRequest, if one went out, was lost: the statement would stay on
            # the server but for the give-back, which ends its backend first.)
            await give_back_done_or_waiting(store, watcher)
            await blocked.release()  # the table is free: the admission goes on
            await until_async(lambda: _none(watcher, ADMISSION_WAITS))
            await given_back(store)
        await nothing_charged(store, watcher)
    finally:
        await watcher.close()
        await store.close()


async def test_a_give_back_comes_after_an_admission_slow_on_its_way_to_the_server(
    postgres_dsn: str, slow_link: tuple[str, HoldsNextStatement]
) -> None:
    """No lost cancellation needed: the admission's statement is slow on the
    wire past the command timeout. asyncpg's CancelRequest reaches the backend
    while it is still idle (PostgreSQL ignores it), and the give-back, on
    another connection, takes Alice's lock, finds nothing and commits before
    the statement arrives. The statement then runs and commits: a query, a
    lease and a pending row no one forwards, which a recovery charges."""
    dsn, proxy = slow_link
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        await warm_up(store)
        kept = store._admit_connections[0]  # the connection the next admission goes on
        pid = kept.get_server_pid()
        proxy.hold_next = True
        caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
        await until(lambda: proxy.holding)
        with pytest.raises(StorageError, match="TimeoutError"):
            await caller
        # The give-back ends (main: at once, having found nothing), or waits.
        background = set(store._background)
        if background:
            await asyncio.wait(background, timeout=5 * TIMEOUT)
        started: object = await watcher.fetchval("SELECT clock_timestamp()")
        proxy.let_go.set()  # the statement reaches the server, runs, commits

        async def admission_over() -> bool:
            over: bool = await watcher.fetchval(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 "
                "AND (state = 'active' OR state_change < $2))",
                pid,
                started,
            )
            return over

        await until_async(admission_over)
        await given_back(store)
        await nothing_charged(store, watcher)
    finally:
        proxy.let_go.set()
        await watcher.close()
        await store.close()


# --- 2. a give-back holds other users' locks while it waits --------------------------

BOBS_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('bob', 24))"


async def test_a_give_back_waiting_for_one_user_does_not_lock_out_the_others(
    postgres_dsn: str, held: tuple[str, HeldProxy]
) -> None:
    """A batch of Alice's and Bob's admissions commits, its answer lost past the
    command timeout; by then Bob's lock is held (his next admission, slow to
    commit). The give-back takes Alice's lock, then waits - up to 30 s - for
    Bob's, holding Alice's: her next request, with nothing of hers on the
    server, waits for the give-back and fails (a 503 fail-closed) until Bob's
    lock is free. A batch holds up to 64 users' locks (and their teams' rows)
    so, each a give-back of its own behind them."""
    dsn, proxy = held
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    bobs = await asyncpg.connect(postgres_dsn)
    hold = bobs.transaction()
    try:
        await warm_up(store)
        proxy.flowing.clear()
        callers = [
            admit(store, "alice", "a1", queries_per_day=10),
            admit(store, "bob", "b1", queries_per_day=10),
        ]
        await until(proxy.answered)  # committed; its answer held
        await hold.start()
        await bobs.execute(BOBS_LOCK)  # Bob's next admission, slow to commit
        assert not store._background, "the give-back started before Bob's lock was taken"
        await until(lambda: bool(store._background), timeout=10 * TIMEOUT + 5)
        proxy.flowing.set()
        for caller in callers:
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
        await give_back_done_or_waiting(store, watcher, waiters=1)
        # Alice has nothing on the server: her next admission must be answered.
        try:
            a2 = await admit(store, "alice", "a2", queries_per_day=10)
        except StorageError as exc:  # main: TimeoutError behind the give-back
            pytest.fail(f"Alice locked out by a give-back waiting for Bob: {exc}")
        assert a2.admitted
        await hold.rollback()
        await given_back(store)
        assert (await left_of(watcher, "alice", "a1"))[:2] == (0, 0)
        assert (await left_of(watcher, "bob", "b1"))[:2] == (0, 0)
    finally:
        proxy.flowing.set()
        with contextlib.suppress(asyncpg.InterfaceError):
            await hold.rollback()
        await bobs.close()
        await watcher.close()
        await store.close()


# --- 3. give-backs exhaust the pool --------------------------------------------------

ALICES_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('alice', 24))"


async def test_give_backs_of_cancelled_admissions_do_not_take_the_whole_pool(
    postgres_dsn: str, pg_behind_proxy: tuple[str, TCPProxy]
) -> None:
    """Alice's lock is held (her admission slow to commit, a busy team's row,
    ...): her requests time out. Their cancellations ARE delivered - the usual
    case: each rolled back, nothing to give back - yet each time-out starts a
    give-back that takes a pool connection and waits up to 30 s (twice: the
    teams, the users) for her lock. A few of them take the whole pool: Bob's
    settle (any statement of anyone: authentication, settles, admin) waits for
    a connection until the give-backs give up."""
    # A plain forwarder (the database emptied): cancellations delivered. A
    # pool of 3 (none kept for the batches): three give-backs take it (the
    # default: 10, two kept - eight give-backs).
    dsn, _ = pg_behind_proxy
    store = await open_store(dsn, max_size=3)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        await warm_up(store)
        async with Blocked(postgres_dsn, ALICES_LOCK):
            callers = [admit(store, "alice", f"a{i}", queries_per_day=10) for i in range(3)]
            for caller in callers:
                with pytest.raises(StorageError, match="TimeoutError"):
                    await caller
            answer = UsageEvent(
                answer_id="bob-1",
                user_id="bob",
                day=DAY,
                created_at=NOW,
                endpoint="chat-messages",
                prompt_tokens=3,
                completion_tokens=4,
                total_tokens=7,
            )
            settle = asyncio.ensure_future(store.settle(answer))
            try:
                # Normally a few ms; main: until the give-backs' 30 s are out.
                await until(settle.done, timeout=10 * TIMEOUT)
            except AssertionError:
                pytest.fail("Bob's settle waits for a connection the give-backs hold")
            assert settle.result()
    finally:
        await watcher.close()
        await store.close()


# --- 4. an abandoned upload's give-back: one try, under the command timeout ---------


async def test_an_abandoned_upload_whose_reservation_commits_late_is_given_back(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy]
) -> None:
    """The request goes away while its reservation waits for Alice's lock; the
    reservation times out, its cancellation lost. The give-back
    (`_upload_abandoned` -> `_release_quietly`) waits for her lock under the
    command timeout only - not `_GIVE_BACK_WAIT`, as an admission's does - and
    is not retried (not the settler's): past it, the reservation commits and
    the upload of a file never forwarded stays counted."""
    dsn, proxy = lost_cancels
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with Blocked(postgres_dsn, ALICES_LOCK) as blocked:
            caller = reserve(store)
            await until_async(lambda: _holds(watcher, RESERVATION_WAITS))
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            # Two command timeouts: the reservation's, then its give-back's.

            async def release_started() -> bool:
                n = await count(watcher, LOCK_WAITERS)
                return n >= 2 or not store._background

            await until_async(release_started)
            # Alice's other admission commits a little later than the give-back
            # waits (well within an admission give-back's 30 s).
            if store._background:
                await asyncio.wait(set(store._background), timeout=3 * TIMEOUT)
            await blocked.release()
            await until_async(lambda: _none(watcher, RESERVATION_RUNS))
            await given_back(store)
        assert await uploads_left(watcher) == (0, 0)  # main: (1, 1)
    finally:
        await watcher.close()
        await store.close()


TEAM_UPLOADS = Limit("team_uploads_per_day", "uploads", "day", Decimal(3), scope="team")
T1_ROW = "SELECT 1 FROM teams WHERE id = 't1' FOR NO KEY UPDATE"


async def test_an_upload_given_back_waits_for_its_reservation_under_the_team_it_locked(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy]
) -> None:
    """The reservation locks the team it is given (the gateway's view of the
    user: team-scope limits of t1), waiting there for the team's row; the
    give-back (`_UPLOAD_LOCKS`) locks the team the ``users`` row names now -
    none: Alice was moved out of t1 meanwhile (her view is cached) - then her
    advisory lock, free: it finds nothing and commits before the reservation,
    which then counts the upload of a file never forwarded."""
    dsn, proxy = lost_cancels
    store = await open_store(dsn)
    await store.create_team("t1", plan="free", now=NOW)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with Blocked(postgres_dsn, T1_ROW) as blocked:  # a teammate's admission
            caller = asyncio.ensure_future(
                store.reserve_upload(
                    "alice",
                    key="u1",
                    day=DAY,
                    month_start=MONTH,
                    size=100,
                    limits=(TEAM_UPLOADS,),
                    team="t1",
                )
            )
            await until_async(lambda: _holds(watcher, RESERVATION_WAITS))
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
            # (Its CancelRequest, if one went out, was lost: the statement would stay on
            # the server but for the give-back, which ends its backend first.)
            release = asyncio.ensure_future(store.release_upload("alice", key="u1"))

            async def release_done_or_waiting() -> bool:
                return release.done() or await count(watcher, LOCK_WAITERS) >= 2

            await until_async(release_done_or_waiting)
            await blocked.release()  # the reservation, still on the server, commits
            with contextlib.suppress(StorageError):  # (the settler would try again)
                await release
            await until_async(lambda: _none(watcher, RESERVATION_RUNS))
        assert await uploads_left(watcher) == (0, 0)  # main: (1, 1)
    finally:
        await watcher.close()
        await store.close()
