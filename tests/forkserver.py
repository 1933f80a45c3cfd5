"""`python -m MODULE ...` processes forked from a pre-imported Python.

A fresh `python -m gateway serve` spends most of its start-up CPU (~0.6 s of
~0.8 s) starting the interpreter and importing the gateway, uvicorn, httpx,
aiohttp and the rest, and the suite starts dozens of them. Each pytest
process (each xdist worker) instead starts one server process that imports all
of that once, then forks a child per request. The child is the same program a
fresh `python -m MODULE ARGS` would run (runpy's `-m`, in a process of its own,
in a new session, with the environment, working directory and standard streams
it was given), minus the interpreter's start and the imports already done.

What a fork cannot give is what Python reads from the environment at start-up
or at import: the interpreter's own variables (PYTHON*), the locale and time
zone, and prometheus_client's multiprocess directory. A child whose environment
differs from the server's in one of those is started the ordinary way
(`spawn`), as is every process when forking is not available.

One difference is left: the seed of str and bytes hashing, drawn by the
interpreter at start-up and fixed from then on. A forked child has the server's,
so every child of one server hashes alike, where fresh processes would each draw
their own (the seed is as random as a fresh process's; it is only shared). The
gateway neither depends on nor persists hash order, and nothing a test checks
does; a child asked for with PYTHONHASHSEED set otherwise than the server's is
started afresh, with that seed. (`random` and `secrets` are unaffected: random
reseeds in a forked child, secrets reads the kernel.) Nor does a child build
its own httpx default SSL context: it has the server's, built once before the
forks (`_share_ssl_contexts`), keyed on the SSL_CERT_* variables that choose the
CA bundle.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Read by the interpreter at start-up, or by a module at import (the server's
# imports happened under the server's environment, not the child's): the
# interpreter's own, the locale and time zone, prometheus_client's multiprocess
# directory, and the aio-libs' switches to their pure-Python code (aiohttp, yarl,
# multidict, frozenlist and propcache pick C or Python at import).
_AT_START = (
    "PYTHON",
    "LC_",
    "LANG",
    "TZ",
    "PROMETHEUS_MULTIPROC_DIR",
    "prometheus_multiproc_dir",
    "AIOHTTP_NO_EXTENSIONS",
    "YARL_NO_EXTENSIONS",
    "MULTIDICT_NO_EXTENSIONS",
    "FROZENLIST_NO_EXTENSIONS",
    "PROPCACHE_NO_EXTENSIONS",
)

# What a `gateway serve` process imports, imported once by the server. Anything
# left out is imported by the child itself: slower, never different.
_PRELOAD = (
    "gateway.cli",
    "gateway.app",
    "gateway.demo",
    "gateway.request_limits.protocol",
    "gateway.storage.postgres",
    "gateway.storage.sqlite",
    "gateway.upstreams.dify",
    "uvicorn.main",
    "uvicorn.config",
    "uvicorn.server",
    "uvicorn.loops.auto",
    "uvicorn.loops.uvloop",
    "uvicorn.lifespan.on",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.supervisors",
    "uvicorn.middleware.proxy_headers",
    "multiprocessing.spawn",
    "multiprocessing.connection",
)

_MAX_MESSAGE = 1 << 20


# --- the server (its own process) ------------------------------------------------------


def _server(sock: socket.socket) -> tuple[str, list[str]] | None:
    """Serve fork requests until the client goes away (None), or, in a forked
    child, return what it is to run: (module, argv)."""
    import importlib

    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _share_ssl_contexts()
    # What a pre-forking server does (the gc module's documentation): the imported
    # objects are moved out of the collector's way, so that a child's collections
    # (`gateway serve` collects everything once it has started, gateway/app.py)
    # do not walk, and copy, every page the server filled.
    gc.collect()
    gc.freeze()
    children: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd in children:
                pid = children.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
                continue
            data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 3)
            if not data:
                for pid in children.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                return None
            request = json.loads(data)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                for pidfd in children:
                    os.close(pidfd)
                sock.close()
                return _become(request, fds)
            for received in fds:
                os.close(received)
            pidfd = os.pidfd_open(pid)
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)
            _send(sock, {"pid": pid})


def _share_ssl_contexts() -> None:
    """The children's httpx clients (the gateway's upstream clients) take the
    default SSL context built here once (`tests/sslcontexts.py`), as the pytest
    process's do, rather than each loading the CA bundle (~25 ms of CPU per
    `gateway serve`)."""
    import httpx

    from tests.sslcontexts import shared

    create = shared(httpx.create_ssl_context)
    # httpx's transport imported the function by name; httpx-aiohttp calls it
    # through the package.
    httpx.create_ssl_context = create
    httpx._transports.default.create_ssl_context = create  # type: ignore[attr-defined]
    create()  # built before the fork: every child has it


# Set to SIG_IGN by subprocess before exec and by Python at start-up, whatever
# the parent had.
_PYTHONS_OWN = {signal.SIGPIPE, signal.SIGXFSZ}


def _ignored() -> list[int]:
    """The signals this process ignores: an exec'd child inherits that (and
    nothing else of its signal handling)."""
    return [
        signum
        for signum in signal.valid_signals()
        if signum not in _PYTHONS_OWN and _disposition(signum) is signal.SIG_IGN
    ]


def _disposition(signum: int) -> Any:
    try:
        return signal.getsignal(signum)
    except (OSError, ValueError):
        return None


def _become(request: dict[str, Any], fds: list[int]) -> tuple[str, list[str]]:
    """In the forked child: the process a fresh `python -m` would be."""
    os.setsid()
    # The signals the parent ignores are ignored, as across an exec; the others
    # are as Python starts them (SIGINT raising KeyboardInterrupt).
    ignored = set(request["ignored"])
    for signum in signal.valid_signals():
        if signum in _PYTHONS_OWN or signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            if signum in ignored:
                signal.signal(signum, signal.SIG_IGN)
            elif _disposition(signum) is signal.SIG_IGN:
                default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
                signal.signal(signum, default)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, 1 << 20)  # close_fds
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import tempfile

    tempfile.tempdir = None  # read from $TMPDIR at its first use, as in a fresh process
    if "multiprocessing.process" in sys.modules:
        sys.modules["multiprocessing.process"].ORIGINAL_DIR = os.getcwd()  # type: ignore[attr-defined]
    sys.path[0] = os.getcwd()  # what `-m` puts first
    sys.argv = ["-m", *request["args"]]
    return request["module"], sys.argv


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def main(fd: int) -> None:
    """The server's entry point; ``fd`` is its control socket."""
    sock = socket.socket(fileno=fd)
    run = _server(sock)
    if run is None:
        return
    import runpy

    module, _ = run
    runpy._run_module_as_main(module)  # type: ignore[attr-defined]


