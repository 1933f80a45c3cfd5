"""Group commit: the batcher on its own, then the PostgreSQL and SQLite batches
for real.

The batcher tests drive `GroupCommit` with runners that record what they were
given; the database tests check that batched admissions and settles decide and
write exactly what the same calls made one by one would (docs/quotas.md). On
SQLite every call goes through one queue, each batch one transaction of
savepoints; its own tests (at the end) cover what is particular to that: writes
of every kind in arrival order, a write refused at commit or ending the
transaction, a close and a crash in the middle of a batch, two processes on one
file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import shutil
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.errors import NotFound, StorageError
from gateway.storage import (
    Admission,
    AdmissionLimits,
    AlertCheck,
    AlertRequest,
    Lease,
    Pending,
    Storage,
    UsageEvent,
    WebSearch,
    open_storage,
)
from gateway.storage import sqlite as sqlite_module
from gateway.storage.group import GroupCommit, NotNow, SplitBatch
from gateway.storage.postgres import (
    _ADMIT_BATCHED,
    _SETTLE_BATCHED,
    PostgresStorage,
    _AdmitCall,
    _SettleCall,
)
from gateway.storage.sqlite import (
    CHECKPOINT_EVERY,
    CHECKPOINT_LAG,
    CHECKPOINT_MOST,
    NOW_MOST,
    SQLiteStorage,
)
from tests.conftest import _truncate

# The tests on postgres_dsn take warm connections (tests/conftest.py): a blocker
# of their own is still a backend of its own.
pytestmark = pytest.mark.warm_connections

T = TypeVar("T")
NOW = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
DAY = date(2026, 11, 21)
MONTH = date(2026, 11, 1)


# --- the batcher ---------------------------------------------------------------------


class Runner:
    """Runners for a GroupCommit of ints: a batch answers each item doubled,
    after the test lets it (``release``); ``bad`` items make a batch split and
    fail alone."""

    def __init__(self, bad: frozenset[int] = frozenset()) -> None:
        self.batches: list[list[int]] = []
        self.singles: list[int] = []
        self.release = asyncio.Event()
        self.release.set()
        self.bad = bad
        self.error: Exception | None = None
        self.entered: asyncio.Queue[list[int]] = asyncio.Queue()  # each batch as it starts

    async def many(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.entered.put_nowait(list(items))
        await self.release.wait()
        if self.error is not None:
            raise self.error
        if self.bad & set(items):
            raise SplitBatch("a bad item")
        return [i * 2 for i in items]

    async def one(self, item: int) -> int:
        self.singles.append(item)
        await self.release.wait()
        if self.error is not None:
            raise self.error
        if item in self.bad:
            raise ValueError(f"bad {item}")
        return item * 2


def group(runner: Runner, **kw: object) -> GroupCommit[int, int]:
    return GroupCommit("test", runner.many, runner.one, **{"max_batch": 64, **kw})  # type: ignore[arg-type]


async def test_a_call_alone_goes_alone_at_once() -> None:
    runner = Runner()
    batcher = group(runner)
    assert await batcher(3) == 6
    assert runner.batches == [[3]] and runner.singles == []


async def test_calls_made_together_go_in_one_batch() -> None:
    runner = Runner()
    batcher = group(runner)
    assert await asyncio.gather(*(batcher(i) for i in range(10))) == [i * 2 for i in range(10)]
    assert runner.batches == [list(range(10))]
    assert (batcher.batches, batcher.calls) == (1, 10)


async def test_a_batch_is_sent_in_the_turn_after_its_calls() -> None:
    """Issue 24: the flush is the batch's own task, which sends it as it starts.
    A flush callback that made a task to send it cost every call a turn of the
    event loop more (a wait behind every other stream's callbacks)."""
    runner = Runner()
    batcher = group(runner)
    calls = asyncio.ensure_future(asyncio.gather(batcher(1), batcher(2)))
    await asyncio.sleep(0)  # the calls are made
    assert runner.batches == []
    await asyncio.sleep(0)  # the next turn: sent, together
    assert runner.batches == [[1, 2]]
    assert await calls == [2, 4]


async def turns(count: int = 10) -> None:
    """Let the event loop run ``count`` turns (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_calls_queue_while_batches_are_in_flight() -> None:
    runner = Runner()
    runner.release.clear()
    batcher = group(runner, in_flight=1)
    first = [asyncio.ensure_future(batcher(i)) for i in range(3)]
    assert await runner.entered.get() == [0, 1, 2]
    later = [asyncio.ensure_future(batcher(i)) for i in range(3, 8)]
    await turns()
    assert runner.batches == [[0, 1, 2]]  # still in flight: the others wait
    runner.release.set()
    assert await asyncio.gather(*first, *later) == [i * 2 for i in range(8)]
    assert runner.batches == [[0, 1, 2], [3, 4, 5, 6, 7]]


async def test_batches_are_bounded() -> None:
    runner = Runner()
    runner.release.clear()
    batcher = group(runner, max_batch=4, in_flight=2)
    calls = [asyncio.ensure_future(batcher(i)) for i in range(10)]
    assert await runner.entered.get() == [0, 1, 2, 3]
    assert await runner.entered.get() == [4, 5, 6, 7]
    await turns()
    assert runner.entered.empty()  # two in flight: the last two wait
    runner.release.set()
    assert await asyncio.gather(*calls) == [i * 2 for i in range(10)]
    assert runner.batches[2] == [8, 9]


async def test_a_refused_batch_is_sent_call_by_call() -> None:
    runner = Runner(bad=frozenset({2}))
    batcher = group(runner)
    results = await asyncio.gather(*(batcher(i) for i in range(4)), return_exceptions=True)
    assert results[:2] == [0, 2] and results[3] == 6
    assert isinstance(results[2], ValueError)
    assert sorted(runner.singles) == [0, 1, 2, 3]


async def test_any_other_error_is_every_callers() -> None:
    runner = Runner()
    runner.error = StorageError("the database is gone")
    batcher = group(runner)
    results = await asyncio.gather(*(batcher(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results)
    assert runner.singles == []


async def test_a_cancelled_callers_result_goes_to_abandoned() -> None:
    runner = Runner()
    runner.release.clear()
    abandoned: list[tuple[int, int]] = []
    batcher = group(runner, abandoned=lambda item, result: abandoned.append((item, result)))
    kept = asyncio.ensure_future(batcher(1))
    gone = asyncio.ensure_future(batcher(2))
    assert await runner.entered.get() == [1, 2]
    gone.cancel()
    runner.release.set()
    assert await kept == 2
    await batcher.drain()
    assert abandoned == [(2, 4)]


async def test_a_result_that_arrives_as_its_caller_is_cancelled_is_abandoned() -> None:
    runner = Runner()
    abandoned: list[tuple[int, int]] = []
    batcher = group(runner, abandoned=lambda item, result: abandoned.append((item, result)))
    callers: list[asyncio.Future[int]] = []
    real_many = runner.many

    async def many(items: Sequence[int]) -> list[int | Exception]:
        out = await real_many(items)
        # Lands after the batch answers and before the caller resumes.
        asyncio.get_running_loop().call_soon(callers[1].cancel)
        return out

    batcher._run_many = many  # type: ignore[method-assign]
    callers += [asyncio.ensure_future(batcher(1)), asyncio.ensure_future(batcher(2))]
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert results[0] == 2 and isinstance(results[1], asyncio.CancelledError)
    assert abandoned == [(2, 4)]


async def test_a_split_batch_resends_each_key_in_order_and_keys_side_by_side() -> None:
    runner = Runner(bad=frozenset({0}))
    stuck = asyncio.Event()
    real_one = runner.one

    async def one(item: int) -> int:
        if item == 2:  # key 0's second call waits (a row lock held elsewhere)
            await stuck.wait()
        return await real_one(item)

    batcher = GroupCommit("test", runner.many, one, max_batch=64, key=lambda item: item % 2)
    calls = [asyncio.ensure_future(batcher(i)) for i in range(6)]
    # Key 1's calls all finish while key 0 is held up at its second call...
    assert await asyncio.gather(calls[1], calls[3], calls[5]) == [2, 6, 10]
    assert not calls[4].done()  # ...and key 0's third waits behind it, in order
    stuck.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], ValueError) and results[2:] == [4, 6, 8, 10]
    assert [i for i in runner.singles if i % 2 == 0] == [0, 2, 4]


async def test_the_flush_task_cancelled_before_it_starts_does_not_wedge_the_batcher() -> None:
    """Review of 6ac1943 (F2): the flush is a task, and one cancelled before its
    first step (by what cancels tasks it does not own: asyncio.run's teardown,
    drain() cancelled at close) never cleared ``_scheduled``: every later call
    queued behind a flush that never came, and the queued callers, not
    cancelled themselves, waited forever. They are cancelled, as the callers of
    a batch whose task is cancelled are; a later call goes as usual."""
    runner = Runner()
    batcher = group(runner)
    first = asyncio.ensure_future(batcher(1))
    await asyncio.sleep(0)  # queued, its flush task made
    for task in list(batcher._tasks):
        task.cancel()
    await turns()
    assert first.cancelled() and runner.batches == []
    later = asyncio.ensure_future(batcher(2))
    await turns()
    assert later.done() and later.result() == 4
    assert runner.batches == [[2]]


async def test_a_batch_task_cancelled_while_resending_call_by_call_answers_every_caller() -> None:
    """Review F3: the task sending a split batch is cancelled (the event loop
    going away) while its calls are resent one by one. The callers not yet
    answered waited forever (``_send`` cancelled them only while the batch
    itself was out); they are cancelled, those answered keep their answers."""
    runner = Runner()
    held = asyncio.Event()
    real_one = runner.one

    async def one(item: int) -> int:
        if item == 2:  # a row lock held elsewhere
            await held.wait()
        return await real_one(item)

    async def many(items: Sequence[int]) -> list[int | Exception]:
        raise SplitBatch("refused")

    batcher = GroupCommit("test", many, one, max_batch=64)
    callers = [asyncio.ensure_future(batcher(i)) for i in (1, 2, 3)]
    assert await asyncio.gather(callers[0], callers[2]) == [2, 6]
    assert not callers[1].done()  # 2 waits in the database
    for task in list(batcher._tasks):
        task.cancel()
    await turns()
    assert callers[1].cancelled()
    assert await batcher(4) == 8  # and the batcher goes on


async def test_a_batch_task_cancelled_before_it_starts_gives_its_slot_back() -> None:
    """As a flush task can be, a batch's own task made by a flush can be
    cancelled before its first step: its callers waited forever, and the slot it
    held (one of ``in_flight``) was never given back. Its callers are cancelled;
    the other batches go as usual, the next in the slot it frees."""
    runner = Runner()
    runner.release.clear()
    batcher = group(runner, max_batch=2, in_flight=2)
    calls = [asyncio.ensure_future(batcher(i)) for i in range(6)]
    await asyncio.sleep(0)  # the calls are made, their flush task with them
    flush = set(batcher._tasks)
    await asyncio.sleep(0)  # it sends [0, 1] and makes [2, 3]'s task, not started yet
    assert runner.batches == [[0, 1]]
    [second] = batcher._tasks - flush
    second.cancel()
    await turns()
    assert calls[2].cancelled() and calls[3].cancelled()
    assert runner.batches == [[0, 1], [4, 5]]  # in the slot it gave back
    runner.release.set()
    assert await asyncio.gather(*calls[:2], *calls[4:]) == [0, 2, 8, 10]
    assert await batcher(6) == 12
    assert batcher._running == 0


async def test_max_batch_one_sends_every_call_alone() -> None:
    runner = Runner()
    batcher = group(runner, max_batch=1)
    await asyncio.gather(*(batcher(i) for i in range(5)))
    assert runner.batches == [] and sorted(runner.singles) == list(range(5))


async def test_a_lone_call_is_made_at_once_by_run_now_and_calls_made_together_are_not() -> None:
    runner = Runner()
    made_now: list[int] = []

    def now(item: int) -> int:
        if item < 0:
            raise NotNow  # declined: sent as usual
        made_now.append(item)
        if item == 13:
            raise ValueError("bad 13")
        return item * 2

    batcher = GroupCommit("test", runner.many, runner.one, max_batch=64, run_now=now)
    assert await batcher(3) == 6
    assert made_now == [3] and runner.batches == []  # no batch sent
    with pytest.raises(ValueError, match="bad 13"):
        await batcher(13)  # its error is its caller's
    assert await batcher(-1) == -2
    assert runner.batches == [[-1]]
    assert await asyncio.gather(*(batcher(i) for i in range(4))) == [0, 2, 4, 6]
    # The first of the calls made in one turn finds nothing queued: made at
    # once; those after it queue behind it and go together.
    assert runner.batches == [[-1], [1, 2, 3]] and made_now == [3, 13, 0]
    assert (batcher.batches, batcher.calls) == (5, 7)


async def test_a_lone_call_made_now_waits_for_no_turn_of_the_event_loop() -> None:
    """Issue 24: the call is made in its caller's turn - the caller's coroutine
    finishes without once giving the event loop back (each turn waited for
    is a wait behind every other stream's callbacks at 100 answers/s)."""
    runner = Runner()
    batcher = GroupCommit("test", runner.many, runner.one, max_batch=64, run_now=lambda i: i * 2)
    call = batcher(21).__await__()
    with pytest.raises(StopIteration) as answered:
        next(call)  # not suspended: answered at once
    assert answered.value.value == 42
    assert (batcher.batches, batcher.calls) == (1, 1) and runner.batches == []


async def test_run_now_waits_while_a_batch_is_in_flight() -> None:
    runner = Runner()
    runner.release.clear()
    made_now: list[int] = []

    def now(item: int) -> int:
        made_now.append(item)
        return item * 2

    batcher = GroupCommit("test", runner.many, runner.one, max_batch=64, in_flight=1, run_now=now)
    first = [asyncio.ensure_future(batcher(i)) for i in range(3)]
    assert await runner.entered.get() == [1, 2]  # 0 was made at once
    later = asyncio.ensure_future(batcher(5))
    await turns()
    assert made_now == [0] and not later.done()  # after the batch, as it would be sent
    runner.release.set()
    assert await asyncio.gather(*first, later) == [0, 2, 4, 10]
    assert made_now == [0, 5]


async def test_a_flush_makes_at_most_one_batch_on_the_event_loop() -> None:
    """Review of 4e844b1: with a max_batch no larger than what ``run_now_many``
    makes (database.max_batch 2 to 4 on SQLite), every batch of the queue was
    made on the event loop, one after another in one callback - a queue of
    hundreds of calls made at a burst while every other stream waited. One
    batch is made now; the next is sent as usual (to the thread)."""
    runner = Runner()
    runner.release.clear()
    made_now: list[list[int]] = []

    def now_many(items: Sequence[int]) -> list[int | Exception]:
        made_now.append(list(items))
        return [i * 2 for i in items]

    batcher = GroupCommit(
        "test", runner.many, runner.one, max_batch=2, in_flight=1, run_now_many=now_many
    )
    calls = [asyncio.ensure_future(batcher(i)) for i in range(10)]
    await turns()
    assert made_now == [[0, 1]] and runner.batches == [[2, 3]]
    runner.release.set()
    assert await asyncio.gather(*calls) == [i * 2 for i in range(10)]
    assert sorted(i for batch in made_now + runner.batches for i in batch) == list(range(10))


def test_bounds_are_checked() -> None:
    runner = Runner()
    with pytest.raises(ValueError):
        group(runner, max_batch=0)
    with pytest.raises(ValueError):
        group(runner, in_flight=0)


# --- PostgreSQL: batches are exact ---------------------------------------------------


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[PostgresStorage]:
    await _truncate(postgres_dsn)
    store = await PostgresStorage.open(postgres_dsn)
    _DSNS[id(store)] = postgres_dsn
    try:
        yield store
    finally:
        await store.close()


_DSNS: dict[int, str] = {}


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    store = await SQLiteStorage.open(str(tmp_path / "gateway.db"))
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def batching(database_url: str) -> AsyncIterator[Storage]:
    """A group-committing store of each backend, empty (conftest's database_url)."""
    store = await open_storage(DatabaseConfig(url=database_url))
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


def group_sent(store: Storage, op: str) -> tuple[int, int]:
    """(batches, calls) of ``op`` so far: SQLite counts its writes together."""
    counts: dict[str, tuple[int, int]] = store.group_commit  # type: ignore[attr-defined]
    return counts.get(op) or counts["calls"]


def pg_dsn(store: PostgresStorage) -> str:
    """The database a `pg` store is on, for a second connection of the test's own."""
    return _DSNS[id(store)]


def settle_event(answer_id: str, user: str = "alice", tokens: int = 100) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=DAY,
        created_at=NOW,
        endpoint="chat-messages",
        prompt_tokens=tokens - tokens // 4,
        completion_tokens=tokens // 4,
        total_tokens=tokens,
        cost=Decimal("0.0010000"),
    )


def admit(store: Storage, user: str, name: str, **limits: int) -> asyncio.Future[Admission]:
    """An admission call under way, with a pending row (and a lease when a
    stream limit is given) named ``name``."""
    lease = Lease(name, NOW + timedelta(minutes=5)) if "max_concurrent_streams" in limits else None
    return asyncio.ensure_future(
        store.admit(
            user,
            day=DAY,
            month_start=MONTH,
            now=NOW,
            limits=AdmissionLimits(**limits),
            lease=lease,
            pending=Pending(id=name, endpoint="chat-messages", prompt_tokens=10, total_tokens=10),
        )
    )


async def test_batched_admissions_count_each_other(batching: Storage) -> None:
    pg = batching
    for user in ("alice", "bob"):
        await pg.ensure_user(user, plan="free")
    # One batch: alice's 12 calls against a limit of 10 and of 3 open streams,
    # bob's 4 against a limit of 2 queries, interleaved.
    batches_before, sent_before = group_sent(pg, "admit")
    calls = [
        admit(pg, "alice", f"a{i}", queries_per_day=10, max_concurrent_streams=3)
        if i % 4
        else admit(pg, "bob", f"b{i}", queries_per_day=2)
        for i in range(16)
    ]
    results = await asyncio.gather(*calls)
    batches, sent = group_sent(pg, "admit")
    assert sent - sent_before == 16 and batches - batches_before < 16
    alice = [r for i, r in enumerate(results) if i % 4]
    bob = [r for i, r in enumerate(results) if not i % 4]
    # Each element saw the ones before it: in arrival order, the first 3 of
    # alice's take the stream slots, the rest are refused for streams.
    assert [r.admitted for r in alice] == [True] * 3 + [False] * 9
    assert [r.counters.open_streams for r in alice[:3]] == [1, 2, 3]
    assert {r.refused_by for r in alice[3:]} == {"max_concurrent_streams"}
    assert [r.admitted for r in bob] == [True, True, False, False]
    assert [r.counters.queries_today for r in bob] == [1, 2, 2, 2]
    assert {r.refused_by for r in bob[2:]} == {"queries_per_day"}
    days = {d.user_id: d.queries for d in await pg.daily(DAY, DAY)}
    assert days == {"alice": 3, "bob": 2}
    assert await pg.open_streams("alice", now=NOW) == 3


async def test_an_unknown_user_in_a_batch_fails_alone(batching: Storage) -> None:
    pg = batching
    await pg.ensure_user("alice", plan="free")
    calls = [admit(pg, "alice", "a1"), admit(pg, "nobody", "n1"), admit(pg, "alice", "a2")]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[1], NotFound)
    assert results[0].admitted and results[2].admitted  # type: ignore[union-attr]
    assert [d.queries for d in await pg.daily(DAY, DAY)] == [2]


