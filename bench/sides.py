"""What the side-by-side benchmarks (``bench.duel``, ``bench.overhead``,
``bench.grind``, ``bench.grind_batches``) share: the checkouts named on their
command line, the command that runs one of them (under callgrind too), and a
database of its own for each."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import asyncpg

from bench.run import Bench


def parse_sides(
    parser: argparse.ArgumentParser, given: list[str], *, at_least: int = 2
) -> list[tuple[str, str]]:
    """``label=checkout`` arguments as (label, checkout) pairs; the first is the
    reference the others are compared with."""
    sides: list[tuple[str, str]] = []
    for side in given:
        label, equals, checkout = side.partition("=")
        if not equals or not label or not checkout:
            parser.error(f"{side!r}: give label=checkout")
        sides.append((label, checkout))
    if len(sides) < at_least:
        parser.error(f"give at least {at_least} label=checkout")
    return sides


def gateway_command(checkout: str) -> tuple[str, ...]:
    """``python -m gateway`` of one checkout (``-P``: not the current directory's)."""
    return ("env", f"PYTHONPATH={checkout}", sys.executable, "-P", "-m", "gateway")


def callgrind_python(checkout: str, out: Path) -> list[str]:
    """This Python, with one checkout's code first, under callgrind, counting
    only once switched on (``callgrind_control -i on``, or the program's own
    start), into ``out``: the arguments follow."""
    return [
        "env",
        f"PYTHONPATH={checkout}",
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-P",
    ]


def callgrind_totals(path: Path) -> int:
    """The instructions a callgrind dump counted (its ``totals:`` line; its
    ``summary:`` line says 0 when counting was switched on and off)."""
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"{path}: no totals in the callgrind dump")


async def side_database(
    bench: Bench, prefix: str, label: str, backend: str, databases: list[str]
) -> str:
    """The URL of a new, empty database for one side: a SQLite file in the bench's
    directory, or a PostgreSQL database whose name is added to ``databases``
    (for `drop_databases`)."""
    if backend == "sqlite":
        return f"sqlite:///{bench.tmp / (label + '.db')}"
    name = f"gateway_{prefix}_{label}_{int(time.time())}"
    conn = await asyncpg.connect(bench.s.postgres)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    databases.append(name)
    return bench.s.postgres.rsplit("/", 1)[0] + "/" + name


async def drop_databases(bench: Bench, databases: list[str]) -> None:
    for name in databases:
        conn = await asyncpg.connect(bench.s.postgres)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
