"""An admission whose outcome is unknown to the gateway (review of the
admission path): its statement timed out (asyncpg's command_timeout) or lost
its connection, and the server committed it all the same - the CancelRequest
lost, or the answer lost after the commit.

The caller gets a StorageError, so nobody forwards the answer as admitted:
fail-closed refuses the request, fail-open forwards it unreserved and settles
it without a pending row. Before, the admission that landed stayed: a query
counted, a stream lease, and a pending row whose estimate a recovery charged
for an answer never forwarded (fail-closed) or charged a second time
(fail-open). Now it is given back in the background, by its pending row, under
the admission locks, after the statement's commit or rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import httpx
import pytest

from gateway.errors import StorageError
from gateway.quota.limits import Limit
from gateway.storage import AdmissionLimits, Pending, UsageEvent
from gateway.storage.postgres import PostgresStorage
from tests.conftest import behind_proxy, pg_address
from tests.harness import running_gateway, until, until_async
from tests.storage.test_contract import UPLOADS_PER_DAY
from tests.storage.test_given_up_batches import HeldProxy
from tests.storage.test_group_commit import DAY, MONTH, NOW, admit, group_sent
from tests.tcpproxy import TCPProxy

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = [pytest.mark.postgres, pytest.mark.warm_connections]

# Short enough to keep the tests fast: each waits out one or two of them.
TIMEOUT = 0.4
LATER = NOW + timedelta(days=1)  # a recovery then takes every pending row


@pytest.fixture
async def held(postgres_dsn: str) -> AsyncIterator[tuple[str, HeldProxy]]:
    """A DSN through a forwarder whose answers from the server can be held."""
    proxy = HeldProxy(*pg_address(postgres_dsn))
    async with behind_proxy(postgres_dsn, proxy) as dsn:
        yield dsn, proxy


async def count(conn: asyncpg.Connection, sql: str, *args: object) -> int:
    n: int = await conn.fetchval(sql, *args)
    return n


async def left_of(conn: asyncpg.Connection, user: str, name: str) -> tuple[int, int, int]:
    """What an admission named ``name`` left: its pending row, its lease, and
    the user's queries of the day."""
    return (
        await count(conn, "SELECT count(*) FROM pending_answers WHERE id = $1", name),
        await count(conn, "SELECT count(*) FROM stream_leases WHERE id = $1", name),
        await count(
            conn,
            "SELECT coalesce(sum(queries), 0) FROM usage_daily WHERE user_id = $1 AND day = $2",
            user,
            DAY,
        ),
    )


ALICES_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('alice', 24))"


class Blocked:
    """Alice's admission lock (or what ``statement`` locks) held on a
    connection of its own, as by her other admission slow to commit: her
    admission waits for it."""

    def __init__(self, dsn: str, statement: str = ALICES_LOCK) -> None:
        self.dsn = dsn
        self.statement = statement

    async def __aenter__(self) -> Blocked:
        self.conn = await asyncpg.connect(self.dsn)
        self.hold = self.conn.transaction()
        await self.hold.start()
        await self.conn.execute(self.statement)
        return self

    async def release(self) -> None:
        with contextlib.suppress(asyncpg.InterfaceError):  # (released already)
            await self.hold.rollback()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()
        await self.conn.close()


def waiting(statement: str) -> str:
    """How many statements like ``statement`` wait for a lock."""
    return (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        f"AND query LIKE '{statement}' AND datname = current_database()"
    )


# gateway_admit without the batches' lock timeout (which rolls a batch of one
# back in 250 ms, and the gateway sends it again on its own: this one), which
# waits for the lock under the command timeout.
ADMISSION_WAITS = waiting("SELECT % gateway_admit%") + " AND query NOT LIKE '%, true)'"
GIVE_BACK_WAITS = waiting("SELECT count(pg_advisory_xact_lock(%")
TEAM_GIVE_BACK_WAITS = waiting("SELECT count(*) FROM (SELECT 1 FROM teams%")
ALICES_ANSWERS = "SELECT count(*) FROM usage_events WHERE user_id = 'alice'"
ADMISSION_RUNS = (
    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT % gateway_admit%' "
    "AND state = 'active' AND pid <> pg_backend_pid() AND datname = current_database()"
)


