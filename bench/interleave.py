"""python -m bench.interleave: PostgreSQL CPU of admission and settle, checkouts side by side.

On a machine other work is loading, runs of ``bench.batches`` one after another
differ by more than what a change moves. This runs several checkouts of the
gateway at once instead: one worker process per checkout, each on a fresh
database migrated by that checkout's code and fed that checkout's own
``bench.batches`` arguments; the driver hands them the same answers a chunk at
a time, in turn (the order reversed every chunk), so that they share the
machine's load. Each call's CPU is read from its backend's
``/proc/<pid>/schedstat`` (nanoseconds), admission and settle apart, with
``synchronous_commit = off``; each row prints the median over chunks. A batch
of one goes the way that checkout's ``PostgresStorage`` sends it. The server
must be local.

    git worktree add --detach /tmp/old d03cef3
    .venv/bin/python -m bench.interleave /tmp/old . [--answers 1500] [--chunk 50] [--users 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

SHAPES = [(1, 1, False), (1, 1, True), (1, 10, True), (1, 50, True)]
SHAPES += [(100, 1, False), (100, 1, True), (100, 10, True), (100, 50, True)]


def _cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


async def worker(dsn_base: str) -> None:
    """One checkout's side (run with that checkout as the working directory):
    reads "start count users batch many" lines, answers "admit_ns settle_ns"."""
    sys.path.insert(0, os.getcwd())
    import asyncpg

    from bench.batches import Answers
    from gateway.storage import postgres

    name = f"gateway_interleave_{os.getpid()}"
    admin = await asyncpg.connect(dsn_base)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = dsn_base.rpartition("/")[0] + "/" + name
    try:
        storage = await postgres.PostgresStorage.open(dsn)
        await storage.migrate()
        await storage.close()
        conn = await asyncpg.connect(dsn)
        await conn.execute("SET synchronous_commit = off")
        for u in range(100):
            await conn.execute("INSERT INTO users (id, plan) VALUES ($1, 'free')", f"u{u}")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        make: Any = Answers()
        # Older checkouts have no admit_batch (their calls zip as they are) and
        # no functions for a batch of one (it went to the batch functions).
        admit_batch = getattr(make, "admit_batch", lambda calls: list(zip(*calls, strict=True)))
        admit_one = getattr(postgres, "_ADMIT_BATCHED", None)
        settle_one = getattr(postgres, "_SETTLE_BATCHED", None)
        print("ready", flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            start, count, users, batch, many = map(int, line.split())
            admit_ns = settle_ns = 0
            for first in range(start, start + count, batch):
                ids = range(first, first + batch)
                admissions = [make.admission(i, f"u{i % users}") for i in ids]
                settles = [make.settle(i, f"u{i % users}") for i in ids]
                t0 = _cpu_ns(pid)
                if not many:
                    await conn.fetchrow(postgres._ADMIT, *admissions[0])
                elif batch == 1 and admit_one:
                    await conn.fetchrow(admit_one, *admissions[0])
                else:
                    await conn.fetch(postgres._ADMIT_MANY, *admit_batch(admissions))
                t1 = _cpu_ns(pid)
                if not many:
                    await conn.fetchval(postgres._SETTLE, *settles[0])
                elif batch == 1 and settle_one:
                    await conn.fetchval(settle_one, *settles[0])
                else:
                    await conn.fetch(postgres._SETTLE_MANY, *make.settle_batch(settles))
                t2 = _cpu_ns(pid)
                admit_ns += t1 - t0
                settle_ns += t2 - t1
            print(f"{admit_ns} {settle_ns}", flush=True)
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def drive(
    checkouts: list[str], answers: int, chunk: int, dsn: str, shapes: list[tuple[int, int, bool]]
) -> None:
    script = str(Path(__file__).resolve())
    workers = [
        subprocess.Popen(
            [sys.executable, script, "--worker", "--postgres", dsn],
            cwd=checkout,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for checkout in checkouts
    ]
    for w in workers:
        assert w.stdout is not None and w.stdout.readline().strip() == "ready"
    medians: dict[tuple[int, int, bool], list[tuple[float, float]]] = {}
    done = 0
    for users, batch, many in shapes:
        chunks: list[list[tuple[float, float]]] = [[] for _ in workers]
        for n, start in enumerate(range(done, done + answers, chunk)):
            order = list(range(len(workers)))[:: -1 if n % 2 else 1]
            for k in order:
                w = workers[k]
                assert w.stdin is not None and w.stdout is not None
                w.stdin.write(f"{start} {chunk} {users} {batch} {int(many)}\n")
                w.stdin.flush()
                admit_ns, settle_ns = map(int, w.stdout.readline().split())
                chunks[k].append((admit_ns / chunk / 1e6, settle_ns / chunk / 1e6))
        medians[(users, batch, many)] = [
            (statistics.median(a for a, _ in c), statistics.median(s for _, s in c)) for c in chunks
        ]
        done += answers
    for w in workers:
        assert w.stdin is not None
        w.stdin.write("\n")
        w.stdin.flush()
        w.wait()
    names = [Path(c).resolve().name for c in checkouts]
    print(f"{answers:,} answers per row, {chunk} a turn; PostgreSQL CPU per answer, median")
    head = " | ".join(f"{n} admit / settle" for n in names)
    print(f"| users | call | {head} | admit, last vs each | settle, last vs each |")
    print("|---:|---|" + "---|" * (len(names) + 2))
    for (users, batch, many), cells in medians.items():
        call = "single" if not many else "batch of one" if batch == 1 else f"batches of {batch}"
        figures = " | ".join(f"{a:.3f} / {s:.3f} ms" for a, s in cells)
        admits = " / ".join(f"{cells[-1][0] / a:.2f}x" for a, _ in cells[:-1])
        settles = " / ".join(f"{cells[-1][1] / s:.2f}x" for _, s in cells[:-1])
        print(f"| {users} | {call} | {figures} | {admits} | {settles} |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.interleave", description=__doc__)
    parser.add_argument("checkouts", nargs="*", help="gateway checkouts; the last is compared")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--answers", type=int, default=1500)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument(
        "--users", type=int, choices=(1, 100), default=None, help="only the rows of 1 or 100 users"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    largest = max(batch for _, batch, _ in SHAPES)
    if args.chunk % largest or args.answers % args.chunk:
        parser.error(f"--chunk must be a multiple of {largest}, --answers one of --chunk")
    if args.worker:
        asyncio.run(worker(args.postgres))
    else:
        shapes = [shape for shape in SHAPES if args.users in (None, shape[0])]
        drive(args.checkouts, args.answers, args.chunk, args.postgres, shapes)


if __name__ == "__main__":
    main()
