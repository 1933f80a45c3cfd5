"""A give-back of an admission or upload whose outcome was lost: the statement
is ended at once (not left holding a backend and its user's lock until the
give-back's turn), a release waits until its reservation's backend is known to
be gone, and the backend is known by its pid and start, whatever role the
connection works as, and not at all behind a pooler (which hides it: the
give-back then goes by the admission's locks, and an upload's release by the
reservation's). From a review of the first version, which closed the
connection at once, so that asyncpg's CancelRequest never went out, told
backends by role, and let a release retried after a failed end go first: each
test here failed on it (the upload's release behind a pooler, added later,
failed on the version before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from gateway.errors import StorageError
from gateway.storage import postgres
from tests.conftest import behind_proxy, pg_address
from tests.harness import until_async
from tests.storage.test_group_commit import admit
from tests.storage.test_pg_admission_unknown import (
    ALICES_LOCK,
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
from tests.storage.test_pg_give_back_order import LOCK_WAITERS, open_store, warm_up
from tests.tcpproxy import TCPProxy

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = [pytest.mark.postgres, pytest.mark.warm_connections]


# --- A. the give-back's terminate() suppresses asyncpg's own cancellation ------------


async def test_a_timed_out_admission_is_still_cancelled_on_the_server_while_give_backs_wait(
    postgres_dsn: str, pg_behind_proxy: tuple[str, TCPProxy]
) -> None:
    """Alice's lock is held (her other admission slow to commit): her requests
    time out. The forwarder delivers every CancelRequest - the usual case,
    where asyncpg's cancellation rolls the statement back at once. But
    `_given_up` terminates the connection in the same turn as the TimeoutError,
    which cancels asyncpg's CancelRequest task before it is sent: the statement
    stays on the server (holding a backend and queued on her lock) until its
    give-back ends it, and give-backs go two at a time. In a brownout - the
    case the semaphore is for, give-backs slow or queued (here: both slots
    taken) - every time-out leaves one more orphan backend, while the pool
    opens a fresh connection in its place: the server's max_connections fill
    up with statements the gateway has given up."""
    dsn, _ = pg_behind_proxy
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    slots = store._give_back_slots
    taken = 0
    try:
        await warm_up(store)
        async with Blocked(postgres_dsn, ALICES_LOCK):
            # Two give-backs under way already (slow in a brownout).
            for _ in range(postgres._GIVE_BACKS_AT_ONCE):
                await slots.acquire()
                taken += 1
            for i in range(3):
                with pytest.raises(StorageError, match="TimeoutError"):
                    await admit(store, "alice", f"a{i}", queries_per_day=10)

            async def no_orphans() -> bool:
                return await count(watcher, LOCK_WAITERS) == 0

            try:
                # Ended at once: a few ms (before: they waited for their give-back).
                await until_async(no_orphans, timeout=5.0)
            except AssertionError:
                left = await count(watcher, LOCK_WAITERS)
                pytest.fail(f"{left} timed-out admission(s) still running on the server")
    finally:
        for _ in range(taken):
            slots.release()
        await watcher.close()
        await store.close()


# --- B. a release retried after the backend could not be ended ----------------------


async def test_a_release_after_the_backend_could_not_be_ended_does_not_come_first(
    postgres_dsn: str,
    lost_cancels: tuple[str, TCPProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reservation times out while it waits for Alice's lock. Its backend
    cannot be ended: here PostgreSQL 13 (no two-argument pg_terminate_backend,
    simulated by a function of no such name); the same with the database not
    answering the end, or the backend outliving the 30 s. `_end_backend`
    returns False, and its done-callback pops the key from `_ending` - so the
    settler's release (its first try, or its retry after a first try failed
    while the end was under way) finds nothing to wait for, releases nothing
    (the reservation has not landed), and reports success. The reservation then
    commits: an upload of a file never forwarded stays counted."""
    monkeypatch.setattr(
        postgres,
        "_END_BACKEND",
        # What PostgreSQL < 14 answers: no such function (UndefinedFunctionError).
        postgres._END_BACKEND.replace("pg_terminate_backend(", "pg_terminate_backend_pg13("),
    )
    dsn, _ = lost_cancels
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with Blocked(postgres_dsn, ALICES_LOCK) as blocked:
            caller = reserve(store)
            await until_async(lambda: _holds(watcher, RESERVATION_WAITS))
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
            _, ending = store._ending["u1"]
            await asyncio.wait({ending})  # the end failed (False)
            assert ending.result() is False
            refused = False
            try:
                await store.release_upload("alice", key="u1")  # the settler's (re)try
            except StorageError:
                refused = True  # the settler would try again later
            # The reservation, never ended, is still on the server: it commits.
            await blocked.release()
            await until_async(lambda: _none(watcher, RESERVATION_RUNS))
            await given_back(store)
        left = await uploads_left(watcher)
        assert refused or left == (0, 0), (
            f"release_upload reported success before the reservation committed: {left} left"
        )
    finally:
        await watcher.close()
        await store.close()


