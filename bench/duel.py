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
        [--rounds 10] [--seconds 5] [--connections 32] [--shape openai-blocking]
        [--profile SECONDS]

``--shape`` picks the request: ``dify`` (a streamed Dify chat message, the
default), or the OpenAI phase's chat completion (bench/litellm.py: upstream
``kind = "openai"``, a price for the model), ``openai-streamed`` or
``openai-blocking`` (non-streamed, the shape the Portkey goal of issue 24 is
measured in). ``--profile`` samples each gateway with py-spy during one more
round after the measured ones (bench/profile.py; the raw stacks and a summary
are written beside the run's temporary files, their paths printed).

Each checkout's gateway runs as ``env PYTHONPATH=<checkout> python -P -m
gateway`` (the harness itself is this checkout's ``bench/``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import threading
from pathlib import Path

import uvloop

from bench import litellm
from bench import profile as profiling
from bench.procs import Server, free_port
from bench.run import BODY, REPO, Bench, WrkResult, _child_env, parse_args
from bench.sides import drop_databases, gateway_command, parse_sides, side_database

# The request of each shape: (path, body); an OpenAI shape runs the upstream as OpenAI.
SHAPES = {
    "dify": ("/v1/chat-messages", BODY),
    "openai-streamed": (litellm.OPENAI_PATH, litellm.OPENAI_BODY),
    "openai-blocking": (litellm.OPENAI_PATH, litellm.BLOCKING_BODY),
}


def _load(
    bench: Bench,
    server: Server,
    label: str,
    results: dict[str, WrkResult],
    connections: int,
    seconds: int,
    shape: str,
) -> None:
    url = f"http://127.0.0.1:{server.port}"
    path, body = SHAPES[shape]
    results[label] = bench._wrk(
        label, connections, seconds, url=url, keys=bench.keys[label], request_path=path, body=body
    )


def _config(bench: Bench, name: str, url: str, shape: str) -> Path:
    """The gateway's config file for ``name`` (bench.run's), made an OpenAI upstream
    with the model priced for an OpenAI shape, as the OpenAI phase's."""
    path = bench._gateway_config(name, url)
    if shape.startswith("openai"):
        text = path.read_text().replace("[upstream]\n", '[upstream]\nkind = "openai"\n', 1)
        path.write_text(text + "\n" + litellm.PRICE)
    return path


def _profile(bench: Bench, server: Server, label: str, seconds: int) -> None:
    raw = bench.tmp / f"{label}.pyspy.txt"
    summary = profiling.record(server.pid, seconds, raw)
    if isinstance(summary, str):
        print(f"{label}: profile failed: {summary}", flush=True)
        return
    out = bench.tmp / f"{label}.profile.json"
    out.write_text(json.dumps(summary.as_json(40), indent=1))
    print(f"{label}: py-spy stacks {raw}, summary {out}", flush=True)


async def duel(
    sides: list[tuple[str, str]],
    backend: str,
    rounds: int,
    seconds: int,
    connections: int,
    *,
    shape: str = "dify",
    profile: int = 0,
) -> None:
    bench = Bench(parse_args(["--paths", "gateway-sqlite", "--phases", "throughput"]))
    databases: list[str] = []
    try:
        await bench.start_upstream()
        servers: dict[str, Server] = {}
        for label, checkout in sides:
            command = gateway_command(checkout)
            bench.s = dataclasses.replace(bench.s, gateway_command=command)
            url = await side_database(bench, "duel", label, backend, databases)
            await bench._create_users(label, _config(bench, f"{label}-cli", url, shape))
            port = free_port()
            argv = [*command, "--config", str(_config(bench, label, url, shape)), "serve"]
            log = bench.tmp / f"{label}.log"
            server = Server(label, [*argv, "--port", str(port)], port, log, _child_env(), REPO)
            servers[label] = bench.servers.add(server)
        await asyncio.gather(*(server.wait_listening() for server in servers.values()))
        measured: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in sides}
        for number in range(rounds + 1 if rounds else 0):
            before = {label: server.cpu_times() for label, server in servers.items()}
            results: dict[str, WrkResult] = {}

            threads = [
                threading.Thread(
                    target=_load,
                    args=(bench, servers[label], label, results, connections, seconds, shape),
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
        for label, _ in sides if rounds else ():
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
        if profile:
            # One more round, every gateway loaded and sampled at once.
            results = {}
            threads = [
                threading.Thread(
                    target=_load,
                    args=(bench, servers[label], label, results, connections, profile + 2, shape),
                )
                for label in servers
            ]
            for thread in threads:
                thread.start()
            await asyncio.sleep(1)
            await asyncio.gather(
                *(
                    asyncio.to_thread(_profile, bench, server, label, profile)
                    for label, server in servers.items()
                )
            )
            for thread in threads:
                thread.join()
    finally:
        await bench.servers.stop_all()
        await drop_databases(bench, databases)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.duel", description=__doc__)
    parser.add_argument("sides", nargs="+", help="label=checkout, the first one the reference")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=5, help="wrk seconds per round")
    parser.add_argument("--connections", type=int, default=32, help="per gateway")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="dify", help="the request")
    parser.add_argument(
        "--profile", type=int, default=0, help="py-spy seconds, one more round (0: off)"
    )
    args = parser.parse_args()
    sides = parse_sides(parser, args.sides)
    uvloop.run(
        duel(
            sides,
            args.backend,
            args.rounds,
            args.seconds,
            args.connections,
            shape=args.shape,
            profile=args.profile,
        )
    )


if __name__ == "__main__":
    main()
