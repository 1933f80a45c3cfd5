"""The storage contract for threshold alerts, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

from gateway.storage import AdmissionLimits, AlertCheck, AlertRequest, Storage
from tests.storage.test_contract import DAY, MONTH, NOW, _two_stores, event

DAILY = AlertCheck("tokens_per_day", DAY.isoformat(), 1000, (50, 80, 100))
MONTHLY = AlertCheck("tokens_per_month", "2026-11", 5000, (50,))
BOTH = AlertRequest((DAILY, MONTHLY), MONTH, ("webhook", "email"))


async def test_each_crossing_is_recorded_once_with_a_delivery_per_channel(
    storage: Storage,
) -> None:
    await storage.ensure_user("alice", plan="free")
    await storage.settle(event("m1", tokens=400), alerts=BOTH)
    assert await storage.list_alerts() == []
    await storage.settle(event("m2", tokens=450), alerts=BOTH)  # 850: 50% and 80%
    await storage.settle(event("m2", tokens=450), alerts=BOTH)  # a duplicate: nothing
    await storage.settle(event("m3", tokens=10), alerts=BOTH)  # 860: nothing new
    alerts = await storage.list_alerts()
    assert sorted((a.crossing.limit, a.crossing.threshold) for a in alerts) == [
        ("tokens_per_day", 50),
        ("tokens_per_day", 80),
    ]
    (fifty,) = [a for a in alerts if a.crossing.threshold == 50]
    assert (fifty.crossing.used, fifty.crossing.value, fifty.crossing.period) == (
        850,
        1000,
        "2026-11-21",
    )
    assert [(d.channel, d.status, d.attempts) for d in fifty.deliveries] == [
        ("email", "pending", 0),
        ("webhook", "pending", 0),
    ]
    # The month's tokens count every day of the month.
    await storage.settle(event("m4", tokens=2000, day=DAY - timedelta(days=1)))
    await storage.settle(event("m5", tokens=200), alerts=BOTH)  # month 3060, day 1060
    crossed = {(a.crossing.limit, a.crossing.threshold) for a in await storage.list_alerts()}
    assert crossed == {
        ("tokens_per_day", 50),
        ("tokens_per_day", 80),
        ("tokens_per_day", 100),
        ("tokens_per_month", 50),
    }
    assert await storage.list_alerts(user_id="bob") == []


async def test_queries_and_web_searches_are_watched_too(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    request = AlertRequest(
        (
            AlertCheck("queries_per_day", DAY.isoformat(), 2, (100,)),
            AlertCheck("web_searches_per_day", DAY.isoformat(), 1, (100,)),
        ),
        MONTH,
        ("webhook",),
    )
    await storage.admit("alice", day=DAY, month_start=MONTH, limits=AdmissionLimits(), now=NOW)
    await storage.settle(event("m1"), alerts=request)
    assert await storage.list_alerts() == []
    await storage.admit("alice", day=DAY, month_start=MONTH, limits=AdmissionLimits(), now=NOW)
    await storage.settle(event("m2", web_searches=1), alerts=request)
    assert {a.crossing.limit for a in await storage.list_alerts()} == {
        "queries_per_day",
        "web_searches_per_day",
    }


async def test_the_outbox_is_claimed_once_and_retried_when_due(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    only_day = AlertRequest((DAILY,), MONTH, ("webhook",))
    await storage.settle(event("m1", tokens=1000), alerts=only_day)  # 50, 80, 100
    later = NOW + timedelta(minutes=1)
    claimed = await storage.claim_outbox(now=NOW, claim_until=later, limit=2)
    assert [i.crossing.threshold for i in claimed] == [50, 80]
    rest = await storage.claim_outbox(now=NOW, claim_until=later)
    assert [i.crossing.threshold for i in rest] == [100]
    assert await storage.claim_outbox(now=NOW, claim_until=later) == []  # all claimed
    first, second = claimed
    await storage.outbox_delivered(first.id, now=NOW)
    await storage.outbox_failed(second.id, error="503", retry_at=NOW + timedelta(seconds=5))
    await storage.outbox_failed(rest[0].id, error="gone", retry_at=None)  # given up
    assert await storage.claim_outbox(now=NOW + timedelta(seconds=4), claim_until=later) == []
    (again,) = await storage.claim_outbox(now=NOW + timedelta(seconds=5), claim_until=later)
    assert (again.id, again.attempts, again.crossing.user_id) == (second.id, 1, "alice")
    # An expired claim (its worker died) is claimed again.
    (expired,) = await storage.claim_outbox(now=later, claim_until=later + timedelta(minutes=1))
    assert expired.id == second.id
    statuses = {
        a.crossing.threshold: [(d.status, d.attempts, d.last_error) for d in a.deliveries]
        for a in await storage.list_alerts()
    }
    assert statuses == {
        50: [("delivered", 1, None)],
        80: [("pending", 1, "503")],
        100: [("failed", 1, "gone")],
    }


async def test_concurrent_settles_on_two_stores_announce_each_crossing_once(
    storage: Storage, database_url: str
) -> None:
    """Replicas settling one user's answers at once: every crossing once."""
    await storage.ensure_user("alice", plan="free")
    first, second = await _two_stores(database_url)
    request = AlertRequest((DAILY,), MONTH, ("webhook",))
    try:
        await asyncio.gather(
            *(
                (first if i % 2 else second).settle(event(f"m{i}", tokens=50), alerts=request)
                for i in range(30)
            )
        )
        claims = await asyncio.gather(
            *(
                store.claim_outbox(now=NOW, claim_until=NOW + timedelta(minutes=1), limit=1)
                for store in (first, second, first, second, first, second)
            )
        )
    finally:
        await first.close()
        await second.close()
    alerts = await storage.list_alerts()
    assert sorted(a.crossing.threshold for a in alerts) == [50, 80, 100]
    assert all(len(a.deliveries) == 1 for a in alerts)
    claimed = [item.id for batch in claims for item in batch]
    assert len(claimed) == 3 and len(set(claimed)) == 3  # no row claimed twice