# --- the client (in each pytest process) -----------------------------------------------


class _Client:
    """One server per pytest process, started at the first request. A thread reads
    its messages: the pid of each fork, and each child's exit status."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.env = dict(os.environ)
        with theirs:
            self.server = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    f"from tests.forkserver import main; main({theirs.fileno()})",
                ],
                cwd=ROOT,
                env=self.env,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        self.sock = mine
        self.lock = threading.Lock()
        self.condition = threading.Condition()
        self.pids: list[int] = []
        self.exits: dict[int, int] = {}
        self.waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]]] = {}
        self.gone = False
        threading.Thread(target=self._read, name="forkserver", daemon=True).start()
        atexit.register(self.close)

    def fits(self, env: Mapping[str, str]) -> bool:
        """Whether a child with ``env`` is the process a fresh start would be."""
        keys = set(env) | set(self.env)
        return not any(
            key.startswith(_AT_START) and env.get(key) != self.env.get(key) for key in keys
        )

    def fork(self, module: str, args: Sequence[str], env: Mapping[str, str], fds: list[int]) -> int:
        request = {
            "module": module,
            "args": list(args),
            "env": dict(env),
            "cwd": os.getcwd(),
            "ignored": _ignored(),
        }
        with self.lock:
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
            with self.condition:
                while not self.pids:
                    if self.gone:
                        raise RuntimeError("the fork server has gone")
                    self.condition.wait()
                return self.pids.pop()

    def _read(self) -> None:
        while data := self.sock.recv(_MAX_MESSAGE):
            message = json.loads(data)
            with self.condition:
                if "pid" in message:
                    # A pid given again is a new child: the exit kept under it was
                    # an earlier one's (the server sends an exit before it forks
                    # again, so the order holds).
                    self.exits.pop(message["pid"], None)
                    self.pids.append(message["pid"])
                    self.condition.notify_all()
                    continue
                pid, code = message["exit"], message["code"]
                self.exits[pid] = code
                for loop, future in self.waiters.pop(pid, []):
                    with contextlib.suppress(RuntimeError):  # that loop is closed
                        loop.call_soon_threadsafe(_resolve, future, code)
        with self.condition:
            self.gone = True
            self.condition.notify_all()
            for waiters in self.waiters.values():
                for loop, future in waiters:
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(_fail, future)
            self.waiters.clear()

    async def wait(self, pid: int) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        with self.condition:
            if pid in self.exits:
                return self.exits[pid]
            if self.gone:
                raise RuntimeError("the fork server has gone")
            self.waiters.setdefault(pid, []).append((loop, future))
        return await future

    def close(self) -> None:
        """Stop the server; it kills what it forked that still runs."""
        if self.sock.fileno() != -1:
            with contextlib.suppress(OSError):  # it has gone already
                self.sock.shutdown(socket.SHUT_RDWR)
            self.server.wait()
            self.sock.close()


def _resolve(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)


def _fail(future: asyncio.Future[int]) -> None:
    if not future.done():
        future.set_exception(RuntimeError("the fork server has gone"))


_client: _Client | None = None


# GATEWAY_TEST_FORK=0 starts every process afresh (to compare, or to rule the
# fork server out); so does a system without pidfd_open (Linux 5.3).
FORKING = os.environ.get("GATEWAY_TEST_FORK") != "0" and hasattr(os, "pidfd_open")


def _forking() -> _Client | None:
    global _client
    if not FORKING:
        return None
    if _client is None or _client.gone:
        if _client is not None:
            _client.close()
        _client = _Client()
    return _client


class ForkedProcess:
    """A forked child, with the part of asyncio.subprocess.Process the tests use."""

    def __init__(self, client: _Client, pid: int, pipes: list[_Pipe | None]) -> None:
        self._client = client
        self.pid = pid
        self._pipes = [pipe for pipe in pipes if pipe is not None]
        self.stdin = None
        self.stdout, self.stderr = (None if pipe is None else pipe.reader for pipe in pipes)

    @property
    def returncode(self) -> int | None:
        with self._client.condition:
            return self._client.exits.get(self.pid)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """The exit status, once the process has ended and its pipes have been read
        to their end (as asyncio's: their transports are closed by then)."""
        code = await self._client.wait(self.pid)
        for pipe in self._pipes:
            await asyncio.shield(pipe.closed)
        return code

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        assert input is None, "no stdin"

        async def read(stream: asyncio.StreamReader | None) -> bytes | None:
            return None if stream is None else await stream.read()

        out, err = await asyncio.gather(read(self.stdout), read(self.stderr))
        await self.wait()
        return out, err


class _Pipe(asyncio.StreamReaderProtocol):
    """A child's stdout or stderr, read into ``reader`` until its end (``closed``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.reader = asyncio.StreamReader(limit=2**16, loop=loop)  # asyncio.subprocess's
        super().__init__(self.reader, loop=loop)
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


async def _pipe(fd: int) -> _Pipe:
    loop = asyncio.get_running_loop()
    pipe = _Pipe(loop)
    await loop.connect_read_pipe(lambda: pipe, os.fdopen(fd, "rb", buffering=0))
    return pipe


PIPE = asyncio.subprocess.PIPE


async def _fork(
    client: _Client, module: str, args: Sequence[str], env: Mapping[str, str], fds: list[int]
) -> int:
    """The pid of a child forked by ``client``. A fork asked for is seen through:
    if the wait is cancelled, the child it made is killed and reaped (it would run
    on with nobody to stop it), and only then is the cancellation raised - nor may
    the caller close ``fds`` while the request carrying them is being sent."""
    forking = asyncio.ensure_future(asyncio.to_thread(client.fork, module, args, env, fds))
    try:
        return await asyncio.shield(forking)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            pid = await forking
            # Killed at once: it has not started anything yet, or barely. Its group
            # too, once it has one (it calls setsid first thing).
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError):
                    kill(pid, signal.SIGKILL)
            await client.wait(pid)
        raise


async def python_m(
    module: str,
    *args: str,
    env: Mapping[str, str],
    stdout: int | None = None,
    stderr: int | None = None,
) -> ForkedProcess | asyncio.subprocess.Process:
    """`python -m MODULE ARGS` in a new session (its process group is its own, for
    `killpg`), with ``env`` as its whole environment; ``stdout`` and ``stderr``
    are PIPE or None (inherited), as for asyncio.create_subprocess_exec."""
    client = _forking()
    if client is None or not client.fits(env):
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            env=dict(env),
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    fds = [0, 1, 2]
    pipes: list[int | None] = [None, None]
    opened: list[int] = []
    try:
        for i, mode in enumerate((stdout, stderr)):
            if mode == PIPE:
                read_end, write_end = os.pipe()
                opened += [read_end, write_end]
                pipes[i] = read_end
                fds[i + 1] = write_end
            else:
                assert mode is None, mode
        pid = await _fork(client, module, args, env, fds)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    for fd in fds[1:]:
        if fd not in (1, 2):
            os.close(fd)  # the child's ends
    return ForkedProcess(client, pid, [None if fd is None else await _pipe(fd) for fd in pipes])
