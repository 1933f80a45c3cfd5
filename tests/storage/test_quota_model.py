"""Issue 21, the proof: random admissions, settles, refunds, cancellations and
recoveries over random limit sets, driven through each storage backend and
through a plain-Python model of the rules written here on its own; every
decision and every counter must agree.

The model is deliberately naive - lists of what happened, sums over them - so
that it shares nothing with gateway/quota.py or the backends' SQL but the
rules as docs/quotas.md states them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from gateway.quota import Limit
from gateway.storage import AdmissionLimits, Lease, Pending, Storage, UsageEvent, WebSearch

DAY = date(2026, 11, 21)
EARLIER = date(2026, 11, 4)
MONTH = date(2026, 11, 1)
START = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
MEASURED = {"tokens", "cost"}
WINDOW = {"minute": 60}
BUCKET = {"minute": 5}


@dataclass
class Open:
    """An admitted answer not yet settled, refunded or recovered."""

    id: str
    at: datetime
    web: int
    reserved: Decimal
    estimate_tokens: int
    estimate_cost: Decimal
    lease: bool
    rates: set[tuple[str, str]]


@dataclass
class Model:
    # (meter, day) -> amount; cost_reserved separately
    counted: dict[tuple[str, date], Decimal] = field(default_factory=dict)
    reserved: Decimal = Decimal(0)
    open: dict[str, Open] = field(default_factory=dict)
    # (meter, per) -> [(moment, amount)]
    rate_log: dict[tuple[str, str], list[tuple[datetime, int]]] = field(default_factory=dict)
    limits: list[Limit] = field(default_factory=list)

    def add(self, meter: str, day: date, amount: Decimal | int) -> None:
        self.counted[(meter, day)] = self.counted.get((meter, day), Decimal(0)) + amount

    def used(self, limit: Limit, now: datetime) -> Decimal:
        if limit.per == "open":
            return Decimal(sum(1 for o in self.open.values() if o.lease))
        if limit.per in WINDOW:
            return self.rate(limit.meter, limit.per, now)
        days = [d for (m, d) in self.counted if m == limit.meter]
        if limit.per == "day":
            days = [d for d in days if d == DAY]
        total = sum((self.counted[(limit.meter, d)] for d in days), Decimal(0))
        if limit.meter == "cost":
            total += self.reserved  # every reservation is on DAY here
        return total

    def rate(self, meter: str, per: str, now: datetime) -> Decimal:
        width = BUCKET[per]
        first = math.floor(now.timestamp() / width) - 12  # the current bucket and 12 before
        return Decimal(
            sum(
                amount
                for at, amount in self.rate_log.get((meter, per), [])
                if math.floor(at.timestamp() / width) >= first
            )
        )

    def refuses(self, limit: Limit, used: Decimal, amount: Decimal) -> bool:
        if amount > 0 and used + amount > limit.max:
            return True
        return limit.meter in MEASURED and used >= limit.max

    def retry(self, limit: Limit, amount: Decimal, now: datetime) -> int:
        width = BUCKET[limit.per]
        first = math.floor(now.timestamp() / width) - 12
        buckets: dict[int, int] = {}
        for at, value in self.rate_log.get((limit.meter, limit.per), []):
            b = math.floor(at.timestamp() / width)
            if b >= first:
                buckets[b] = buckets.get(b, 0) + value
        used = Decimal(sum(buckets.values()))
        for b in sorted(buckets):
            used -= buckets[b]
            if not self.refuses(limit, used, amount):
                return max(math.ceil((b + 13) * width - now.timestamp()), 1)
        return WINDOW[limit.per]

    def admit(
        self,
        limits: list[Limit],
        now: datetime,
        pid: str,
        *,
        web: bool,
        optional: bool,
        cost: Decimal,
        lease: bool,
        estimate: int,
    ) -> tuple[str | None, bool, int | None]:
        amounts = {"queries": 1, "cost": cost, "streams": int(lease), "web_searches": int(web)}
        granted = web
        for limit in limits:
            if (
                limit.meter == "web_searches"
                and web
                and self.refuses(limit, self.used(limit, now), Decimal(1))
            ):
                if not optional:
                    return limit.name, False, None
                granted = False
        for limit in limits:
            if limit.meter == "web_searches":
                continue
            amount = Decimal(amounts.get(limit.meter, 0))
            if self.refuses(limit, self.used(limit, now), amount):
                retry = self.retry(limit, amount, now) if limit.per in WINDOW else None
                return limit.name, False, retry
        self.add("queries", DAY, 1)
        self.add("web_searches", DAY, int(granted))
        self.reserved += cost
        rates = {(x.meter, x.per) for x in limits if x.per in WINDOW}
        if ("queries", "minute") in rates:
            self.rate_log.setdefault(("queries", "minute"), []).append((now, 1))
        self.open[pid] = Open(
            pid, now, int(granted), cost, estimate, max(cost, Decimal("0.001")), lease, rates
        )
        return None, granted, None

    def settle(self, pid: str, now: datetime, tokens: int, cost: Decimal, web: int) -> bool:
        o = self.open.pop(pid, None)
        if o is None:
            return False
        self.add("web_searches", DAY, web - o.web)
        self.add("tokens", DAY, tokens)
        self.add("cost", DAY, cost)
        self.reserved -= o.reserved
        if ("tokens", "minute") in o.rates:
            self.rate_log.setdefault(("tokens", "minute"), []).append((now, tokens))
        return True

    def refund(self, pid: str) -> bool:
        o = self.open.pop(pid, None)
        if o is None:
            return False
        self.add("queries", DAY, -1)
        self.add("web_searches", DAY, -o.web)
        self.reserved -= o.reserved
        if ("queries", "minute") in o.rates:
            self.rate_log.setdefault(("queries", "minute"), []).append((o.at, -1))
        return True

    def recover(self, before: datetime) -> list[str]:
        gone = sorted(pid for pid, o in self.open.items() if o.at < before)
        for pid in gone:
            o = self.open.pop(pid)
            self.add("tokens", DAY, o.estimate_tokens)
            self.add("cost", DAY, o.estimate_cost)
            self.reserved -= o.reserved
        return gone


def random_limits(rng: random.Random) -> list[Limit]:
    pool = [
        Limit("queries_per_day", "queries", "day", Decimal(rng.randint(0, 40))),
        Limit("requests_per_minute", "queries", "minute", Decimal(rng.randint(1, 4))),
        Limit("tokens_per_day", "tokens", "day", Decimal(rng.randint(500, 4000))),
        Limit("tokens_per_month", "tokens", "month", Decimal(rng.randint(1000, 8000))),
        Limit("tokens_per_minute", "tokens", "minute", Decimal(rng.randint(50, 400))),
        Limit("cost_per_day", "cost", "day", Decimal(rng.randint(1, 600)) / 100),
        Limit("cost_per_month", "cost", "month", Decimal(rng.randint(50, 900)) / 100),
        Limit("max_concurrent_streams", "streams", "open", Decimal(rng.randint(1, 4))),
    ]
    chosen = [limit for limit in pool if rng.random() < 0.5]
    if rng.random() < 0.6:
        chosen.insert(
            0, Limit("web_searches_per_day", "web_searches", "day", Decimal(rng.randint(0, 4)))
        )
    return chosen


@pytest.mark.parametrize("seed", range(8))
async def test_backends_agree_with_the_model(storage: Storage, seed: int) -> None:
    rng = random.Random(seed)
    model = Model()
    await storage.ensure_user("alice", plan="free")
    # Spending earlier in the month, for the monthly windows.
    earlier = UsageEvent(
        answer_id="earlier", user_id="alice", day=EARLIER, created_at=START,
        endpoint="chat", total_tokens=rng.randint(0, 400), cost=Decimal(rng.randint(0, 80)) / 100,
    )  # fmt: skip
    assert await storage.settle(earlier)
    model.add("tokens", EARLIER, earlier.total_tokens)
    model.add("cost", EARLIER, earlier.cost)

    now = START
    serial = 0
    for _ in range(100):
        now += timedelta(seconds=rng.choice([0, 0, 1, 3, 7, 20, 61]))
        op = rng.random()
        if op < 0.5 or not model.open:
            if not model.limits or rng.random() < 0.3:
                model.limits = random_limits(rng)
            limits = model.limits
            serial += 1
            pid = f"r{seed}-{serial}"
            web = rng.random() < 0.4
            optional = rng.random() < 0.5
            cost = Decimal(rng.randint(0, 60)) / 100
            lease = any(x.meter == "streams" for x in limits)
            estimate = rng.randint(1, 50)
            expected = model.admit(
                limits,
                now,
                pid,
                web=web,
                optional=optional,
                cost=cost,
                lease=lease,
                estimate=estimate,
            )
            got = await storage.admit(
                "alice",
                day=DAY,
                month_start=MONTH,
                limits=AdmissionLimits(limits),
                now=now,
                lease=Lease(pid, now + timedelta(days=1)) if lease else None,
                pending=Pending(
                    pid, "chat", prompt_tokens=estimate, total_tokens=estimate,
                    cost=max(cost, Decimal("0.001")), reserved_cost=cost,
                ),
                web_search=WebSearch(None, "disable" if optional else "refuse") if web else None,
            )  # fmt: skip
            assert (got.refused_by, got.web_search_reserved, got.retry_after) == expected, (
                seed,
                serial,
            )
        elif op < 0.75:
            pid = rng.choice(sorted(model.open))
            tokens = rng.randint(0, 150)
            o = model.open[pid]
            cost = (o.reserved * rng.randint(0, 100) / 100).quantize(Decimal("0.0001"))
            web = rng.randint(0, o.web)
            ok = model.settle(pid, now, tokens, cost, web)
            event = UsageEvent(
                answer_id=f"a-{pid}", user_id="alice", day=DAY, created_at=now, endpoint="chat",
                total_tokens=tokens, cost=cost, web_searches=web,
            )  # fmt: skip
            assert await storage.settle(event, lease_id=pid, pending_id=pid) is ok
        elif op < 0.92:
            pid = rng.choice(sorted(model.open))
            ok = model.refund(pid)
            assert await storage.refund("alice", day=DAY, lease_id=pid, pending_id=pid) is ok
            # A cancelled admission is given back the same way, once.
            assert not await storage.refund("alice", day=DAY, lease_id=pid, pending_id=pid)
        else:
            before = now - timedelta(seconds=rng.choice([0, 30, 120]))
            expected_ids = model.recover(before)
            got_ids = await storage.recover(before=before, now=now, limit=1000)
            assert sorted(got_ids) == expected_ids

        # Every counter agrees after every step.
        (row,) = [r for r in await storage.daily(DAY, DAY) if r.user_id == "alice"] or [None]
        counted = {
            m: model.counted.get((m, DAY), Decimal(0))
            for m in ("queries", "web_searches", "tokens", "cost")
        }
        if row is None:
            assert all(v == 0 for v in counted.values())
        else:
            assert (row.queries, row.web_searches, row.total_tokens, row.cost) == (
                counted["queries"], counted["web_searches"], counted["tokens"], counted["cost"]
            ), (seed, serial)  # fmt: skip
        assert await storage.open_streams("alice", now=now) == sum(
            1 for o in model.open.values() if o.lease
        )
        rates = await storage.rate_counts("alice", now=now)
        for key in (("queries", "minute"), ("tokens", "minute")):
            assert rates.get(key, Decimal(0)) == model.rate(*key, now), (seed, serial, key)  # type: ignore[arg-type]

    # Once every answer has ended, nothing is reserved: a cost limit of exactly
    # what was spent today admits a request reserving nothing more... and
    # refuses one reserving a cent.
    for pid in sorted(model.open):
        model.refund(pid)
        await storage.refund("alice", day=DAY, lease_id=pid, pending_id=pid)
    spent = model.counted.get(("cost", DAY), Decimal(0))
    exact = AdmissionLimits(cost_per_day=spent + Decimal("0.01"))
    assert (await storage.admit(
        "alice", day=DAY, month_start=MONTH, limits=exact, now=now,
        pending=Pending("last", "chat", reserved_cost=Decimal("0.01")),
    )).admitted  # fmt: skip
    assert not (await storage.admit(
        "alice", day=DAY, month_start=MONTH, limits=exact, now=now,
        pending=Pending("last2", "chat", reserved_cost=Decimal("0.01")),
    )).admitted  # fmt: skip