async def test_a_duplicate_pending_id_fails_alone(batching: Storage) -> None:
    pg = batching
    await pg.ensure_user("alice", plan="free")
    results = await asyncio.gather(
        admit(pg, "alice", "r1"),
        admit(pg, "alice", "r2"),
        admit(pg, "alice", "r1"),  # the same request id again: the pending row's key
        return_exceptions=True,
    )
    assert [isinstance(r, StorageError) for r in results] == [False, False, True]
    # Split and sent one by one: the two good admissions counted once each.
    assert [d.queries for d in await pg.daily(DAY, DAY)] == [2]


async def test_batched_settles_write_what_single_settles_would(batching: Storage) -> None:
    pg = batching
    for user in ("alice", "bob"):
        await pg.ensure_user(user, plan="free")
    names = [f"r{i}" for i in range(6)]
    await asyncio.gather(*(admit(pg, "alice" if i % 2 else "bob", n) for i, n in enumerate(names)))
    alerts = AlertRequest(
        checks=(AlertCheck("tokens_per_day", str(DAY), 250, (50, 100)),),
        month_start=MONTH,
        channels=("webhook", "email"),
    )
    batches_before, sent_before = group_sent(pg, "settle")
    results = await asyncio.gather(
        *(
            pg.settle(
                settle_event(f"m{i}", "alice" if i % 2 else "bob", tokens=100),
                pending_id=name,
                alerts=alerts if i % 2 else None,  # only alice's settles check alerts
            )
            for i, name in enumerate(names)
        ),
        # The same answer twice in one batch, and a settle whose pending row is gone.
        pg.settle(settle_event("m1", "alice"), pending_id="r1"),
        pg.settle(settle_event("m9", "alice"), pending_id="never-admitted"),
    )
    assert results == [True] * 6 + [False, False]
    batches, sent = group_sent(pg, "settle")
    assert sent - sent_before == 8 and batches - batches_before < 8
    users = {u: await pg.get_user(u) for u in ("alice", "bob")}
    assert {u: user.lifetime_tokens for u, user in users.items() if user} == {
        "alice": 300,
        "bob": 300,
    }
    days = {d.user_id: (d.queries, d.total_tokens, d.cost) for d in await pg.daily(DAY, DAY)}
    assert days == {"alice": (3, 300, Decimal("0.003")), "bob": (3, 300, Decimal("0.003"))}
    # Alice crossed 50% and 100% of 250 tokens; each is recorded once, with one
    # outbox row per channel. Bob's settles checked nothing.
    crossings = await pg.list_alerts()
    assert sorted((a.crossing.user_id, a.crossing.threshold) for a in crossings) == [
        ("alice", 50),
        ("alice", 100),
    ]
    assert all(len(a.deliveries) == 2 for a in crossings)


