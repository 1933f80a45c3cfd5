"""Shared fixtures: a real PostgreSQL database per test run, storage backends.

PostgreSQL comes from $GATEWAY_TEST_POSTGRES (default: the local server with
trust auth). Each run creates its own database and drops it at the end. Without a
reachable server the PostgreSQL tests are skipped with the reason - unless
$GATEWAY_REQUIRE_POSTGRES is set (CI sets it), in which case they fail.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from gateway.config import DatabaseConfig
from gateway.storage import Storage, open_storage
from tests.tcpproxy import TCPProxy

ADMIN_DSN = os.environ.get("GATEWAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("GATEWAY_REQUIRE_POSTGRES", "") not in ("", "0", "false")
TABLES = (
    "usage_events",
    "usage_daily",
    "api_keys",
    "alert_outbox",
    "notifications",
    "users",
    "teams",
)


def _dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def _create_database() -> str:
    name = f"gateway_test_{os.getpid()}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class PostgresServer:
    """The test run's PostgreSQL: hands out fresh databases, drops them at exit."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def new_database(self) -> str:
        name = asyncio.run(_create_database())
        self.created.append(name)
        return _dsn_for(name)

    async def new_database_async(self) -> str:
        name = await _create_database()
        self.created.append(name)
        return _dsn_for(name)

    def drop_all(self) -> None:
        for name in self.created:
            asyncio.run(_drop_database(name))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        asyncio.run(_probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"PostgreSQL not reachable at {ADMIN_DSN}: {type(exc).__name__}: {exc}"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason} (GATEWAY_REQUIRE_POSTGRES is set)", pytrace=False)
        pytest.skip(reason)
    server = PostgresServer()
    yield server
    server.drop_all()


async def _probe() -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=3)
    await conn.close()


@pytest.fixture(scope="session")
def postgres_dsn(postgres: PostgresServer) -> str:
    """One migrated database shared by the run; tests truncate what they use."""
    dsn = postgres.new_database()

    async def migrate() -> None:
        storage = await open_storage(DatabaseConfig(url=dsn))
        await storage.migrate()
        await storage.close()

    asyncio.run(migrate())
    return dsn


async def _truncate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gateway.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    dsn: str = request.getfixturevalue("postgres_dsn")
    asyncio.run(_truncate(dsn))
    return dsn


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    store = await open_storage(DatabaseConfig(url=database_url))
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def pg_behind_proxy(postgres_dsn: str) -> AsyncIterator[tuple[str, TCPProxy]]:
    """An emptied PostgreSQL database reached through a TCP forwarder the test can cut."""
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("TRUNCATE usage_events, usage_daily, api_keys, stream_leases, users CASCADE")
    await conn.close()
    proxy = TCPProxy("127.0.0.1", 5432)
    await proxy.start()
    base, _, database = postgres_dsn.rpartition("/")
    user = base.split("//", 1)[1].split("@", 1)[0]
    try:
        yield f"postgresql://{user}@127.0.0.1:{proxy.port}/{database}", proxy
    finally:
        await proxy.cut()
