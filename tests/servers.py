"""Real HTTP servers for tests: uvicorn on a free port, in the test's event loop.

Streaming, timing and disconnects need a real socket: the in-process test
clients buffer whole bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from tests.forkserver import PIPE, ForkedProcess, python_m

_random = random.SystemRandom()  # not the seeded one: each xdist worker picks its own

# How often the test server looks at its connections while it shuts down. uvicorn
# polls every 0.1 s and sleeps a fixed 0.1 s before it does; with two servers per
# test that was most of the suite's wall clock.
_POLL = 0.002


class _Server(uvicorn.Server):
    """uvicorn's server, with its polling loops woken by events instead of 0.1 s
    ticks. Behaviour is uvicorn's: the same lifespan, the same graceful shutdown
    (stop accepting, ask every connection to close, wait for their responses and
    tasks, then the lifespan shutdown); only the waiting is shorter."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit = asyncio.Event()

    def request_exit(self) -> None:
        self.should_exit = True
        self._exit.set()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            # uvicorn refreshes its Date header every tenth tick (once a second).
            counter += 10
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self._exit.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        async with asyncio.timeout(self.config.timeout_graceful_shutdown):
            # uvicorn keeps plain sets, with no event for their emptying.
            while self.server_state.connections or self.server_state.tasks:  # noqa: ASYNC110
                await asyncio.sleep(_POLL)
        for server in self.servers:
            await server.wait_closed()
        await self.lifespan.shutdown()


def _log_config() -> dict[str, Any] | None:
    """uvicorn's logging configuration if anything has changed what it set, else None.

    uvicorn.Config applies its `LOGGING_CONFIG` (a logging.config.dictConfig, ~3 ms
    of CPU) each time one is built, a thousand times a run, to the same effect: the
    "uvicorn" and "uvicorn.access" loggers on handlers of their own, writing to the
    sys.stderr and sys.stdout of the moment, not propagated. It is applied again
    only when that state is gone (a test configured the gateway's logging, or
    swapped sys.stderr), so every server starts on the loggers it always had."""
    server, access = logging.getLogger("uvicorn"), logging.getLogger("uvicorn.access")
    kept = (
        not server.propagate
        and not access.propagate
        and server.level == logging.INFO
        and [getattr(h, "stream", None) for h in server.handlers] == [sys.stderr]
        and [getattr(h, "stream", None) for h in access.handlers] == [sys.stdout]
    )
    return None if kept else uvicorn.config.LOGGING_CONFIG


@contextlib.asynccontextmanager
async def serve(app: Any, *, lifespan: str = "off", http: str = "auto") -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 and a free port; yields the base URL. ``http``
    names uvicorn's protocol ("h11", "httptools" or a "module:Class")."""
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host="127.0.0.1",
        port=0,
        log_config=_log_config(),
        log_level="warning",
        lifespan=lifespan,  # type: ignore[arg-type]
        http=http,  # type: ignore[arg-type]
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        # uvicorn exposes no "started" event; it sets the flag once it listens.
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("server failed to start")
            await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.request_exit()
        await task


async def read_body(receive: Any) -> bytes:
    """The whole request body an ASGI app receives."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def free_port() -> int:
    """A port free now, for a process that binds it later. Taken below the kernel's
    ephemeral range (``ip_local_port_range``, 32768 and up by default), which the
    kernel hands out as the source port of every outgoing connection: a port from
    there can be taken by any client on the machine between now and the bind."""
    for _ in range(100):
        port = _random.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found


Process = ForkedProcess | asyncio.subprocess.Process


async def spawn_gateway(
    config: Path, port: int, env: dict[str, str] | None = None, *, workers: int = 1
) -> Process:
    """`python -m gateway serve` on ``port``, its log (stderr) piped, not yet ready:
    forked from the pre-imported server (tests/forkserver.py), in a session of its
    own, so that `kill_tree` reaches its workers too."""
    return await python_m(
        "gateway",
        "--config",
        str(config),
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        env={**os.environ, **(env or {})},
        stderr=PIPE,
    )


def kill_tree(proc: Process) -> None:
    """SIGKILL a process started by `spawn_gateway` and everything it started (its
    process group: its session's, which `--workers` children share). Not one
    already reaped: its group id may belong to another process by now."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def start_gateway(
    config: Path,
    port: int,
    env: dict[str, str] | None = None,
    *,
    workers: int = 1,
    timeout: float = 30,
) -> Process:
    """A real `gateway serve` process on ``port``, once all its workers are ready;
    killed with them if they are not within ``timeout`` (see `wait_ready`)."""
    proc = await spawn_gateway(config, port, env, workers=workers)
    await wait_ready(proc, port, workers, timeout)
    return proc


async def wait_ready(proc: Process, port: int, workers: int, timeout: float = 30) -> None:
    """Until a `gateway serve` process's ``workers`` workers are ready. If they are
    not within ``timeout`` (or the wait is cancelled), the process and its workers
    are killed and reaped."""
    try:
        await _ready(proc, port, workers, timeout)
    except BaseException:
        kill_tree(proc)
        await proc.wait()
        raise


async def _ready(proc: Process, port: int, workers: int, timeout: float) -> None:
    assert proc.stderr is not None
    ready = 0
    listening = False
    async with asyncio.timeout(timeout):
        # uvicorn says when each worker's app (and its database) is ready, and when
        # it listens: a single process binds its socket only after the app started,
        # so a request sent on "startup complete" alone can find the port closed.
        while line := await proc.stderr.readline():
            ready += b"Application startup complete" in line
            listening = listening or b"Uvicorn running on" in line
            if ready == workers and listening:
                if workers > 1:
                    await accepting(port)
                return
    raise RuntimeError(f"gateway process did not start (exit {await proc.wait()})")


async def accepting(port: int) -> None:
    """Until the port takes connections. Under ``--workers`` the parent binds the
    socket and says "running on", but the socket listens only once a worker has
    created its server, after its "startup complete" (and workers say nothing
    then): a connection refused until then is the one readiness signal left."""
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        await writer.wait_closed()
        return
