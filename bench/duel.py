"""python -m bench.duel: two checkouts of the gateway served at once, loaded at once.

On a machine other work is loading, runs of ``python -m bench`` one after another
differ by more than a change of a few percent moves (the fast pass-through alone
moved by 60% between two runs ten minutes apart). This serves several checkouts
of the gateway side by side instead, each its own process on its own database, in
front of one fake upstream, and loads them at the same time, one wrk per gateway
with the same connections: whatever the machine does meanwhile, each round, both
get it. Each round prints every gateway's answers per second and CPU time per
answer (``/proc/PID/stat``, the gateway's process: SQLite's work included,
PostgreSQL's backends not); at the end, the medians over the rounds of each
checkout's ratio to the first one's, round by round. Round 0 warms up and is
left out.

    git worktree add --detach /tmp/main main    # or: git archive main | tar -x -C /tmp/main
    .venv/bin/python -m bench.duel main=/tmp/main branch=. [--backend postgres]
        [--rounds 10] [--seconds 5] [--connections 32]

Each checkout's gateway runs as ``env PYTHONPATH=<checkout> python -P -m
gateway`` (the harness itself is this checkout's ``bench/``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import threading
import time

import asyncpg
import uvloop

from bench.procs import Server
from bench.run import Bench, WrkResult, parse_args


def _load(
    bench: Bench,
    server: Server,
    label: str,
    results: dict[str, WrkResult],
    connections: int,
    seconds: int,
) -> None:
    url = f"http://127.0.0.1:{server.port}"
    results[label] = bench._wrk(label, connections, seconds, url=url, keys=bench.keys[label])


async def duel(
    sides: list[tuple[str, str]], backend: str, rounds: int, seconds: int, connections: int
) -> None:
    bench = Bench(parse_args(["--paths", "gateway-sqlite", "--phases", "throughput"]))
    databases: list[str] = []
    try:
        await bench.start_upstream()
        servers: dict[str, Server] = {}
        for label, checkout in sides:
            command = ("env", f"PYTHONPATH={checkout}", sys.executable, "-P", "-m", "gateway")
            bench.s = dataclasses.replace(bench.s, gateway_command=command)
            if backend == "sqlite":
                url = f"sqlite:///{bench.tmp / (label + '.db')}"
            else:
                name = f"gateway_duel_{label}_{int(time.time())}"
                conn = await asyncpg.connect(bench.s.postgres)
                try:
                    await conn.execute(f'CREATE DATABASE "{name}"')
                finally:
                    await conn.close()
                databases.append(name)
                url = bench.s.postgres.rsplit("/", 1)[0] + "/" + name
            await bench._create_users(label, bench._gateway_config(f"{label}-cli", url))
            servers[label] = bench._start("gateway-sqlite", label, database_url=url)
        await asyncio.gather(*(server.wait_listening() for server in servers.values()))
        measured: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in sides}
        for number in range(rounds + 1):
            before = {label: server.cpu_times() for label, server in servers.items()}
            results: dict[str, WrkResult] = {}

            threads = [
                threading.Thread(
                    target=_load, args=(bench, servers[label], label, results, connections, seconds)
                )
                for label in servers
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            await asyncio.sleep(0.5)  # the answers wrk cut off are settled
            line = [f"round {number}"]
            for label, server in servers.items():
                user, system = server.cpu_times()
                cpu = user - before[label][0] + system - before[label][1]
                result = results[label]
                answers = result.requests - result.failed
                rate, per_answer = answers / result.seconds, 1000 * cpu / max(answers, 1)
                if number:
                    measured[label].append((rate, per_answer))
                line.append(
                    f"{label}: {rate:,.0f}/s {per_answer:.3f} ms/answer, {result.failed} failed"
                )
            print(" | ".join(line), flush=True)
        first = sides[0][0]
        for label, _ in sides:
            mine, theirs = measured[label], measured[first]
            rate = statistics.median(r for r, _ in mine)
            cpu = statistics.median(c for _, c in mine)
            rate_ratio = statistics.median(a[0] / b[0] for a, b in zip(mine, theirs, strict=True))
            cpu_ratio = statistics.median(a[1] / b[1] for a, b in zip(mine, theirs, strict=True))
            print(
                f"{label}: median {rate:,.0f} answers/s, {cpu:.3f} ms CPU per answer; "
                f"against {first}, round by round: answers/s {rate_ratio:.3f}x, "
                f"CPU per answer {cpu_ratio:.3f}x"
            )
    finally:
        await bench.servers.stop_all()
        for name in databases:
            conn = await asyncpg.connect(bench.s.postgres)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.duel", description=__doc__)
    parser.add_argument("sides", nargs="+", help="label=checkout, the first one the reference")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=5, help="wrk seconds per round")
    parser.add_argument("--connections", type=int, default=32, help="per gateway")
    args = parser.parse_args()
    sides: list[tuple[str, str]] = []
    for side in args.sides:
        label, equals, checkout = side.partition("=")
        if not equals or not label or not checkout:
            parser.error(f"{side!r}: give label=checkout")
        sides.append((label, checkout))
    if len(sides) < 2:
        parser.error("give at least two label=checkout")
    uvloop.run(duel(sides, args.backend, args.rounds, args.seconds, args.connections))


if __name__ == "__main__":
    main()
