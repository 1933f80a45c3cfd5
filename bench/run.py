"""python -m bench [--smoke] [--out FILE]: what the gateway costs, measured side by side.

Paths, all in one run, against one fake upstream (bench/upstream.py):

- ``direct``: the load generator to the upstream itself;
- ``naive`` and ``fast``: bare pass-through proxies (bench/proxies.py);
- ``gateway-sqlite`` and ``gateway-postgres``: ``python -m gateway serve``, one
  worker, full accounting (a plan whose limits are all set, too high to refuse);
- in the ``openai`` phase, the gateway in front of the same upstream speaking
  OpenAI's API, beside LiteLLM's proxy (bench/litellm.py).

Phases: saturation throughput (wrk, paths interleaved, CPU read from /proc),
latency at a fixed rate (open loop, bench/loadgen.py), an optional py-spy
profile of the gateway under wrk, database work per answer (pg_stat_database
and a counting wire relay, bench/pgwire.py), and memory with many open streams
(fresh processes). See docs/performance.md.

The exit status is non-zero only when the harness itself fails (a server does
not start, a path does not stream a complete answer); a missed target is
reported, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import secrets
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from bench import litellm, loadgen, report
from bench import profile as profiling
from bench.pgwire import WireCounter
from bench.procs import Server, Servers, cpu_seconds, free_port

REPO = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "post.lua"
BODY = (
    b'{"query":"What can you tell me about the weather in Hanoi today?","inputs":{},'
    b'"response_mode":"streaming","conversation_id":"","user":"bench-client","files":[]}'
)
UPSTREAM_KEY = "app-bench-upstream-key"
PATHS = ("direct", "naive", "fast", "gateway-sqlite", "gateway-postgres")
GATEWAYS = ("gateway-sqlite", "gateway-postgres")
PHASES = ("throughput", "latency", "profile", "openai", "database", "memory")
# Limits high enough never to refuse, but all set, so that every check runs.
# Answers at a time in the database phase's second measurement (the load the
# throughput phase's first level puts on the gateway).
DB_CONCURRENCY = 20
PLAN = {
    "queries_per_day": 1_000_000_000,
    "tokens_per_day": 1_000_000_000_000,
    "tokens_per_month": 10_000_000_000_000,
    "max_concurrent_streams": 1_000_000,
}


@dataclass(frozen=True)
class Settings:
    smoke: bool
    out: Path
    connections: tuple[int, ...]
    duration: int  # wrk seconds per round and cell
    rounds: int
    warmup: int
    events: int
    upstream_procs: int
    rate: float
    latency_seconds: float
    latency_rounds: int
    latency_delay_ms: float
    streams: int
    stream_delay_ms: float
    db_answers: int
    profile_seconds: int
    postgres: str
    paths: tuple[str, ...]
    phases: tuple[str, ...]
    users: int
    gateway_command: tuple[str, ...]
    require_portkey: bool = False


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Measure the gateway against bare proxies."
    )
    parser.add_argument("--smoke", action="store_true", help="tiny durations (CI), ~40 s")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--connections", default="20,64", help="wrk connection levels")
    parser.add_argument("--duration", type=int, default=None, help="wrk seconds per round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved wrk rounds")
    parser.add_argument("--events", type=int, default=20, help="message events per answer")
    parser.add_argument("--upstream-procs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rate", type=float, default=100.0, help="latency phase answers/s")
    parser.add_argument("--streams", type=int, default=None, help="open streams (memory)")
    parser.add_argument("--profile", type=int, default=None, help="py-spy seconds (0: off)")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL server (a fresh database is created and dropped on it)",
    )
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    parser.add_argument(
        "--users", type=int, default=1, help="gateway users the load is spread over, in turn"
    )
    parser.add_argument(
        "--gateway-command",
        default=None,
        help="how to run the gateway's CLI, for A/B runs (default: this Python -m gateway)",
    )
    parser.add_argument(
        "--require-portkey",
        action="store_true",
        help="fail instead of skipping Portkey in the openai phase when it is not installed",
    )
    args = parser.parse_args(argv)
    smoke: bool = args.smoke
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))} (known: {', '.join(PATHS)})")
    phases = tuple(p for p in args.phases.split(",") if p)
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))} (known: {', '.join(PHASES)})")
    return Settings(
        smoke=smoke,
        out=args.out or REPO / "bench" / "results" / f"{'smoke' if smoke else 'run'}-{stamp}.json",
        connections=tuple(int(c) for c in args.connections.split(",")),
        duration=args.duration or (1 if smoke else 7),
        rounds=args.rounds or (1 if smoke else 2),
        warmup=0 if smoke else 2,
        events=args.events,
        upstream_procs=args.upstream_procs,
        rate=args.rate,
        latency_seconds=0.6 if smoke else 6.0,
        latency_rounds=1 if smoke else 3,
        latency_delay_ms=20.0,
        streams=args.streams or (200 if smoke else 2000),
        stream_delay_ms=30_000.0,
        db_answers=100 if smoke else 1000,
        profile_seconds=args.profile if args.profile is not None else (0 if smoke else 10),
        postgres=args.postgres,
        paths=paths,
        phases=phases,
        users=max(1, args.users),
        gateway_command=tuple(
            shlex.split(args.gateway_command)
            if args.gateway_command
            else (sys.executable, "-m", "gateway")
        ),
        require_portkey=args.require_portkey,
    )


def _per_answer(wire: Counter[str], answers: int) -> dict[str, Any]:
    """Round trips per answer, in all and by statement, from a wire count."""
    by_statement = {name: count / answers for name, count in sorted(wire.items())}
    return {
        "round_trips_per_answer": sum(wire.values()) / answers,
        "by_statement": by_statement,
        "admission_round_trips": sum(v for k, v in by_statement.items() if "gateway_admit" in k),
        # One statement per settle, batched or not: its round trips are its writes.
        "settle_writes": sum(v for k, v in by_statement.items() if "gateway_settle" in k),
        "settle_round_trips": sum(v for k, v in by_statement.items() if "gateway_settle" in k),
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))}, Linux {platform.release()}"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "os": os_name,
        "commit": commit,
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "",
        "load_average_at_start": os.getloadavg(),
    }


def _raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # GATEWAY_* variables in the caller's environment would override the generated
    # configuration (docs/configuration.md, "Environment overrides").
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["BENCH_DIFY_KEY"] = UPSTREAM_KEY
    env.update(extra or {})
    return env


@dataclass
class WrkResult:
    requests: int
    seconds: float
    failed: int
    errors: dict[str, int]
    cpu_seconds: float


@dataclass
class _Cell:
    """One path at one connection level, summed over the rounds."""

    answers: int = 0
    failed: int = 0
    seconds: float = 0.0  # as wrk measured its runs
    wall: float = 0.0  # as the harness did, around the CPU readings
    proxy_cpu: float = 0.0
    proxy_sys: float = 0.0  # the part of proxy_cpu spent in the kernel
    upstream_cpu: float = 0.0
    db_cpu: float = 0.0  # PostgreSQL backends serving the gateway, when the server is local
    wrk_cpu: float = 0.0
    rounds: list[float] = field(default_factory=list)  # answers/s of each round

    def as_json(self) -> dict[str, Any]:
        return {
            "answers": self.answers,
            "answers_per_s_by_round": [round(rate, 1) for rate in self.rounds],
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "answers_per_s": self.answers / self.seconds if self.seconds else 0.0,
            "cpu_seconds": {
                "proxy": round(self.proxy_cpu, 2),
                "proxy_system": round(self.proxy_sys, 2),
                "upstream": round(self.upstream_cpu, 2),
                "database": round(self.db_cpu, 2),
                "wrk": round(self.wrk_cpu, 2),
            },
            "cpu_cores": {
                "proxy": self.proxy_cpu / self.wall,
                "upstream": self.upstream_cpu / self.wall,
                "database": self.db_cpu / self.wall,
                "wrk": self.wrk_cpu / self.wall,
            },
            "proxy_system_share": self.proxy_sys / self.proxy_cpu if self.proxy_cpu else None,
            "cpu_per_1000": 1000 * self.proxy_cpu / self.answers if self.answers else None,
            "cpu_per_1000_with_database": (
                1000 * (self.proxy_cpu + self.db_cpu) / self.answers if self.answers else None
            ),
        }


async def ledger_overheads(url: str, ids: list[str]) -> list[float]:
    """The ``overhead_ms`` a gateway's ledger (``sqlite:///path`` or a
    PostgreSQL URL) recorded for the answers of these request ids."""
    values: list[float | None] = []
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as lite:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                values += [
                    row[0]
                    for row in lite.execute(
                        f"SELECT overhead_ms FROM usage_events WHERE request_id IN ({marks})",
                        chunk,
                    )
                ]
    else:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT overhead_ms FROM usage_events WHERE request_id = ANY($1)", ids
            )
        finally:
            await conn.close()
        values = [row[0] for row in rows]
    return [v for v in values if v is not None]


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        self.servers = Servers()
        self.results: dict[str, Any] = {
            "machine": machine(),
            "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()
            },
            "notes": [],
        }
        self.upstream: list[Server] = []
        self.upstream_port = free_port()
        self.paths: dict[str, Server] = {}
        self.fresh: dict[str, Server] = {}
        self.load: set[subprocess.Popen[bytes]] = set()  # running wrk processes
        self.latency_ids: dict[str, list[str]] = {}  # request ids of the latency samples
        self.keys: dict[str, list[str]] = {}
        self.pg_db: str | None = None
        self.pg_url: str | None = None
        self.sqlite_url = f"sqlite:///{self.tmp / 'gateway.db'}"

    # --- servers -----------------------------------------------------------------------

    async def start_upstream(self) -> None:
        ready = []
        for i in range(self.s.upstream_procs):
            ready_file = self.tmp / f"upstream-{i}.ready"
            ready.append(ready_file)
            argv = [
                sys.executable,
                "-m",
                "bench.upstream",
                "--port",
                str(self.upstream_port),
                "--events",
                str(self.s.events),
                "--ready-file",
                str(ready_file),
            ]
            server = Server(
                f"upstream-{i}", argv, self.upstream_port, self.tmp / f"upstream-{i}.log", cwd=REPO
            )
            self.upstream.append(self.servers.add(server))
        deadline = time.monotonic() + 20
        while not all(f.exists() for f in ready):
            for server in self.upstream:
                assert server.proc is not None
                if server.proc.poll() is not None:
                    raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("the fake upstream did not start")
            await asyncio.sleep(0.05)

    def upstream_cpu(self) -> float:
        return sum(server.cpu_seconds() for server in self.upstream)

    def _gateway_config(self, name: str, database_url: str) -> Path:
        plan = "\n".join(f"{k} = {v}" for k, v in PLAN.items())
        path = self.tmp / f"{name}.toml"
        path.write_text(
            f"""# Generated by bench/run.py.