# --- C. _END_BACKEND's filter misses the backend: "gone" ------------------------------


@pytest.fixture
async def other_role(postgres_dsn: str) -> AsyncIterator[str]:
    """A role the store works as, not the one it logs in as (dropped after)."""
    role = f"gateway_test_owner_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} NOLOGIN SUPERUSER")
        yield role
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
        await conn.close()


# New connections: the role it creates is dropped after it.
@pytest.mark.warm_connections(False)
async def test_a_give_back_of_a_store_whose_current_user_is_not_its_login_comes_after(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy], other_role: str
) -> None:
    """The gateway logs in as one role and works as another (``role`` set at
    connection: ALTER ROLE login SET role = owner, or a DSN option - a usual
    way to have the tables owned by a role nobody logs in as).
    pg_stat_activity's ``usename`` is the login; `_END_BACKEND` compares it with
    ``current_user``, the other: no row, and ``coalesce(..., true)`` calls the
    backend gone. The give-back then runs at once, finds no pending row, and
    the admission - still waiting for Alice's lock, never cancelled - lands
    after it: its query, lease and pending row stay."""
    dsn, _ = lost_cancels
    await _nothing_left_of_a_timed_out_admission(f"{dsn}&role={other_role}", postgres_dsn)


async def _nothing_left_of_a_timed_out_admission(dsn: str, postgres_dsn: str) -> None:
    """Alice's admission ``r1``, through ``dsn``, times out waiting for her lock;
    once the lock is let go and the give-back is over, nothing of it is left."""
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        await warm_up(store)
        async with Blocked(postgres_dsn, ALICES_LOCK) as blocked:
            caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller

            async def done_or_waiting() -> bool:
                return not store._background or await count(watcher, LOCK_WAITERS) >= 2

            await until_async(done_or_waiting)
            await blocked.release()  # the admission, if still on the server, lands
            await until_async(lambda: _no_admission_running(watcher))
            await given_back(store)
        _, lease, queries = await left_of(watcher, "alice", "r1")
        assert (lease, queries) == (0, 0)
    finally:
        await watcher.close()
        await store.close()


async def _no_admission_running(watcher: asyncpg.Connection) -> bool:
    return (
        await count(
            watcher,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT % gateway_admit%' "
            "AND state = 'active' AND pid <> pg_backend_pid() AND datname = current_database()",
        )
        == 0
    )


# --- D. a pooler's (PgBouncer's) BackendKeyData is not the backend's pid ----------------


