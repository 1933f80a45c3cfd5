"""The ASGI application: routes, lifespan, and the dispatch to the proxy.

Every HTTP request first passes the request limits (header size and count, the
body deadline: gateway/request_limits/checks.py); then requests under a mount (/v1, or a named
upstream's /NAME/v1: gateway/mounts.py) go straight to the proxy (a plain ASGI
callable, no router or middleware in between) and the gateway's own endpoints
to a small Starlette app. No mount may shadow those (refused at load; the
reserved paths are `gateway.mounts.RESERVED_TOP` and ``OWN_UNDER_V1``, checked
against the routes below by tests/test_mounts.py).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.resources
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from gateway import dashboard
from gateway.admin import admin_routes, error_response, services, token_refusal
from gateway.clock import Clock
from gateway.config import Config, load_config
from gateway.cors import Cors, covered
from gateway.errors import STORAGE_UNAVAILABLE, NotFound, StorageError
from gateway.logs import configure_logging
from gateway.mounts import OWN_UNDER_V1
from gateway.probes import Probes
from gateway.proxy import Proxy
from gateway.request_limits.checks import BodyDeadline, header_refusal, send_refusal
from gateway.runtime import Gateway, Running
from gateway.storage import Storage
from gateway.types import Receive, Scope, Send
from gateway.usage_api import usage_routes

log = logging.getLogger("gateway")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await services(request).storage.ping()
    except StorageError as exc:
        # No credential reaches /readyz: the driver's words (the database's address,
        # user or name) go to the log, not to whoever asks.
        log.warning("not ready: %s", exc.message)
        return JSONResponse(
            {"status": "unavailable", "reason": STORAGE_UNAVAILABLE}, status_code=503
        )
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus text, behind the metrics or admin token unless metrics.public
    (docs/metrics.md, "Access"): the totals say what every plan and model cost."""
    gateway = services(request)
    config = gateway.config
    if not config.metrics.public:
        secrets = (config.metrics.token, config.admin.token)
        if not any(secrets):
            off = NotFound(
                "/metrics is off: set a metrics token (metrics.token_env) or an admin "
                "token, or metrics.public = true."
            )
            return error_response(gateway, off, realm="metrics")
        refusal = token_refusal(
            request,
            gateway,
            secrets,
            realm="metrics",
            message="A valid metrics or admin token is required.",
        )
        if refusal is not None:
            return refusal
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# The usage widget (docs/widget.md), read once: a release changes it, nothing else.
_WIDGET = (importlib.resources.files("gateway") / "static" / "widget.js").read_bytes()
_WIDGET_HEADERS = {
    # Pages load it by a fixed URL, so it is not immutable: an hour, then revalidated.
    "cache-control": "public, max-age=3600",
    "etag": f'"{hashlib.sha256(_WIDGET).hexdigest()[:16]}"',
    "x-content-type-options": "nosniff",
    # Loadable by pages that require it of cross-origin resources (COEP).
    "cross-origin-resource-policy": "cross-origin",
}


async def widget(request: Request) -> Response:
    """The <gateway-usage> web component; CORS headers come from [cors] (gateway/cors.py)."""
    etag = _WIDGET_HEADERS["etag"]
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=_WIDGET_HEADERS)
    return Response(_WIDGET, media_type="text/javascript; charset=utf-8", headers=_WIDGET_HEADERS)


# Set by `gateway serve`: the process is a server and nothing else, so it may
# tune the garbage collector for itself (not done for apps embedded in tests or tools).
GC_TUNING_ENV = "GATEWAY_GC_TUNING"


def tune_gc() -> None:
    """Fewer, cheaper collections for a long-running server.

    The objects alive after start-up (modules, configuration, caches) are moved
    out of the collector's way, and the youngest generation is collected less
    often: per-request garbage is mostly freed by reference counting anyway.
    Measured: collection time under load went from 7.3% to 3.5% of samples
    (docs/performance.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 20, 20)


class GatewayApp:
    """Dispatches every request: the mounts to the proxy, the rest to a Starlette site.

    Until the lifespan has started the gateway, everything goes to the site (which
    runs the lifespan); then `_serve` is wired to the started parts.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.handler: Callable[[Scope, Receive, Send], Awaitable[None]]

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await gateway.start()
            app.state.services = gateway.running.services
            self.handler = self._serve(gateway.running)
            if os.environ.get(GC_TUNING_ENV):
                tune_gc()
            try:
                yield
            finally:
                await gateway.stop()

        self.site = Starlette(
            routes=[
                Route("/healthz", healthz),
                Route("/readyz", readyz),
                Route("/metrics", metrics),
                Route("/widget.js", widget, methods=["GET"]),
                *usage_routes,
                Mount("/admin", routes=admin_routes),
                Mount("/dashboard", routes=dashboard.routes),
            ],
            lifespan=lifespan,
        )
        self.handler = self.site

    @property
    def proxy(self) -> Proxy:
        return self.gateway.running.proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)

    def _serve(self, running: Running) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        """The handler of the started gateway: request limits, then the proxy or
        the site, inside the [cors] policy."""
        site, proxy, current, metrics = (
            self.site,
            running.proxy,
            running.current,
            self.gateway.metrics,
        )

        def on_timeout() -> None:
            metrics.inc("gateway_refusals_total", code="request_timeout")

        async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await site(scope, receive, send)
                return
            snap = current.snapshot
            server = snap.config.server
            refusal = header_refusal(
                scope["headers"], max_bytes=server.max_header_bytes, max_count=server.max_headers
            )
            path = scope.get("path", "")
            routing = snap.routing
            found = routing.find(path)
            # Refusals in the shape of the mount's dialect (outside one, the primary's).
            error_body = (snap.dialects[found[0].kind] if found else snap.upstream).error_body
            if refusal is not None:
                metrics.inc("gateway_refusals_total", code="headers_too_large")
                await send_refusal(send, error_body, 431, "headers_too_large", refusal)
                return
            deadline = BodyDeadline(
                receive,
                send,
                timeout=server.body_timeout,
                error_body=error_body,
                on_timeout=on_timeout,
            )
            if found is not None and path not in OWN_UNDER_V1:
                await proxy(scope, deadline.receive, deadline.send)
            else:
                await site(scope, deadline.receive, deadline.send)

        # Outermost, so every answer on /v1 - the proxy's, the usage API's, and
        # the refusals of the request limits below - carries the [cors] policy.
        return Cors(
            dispatch,
            config=lambda: current.snapshot.config.cors,
            covered=lambda path: covered(path) or current.snapshot.routing.find(path) is not None,
            error_body=lambda status, code, message: current.snapshot.upstream.error_body(
                status, code, message
            ),
        )


def create_app(
    config: Config | None = None,
    *,
    clock: Clock | None = None,
    storage: Storage | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    env: Mapping[str, str] | None = None,
    probes: Probes | None = None,
) -> GatewayApp:
    """The gateway as an ASGI app (`uvicorn --factory gateway.app:create_app`).

    ``env`` is the environment that configuration reloads read (default: os.environ);
    ``probes`` count what the gateway finished, for tests to wait on (gateway/probes.py).
    """
    if config is None:
        # No configuration handed in: this is a server process (a `gateway serve`
        # worker, or `uvicorn gateway.app:create_app --factory`), whose log is the
        # gateway's to set up (gateway/logs.py); hosts that pass one keep their own.
        config = load_config()
        configure_logging(config.server)
    gateway = Gateway(
        config, clock=clock, storage=storage, transport=transport, env=env, probes=probes
    )
    return GatewayApp(gateway)
