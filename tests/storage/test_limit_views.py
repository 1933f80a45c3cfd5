"""The counters the usage views read in one go (issue 21): the rate buckets of
a user or a team's members, and the per-model limits' own counters, on SQLite
and a real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from gateway.quota.limits import Limit, bucket_of
from gateway.storage import AdmissionLimits, Storage
from tests.storage.test_contract import DAY, MONTH, NOW, event, pending


async def test_model_counters_hold_the_day_and_the_month_per_key(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    per_model = Limit("queries_per_day[gpt*]", "queries", "day", Decimal(100), models=("gpt*",))
    key = per_model.counter_key
    assert key is not None
    limits = AdmissionLimits([per_model])
    yesterday = DAY - timedelta(days=1)
    for n, day in enumerate([yesterday, DAY, DAY]):
        admitted = await storage.admit(
            "alice", day=day, month_start=MONTH, now=NOW, limits=limits,
            pending=pending(f"r{n}"),
        )  # fmt: skip
        assert admitted.admitted
        cost = "0.1" if n else "12345678901234.56789"
        assert await storage.settle(event(f"m{n}", day=day, cost=cost), pending_id=f"r{n}")
    counters = await storage.model_counters("alice", [key, "m:other"], day=DAY, month_start=MONTH)
    assert counters[(key, "queries", "day")] == 2
    assert counters[(key, "queries", "month")] == 3
    assert counters[(key, "cost", "day")] == Decimal("0.2")
    assert counters[(key, "cost", "month")] == Decimal("12345678901234.76789")
    assert counters[(key, "tokens", "day")] == 200
    assert (("m:other", "queries", "day")) not in counters
    assert await storage.model_counters("alice", [], day=DAY, month_start=MONTH) == {}


async def test_rate_buckets_are_summed_over_the_users_asked(storage: Storage) -> None:
    limits = AdmissionLimits([Limit("requests_per_minute", "queries", "minute", Decimal(10))])
    for user in ("alice", "bob", "carol"):
        await storage.ensure_user(user, plan="free")
    for user in ("alice", "bob", "bob", "carol"):
        await storage.admit(user, day=DAY, month_start=MONTH, now=NOW, limits=limits)
    await storage.admit(
        "alice", day=DAY, month_start=MONTH, now=NOW + timedelta(seconds=10), limits=limits
    )
    bucket = bucket_of("minute", NOW.timestamp())
    assert await storage.rate_buckets(["alice", "bob"]) == {
        ("queries", "minute"): {bucket: 3, bucket_of("minute", NOW.timestamp() + 10): 1}
    }
    assert await storage.rate_buckets(["nobody"]) == {}
