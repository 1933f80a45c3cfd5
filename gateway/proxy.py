"""The proxy hot path: a plain ASGI callable for everything under /v1.

Per request: authenticate, classify, admit (one storage round trip for answer
routes), rewrite ``user`` and the upstream credential, forward with the shared
httpx client, pass every upstream chunk to the client as it arrives, feed the
same bytes to the SSE decoder and the dialect's meter, and settle the answer's
usage once it is over - also when the client has gone (we keep reading, bounded
by ``upstream.disconnect_grace``, or stop the answer upstream).

Per-request state lives in locals; what can be computed once per process is.
Headers stay raw byte pairs, filtered against module-level frozensets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import httpx
import orjson

from gateway.clock import periods_at
from gateway.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    QuotaExceeded,
    StorageError,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.multipart import MultipartError, UserFieldRewriter, boundary_from_content_type
from gateway.plans import (
    LIMIT_CODES,
    admission_limits,
    closed_checks,
    refusal_message,
    reported_limit,
)
from gateway.sse import SSEDecoder
from gateway.storage import Lease, UsageEvent
from gateway.upstreams import Route, StreamMeter
from gateway.usage import Metered

if TYPE_CHECKING:
    from gateway.runtime import Gateway

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("gateway.proxy")

# RFC 9110 section 7.6.1: connection-specific fields are not forwarded.
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
# Request headers the gateway sets itself rather than forwarding.
_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"content-length",
    b"accept-encoding",
}
_DROP_RESPONSE = HOP_BY_HOP | {b"x-request-id"}
_SSE = b"text/event-stream"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Blocking answers are buffered (while also being forwarded) to read their usage;
# past this size we stop buffering: no real answer body is anywhere near it.
_MAX_BLOCKING_BODY = 16 * 1024 * 1024

# A refusal for too many open answers has no reset time; clients may retry soon.
_STREAM_RETRY_AFTER = 5

# Request ids: unique per process by a counter, across processes by a random prefix;
# cheaper than uuid4 on every request. Dify accepts them as X-Trace-Id
# (1-128 of [A-Za-z0-9_-]).
_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids):x}"


class _Ticket:
    """The accounting state of one answer request."""

    __slots__ = ("day", "lease_id", "reserved", "user_id")

    def __init__(self, user_id: str, day: date, *, reserved: bool, lease_id: str | None) -> None:
        self.user_id = user_id
        self.day = day  # the local day the answer is counted on: the day it was asked
        self.reserved = reserved  # a query is reserved and must be settled or refunded
        self.lease_id = lease_id


class _ClientGone(Exception):
    """The client disconnected while the request body was being read."""


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _BodyFailure:
    """Where a streamed request body records why it failed.

    The transport consumes the body while sending and wraps whatever it raises
    (as a connect or write error), so the cause - a client gone, a malformed
    multipart body - is kept here to answer the client correctly.
    """

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None


async def _stream_body(receive: Receive, failure: _BodyFailure) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            failure.error = _ClientGone()
            raise failure.error
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _rewritten_multipart(
    receive: Receive, rewriter: UserFieldRewriter, failure: _BodyFailure
) -> AsyncIterator[bytes]:
    try:
        async for chunk in _stream_body(receive, failure):
            out = rewriter.feed(chunk)
            if out:
                yield out
        tail = rewriter.close()
    except MultipartError as exc:
        failure.error = exc
        raise
    if tail:
        yield tail


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _is_timeout(exc: BaseException) -> bool:
    """Whether an upstream failure was a timeout (504) rather than a refusal (502)."""
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        # httpx-aiohttp maps every aiohttp connection error, "connection refused"
        # included, to httpx.ConnectTimeout; the original exception tells the truth
        # (aiohttp's timeouts subclass TimeoutError).
        return isinstance(cause, TimeoutError)
    return isinstance(exc, httpx.TimeoutException | TimeoutError)


def _connection_tokens(value: bytes) -> frozenset[bytes]:
    """Header names listed in a Connection header: hop-by-hop too (RFC 9110 7.6.1)."""
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def _response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    listed: frozenset[bytes] = frozenset()
    for name, value in raw:
        if name.lower() == b"connection":
            listed = _connection_tokens(value)
    return [
        (name.lower(), value)
        for name, value in raw
        if name.lower() not in _DROP_RESPONSE and name.lower() not in listed
    ]


def _with_user(query: bytes, field: str, user_id: str) -> str:
    pairs = [
        (k, v) for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k != field
    ]
    pairs.append((field, user_id))
    return urlencode(pairs)


class Proxy:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = new_request_id()
        try:
            await self._handle(scope, receive, send, request_id, started)
        except _ClientGone:
            log.info("request %s: client left before sending its body", request_id)
        except GatewayError as exc:
            # Refusals raised before the response started.
            await self._send_error(send, exc, request_id)
        finally:
            await self.gw.request_finished()

    async def _send_error(
        self,
        send: Send,
        exc: GatewayError,
        request_id: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = self.gw.upstream.error_body(exc.status, exc.code, exc.message)
        extra = [*exc.headers, *(headers or ())]
        if isinstance(exc, Unauthorized):
            extra.append((b"www-authenticate", b'Bearer realm="api"'))
        if isinstance(exc, StorageError | UpstreamError) and not any(
            k == b"retry-after" for k, _ in extra
        ):
            extra.append((b"retry-after", b"5"))
        self.gw.metrics.inc("gateway_refusals_total", code=exc.code)
        await send(
            {
                "type": "http.response.start",
                "status": exc.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, started: float
    ) -> None:
        gw = self.gw
        config = gw.config
        upstream = gw.upstream
        method: str = scope["method"]
        path: str = scope["path"][3:]  # strip "/v1"
        query: bytes = scope.get("query_string", b"")

        authorization: bytes | None = None
        content_type = b""
        content_length: int | None = None
        has_trace = False
        listed: frozenset[bytes] = frozenset()
        accept_encoding: bytes | None = None
        forward: list[tuple[bytes, bytes]] = []
        user_header_name = gw.user_header
        user_header: bytes | None = None
        for name, value in scope["headers"]:
            if name == user_header_name:
                # Only meaningful with the service key; never forwarded.
                user_header = value
                continue
            if name in _DROP_REQUEST:
                if name == b"authorization":
                    authorization = value
                elif name == b"connection":
                    listed = _connection_tokens(value)
                elif name == b"accept-encoding":
                    accept_encoding = value
                elif name == b"content-length":
                    try:
                        content_length = int(value)
                    except ValueError:
                        raise BadRequest("Invalid Content-Length header.") from None
                continue
            if name == b"content-type":
                content_type = value
            elif name == b"x-trace-id":
                has_trace = True
            forward.append((name, value))
        if listed:
            forward = [(name, value) for name, value in forward if name not in listed]
        if not has_trace:
            forward.append((b"x-trace-id", request_id.encode()))
        forward.append(gw.upstream_authorization)

        try:
            identity = await gw.auth.authenticate(authorization, user_header)
            if config.auth.mode != "api_key":
                await gw.users.resolve(
                    identity,
                    default_plan=config.accounting.default_plan,
                    create=config.auth.unknown_users == "create",
                )
        except StorageError as exc:
            gw.metrics.inc("gateway_storage_errors_total", operation="authenticate")
            raise StorageError("The usage database is unavailable; try again shortly.") from exc
        user_id = identity.user_id
        route = upstream.route(method, path)
        field = upstream.user_field
        if route.produces_answer:
            # Usage is read from the raw bytes: ask for them uncompressed.
            forward.append((b"accept-encoding", b"identity"))
        elif accept_encoding is not None:
            forward.append((b"accept-encoding", accept_encoding))

        # --- the request body, with `user` set to the authenticated user -------------
        media_type = content_type.split(b";", 1)[0].strip().lower()
        body: bytes | AsyncIterator[bytes] | None = None
        failure = _BodyFailure()
        json_body: dict[str, Any] = {}
        if media_type == b"application/json" or (route.produces_answer and method in _BODY_METHODS):
            limit = config.server.max_json_body_bytes
            if content_length is not None and content_length > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            raw = await _read_body(receive, limit)
            if raw or route.produces_answer:
                try:
                    parsed = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise BadRequest("The request body is not valid JSON.") from None
                if not isinstance(parsed, dict):
                    raise BadRequest("The request body must be a JSON object.")
                json_body = parsed
                upstream.set_user(json_body, user_id)
                body = orjson.dumps(json_body)
                forward.append((b"content-length", str(len(body)).encode()))
        elif media_type == b"multipart/form-data":
            boundary = boundary_from_content_type(content_type.decode("latin-1"))
            if boundary is None:
                raise BadRequest("The multipart body has no valid boundary.")
            rewriter = UserFieldRewriter(boundary, user_id, field=field)
            body = _rewritten_multipart(receive, rewriter, failure)
            if content_length is not None:
                forward.append(
                    (b"content-length", str(content_length + rewriter.added_bytes).encode())
                )
        elif method in _BODY_METHODS and (content_length or content_length is None):
            body = _stream_body(receive, failure)
            if content_length is not None:
                forward.append((b"content-length", str(content_length).encode()))
        if method in ("GET", "HEAD", "DELETE") or f"{field}=".encode() in query:
            query = _with_user(query, field, user_id).encode()

        # --- admission ---------------------------------------------------------------
        ticket: _Ticket | None = None
        rate_headers: list[tuple[bytes, bytes]] = []
        if route.produces_answer:
            ticket, rate_headers = await self._admit(user_id, request_id)

        # --- forward -----------------------------------------------------------------
        url = gw.upstream_url + path + ("?" + query.decode("latin-1") if query else "")
        request = gw.client.build_request(method, url, headers=forward, content=body)
        forwarded_at = time.perf_counter()
        try:
            response = await gw.client.send(request, stream=True)
        except (httpx.HTTPError, TimeoutError, _ClientGone, MultipartError) as exc:
            await self._refund(ticket, request_id)
            if isinstance(failure.error, _ClientGone):
                raise failure.error from exc
            if isinstance(failure.error, MultipartError):
                raise BadRequest(f"Malformed multipart body: {failure.error}") from exc
            if _is_timeout(exc):
                gw.metrics.inc("gateway_upstream_errors_total", kind="timeout")
                log.warning("request %s: upstream timed out before answering: %r", request_id, exc)
                raise UpstreamTimeout("The upstream did not answer in time.") from exc
            gw.metrics.inc("gateway_upstream_errors_total", kind="connect")
            log.warning("request %s: upstream unreachable: %r", request_id, exc)
            raise UpstreamUnavailable("The upstream service is unreachable.") from exc

        try:
            await self._respond(
                scope,
                receive,
                send,
                response,
                request_id=request_id,
                route=route,
                user_id=user_id,
                json_body=json_body,
                ticket=ticket,
                rate_headers=rate_headers,
                started=started,
                forwarded_at=forwarded_at,
            )
        finally:
            await response.aclose()

    async def _admit(
        self, user_id: str, request_id: str
    ) -> tuple[_Ticket, list[tuple[bytes, bytes]]]:
        """Reserve the query (and a stream slot) or raise the refusal."""
        gw = self.gw
        config = gw.config
        now = gw.clock.now()
        periods = periods_at(now, gw.tz)
        plan = config.plan(config.accounting.default_plan)
        try:
            user = await gw.users.get(user_id, default_plan=config.accounting.default_plan)
            plan = config.plan(user.plan).with_overrides(user.overrides)
            limits = admission_limits(plan)
            lease = None
            if limits.max_concurrent_streams is not None:
                lease = Lease(id=request_id, expires_at=now + gw.lease_ttl)
            admission = await gw.storage.admit(
                user_id,
                day=periods.day,
                month_start=periods.month_start,
                limits=limits,
                now=now,
                lease=lease,
            )
        except StorageError as exc:
            gw.metrics.inc("gateway_storage_errors_total", operation="admit")
            closed = closed_checks(config.admission.on_storage_error, plan)
            if closed:
                log.error(
                    "request %s: admission could not reach the database; refused "
                    "(fail-closed for %s): %s",
                    request_id,
                    ", ".join(closed),
                    exc.message,
                )
                gw.metrics.inc("gateway_admission_storage_failures_total", policy="closed")
                raise StorageError(
                    "The usage database is unavailable; try again shortly.",
                    headers=[(b"retry-after", b"5")],
                ) from exc
            log.error(
                "request %s: admission could not reach the database; let through "
                "unreserved (fail-open): %s",
                request_id,
                exc.message,
            )
            gw.metrics.inc("gateway_admission_storage_failures_total", policy="open")
            return _Ticket(user_id, periods.day, reserved=False, lease_id=None), []

        shown = reported_limit(admission, plan, periods)
        rate_headers = shown.headers() if shown is not None else []
        if not admission.admitted:
            assert admission.refused_by is not None
            limit = getattr(plan, admission.refused_by)
            reset = shown.reset.astimezone(gw.tz) if shown and shown.reset else None
            retry = shown.retry_after(now) if shown else _STREAM_RETRY_AFTER
            raise QuotaExceeded(
                refusal_message(admission.refused_by, limit, reset),
                code=LIMIT_CODES[admission.refused_by],
                headers=[(b"retry-after", str(retry).encode()), *rate_headers],
            )
        ticket = _Ticket(user_id, periods.day, reserved=True, lease_id=lease.id if lease else None)
        return ticket, rate_headers

    async def _refund(self, ticket: _Ticket | None, request_id: str) -> None:
        """Return a reserved query (and its stream slot): no answer was produced."""
        if ticket is None or not ticket.reserved:
            return
        ticket.reserved = False
        try:
            await self.gw.storage.refund(ticket.user_id, day=ticket.day, lease_id=ticket.lease_id)
        except StorageError as exc:
            self.gw.metrics.inc("gateway_storage_errors_total", operation="refund")
            log.error(
                "request %s: could not return the reserved query: %s", request_id, exc.message
            )

    async def _respond(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        response: httpx.Response,
        *,
        request_id: str,
        route: Route,
        user_id: str,
        json_body: dict[str, Any],
        ticket: _Ticket | None,
        rate_headers: list[tuple[bytes, bytes]],
        started: float,
        forwarded_at: float,
    ) -> None:
        gw = self.gw
        status = response.status_code
        headers = _response_headers(response.headers.raw)
        headers.append((b"x-request-id", request_id.encode()))
        headers.extend(rate_headers)
        content_type = response.headers.get("content-type", "").encode("latin-1").lower()
        metered = ticket is not None and 200 <= status < 300
        sse = metered and content_type.startswith(_SSE)
        blocking = metered and not sse and b"json" in content_type
        if not (sse or blocking):
            # Non-2xx (or nothing we can read usage from): no answer was produced.
            await self._refund(ticket, request_id)
        gw.metrics.inc("gateway_requests_total", route=route.kind, status=f"{status // 100}xx")

        await send({"type": "http.response.start", "status": status, "headers": headers})
        if not (sse or blocking):
            await self._pass_through(send, response, request_id)
            return

        meter: StreamMeter | None = gw.upstream.stream_meter(route, json_body) if sse else None
        decoder = SSEDecoder() if sse else None
        buffer = bytearray()
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        disconnected = False
        cut = False
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(gw.config.upstream.total_timeout) as deadline:
                async for chunk in response.aiter_raw():
                    if not disconnected:
                        if watcher.done():
                            disconnected = True
                            await self._client_left(request_id, route, meter, user_id)
                            deadline.reschedule(loop.time() + gw.config.upstream.disconnect_grace)
                        else:
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                    if decoder is not None and meter is not None:
                        for event in decoder.feed(chunk):
                            meter.feed(event)
                    elif len(buffer) < _MAX_BLOCKING_BODY:
                        buffer += chunk
        except (httpx.HTTPError, TimeoutError) as exc:
            cut = True
            kind = "timeout" if _is_timeout(exc) else "read"
            gw.metrics.inc("gateway_upstream_errors_total", kind=f"mid_stream_{kind}")
            log.warning(
                "request %s: upstream stream ended abnormally (%s): %r", request_id, kind, exc
            )
            if sse and not disconnected and not watcher.done():
                error_event = gw.upstream.error_body(
                    502, "upstream_error", "The upstream connection was lost."
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + error_event + b"\n\n",
                        "more_body": True,
                    }
                )
        finally:
            if not disconnected and watcher.done():
                disconnected = True
                gw.metrics.inc("gateway_client_disconnects_total")
            watcher.cancel()
        if not disconnected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        if decoder is not None and meter is not None:
            for event in decoder.flush():
                meter.feed(event)
            result = meter.finish(cut=cut or disconnected)
        else:
            result = gw.upstream.meter_blocking(route, json_body, bytes(buffer))
        finished = time.perf_counter()
        assert ticket is not None
        await self._settle(
            result,
            request_id=request_id,
            route=route,
            ticket=ticket,
            disconnected=disconnected,
            upstream_ms=(finished - forwarded_at) * 1000,
            overhead_ms=(forwarded_at - started) * 1000,
        )

    async def _pass_through(self, send: Send, response: httpx.Response, request_id: str) -> None:
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            log.warning("request %s: upstream body ended abnormally: %r", request_id, exc)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _client_left(
        self, request_id: str, route: Route, meter: StreamMeter | None, user_id: str
    ) -> None:
        gw = self.gw
        gw.metrics.inc("gateway_client_disconnects_total")
        policy = gw.config.upstream.on_client_disconnect
        log.info("request %s: client disconnected mid-answer; policy %s", request_id, policy)
        if policy != "stop" or meter is None or meter.task_id is None:
            return
        stop = gw.upstream.stop_request(route, meter.task_id, user_id)
        if stop is None:
            return
        path, payload = stop
        try:
            reply = await gw.client.post(
                gw.upstream_url + path,
                content=payload,
                headers=[(b"content-type", b"application/json"), gw.upstream_authorization],
            )
            log.info(
                "request %s: stopped task %s upstream (%d)",
                request_id,
                meter.task_id,
                reply.status_code,
            )
        except httpx.HTTPError as exc:
            log.warning("request %s: could not stop task %s: %r", request_id, meter.task_id, exc)

    async def _settle(
        self,
        result: Metered,
        *,
        request_id: str,
        route: Route,
        ticket: _Ticket,
        disconnected: bool,
        upstream_ms: float,
        overhead_ms: float,
    ) -> None:
        usage = result.usage
        if usage is None:
            log.info(
                "request %s: answer produced nothing to charge (%s%s); query returned",
                request_id,
                result.outcome,
                f", {result.error_code}" if result.error_code else "",
            )
            await self._refund(ticket, request_id)
            return
        if usage.estimated:
            log.warning(
                "request %s: upstream reported no usage (%s); charging an estimate of %d tokens",
                request_id,
                result.outcome,
                usage.total_tokens,
            )
        await self.gw.settler.record(
            UsageEvent(
                answer_id=result.answer_id or f"gw-{request_id}",
                user_id=ticket.user_id,
                day=ticket.day,
                created_at=self.gw.clock.now(),
                endpoint=route.name,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                cost=usage.cost,
                currency=usage.currency,
                outcome="disconnected" if disconnected else result.outcome,
                estimated=usage.estimated,
                conversation_id=result.conversation_id,
                request_id=request_id,
                upstream_latency_ms=round(upstream_ms, 3),
                overhead_ms=round(overhead_ms, 3),
            ),
            lease_id=ticket.lease_id,
        )
