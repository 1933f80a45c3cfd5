"""Issue 21, the proof: random admissions, settles, refunds, cancellations and
recoveries over random limit sets, driven through each storage backend and
through a plain-Python model of the rules written here on its own; every
decision and every counter must agree.

The model is deliberately naive - lists of what happened, sums over them - so
that it shares nothing with gateway/quota/limits.py or the backends' SQL but the
rules as docs/quotas.md states them."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from gateway.quota.limits import Limit
from gateway.storage import (
    Admission,
    AdmissionLimits,
    Lease,
    Pending,
    Storage,
    UsageEvent,
    WebSearch,
)
from gateway.storage.sqlite import SQLiteStorage

DAY = date(2026, 11, 21)
EARLIER = date(2026, 11, 4)
MONTH = date(2026, 11, 1)
START = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
MEASURED = {"tokens", "cost"}
USERS = ("alice", "bob")  # both in the team "t"
WINDOW = {"minute": 60}
BUCKET = {"minute": 5}


@dataclass
class Open:
    """An admitted answer not yet settled, refunded or recovered."""

    user: str
    id: str
    at: datetime
    web: int
    reserved: Decimal
    estimate_tokens: int
    estimate_cost: Decimal
    lease: bool
    rates: set[tuple[str, str]]
    keys: set[str] = field(default_factory=set)  # the per-model counters it counts in
    lease_expires: datetime | None = None  # its stream lease's end (None: not before the test's)

    def streams(self, now: datetime) -> bool:
        """Whether it holds an open stream at ``now`` (an expired lease does not)."""
        return self.lease and (self.lease_expires is None or self.lease_expires > now)


@dataclass
class Model:
    # (user, meter, day) -> amount; what open answers reserved is on their rows
    counted: dict[tuple[str, str, date], Decimal] = field(default_factory=dict)
    open: dict[str, Open] = field(default_factory=dict)
    # (user, meter, per) -> [(moment, amount)]
    rate_log: dict[tuple[str, str, str], list[tuple[datetime, int]]] = field(default_factory=dict)
    limits: list[Limit] = field(default_factory=list)
    # (user, counter key, meter, day) -> amount: per-model limits' counters
    per_model: dict[tuple[str, str, str, date], Decimal] = field(default_factory=dict)
    upload_limits: list[Limit] = field(default_factory=list)
    # Counted today: (user, size, key).
    uploaded: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, user: str, meter: str, day: date, amount: Decimal | int) -> None:
        key = (user, meter, day)
        self.counted[key] = self.counted.get(key, Decimal(0)) + amount

    def add_models(self, o: Open, meter: str, amount: Decimal | int) -> None:
        for key in o.keys:
            k = (o.user, key, meter, DAY)
            self.per_model[k] = self.per_model.get(k, Decimal(0)) + amount

    def used(self, limit: Limit, user: str, now: datetime) -> Decimal:
        key = limit.counter_key
        if key is not None:  # every answer here is on DAY, so day = month
            total = self.per_model.get((user, key, limit.meter, DAY), Decimal(0))
            if limit.meter == "cost":
                total += sum(
                    (o.reserved for o in self.open.values() if o.user == user and key in o.keys),
                    Decimal(0),
                )
            return total
        # A team-scope limit counts both users (the team is everyone here).
        users = USERS if limit.scope == "team" else (user,)
        if limit.per == "open":
            return Decimal(sum(1 for o in self.open.values() if o.streams(now) and o.user in users))
        if limit.per in WINDOW:  # a team's rate: its members' summed
            return sum((self.rate(u, limit.meter, limit.per, now) for u in users), Decimal(0))
        total = sum(
            (
                amount
                for (u, m, d), amount in self.counted.items()
                if u in users and m == limit.meter and (limit.per == "month" or d == DAY)
            ),
            Decimal(0),
        )
        if limit.meter == "cost":  # every reservation is on DAY here
            total += sum((o.reserved for o in self.open.values() if o.user in users), Decimal(0))
        return total

    def rate(self, user: str, meter: str, per: str, now: datetime) -> Decimal:
        width = BUCKET[per]
        first = math.floor(now.timestamp() / width) - 12  # the current bucket and 12 before
        return Decimal(
            sum(
                amount
                for at, amount in self.rate_log.get((user, meter, per), [])
                if math.floor(at.timestamp() / width) >= first
            )
        )

    def refuses(self, limit: Limit, used: Decimal, amount: Decimal) -> bool:
        if amount > 0 and used + amount > limit.max:
            return True
        return limit.meter in MEASURED and used >= limit.max

    def retry(self, limit: Limit, user: str, amount: Decimal, now: datetime) -> int:
        width = BUCKET[limit.per]
        first = math.floor(now.timestamp() / width) - 12
        buckets: dict[int, int] = {}
        for u in USERS if limit.scope == "team" else (user,):
            for at, value in self.rate_log.get((u, limit.meter, limit.per), []):
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
        user: str,
        now: datetime,
        pid: str,
        *,
        web: bool,
        optional: bool,
        cost: Decimal,
        lease: bool,
        estimate: int,
        lease_expires: datetime | None = None,
    ) -> tuple[str | None, bool, int | None]:
        amounts = {"queries": 1, "cost": cost, "streams": int(lease), "web_searches": int(web)}
        granted = web
        for limit in limits:
            if (
                limit.meter == "web_searches"
                and web
                and self.refuses(limit, self.used(limit, user, now), Decimal(1))
            ):
                if not optional:
                    return limit.name, False, None
                granted = False
        for limit in limits:
            if limit.meter == "web_searches":
                continue
            amount = Decimal(amounts.get(limit.meter, 0))
            if self.refuses(limit, self.used(limit, user, now), amount):
                retry = self.retry(limit, user, amount, now) if limit.per in WINDOW else None
                return limit.name, False, retry
        self.add(user, "queries", DAY, 1)
        self.add(user, "web_searches", DAY, int(granted))
        rates = {(x.meter, x.per) for x in limits if x.per in WINDOW}
        if ("queries", "minute") in rates:
            self.rate_log.setdefault((user, "queries", "minute"), []).append((now, 1))
        self.open[pid] = Open(
            user, pid, now, int(granted), cost, estimate, max(cost, Decimal("0.001")), lease, rates,
            {k for k in (x.counter_key for x in limits) if k is not None}, lease_expires,
        )  # fmt: skip
        self.add_models(self.open[pid], "queries", 1)
        return None, granted, None

    def upload(self, limits: list[Limit], user: str, size: int, key: str) -> str | None:
        """An upload of ``size`` bytes: refused by the first limit it would pass,
        or counted (and kept, to be given back later maybe)."""
        for limit in limits:
            amount = Decimal(1 if limit.meter == "uploads" else size)
            if self.refuses(limit, self.used(limit, user, START), amount):
                return limit.name
        self.add(user, "uploads", DAY, 1)
        self.add(user, "upload_bytes", DAY, size)
        self.uploaded.append((user, size, key))
        return None

    def release_upload(self, at: int) -> tuple[str, str]:
        user, size, key = self.uploaded.pop(at)
        self.add(user, "uploads", DAY, -1)
        self.add(user, "upload_bytes", DAY, -size)
        return user, key

    def settle(self, pid: str, now: datetime, tokens: int, cost: Decimal, web: int) -> bool:
        o = self.open.pop(pid, None)
        if o is None:
            return False
        self.add(o.user, "web_searches", DAY, web - o.web)
        self.add(o.user, "tokens", DAY, tokens)
        self.add(o.user, "cost", DAY, cost)
        self.add_models(o, "tokens", tokens)
        self.add_models(o, "cost", cost)
        if ("tokens", "minute") in o.rates:
            self.rate_log.setdefault((o.user, "tokens", "minute"), []).append((now, tokens))
        return True

    def refund(self, pid: str) -> bool:
        o = self.open.pop(pid, None)
        if o is None:
            return False
        self.add(o.user, "queries", DAY, -1)
        self.add(o.user, "web_searches", DAY, -o.web)
        self.add_models(o, "queries", -1)
        if ("queries", "minute") in o.rates:
            self.rate_log.setdefault((o.user, "queries", "minute"), []).append((o.at, -1))
        return True

    def recover(self, before: datetime, now: datetime) -> list[str]:
        gone = sorted(pid for pid, o in self.open.items() if o.at < before)
        for pid in gone:
            o = self.open.pop(pid)
            if ("tokens", "minute") in o.rates:  # the estimate counts, as settled tokens
                self.rate_log.setdefault((o.user, "tokens", "minute"), []).append(
                    (now, o.estimate_tokens)
                )
            self.add(o.user, "tokens", DAY, o.estimate_tokens)
            self.add(o.user, "cost", DAY, o.estimate_cost)
            self.add_models(o, "tokens", o.estimate_tokens)
            self.add_models(o, "cost", o.estimate_cost)
        return gone


async def _decision(call: Awaitable[Admission]) -> tuple[str | None, bool, int | None]:
    got = await call
    return got.refused_by, got.web_search_reserved, got.retry_after


async def _sorted(call: Awaitable[list[str]]) -> list[str]:
    return sorted(await call)


def group_commit(storage: Storage) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = getattr(storage, "group_commit", {})
    return counts


def random_limits(rng: random.Random, *, own: bool = False) -> list[Limit]:
    """A random limit set; ``own``: the user's own limits only (no team's, no
    per-model ones), which PostgreSQL decides in gateway_admit_many's own loop
    rather than through gateway_admit."""
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
    if own:
        if rng.random() < 0.6:
            chosen.insert(
                0, Limit("web_searches_per_day", "web_searches", "day", Decimal(rng.randint(0, 4)))
            )
        return chosen
    team = [
        Limit("team_queries_per_day", "queries", "day", Decimal(rng.randint(0, 60)), "team"),
        Limit("team_tokens_per_day", "tokens", "day", Decimal(rng.randint(500, 6000)), "team"),
        Limit("team_cost_per_day", "cost", "day", Decimal(rng.randint(1, 900)) / 100, "team"),
        Limit("team_streams", "streams", "open", Decimal(rng.randint(1, 5)), "team"),
        Limit("team_rpm", "queries", "minute", Decimal(rng.randint(1, 6)), "team"),
        Limit("team_tpm", "tokens", "minute", Decimal(rng.randint(80, 600)), "team"),
    ]
    chosen += [limit for limit in team if rng.random() < 0.4]
    per_model = [
        Limit("gpt41_queries", "queries", "day", Decimal(rng.randint(0, 20)), models=("gpt-4.1*",)),
        Limit("gpt41_cost", "cost", "month", Decimal(rng.randint(1, 300)) / 100,
              models=("gpt-4.1*", "o3")),
        Limit("o3_tokens", "tokens", "day", Decimal(rng.randint(100, 2000)), models=("o3",)),
    ]  # fmt: skip
    chosen += [limit for limit in per_model if rng.random() < 0.5]
    if rng.random() < 0.6:
        chosen.insert(
            0, Limit("web_searches_per_day", "web_searches", "day", Decimal(rng.randint(0, 4)))
        )
    return chosen


def random_upload_limits(rng: random.Random) -> list[Limit]:
    pool = [
        Limit("uploads_per_day", "uploads", "day", Decimal(rng.randint(0, 6))),
        Limit("uploads_per_month", "uploads", "month", Decimal(rng.randint(2, 10))),
        Limit("upload_bytes_per_day", "upload_bytes", "day", Decimal(rng.randint(100, 2000))),
        Limit("upload_bytes_per_month", "upload_bytes", "month", Decimal(rng.randint(300, 3000))),
        Limit("team_uploads_per_day", "uploads", "day", Decimal(rng.randint(0, 8)), "team"),
        Limit("team_upload_bytes", "upload_bytes", "month", Decimal(rng.randint(200, 4000)), "team"),
    ]  # fmt: skip
    return [limit for limit in pool if rng.random() < 0.4]


async def _refused_by(call: Awaitable[Admission]) -> str | None:
    return (await call).refused_by


def _upload(
    rng: random.Random, storage: Storage, model: Model
) -> tuple[str, Coroutine[Any, Any, object], object, str]:
    """An upload asked (reserved or refused), or one reserved given back (the
    upstream refused it): the call, and what the model expects of it."""
    if model.uploaded and rng.random() < 0.3:
        user, key = model.release_upload(rng.randrange(len(model.uploaded)))
        return "release_upload", storage.release_upload(user, key=key), None, user
    if not model.upload_limits or rng.random() < 0.3:
        model.upload_limits = random_upload_limits(rng)
    user = rng.choice(USERS)
    size = rng.choice([0, rng.randint(1, 900)])
    key = f"upload-{rng.getrandbits(64):x}"
    expected = model.upload(model.upload_limits, user, size, key)
    reserved = storage.reserve_upload(
        user, key=key, day=DAY, month_start=MONTH, size=size, limits=model.upload_limits, team="t"
    )
    return "upload", _refused_by(reserved), expected, user


async def _step(call: Awaitable[object], expected: object, where: object) -> None:
    got = await call
    assert got == expected, where


async def _agrees(storage: Storage, model: Model, now: datetime, where: object) -> None:
    """Every counter of the backend is the model's."""
    rows = {r.user_id: r for r in await storage.daily(DAY, DAY)}
    for user in USERS:
        counted = {
            m: model.counted.get((user, m, DAY), Decimal(0))
            for m in ("queries", "web_searches", "tokens", "cost", "uploads", "upload_bytes")
        }
        row = rows.get(user)
        got_row = (
            (row.queries, row.web_searches, row.total_tokens, row.cost, row.uploads,
             row.upload_bytes)
            if row else (0, 0, 0, 0, 0, 0)
        )  # fmt: skip
        assert got_row == (
            counted["queries"], counted["web_searches"], counted["tokens"], counted["cost"],
            counted["uploads"], counted["upload_bytes"],
        ), (where, user)  # fmt: skip
        assert await storage.open_streams(user, now=now) == sum(
            1 for o in model.open.values() if o.streams(now) and o.user == user
        )
        rates = await storage.rate_counts(user, now=now)
        for meter in ("queries", "tokens"):
            assert rates.get((meter, "minute"), Decimal(0)) == model.rate(  # type: ignore[comparison-overlap]
                user, meter, "minute", now
            ), (where, user, meter)


