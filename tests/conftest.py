"""Shared fixtures: a real PostgreSQL database per test run, storage backends.

PostgreSQL comes from $GATEWAY_TEST_POSTGRES (default: the local server with
trust auth). Each run creates its own database and drops it at the end. Without a
reachable server the PostgreSQL tests are skipped with the reason - unless
$GATEWAY_REQUIRE_POSTGRES is set (CI sets it), in which case they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import hypothesis
import pytest
import pytest_asyncio

from gateway.config import DatabaseConfig
from gateway.storage import Storage, open_storage
from tests.browser import chromium, require_chromium
from tests.migrated import MIGRATED
from tests.sslcontexts import shared
from tests.tcpproxy import TCPProxy

ADMIN_DSN = os.environ.get("GATEWAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("GATEWAY_REQUIRE_POSTGRES", "") not in ("", "0", "false")

# No property test is timed: hypothesis's default 200 ms deadline per example
# failed a test on a loaded machine (342 ms) that checks bytes, not speed.
hypothesis.settings.register_profile("gateway", deadline=None)
hypothesis.settings.load_profile("gateway")


_shared_ssl_context = shared(httpx.create_ssl_context)


@pytest.fixture(scope="session", autouse=True)
def shared_ssl_context() -> Iterator[None]:
    """Every httpx client builds an SSL context by loading the whole CA bundle (about
    25 ms of CPU) even when it only speaks plain HTTP to 127.0.0.1, and the suite
    builds hundreds (each test's clients and each gateway's upstream client). The
    contexts of one set of arguments are alike, so the run builds each once. The
    official SDKs' clients (openai, anthropic) are on httpx2, httpx's fork, which
    builds its own (a thousand-odd in a run); it is imported (~30 ms) and patched
    too, before the SDKs that use it (imported by their first test, tests/sdk.py)."""
    with pytest.MonkeyPatch.context() as patch:
        # httpx's transport imported the function by name; httpx-aiohttp calls it
        # through the package.
        patch.setattr(httpx, "create_ssl_context", _shared_ssl_context)
        patch.setattr(httpx._transports.default, "create_ssl_context", _shared_ssl_context)
        with contextlib.suppress(ImportError):  # the SDKs are not installed
            import httpx2

            shared2 = shared(httpx2.create_ssl_context)
            patch.setattr(httpx2, "create_ssl_context", shared2)
            patch.setattr(httpx2._transports.default, "create_ssl_context", shared2)
        yield


def _dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def _create_database(template: str | None = None) -> str:
    name = f"gateway_test_{os.getpid()}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        copy = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
        # A commit need not wait for its WAL to reach the disk: the tests stop
        # gateways, never the PostgreSQL server, and each commit stays atomic.
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await conn.close()
    return name


class PostgresServer:
    """The test run's PostgreSQL: hands out fresh databases, drops them at exit."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self._template: str | None = None

    def new_database(self) -> str:
        name = asyncio.run(_create_database())
        self.created.append(name)
        return _dsn_for(name)

    async def new_database_async(self) -> str:
        name = await _create_database()
        self.created.append(name)
        return _dsn_for(name)

    async def migrated_database_async(self) -> str:
        """A new migrated database: a copy of one this process migrated once and
        nothing connects to (`CREATE DATABASE ... TEMPLATE`). Migrating each anew
        cost the server ~140 ms of CPU, the copy ~20. (A copy does not take
        its template's `ALTER DATABASE` settings: `_create_database` sets them.)"""
        if self._template is None:
            template = await self.new_database_async()
            storage = await open_storage(DatabaseConfig(url=template))
            try:
                await storage.migrate()
            finally:
                await storage.close()
            self._template = template.rpartition("/")[2]
        name = await _create_database(self._template)
        self.created.append(name)
        return _dsn_for(name)

    def drop_all(self) -> None:
        """Drop the run's databases in a process of its own that the run does not
        wait for (tests/dropdb.py: each drop is a checkpoint). Spawned, not a
        `subprocess.Popen`, which warns when it is collected still running; its
        errors, if any, still reach stderr."""
        if self.created:
            script = str(Path(__file__).with_name("dropdb.py"))
            os.posix_spawn(
                sys.executable,
                [sys.executable, script, ADMIN_DSN, *self.created],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                ],
                setsid=True,
            )


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
    MIGRATED.add(dsn)
    return dsn