[server]
host = "127.0.0.1"
workers = 1
log_level = "warning"
reload_interval = 0

[upstream]
url = "http://127.0.0.1:{self.upstream_port}/v1"
api_key_env = "BENCH_DIFY_KEY"
max_connections = {max(4096, self.s.streams * 2)}

[database]
url = "{database_url}"
spool_file = ""

[accounting]
timezone = "UTC"
default_plan = "bench"

[plans.bench]
{plan}
"""
        )
        return path

    def _start(self, path: str, name: str, *, database_url: str | None = None) -> Server:
        port = free_port()
        log = self.tmp / f"{name}.log"
        if path in ("naive", "fast"):
            argv = [
                sys.executable,
                "-m",
                "uvicorn",
                f"bench.proxies:create_{path}",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--log-level",
                "warning",
            ]
            env = _child_env(
                {
                    "BENCH_UPSTREAM": f"http://127.0.0.1:{self.upstream_port}",
                    "BENCH_MAX_CONNECTIONS": str(max(4096, self.s.streams * 2)),
                }
            )
        else:
            url = database_url or (self.sqlite_url if path == "gateway-sqlite" else self.pg_url)
            assert url is not None
            config = self._gateway_config(name, url)
            argv = [*self.s.gateway_command, "--config", str(config), "serve"]
            argv += ["--port", str(port)]
            env = _child_env()
        return self.servers.add(Server(name, argv, port, log, env=env, cwd=REPO))

    def url(self, path: str) -> str:
        port = self.upstream_port if path == "direct" else self.paths[path].port
        return f"http://127.0.0.1:{port}/v1/chat-messages"

    def keys_for(self, path: str) -> list[str]:
        # Every path gets Authorization headers of the same size; only the gateways
        # read them.
        return self.keys.get(path) or next(iter(self.keys.values()), ["none"])

    def headers(self, path: str, delay_ms: float = 0.0) -> list[dict[str, str]]:
        """One set of request headers per user, used in turn."""
        return [
            {
                "Content-Type": "application/json",
                "Authorization": f"Bearer {key}",
                "x-bench-delay-ms": f"{delay_ms:g}",
            }
            for key in self.keys_for(path)
        ]

    # --- databases and users -----------------------------------------------------------

    async def setup_databases(self) -> None:
        if "gateway-postgres" in self.s.paths:
            try:
                conn = await asyncpg.connect(self.s.postgres, timeout=5)
            except (OSError, asyncpg.PostgresError) as exc:
                self.results["notes"].append(
                    f"PostgreSQL at {self.s.postgres} unreachable ({exc}); gateway-postgres skipped"
                )
                self.s = Settings(
                    **{
                        **asdict(self.s),
                        "paths": tuple(p for p in self.s.paths if p != "gateway-postgres"),
                    }
                )
            else:
                try:
                    self.pg_db = f"gateway_bench_{os.getpid()}_{secrets.token_hex(3)}"
                    await conn.execute(f'CREATE DATABASE "{self.pg_db}"')
                finally:
                    await conn.close()
                base = self.s.postgres.rsplit("/", 1)[0]
                self.pg_url = f"{base}/{self.pg_db}"
        jobs = []
        for path in GATEWAYS:
            if path in self.s.paths:
                url = self.sqlite_url if path == "gateway-sqlite" else self.pg_url
                assert url is not None
                jobs.append(self._create_users(path, self._gateway_config(f"{path}-cli", url)))
        await asyncio.gather(*jobs)

    async def _create_users(self, path: str, config: Path) -> None:
        def cli(*args: str) -> str:
            done = subprocess.run(
                [*self.s.gateway_command, "--config", str(config), *args],
                cwd=REPO,
                env=_child_env(),
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            if done.returncode != 0:
                raise RuntimeError(f"gateway {' '.join(args)} failed: {done.stderr.strip()}")
            return done.stdout

        await asyncio.to_thread(cli, "users", "add", "bench")
        keys = [(await asyncio.to_thread(cli, "keys", "create", "bench")).split()[-1]]
        for i in range(2, self.s.users + 1):
            created = await asyncio.to_thread(cli, "keys", "create", f"bench-{i}", "--create-user")
            keys.append(created.split()[-1])
        self.keys[path] = keys

    async def drop_database(self) -> None:
        if self.pg_db is None:
            return
        conn = await asyncpg.connect(self.s.postgres, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
        finally:
            await conn.close()
        self.pg_db = None

    async def db_cpu(self) -> dict[int, float]:
        """CPU seconds so far of each PostgreSQL backend connected to the gateway's
        database (from /proc: only when the server runs on this machine)."""
        if self.pg_db is None or _host_port(self.s.postgres)[0] not in ("127.0.0.1", "localhost"):
            return {}
        conn = await asyncpg.connect(self.s.postgres, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.pg_db
            )
        finally:
            await conn.close()
        return {row["pid"]: cpu_seconds(row["pid"]) for row in rows}

    async def pg_counters(self) -> tuple[int, int]:
        """(xact_commit, xact_rollback) of the gateway's database, once no backend is
        connected to it: a backend's statistics are flushed when it exits, so the
        figures are then complete."""
        conn = await asyncpg.connect(self.s.postgres, timeout=5)
        try:
            deadline = time.monotonic() + 15
            while True:
                row = await conn.fetchrow(
                    "SELECT numbackends, xact_commit, xact_rollback FROM pg_stat_database "
                    "WHERE datname = $1",
                    self.pg_db,
                )
                assert row is not None
                if row["numbackends"] == 0 or time.monotonic() > deadline:
                    return int(row["xact_commit"]), int(row["xact_rollback"])
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    # --- phases --------------------------------------------------------------------------

    async def start_paths(self) -> None:
        """Start every proxy, and (untouched until the memory phase) a fresh one of each
        for measuring memory, which must not have grown its heap under wrk first."""
        for path in self.s.paths:
            if path != "direct":
                self.paths[path] = self._start(path, path)
                if "memory" in self.s.phases:
                    self.fresh[path] = self._start(path, f"{path}-memory")
        servers = [*self.paths.values(), *self.fresh.values()]
        await asyncio.gather(*(server.wait_listening() for server in servers))

    async def verify(self) -> None:
        """Every path must stream a complete answer before anything is measured."""
        for path in self.s.paths:
            status, headers, body = await loadgen.fetch(self.url(path), self.headers(path)[0], BODY)
            messages = body.count(b'"event":"message",')
            if status != 200 or messages != self.s.events or b'"event":"message_end"' not in body:
                server = self.paths.get(path)
                raise RuntimeError(
                    f"{path}: expected a complete answer, got HTTP {status}, {messages} "
                    f"message events: {body[:300]!r}"
                    + (f"\n{server.name}'s log:\n{server.log_tail()}" if server else "")
                )
            if path in GATEWAYS and "x-request-id" not in {k.lower() for k in headers}:
                raise RuntimeError(f"{path}: no X-Request-Id: is this the gateway?")

    def _wrk(
        self,
        path: str,
        connections: int,
        seconds: int,
        *,
        url: str | None = None,
        request_path: str = "/v1/chat-messages",
        body: bytes = BODY,
        keys: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> WrkResult:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
        argv += ["-s", str(LUA), url or self.url(path).removesuffix("/v1/chat-messages")]
        env = {
            **os.environ,
            "BENCH_AUTH": ",".join(keys or self.keys_for(path)),
            "BENCH_BODY": body.decode(),
            "BENCH_PATH": request_path,
            "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
        }
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.load.add(proc)
        try:
            assert proc.stdout is not None
            output = proc.stdout.read().decode(errors="replace")
            # wait4 rather than wait: the load generator's own CPU time.
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            self.load.discard(proc)
        line = next((ln for ln in output.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{output}")
        data = json.loads(line.removeprefix("BENCH_JSON "))
        errors: dict[str, int] = data["errors"]
        return WrkResult(
            requests=data["requests"],
            seconds=data["duration_us"] / 1e6,
            failed=errors["status"],
            errors=errors,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
        )

    async def throughput(self) -> None:
        paths = self.s.paths
        if self.s.warmup:
            for path in paths:
                await asyncio.to_thread(self._wrk, path, max(self.s.connections), self.s.warmup)
        totals = {p: {str(c): _Cell() for c in self.s.connections} for p in paths}
        for _ in range(self.s.rounds):
            for connections in self.s.connections:
                for path in paths:
                    server = self.paths.get(path)
                    user0, sys0 = server.cpu_times() if server else (0.0, 0.0)
                    up0 = self.upstream_cpu()
                    db0 = await self.db_cpu() if path == "gateway-postgres" else {}
                    t0 = time.perf_counter()
                    result = await asyncio.to_thread(self._wrk, path, connections, self.s.duration)
                    cell = totals[path][str(connections)]
                    cell.wall += time.perf_counter() - t0
                    user1, sys1 = server.cpu_times() if server else (0.0, 0.0)
                    db1 = await self.db_cpu() if path == "gateway-postgres" else {}
                    cell.answers += result.requests - result.failed
                    cell.rounds.append((result.requests - result.failed) / result.seconds)
                    cell.failed += sum(result.errors.values())
                    cell.seconds += result.seconds
                    cell.proxy_cpu += (user1 - user0) + (sys1 - sys0)
                    cell.proxy_sys += sys1 - sys0
                    cell.upstream_cpu += self.upstream_cpu() - up0
                    cell.db_cpu += sum(cpu - db0.get(pid, 0.0) for pid, cpu in db1.items())
                    cell.wrk_cpu += result.cpu_seconds
                    # Let the gateways settle the answers wrk cut off at the end.
                    await asyncio.sleep(0.2 if self.s.smoke else 0.5)
        self.results["throughput"] = {
            path: {level: cell.as_json() for level, cell in by_level.items()}
            for path, by_level in totals.items()
        }
        # Memory after tens of thousands of answers: growth here would be a leak.
        self.results["rss_after_throughput"] = {
            path: server.rss_bytes() for path, server in self.paths.items()
        }

    async def latency(self) -> None:
        samples: dict[str, list[loadgen.Sample]] = {p: [] for p in self.s.paths}
        for _ in range(self.s.latency_rounds):
            for path in self.s.paths:
                samples[path] += await loadgen.open_loop(
                    self.url(path),
                    self.headers(path, self.s.latency_delay_ms),
                    BODY,
                    rate=self.s.rate,
                    duration=self.s.latency_seconds,
                    warmup=0.2 if self.s.smoke else 0.5,
                )
                await asyncio.sleep(0.2)
        self.latency_ids = {
            path: [s.request_id for s in got if s.ok and s.request_id]
            for path, got in samples.items()
            if path in GATEWAYS
        }
        out: dict[str, Any] = {}
        for path, got in samples.items():
            ok = [s for s in got if s.ok]
            out[path] = {
                "generator_lag_ms": {
                    q: 1000 * loadgen.percentile([s.lag for s in got], float(q[1:]))
                    for q in ("p50", "p99")
                },
                "samples": len(ok),
                "failed": len(got) - len(ok),
                "failures": sorted({s.error for s in got if not s.ok})[:5],
                "ttfb_ms": {
                    q: 1000 * loadgen.percentile([s.ttfb for s in ok], float(q[1:]))
                    for q in ("p50", "p90", "p99")
                },
                "ttlb_ms": {
                    q: 1000 * loadgen.percentile([s.ttlb for s in ok], float(q[1:]))
                    for q in ("p50", "p90", "p99")
                },
            }
        self.results["latency"] = out

    async def profile(self) -> None:
        """py-spy on the gateway while wrk saturates it (not during measured runs:
        sampling slows the target a little)."""
        server = self.paths.get("gateway-postgres") or self.paths.get("gateway-sqlite")
        if server is None:
            return
        seconds = self.s.profile_seconds
        raw = self.s.out.with_suffix(".pyspy.txt")
        load = asyncio.create_task(
            asyncio.to_thread(self._wrk, server.name, max(self.s.connections), seconds + 2)
        )
        await asyncio.sleep(1)
        summary = await asyncio.to_thread(profiling.record, server.pid, seconds, raw)
        await load
        if isinstance(summary, str):
            self.results["notes"].append(f"profile skipped: {summary}")
            return
        self.results["profile"] = {"path": server.name, "raw": str(raw), **summary.as_json()}

    async def _gateway_lifetime(
        self,
        database_url: str,
        counter: WireCounter,
        *,
        warm: int,
        measured: int,
        concurrency: int = 1,
    ) -> Counter[str]:
        """Start a gateway, send ``warm`` answers one at a time, then ``measured``
        answers ``concurrency`` at a time, stop it gracefully; return the round
        trips counted while the measured ones ran (and were settled)."""
        server = self._start("gateway-postgres", "gateway-postgres-db", database_url=database_url)
        ledger = await asyncpg.connect(self.pg_url, timeout=5)  # not through the relay
        try:
            await server.wait_listening()
            url = f"http://127.0.0.1:{server.port}/v1/chat-messages"
            headers = self.headers("gateway-postgres")

            async def send(count: int, at_once: int) -> None:
                expected = int(await ledger.fetchval("SELECT count(*) FROM usage_events")) + count
                got = await loadgen.answers(url, headers, BODY, count=count, concurrency=at_once)
                bad = [s.error for s in got if not s.ok]
                if bad:
                    raise RuntimeError(f"database phase: {len(bad)} answers failed: {bad[:3]}")
                # The answer is settled after its stream ends: wait for the writes.
                deadline = time.monotonic() + 10
                while int(await ledger.fetchval("SELECT count(*) FROM usage_events")) < expected:
                    if time.monotonic() > deadline:
                        raise RuntimeError("database phase: answers were not settled")
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)

            await send(warm, 1)
            before = counter.snapshot()
            if measured:
                await send(measured, concurrency)
            return counter.snapshot() - before
        finally:
            await ledger.close()
            await self.servers.stop(server, grace=15.0)

    async def database(self) -> None:
        """Database work per answer, two ways, with answers one at a time and then
        ``DB_CONCURRENCY`` at a time (where group commit batches them).

        xact_commit: every statement asyncpg sends outside a transaction block is
        its own transaction, so the commits are the statements, that is the round
        trips. The statistics of a backend are complete once it has exited, so the
        count is taken across whole gateway lifetimes: one that served W answers
        and one that served W + N; the difference is N answers' worth.

        On the wire: the gateway connects through a relay that counts each
        ReadyForQuery, labelled with the statement it ended (bench/pgwire.py).
        """
        assert self.pg_url is not None
        counter = WireCounter(*_host_port(self.pg_url))
        port = await counter.start()
        try:
            relayed = _with_port(self.pg_url, port)
            n, warm = self.s.db_answers, 20
            x0 = sum(await self.pg_counters())
            await self._gateway_lifetime(relayed, counter, warm=warm, measured=0)
            x1 = sum(await self.pg_counters())
            wire = await self._gateway_lifetime(relayed, counter, warm=warm, measured=n)
            x2 = sum(await self.pg_counters())
            wire_concurrent = await self._gateway_lifetime(
                relayed, counter, warm=warm, measured=n, concurrency=DB_CONCURRENCY
            )
            x3 = sum(await self.pg_counters())
        finally:
            await counter.close()
        self.results["database"] = {
            "answers": n,
            "xact_commit_per_answer": ((x2 - x1) - (x1 - x0)) / n,
            **_per_answer(wire, n),
            "concurrent": {
                "concurrency": DB_CONCURRENCY,
                "xact_commit_per_answer": ((x3 - x2) - (x1 - x0)) / n,
                **_per_answer(wire_concurrent, n),
            },
        }

    async def memory(self) -> None:
        """RSS of a fresh process after a warm-up of 50 answers, then while
        ``streams`` answers are open on a slow upstream (first event sent, the next
        not due for ``stream_delay_ms``); per stream is the difference over the
        streams that opened."""
        out: dict[str, Any] = {}
        settle = 0.3 if self.s.smoke else 1.0
        try:
            for path, server in self.fresh.items():
                url = f"http://127.0.0.1:{server.port}/v1/chat-messages"
                await loadgen.answers(url, self.headers(path), BODY, count=50, concurrency=10)
                await asyncio.sleep(settle)
                before = server.rss_bytes()

                async def measure(server: Server = server) -> int:
                    await asyncio.sleep(settle)
                    peak = 0
                    for _ in range(3):
                        peak = max(peak, server.rss_bytes())
                        await asyncio.sleep(0.1)
                    return peak

                opened, during = await loadgen.hold_streams(
                    url,
                    self.headers(path, self.s.stream_delay_ms),
                    BODY,
                    count=self.s.streams,
                    measure=measure,
                )
                out[path] = {
                    "streams": self.s.streams,
                    "opened": opened,
                    "rss_before": before,
                    "rss_during": during,
                    "per_stream_kb": (during - before) / max(opened, 1) / 1000,
                }
                if opened < self.s.streams:
                    self.results["notes"].append(
                        f"memory: only {opened} of {self.s.streams} streams opened on {path}"
                    )
                # Killed, not drained: nothing of it is measured any more.
                await self.servers.stop(server, grace=0.2)
        finally:
            for server in self.fresh.values():
                await self.servers.stop(server, grace=0.2)
        self.results["memory"] = out

    async def gateway_overhead(self) -> None:
        """The gateway's own record of the latency phase's answers: ``overhead_ms`` in
        its ledger is the time from receiving the request to forwarding it
        (authentication, the body, admission), so the added time to first byte
        splits into that and the rest (the proxying itself)."""
        for path, ids in self.latency_ids.items():
            if path == "gateway-sqlite":
                values = await ledger_overheads(f"sqlite:///{self.tmp / 'gateway.db'}", ids)
            elif self.pg_url is not None:
                values = await ledger_overheads(self.pg_url, ids)
            else:
                values = []
            if values:
                self.results["latency"][path]["ledger_overhead_ms"] = {
                    "answers": len(values),
                    "p50": loadgen.percentile(values, 50),
                    "p99": loadgen.percentile(values, 99),
                }

    def recorded(self) -> dict[str, int]:
        """Answers in each gateway's ledger: a sanity check that accounting really ran."""
        out: dict[str, int] = {}
        db = self.tmp / "gateway.db"
        if "gateway-sqlite" in self.s.paths and db.exists():
            with contextlib.closing(sqlite3.connect(db)) as conn:
                out["gateway-sqlite"] = conn.execute(
                    "SELECT count(*) FROM usage_events"
                ).fetchone()[0]
        return out

    async def recorded_postgres(self) -> int | None:
        if self.pg_url is None:
            return None
        conn = await asyncpg.connect(self.pg_url, timeout=5)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM usage_events"))
        finally:
            await conn.close()

    # --- the whole run -------------------------------------------------------------------

    async def _phase(self, name: str, *steps: Coroutine[Any, Any, None]) -> None:
        """Run steps in order, adding the time they took to ``phase_seconds``."""
        started = time.perf_counter()
        try:
            for step in steps:
                await step
        finally:
            for step in steps:
                step.close()  # the ones not reached, after a failure
        timings = self.results.setdefault("phase_seconds", {})
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 1)

    async def run(self) -> dict[str, Any]:
        try:
            await self._phase("start", self.start_upstream(), self.setup_databases())
            await self._phase("start", self.start_paths(), self.verify())
            phases = self.s.phases
            if "throughput" in phases:
                await self._phase("throughput", self.throughput())
            if "latency" in phases:
                await self._phase("latency", self.latency())
            if "profile" in phases and self.s.profile_seconds:
                await self._phase("profile", self.profile())
            if "openai" in phases and "gateway-postgres" in self.s.paths:
                await self._phase("openai", litellm.measure(self))
            await self._phase("stop", *(self.servers.stop(s) for s in self.paths.values()))
            if "memory" in phases:
                await self._phase("memory", self.memory())
            # Last: it needs every other connection to the database closed.
            if "database" in phases and "gateway-postgres" in self.s.paths:
                await self._phase("database", self.database())
            with contextlib.suppress(sqlite3.Error, asyncpg.PostgresError, OSError):
                await self.gateway_overhead()
            ledger = self.recorded()
            pg = await self.recorded_postgres()
            if pg is not None:
                ledger["gateway-postgres"] = pg
            self.results["ledger_rows"] = ledger
            for path, rows in ledger.items():
                # Every answer a client saw complete must be in the ledger (answers
                # cut off by wrk's end are recorded too, so this is a lower bound).
                seen = 1 + sum(
                    level["answers"]
                    for level in self.results.get("throughput", {}).get(path, {}).values()
                )
                seen += self.results.get("latency", {}).get(path, {}).get("samples", 0)
                if rows < seen:
                    self.results["notes"].append(
                        f"{path}: {rows} answers in the ledger, fewer than the {seen} completed"
                    )
            self.results["targets"] = report.targets(self.results)
            return self.results
        finally:
            for proc in list(self.load):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await self.servers.stop_all()
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await self.drop_database()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _host_port(url: str) -> tuple[str, int]:
    netloc = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = netloc.partition(":")
    return host or "127.0.0.1", int(port or 5432)


def _with_port(url: str, port: int) -> str:
    scheme, rest = url.split("://", 1)
    netloc, _, path = rest.partition("/")
    user, at, _ = netloc.rpartition("@")
    return f"{scheme}://{user}{at}127.0.0.1:{port}/{path}"


async def _main(settings: Settings) -> dict[str, Any]:
    bench = Bench(settings)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await bench.run()
    finally:
        bench.servers.kill_all()


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 2
    _raise_open_files(4 * settings.streams + 1024)
    started = time.perf_counter()
    try:
        results = uvloop.run(_main(settings))
    except (RuntimeError, OSError, asyncpg.PostgresError) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every server it started is stopped", file=sys.stderr)
        return 130
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report.render(results))
    print(f"\n{results['elapsed_s']} s; results in {settings.out}")
    return 0