async def open_store(dsn: str, *, command_timeout: float = TIMEOUT) -> PostgresStorage:
    store = await PostgresStorage.open(dsn, min_size=2, max_size=4, command_timeout=command_timeout)
    for user in ("alice", "bob", "warm"):
        await store.ensure_user(user, plan="free")
    return store


async def given_back(store: PostgresStorage) -> None:
    """Wait for the store's give-backs (its background tasks) to end."""
    while store._background:
        await asyncio.gather(*store._background, return_exceptions=True)


async def timed_out_past_commit(
    store: PostgresStorage, watcher: asyncpg.Connection, proxy: TCPProxy
) -> None:
    """Alice's admission ``r1``, waiting for her lock (held: `Blocked`), times
    out; its cancellation is lost, and it would stay on the server and commit
    once the lock is let go. The give-back ends its backend first (or waits for
    the lock behind it: the give-back of a backend not known)."""
    # Statements prepared on every connection.
    warm = [admit(store, "warm", f"warm{i}", queries_per_day=10) for i in range(4)]
    assert all(a.admitted for a in await asyncio.gather(*warm))
    caller = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
    await until_async(lambda: _holds(watcher, ADMISSION_WAITS))
    with pytest.raises(StorageError, match="TimeoutError"):
        await caller
    # (Before the give-back: none, and the admission committed stayed.)

    async def give_back_waits() -> bool:
        return not store._background or await _holds(watcher, GIVE_BACK_WAITS)

    await until_async(give_back_waits)


async def _holds(watcher: asyncpg.Connection, sql: str) -> bool:
    return await count(watcher, sql) == 1


async def _none(watcher: asyncpg.Connection, sql: str) -> bool:
    return await count(watcher, sql) == 0


async def test_fail_closed_an_admission_that_commits_after_its_timeout_is_given_back(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy]
) -> None:
    dsn, proxy = lost_cancels
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with Blocked(postgres_dsn) as blocked:
            await timed_out_past_commit(store, watcher, proxy)
            await blocked.release()  # the admission, still on the server, commits
            await until_async(lambda: _none(watcher, ADMISSION_RUNS))
            await given_back(store)
        # The request was refused (fail-closed): nothing of it may stay reserved.
        assert await left_of(watcher, "alice", "r1") == (0, 0, 0)
        assert "r1" not in await store.recover(before=LATER, now=LATER)
        assert await count(watcher, ALICES_ANSWERS) == 0
    finally:
        await watcher.close()
        await store.close()


@pytest.mark.parametrize("settled", ["before-the-give-back", "after-the-give-back"])
async def test_fail_open_an_answer_let_through_is_charged_once(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy], settled: str
) -> None:
    """Fail-open forwards the answer unreserved and settles it as it settles
    any unreserved answer: its ledger row, tokens and cost, no pending row, no
    lease, and no query (docs/quotas.md: such an answer does not count toward
    queries_per_day). The admission that landed all the same is given back
    whole, so the answer is charged once - by its settle, never again by a
    recovery of the pending row - in either order: the settle and the
    give-back touch nothing of each other's."""
    dsn, proxy = lost_cancels
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    answer = UsageEvent(
        answer_id="msg-1",
        user_id="alice",
        day=DAY,
        created_at=NOW,
        endpoint="chat-messages",
        prompt_tokens=30,
        completion_tokens=12,
        total_tokens=42,
        request_id="r1",
    )
    try:
        async with Blocked(postgres_dsn) as blocked:
            await timed_out_past_commit(store, watcher, proxy)
            if settled == "before-the-give-back":
                # While the admission still waits: a settle takes no admission lock.
                assert await store.settle(answer)
            await blocked.release()
            await until_async(lambda: _none(watcher, ADMISSION_RUNS))
            await given_back(store)
        if settled == "after-the-give-back":
            assert await store.settle(answer)
        recovered = await store.recover(before=LATER, now=LATER)
        events = await watcher.fetch(
            "SELECT answer_id, total_tokens FROM usage_events WHERE user_id = 'alice'"
        )
        assert [tuple(e) for e in events] == [("msg-1", 42)]  # before: and gw-r1's estimate
        assert "r1" not in recovered
        assert await left_of(watcher, "alice", "r1") == (0, 0, 0)
        tokens = await count(
            watcher, "SELECT sum(total_tokens) FROM usage_daily WHERE user_id = 'alice'"
        )
        lifetime = await count(watcher, "SELECT lifetime_tokens FROM users WHERE id = 'alice'")
        assert (tokens, lifetime) == (42, 42)
    finally:
        await watcher.close()
        await store.close()