class _WarmConnections:
    """Connections to the run's PostgreSQL database that outlive the storage that
    opened them, lent to the next storage of a test on ``database_url`` (in the
    session's event loop, where they live).

    A new server process is most of what a test on PostgreSQL costs: the backend
    starts, loads the catalog, and compiles and plans each function it calls
    (`gateway_admit`, `gateway_settle`...) anew: a test that opened a storage,
    admitted and settled an answer cost the server ~38 ms of CPU on new
    connections, ~3 ms on warm ones (and the pytest process ~12 and ~2 ms).
    A connection is kept only as clean as a new one: out of any transaction,
    without listeners, after the statement that ends a pooler's session
    (`_RESET`: the session's settings back to its start, its temporary tables,
    advisory locks and cursors gone). The storage still opens its pool and runs
    its `init` on each connection it takes, and a test's own `asyncpg.connect`
    to the database is lent one as well. Tests on ``database_url`` take them, and
    tests on ``postgres_dsn`` marked ``warm_connections`` (a test that needs two
    backends still gets two, warm ones); the others on ``postgres_dsn`` change
    what a connection starts with (the database's defaults, roles) or count the
    server's backends."""

    # DISCARD ALL without DEALLOCATE ALL and DISCARD PLANS: asyncpg keeps the
    # statements it prepared on the connection, which are what is warm.
    _RESET = (
        "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; CLOSE ALL; UNLISTEN *;"
        " SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
    )
    # Per pytest process, kept open on the server: most tests open two (the
    # admissions keep one), a test with a blocker of its own three
    # (storage/test_group_commit.py: 48 new connections with two kept, 9 with
    # three); four runs at once on one server (helpers, CI) must stay well under
    # its max_connections (four each per pytest process with the emptier's: 64).
    _KEPT = 3
    _QUERIES = 10_000  # a connection's statements before it is closed after all

    def __init__(self, dsn: str, loop: asyncio.AbstractEventLoop) -> None:
        self.dsn = dsn
        self.loop = loop
        self.lending = False
        self.idle: list[tuple[str, asyncpg.Connection]] = []
        self.made: weakref.WeakKeyDictionary[asyncpg.Connection, str] = weakref.WeakKeyDictionary()
        self._connect = asyncpg.connection.connect
        self._close = asyncpg.Connection.close

    def _here(self) -> bool:
        try:
            return self.lending and asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    async def connect(self, dsn: Any = None, **kwargs: Any) -> asyncpg.Connection:
        """asyncpg's `connect` as an asyncpg pool calls it."""
        if dsn != self.dsn or not self._here() or kwargs.get("loop") not in (None, self.loop):
            return await self._connect(dsn, **kwargs)
        key = repr(sorted(kwargs.items()))
        for i in reversed(range(len(self.idle))):  # the last kept first
            kept_key, conn = self.idle[i]
            if kept_key == key:
                del self.idle[i]
                if not conn.is_closed():
                    return conn
                break
        conn = await self._connect(dsn, **kwargs)
        self.made[conn] = key
        return conn

    async def close(self, conn: asyncpg.Connection, *, timeout: float | None = None) -> None:
        """`asyncpg.Connection.close`: a connection this made is kept if it is clean."""
        key = self.made.get(conn)
        try:
            if key is not None and await self._keep(conn):
                self.idle.append((key, conn))
                return
        except Exception:
            return  # ended (terminated), as a failed close would have
        self.made.pop(conn, None)
        await self._close(conn, timeout=timeout)

    async def _keep(self, conn: asyncpg.Connection) -> bool:
        if (
            not self._here()
            or len(self.idle) >= self._KEPT
            or conn.is_closed()
            or conn.is_in_transaction()
            or conn._listeners
            or conn._log_listeners
            or conn._termination_listeners
            or conn._query_loggers
            or conn._protocol.queries_count >= self._QUERIES
        ):
            return False
        try:
            await conn.execute(self._RESET, timeout=5)
        except BaseException:
            # As asyncpg's close does when its own last message fails.
            conn.terminate()
            self.made.pop(conn, None)
            raise
        return True

    async def aclose(self) -> None:
        while self.idle:
            _, conn = self.idle.pop()
            self.made.pop(conn, None)
            await self._close(conn)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def _warm_connections(postgres_dsn: str) -> AsyncIterator[_WarmConnections]:
    warm = _WarmConnections(postgres_dsn, asyncio.get_running_loop())
    with pytest.MonkeyPatch.context() as patch:
        # The pool looks asyncpg.connection.connect up when it is made.
        patch.setattr(asyncpg.connection, "connect", warm.connect)
        patch.setattr(asyncpg, "connect", warm.connect)  # a test's own connections
        patch.setattr(asyncpg.Connection, "close", lambda conn, **kw: warm.close(conn, **kw))
        try:
            yield warm
        finally:
            await warm.aclose()


