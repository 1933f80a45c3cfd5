"""The PostgreSQL backend (asyncpg): production, any number of gateway replicas.

Every operation on the request path is ONE statement, so one round trip:
admission is one call of ``gateway_admit``, which checks and reserves under the
user's admission lock (a transaction's advisory lock: that is what makes it
exact across replicas; settles do not take it, nor write the day row and the
per-model counter rows admissions write - migration 0023), and settle is one
call of ``gateway_settle`` that claims the answer's pending row, writes the
ledger row, the day row and the lifetime totals, releases the lease and decides
the alert crossings, in one transaction (see the migrations under
sql/postgres). A second settle of the same answer blocks on the
pending row (or the ledger's unique index) until the first commits, then finds
it gone and so changes nothing.

Admissions and settles are group-committed (gateway/storage/group.py): those
made while an earlier batch is in flight go together in one call of
``gateway_admit_many`` or ``gateway_settle_many`` (migration 0010), which
decide and write them set by set, as exactly as the calls one after another, in
one transaction; a batch of one they hand to the single function. So under load
an answer costs a fraction of a round trip and of a commit.

Admission also reserves a web search for a request that asks for one, in the
same call; settle replaces the reservation with what the answer used, and a
settle whose pending row a recovery took supersedes the estimate it charged
(migration 0011). A settle batch holding such a settle goes element by element.

asyncpg errors are mapped to `StorageError` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import asyncpg
import orjson

from gateway.errors import Conflict, NotFound, RecordRefused, StorageError
from gateway.quota.limits import METERS, PERS, Limit, Meter, Per, counters_from, rate_counts
from gateway.storage import functions, migrations
from gateway.storage.base import (
    ALERT_COLUMNS,
    COSTS_BY_CURRENCY_SELECT,
    DAILY_COLUMNS,
    DELIVERY_COLUMNS,
    EVENT_COLUMNS,
    KEY_COLUMNS,
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
    Delivery,
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
    delivery,
    model_counters,
    rate_buckets,
    stored_id,
    team_daily,
    team_summary,
    usage_group,
)
from gateway.storage.group import GroupCommit, SplitBatch

log = logging.getLogger("gateway.storage")

# An arbitrary constant naming the advisory lock that serialises migrations
# between processes starting at the same time.
_MIGRATION_LOCK = 0x6761_7465_7761_79
# A migration's statements are not held to database.command_timeout (5 s, meant
# for requests): one may rebuild a large table's index (0023: about 2.5 s per
# 1.5 million day rows), and one cancelled rolls the start-up's migration back,
# at every start. A process starting meanwhile waits as long for the lock.
_MIGRATION_TIMEOUT = 3600.0
_EXPORT_BATCH = 1000


# An upload given back once (its key row goes with it): a retry does nothing.
# Uploads are counted in the admissions' row of the day (part 0, 0023).
_RELEASE_UPLOAD = (
    "WITH held AS (DELETE FROM upload_reservations WHERE id = $1 AND user_id = $2 "
    "RETURNING day, size) "
    "UPDATE usage_daily u SET uploads = u.uploads - 1, "
    "upload_bytes = greatest(u.upload_bytes - held.size, 0) "
    "FROM held WHERE u.user_id = $2 AND u.day = held.day AND u.part = 0 AND u.uploads > 0"
)
# A user's day is two rows, the admissions' and the settles' (0023): its usage
# is their sum, DAILY_COLUMNS' names and types, grouped by (user_id, day).
_DAILY_SUMS = "user_id, day, " + ", ".join(
    f"sum({c}){'' if c == 'cost' else '::bigint'} AS {c}" for c in DAILY_COLUMNS.split(", ")[2:]
)
_RESERVE_UPLOAD = "SELECT * FROM gateway_reserve_upload($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
# A batch is at most this many calls by default (database.max_batch): past a
# few dozen a larger batch saves little, and a batch holds its users' locks
# until it commits.
DEFAULT_MAX_BATCH = 64
# Plans' limit sets whose array literals are kept (PostgresStorage._limit_texts):
# more than any configuration has plans and teams' plans, times a few reloads.
_LIMIT_LITERALS_KEPT = 256


def _call(select: str, fields: Sequence[str], arrays: dict[str, str] | None = None) -> str:
    """`select` applied to one parameter per field, $1 to $len(fields); a field
    named in `arrays` is sent as the text of an array of that type (_numbers,
    _texts)."""
    arrays = arrays or {}
    return f"{select}({', '.join(_param(n, arrays.get(f)) for n, f in enumerate(fields, 1))})"


def _param(number: int, array: str | None) -> str:
    # $n::text::T[]: the parameter is text (asyncpg sends a str as it is) and
    # PostgreSQL's array_in reads it. asyncpg's array encoder walks each element
    # through isinstance checks against the collections ABCs, one Python-level
    # call or two each: 6-8% of an answer's instructions on PostgreSQL when the
    # admission and the settle sent their arrays that way (issue 24; measured
    # with bench.grind), a quarter of a batch's.
    return f"${number}" if array is None else f"${number}::text::{array}[]"


def _numbers(values: Iterable[int | Decimal]) -> str:
    """An array literal of numbers (str of an int or a Decimal is what
    PostgreSQL's numeric and integer input read, exponents included)."""
    return "{" + ",".join(map(str, values)) + "}"


def _texts(values: Iterable[str | None]) -> str:
    """An array literal of texts: each element quoted, its quotes and
    backslashes escaped (the array input syntax), None as NULL."""
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )


def _nullable(values: Iterable[int | Decimal | float | None]) -> str:
    """An array literal of numbers, None as NULL (str of a float is what
    PostgreSQL's float input reads, inf and nan included)."""
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def _bools(values: Iterable[bool | None]) -> str:
    return "{" + ",".join("NULL" if v is None else "t" if v else "f" for v in values) + "}"


# Each SQL type's literal: a batch sends its columns as literals too, but its
# dates and times (_BINARY).
_LITERALS: dict[str, Callable[[Any], str]] = {
    "text": _texts,
    "boolean": _bools,
    "smallint": _nullable,
    "integer": _nullable,
    "bigint": _nullable,
    "numeric": _nullable,
    "double precision": _nullable,
}


def _joined(literals: Iterable[str]) -> str:
    """The array literals' elements as one literal, in order."""
    return "{" + ",".join(x[1:-1] for x in literals if x != "{}") + "}"


class _Limits(NamedTuple):
    """Limits as gateway_admit takes them, as array literals (_param): meter and
    window numbers (1-based, in quota.METERS and quota.PERS order), maximums,
    scopes (1 user, 2 team) and per-model counter keys."""

    meters: str
    pers: str
    maxes: str
    scopes: str
    keys: str


def _limit_texts(limits: Sequence[Limit]) -> _Limits:
    return _Limits(
        _numbers([METERS.index(limit.meter) + 1 for limit in limits]),
        _numbers([PERS.index(limit.per) + 1 for limit in limits]),
        _numbers([limit.max for limit in limits]),
        _numbers([2 if limit.scope == "team" else 1 for limit in limits]),
        _texts([limit.counter_key for limit in limits]),
    )


class _AdmitCall(NamedTuple):
    """One admission: gateway_admit's arguments, in its order (the limits are
    five arrays there, sent as text: _Limits)."""

    user_id: str
    day: date
    month_start: date
    meters: str
    pers: str
    maxes: str
    scopes: str
    keys: str
    lease_id: str | None
    lease_expires: datetime | None
    now: datetime
    advanced_rag: bool
    pending_id: str | None
    endpoint: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cost: Decimal | None
    currency: str | None
    web_ask: bool
    web_optional: bool
    reserve_cost: Decimal
    team: str | None
    upstream: str  # the upstream the answer is sent to, for its pending row


class _Admit(NamedTuple):
    """An admission waiting for its batch: its call, and the limits its arrays
    were made from (to read the counters gateway_admit answers with)."""

    call: _AdmitCall
    limits: tuple[Limit, ...]


class _SettleCall(NamedTuple):
    """One settle: gateway_settle's arguments, in its order. Each alert check
    (`AlertCheck` and one of its thresholds) is the same element of kinds,
    periods, values, thresholds and specs."""

    answer_id: str
    user_id: str
    day: date
    created_at: datetime
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Decimal
    currency: str
    outcome: str
    estimated: bool
    web_searches: int
    conversation_id: str | None
    request_id: str | None
    upstream_latency_ms: float | None
    overhead_ms: float | None
    lease_id: str | None
    pending_id: str | None
    model: str | None
    cached_tokens: int
    reasoning_tokens: int
    month_start: date | None
    kinds: str
    periods: str
    values: str
    thresholds: str
    channels: str
    cache_write_tokens: int
    upstream: str
    specs: str


class _Settle(NamedTuple):
    """A settle waiting for its batch: its call (its arrays sent as text, _param),
    and how many alert checks and channels those hold."""

    call: _SettleCall
    checks: int
    channels: int


# A settle without alert checks: its arrays, empty.
_NO_CHECKS = ("{}", "{}", "{}", "{}", "{}")


