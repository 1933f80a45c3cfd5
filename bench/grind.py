"""python -m bench.grind: instructions per answer of several checkouts of the
gateway, counted by valgrind (callgrind), for a machine too loaded to time them.

On a machine other work is loading, CPU seconds per answer move with the load
(caches, the scheduler, the batches the database makes): a change of a few
percent is lost in rounds that differ by ten. The instructions the gateway's
process executes per answer do not: each checkout is served under callgrind
(``--instr-atstart=no``: start-up is not counted), warmed up, then counted while
one wrk connection sends it requests for ``--seconds``, one at a time, and the
count is divided by the answers it completed. One connection, so that nothing
depends on the load: every admission and every settle is a batch of one.

    git worktree add --detach /tmp/main main
    .venv/bin/python -m bench.grind main=/tmp/main branch=. [--backend postgres]
        [--shape openai-blocking] [--seconds 30] [--warmup 10]

What it counts is user-space instructions of the gateway's process (the
interpreter, the libraries, the gateway): not the kernel's work for its system
calls, not PostgreSQL's, not time. The checkouts run at once, each under
valgrind (tens of times slower), all in front of one fake upstream. Needs
``valgrind`` (Debian package).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import subprocess
from pathlib import Path

import uvloop

from bench import duel
from bench.procs import Server, free_port
from bench.run import REPO, Bench, WrkResult, _child_env, parse_args
from bench.sides import (
    callgrind_python,
    callgrind_totals,
    drop_databases,
    gateway_command,
    parse_sides,
    side_database,
)


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


async def _prepare(
    bench: Bench, label: str, checkout: str, *, backend: str, shape: str, databases: list[str]
) -> Path:
    """A database with the bench's users for one checkout (made by its own CLI);
    the config file it is served with."""
    url = await side_database(bench, "grind", label, backend, databases)
    # _create_users runs the CLI of bench.s.gateway_command: this checkout's
    # (one checkout at a time).
    command = gateway_command(checkout)
    bench.s = dataclasses.replace(bench.s, gateway_command=command)
    await bench._create_users(label, duel._config(bench, f"{label}-cli", url, shape))
    return duel._config(bench, label, url, shape)


async def _count(
    bench: Bench, label: str, checkout: str, config: Path, *, shape: str, seconds: int, warmup: int
) -> tuple[int, int]:
    """The instructions counted and the answers completed for one checkout."""
    out = bench.tmp / f"callgrind.{label}.out"
    port = free_port()
    argv = [
        *callgrind_python(checkout, out),
        "-m",
        "gateway",
        "--config",
        str(config),
        "serve",
        "--port",
        str(port),
    ]
    log = bench.tmp / f"{label}.log"
    server = bench.servers.add(Server(label, argv, port, log, _child_env(), REPO))
    await server.wait_listening(timeout=600.0)  # imports under valgrind: minutes
    results: dict[str, WrkResult] = {}
    await asyncio.to_thread(duel._load, bench, server, label, results, 1, warmup, shape)
    pid = str(server.pid)  # env and valgrind exec: the same process
    await asyncio.to_thread(_control, "-i", "on", pid)
    await asyncio.to_thread(duel._load, bench, server, label, results, 1, seconds, shape)
    await asyncio.sleep(1.0)  # the last answer's settle, which follows its response
    await asyncio.to_thread(_control, "-i", "off", pid)
    await asyncio.to_thread(_control, "-d", pid)
    dumps = sorted(out.parent.glob(out.name + ".*"))
    if not dumps:
        raise RuntimeError(f"{label}: callgrind wrote no dump:\n{server.log_tail()}")
    result = results[label]
    await bench.servers.stop(server)
    return callgrind_totals(dumps[-1]), result.requests - result.failed


async def grind(
    sides: list[tuple[str, str]], *, backend: str, shape: str, seconds: int, warmup: int
) -> None:
    bench = Bench(parse_args(["--paths", "gateway-sqlite", "--phases", "throughput"]))
    databases: list[str] = []
    try:
        await bench.start_upstream()
        configs = [
            await _prepare(
                bench, label, checkout, backend=backend, shape=shape, databases=databases
            )
            for label, checkout in sides
        ]
        counted = await asyncio.gather(
            *(
                _count(bench, label, checkout, config, shape=shape, seconds=seconds, warmup=warmup)
                for (label, checkout), config in zip(sides, configs, strict=True)
            )
        )
        first = counted[0][0] / max(counted[0][1], 1)
        for (label, _), (instructions, answers) in zip(sides, counted, strict=True):
            per = instructions / max(answers, 1)
            print(
                f"{label}: {answers} answers, {instructions:,} instructions, "
                f"{per:,.0f} per answer ({per / first:.3f}x {sides[0][0]})",
                flush=True,
            )
    finally:
        await bench.servers.stop_all()
        await drop_databases(bench, databases)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grind", description=__doc__)
    parser.add_argument("sides", nargs="+", help="label=checkout, the first one the reference")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="postgres")
    parser.add_argument("--shape", choices=tuple(duel.SHAPES), default="openai-blocking")
    parser.add_argument("--seconds", type=int, default=30, help="counted wrk seconds")
    parser.add_argument("--warmup", type=int, default=10, help="wrk seconds before counting")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind not found (apt-get install -y valgrind)")
    sides = parse_sides(parser, args.sides, at_least=1)
    uvloop.run(
        grind(
            sides,
            backend=args.backend,
            shape=args.shape,
            seconds=args.seconds,
            warmup=args.warmup,
        )
    )


if __name__ == "__main__":
    main()
