"""python -m bench.batches: PostgreSQL's CPU per answer, one at a time and in batches.

One connection sends admissions and settles the way the gateway does - each
answer one ``gateway_admit`` and one ``gateway_settle`` call, or a batch of them
one ``gateway_admit_many`` and one ``gateway_settle_many`` call (also for a batch
of one, which is how a call goes that finds no batch in flight) - and reads the
CPU time its backend used from /proc (the server must be local). The answers go
to one user, then spread over 100, in a fresh database that is dropped at the
end. No gateway runs: this isolates the database's side of group commit.

    .venv/bin/python -m bench.batches [--postgres DSN] [--answers N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from gateway.storage.postgres import _ADMIT, _ADMIT_MANY, _SETTLE, _SETTLE_MANY, PostgresStorage


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Answers:
    """Admission and settle arguments for numbered answers, as the gateway sends them."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.day = self.now.date()
        self.month = self.day.replace(day=1)

    def admission(self, i: int, user: str) -> tuple[Any, ...]:
        """gateway_admit's arguments for a plan with queries_per_day,
        tokens_per_day, tokens_per_month and max_concurrent_streams (the limits
        are three arrays: meters, windows, maximums; gateway/quota/limits.py)."""
        n = self.now
        return (user, self.day, self.month, [1, 8, 8, 10], [1, 1, 2, 3],
                [10**9, 10**12, 10**13, 10**6], [1, 1, 1, 1], [None] * 4, f"r{i}",
                n + timedelta(minutes=10),
                n, False, f"r{i}", "chat-messages", 10, 0, 10, Decimal("0.000001"), "USD", False,
                False, Decimal(0), None, "default")  # fmt: skip

    @staticmethod
    def admit_batch(calls: list[tuple[Any, ...]]) -> list[Any]:
        """``gateway_admit_many``'s arguments, as PostgresStorage._admit_many builds them."""
        columns: list[Any] = [list(c) for c in zip(*calls, strict=True)]
        limit_from = [1 + 4 * k for k in range(len(calls))]
        meters = [m for call in calls for m in call[3]]
        pers = [p for call in calls for p in call[4]]
        maxes = [x for call in calls for x in call[5]]
        scopes = [c for call in calls for c in call[6]]
        keys = [k for call in calls for k in call[7]]
        return [
            *columns[:3],
            limit_from,
            [4] * len(calls),
            meters,
            pers,
            maxes,
            scopes,
            keys,
            *columns[8:],
        ]

    def settle(self, i: int, user: str) -> tuple[Any, ...]:
        return (f"m{i}", user, self.day, self.now, "chat-messages", 75, 25, 100,
                Decimal("0.0000420"), "USD", "complete", False, 0, None, f"r{i}", 40.0, 0.5,
                f"r{i}", f"r{i}", None, 0, 0, self.month, ["tokens_per_day"],
                [str(self.day)], [10**12], [80], ["webhook"], 0, "default", [None])  # fmt: skip

    def settle_batch(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """``gateway_settle_many``'s arguments, as PostgresStorage._settle_many builds them."""
        columns: list[Any] = [list(c) for c in zip(*(call[:23] for call in calls), strict=True)]
        slices: list[list[Any]] = [[], [], [], [], [], [], [], [], []]
        for k, call in enumerate(calls):
            slices[0].append(k + 1)
            slices[1].append(1)
            slices[2].append(k + 1)
            slices[3].append(1)
            for at, value in zip((4, 5, 6, 7, 8), (*call[23:27], call[27]), strict=True):
                slices[at] += value
        # Then the cache writes, the upstreams and the alert checks' specs.
        specs = [spec for call in calls for spec in call[30]]
        return [
            *columns,
            *slices,
            [call[28] for call in calls],
            [call[29] for call in calls],
            specs,
        ]


async def measure(dsn: str, answers: int) -> list[tuple[int, str, float, float]]:
    conn = await asyncpg.connect(dsn)
    try:
        for u in range(100):
            await conn.execute("INSERT INTO users (id, plan) VALUES ($1, 'free')", f"u{u}")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        make = Answers()
        rows = []
        done = 0
        for users in (1, 100):
            for batch, many in ((1, False), (1, True), (10, True), (50, True)):
                cpu, wall = _cpu_seconds(pid), time.perf_counter()
                for start in range(done, done + answers, batch):
                    ids = range(start, start + batch)
                    admissions = [make.admission(i, f"u{i % users}") for i in ids]
                    settles = [make.settle(i, f"u{i % users}") for i in ids]
                    if not many:
                        await conn.fetchrow(_ADMIT, *admissions[0])
                        await conn.fetchval(_SETTLE, *settles[0])
                    else:
                        await conn.fetch(_ADMIT_MANY, *make.admit_batch(admissions))
                        await conn.fetch(_SETTLE_MANY, *make.settle_batch(settles))
                done += answers
                rows.append(
                    (
                        users,
                        f"{batch}" if many else "1 (single calls)",
                        1000 * (_cpu_seconds(pid) - cpu) / answers,
                        1000 * (time.perf_counter() - wall) / answers,
                    )
                )
        return rows
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batches", description=__doc__)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--answers", type=int, default=3000)
    args = parser.parse_args()
    name = f"gateway_batches_{os.getpid()}"
    admin = await asyncpg.connect(args.postgres)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = args.postgres.rpartition("/")[0] + "/" + name
    try:
        storage = await PostgresStorage.open(dsn)
        await storage.migrate()
        await storage.close()
        rows = await measure(dsn, args.answers)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    print(f"{args.answers:,} answers per row, one connection")
    print("| users | answers per call | PostgreSQL CPU per answer | wall per answer |")
    print("|---:|---:|---:|---:|")
    for users, batch, cpu, wall in rows:
        print(f"| {users} | {batch} | {cpu:.3f} ms | {wall:.3f} ms |")


if __name__ == "__main__":
    asyncio.run(main())
