"""Two bare pass-through proxies: what the gateway's own streaming costs are measured against.

Neither authenticates, parses or stores anything: each forwards the request
(minus hop-by-hop headers, RFC 9110 section 7.6.1) to ``$BENCH_UPSTREAM`` and
streams the response back chunk by chunk.

- ``create_naive``: what most people write - a Starlette route returning a
  ``StreamingResponse`` over ``httpx`` with its default transport (httpcore).
- ``create_fast``: the fastest this stack allows - a plain ASGI callable over
  ``httpx`` on the aiohttp transport (``httpx_aiohttp.AiohttpTransport``).

Both get the same connection limits and timeouts as the gateway (from
``$BENCH_MAX_CONNECTIONS``), so the comparison is of code, not of settings.
Serve them with uvicorn: ``uvicorn --factory bench.proxies:create_fast``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import httpx
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.types import Receive, Scope, Send

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_DROP_REQUEST = HOP_BY_HOP | {b"host", b"content-length"}
_BAD_GATEWAY = b'{"code":"upstream_unavailable","message":"upstream unreachable","status":502}'


def _upstream() -> str:
    return os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:5001").rstrip("/")


def _limits() -> httpx.Limits:
    # The gateway's defaults (docs/configuration.md, [upstream]), with room for the
    # memory phase's open streams.
    return httpx.Limits(
        max_connections=int(os.environ.get("BENCH_MAX_CONNECTIONS", "4096")),
        max_keepalive_connections=128,
        keepalive_expiry=30.0,
    )


def _timeout() -> httpx.Timeout:
    return httpx.Timeout(connect=5.0, read=60.0, write=60.0, pool=5.0)


# --- naive: Starlette StreamingResponse + httpx's default transport ----------------------


def create_naive() -> Starlette:
    upstream = _upstream()
    clients: list[httpx.AsyncClient] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients.append(httpx.AsyncClient(limits=_limits(), timeout=_timeout()))
        try:
            yield
        finally:
            await clients.pop().aclose()

    async def forward(request: Request) -> Response:
        client = clients[0]
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.raw if k not in _DROP_REQUEST]
        url = upstream + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        upstream_request = client.build_request(request.method, url, headers=headers, content=body)
        try:
            response = await client.send(upstream_request, stream=True)
        except httpx.HTTPError:
            return Response(_BAD_GATEWAY, status_code=502, media_type="application/json")
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers={
                k: v for k, v in response.headers.items() if k.encode().lower() not in HOP_BY_HOP
            },
            background=BackgroundTask(response.aclose),
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


# --- fast: a plain ASGI callable + httpx on the aiohttp transport --------------------------


class FastProxy:
    def __init__(self) -> None:
        self.upstream = _upstream()
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                limits = _limits()
                self.client = httpx.AsyncClient(
                    transport=AiohttpTransport(limits=limits), limits=limits, timeout=_timeout()
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.client is not None
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        headers = [(k, v) for k, v in scope["headers"] if k not in _DROP_REQUEST]
        url = self.upstream + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        request = self.client.build_request(
            scope["method"], url, headers=headers, content=b"".join(chunks)
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError:
            await send(
                {
                    "type": "http.response.start",
                    "status": 502,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": _BAD_GATEWAY})
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k.lower(), v)
                        for k, v in response.headers.raw
                        if k.lower() not in HOP_BY_HOP
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def create_fast() -> FastProxy:
    return FastProxy()
