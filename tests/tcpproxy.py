"""A TCP forwarder the tests can cut, to make a real database unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import random

# PostgreSQL's CancelRequest: its length and code, a new connection's first bytes.
CANCEL_REQUEST = (16).to_bytes(4, "big") + (80877102).to_bytes(4, "big")
_random = random.SystemRandom()  # as tests.servers: each xdist worker its own


class TCPProxy:
    def __init__(self, target_host: str, target_port: int, *, lose_cancels: bool = False) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        # PostgreSQL's cancellations taken and never delivered (as by a load
        # balancer that sends them to another server); the client must connect
        # with sslmode=disable for its CancelRequest to be seen.
        self.lose_cancels = lose_cancels
        self.cancels_lost = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Counts the cuts: a connection accepted before one and still connecting
        # onwards when it came is dropped, not piped through a cut proxy.
        self._cuts = 0

    async def start(self) -> None:
        if self.port:  # restored: the same port again
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            return
        # A port below the kernel's ephemeral range (as tests.servers.free_port's):
        # one from there was taken, while the proxy was cut, as the source port of
        # some outgoing connection on the machine, and `restore` could not bind
        # it again (EADDRINUSE, seen on a machine running several suites).
        for _ in range(100):
            port = _random.randrange(20000, 32768)
            with contextlib.suppress(OSError):
                self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
                self.port = port
                return
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cuts = self._cuts
        first = b""
        if self.lose_cancels:
            with contextlib.suppress(asyncio.IncompleteReadError):
                first = await reader.readexactly(8)
            if self._cuts != cuts:
                writer.transport.abort()
                return
            if first == CANCEL_REQUEST:
                self.cancels_lost += 1
                self._writers.add(writer)  # held open until cut, never answered
                return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        if self._cuts != cuts:
            # Cut while this connection was on its way to the server (an asyncpg
            # pool restoring its floor, say): it must not outlive the cut.
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        up_writer.write(first)
        for src, dst, from_server in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(src, dst, from_server=from_server))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, from_server: bool
    ) -> None:
        """One direction's bytes, as they come (a subclass may hold the server's)."""
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones, like a database going down."""
        self._cuts += 1
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()  # the same port again
