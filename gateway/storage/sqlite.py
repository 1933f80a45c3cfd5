"""The SQLite backend: the embedded default, one machine, one or a few processes.

One connection, used by one thread at a time (its own, or the event loop's for
a lone hot-path write, below): each storage operation is one synchronous
function, so it costs at most one hop off the event loop however many
statements it runs. Writes take SQLite's write lock up front
(``BEGIN IMMEDIATE``), which serialises them across connections and processes;
that is what makes the conditional admission exact here. Money is TEXT holding an
exact decimal, summed by the registered ``dec_add`` / ``dec_sum`` functions.

Writes are group-committed (gateway/storage/group.py): every call, read or
write, goes through one queue, and those made while a batch is on the thread go
together as the next one - one hop to the thread, one ``BEGIN IMMEDIATE`` and
one ``COMMIT`` for all of them. In the batch they run in the order they were
made, so each sees the ones before it exactly as it would one after another,
and one that fails fails alone: when a write raises, the batch is rolled back
and made again with each write in a savepoint of its own, the one at fault
rolled back to its savepoint (`_batch`). Nothing is answered before the batch
commits. A call
that finds nothing in flight goes alone (a write as a plain transaction); an
admission, settle or refund that goes alone is made on the event loop itself,
in its caller's turn, since its work holds the GIL anyway (no thread hop, no
task, no turn of the event loop waited for), and so is a batch of up to
NOW_MOST of them that finds the thread idle (on the thread, each statement
waited for the GIL while the event loop was busy: issue 24): unless another
connection holds the write lock, then they wait on the thread
(`SQLiteStorage._call_now`, `_call_now_many`); so does the first write
after a checkpoint copied the whole WAL, which starts it again and fsyncs its
new header (`_wal_starts`).

Durability: WAL with ``synchronous = NORMAL``. A committed call survives a crash
of the process; a power cut or an OS crash may lose the commits since the last
checkpoint (up to about CHECKPOINT_PAGES pages of them; never corrupting the
file): commits do not wait for an fsync, checkpoints do. No commit
checkpoints: every CHECKPOINT_PAGES pages or so (counted in write calls, at the
pages per call the last checkpoint found) a PASSIVE checkpoint runs on a
second connection on a thread of its own, beside the calls. If writes went on
meanwhile, a ``wal_checkpoint(RESTART)`` follows as a call on the connection's
thread, with no write in flight, so the next write starts the WAL again from its
beginning (cut back to JOURNAL_SIZE_LIMIT): otherwise every checkpoint would end
with new frames behind it and the WAL would grow without end. A checkpoint
that falls CHECKPOINT_LAG checkpoints' worth of calls behind the writes (a slow
fsync) holds the next writes until it is done.

The rules the PostgreSQL functions keep (web searches reserved at admission and
reconciled at settle, a real record superseding a recovered estimate: migration
0011 there) are kept here in Python, in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

from gateway.errors import Conflict, NotFound, StorageError
from gateway.quota.limits import (
    DAY_METERS,
    METERS,
    PERS,
    RATE_BITS,
    RATE_BUCKETS,
    Charge,
    Counters,
    Limit,
    LimitScope,
    Meter,
    Per,
    bucket_of,
    charged,
    counters_from,
    decide,
    first_counted,
    rate_bits,
    rate_counts,
    rate_retry,
    rate_used,
    upload_charge,
)
from gateway.storage import migrations
from gateway.storage.base import (
    ALERT_COLUMNS,
    COSTS_BY_CURRENCY_SELECT,
    DAILY_COLUMNS,
    DELIVERY_COLUMNS,
    EVENT_COLUMNS,
    MODEL_COUNTERS_SELECT,
    MODEL_USAGE_SELECT,
    PAUSED_FORM_DAYS,
    TEAM_COLUMNS,
    TEAM_DAILY_SELECT,
    TEAM_LIST_SELECT,
    TEAM_ROWS,
    UPSTREAM_USAGE_SELECT,
    USER_COLUMNS,
    USER_FIELDS,
    USER_ROWS,
    USER_SORTS,
    Admission,
    AdmissionLimits,
    Alert,
    AlertRequest,
    AnswerOwner,
    ApiKey,
    ConversationFeatures,
    Crossing,
    DailyUsage,
    Lease,
    OutboxItem,
    OverrideValue,
    PausedForm,
    Pending,
    Team,
    TeamSummary,
    UsageEvent,
    UsageGroup,
    User,
    UserSort,
    UserSummary,
    WebSearch,
    admission,
    alerts_with_deliveries,
    crossed,
    delivery,
    model_counters,
    parse_alert_spec,
    rate_buckets,
    stored_id,
    team_daily,
    team_summary,
    usage_group,
)
from gateway.storage.group import GroupCommit, NotNow, SplitBatch

log = logging.getLogger("gateway.storage")

T = TypeVar("T")
_USAGE_BY_MODEL = MODEL_USAGE_SELECT.format(cost_sum="dec_sum(cost)", p1="?", p2="?", p3="?")
_USAGE_BY_UPSTREAM = UPSTREAM_USAGE_SELECT.format(
    cost_sum="dec_sum(cost)", who=USER_ROWS.format(p1="?"), p2="?", p3="?"
)
_TEAM_USAGE_BY_UPSTREAM = UPSTREAM_USAGE_SELECT.format(
    cost_sum="dec_sum(cost)", who=TEAM_ROWS.format(p1="?"), p2="?", p3="?"
)
_COSTS_BY_CURRENCY = COSTS_BY_CURRENCY_SELECT.format(cost_sum="dec_sum(cost)")

_TEAM_DAILY = TEAM_DAILY_SELECT.format(cost_sum="dec_sum(d.cost)", p1="?", p2="?", p3="?")
_TEAM_LIST = TEAM_LIST_SELECT.format(cost_sum="dec_sum(d.cost)", p1="?")

_EXPORT_BATCH = 1000
# The most write transactions committed together (database.max_batch): past a
# few dozen a larger batch saves little, and a batch holds the write lock until
# it commits.
DEFAULT_MAX_BATCH = 64
# A checkpoint is made when about this many pages were written to the WAL since
# the last one: SQLite's own automatic checkpoint's 1,000.
CHECKPOINT_PAGES = 1000
# Write calls before the first WAL checkpoint, and the fewest between two: about
# CHECKPOINT_PAGES at about 10 pages a call made alone (an admission writes a
# day row, a lease and a pending row with their indexes, a settle more). Calls
# made together in a batch share the pages they change (100 write calls in
# batches of about 16 wrote 35 to 190 pages, in batches of about 64 10 to 100),
# so after each checkpoint the next comes after as many calls as wrote about
# CHECKPOINT_PAGES pages before it, at most CHECKPOINT_MOST.
CHECKPOINT_EVERY = 100
CHECKPOINT_MOST = 2000
# Write calls may go on beside a checkpoint for this many checkpoints' worth of
# calls; the next waits for it, as a commit waits for SQLite's own automatic
# checkpoint: a disk slow to fsync holds the writes back rather than letting the
# WAL grow without bound (about (1 + CHECKPOINT_LAG) * CHECKPOINT_PAGES pages).
CHECKPOINT_LAG = 2
# The most calls of a batch made on the event loop rather than on the thread
# (a few hundred microseconds each; the event loop waits for them).
NOW_MOST = 4
# The most members of a team whose admission is made on the event loop (issue
# 24): its counters are read member by member, two statements each; a larger
# team's admission goes to the thread, as every team's did (the hop cost more
# than a small team's statements).
TEAM_NOW_MOST = 4
# What the WAL is cut back to when it starts again: a few checkpoints' worth.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024


# A day row's integer counters, in the order of DAY_METERS (cost, last, apart).
_DAY_INTEGERS = (
    "queries, advanced_rag, web_searches, uploads, upload_bytes, "
    "prompt_tokens, completion_tokens, total_tokens"
)


class _DecimalSum:
    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total += Decimal(value)

    def finalize(self) -> str:
        return str(self.total)


def _dec_add(a: str | None, b: str | None) -> str:
    return str(Decimal(a or 0) + Decimal(b or 0))


def _connect(path: str, timeout: float) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each transaction's
    # extent is visible in the code rather than implied by the sqlite3 module.
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    # In WAL mode NORMAL loses no committed transaction on a process crash, only
    # possibly the last ones on a power cut, and saves an fsync per commit.
    conn.execute("PRAGMA synchronous = NORMAL")
    # No checkpoint in a commit: a commit may run on the event loop, and a
    # checkpoint waits for two fsyncs. SQLiteStorage checkpoints on a
    # connection and a thread of their own.
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.create_function("dec_add", 2, _dec_add, deterministic=True)
    conn.create_aggregate("dec_sum", 1, _DecimalSum)  # type: ignore[arg-type]
    return conn


def _statements(sql: str) -> Iterable[str]:
    """A migration's statements, one at a time (`sqlite3.Connection.execute`
    takes one): split at each ";" that ends a whole statement, so that a
    trigger's body (statements of its own between BEGIN and END) stays whole."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    statement = ""
    for piece in "\n".join(lines).split(";"):
        statement += piece
        if not statement.strip():
            statement = ""
        elif sqlite3.complete_statement(statement + ";"):
            yield statement
            statement = ""
        else:
            statement += ";"
    if statement.strip():
        yield statement


def _record_crossings(conn: sqlite3.Connection, event: UsageEvent, alerts: AlertRequest) -> None:
    """The thresholds this settle crossed first, recorded in its own transaction."""
    day = event.day.isoformat()
    today = conn.execute(
        "SELECT queries, total_tokens, web_searches FROM usage_daily WHERE user_id = ? AND day = ?",
        (event.user_id, day),
    ).fetchone() or (0, 0, 0)
    (month,) = conn.execute(
        "SELECT coalesce(sum(total_tokens), 0) FROM usage_daily "
        "WHERE user_id = ? AND day >= ? AND day <= ?",
        (event.user_id, alerts.month_start.isoformat(), day),
    ).fetchone()
    used: dict[str, int | Decimal] = {
        "queries_per_day": today[0],
        "tokens_per_day": today[1],
        "web_searches_per_day": today[2],
        "tokens_per_month": month,
    }
    now = _ts(event.created_at)
    for check in alerts.checks:
        if check.spec is not None:
            used[check.limit] = _alert_used(
                conn, event.user_id, day, alerts.month_start.isoformat(), check.spec
            )
        for threshold in check.thresholds:
            if not crossed(used[check.limit], check, threshold):
                continue
            key = (event.user_id, check.limit, check.period, threshold)
            new = conn.execute(
                "INSERT INTO notifications (user_id, kind, period, threshold, created_at, "
                "limit_value, used) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (*key, now, _stored(check.value), _stored(used[check.limit])),
            ).rowcount
            if new:
                conn.executemany(
                    "INSERT INTO alert_outbox (user_id, kind, period, threshold, channel, "
                    "created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*key, channel, now, now) for channel in alerts.channels],
                )


