"""python -m bench.grind_batches: the gateway's instructions per answer to send
PostgreSQL batches of admissions and settles, counted by valgrind (callgrind).

What bench.grind cannot show: under its one connection every admission and
settle is a batch of one. Here one connection sends batches of ``--batch``
answers (spread over 100 users) the way PostgresStorage does - the arguments
built from bench.batches' answers, then ``gateway_admit_many`` and
``gateway_settle_many`` - and callgrind counts the process's instructions over
``--rounds`` batches after a few uncounted ones: building the arguments,
asyncpg's encoding of them and its decoding of the answers. Each checkout runs
with its own gateway and bench.batches (``PYTHONPATH``), one after another.

    git worktree add --detach /tmp/main main
    .venv/bin/python -m bench.grind_batches main=/tmp/main branch=. [--batch 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg

from bench.sides import callgrind_python, callgrind_totals, parse_sides

USERS = 100
UNCOUNTED = 5


def _count(switch: str) -> None:
    """Callgrind's counting of this process on or off (blocking: nothing else runs)."""
    subprocess.run(["callgrind_control", "-i", switch, str(os.getpid())], check=True)


async def _child(dsn: str, batch: int, rounds: int) -> None:
    """Run under callgrind, with the checkout's gateway and bench on the path."""
    from bench.batches import Answers
    from gateway.storage.postgres import _ADMIT_MANY, _SETTLE_MANY, PostgresStorage

    storage = await PostgresStorage.open(dsn)
    await storage.migrate()
    await storage.close()
    conn = await asyncpg.connect(dsn)
    try:
        for u in range(USERS):
            await conn.execute("INSERT INTO users (id, plan) VALUES ($1, 'free')", f"u{u}")
        make = Answers()
        for r in range(UNCOUNTED + rounds):
            if r == UNCOUNTED:
                _count("on")
            ids = range(r * batch, (r + 1) * batch)
            admissions = [make.admission(i, f"u{i % USERS}") for i in ids]
            settles = [make.settle(i, f"u{i % USERS}") for i in ids]
            await conn.fetch(_ADMIT_MANY, *make.admit_batch(admissions))
            await conn.fetch(_SETTLE_MANY, *make.settle_batch(settles))
        _count("off")
    finally:
        await conn.close()


async def _side(checkout: str, postgres: str, batch: int, rounds: int, out: Path) -> int:
    """The instructions one checkout's batches took, in a database of its own."""
    name = f"gateway_grind_batches_{os.getpid()}"
    admin = await asyncpg.connect(postgres)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        argv = [
            *callgrind_python(checkout, out),
            __file__,
            "--child",
            postgres.rpartition("/")[0] + "/" + name,
            str(batch),
            str(rounds),
        ]
        await asyncio.to_thread(subprocess.run, argv, check=True, capture_output=True)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    return sum(callgrind_totals(dump) for dump in out.parent.glob(out.name + "*"))


async def grind(sides: list[tuple[str, str]], postgres: str, batch: int, rounds: int) -> None:
    answers = batch * rounds
    first = 0.0
    with tempfile.TemporaryDirectory(prefix="grind-batches-") as tmp:
        for label, checkout in sides:
            total = await _side(checkout, postgres, batch, rounds, Path(tmp) / f"{label}.out")
            per = total / answers
            first = first or per
            print(
                f"{label}: batches of {batch}, {answers} answers, {total:,} instructions, "
                f"{per:,.0f} per answer ({per / first:.3f}x {sides[0][0]})",
                flush=True,
            )


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        dsn, batch, rounds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        asyncio.run(_child(dsn, batch, rounds))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.grind_batches", description=__doc__)
    parser.add_argument("sides", nargs="+", help="label=checkout, the first one the reference")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--batch", type=int, default=50, help="answers per batch")
    parser.add_argument("--rounds", type=int, default=40, help="counted batches")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind not found (apt-get install -y valgrind)")
    sides = parse_sides(parser, args.sides, at_least=1)
    asyncio.run(grind(sides, args.postgres, args.batch, args.rounds))


if __name__ == "__main__":
    main()
