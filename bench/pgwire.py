"""A PostgreSQL wire-protocol relay that counts round trips, by statement.

The gateway is pointed at the relay instead of the server. Every message is
forwarded unchanged; the relay only reads the framing (a type byte and a length,
https://www.postgresql.org/docs/current/protocol-message-formats.html):

- client to server: ``Q`` (simple query) and ``Sync`` each end a request that the
  server answers with one ``ReadyForQuery``; ``Parse`` names a statement's text
  and ``Bind`` says which statement a request runs;
- server to client: each ``ReadyForQuery`` (``Z``) ends one round trip.

So the count of ``Z`` messages is the count of round trips, and each one is
labelled with the statement it ran. The pool's reset query (asyncpg runs one
when a connection goes back to the pool) is labelled ``reset after <statement>``
with the statement it followed on that connection.

SSL and GSS encryption requests are answered "no" by the relay itself, so the
stream stays readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter, deque

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_SPACE = re.compile(r"\s+")


def label(query: bytes) -> str:
    text = _SPACE.sub(" ", query.decode("utf-8", "replace")).strip()
    if "pg_advisory_unlock_all" in text and "RESET ALL" in text:
        return "pool reset"
    match = re.search(r"\b(gateway_\w+)\(", text)
    if match:
        return match.group(1)
    return text[:72]


class _Connection:
    __slots__ = ("current", "last", "pending", "statements")

    def __init__(self) -> None:
        self.statements: dict[bytes, str] = {}
        self.pending: deque[str] = deque()  # one label per request awaiting its Z
        self.current: str | None = None  # what the request being sent runs
        self.last = "?"  # the previous statement on this connection


class WireCounter:
    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        self.host = host
        self.port = port
        self.round_trips: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def snapshot(self) -> Counter[str]:
        return Counter(self.round_trips)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        conn = _Connection()
        pumps = [
            asyncio.ensure_future(self._client_to_server(reader, writer, up_writer, conn)),
            asyncio.ensure_future(self._server_to_client(up_reader, writer, conn)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            self._tasks.discard(task)

    async def _client_to_server(
        self,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        server: asyncio.StreamWriter,
        conn: _Connection,
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            # Untyped start-up packets: encryption requests (answered here), then
            # the StartupMessage or a CancelRequest.
            while True:
                head = await reader.readexactly(4)
                payload = await reader.readexactly(int.from_bytes(head, "big") - 4)
                if int.from_bytes(payload[:4], "big") in (_SSL_REQUEST, _GSSENC_REQUEST):
                    client.write(b"N")
                    await client.drain()
                    continue
                server.write(head + payload)
                break
            while True:
                head = await reader.readexactly(5)
                payload = await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
                kind = head[:1]
                if kind == b"Q":
                    conn.pending.append(label(payload.split(b"\0", 1)[0]))
                elif kind == b"P":
                    name, query = payload.split(b"\0", 2)[:2]
                    conn.statements[name] = label(query)
                    conn.current = conn.current or f"prepare {conn.statements[name]}"
                elif kind == b"B":
                    statement = payload.split(b"\0", 2)[1]
                    conn.current = conn.statements.get(statement, "?")
                elif kind == b"S":
                    conn.pending.append(conn.current or "sync")
                    conn.current = None
                server.write(head + payload)
                await server.drain()

    async def _server_to_client(
        self, reader: asyncio.StreamReader, client: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(5)
                payload = await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
                if head[:1] == b"Z" and conn.pending:
                    name = conn.pending.popleft()
                    if name == "pool reset":
                        self.round_trips[f"pool reset after {conn.last}"] += 1
                    else:
                        self.round_trips[name] += 1
                        conn.last = name
                client.write(head + payload)
                await client.drain()
