"""python -m bench.batches: PostgreSQL's CPU per answer, one at a time and in batches.

One connection sends admissions and settles the way the gateway does - each
answer one ``gateway_admit`` and one ``gateway_settle`` call, or a batch of them
one ``gateway_admit_many`` and one ``gateway_settle_many`` call (a batch of one,
which is how a call goes that finds no batch in flight, goes to
``gateway_admit`` and ``gateway_settle`` with ``p_batched``) - and reads the
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

from gateway.quota.limits import Limit
from gateway.storage.postgres import (
    _ADMIT,
    _ADMIT_BATCHED,
    _ADMIT_MANY,
    _SETTLE,
    _SETTLE_BATCHED,
    _SETTLE_MANY,
    PostgresStorage,
    _Admit,
    _admit_many_args,
    _AdmitCall,
    _limit_texts,
    _numbers,
    _Settle,
    _settle_many_args,
    _SettleCall,
    _texts,
)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Answers:
    """Admission and settle arguments for numbered answers, as the gateway sends them."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.day = self.now.date()
        self.month = self.day.replace(day=1)

    # A plan with queries_per_day, tokens_per_day, tokens_per_month and
    # max_concurrent_streams.
    limits = (
        Limit("queries_per_day", "queries", "day", Decimal(10**9)),
        Limit("tokens_per_day", "tokens", "day", Decimal(10**12)),
        Limit("tokens_per_month", "tokens", "month", Decimal(10**13)),
        Limit("max_concurrent_streams", "streams", "open", Decimal(10**6)),
    )
    texts = _limit_texts(limits)

    def admission(self, i: int, user: str) -> _Admit:
        """gateway_admit's arguments for the plan's limits, the answer's
        pending row and lease."""
        return _Admit(self._admission(i, user), self.limits)

    def _admission(self, i: int, user: str) -> _AdmitCall:
        return _AdmitCall(
            user_id=user,
            day=self.day,
            month_start=self.month,
            meters=self.texts.meters,
            pers=self.texts.pers,
            maxes=self.texts.maxes,
            scopes=self.texts.scopes,
            keys=self.texts.keys,
            lease_id=f"r{i}",
            lease_expires=self.now + timedelta(minutes=10),
            now=self.now,
            advanced_rag=False,
            pending_id=f"r{i}",
            endpoint="chat-messages",
            prompt_tokens=10,
            completion_tokens=0,
            total_tokens=10,
            cost=Decimal("0.000001"),
            currency="USD",
            web_ask=False,
            web_optional=False,
            reserve_cost=Decimal(0),
            team=None,
            upstream="default",
        )

    @staticmethod
    def admit_batch(calls: list[_Admit]) -> list[Any]:
        """``gateway_admit_many``'s arguments, as PostgresStorage._admit_many builds them."""
        return _admit_many_args(calls)

    def settle(self, i: int, user: str) -> _Settle:
        """gateway_settle's arguments for answer i's admission, with one alert check."""
        return _Settle(self._settle(i, user), 1, 1)

    def _settle(self, i: int, user: str) -> _SettleCall:
        return _SettleCall(
            answer_id=f"m{i}",
            user_id=user,
            day=self.day,
            created_at=self.now,
            endpoint="chat-messages",
            prompt_tokens=75,
            completion_tokens=25,
            total_tokens=100,
            cost=Decimal("0.0000420"),
            currency="USD",
            outcome="complete",
            estimated=False,
            web_searches=0,
            conversation_id=None,
            request_id=f"r{i}",
            upstream_latency_ms=40.0,
            overhead_ms=0.5,
            lease_id=f"r{i}",
            pending_id=f"r{i}",
            model=None,
            cached_tokens=0,
            reasoning_tokens=0,
            month_start=self.month,
            kinds=_texts(["tokens_per_day"]),
            periods=_texts([str(self.day)]),
            values=_numbers([10**12]),
            thresholds=_numbers([80]),
            channels=_texts(["webhook"]),
            cache_write_tokens=0,
            upstream="default",
            specs=_texts([None]),
        )

    @staticmethod
    def settle_batch(calls: list[_Settle]) -> list[Any]:
        """``gateway_settle_many``'s arguments, as PostgresStorage._settle_many builds them."""
        return _settle_many_args(calls)


async def measure(dsn: str, answers: int) -> list[tuple[int, str, float, float, float]]:
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
                client = time.process_time()
                for start in range(done, done + answers, batch):
                    ids = range(start, start + batch)
                    admissions = [make.admission(i, f"u{i % users}") for i in ids]
                    settles = [make.settle(i, f"u{i % users}") for i in ids]
                    if not many:
                        await conn.fetchrow(_ADMIT, *admissions[0].call)
                        await conn.fetchval(_SETTLE, *settles[0].call)
                    else:
                        if batch == 1:  # as PostgresStorage sends a batch of one
                            await conn.fetchrow(_ADMIT_BATCHED, *admissions[0].call)
                            await conn.fetchval(_SETTLE_BATCHED, *settles[0].call)
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
                        1000 * (time.process_time() - client) / answers,
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
    # The client's CPU: building the arguments as PostgresStorage does and
    # asyncpg's encoding of them (and decoding of the answers).
    print("| users | answers per call | PostgreSQL CPU per answer | wall per answer | client CPU |")
    print("|---:|---:|---:|---:|---:|")
    for users, batch, cpu, wall, client in rows:
        print(f"| {users} | {batch} | {cpu:.3f} ms | {wall:.3f} ms | {client:.3f} ms |")


if __name__ == "__main__":
    asyncio.run(main())
