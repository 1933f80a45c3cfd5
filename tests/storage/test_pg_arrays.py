"""PostgreSQL's admission and settle send their arrays as text (issue 24).

asyncpg's array encoder walks every element through isinstance checks against
the collections ABCs: the admissions and settles send each array as the text of
an array literal instead, which PostgreSQL reads (`$n::text::T[]`). These tests
hold the literals to what the arrays were - any text, NULL, exact numbers - and
the calls to sending no list, alone or in a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.quota.limits import Limit
from gateway.storage import (
    AdmissionLimits,
    AlertCheck,
    AlertRequest,
    Lease,
    Pending,
    UsageEvent,
    alert_spec,
)
from gateway.storage.postgres import PostgresStorage, _joined, _numbers, _texts
from tests.conftest import _truncate

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = [pytest.mark.postgres, pytest.mark.warm_connections]

NOW = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
DAY = date(2026, 11, 21)
MONTH = date(2026, 11, 1)

# What the array input syntax treats specially (quotes, backslashes, commas,
# braces, white space, the word NULL), and the rest of Latin-1 and beyond.
TEXTS: list[str | None] = [
    "",
    " ",
    " padded ",
    "NULL",
    "null",
    None,
    '"',
    '""',
    "\\",
    '\\"',
    "a,b",
    "{",
    "}",
    "{}",
    "{a,b}",
    "m:gpt-4o,o3",
    "tab\there\nnewline",
    "ở Việt Nam ✓ 😀",
    "".join(map(chr, range(1, 256))),
]
NUMBERS: list[int | Decimal] = [
    0,
    -1,
    10**18,
    Decimal("0.0010000"),
    Decimal("1E+9"),
    Decimal("-1.5E-7"),
    Decimal("12345678901234.56789"),
    Decimal("-0"),
]


@pytest.fixture
async def conn(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres_dsn)
    try:
        yield connection
    finally:
        await connection.close()


async def test_text_literals_read_back_as_the_texts(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT $1::text::text[]", _texts(TEXTS)) == TEXTS
    assert await conn.fetchval("SELECT $1::text::text[]", _texts([])) == []
    joined = _joined([_texts(TEXTS[:7]), _texts([]), _texts(TEXTS[7:]), "{}"])
    assert await conn.fetchval("SELECT $1::text::text[]", joined) == TEXTS


async def test_number_literals_read_back_as_the_exact_numbers(conn: asyncpg.Connection) -> None:
    read = await conn.fetchval("SELECT $1::text::numeric[]", _numbers(NUMBERS))
    assert read == NUMBERS
    # The scale is kept: money reads back with its digits.
    assert str(read[3]) == "0.0010000"
    ints = [0, -1, 7, 2**31 - 1]
    assert await conn.fetchval("SELECT $1::text::integer[]", _numbers(ints)) == ints


@contextlib.asynccontextmanager
async def _empty_store(dsn: str) -> AsyncIterator[PostgresStorage]:
    await _truncate(dsn)
    store = await PostgresStorage.open(dsn)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def pg(postgres_dsn: str, caplog: pytest.LogCaptureFixture) -> AsyncIterator[PostgresStorage]:
    """A store whose batches are never refused: a batch PostgreSQL could not
    read would go call by call (gateway/storage/group.py), hiding the fault."""
    caplog.set_level(logging.INFO, logger="gateway.storage")
    async with _empty_store(postgres_dsn) as store:
        yield store
    refused = [r.getMessage() for r in caplog.get_records("call") if "refused" in r.getMessage()]
    assert not refused


def _no_lists(sent: list[tuple[str, tuple[Any, ...]]], name: str) -> int:
    """How many of the statements sent call `name`; asserts none of them had a
    list or tuple among its arguments but a batch's column of times."""
    calls = [args for query, args in sent if name in query]
    for args in calls:
        walked = [
            a
            for a in args
            if isinstance(a, list | tuple) and not all(isinstance(x, date | None) for x in a)
        ]
        assert not walked, (name, args)
    return len(calls)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements the connections are sent with their arguments."""
    seen: list[tuple[str, tuple[Any, ...]]] = []
    for method in ("fetch", "fetchrow", "fetchval"):
        original = getattr(asyncpg.Connection, method)

        async def spy(
            self: asyncpg.Connection, query: str, *args: Any, _o: Any = original, **kw: Any
        ) -> Any:
            seen.append((query, args))
            return await _o(self, query, *args, **kw)

        monkeypatch.setattr(asyncpg.Connection, method, spy)
    return seen


def _event(answer_id: str, model: str | None = "gpt-4o", **changes: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "answer_id": answer_id,
        "user_id": "alice",
        "day": DAY,
        "created_at": NOW,
        "endpoint": "chat-messages",
        "prompt_tokens": 30,
        "completion_tokens": 10,
        "total_tokens": 40,
        "cost": Decimal("0.0010000"),
        "model": model,
    }
    return UsageEvent(**(fields | changes))


async def test_admissions_and_settles_send_no_list_and_keep_any_key(
    pg: PostgresStorage, sent: list[tuple[str, tuple[Any, ...]]]
) -> None:
    """Per-model limits whose models hold the characters the array syntax
    treats specially, and alert checks named so: admitted and settled alone and
    in batches, every counter and crossing is the one its key names, and no
    admission or settle sent a list (but a batch's column of times)."""
    await pg.ensure_user("alice", plan="free")
    odd = ('we"ird\\model', "a,b {c}", "NULL")
    per_model = Limit('q "per" model, {odd}', "queries", "day", Decimal(5), models=odd)
    tokens = Limit("tokens\\day", "tokens", "day", Decimal(1000), models=odd[:1])
    limits = AdmissionLimits((per_model, tokens), queries_per_day=100)
    alerts = AlertRequest(
        tuple(
            AlertCheck(limit.name, DAY.isoformat(), int(limit.max), (10, 50), alert_spec(limit))
            for limit in (per_model, tokens)
        ),
        MONTH,
        ("webhook",),
    )

    async def admit(name: str) -> bool:
        admission = await pg.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            limits=limits,
            now=NOW + timedelta(seconds=1),
            pending=Pending(id=name, endpoint="chat-messages", prompt_tokens=10, total_tokens=10),
        )
        return admission.admitted

    # One alone, then four made together (a batch behind the one in flight).
    assert await admit("r0")
    assert await asyncio.gather(*(admit(f"r{i}") for i in range(1, 5))) == [True] * 4
    assert not await admit("r5")  # the per-model limit of 5, counted under its key
    assert await pg.settle(_event("m0", odd[0]), pending_id="r0", alerts=alerts)
    settled = await asyncio.gather(
        *(pg.settle(_event(f"m{i}", odd[0]), pending_id=f"r{i}", alerts=alerts) for i in (1, 2, 3))
    )
    assert settled == [True] * 3
    batches = {op: calls > batches for op, (batches, calls) in pg.group_commit.items()}
    assert batches == {"admit": True, "settle": True}  # some went together
    # Every call sent (one statement per batch; a batch split goes call by call).
    assert _no_lists(sent, "gateway_admit") >= pg.group_commit["admit"][0]
    assert _no_lists(sent, "gateway_settle") >= pg.group_commit["settle"][0]

    counters = await pg.model_counters(
        "alice", [k for k in (per_model.counter_key, tokens.counter_key) if k], day=DAY,
        month_start=MONTH,
    )  # fmt: skip
    assert counters[(per_model.counter_key, "queries", "day")] == 5
    assert counters[(tokens.counter_key, "tokens", "day")] == 4 * 40  # r4 not settled yet
    crossed = sorted((a.crossing.limit, a.crossing.threshold) for a in await pg.list_alerts())
    assert crossed == [
        (per_model.name, 10),
        (per_model.name, 50),
        (tokens.name, 10),
    ]


