"""PostgreSQL: an admission does not wait for the same user's settles (issue 24).

A settle holds its row locks until its commit has been flushed. An admission
used to lock the user's row, which a settle updates (the lifetime totals), and
to write the day row a settle writes: it waited for the settle's commit - a
third of its wall time at 100 answers/s. Since migration 0023 admissions
serialize on an advisory lock of their own and write the admissions' row of the
day (part 0); settles write the settles' row (part 1), and an admission reads
both in one statement.

The tests hold a settle inside its transaction, every row lock it takes
already taken, with a trigger that waits at an advisory "gate" the test holds;
and race many admissions against settles for a money cap.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.quota.limits import Limit
from gateway.storage import AdmissionLimits, Pending, open_storage
from gateway.storage.base import (
    Admission,
    AlertCheck,
    AlertRequest,
    Lease,
    Storage,
    UsageEvent,
)
from gateway.storage.postgres import _SETTLE, PostgresStorage
from tests.harness import until_async

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)
DAY = NOW.date()
MONTH = DAY.replace(day=1)
EXPIRES = NOW + timedelta(minutes=15)
GATE = 240_023
# Waits at the gate in the settle's write of a day row (its lock on the user's
# row, its ledger row and its day row taken): an update or insert that adds
# prompt tokens, which admissions never do.
_GATE_TRIGGER = f"""
CREATE FUNCTION test_settle_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.prompt_tokens <> 0
        AND (TG_OP = 'INSERT' OR NEW.prompt_tokens <> OLD.prompt_tokens)
    THEN
        PERFORM pg_advisory_xact_lock_shared({GATE});
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER test_settle_gate AFTER INSERT OR UPDATE ON usage_daily
    FOR EACH ROW EXECUTE FUNCTION test_settle_gate();
"""
# Backends of this database waiting for a lock other than the gate.
_LOCK_WAITS = f"""
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE a.datname = current_database() AND NOT l.granted
    AND NOT (l.locktype = 'advisory' AND l.objid = {GATE})
"""
_AT_GATE = f"""
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE a.datname = current_database() AND NOT l.granted
    AND l.locktype = 'advisory' AND l.objid = {GATE}
"""


@pytest.fixture
def dsn(own_database: str) -> str:
    """A database of its own: the gate's trigger goes on its usage_daily."""
    return own_database


def _pending(request: str, reserve: str) -> Pending:
    return Pending(request, "chat-messages", reserved_cost=Decimal(reserve))


def _answer(request: str, cost: str) -> UsageEvent:
    return UsageEvent(
        f"a-{request}",
        "alice",
        DAY,
        NOW,
        "chat-messages",
        prompt_tokens=10,
        completion_tokens=20,
        total_tokens=30,
        cost=Decimal(cost),
        request_id=request,
    )


async def _admitted_beside_a_held_settle(
    storage: Storage,
    admin: asyncpg.Connection,
    gate: asyncpg.Connection,
    limits: AdmissionLimits,
    trigger: str,
    tasks: list[asyncio.Task[Any]],
) -> Admission:
    """r1 admitted, its settle held at ``trigger``'s gate inside its transaction
    (its row locks taken), then r2 admitted meanwhile: r2's admission, which
    must not wait for the settle. The settle's task is ``tasks[0]``, held until
    the gate is unlocked; ``tasks`` are the caller's to wait for."""
    first = await storage.admit(
        "alice",
        day=DAY,
        month_start=MONTH,
        limits=limits,
        now=NOW,
        lease=Lease("r1", EXPIRES),
        pending=_pending("r1", "0.5"),
    )
    assert first.admitted
    await admin.execute(trigger)
    await gate.execute("SELECT pg_advisory_lock($1)", GATE)
    tasks.append(
        asyncio.create_task(storage.settle(_answer("r1", "0.25"), lease_id="r1", pending_id="r1"))
    )

    async def at_gate() -> bool:
        return bool(await admin.fetchval(_AT_GATE))

    await until_async(at_gate)
    admit = asyncio.create_task(
        storage.admit(
            "alice",
            day=DAY,
            month_start=MONTH,
            limits=limits,
            now=NOW,
            lease=Lease("r2", EXPIRES),
            pending=_pending("r2", "0.5"),
        )
    )
    tasks.append(admit)

    async def ended_or_waiting() -> bool:
        return admit.done() or bool(await admin.fetchval(_LOCK_WAITS))

    await until_async(ended_or_waiting)
    # Before 0023: the admission waited for the settle's locks (the user's row,
    # its day row, a per-model counter row) until the settle committed.
    assert admit.done(), "the admission waits for the settle's row locks"
    return admit.result()