async def test_a_batch_charges_answers_under_ids_other_requests_took(batching: Storage) -> None:
    """Attack (review-once F1), batched: an upstream repeating answer ids. An
    element whose id the ledger, or an element before it in the batch, holds
    for another request is a new answer (under ``<id>#<request id>``); one of
    the same request - a replayed record, with its pending row or none - is
    a duplicate, as when the settles are made one by one."""
    pg = batching
    for user in ("alice", "bob"):
        await pg.ensure_user(user, plan="free")

    def answer(answer_id: str, user: str, request: str, tokens: int) -> UsageEvent:
        return dataclasses.replace(settle_event(answer_id, user, tokens), request_id=request)

    assert await pg.settle(answer("x", "alice", "r0", 1))
    names = ["r1", "r2", "r3", "r4"]
    await asyncio.gather(*(admit(pg, "bob" if i % 2 else "alice", n) for i, n in enumerate(names)))
    batches_before, sent_before = group_sent(pg, "settle")
    results = await asyncio.gather(
        pg.settle(answer("m", "alice", "r5", 1)),  # a fail-open answer (no pending row)
        pg.settle(answer("x", "alice", "r1", 10), pending_id="r1"),  # x: r0's, in the ledger
        pg.settle(answer("x", "bob", "r2", 20), pending_id="r2"),
        pg.settle(answer("y", "alice", "r3", 30), pending_id="r3"),
        pg.settle(answer("y", "bob", "r4", 40), pending_id="r4"),  # y: r3's, in the batch
        # Replays.
        pg.settle(answer("x", "alice", "r1", 10), pending_id="r1"),
        pg.settle(answer("y", "bob", "r4", 40)),
        pg.settle(answer("x", "alice", "r0", 1)),
        pg.settle(answer("m", "alice", "r5", 1)),
    )
    assert results == [True] * 5 + [False] * 4
    batches, sent = group_sent(pg, "settle")
    assert sent - sent_before == 9 and batches - batches_before < 9
    rows = sorted(
        [(e.answer_id, e.user_id, e.request_id, e.total_tokens) async for e in pg.events(DAY, DAY)]
    )
    assert rows == [
        ("m", "alice", "r5", 1),
        ("x", "alice", "r0", 1),
        ("x#r1", "alice", "r1", 10),
        ("x#r2", "bob", "r2", 20),
        ("y", "alice", "r3", 30),
        ("y#r4", "bob", "r4", 40),
    ]
    users = {u: await pg.get_user(u) for u in ("alice", "bob")}
    assert {u: user.lifetime_tokens for u, user in users.items() if user} == {
        "alice": 42,
        "bob": 60,
    }
    days = {d.user_id: (d.queries, d.total_tokens) for d in await pg.daily(DAY, DAY)}
    assert days == {"alice": (2, 42), "bob": (2, 60)}
    owner = await pg.answer_owner("x")
    assert owner is not None and owner.user_id == "alice"


async def test_a_settle_for_a_deleted_user_fails_alone(batching: Storage) -> None:
    pg = batching
    await pg.ensure_user("alice", plan="free")
    results = await asyncio.gather(
        pg.settle(settle_event("m1", "alice")),
        pg.settle(settle_event("m2", "ghost")),  # no such user: the ledger's foreign key
        pg.settle(settle_event("m3", "alice")),
        return_exceptions=True,
    )
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], NotFound)
    user = await pg.get_user("alice")
    assert user is not None and user.lifetime_tokens == 200