# The group-commit functions (0010) take each call's arguments as arrays, in the
# single function's order, except that each call's lists (its limits; its alert
# checks and channels) become a slice (from, count) of arrays the batch shares.
_LIMITS = slice(_AdmitCall._fields.index("meters"), _AdmitCall._fields.index("lease_id"))
_CHECKS = slice(_SettleCall._fields.index("kinds"), _SettleCall._fields.index("cache_write_tokens"))
_SPECS = _SettleCall._fields.index("specs")
_ADMIT_MANY_ARGS = (
    *_AdmitCall._fields[: _LIMITS.start],
    "limit_from",
    "limit_count",
    *_AdmitCall._fields[_LIMITS],
    *_AdmitCall._fields[_LIMITS.stop :],
)
_SETTLE_MANY_ARGS = (
    *_SettleCall._fields[: _CHECKS.start],
    "check_from",
    "check_count",
    "channel_from",
    "channel_count",
    *_SettleCall._fields[_CHECKS],
    *_SettleCall._fields[_CHECKS.stop :],
)
# The SQL types of the functions' parameters (of the arrays' elements in the
# group-commit functions).
_ADMIT_TYPES = dict(
    zip(
        _ADMIT_MANY_ARGS,
        (
            *("text", "date", "date", "integer", "integer"),
            *("smallint", "smallint", "numeric", "smallint", "text"),
            *("text", "timestamptz", "timestamptz", "boolean", "text", "text"),
            *("bigint", "bigint", "bigint", "numeric", "text"),
            *("boolean", "boolean", "numeric", "text", "text"),
        ),
        strict=True,
    )
)
_SETTLE_TYPES = dict(
    zip(
        _SETTLE_MANY_ARGS,
        (
            *("text", "text", "date", "timestamptz", "text", "bigint", "bigint", "bigint"),
            *("numeric", "text", "text", "boolean", "integer", "text", "text"),
            *("double precision", "double precision", "text", "text", "text"),
            *("bigint", "bigint", "date", "integer", "integer", "integer", "integer"),
            *("text", "text", "numeric", "integer", "text", "bigint", "text", "text"),
        ),
        strict=True,
    )
)
_ADMIT_ARRAYS = {f: _ADMIT_TYPES[f] for f in _AdmitCall._fields[_LIMITS]}
_SETTLE_ARRAYS = {f: _SETTLE_TYPES[f] for f in (*_SettleCall._fields[_CHECKS], "specs")}
_ADMIT = _call("SELECT * FROM gateway_admit", _AdmitCall._fields, _ADMIT_ARRAYS)
# A batch of one: gateway_admit with p_batched (an unknown user is known =
# false, under the batches' lock timeout).
_ADMIT_BATCHED = _ADMIT.removesuffix(")") + ", true)"
_SETTLE = _call("SELECT gateway_settle", _SettleCall._fields, _SETTLE_ARRAYS)
# A batch of one: gateway_settle with p_batched (under the batches' lock timeout).
_SETTLE_BATCHED = _SETTLE.removesuffix(")") + ", true)"
# A batch's columns go as literals, but its dates and times: asyncpg walks an
# array of them for less than their isoformat costs here, and PostgreSQL reads
# them in binary for a fraction of parsing their text (about 0.5 us a
# timestamp). Measured with a batch of 50 (client instructions per answer,
# under callgrind): every column an array 406k, every one a literal 315k,
# these as arrays 302k; texts or numbers as arrays too, 342k and 354k.
_BINARY = ("date", "timestamptz")
_ADMIT_MANY_ARRAYS = {
    f: t for f, t in _ADMIT_TYPES.items() if t not in _BINARY or f in _ADMIT_ARRAYS
}
_SETTLE_MANY_ARRAYS = {
    f: t for f, t in _SETTLE_TYPES.items() if t not in _BINARY or f in _SETTLE_ARRAYS
}
_ADMIT_MANY = _call("SELECT * FROM gateway_admit_many", _ADMIT_MANY_ARGS, _ADMIT_MANY_ARRAYS)
_SETTLE_MANY = _call("SELECT * FROM gateway_settle_many", _SETTLE_MANY_ARGS, _SETTLE_MANY_ARRAYS)
# The columns of a batch made literals from the calls' values (the others are
# the calls' literals joined, or made by the batch).
_ADMIT_COLUMNS = [
    (at, _LITERALS[_ADMIT_TYPES[field]])
    for at, field in enumerate(_AdmitCall._fields)
    if field in _ADMIT_MANY_ARRAYS and field not in _ADMIT_ARRAYS
]
_SETTLE_COLUMNS = [
    (at, _LITERALS[_SETTLE_TYPES[field]])
    for at, field in enumerate(_SettleCall._fields)
    if field in _SETTLE_MANY_ARRAYS and field not in _SETTLE_ARRAYS
]


def _admit_many_args(admits: Sequence[_Admit]) -> list[Any]:
    """gateway_admit_many's arguments for these admissions (_ADMIT_MANY_ARGS)."""
    columns: list[Any] = list(zip(*(admit.call for admit in admits), strict=True))
    for at, literal in _ADMIT_COLUMNS:
        columns[at] = literal(columns[at])
    limit_from: list[int] = []
    limit_count: list[int] = []
    meters: list[str] = []
    pers: list[str] = []
    maxes: list[str] = []
    scopes: list[str] = []
    keys: list[str] = []
    count = 0
    last: _AdmitCall | None = None
    for admit in admits:
        call = admit.call
        # A call with the same limits as the one before it (one plan's users)
        # shares its slice: the function slices the arrays once per set.
        if (
            last is not None
            and call.meters == last.meters
            and call.pers == last.pers
            and call.maxes == last.maxes
            and call.scopes == last.scopes
            and call.keys == last.keys
        ):
            limit_from.append(limit_from[-1])
            limit_count.append(limit_count[-1])
            continue
        last = call
        limit_from.append(count + 1)
        limit_count.append(len(admit.limits))
        count += len(admit.limits)
        meters.append(call.meters)
        pers.append(call.pers)
        maxes.append(call.maxes)
        scopes.append(call.scopes)
        keys.append(call.keys)
    return [
        *columns[: _LIMITS.start],
        _numbers(limit_from),
        _numbers(limit_count),
        _joined(meters),
        _joined(pers),
        _joined(maxes),
        _joined(scopes),
        _joined(keys),
        *columns[_LIMITS.stop :],
    ]


def _settle_many_args(settles: Sequence[_Settle]) -> list[Any]:
    """gateway_settle_many's arguments for these settles (_SETTLE_MANY_ARGS)."""
    columns: list[Any] = list(zip(*(settle.call for settle in settles), strict=True))
    for at, literal in _SETTLE_COLUMNS:
        columns[at] = literal(columns[at])
    check_from: list[int] = []
    check_count: list[int] = []
    channel_from: list[int] = []
    channel_count: list[int] = []
    checks = channels = 0
    for settle in settles:
        check_from.append(checks + 1)
        check_count.append(settle.checks)
        checks += settle.checks
        channel_from.append(channels + 1)
        channel_count.append(settle.channels)
        channels += settle.channels
    return [
        *columns[: _CHECKS.start],
        _numbers(check_from),
        _numbers(check_count),
        _numbers(channel_from),
        _numbers(channel_count),
        *(_joined(column) for column in columns[_CHECKS]),
        *columns[_CHECKS.stop : _SPECS],
        _joined(columns[_SPECS]),
    ]


_REFUND = "SELECT gateway_refund($1, $2, $3, $4)"
# The admissions' locks, taken in the order the admission functions take them
# (0023): the teams' rows (by id), then the users' admission locks (by user id,
# in the database's order of text, as gateway_admit_many goes through its
# users; each once). The subqueries are kept apart (OFFSET 0) so that the
# locks are taken row by row in their order. Taken by a give-back whose
# statement's backend is not known (which only orders it after an admission
# that holds them or waits for them already).
_TEAM_LOCKS = (
    "SELECT count(*) FROM (SELECT 1 FROM teams WHERE id = ANY($1::text[]) "
    "ORDER BY id FOR NO KEY UPDATE) AS t"
)
_ADMISSION_LOCKS = (
    "SELECT count(pg_advisory_xact_lock(hashtextextended(u, 24))) "
    "FROM (SELECT DISTINCT u FROM unnest($1::text[]) AS u ORDER BY u OFFSET 0) AS s"
)
# Admissions given back by their pending rows (gateway_refund gives back only
# while a pending row is there), a user's in turn, the users in lock order.
_REFUND_MANY = (
    "SELECT count(*) FILTER (WHERE r) FROM (SELECT gateway_refund(u, d, l, p) AS r "
    "FROM (SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::text[]) "
    "WITH ORDINALITY AS t(u, d, l, p, o) ORDER BY u, o OFFSET 0) AS e) AS g"
)
# The backend that ran a statement whose outcome was lost, ended, and waited for
# (up to the milliseconds given; PostgreSQL 14): once it is gone its transaction
# has committed or never will, whatever it was waiting for (a lock, the
# statement's own bytes still on their way, a table a migration holds). True
# when it is gone (or was: no such backend), False when it outlived the wait.
# A backend is its pid and its start, as it told them when its connection
# opened (`_init_connection`): a pid the system gave again is not ended.
_END_BACKEND = (
    "SELECT coalesce(bool_and(pg_terminate_backend(pid, $3)), true) FROM pg_stat_activity "
    "WHERE pid = $1 AND backend_start = $2"
)
# Whether a backend is there still (`_ended`).
_BACKEND_THERE = "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2"
# The same, not waited for: sent as soon as the statement is given up, so that
# it does not go on holding a backend and its user's lock (closing the
# connection at once left asyncpg's CancelRequest unsent: review of cc2a490).
_KILL_BACKEND = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2"
)
# How long a give-back waits for the backend it ends (ended, it has let go of
# any lock it waited for at once; only a commit's flush can make it wait). Past
# this the give-back fails (a warning) and the pending rows stay for a recovery.
_GIVE_BACK_WAIT = 30.0
# Give-backs under way at once, each on a connection of the pool: a database
# that times statements out by the hundred (a brownout) must not have its
# give-backs take the pool from everything else (review of the unknown outcome).
_GIVE_BACKS_AT_ONCE = 2
# How long close() waits for the give-backs still under way (each may wait up
# to _GIVE_BACK_WAIT for its backend, two at a time; a database gone dark makes
# every one of them wait out its timeouts). Past it they are cancelled, their
# pending rows left to a recovery, as a give-back that fails leaves them: a
# shutdown is not held for minutes (nor cut by the supervisor's SIGKILL, past
# what the settler flushed). The same bound as the runtime's other shutdown steps.
CLOSE_GRACE = 10.0
# What an admission statement may have raised after it committed all the same
# (its outcome unknown): a timeout - asyncpg's command_timeout sends a
# CancelRequest and raises at once, and the cancellation may be lost, or come
# after the commit - or its connection lost mid-statement (class 08: the server
# may have committed before it noticed). An error the server reported rolled the
# statement back (a refused value, a constraint, the batches' lock timeout).
_OUTCOME_UNKNOWN = (TimeoutError, OSError, asyncpg.PostgresConnectionError)
_DROP_FUNCTIONS = """
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema() AND p.proname LIKE 'gateway\\_%'
    LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$
"""
_RECOVER = "SELECT * FROM gateway_recover($1, $2, $3)"
_USAGE_BY_MODEL = MODEL_USAGE_SELECT.format(cost_sum="sum(cost)", p1="$1", p2="$2", p3="$3")
_MODEL_COUNTERS = MODEL_COUNTERS_SELECT.format(
    total="sum", p1="$1", p2="$2", p3="$3", keys="= ANY($4)"
)
_USAGE_BY_UPSTREAM = UPSTREAM_USAGE_SELECT.format(
    cost_sum="sum(cost)", who=USER_ROWS.format(p1="$1"), p2="$2", p3="$3"
)
_TEAM_USAGE_BY_UPSTREAM = UPSTREAM_USAGE_SELECT.format(
    cost_sum="sum(cost)", who=TEAM_ROWS.format(p1="$1"), p2="$2", p3="$3"
)
_TEAM_DAILY = TEAM_DAILY_SELECT.format(cost_sum="sum(d.cost)", p1="$1", p2="$2", p3="$3")
_TEAM_LIST = TEAM_LIST_SELECT.format(cost_sum="coalesce(sum(d.cost), 0)", p1="$1")
_COSTS_BY_CURRENCY = COSTS_BY_CURRENCY_SELECT.format(cost_sum="sum(cost)")