@pytest.fixture(autouse=True)
def _lend_to_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Lends warm connections to a test on ``postgres_dsn`` marked
    ``warm_connections`` (or in a module so marked, unless the test is marked
    ``warm_connections(False)``), before any of its fixtures opens a storage
    (autouse: set up first, torn down last). Nothing is emptied: such a test
    empties what it uses, as before."""
    marker = request.node.get_closest_marker("warm_connections")
    lend = marker is not None and (marker.args or (True,))[0]
    if not lend or "postgres_dsn" not in request.fixturenames:
        yield
        return
    warm: _WarmConnections = request.getfixturevalue("_warm_connections")
    warm.lending = True
    try:
        yield
    finally:
        warm.lending = False


@pytest.fixture
async def own_database(postgres: PostgresServer) -> str:
    """A new database of the test's own, migrated, for a test that changes what
    the run's shared one must keep (a trigger, the functions' record); dropped
    with the run's databases."""
    return await postgres.migrated_database_async()


async def _truncate(dsn: str) -> None:
    """Empty every table but the schema's records and restart the sequences."""
    conn = await asyncpg.connect(dsn)
    try:
        await _empty(conn)
    finally:
        await conn.close()


async def _empty(conn: asyncpg.Connection) -> None:
    """DELETE, not TRUNCATE: on tables this small TRUNCATE costs ~50 ms (new files
    for every table and index), DELETE well under one."""
    tables = [
        r[0]
        for r in await conn.fetch(
            # Kept: the migrations' and the live functions' records. Users go
            # after the tables that name them, teams after users.
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            " AND tablename NOT IN ('schema_migrations', 'schema_function_set')"
            " ORDER BY tablename IN ('users', 'teams'), tablename = 'teams', tablename"
        )
    ]
    sequences = [
        r[0]
        for r in await conn.fetch(
            "SELECT sequencename FROM pg_sequences WHERE schemaname = current_schema()"
        )
    ]
    await conn.execute(
        "".join(f'DELETE FROM "{table}";' for table in tables)
        + "".join(f"SELECT setval('\"{seq}\"', 1, false);" for seq in sequences)
    )


class _Emptier:
    """Empties the run's PostgreSQL database before a test, on one connection kept
    open in a loop of its own (a new connection each time cost more than the
    emptying)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection | None = None

    def empty(self) -> None:
        self.loop.run_until_complete(self._empty())

    async def _empty(self) -> None:
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.dsn)
        await _empty(self.conn)

    def close(self) -> None:
        if self.conn is not None:
            self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@pytest.fixture(scope="session")
def _postgres_emptier(postgres_dsn: str) -> Iterator[_Emptier]:
    emptier = _Emptier(postgres_dsn)
    yield emptier
    emptier.close()


# The tests' SQLite files go to memory (a tmpfs) where there is one with room: on a
# disk, each file's first writes, its checkpoints and its closing wait for fsyncs,
# ~20 ms of a test with a gateway on SQLite that the tests do not test (they stop
# gateways, never the machine). Elsewhere they stay in the test's tmp_path.
_RAM = Path("/dev/shm")
_RAM_ROOM = 1 << 30


def _ram_root() -> Path | None:
    try:
        stat = os.statvfs(_RAM)
    except OSError:
        return None
    if not os.access(_RAM, os.W_OK) or stat.f_bavail * stat.f_frsize < _RAM_ROOM:
        return None
    return _RAM


_RAM_PREFIX = "gateway-tests-"
_RAM_STALE = 6 * 3600  # seconds: a run's directory changes at each test it runs


def _sweep(ram: Path) -> None:
    """Remove what killed runs left in memory: their directories stay until the
    machine restarts. A live run's directory changed a moment ago (each test makes
    and removes one in it), so only those unchanged for hours go."""
    now = time.time()
    for folder in ram.glob(f"{_RAM_PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - folder.stat().st_mtime > _RAM_STALE:
                shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def _sqlite_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This pytest process's directory for SQLite files, removed at its end."""
    ram = _ram_root()
    if ram is None:
        yield tmp_path_factory.mktemp("sqlite")
        return
    _sweep(ram)
    root = Path(tempfile.mkdtemp(prefix=f"{_RAM_PREFIX}{os.getpid()}-", dir=ram))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sqlite_template(_sqlite_root: Path) -> Path:
    """One migrated SQLite database per pytest process, copied for each test that
    wants one: migrating a new file costs about 100 ms of waiting for fsyncs, a copy
    a few."""
    path = _sqlite_root / "template" / "gateway.db"
    path.parent.mkdir()

    async def migrate() -> None:
        storage = await open_storage(DatabaseConfig(url=f"sqlite:///{path}"))
        await storage.migrate()
        await storage.close()

    asyncio.run(migrate())
    # Closed cleanly: everything is in the one file, which is all a copy takes.
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    return path


