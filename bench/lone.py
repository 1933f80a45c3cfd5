"""python -m bench.lone: what one admission and one settle cost when they go alone.

At 100 answers per second most storage calls find no batch in flight and go
alone; their latency is most of the gateway's own receive-to-forward time
(ledger ``overhead_ms``). This drives the storage directly - no gateway, no
HTTP - with one answer at a time, ``--gap-ms`` apart (the event loop idle in
between, as at a low rate): an admission with the bench's plan (queries and
tokens per day, tokens per month, open streams; a lease and a pending row), then
the settle of its answer. It prints the latency of each call (p50, p90, p99)
and the process's CPU per answer.

SQLite is a fresh temporary file; PostgreSQL (``--backends sqlite,postgres``) a
fresh database on ``--postgres`` (or ``$BENCH_POSTGRES``), dropped at the end.
The process runs on uvloop, as the gateway does.

For an A/B run, put the other checkout first on the path:

    .venv/bin/python -m bench.lone
    env PYTHONPATH=<other checkout> .venv/bin/python -P bench/lone.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import uvloop

import gateway
from gateway.storage import AdmissionLimits, Lease, Pending, Storage, UsageEvent
from gateway.storage.postgres import PostgresStorage
from gateway.storage.sqlite import SQLiteStorage

LIMITS = AdmissionLimits(
    queries_per_day=10**9,
    tokens_per_day=10**12,
    tokens_per_month=10**13,
    max_concurrent_streams=10**6,
)


def quantiles(values: list[float]) -> str:
    """p50 / p90 / p99 of ``values``, as the scripts print them."""
    ordered = sorted(values)
    at = [ordered[min(len(ordered) - 1, int(len(ordered) * q))] for q in (0.5, 0.9, 0.99)]
    return " / ".join(f"{v:,.0f}" for v in at)


def demo_answer(answer_id: str, user: str, now: datetime, request_id: str) -> UsageEvent:
    """The answer the scripts settle: the demo upstream's (1,168 tokens)."""
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=now.date(),
        created_at=now,
        endpoint="chat-messages",
        prompt_tokens=1000,
        completion_tokens=168,
        total_tokens=1168,
        cost=Decimal("0.0013030"),
        request_id=request_id,
    )


async def measure(
    store: Storage, answers: int, gap: float
) -> tuple[list[float], list[float], float]:
    """(admission latencies, settle latencies) in microseconds, and CPU ms per answer."""
    await store.ensure_user("bench", plan="free")
    admits: list[float] = []
    settles: list[float] = []
    cpu = time.process_time()
    for i in range(answers):
        now = datetime.now(UTC)
        rid = f"lone-{i}"
        began = time.perf_counter_ns()
        admitted = await store.admit(
            "bench",
            day=now.date(),
            month_start=now.date().replace(day=1),
            limits=LIMITS,
            now=now,
            lease=Lease(rid, now + timedelta(minutes=5)),
            pending=Pending(id=rid, endpoint="chat-messages", prompt_tokens=10, total_tokens=10),
        )
        admits.append((time.perf_counter_ns() - began) / 1000)
        if not admitted.admitted:
            raise RuntimeError(f"answer {i} refused: {admitted.refused_by}")
        event = demo_answer(f"m-{i}", "bench", now, rid)
        began = time.perf_counter_ns()
        await store.settle(event, lease_id=rid, pending_id=rid)
        settles.append((time.perf_counter_ns() - began) / 1000)
        await asyncio.sleep(gap)
    return admits, settles, 1000 * (time.process_time() - cpu) / answers


async def sqlite(answers: int, gap: float) -> tuple[list[float], list[float], float]:
    with tempfile.TemporaryDirectory(prefix="gateway-lone-") as directory:
        store = await SQLiteStorage.open(str(Path(directory) / "gateway.db"))
        try:
            await store.migrate()
            return await measure(store, answers, gap)
        finally:
            await store.close()


async def postgres(dsn: str, answers: int, gap: float) -> tuple[list[float], list[float], float]:
    name = f"gateway_lone_{os.getpid()}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        store = await PostgresStorage.open(dsn.rpartition("/")[0] + "/" + name)
        try:
            await store.migrate()
            return await measure(store, answers, gap)
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lone", description=__doc__)
    parser.add_argument("--answers", type=int, default=2000)
    parser.add_argument("--gap-ms", type=float, default=2.0, help="idle time between answers")
    parser.add_argument("--backends", default="sqlite", help="comma-separated: sqlite,postgres")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    print(f"gateway from {Path(gateway.__file__).parent}; {args.answers:,} answers, one at a time")
    print("| backend | admission p50 / p90 / p99 | settle p50 / p90 / p99 | CPU per answer |")
    print("|---|---|---|---:|")
    for backend in args.backends.split(","):
        gap = args.gap_ms / 1000
        if backend == "sqlite":
            admits, settles, cpu = await sqlite(args.answers, gap)
        elif backend == "postgres":
            admits, settles, cpu = await postgres(args.postgres, args.answers, gap)
        else:
            parser.error(f"unknown backend {backend!r}")
        print(f"| {backend} | {quantiles(admits)} us | {quantiles(settles)} us | {cpu:.3f} ms |")


if __name__ == "__main__":
    uvloop.run(main())
