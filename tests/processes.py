"""Real `gateway serve` processes for tests: started, watched through their log,
stopped by signal."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.servers import Process, free_port, kill_tree, spawn_gateway


class GatewayProcess:
    """One `python -m gateway serve` process; its stderr (the log) is read all along,
    so the process never blocks on a full pipe and tests can wait for a line."""

    def __init__(self, proc: Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, config: Path, env: dict[str, str]) -> GatewayProcess:
        port = free_port()
        proc = await spawn_gateway(config, port, env)
        process = cls(proc, port)
        try:
            # uvicorn says so once the app (and its database) is ready and it listens
            await process.wait_for_line("Uvicorn running on", timeout=30)
        except BaseException:
            await process.kill()
            raise
        return process

    @classmethod
    async def start_all(cls, config: Path, env: dict[str, str], count: int) -> list[GatewayProcess]:
        """``count`` processes on one configuration, started side by side; if one
        fails to start, the others are killed."""
        started = await asyncio.gather(
            *(cls.start(config, env) for _ in range(count)), return_exceptions=True
        )
        processes = [p for p in started if isinstance(p, GatewayProcess)]
        for failure in started:
            if isinstance(failure, BaseException):
                for process in processes:
                    await process.kill()
                raise failure
        return processes

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for_line(self, text: str, *, timeout: float = 20) -> str:
        """The first log line containing ``text``, once the process has written it."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError(f"process ended without logging {text!r}: {self.log}")
                self._new_line.clear()
                await self._new_line.wait()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        """SIGKILL, to the process and any workers it started."""
        if self.proc.returncode is None:
            kill_tree(self.proc)
        await self.wait()

    async def terminate(self) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
        return await self.wait()
