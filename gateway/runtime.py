"""The running gateway: configuration, storage, upstream client and caches.

One `Gateway` per process, started and stopped by the app's lifespan. The
request path reads everything it needs from here; nothing is created per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, date, datetime, timedelta
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from gateway.accounts import issue_key, parse_override
from gateway.alerts import OutboxWorker
from gateway.auth import Authenticator, UserDirectory
from gateway.clock import Clock, SystemClock
from gateway.config import Config, load_config
from gateway.errors import BadRequest, ConfigError, StorageError
from gateway.messages import Catalogue
from gateway.metrics import Metrics
from gateway.pricing import PriceTable
from gateway.recovery import Recovery
from gateway.reports import Reports
from gateway.settle import Settler
from gateway.storage import ApiKey, OverrideValue, Storage, open_storage
from gateway.tasks import Tasks
from gateway.upstreams import Upstream, get_upstream

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
    config: Config, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The process's one upstream client, with explicit limits and timeouts."""
    up = config.upstream
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

        transport = AiohttpTransport(limits=limits, client=session)
    return SharedClient(transport=transport, limits=limits, timeout=timeout, follow_redirects=False)


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        storage: Storage | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.metrics = Metrics()
        self.upstream: Upstream = get_upstream(config.upstream.kind, config)
        self.messages = _catalogue(config)  # refusal messages (issue 25)
        self.upstream_url = config.upstream.url
        self.user_header = config.auth.trusted_header.user_header.lower().encode()
        up = config.upstream
        self.blocking_timeout = httpx.Timeout(
            connect=up.connect_timeout,
            read=up.total_timeout,
            write=up.read_timeout,
            pool=up.connect_timeout,
        )
        # A stream lease outlives the longest an answer can take, so a crashed
        # gateway's leases free themselves.
        longest = config.upstream.total_timeout + config.upstream.disconnect_grace
        self.lease_ttl = timedelta(seconds=longest + 60)
        # A pending answer older than the longest an answer can take has lost its
        # gateway (docs/quotas.md, "Crash safety").
        recover_after = config.database.recover_after or longest + 60
        if recover_after < longest:
            log.warning(
                "database.recover_after (%s s) is shorter than the longest an answer can take; using %s s",
                recover_after,
                longest,
            )
            recover_after = longest
        self.recover_after = timedelta(seconds=recover_after)
        self.upstream_authorization = (
            b"authorization",
            f"Bearer {config.upstream.api_key}".encode(),
        )
        self._storage = storage
        self._owns_storage = storage is None
        self._transport = transport
        self._env = env
        # Requests the proxy has completely finished (answer settled or refunded)
        # and configuration reloads: lets tests and tools wait without sleeping.
        self.finished = Watermark()
        self.reloads = Watermark()
        self.recoveries = Watermark()  # periodic recovery passes done
        # Proxied requests under way: shutdown waits for them to record what they read.
        self.in_flight = 0
        self._drained = asyncio.Event()
        self.outbox_attempts = Watermark()  # alert deliveries tried
        self._tasks = Tasks("background")  # cancelled at shutdown
        self._keep = Tasks("kept")  # finished at shutdown (recording usage)

    @property
    def tz(self) -> ZoneInfo:
        return self._tz

    def today(self) -> date:
        """The local calendar day now, in the configured time zone."""
        return self.clock.now().astimezone(self._tz).date()

    async def start(self) -> None:
        if not self.config.upstream.api_key:
            log.warning(
                "no upstream API key: set %s (or GATEWAY_UPSTREAM_API_KEY); the upstream will refuse requests",
                self.config.upstream.api_key_env,
            )
        self._tz = self.config.tz
        if self._storage is None:
            self._storage = await open_storage(self.config.database)
        self.storage: Storage = self._storage
        await self.storage.migrate()
        self._apply(self.config)
        self.reports = Reports(self)
        spool = Path(self.config.database.spool_file) if self.config.database.spool_file else None
        self.settler = Settler(
            self.storage,
            metrics=self.metrics,
            spool=spool,
            max_tokens_per_answer=self.config.accounting.max_tokens_per_answer,
            prices=self._prices,
            answer_log=self.config.server.answer_log,
        )
        replayed = await self.settler.replay()
        if replayed:
            log.info("replayed %d spooled usage records", replayed)
        if (replay_interval := self.config.database.replay_interval) > 0:
            # What is spooled from now on is replayed when the database answers again.
            self.spawn(
                self.supervise(
                    "spool replay", lambda: self.settler.run_replays(interval=replay_interval)
                )
            )
        # After the replay: a spooled record settles its own pending answer first.
        self.recovery = Recovery(
            self.storage, clock=self.clock, metrics=self.metrics, after=self.recover_after
        )
        try:
            await self.recovery.run_once()
        except StorageError as exc:
            log.warning("could not recover pending answers at start-up: %s", exc.message)
        if self.config.database.recover_interval > 0:
            self.spawn(self._recover_every(self.config.database.recover_interval))
        self.client = make_client(self.config, self._transport)
        self.outbox = OutboxWorker(
            self.storage,
            lambda: self.config.alerts,
            self.clock,
            on_attempt=self._alert_attempted,
        )
        self.spawn(self.supervise("alert delivery", self.outbox.run))
        source, interval = self.config.source, self.config.server.reload_interval
        if source is not None and interval > 0:
            self.spawn(self._watch(source, interval))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # Only possible in the main thread of a Unix process.
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: self.spawn(self.reload())
            )
            self._sighup = True

    async def identify(self, authorization: bytes | None, user_header: bytes | None) -> str:
        """The end user behind a request's credential (created on first use, or
        refused, in the modes that can name users the gateway has not seen)."""
        config = self.config
        identity = await self.auth.authenticate(authorization, user_header)
        if config.auth.mode != "api_key":
            await self.users.resolve(
                identity,
                default_plan=config.accounting.default_plan,
                create=config.auth.unknown_users == "create",
            )
        return identity.user_id

    def request_started(self) -> None:
        self.in_flight += 1

    async def request_finished(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._drained.set()
        self.finished.bump()

    async def wait_finished(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` proxied requests have completely finished."""
        await self.finished.wait_for(count, timeout)

    # --- configuration reload -------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the configuration file; an invalid one is refused and logged,
        and the running configuration stays in force."""
        source = self.config.source
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
        except (ConfigError, OSError) as exc:
            message = exc.message if isinstance(exc, ConfigError) else f"{source}: {exc}"
            log.error(
                "configuration reload refused, keeping the running configuration: %s", message
            )
            self.metrics.inc("gateway_config_reloads_total", result="refused")
            self.reloads.bump()
            return False
        # Connections and sockets are set up once: these sections need a restart.
        fixed = [
            name
            for name in ("server", "upstream", "database")
            if getattr(new, name) != getattr(self.config, name)
        ]
        if fixed:
            log.warning(
                "configuration sections %s changed; they take effect after a restart",
                ", ".join(fixed),
            )
        try:
            self._apply(
                dataclasses.replace(
                    new,
                    server=self.config.server,
                    upstream=self.config.upstream,
                    database=self.config.database,
                )
            )
        except Exception:
            log.exception("configuration reload refused, keeping the running configuration")
            self.metrics.inc("gateway_config_reloads_total", result="refused")
            self.reloads.bump()
            return False
        log.info("configuration reloaded from %s (plans: %s)", source, ", ".join(new.plans))
        self.metrics.inc("gateway_config_reloads_total", result="applied")
        self.reloads.bump()
        return True

    def _apply(self, config: Config) -> None:
        """Make ``config`` the one in force; caches derived from it start afresh
        (the key and user caches, which hold database rows, are kept).

        Everything is built before anything is swapped in, so a failure leaves the
        running configuration whole.
        """
        # The key and user caches outlive a reload (gateway/auth.py): what they hold
        # is in the database, which a reload does not change.
        auth = Authenticator(
            self.storage, config.auth, plans=config.plans, previous=getattr(self, "auth", None)
        )
        users = UserDirectory(
            self.storage, ttl=config.auth.key_cache_ttl, previous=getattr(self, "users", None)
        )
        tz = config.tz
        # Rebuilt so that a dialect's own settings (prices) follow a reload.
        upstream = get_upstream(config.upstream.kind, config)
        prices = PriceTable(config.prices)  # the settler's metrics labels (see Settler)
        messages = _catalogue(config)
        self.config, self._tz, self.auth, self.users = config, tz, auth, users
        self.messages = messages
        self.upstream, self._prices = upstream, prices
        self.user_header = config.auth.trusted_header.user_header.lower().encode()
        if hasattr(self, "settler"):  # a reload: the settler exists from the start
            self.settler.max_tokens_per_answer = config.accounting.max_tokens_per_answer
            self.settler.prices = prices

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
        safety"); a database failure waits for the next pass."""
        while True:
            await asyncio.sleep(interval)
            if self.settler.backlog:
                # As at start-up: a spooled record settles its own pending answer
                # before a recovery could charge that answer the estimate.
                try:
                    await self.settler.replay()
                except Exception:  # the recovery loop must outlive a failed replay
                    log.exception("spool replay before recovery failed")
            try:
                await self.recovery.run_once()
            except StorageError as exc:
                self.metrics.inc("gateway_storage_errors_total", operation="recover")
                log.warning("could not recover pending answers (will retry): %s", exc.message)
            self.recoveries.bump()

    def _alert_attempted(self, channel: str, result: str) -> None:
        self.metrics.inc("gateway_alert_deliveries_total", channel=channel, result=result)
        self.outbox_attempts.bump()

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

    # --- admin operations: storage changes plus the cache invalidations they need ---

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key; it stops working in this process at once."""
        key = await self.storage.revoke_key(key_id, now=datetime.now(UTC))
        self.auth.forget_key(key_id)
        return key

    async def create_key(self, user_id: str, *, name: str = "") -> tuple[ApiKey, str]:
        """A new key for an existing user; returns the record and the secret (shown once)."""
        return await issue_key(self.storage, user_id, name=name, now=datetime.now(UTC))

    async def set_plan(self, user_id: str, plan: str) -> None:
        if plan not in self.config.plans:
            raise BadRequest(
                f"No plan named {plan!r} (plans: {', '.join(sorted(self.config.plans))})."
            )
        await self.storage.set_plan(user_id, plan)
        self.users.forget(user_id)

    async def set_override(self, user_id: str, name: str, value: object) -> OverrideValue:
        """Override one limit for a user (``value`` as JSON gives it); returns the
        value stored."""
        parsed = parse_override(name, value)
        await self.storage.set_override(user_id, name, parsed)
        self.users.forget(user_id)
        return parsed

    async def clear_override(self, user_id: str, name: str) -> None:
        await self.storage.clear_override(user_id, name)
        self.users.forget(user_id)

    async def stop(self) -> None:
        if getattr(self, "_sighup", False):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.in_flight:
            # Answers the server cut at the end of its grace (server.shutdown_grace)
            # were cancelled; let them record what they read before closing up.
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    while self.in_flight:
                        await self._drained.wait()
        # Answers being recorded finish first (bounded: a dead database sends
        # their records to the spool in settler.close below).
        await self._keep.wait(SHUTDOWN_GRACE)
        # Then the background jobs are cancelled; a follow of a resumed run settles
        # what it read as it unwinds (gateway/follow.py).
        await self._tasks.cancel(SHUTDOWN_GRACE)
        await self.settler.close()
        await self.client.aclose()
        self.metrics.close()
        if self._owns_storage:
            await self.storage.close()


def _catalogue(config: Config) -> Catalogue:
    """The refusal messages in force, resolved once per configuration load."""
    return Catalogue(config.messages.default_language, config.messages.templates)


class Watermark:
    """A counter that can be awaited until it reaches a value."""

    def __init__(self) -> None:
        self.value = 0
        self._waiters: set[asyncio.Event] = set()

    def bump(self) -> None:
        self.value += 1
        for waiter in self._waiters:
            waiter.set()

    async def wait_for(self, value: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.value < value:
                waiter = asyncio.Event()
                self._waiters.add(waiter)
                try:
                    await waiter.wait()
                finally:
                    self._waiters.discard(waiter)