@pytest.mark.postgres
async def test_an_abandoned_admission_is_given_back(postgres_dsn: str) -> None:
    await _truncate(postgres_dsn)
    first = await PostgresStorage.open(postgres_dsn)
    await first.ensure_user("alice", plan="free")
    # Another transaction holds alice's row, so the batch waits in the database
    # while one of its callers goes away.
    blocker = await asyncpg.connect(postgres_dsn)
    hold = blocker.transaction()
    await hold.start()
    await blocker.execute("SELECT 1 FROM users WHERE id = 'alice' FOR UPDATE")
    # (Since 0024 an admission's rows take no key lock on the user's row: it
    # is held by the user's admission lock.)
    await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('alice', 24))")
    kept = admit(first, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
    gone = admit(first, "alice", "r2", queries_per_day=10, max_concurrent_streams=5)
    await turns()
    assert first.group_commit["admit"] == (1, 2)  # one batch of both is in the database
    gone.cancel()  # its caller went away (the server shutting down) mid-call
    await hold.rollback()
    await blocker.close()
    assert (await kept).admitted
    await first.close()  # answers what is in flight, then waits for the give-back
    store = await PostgresStorage.open(postgres_dsn)
    try:
        assert [d.queries for d in await store.daily(DAY, DAY)] == [1]
        assert await store.open_streams("alice", now=NOW) == 1
        # r2's pending row went too: a recovery charges only r1.
        later = NOW + timedelta(hours=1)
        assert await store.recover(before=later, now=later) == ["r1"]
    finally:
        await store.close()


async def test_a_call_cancelled_before_it_is_sent_is_not_sent() -> None:
    runner = Runner()
    batcher = group(runner)
    gone = asyncio.ensure_future(batcher(1))
    kept = asyncio.ensure_future(batcher(2))
    await asyncio.sleep(0)  # both queued, not yet sent
    gone.cancel()
    assert await kept == 4
    assert runner.batches == [[2]]


# --- PostgreSQL: a batch writes what its calls one by one would ----------------------

D1, D2 = DAY, DAY + timedelta(days=1)
USERS = ("u0", "u1", "u2", "u3")
UPSTREAMS = ("default", "support", "research")  # admissions' (pending rows')
ANSWERED_BY = ("research", "default", "backup")  # settles' (ledger rows')
TABLE_ROWS = {
    "users": "SELECT id, lifetime_prompt_tokens, lifetime_completion_tokens, "
    "lifetime_tokens, lifetime_cost FROM users ORDER BY id",
    "usage_daily": "SELECT * FROM usage_daily ORDER BY user_id, day, part",
    "usage_events": "SELECT answer_id, user_id, day, created_at, endpoint, conversation_id, "
    "request_id, prompt_tokens, completion_tokens, total_tokens, cost, currency, outcome, "
    "estimated, web_searches, upstream_latency_ms, overhead_ms, model, cached_tokens, "
    "reasoning_tokens, cache_write_tokens, upstream FROM usage_events ORDER BY answer_id",
    "stream_leases": "SELECT * FROM stream_leases ORDER BY id",
    "pending_answers": "SELECT * FROM pending_answers ORDER BY id",
    "notifications": "SELECT user_id, kind, period, threshold, limit_value, used, created_at "
    "FROM notifications ORDER BY 1, 2, 3, 4",
    "alert_outbox": "SELECT user_id, kind, period, threshold, channel, created_at "
    "FROM alert_outbox ORDER BY 1, 2, 3, 4, 5",
}


def admission_calls(rng: random.Random, count: int) -> list[dict[str, object]]:
    """Random admissions over four users (and one the database does not know),
    two days and small limits, so that every refusal happens."""
    calls = []
    for i in range(count):
        streams = rng.choice([None, 1, 2, 4])
        calls.append(
            {
                "user": rng.choice([*USERS, *USERS, "ghost"]),
                "day": rng.choice([D1, D1, D2]),
                "limits": AdmissionLimits(
                    queries_per_day=rng.choice([None, 2, 4, 8]),
                    tokens_per_day=rng.choice([None, None, 150, 10_000]),
                    tokens_per_month=rng.choice([None, None, 400, 10_000]),
                    max_concurrent_streams=streams,
                ),
                "name": f"r{i}",
                # The upstream it is sent to (issue 23), kept on its pending row.
                "upstream": UPSTREAMS[i % 3],
                "lease": streams is not None,
                "advanced_rag": rng.random() < 0.3,
                "now": NOW + timedelta(milliseconds=i),
                "web_search": rng.choice(
                    [
                        None,
                        None,
                        WebSearch(None),
                        WebSearch(1, "refuse"),
                        WebSearch(2, "refuse"),
                        WebSearch(1, "disable"),
                        WebSearch(2, "disable"),
                    ]
                ),
            }
        )
    return calls


async def run_admission(store: PostgresStorage, call: dict[str, object]) -> object:
    name = str(call["name"])
    try:
        return await store.admit(
            str(call["user"]),
            day=call["day"],  # type: ignore[arg-type]
            month_start=MONTH,
            limits=call["limits"],  # type: ignore[arg-type]
            now=call["now"],  # type: ignore[arg-type]
            lease=Lease(name, NOW + timedelta(minutes=5)) if call["lease"] else None,
            advanced_rag=bool(call["advanced_rag"]),
            web_search=call["web_search"],  # type: ignore[arg-type]
            pending=Pending(
                id=name,
                endpoint="chat-messages",
                prompt_tokens=7,
                total_tokens=7,
                cost=Decimal("0.0000070"),
                upstream=str(call["upstream"]),
            ),
        )
    except NotFound:
        return "not found"


def settle_calls(
    rng: random.Random, admitted: list[tuple[str, str, date]], count: int
) -> list[dict[str, object]]:
    """Random settles of the admitted answers: some twice, some under an answer
    id another one has, some naming a pending row that is gone or none at all,
    some with alert checks."""
    calls = []
    for i in range(count):
        user, pending_name, day = rng.choice(admitted)
        kind = rng.random()
        pending_id: str | None = pending_name
        if kind < 0.1:
            pending_id = None  # a fail-open admission: no pending row
        elif kind < 0.15:
            pending_id = "gone"
        thresholds = rng.choice([(), (50,), (50, 90, 100)])
        alerts = AlertRequest(
            checks=(
                AlertCheck("tokens_per_day", str(day), rng.choice([200, 500]), thresholds),
                AlertCheck("queries_per_day", str(day), 3, (100,)),
                AlertCheck("tokens_per_month", "2026-11", 1_000, (80,)),
            ),
            month_start=MONTH,
            channels=rng.choice([("webhook",), ("webhook", "email")]),
        )
        tokens = rng.choice([10, 60, 150])
        calls.append(
            {
                "event": UsageEvent(
                    answer_id=f"m{rng.randrange(count)}",  # answer ids repeat
                    user_id=user,
                    day=day,
                    created_at=NOW + timedelta(seconds=i),
                    endpoint="chat-messages",
                    prompt_tokens=tokens - 5,
                    completion_tokens=5,
                    total_tokens=tokens,
                    cost=Decimal(tokens) / 1_000_000,
                    web_searches=rng.choice([0, 0, 1]),
                    request_id=pending_name,
                    model=rng.choice([None, "gpt-4o-mini"]),
                    cached_tokens=rng.choice([0, 3]),
                    cache_write_tokens=rng.choice([0, 0, 2]),
                    upstream=ANSWERED_BY[i % 3],  # a fallback's, sometimes
                ),
                "lease": pending_name,
                "pending": pending_id,
                "alerts": alerts if rng.random() < 0.6 else None,
            }
        )
    return calls


async def run_settle(store: PostgresStorage, call: dict[str, object]) -> object:
    return await store.settle(
        call["event"],  # type: ignore[arg-type]
        lease_id=call["lease"],  # type: ignore[arg-type]
        pending_id=call["pending"],  # type: ignore[arg-type]
        alerts=call["alerts"],  # type: ignore[arg-type]
    )


async def scenario(
    dsn: str, seed: int, *, batched: bool, max_batch: int | None = None
) -> tuple[list[object], dict[str, object]]:
    """Earlier usage, one batch of admissions, a recovery of the first ones, one
    of settles (some superseding the recovered estimates) - made as batches, or
    one by one in the order a batch runs them (user, then position): by default
    through the single functions (max_batch 1), with ``max_batch`` above 1 as
    batches of one."""
    await _truncate(dsn)
    rng = random.Random(seed)
    store = await PostgresStorage.open(dsn, max_batch=max_batch or (64 if batched else 1))
    try:
        for user in USERS:
            await store.ensure_user(user, plan="free")
            await store.settle(settle_event(f"earlier-{user}", user, tokens=rng.choice([0, 120])))
        admissions = admission_calls(rng, 40)
        by_user = sorted(range(len(admissions)), key=lambda i: (admissions[i]["user"], i))
        if batched:
            admitted = await asyncio.gather(*(run_admission(store, c) for c in admissions))
            assert store.group_commit["admit"][1] - store.group_commit["admit"][0] == 39
        else:
            results: dict[int, object] = {}
            for i in by_user:
                results[i] = await run_admission(store, admissions[i])
            admitted = [results[i] for i in range(len(admissions))]
        names = [
            (str(c["user"]), str(c["name"]), c["day"])
            for c, a in zip(admissions, admitted, strict=True)
            if isinstance(a, Admission) and a.admitted
        ]
        # The answers admitted first are taken for lost and charged estimates
        # (with their web searches); their settles, later, supersede them.
        await store.recover(before=NOW + timedelta(milliseconds=15), now=NOW + timedelta(hours=1))
        settles = settle_calls(rng, names, 40)  # type: ignore[arg-type]
        # In two rounds: first the settles of answers admitted after the
        # recovery's bound (batches decided set by set), then the others (a batch
        # holding a supersede goes through the single function).
        done: dict[int, object] = {}
        for late in (True, False):
            chosen = [
                i
                for i, c in enumerate(settles)
                if (int(str(c["event"].request_id)[1:]) >= 15) is late  # type: ignore[attr-defined]
            ]
            if batched:
                answers = await asyncio.gather(*(run_settle(store, settles[i]) for i in chosen))
                done.update(zip(chosen, answers, strict=True))
            else:
                for i in sorted(chosen, key=lambda i: (settles[i]["event"].user_id, i)):  # type: ignore[attr-defined]
                    done[i] = await run_settle(store, settles[i])
        settled = [done[i] for i in range(len(settles))]
    finally:
        await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        tables = {
            name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in TABLE_ROWS.items()
        }
    finally:
        await conn.close()
    return [*admitted, *settled], tables


@pytest.mark.postgres
@pytest.mark.parametrize("seed", range(6))
async def test_a_batch_writes_what_its_calls_one_by_one_would(postgres_dsn: str, seed: int) -> None:
    one_by_one, tables_one_by_one = await scenario(postgres_dsn, seed, batched=False)
    batched, tables_batched = await scenario(postgres_dsn, seed, batched=True)
    # The scenario exercises what it should: refusals of each kind, settles refused.
    reasons = {r.refused_by for r in one_by_one if isinstance(r, Admission)}
    assert {"queries_per_day", "max_concurrent_streams", "web_searches_per_day", None} <= reasons
    assert False in one_by_one and "not found" in one_by_one
    assert any(isinstance(r, Admission) and r.web_search_reserved for r in one_by_one)
    # Recovered estimates superseded by their real records.
    events = tables_one_by_one["usage_events"]
    assert any(not row[0].startswith("gw-") and row[6] and int(row[6][1:]) < 15 for row in events)
    # The upstreams: a settled answer's is the settle's, an estimate left
    # recovered has its pending row's.
    assert {row[-1] for row in events if not row[0].startswith("gw-")} == set(ANSWERED_BY)
    for row in events:
        if row[0].startswith("gw-r"):
            assert row[-1] == UPSTREAMS[int(row[0][4:]) % 3], row
    assert batched == one_by_one
    for name in TABLE_ROWS.keys() - {"notifications", "alert_outbox"}:
        assert tables_batched[name] == tables_one_by_one[name], name
    # Alerts: a batch checks its users' thresholds once, against the counters
    # after the whole batch (gateway_settle_many): it announces every crossing
    # the calls one by one announce - possibly with a larger count, possibly
    # one more that only a later call without checks reached - and each one it
    # announces is real. (Such a later call can make a batch announce a
    # crossing in the first round that one by one a call of the second round
    # announced, with what it counted by then: a count smaller than that
    # call's, by an earlier answer's check.)
    found = {row[:4]: row for row in tables_batched["notifications"]}
    for user, kind, period, threshold, _value, used, at in tables_one_by_one["notifications"]:
        assert (user, kind, period, threshold) in found
        batch = found[user, kind, period, threshold]
        assert batch[5] >= used or batch[6] < at
    for _user, _kind, _period, threshold, value, used, _ in found.values():
        assert used * 100 >= value * threshold
    # One outbox row per channel for each crossing.
    outbox = {row[:4] for row in tables_batched["alert_outbox"]}
    assert outbox == found.keys()


@pytest.mark.postgres
@pytest.mark.parametrize("seed", range(3))
async def test_a_batch_of_one_does_what_the_single_call_does(postgres_dsn: str, seed: int) -> None:
    # A call that finds no batch in flight goes as a batch of one, which the
    # batch functions hand to the single ones: everything, alerts included, is
    # as with group commit off.
    single, tables_single = await scenario(postgres_dsn, seed, batched=False)
    alone, tables_alone = await scenario(postgres_dsn, seed, batched=False, max_batch=64)
    assert alone == single
    assert tables_alone == tables_single


@pytest.mark.postgres
@pytest.mark.parametrize("operation", ["admit", "settle"])
async def test_a_lone_call_waiting_on_a_row_lock_gives_up_its_batch_and_goes_alone(
    pg: PostgresStorage, caplog: pytest.LogCaptureFixture, operation: str
) -> None:
    """An admission or settle that found no batch in flight is a batch of one:
    it waits for a row lock no longer than a batch does, then is sent again on
    its own (its batch slot free for others) and goes through once the lock is
    gone."""
    await pg.ensure_user("hot", plan="free")
    refused = asyncio.Event()

    class Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(f"{operation} batch of 1 refused (LockNotAvailable"):
                refused.set()

    handler = Refusals()
    caplog.set_level(logging.INFO, logger="gateway.storage")
    logging.getLogger("gateway.storage").addHandler(handler)
    blocker = await asyncpg.connect(pg_dsn(pg))
    hold = blocker.transaction()
    await hold.start()
    await blocker.execute("SELECT 1 FROM users WHERE id = 'hot' FOR UPDATE")
    # (Since 0024 an admission's rows take no key lock on the user's row: it
    # is held by the user's admission lock.)
    await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('hot', 24))")
    try:
        call: asyncio.Future[Any] = (
            admit(pg, "hot", "h1")
            if operation == "admit"
            else asyncio.ensure_future(pg.settle(settle_event("m1", user="hot")))
        )
        await asyncio.wait_for(refused.wait(), timeout=10)
        assert not call.done()
    finally:
        await hold.rollback()
        await blocker.close()
        logging.getLogger("gateway.storage").removeHandler(handler)
    result = await call
    assert result.admitted if operation == "admit" else result is True
    assert pg.group_commit[operation] == (1, 1)


