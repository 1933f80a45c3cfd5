"""Starting and stopping the benchmark's servers, and reading their CPU and memory.

Every server runs in its own session (so its own process group) and is stopped
by group: nothing the harness starts outlives it, also on errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, from /proc/PID/stat (utime, stime)."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            if int(_stat_fields(int(entry))[2]) == pgid:
                pids.append(int(entry))
    return pids


def rss_bytes(pid: int) -> int:
    """Resident set size of one process, from /proc/PID/statm."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


@dataclass
class Server:
    """One server process (and anything it forks) in its own process group."""

    name: str
    argv: Sequence[str]
    port: int
    log: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of every live process in the server's group."""
        times = [cpu_times(pid) for pid in group_pids(self.pid)]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def rss_bytes(self) -> int:
        return sum(rss_bytes(pid) for pid in group_pids(self.pid))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    async def wait_listening(self, timeout: float = 30.0) -> None:
        """Wait until the port accepts connections (uvicorn listens after its lifespan
        startup, so this also means the app is ready)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} is not listening on {self.port} after {timeout}s:\n"
                        f"{self.log_tail()}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after ``grace`` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        # Reap the leader; the group's other members were children of it.
        await asyncio.to_thread(self.proc.wait)

    def kill(self) -> None:
        """Last resort, synchronous: SIGKILL the group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


class Servers:
    """Every server the harness started, stopped together at the end."""

    def __init__(self) -> None:
        self.all: list[Server] = []

    def add(self, server: Server) -> Server:
        self.all.append(server)
        server.start()
        return server

    async def stop(self, server: Server, grace: float = 5.0) -> None:
        await server.stop(grace)
        if server in self.all:
            self.all.remove(server)

    async def stop_all(self) -> None:
        servers, self.all = self.all, []
        await asyncio.gather(*(s.stop(grace=3.0) for s in servers), return_exceptions=True)

    def kill_all(self) -> None:
        for server in self.all:
            server.kill()
        self.all = []
