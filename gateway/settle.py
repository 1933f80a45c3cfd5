"""Recording settled answers so that none is ever lost or counted twice.

The ledger write is idempotent on the answer id, so it can always be retried.
When the database fails, the event is retried in the background with back-off;
if it still fails (or the process is shutting down), it is appended to a local
spool file. The spool is replayed at start-up and, while the gateway runs, as
soon as the database answers again (`run_replays`). Every background task is
referenced from `_tasks` and finished or spooled on `close`.

Several worker processes share one spool file. A replay first renames the spool
to a name of its own (atomic: one worker gets it), and replays a claimed file
only under an exclusive lock on it, so a file a crashed replay left behind is
picked up again by exactly one worker, never by two at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import orjson

from gateway.config import MAX_TOKENS_PER_ANSWER_LIMIT
from gateway.errors import NotFound, StorageError
from gateway.logs import log_answer
from gateway.metrics import Metrics
from gateway.pricing import PriceTable
from gateway.storage import (
    ALERT_LIMITS,
    Accounting,
    AlertCheck,
    AlertRequest,
    Health,
    UsageEvent,
    parse_alert_spec,
)
from gateway.tasks import Tasks
from gateway.usage_bounds import DEFAULT_MAX_TOKENS_PER_ANSWER, bound_event

log = logging.getLogger("gateway.settle")

# How long a cancelled retry may take to unwind at shutdown.
_CLOSE_TIMEOUT = 10.0

RETRY_DELAYS: tuple[float, ...] = (0.05, 0.5, 2.0, 5.0, 15.0)
# Opening the spool's name gives a file a replay holds only in the instant between
# its rename and its lock; a few tries always find the new spool.
_APPEND_TRIES = 5


@dataclasses.dataclass(frozen=True, slots=True)
class Terms:
    """What an answer is settled on besides its usage, from the configuration the
    answer began under: the bound on its tokens (``accounting.max_tokens_per_answer``)
    and the price table whose model names label the metrics."""

    max_tokens_per_answer: int = DEFAULT_MAX_TOKENS_PER_ANSWER
    prices: PriceTable = dataclasses.field(default_factory=lambda: PriceTable({}))


class RecordRefused(StorageError):
    """The database refuses a usage record for what it holds (its user is gone):
    writing it again would fail again."""


@dataclasses.dataclass(frozen=True, slots=True)
class Write:
    """One ledger write: the answer, what it releases and claims, and what the
    settle needs besides the ledger row - the plan the metrics break usage down
    by and the alert thresholds it checks. All of it is spooled, so a replayed
    answer is checked for the thresholds it crossed, as it would have been when
    it was settled (docs/admin.md)."""

    event: UsageEvent
    lease_id: str | None = None
    pending_id: str | None = None  # the answer's pending row (docs/quotas.md)
    plan: str = ""
    alerts: AlertRequest | None = None
    # Spooled: the token bound (a replay after a restart with a lower one cut
    # a record already settled under the higher, review-once F6). The price
    # table, which only names the metrics' labels, is the one in force then.
    terms: Terms | None = None
    # A replayed record's bound (None: the terms in force).
    max_tokens: int | None = None


_INT_FIELDS = frozenset(
    {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cache_write_tokens",
        "web_searches",
    }
)
_INT64 = range(-(2**63), 2**63)


def _plain(value: object) -> object:
    """A JSON-safe form of one field that cannot raise: numbers beyond what JSON
    readers take become strings (hexadecimal for integers, which has no digit
    limit), so the spool keeps the exact value the event held."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if value in _INT64 else hex(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, date):  # datetime too
        return value.isoformat()
    return _safe_repr(value)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # a repr can raise (an int past the digit limit, a broken object)
        return f"<unrepresentable {type(value).__name__}>"