@contextlib.contextmanager
def _sqlite_copy(request: pytest.FixtureRequest) -> Iterator[str]:
    """A copy of the template in a directory of its own, removed after the test."""
    template: Path = request.getfixturevalue("sqlite_template")
    folder = Path(tempfile.mkdtemp(dir=request.getfixturevalue("_sqlite_root")))
    target = folder / "gateway.db"
    shutil.copyfile(template, target)
    url = f"sqlite:///{target}"
    MIGRATED.add(url)
    try:
        yield url
    finally:
        MIGRATED.discard(url)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sqlite_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated, empty SQLite database of the test's own."""
    with _sqlite_copy(request) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        with _sqlite_copy(request) as url:
            yield url
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    warm: _WarmConnections = request.getfixturevalue("_warm_connections")
    request.getfixturevalue("_postgres_emptier").empty()
    warm.lending = True
    try:
        yield dsn
    finally:
        warm.lending = False


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    """Storage on ``database_url``, migrated already (the process's template or
    database): a migrate() here was a no-op of a few round trips in every test
    (tests/storage/test_contract.py checks that it is one)."""
    store = await open_storage(DatabaseConfig(url=database_url))
    try:
        yield store
    finally:
        await store.close()


def pg_address(dsn: str) -> tuple[str, int]:
    """The host and port of a DSN's server ($GATEWAY_TEST_POSTGRES's), for a
    TCP forwarder to it."""
    server = urllib.parse.urlsplit(dsn)
    return server.hostname or "127.0.0.1", server.port or 5432


@contextlib.asynccontextmanager
async def behind_proxy(dsn: str, proxy: TCPProxy, *, query: str = "") -> AsyncIterator[str]:
    """``dsn``'s database, emptied, reached through ``proxy`` (made with
    `pg_address`): started here, cut at the end. ``query``: the DSN's options."""
    await _truncate(dsn)
    await proxy.start()
    server = urllib.parse.urlsplit(dsn)
    user = f"{server.username}@" if server.username else ""
    try:
        yield urllib.parse.urlunsplit(
            server._replace(netloc=f"{user}127.0.0.1:{proxy.port}", query=query)
        )
    finally:
        await proxy.cut()


@pytest.fixture
async def pg_behind_proxy(postgres_dsn: str) -> AsyncIterator[tuple[str, TCPProxy]]:
    """An emptied PostgreSQL database reached through a TCP forwarder the test can cut."""
    proxy = TCPProxy(*pg_address(postgres_dsn))
    async with behind_proxy(postgres_dsn, proxy) as dsn:
        yield dsn, proxy


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def _chromium() -> AsyncIterator[Any]:
    require_chromium()
    async with chromium() as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="session")