async def test_an_admission_does_not_wait_for_a_settle_of_the_same_user(dsn: str) -> None:
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    gate = await asyncpg.connect(dsn)
    tasks: list[asyncio.Task[Any]] = []
    try:
        await storage.ensure_user("alice", plan="free")
        limits = AdmissionLimits(
            queries_per_day=100,
            tokens_per_day=10_000,
            max_concurrent_streams=5,
            cost_per_day=Decimal("2"),
        )
        second = await _admitted_beside_a_held_settle(
            storage, admin, gate, limits, _GATE_TRIGGER, tasks
        )
        # It saw the first answer's reservation (the settle is not committed):
        # the day's cost is the two bounds, two queries, one open stream more.
        assert second.admitted
        counters = second.counters
        assert counters.of("cost", "day") == Decimal("1.0")
        assert counters.of("queries", "day") == 2
        assert counters.of("streams", "open") == 2
        await gate.execute("SELECT pg_advisory_unlock($1)", GATE)
        assert await tasks[0]
        # The settle replaced its reservation by the answer's cost.
        (today,) = await storage.daily(DAY, DAY, user_id="alice")
        assert (today.queries, today.total_tokens, today.cost) == (2, 30, Decimal("0.25"))
        third = await storage.admit("alice", day=DAY, month_start=MONTH, limits=limits, now=NOW)
        assert third.counters.of("cost", "day") == Decimal("0.75")  # 0.25 + r2's 0.5
        assert third.counters.of("queries", "day") == 3
    finally:
        await gate.close()  # ends the gate, if a failure left it held
        await asyncio.gather(*tasks, return_exceptions=True)
        await admin.close()
        await storage.close()


async def test_admissions_racing_settles_never_overshoot_a_money_cap(dsn: str) -> None:
    """Three replicas admit one user's requests (twelve clients), each reserving a cost bound
    of 0.10 against a daily cap of 1.00, and settle each answer at once for
    0.02 to 0.10: every admission reads the settles' releases with what they
    added in one snapshot, so the day's cost never passes the cap - and the
    settles' cheaper answers leave room that later admissions use."""
    stores: list[Storage] = [await open_storage(DatabaseConfig(url=dsn)) for _ in range(3)]
    rng = random.Random(24)
    cap = Decimal("1.00")
    limits = AdmissionLimits(cost_per_day=cap, max_concurrent_streams=50)
    admitted: list[str] = []
    try:
        await stores[0].ensure_user("alice", plan="free")

        async def client(c: int) -> None:
            # Twelve clients, each sending its next request once the last ended.
            for n in range(15):
                await request(stores[c % 3], f"q{c}-{n}")

        async def request(store: Storage, rid: str) -> None:
            a = await store.admit(
                "alice",
                day=DAY,
                month_start=MONTH,
                limits=limits,
                now=NOW,
                lease=Lease(rid, EXPIRES),
                pending=_pending(rid, "0.10"),
            )
            # What this admission saw, its own bound included, is within the cap.
            assert a.counters.of("cost", "day") <= cap
            if not a.admitted:
                return
            admitted.append(rid)
            cost = f"0.{rng.randint(2, 10):02d}"
            assert await store.settle(_answer(rid, cost), lease_id=rid, pending_id=rid)

        await asyncio.gather(*(client(c) for c in range(12)))
        # The cheaper answers left room for more than ten.
        assert len(admitted) > 10
        (today,) = await stores[0].daily(DAY, DAY, user_id="alice")
        assert today.cost <= cap
        assert today.queries == len(admitted)
        conn = await asyncpg.connect(dsn)
        try:
            reserved = await conn.fetchval("SELECT sum(cost_reserved) FROM usage_daily")
            ledger = await conn.fetchval("SELECT sum(cost) FROM usage_events")
            lifetime = await conn.fetchval("SELECT lifetime_cost FROM users")
            assert await conn.fetchval("SELECT count(*) FROM pending_answers") == 0
        finally:
            await conn.close()
        assert reserved == 0
        assert ledger == lifetime == today.cost
    finally:
        for store in stores:
            await store.close()