def event_to_json(write: Write) -> bytes:
    """One spool line for ``write``. Never raises, whatever the event holds."""
    event = write.event
    record = {f.name: _plain(getattr(event, f.name)) for f in dataclasses.fields(event)}
    if write.lease_id is not None:
        record["_lease_id"] = write.lease_id
    if write.pending_id is not None:
        record["_pending_id"] = write.pending_id
    if write.plan:
        record["_plan"] = write.plan
    if write.alerts is not None:
        record["_alerts"] = _alerts_to_json(write.alerts)
    bound = write.terms.max_tokens_per_answer if write.terms is not None else write.max_tokens
    if bound is not None:
        record["_max_tokens"] = bound
    try:
        return orjson.dumps(record)
    except orjson.JSONEncodeError:
        # orjson refuses strings with lone surrogates; the standard library escapes
        # them (and reads them back the same way).
        return json.dumps(record, ensure_ascii=True).encode()


def event_from_json(line: bytes) -> Write:
    try:
        raw: dict[str, Any] = orjson.loads(line)
    except orjson.JSONDecodeError:  # a line the standard library wrote (see event_to_json)
        raw = json.loads(line)
    lease_id = raw.pop("_lease_id", None)
    pending_id = raw.pop("_pending_id", None)
    plan = raw.pop("_plan", "")
    alerts = _alerts_read(raw.pop("_alerts", None))
    bound = raw.pop("_max_tokens", None)
    raw["day"] = date.fromisoformat(raw["day"])
    raw["created_at"] = datetime.fromisoformat(raw["created_at"])
    raw["cost"] = Decimal(raw["cost"])
    for name in _INT_FIELDS & raw.keys():
        if isinstance(raw[name], str):
            raw[name] = int(raw[name], 16)
    for name in ("upstream_latency_ms", "overhead_ms"):
        if isinstance(raw.get(name), str):
            raw[name] = float(raw[name])
    plan = plan if isinstance(plan, str) else ""
    # A bound the configuration could set (a hand-edited line, from a LOST
    # record's log, may hold anything: review-last L2).
    if not (
        isinstance(bound, int)
        and not isinstance(bound, bool)
        and 0 < bound <= MAX_TOKENS_PER_ANSWER_LIMIT
    ):
        bound = None
    return Write(UsageEvent(**raw), lease_id, pending_id, plan, alerts, max_tokens=bound)


def _alerts_to_json(alerts: AlertRequest) -> dict[str, Any]:
    return {
        "month_start": alerts.month_start.isoformat(),
        "channels": list(alerts.channels),
        "checks": [
            [c.limit, c.period, str(c.value), list(c.thresholds), c.spec] for c in alerts.checks
        ],
    }


