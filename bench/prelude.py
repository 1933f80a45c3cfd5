"""python -m bench.prelude: the gateway's own Python before the forward, per request.

Drives the gateway's ASGI app in this process (no sockets, no load generator)
with a realistic answer request - a Dify chat-messages streaming request, or an
OpenAI chat completion - from a user on a plan with several limits (queries,
tokens and money per day and month) in a team whose plan has limits of its own,
one request at a time. The forward is cut off where it starts (the proxy's
``_forward`` records the time and refuses with a 502, so the reservation is
given back as for an upstream that failed): what is timed is exactly the
ledger's ``overhead_ms`` - arrival to forward - and nothing of any upstream.

    .venv/bin/python -m bench.prelude [--shape dify|openai] [--requests 3000]
        [--profile]                  # cProfile of the timed requests

Timings on a loaded machine move with the load; instruction counts do not.
Each checkout's instructions per request, by difference (start-up and the
warm-up cancel out), with this file copied out of the checkout (``-P``: only
the checkout's ``gateway`` is imported):

    cp bench/prelude.py /tmp/pb.py
    PYTHONPATH=<checkout> valgrind --tool=callgrind --callgrind-out-file=a.out \
        .venv/bin/python -P /tmp/pb.py --shape dify --requests 20
    ... the same with --requests 120 into b.out; then
    (totals of b.out - totals of a.out) / 100

What is counted besides the steps before the forward is the cut's own: the
refund of the reservation and the 502, the same on both sides.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

DIFY_BODY = (
    b'{"query":"What can you tell me about the weather in Hanoi today?","inputs":{},'
    b'"response_mode":"streaming","conversation_id":"","user":"bench-client","files":[]}'
)
OPENAI_BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":'
    b'"What can you tell me about the weather in Hanoi today?"}],"stream":true}'
)
SHAPES = {
    "dify": ("/v1/chat-messages", DIFY_BODY),
    "openai": ("/openai/v1/chat/completions", OPENAI_BODY),
}
BIG = 10**12
PLAN = {
    "queries_per_day": BIG,
    "tokens_per_day": BIG,
    "tokens_per_month": BIG,
    "cost_per_day": "1000000000",
    "cost_per_month": "10000000000",
    "max_concurrent_streams": BIG,
    "limits": [{"meter": "queries", "per": "month", "max": BIG}],
}
TEAM_PLAN = {"queries_per_day": BIG, "cost_per_month": "10000000000"}


def _settings(database: str) -> dict[str, Any]:
    return {
        "upstream": {"url": "http://127.0.0.1:9/v1", "api_key_env": "PRELUDE_KEY"},
        "upstreams": {
            "oai": {
                "kind": "openai",
                "url": "http://127.0.0.1:9/v1",
                "api_key_env": "PRELUDE_KEY",
                "mount": "/openai/v1",
            }
        },
        "prices": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}},
        "database": {"url": database, "spool_file": ""},
        "accounting": {"timezone": "Europe/Berlin", "default_plan": "pro"},
        "plans": {"pro": PLAN, "teamplan": TEAM_PLAN},
    }


class _Cut(Exception):
    pass


async def run(shape: str, requests: int, *, profile: bool) -> list[float]:
    from gateway import proxy
    from gateway.app import create_app
    from gateway.config import parse_config
    from gateway.errors import UpstreamUnavailable
    from gateway.keys import new_key
    from gateway.storage import open_storage

    times: list[float] = []

    async def cut(self: Any, x: Any) -> Any:
        times.append(time.perf_counter() - x.started)
        raise UpstreamUnavailable("cut before the forward (bench.prelude)")

    proxy.Proxy._forward = cut  # type: ignore[method-assign]
    path, body = SHAPES[shape]
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PRELUDE_KEY": "upstream-secret"}
        config = parse_config(_settings(f"sqlite:///{Path(tmp) / 'p.db'}"), env=env)
        storage = await open_storage(config.database)
        await storage.migrate()
        now = datetime.now(UTC)
        await storage.ensure_user("alice", plan="pro")
        await storage.create_team("crew", plan="teamplan", now=now)
        await storage.set_team("alice", "crew")
        key = new_key()
        await storage.create_key(
            "alice", key_id=key.id, key_hash=key.hash, prefix=key.prefix, name="", now=now
        )
        app = create_app(config, storage=storage, env=env)
        gateway = app.gateway
        await gateway.start()
        app.handler = app._serve(gateway.running)  # as the lifespan wires it
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
            "headers": [
                (b"host", b"127.0.0.1:8080"),
                (b"user-agent", b"bench"),
                (b"accept", b"*/*"),
                (b"content-type", b"application/json"),
                (b"authorization", f"Bearer {key.secret}".encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif statuses[-1] != 502 and message.get("body"):
                print(message["body"][:300], file=sys.stderr)

        async def one() -> None:
            await app(dict(scope), receive, send)
            await gateway.idle()

        for _ in range(200):  # warm: caches, the user's rows, the pending table
            await one()
        times.clear()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        for _ in range(requests):
            await one()
        if profiler is not None:
            profiler.disable()
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(45)
            stats.sort_stats("cumulative").print_stats(70)
        await gateway.stop()
        await storage.close()
        if set(statuses) != {502}:
            raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prelude", description=__doc__)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="dify")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    times = uvloop.run(run(args.shape, args.requests, profile=args.profile))
    times.sort()
    print(
        f"{args.shape}: {len(times)} requests, overhead p50 {statistics.median(times) * 1e6:.1f} us,"
        f" p10 {times[len(times) // 10] * 1e6:.1f} us, min {times[0] * 1e6:.1f} us",
        flush=True,
    )


if __name__ == "__main__":
    main()
