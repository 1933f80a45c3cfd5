"""The running gateway: configuration, storage, upstream client and caches.

One `Gateway` per process, started and stopped by the app's lifespan. The
request path reads everything it needs from here; nothing is created per request.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx

from gateway.auth import Authenticator, UserDirectory
from gateway.clock import Clock, SystemClock
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.settle import Settler
from gateway.storage import Storage, open_storage
from gateway.upstreams import Upstream, get_upstream

log = logging.getLogger("gateway")


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
        # Measured (issue 3, docs/performance.md): aiohttp's transport streams
        # several times faster than httpx's own under concurrency.
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(
        transport=transport, limits=limits, timeout=timeout, follow_redirects=False
    )


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        storage: Storage | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.metrics = Metrics()
        self.upstream: Upstream = get_upstream(config.upstream.kind)
        self.upstream_url = config.upstream.url
        self.upstream_authorization = (
            b"authorization",
            f"Bearer {config.upstream.api_key}".encode(),
        )
        self._storage = storage
        self._owns_storage = storage is None
        self._transport = transport
        # Requests the proxy has completely finished (answer settled or refunded):
        # lets tests and tools wait for the end of work without sleeping.
        self.finished = 0
        self._finished_changed: asyncio.Condition | None = None

    @property
    def tz(self) -> ZoneInfo:
        return self._tz

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
        ttl = self.config.auth.key_cache_ttl
        self.auth = Authenticator(self.storage, self.config.auth)
        self.users = UserDirectory(self.storage, ttl=ttl)
        spool = Path(self.config.database.spool_file) if self.config.database.spool_file else None
        self.settler = Settler(self.storage, metrics=self.metrics, spool=spool)
        replayed = await self.settler.replay()
        if replayed:
            log.info("replayed %d spooled usage records", replayed)
        self.client = make_client(self.config, self._transport)

    async def request_finished(self) -> None:
        self.finished += 1
        if self._finished_changed is not None:
            async with self._finished_changed:
                self._finished_changed.notify_all()

    async def wait_finished(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` proxied requests have completely finished."""
        if self._finished_changed is None:
            self._finished_changed = asyncio.Condition()
        async with asyncio.timeout(timeout), self._finished_changed:
            await self._finished_changed.wait_for(lambda: self.finished >= count)

    async def revoke_key(self, key_id: str) -> None:
        """Revoke a key; it stops working in this process at once."""
        await self.storage.revoke_key(key_id, now=datetime.now(UTC))
        self.auth.forget_key(key_id)

    async def stop(self) -> None:
        await self.settler.close()
        await self.client.aclose()
        if self._owns_storage:
            await self.storage.close()