async def test_a_give_back_waits_behind_an_admission_waiting_for_its_team(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy]
) -> None:
    """An admission under a team's limits takes the team's row first, then the
    user's lock. One that timed out waiting for the team's row (held by a
    teammate's admission) is still waiting for it on the server: the
    give-back takes the team's row too, behind it - with the user's lock
    alone it would find nothing yet, and the admission commit after it."""
    dsn, proxy = lost_cancels
    store = await open_store(dsn)
    await store.create_team("t1", plan="free", now=NOW)
    await store.set_team("alice", "t1")
    limits = AdmissionLimits((Limit("team_q", "queries", "day", Decimal(10), scope="team"),))
    watcher = await asyncpg.connect(postgres_dsn)
    team_row = "SELECT 1 FROM teams WHERE id = 't1' FOR NO KEY UPDATE"
    try:
        async with Blocked(postgres_dsn, team_row) as blocked:
            caller = asyncio.ensure_future(
                store.admit(
                    "alice",
                    day=DAY,
                    month_start=MONTH,
                    now=NOW,
                    limits=limits,
                    team="t1",
                    pending=Pending(id="r1", endpoint="chat-messages", total_tokens=10),
                )
            )
            await until_async(lambda: _holds(watcher, ADMISSION_WAITS))
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
            # (Its CancelRequest, if one went out, was lost: the statement would stay on
            # the server but for the give-back, which ends its backend first.)

            async def give_back_waits() -> bool:
                return not store._background or await _holds(watcher, TEAM_GIVE_BACK_WAITS)

            await until_async(give_back_waits)
            await blocked.release()  # the admission, still on the server, commits
            await until_async(lambda: _none(watcher, ADMISSION_RUNS))
            await given_back(store)
        assert await left_of(watcher, "alice", "r1") == (0, 0, 0)
    finally:
        await watcher.close()
        await store.close()


async def test_a_batch_whose_answer_is_lost_after_its_commit_is_given_back(
    postgres_dsn: str, held: tuple[str, HeldProxy]
) -> None:
    """Two users' admissions in one gateway_admit_many, committed, whose answer
    the forwarder holds past the command timeout: each is given back."""
    dsn, proxy = held
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        # A batch prepares gateway_admit_many on the connection the admissions
        # keep (max_size 4: one), which the next batch takes: one round trip.
        warm = [admit(store, "warm", f"warm{i}", queries_per_day=10) for i in range(2)]
        assert all(a.admitted for a in await asyncio.gather(*warm))
        batches, calls = group_sent(store, "admit")
        proxy.flowing.clear()
        callers = [
            admit(store, "alice", "a1", queries_per_day=10, max_concurrent_streams=5),
            admit(store, "bob", "b1", queries_per_day=10, max_concurrent_streams=5),
        ]
        await until(proxy.answered)  # committed: the server said it is idle again
        assert group_sent(store, "admit") == (batches + 1, calls + 2)  # one batch
        # The command timeout: the give-back starts (before: nothing did); the
        # forwarder lets the answers through again for it.
        await until(lambda: bool(store._background), timeout=10 * TIMEOUT + 5)
        proxy.flowing.set()
        for caller in callers:
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
        await given_back(store)
        assert await left_of(watcher, "alice", "a1") == (0, 0, 0)
        assert await left_of(watcher, "bob", "b1") == (0, 0, 0)
        recovered = await store.recover(before=LATER, now=LATER)
        assert "a1" not in recovered and "b1" not in recovered
    finally:
        proxy.flowing.set()
        await watcher.close()
        await store.close()


