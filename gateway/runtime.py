"""The running gateway: its lifecycle, and the wiring of its parts.

One `Gateway` per process, started and stopped by the app's lifespan. `start`
opens the database and builds every part with the collaborators it uses (one
`Running`); what a configuration reload changes is one frozen `Snapshot`
(gateway/snapshot.py) that `reload` swaps whole. Nothing is created per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import types
from collections.abc import Callable, Coroutine, Mapping
from datetime import date
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from gateway.accounts import Accounts
from gateway.admission import Admitter
from gateway.alerts import OutboxWorker
from gateway.clock import Clock, SystemClock
from gateway.config import Config, UpstreamConfig, load_config
from gateway.currency import Money
from gateway.errors import ConfigError, GatewayError, StorageError
from gateway.metrics import Metrics
from gateway.probes import Probes
from gateway.proxy import Proxy
from gateway.recovery import Recovery
from gateway.reports import Reports
from gateway.routing import RouteGuard
from gateway.services import Services
from gateway.settle import Settler
from gateway.skew import ClockWatch
from gateway.snapshot import Current, Snapshot, build_snapshot, recover_after
from gateway.storage import Storage, open_storage
from gateway.tasks import Tasks
from gateway.tls import client_context
from gateway.upstream_client import UpstreamClient
from gateway.upstreams import Upstream

log = logging.getLogger("gateway")

# How long shutdown waits for answers still being recorded (after the server's
# own grace, server.shutdown_grace, for answers still streaming).
SHUTDOWN_GRACE = 10.0
# How long a crashed background job waits before it is started again.
RESTART_DELAY = 1.0


class _NoCookies(httpx.Cookies):
    """A cookie store that keeps nothing, without reading every response to find out.

    httpx reads each response's Set-Cookie headers into its client's jar (through
    urllib's cookie machinery: a few percent of a streamed answer's CPU); the
    shared client's jar refuses every cookie anyway, so the reading is skipped.
    """

    def __init__(self) -> None:
        super().__init__(CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])))

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class SharedClient(httpx.AsyncClient):
    """The process's upstream client. It is shared by all users: a cookie an
    upstream sets for one user's request must never ride along on another's, so it
    keeps no cookies. Cookies pass through as headers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise AttributeError("the shared upstream client keeps no cookies")


def make_client(
    up: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The client of one upstream, with that upstream's limits and timeouts (one
    per upstream: each has its own connection pool and transport settings)."""
    limits = httpx.Limits(
        max_connections=up.max_connections,
        max_keepalive_connections=up.max_keepalive_connections,
        keepalive_expiry=up.keepalive_expiry,
    )
    # read: the longest wait for the next chunk; the whole answer is bounded by
    # upstream.total_timeout in the proxy.
    timeout = httpx.Timeout(
        connect=up.connect_timeout,
        read=up.read_timeout,
        write=up.read_timeout,
        pool=up.connect_timeout,
    )
    if transport is None and up.transport == "aiohttp":
        # Measured (docs/performance.md): aiohttp's transport streams
        # several times faster than httpx's own under concurrency.
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                limit=up.max_connections, keepalive_timeout=up.keepalive_expiry
            )
            # No cookie jar: this one client serves every user.
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        transport = AiohttpTransport(verify=client_context(), limits=limits, client=session)
    return SharedClient(
        verify=client_context(),
        transport=transport,
        limits=limits,
        timeout=timeout,
        follow_redirects=False,
    )


class InFlight:
    """Proxied requests under way: shutdown waits for them to record what they read."""

    __slots__ = ("_drained", "_probes", "count")

    def __init__(self, probes: Probes) -> None:
        self.count = 0
        self._drained = asyncio.Event()
        self._probes = probes

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        """A request is completely finished: its answer settled or refunded."""
        self.count -= 1
        if not self.count:
            self._drained.set()
        self._probes.request_finished()

    async def drained(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until no request is under way."""
        self._drained.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.count:
                    await self._drained.wait()


@dataclasses.dataclass(frozen=True, slots=True)
class Running:
    """The started gateway: everything that needs the open database, built whole
    by `Gateway.start` and wired with what each part uses."""

    storage: Storage
    current: Current  # the configuration snapshot in force (gateway/snapshot.py)
    settler: Settler
    clients: Mapping[str, UpstreamClient]  # one per named upstream (issue 23)
    proxy: Proxy
    reports: Reports
    accounts: Accounts
    recovery: Recovery
    clock_watch: ClockWatch  # this clock against the database's (gateway/skew.py)
    outbox: OutboxWorker
    services: Services  # what the gateway's own endpoints use
    money: Money  # the one currency the database keeps money in (gateway/currency.py)