async def test_a_batch_records_every_column_as_it_was_given(pg: PostgresStorage) -> None:
    """A settle batch's columns sent as literals - texts, NULLs, exact money,
    floats, flags, times with their offsets - are recorded as the events held
    them, in a batch as alone."""
    await pg.ensure_user("alice", plan="free")
    saigon = timezone(timedelta(hours=7))
    events = [
        UsageEvent(
            answer_id=f'answer "{i}", {{x}}',
            user_id="alice",
            day=DAY,
            created_at=datetime(2026, 11, 21, 16, 30, 5, 123456 + i, tzinfo=saigon),
            endpoint="chat-messages",
            prompt_tokens=10**12 + i,
            completion_tokens=i,
            total_tokens=10**12 + 2 * i,
            cost=Decimal("0.0010000") * (i + 1),
            currency="VND",
            outcome="client_disconnected" if i % 2 else "complete",
            estimated=bool(i % 2),
            web_searches=i,
            conversation_id=None if i % 2 else "NULL",
            request_id=TEXTS[i],
            upstream_latency_ms=None if i % 2 else 1e-05 * i,
            overhead_ms=12.25 + i,
            model=TEXTS[i + 5],
            cached_tokens=i,
            reasoning_tokens=2 * i,
            cache_write_tokens=3 * i,
            upstream=f"up\\{i}",
        )
        for i in range(6)
    ]
    assert await pg.settle(events[0])
    assert await asyncio.gather(*(pg.settle(e) for e in events[1:])) == [True] * 5
    batches, calls = pg.group_commit["settle"]
    assert calls > batches  # some went together
    recorded = [e async for e in pg.events(DAY, DAY)]
    assert sorted(recorded, key=lambda e: e.answer_id) == events