class RewritesBackendKey(TCPProxy):
    """A forwarder that hands clients a BackendKeyData of its own, as PgBouncer
    (and other poolers) do: the pid asyncpg's get_server_pid() returns is not
    the server backend's. CancelRequests (which would carry the made-up key)
    are lost, as this forwarder cannot map them back."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port, lose_cancels=True)
        self.fake_pid = 1  # pid 1 is never a PostgreSQL backend

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, from_server: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError, asyncio.IncompleteReadError):
            if from_server:
                # The start-up's messages, one by one, until ReadyForQuery.
                while True:
                    head = await src.readexactly(5)
                    kind, length = head[:1], struct.unpack("!I", head[1:])[0]
                    body = await src.readexactly(length - 4)
                    if kind == b"K":
                        body = struct.pack("!II", self.fake_pid, 12345)
                    dst.write(head + body)
                    await dst.drain()
                    if kind in (b"Z", b"E"):
                        break
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()


@pytest.fixture
async def pooler(postgres_dsn: str) -> AsyncIterator[tuple[str, RewritesBackendKey]]:
    proxy = RewritesBackendKey(*pg_address(postgres_dsn))
    async with behind_proxy(postgres_dsn, proxy, query="sslmode=disable") as dsn:
        yield dsn, proxy


async def test_a_give_back_behind_a_pooler_comes_after_the_admission(
    postgres_dsn: str, pooler: tuple[str, RewritesBackendKey]
) -> None:
    """Behind PgBouncer (session mode) the pid noted before the statement is
    the pooler's, not the backend's: `_END_BACKEND` finds no such backend,
    calls it gone, and the give-back comes before the admission, which lands
    once Alice's lock is free. (Closing the client's connection does not end
    the server's either: the pooler holds it.)"""
    dsn, _ = pooler
    await _nothing_left_of_a_timed_out_admission(dsn, postgres_dsn)


async def test_an_upload_released_behind_a_pooler_comes_after_its_reservation(
    postgres_dsn: str, pooler: tuple[str, RewritesBackendKey]
) -> None:
    """Behind a pooler an upload's reservation times out waiting for Alice's
    lock, its cancellation lost: it stays on the server, and commits once the
    lock is free. Its release (the request refused, the settler giving the
    upload back) has no backend to wait for; it takes the reservation's locks
    first, so it comes after the reservation's commit. (Before, it came at once,
    found nothing, and the upload of a file never forwarded stayed counted.)"""
    dsn, _ = pooler
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with Blocked(postgres_dsn, ALICES_LOCK) as blocked:
            caller = reserve(store)
            await until_async(lambda: _holds(watcher, RESERVATION_WAITS))
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
            release = asyncio.ensure_future(store.release_upload("alice", key="u1"))

            async def release_done_or_waiting() -> bool:
                return release.done() or await count(watcher, LOCK_WAITERS) >= 2

            await until_async(release_done_or_waiting)
            await blocked.release()  # the reservation, still on the server, commits
            await release
            await until_async(lambda: _none(watcher, RESERVATION_RUNS))
        assert await uploads_left(watcher) == (0, 0)  # before: (1, 1)
        assert not store._unordered
    finally:
        await watcher.close()
        await store.close()


# New connections: the backend it closes must end.
@pytest.mark.warm_connections(False)
async def test_a_backend_gone_when_it_was_to_be_ended_is_gone(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_terminate_backend answers false (and warns) for a pid that is no
    backend any more, which the ending statement's view of pg_stat_activity,
    read at its start, can still list: a backend `_kill` ended a moment before.
    That false is not "outlived the wait": the backend is looked for again, and
    a gone one lets the release go on (before, it failed it under load). One
    that is there is still not gone."""
    # The ending statement as it answers in that race, for any backend.
    monkeypatch.setattr(
        postgres, "_END_BACKEND", "SELECT false FROM (SELECT $1::int, $2::timestamptz, $3::int) s"
    )
    store = await open_store(postgres_dsn)
    victim = await asyncpg.connect(postgres_dsn)
    try:
        pid = victim.get_server_pid()
        start = await victim.fetchval(
            "SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        async with store._pool.acquire() as conn:
            assert not await postgres._ended(conn, (pid, start))  # there: not gone
        await victim.close()
        gone = await asyncpg.connect(postgres_dsn)  # (the view is read afresh)
        await until_async(
            lambda: _none(gone, f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")
        )
        await gone.close()
        assert await store._end_backend((pid, start))  # before: False, "outlived the wait"
    finally:
        await victim.close()
        await store.close()
