"""python -m bench.overhead: the gateway's own time (ledger ``overhead_ms``) of
several checkouts, served at once and loaded at once at a fixed rate.

The latency phase of ``python -m bench`` measures one checkout at a time; on a
machine other work is loading, two runs a minute apart differ by more than a
change moves them. This serves each checkout as its own process on its own
database, in front of one fake upstream (20 ms between events, as the latency
phase), and starts ``--rate`` answers per second on every gateway at the same
time (open loop, bench/loadgen.py), round by round; each round prints each
gateway's ``overhead_ms`` p50 and p99 (read back from its ledger, as
``python -m bench`` does), and at the end the medians over the rounds and of
each checkout's ratio to the first one's, round by round.

    git worktree add --detach /tmp/main main
    .venv/bin/python -m bench.overhead main=/tmp/main branch=. [--backend postgres]
        [--rounds 5] [--seconds 6] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics

import uvloop

from bench import loadgen
from bench.procs import Server
from bench.run import BODY, Bench, ledger_overheads, parse_args
from bench.sides import drop_databases, gateway_command, parse_sides, side_database


async def overhead(
    sides: list[tuple[str, str]], backend: str, rounds: int, seconds: float, rate: float
) -> None:
    bench = Bench(parse_args(["--paths", "gateway-sqlite", "--phases", "latency"]))
    databases: list[str] = []
    urls: dict[str, str] = {}
    try:
        await bench.start_upstream()
        servers: dict[str, Server] = {}
        for label, checkout in sides:
            command = gateway_command(checkout)
            bench.s = dataclasses.replace(bench.s, gateway_command=command)
            url = await side_database(bench, "overhead", label, backend, databases)
            urls[label] = url
            await bench._create_users(label, bench._gateway_config(f"{label}-cli", url))
            servers[label] = bench._start("gateway-sqlite", label, database_url=url)
        await asyncio.gather(*(server.wait_listening() for server in servers.values()))
        measured: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in sides}
        for number in range(rounds + 1):
            labels = list(servers)
            runs = await asyncio.gather(
                *(
                    loadgen.open_loop(
                        f"http://127.0.0.1:{servers[label].port}/v1/chat-messages",
                        bench.headers(label, bench.s.latency_delay_ms),
                        BODY,
                        rate=rate,
                        duration=seconds,
                    )
                    for label in labels
                )
            )
            await asyncio.sleep(1.0)  # the last answers are settled
            line = [f"round {number}"]
            for label, samples in zip(labels, runs, strict=True):
                ids = [s.request_id for s in samples if s.ok and s.request_id]
                values = await ledger_overheads(urls[label], ids)
                p50, p99 = loadgen.percentile(values, 50), loadgen.percentile(values, 99)
                if number:
                    measured[label].append((p50, p99))
                failed = sum(not s.ok for s in samples)
                line.append(
                    f"{label}: p50 {p50:.3f} p99 {p99:.3f} ms ({len(values)}, {failed} failed)"
                )
            print(" | ".join(line), flush=True)
        first = sides[0][0]
        for label, _ in sides:
            mine, theirs = measured[label], measured[first]
            pairs = list(zip(mine, theirs, strict=True))
            p50 = statistics.median(m[0] for m in mine)
            p99 = statistics.median(m[1] for m in mine)
            p50_ratio = statistics.median(a[0] / b[0] for a, b in pairs)
            p99_ratio = statistics.median(a[1] / b[1] for a, b in pairs)
            print(
                f"{label}: median overhead_ms p50 {p50:.3f}, p99 {p99:.3f}; against {first}, "
                f"round by round: p50 {p50_ratio:.3f}x, p99 {p99_ratio:.3f}x",
                flush=True,
            )
    finally:
        await bench.servers.stop_all()
        await drop_databases(bench, databases)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("sides", nargs="+", help="label=checkout, the first one the reference")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per round")
    parser.add_argument("--rate", type=float, default=100.0, help="answers/s per gateway")
    args = parser.parse_args()
    sides = parse_sides(parser, args.sides)
    uvloop.run(overhead(sides, args.backend, args.rounds, args.seconds, args.rate))


if __name__ == "__main__":
    main()