async def test_a_give_back_the_database_is_down_for_leaves_the_row_to_a_recovery(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """The database goes away mid-statement (the connection lost: the outcome
    is unknown) and stays away for the give-back: one warning, and the pending
    row of the admission that landed stays for a recovery to charge - what a
    give-back cannot reach, the estimate pays (docs/quotas.md)."""
    dsn, proxy = lost_cancels
    store = await open_store(dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with Blocked(postgres_dsn) as blocked:
            caller = admit(store, "alice", "r1", queries_per_day=10)
            await until_async(lambda: _holds(watcher, ADMISSION_WAITS))
            caplog.clear()
            await proxy.cut()  # the database unreachable, mid-statement
            with pytest.raises(StorageError, match="ConnectionDoesNotExistError"):
                await caller
            await given_back(store)
            await blocked.release()  # the admission, still on the server, commits
            await until_async(lambda: _none(watcher, ADMISSION_RUNS))
        warnings = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("gateway")
        ]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "could not give back 1 admission(s)" in warnings[0].getMessage()
        assert await left_of(watcher, "alice", "r1") == (1, 0, 1)
        recovering = await PostgresStorage.open(postgres_dsn, min_size=1, max_size=2)
        try:
            assert "r1" in await recovering.recover(before=LATER, now=LATER)
        finally:
            await recovering.close()
    finally:
        await proxy.restore()
        await watcher.close()
        await store.close()


async def test_a_close_does_not_wait_out_a_give_back_the_database_does_not_answer(
    postgres_dsn: str, held: tuple[str, HeldProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """Alice's and Bob's admissions commit and their answer is lost (held past
    the command timeout); the database answers nothing more (a network gone
    dark), so their give-back waits - for its backend, up to 35 s, and give-backs queue two at
    a time behind it. The store closes within its grace all the same (before:
    it waited for every give-back, minutes for a brownout's hundreds, until the
    supervisor's SIGKILL), with one warning, and the pending rows of the
    admissions that landed are left to a recovery, which charges each once."""
    dsn, proxy = held
    # A connection opened for the give-back waits for the dark database as long
    # as a statement does (_GIVE_BACK_WAIT): not cut short by the default 5 s.
    store = await PostgresStorage.open(
        dsn, min_size=2, max_size=4, command_timeout=TIMEOUT, connect_timeout=60
    )
    for user in ("alice", "bob", "warm"):
        await store.ensure_user(user, plan="free")
    store.close_grace = 0.2
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        # (As in the batch's test above: a batch prepared on the kept connection.)
        warm = [admit(store, "warm", f"warm{i}", queries_per_day=10) for i in range(2)]
        assert all(a.admitted for a in await asyncio.gather(*warm))
        proxy.flowing.clear()
        callers = [
            admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5),
            admit(store, "bob", "b1", queries_per_day=10, max_concurrent_streams=5),
        ]
        await until(proxy.answered)  # committed; its answer held from here on
        for caller in callers:
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
        assert store._background  # their give-back, waiting on the dark database
        caplog.clear()
        try:
            await asyncio.wait_for(store.close(), timeout=30)
        except TimeoutError:
            pytest.fail("close() waited for a give-back past its grace")
        assert not store._background
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("gateway")
        ]
        assert any("1 give-back(s) still under way" in w for w in warnings), warnings
        assert await left_of(watcher, "alice", "r1") == (1, 1, 1)
        recovering = await PostgresStorage.open(postgres_dsn, min_size=1, max_size=2)
        try:
            recovered = await recovering.recover(before=LATER, now=LATER)
            assert {"r1", "b1"} <= set(recovered)
            assert await count(watcher, ALICES_ANSWERS) == 1
        finally:
            await recovering.close()
    finally:
        proxy.flowing.set()
        await watcher.close()
        await store.close()


@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_a_gateway_charges_an_answer_once_whatever_its_admission_became(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy], policy: str
) -> None:
    """The whole path: the admission times out (its cancellation lost) and
    commits later. Fail-closed refuses the request and charges nothing;
    fail-open forwards it and charges the answer once, by its own record."""
    dsn, proxy = lost_cancels
    settings = {
        "database": {"command_timeout": TIMEOUT, "pool_min_size": 2, "pool_max_size": 4},
        "plans": {"free": {"queries_per_day": 10}},
        "admission": {"on_storage_error": {"queries": policy, "tokens": policy}},
    }
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with running_gateway(dsn, settings=settings) as h:
            assert isinstance(h.storage, PostgresStorage)
            chat = {"query": "Xin chào", "inputs": {}, "response_mode": "blocking", "user": "x"}
            async with Blocked(postgres_dsn) as blocked, httpx.AsyncClient(timeout=20) as client:
                response = await client.post(
                    f"{h.url}/v1/chat-messages", json=chat, headers=h.auth()
                )
                await h.probes.wait_finished(1)
                await blocked.release()  # the admission, still on the server, commits
                await until_async(lambda: _none(watcher, ADMISSION_RUNS))
                await given_back(h.storage)
            later = datetime.now(UTC) + timedelta(days=1)
            assert await h.storage.recover(before=later, now=later) == []
            events = await h.events()
            pending = await count(watcher, "SELECT count(*) FROM pending_answers")
            queries = await count(watcher, "SELECT coalesce(sum(queries), 0) FROM usage_daily")
        # (Its CancelRequest, if one went out, was lost: the statement would stay on
        # the server but for the give-back, which ends its backend first.)
        if policy == "closed":
            assert response.status_code == 503
            assert events == []  # before: the pending row's estimate, for nothing forwarded
        else:
            assert response.status_code == 200
            # Once, by its record (before: and the estimate of gw-<request id>).
            assert [e.answer_id for e in events] == [response.json()["message_id"]]
        # Nothing left reserved; fail-open's answer counts no query (docs/quotas.md).
        assert (pending, queries) == (0, 0)
    finally:
        await watcher.close()


