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

Give-backs take the same way (review-once F2): a refund (an admitted answer
that produced nothing gives its query back) or an upload's release that the
database does not take is retried, then spooled, and spooled at shutdown; left
in memory, the answer's pending row would stay and a recovery charge the user
an estimate for an answer never given. Both are idempotent, so a replay may
repeat them: a refund only while its pending row is there (it goes with the
refund, and a settle or recovery that took it first leaves the refund nothing
to do), a release only while its upload's reservation is. A recovery pass
replays the spool first (`replay_before_recovery`).

The spool's format: UTF-8 JSON objects, one a line, each line written after a
newline of its own (so blank lines come between them, and a line a full disk
cut short is ended by the next). A usage record is a line of the `UsageEvent`'s
fields (`event_to_json`), with what the settle needs besides as keys starting
with ``_`` (``_lease_id``, ``_pending_id``, ``_plan``, ``_alerts``,
``_max_tokens``). A give-back is a line with ``"_give_back"``: ``"refund"``
with ``user_id``, ``day``, ``pending_id`` and ``lease_id``, or
``"release_upload"`` with ``user_id``, ``key`` and ``size`` (`give_back_to_json`).
A line without ``_give_back`` is a record, so the files of earlier versions
replay as they are.
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
from collections.abc import Callable, Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import orjson

from gateway.config import MAX_TOKENS_PER_ANSWER_LIMIT
from gateway.errors import NotFound, RecordRefused, StorageError
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
    return _dumps(record)


def event_from_json(line: bytes) -> Write:
    return _write_from(_loads(line))


def _loads(line: bytes) -> dict[str, Any]:
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError:  # a line the standard library wrote (see _dumps)
        raw = json.loads(line)
    if not isinstance(raw, dict):
        raise TypeError(f"a spool line is an object, not {type(raw).__name__}")
    return raw


