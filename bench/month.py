"""python -m bench.month: what a SQLite admission costs late in the month.

A monthly limit (tokens_per_month) makes admission read the user's month to
date: every day row from the 1st to today. bench.lone's database is fresh (one
day), so it cannot show what that costs on the 30th. This fills a SQLite file
with ``--users`` users; on the 30th of the month each has a day row for every
day from the 1st, another set has only its day-1 row, then it times, in turns,
admissions (with a lease and a pending row, bench.lone's plan) of a day-1 user
on the 1st and of a day-30 user on the 30th, each followed by its answer's
settle (not timed). It prints the admission latency (p50 / p90 / p99, in
microseconds) of each.

For a side-by-side run of two checkouts, run it from each in turns:

    git archive main | tar -x -C /tmp/base
    for i in 1 2 3; do
      env PYTHONPATH=/tmp/base .venv/bin/python -P bench/month.py
      .venv/bin/python -m bench.month
    done
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import uvloop

import gateway
from bench.lone import demo_answer, quantiles
from gateway.storage import AdmissionLimits, Lease, Pending
from gateway.storage.sqlite import SQLiteStorage

LIMITS = AdmissionLimits(
    queries_per_day=10**9,
    tokens_per_day=10**12,
    tokens_per_month=10**13,
    max_concurrent_streams=10**6,
)
MONTH = date(2026, 12, 1)


async def _fill(store: SQLiteStorage, users: int, last: int) -> list[str]:
    """``users`` users with a day row (as a day of answers leaves it) for every
    day of the month from the 1st to ``last``."""
    names = [f"d{last}-{n}" for n in range(users)]
    for name in names:
        await store.ensure_user(name, plan="free")
    rows = [
        (
            name,
            MONTH.replace(day=d).isoformat(),
            90 + d,
            1000 * d,
            168 * d,
            1168 * d,
            f"{d}.0013030",
        )
        for name in names
        for d in range(1, last + 1)
    ]

    def run(conn: object) -> None:
        conn.executemany(  # type: ignore[attr-defined]
            "INSERT INTO usage_daily (user_id, day, queries, prompt_tokens, completion_tokens, "
            "total_tokens, cost) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    await store._tx(run)
    return names


async def _answer(store: SQLiteStorage, user: str, day: int, i: int) -> float:
    """One admission's latency in microseconds (its answer settled after)."""
    now = datetime(MONTH.year, MONTH.month, day, 12, tzinfo=UTC) + timedelta(milliseconds=i)
    rid = f"month-{day}-{i}"
    began = time.perf_counter_ns()
    admitted = await store.admit(
        user,
        day=now.date(),
        month_start=MONTH,
        limits=LIMITS,
        now=now,
        lease=Lease(rid, now + timedelta(minutes=5)),
        pending=Pending(id=rid, endpoint="chat-messages", prompt_tokens=10, total_tokens=10),
    )
    took = (time.perf_counter_ns() - began) / 1000
    if not admitted.admitted:
        raise RuntimeError(f"{user} refused: {admitted.refused_by}")
    event = demo_answer(f"m-{rid}", user, now, rid)
    await store.settle(event, lease_id=rid, pending_id=rid)
    return took


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.month", description=__doc__)
    parser.add_argument("--answers", type=int, default=2000, help="admissions on each day")
    parser.add_argument("--users", type=int, default=20, help="users on each day")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="idle time between answers")
    args = parser.parse_args()
    print(f"gateway from {Path(gateway.__file__).parent}; {args.answers:,} admissions a day")
    with tempfile.TemporaryDirectory(prefix="gateway-month-") as directory:
        store = await SQLiteStorage.open(str(Path(directory) / "gateway.db"))
        try:
            await store.migrate()
            users = {1: await _fill(store, args.users, 1), 30: await _fill(store, args.users, 30)}
            took: dict[int, list[float]] = {1: [], 30: []}
            for i in range(args.answers):
                for day in (1, 30):
                    took[day].append(await _answer(store, users[day][i % args.users], day, i))
                    await asyncio.sleep(args.gap_ms / 1000)
        finally:
            await store.close()
    print("| day of the month | admission p50 / p90 / p99 |")
    print("|---|---|")
    for day, values in took.items():
        print(f"| {day} | {quantiles(values)} us |")


if __name__ == "__main__":
    uvloop.run(main())