def _fetchall(conn: sqlite3.Connection, *, sql: str, params: Sequence[Any]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


# What an alert's limit counts, by meter: the day rows' (and per-model rows')
# column; cost is what was spent (what answers under way reserved is not).
_ALERT_COLUMNS: dict[Meter, str] = {
    "queries": "queries",
    "advanced_rag": "advanced_rag",
    "web_searches": "web_searches",
    "uploads": "uploads",
    "upload_bytes": "upload_bytes",
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "tokens": "total_tokens",
    "cost": "cost",
}


def _alert_used(
    conn: sqlite3.Connection, user_id: str, day: str, month_start: str, spec: str
) -> int | Decimal:
    """What the limit of an alert check (`alert_spec`) counts after this settle:
    the user's day rows, their team's members', or a per-model limit's rows."""
    meter, per, scope, key = parse_alert_spec(spec)
    column = _ALERT_COLUMNS[meter]
    total = "dec_sum" if meter == "cost" else "sum"
    start = month_start if per == "month" else day
    if key is not None:
        row = conn.execute(
            f"SELECT {total}({column}) FROM usage_models "
            "WHERE user_id = ? AND scope = ? AND day >= ? AND day <= ?",
            (user_id, key, start, day),
        ).fetchone()
    elif scope == "team":
        row = conn.execute(
            f"SELECT {total}(d.{column}) FROM usage_daily d JOIN users u ON u.id = d.user_id "
            "WHERE u.team_id = (SELECT team_id FROM users WHERE id = ?) "
            "AND d.day >= ? AND d.day <= ?",
            (user_id, start, day),
        ).fetchone()
    else:
        row = conn.execute(
            f"SELECT {total}({column}) FROM usage_daily "
            "WHERE user_id = ? AND day >= ? AND day <= ?",
            (user_id, start, day),
        ).fetchone()
    return Decimal(row[0] or 0) if meter == "cost" else int(row[0] or 0)


def _stored(value: int | Decimal) -> str:
    """A crossing's limit or usage as its TEXT column holds it (migration 0014):
    the exact decimal, or a count's digits."""
    return str(value)


def _amount(value: int | float | str) -> int | Decimal:
    """A crossing's limit or usage: a count, or money - an exact decimal string
    (a row from before migration 0014 may hold what a REAL kept of one)."""
    if isinstance(value, int):
        return value
    amount = Decimal(str(value))
    return int(amount) if amount == amount.to_integral_value() else amount


def _crossing(row: Any) -> Crossing:
    return Crossing(
        user_id=row[0],
        limit=row[1],
        period=row[2],
        threshold=row[3],
        value=_amount(row[4]),
        used=_amount(row[5]),
    )


def _ts(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("naive datetime given to storage")
    return value.astimezone(UTC).isoformat()


def _user(row: sqlite3.Row | tuple[Any, ...]) -> User:
    return User(
        id=row[0],
        plan=row[1],
        overrides=orjson.loads(row[2]),
        lifetime_prompt_tokens=row[3],
        lifetime_completion_tokens=row[4],
        lifetime_tokens=row[5],
        lifetime_cost=Decimal(row[6]),
        created_at=datetime.fromisoformat(row[7]),
        team=row[8],
    )


def _team(row: tuple[Any, ...]) -> Team:
    return Team(
        id=row[0],
        plan=row[1],
        overrides=orjson.loads(row[2]),
        created_at=datetime.fromisoformat(row[3]),
    )


def _key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(
        id=row[0],
        user_id=row[1],
        name=row[2],
        prefix=row[3],
        created_at=datetime.fromisoformat(row[4]),
        revoked_at=datetime.fromisoformat(row[5]) if row[5] else None,
    )


def _daily(row: tuple[Any, ...]) -> DailyUsage:
    return DailyUsage(
        user_id=row[0],
        day=date.fromisoformat(row[1]),
        queries=row[2],
        advanced_rag=row[3],
        web_searches=row[4],
        uploads=row[5],
        upload_bytes=row[6],
        prompt_tokens=row[7],
        completion_tokens=row[8],
        total_tokens=row[9],
        cost=Decimal(row[10]),
    )


def _event(row: tuple[Any, ...]) -> UsageEvent:
    return UsageEvent(
        answer_id=row[0],
        user_id=row[1],
        day=date.fromisoformat(row[2]),
        created_at=datetime.fromisoformat(row[3]),
        endpoint=row[4],
        prompt_tokens=row[5],
        completion_tokens=row[6],
        total_tokens=row[7],
        cost=Decimal(row[8]),
        currency=row[9],
        outcome=row[10],
        estimated=bool(row[11]),
        web_searches=row[12],
        conversation_id=row[13],
        request_id=row[14],
        upstream_latency_ms=row[15],
        overhead_ms=row[16],
        model=row[17],
        cached_tokens=row[18],
        reasoning_tokens=row[19],
        cache_write_tokens=row[20],
        upstream=row[21],
    )


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        # Also when COMMIT itself failed (disk full, I/O error): the connection is
        # shared, and a transaction left open would jam every later write.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _error(exc: Exception) -> Exception:
    """The gateway's error for what a storage function raised: SQLite's errors
    mapped, the gateway's own (NotFound, Conflict...) as they are."""
    mapped: Exception
    if isinstance(exc, sqlite3.IntegrityError):
        if "FOREIGN KEY" in str(exc):
            mapped = NotFound("unknown user")
        else:
            mapped = StorageError(f"SQLite integrity error: {exc}")
    elif isinstance(exc, sqlite3.Error):
        mapped = StorageError(f"SQLite error: {exc}")
    else:
        return exc
    mapped.__cause__ = exc
    return mapped


class _Call(NamedTuple):
    """One storage call's work, as the connection's thread runs it: a write
    transaction (``writes``) or a read. ``abandoned`` undoes what a write did
    when its caller went away while it was in flight."""

    run: Callable[[sqlite3.Connection], Any]
    abandoned: Callable[[Any], None] | None = None
    writes: bool = True
    # Short enough to make on the event loop when it goes alone (the hot path's
    # writes: a few indexed statements on one user's rows).
    now: bool = False


class _WriteFailed(Exception):
    """A write of a batch made without savepoints raised: the batch is made
    again, each write in a savepoint."""


def _batch(conn: sqlite3.Connection, calls: Sequence[_Call]) -> list[Any]:
    """The calls of a batch in one transaction, in order: one that raises fails
    alone, the others' writes stand. Nothing of it is written when the
    transaction cannot begin (every caller's error) or commit, or SQLite ends it
    itself: then `SplitBatch`, and the calls are made again each on its own.

    The batch is made first without savepoints (each costs two statements per
    write, and SQLite keeps the pages a write changes under one in a
    sub-journal); only when a write raises - rarely: an unknown user, a
    duplicate request id - is the transaction rolled back and the whole batch
    made again with each write in a savepoint of its own, so that the one at
    fault is rolled back to its savepoint. The calls' functions only read and
    write the connection, so making them again gives what the first time would
    have given from the same rows."""
    try:
        return _in_one_transaction(conn, calls, savepoints=False)
    except _WriteFailed:
        return _in_one_transaction(conn, calls, savepoints=True)


def _in_one_transaction(
    conn: sqlite3.Connection, calls: Sequence[_Call], *, savepoints: bool
) -> list[Any]:
    # A batch of reads only takes no write lock.
    conn.execute("BEGIN IMMEDIATE" if any(call.writes for call in calls) else "BEGIN")
    outcomes: list[Any] = []
    try:
        for call in calls:
            kept = savepoints and call.writes
            if kept:
                conn.execute("SAVEPOINT call")
            try:
                outcomes.append(call.run(conn))
            except NotNow:
                raise  # (on the event loop: the batch goes to the thread, nothing written)
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite ended the transaction itself (a full disk, an I/O
                    # error): the batch's earlier writes went with it, so each
                    # call is made again on its own.
                    raise SplitBatch(f"{type(exc).__name__}: {exc}") from exc
                if call.writes and not kept:
                    raise _WriteFailed from exc  # rolled back below, made again
                if kept:
                    conn.execute("ROLLBACK TO call")
                outcomes.append(_error(exc))
            if kept:
                conn.execute("RELEASE call")
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Refused at commit (a deferred constraint, a full disk): nothing
            # of the batch is written; each call is tried again on its own.
            raise SplitBatch(f"COMMIT: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _busy(exc: Exception) -> bool:
    """SQLITE_BUSY (or one of its extended codes): another connection holds the lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.OperationalError)
        and code is not None
        and (code & 0xFF == sqlite3.SQLITE_BUSY)
    )


def _checkpoint_wal(conn: sqlite3.Connection) -> tuple[bool, int]:
    """Copy the WAL's committed pages into the database file, without waiting
    for readers or writers (what SQLite's automatic checkpoint does): whether
    it copied all those it found (not when another connection reads), and how
    many pages the WAL held."""
    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return not busy and copied == frames, max(frames, 0)


def _restart_wal(conn: sqlite3.Connection) -> bool:
    """Copy the rest of the WAL and have the next write start it again from
    its beginning (truncated to JOURNAL_SIZE_LIMIT), on the calls' connection
    between two calls: no write of this process is in flight. Another
    process's reader or writer is not waited for (busy timeout 0, as on the
    event loop): the next checkpoint tries again. Whether it was done."""
    conn.execute("PRAGMA busy_timeout = 0")
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    return not busy


def _abandoned(call: _Call, result: Any) -> None:
    if call.abandoned is not None:
        call.abandoned(result)


def _one_connection(_: _Call) -> int:
    """Every call has the same key: a batch split goes call by call, in order."""
    return 0


def _team_counters(
    conn: sqlite3.Connection,
    team: str,
    today: str,
    month_start: str,
    now: datetime | None,
    *,
    monthly: bool,
    rates: dict[tuple[Meter, Per], Decimal],
) -> Counters:
    """A team's counters: its members' day rows summed, their open streams at
    ``now`` (None: not counted), and ``rates`` (what the team's rate windows
    count)."""
    members = [row[0] for row in conn.execute("SELECT id FROM users WHERE team_id = ?", (team,))]
    day = [Decimal(0)] * len(DAY_METERS)
    month = [Decimal(0)] * len(DAY_METERS)
    for member in members:
        d, m = _day_and_month(conn, member, today, month_start, monthly=monthly)
        day = [a + b for a, b in zip(day, d, strict=True)]
        if m is not None:
            month = [a + b for a, b in zip(month, m, strict=True)]
    streams = 0
    if now is not None:
        marks = ", ".join("?" for _ in members)
        streams = conn.execute(
            f"SELECT count(*) FROM stream_leases WHERE expires_at > ? AND user_id IN ({marks})",
            (_ts(now), *members),
        ).fetchone()[0]
    return counters_from(day, month if monthly else None, streams, rates)


def _counted(
    conn: sqlite3.Connection, source: str, integers: str, params: Sequence[Any], first: str
) -> tuple[list[Decimal], list[Decimal]]:
    """The counters of the day rows ``source`` selects ("table WHERE ...", its
    parameters ``params``, then today): today's and the month's from ``first``
    to today, each as the columns ``integers`` then the cost, what answers under
    way reserved included.

    The month is one aggregate over its day rows: SQLite sums the integers and
    joins the costs (decimal text) into one string, added up as Decimals here.
    A row's values turned into Decimals in Python, or a decimal aggregate (a
    Python call per row), cost about 20 us a day row: 600 us on the 30th."""
    today = params[-1]
    row = conn.execute(
        f"SELECT {integers}, cost, cost_reserved FROM {source} AND day = ?", params
    ).fetchone()
    if row is None:
        day = [Decimal(0)] * (integers.count(",") + 2)
    else:
        day = [*map(Decimal, row[:-2]), Decimal(row[-2]) + Decimal(row[-1])]
    if first == today:
        return day, list(day)
    sums = ", ".join(f"sum({column.strip()})" for column in integers.split(","))
    row = conn.execute(
        f"SELECT {sums}, group_concat(cost || ',' || cost_reserved, ',') FROM {source} "
        "AND day >= ? AND day <= ?",
        (*params[:-1], first, today),
    ).fetchone()
    month = [Decimal(value or 0) for value in row[:-1]]
    costs = row[-1]
    month.append(sum(map(Decimal, costs.split(",")), Decimal(0)) if costs else Decimal(0))
    return day, month


def _day_and_month(
    conn: sqlite3.Connection, user_id: str, today: str, month_start: str, *, monthly: bool
) -> tuple[list[Decimal], list[Decimal] | None]:
    """The user's counters today and, when ``monthly``, this month (today
    included; None otherwise), in the order of gateway/quota/limits.py's
    DAY_METERS; cost includes what answers under way reserved."""
    source = "usage_daily WHERE user_id = ?"
    if not monthly:
        return _counted(conn, source, _DAY_INTEGERS, (user_id, today), today)[0], None
    return _counted(conn, source, _DAY_INTEGERS, (user_id, today), month_start)


_INTEGERS = _DAY_INTEGERS.count(",") + 1
_DAY_SUMS = ", ".join(f"sum({column.strip()})" for column in _DAY_INTEGERS.split(","))
# An admission's reads in one statement (issue 24: each statement is a call
# into sqlite3 and a VDBE program of its own): whether the user exists, their
# day rows from ?3 to ?4 (today) - today's (the row of max(day): SQLite takes
# a query's bare columns from the row its one max() picked) and their sums -
# and, in the first form, their leases and how many of them expired at ?2.
_ADMISSION_READS = (
    "SELECT EXISTS (SELECT 1 FROM users WHERE id = ?1), {leases}"
    f"max(day), {_DAY_INTEGERS}, cost, cost_reserved, {_DAY_SUMS}, "
    "group_concat(cost || ',' || cost_reserved, ',') "
    "FROM usage_daily WHERE user_id = ?1 AND day >= ?3 AND day <= ?4"
)
_READS_WITH_LEASES = _ADMISSION_READS.format(
    leases="(SELECT count(*) FROM stream_leases WHERE user_id = ?1), "
    "(SELECT count(*) FROM stream_leases WHERE user_id = ?1 AND expires_at <= ?2), "
)
_READS = _ADMISSION_READS.format(leases="0, 0, ")


def _admission_reads(
    conn: sqlite3.Connection, user_id: str, stamp: str | None, today: str, first: str
) -> tuple[bool, int, int, list[Decimal], list[Decimal]]:
    """What an admission reads of the user, in one statement: whether they
    exist; their leases and how many of them expired at ``stamp`` (0 and 0
    when None: streams not counted); their counters today and from ``first``
    to today (the month; today's again when ``first`` is today), as
    `_counted` gives them."""
    row = conn.execute(
        _READS if stamp is None else _READS_WITH_LEASES, (user_id, stamp, first, today)
    ).fetchone()
    n = _INTEGERS  # the columns: 3, max(day), n integers, cost, reserved, n sums, costs
    if row[3] == today:
        day = [*map(Decimal, row[4 : 4 + n]), Decimal(row[4 + n]) + Decimal(row[5 + n])]
    else:
        day = [Decimal(0)] * (n + 1)
    month = [Decimal(value or 0) for value in row[6 + n : 6 + 2 * n]]
    costs = row[-1]
    month.append(sum(map(Decimal, costs.split(",")), Decimal(0)) if costs else Decimal(0))
    return bool(row[0]), row[1], row[2], day, month


class _Claimed(NamedTuple):
    """A pending row settle or refund removed: where its reservations are."""

    day: str
    web_searches: int
    reserved_cost: str
    rates: int = 0  # quota.RATE_BITS
    created_at: str = ""
    scopes: str = "[]"  # the per-model counters' keys, JSON

    @property
    def keys(self) -> list[str]:
        return list(orjson.loads(self.scopes))


def _rate_add(
    conn: sqlite3.Connection, user_id: str, meter: Meter, per: Per, epoch: float, amount: int
) -> None:
    """Add ``amount`` to the rate bucket ``epoch`` falls in (PostgreSQL's
    gateway_rate_add: a slot ring, a newer bucket replacing a slot's older one)."""
    bucket = bucket_of(per, epoch)
    conn.execute(
        "INSERT INTO usage_rates AS r (user_id, meter, per, slot, bucket, amount) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, meter, per, slot) DO UPDATE SET "
        "amount = CASE WHEN r.bucket = excluded.bucket THEN r.amount + excluded.amount "
        "WHEN excluded.bucket > r.bucket THEN excluded.amount ELSE r.amount END, "
        "bucket = max(r.bucket, excluded.bucket)",
        (
            user_id,
            METERS.index(meter) + 1,
            PERS.index(per) + 1,
            bucket % (RATE_BUCKETS + 1),
            bucket,
            amount,
        ),
    )


def _rate_buckets(
    conn: sqlite3.Connection, user_id: str, limit: Limit, epoch: float, team: str | None = None
) -> dict[int, Decimal]:
    """The counted buckets of one rate window at ``epoch``: the user's, or for a
    team-scope limit the team members' summed."""
    if limit.scope == "team":
        who = "user_id IN (SELECT id FROM users WHERE team_id = ?)"
    else:
        who = "user_id = ?"
    rows = conn.execute(
        f"SELECT bucket, sum(amount) FROM usage_rates WHERE {who} AND meter = ? AND per = ? "
        "AND bucket >= ? GROUP BY bucket",
        (
            team if limit.scope == "team" else user_id,
            METERS.index(limit.meter) + 1,
            PERS.index(limit.per) + 1,
            first_counted(limit.per, epoch),
        ),
    )
    return {row[0]: Decimal(row[1]) for row in rows}


def _count_rates(
    conn: sqlite3.Connection, user_id: str, bits: int, meter: Meter, epoch: float, amount: int
) -> None:
    """Count ``amount`` of ``meter`` in the rates of ``bits`` (quota.RATE_BITS)."""
    for (bit_meter, per), bit in RATE_BITS.items():
        if bit_meter == meter and bits & bit:
            _rate_add(conn, user_id, meter, per, epoch, amount)


def _claim(
    conn: sqlite3.Connection, pending_id: str | None, lease_id: str | None
) -> _Claimed | None:
    """Remove an answer's pending row and release its lease. Returns the row's day
    and what was reserved with it - nothing when no pending row is named - or None
    when the row was already gone (settled, refunded or recovered: the answer is
    accounted for)."""
    claimed: _Claimed | None = _Claimed("", 0, "0")
    if pending_id is not None:
        row = conn.execute(
            "DELETE FROM pending_answers WHERE id = ? "
            "RETURNING day, web_searches, reserved_cost, rates, created_at, scopes",
            (pending_id,),
        ).fetchone()
        claimed = _Claimed(*row) if row is not None else None
    if lease_id is not None:
        conn.execute("DELETE FROM stream_leases WHERE id = ?", (lease_id,))
    return claimed


def _add_models(
    conn: sqlite3.Connection,
    user_id: str,
    keys: Iterable[str],
    day: str,
    *,
    queries: int = 0,
    prompt: int = 0,
    completion: int = 0,
    total: int = 0,
    cost: Decimal = Decimal(0),
    reserved: Decimal = Decimal(0),
) -> None:
    """Add to the per-model counters ``keys`` of the user's day."""
    for key in keys:
        conn.execute(
            "INSERT INTO usage_models (user_id, scope, day, queries, prompt_tokens, "
            "completion_tokens, total_tokens, cost, cost_reserved) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, scope, day) DO UPDATE SET "
            "queries = queries + excluded.queries, "
            "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = completion_tokens + excluded.completion_tokens, "
            "total_tokens = total_tokens + excluded.total_tokens, "
            "cost = dec_add(cost, excluded.cost), "
            "cost_reserved = dec_add(cost_reserved, excluded.cost_reserved)",
            (user_id, key, day, queries, prompt, completion, total, str(cost), str(reserved)),
        )


def _model_counters(
    conn: sqlite3.Connection, user_id: str, keys: Iterable[str], today: str, month_start: str
) -> dict[tuple[str, Meter, Per], Decimal]:
    """The per-model counters ``keys`` of the user, today and this month."""
    found: dict[tuple[str, Meter, Per], Decimal] = {}
    meters: tuple[Meter, ...] = ("queries", "input_tokens", "output_tokens", "tokens", "cost")
    for key in keys:
        day, month = _counted(
            conn,
            "usage_models WHERE user_id = ? AND scope = ?",
            "queries, prompt_tokens, completion_tokens, total_tokens",
            (user_id, key, today),
            month_start,
        )
        for meter, on_day, in_month in zip(meters, day, month, strict=True):
            found[(key, meter, "day")] = on_day
            found[(key, meter, "month")] = in_month
    return found


def _release(conn: sqlite3.Connection, user_id: str, claimed: _Claimed) -> None:
    """End the reservations admission made with a pending row: the web searches
    (the settle adds what the answer used instead) and the cost bound, on the
    day row and on the per-model counters it counts in."""
    reserved = Decimal(claimed.reserved_cost)
    if reserved:
        _add_models(conn, user_id, claimed.keys, claimed.day, reserved=-reserved)
    if claimed.web_searches or Decimal(claimed.reserved_cost):
        conn.execute(
            "UPDATE usage_daily SET web_searches = max(web_searches - ?, 0), "
            "cost_reserved = dec_add(cost_reserved, ?) WHERE user_id = ? AND day = ?",
            (claimed.web_searches, str(-Decimal(claimed.reserved_cost)), user_id, claimed.day),
        )


def _supersede(conn: sqlite3.Connection, pending_id: str, event: UsageEvent) -> bool:
    """The answer's real record replaces the estimate a recovery charged for its
    pending row (docs/quotas.md, "Crash safety"): the ledger row takes the real
    figures and the day row, lifetime totals and per-model counters move by the
    difference. False, changing nothing, when there is no such estimate (it was
    superseded already, or the row was settled or refunded) or this request's
    answer is in the ledger already; a real id another request's answer holds
    is this answer's under the id `_answer_id` gives it."""
    old = conn.execute(
        "SELECT answer_id, day, prompt_tokens, completion_tokens, total_tokens, cost, "
        "web_searches, scopes FROM usage_events WHERE answer_id = ? AND outcome = 'recovered' "
        "AND request_id = ? AND user_id = ?",
        (f"gw-{pending_id}", pending_id, event.user_id),
    ).fetchone()
    if old is None:
        return False
    if event.answer_id != old[0]:
        answer_id = _answer_id(conn, event.answer_id, event.request_id)
        if answer_id is None:
            return False
        event = dataclasses.replace(event, answer_id=answer_id)
    cost = Decimal(event.cost)
    conn.execute(
        "UPDATE usage_events SET answer_id = ?, created_at = ?, endpoint = ?, "
        "prompt_tokens = ?, completion_tokens = ?, total_tokens = ?, cost = ?, currency = ?, "
        "outcome = ?, estimated = ?, web_searches = ?, conversation_id = ?, request_id = ?, "
        "upstream_latency_ms = ?, overhead_ms = ?, model = ?, cached_tokens = ?, "
        "reasoning_tokens = ?, cache_write_tokens = ?, upstream = ? WHERE answer_id = ?",
        (
            event.answer_id,
            _ts(event.created_at),
            event.endpoint,
            event.prompt_tokens,
            event.completion_tokens,
            event.total_tokens,
            str(cost),
            event.currency,
            event.outcome,
            int(event.estimated),
            event.web_searches,
            event.conversation_id,
            event.request_id,
            event.upstream_latency_ms,
            event.overhead_ms,
            event.model,
            event.cached_tokens,
            event.reasoning_tokens,
            event.cache_write_tokens,
            event.upstream,
            old[0],
        ),
    )
    prompt = event.prompt_tokens - old[2]
    completion = event.completion_tokens - old[3]
    total = event.total_tokens - old[4]
    cost_delta = str(cost - Decimal(old[5]))
    # The estimate was counted on the day the answer was asked (the row's day).
    conn.execute(
        "UPDATE usage_daily SET web_searches = max(web_searches + ?, 0), "
        "prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ?, "
        "total_tokens = total_tokens + ?, cost = dec_add(cost, ?) WHERE user_id = ? AND day = ?",
        (event.web_searches - old[6], prompt, completion, total, cost_delta, event.user_id, old[1]),
    )
    conn.execute(
        "UPDATE users SET lifetime_prompt_tokens = lifetime_prompt_tokens + ?, "
        "lifetime_completion_tokens = lifetime_completion_tokens + ?, "
        "lifetime_tokens = lifetime_tokens + ?, lifetime_cost = dec_add(lifetime_cost, ?) "
        "WHERE id = ?",
        (prompt, completion, total, cost_delta, event.user_id),
    )
    if old[7] is not None:
        # The per-model counters the estimate was charged to, likewise.
        _add_models(
            conn,
            event.user_id,
            orjson.loads(old[7]),
            old[1],
            prompt=prompt,
            completion=completion,
            total=total,
            cost=cost - Decimal(old[5]),
        )
    return True


def _answer_id(conn: sqlite3.Connection, answer_id: str, request_id: str | None) -> str | None:
    """The ledger id an answer of request ``request_id`` is recorded under when
    its own, ``answer_id``, may be taken (review-once F1; PostgreSQL's
    gateway_answer_id): ``answer_id`` if no row holds it; None if the row that
    does is this request's (a retried write, a replayed spool line: a
    duplicate); else that row is another request's answer under the same
    upstream id (a buggy or hostile upstream repeating it), and this one is a
    new answer under ``<id>#<request id>``, looked up the same way in turn (an
    upstream may know request ids: dialects pass them on). The upstream's own
    id stays the first answer's, so `answer_owner` names its user. A record
    with no request id cannot be told from another request's: a duplicate."""
    while True:
        row = conn.execute(
            "SELECT request_id FROM usage_events WHERE answer_id = ?", (answer_id,)
        ).fetchone()
        if row is None:
            return answer_id
        if request_id is None or row[0] == request_id:
            return None
        answer_id = f"{answer_id}#{request_id}"


def _record(conn: sqlite3.Connection, event: UsageEvent) -> str | None:
    """Write one answer to the ledger, the day row and the lifetime totals; the id
    it is recorded under (its own, or the one `_answer_id` gives it when another
    request's answer holds that), or None, changing nothing, when this request's
    answer is recorded already."""
    if not _insert_event(conn, event):
        # Taken: by this request's record, or another request's answer.
        answer_id = _answer_id(conn, event.answer_id, event.request_id)
        if answer_id is None:
            return None
        event = dataclasses.replace(event, answer_id=answer_id)
        _insert_event(conn, event)  # free: the write lock is held
    cost = str(event.cost)
    conn.execute(
        "INSERT INTO usage_daily (user_id, day, web_searches, prompt_tokens, completion_tokens, "
        "total_tokens, cost) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (user_id, day) DO UPDATE SET "
        "web_searches = web_searches + excluded.web_searches, "
        "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = completion_tokens + excluded.completion_tokens, "
        "total_tokens = total_tokens + excluded.total_tokens, "
        "cost = dec_add(cost, excluded.cost)",
        (
            event.user_id,
            event.day.isoformat(),
            event.web_searches,
            event.prompt_tokens,
            event.completion_tokens,
            event.total_tokens,
            cost,
        ),
    )
    conn.execute(
        "UPDATE users SET lifetime_prompt_tokens = lifetime_prompt_tokens + ?, "
        "lifetime_completion_tokens = lifetime_completion_tokens + ?, "
        "lifetime_tokens = lifetime_tokens + ?, lifetime_cost = dec_add(lifetime_cost, ?) "
        "WHERE id = ?",
        (event.prompt_tokens, event.completion_tokens, event.total_tokens, cost, event.user_id),
    )
    return event.answer_id


def _insert_event(conn: sqlite3.Connection, event: UsageEvent) -> bool:
    """The ledger row of an answer; False, writing nothing, when its id is taken."""
    cost = str(event.cost)
    inserted: int = conn.execute(
        f"INSERT INTO usage_events ({EVENT_COLUMNS}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (answer_id) DO NOTHING",
        (
            event.answer_id,
            event.user_id,
            event.day.isoformat(),
            _ts(event.created_at),
            event.endpoint,
            event.prompt_tokens,
            event.completion_tokens,
            event.total_tokens,
            cost,
            event.currency,
            event.outcome,
            int(event.estimated),
            event.web_searches,
            event.conversation_id,
            event.request_id,
            event.upstream_latency_ms,
            event.overhead_ms,
            event.model,
            event.cached_tokens,
            event.reasoning_tokens,
            event.cache_write_tokens,
            event.upstream,
        ),
    ).rowcount
    return inserted > 0


class SQLiteStorage:
    def __init__(
        self,
        path: str,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        timeout: float,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._path = path
        self._conn = conn
        self._executor = executor
        self._timeout = timeout
        # Every call, read or write, goes through this one queue: the thread
        # serves them in the order they were made, as one executor did before
        # writes were batched (a read made after a write sees it), and one
        # batch at a time, since there is one thread.
        self._calls: GroupCommit[_Call, Any] = GroupCommit(
            "calls",
            self._call_many,
            self._call_one,
            max_batch=max_batch,
            in_flight=1,
            abandoned=_abandoned,
            key=_one_connection,
            run_now=self._call_now,
            run_now_many=self._call_now_many,
        )
        self._background: set[asyncio.Task[None]] = set()
        # Teams found larger than TEAM_NOW_MOST: their admissions go to the thread.
        self._large_teams: set[str] = set()
        # Calls sent to the connection's thread and not yet answered (batches,
        # lone calls, a WAL restart; not the checkpoints, which have a thread
        # of their own): a call is made on the event loop only when it is 0.
        self._on_thread = 0
        # The busy timeout is 0 while calls are made on the event loop (a call
        # that finds the write lock taken goes to the thread, which waits).
        self._loop_timeout = False
        self._writes = 0  # write calls since the last checkpoint began
        # Write calls whose frames the WAL holds: since it last started again
        # from its beginning (what its size, and the lag below, is counted in).
        self._in_wal = 0
        # The WAL was copied whole: the next write starts it again from its
        # beginning, and SQLite fsyncs the new header in that commit (even under
        # synchronous = NORMAL) - so it is made on the thread, not on the loop.
        self._wal_starts = False
        self._checkpoint_every = CHECKPOINT_EVERY  # then as many as wrote CHECKPOINT_PAGES
        self._checkpointing: asyncio.Task[None] | None = None  # the one in progress
        # Checkpoints run on a connection and a thread of their own, so that
        # the calls go on meanwhile (a PASSIVE checkpoint blocks no writer).
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoints = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-sqlite-checkpoint"
        )

    @classmethod
    async def open(
        cls, path: str, *, timeout: float = 5.0, max_batch: int = DEFAULT_MAX_BATCH
    ) -> SQLiteStorage:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path, timeout)
        except sqlite3.Error as exc:
            executor.shutdown(wait=False)
            raise StorageError(f"cannot open SQLite database {path!r}: {exc}") from exc
        return cls(path, conn, executor, timeout, max_batch=max_batch)

    @property
    def group_commit(self) -> dict[str, tuple[int, int]]:
        """(batches, calls) so far, reads and writes: calls / batches is the
        mean batch size."""
        return {self._calls.name: (self._calls.batches, self._calls.calls)}

    async def _call(
        self, fn: Callable[..., T], *args: Any, given_up: Callable[[T], None] | None = None
    ) -> T:
        """``fn`` on the connection's thread, now (not through the queue).
        ``given_up`` gets what it returns when the task waiting for it is
        cancelled while the thread makes it (the event loop going away cancels
        a batch's task): the thread goes on, and what it committed is undone
        rather than lost. The task waits for the thread before it ends, so
        that asyncio.run's teardown, which waits for the tasks it cancelled
        and no more, waits for the answer and the give-back it starts too."""
        loop = asyncio.get_running_loop()
        self._on_thread += 1
        job = self._executor.submit(self._threaded, fn, *args)
        try:
            result = await asyncio.wrap_future(job, loop=loop)
        except asyncio.CancelledError:
            if not job.done():  # (a job the thread had not begun is cancelled)
                # The thread makes it all the same, maybe a commit: its answer
                # is waited for. Cancelled again, the task waits no longer; the
                # answer still comes, through _given_up.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wrap_future(job, loop=loop)
            self._given_up(loop, job, given_up)
            raise
        except BaseException as exc:
            self._on_thread -= 1
            mapped = _error(exc) if isinstance(exc, Exception) else exc
            if mapped is exc:
                raise
            raise mapped from exc
        self._on_thread -= 1
        return result

    def _given_up(
        self,
        loop: asyncio.AbstractEventLoop,
        job: Future[T],
        given_up: Callable[[T], None] | None,
    ) -> None:
        """A call's waiter was cancelled. One the thread has not begun is not
        made; one it made in the turn its waiter was cancelled, or is making
        (maybe in its transaction: the connection is the thread's until it is
        done, or a call made on the event loop meanwhile would share, and roll
        back, that transaction), is answered to ``given_up``: at once, or (its
        task cancelled twice) when the thread is done, and a background task
        waits for that, so close() does (the connection stays open for the
        give-back it starts)."""

        def answered(_: object = None) -> None:
            self._on_thread -= 1
            if given_up is not None and not job.cancelled() and job.exception() is None:
                given_up(job.result())

        if job.done():  # made, failed, or cancelled before the thread began it
            answered()
            return
        waiter: asyncio.Future[None] = loop.create_future()

        def answer() -> None:
            try:
                answered()
            finally:
                if not waiter.done():
                    waiter.set_result(None)

        def done(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(answer)

        job.add_done_callback(done)
        task = loop.create_task(self._answer_of(waiter))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _answer_of(waiter: asyncio.Future[None]) -> None:
        await waiter

    def _threaded(self, fn: Callable[..., T], *args: Any) -> T:
        if self._loop_timeout:
            self._conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            self._loop_timeout = False
        return fn(self._conn, *args)

    def _restart_wal(self, conn: sqlite3.Connection) -> bool:
        self._loop_timeout = True  # the next call on the thread sets it back
        return _restart_wal(conn)

    def _call_now(self, call: _Call) -> Any:
        """Make a lone call on the event loop (GroupCommit's ``run_now``): the
        hot path's short writes, when the thread is idle and no other
        connection holds the write lock; else `NotNow`, and the call goes to
        the thread. Its cost was the event loop's anyway, but for SQLite's own
        C code: the Python of a call on the thread holds the GIL."""
        if not call.now or self._on_thread or (self._wal_starts and call.writes):
            raise NotNow
        conn = self._conn
        if not self._loop_timeout:
            conn.execute("PRAGMA busy_timeout = 0")
            self._loop_timeout = True
        try:
            result = _transaction(conn, call.run) if call.writes else call.run(conn)
        except Exception as exc:
            if _busy(exc):  # rolled back: nothing of it is written
                raise NotNow from exc
            mapped = _error(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        if call.writes:
            self._wrote(1)
        return result

    def _call_now_many(self, calls: Sequence[_Call]) -> list[Any]:
        """Make a batch of at most NOW_MOST hot-path calls on the event loop
        (GroupCommit's ``run_now_many``), as the thread would (`_batch`), when
        the thread is idle: on the thread, with the event loop busy, each
        statement of it waited for the GIL - up to the switch interval, 5 ms,
        each - and every call made meanwhile queued behind it (issue 24). A
        batch that raises anything (another connection holds the write lock;
        `SplitBatch`) is rolled back, nothing of it written: `NotNow`, and it
        goes to the thread, which makes it as before."""
        if (
            len(calls) > NOW_MOST
            or self._on_thread
            or self._wal_starts
            or not all(call.now for call in calls)
        ):
            raise NotNow
        conn = self._conn
        if not self._loop_timeout:
            conn.execute("PRAGMA busy_timeout = 0")
            self._loop_timeout = True
        try:
            outcomes = _batch(conn, calls)
        except Exception as exc:
            raise NotNow from exc
        self._wrote(sum(call.writes for call in calls))
        return outcomes

    def _wrote(self, calls: int) -> None:
        """Count write calls; every ``_checkpoint_every``, a checkpoint on the thread."""
        self._writes += calls
        self._in_wal += calls
        if self._writes < self._checkpoint_every or self._checkpointing:
            return
        self._writes = 0
        task = asyncio.create_task(self._checkpoint())
        self._checkpointing = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _checkpoint(self) -> None:
        """Checkpoint the WAL; the next comes after as many write calls as
        would write about CHECKPOINT_PAGES pages at the rate those in the WAL
        did. The calls are counted before the checkpoint reads the WAL's size:
        those made meanwhile add pages, not calls, so the rate is never taken
        lower than it is. (Counted since the last checkpoint began, as before,
        it took in the calls made beside that one, whose frames a restart had
        since removed: a slow checkpoint made the next ones later, and the WAL
        passed 16 MiB, review of the sustained-writes test's failure.)"""
        loop = asyncio.get_running_loop()
        try:
            if self._checkpointer is None:
                self._checkpointer = await loop.run_in_executor(
                    self._checkpoints, _connect, self._path, self._timeout
                )
            counted = self._in_wal
            copied, pages = await loop.run_in_executor(
                self._checkpoints, _checkpoint_wal, self._checkpointer
            )
            if pages and counted:
                every = counted * CHECKPOINT_PAGES // pages
                self._checkpoint_every = min(CHECKPOINT_MOST, max(CHECKPOINT_EVERY, every))
            if copied and not self._writes:
                self._in_wal = 0  # the next write starts the WAL again from its beginning
                self._wal_starts = True
                return
            # Writes went on meanwhile, their frames behind the copied ones: a
            # WAL is started again only by a write that finds all of it copied,
            # so under steady writes it would grow without end (review of
            # e1df906). The rest is copied by a call of its own.
            if await self._call(self._restart_wal):
                # The writes on the thread after it, answered after it, count
                # in the new WAL.
                self._in_wal = 0
                self._wal_starts = True
        except (sqlite3.Error, StorageError) as exc:  # the WAL grows until the next one
            log.warning("SQLite checkpoint failed: %s", exc)
        finally:
            self._checkpointing = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Read with ``fn``, in turn with the other calls."""
        result: T = await self._calls(_Call(fn, None, writes=False))
        return result

    async def _tx(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        abandoned: Callable[[T], None] | None = None,
        now: bool = False,
    ) -> T:
        """Run ``fn`` in a write transaction, group-committed with the others;
        ``now``: short enough to make on the event loop when it goes alone."""
        checkpoint = self._checkpointing
        if checkpoint is not None and self._in_wal >= (1 + CHECKPOINT_LAG) * self._checkpoint_every:
            # The checkpoint has fallen behind the writes (a slow fsync): wait
            # for it, so the WAL stays bounded - counted in the calls the WAL
            # holds, not those since the checkpoint began (a WAL not started
            # again since an earlier checkpoint holds those too). Shielded: a
            # caller that gives up does not stop it.
            await asyncio.shield(checkpoint)
        result: T = await self._calls(_Call(fn, abandoned, now=now))
        return result

    async def _call_one(self, call: _Call) -> Any:
        if call.writes:
            result = await self._call(
                _transaction, call.run, given_up=functools.partial(self._made_anyway, (call,))
            )
            self._wal_starts = False  # (this write, on the thread, started it)
            self._wrote(1)
            return result
        return await self._call(call.run)

    async def _call_many(self, calls: Sequence[_Call]) -> list[Any]:
        if len(calls) == 1:
            return [await self._call_one(calls[0])]
        outcomes: list[Any] = await self._call(
            _batch, calls, given_up=functools.partial(self._made_anyway, calls, many=True)
        )
        if any(call.writes for call in calls):
            self._wal_starts = False  # (this batch, on the thread, started it)
        self._wrote(sum(call.writes for call in calls))
        return outcomes

    def _made_anyway(self, calls: Sequence[_Call], outcome: Any, *, many: bool = False) -> None:
        """Writes the thread made after their batch's task was cancelled: their
        callers were cancelled with it, so each one made is abandoned (an
        admission given back), as a cancelled caller's is."""
        self._wal_starts = False
        self._wrote(sum(call.writes for call in calls))
        for call, made in zip(calls, outcome if many else [outcome], strict=True):
            if not isinstance(made, Exception):
                _abandoned(call, made)

    def _admission_abandoned(
        self, user_id: str, day: date, lease: Lease | None, pending: Pending | None
    ) -> Callable[[Admission], None]:
        """What gives back an admission whose caller was cancelled while it was
        in flight (the server shutting down): nobody will forward or settle the
        answer, so its query, lease and pending row are given back."""

        def give_back(admission: Admission) -> None:
            if not admission.admitted:
                return
            log.info("admission for %s abandoned by its caller; given back", user_id)
            task = asyncio.create_task(
                self._refund_quietly(
                    user_id,
                    day,
                    lease_id=lease.id if lease else None,
                    pending_id=pending.id if pending else None,
                )
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        return give_back

    async def _refund_quietly(
        self, user_id: str, day: date, *, lease_id: str | None, pending_id: str | None
    ) -> None:
        try:
            await self.refund(user_id, day=day, lease_id=lease_id, pending_id=pending_id)
        except StorageError as exc:
            # The pending row stays: a recovery charges it as an estimate later.
            log.warning("could not give back an abandoned admission of %s: %s", user_id, exc)

    def _upload_abandoned(self, user_id: str, key: str) -> Callable[[Admission], None]:
        """What gives back an upload counted for a caller cancelled while the
        call was in flight: the file is never forwarded."""

        def give_back(counted: Admission) -> None:
            if not counted.admitted:
                return
            log.info("upload of %s abandoned by its caller; given back", user_id)
            task = asyncio.create_task(self._release_quietly(user_id, key))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        return give_back

    async def _release_quietly(self, user_id: str, key: str) -> None:
        try:
            await self.release_upload(user_id, key=key)
        except StorageError as exc:
            log.warning("could not give back an abandoned upload of %s: %s", user_id, exc)

    async def close(self) -> None:
        # Writes still queued or in flight are answered (and given back, for an
        # abandoned admission) before the connection goes.
        while True:
            await self._calls.drain()
            if not self._background:
                break
            # Shielded, as PostgreSQL's: a close given up (a second Ctrl-C, a
            # deadline around it) leaves the give-backs going.
            await asyncio.shield(asyncio.gather(*self._background, return_exceptions=True))
        loop = asyncio.get_running_loop()
        if self._checkpointer is not None:
            await loop.run_in_executor(self._checkpoints, self._checkpointer.close)
        self._checkpoints.shutdown(wait=True)
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def database_time(self) -> None:
        """None: the database is a file on this machine, and SQLite has no clock
        but the machine's (nothing to measure: gateway/skew.py)."""
        return None

    async def migrate(self) -> int:
        def migrated(conn: sqlite3.Connection) -> bool:
            # Every start asks, and a database is usually migrated: a read on the
            # connection's thread tells (a write transaction's lock and group
            # commit are left for when a migration is missing; only a committed
            # one is seen here).
            try:
                applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            except sqlite3.OperationalError:  # no such table: a new database
                return False
            return applied == {version for version, _ in migrations("sqlite")}

        if await self._call(migrated):
            return 0

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            count = 0
            for version, sql in migrations("sqlite"):
                if version in applied:
                    continue
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, _ts(datetime.now(UTC))),
                )
                count += 1
            return count

        return await self._tx(run)

    # --- users --------------------------------------------------------------

    async def get_user(self, user_id: str) -> User | None:
        def run(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(
                f"SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?", (user_id,)
            ).fetchone()
            return _user(row) if row else None

        return await self._run(run)

    async def ensure_user(self, user_id: str, *, plan: str) -> User:
        def run(conn: sqlite3.Connection) -> User:
            conn.execute(
                "INSERT INTO users (id, plan, created_at) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (user_id, plan, _ts(datetime.now(UTC))),
            )
            return _user(
                conn.execute(
                    f"SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?", (user_id,)
                ).fetchone()
            )

        return await self._tx(run)

    async def set_plan(self, user_id: str, plan: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if (
                conn.execute("UPDATE users SET plan = ? WHERE id = ?", (plan, user_id)).rowcount
                == 0
            ):
                raise NotFound(f"no user {user_id!r}")

        await self._tx(run)

    async def _change_overrides(
        self, user_id: str, change: Callable[[dict[str, OverrideValue]], None]
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT overrides FROM users WHERE id = ?", (user_id,)).fetchone()
            if row is None:
                raise NotFound(f"no user {user_id!r}")
            overrides = orjson.loads(row[0])
            change(overrides)
            conn.execute(
                "UPDATE users SET overrides = ? WHERE id = ?",
                (orjson.dumps(overrides).decode(), user_id),
            )

        await self._tx(run)

    async def set_override(self, user_id: str, name: str, value: OverrideValue) -> None:
        await self._change_overrides(user_id, lambda o: o.__setitem__(name, value))

    async def clear_override(self, user_id: str, name: str) -> None:
        def clear(overrides: dict[str, OverrideValue]) -> None:
            overrides.pop(name, None)

        await self._change_overrides(user_id, clear)

    def _user_filter(self, plan: str | None, search: str | None) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if plan is not None:
            clauses.append("u.plan = ?")
            params.append(plan)
        if search:
            clauses.append("instr(lower(u.id), lower(?)) > 0")
            params.append(search)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    async def list_users(
        self,
        *,
        day: date,
        plan: str | None = None,
        search: str | None = None,
        sort: UserSort = "id",
        descending: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> list[UserSummary]:
        where, params = self._user_filter(plan, search)
        order = f"{USER_SORTS[sort]} {'DESC' if descending else 'ASC'}, u.id ASC"
        sql = (
            f"SELECT {USER_COLUMNS}, d.{', d.'.join(DAILY_COLUMNS.split(', '))} FROM users u "
            "LEFT JOIN usage_daily d ON d.user_id = u.id AND d.day = ?"
            f"{where} ORDER BY {order} LIMIT ? OFFSET ?"
        )

        def run(conn: sqlite3.Connection) -> list[UserSummary]:
            rows = conn.execute(sql, (day.isoformat(), *params, limit, offset)).fetchall()
            return [
                UserSummary(
                    user=_user(row[:USER_FIELDS]),
                    today=_daily(row[USER_FIELDS:])
                    if row[USER_FIELDS] is not None
                    else DailyUsage(user_id=row[0], day=day),
                )
                for row in rows
            ]

        return await self._run(run)

    async def count_users(self, *, plan: str | None = None, search: str | None = None) -> int:
        where, params = self._user_filter(plan, search)
        return await self._run(
            lambda conn: int(
                conn.execute(f"SELECT count(*) FROM users u{where}", params).fetchone()[0]
            )
        )

    # --- teams (issue 21) ----------------------------------------------------

    async def create_team(self, team_id: str, *, plan: str, now: datetime) -> Team:
        def run(conn: sqlite3.Connection) -> None:
            inserted = conn.execute(
                "INSERT INTO teams (id, plan, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (team_id, plan, _ts(now)),
            ).rowcount
            if not inserted:
                raise Conflict(f"a team {team_id!r} exists already")

        await self._tx(run)
        return Team(id=team_id, plan=plan, overrides={}, created_at=now.astimezone(UTC))

    async def get_team(self, team_id: str) -> Team | None:
        def run(conn: sqlite3.Connection) -> Team | None:
            row = conn.execute(
                f"SELECT {TEAM_COLUMNS} FROM teams t WHERE t.id = ?", (team_id,)
            ).fetchone()
            return _team(row) if row else None

        return await self._run(run)

    async def list_teams(self, *, day: date) -> list[TeamSummary]:
        return await self._run(
            lambda conn: [
                team_summary(_team(row[:4]), row[4:], day=day, cost=Decimal(row[13] or "0"))
                for row in conn.execute(_TEAM_LIST, (day.isoformat(),))
            ]
        )

    async def set_team_plan(self, team_id: str, plan: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if not conn.execute("UPDATE teams SET plan = ? WHERE id = ?", (plan, team_id)).rowcount:
                raise NotFound(f"no team {team_id!r}")

        await self._tx(run)

    async def _change_team_overrides(
        self, team_id: str, change: Callable[[dict[str, OverrideValue]], None]
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT overrides FROM teams WHERE id = ?", (team_id,)).fetchone()
            if row is None:
                raise NotFound(f"no team {team_id!r}")
            overrides = orjson.loads(row[0])
            change(overrides)
            conn.execute(
                "UPDATE teams SET overrides = ? WHERE id = ?",
                (orjson.dumps(overrides).decode(), team_id),
            )

        await self._tx(run)

    async def set_team_override(self, team_id: str, name: str, value: OverrideValue) -> None:
        await self._change_team_overrides(team_id, lambda o: o.__setitem__(name, value))

    async def clear_team_override(self, team_id: str, name: str) -> None:
        def clear(overrides: dict[str, OverrideValue]) -> None:
            overrides.pop(name, None)

        await self._change_team_overrides(team_id, clear)

    async def set_team(self, user_id: str, team_id: str | None) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if (
                team_id is not None
                and conn.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None
            ):
                raise NotFound(f"no team {team_id!r}")
            if not conn.execute(
                "UPDATE users SET team_id = ? WHERE id = ?", (team_id, user_id)
            ).rowcount:
                raise NotFound(f"no user {user_id!r}")

        await self._tx(run)

    async def team_members(self, team_id: str) -> list[User]:
        sql = f"SELECT {USER_COLUMNS} FROM users u WHERE u.team_id = ? ORDER BY u.id"
        return await self._run(
            lambda conn: [_user(row) for row in conn.execute(sql, (team_id,)).fetchall()]
        )

    async def team_daily(self, team_id: str, *, start: date, end: date) -> list[DailyUsage]:
        params = (team_id, start.isoformat(), end.isoformat())
        return await self._run(
            lambda conn: [
                team_daily(team_id, row, Decimal(row[9] or "0"))
                for row in conn.execute(_TEAM_DAILY, params).fetchall()
            ]
        )

    async def user_teams(self) -> dict[str, str]:
        sql = "SELECT id, team_id FROM users WHERE team_id IS NOT NULL"
        return await self._run(lambda conn: dict(conn.execute(sql).fetchall()))

    # --- keys ---------------------------------------------------------------

    async def create_key(
        self, user_id: str, *, key_id: str, key_hash: str, prefix: str, name: str, now: datetime
    ) -> ApiKey:
        def run(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
                raise NotFound(f"no user {user_id!r}")
            conn.execute(
                "INSERT INTO api_keys (id, user_id, key_hash, prefix, name, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, user_id, key_hash, prefix, name, _ts(now)),
            )

        await self._tx(run)
        return ApiKey(
            id=key_id,
            user_id=user_id,
            name=name,
            prefix=prefix,
            created_at=now.astimezone(UTC),
            revoked_at=None,
        )

    async def find_key(self, key_hash: str) -> ApiKey | None:
        def run(conn: sqlite3.Connection) -> ApiKey | None:
            row = conn.execute(
                "SELECT id, user_id, name, prefix, created_at, revoked_at FROM api_keys WHERE key_hash = ?",
                (key_hash,),
            ).fetchone()
            return _key(row) if row else None

        return await self._run(run)

    async def revoke_key(self, key_id: str, *, now: datetime) -> ApiKey:
        def run(conn: sqlite3.Connection) -> ApiKey:
            conn.execute(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (_ts(now), key_id),
            )
            row = conn.execute(
                "SELECT id, user_id, name, prefix, created_at, revoked_at FROM api_keys WHERE id = ?",
                (key_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no key {key_id!r}")
            return _key(row)

        return await self._tx(run)

    async def list_keys(self, user_id: str) -> list[ApiKey]:
        def run(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(
                "SELECT id, user_id, name, prefix, created_at, revoked_at FROM api_keys "
                "WHERE user_id = ? ORDER BY created_at, id",
                (user_id,),
            ).fetchall()
            return [_key(row) for row in rows]

        return await self._run(run)

    # --- accounting ---------------------------------------------------------

    async def admit(
        self,
        user_id: str,
        *,
        day: date,
        month_start: date,
        limits: AdmissionLimits,
        now: datetime,
        lease: Lease | None = None,
        advanced_rag: bool = False,
        pending: Pending | None = None,
        web_search: WebSearch | None = None,
        team: str | None = None,
    ) -> Admission:
        today = day.isoformat()
        checked = limits.with_web_search(web_search)
        charge = Charge(
            advanced_rag=int(advanced_rag),
            web_searches=int(web_search is not None),
            cost=pending.reserved_cost if pending else Decimal(0),
            streams=int(lease is not None),
        )
        optional = web_search is not None and web_search.when_exhausted == "disable"
        bits = rate_bits(checked)
        monthly = any(limit.per == "month" for limit in checked)
        month = month_start.isoformat()
        first = month if monthly else today

        created = _ts(now)
        stamp = created if limits.counts_streams else None
        keys = sorted({k for k in (x.counter_key for x in checked) if k is not None})
        expires = _ts(lease.expires_at) if lease is not None else ""

        def run(conn: sqlite3.Connection) -> Admission:
            # Under BEGIN IMMEDIATE no other connection can write between these
            # reads and the increment below, so check-then-increment is atomic here.
            if team is not None and limits.has_team and not self._on_thread:
                # On the event loop, a small team's only: its size found first,
                # bounded, before any read of its members' rows (review).
                (size,) = conn.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM users WHERE team_id = ? LIMIT ?)",
                    (team, TEAM_NOW_MOST + 1),
                ).fetchone()
                if size > TEAM_NOW_MOST:
                    self._large_teams.add(team)  # its next admissions go to the thread
                    raise NotNow
            known, leases, expired, day_used, month_all = _admission_reads(
                conn, user_id, stamp, today, first
            )
            if not known:
                raise NotFound(f"no user {user_id!r}")
            if expired:
                # (rarely any: a lease ends with its answer)
                conn.execute(
                    "DELETE FROM stream_leases WHERE user_id = ? AND expires_at <= ?",
                    (user_id, stamp),
                )
            streams = leases - expired
            # As PostgreSQL, which reads the month only for a monthly limit.
            month_used = month_all if monthly else None
            epoch = now.timestamp()
            buckets = {
                at: _rate_buckets(conn, user_id, limit, epoch, team)
                for at, limit in enumerate(checked)
                if limit.is_rate and (limit.scope == "user" or team is not None)
            }
            rates: dict[LimitScope, dict[tuple[Meter, Per], Decimal]] = {"user": {}, "team": {}}
            for at, found in buckets.items():
                limit = checked[at]
                rates[limit.scope][(limit.meter, limit.per)] = rate_used(found, limit.per, epoch)
            team_counters = None
            if team is not None and limits.has_team:
                # (On the event loop, a team of at most TEAM_NOW_MOST members:
                # found so above, and none can join under this write lock.)
                team_counters = _team_counters(
                    conn, team, today, month, now, monthly=monthly, rates=rates["team"]
                )
            models = _model_counters(conn, user_id, keys, today, month) if keys else None
            counters = counters_from(
                day_used, month_used, streams, rates["user"], team=team_counters, models=models
            )
            decision = decide(counters, checked, charge, web_optional=optional)
            if decision.refused is not None:
                refused = checked[decision.refused]
                retry = (
                    rate_retry(
                        buckets[decision.refused], refused, charge.amount(refused.meter), epoch
                    )
                    if refused.is_rate
                    else None
                )
                return admission(checked, decision.refused, counters, 0, retry_after=retry)
            searches = decision.web_searches
            conn.execute(
                "INSERT INTO usage_daily (user_id, day, queries, advanced_rag, web_searches, "
                "cost_reserved) VALUES (?, ?, 1, ?, ?, ?) "
                "ON CONFLICT (user_id, day) DO UPDATE SET queries = queries + 1, "
                "advanced_rag = advanced_rag + excluded.advanced_rag, "
                "web_searches = web_searches + excluded.web_searches, "
                "cost_reserved = dec_add(cost_reserved, excluded.cost_reserved)",
                (user_id, today, charge.advanced_rag, searches, str(charge.cost)),
            )
            if bits:
                _count_rates(conn, user_id, bits, "queries", epoch, 1)
            if keys:
                _add_models(conn, user_id, keys, today, queries=1, reserved=charge.cost)
            if lease is not None:
                conn.execute(
                    "INSERT INTO stream_leases (id, user_id, expires_at) VALUES (?, ?, ?)",
                    (lease.id, user_id, expires),
                )
            if pending is not None:
                # In the same transaction: an admitted answer is never unrecorded.
                conn.execute(
                    "INSERT INTO pending_answers (id, user_id, day, created_at, endpoint, "
                    "prompt_tokens, completion_tokens, total_tokens, cost, currency, "
                    "web_searches, reserved_cost, rates, scopes, upstream) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        pending.id,
                        user_id,
                        today,
                        created,
                        pending.endpoint,
                        pending.prompt_tokens,
                        pending.completion_tokens,
                        pending.total_tokens,
                        str(pending.cost),
                        pending.currency,
                        searches,
                        str(pending.reserved_cost),
                        bits,
                        orjson.dumps(keys).decode(),
                        pending.upstream,
                    ),
                )
            after = charged(counters, charge, searches)
            return admission(checked, None, after, searches)

        return await self._tx(
            run,
            abandoned=self._admission_abandoned(user_id, day, lease, pending),
            now=team is None or not limits.has_team or team not in self._large_teams,
        )

    async def rate_counts(self, user_id: str, *, now: datetime) -> dict[tuple[Meter, Per], Decimal]:
        def run(conn: sqlite3.Connection) -> dict[tuple[Meter, Per], Decimal]:
            rows = conn.execute(
                "SELECT meter, per, bucket, amount FROM usage_rates WHERE user_id = ?", (user_id,)
            ).fetchall()
            return rate_counts(rows, now.timestamp())

        return await self._run(run)

    async def rate_buckets(
        self, user_ids: Sequence[str]
    ) -> dict[tuple[Meter, Per], dict[int, Decimal]]:
        marks = ", ".join("?" for _ in user_ids)
        rows = await self._run(
            functools.partial(
                _fetchall,
                sql="SELECT meter, per, bucket, amount FROM usage_rates "
                f"WHERE user_id IN ({marks})",
                params=list(user_ids),
            )
        )
        return rate_buckets(rows)

    async def model_counters(
        self, user_id: str, keys: Sequence[str], *, day: date, month_start: date
    ) -> dict[tuple[str, Meter, Per], Decimal]:
        if not keys:
            return {}
        sql = MODEL_COUNTERS_SELECT.format(
            total="dec_sum", p1="?1", p2="?2", p3="?3", keys="IN (SELECT value FROM json_each(?4))"
        )
        params = [user_id, day.isoformat(), month_start.isoformat(), orjson.dumps(list(keys))]
        rows = await self._run(functools.partial(_fetchall, sql=sql, params=params))
        return model_counters(rows)

    async def reserve_upload(
        self,
        user_id: str,
        *,
        key: str,
        day: date,
        month_start: date,
        size: int,
        limits: Sequence[Limit] = (),
        team: str | None = None,
    ) -> Admission:
        today = day.isoformat()
        first = month_start.isoformat()
        charge = upload_charge(size)

        def run(conn: sqlite3.Connection) -> Admission:
            # Under BEGIN IMMEDIATE, as admit: check-then-count is atomic, across
            # processes on the file too.
            if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
                raise NotFound(f"no user {user_id!r}")
            held = conn.execute(
                "SELECT day, size FROM upload_reservations WHERE id = ? AND user_id = ?",
                (key, user_id),
            ).fetchone()
            if held is not None and held[1] != size:
                # Counted already: only its bytes become the file's (on its day).
                conn.execute(
                    "UPDATE usage_daily SET upload_bytes = max(upload_bytes + ?, 0) "
                    "WHERE user_id = ? AND day = ?",
                    (size - held[1], user_id, held[0]),
                )
                conn.execute("UPDATE upload_reservations SET size = ? WHERE id = ?", (size, key))
            monthly = any(limit.per == "month" for limit in limits)
            day_used, month_used = _day_and_month(conn, user_id, today, first, monthly=monthly)
            team_counters = None
            if team is not None and any(limit.scope == "team" for limit in limits):
                team_counters = _team_counters(
                    conn, team, today, first, None, monthly=monthly, rates={}
                )
            counters = counters_from(day_used, month_used, 0, team=team_counters)
            if held is not None:
                return admission(limits, None, counters, 0)
            decision = decide(counters, limits, charge)
            if decision.refused is not None:
                return admission(limits, decision.refused, counters, 0)
            conn.execute(
                "INSERT INTO usage_daily (user_id, day, uploads, upload_bytes) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (user_id, day) DO UPDATE SET uploads = uploads + 1, "
                "upload_bytes = upload_bytes + excluded.upload_bytes",
                (user_id, today, size),
            )
            conn.execute(
                "DELETE FROM upload_reservations WHERE user_id = ? AND day < ?",
                (user_id, (day - timedelta(days=1)).isoformat()),
            )
            conn.execute(
                "INSERT INTO upload_reservations (id, user_id, day, size) VALUES (?, ?, ?, ?)",
                (key, user_id, today, size),
            )
            return admission(limits, None, charged(counters, charge, 0), 0)

        # A reservation whose caller is cancelled in flight never forwards its
        # file: given back. A count without limits comes after the upstream
        # took the file: it stays.
        abandoned = self._upload_abandoned(user_id, key) if limits else None
        return await self._tx(run, abandoned=abandoned)

    async def release_upload(self, user_id: str, *, key: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            held = conn.execute(
                "DELETE FROM upload_reservations WHERE id = ? AND user_id = ? RETURNING day, size",
                (key, user_id),
            ).fetchone()
            if held is not None:
                conn.execute(
                    "UPDATE usage_daily SET uploads = uploads - 1, "
                    "upload_bytes = max(upload_bytes - ?, 0) "
                    "WHERE user_id = ? AND day = ? AND uploads > 0",
                    (held[1], user_id, held[0]),
                )

        await self._tx(run)

    async def open_streams(self, user_id: str, *, now: datetime) -> int:
        return await self._run(
            lambda conn: int(
                conn.execute(
                    "SELECT count(*) FROM stream_leases WHERE user_id = ? AND expires_at > ?",
                    (user_id, _ts(now)),
                ).fetchone()[0]
            )
        )

    async def refund(
        self,
        user_id: str,
        *,
        day: date,
        lease_id: str | None = None,
        pending_id: str | None = None,
    ) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            claimed = _claim(conn, pending_id, lease_id)
            if claimed is not None:
                conn.execute(
                    "UPDATE usage_daily SET queries = queries - 1 "
                    "WHERE user_id = ? AND day = ? AND queries > 0",
                    (user_id, day.isoformat()),
                )
                _release(conn, user_id, claimed)
                _add_models(conn, user_id, claimed.keys, claimed.day, queries=-1)
                if claimed.rates:
                    at = datetime.fromisoformat(claimed.created_at).timestamp()
                    _count_rates(conn, user_id, claimed.rates, "queries", at, -1)
            return claimed is not None

        return await self._tx(run, now=True)

    async def move_pending(self, pending_id: str, *, upstream: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            moved: int = conn.execute(
                "UPDATE pending_answers SET upstream = ? WHERE id = ?", (upstream, pending_id)
            ).rowcount
            return moved > 0

        return await self._tx(run)

    async def settle(
        self,
        event: UsageEvent,
        *,
        lease_id: str | None = None,
        pending_id: str | None = None,
        alerts: AlertRequest | None = None,
    ) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            claimed = _claim(conn, pending_id, lease_id)
            if claimed is None:
                # Gone: settled or refunded (nothing to do), or recovered as an
                # estimate, which this real record supersedes.
                assert pending_id is not None
                recorded = _supersede(conn, pending_id, event)
            else:
                recorded = _record(conn, event) is not None
                # Whether or not the answer was new, the reservation ends here.
                _release(conn, event.user_id, claimed)
                if recorded:
                    _add_models(
                        conn,
                        event.user_id,
                        claimed.keys,
                        claimed.day,
                        prompt=event.prompt_tokens,
                        completion=event.completion_tokens,
                        total=event.total_tokens,
                        cost=Decimal(event.cost),
                    )
                if recorded and claimed.rates:
                    _count_rates(
                        conn,
                        event.user_id,
                        claimed.rates,
                        "tokens",
                        event.created_at.timestamp(),
                        event.total_tokens,
                    )
            if not recorded:
                return False
            if alerts is not None and alerts.checks:
                _record_crossings(conn, event, alerts)
            return True

        # A team's alert sums its members' rows: not on the event loop.
        team_alert = alerts is not None and any(
            check.spec is not None and parse_alert_spec(check.spec)[2] == "team"
            for check in alerts.checks
        )
        return await self._tx(run, now=not team_alert)

    async def recover(self, *, before: datetime, now: datetime, limit: int = 100) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            # BEGIN IMMEDIATE serialises recoverers and settles: a row one of them
            # removed is simply not there for the next.
            rows = conn.execute(
                "SELECT id, user_id, day, endpoint, prompt_tokens, completion_tokens, "
                "total_tokens, cost, currency, web_searches, upstream FROM pending_answers "
                "WHERE created_at < ? "
                "ORDER BY created_at LIMIT ?",
                (_ts(before), limit),
            ).fetchall()
            for (
                pending_id,
                user_id,
                day,
                endpoint,
                prompt,
                completion,
                total,
                cost_text,
                currency,
                web_searches,
                upstream,
            ) in rows:
                cost = Decimal(cost_text)
                claimed = _claim(conn, pending_id, pending_id)
                if claimed is not None:
                    # The cost bound's reservation ends: the estimate below is
                    # charged instead (admission made it at least the bound).
                    _release(conn, user_id, claimed._replace(web_searches=0))
                recorded = (
                    _record(
                        conn,
                        UsageEvent(
                            answer_id=f"gw-{pending_id}",
                            user_id=user_id,
                            day=date.fromisoformat(day),
                            created_at=now,
                            endpoint=endpoint,
                            prompt_tokens=prompt,
                            completion_tokens=completion,
                            total_tokens=total,
                            cost=cost,
                            currency=currency,
                            outcome="recovered",
                            estimated=True,
                            request_id=pending_id,
                            upstream=upstream,
                        ),
                    )
                    is not None
                )
                if recorded and claimed is not None:
                    _add_models(
                        conn,
                        user_id,
                        claimed.keys,
                        day,
                        prompt=prompt,
                        completion=completion,
                        total=total,
                        cost=cost,
                    )
                if recorded and claimed is not None and claimed.rates:
                    # The estimate counts in the token rates, as settled tokens do.
                    _count_rates(conn, user_id, claimed.rates, "tokens", now.timestamp(), total)
                keys = claimed.keys if claimed is not None else []
                if recorded and (web_searches or keys):
                    # A web search reserved stays spent, like the query (the answer
                    # may have searched): the day row has it already, the ledger
                    # row now says so too, so a superseding record can correct it;
                    # so can it the per-model counters the row names (scopes).
                    # (Its request's: under another id, `_answer_id`'s, when an
                    # upstream named another answer so; none supersedes that.)
                    conn.execute(
                        "UPDATE usage_events SET web_searches = ?, scopes = ? "
                        "WHERE answer_id = ? AND request_id = ?",
                        (
                            web_searches,
                            orjson.dumps(keys).decode() if keys else None,
                            f"gw-{pending_id}",
                            pending_id,
                        ),
                    )
            return [row[0] for row in rows]

        return await self._tx(run)

    # --- alerts -------------------------------------------------------------

    async def claim_outbox(
        self, *, now: datetime, claim_until: datetime, limit: int = 20
    ) -> list[OutboxItem]:
        def run(conn: sqlite3.Connection) -> list[OutboxItem]:
            # One writer at a time (BEGIN IMMEDIATE): what is claimed here no
            # other process claims until claimed_until.
            rows = conn.execute(
                f"SELECT o.id, o.channel, o.created_at, o.attempts, {ALERT_COLUMNS} "
                "FROM alert_outbox o JOIN notifications n USING (user_id, kind, period, threshold) "
                "WHERE o.next_attempt_at <= ? AND (o.claimed_until IS NULL OR o.claimed_until <= ?) "
                "ORDER BY o.next_attempt_at, o.id LIMIT ?",
                (_ts(now), _ts(now), limit),
            ).fetchall()
            conn.executemany(
                "UPDATE alert_outbox SET claimed_until = ? WHERE id = ?",
                [(_ts(claim_until), row[0]) for row in rows],
            )
            return [
                OutboxItem(
                    id=row[0],
                    channel=row[1],
                    created_at=datetime.fromisoformat(row[2]),
                    attempts=row[3],
                    crossing=_crossing(row[4:]),
                )
                for row in rows
            ]

        return await self._tx(run)

    async def outbox_delivered(self, item_id: int, *, now: datetime) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, delivered_at = ?, "
                "next_attempt_at = NULL, claimed_until = NULL, last_error = NULL WHERE id = ?",
                (_ts(now), item_id),
            )
        )

    async def outbox_failed(self, item_id: int, *, error: str, retry_at: datetime | None) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ?, claimed_until = NULL WHERE id = ?",
                (error, _ts(retry_at) if retry_at else None, item_id),
            )
        )

    async def list_alerts(self, *, user_id: str | None = None, limit: int = 100) -> list[Alert]:
        def run(conn: sqlite3.Connection) -> list[Alert]:
            rows = conn.execute(
                f"SELECT {ALERT_COLUMNS} FROM notifications n "
                "WHERE ? IS NULL OR n.user_id = ? "
                "ORDER BY n.created_at DESC, n.user_id, n.kind, n.threshold LIMIT ?",
                (user_id, user_id, limit),
            ).fetchall()
            crossings = [(_crossing(row), datetime.fromisoformat(row[6])) for row in rows]
            keys = {(c.user_id, c.limit, c.period, c.threshold) for c, _ in crossings}
            found = []
            for row in conn.execute(
                f"SELECT {DELIVERY_COLUMNS} FROM alert_outbox o "
                + ("" if user_id is None else "WHERE o.user_id = ? ")
                + "ORDER BY o.channel",
                () if user_id is None else (user_id,),
            ):
                key = (row[0], row[1], row[2], row[3])  # user, limit, period, threshold
                if key in keys:
                    channel, attempts, last_error, delivered_at, next_attempt_at = row[4:]
                    stamp = datetime.fromisoformat(delivered_at) if delivered_at else None
                    found.append(
                        (key, delivery(channel, attempts, last_error, stamp, next_attempt_at))
                    )
            return alerts_with_deliveries(crossings, found)

        return await self._run(run)

    async def daily(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> list[DailyUsage]:
        sql = f"SELECT {DAILY_COLUMNS} FROM usage_daily WHERE day >= ? AND day <= ?"
        params: list[Any] = [start.isoformat(), end.isoformat()]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        sql += " ORDER BY day, user_id"
        return await self._run(
            lambda conn: [_daily(row) for row in conn.execute(sql, params).fetchall()]
        )

    async def events(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> AsyncIterator[UsageEvent]:
        # Keyset pagination on seq: each batch is a short read, so a long export
        # never holds a transaction open against the writers.
        sql = (
            f"SELECT seq, {EVENT_COLUMNS} FROM usage_events WHERE day >= ? AND day <= ? AND seq > ?"
        )
        params: list[Any] = [start.isoformat(), end.isoformat()]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        sql += f" ORDER BY seq LIMIT {_EXPORT_BATCH}"
        last = 0
        while True:
            page = [*params[:2], last, *params[2:]]
            rows = await self._run(functools.partial(_fetchall, sql=sql, params=page))
            for row in rows:
                yield _event(row[1:])
            if len(rows) < _EXPORT_BATCH:
                return
            last = rows[-1][0]

    async def iter_daily(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> AsyncIterator[DailyUsage]:
        # Keyset pagination on the primary key order (day, user_id).
        where = "day >= ? AND day <= ? AND (day > ? OR (day = ? AND user_id > ?))"
        extra: list[Any] = []
        if user_id is not None:
            where += " AND user_id = ?"
            extra.append(user_id)
        sql = f"SELECT {DAILY_COLUMNS} FROM usage_daily WHERE {where} ORDER BY day, user_id LIMIT {_EXPORT_BATCH}"
        after = ("", "")
        while True:
            params = [start.isoformat(), end.isoformat(), after[0], after[0], after[1], *extra]
            rows = await self._run(functools.partial(_fetchall, sql=sql, params=params))
            for row in rows:
                yield _daily(row)
            if len(rows) < _EXPORT_BATCH:
                return
            after = (rows[-1][1], rows[-1][0])

    async def count_events(self, start: date, end: date, *, user_id: str | None = None) -> int:
        sql = "SELECT count(*) FROM usage_events WHERE day >= ? AND day <= ?"
        params: list[Any] = [start.isoformat(), end.isoformat()]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        return await self._run(lambda conn: int(conn.execute(sql, params).fetchone()[0]))

    async def usage_by_model(self, user_id: str, *, start: date, end: date) -> list[UsageGroup]:
        params = (user_id, start.isoformat(), end.isoformat())
        return await self._run(
            lambda conn: [
                usage_group(row, Decimal(row[7] or "0"))
                for row in conn.execute(_USAGE_BY_MODEL, params).fetchall()
            ]
        )

    async def usage_by_upstream(self, user_id: str, *, start: date, end: date) -> list[UsageGroup]:
        return await self._by_upstream(_USAGE_BY_UPSTREAM, user_id, start, end)

    async def team_usage_by_upstream(
        self, team_id: str, *, start: date, end: date
    ) -> list[UsageGroup]:
        return await self._by_upstream(_TEAM_USAGE_BY_UPSTREAM, team_id, start, end)

    async def _by_upstream(self, sql: str, who: str, start: date, end: date) -> list[UsageGroup]:
        params = (who, start.isoformat(), end.isoformat())
        return await self._run(
            lambda conn: [
                usage_group(row, Decimal(row[7] or "0"))
                for row in conn.execute(sql, params).fetchall()
            ]
        )

    async def costs_by_currency(self) -> dict[str, Decimal]:
        return await self._run(
            lambda conn: {
                row[0]: Decimal(row[1] or "0")
                for row in conn.execute(_COSTS_BY_CURRENCY).fetchall()
            }
        )

    # --- ownership (issue 20, default deny) ---

    async def answer_owner(self, answer_id: str) -> AnswerOwner | None:
        answer_id = stored_id(answer_id)  # as it was recorded (usage_bounds)
        # answer_id is UNIQUE (0001_init.sql): one index probe.
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT user_id, upstream, created_at FROM usage_events WHERE answer_id = ?",
                (answer_id,),
            ).fetchone()
        )
        if row is None:
            return None
        return AnswerOwner(str(row[0]), str(row[1]), datetime.fromisoformat(row[2]))

    async def conversation_upstream(self, user_id: str, conversation_id: str) -> str | None:
        conversation_id = stored_id(conversation_id)  # as it was recorded
        # usage_events_conversation_idx (0017): one index probe.
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT upstream FROM usage_events WHERE user_id = ? AND conversation_id = ? "
                "ORDER BY seq LIMIT 1",
                (user_id, conversation_id),
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def remember_conversation(
        self,
        user_id: str,
        conversation_id: str,
        features: ConversationFeatures,
        *,
        upstream: str,
        now: datetime,
    ) -> None:
        conversation_id = stored_id(conversation_id)  # an indexed key (stored_id)
        # Only for a user who is there, as remember_upload's (0022, 0023).
        row = (
            conversation_id,
            upstream,
            int(features.advanced_rag),
            int(features.web_search),
            int(features.web_off),
            _ts(now),
            user_id,
        )
        await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO conversation_features (user_id, conversation_id, upstream, "
                "advanced_rag, web_search, web_off, created_at) "
                "SELECT id, ?, ?, ?, ?, ?, ? FROM users WHERE id = ? "
                "ON CONFLICT (user_id, conversation_id) DO NOTHING",
                row,
            )
        )

    async def conversation_features(
        self, user_id: str, conversation_id: str
    ) -> ConversationFeatures | None:
        conversation_id = stored_id(conversation_id)  # as it was recorded
        # The primary key: one index probe.
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT advanced_rag, web_search, web_off FROM conversation_features "
                "WHERE user_id = ? AND conversation_id = ?",
                (user_id, conversation_id),
            ).fetchone()
        )
        if row is None:
            return None
        return ConversationFeatures(bool(row[0]), bool(row[1]), bool(row[2]))

    async def remember_upload(
        self, upload_id: str, *, user_id: str, upstream: str, now: datetime
    ) -> None:
        # Only for a user who is there (0022): an upload answered after its
        # user's deletion is not kept for whoever is made again under the id.
        row = (upload_id, upstream, _ts(now), user_id)
        await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO upload_owners (upload_id, user_id, upstream, created_at) "
                "SELECT ?, id, ?, ? FROM users WHERE id = ? ON CONFLICT (upload_id) DO NOTHING",
                row,
            )
        )

    async def upload_owners(self, upload_ids: Collection[str]) -> dict[str, str]:
        if not upload_ids:
            return {}
        # The ids as one JSON parameter, however many a request names (SQLite
        # bounds the number of parameters of a statement); the primary key
        # finds each.
        ids = orjson.dumps(list(upload_ids)).decode()
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT upload_id, user_id FROM upload_owners "
                "WHERE upload_id IN (SELECT value FROM json_each(?))",
                (ids,),
            ).fetchall()
        )
        return {str(row[0]): str(row[1]) for row in rows}

    # --- human-input resumes (issue 20) ---

    async def remember_forms(self, forms: Sequence[PausedForm], *, now: datetime) -> None:
        rows = [(f.token_hash, f.run_id, f.user_id, _ts(now)) for f in forms]
        cutoff = _ts(now - timedelta(days=PAUSED_FORM_DAYS))

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO paused_forms (token_hash, run_id, user_id, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (token_hash) DO NOTHING",
                rows,
            )
            conn.execute("DELETE FROM paused_forms WHERE created_at < ?", (cutoff,))

        await self._tx(run)

    async def paused_form(self, token_hash: str) -> PausedForm | None:
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT run_id, user_id FROM paused_forms WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        )
        return None if row is None else PausedForm(token_hash, str(row[0]), str(row[1]))