# --- uploads ------------------------------------------------------------------

# The give-back of an upload waits for the lock under the command timeout (the
# settler tries again when it fails): the test releases the lock within it.
UPLOAD_TIMEOUT = 1.0
RESERVATION_WAITS = waiting("SELECT * FROM gateway_reserve_upload%")
RELEASE_WAITS = waiting("SELECT pg_advisory_xact_lock(%")
RESERVATION_RUNS = (
    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT * FROM gateway_reserve_upload%' "
    "AND state = 'active' AND datname = current_database()"
)


def reserve(store: PostgresStorage) -> asyncio.Future[object]:
    return asyncio.ensure_future(
        store.reserve_upload(
            "alice", key="u1", day=DAY, month_start=MONTH, size=100, limits=(UPLOADS_PER_DAY,)
        )
    )


async def uploads_left(watcher: asyncpg.Connection) -> tuple[int, int]:
    """Alice's uploads counted today, and the reservation's key row."""
    return (
        await count(
            watcher,
            "SELECT coalesce(sum(uploads), 0) FROM usage_daily WHERE user_id = 'alice' AND day = $1",
            DAY,
        ),
        await count(watcher, "SELECT count(*) FROM upload_reservations WHERE id = 'u1'"),
    )


async def test_an_upload_given_back_after_its_reservation_timed_out_stays_given_back(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy]
) -> None:
    """A reservation whose outcome was lost lets the upload through (fail-open,
    `UploadTicket.known` false); the upstream refuses the file and the upload
    is given back by its key. The give-back now waits for the user's lock,
    behind the reservation still on the server; before, it found nothing yet,
    and the reservation committed afterwards stayed counted."""
    dsn, proxy = lost_cancels
    store = await open_store(dsn, command_timeout=UPLOAD_TIMEOUT)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with Blocked(postgres_dsn) as blocked:
            caller = reserve(store)
            await until_async(lambda: _holds(watcher, RESERVATION_WAITS))
            with pytest.raises(StorageError, match="TimeoutError"):
                await caller
            release = asyncio.ensure_future(store.release_upload("alice", key="u1"))

            async def release_waits() -> bool:
                return release.done() or await _holds(watcher, RELEASE_WAITS)

            await until_async(release_waits)
            await blocked.release()  # the reservation, still on the server, commits
            await release
            await until_async(lambda: _none(watcher, RESERVATION_RUNS))
        assert await uploads_left(watcher) == (0, 0)
    finally:
        await watcher.close()
        await store.close()


async def test_an_upload_abandoned_while_its_reservation_times_out_is_given_back(
    postgres_dsn: str, lost_cancels: tuple[str, TCPProxy]
) -> None:
    """The request goes away while its reservation waits, and the reservation
    then times out: before, only one known to be admitted was given back."""
    dsn, proxy = lost_cancels
    store = await open_store(dsn, command_timeout=UPLOAD_TIMEOUT)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        async with Blocked(postgres_dsn) as blocked:
            caller = reserve(store)
            await until_async(lambda: _holds(watcher, RESERVATION_WAITS))
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller

            async def released_or_none() -> bool:
                return not store._background or await _holds(watcher, RELEASE_WAITS)

            await until_async(released_or_none)  # (the reservation's task timed out)
            await blocked.release()
            await until_async(lambda: _none(watcher, RESERVATION_RUNS))
            await given_back(store)
        assert await uploads_left(watcher) == (0, 0)
    finally:
        await watcher.close()
        await store.close()