def _batch_args(make: Callable[[Sequence[Any]], list[Any]], calls: Sequence[Any]) -> list[Any]:
    """A batch's arguments; a call holding a value of the wrong type (which the
    literals cannot format, and asyncpg refuses) splits the batch, as asyncpg's
    refusal of it would: only that call fails."""
    try:
        return make(calls)
    except (AttributeError, TypeError, ValueError) as exc:
        raise SplitBatch(f"{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _mapped_batch() -> Iterator[None]:
    """Like `_mapped`, but an error that one call of a batch can cause - a value
    refused, a constraint, a deadlock the database broke - splits the batch into
    its calls (gateway/storage/group.py) instead of failing all of them."""
    try:
        yield
    except (
        asyncpg.DataError,
        asyncpg.ProgramLimitExceededError,  # a value past an index entry's size
        asyncpg.IntegrityConstraintViolationError,
        asyncpg.TransactionRollbackError,
        asyncpg.LockNotAvailableError,  # the batch's lock_timeout (0010)
    ) as exc:
        raise SplitBatch(f"{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _refused_record() -> Iterator[None]:
    """A settle the database refuses for a value its record holds - one it cannot
    take (class 22, data exception) or index (class 54: an id past a b-tree
    entry's size) - is refused for good: sent again it fails again. Taken for an
    outage, it was retried, spooled, and stopped every replay of the spool at
    its line for good (review-rec REC-2). For a settle on its own: a batch it is
    in splits first (`_mapped_batch`)."""
    try:
        yield
    except (asyncpg.DataError, asyncpg.ProgramLimitExceededError) as exc:
        raise RecordRefused(f"PostgreSQL refuses it: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """Map asyncpg and socket errors to the gateway's storage errors."""
    try:
        yield
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound("unknown user") from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise StorageError(f"PostgreSQL error: {type(exc).__name__}: {exc}") from exc


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset hook: nothing to reset.

    By default asyncpg resets every connection it takes back (RESET ALL, UNLISTEN,
    unlock advisory locks...): one more round trip per statement, which doubled
    the database round trips of every answer (measured in docs/performance.md).
    The gateway leaves no session state behind - no SET but the one every
    connection makes when it opens (`_init_connection`), no LISTEN, cursors or
    session-level advisory locks (migrations lock per transaction) - and asyncpg
    still rolls back a transaction left open before calling this.
    """


# Backends by pid, as each told its start when its connection opened: a
# statement given up has its backend ended by both (`_END_BACKEND`). A pid the
# server gives again is noted again when its connection opens. (By pid alone:
# one database server per process, as `gateway serve` runs.)
_BACKEND_STARTS: dict[int, datetime] = {}
_BACKENDS_NOTED = 65536  # past this many pids (months of new connections), forgotten


async def _init_connection(conn: asyncpg.Connection) -> None:
    # The array literals (_param) write NULL unquoted, which PostgreSQL reads as
    # NULL only under array_nulls = on (its default; a database or role may turn
    # it off). Set for the connection's life, whatever those defaults: a SET
    # (set_config), not a startup parameter, which a pooler such as PgBouncer may
    # refuse. In the same round trip, the backend's pid and start: behind a
    # pooler, the pid asyncpg was told is the pooler's, not the backend's, and
    # nothing is noted (a give-back then goes by the admission's locks).
    row = await conn.fetchrow(
        "SELECT set_config('array_nulls', 'on', false), pg_backend_pid(), "
        "(SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())"
    )
    assert row is not None
    if row[1] == conn.get_server_pid() and row[2] is not None:
        if len(_BACKEND_STARTS) >= _BACKENDS_NOTED:
            _BACKEND_STARTS.clear()
        _BACKEND_STARTS[row[1]] = row[2]
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
    )


def _user(row: Any) -> User:
    return User(
        id=row[0],
        plan=row[1],
        overrides=row[2],
        lifetime_prompt_tokens=row[3],
        lifetime_completion_tokens=row[4],
        lifetime_tokens=row[5],
        lifetime_cost=row[6],
        created_at=row[7],
        team=row[8],
    )


def _team(row: Any) -> Team:
    return Team(id=row[0], plan=row[1], overrides=row[2], created_at=row[3])


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row[0], user_id=row[1], name=row[2], prefix=row[3], created_at=row[4], revoked_at=row[5]
    )


def _daily(row: Any) -> DailyUsage:
    return DailyUsage(*row)


def _event(row: Any) -> UsageEvent:
    return UsageEvent(*row)


def _admission(row: Any, limits: Sequence[Limit]) -> Admission:
    rates = row["rate_used"]
    counters = counters_from(
        row["day_used"],
        row["month_used"],
        row["open_streams"] or 0,
        {
            (limit.meter, limit.per): rates[at]
            for at, limit in enumerate(limits)
            if limit.is_rate and limit.scope == "user" and rates is not None
        },
        models={
            (key, limit.meter, limit.per): rates[at]
            for at, limit in enumerate(limits)
            if (key := limit.counter_key) is not None and rates is not None
        },
        team=(
            counters_from(
                row["team_day"],
                row["team_month"],
                row["team_streams"] or 0,
                {
                    (limit.meter, limit.per): rates[at]
                    for at, limit in enumerate(limits)
                    if limit.is_rate and limit.scope == "team" and rates is not None
                },
            )
            if row["team_day"] is not None
            else None
        ),
    )
    refused = row["refused"]
    return admission(
        limits,
        None if refused is None else refused - 1,
        counters,
        1 if row["web_reserved"] else 0,
        retry_after=row["retry_after"],
    )


def _limit_arrays(
    limits: Sequence[Limit],
) -> tuple[list[int], list[int], list[Decimal], list[int], list[str | None]]:
    """Limits as gateway_admit takes them: meter and window numbers (1-based, in
    quota.METERS and quota.PERS order), maximums, scopes (1 user, 2 team) and
    per-model counter keys."""
    return (
        [METERS.index(limit.meter) + 1 for limit in limits],
        [PERS.index(limit.per) + 1 for limit in limits],
        [limit.max for limit in limits],
        [2 if limit.scope == "team" else 1 for limit in limits],
        [limit.counter_key for limit in limits],
    )


def _admitted_user(admit: _Admit) -> str:
    return admit.call.user_id


Backend = tuple[int, datetime]  # a backend's pid and start


def _backend_of(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> Backend | None:
    """The backend of ``conn`` (noted before a statement: a connection lost
    cannot tell it); None behind a pooler."""
    pid = conn.get_server_pid()
    start = _BACKEND_STARTS.get(pid)
    return None if start is None else (pid, start)


def _given_up(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    """Close ``conn``, whose statement was given up with its outcome unknown:
    it is never used again, whatever became of its CancelRequest, and its
    backend (noted before the statement: a connection lost cannot tell it) can
    be ended and waited for."""
    with contextlib.suppress(asyncpg.InterfaceError):  # lost: given back to the pool already
        conn.terminate()


async def _ended(conn: asyncpg.pool.PoolConnectionProxy, backend: Backend) -> bool:
    """Whether ``backend`` is gone: ended and waited for (`_END_BACKEND`). Its
    false is checked again in a statement of its own: pg_terminate_backend
    answers false (with a warning) for a pid that is no backend any more, which
    the statement's view of pg_stat_activity (read once, at its start) could
    still show - a backend `_kill` ended a moment before."""
    if await conn.fetchval(
        _END_BACKEND, *backend, int(_GIVE_BACK_WAIT * 1000), timeout=_GIVE_BACK_WAIT + 5
    ):
        return True
    return not await conn.fetchval(_BACKEND_THERE, *backend)


def _usable(conn: asyncpg.pool.PoolConnectionProxy) -> bool:
    """Whether a connection kept out of the pool is still open (one the
    database closed, asyncpg gives back to the pool itself)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # given back already
        return False


def _settled_user(settle: _Settle) -> str:
    return settle.call.user_id


class PostgresStorage:
    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self._pool = pool
        self._admits: GroupCommit[_Admit, Admission] = GroupCommit(
            "admit",
            self._admit_many,
            self._admit_one,
            max_batch=max_batch,
            abandoned=self._admission_abandoned,
            lost=self._batch_lost,
            key=_admitted_user,
        )
        self._settles: GroupCommit[_Settle, bool] = GroupCommit(
            "settle", self._settle_many, self._settle_one, max_batch=max_batch, key=_settled_user
        )
        self._background: set[asyncio.Task[Any]] = set()
        self._give_back_slots = asyncio.Semaphore(_GIVE_BACKS_AT_ONCE)
        # The backends of admissions cancelled in flight, by id() of the
        # admission, until the batches' lost hook gives them back (`_batch_lost`).
        self._lost_backends: dict[int, Backend | None] = {}
        # Upload reservations whose outcome was lost, by key: their backends'
        # ending, which a release of the upload waits for (`release_upload`).
        self._ending: dict[str, tuple[Backend, asyncio.Task[bool]]] = {}
        # The same behind a pooler (no backend to wait for), by key: the team
        # whose row the reservation locked, if any; its release takes the
        # reservation's locks first (`release_upload`).
        self._unordered: dict[str, str | None] = {}
        self._limit_literals: dict[int, tuple[tuple[Limit, ...], _Limits]] = {}
        # Tuples admitted once, not yet kept (_limit_texts).
        self._limit_seen_once: dict[int, tuple[Limit, ...]] = {}
        # Connections the admission batches keep between them (at most the
        # batcher's in_flight): taken from the pool and given back through it
        # cost an admission two more turns of the event loop (asyncpg's release
        # runs as a shielded task of its own), each a wait behind every other
        # stream's callbacks (issue 24). One that failed goes back to the pool,
        # which closes it if it is broken.
        self._admit_connections: list[asyncpg.pool.PoolConnectionProxy] = []
        # At most a quarter of the pool (none of a pool under 4, so that a small
        # one is never held by admissions while a settle waits for it).
        self._keep = min(2, pool.get_max_size() // 4)
        self._closing = False
        self.close_grace = CLOSE_GRACE

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 5.0,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> PostgresStorage:
        with _mapped():
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                command_timeout=command_timeout,
                init=_init_connection,
                reset=_keep_session,
            )
        return cls(pool, max_batch=max_batch)

    async def close(self) -> None:
        # Calls still queued or in flight are answered before the pool goes.
        self._closing = True
        await self._admits.drain()
        await self._settles.drain()
        while self._admit_connections:
            await self._pool.release(self._admit_connections.pop())
        await self._give_backs_end(self.close_grace)
        await self._pool.close()

    async def _give_backs_end(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the give-backs under way (a
        give-back may start when what it gives back ends), then cancel those
        left: their pending rows stay for a recovery (`CLOSE_GRACE`). A close
        itself cancelled leaves them going (asyncio.wait cancels nothing)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._background:
            _, left = await asyncio.wait(
                set(self._background), timeout=max(deadline - loop.time(), 0)
            )
            if left:  # (all done, or the grace ran out)
                log.warning(
                    "%d give-back(s) still under way after %g s at close; cancelled: "
                    "a recovery will charge any admission that landed",
                    len(left),
                    grace,
                )
                for task in left:
                    task.cancel()
                await asyncio.gather(*left, return_exceptions=True)
                return

    @property
    def group_commit(self) -> dict[str, tuple[int, int]]:
        """Per operation, (batches, calls) sent so far: calls / batches is the
        mean batch size."""
        return {g.name: (g.batches, g.calls) for g in (self._admits, self._settles)}

    async def ping(self) -> None:
        with _mapped():
            await self._pool.fetchval("SELECT 1")

    async def database_time(self) -> datetime:
        # clock_timestamp(), not now(): the time the statement is read, not the
        # start of its transaction (gateway/skew.py brackets the round trip).
        with _mapped():
            at: datetime = await self._pool.fetchval("SELECT clock_timestamp()")
        return at

    async def migrate(self) -> int:
        with _mapped():
            if await self._migrated():
                return 0
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK, timeout=_MIGRATION_TIMEOUT
                )
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                applied = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                known = migrations("postgres")
                newer = sorted(applied - {version for version, _ in known})
                if newer:
                    # A database migrated by a newer release: its schema is not
                    # this code's, and this code's functions must not replace
                    # the newer ones (a rolling update's old pod restarting,
                    # docs/deploy.md). Nothing is changed; the process stops.
                    raise StorageError(
                        "the database was migrated by a newer release of the gateway "
                        f"(migration {', '.join(f'{v:04d}' for v in newer)} is unknown to "
                        f"this one, which knows up to {known[-1][0]:04d}): run the newer "
                        "release, or restore a backup taken before it migrated"
                    )
                count = 0
                for version, sql in known:
                    if version in applied:
                        continue
                    await conn.execute(sql, timeout=_MIGRATION_TIMEOUT)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", version
                    )
                    count += 1
                # The functions need the schema of migration 0023 (which renamed
                # 0015's schema_functions schema_function_set, so that an older
                # release's migrate - which installs its functions only when
                # schema_functions exists - leaves these in place); a database
                # held at an older version (a test of an old release's schema)
                # keeps the functions it has.
                digest, texts = functions("postgres")
                if await conn.fetchval("SELECT to_regclass('schema_function_set')") is None:
                    return count
                applied_hash = await conn.fetchval("SELECT hash FROM schema_function_set")
                # Whichever set differs is replaced, older or newer: what keeps an
                # older release from replacing a newer set is the check for an
                # unknown migration above, so every change to the functions
                # ships with a migration (`functions`; review-rec REC-4).
                if applied_hash != digest:
                    # The files go in name order; a function may call one whose
                    # file comes later (as pg_dump restores them).
                    await conn.execute("SET LOCAL check_function_bodies = off")
                    # Every function is defined anew (its signature may have
                    # changed): none from an older set is left behind.
                    await conn.execute(_DROP_FUNCTIONS, timeout=_MIGRATION_TIMEOUT)
                    for text in texts:
                        await conn.execute(text, timeout=_MIGRATION_TIMEOUT)
                    await conn.execute(
                        "INSERT INTO schema_function_set (id, hash) VALUES (1, $1) "
                        "ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, applied_at = now()",
                        digest,
                    )
                return count

    async def _migrated(self) -> bool:
        """Whether every migration and this release's functions are in already,
        in one statement: every start asks, and a database is usually migrated
        (five statements and a transaction fewer). Only when no migration is
        under way: the statement tries the migration lock, held for its
        transaction alone, and a migrate that finds it taken waits for it as
        before (a restarting old pod then sees what the new one migrated and
        stops, docs/deploy.md). A database without the functions' table
        (before 0023), or with a migration or functions this release does not
        know, takes the path that handles it."""
        try:
            row = await self._pool.fetchrow(
                "SELECT pg_try_advisory_xact_lock($1) AS free, "
                "ARRAY(SELECT version FROM schema_migrations) AS versions, "
                "(SELECT hash FROM schema_function_set) AS hash",
                _MIGRATION_LOCK,
            )
        except asyncpg.UndefinedTableError:
            return False
        assert row is not None
        known = {version for version, _ in migrations("postgres")}
        return (
            bool(row["free"])
            and set(row["versions"]) == known
            and row["hash"] == functions("postgres")[0]
        )

    # --- users --------------------------------------------------------------

    async def get_user(self, user_id: str) -> User | None:
        with _mapped():
            row = await self._pool.fetchrow(
                f"SELECT {USER_COLUMNS} FROM users u WHERE u.id = $1", user_id
            )
        return _user(row) if row else None

    async def ensure_user(self, user_id: str, *, plan: str) -> User:
        # The no-op update makes RETURNING yield the row whether it was inserted or
        # already there: one round trip either way.
        with _mapped():
            row = await self._pool.fetchrow(
                "INSERT INTO users AS u (id, plan) VALUES ($1, $2) "
                "ON CONFLICT (id) DO UPDATE SET id = u.id "
                f"RETURNING {USER_COLUMNS}",
                user_id,
                plan,
            )
        return _user(row)

    async def set_plan(self, user_id: str, plan: str) -> None:
        with _mapped():
            status = await self._pool.execute(
                "UPDATE users SET plan = $2 WHERE id = $1", user_id, plan
            )
        if status == "UPDATE 0":
            raise NotFound(f"no user {user_id!r}")

    async def set_override(self, user_id: str, name: str, value: OverrideValue) -> None:
        with _mapped():
            status = await self._pool.execute(
                "UPDATE users SET overrides = overrides || jsonb_build_object($2::text, $3::jsonb) WHERE id = $1",
                user_id,
                name,
                value,
            )
        if status == "UPDATE 0":
            raise NotFound(f"no user {user_id!r}")

    async def clear_override(self, user_id: str, name: str) -> None:
        with _mapped():
            status = await self._pool.execute(
                "UPDATE users SET overrides = overrides - $2::text WHERE id = $1", user_id, name
            )
        if status == "UPDATE 0":
            raise NotFound(f"no user {user_id!r}")

    @staticmethod
    def _user_filter(plan: str | None, search: str | None, first: int) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if plan is not None:
            params.append(plan)
            clauses.append(f"u.plan = ${first + len(params) - 1}")
        if search:
            params.append(search)
            clauses.append(f"strpos(lower(u.id), lower(${first + len(params) - 1})) > 0")
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
        where, params = self._user_filter(plan, search, first=4)
        order = f"{USER_SORTS[sort]} {'DESC' if descending else 'ASC'}, u.id ASC"
        daily = ", ".join(f"d.{c}" for c in DAILY_COLUMNS.split(", "))
        sql = (
            f"SELECT {USER_COLUMNS}, {daily} FROM users u "
            # Lateral: the page's users' day rows, read through the primary
            # key per user - a join with the day's sums grouped beforehand
            # summed every active user's rows before LIMIT cut the page.
            f"LEFT JOIN LATERAL (SELECT {_DAILY_SUMS} FROM usage_daily x "
            f"WHERE x.user_id = u.id AND x.day = $1 GROUP BY user_id, day) d ON true{where} "
            f"ORDER BY {order} LIMIT $2 OFFSET $3"
        )
        with _mapped():
            rows = await self._pool.fetch(sql, day, limit, offset, *params)
        return [
            UserSummary(
                user=_user(row[:USER_FIELDS]),
                today=_daily(row[USER_FIELDS:])
                if row[USER_FIELDS] is not None
                else DailyUsage(user_id=row[0], day=day),
            )
            for row in rows
        ]

    async def count_users(self, *, plan: str | None = None, search: str | None = None) -> int:
        where, params = self._user_filter(plan, search, first=1)
        with _mapped():
            return int(await self._pool.fetchval(f"SELECT count(*) FROM users u{where}", *params))

    # --- teams (issue 21) ----------------------------------------------------

    async def create_team(self, team_id: str, *, plan: str, now: datetime) -> Team:
        with _mapped():
            row = await self._pool.fetchrow(
                "INSERT INTO teams AS t (id, plan, created_at) VALUES ($1, $2, $3) "
                f"ON CONFLICT (id) DO NOTHING RETURNING {TEAM_COLUMNS}",
                team_id,
                plan,
                now,
            )
        if row is None:
            raise Conflict(f"a team {team_id!r} exists already")
        return _team(row)

    async def get_team(self, team_id: str) -> Team | None:
        with _mapped():
            row = await self._pool.fetchrow(
                f"SELECT {TEAM_COLUMNS} FROM teams t WHERE t.id = $1", team_id
            )
        return _team(row) if row else None

    async def list_teams(self, *, day: date) -> list[TeamSummary]:
        with _mapped():
            rows = await self._pool.fetch(_TEAM_LIST, day)
        return [team_summary(_team(row[:4]), list(row)[4:], day=day, cost=row[13]) for row in rows]

    async def set_team_plan(self, team_id: str, plan: str) -> None:
        with _mapped():
            status = await self._pool.execute(
                "UPDATE teams SET plan = $2 WHERE id = $1", team_id, plan
            )
        if status == "UPDATE 0":
            raise NotFound(f"no team {team_id!r}")

    async def set_team_override(self, team_id: str, name: str, value: OverrideValue) -> None:
        with _mapped():
            status = await self._pool.execute(
                "UPDATE teams SET overrides = overrides || jsonb_build_object($2::text, $3::jsonb) WHERE id = $1",
                team_id,
                name,
                value,
            )
        if status == "UPDATE 0":
            raise NotFound(f"no team {team_id!r}")

    async def clear_team_override(self, team_id: str, name: str) -> None:
        with _mapped():
            status = await self._pool.execute(
                "UPDATE teams SET overrides = overrides - $2::text WHERE id = $1", team_id, name
            )
        if status == "UPDATE 0":
            raise NotFound(f"no team {team_id!r}")

    async def set_team(self, user_id: str, team_id: str | None) -> None:
        try:
            with _mapped():
                status = await self._pool.execute(
                    "UPDATE users SET team_id = $2 WHERE id = $1", user_id, team_id
                )
        except NotFound as exc:  # the foreign key: no such team
            raise NotFound(f"no team {team_id!r}") from exc
        if status == "UPDATE 0":
            raise NotFound(f"no user {user_id!r}")

    async def team_members(self, team_id: str) -> list[User]:
        with _mapped():
            rows = await self._pool.fetch(
                f"SELECT {USER_COLUMNS} FROM users u WHERE u.team_id = $1 ORDER BY u.id", team_id
            )
        return [_user(row) for row in rows]

    async def team_daily(self, team_id: str, *, start: date, end: date) -> list[DailyUsage]:
        with _mapped():
            rows = await self._pool.fetch(_TEAM_DAILY, team_id, start, end)
        return [team_daily(team_id, row, row[9]) for row in rows]

    async def user_teams(self) -> dict[str, str]:
        with _mapped():
            rows = await self._pool.fetch("SELECT id, team_id FROM users WHERE team_id IS NOT NULL")
        return {row[0]: row[1] for row in rows}

    # --- keys ---------------------------------------------------------------

    async def create_key(
        self, user_id: str, *, key_id: str, key_hash: str, prefix: str, name: str, now: datetime
    ) -> ApiKey:
        with _mapped():
            row = await self._pool.fetchrow(
                "INSERT INTO api_keys (id, user_id, key_hash, prefix, name, created_at) "
                f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {KEY_COLUMNS}",
                key_id,
                user_id,
                key_hash,
                prefix,
                name,
                now,
            )
        return _key(row)

    async def find_key(self, key_hash: str) -> ApiKey | None:
        with _mapped():
            row = await self._pool.fetchrow(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1", key_hash
            )
        return _key(row) if row else None

    async def revoke_key(self, key_id: str, *, now: datetime) -> ApiKey:
        with _mapped():
            row = await self._pool.fetchrow(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1 "
                f"RETURNING {KEY_COLUMNS}",
                key_id,
                now,
            )
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        return _key(row)

    async def list_keys(self, user_id: str) -> list[ApiKey]:
        with _mapped():
            rows = await self._pool.fetch(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY created_at, id",
                user_id,
            )
        return [_key(row) for row in rows]

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
        reserved = limits.with_web_search(web_search)
        # A plan's limits are one tuple for as long as its snapshot lives
        # (AdmissionLimits): their literals are made once (a web search's
        # allowance put first makes a tuple of the call's own).
        texts = self._limit_texts(reserved) if reserved is limits.limits else _limit_texts(reserved)
        # Positional, in the record's order: by keyword, building it cost 4-5 µs
        # more a call (docs/performance.md). mypy checks each field's type.
        call = _AdmitCall(
            user_id,
            day,
            month_start,
            texts.meters,
            texts.pers,
            texts.maxes,
            texts.scopes,
            texts.keys,
            lease.id if lease else None,
            lease.expires_at if lease else None,
            now,
            advanced_rag,
            pending.id if pending else None,
            pending.endpoint if pending else None,
            pending.prompt_tokens if pending else None,
            pending.completion_tokens if pending else None,
            pending.total_tokens if pending else None,
            pending.cost if pending else None,
            pending.currency if pending else None,
            web_search is not None,
            web_search is not None and web_search.when_exhausted == "disable",
            pending.reserved_cost if pending else Decimal(0),
            team if limits.has_team else None,
            pending.upstream if pending else "default",
        )
        return await self._admits(_Admit(call, reserved))

    def _limit_texts(self, limits: tuple[Limit, ...]) -> _Limits:
        """_limit_texts of a plan's limits, made once: found by the tuple's
        identity (hashing a tuple of dataclasses is a Python call per limit);
        an entry holds its tuple, so its id is not reused while it is kept.

        A tuple is kept from its second admission on: a plan with per-model
        limits makes a tuple of each request's own (the models it names), seen
        once, which would otherwise fill the cache and clear it, plans' tuples
        with it, every few hundred requests."""
        key = id(limits)
        kept = self._limit_literals.get(key)
        if kept is not None and kept[0] is limits:
            return kept[1]
        texts = _limit_texts(limits)
        seen = self._limit_seen_once.get(key)
        if seen is None or seen is not limits:
            if len(self._limit_seen_once) >= _LIMIT_LITERALS_KEPT:
                self._limit_seen_once.clear()
            self._limit_seen_once[key] = limits
            return texts
        del self._limit_seen_once[key]
        if len(self._limit_literals) >= _LIMIT_LITERALS_KEPT:  # reloads made new ones
            self._limit_literals.clear()
        self._limit_literals[key] = (limits, texts)
        return texts

    async def _admit_one(self, admit: _Admit) -> Admission:
        with _mapped():
            # (The connection taken apart from the statement: only the
            # statement's errors leave its outcome unknown.)
            async with self._pool.acquire() as conn:
                backend = _backend_of(conn)
                try:
                    row = await conn.fetchrow(_ADMIT, *admit.call)
                except (*_OUTCOME_UNKNOWN, asyncio.CancelledError) as exc:
                    self._statement_lost(conn, [admit], backend, exc)
                    raise
        assert row is not None
        return _admission(row, admit.limits)

    async def _admit_many(self, admits: Sequence[_Admit]) -> list[Admission | Exception]:
        conn = self._admit_connections.pop() if self._admit_connections else None
        if conn is not None and not _usable(conn):  # the database closed it meanwhile
            await self._pool.release(conn)  # (the pool drops it)
            conn = None
        if conn is None:
            with _mapped():
                conn = await self._pool.acquire()
        kept = False
        backend = _backend_of(conn)
        try:
            if len(admits) == 1:
                # A batch of one (no batch was in flight: the usual case under
                # light load) goes as it is, under the batches' lock timeout.
                with _mapped(), _mapped_batch():
                    try:
                        row = await conn.fetchrow(_ADMIT_BATCHED, *admits[0].call)
                    except (*_OUTCOME_UNKNOWN, asyncio.CancelledError) as exc:
                        self._statement_lost(conn, admits, backend, exc)
                        raise
                kept = True
                assert row is not None
                if not row["known"]:
                    return [NotFound("unknown user")]
                return [_admission(row, admits[0].limits)]
            args = _batch_args(_admit_many_args, admits)
            with _mapped(), _mapped_batch():
                try:
                    rows = await conn.fetch(_ADMIT_MANY, *args)
                except (*_OUTCOME_UNKNOWN, asyncio.CancelledError) as exc:
                    self._statement_lost(conn, admits, backend, exc)
                    raise
            kept = True
        finally:
            if (
                kept
                and not self._closing
                and len(self._admit_connections) < self._keep
                and _usable(conn)
            ):
                self._admit_connections.append(conn)
            else:
                await self._pool.release(conn)
        results: list[Admission | Exception] = [StorageError("no answer")] * len(admits)
        for row in rows:
            at = row["ord"] - 1
            results[at] = (
                _admission(row, admits[at].limits) if row["known"] else NotFound("unknown user")
            )
        return results

    def _admission_abandoned(self, admit: _Admit, admission: Admission) -> None:
        """An admission whose caller was cancelled while it was in flight (the
        server shutting down): nobody will forward or settle the answer, so its
        query, lease and pending row are given back."""
        if not admission.admitted:
            return
        call = admit.call
        user_id, day, lease_id, pending_id = call.user_id, call.day, call.lease_id, call.pending_id
        log.info("admission for %s abandoned by its caller; given back", user_id)
        task = asyncio.create_task(
            self._refund_quietly(user_id, day, lease_id=lease_id, pending_id=pending_id)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _outcome_lost(self, admits: Sequence[_Admit], backend: Backend | None) -> None:
        """Admissions whose statement failed with its outcome unknown
        (_OUTCOME_UNKNOWN) on the connection of ``backend``: each caller gets a
        StorageError, so none of their answers is forwarded as admitted -
        fail-closed refuses the request, fail-open forwards it unreserved,
        settled without a pending row or a lease - yet the statement may have
        committed, or may still: its query, lease and pending row would stay,
        and a recovery would charge the pending row's estimate (fail-open: a
        second charge of the answer). They are given back in the background,
        as admissions lost at shutdown are (`_admissions_lost`)."""
        task = asyncio.create_task(self._admissions_lost(admits, backend))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _statement_lost(
        self,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
        admits: Sequence[_Admit],
        backend: Backend | None,
        exc: BaseException,
    ) -> None:
        """An admission statement given up with its outcome unknown: timed out
        or its connection lost (given back now, `_outcome_lost`), or cancelled
        in flight (given back by the batches' lost hook, `_batch_lost`, which
        finds its backend noted here). Its connection is closed either way."""
        _given_up(conn)
        if isinstance(exc, asyncio.CancelledError):
            for admit in admits:
                self._lost_backends[id(admit)] = backend
        else:
            self._outcome_lost(admits, backend)

    async def _batch_lost(self, admits: Sequence[_Admit]) -> None:
        """The admission batches' ``lost`` hook: admissions given up in flight
        (their batch's task cancelled: the event loop going away; with
        max_batch 1, their caller cancelled), given back by their statement's
        backend (noted as they were given up) as `_outcome_lost` gives back
        those that timed out."""
        by_backend: dict[Backend | None, list[_Admit]] = {}
        for admit in admits:
            by_backend.setdefault(self._lost_backends.pop(id(admit), None), []).append(admit)
        await asyncio.gather(
            *(self._admissions_lost(lost, backend) for backend, lost in by_backend.items())
        )

    async def _admissions_lost(self, admits: Sequence[_Admit], backend: Backend | None) -> None:
        """Admissions whose answers were lost in flight: they may have
        committed, or may still (a CancelRequest lost, or come before the
        statement itself; the statement waiting for a lock or a table). Their
        statement's backend is ended and waited for first (its connection was
        closed when the statement was given up), so that its transaction has
        committed or never will; then they are given back by their pending
        rows, which gateway_refund gives back only while they are there (an
        admission that did not land has none: without one it would give back a
        query never reserved). Without the backend (behind a pooler, which
        hides it), under the locks their admission takes, in its order, which
        orders the give-back after an admission that holds them or waits for
        them (not after one that has not reached them yet).

        One attempt: when the database cannot be reached, or the backend
        outlives _GIVE_BACK_WAIT (a warning, once for the batch), the pending
        rows stay, and a recovery charges them later."""
        calls = []
        for admit in admits:
            if admit.call.pending_id is None:
                log.warning("admission for %s lost in flight; kept", admit.call.user_id)
            else:
                calls.append(admit.call)
        if not calls:
            return
        users = [call.user_id for call in calls]
        teams = sorted({call.team for call in calls if call.team is not None})
        if backend is not None:
            await self._kill(backend)
        try:
            async with self._give_back_slots:
                with _mapped():
                    async with self._pool.acquire() as conn:
                        if backend is not None and not await _ended(conn, backend):
                            raise StorageError(f"backend {backend[0]} still running")
                        async with conn.transaction():
                            if backend is None:
                                if teams:
                                    await conn.execute(_TEAM_LOCKS, teams)
                                await conn.execute(_ADMISSION_LOCKS, users)
                            given = await conn.fetchval(
                                _REFUND_MANY,
                                users,
                                [call.day for call in calls],
                                [call.lease_id for call in calls],
                                [call.pending_id for call in calls],
                            )
        except StorageError as exc:
            # The pending rows stay: a recovery charges them as estimates later.
            log.warning(
                "could not give back %d admission(s) lost in flight (%s): %s; "
                "a recovery will charge any that landed",
                len(calls),
                ", ".join(sorted(set(users))),
                exc,
            )
            return
        if given:
            log.info(
                "%d admission(s) lost in flight had landed; given back (%s)",
                given,
                ", ".join(sorted(set(users))),
            )

    async def _refund_quietly(
        self, user_id: str, day: date, *, lease_id: str | None, pending_id: str | None
    ) -> None:
        try:
            await self.refund(user_id, day=day, lease_id=lease_id, pending_id=pending_id)
        except StorageError as exc:
            # The pending row stays: a recovery charges it as an estimate later.
            log.warning("could not give back an abandoned admission of %s: %s", user_id, exc)

    async def rate_counts(self, user_id: str, *, now: datetime) -> dict[tuple[Meter, Per], Decimal]:
        with _mapped():
            rows = await self._pool.fetch(
                "SELECT meter, per, bucket, amount FROM usage_rates WHERE user_id = $1", user_id
            )
        return rate_counts([tuple(row) for row in rows], now.timestamp())

    async def rate_buckets(
        self, user_ids: Sequence[str]
    ) -> dict[tuple[Meter, Per], dict[int, Decimal]]:
        with _mapped():
            rows = await self._pool.fetch(
                "SELECT meter, per, bucket, amount FROM usage_rates WHERE user_id = ANY($1)",
                list(user_ids),
            )
        return rate_buckets([tuple(row) for row in rows])

    async def model_counters(
        self, user_id: str, keys: Sequence[str], *, day: date, month_start: date
    ) -> dict[tuple[str, Meter, Per], Decimal]:
        if not keys:
            return {}
        with _mapped():
            rows = await self._pool.fetch(_MODEL_COUNTERS, user_id, day, month_start, list(keys))
        return model_counters([tuple(row) for row in rows])

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
        meters, pers, maxes, scopes, _ = _limit_arrays(limits)
        if not any(scope == 2 for scope in scopes):
            team = None
        args = (user_id, key, day, month_start, size, meters, pers, maxes, scopes, team)
        # Its own task, awaited through a shield: a caller cancelled while the
        # statement is in flight cannot tell whether it committed, so the task
        # runs to its end and an upload it reserved is given back (a count
        # without limits comes after the upstream took the file: it stays).
        task = asyncio.create_task(self._reserve_upload(args, limits))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if limits:
                task.add_done_callback(functools.partial(self._upload_abandoned, user_id, key))
            raise

    async def _reserve_upload(self, args: tuple[Any, ...], limits: Sequence[Limit]) -> Admission:
        with _mapped():
            async with self._pool.acquire() as conn:
                backend = _backend_of(conn)
                try:
                    row = await conn.fetchrow(_RESERVE_UPLOAD, *args)
                except _OUTCOME_UNKNOWN:
                    # It may land later: its backend is ended and waited for
                    # before the upload is given back (`release_upload` waits),
                    # which then sees what it did.
                    _given_up(conn)
                    self._upload_outcome_lost(args[1], backend, team=args[9])
                    raise
        assert row is not None
        team = (
            counters_from(row["team_day"], row["team_month"], 0)
            if row["team_day"] is not None
            else None
        )
        counters = counters_from(row["day_used"], row["month_used"], 0, team=team)
        refused = row["refused"]
        return admission(limits, None if refused is None else refused - 1, counters, 0)

    def _upload_outcome_lost(self, key: str, backend: Backend | None, *, team: str | None) -> None:
        if backend is None:  # behind a pooler: released under the reservation's locks
            if len(self._unordered) >= _BACKENDS_NOTED:
                self._unordered.clear()
            self._unordered[key] = team
        else:
            self._start_ending(key, backend)

    def _start_ending(self, key: str, backend: Backend) -> asyncio.Task[bool]:
        task = asyncio.create_task(self._end_backend(backend))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self._ending[key] = (backend, task)

        def forget(done: asyncio.Task[bool]) -> None:
            # Kept while the backend is not known to be gone: a release tries again.
            if not done.cancelled() and done.result() and self._ending.get(key, (0, 0))[1] is done:
                del self._ending[key]

        task.add_done_callback(forget)
        return task

    async def _kill(self, backend: Backend) -> None:
        """End ``backend`` now, not waited for (`_KILL_BACKEND`)."""
        try:
            with _mapped():
                await self._pool.execute(_KILL_BACKEND, *backend)
        except StorageError as exc:  # (the wait that follows tries again)
            log.debug("could not end the backend %d at once: %s", backend[0], exc)

    async def _end_backend(self, backend: Backend) -> bool:
        """Whether the backend of a statement given up is gone (ended and waited
        for: `_END_BACKEND`); False (a warning) when it could not be ended."""
        await self._kill(backend)
        try:
            async with self._give_back_slots:
                with _mapped():
                    async with self._pool.acquire() as conn:
                        ended = await _ended(conn, backend)
        except StorageError as exc:
            log.warning("could not end the backend %d of a statement given up: %s", backend[0], exc)
            return False
        if not ended:
            log.warning("the backend %d of a statement given up outlived the wait", backend[0])
        return bool(ended)

    def _upload_abandoned(self, user_id: str, key: str, task: asyncio.Task[Admission]) -> None:
        if task.cancelled():
            return
        failed = task.exception()
        if failed is not None:
            # Timed out, or its connection lost: it may have landed all the same.
            if not isinstance(failed.__cause__, _OUTCOME_UNKNOWN):
                return
        elif not task.result().admitted:
            return
        log.info("upload of %s abandoned by its caller; given back", user_id)
        release = asyncio.create_task(self._release_quietly(user_id, key))
        self._background.add(release)
        release.add_done_callback(self._background.discard)

    async def _release_quietly(self, user_id: str, key: str) -> None:
        try:
            await self.release_upload(user_id, key=key)
        except StorageError as exc:
            log.warning("could not give back an abandoned upload of %s: %s", user_id, exc)

    async def release_upload(self, user_id: str, *, key: str) -> None:
        # A reservation whose outcome was lost (timed out, its connection lost)
        # is given back once its backend is gone, not missed before its commit
        # and left counted; a backend not known to be gone fails this (the
        # settler tries again later).
        entry = self._ending.get(key)
        if entry is not None:
            backend, ending = entry
            if ending.done() and not ending.result():  # not ended before: again
                ending = self._start_ending(key, backend)
            if not await asyncio.shield(ending):
                raise StorageError("the reservation's backend is not known to be gone")
        if key in self._unordered:
            # Behind a pooler, which hides the backend: under the locks the
            # reservation takes, in its order (the team's row, then the user's
            # admission lock), which orders the release after a reservation
            # that holds them or waits for them - not after one still on its
            # way, as an admission's give-back there (`_admissions_lost`).
            team = self._unordered[key]
            with _mapped():
                async with self._pool.acquire() as conn, conn.transaction():
                    if team is not None:
                        await conn.execute(_TEAM_LOCKS, [team])
                    await conn.execute(_ADMISSION_LOCKS, [user_id])
                    await conn.execute(_RELEASE_UPLOAD, key, user_id)
            del self._unordered[key]
            return
        with _mapped():
            await self._pool.execute(_RELEASE_UPLOAD, key, user_id)

    async def open_streams(self, user_id: str, *, now: datetime) -> int:
        with _mapped():
            count = await self._pool.fetchval(
                "SELECT count(*) FROM stream_leases WHERE user_id = $1 AND expires_at > $2",
                user_id,
                now,
            )
        return int(count)

    async def refund(
        self,
        user_id: str,
        *,
        day: date,
        lease_id: str | None = None,
        pending_id: str | None = None,
    ) -> bool:
        with _mapped():
            return bool(await self._pool.fetchval(_REFUND, user_id, day, lease_id, pending_id))

    async def move_pending(self, pending_id: str, *, upstream: str) -> bool:
        with _mapped():
            status = await self._pool.execute(
                "UPDATE pending_answers SET upstream = $2 WHERE id = $1", pending_id, upstream
            )
        return bool(status != "UPDATE 0")

    async def recover(self, *, before: datetime, now: datetime, limit: int = 100) -> list[str]:
        with _mapped():
            rows = await self._pool.fetch(_RECOVER, before, limit, now)
        return [row[0] for row in rows]

    async def settle(
        self,
        event: UsageEvent,
        *,
        lease_id: str | None = None,
        pending_id: str | None = None,
        alerts: AlertRequest | None = None,
    ) -> bool:
        if alerts is None:
            kinds, periods, values, thresholds, specs = _NO_CHECKS
            channels = "{}"
            checked = channel_count = 0
        else:
            checks = [(c, t) for c in alerts.checks for t in c.thresholds]
            kinds = _texts([c.limit for c, _ in checks])
            periods = _texts([c.period for c, _ in checks])
            values = _numbers([c.value for c, _ in checks])
            thresholds = _numbers([t for _, t in checks])
            specs = _texts([c.spec for c, _ in checks])
            channels = _texts(alerts.channels)
            checked, channel_count = len(checks), len(alerts.channels)
        # Positional, in the record's order, as the admission's call.
        call = _SettleCall(
            event.answer_id,
            event.user_id,
            event.day,
            event.created_at,
            event.endpoint,
            event.prompt_tokens,
            event.completion_tokens,
            event.total_tokens,
            event.cost,
            event.currency,
            event.outcome,
            event.estimated,
            event.web_searches,
            event.conversation_id,
            event.request_id,
            event.upstream_latency_ms,
            event.overhead_ms,
            lease_id,
            pending_id,
            event.model,
            event.cached_tokens,
            event.reasoning_tokens,
            alerts.month_start if alerts else None,
            kinds,
            periods,
            values,
            thresholds,
            channels,
            event.cache_write_tokens,
            event.upstream,
            specs,
        )
        return await self._settles(_Settle(call, checked, channel_count))

    async def _settle_one(self, settle: _Settle) -> bool:
        with _mapped(), _refused_record():
            return bool(await self._pool.fetchval(_SETTLE, *settle.call))

    async def _settle_many(self, settles: Sequence[_Settle]) -> list[bool | Exception]:
        if len(settles) == 1:
            # A batch of one (no batch was in flight: the usual case under light
            # load) goes as it is, under the batches' lock timeout.
            with _mapped(), _mapped_batch():
                return [bool(await self._pool.fetchval(_SETTLE_BATCHED, *settles[0].call))]
        args = _batch_args(_settle_many_args, settles)
        with _mapped(), _mapped_batch():
            rows = await self._pool.fetch(_SETTLE_MANY, *args)
        results: list[bool | Exception] = [StorageError("no answer")] * len(settles)
        for row in rows:
            results[row["ord"] - 1] = bool(row["settled"])
        return results

    # --- alerts -------------------------------------------------------------

    async def claim_outbox(
        self, *, now: datetime, claim_until: datetime, limit: int = 20
    ) -> list[OutboxItem]:
        with _mapped():
            rows = await self._pool.fetch(_CLAIM, now, claim_until, limit)
        return [_outbox_item(row) for row in rows]

    async def outbox_delivered(self, item_id: int, *, now: datetime) -> None:
        with _mapped():
            await self._pool.execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, delivered_at = $2, "
                "next_attempt_at = NULL, claimed_until = NULL, last_error = NULL WHERE id = $1",
                item_id,
                now,
            )

    async def outbox_failed(self, item_id: int, *, error: str, retry_at: datetime | None) -> None:
        with _mapped():
            await self._pool.execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, last_error = $2, "
                "next_attempt_at = $3, claimed_until = NULL WHERE id = $1",
                item_id,
                error,
                retry_at,
            )

    async def list_alerts(self, *, user_id: str | None = None, limit: int = 100) -> list[Alert]:
        with _mapped():
            rows = await self._pool.fetch(
                f"SELECT {ALERT_COLUMNS} FROM notifications n "
                "WHERE $1::text IS NULL OR n.user_id = $1 "
                "ORDER BY n.created_at DESC, n.user_id, n.kind, n.threshold LIMIT $2",
                user_id,
                limit,
            )
            crossings = [(_crossing(row), row["created_at"]) for row in rows]
            deliveries = await self._pool.fetch(
                f"SELECT {DELIVERY_COLUMNS} FROM alert_outbox o "
                "JOIN unnest($1::text[], $2::text[], $3::text[], $4::int[]) "
                "AS k(user_id, kind, period, threshold) USING (user_id, kind, period, threshold) "
                "ORDER BY o.channel",
                [c.user_id for c, _ in crossings],
                [c.limit for c, _ in crossings],
                [c.period for c, _ in crossings],
                [c.threshold for c, _ in crossings],
            )
        return alerts_with_deliveries(
            crossings, [(_alert_key(row), _delivery(row)) for row in deliveries]
        )

    async def daily(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> list[DailyUsage]:
        sql = f"SELECT {_DAILY_SUMS} FROM usage_daily WHERE day >= $1 AND day <= $2"
        params: list[Any] = [start, end]
        if user_id is not None:
            sql += " AND user_id = $3"
            params.append(user_id)
        sql += " GROUP BY day, user_id ORDER BY day, user_id"
        with _mapped():
            rows = await self._pool.fetch(sql, *params)
        return [_daily(row) for row in rows]

    async def events(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> AsyncIterator[UsageEvent]:
        # Keyset pagination on seq rather than a cursor: no connection or
        # transaction is held between batches while the consumer writes them out.
        sql = f"SELECT seq, {EVENT_COLUMNS} FROM usage_events WHERE day >= $1 AND day <= $2 AND seq > $3"
        params: list[Any] = [start, end]
        if user_id is not None:
            sql += " AND user_id = $4"
            params.append(user_id)
        sql += f" ORDER BY seq LIMIT {_EXPORT_BATCH}"
        last = 0
        while True:
            with _mapped():
                rows = await self._pool.fetch(sql, start, end, last, *params[2:])
            for row in rows:
                yield _event(row[1:])
            if len(rows) < _EXPORT_BATCH:
                return
            last = rows[-1][0]

    async def iter_daily(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> AsyncIterator[DailyUsage]:
        # Keyset pagination on the primary key order (day, user_id).
        where = "day >= $1 AND day <= $2 AND (day, user_id) > ($3, $4)"
        params: list[Any] = []
        if user_id is not None:
            where += " AND user_id = $5"
            params.append(user_id)
        sql = (
            f"SELECT {_DAILY_SUMS} FROM usage_daily WHERE {where} "
            f"GROUP BY day, user_id ORDER BY day, user_id LIMIT {_EXPORT_BATCH}"
        )
        after: tuple[date, str] = (date.min, "")
        while True:
            with _mapped():
                rows = await self._pool.fetch(sql, start, end, after[0], after[1], *params)
            for row in rows:
                yield _daily(row)
            if len(rows) < _EXPORT_BATCH:
                return
            after = (rows[-1]["day"], rows[-1]["user_id"])

    async def count_events(self, start: date, end: date, *, user_id: str | None = None) -> int:
        sql = "SELECT count(*) FROM usage_events WHERE day >= $1 AND day <= $2"
        params: list[Any] = [start, end]
        if user_id is not None:
            sql += " AND user_id = $3"
            params.append(user_id)
        with _mapped():
            return int(await self._pool.fetchval(sql, *params))

    async def usage_by_model(self, user_id: str, *, start: date, end: date) -> list[UsageGroup]:
        with _mapped():
            rows = await self._pool.fetch(_USAGE_BY_MODEL, user_id, start, end)
        return [usage_group(row, row[7]) for row in rows]

    async def usage_by_upstream(self, user_id: str, *, start: date, end: date) -> list[UsageGroup]:
        with _mapped():
            rows = await self._pool.fetch(_USAGE_BY_UPSTREAM, user_id, start, end)
        return [usage_group(row, row[7]) for row in rows]

    async def team_usage_by_upstream(
        self, team_id: str, *, start: date, end: date
    ) -> list[UsageGroup]:
        with _mapped():
            rows = await self._pool.fetch(_TEAM_USAGE_BY_UPSTREAM, team_id, start, end)
        return [usage_group(row, row[7]) for row in rows]

    async def costs_by_currency(self) -> dict[str, Decimal]:
        with _mapped():
            rows = await self._pool.fetch(_COSTS_BY_CURRENCY)
        return {row[0]: row[1] for row in rows}

    # --- ownership (issue 20, default deny) ---

    async def answer_owner(self, answer_id: str) -> AnswerOwner | None:
        answer_id = stored_id(answer_id)  # as it was recorded (usage_bounds)
        # answer_id is UNIQUE (0001_init.sql): one index probe.
        with _mapped():
            row = await self._pool.fetchrow(
                "SELECT user_id, upstream, created_at FROM usage_events WHERE answer_id = $1",
                answer_id,
            )
        if row is None:
            return None
        return AnswerOwner(row["user_id"], row["upstream"], row["created_at"])

    async def conversation_upstream(self, user_id: str, conversation_id: str) -> str | None:
        conversation_id = stored_id(conversation_id)  # as it was recorded
        # usage_events_conversation_idx (0021): one index probe.
        with _mapped():
            upstream = await self._pool.fetchval(
                "SELECT upstream FROM usage_events WHERE user_id = $1 AND conversation_id = $2 "
                "ORDER BY seq LIMIT 1",
                user_id,
                conversation_id,
            )
        return None if upstream is None else str(upstream)

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
        # Only for a user who is there, as remember_upload's (0029, 0030).
        with _mapped():
            await self._pool.execute(
                "INSERT INTO conversation_features (user_id, conversation_id, upstream, "
                "advanced_rag, web_search, web_off, created_at) "
                "SELECT id, $2, $3::text, $4, $5, $6, $7::timestamptz FROM users WHERE id = $1 "
                "FOR KEY SHARE ON CONFLICT (user_id, conversation_id) DO NOTHING",
                user_id,
                conversation_id,
                upstream,
                features.advanced_rag,
                features.web_search,
                features.web_off,
                now,
            )

    async def conversation_features(
        self, user_id: str, conversation_id: str
    ) -> ConversationFeatures | None:
        conversation_id = stored_id(conversation_id)  # as it was recorded
        # The primary key: one index probe.
        with _mapped():
            row = await self._pool.fetchrow(
                "SELECT advanced_rag, web_search, web_off FROM conversation_features "
                "WHERE user_id = $1 AND conversation_id = $2",
                user_id,
                conversation_id,
            )
        if row is None:
            return None
        return ConversationFeatures(
            bool(row["advanced_rag"]), bool(row["web_search"]), bool(row["web_off"])
        )

    async def remember_upload(
        self, upload_id: str, *, user_id: str, upstream: str, now: datetime
    ) -> None:
        # Only for a user who is there (0029): the key share waits for a delete
        # of the user under way, then finds no row. Else an upload answered
        # after its user's deletion was kept - after the trigger had deleted
        # the user's rows - for whoever is made again under the id.
        with _mapped():
            await self._pool.execute(
                "INSERT INTO upload_owners (upload_id, user_id, upstream, created_at) "
                "SELECT $1, id, $3::text, $4::timestamptz FROM users WHERE id = $2 "
                "FOR KEY SHARE ON CONFLICT (upload_id) DO NOTHING",
                upload_id,
                user_id,
                upstream,
                now,
            )

    async def upload_owners(self, upload_ids: Collection[str]) -> dict[str, str]:
        if not upload_ids:
            return {}
        # The primary key: one index probe per id, in one round trip.
        with _mapped():
            rows = await self._pool.fetch(
                "SELECT upload_id, user_id FROM upload_owners WHERE upload_id = ANY($1::text[])",
                list(upload_ids),
            )
        return {row["upload_id"]: row["user_id"] for row in rows}

    # --- human-input resumes (issue 20) ---

    async def remember_forms(self, forms: Sequence[PausedForm], *, now: datetime) -> None:
        cutoff = now - timedelta(days=PAUSED_FORM_DAYS)
        with _mapped():
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "INSERT INTO paused_forms (token_hash, run_id, user_id, created_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (token_hash) DO NOTHING",
                    [(f.token_hash, f.run_id, f.user_id, now) for f in forms],
                )
                await conn.execute("DELETE FROM paused_forms WHERE created_at < $1", cutoff)

    async def paused_form(self, token_hash: str) -> PausedForm | None:
        with _mapped():
            row = await self._pool.fetchrow(
                "SELECT run_id, user_id FROM paused_forms WHERE token_hash = $1", token_hash
            )
        return None if row is None else PausedForm(token_hash, row["run_id"], row["user_id"])


# SKIP LOCKED: rows another replica is claiming right now are left to it; the
# claim itself (claimed_until) keeps them its own while it delivers.
_CLAIM = f"""
UPDATE alert_outbox o SET claimed_until = $2
FROM notifications n
WHERE o.id IN (
    SELECT id FROM alert_outbox
    WHERE next_attempt_at <= $1 AND (claimed_until IS NULL OR claimed_until <= $1)
    ORDER BY next_attempt_at, id LIMIT $3
    FOR UPDATE SKIP LOCKED
) AND (n.user_id, n.kind, n.period, n.threshold) = (o.user_id, o.kind, o.period, o.threshold)
RETURNING o.id, o.channel, o.created_at, o.attempts, {ALERT_COLUMNS}
"""


def _crossing(row: Any) -> Crossing:
    return Crossing(
        user_id=row["user_id"],
        limit=row["kind"],
        period=row["period"],
        threshold=row["threshold"],
        value=_amount(row["limit_value"]),
        used=_amount(row["used"]),
    )


def _amount(value: int | Decimal) -> int | Decimal:
    """A count as an int, money as its Decimal (the columns are numeric, 0018)."""
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    return value


def _outbox_item(row: Any) -> OutboxItem:
    return OutboxItem(
        id=row["id"],
        channel=row["channel"],
        crossing=_crossing(row),
        created_at=row["created_at"],
        attempts=row["attempts"],
    )


def _alert_key(row: Any) -> tuple[str, str, str, int]:
    return (row["user_id"], row["kind"], row["period"], row["threshold"])


def _delivery(row: Any) -> Delivery:
    return delivery(
        row["channel"],
        row["attempts"],
        row["last_error"],
        row["delivered_at"],
        row["next_attempt_at"],
    )