async def browser(_chromium: Any) -> AsyncIterator[Any]:
    """The pytest process's one headless Chromium (a Playwright Browser): starting
    Playwright's driver and Chromium costs a second or two of CPU, a new context a
    few milliseconds. What a test opens in it is closed after the test. The test
    runs in the session's event loop, where the browser lives (tests.browser.IN_BROWSER)."""
    yield _chromium
    for context in _chromium.contexts:
        await context.close()


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Asserts that the pytest process's environment and SIGTERM handler are left
    as they were found (and puts them back if not)."""
    environ, sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    yield
    changed = sorted(
        key
        for key in environ.keys() | os.environ.keys()
        if environ.get(key) != os.environ.get(key) and key != "PYTEST_CURRENT_TEST"
    )
    handler = signal.getsignal(signal.SIGTERM)
    for key in changed:
        if key in environ:
            os.environ[key] = environ[key]
        else:
            del os.environ[key]
    if handler is not sigterm:
        signal.signal(signal.SIGTERM, sigterm)
    assert not changed, f"the test changed the environment: {changed}"
    assert handler is sigterm, f"the test left a SIGTERM handler: {handler}"


@pytest.fixture(autouse=True)
def _process_state_kept() -> Iterator[None]:
    """Every test leaves the process's environment and SIGTERM handler as it found
    them. `gateway serve` run in process set GATEWAY_GC_TUNING for good: every
    gateway app the process started afterwards collected and froze its whole heap
    at start-up (~2 s of a worker's CPU in a run), and its processes inherited the
    first test's GATEWAY_CONFIG."""
    with process_state_kept():
        yield


@pytest.hookimpl(wrapper=True, tryfirst=True)  # around xdist's, which reads the groups
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Iterator[None]:
    """The browser tests are one xdist group (`--dist loadgroup`): one worker runs
    them all, and only it launches Chromium (~2 s of CPU for each launch). After
    xdist's hook, each grouped test's node id names its group (`_name_groups`)."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("browser"))
    yield
    if getattr(config.option, "loadgroup", False):  # an xdist worker, --dist loadgroup
        _name_groups(items)


def _name_groups(items: list[pytest.Item]) -> None:
    """Each test of an xdist group gets its node id ending in ``@<group>``, which is
    all the controller's `--dist loadgroup` scheduling sees of the groups.
    pytest-xdist (3.8) writes it into ``item._nodeid``, which pytest 9.2 no longer
    reads (the node id is ``item._id``, a structured `NodeId`): every test was its
    own group, and each worker imported the SDKs and launched Chromium. Here the
    suffix is set where this pytest keeps the node id, once, and a pytest where
    neither works stops the run rather than silently scattering the groups
    (`tests/test_suite_groups.py`)."""
    for item in items:
        names = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        if not names:
            continue
        nodeid = f"{item.nodeid}@{'_'.join(sorted(names))}"
        if item.nodeid.endswith(nodeid[len(item.nodeid) :]):
            continue  # xdist's own renaming took
        node_id = getattr(item, "_id", None)
        if node_id is not None:
            item._id = type(node_id).parse(nodeid)
        if item.nodeid != nodeid:
            raise pytest.UsageError(
                f"cannot name the xdist group of {item.nodeid} (--dist loadgroup): "
                "this pytest keeps node ids where tests/conftest.py does not look"
            )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """Under pytest-xdist a worker sends each report (with the test's captured log)
    to the controller as UTF-8, which a lone surrogate cannot be: the tests that
    feed the gateway such strings see them logged. Escape them there."""
    report: Any = yield
    if hasattr(item.config, "workerinput"):
        report.sections = [
            (title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
            for title, text in report.sections
        ]
    return report


def pytest_collection_finish(session: pytest.Session) -> None:
    """The garbage collector tuned as `gateway serve` tunes it (`tune_gc`): what is
    alive once the tests are collected (modules, the collected tests) moved out of
    its way, and the youngest generation collected every 7,000 allocations, not
    700. With the defaults, collections took a tenth of the workers' CPU, most of
    it full collections walking that heap (measured with `gc.callbacks`: 5.8 s of
    the three workers' ~59 s in a run, 2.7 s tuned). Cyclic garbage is still collected,
    later: what it warns of when collected (an unclosed socket) still fails a
    test, as pytest's last collection at the end of the process catches what is
    left."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 20, 20)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (pyproject's addopts): the whole suite runs on two workers more
    than there are cores, each with its own PostgreSQL database; a run of chosen
    files or tests stays in this process, without the workers' start-up (and
    with a working debugger).

    Two more than the cores: with a worker per core, the cores stood idle for
    about a third of a run, while tests waited on timers, sockets and the
    processes they start; the extra workers fill that (two: a few seconds
    faster than one on two cores, docs/testing.md)."""
    whole = {config.rootpath, config.rootpath / "tests"}
    if all(Path(arg.split("::")[0]).resolve() in whole for arg in config.args):
        return len(os.sched_getaffinity(0)) + 2
    return 0