# Waits at the gate in a settle's write of a per-model counter row (the row
# lock taken), with no lock timeout while it waits (a batch's 250 ms would end
# it there): an update or insert that adds prompt tokens, which admissions
# never do.
_MODELS_GATE_TRIGGER = f"""
CREATE FUNCTION test_models_gate() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_timeout text := current_setting('lock_timeout');
BEGIN
    IF NEW.prompt_tokens <> 0
        AND (TG_OP = 'INSERT' OR NEW.prompt_tokens <> OLD.prompt_tokens)
    THEN
        PERFORM set_config('lock_timeout', '0', true);
        PERFORM pg_advisory_xact_lock_shared({GATE});
        PERFORM set_config('lock_timeout', v_timeout, true);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER test_models_gate AFTER INSERT OR UPDATE ON usage_models
    FOR EACH ROW EXECUTE FUNCTION test_models_gate();
"""


async def test_a_batch_of_settles_and_an_admission_form_no_lock_cycle(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of two settles of a user under a per-model limit goes element
    by element. Element 1 holds the per-model counter row; an admission of the
    same user, deleting expired leases, takes element 2's (expired) lease and
    waits for that counter row. Had element 2 then deleted its lease, the two
    would wait for each other until the batch's lock timeout split it: the
    batch deletes all its leases before any element."""
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    gate = await asyncpg.connect(dsn)
    batch: asyncio.Task[list[bool | Exception]] | None = None
    admit: asyncio.Task[Admission] | None = None
    try:
        await storage.ensure_user("alice", plan="free")
        per_model = Limit("cost_per_day[gpt*]", "cost", "day", Decimal("5"), models=("gpt*",))
        limits = AdmissionLimits([per_model], max_concurrent_streams=10)
        for rid, expires in (("r1", EXPIRES), ("r2", NOW + timedelta(minutes=1))):
            admitted = await storage.admit(
                "alice",
                day=DAY,
                month_start=MONTH,
                limits=limits,
                now=NOW,
                lease=Lease(rid, expires),
                pending=_pending(rid, "0.5"),
            )
            assert admitted.admitted
        # The two settles as the group commit would send them together, and
        # an admission as sent on its own (no lock timeout).
        captured: list[Any] = []

        async def capture(call: Any) -> Any:
            captured.append(call)

        with monkeypatch.context() as patch:
            patch.setattr(storage, "_settles", capture)
            patch.setattr(storage, "_admits", capture)
            later = NOW + timedelta(minutes=2)  # r2's lease has expired
            await storage.settle(_answer("r1", "0.25"), lease_id="r1", pending_id="r1")
            await storage.settle(_answer("r2", "0.25"), lease_id="r2", pending_id="r2")
            await storage.admit(
                "alice",
                day=DAY,
                month_start=MONTH,
                limits=limits,
                now=later,
                lease=Lease("r3", later + timedelta(minutes=15)),
                pending=_pending("r3", "0.5"),
            )
        first, second, admission = captured
        assert isinstance(storage, PostgresStorage)
        await admin.execute(_MODELS_GATE_TRIGGER)
        await gate.execute("SELECT pg_advisory_lock($1)", GATE)
        batch = asyncio.create_task(storage._settle_many([first, second]))

        async def at_gate() -> bool:
            return bool(await admin.fetchval(_AT_GATE))

        await until_async(at_gate)  # element 1 holds the counter row
        admit = asyncio.create_task(storage._admit_one(admission))

        async def admission_waits() -> bool:
            assert admit is not None
            return admit.done() or bool(await admin.fetchval(_LOCK_WAITS))

        await until_async(admission_waits)  # for the counter row
        await gate.execute("SELECT pg_advisory_unlock($1)", GATE)
        # Element 2 did not wait for its lease behind the admission: the batch
        # was not refused (split) by its lock timeout.
        assert await batch == [True, True]
        assert (await admit).admitted
        assert await admin.fetchval("SELECT count(*) FROM stream_leases") == 1  # r3's
    finally:
        await gate.close()
        for task in (batch, admit):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        await admin.close()
        await storage.close()


async def _day_rows_fetched(
    dsn: str, storage: PostgresStorage, answer: UsageEvent, alerts: AlertRequest
) -> int:
    """Rows of usage_daily a settle with these alert checks fetched through an
    index (its transaction's own statistics), the settle sent on one connection."""
    captured: list[Any] = []

    async def capture(call: Any) -> Any:
        captured.append(call)

    saved = storage._settles
    storage._settles = capture  # type: ignore[assignment]
    try:
        await storage.settle(answer, alerts=alerts)
    finally:
        storage._settles = saved
    (settle,) = captured
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            assert await conn.fetchval(_SETTLE, *settle.call)
            fetched = await conn.fetchval(
                "SELECT idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'usage_daily'"
            )
    finally:
        await conn.close()
    return int(fetched)


async def test_a_settle_reads_the_month_only_for_a_monthly_alert_check(dsn: str) -> None:
    """A settle's alert checks read the user's day rows; the month's (up to 62
    rows) only when a monthly check is among them."""
    storage = await open_storage(DatabaseConfig(url=dsn))
    assert isinstance(storage, PostgresStorage)
    conn = await asyncpg.connect(dsn)
    start = DAY - timedelta(days=25)
    try:
        await storage.ensure_user("alice", plan="free")
        # 25 earlier days, each with both rows.
        await conn.execute(
            "INSERT INTO usage_daily (user_id, day, part, total_tokens) "
            "SELECT 'alice', $1::date + g, p, 100 FROM generate_series(0, 24) g, "
            "generate_series(0, 1) p",
            start,
        )
        daily = AlertCheck("tokens_per_day", DAY.isoformat(), 20, (50,))
        monthly = AlertCheck("tokens_per_month", DAY.isoformat()[:7], 100_000, (50,))
        day_only = await _day_rows_fetched(
            dsn, storage, _answer("d1", "0.01"), AlertRequest((daily,), start, ())
        )
        both = await _day_rows_fetched(
            dsn, storage, _answer("d2", "0.01"), AlertRequest((daily, monthly), start, ())
        )
        assert day_only < 10, f"a settle with a daily check read {day_only} day rows"
        assert both >= 50
        # The daily check saw today's rows: the first answer's 30 tokens of 20
        # crossed 50% (announced once).
        assert await conn.fetchval(
            "SELECT used FROM notifications WHERE kind = 'tokens_per_day'"
        ) == Decimal(30)
    finally:
        await conn.close()
        await storage.close()


async def test_an_admission_under_a_per_model_limit_does_not_wait_for_a_settle(
    dsn: str,
) -> None:
    """The per-model counters are two rows a key and day too (0023): the
    admission writes the admissions' row, the settle the settles' row (the
    review of 0023: with one row, an admission under a per-model limit waited,
    holding the user's admission lock, for the settle's commit)."""
    storage = await open_storage(DatabaseConfig(url=dsn))
    admin = await asyncpg.connect(dsn)
    gate = await asyncpg.connect(dsn)
    tasks: list[asyncio.Task[Any]] = []
    try:
        await storage.ensure_user("alice", plan="free")
        per_model = Limit("cost_per_day[gpt*]", "cost", "day", Decimal("5"), models=("gpt*",))
        limits = AdmissionLimits([per_model])
        # The settle held inside its per-model counter row's write.
        second = await _admitted_beside_a_held_settle(
            storage, admin, gate, limits, _MODELS_GATE_TRIGGER, tasks
        )
        assert second.admitted
        # It saw the first answer's reservation (the settle is not committed).
        assert second.counters.of_limit(per_model) == Decimal("1.0")
        await gate.execute("SELECT pg_advisory_unlock($1)", GATE)
        assert await tasks[0]
        # The two rows summed: 0.25 answered, r2's 0.5 reserved.
        held = await admin.fetch("SELECT part, cost, cost_reserved FROM usage_models ORDER BY part")
        assert [tuple(row) for row in held] == [
            (0, Decimal(0), Decimal("1.0")),
            (1, Decimal("0.25"), Decimal("-0.5")),
        ]
        third = await storage.admit("alice", day=DAY, month_start=MONTH, limits=limits, now=NOW)
        assert third.counters.of_limit(per_model) == Decimal("0.75")
    finally:
        await gate.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await admin.close()
        await storage.close()