def _dumps(record: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(record)
    except orjson.JSONEncodeError:
        # orjson refuses strings with lone surrogates; the standard library escapes
        # them (and reads them back the same way).
        return json.dumps(record, ensure_ascii=True).encode()


def _write_from(raw: dict[str, Any]) -> Write:
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


@dataclasses.dataclass(frozen=True, slots=True)
class Refund:
    """The give-back of an admitted answer's query (and its stream slot): no
    answer was produced. Spooled only with its pending row, which makes it
    idempotent: the refund takes the row, and does nothing once it is gone."""

    user_id: str
    day: date
    lease_id: str | None
    pending_id: str | None

    def __str__(self) -> str:
        request = f" of request {self.pending_id}" if self.pending_id is not None else ""
        return f"refund{request} for {self.user_id} on {self.day}"


@dataclasses.dataclass(frozen=True, slots=True)
class UploadRelease:
    """The give-back of an upload the upstream did not take, by its reservation's
    key: once at most."""

    user_id: str
    key: str
    size: int

    def __str__(self) -> str:
        return f"give-back of an upload of {self.size} bytes of {self.user_id} ({self.key})"


GiveBack = Refund | UploadRelease


def give_back_to_json(give_back: GiveBack) -> bytes:
    """One spool line for ``give_back`` (the module's docstring has the format)."""
    if isinstance(give_back, Refund):
        return _dumps(
            {
                "_give_back": "refund",
                "user_id": give_back.user_id,
                "day": give_back.day.isoformat(),
                "lease_id": give_back.lease_id,
                "pending_id": give_back.pending_id,
            }
        )
    return _dumps(
        {
            "_give_back": "release_upload",
            "user_id": give_back.user_id,
            "key": give_back.key,
            "size": give_back.size,
        }
    )


def spool_line_from_json(line: bytes) -> Write | GiveBack:
    """What one spool line holds: a give-back, or (any line without
    ``_give_back``, as every line of earlier versions) a usage record. Raises
    ValueError, TypeError or KeyError for a line it cannot read."""
    raw = _loads(line)
    kind = raw.get("_give_back")
    if kind is None:
        return _write_from(raw)
    user_id = raw["user_id"]
    if not isinstance(user_id, str):
        raise TypeError("a give-back's user_id is a string")
    if kind == "refund":
        pending_id, lease_id = raw["pending_id"], raw.get("lease_id")
        # Without its pending row a refund is not idempotent: never spooled.
        if not isinstance(pending_id, str) or not isinstance(lease_id, str | None):
            raise TypeError("a spooled refund has a pending_id (and a lease_id) as strings")
        return Refund(user_id, date.fromisoformat(raw["day"]), lease_id, pending_id)
    if kind == "release_upload":
        key, size = raw["key"], raw.get("size", 0)
        if not isinstance(key, str) or not isinstance(size, int):
            raise TypeError("a spooled upload's give-back has a key and a size")
        return UploadRelease(user_id, key, size)
    raise ValueError(f"unknown give-back {kind!r}")


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


class _HeldElsewhere(Exception):
    """Another process holds a claimed spool file's lock: it is replaying it."""


def _locked_contents(fd: int) -> bytes | None:
    """The contents of the open file ``fd`` once this process holds its exclusive
    lock; None when the file was removed before the lock was taken (it has been
    replayed). Raises `_HeldElsewhere` when another process holds the lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _HeldElsewhere from None
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
        # The write (or give-back) each retry carries: spooled if shutdown cuts it.
        self._writes: dict[asyncio.Task[None], Write | GiveBack] = {}
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
        # A replay put a refund back in the spool (`replay_before_recovery`).
        self._refunds_left = False

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
        background if the database does not answer, then spooled. With
        ``pending_id`` a retry or a replay cannot give it back twice (the pending
        row goes with the first); without it, one that keeps failing is only
        logged (no recovery charges a query that has no pending row)."""
        await self._give_back(Refund(user_id, day, lease_id, pending_id))

    async def release_upload(self, user_id: str, *, key: str, size: int) -> None:
        """Give back an upload the upstream did not take; retried in the
        background if the database does not answer, then spooled. By its key, so
        a retry, a replay (or a reservation whose outcome was lost) is given back
        once at most."""
        await self._give_back(UploadRelease(user_id, key, size))

    async def _give_back(self, give_back: GiveBack) -> None:
        try:
            await self._give(give_back)
        except asyncio.CancelledError:
            # Given up in flight: as a record's write (`record`), the spool has
            # it, and one that landed as well changes nothing when replayed.
            self._to_spool(give_back)
            raise
        except StorageError as exc:
            operation = "refund" if isinstance(give_back, Refund) else "release_upload"
            self._metrics.inc("gateway_storage_errors_total", operation=operation)
            log.warning("%s failed, will retry: %s", give_back, exc.message)
            if self._closing:
                self._to_spool(give_back)
                return
            task = self._tasks.start(self._retry_give_back(give_back), name=f"{operation}-retry")
            self._writes[task] = give_back
            task.add_done_callback(self._writes.pop)

    async def _give(self, give_back: GiveBack) -> None:
        """One give-back, now. Any failure is raised as StorageError, so the
        give-back takes the retry-then-spool way (as `_write` does a record's)."""
        storage = self._storage
        try:
            if isinstance(give_back, Refund):
                given = await storage.refund(
                    give_back.user_id,
                    day=give_back.day,
                    lease_id=give_back.lease_id,
                    pending_id=give_back.pending_id,
                )
                if not given:
                    log.info("%s: its pending row was gone, nothing to give back", give_back)
            else:
                await storage.release_upload(give_back.user_id, key=give_back.key)
        except StorageError:
            raise
        except Exception as exc:
            log.exception("%s failed unexpectedly", give_back)
            raise StorageError(f"unexpected {type(exc).__name__}") from exc
        if self.backlog:
            self._wake.set()  # the database answers: time to replay the spool

    async def _retry_give_back(self, give_back: GiveBack) -> None:
        for delay in self._delays:
            await asyncio.sleep(delay)
            try:
                await self._give(give_back)
                return
            except StorageError as exc:
                log.warning("%s failed again: %s", give_back, exc.message)
        self._to_spool(give_back)

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

    def _to_spool(self, write: Write | GiveBack) -> None:
        if not isinstance(write, Write):
            self._give_back_to_spool(write)
            return
        if self._spooled(event_to_json(write), "usage record"):
            log.error(
                "usage record %s spooled to %s for replay when the database answers again",
                write.event.answer_id,
                self._spool,
            )

    def _give_back_to_spool(self, give_back: GiveBack) -> None:
        """A give-back the database did not take, to the spool (counted with the
        records: `gateway_settle_spooled_total`, or `gateway_settle_lost_total`
        and the whole line in the log when it cannot be written there)."""
        if isinstance(give_back, Refund) and give_back.pending_id is None:
            # Not idempotent without its pending row (a replay could give it
            # back twice), and no recovery charges it: logged, not spooled.
            log.error("%s given up (not spooled: it has no pending row)", give_back)
            return
        if self._spooled(give_back_to_json(give_back), "give-back"):
            log.error(
                "%s spooled to %s for replay when the database answers again",
                give_back,
                self._spool,
            )

    def _spooled(self, line: bytes, what: str) -> bool:
        """Append ``line`` (a ``what``) to the spool: True once it is there
        (counted spooled); else False, counted lost, the whole line in the log."""
        if self._spool is None:
            self._metrics.inc("gateway_settle_lost_total")
            log.error("LOST %s (no spool file configured): %s", what, line.decode())
            return False
        try:
            self._append(line)
        except OSError as exc:
            # The last resort: the whole line in the log, from where it can be
            # replayed; counted as lost, not as spooled (review-last L4).
            self._metrics.inc("gateway_settle_lost_total")
            log.error(
                "LOST %s (spool file %s not writable: %s): %s",
                what,
                self._spool,
                exc,
                line.decode(),
            )
            return False
        self._metrics.inc("gateway_settle_spooled_total")
        self.backlog = True
        return True

    async def replay_before_recovery(self) -> bool:
        """Replay whatever is spooled - by this process or another worker sharing
        the spool - ahead of a recovery pass, so that a spooled record settles
        its own pending row and a spooled refund gives its back before the
        recovery could charge either an estimate. False when a refund waits -
        left in the spool because the database failed it again, still retried
        by this process, or in a claimed file another worker is replaying
        (review-rec REC-1): a recovery now could charge the request it gives
        back, so the pass waits for the next one."""
        if self._spool is not None and (self.backlog or self._has_spooled()):
            self._refunds_left = False
            await self.replay()
            if self._refunds_left:
                return False
        return not any(
            isinstance(item, Refund) and item.pending_id is not None
            for item in self._writes.values()
        )

    async def replay(self) -> int:
        """Settle what was spooled (by this run, an earlier one, or another worker);
        returns how many records and give-backs were written. Never raises: a
        file that cannot be read or removed is logged and left for the next
        replay."""
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
            try:
                data = _locked_contents(fd)
            except _HeldElsewhere:
                # Another worker replays it, and its refunds may not be given
                # yet: a recovery now could charge their requests (review-rec
                # REC-1), so `replay_before_recovery` holds the pass back.
                self._refunds_left = True
                return 0
            if data is None:
                return 0  # another worker has replayed it
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
                write = spool_line_from_json(line)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("unreadable spooled usage record kept in %s: %s", self._spool, exc)
                self._append_raw(line)
                continue
            if down:  # the database failed again: the rest waits for the next replay
                self._to_spool(write)
                if isinstance(write, Refund):
                    self._refunds_left = True
                continue
            if not isinstance(write, Write):
                try:
                    await self._give(write)
                    count += 1
                except StorageError:
                    down = True
                    if isinstance(write, Refund):
                        self._refunds_left = True
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
        """Whether the spool (or a claimed file left behind) holds lines."""
        assert self._spool is not None
        with contextlib.suppress(OSError):
            if self._spool.stat().st_size:
                return True
        # Looked for whether the spool is there or not (review-rec REC-5): a
        # replay killed partway (OOM, kill -9, a lost node) leaves its claimed
        # file with the lines it had not reached, and the spool itself absent
        # until something new is spooled.
        with contextlib.suppress(OSError):
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