async def test_two_settles_landing_exactly_on_a_threshold_announce_it_once(
    storage: Storage, database_url: str
) -> None:
    """Two replicas settle 500 tokens each from 0 against 1000: only the later
    one reaches 100%, and no later settle would catch a crossing it missed (a
    stale read of the counters). Repeated, so that a missed one shows."""
    first, second = await _two_stores(database_url)
    request = AlertRequest(
        (AlertCheck("tokens_per_day", DAY.isoformat(), 1000, (50, 100)),), MONTH, ("webhook",)
    )
    rounds = 25
    try:
        for i in range(rounds):
            user = f"racer{i}"
            await storage.ensure_user(user, plan="free")
            settled = await asyncio.gather(
                first.settle(event(f"{user}-a", user=user, tokens=500), alerts=request),
                second.settle(event(f"{user}-b", user=user, tokens=500), alerts=request),
            )
            assert settled == [True, True]
    finally:
        await first.close()
        await second.close()
    alerts = await storage.list_alerts(limit=10 * rounds)
    crossed = sorted((a.crossing.user_id, a.crossing.threshold, a.crossing.used) for a in alerts)
    # 50% is reached by whichever settles first (at 500), 100% by the other (at 1000).
    assert crossed == sorted(
        (f"racer{i}", threshold, threshold * 10) for i in range(rounds) for threshold in (50, 100)
    )
    assert all(len(a.deliveries) == 1 for a in alerts)


async def test_money_crossings_keep_exact_decimals(storage: Storage) -> None:
    """A money budget's crossing keeps its limit and usage exactly (SQLite:
    TEXT columns since migration 0014; a REAL cannot hold these amounts)."""
    await storage.ensure_user("alice", plan="free")
    budget = Decimal("12345678901234.56789")
    request = AlertRequest(
        (AlertCheck("cost_per_month", "2026-11", budget, (50, 100), "9:2:1:"),),
        MONTH,
        ("webhook",),
    )
    await storage.settle(event("m1", cost="6172839450617.28394"), alerts=request)
    await storage.settle(event("m2", cost="0.1"), alerts=request)
    await storage.settle(event("m3", cost="6172839450617.18395"), alerts=request)
    alerts = {a.crossing.threshold: a.crossing for a in await storage.list_alerts()}
    assert (alerts[50].value, alerts[50].used) == (budget, Decimal("6172839450617.38394"))
    assert (alerts[100].value, alerts[100].used) == (budget, budget)
    # The outbox's rows (what the webhook sends) read the same amounts.
    due = await storage.claim_outbox(now=NOW, claim_until=NOW + timedelta(minutes=1))
    assert sorted((d.crossing.threshold, d.crossing.value, d.crossing.used) for d in due) == [
        (50, budget, Decimal("6172839450617.38394")),
        (100, budget, budget),
    ]