def _alerts_read(raw: object) -> AlertRequest | None:
    """The alert request of a spool line; one it cannot read is dropped (and
    logged) rather than the usage record with it."""
    if raw is None:
        return None
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"expected an object, got {type(raw).__name__}")
        checks = []
        for limit, period, value, thresholds, *rest in raw["checks"]:
            # A line of an older release has no spec (and an int value).
            spec = str(rest[0]) if rest and rest[0] is not None else None
            if spec is None and limit not in ALERT_LIMITS:
                raise ValueError(f"unknown limit {limit!r}")
            # parse_alert_spec refuses a spec it cannot read; money is a Decimal.
            money = spec is not None and parse_alert_spec(spec)[0] == "cost"
            amount = Decimal(str(value))
            checks.append(
                AlertCheck(
                    str(limit),
                    str(period),
                    amount if money else int(amount),
                    tuple(int(t) for t in thresholds),
                    spec,
                )
            )
        return AlertRequest(
            tuple(checks),
            date.fromisoformat(raw["month_start"]),
            tuple(str(c) for c in raw["channels"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.error("spooled alert check unreadable, replayed without it: %r", exc)
        return None


def _locked_contents(fd: int) -> bytes | None:
    """The contents of the open file ``fd`` once this process holds its exclusive
    lock; None when another process holds it (it is replaying the file) or the
    file was removed before the lock was taken (it has been replayed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    if os.fstat(fd).st_nlink == 0:
        return None
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class SettleStorage(Accounting, Health, Protocol):
    """Settling records answers and gives reservations back (accounting); the
    spool's replay asks whether the database answers again (`Health`)."""


class Settler:
    def __init__(
        self,
        storage: SettleStorage,
        *,
        metrics: Metrics,
        spool: Path | None,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        max_tokens_per_answer: int = DEFAULT_MAX_TOKENS_PER_ANSWER,
        prices: PriceTable | None = None,
        terms: Callable[[], Terms] | None = None,
        on_cost: Callable[[str], None] | None = None,
        answer_log: bool = False,
    ) -> None:
        self._storage = storage
        # server.answer_log: a `gateway.answers` line per recorded answer (gateway/logs.py)
        self.answer_log = answer_log
        # The terms in force, for what is settled without its own (a replay):
        # ``terms`` (the running gateway's, which a reload changes), or these.
        fixed = Terms(max_tokens_per_answer, prices if prices is not None else PriceTable({}))
        self._terms = terms if terms is not None else lambda: fixed
        self._metrics = metrics
        # Told each recorded cost's currency: the gateway keeps one per database
        # (gateway/currency.py, Money.cost_recorded).
        self.on_cost = on_cost
        self._spool = spool
        metrics.spool.path = spool  # gateway_spool_bytes (gateway/metrics.py)
        self._delays = tuple(retry_delays)
        self._tasks = Tasks("settle retries")
        # The write each retry of a record carries: spooled if shutdown cuts it.
        self._writes: dict[asyncio.Task[None], Write] = {}
        self._closing = False
        # Whether this process has spooled records not replayed yet (or found a
        # spool it could not replay): what `run_replays` waits on.
        self.backlog = False
        self._wake = asyncio.Event()  # a write succeeded while there was a backlog
        self._replaying = asyncio.Lock()  # one replay at a time in this process
        # Records replayed so far, and a signal on each replay: lets tests and
        # tools wait for a replay without sleeping.
        self.replayed = 0
        self._replay_done = asyncio.Event()

    async def record(
        self,
        event: UsageEvent,
        *,
        lease_id: str | None = None,
        pending_id: str | None = None,
        plan: str = "",
        alerts: AlertRequest | None = None,
        terms: Terms | None = None,
    ) -> None:
        """Write one answer now; on a storage error, retry in the background.

        The answer's stream lease is released with the write; a retried or spooled
        write leaves it to expire. ``pending_id`` names the answer's pending row,
        claimed by the write: if a recovery charged the answer first, the write
        changes nothing (counted once, as the estimate). ``terms``: those the
        answer began under (default: the terms in force)."""
        # Bounded once, here: the log shows what is written, and the write's own
        # bounding (kept for spool lines of earlier versions) finds it in range.
        terms = terms if terms is not None else self._terms()
        event = self._bounded(event, terms)
        write = Write(event, lease_id, pending_id, plan, alerts, terms)
        if self.answer_log:
            # Where the answer is settled: once per answer, whether the write below
            # succeeds now, is retried or is spooled.
            log_answer(event)
        try:
            await self._write(write, bounded=True)
        except asyncio.CancelledError:
            # Given up in flight (a shutdown past its grace cancels the answers
            # still being recorded): the spool has it, and a write that landed
            # as well is counted once (the ledger is keyed by the answer's id).
            # Without it the pending row's estimate would be charged instead.
            self._to_spool(write)
            raise
        except RecordRefused as exc:
            self._reject(write, exc)
        except StorageError as exc:
            log.warning("ledger write for %s failed, will retry: %s", event.answer_id, exc.message)
            self._metrics.inc("gateway_storage_errors_total", operation="settle")
            if self._closing:
                self._to_spool(write)
                return
            task = self._tasks.start(self._retry(write), name=f"settle-retry-{event.answer_id}")
            self._writes[task] = write
            task.add_done_callback(self._writes.pop)

    async def refund(
        self, user_id: str, *, day: date, lease_id: str | None, pending_id: str | None = None
    ) -> None:
        """Give back a reserved query (and its stream slot); retried in the
        background if the database does not answer. With ``pending_id`` a retry
        cannot give it back twice (the pending row goes with the first)."""

        async def give_back() -> None:
            await self._storage.refund(user_id, day=day, lease_id=lease_id, pending_id=pending_id)

        await self._give_back("refund", f"refund for {user_id} on {day}", give_back)

    async def release_upload(self, user_id: str, *, key: str, size: int) -> None:
        """Give back an upload the upstream did not take; retried in the
        background if the database does not answer. By its key, so a retry (or a
        reservation whose outcome was lost) is given back once at most."""

        async def give_back() -> None:
            await self._storage.release_upload(user_id, key=key)

        await self._give_back(
            "release_upload", f"give-back of an upload of {size} bytes of {user_id}", give_back
        )

    async def _give_back(
        self, operation: str, what: str, give_back: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            await give_back()
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation=operation)
            log.warning("%s failed, will retry: %s", what, exc.message)
            if self._closing:
                log.error("%s lost at shutdown", what)
                return
            self._tasks.start(self._retry_give_back(what, give_back), name=f"{operation}-retry")

    async def _retry_give_back(self, what: str, give_back: Callable[[], Awaitable[None]]) -> None:
        for delay in self._delays:
            await asyncio.sleep(delay)
            try:
                await give_back()
                return
            except StorageError as exc:
                log.warning("%s failed again: %s", what, exc.message)
        # A give-back is worth one query or one upload: not worth a spool of its
        # own. Logged.
        log.error("%s given up after retries", what)

    def _bounded(self, event: UsageEvent, terms: Terms) -> UsageEvent:
        bounded, changed = bound_event(event, max_tokens=terms.max_tokens_per_answer)
        if changed:
            self._metrics.inc("gateway_usage_clamped_total")
            log.warning(
                "answer %s for user %s reported out-of-range %s; recorded clamped: %s",
                event.answer_id,
                event.user_id,
                ", ".join(changed),
                ", ".join(f"{name}={_safe_repr(getattr(event, name))[:64]}" for name in changed),
            )
        return bounded

    async def _write(self, write: Write, *, bounded: bool = False) -> None:
        """Bound (unless `record` just did, on the same terms: ``bounded``), then
        write. A failure other than the database's (a value the driver refuses
        after all) is raised as StorageError too, so the event takes the
        retry-then-spool way of any failed write: never lost, and never a
        traceback on the request that produced it."""
        terms = write.terms if write.terms is not None else self._terms()
        if write.terms is None and write.max_tokens is not None:
            terms = dataclasses.replace(terms, max_tokens_per_answer=write.max_tokens)
        event = write.event if bounded else self._bounded(write.event, terms)
        began = time.perf_counter()
        try:
            settled = await self._storage.settle(
                event, lease_id=write.lease_id, pending_id=write.pending_id, alerts=write.alerts
            )
        except StorageError:
            raise
        except NotFound as exc:
            # Its user is gone (deleted while the record waited): no retry
            # writes it, and a replay must not stop at it (review-once F5).
            raise RecordRefused(f"the database refuses the record: {exc.message}") from exc
        except Exception as exc:
            log.exception("ledger write for %s failed unexpectedly", event.answer_id)
            raise StorageError(f"unexpected {type(exc).__name__}") from exc
        finally:
            self._metrics.observe("gateway_settle_seconds", time.perf_counter() - began)
        if self.backlog:
            self._wake.set()  # the database answers: time to replay the spool
        if settled:
            if event.cost and self.on_cost is not None:
                self.on_cost(event.currency)
            metrics = self._metrics
            metrics.inc("gateway_answers_settled_total", outcome=event.outcome)
            plan = write.plan
            # The model can be the one a client asked for: any text. A label value
            # is a time series kept for the process's life (and, in multiprocess
            # mode, on disk), so only the price table's names are labels.
            model = terms.prices.label(event.model)
            metrics.inc(
                "gateway_tokens_total", event.prompt_tokens, plan=plan, model=model, kind="prompt"
            )
            metrics.inc(
                "gateway_tokens_total",
                event.completion_tokens,
                plan=plan,
                model=model,
                kind="completion",
            )
            # A metric is a float by nature; the ledger keeps the exact Decimal.
            metrics.inc(
                "gateway_cost_total",
                float(event.cost),
                plan=plan,
                model=model,
                currency=event.currency,
            )
            log.info(
                "recorded answer %s for user %s: %d tokens, cost %s %s%s",
                event.answer_id,
                event.user_id,
                event.total_tokens,
                event.cost,
                event.currency,
                " (estimated)" if event.estimated else "",
            )
            if event.estimated:
                self._metrics.inc("gateway_usage_estimated_total")
        else:
            self._metrics.inc("gateway_answers_duplicate_total")

    async def _retry(self, write: Write) -> None:
        for delay in self._delays:
            await asyncio.sleep(delay)
            self._metrics.inc("gateway_settle_retries_total")
            try:
                await self._write(write)
                return
            except RecordRefused as exc:
                self._reject(write, exc)
                return
            except StorageError as exc:
                log.warning(
                    "ledger write for %s failed again: %s", write.event.answer_id, exc.message
                )
        self._to_spool(write)

    def _reject(self, write: Write, exc: RecordRefused) -> None:
        """A record the database refuses for good: kept whole, in the log and
        beside the spool (``<spool>.rejected``), for the operator to look at;
        never retried, never in the way of the records after it."""
        self._metrics.inc("gateway_settle_rejected_total")
        line = event_to_json(write)
        if self._spool is not None:
            try:
                self._append(line, self._spool.with_name(self._spool.name + ".rejected"))
            except OSError as error:
                log.error("rejected usage record not kept (%s)", error)
        log.error(
            "usage record %s REJECTED (%s): %s", write.event.answer_id, exc.message, line.decode()
        )

    def _to_spool(self, write: Write) -> None:
        line = event_to_json(write)
        if self._spool is None:
            self._metrics.inc("gateway_settle_lost_total")
            log.error("LOST usage record (no spool file configured): %s", line.decode())
            return
        try:
            self._append(line)
        except OSError as exc:
            # The last resort: the whole record in the log, from where it can be
            # replayed; counted as lost, not as spooled (review-last L4).
            self._metrics.inc("gateway_settle_lost_total")
            log.error(
                "LOST usage record (spool file %s not writable: %s): %s",
                self._spool,
                exc,
                line.decode(),
            )
            return
        self._metrics.inc("gateway_settle_spooled_total")
        self.backlog = True
        log.error(
            "usage record %s spooled to %s for replay when the database answers again",
            write.event.answer_id,
            self._spool,
        )

    async def replay(self) -> int:
        """Settle what was spooled (by this run, an earlier one, or another worker);
        returns how many records were written. Never raises: a file that cannot be
        read or removed is logged and left for the next replay."""
        if self._spool is None:
            return 0
        async with self._replaying:
            self.backlog = False
            try:
                # Files a crashed replay left behind are picked up again (replay
                # is idempotent), then the spool itself.
                orphans = sorted(self._spool.parent.glob(f"{self._spool.name}.*.replaying"))
                claimed = self._claim()
            except OSError as exc:
                log.error("spool file %s could not be claimed for replay: %s", self._spool, exc)
                self.backlog = True
                return 0
            count = 0
            for path in [*orphans, *([claimed] if claimed is not None else [])]:
                count += await self._replay_file(path)
            self.replayed += count
            self._replay_done.set()
            self._replay_done = asyncio.Event()
            return count

    async def wait_replayed(self, count: int, timeout: float = 10.0) -> None:
        """Wait until replays have written ``count`` records in all."""
        async with asyncio.timeout(timeout):
            while self.replayed < count:
                await self._replay_done.wait()

    async def _replay_file(self, path: Path) -> int:
        """Replay one claimed file under an exclusive lock; a file another worker
        holds (or has already replayed and removed) is left to it."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0  # replayed and removed by another worker meanwhile
        except OSError as exc:
            log.error("spool file %s could not be opened for replay: %s", path, exc)
            self.backlog = True
            return 0
        try:
            data = _locked_contents(fd)
            if data is None:
                return 0  # another worker replays it, or already has
            count = await self._replay_lines(data)
            try:
                # While the lock is held: no other worker can have replayed it too.
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("replayed spool file %s could not be removed: %s", path, exc)
                self.backlog = True  # replayed again later: that changes nothing
            return count
        except OSError as exc:
            log.error("spool file %s could not be replayed (kept for later): %s", path, exc)
            self.backlog = True
            return 0
        finally:
            os.close(fd)  # releases the lock

    async def _replay_lines(self, data: bytes) -> int:
        count = 0
        down = False
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                write = event_from_json(line)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("unreadable spooled usage record kept in %s: %s", self._spool, exc)
                self._append_raw(line)
                continue
            if down:  # the database failed again: the rest waits for the next replay
                self._to_spool(write)
                continue
            try:
                await self._write(write)
                count += 1
            except RecordRefused as exc:
                self._reject(write, exc)
            except StorageError:
                down = True
                self._to_spool(write)
        return count

    def _claim(self) -> Path | None:
        assert self._spool is not None
        claimed = self._spool.with_name(
            f"{self._spool.name}.{os.getpid()}.{time.time_ns()}.replaying"
        )
        try:
            os.rename(self._spool, claimed)  # atomic: only one worker claims a file
        except FileNotFoundError:
            return None
        return claimed

    def _has_spooled(self) -> bool:
        """Whether the spool (or a claimed file left behind) holds records."""
        assert self._spool is not None
        with contextlib.suppress(OSError):
            if self._spool.stat().st_size:
                return True
            return any(self._spool.parent.glob(f"{self._spool.name}.*.replaying"))
        return False

    async def run_replays(self, *, interval: float) -> None:
        """Replay the spool as soon as the database answers again: after a write
        succeeds, or a ping every ``interval`` seconds does, while this process has
        a backlog. Runs until cancelled; a failure is logged and waited out."""
        if self._spool is None:
            return
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
                    woken = True
            self._wake.clear()
            if not self.backlog:
                continue
            try:
                if not self._has_spooled():
                    self.backlog = False
                    continue
                if not woken:
                    await self._storage.ping()
            except StorageError:
                continue  # still down: the next ping tells
            try:
                replayed = await self.replay()
            except Exception:  # the replay loop must outlive any one failure
                log.exception("spool replay failed; will try again")
                self.backlog = True
                continue
            if replayed:
                log.info("replayed %d spooled usage records", replayed)

    def _append_raw(self, line: bytes) -> None:
        try:
            self._append(line)
        except OSError as exc:
            log.error("LOST unreadable spooled line (%s): %r", exc, line)

    def _append(self, line: bytes, path: Path | None = None) -> None:
        """Append one line to the spool (or to ``path``), never to a file a
        replay has taken.

        One write of one line with O_APPEND: concurrent workers do not interleave.
        The shared lock keeps a replay from taking the file while the line is
        written; a file a replay holds (its exclusive lock) or has removed was
        renamed away from the spool's name, so opening the name again gives the
        new spool. A write the disk cut short (full) raises, so the caller logs
        the whole record; the torn line it left is ended by the next append,
        whose line starts on its own (review-once F4): the replay keeps the
        torn one as unreadable and reads the next."""
        target = path if path is not None else self._spool
        assert target is not None
        for _ in range(_APPEND_TRIES):
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if os.fstat(fd).st_nlink == 0:
                    continue
                # Each line starts on a line of its own: after a line the disk
                # cut short (this worker's or another's, whose append may land
                # just before this one: review-last L1) it ends the torn one.
                # The replay skips the blank lines this leaves.
                data = b"\n" + line + b"\n"
                written = os.write(fd, data)
                if written < len(data):
                    raise OSError(
                        errno.ENOSPC, f"the disk took {written} of the line's {len(data)} bytes"
                    )
                os.fsync(fd)
                return
            finally:
                os.close(fd)
        raise OSError(f"the spool file was taken by a replay {_APPEND_TRIES} times in a row")

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Stop retrying: whatever is still pending goes to the spool file."""
        self._closing = True
        writes = dict(self._writes)  # each task leaves it as it ends
        await self._tasks.cancel(_CLOSE_TIMEOUT)
        for task, write in writes.items():
            # Cut by the cancellation (or stuck past it): the spool has it. A
            # write that landed as well is counted once (the ledger is keyed by
            # the answer's id).
            if task.cancelled() or not task.done():
                self._to_spool(write)