async def test_a_batch_of_admissions_writes_each_pending_row_and_lease_as_given(
    pg: PostgresStorage, postgres_dsn: str
) -> None:
    """An admission batch's columns sent as literals: each pending row and
    lease holds what its admission gave (texts, exact money, times with their
    offsets, advanced RAG counted), in a batch as alone."""
    await pg.ensure_user("alice", plan="free")
    saigon = timezone(timedelta(hours=7))
    now = datetime(2026, 11, 21, 16, 30, 5, 123456, tzinfo=saigon)

    async def admit(i: int) -> bool:
        admission = await pg.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            limits=AdmissionLimits(queries_per_day=100, max_concurrent_streams=10),
            now=now,
            lease=Lease(f"r{i}", now + timedelta(minutes=i + 1, microseconds=i)),
            advanced_rag=bool(i % 2),
            pending=Pending(
                id=f"r{i}",
                endpoint=TEXTS[i],  # type: ignore[arg-type]
                prompt_tokens=10**12 + i,
                completion_tokens=i,
                total_tokens=10**12 + 2 * i,
                cost=Decimal("0.0010000") * (i + 1),
                currency='V"ND',
                reserved_cost=Decimal("0.5") * i,
                upstream=f"up,{i}",
            ),
        )
        return admission.admitted

    # (TEXTS[5] is None: an endpoint is never None.)
    numbers = [0, 1, 2, 3, 4, 6]
    assert await admit(numbers[0])
    assert await asyncio.gather(*(admit(i) for i in numbers[1:])) == [True] * 5
    batches, calls = pg.group_commit["admit"]
    assert calls > batches  # some went together
    conn = await asyncpg.connect(postgres_dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.id, p.created_at, p.endpoint, p.prompt_tokens, p.completion_tokens, "
            "p.total_tokens, p.cost, p.currency, p.reserved_cost, p.upstream, s.expires_at "
            "FROM pending_answers p JOIN stream_leases s USING (id) ORDER BY p.id"
        )
        day = await conn.fetchrow(
            "SELECT queries, advanced_rag, cost_reserved FROM usage_daily WHERE user_id = 'alice'"
        )
    finally:
        await conn.close()
    assert [tuple(row) for row in rows] == [
        (
            f"r{i}", now, TEXTS[i], 10**12 + i, i, 10**12 + 2 * i, Decimal("0.0010000") * (i + 1),
            'V"ND', Decimal("0.5") * i, f"up,{i}", now + timedelta(minutes=i + 1, microseconds=i),
        )
        for i in numbers
    ]  # fmt: skip
    assert tuple(day) == (6, 2, Decimal("0.5") * sum(numbers))


# --- review: batches with one bad call, array_nulls, the literals' cache -------------


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStorage]:
    """A store whose batches may be refused (and split): the tests below send one."""
    async with _empty_store(postgres_dsn) as store:
        yield store