@pytest.mark.parametrize(
    ("batched", "own"),
    [(False, False), (True, False), (True, True)],
    ids=["one-by-one", "batched", "batched-own-limits"],
)
@pytest.mark.parametrize("seed", range(8))
async def test_backends_agree_with_the_model(
    storage: Storage, seed: int, batched: bool, own: bool
) -> None:
    """One call at a time, or (``batched``) runs of up to eight calls made at
    once, which the backend's group commit takes together - decided and written
    exactly as one after another, in the order they were made, as the model
    has them. On SQLite every write goes through one queue, so a run mixes
    admissions, settles, refunds and recoveries; on PostgreSQL admissions and
    settles are batched each on their own, so a run there is of one kind.
    ``own``: the users' own limits only (most sets above have a team's or a
    per-model limit, which PostgreSQL decides through gateway_admit), and
    stream leases that expire during the run."""
    rng = random.Random(seed)
    model = Model()
    await storage.create_team("t", plan="free", now=START)
    for user in USERS:
        await storage.ensure_user(user, plan="free")
        await storage.set_team(user, "t")
    # Spending earlier in the month, for the monthly windows.
    earlier = UsageEvent(
        answer_id="earlier", user_id="alice", day=EARLIER, created_at=START,
        endpoint="chat", total_tokens=rng.randint(0, 400), cost=Decimal(rng.randint(0, 80)) / 100,
    )  # fmt: skip
    assert await storage.settle(earlier)
    model.add("alice", "tokens", EARLIER, earlier.total_tokens)
    model.add("alice", "cost", EARLIER, earlier.cost)
    # And uploads earlier in the month (counted whatever the limits).
    for user in USERS:
        size = rng.randint(0, 600)
        assert (
            await storage.reserve_upload(
                user, key=f"earlier-{user}", day=EARLIER, month_start=MONTH, size=size
            )
        ).admitted
        model.add(user, "uploads", EARLIER, 1)
        model.add(user, "upload_bytes", EARLIER, size)
    one_queue = isinstance(storage, SQLiteStorage)

    now = START
    serial = 0
    # Calls made and not yet awaited: (kind, the call, what the model expects,
    # the admission's user).
    run: list[tuple[str, Coroutine[Any, Any, object], object, str]] = []

    async def send() -> None:
        where = (seed, serial, [kind for kind, _, _, _ in run])
        if batched and (one_queue or run[0][0] in ("admit", "settle")):
            await asyncio.gather(*(_step(call, expected, where) for _, call, expected, _ in run))
        else:
            for _, call, expected, _ in run:
                await _step(call, expected, where)
        run.clear()
        await _agrees(storage, model, now, where)

    for _ in range(120):
        step = timedelta(seconds=rng.choice([0, 0, 1, 3, 7, 20, 61]))
        if one_queue or not run:
            # PostgreSQL measures a batch's rate windows at one moment: a run
            # there is made at one.
            now += step
        op = rng.random()
        kind = (
            "admit"
            if op < 0.5 or not model.open
            else "settle"
            if op < 0.75
            else "refund"
            if op < 0.92
            else "recover"
        )
        if rng.random() < 0.15:  # an upload asked, or one the upstream refused given back
            uploaded = _upload(rng, storage, model)
            if one_queue:
                run.append(uploaded)
            else:
                # PostgreSQL does not batch uploads: each is made at once. Uploads
                # count only the upload meters, which nothing else touches, so
                # one made before the run is sent is as if made after it.
                await _step(uploaded[1], uploaded[2], (seed, serial, uploaded[0]))
        if not one_queue and run and (kind != run[0][0] or kind not in ("admit", "settle")):
            await send()  # PostgreSQL: a run is of one batched kind
        calls: list[tuple[str, Coroutine[Any, Any, object], object, str]] = []
        if kind == "admit":
            if not model.limits or rng.random() < 0.3:
                model.limits = random_limits(rng, own=own)
            # The limits that hold a request for this model (admission's filter).
            requested = rng.choice(["gpt-4.1-mini", "o3", "gpt-4o"])
            limits = [x for x in model.limits if x.applies_to([requested])]
            user = rng.choice(USERS)
            serial += 1
            pid = f"r{seed}-{serial}"
            web = rng.random() < 0.4
            optional = rng.random() < 0.5
            cost = Decimal(rng.randint(0, 60)) / 100
            lease = any(x.meter == "streams" for x in limits)
            estimate = rng.randint(1, 50)
            lease_expires = now + (
                timedelta(seconds=rng.choice([5, 30, 90])) if own else timedelta(days=1)
            )
            if not one_queue and run and run[-1][3] != user:
                # PostgreSQL decides a batch user by user, so a run there is
                # one user's (the team's limits count the other's too).
                await send()
            expected = model.admit(
                limits, user, now, pid, web=web, optional=optional, cost=cost, lease=lease,
                estimate=estimate, lease_expires=lease_expires if own else None,
            )  # fmt: skip
            admission = storage.admit(
                user,
                day=DAY,
                month_start=MONTH,
                limits=AdmissionLimits(limits),
                now=now,
                lease=Lease(pid, lease_expires) if lease else None,
                pending=Pending(
                    pid, "chat", prompt_tokens=estimate, total_tokens=estimate,
                    cost=max(cost, Decimal("0.001")), reserved_cost=cost,
                ),
                web_search=WebSearch(None, "disable" if optional else "refuse") if web else None,
                team="t",
            )  # fmt: skip
            calls.append(("admit", _decision(admission), expected, user))
        elif kind == "settle":
            pid = rng.choice(sorted(model.open))
            tokens = rng.randint(0, 150)
            o = model.open[pid]
            cost = (o.reserved * rng.randint(0, 100) / 100).quantize(Decimal("0.0001"))
            web = rng.randint(0, o.web)
            ok = model.settle(pid, now, tokens, cost, web)
            event = UsageEvent(
                answer_id=f"a-{pid}", user_id=o.user, day=DAY, created_at=now, endpoint="chat",
                total_tokens=tokens, cost=cost, web_searches=web,
            )  # fmt: skip
            calls.append(("settle", storage.settle(event, lease_id=pid, pending_id=pid), ok, ""))
        elif kind == "refund":
            pid = rng.choice(sorted(model.open))
            user = model.open[pid].user
            ok = model.refund(pid)
            # A cancelled admission is given back the same way, once.
            for expected_refund in (ok, False):
                refund = storage.refund(user, day=DAY, lease_id=pid, pending_id=pid)
                calls.append(("refund", refund, expected_refund, ""))
        else:
            before = now - timedelta(seconds=rng.choice([0, 30, 120]))
            expected_ids = model.recover(before, now)
            recovered = _sorted(storage.recover(before=before, now=now, limit=1000))
            calls.append(("recover", recovered, expected_ids, ""))
        run += calls
        if (
            not batched
            or len(run) >= rng.randint(1, 8)
            or (not one_queue and kind not in ("admit", "settle"))
        ):
            await send()
    if run:
        await send()

    if batched:
        # The runs went together: fewer transactions than calls (own limits
        # refuse less often, so the runs break more often on a settle).
        batches, sent = map(sum, zip(*group_commit(storage).values(), strict=True))
        assert sent - batches > (10 if own else 15)
    # Once every answer has ended, nothing is reserved: a cost limit of exactly
    # what was spent today, and a cent, admits a request reserving a cent... and
    # refuses the next.
    for pid in sorted(model.open):
        user = model.open[pid].user
        model.refund(pid)
        await storage.refund(user, day=DAY, lease_id=pid, pending_id=pid)
    spent = model.counted.get(("alice", "cost", DAY), Decimal(0))
    exact = AdmissionLimits(cost_per_day=spent + Decimal("0.01"))
    assert (await storage.admit(
        "alice", day=DAY, month_start=MONTH, limits=exact, now=now,
        pending=Pending("last", "chat", reserved_cost=Decimal("0.01")),
    )).admitted  # fmt: skip
    assert not (await storage.admit(
        "alice", day=DAY, month_start=MONTH, limits=exact, now=now,
        pending=Pending("last2", "chat", reserved_cost=Decimal("0.01")),
    )).admitted  # fmt: skip
