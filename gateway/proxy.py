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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from gateway.admission import Admitter, Ticket
from gateway.bodies import (
    FIELDS_ALLOWANCE,
    BodyFailure,
    ClientGone,
    file_too_large,
    read_body,
    read_spool,
    rewritten_multipart,
    spool_multipart,
    stream_body,
)
from gateway.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    StorageError,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.features import used_web_search
from gateway.http import (
    HOP_BY_HOP,
    canonical_path,
    connection_tokens,
    is_json,
    response_headers,
    with_param,
)
from gateway.multipart import MultipartError, UserFieldRewriter, boundary_from_content_type
from gateway.sse import SSEDecoder
from gateway.storage import UsageEvent
from gateway.upstreams import Prepared, Route, StreamMeter
from gateway.usage import Metered

if TYPE_CHECKING:
    from gateway.runtime import Gateway

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("gateway.proxy")

# Request headers the gateway sets itself rather than forwarding.
_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"content-length",
    b"accept-encoding",
}
_SSE = b"text/event-stream"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Blocking answers and history pages are buffered to read them (answers are also
# forwarded as they arrive); no real one comes anywhere near this size.
_MAX_BUFFERED_BODY = 16 * 1024 * 1024
# A multipart body is at most this much larger than the file it carries (part
# headers, boundaries, other fields): with a Content-Length over the plan's file
# size by more than this, the file is certainly too large.
_MULTIPART_SLACK = FIELDS_ALLOWANCE + 64 * 1024

# Request ids: unique per process by a counter, across processes by a random prefix;
# cheaper than uuid4 on every request. Dialects may pass them on (as a trace id),
# so they keep to [0-9a-f-].
_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids):x}"


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _timeout_phase(exc: BaseException) -> str | None:
    """For an upstream failure: "connect" or "read" if it was a timeout (504) and
    in which phase, None if it was a refusal or a broken connection (502)."""
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        # httpx-aiohttp maps every aiohttp connection error, "connection refused"
        # included, to httpx.ConnectTimeout; the original exception tells the truth
        # (aiohttp's timeouts subclass TimeoutError; its connect timeouts say so).
        if not isinstance(cause, TimeoutError):
            return None
        return "connect" if "Connect" in type(cause).__name__ else "read"
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return "connect"
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "read"
    return None


def _is_timeout(exc: BaseException) -> bool:
    return _timeout_phase(exc) is not None


