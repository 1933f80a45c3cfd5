"""The suite's connections to PostgreSQL. Those the tests on ``database_url``
lend each other (tests/conftest.py, `_WarmConnections`) start as clean as new
ones: what a test left on its session (settings, temporary tables, advisory
locks) is gone before the next storage gets it, and the storage's own start
(`_init_connection`) runs on it again; so do a test's own connections, in a test on
``postgres_dsn`` marked ``warm_connections`` (this module is). A test's own
database is a migrated one of its own. The forwarder the tests cut
(tests/tcpproxy.py) gets its port back."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.storage import migrations, open_storage
from tests import tcpproxy
from tests.tcpproxy import TCPProxy

pytestmark = pytest.mark.warm_connections


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_lent_connection_starts_as_clean_as_a_new_one(database_url: str) -> None:
    config = DatabaseConfig(url=database_url, pool_min_size=1, pool_max_size=1)
    first = await open_storage(config)
    try:
        async with first._pool.acquire() as conn:  # type: ignore[attr-defined]
            pid = conn.get_server_pid()
            await conn.execute(
                "SET statement_timeout = 1234; SET array_nulls = off;"
                " CREATE TEMP TABLE left_behind (x int); SELECT pg_advisory_lock(42)"
            )
    finally:
        await first.close()
    second = await open_storage(config)
    try:
        async with second._pool.acquire() as conn:  # type: ignore[attr-defined]
            assert conn.get_server_pid() == pid  # the same backend, lent
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            assert await conn.fetchval("SHOW array_nulls") == "on"
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_behind')") is None
            assert not await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid()"
            )
    finally:
        await second.close()


@pytest.mark.postgres
async def test_a_marked_test_on_postgres_dsn_gets_lent_connections(
    postgres_dsn: str, _warm_connections: Any
) -> None:
    """A test marked ``warm_connections`` (this module) takes lent connections
    for its own `asyncpg.connect` as for its storages', as clean as new ones;
    two open at once are still two backends."""
    await _warm_connections.aclose()  # none kept for other kinds of connection
    first = await asyncpg.connect(postgres_dsn)
    second = await asyncpg.connect(postgres_dsn)
    try:
        assert first.get_server_pid() != second.get_server_pid()
        pid = first.get_server_pid()
        await first.execute("SET lock_timeout = 1234; SELECT pg_advisory_lock(42)")
    finally:
        await first.close()
    again = await asyncpg.connect(postgres_dsn)
    try:
        assert again.get_server_pid() == pid  # the same backend, lent
        assert await again.fetchval("SHOW lock_timeout") == "0"
        assert not await again.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
    finally:
        await again.close()
        await second.close()


@pytest.mark.postgres
@pytest.mark.warm_connections(False)
async def test_a_test_marked_not_to_take_them_gets_new_connections(postgres_dsn: str) -> None:
    """Marked ``warm_connections(False)`` (closer than its module's mark), or
    not marked, a test on ``postgres_dsn`` gets new backends: it may change what
    a connection starts with, or wait for a backend it closed to end."""
    first = await asyncpg.connect(postgres_dsn)
    pid = first.get_server_pid()
    await first.close()
    again = await asyncpg.connect(postgres_dsn)
    try:
        assert again.get_server_pid() != pid
    finally:
        await again.close()


@pytest.mark.postgres
async def test_a_tests_own_database_is_migrated_and_commits_as_the_runs_does(
    own_database: str, postgres_dsn: str
) -> None:
    """`own_database` is a copy of a migrated database, which does not take its
    template's settings: they are set on the copy again."""
    assert own_database != postgres_dsn
    conn = await asyncpg.connect(own_database)
    try:
        assert await conn.fetchval("SHOW synchronous_commit") == "off"
        applied = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        assert applied == len(migrations("postgres"))
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()


async def test_a_cut_proxy_keeps_a_port_no_outgoing_connection_takes() -> None:
    """`TCPProxy.restore` binds the port it had again: one from the kernel's
    ephemeral range (32768 and up) could be taken meanwhile as the source port
    of any outgoing connection on the machine (a test failed so)."""
    proxy = TCPProxy("127.0.0.1", 9)
    await proxy.start()
    port = proxy.port
    await proxy.cut()
    assert 0 < port < 32768
    await proxy.restore()
    try:
        assert proxy.port == port
    finally:
        await proxy.cut()


async def test_a_connection_on_its_way_to_the_server_when_the_proxy_is_cut_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client accepted just before a cut, whose onward connection completes just
    after it (an asyncpg pool restoring its floor as the test cuts), is dropped: it
    once lived on through the cut, and the 'unreachable' database recorded an answer
    (test_spool_replay, seen once in a whole run)."""
    reached: list[asyncio.StreamWriter] = []

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(writer)

    target = await asyncio.start_server(server, "127.0.0.1", 0)
    on_its_way, go_on = asyncio.Event(), asyncio.Event()
    connect = asyncio.open_connection

    async def slow_connect(*args: Any, **kwargs: Any) -> Any:
        on_its_way.set()
        await go_on.wait()
        return await connect(*args, **kwargs)

    monkeypatch.setattr(tcpproxy.asyncio, "open_connection", slow_connect)
    proxy = TCPProxy("127.0.0.1", target.sockets[0].getsockname()[1])
    await proxy.start()
    try:
        reader, writer = await connect("127.0.0.1", proxy.port)
        await on_its_way.wait()
        await proxy.cut()
        go_on.set()
        async with asyncio.timeout(10):  # piped on, it would stay open
            assert await reader.read() == b""  # closed by the proxy
        assert not proxy._writers and not proxy._tasks
        writer.close()
        await writer.wait_closed()
    finally:
        for reached_writer in reached:
            reached_writer.close()
        target.close()
        await target.wait_closed()