@pytest.mark.postgres
async def test_a_batch_of_one_admission_keeps_its_lock_timeout_to_itself(
    pg: PostgresStorage,
) -> None:
    """gateway_admit sets the batches' lock timeout for a batch of one only while
    it runs (as a SET clause would): the transaction it ran in has its own
    again after it, whether it admitted, refused or did not know the user."""
    await pg.ensure_user("alice", plan="free")
    conn = await asyncpg.connect(pg_dsn(pg))
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '7s'")
            for user, maxes in (("alice", "{5}"), ("alice", "{0}"), ("bob", "{}")):
                ones, keys = ("{}", "{}") if maxes == "{}" else ("{1}", "{NULL}")
                row = await conn.fetchrow(
                    _ADMIT_BATCHED,
                    *_AdmitCall(
                        user, DAY, DAY.replace(day=1), ones, ones, maxes, ones, keys, None, None,
                        NOW, False, None, None, None, None, None, None, None, False, False,
                        Decimal(0), None, "default",
                    ),
                )  # fmt: skip
                assert row is not None and row["known"] is (user == "alice")
                assert await conn.fetchval("SHOW lock_timeout") == "7s"
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_a_batch_of_one_settle_keeps_its_lock_timeout_to_itself(
    pg: PostgresStorage,
) -> None:
    """gateway_settle sets the batches' lock timeout for a batch of one only while
    it runs (as the wrapper's SET clause did): the transaction it ran in has its
    own again after it, whether it recorded the answer, found it recorded
    already or found its pending row gone with no estimate to supersede, and
    after an unknown user's error is rolled back to a savepoint."""
    await pg.ensure_user("alice", plan="free")

    def call(answer_id: str, user: str = "alice", pending: str | None = None) -> _SettleCall:
        return _SettleCall(
            answer_id, user, DAY, NOW, "chat-messages", 75, 25, 100, Decimal("0.001"), "USD",
            "complete", False, 0, None, None, 1.0, 1.0, None, pending, None, 0, 0, MONTH,
            '{"tokens_per_day"}', '{"day"}', "{1000}", "{5}", "{}", 0, "default", "{NULL}",
        )  # fmt: skip

    conn = await asyncpg.connect(pg_dsn(pg))
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '7s'")
            for settle, recorded in (
                (call("m1"), True),
                (call("m1"), False),
                (call("m2", pending="gone"), False),
            ):
                assert await conn.fetchval(_SETTLE_BATCHED, *settle) is recorded
                assert await conn.fetchval("SHOW lock_timeout") == "7s"
            with pytest.raises(asyncpg.ForeignKeyViolationError):
                async with conn.transaction():
                    await conn.fetchval(_SETTLE_BATCHED, *call("m3", user="bob"))
            assert await conn.fetchval("SHOW lock_timeout") == "7s"
            assert await conn.fetchval("SELECT count(*) FROM notifications") == 1
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_admissions_keep_their_connection_out_of_the_pool(
    pg: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24: a connection taken from asyncpg's pool goes back through a
    shielded task of its own - two more turns of the event loop an admission
    waited for, behind every other stream's callbacks. An admission batch keeps
    its connection for the next one instead."""
    await pg.ensure_user("alice", plan="free")
    assert (await admit(pg, "alice", "r0")).admitted  # takes one
    given_back: list[object] = []
    release = asyncpg.pool.Pool.release

    async def counted(pool: asyncpg.pool.Pool, conn: Any, **kw: Any) -> None:
        given_back.append(conn)
        await release(pool, conn, **kw)

    monkeypatch.setattr(asyncpg.pool.Pool, "release", counted)
    for i in range(1, 4):
        assert (await admit(pg, "alice", f"r{i}")).admitted
    together = await asyncio.gather(*(admit(pg, "alice", f"s{i}") for i in range(3)))
    assert all(a.admitted for a in together)
    assert given_back == []
    await pg.close()  # gives them back: the pool closes (else it would wait for them)
    assert given_back and pg._pool._closed  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [1, 2, 3])
async def test_a_small_pool_is_not_held_by_admissions(postgres_dsn: str, size: int) -> None:
    """Admissions keep no connection of a pool under 4: with a pool of one or
    two, the kept ones would leave none for a settle or a read (it would wait
    for ever)."""
    await _truncate(postgres_dsn)
    store = await PostgresStorage.open(postgres_dsn, min_size=0, max_size=size)
    try:
        await store.ensure_user("alice", plan="free")
        together = await asyncio.gather(*(admit(store, "alice", f"r{i}") for i in range(4)))
        assert all(a.admitted for a in together) and store._admit_connections == []
        settled = store.settle(settle_event("m0"), pending_id="r0")
        assert await asyncio.wait_for(settled, 10)
    finally:
        await store.close()


async def test_a_kept_admission_connection_that_broke_goes_back_to_the_pool(
    pg: PostgresStorage, postgres_dsn: str
) -> None:
    """The database closed the kept connection while it waited (a restart, an
    administrator): it goes back to the pool, which drops it, and the next
    admission takes a working one - as the pool's own check of a connection it
    hands out would have done."""
    await pg.ensure_user("alice", plan="free")
    assert (await admit(pg, "alice", "r0")).admitted
    (kept,) = pg._admit_connections
    closed = asyncio.get_running_loop().create_future()
    kept.add_termination_listener(lambda _: closed.set_result(None))
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", kept.get_server_pid())
    finally:
        await admin.close()
    await closed
    assert (await admit(pg, "alice", "r1")).admitted
    (working,) = pg._admit_connections
    assert working is not kept and not working.is_closed()
    (day,) = await pg.daily(DAY, DAY)
    assert day.queries == 2


async def test_a_row_held_elsewhere_holds_up_only_its_users_admissions(pg: PostgresStorage) -> None:
    users = ["hot", *(f"u{i}" for i in range(8))]
    for user in users:
        await pg.ensure_user(user, plan="free")
    blocker = await asyncpg.connect(pg_dsn(pg))
    hold = blocker.transaction()
    await hold.start()
    await blocker.execute("SELECT 1 FROM users WHERE id = 'hot' FOR UPDATE")
    # (Since 0024 an admission's rows take no key lock on the user's row: it
    # is held by the user's admission lock.)
    await blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended('hot', 24))")
    try:
        hot = [admit(pg, "hot", "h1"), admit(pg, "hot", "h2")]
        await turns()
        others = [admit(pg, user, f"o{user}") for user in users[1:]]
        # The batches holding "hot" give up waiting (lock_timeout) and go on
        # call by call: everyone else is admitted while the row is still held.
        assert all(r.admitted for r in await asyncio.gather(*others))
        assert not any(h.done() for h in hot)
    finally:
        await hold.rollback()
        await blocker.close()
    assert all(r.admitted for r in await asyncio.gather(*hot))


@pytest.mark.postgres
async def test_admission_never_waits_for_an_expired_lease(pg: PostgresStorage) -> None:
    """A settle (or a recovery) deleting an expired lease holds it while it waits
    for the user's row, which admission holds: admission must not wait for the
    lease in turn (that was a deadlock). Batched and alone."""
    await pg.ensure_user("alice", plan="free")
    conn = await asyncpg.connect(pg_dsn(pg))
    await conn.execute(
        "INSERT INTO stream_leases VALUES ('old', 'alice', $1)", NOW - timedelta(seconds=1)
    )
    deleting = conn.transaction()
    await deleting.start()
    await conn.execute("DELETE FROM stream_leases WHERE id = 'old'")
    try:
        alone = await admit(pg, "alice", "r1", max_concurrent_streams=1)
        batched = await asyncio.gather(
            admit(pg, "alice", "r2", max_concurrent_streams=3),
            admit(pg, "alice", "r3", max_concurrent_streams=3),
        )
        # The expired lease counts for none of them.
        assert [alone.counters.open_streams] + [r.counters.open_streams for r in batched] == [
            1,
            2,
            3,
        ]
    finally:
        await deleting.rollback()
        await conn.close()


@pytest.mark.postgres
async def test_a_month_crossing_is_measured_to_the_batchs_latest_day(pg: PostgresStorage) -> None:
    await pg.ensure_user("alice", plan="free")
    alerts = AlertRequest(
        checks=(AlertCheck("tokens_per_month", "2026-11", 1000, (80,)),),
        month_start=MONTH,
        channels=("webhook",),
    )
    later = dataclasses.replace(settle_event("m-new", tokens=900), day=DAY + timedelta(days=1))
    earlier = settle_event("m-old", tokens=10)  # admitted the day before, settled last
    assert await asyncio.gather(
        pg.settle(later, alerts=alerts), pg.settle(earlier, alerts=alerts)
    ) == [True, True]
    assert pg.group_commit["settle"] == (1, 2)
    (alert,) = await pg.list_alerts()
    assert (alert.crossing.limit, alert.crossing.threshold, alert.crossing.used) == (
        "tokens_per_month",
        80,
        910,
    )


# --- SQLite: one queue of writes, a batch one transaction of savepoints --------------


def lite_path(store: SQLiteStorage) -> str:
    return store._path


def made(call: Awaitable[T]) -> asyncio.Future[T]:
    """The call made now (as ``admit`` does), not when gather gets to it."""
    return asyncio.ensure_future(call)


def in_order(store: SQLiteStorage, *calls: Awaitable[Any]) -> asyncio.Future[list[Any]]:
    """The calls made in one turn, as one batch (else the first would be made at
    once, on the event loop, and the others together after it)."""
    store._calls.together()
    return asyncio.gather(*map(made, calls), return_exceptions=True)


async def test_sqlite_writes_of_every_kind_go_together_in_arrival_order(
    lite: SQLiteStorage,
) -> None:
    await lite.ensure_user("alice", plan="free")
    before = lite.group_commit["calls"]
    # Made in one turn: one batch, run in this order. Only the order makes r2
    # admitted (r1 given back just before) and r3 refused (r2 holds the query);
    # the settle of r2 finds its pending row, the second one finds it gone, and
    # the recovery finds nothing left to recover.
    later = NOW + timedelta(hours=1)
    results = await in_order(
        lite,
        admit(lite, "alice", "r1", queries_per_day=1),
        made(lite.refund("alice", day=DAY, pending_id="r1")),
        admit(lite, "alice", "r2", queries_per_day=1),
        admit(lite, "alice", "r3", queries_per_day=1),
        made(lite.settle(settle_event("m2"), pending_id="r2")),
        made(lite.settle(settle_event("m2"), pending_id="r2")),  # the same answer again
        made(lite.recover(before=later, now=later)),
    )
    assert lite.group_commit["calls"] == (before[0] + 1, before[1] + 7)
    first, refunded, second, third, settled, again, recovered = results
    assert first.admitted and refunded is True and second.admitted  # type: ignore[union-attr]
    assert third.refused_by == "queries_per_day"  # type: ignore[union-attr]
    assert (settled, again, recovered) == (True, False, [])
    (day,) = await lite.daily(DAY, DAY)
    assert (day.queries, day.total_tokens) == (1, 100)


async def test_sqlite_a_failing_write_is_rolled_back_to_its_savepoint(lite: SQLiteStorage) -> None:
    await lite.ensure_user("alice", plan="free")
    # r1 again: its admission counts a query, then its pending row's insert
    # fails; the query it counted goes with it, the others' stay.
    results = await in_order(
        lite,
        admit(lite, "alice", "r1"),
        admit(lite, "alice", "r1"),
        made(lite.settle(settle_event("m1"), pending_id="r1")),
        made(lite.settle(settle_event("m2", "ghost"))),
        admit(lite, "alice", "r3"),
    )
    assert lite.group_commit["calls"] == (3, 7)  # migrate, ensure_user, this one batch
    assert isinstance(results[1], StorageError) and isinstance(results[3], NotFound)
    assert results[0].admitted and results[2] is True and results[4].admitted  # type: ignore[union-attr]
    (day,) = await lite.daily(DAY, DAY)
    assert (day.queries, day.total_tokens) == (2, 100)


async def test_sqlite_a_batch_takes_savepoints_only_when_a_write_fails(
    lite: SQLiteStorage,
) -> None:
    """A batch is made without savepoints; one whose write raised is rolled back
    and made again with them, with the same outcomes as one call after another."""
    await lite.ensure_user("alice", plan="free")
    statements: list[str] = []
    lite._conn.set_trace_callback(statements.append)
    results = await in_order(
        lite,
        admit(lite, "alice", "r1"),
        admit(lite, "alice", "r2"),
        made(lite.settle(settle_event("m1"), pending_id="r1")),
    )
    assert all(r.admitted for r in (results[0], results[1])) and results[2] is True  # type: ignore[union-attr]
    assert not [sql for sql in statements if "SAVEPOINT" in sql]
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
    statements.clear()
    results = await in_order(
        lite,
        admit(lite, "alice", "r3"),
        made(lite.settle(settle_event("m2"), pending_id="r2")),
        admit(lite, "alice", "r3"),  # its pending row's insert fails: the batch again
        admit(lite, "alice", "r4"),
    )
    assert results[0].admitted and results[1] is True and results[3].admitted  # type: ignore[union-attr]
    assert isinstance(results[2], StorageError)
    assert statements.count("BEGIN IMMEDIATE") == 2 and statements.count("ROLLBACK") == 1
    assert statements.count("SAVEPOINT call") == 4 and statements.count("ROLLBACK TO call") == 1
    (day,) = await lite.daily(DAY, DAY)
    assert (day.queries, day.total_tokens) == (4, 200)


async def test_sqlite_a_transaction_sqlite_ends_itself_splits_the_batch(
    lite: SQLiteStorage,
) -> None:
    """When SQLite rolls the whole transaction back itself (a full disk, an I/O
    error), the batch's earlier writes are gone with it: every call is made
    again on its own, and each gets its own outcome."""
    await lite.ensure_user("alice", plan="free")
    lost = {"done": False}

    def fails_once(conn: sqlite3.Connection) -> None:
        if not lost["done"]:
            lost["done"] = True
            conn.execute("ROLLBACK")  # what SQLite does on SQLITE_FULL, SQLITE_IOERR...
            raise sqlite3.OperationalError("database or disk is full")

    results = await in_order(
        lite, admit(lite, "alice", "r1"), made(lite._tx(fails_once)), admit(lite, "alice", "r2")
    )
    # One batch (its three calls were then made again one by one, in order).
    assert lite.group_commit["calls"] == (3, 5)
    assert results[0].admitted and results[2].admitted  # type: ignore[union-attr]
    assert results[1] is None  # alone, the second time, it went through
    (day,) = await lite.daily(DAY, DAY)
    assert day.queries == 2


async def test_sqlite_a_batch_refused_at_commit_writes_nothing_then_goes_call_by_call(
    lite: SQLiteStorage,
) -> None:
    await lite.ensure_user("alice", plan="free")

    def orphan(conn: sqlite3.Connection) -> None:
        # A row whose foreign key is checked only at COMMIT: the batch's
        # commit is refused, for this call.
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute(
            "INSERT INTO stream_leases (id, user_id, expires_at) VALUES ('x', 'ghost', ?)",
            (NOW.isoformat(),),
        )

    results = await in_order(
        lite, admit(lite, "alice", "r1"), made(lite._tx(orphan)), admit(lite, "alice", "r2")
    )
    assert lite.group_commit["calls"] == (3, 5)
    assert results[0].admitted and results[2].admitted  # type: ignore[union-attr]
    assert isinstance(results[1], NotFound)  # its own commit refused, alone
    (day,) = await lite.daily(DAY, DAY)
    assert day.queries == 2
    with sqlite3.connect(lite_path(lite)) as conn:
        assert conn.execute("SELECT count(*) FROM stream_leases").fetchone() == (0,)


def on_threads(store: SQLiteStorage, *, writing: bool = False) -> set[int]:
    """The threads the store's connection runs statements on from now on
    (``writing``: those that write rows)."""
    threads: set[int] = set()

    def seen(sql: str) -> None:
        if not writing or sql.lstrip().startswith(("INSERT", "UPDATE", "DELETE")):
            threads.add(threading.get_ident())

    store._conn.set_trace_callback(seen)
    return threads


async def test_sqlite_a_lone_admission_and_settle_are_made_on_the_event_loop(
    lite: SQLiteStorage,
) -> None:
    await lite.ensure_user("alice", plan="free")
    threads = on_threads(lite)
    assert (await admit(lite, "alice", "r1", queries_per_day=5, max_concurrent_streams=2)).admitted
    assert await lite.settle(settle_event("m1"), pending_id="r1", lease_id="r1")
    assert await lite.refund("alice", day=DAY, pending_id="r1") is False  # settled already
    assert threads == {threading.get_ident()}  # no hop to the connection's thread
    threads.clear()
    await lite.daily(DAY, DAY)  # a read of any size: on the thread
    assert threading.get_ident() not in threads and threads
    (day,) = await lite.daily(DAY, DAY)
    assert (day.queries, day.total_tokens) == (1, 100)


async def test_sqlite_a_few_hot_calls_made_together_are_one_batch_on_the_event_loop(
    lite: SQLiteStorage,
) -> None:
    """Issue 24: a few admissions and settles made in one turn go as one
    transaction on the event loop (on the thread, each statement waited for the
    GIL while the loop was busy); more than NOW_MOST, or one that is not a
    hot-path call, go to the thread as before."""
    await lite.ensure_user("alice", plan="free")
    await admit(lite, "alice", "r0", queries_per_day=10)
    await turns()  # (r0 was made at once: the calls below, in a turn of their own)
    threads = on_threads(lite)
    before = lite.group_commit["calls"]
    results = await in_order(
        lite,
        admit(lite, "alice", "r1", queries_per_day=10),
        made(lite.settle(settle_event("m0"), pending_id="r0")),
        admit(lite, "alice", "r2", queries_per_day=10),
    )
    assert results[0].admitted and results[1] is True and results[2].admitted  # type: ignore[union-attr]
    assert lite.group_commit["calls"] == (before[0] + 1, before[1] + 3)  # one batch
    assert threads == {threading.get_ident()}
    threads.clear()
    results = await in_order(
        lite, *(admit(lite, "alice", f"s{i}", queries_per_day=10) for i in range(NOW_MOST + 1))
    )
    assert all(r.admitted for r in results)  # type: ignore[union-attr]
    assert threading.get_ident() not in threads and threads  # too many: on the thread
    threads.clear()
    await in_order(lite, admit(lite, "alice", "t1"), made(lite.daily(DAY, DAY)))
    assert threading.get_ident() not in threads and threads  # with a read: on the thread
    (day,) = await lite.daily(DAY, DAY)
    assert (day.queries, day.total_tokens) == (NOW_MOST + 5, 100)


async def test_sqlite_a_batch_finding_the_lock_taken_waits_on_the_thread(
    lite: SQLiteStorage,
) -> None:
    """As a lone call: another connection holds the write lock, so the batch
    made on the event loop is rolled back, nothing of it written, and made on
    the thread once the lock is free - each call counted once."""
    await lite.ensure_user("alice", plan="free")
    blocker = sqlite3.connect(lite_path(lite), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    threads = on_threads(lite, writing=True)
    waiting = in_order(lite, *(admit(lite, "alice", f"r{i}", queries_per_day=2) for i in range(3)))
    await turns()
    assert not waiting.done()
    blocker.execute("ROLLBACK")
    blocker.close()
    assert [r.admitted for r in await waiting] == [True, True, False]  # type: ignore[union-attr]
    assert threading.get_ident() not in threads and threads  # written on the thread
    (day,) = await lite.daily(DAY, DAY)
    assert day.queries == 2


async def test_sqlite_a_lone_write_finding_the_lock_taken_waits_on_the_thread(
    lite: SQLiteStorage,
) -> None:
    """Another connection (a second worker, the CLI) holds the write lock: the
    call does not wait for it on the event loop, nor fail; it waits on the
    connection's thread, then the next lone call is made on the loop again."""
    await lite.ensure_user("alice", plan="free")
    blocker = sqlite3.connect(lite_path(lite), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    threads = on_threads(lite, writing=True)
    waiting = admit(lite, "alice", "r1", queries_per_day=1)
    await turns()
    assert not waiting.done()  # the event loop runs meanwhile: this line runs
    blocker.execute("ROLLBACK")
    blocker.close()
    assert (await waiting).admitted
    assert threading.get_ident() not in threads and threads  # written on the thread
    threads = on_threads(lite)
    refused = await admit(lite, "alice", "r2", queries_per_day=1)
    assert refused.refused_by == "queries_per_day"  # r1 counted exactly once
    assert threads == {threading.get_ident()}


async def test_sqlite_checkpoints_the_wal_off_the_event_loop(
    lite: SQLiteStorage, tmp_path: Path
) -> None:
    """No commit checkpoints (it would wait for fsyncs on the event loop);
    the store checkpoints every CHECKPOINT_EVERY writes on a thread of its
    own: what was written before is then in the database file itself."""
    await lite.ensure_user("alice", plan="free")
    for i in range(CHECKPOINT_EVERY):
        assert (await admit(lite, "alice", f"r{i}")).admitted
    await asyncio.gather(*lite._background)  # the checkpoint under way
    copy = tmp_path / "copy.db"
    shutil.copyfile(lite_path(lite), copy)  # the file alone, without its WAL
    with sqlite3.connect(copy) as conn:
        (queries,) = conn.execute("SELECT queries FROM usage_daily").fetchone()
    assert CHECKPOINT_EVERY - 3 <= queries <= CHECKPOINT_EVERY


def file_size(path: str) -> int:
    return Path(path).stat().st_size


async def test_sqlite_the_wal_stays_bounded_under_sustained_writes(lite: SQLiteStorage) -> None:
    """Review of e1df906: the WAL is reset only by a write that begins after a
    checkpoint copied all of it; a PASSIVE checkpoint on its own thread while
    the event loop keeps writing never copies all of it, so under steady load
    the WAL grows without end (about 60 KB per admission and settle here: 90 MB
    after 1,500 answers). SQLite's own checkpoint (wal_autocheckpoint 1000,
    bdfcf75) kept it near 4 MB."""
    await lite.ensure_user("alice", plan="free")
    wal = lite_path(lite) + "-wal"
    peak = 0
    for i in range(1500):
        assert (await admit(lite, "alice", f"r{i}")).admitted
        assert await lite.settle(settle_event(f"m{i}"), pending_id=f"r{i}", lease_id=None)
        peak = max(peak, file_size(wal))
    await asyncio.gather(*lite._background)
    assert peak < 16 * 1024 * 1024, f"the WAL reached {peak // 1024} KiB"


async def test_sqlite_a_slow_checkpoint_does_not_space_the_next_ones_out(
    lite: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sustained-writes test above failed once on a loaded machine (the WAL
    reached 16938 KiB): each checkpoint spaced the next by the calls made since
    the last one began, over the pages the WAL held - but a restart had removed
    the frames of the calls made beside that one, so the slower the checkpoints,
    the fewer pages a call seemed to write, and the further apart they came.
    Here every checkpoint is held until half its interval's calls went on
    beside it (a disk slow to fsync, no slower than the lag lets pass)."""
    let_go = threading.Semaphore(0)
    real = sqlite_module._checkpoint_wal

    def slow_checkpoint(conn: sqlite3.Connection) -> tuple[bool, int]:
        assert let_go.acquire(timeout=30)
        return real(conn)

    monkeypatch.setattr(sqlite_module, "_checkpoint_wal", slow_checkpoint)
    await lite.ensure_user("alice", plan="free")
    wal = lite_path(lite) + "-wal"
    peak = 0
    released: object = None
    for i in range(1000):
        assert (await admit(lite, "alice", f"r{i}")).admitted
        assert await lite.settle(settle_event(f"m{i}"), pending_id=f"r{i}", lease_id=None)
        peak = max(peak, file_size(wal))
        checkpoint = lite._checkpointing
        if (
            checkpoint is not None
            and checkpoint is not released
            and lite._writes >= lite._checkpoint_every // 2
        ):
            let_go.release()
            released = checkpoint
    if lite._checkpointing is not None and lite._checkpointing is not released:
        let_go.release()
    await asyncio.gather(*lite._background)
    assert peak < 16 * 1024 * 1024, f"the WAL reached {peak // 1024} KiB"


async def test_sqlite_writes_wait_for_a_checkpoint_that_falls_behind(
    lite: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk slow to fsync (here: a checkpoint held until the test lets it go)
    holds the writes back once CHECKPOINT_LAG checkpoints' worth of calls went on
    beside it, as a commit waits for SQLite's own automatic checkpoint; before,
    they went on and the WAL grew for as long as the checkpoint took (24 MB in a
    loaded test run). Nothing is lost: the held writes are made after it."""
    held, entered = threading.Event(), threading.Event()
    real = sqlite_module._checkpoint_wal

    def slow_checkpoint(conn: sqlite3.Connection) -> tuple[bool, int]:
        entered.set()
        held.wait(30)
        return real(conn)

    monkeypatch.setattr(sqlite_module, "_checkpoint_wal", slow_checkpoint)
    await lite.ensure_user("alice", plan="free")
    wal = lite_path(lite) + "-wal"
    done = 0

    async def write(count: int) -> None:
        nonlocal done
        for _ in range(count):
            assert (await admit(lite, "alice", f"r{done}")).admitted
            assert await lite.settle(settle_event(f"m{done}"), pending_id=f"r{done}")
            done += 1

    writer = asyncio.create_task(write(CHECKPOINT_EVERY * (CHECKPOINT_LAG + 2)))
    await asyncio.to_thread(entered.wait, 30)  # the first checkpoint has begun
    finished, _ = await asyncio.wait({writer}, timeout=0.5)  # what goes on beside it
    assert not finished, "the writes did not wait for the checkpoint"
    # Two write calls an answer: those made beside the checkpoint stop at the lag.
    assert 2 * done <= CHECKPOINT_EVERY + CHECKPOINT_LAG * CHECKPOINT_EVERY + 2
    assert file_size(wal) < 16 * 1024 * 1024
    held.set()
    await writer
    await asyncio.gather(*lite._background)
    (day,) = await lite.daily(DAY, DAY)
    assert day.queries == CHECKPOINT_EVERY * (CHECKPOINT_LAG + 2)


async def test_sqlite_checkpoints_by_the_pages_batches_write(lite: SQLiteStorage) -> None:
    """Calls made together share the pages they change: after the first
    checkpoint the next ones come after as many calls as wrote about
    CHECKPOINT_PAGES pages, more than CHECKPOINT_EVERY under batches (at most
    CHECKPOINT_MOST), and the WAL stays as bounded as with calls made alone."""
    await lite.ensure_user("alice", plan="free")
    wal = lite_path(lite) + "-wal"
    peak = 0
    for turn in range(40):
        names = [f"r{turn}-{i}" for i in range(32)]
        assert all(
            a.admitted for a in await asyncio.gather(*(admit(lite, "alice", n) for n in names))
        )
        settles = [lite.settle(settle_event(f"m-{n}"), pending_id=n) for n in names]
        assert all(await asyncio.gather(*settles))
        peak = max(peak, file_size(wal))
    await asyncio.gather(*lite._background)
    assert CHECKPOINT_EVERY < lite._checkpoint_every <= CHECKPOINT_MOST
    assert peak < 16 * 1024 * 1024, f"the WAL reached {peak // 1024} KiB"
    (day,) = await lite.daily(DAY, DAY)
    assert (day.queries, day.total_tokens) == (1280, 128_000)


async def test_sqlite_close_answers_a_batch_in_flight_and_gives_back_an_abandoned_admission(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "gateway.db")
    store = await SQLiteStorage.open(path)
    await store.migrate()
    await store.ensure_user("alice", plan="free")
    # Another connection holds the write lock, so the batch waits on the
    # writer thread (BEGIN IMMEDIATE) while one of its callers goes away.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    kept = admit(store, "alice", "r1", queries_per_day=10, max_concurrent_streams=5)
    gone = admit(store, "alice", "r2", queries_per_day=10, max_concurrent_streams=5)
    await turns()
    queued = admit(store, "alice", "r3", queries_per_day=10, max_concurrent_streams=5)
    await turns()
    assert store.group_commit["calls"] == (3, 4)  # migrate, ensure_user, the batch; r3 waits
    gone.cancel()  # its caller went away (the server shutting down) mid-call
    closing = asyncio.ensure_future(store.close())
    await turns()
    blocker.execute("ROLLBACK")
    blocker.close()
    await closing  # answers what is in flight and queued, then the give-back
    assert (await kept).admitted and (await queued).admitted
    store = await SQLiteStorage.open(path)
    try:
        assert [d.queries for d in await store.daily(DAY, DAY)] == [2]
        assert await store.open_streams("alice", now=NOW) == 2
        later = NOW + timedelta(hours=1)
        assert sorted(await store.recover(before=later, now=later)) == ["r1", "r3"]
    finally:
        await store.close()


_CHILD = """
import asyncio, os, signal, sys
from datetime import date, datetime, timedelta, UTC
from gateway.storage import AdmissionLimits, Pending
from gateway.storage.sqlite import SQLiteStorage

NOW = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
DAY, MONTH = date(2026, 11, 21), date(2026, 11, 1)


def admit(store, name, **limits):
    return store.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW, limits=AdmissionLimits(**limits),
        pending=Pending(id=name, endpoint="chat-messages", prompt_tokens=10, total_tokens=10),
    )


async def crash(path):
    store = await SQLiteStorage.open(path)
    print((await admit(store, "alone")).admitted, flush=True)  # committed, answered

    def kill(conn):
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies before COMMIT

    await asyncio.sleep(0)  # (made at once: its turn ends here)
    calls = [asyncio.ensure_future(admit(store, f"b{i}")) for i in range(5)]
    calls.append(asyncio.ensure_future(store._tx(kill)))
    store._calls.together()  # one batch (the first not made at once, alone)
    await asyncio.gather(*calls)
    print("never", flush=True)


async def race(path, me):
    store = await SQLiteStorage.open(path)
    print("ready", flush=True)
    sys.stdin.readline()
    admitted = 0
    for wave in range(4):
        results = await asyncio.gather(
            *(admit(store, f"{me}-{wave}-{i}", queries_per_day=50) for i in range(20))
        )
        admitted += sum(r.admitted for r in results)
    batches, calls = store.group_commit["calls"]
    await store.close()
    print(admitted, batches, calls, flush=True)


if sys.argv[1] == "crash":
    asyncio.run(crash(sys.argv[2]))
else:
    asyncio.run(race(sys.argv[2], sys.argv[3]))
"""


async def test_sqlite_a_crash_in_the_middle_of_a_batch_writes_none_of_it(
    lite: SQLiteStorage,
) -> None:
    await lite.ensure_user("alice", plan="free")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, "crash", lite_path(lite), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert out.decode().split() == ["True"]  # the batch's callers were never answered
    # Of the batch, whose five admissions ran before the kill, nothing is written.
    assert [d.queries for d in await lite.daily(DAY, DAY)] == [1]
    later = NOW + timedelta(hours=1)
    assert await lite.recover(before=later, now=later) == ["alone"]


async def test_sqlite_two_processes_batching_on_one_file_admit_exactly(
    lite: SQLiteStorage,
) -> None:
    """Several workers on one SQLite file: each batch holds the write lock
    from its first read to its commit, so across processes the limit is exact."""
    await lite.ensure_user("alice", plan="free")
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            "race",
            lite_path(lite),
            name,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for name in ("p1", "p2")
    ]
    for child in children:
        assert child.stdout is not None
        assert await child.stdout.readline() == b"ready\n"
    outs = await asyncio.gather(*(child.communicate(b"go\n") for child in children))
    counts = [tuple(int(x) for x in out.split()) for out, _ in outs]
    assert sum(admitted for admitted, _, _ in counts) == 50
    assert all(batches < calls == 80 for _, batches, calls in counts)
    assert [d.queries for d in await lite.daily(DAY, DAY)] == [50]


def wal_sequence(store: SQLiteStorage) -> bytes:
    """The WAL header's checkpoint sequence number and salts: they change when
    a write starts the WAL again from its beginning."""
    with open(lite_path(store) + "-wal", "rb") as wal:
        return wal.read(24)[12:24]


async def test_sqlite_the_write_that_starts_the_wal_again_is_not_made_on_the_event_loop(
    lite: SQLiteStorage,
) -> None:
    """Review of 4e844b1 (and of the lone call made on the loop): the first
    commit after the WAL was copied whole writes a new WAL header and fsyncs it
    (SQLite's wal.c syncs a restarted WAL's header under synchronous = NORMAL:
    `strace -f` shows an fdatasync of the -wal file in that commit). On the
    event loop that fsync stops every stream for as long as the disk takes -
    what `wal_autocheckpoint = 0` and the checkpoint thread are there to avoid.
    That one write goes to the connection's thread."""
    await lite.ensure_user("alice", plan="free")
    for i in range(CHECKPOINT_EVERY):
        assert (await admit(lite, "alice", f"r{i}")).admitted
    await asyncio.gather(*lite._background)  # copied it all: the next write starts it again
    before = wal_sequence(lite)
    threads = on_threads(lite, writing=True)
    assert (await admit(lite, "alice", "next")).admitted
    assert wal_sequence(lite) != before  # this write started the WAL again
    assert threading.get_ident() not in threads and threads
    threads.clear()
    assert (await admit(lite, "alice", "after")).admitted  # the next ones: on the loop again
    assert threads == {threading.get_ident()}


async def test_sqlite_a_call_given_up_while_on_the_thread_keeps_the_loop_off_the_connection(
    lite: SQLiteStorage,
) -> None:
    """Review of 4e844b1 (and b70897b): a call is made on the event loop only
    while the connection's thread is idle (``_on_thread`` 0) - but the count
    went down as soon as the task waiting for the thread was cancelled (the
    event loop going away cancels the batch's task), while the thread was
    still in the batch's transaction. A call made then on the loop (a follow
    settling what it read as it unwinds) shared that transaction: its BEGIN
    failed, and its ROLLBACK rolled the thread's batch back, whose later
    statements then committed one by one - part of a batch written. A call
    made meanwhile waits for the thread instead. (A task cancelled once now
    waits for the thread's answer before it ends, so that what the thread made
    is given back: tests/storage/test_given_up_batches.py; cancelled again, it
    waits no longer.)"""
    await lite.ensure_user("alice", plan="free")
    entered, go = threading.Event(), threading.Event()

    def batch(conn: sqlite3.Connection) -> None:  # a batch under way on the thread
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE users SET plan = 'first' WHERE id = 'alice'")
        entered.set()
        assert go.wait(30)
        conn.execute("UPDATE users SET plan = 'second' WHERE id = 'alice'")
        conn.execute("COMMIT")

    given_up = asyncio.ensure_future(lite._call(batch))
    await asyncio.to_thread(entered.wait, 30)
    given_up.cancel()
    await turns()
    assert not given_up.done()  # it waits for the thread's answer before it ends...
    given_up.cancel()  # ...unless cancelled again
    with pytest.raises(asyncio.CancelledError):
        await given_up
    admitted = admit(lite, "alice", "r1", queries_per_day=5)
    await turns()
    go.set()
    assert (await admitted).admitted
    user = await lite.get_user("alice")
    assert user is not None and user.plan == "second"  # the thread's batch, whole
    (day,) = await lite.daily(DAY, DAY)
    assert day.queries == 1
