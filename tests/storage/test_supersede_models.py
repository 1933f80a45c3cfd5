"""Review of issue 21: a recovered answer's real record, arriving late, must
replace the recovery's estimate on the per-model counters too, as it does on the
day row - else the estimate (at least the cost bound) is phantom spend that holds
a per-model budget until the day ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from gateway.quota.limits import Limit
from gateway.storage import AdmissionLimits, Pending, Storage, UsageEvent
from gateway.storage.postgres import PostgresStorage
from tests.conftest import _truncate

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = pytest.mark.warm_connections

DAY = date(2026, 11, 21)
MONTH = date(2026, 11, 1)
NOW = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
LIMITS = AdmissionLimits(
    (Limit("cost_per_day[gpt-*]", "cost", "day", Decimal("1.00"), models=("gpt-*",)),)
)


async def test_a_superseded_estimate_leaves_no_phantom_spend_on_a_per_model_budget(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    bound = Decimal("0.90")
    first = await storage.admit(
        "alice", day=DAY, month_start=MONTH, limits=LIMITS, now=NOW,
        pending=Pending("p1", "chat", cost=bound, reserved_cost=bound),
    )  # fmt: skip
    assert first.admitted
    # Its gateway is taken for dead: the estimate (the bound) is charged...
    later = NOW + timedelta(minutes=10)
    assert await storage.recover(before=later, now=later) == ["p1"]
    # ...then the answer's real record arrives: it cost 0.05.
    event = UsageEvent(
        answer_id="a-p1", user_id="alice", day=DAY, created_at=later, endpoint="chat",
        cost=Decimal("0.05"),
    )  # fmt: skip
    assert await storage.settle(event, pending_id="p1")
    assert (await storage.daily(DAY, DAY))[0].cost == Decimal("0.05")
    # 0.05 spent of 1.00: an answer bounded at 0.50 fits.
    second = await storage.admit(
        "alice", day=DAY, month_start=MONTH, limits=LIMITS, now=later,
        pending=Pending("p2", "chat", cost=Decimal("0.50"), reserved_cost=Decimal("0.50")),
    )  # fmt: skip
    assert second.admitted


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[PostgresStorage]:
    await _truncate(postgres_dsn)
    store = await PostgresStorage.open(postgres_dsn)
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_batched_settle_corrects_a_superseded_estimate_on_a_per_model_budget(
    pg: PostgresStorage,
) -> None:
    """The group-commit path: the superseding record is settled in one batch with
    answers counted in the same per-model counters."""
    await pg.ensure_user("alice", plan="free")
    bound = Decimal("0.40")

    async def admit(pending: str, at: datetime, cost: Decimal = bound) -> bool:
        decision = await pg.admit(
            "alice", day=DAY, month_start=MONTH, limits=LIMITS, now=at,
            pending=Pending(pending, "chat", cost=cost, reserved_cost=cost),
        )  # fmt: skip
        return decision.admitted

    assert await admit("p1", NOW)
    later = NOW + timedelta(minutes=10)
    assert await pg.recover(before=NOW + timedelta(seconds=1), now=later) == ["p1"]
    # 0.40 charged for p1 and 0.40 reserved for p2: another 0.40 does not fit.
    assert await admit("p2", later)
    assert not await admit("p3", later)

    def event(pending: str, cost: str) -> UsageEvent:
        return UsageEvent(
            answer_id=f"a-{pending}", user_id="alice", day=DAY, created_at=later,
            endpoint="chat", cost=Decimal(cost),
        )  # fmt: skip

    assert await admit("p3", later, Decimal("0.10"))
    # p2 goes first and alone; p3 and p1 (the supersede) wait and go as a batch.
    results = await asyncio.gather(
        pg.settle(event("p2", "0.02"), pending_id="p2"),
        pg.settle(event("p3", "0.03"), pending_id="p3"),
        pg.settle(event("p1", "0.05"), pending_id="p1"),
    )
    assert results == [True, True, True]
    batches, sent = pg.group_commit["settle"]
    assert sent == 3 and batches < 3
    assert (await pg.daily(DAY, DAY))[0].cost == Decimal("0.10")
    # 0.10 spent of 1.00, nothing reserved: an answer bounded at 0.90 fits.
    assert await admit("p4", later, Decimal("0.90"))