class Gateway:
    """The process's lifecycle: start (open, migrate, replay, recover, wire),
    configuration reloads, background jobs, and stop.

    Before `start` only the configuration, clock, metrics and probes exist; the
    started state is one `Running` (``gateway.running``). The properties below
    are views of it for tools and tests; the parts themselves are handed what
    they use when they are built.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        storage: Storage | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        env: Mapping[str, str] | None = None,
        probes: Probes | None = None,
    ) -> None:
        self._config = config  # as started; a reload changes the snapshot's
        self.clock: Clock = clock or SystemClock()
        self.metrics = Metrics()
        self.probes = probes if probes is not None else Probes()
        # A pending answer older than the longest an answer can take has lost its
        # gateway (docs/quotas.md, "Crash safety").
        self.recover_after = recover_after(config)
        self._storage = storage
        self._owns_storage = storage is None
        self._transport = transport
        self._env = env
        self.in_flight = InFlight(self.probes)
        self._tasks = Tasks("background")  # cancelled at shutdown
        self._keep = Tasks("kept")  # finished at shutdown (recording usage)
        self._running: Running | None = None
        self._sighup = False

    # --- views of the running gateway (tools, tests) ---------------------------------

    @property
    def running(self) -> Running:
        if self._running is None:
            raise RuntimeError("the gateway is not started")
        return self._running

    @property
    def snapshot(self) -> Snapshot:
        """The configuration snapshot in force."""
        return self.running.current.snapshot

    @property
    def config(self) -> Config:
        """The configuration in force (before start: the one given)."""
        if self._running is None:
            return self._config
        return self._running.current.snapshot.config

    @property
    def storage(self) -> Storage:
        return self.running.storage

    @property
    def settler(self) -> Settler:
        return self.running.settler

    @property
    def reports(self) -> Reports:
        return self.running.reports

    @property
    def accounts(self) -> Accounts:
        return self.running.accounts

    @property
    def currency(self) -> str:
        """The currency money is recorded and shown in."""
        return self.running.money.code

    @property
    def upstream(self) -> Upstream:
        return self.snapshot.upstream

    @property
    def tz(self) -> ZoneInfo:
        return self.snapshot.tz

    def today(self) -> date:
        """The local calendar day now, in the configured time zone."""
        return self.snapshot.today(self.clock.now())

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        config = self._config
        for name, up in config.upstreams.items():
            if not up.api_key:
                log.warning(
                    "no API key for upstream %s: set %s%s; it will refuse requests",
                    name,
                    up.api_key_env,
                    " (or GATEWAY_UPSTREAM_API_KEY)" if name == "default" else "",
                )
        if self._storage is None:
            self._storage = await open_storage(config.database)
        storage = self._storage
        await storage.migrate()
        # Before anything is replayed, recovered or admitted by this clock: one too
        # far from the database's (the other replicas') stops the start here.
        clock_watch = ClockWatch(
            storage,
            clock=self.clock,
            metrics=self.metrics,
            bound=config.database.max_clock_offset,
        )
        await clock_watch.at_start()
        money = Money(config, await storage.costs_by_currency())
        current = Current(build_snapshot(config, storage))
        spool = Path(config.database.spool_file) if config.database.spool_file else None
        settler = Settler(
            storage,
            metrics=self.metrics,
            spool=spool,
            terms=lambda: current.snapshot.terms,
            on_cost=money.cost_recorded,
            answer_log=config.server.answer_log,
        )
        # Before the recovery: a spooled record settles its own pending answer
        # first, and a spooled refund gives its back (review-once F2).
        ready = await settler.replay_before_recovery()
        if settler.replayed:
            log.info("replayed %d spooled usage records", settler.replayed)
        recovery = Recovery(
            storage, clock=self.clock, metrics=self.metrics, after=self.recover_after
        )
        try:
            if ready:
                await recovery.run_once()
            else:
                log.warning("recovery at start-up left for later: a refund waits in the spool")
        except StorageError as exc:
            log.warning("could not recover pending answers at start-up: %s", exc.message)
        clients = {
            name: UpstreamClient(make_client(up, self._transport))
            for name, up in config.upstreams.items()
        }
        outbox = OutboxWorker(
            storage,
            lambda: current.snapshot.config.alerts,
            self.clock,
            on_attempt=self._alert_attempted,
        )
        reports = Reports(storage, clock=self.clock, current=current, currency=lambda: money.code)
        accounts = Accounts(
            storage, config=lambda: current.snapshot.config, caches=_Caches(current)
        )
        self._running = Running(
            storage=storage,
            current=current,
            settler=settler,
            clients=clients,
            proxy=Proxy(
                current,
                storage=storage,
                settler=settler,
                clients=clients,
                admitter=Admitter(storage, settler, clock=self.clock, metrics=self.metrics),
                guard=RouteGuard(storage, metrics=self.metrics),
                clock=self.clock,
                metrics=self.metrics,
                in_flight=self.in_flight,
                spawn=self.spawn,
                keep=self.keep,
                probes=self.probes,
            ),
            reports=reports,
            accounts=accounts,
            recovery=recovery,
            clock_watch=clock_watch,
            outbox=outbox,
            services=Services(
                current=current,
                storage=storage,
                reports=reports,
                accounts=accounts,
                clock=self.clock,
                metrics=self.metrics,
                money=money,
            ),
            money=money,
        )
        if (replay_interval := config.database.replay_interval) > 0:
            # What is spooled from now on is replayed when the database answers again.
            self.spawn(
                self.supervise(
                    "spool replay", lambda: settler.run_replays(interval=replay_interval)
                )
            )
        if config.database.recover_interval > 0:
            self.spawn(self._recover_every(config.database.recover_interval))
        self.spawn(self.supervise("alert delivery", outbox.run))
        source, interval = config.source, config.server.reload_interval
        if source is not None and interval > 0:
            self.spawn(self._watch(source, interval))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # Only possible in the main thread of a Unix process.
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: self.spawn(self.reload())
            )
            self._sighup = True

    # --- configuration reload -------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the configuration file; an invalid one is refused and logged,
        and the running configuration stays in force. Requests under way keep the
        snapshot they began with; the next ones get the new one."""
        current = self.running.current
        running = current.snapshot.config
        source = running.source
        if source is None:
            log.warning("configuration reload asked, but no configuration file is in use")
            return False
        try:
            # A small local file, read like load_config reads it.
            if not Path(source).read_bytes().strip():  # noqa: ASYNC240
                # An emptied file (or one caught mid-write) would mean built-in
                # defaults: unlimited plans. Never what an operator wants.
                raise ConfigError(f"{source}: the configuration file is empty")
            new = load_config(source, env=self._env)
            code = await self.running.money.after_reload(self.running.storage, new)
        except (ConfigError, OSError, StorageError) as exc:
            message = exc.message if isinstance(exc, GatewayError) else f"{source}: {exc}"
            log.error(
                "configuration reload refused, keeping the running configuration: %s", message
            )
            self._reload_tried("refused")
            return False
        # Connections and sockets are set up once: these sections need a restart.
        # The upstreams' models and fallbacks (routing, not connections) and
        # headers (sent per request) follow a reload that changes nothing else
        # of the upstreams (issue 23).
        rerouted = _connections(new) == _connections(running)
        fixed = [
            name
            for name in ("server", "upstream", "database")
            if (
                not rerouted if name == "upstream" else getattr(new, name) != getattr(running, name)
            )
        ]
        if fixed:
            log.warning(
                "configuration sections %s changed; they take effect after a restart",
                ", ".join(fixed),
            )
        try:
            # Built whole before it is swapped in: a failure leaves the running
            # snapshot as it was.
            snapshot = build_snapshot(
                dataclasses.replace(
                    new,
                    server=running.server,
                    upstream=new.upstream if rerouted else running.upstream,
                    upstreams=new.upstreams if rerouted else running.upstreams,
                    database=running.database,
                ),
                self.running.storage,
                previous=current.snapshot,
            )
        except Exception:
            log.exception("configuration reload refused, keeping the running configuration")
            self._reload_tried("refused")
            return False
        current.install(snapshot)
        self.running.money.reloaded(code, new)
        log.info("configuration reloaded from %s (plans: %s)", source, ", ".join(new.plans))
        self._reload_tried("applied")
        return True

    def _reload_tried(self, result: str) -> None:
        self.metrics.inc("gateway_config_reloads_total", result=result)
        self.probes.reload_tried()

    async def _watch(self, path: str, interval: float) -> None:
        def stamp() -> tuple[int, int] | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_mtime_ns, st.st_size

        # Reload only once a change has held still for one interval, so an editor
        # still writing the file is not caught half-way.
        loaded = seen = stamp()
        while True:
            await asyncio.sleep(interval)
            current = stamp()
            if current is None or current == loaded:
                seen = current
                continue
            if current != seen:
                seen = current
                continue
            loaded = current
            try:
                await self.reload()
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("configuration reload failed")

    async def _recover_every(self, interval: float) -> None:
        """Recover lost answers every ``interval`` seconds (docs/quotas.md, "Crash
        safety"); a database failure waits for the next pass. Each pass first
        measures this clock against the database's (gateway/skew.py): one query
        per pass, no job of its own."""
        running = self.running
        while True:
            await asyncio.sleep(interval)
            try:
                await running.clock_watch.check()
            except Exception:  # the recovery loop must outlive a failed measure
                log.exception("measuring the clock against the database's failed")
            # As at start-up: a spooled record settles its own pending answer,
            # and a spooled refund gives its back, before a recovery could charge
            # that answer the estimate - also what another worker spooled.
            try:
                ready = await running.settler.replay_before_recovery()
            except Exception:  # the recovery loop must outlive a failed replay
                log.exception("spool replay before recovery failed")
                ready = False
            if not ready:
                log.warning("recovery pass skipped: a refund waits (spooled, or retried)")
                self.probes.recovery_done()
                continue
            try:
                await running.recovery.run_once()
            except StorageError as exc:
                self.metrics.inc("gateway_storage_errors_total", operation="recover")
                log.warning("could not recover pending answers (will retry): %s", exc.message)
            self.probes.recovery_done()

    def _alert_attempted(self, channel: str, result: str) -> None:
        self.metrics.inc("gateway_alert_deliveries_total", channel=channel, result=result)
        self.probes.alert_attempted()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background job; it is cancelled at shutdown, and logged if it
        ends with an error (nothing else would ever see it)."""
        return self._tasks.start(coro)

    async def supervise(
        self,
        name: str,
        job: Callable[[], Coroutine[Any, Any, None]],
        *,
        restart_delay: float = RESTART_DELAY,
    ) -> None:
        """Run ``job`` until it returns; a crash is logged and the job started
        again (after ``restart_delay`` seconds, so a job that fails at once does
        not spin)."""
        while True:
            try:
                await job()
                return
            except Exception:
                log.exception("background job %s failed; restarting it", name)
            await asyncio.sleep(restart_delay)

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until the work that must finish (recording, stopping answers) is done."""
        if not await self._keep.wait(timeout):
            raise TimeoutError(f"kept tasks still running after {timeout:g} s")

    def keep(self, coro: Any) -> asyncio.Task[Any]:
        """Run work that must finish (recording usage); shutdown waits for it."""
        return self._keep.start(coro, awaited=True)  # its callers await it, shielded

    async def stop(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.in_flight.count:
            # Answers the server cut at the end of its grace (server.shutdown_grace)
            # were cancelled; let them record what they read before closing up.
            await self.in_flight.drained(SHUTDOWN_GRACE)
        # Answers being recorded finish first (bounded: a dead database sends
        # their records to the spool in settler.close below).
        await self._keep.wait(SHUTDOWN_GRACE)
        # Then the background jobs are cancelled; a follow of a resumed run settles
        # what it read as it unwinds (gateway/follow.py).
        await self._tasks.cancel(SHUTDOWN_GRACE)
        running = self.running
        await running.settler.close()
        for client in running.clients.values():
            await client.aclose()
        self.metrics.close()
        if self._owns_storage:
            await running.storage.close()


def _connections(config: Config) -> list[tuple[str, UpstreamConfig]]:
    """The upstreams without their routing (``models``, ``fallbacks``) and the
    operator's headers (``headers``, ``headers_env`` and the values read for
    it): what a reload cannot change."""
    none: Mapping[str, str] = types.MappingProxyType({})
    return [
        (
            name,
            dataclasses.replace(
                up,
                models=(),
                fallbacks=(),
                headers=none,
                headers_env=none,
                header_secrets=none,
            ),
        )
        for name, up in config.upstreams.items()
    ]


class _Caches:
    """The caches of the snapshot in force, as the admin operations invalidate them
    (gateway/accounts.py)."""

    __slots__ = ("_current",)

    def __init__(self, current: Current) -> None:
        self._current = current

    def forget_user(self, user_id: str) -> None:
        self._current.snapshot.users.forget(user_id)

    def forget_key(self, key_id: str) -> None:
        self._current.snapshot.auth.forget_key(key_id)

    def forget_team(self, team_id: str) -> None:
        self._current.snapshot.teams.forget(team_id)