class Proxy:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.admitter = Admitter(gateway)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = new_request_id()
        try:
            await self._handle(scope, receive, send, request_id, started)
        except ClientGone:
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
        path = canonical_path(scope["path"][3:])  # strip "/v1"
        query: bytes = scope.get("query_string", b"")

        authorization: bytes | None = None
        content_type = b""
        content_length: int | None = None
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
                    listed = connection_tokens(value)
                elif name == b"accept-encoding":
                    accept_encoding = value
                elif name == b"content-length":
                    try:
                        content_length = int(value)
                    except ValueError:
                        raise BadRequest("Invalid Content-Length header.") from None
                continue
            if name == b"content-type":
                if content_type:
                    # Which one would the upstream read? Refuse rather than guess.
                    raise BadRequest("More than one Content-Type header.")
                content_type = value
            forward.append((name, value))
        if listed:
            forward = [(name, value) for name, value in forward if name not in listed]
        forward.append(gw.upstream_authorization)

        if method == "OPTIONS" and any(
            k == b"access-control-request-method" for k, _ in scope["headers"]
        ):
            # A CORS preflight carries no credentials by design: forward it as it is
            # (it produces no answer and names no user) so the upstream's CORS policy
            # answers it.
            await self._preflight(scope, send, path, query, forward, request_id)
            return
        try:
            user_id = await gw.identify(authorization, user_header)
        except StorageError as exc:
            gw.metrics.inc("gateway_storage_errors_total", operation="authenticate")
            raise StorageError("The usage database is unavailable; try again shortly.") from exc
        route = upstream.route(method, path)
        field = upstream.user_field
        if route.produces_answer or route.is_history:
            # Usage is read from the raw bytes, and history pages may be filtered:
            # ask for them uncompressed.
            forward.append((b"accept-encoding", b"identity"))
        elif accept_encoding is not None:
            forward.append((b"accept-encoding", accept_encoding))

        # --- the request body, with `user` set to the authenticated user -------------
        media_type = content_type.split(b";", 1)[0].strip().lower()
        body: bytes | AsyncIterator[bytes] | None = None
        failure = BodyFailure()
        json_body: dict[str, Any] | None = None
        upload: UserFieldRewriter | None = None
        if is_json(media_type) or (route.produces_answer and method in _BODY_METHODS):
            limit = config.server.max_json_body_bytes
            if content_length is not None and content_length > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            raw = await read_body(receive, limit)
            if raw or route.produces_answer:
                try:
                    parsed = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise BadRequest("The request body is not valid JSON.") from None
                if not isinstance(parsed, dict):
                    raise BadRequest("The request body must be a JSON object.")
                json_body = parsed
        elif media_type == b"multipart/form-data":
            boundary = boundary_from_content_type(content_type.decode("latin-1"))
            if boundary is None:
                raise BadRequest("The multipart body has no valid boundary.")
            upload = UserFieldRewriter(boundary, user_id, field=field)
            body, length = await self._multipart(
                receive, route, user_id, upload, content_length, failure
            )
            if length is not None:
                forward.append((b"content-length", str(length).encode()))
        elif media_type == b"application/x-www-form-urlencoded":
            limit = config.server.max_json_body_bytes
            if content_length is not None and content_length > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            body = with_param(await read_body(receive, limit), field, user_id)
            forward.append((b"content-length", str(len(body)).encode()))
        elif method in _BODY_METHODS and (content_length or content_length is None):
            body = stream_body(receive, failure)
            if content_length is not None:
                forward.append((b"content-length", str(content_length).encode()))
        prepared = upstream.prepare(
            route, json_body, query, user_id, method=method, request_id=request_id
        )
        query = prepared.query
        if prepared.headers:
            sent = {name for name, _ in forward}
            forward += [(k, v) for k, v in prepared.headers if k not in sent]
        json_body = prepared.body
        answer_body = json_body if json_body is not None else {}

        # --- admission (may rewrite the JSON body) ---------------------------------------
        ticket: Ticket | None = None
        rate_headers: list[tuple[bytes, bytes]] = []
        if route.produces_answer:
            ticket, rate_headers = await self.admitter.admit(user_id, request_id, answer_body)
        if json_body is not None:
            body = orjson.dumps(json_body)
            forward.append((b"content-length", str(len(body)).encode()))

        # --- forward -----------------------------------------------------------------
        url = gw.upstream_url + path + ("?" + query.decode("latin-1") if query else "")
        timeout = gw.client.timeout
        if route.produces_answer and not upstream.is_streaming(route, answer_body):
            # A blocking answer sends nothing until it is complete: wait as long as
            # an answer may take, not just the gap allowed between two chunks.
            timeout = gw.blocking_timeout
        forwarded_at = time.perf_counter()
        try:
            request = gw.client.build_request(
                method, url, headers=forward, content=body, timeout=timeout
            )
            response = await gw.client.send(request, stream=True)
        except asyncio.CancelledError:
            await self._kept(self.admitter.refund(ticket, request_id))
            raise
        except (
            httpx.HTTPError,
            httpx.InvalidURL,
            TimeoutError,
            ClientGone,
            MultipartError,
            PayloadTooLarge,
        ) as exc:
            if isinstance(failure.error, ClientGone | PayloadTooLarge | MultipartError):
                await self.admitter.refund(ticket, request_id)
                if isinstance(failure.error, MultipartError):
                    raise BadRequest(f"Malformed multipart body: {failure.error}") from exc
                raise failure.error from exc
            if isinstance(exc, httpx.InvalidURL):
                await self.admitter.refund(ticket, request_id)
                raise BadRequest("The request URL is not valid.") from exc
            phase = _timeout_phase(exc)
            if phase == "read" and ticket is not None and ticket.reserved:
                # The request reached the upstream, which may well be answering (and
                # billing) still: the query stays spent and an estimate is recorded.
                gw.metrics.inc("gateway_upstream_errors_total", kind="answer_timeout")
                log.warning(
                    "request %s: upstream took too long to answer; charging an estimate", request_id
                )
                await self._kept(
                    self._settle(
                        upstream.unanswered(route, answer_body),
                        request_id=request_id,
                        route=route,
                        ticket=ticket,
                        disconnected=False,
                        upstream_ms=(time.perf_counter() - forwarded_at) * 1000,
                        overhead_ms=(forwarded_at - started) * 1000,
                    )
                )
                raise UpstreamTimeout("The upstream did not answer in time.") from exc
            await self.admitter.refund(ticket, request_id)
            if phase is not None:
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
                json_body=answer_body,
                prepared=prepared,
                ticket=ticket,
                upload=upload,
                query=query,
                rate_headers=rate_headers,
                started=started,
                forwarded_at=forwarded_at,
            )
        finally:
            await response.aclose()

    async def _preflight(
        self,
        scope: Scope,
        send: Send,
        path: str,
        query: bytes,
        forward: list[tuple[bytes, bytes]],
        request_id: str,
    ) -> None:
        gw = self.gw
        headers = [(k, v) for k, v in forward if k != b"authorization"]
        url = gw.upstream_url + path + ("?" + query.decode("latin-1") if query else "")
        try:
            response = await gw.client.request("OPTIONS", url, headers=headers)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable("The upstream service is unreachable.") from exc
        out = response_headers(response.headers.raw)
        out = [(k, v) for k, v in out if k not in (b"content-length", b"content-encoding")]
        out += [
            (b"content-length", str(len(response.content)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": response.content})

    async def _multipart(
        self,
        receive: Receive,
        route: Route,
        user_id: str,
        rewriter: UserFieldRewriter,
        content_length: int | None,
        failure: BodyFailure,
    ) -> tuple[AsyncIterator[bytes], int | None]:
        """A multipart body to forward, and its length when known.

        Uploads are held to the plan's ``file_size_mb``: decided from
        Content-Length when that settles it; otherwise the body is spooled (to a
        temporary file past 1 MB) and counted as it arrives, so no byte of a body
        that turns out too large is forwarded.
        """
        limit = None
        if route.is_upload:
            mb = (await self.admitter.plan_of(user_id)).file_size_mb
            limit = None if mb is None else int(mb * 1024 * 1024)
        if (
            limit is not None
            and content_length is not None
            and content_length > limit + _MULTIPART_SLACK
        ):
            raise file_too_large(limit)
        if limit is None or (content_length is not None and content_length <= limit):
            length = None if content_length is None else content_length + rewriter.added_bytes
            return rewritten_multipart(receive, rewriter, failure, limit=limit), length
        try:
            spool, size = await spool_multipart(receive, rewriter, limit=limit)
        except MultipartError as exc:
            raise BadRequest(f"Malformed multipart body: {exc}") from exc
        return read_spool(spool), size

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
        prepared: Prepared,
        ticket: Ticket | None,
        upload: UserFieldRewriter | None,
        query: bytes,
        rate_headers: list[tuple[bytes, bytes]],
        started: float,
        forwarded_at: float,
    ) -> None:
        gw = self.gw
        status = response.status_code
        headers = response_headers(response.headers.raw)
        headers.append((b"x-request-id", request_id.encode()))
        headers.extend(rate_headers)
        content_type = next(
            (v for k, v in response.headers.raw if k.lower() == b"content-type"), b""
        ).lower()
        metered = ticket is not None and 200 <= status < 300
        sse = metered and content_type.startswith(_SSE)
        blocking = metered and not sse and b"json" in content_type
        if not (sse or blocking):
            # Non-2xx (or nothing we can read usage from): no answer was produced.
            await self.admitter.refund(ticket, request_id)
        gw.metrics.inc("gateway_requests_total", route=route.kind, status=f"{status // 100}xx")

        if not (sse or blocking):
            ok = 200 <= status < 300
            if ok and route.is_history and b"json" in content_type:
                days = (await self.admitter.plan_of(user_id)).chat_history_days
                if days is not None:
                    await self._history(send, response, status, headers, route, query, days)
                    return
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await self._pass_through(send, response, request_id)
            if ok and upload is not None and route.is_upload:
                await self._count_upload(user_id, upload.file_bytes, request_id)
            return

        await send({"type": "http.response.start", "status": status, "headers": headers})

        meter: StreamMeter | None = gw.upstream.stream_meter(route, json_body) if sse else None
        decoder = SSEDecoder() if sse else None
        transform = gw.upstream.stream_transform(route, prepared) if sse else None
        buffer = bytearray()
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        disconnected = stopped = cut = False
        cancelled: asyncio.CancelledError | None = None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(gw.config.upstream.total_timeout) as deadline:
                async for chunk in response.aiter_raw():
                    if not disconnected:
                        if watcher.done():
                            disconnected = True
                            stopped = await self._client_left(request_id, route, meter, user_id)
                            if stopped and gw.upstream.stops_by_closing:
                                cut = True  # closing the response stops the answer
                                break
                            deadline.reschedule(loop.time() + gw.config.upstream.disconnect_grace)
                        else:
                            out = chunk if transform is None else transform.feed(chunk)
                            await send(
                                {"type": "http.response.body", "body": out, "more_body": True}
                            )
                    if decoder is not None and meter is not None:
                        for event in decoder.feed(chunk):
                            meter.feed(event)
                    elif len(buffer) < _MAX_BUFFERED_BODY:
                        buffer += chunk
        except (httpx.HTTPError, TimeoutError) as exc:
            cut = True
            kind = "timeout" if _is_timeout(exc) else "read"
            gw.metrics.inc("gateway_upstream_errors_total", kind=f"mid_stream_{kind}")
            log.warning(
                "request %s: upstream stream ended abnormally (%s): %r", request_id, kind, exc
            )
            if sse and not disconnected and not watcher.done():
                error_event = gw.upstream.stream_error(
                    502, "upstream_error", "The upstream connection was lost."
                )
                await send({"type": "http.response.body", "body": error_event, "more_body": True})
        except asyncio.CancelledError as exc:
            # The server is going away (or cancelled this request): what was read
            # is still settled below, shielded, before the cancellation goes on.
            cut = True
            cancelled = exc
        finally:
            if not disconnected and watcher.done():
                disconnected = True
                gw.metrics.inc("gateway_client_disconnects_total")
            watcher.cancel()
        if cancelled is None and not disconnected:
            rest = b"" if transform is None or cut else transform.flush()
            await send({"type": "http.response.body", "body": rest, "more_body": False})

        if decoder is not None and meter is not None:
            for event in decoder.flush():
                meter.feed(event)
            result = meter.finish(cut=cut or disconnected)
        else:
            result = gw.upstream.meter_blocking(route, json_body, bytes(buffer))
        if (
            cut
            and not stopped
            and result.outcome != "complete"
            and meter is not None
            and meter.task_id
        ):
            # We stopped reading an answer the upstream may still be generating
            # (and billing): tell it to stop.
            gw.keep(self._stop(request_id, route, meter.task_id, user_id))
        finished = time.perf_counter()
        assert ticket is not None
        await self._kept(
            self._settle(
                result,
                request_id=request_id,
                route=route,
                ticket=ticket,
                disconnected=disconnected,
                upstream_ms=(finished - forwarded_at) * 1000,
                overhead_ms=(forwarded_at - started) * 1000,
            )
        )
        if cancelled is not None:
            raise cancelled

    async def _history(
        self,
        send: Send,
        response: httpx.Response,
        status: int,
        headers: list[tuple[bytes, bytes]],
        route: Route,
        query: bytes,
        days: int,
    ) -> None:
        """A conversation or message page limited to the plan's history window.

        Fails closed: a page that cannot be read is not passed on unfiltered.
        """
        raw = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                raw += chunk
                if len(raw) > _MAX_BUFFERED_BODY:
                    raise UpstreamError("The upstream history page is too large to filter.")
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable("The upstream history page could not be read.") from exc
        try:
            page = orjson.loads(raw)
        except orjson.JSONDecodeError:
            page = None
        if not isinstance(page, dict):
            raise UpstreamError("The upstream history page is not a JSON object.")
        cutoff = self.gw.clock.now().timestamp() - days * 86400
        filtered = self.gw.upstream.filter_history(route, query, page, cutoff)
        body = bytes(raw) if filtered is page else orjson.dumps(filtered)
        # aiter_bytes decoded any Content-Encoding: describe the new body instead.
        headers = [(k, v) for k, v in headers if k not in (b"content-length", b"content-encoding")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _count_upload(self, user_id: str, size: int, request_id: str) -> None:
        periods_day = self.gw.today()
        try:
            await self.gw.storage.record_upload(user_id, day=periods_day, size=size)
        except StorageError as exc:
            self.gw.metrics.inc("gateway_storage_errors_total", operation="upload")
            log.error(
                "request %s: could not count an upload of %d bytes: %s",
                request_id,
                size,
                exc.message,
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
    ) -> bool:
        """The client went away mid-answer; returns whether the answer was stopped."""
        gw = self.gw
        gw.metrics.inc("gateway_client_disconnects_total")
        policy = gw.config.upstream.on_client_disconnect
        log.info("request %s: client disconnected mid-answer; policy %s", request_id, policy)
        if policy != "stop" or meter is None:
            return False
        if gw.upstream.stops_by_closing:
            return True
        if meter.task_id is None:
            return False
        return await self._stop(request_id, route, meter.task_id, user_id)

    async def _stop(self, request_id: str, route: Route, task_id: str, user_id: str) -> bool:
        """Ask the upstream to stop generating an answer (same task id and user)."""
        gw = self.gw
        stop = gw.upstream.stop_request(route, task_id, user_id)
        if stop is None:
            return False
        path, payload = stop
        try:
            reply = await gw.client.post(
                gw.upstream_url + path,
                content=payload,
                headers=[(b"content-type", b"application/json"), gw.upstream_authorization],
            )
        except httpx.HTTPError as exc:
            log.warning("request %s: could not stop task %s: %r", request_id, task_id, exc)
            return False
        log.info(
            "request %s: stopped task %s upstream (%d)", request_id, task_id, reply.status_code
        )
        return reply.is_success

    async def _kept(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (recording an answer, or giving its reservation back) as a
        task the gateway keeps, shielded: a cancellation of the request - a client
        gone, a server shutting down - must never cut a ledger write half-way."""
        await asyncio.shield(self.gw.keep(work))

    async def _settle(
        self,
        result: Metered,
        *,
        request_id: str,
        route: Route,
        ticket: Ticket,
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
            await self.admitter.refund(ticket, request_id)
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
                web_searches=int(used_web_search(result.metadata, self.gw.config.web_search)),
                conversation_id=result.conversation_id,
                request_id=request_id,
                upstream_latency_ms=round(upstream_ms, 3),
                overhead_ms=round(overhead_ms, 3),
                model=result.model,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
            ),
            lease_id=ticket.lease_id,
        )
