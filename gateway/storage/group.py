"""Group commit: concurrent calls of one storage operation sent as one batch.

While a batch is on its way to the database, the calls that arrive meanwhile
queue; when a batch returns, everything queued goes out as the next one - one
round trip and one transaction for all of it. There is no timer: a call that
finds nothing in flight is sent on the next turn of the event loop, so under
light load every call goes alone (a batch of one, as fast as a single call),
and under heavy load the batches grow with the load. With ``max_batch`` 1 the
batch runner is not used at all (nor ``run_now``, below): every call goes
through ``run_one``. At most ``in_flight`` batches of one operation
are out at once, so a few pool connections are kept busy rather than one per
waiting request.

A batch is one transaction: when the database refuses it for something one of
its calls carries (`SplitBatch`: a value refused, a row lock it could not get
in time), the calls are sent again each on its own, so that only the call at
fault fails and each caller sees what it would have seen alone. Calls with the
same ``key`` (the same user) are resent one after another in their order, other
keys' at the same time, so that a call that waits holds up only its own key's.
Any other error (the database unreachable, a timeout) is every caller's.

A runner that can make a call at once, on the event loop (``run_now``: SQLite's
short writes on a local file), makes a call that finds nothing queued or in
flight in its caller's turn (issue 24: no turn of the event loop waited for,
each a wait behind every other stream's callbacks; no future, no task, no
thread hop); the calls made after it in the same turn go together on the next,
as usual, and so does a batch of one that finds nothing in flight then. It
raises `NotNow` to send the call as usual instead (it cannot, or not without
waiting). ``run_now_many`` does the same for a batch of several that finds
nothing in flight (SQLite's few calls made in one turn: on the connection's
thread each of its statements waited for the GIL, up to the switch interval
each, while the event loop was busy); it raises `NotNow`, having written
nothing, for a batch it does not make.

A caller that is cancelled while its call is queued is not sent. One cancelled
while its call is in flight does not stop the call - it may be in a
transaction already - and its result is handed to ``abandoned`` instead, which
can undo it (an admission nobody will use); so is a result that arrived in the
same turn of the event loop as the cancellation.

The task that sends a batch can be cancelled too, while the batch is in flight
(the event loop going away: asyncio.run's teardown cancels every task). Its
callers are cancelled, and so is the runner's wait for the answer; but the
batch may have committed, and nobody would learn it - an admission would stay
reserved, and a recovery would later charge its pending row for an answer
never forwarded. So the calls given up so (by the batch's task or, with
``max_batch`` 1, by its caller) are handed to ``lost``, which finds out and
undoes what was made (PostgreSQL gives an admission back by its pending row,
which only a made one has); the task awaits it before it ends, as asyncio.run's
teardown waits for the tasks it cancelled and for no other. A runner whose work
goes on without its waiter (SQLite's thread) waits for the answer itself and
hands it to ``abandoned``. A drain that is cancelled (a close given up) leaves
the batches in flight alone: it no longer cancels them. Nothing of this costs
the calls that are not given up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from functools import partial
from typing import Generic, TypeVar

log = logging.getLogger("gateway.storage")

Item = TypeVar("Item")
Result = TypeVar("Result")


class SplitBatch(Exception):
    """Raised by a batch runner whose batch failed for what one of its calls
    carries: the calls are then sent one by one."""


class NotNow(Exception):
    """Raised by ``run_now`` for a call it does not make on the event loop: the
    call is sent as usual, as a batch of one. It must have written nothing."""


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        name: str,
        run_many: Callable[[Sequence[Item]], Awaitable[Sequence[Result | Exception]]],
        run_one: Callable[[Item], Awaitable[Result]],
        *,
        max_batch: int,
        in_flight: int = 2,
        abandoned: Callable[[Item, Result], None] | None = None,
        lost: Callable[[Sequence[Item]], Awaitable[None]] | None = None,
        key: Callable[[Item], Hashable] | None = None,
        run_now: Callable[[Item], Result] | None = None,
        run_now_many: Callable[[Sequence[Item]], Sequence[Result | Exception]] | None = None,
    ) -> None:
        if max_batch < 1 or in_flight < 1:
            raise ValueError("max_batch and in_flight must be at least 1")
        self.name = name
        self._run_many = run_many
        self._run_one = run_one
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._abandoned = abandoned
        self._lost = lost
        self._key = key
        self._run_now = run_now
        self._run_now_many = run_now_many
        self._queue: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._running = 0
        self._scheduled = False
        self._flush_task: asyncio.Task[None] | None = None
        self._unstarted: set[int] = set()  # id() of the batches whose task has not started
        self._tasks: set[asyncio.Task[None]] = set()
        # What went out, for tests and the benchmark: batches sent, calls in them.
        self.batches = 0
        self.calls = 0

    async def __call__(self, item: Item) -> Result:
        if self._max_batch == 1:
            try:
                return await self._run_one(item)
            except asyncio.CancelledError:  # given up in flight: its answer is lost
                await self._lose([item])
                raise
        if (
            self._run_now is not None
            and not self._running
            and not self._queue
            and not self._scheduled
        ):
            # Nothing queued or in flight: made now, in the caller's turn, when
            # ``run_now`` can - no turn of the event loop waited for (behind
            # every other stream's callbacks), no future. The calls made after
            # it in this turn still go together, on the next.
            try:
                result = self._run_now(item)
            except NotNow:
                pass
            else:
                self.batches += 1
                self.calls += 1
                self.together()
                return result
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((item, future))
        if not self._scheduled and self._running < self._in_flight:
            # On the next turn: the calls made in this turn (say, every request
            # one read of the socket brought) go together.
            self._schedule(loop)
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled in the turn its result arrived: the result is abandoned
            # here, since the batch has already handed it over.
            if (
                self._abandoned is not None
                and future.done()
                and not future.cancelled()
                and future.exception() is None
            ):
                self._abandoned(item, future.result())
            raise

    def together(self) -> None:
        """Have the calls made from here on in this turn of the event loop go
        together, on the next (as those after a call made now do): for a
        caller that makes several calls at once and means them as one batch."""
        if not self._scheduled:
            self._schedule(asyncio.get_running_loop())

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have the queue flushed on the next turn of the event loop. Without a
        runner that makes calls on the event loop, the flush is the first
        batch's own task, which sends it as it starts (issue 24): a callback
        that made a task to send it cost its calls a turn more, each a wait
        behind every other stream's callbacks."""
        self._scheduled = True
        if self._run_now is None and self._run_now_many is None:
            task = loop.create_task(self._flush_and_send(), name=f"group-commit-{self.name}")
            self._flush_task = task
            self._tasks.add(task)
            task.add_done_callback(self._flush_done)
        else:
            loop.call_soon(self._flush)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        """A flush task is done. One cancelled before its first step (by what
        cancels tasks it does not own: asyncio.run's teardown) never flushed:
        the queue is its, and nothing else would send it, nor any call made
        later (a flush is scheduled). Its
        callers are cancelled, as those of a batch whose task is cancelled."""
        self._tasks.discard(task)
        if task is self._flush_task:
            self._flush_task = None
            if self._scheduled:  # (its first step clears it)
                self._scheduled = False
                while self._queue:
                    self._queue.popleft()[1].cancel()

    def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        """The queue's next batch (its callers not cancelled), at most max_batch."""
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        while self._queue and len(batch) < self._max_batch:
            call = self._queue.popleft()
            if not call[1].done():  # a caller cancelled before it was sent: no call
                batch.append(call)
        return batch

    async def _flush_and_send(self) -> None:
        self._scheduled = False
        if self._running >= self._in_flight:  # (never more than in_flight at once)
            return
        batch = self._next_batch()
        if not batch:
            return
        self._running += 1
        if self._queue:
            self._flush()  # more than a batch: the next ones in tasks of their own
        await self._send(batch)

    def _flush(self) -> None:
        self._scheduled = False
        # One batch at most is made on the event loop per flush: with a
        # max_batch no larger than ``run_now_many`` makes, the whole queue
        # would be, batch after batch, in this one callback.
        now = True
        while self._queue and self._running < self._in_flight:
            batch = self._next_batch()
            if not batch:
                return
            if (
                now
                and self._running == 0
                and (self._now(*batch[0]) if len(batch) == 1 else self._now_many(batch))
            ):
                now = False
                continue  # made on the event loop, answered
            self._running += 1
            self._unstarted.add(id(batch))
            task = asyncio.create_task(self._send_own(batch), name=f"group-commit-{self.name}")
            self._tasks.add(task)
            task.add_done_callback(partial(self._send_done, batch))

    async def _send_own(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        """A batch's own task, made by a flush."""
        self._unstarted.discard(id(batch))
        await self._send(batch)

    def _send_done(
        self, batch: list[tuple[Item, asyncio.Future[Result]]], task: asyncio.Task[None]
    ) -> None:
        """A batch's own task is done. One cancelled before its first step (as a
        flush task can be) never sent its batch nor gave its slot back: its
        callers are cancelled and the slot is free for the queue."""
        self._tasks.discard(task)
        if id(batch) in self._unstarted:
            self._unstarted.discard(id(batch))
            self._running -= 1
            for _, future in batch:
                future.cancel()
            if self._queue and not self._scheduled:
                self._flush()

    def _now(self, item: Item, future: asyncio.Future[Result]) -> bool:
        """Make a lone call on the event loop; False when there is no ``run_now``
        or it declines the call."""
        if self._run_now is None:
            return False
        outcome: Result | Exception
        try:
            outcome = self._run_now(item)
        except NotNow:
            return False
        except Exception as exc:
            outcome = exc
        self.batches += 1
        self.calls += 1
        self._deliver(item, future, outcome)
        return True

    def _now_many(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> bool:
        """Make a batch on the event loop; False when there is no
        ``run_now_many`` or it declines the batch (it wrote nothing then)."""
        if self._run_now_many is None:
            return False
        try:
            outcomes = self._run_now_many([item for item, _ in batch])
        except NotNow:
            return False
        self.batches += 1
        self.calls += len(batch)
        for (item, future), outcome in zip(batch, outcomes, strict=True):
            self._deliver(item, future, outcome)
        return True

    async def _send(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        """Send a batch (counted in ``_running`` by the caller)."""
        items = [item for item, _ in batch]
        self.batches += 1
        self.calls += len(items)
        split: SplitBatch | None = None
        try:
            outcomes: Sequence[Result | BaseException] = await self._run_many(items)
        except SplitBatch as exc:
            split = exc
        except asyncio.CancelledError:  # the event loop is going away
            for _, future in batch:
                future.cancel()
            await self._lose(items)  # (it may have committed)
            raise
        except Exception as exc:  # every caller's error
            outcomes = [exc] * len(items)
        finally:
            # The slot is free again before any call is resent on its own: a
            # call that then waits for a lock holds up no other batch.
            self._running -= 1
            if self._queue and not self._scheduled:
                self._flush()
        if split is not None:
            log.info(
                "%s batch of %d refused (%s); sending its calls each on its own",
                self.name,
                len(items),
                split,
            )
            try:
                await self._one_by_one(batch)
            except asyncio.CancelledError:  # the event loop is going away
                for _, future in batch:
                    future.cancel()  # (no-op for those answered)
                raise
            return
        for (item, future), outcome in zip(batch, outcomes, strict=True):
            self._deliver(item, future, outcome)

    async def _lose(self, items: Sequence[Item]) -> None:
        """Calls given up in flight, their answers lost: to ``lost``, which
        finds out whether each was made and undoes it (awaited by the task
        being cancelled; cancelled again, it gives up)."""
        if self._lost is None:
            return
        try:
            await self._lost(items)
        except Exception:  # (the cancellation is what the task ends with)
            log.exception("%s: calls given up in flight not undone", self.name)

    def _deliver(
        self, item: Item, future: asyncio.Future[Result], outcome: Result | BaseException
    ) -> None:
        if future.done():  # the caller was cancelled
            if self._abandoned is not None and not isinstance(outcome, BaseException):
                self._abandoned(item, outcome)
        elif isinstance(outcome, asyncio.CancelledError):
            future.cancel()
        elif isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    async def _one_by_one(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        """Each call on its own, answered as soon as it is done: a key's calls in
        order, the keys side by side."""
        by_key: dict[Hashable, list[tuple[Item, asyncio.Future[Result]]]] = {}
        for at, call in enumerate(batch):
            by_key.setdefault(self._key(call[0]) if self._key else at, []).append(call)

        async def run(calls: list[tuple[Item, asyncio.Future[Result]]]) -> None:
            for item, future in calls:
                outcome: Result | BaseException
                try:
                    outcome = await self._run_one(item)
                except asyncio.CancelledError:  # the event loop is going away
                    await self._lose([item])  # (it may have committed)
                    raise
                except Exception as exc:
                    outcome = exc
                self._deliver(item, future, outcome)

        await asyncio.gather(*(run(calls) for calls in by_key.values()))

    async def drain(self) -> None:
        """Wait until every queued call has been sent and answered. A drain
        cancelled (a close given up) does not cancel the batches in flight, as
        a gather of them did: each would have lost its answer."""
        while self._tasks or self._queue:
            if self._tasks:
                await asyncio.wait(self._tasks)
            else:
                await asyncio.sleep(0)