async def _settle_batch(pg: PostgresStorage, events: list[UsageEvent]) -> list[Any]:
    """The events settled in one batch (the counters see one batch of them all)."""
    before = pg.group_commit["settle"]
    results = await asyncio.gather(*(pg.settle(e) for e in events), return_exceptions=True)
    after = pg.group_commit["settle"]
    assert (after[0] - before[0], after[1] - before[1]) == (1, len(events))
    return results


async def _ledger(pg: PostgresStorage) -> list[str]:
    return sorted([e.answer_id async for e in pg.events(DAY, DAY)])


async def test_a_value_of_the_wrong_type_fails_its_settle_alone(store: PostgresStorage) -> None:
    """A value the literals cannot write (an int where a text goes): asyncpg
    refused such a value alone, the batch split and only its call failed. It
    still does: the batch is split, not failed whole (which sent every call of
    it, the good records too, to the spool). The call that fails is refused for
    good (RecordRefused, a StorageError: set aside, not retried, review-rec
    REC-2): sent again it would fail again."""
    await store.ensure_user("alice", plan="free")
    events = [_event("b1"), _event("b2", conversation_id=12345), _event("b3")]
    results = await _settle_batch(store, events)
    assert [type(r).__name__ for r in results] == ["bool", "RecordRefused", "bool"], results
    assert await _ledger(store) == ["b1", "b3"]


async def test_a_value_of_the_wrong_type_fails_its_admission_alone(
    store: PostgresStorage,
) -> None:
    await store.ensure_user("alice", plan="free")
    limits = AdmissionLimits(queries_per_day=10)

    async def admit(name: str, currency: Any = "USD") -> Any:
        return await store.admit(
            "alice", day=DAY, month_start=MONTH, limits=limits, now=NOW,
            pending=Pending(id=name, endpoint="chat-messages", currency=currency),
        )  # fmt: skip

    results = await asyncio.gather(
        admit("p1"), admit("p2", currency=840), admit("p3"), return_exceptions=True
    )
    assert [type(r).__name__ for r in results] == ["Admission", "StorageError", "Admission"]


@pytest.fixture
async def array_nulls_off(postgres_dsn: str) -> AsyncIterator[PostgresStorage]:
    """The run's database with ``array_nulls = off`` as its default (a DBA's
    choice), under which an unquoted NULL in an array literal is the text 'NULL'."""
    name = postgres_dsn.rpartition("/")[2]
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET array_nulls = off')
        plain = await asyncpg.connect(postgres_dsn)
        try:
            assert await plain.fetchval("SHOW array_nulls") == "off"  # a new connection's
        finally:
            await plain.close()
        async with _empty_store(postgres_dsn) as store:
            yield store
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET array_nulls')
        await admin.close()


# New connections: a lent one started before the database's default changed.
@pytest.mark.warm_connections(False)
async def test_array_nulls_off_keeps_none_null(array_nulls_off: PostgresStorage) -> None:
    """None is written as an unquoted NULL: under array_nulls = off that would be
    the text 'NULL' - a settle batch without a pending row (an answer admitted
    while the database was away) claimed the pending row 'NULL', found none and
    recorded nothing. The gateway's connections set array_nulls themselves."""
    pg = array_nulls_off
    await pg.ensure_user("alice", plan="free")
    events = [
        _event(f"n{i}", model=None, conversation_id=None, upstream_latency_ms=12.5, overhead_ms=0.5)
        for i in range(3)
    ]
    assert await _settle_batch(pg, events) == [True] * 3
    recorded = [e async for e in pg.events(DAY, DAY)]
    assert {(e.model, e.conversation_id) for e in recorded} == {(None, None)}
    assert len(recorded) == 3


# New connections: a lent one started before the database's default changed.
@pytest.mark.warm_connections(False)
async def test_array_nulls_off_keeps_a_teams_limit_the_teams(
    array_nulls_off: PostgresStorage,
) -> None:
    """Attack: three members of a team with a limit of 4 queries a day. A plain
    limit's counter key is None; read as the text 'NULL' it was a per-model key,
    counted on each member's own counters: every member had the whole team's
    allowance (12 admitted)."""
    pg = array_nulls_off
    await pg.create_team("t1", plan="free", now=NOW)
    users = ("alice", "bob", "carol")
    for user in users:
        await pg.ensure_user(user, plan="free")
        await pg.set_team(user, "t1")
    limits = AdmissionLimits((Limit("team_q", "queries", "day", Decimal(4), scope="team"),))
    admitted = 0
    for i in range(12):
        admission = await pg.admit(
            users[i % 3], day=DAY, month_start=MONTH, limits=limits, now=NOW,
            pending=Pending(id=f"k{i}", endpoint="chat-messages"), team="t1",
        )  # fmt: skip
        admitted += admission.admitted
    assert admitted == 4


async def test_a_plans_limit_literals_are_made_once_beside_per_model_requests(
    pg: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan with per-model limits makes each request's limits a tuple of its
    own, seen once: they must not push a plan's kept literals out."""
    import gateway.storage.postgres as postgres

    await pg.ensure_user("alice", plan="free")
    made: list[int] = []
    original = postgres._limit_texts

    def counting(limits: Any) -> Any:
        made.append(len(limits))
        return original(limits)

    monkeypatch.setattr(postgres, "_limit_texts", counting)
    stable = AdmissionLimits(queries_per_day=10**6)
    per_model = Limit("gpt", "queries", "day", Decimal(10**6), models=("gpt-*",))
    for _ in range(300):
        await pg.admit("alice", day=DAY, month_start=MONTH, limits=stable, now=NOW)
        fresh = AdmissionLimits((per_model,), queries_per_day=10**6)  # a request's own
        await pg.admit("alice", day=DAY, month_start=MONTH, limits=fresh, now=NOW)
    assert made.count(1) == 2  # the plan's: at its first admission and its second (kept)
    assert len(pg._limit_literals) == 1


# Text PostgreSQL's text can hold (no NUL, no lone surrogate), and what the array
# input syntax treats specially.
_STORABLE = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
_TRICKY = st.text(st.sampled_from(list("\\\"{},NUL \t\n\r\x0b\x0c\x01\x7f'$[]:=\u00a0\ufeff😀")))
_ANY_TEXT = st.one_of(st.none(), _STORABLE, _TRICKY, st.sampled_from(["NULL", "null", " NULL "]))


class _Connection:
    """One connection in a loop of its own, for a test hypothesis runs many times."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(dsn))

    def value(self, query: str, *args: Any) -> Any:
        return self.loop.run_until_complete(self.conn.fetchval(query, *args))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@pytest.fixture(scope="module")
def one_connection(postgres_dsn: str) -> Iterator[_Connection]:
    connection = _Connection(postgres_dsn)
    try:
        yield connection
    finally:
        connection.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_ANY_TEXT, max_size=5), max_size=5))
def test_any_texts_read_back_alone_and_joined(
    one_connection: _Connection, parts: list[list[str | None]]
) -> None:
    for part in parts:
        assert one_connection.value("SELECT $1::text::text[]", _texts(part)) == part
    joined = one_connection.value("SELECT $1::text::text[]", _joined(_texts(x) for x in parts))
    assert joined == [v for part in parts for v in part]


@pytest.mark.parametrize(
    ("function", "fields", "types"),
    [
        ("gateway_admit_many", "_ADMIT_MANY_ARGS", "_ADMIT_TYPES"),
        ("gateway_settle_many", "_SETTLE_MANY_ARGS", "_SETTLE_TYPES"),
    ],
)
async def test_the_literals_types_are_the_functions(
    conn: asyncpg.Connection, function: str, fields: str, types: str
) -> None:
    """The SQL types the literals are cast to (`_ADMIT_TYPES`, `_SETTLE_TYPES`,
    written by hand) are those of the batch functions' parameters, in order: a
    function whose parameter changes type fails here, not on a batch at run time."""
    import gateway.storage.postgres as postgres

    declared = await conn.fetch(
        "SELECT format_type(a.oid, NULL) FROM pg_proc p,"
        " unnest(p.proargtypes) WITH ORDINALITY AS a(oid, n)"
        " WHERE p.proname = $1 ORDER BY a.n",
        function,
    )
    mine = getattr(postgres, types)
    expected = [
        mine[field].replace("timestamptz", "timestamp with time zone") + "[]"
        for field in getattr(postgres, fields)
    ]
    assert [row[0] for row in declared] == expected
