"""The proxy hot path: a plain ASGI callable for everything under the mounts
(/v1, /support/v1: gateway/mounts.py).

One request goes through one pipeline (`Proxy._handle`): parse the request
line and headers, authenticate the end user, read and rewrite the body (the
dialect puts the user where its API reads it), pick the named upstream by the
model it names (issue 23), admit an answer request (one storage round trip),
forward it with that upstream's client - and to its fallbacks while one fails
before answering - relay every upstream
chunk to the client as it arrives while the dialect's meter reads the same
bytes, and settle the answer's usage once it is over - also when the client has
gone (we keep reading, bounded by ``upstream.disconnect_grace``, or stop the
answer upstream). A reservation that is not settled by the end of the pipeline,
whatever ended it, is given back: that is the one refund rule.

The request's state travels in one slotted `Exchange`; what can be computed once
per process is. Headers stay raw byte pairs (see `gateway.http`); upstream I/O
errors arrive already mapped (see `gateway.upstream_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Mapping
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, Final, Literal, Protocol
from urllib.parse import parse_qs, unquote

import httpx
import orjson

from gateway.admission import NO_UPLOAD_LIMITS, Admitter, Ticket, UploadTicket
from gateway.bodies import (
    FIELDS_ALLOWANCE,
    BodyFailure,
    ClientGone,
    PastUploadLimits,
    file_too_large,
    read_body,
    read_spool,
    rewritten_multipart,
    spool_multipart,
    stream_body,
)
from gateway.clock import periods_at
from gateway.conversations import ConversationHold, Conversations, listed_features
from gateway.error_response import render_error
from gateway.errors import (
    STORAGE_UNAVAILABLE,
    BadRequest,
    Forbidden,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    StorageError,
    UpstreamBroken,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.features import used_web_search
from gateway.follow import Follow, Follows
from gateway.http import (
    Headers,
    KeyMask,
    RequestHeaders,
    canonical_path,
    is_json,
    request_headers,
    response_headers,
    with_param,
)
from gateway.logs import bind_request, note_status
from gateway.messages import english
from gateway.model_access import allows, check_models, shown_model
from gateway.multipart import MultipartError, UserFieldRewriter, boundary_from_content_type
from gateway.pricing import CallPrice
from gateway.quota.limits import UPLOAD_METERS, Limit
from gateway.relay import Command as RelayCommand
from gateway.relay import Count, End, ExtendDeadline, Notice, Refund, Relay, Settle, StopAfter
from gateway.relay import Send as RelaySend
from gateway.relay import Stop as RelayStop
from gateway.routing import ALLOWED, RouteGuard, side_cost_result
from gateway.sse import EventTooLarge, SSEDecoder
from gateway.storage import Accounting, ConversationFeatures, Ownership, PausedForms, UsageEvent
from gateway.types import Message, Receive, Scope, Send
from gateway.upstream_client import UpstreamClient, request_taken
from gateway.upstreams import Prepared, Route, Upstream
from gateway.upstreams.base import KeepsUploads
from gateway.upstreams.dify_files import canonical_uuid
from gateway.upstreams.dify_routes import conversation_of
from gateway.usage import Metered

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.config import Plan
    from gateway.follow import Run
    from gateway.metrics import Metrics
    from gateway.mounts import Mount
    from gateway.probes import Probes
    from gateway.runtime import InFlight
    from gateway.settle import Settler
    from gateway.snapshot import Current, Snapshot, Target

log = logging.getLogger("gateway.proxy")

_SSE = b"text/event-stream"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Blocking answers and history pages are buffered to read them (answers are also
# forwarded as they arrive); no real one comes anywhere near this size.
_MAX_BUFFERED_BODY = 16 * 1024 * 1024
# A multipart body is at most this much larger than the file it carries (part
# headers, boundaries, other fields): with a Content-Length over the plan's file
# size by more than this, the file is certainly too large.
_MULTIPART_SLACK = FIELDS_ALLOWANCE + 64 * 1024
# A small reply read whole before it is passed on (`_read_small`): an upload's
# (Dify: a file's id, name, size... ~300 bytes), to keep whose the file is; an
# answer's HTTP error, to tell whether its run had begun. Past it, passed on as
# it comes.
_SMALL_BODY = 64 * 1024
# An error body the gateway decodes to mask the keys in it (`_inflated`) is cut
# past this much: an error has no business being larger, and a small gzip body
# inflates a thousandfold (review5 R5-2). It is inflated this much at a time.
_MAX_ERROR_BODY = 8 * _SMALL_BODY
_INFLATE_STEP = 16 * 1024
# The Content-Encodings the gateway decodes (`_inflated`), and so may ask an
# upstream for in the client's stead: an error in any other could not be read
# for the keys it may quote (review5 R5-1).
_DECODABLE: Final = frozenset({b"gzip", b"x-gzip", b"deflate"})
# Placeholders until `_parse` and `route` fill them in (never used before).
_NO_ROUTE = Route("other", "")
_NO_HEADERS = RequestHeaders([])
# Upstream answers that send a request on to the next fallback (issue 23).
_RATE_LIMITED = 429
_SERVER_ERROR = 500
# A reply with no body, whose Content-Length is the stored representation's.
_NOT_MODIFIED = 304
# The pages of one upstream's model list read at most for a shared mount's list
# (Anthropic's: 1000 models a page).
_MODEL_LIST_PAGES = 10

# Request ids: unique per process by a counter, across processes by a random prefix;
# cheaper than uuid4 on every request. They also key the ledger rows of answers
# whose upstream names no unique id (``gw-<request id>``), so the prefix is wide
# enough never to repeat across processes (96 random bits) and is drawn again in a
# forked child, which would otherwise repeat its parent's ids. Dialects may pass
# them on (as a trace id), so they keep to [0-9a-f-].
_ID_PREFIX = ""
_ids = itertools.count(1)


def _new_id_space() -> None:
    global _ID_PREFIX, _ids
    _ID_PREFIX = os.urandom(12).hex()
    _ids = itertools.count(1)


_new_id_space()
os.register_at_fork(after_in_child=_new_id_space)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids):x}"


class _Rest:
    """The rest of an awaitable whose first step (``steps.send(None)``) was taken
    and is ``waiting`` on something: awaited, it goes on as ``await`` would have,
    a cancellation (a deadline) passed into it."""

    __slots__ = ("steps", "waiting")

    def __init__(self, steps: Generator[Any, Any, Any], waiting: Any) -> None:
        self.steps = steps
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        steps, waiting = self.steps, self.waiting
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:
                try:
                    waiting = steps.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = steps.send(sent)
                except StopIteration:
                    return


class _ClientStalled(Exception):
    """The client read nothing more before a send's deadline."""


async def _send_by(send: Send, message: Message, send_by: float) -> bool:
    """Send ``message``, waiting for the client until ``send_by`` (the event loop's
    time) at most: False when that ran out first. The send's first step is taken
    bare - nearly always all of it (written, or handed to the transport's buffer) -
    so that only a send that must wait for the client to read sets a timer."""
    steps = send(message).__await__()
    try:
        waiting = steps.send(None)
    except StopIteration:
        return True
    try:
        async with asyncio.timeout_at(send_by):
            await _Rest(steps, waiting)
    except TimeoutError:
        return False
    return True


class _Ending:
    """The sends that end an answer, each waiting for the client until ``send_by``
    (the event loop's time) at most (`_send_by`). The client is ``stalled`` once
    one has run out (or the relay's deadline ran out while a send waited): it
    read nothing more in time, and what was cut is missing from what it has.
    Nothing more is sent to it then: a later send could go out at once, the
    client reading again just after the deadline, and end the response as if
    it were whole, or wait without the bound."""

    __slots__ = ("send", "send_by", "stalled")

    def __init__(self, send: Send, send_by: float, *, stalled: bool = False) -> None:
        self.send = send
        self.send_by = send_by
        self.stalled = stalled

    async def __call__(self, message: Message) -> bool:
        """Send ``message`` unless the client is stalled: False if it was not sent."""
        if self.stalled:
            return False
        if not await _send_by(self.send, message, self.send_by):
            self.stalled = True
            return False
        return True


def _meter_unsent(meter_chunk: Callable[[bytes], object], chunk: bytes) -> Exception | None:
    """Meter a chunk whose send to the client never completed (the deadline ran
    out, or the request was cancelled, while it waited): passed on or not, the
    upstream produced it. What metering it raised is returned, for the ending:
    an event too large charges what was read or the estimate, anything else is
    a bug, charged as the relay's own failures are (never refunded)."""
    try:
        meter_chunk(chunk)
    except Exception as exc:
        return exc
    return None


def _sending_by(send: Send, send_by: float) -> Send:
    """``send``, each message waiting for the client until ``send_by`` at most,
    then raising `_ClientStalled` (`_send_by`)."""

    async def bounded(message: Any) -> None:
        if not await _send_by(send, message, send_by):
            raise _ClientStalled

    return bounded


async def _left() -> Message:
    """The ``receive`` of a client the gateway no longer waits for: it has left."""
    return {"type": "http.disconnect"}


async def _unsent(message: Any) -> None:
    """The ``send`` of a client the gateway no longer waits for: nothing is sent."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


_CONVERSATION_PATH = re.compile(r"^/conversations/([^/]+)(?:/|$)")


def _conversation_named(x: Exchange) -> str | None:
    """The Dify conversation a request names (its body's or query's
    ``conversation_id``, or a ``/conversations/ID`` path), or None: a new
    conversation ("") names none."""
    found: object = None
    if x.json is not None:
        found = x.json.get("conversation_id")
    if not found and x.query:
        values = parse_qs(x.query.decode("latin-1")).get("conversation_id")
        found = values[0] if values else None
    if not found:
        match = _CONVERSATION_PATH.match(x.path)
        found = unquote(match.group(1)) if match else None
    if not isinstance(found, str) or not found.strip():
        return None
    # As Dify reads it (review-conv2 F4): any spelling of the UUID is the one
    # the ledger records.
    return canonical_uuid(found.strip())


def _serialised(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        # orjson reads deeper documents than it writes: what cannot be written
        # again cannot be forwarded.
        raise BadRequest("The request body is nested too deeply to forward.") from None


class Exchange:
    """One request on its way through the proxy: what the pipeline steps share."""

    __slots__ = (
        "attempts",
        "body",
        "call_price",
        "client",
        "conversation",
        "dialect",
        "failure",
        "follow",
        "followed",
        "forwarded_at",
        "headers",
        "holder",
        "json",
        "method",
        "mount",
        "path",
        "prepared",
        "query",
        "rate_headers",
        "request_id",
        "responded",
        "route",
        "snap",
        "spool",
        "started",
        "target",
        "ticket",
        "upload",
        "upload_limits",
        "upload_ticket",
        "user_id",
    )

    def __init__(self, request_id: str, started: float, snap: Snapshot) -> None:
        self.request_id = request_id
        self.started = started  # perf_counter() when the request arrived
        # The configuration in force when the request arrived, for its whole life
        # (gateway/snapshot.py): a reload meanwhile changes nothing of it.
        self.snap = snap
        self.forwarded_at = started  # perf_counter() when it was sent upstream
        self.method = ""
        # Issue 23: the mount the path is under, its dialect, and the named upstream
        # the request is forwarded to (with its client): the first of ``attempts``
        # until one fails and the next is tried.
        self.mount: Mount | None = None
        self.dialect: Upstream = snap.upstream  # the primary's, until the mount is known
        self.target: Target | None = None
        self.client: UpstreamClient | None = None
        self.attempts: tuple[str, ...] = ()
        # The upstream that gave the stored answer a route names (a stored
        # response read or continued), from the ledger: the one that keeps it.
        self.holder: str | None = None
        self.path = ""  # canonical, relative to the mount
        self.query = b""
        self.headers = _NO_HEADERS
        self.route = _NO_ROUTE
        self.user_id = ""
        self.json: dict[str, Any] | None = None  # the parsed JSON body, rewritten
        self.body: bytes | AsyncIterator[bytes] | None = None  # what is forwarded
        self.failure = BodyFailure()  # what a streamed body raised
        self.spool: IO[bytes] | None = None  # a body read whole before it is forwarded
        self.upload: UserFieldRewriter | None = None
        # An upload's limits (issue 21), and its reservation once the file is read.
        self.upload_limits = NO_UPLOAD_LIMITS
        self.upload_ticket: UploadTicket | None = None
        self.call_price: CallPrice | None = None  # a side cost's price, once routed
        self.prepared: Prepared | None = None
        self.ticket: Ticket | None = None
        self.rate_headers: Headers = []
        self.responded = False  # the response has started: its status is sent
        # A resume (gateway/follow.py): the gateway's own read of the resumed run,
        # opened before the submit is forwarded; once the submit is accepted the
        # read owns the reservation (``followed``) and settles it.
        self.follow: Follow | None = None
        self.followed = False
        # A Dify chat message: the conversation it continues, "" for one it
        # begins (gateway/conversations.py); None for any other request.
        self.conversation: str | None = None

    @property
    def answer_body(self) -> dict[str, Any]:
        return self.json if self.json is not None else {}

    def first_byte(self, metrics: Metrics) -> None:
        elapsed = time.perf_counter() - self.started
        metrics.observe("gateway_time_to_first_byte_seconds", elapsed, route=self.route.kind)

    def timings(self) -> tuple[float, float]:
        """(upstream, overhead) in milliseconds, as the ledger records them."""
        now = time.perf_counter()
        return (now - self.forwarded_at) * 1000, (self.forwarded_at - self.started) * 1000


class ProxyStorage(Accounting, Ownership, PausedForms, Protocol):
    """The storage roles the proxy reaches itself: a fallback's pending row and
    an upload's count (admission and settling go through the `Admitter` and the
    `Settler`), which upstream a conversation lives in, and paused runs' forms
    (its `Follows`)."""


class Proxy:
    """The /v1 pipeline, wired with what it uses (gateway/runtime.py builds it)."""

    def __init__(
        self,
        current: Current,
        *,
        storage: ProxyStorage,
        settler: Settler,
        clients: Mapping[str, UpstreamClient],
        admitter: Admitter,
        guard: RouteGuard,
        clock: Clock,
        metrics: Metrics,
        in_flight: InFlight,
        spawn: Run,
        keep: Run,
        probes: Probes,
    ) -> None:
        self._current = current
        self._storage = storage
        self._settler = settler
        self._clock = clock
        self._metrics = metrics
        self._in_flight = in_flight
        self._keep = keep
        # (upstream, call) pairs of unpriced side calls already logged: once each
        # per process (`_unpriced`).
        self._warned: set[tuple[str, str]] = set()
        self.admitter = admitter
        self.clients = clients  # by upstream name
        self.guard = guard
        self.conversations = Conversations(storage, metrics)
        self.follows = Follows(
            storage,
            clock=clock,
            metrics=metrics,
            spawn=spawn,
            keep=keep,
            settle=self._settle_answer,
            probes=probes,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        x = Exchange(new_request_id(), time.perf_counter(), self._current.snapshot)
        bind_request(x.request_id)  # the logs' request id (gateway/logs.py)
        self._in_flight.enter()
        try:
            await self._handle(x, scope, receive, send)
        except ClientGone:
            log.info("request %s: client left before sending its body", x.request_id)
        except GatewayError as exc:
            # Refusals raised before the response started.
            log.info("refused %d %s: %s", exc.status, exc.code, exc.message)
            await self._send_error(send, exc, x, scope)
        except Exception:
            # A bug, not a refusal: logged once with its traceback; the client gets
            # an error in the upstream's shape if nothing was sent yet (the
            # reservation, if any, was given back by _handle).
            log.exception("request %s: unexpected error", x.request_id)
            if not x.responded:
                failure = GatewayError("The gateway failed to handle the request.")
                await self._send_error(send, failure, x, scope)
        finally:
            if x.spool is not None:
                x.spool.close()  # (a body refused before it was forwarded)
            self._in_flight.leave()

    async def _handle(self, x: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        self._parse(x, scope)
        if x.headers.preflight and x.method == "OPTIONS":
            await self._preflight(x, send)
            return
        await self._authenticate(x)
        await self._route(x)
        if x.route.is_upload:
            # The upload limits, before the body is read (issue 21): one that
            # leaves no room for any upload refuses it here.
            x.upload_limits = await self.admitter.upload_limits(x.snap, x.user_id)
        await self._read_body(x, receive)
        if x.route.by_body:
            await self._refine(x)
        await self._choose(x)
        await self._check_models(x)
        self._rewrite(x)
        if x.prepared is not None and (x.prepared.file_ids or x.prepared.files_by_value):
            await self._check_files(x, x.prepared)
        if x.route.lists_models and x.mount is not None and x.mount.shared:
            await self._model_union(x, send)
            return
        try:
            if x.route.admitted:
                await self._admit(x)
            if x.upload is not None and x.upload_limits.limits:
                # Its file's real size when the body was read whole (an
                # upload_bytes limit needs it); else its count alone, before
                # the body streams through: the bytes follow once the upstream
                # has taken the file.
                await self._reserve_upload(x, x.upload.file_bytes if x.spool is not None else 0)
            if x.route.produces_answer:
                # A resume subscribes to the run's events before it is forwarded.
                x.follow = await self.follows.open(x)
            response = await self._forward(x)
            try:
                await self._relay(x, response, receive, send)
            finally:
                await UpstreamClient.close(response)
        finally:
            if x.follow is not None:
                await x.follow.close()  # never handed to a reader: the submit failed
            if x.ticket is not None and x.ticket.reserved and not x.followed:
                # Whatever ended the request before its answer was settled (a
                # refusal, an upstream error, a bug, a cancellation), the query
                # and the stream slot go back.
                await self._kept(self.admitter.refund(x.ticket, x.request_id))
            if x.upload_ticket is not None and x.upload_ticket.reserved:
                # The same for an upload the upstream did not take.
                await self._kept(self.admitter.release_upload(x.upload_ticket))

    # --- parse -----------------------------------------------------------------------

    def _parse(self, x: Exchange, scope: Scope) -> None:
        found = x.snap.routing.find(scope["path"])
        if found is None:  # the app sends only mounted paths here
            raise NotFound("This endpoint is not available through the gateway.", code="not_found")
        x.mount, below = found
        x.dialect = x.snap.dialects[x.mount.kind]  # refusals from here in its shape
        method: str = scope["method"]
        if not method.isupper():
            # Methods are case-sensitive (RFC 9110 9.1) and the dialects route on
            # the upper-case names, but the upstream client sends any method upper
            # case: "post" would reach the upstream as POST, unmetered.
            raise BadRequest("The request method must be written in upper case.")
        x.method = method
        x.path = canonical_path(below)
        x.query = scope.get("query_string", b"")
        x.headers = request_headers(scope["headers"], x.snap.user_header, x.dialect.key_header)

    # --- authenticate ----------------------------------------------------------------

    async def _authenticate(self, x: Exchange) -> None:
        try:
            x.user_id = await x.snap.identify(x.headers.credential, x.headers.user_header)
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="authenticate")
            raise StorageError(STORAGE_UNAVAILABLE) from exc

    # --- route (default deny) --------------------------------------------------------

    async def _route(self, x: Exchange) -> None:
        """Classify the request and apply its role before anything of the body is
        read: refuse what must not be forwarded (gateway/routing.py)."""
        await self._apply_role(x, x.dialect.route(x.method, x.path), refined=False)

    async def _refine(self, x: Exchange) -> None:
        """A route whose role its JSON body decides (Dify's rename that generates a
        name, OpenAI's response that continues a stored one): checked again."""
        route = x.dialect.refine(x.route, x.json)
        if route is not x.route:
            await self._apply_role(x, route, refined=True)

    async def _apply_role(self, x: Exchange, route: Route, *, refined: bool) -> None:
        call_prices = x.snap.config.call_prices
        assert x.mount is not None
        x.route = route = self.guard.admit_route(
            x.method, x.path, route, call_prices=call_prices, allow=x.mount.allow, refined=refined
        )
        if route.role == "side_cost":
            x.call_price = self.guard.call_price(route, call_prices)
        if route.owned_answer is not None:
            # A scoped read of a stored answer, or a side call on one (Dify's
            # text-to-audio of a message): the ledger must name the caller.
            owner = await self.guard.check_owner(route, x.user_id)
            x.holder = owner.upstream if owner is not None else None
            if owner is not None and x.method != "DELETE":
                await self._check_window(x, route, owner.created_at)

    def _history_cutoff(self, days: int) -> float:
        """The plan's history window's start, as a POSIX time: what is older is
        not shown."""
        return self._clock.now().timestamp() - days * 86400

    async def _check_window(self, x: Exchange, route: Route, created_at: datetime | None) -> None:
        """A stored answer older than the plan's history window is not read, nor
        spoken, as if it were not there (review-limits F3: the lists hid it and
        text-to-audio read it out). Deleting it stays the caller's."""
        if created_at is None:
            return
        days = (await self.admitter.plan_of(x.snap, x.user_id)).chat_history_days
        if days is None:
            return
        if created_at.timestamp() < self._history_cutoff(days):
            answer_id = route.owned_answer
            raise NotFound(f"No object found with id '{answer_id}'.", code="not_found")

    # --- read and rewrite ------------------------------------------------------------

    async def _read_body(self, x: Exchange, receive: Receive) -> None:
        """Read the request body, parsing and checking what the gateway must read
        (JSON and forms), before anything is reserved for it."""
        headers = x.headers
        route = x.route
        media_type = headers.media_type
        content_length = headers.content_length
        field = x.dialect.user_field
        limit = x.snap.config.server.max_json_body_bytes
        if is_json(media_type) or (route.produces_answer and x.method in _BODY_METHODS):
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
                x.json = parsed
        elif media_type == b"multipart/form-data":
            boundary = boundary_from_content_type(headers.content_type.decode("latin-1"))
            if boundary is None:
                raise BadRequest("The multipart body has no valid boundary.")
            x.upload = UserFieldRewriter(boundary, x.user_id, field=field)
            x.body, length = await self._multipart(x, receive, x.upload)
            if length is not None:
                headers.forward.append((b"content-length", str(length).encode()))
        elif media_type == b"application/x-www-form-urlencoded":
            if content_length is not None and content_length > limit:
                raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            x.body = with_param(await read_body(receive, limit), field, x.user_id)
        elif x.method in _BODY_METHODS and (content_length or content_length is None):
            x.body = stream_body(receive, x.failure)
            if content_length is not None:
                headers.forward.append((b"content-length", str(content_length).encode()))

    # --- choose the upstream (issue 23) ----------------------------------------------

    async def _choose(self, x: Exchange) -> None:
        """Pick the mount's upstream for the model the request names, and the
        fallbacks to try after it (gateway/mounts.py): refused 404 when no
        upstream of the mount serves the model, before anything is reserved."""
        mount = x.mount
        assert mount is not None
        if x.holder is not None and x.holder in x.snap.targets:
            if x.holder not in mount.upstreams:
                # Made at another mount: not here. Never looked up with this
                # mount's key (the same answer as for a missing object).
                answer_id = x.route.owned_answer
                raise NotFound(f"No object found with id '{answer_id}'.", code="not_found")
            # A stored answer's object (or a response continuing one) is only
            # where it was made: no other upstream of the mount has it.
            x.attempts = (x.holder,)
            self._use(x, x.holder)
            return
        if mount.direct is not None and x.route is not ALLOWED:
            # One upstream serving every model, no fallbacks: nothing to choose.
            x.attempts = mount.direct
            self._use(x, mount.direct[0])
            return
        routing = x.snap.routing
        model = x.dialect.routed_model(x.route, x.json)
        allowed: Callable[[str], bool] | None = None
        if x.route is ALLOWED:
            # Forwarded by an allow-list: only to an upstream whose own list names it.
            method, path = x.method, x.path
            allowed = lambda name: routing.allows(name, method, path)  # noqa: E731
        first = (
            routing.first(mount, model)
            if allowed is None
            else routing.first(mount, model, allowed=allowed)
        )
        if first is None:
            fields = {"model": shown_model(model) if model is not None else "(none)"}
            raise NotFound(
                english("model_not_served", **fields),
                code="model_not_found",
                key="model_not_served",
                fields=fields,
            )
        x.attempts = (
            routing.attempts(first, model)
            if allowed is None
            else routing.attempts(first, model, allowed=allowed)
        )
        if mount.kind == "dify" and len(x.attempts) > 1:  # (a Dify mount is never shared)
            conversation = _conversation_named(x)
            if conversation is not None:
                x.attempts = await self._conversation_attempts(x, conversation)
                first = x.attempts[0]
        self._use(x, first)

    async def _conversation_attempts(self, x: Exchange, conversation: str) -> tuple[str, ...]:
        """A Dify conversation lives in the app that made it: a request naming one
        goes to the upstream the ledger records for the user's conversation, and
        never falls back (no other app has it). Read only on a mount with more
        than one upstream to try."""
        try:
            made_by = await self._storage.conversation_upstream(x.user_id, conversation)
        except StorageError as exc:
            # Without the ledger: the mount's first upstream, as before fallbacks.
            self._metrics.inc("gateway_storage_errors_total", operation="conversation")
            log.warning(
                "request %s: conversation's upstream not read, sent to %s: %s",
                x.request_id,
                x.attempts[0],
                exc.message,
            )
            return x.attempts[:1]
        if made_by is not None and made_by in x.attempts:
            return (made_by,)
        return x.attempts[:1]

    def _use(self, x: Exchange, name: str) -> None:
        """Forward the request to upstream ``name`` (its address, key, client);
        the ledger records the one that answers (a fallback's, if it comes to that)."""
        x.target = x.snap.targets[name]
        x.client = self.clients[name]
        if x.ticket is not None:
            x.ticket.upstream = name

    async def _check_models(self, x: Exchange) -> None:
        """Refuse a model the user's plan does not allow (issue 21), before
        anything is reserved or forwarded: the models the dialect says the
        request names, as the upstream reads them (gateway/model_access.py).
        Nothing to do when no plan has an allow-list."""
        if not x.snap.model_lists:
            return
        requested = x.dialect.requested_models(x.route, x.json)
        if requested is not None:
            for globs in await self._model_lists(x):
                check_models(globs, requested)

    async def _model_lists(self, x: Exchange) -> list[tuple[str, ...]]:
        """The model allow-lists that apply to the user: their plan's and their
        team's plan's, where set (a model must be in both)."""
        snap, user_id = x.snap, x.user_id
        default_plan = snap.config.accounting.default_plan
        try:
            user = await snap.users.get(user_id, default_plan=default_plan)
        except StorageError as exc:
            # The user's row is past the cache's TTL and the database is away: the
            # default plan's list, as admission takes the default plan's limits
            # (admission.on_storage_error decides whether the answer is served).
            self._metrics.inc("gateway_storage_errors_total", operation="user")
            log.warning(
                "user %s not read, the default plan's model list applied: %s", user_id, exc.message
            )
            plan = snap.config.plan(default_plan)
            return [plan.models] if plan.models is not None else []
        plans: list[Plan | None] = [snap.plan_view(user).plan]
        try:
            plans.append(await snap.team_plan(user))
        except StorageError as exc:
            # The team is cached for auth.key_cache_ttl; past that, an outage lets
            # the request through on the user's own list, as admission fails open
            # (docs/quotas.md, "Model allow-lists").
            self._metrics.inc("gateway_storage_errors_total", operation="team")
            log.warning("team of %s not read, its model list not applied: %s", user_id, exc.message)
        return [plan.models for plan in plans if plan is not None and plan.models is not None]

    def _rewrite(self, x: Exchange) -> None:
        """Let the dialect set the user (and what else it needs), then serialise the
        JSON body: a body that cannot be forwarded is refused before admission."""
        if x.route.produces_answer:
            x.dialect.check_headers(x.route, x.headers.forward)
        prepared = x.dialect.prepare(
            x.route, x.json, x.query, x.user_id, method=x.method, request_id=x.request_id
        )
        x.prepared = prepared
        x.query = prepared.query
        forward = x.headers.forward
        if prepared.headers:
            sent = {name for name, _ in forward}
            forward += [(k, v) for k, v in prepared.headers if k not in sent]
        route = x.route
        if route.produces_answer or route.is_history or route.lists_models or route.is_upload:
            # Usage is read from the raw bytes, history pages and model lists
            # may be filtered, an upload's reply names its file: ask for them
            # uncompressed.
            forward.append((b"accept-encoding", b"identity"))
        else:
            # Other bodies may be passed on compressed as they come, but only
            # in an encoding the gateway decodes: an error's body is read for
            # the keys it may quote (`_error_body`). A client that names none
            # gets identity: the HTTP client would otherwise ask for its own
            # defaults, br and zstd among them where their libraries are
            # installed (review 6, R6-4).
            accept = x.headers.accept_encoding
            forward.append(
                (b"accept-encoding", b"identity" if accept is None else _decodable_accept(accept))
            )
        x.json = prepared.body
        if x.json is not None:
            x.body = _serialised(x.json)

    async def _check_files(self, x: Exchange, prepared: Prepared) -> None:
        """An answer that attaches stored files (Dify's): each must be the
        caller's upload (review F9, 404 otherwise); and one that gives a file
        otherwise than as an upload (a URL the upstream fetches itself) is
        refused when the caller's plan limits uploads (F5), which such a file
        would pass unchecked and uncounted."""
        if prepared.files_by_value and await self._limits_uploads(x):
            raise Forbidden(
                "Your plan limits uploads: attach files by uploading them "
                "(transfer_method local_file), not by URL.",
                code="file_transfer_not_allowed",
            )
        if prepared.file_ids:
            await self.guard.check_files(prepared.file_ids, x.user_id)

    async def _limits_uploads(self, x: Exchange) -> bool:
        """Whether the caller's plan sets a file size, or it or their team's
        an ``uploads`` / ``upload_bytes`` limit (what holds their uploads).
        Without the user's plan: refused (503), as an upload is; a team that
        cannot be read leaves the user's own plan, as admission does."""
        snap, user_id = x.snap, x.user_id
        try:
            user = await snap.users.get(user_id, default_plan=snap.config.accounting.default_plan)
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="user")
            raise StorageError(STORAGE_UNAVAILABLE) from exc
        view = snap.plan_view(user)
        if view.plan.file_size_mb is not None or _limits_uploads(view.limits):
            return True
        try:
            team = await snap.team_view(user)
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="team")
            log.warning("team of %s not read, its upload limits not applied: %s", user_id, exc)
            return False
        return team is not None and _limits_uploads(team.limits)

    # --- admit -----------------------------------------------------------------------

    async def _admit(self, x: Exchange) -> None:
        began = time.perf_counter()
        try:
            assert x.target is not None and x.mount is not None
            began_with: ConversationFeatures | None = None  # (continues none)
            rules = x.snap.config
            if x.mount.kind == "dify" and (
                rules.advanced_rag.request_path or rules.web_search.request_path
            ):
                x.conversation = conversation_of(x.route, x.json)
                if x.conversation:
                    # Dify answers it with what its first message asked for.
                    began_with = await self.conversations.features(x.user_id, x.conversation)
            admitted = await self.admitter.admit(
                x.snap,
                x.user_id,
                x.request_id,
                x.route,
                x.answer_body,
                dialect=x.dialect,
                upstream=x.target.name,
                conversation=began_with,
            )
        finally:
            self._metrics.observe("gateway_admission_seconds", time.perf_counter() - began)
        x.ticket, x.rate_headers = admitted
        if x.ticket.body_changed and x.json is not None:
            x.body = _serialised(x.json)

    # --- forward ---------------------------------------------------------------------

    async def _forward(self, x: Exchange) -> httpx.Response:
        """Send the request upstream; while an upstream fails before answering -
        unreachable, timed out before it took the request, or answering 429 or
        5xx - send it on to the next of its fallbacks (issue 23). One that may
        have taken the request (`request_taken`: a read timeout, a disconnect) is
        fallen back from only with its ``fallback_after_timeout``: else the
        request ends there, as at the last upstream. Nothing of a failed
        attempt reaches the client, and the one reservation stays the request's:
        the client sees one answer, charged once. The last attempt's failure, or
        answer, is the request's."""
        metrics = self._metrics
        query = "?" + x.query.decode("latin-1") if x.query else ""
        headers = x.headers.forward
        if isinstance(x.body, bytes):
            headers.append((b"content-length", str(len(x.body)).encode()))
        # The gateway's request id, for the upstream's logs; also the name vLLM
        # gives the answer (the client's own was dropped: `http._DROP_REQUEST`).
        headers.append((b"x-request-id", x.request_id.encode()))
        assert x.target is not None
        attempts = x.attempts
        if not (x.body is None or isinstance(x.body, bytes)) or x.follow is not None:
            # A body forwarded as it is read cannot be sent twice; a resume's read
            # of its run is open on the first upstream already.
            attempts = attempts[:1]
        x.forwarded_at = time.perf_counter()
        metrics.observe("gateway_overhead_seconds", x.forwarded_at - x.started, route=x.route.kind)
        if x.route.kind == "stop" and len(attempts) > 1:
            return await self._stop_everywhere(x, attempts, headers, query)
        last = len(attempts) - 1
        for index, name in enumerate(attempts):
            if index:
                failed = x.target.name
                self._use(x, name)
                metrics.inc("gateway_upstream_fallbacks_total", 1, **{"from": failed, "to": name})
                log.warning("request %s: upstream %s failed; trying %s", x.request_id, failed, name)
                await self._move_pending(x, name)
            target = x.target
            try:
                # Each attempt its own key, account and operator's headers.
                response = await self._open(
                    x, target.url + x.path + query, target.request_headers(headers)
                )
            except (UpstreamTimeout, UpstreamUnavailable) as exc:
                outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "unreachable"
                metrics.inc("gateway_upstream_attempts_total", upstream=name, outcome=outcome)
                taken = request_taken(exc)
                if index < last and (not taken or target.settings.fallback_after_timeout):
                    log.warning("request %s: upstream %s: %r", x.request_id, name, exc)
                    if taken:
                        # Its answer may be generated and billed: not in the ledger.
                        metrics.inc("gateway_upstream_abandoned_total", upstream=name)
                    continue
                await self._failed(x, exc, taken=taken)
                raise
            status = response.status_code
            outcome = (
                "rate_limited"
                if status == _RATE_LIMITED
                else "server_error"
                if status >= _SERVER_ERROR
                else "answered"
            )
            metrics.inc("gateway_upstream_attempts_total", upstream=name, outcome=outcome)
            if outcome != "answered" and index < last:
                if outcome == "server_error" and x.dialect.bills_errors and x.route.produces_answer:
                    # A run that began, failed, and was billed (`_relay_error`) is
                    # the request's answer, charged: not run again at the next one.
                    billed = await self._billed_failure(x, response)
                    if billed is not None:
                        return billed
                with contextlib.suppress(UpstreamBroken):
                    await response.aclose()
                continue
            return response
        raise AssertionError("a request has at least one upstream to try")

    async def _billed_failure(self, x: Exchange, response: httpx.Response) -> httpx.Response | None:
        """A 5xx from an upstream with fallbacks, of a dialect whose errors may
        come after billed work: the response again, its body read whole, when the
        dialect says the run had begun and was billed; else None (read, or
        larger than an error is: the request goes on to the next upstream). One
        in an encoding the gateway cannot read is taken as billed, unread, when
        the dialect says an error of its status may have been (review 6, R6-1;
        review 7, R7-1): running it again would have it paid twice and charged
        once; `_relay_error` charges it."""
        status = response.status_code
        headers = [(k.lower(), v) for k, v in response.headers.raw]
        read = _error_body(x, response, headers)
        if read is None:  # an encoding the gateway cannot read: as the dialect takes it
            billed = x.dialect.billed_error(x.route, x.answer_body, status, None)
            return response if billed else None
        chunks, headers = read
        body, whole = await _read_small(x, chunks)
        if not whole or not x.dialect.billed_error(x.route, x.answer_body, status, body):
            return None
        # Read to its end, or to where it broke (its rest unread, the connection
        # still held): closed here, not when it is collected.
        with contextlib.suppress(UpstreamBroken):
            await response.aclose()
        # Decoded (`_error_body`, bounded): its headers say so.
        return httpx.Response(status, headers=headers, content=body)

    async def _stop_everywhere(
        self, x: Exchange, attempts: tuple[str, ...], headers: Headers, query: str
    ) -> httpx.Response:
        """A Dify stop names a task, which only the app that runs it knows, and the
        gateway does not record where a task runs until its answer settles: the
        stop goes to every upstream the mount's answers may have gone to (each
        with its own key and the caller as the user; an app that runs no such
        task does nothing). The first success is answered, else the last reply."""
        chosen: httpx.Response | None = None
        failure: UpstreamTimeout | UpstreamUnavailable | None = None
        for name in attempts:
            self._use(x, name)
            assert x.target is not None
            try:
                response = await self._open(
                    x, x.target.url + x.path + query, x.target.request_headers(headers)
                )
            except (UpstreamTimeout, UpstreamUnavailable) as exc:
                failure = exc
                log.warning("request %s: stop at %s: %r", x.request_id, name, exc)
                continue
            if chosen is None or (response.is_success and not chosen.is_success):
                if chosen is not None:
                    await chosen.aclose()
                chosen, answered = response, name
            else:
                await response.aclose()
        if chosen is None:
            assert failure is not None
            raise failure
        self._use(x, answered)
        return chosen

    async def _move_pending(self, x: Exchange, name: str) -> None:
        """The answer's pending row follows it to fallback ``name``, so that a
        recovery (its gateway dying before the settle) charges the estimate to
        the upstream that was answering. One small write, made only when a
        request falls back (a rare event): the request path stays one storage
        round trip. Fails open: with the database away the request goes on, the
        error logged and counted; its settle still records ``name`` (the
        ticket's), and only a recovery would name the earlier upstream."""
        ticket = x.ticket
        if ticket is None or not ticket.reserved or ticket.pending_id is None:
            return  # nothing pending (no answer, or admitted fail-open)
        try:
            await self._storage.move_pending(ticket.pending_id, upstream=name)
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="move_pending")
            log.error(
                "request %s: could not move its pending answer to upstream %s "
                "(a recovery would charge the one before): %s",
                x.request_id,
                name,
                exc.message,
            )

    async def _open(self, x: Exchange, url: str, headers: Headers) -> httpx.Response:
        """One attempt: the request sent to ``x.target``, its response's headers read."""
        client = x.client
        assert client is not None and x.target is not None
        timeout = client.streaming_timeout
        if x.route.produces_answer and not x.dialect.is_streaming(x.route, x.answer_body):
            # A blocking answer sends nothing until it is complete: wait as long as
            # an answer may take, not just the gap allowed between two chunks.
            timeout = x.target.blocking_timeout
        try:
            return await client.open(
                x.method, url, headers=headers, content=x.body, timeout=timeout, failure=x.failure
            )
        except asyncio.CancelledError:
            ticket = x.ticket
            if ticket is not None and ticket.reserved:
                # The server's shutdown grace ran out while the upstream was still
                # preparing this answer, which it may well go on generating (and
                # billing): charged as an answer never seen, like a timeout.
                self._metrics.inc("gateway_answers_cut_at_shutdown_total")
                result = dataclasses.replace(self._unanswered(x), outcome="shutdown")
                await self._kept(self._settle(x, result, disconnected=False))
            if x.upload is not None and x.route.is_upload and x.upload.finished:
                # The same for a file the upstream may have stored whole.
                self._upload_kept(x)
                await self._kept(self._count_upload(x))
            raise

    async def _failed(
        self, x: Exchange, exc: UpstreamTimeout | UpstreamUnavailable, *, taken: bool
    ) -> None:
        """The upstream the request ends at failed before answering: the last one
        to try, or one that may have taken the request (``taken``,
        `request_taken`), which is not fallen back from."""
        metrics = self._metrics
        if taken and x.upload is not None and x.route.is_upload and x.upload.finished:
            # The upstream may have stored the whole file before it failed to
            # answer: counted, as an answer it may be generating is charged.
            self._upload_kept(x)
            await self._kept(self._count_upload(x))
        if isinstance(exc, UpstreamUnavailable):
            metrics.inc("gateway_upstream_errors_total", kind="connect")
            log.warning("request %s: upstream unreachable: %r", x.request_id, exc.__cause__)
            return
        ticket = x.ticket
        if taken and ticket is not None and ticket.reserved:
            # The request reached the upstream, which may well be answering (and
            # billing) still: the query stays spent and an estimate is recorded.
            metrics.inc("gateway_upstream_errors_total", kind="answer_timeout")
            log.warning(
                "request %s: upstream took too long to answer; charging an estimate",
                x.request_id,
            )
            result = self._unanswered(x)
            await self._kept(self._settle(x, result, disconnected=False))
        else:
            metrics.inc("gateway_upstream_errors_total", kind="timeout")
            log.warning("request %s: upstream timed out before answering: %r", x.request_id, exc)

    def _unanswered(self, x: Exchange) -> Metered:
        """What a request the upstream took but never answered is charged: a side
        call its price, an answer the dialect's estimate."""
        if x.call_price is not None:
            return dataclasses.replace(side_cost_result(x.call_price), outcome="timeout")
        return x.dialect.unanswered(x.route, x.answer_body)

    # --- relay -----------------------------------------------------------------------

    async def _relay(
        self, x: Exchange, response: httpx.Response, receive: Receive, send: Send
    ) -> None:
        metrics = self._metrics
        status = response.status_code
        raw = response.headers.raw  # a new list on every access
        headers = response_headers(raw)
        headers.append((b"x-request-id", x.request_id.encode()))
        headers.extend(x.rate_headers)
        metrics.inc("gateway_requests_total", route=x.route.kind, status=f"{status // 100}xx")
        content_type = next((v for k, v in raw if k.lower() == b"content-type"), b"").lower()
        if x.follow is not None and 200 <= status < 300:
            # The form was accepted and the run resumes upstream: the gateway's own
            # read of it settles the submit's reservation (gateway/follow.py); the
            # reply itself ({} from Dify) is passed on as it is.
            follow, x.follow = x.follow, None
            x.followed = True
            self.follows.start(x, follow)
            await self._relay_plain(x, response, status, headers, content_type, receive, send)
            return
        if x.ticket is None or not 200 <= status < 300:
            if x.ticket is not None and x.dialect.bills_errors and x.route.produces_answer:
                await self._relay_error(x, response, status, headers, send)
                return
            # Not an answer (or a refused one): nothing to meter.
            await self.admitter.refund(x.ticket, x.request_id)
            await self._relay_plain(x, response, status, headers, content_type, receive, send)
            return
        assert x.target is not None
        send_by = asyncio.get_running_loop().time() + x.target.settings.total_timeout
        if x.call_price is not None:
            # A paid side call the upstream accepted: charged its price, however its
            # reply ends (the upstream has done, and billed, the work). Its sends
            # wait for the client no longer than the relay's deadline, as an
            # answer's do: a client that stops reading holds its connection, never
            # the charge (nor the reservation until it).
            try:
                await self._relay_plain(
                    x, response, status, headers, content_type, receive, _sending_by(send, send_by)
                )
            except _ClientStalled:
                log.warning(
                    "request %s: could not send a side call's reply: "
                    "the client read nothing more in time",
                    x.request_id,
                )
            finally:
                await self._kept(
                    self._settle(x, side_cost_result(x.call_price), disconnected=False)
                )
            return
        # The head waits for the client (it can only wait behind an unread answer
        # pipelined before it) no longer than the relay's deadline; then the
        # answer is relayed as to a client that left, and settled, and the
        # response never started: `gateway serve` closes the connection
        # (HeadWithBodyCycle), where uvicorn alone would answer 500.
        if not await self._start(x, send, status, headers, send_by=send_by):
            log.warning(
                "request %s: could not start the response: the client read nothing in time",
                x.request_id,
            )
            receive, send = _left, _unsent
        sse = content_type.startswith(_SSE)
        with metrics.streaming(sse):
            await self._relay_answer(x, response, sse, receive, send)

    @staticmethod
    async def _start(
        x: Exchange, send: Send, status: int, headers: Headers, *, send_by: float | None = None
    ) -> bool:
        """Start the response: the one place ``x.responded`` turns true (from here
        the status is sent, and a failure can only end the body). With ``send_by``
        (the event loop's time), the head waits for the client until then at most
        (False then); as with the ending's sends, only a send that must wait sets
        a timer."""
        x.responded = True
        note_status(status)
        message = {"type": "http.response.start", "status": status, "headers": headers}
        if send_by is None:
            await send(message)
            return True
        return await _send_by(send, message, send_by)

    async def _relay_error(
        self, x: Exchange, response: httpx.Response, status: int, headers: Headers, send: Send
    ) -> None:
        """An HTTP error answering an answer request of a dialect whose errors
        may come after billed work (`Upstream.bills_errors`): read whole (up to
        _SMALL_BODY: an error is small; past it, charged), the dialect says
        whether the upstream had started; then the prompt's estimate is charged
        (outcome ``error``) or the reservation given back - before the client
        hears of it, as any record - and the error relayed (`_pass_on`)."""
        chunks: AsyncIterator[bytes] | None = None
        body: bytes | None
        if response.is_stream_consumed:  # read whole and decoded (`_billed_failure`)
            body, whole = response.content, True
        elif (read := _error_body(x, response, headers)) is not None:
            chunks, headers = read
            body, whole = await _read_small(x, chunks)
        else:
            # An encoding the gateway cannot read: the dialect says whether such an
            # error may have come after billed work (review 6 R6-1, review 7 R7-1).
            body, whole = None, True
        if not whole or x.dialect.billed_error(x.route, x.answer_body, status, body):
            estimate = x.dialect.unanswered(x.route, x.answer_body)
            log.info(
                "request %s: upstream error %d after its run began: charged", x.request_id, status
            )
            await self._kept(
                self._settle(x, dataclasses.replace(estimate, outcome="error"), disconnected=False)
            )
        else:
            await self.admitter.refund(x.ticket, x.request_id)
        if body is None:
            await self._pass_unreadable(x, status, headers, send)
            return
        await self._pass_on(x, status, headers, body, None if whole else chunks, send)

    async def _relay_plain(
        self,
        x: Exchange,
        response: httpx.Response,
        status: int,
        headers: Headers,
        content_type: bytes,
        receive: Receive,
        send: Send,
    ) -> None:
        ok = 200 <= status < 300
        if ok and x.upload is not None and x.route.is_upload:
            # The upstream took the file: its reservation stays, as its record,
            # counted again by its key if need be (its bytes, an outcome lost),
            # before the client hears of it and shielded from its leaving.
            self._upload_kept(x)
            await self._kept(self._count_upload(x))
            if isinstance(x.dialect, KeepsUploads):
                await self._relay_upload(x, x.dialect, response, status, headers, send)
                return
        if ok and x.route.is_history and b"json" in content_type:
            days = (await self.admitter.plan_of(x.snap, x.user_id)).chat_history_days
            listing = self._lists_conversations(x)
            if days is not None or listing:
                await self._history(x, send, response, status, headers, days, listing=listing)
                return
        if ok and x.route.lists_models and b"json" in content_type:
            lists = await self._model_lists(x)
            if x.target is not None and x.target.settings.models:
                lists.append(x.target.settings.models)  # what the mount routes to it
            if lists:
                await self._models(x, send, response, status, headers, lists)
                return
        sse = content_type.startswith(_SSE)
        chunks: AsyncIterator[bytes] | None = None
        if _is_error(status) and x.method != "HEAD":
            read = _error_body(x, response, headers)
            if read is None:
                await self._pass_unreadable(x, status, headers, send)
                return
            chunks, headers = read
            if not sse:
                # An error, read whole (up to _SMALL_BODY) to pass it on without
                # the operator's keys (`_pass_on`).
                body, whole = await _read_small(x, chunks)
                await self._pass_on(x, status, headers, body, None if whole else chunks, send)
                return
            # An error as an event stream (a server that streams every reply to
            # stream=true): masked as it comes (review5 R5-3).
            headers, _, chunks = _without_keys(x, headers, b"", chunks)
        await self._start(x, send, status, headers)
        if sse:
            # An unmetered event stream (a run's events read again): it may stay open
            # for minutes, so it ends when its client leaves, not when the upstream does.
            stream = response.aiter_raw() if chunks is None else chunks
            if not await self._pass_stream(x, stream, receive, send):
                return
        else:
            await self._pass_body(x, response, send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_upload(
        self,
        x: Exchange,
        dialect: KeepsUploads,
        response: httpx.Response,
        status: int,
        headers: Headers,
        send: Send,
    ) -> None:
        """An accepted upload's reply (a small JSON body), read whole: whose the
        file it names is, is kept before the client hears of it (review F9), so
        an answer sent the moment the reply arrives finds the record. A reply
        past ``_SMALL_BODY`` is passed on unread: its file stays
        unknown, and refused to every answer."""
        chunks = response.aiter_raw()
        body, whole = await _read_small(x, chunks)
        file_id = dialect.uploaded_file_id(x.route, body) if whole else None
        if file_id is not None:
            await self._kept(self._remember_upload(x, file_id))
        await self._pass_on(x, status, headers, body, None if whole else chunks, send)

    async def _pass_unreadable(
        self, x: Exchange, status: int, headers: Headers, send: Send
    ) -> None:
        """An error whose body is in an encoding the gateway cannot decode (an
        upstream that ignored the Accept-Encoding it was sent): the key it may
        quote cannot be looked for, so it is not passed on. The upstream's status
        and headers (Retry-After...) go with the gateway's own error in the
        dialect's shape instead (review5 R5-1)."""
        coding = _coding(headers) or b""
        log.warning(
            "request %s: upstream error %d in Content-Encoding %r, which the gateway cannot "
            "read: replaced",
            x.request_id,
            status,
            coding.decode("latin-1"),
        )
        message = "The upstream's error could not be read."
        body = x.dialect.error_body(status, "upstream_error", message)
        dropped = (b"content-length", b"content-encoding", b"content-type")
        headers = [(k, v) for k, v in headers if k not in dropped]
        headers.append((b"content-type", b"application/json"))
        await self._pass_on(x, status, headers, body, None, send)

    async def _pass_on(
        self,
        x: Exchange,
        status: int,
        headers: Headers,
        head: bytes,
        rest: AsyncIterator[bytes] | None,
        send: Send,
    ) -> None:
        """A reply read in part or whole (`_read_small`): what was read, then
        the ``rest`` of its body as it comes. An error's body goes without the
        request's upstream keys (`_without_keys`)."""
        if _is_error(status):
            headers, head, rest = _without_keys(x, headers, head, rest)
        await self._start(x, send, status, headers)
        await send({"type": "http.response.body", "body": head, "more_body": rest is not None})
        if rest is not None:
            await self._pass_chunks(x, rest, send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _remember_upload(self, x: Exchange, file_id: str) -> None:
        """Keep the upload's file as the caller's. A record that fails is
        logged and counted: the upload stands, and answers naming its file are
        refused (nobody's file is given to anybody)."""
        assert x.target is not None
        try:
            await self._storage.remember_upload(
                file_id, user_id=x.user_id, upstream=x.target.name, now=self._clock.now()
            )
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="remember_upload")
            log.error(
                "request %s: could not keep upload %s as %s's (answers naming it will "
                "be refused): %s",
                x.request_id,
                file_id,
                x.user_id,
                exc.message,
            )

    async def _pass_body(self, x: Exchange, response: httpx.Response, send: Send) -> None:
        await self._pass_chunks(x, response.aiter_raw(), send)

    async def _pass_chunks(self, x: Exchange, chunks: AsyncIterator[bytes], send: Send) -> None:
        try:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamBroken as exc:
            log.warning(
                "request %s: upstream body ended abnormally: %r", x.request_id, exc.__cause__
            )

    async def _pass_stream(
        self, x: Exchange, chunks: AsyncIterator[bytes], receive: Receive, send: Send
    ) -> bool:
        """Pass an unmetered stream on until it ends or its client leaves (False)."""
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(_wait_for_disconnect(receive))
        relay = loop.create_task(self._pass_chunks(x, chunks, send))
        try:
            await asyncio.wait((watcher, relay), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watcher, relay):
                task.cancel()
            await asyncio.wait((watcher, relay))
        if relay.cancelled():
            log.info("request %s: client left an event stream", x.request_id)
            return False
        relay.result()  # a bug in the relay is raised here
        return True

    async def _relay_answer(
        self, x: Exchange, response: httpx.Response, sse: bool, receive: Receive, send: Send
    ) -> None:
        """Pass an answer on as it arrives while metering it, then settle it.

        The I/O half of the relay: read the upstream, watch the client, keep the
        deadlines, and do what the `Relay` (gateway/relay.py) decides. A 2xx
        answer that is not SSE is read as one body (blocking mode), also when it
        turns out unreadable: the dialect then charges an estimate.
        """
        metrics = self._metrics
        upstream = x.dialect
        route = x.route
        assert x.prepared is not None
        client = x.client
        assert x.target is not None and client is not None
        settings = x.target.settings
        relay = Relay(
            upstream,
            route,
            x.answer_body,
            sse=sse,
            meter=upstream.stream_meter(route, x.answer_body) if sse else None,
            decoder=SSEDecoder(max_event_bytes=settings.max_event_bytes) if sse else None,
            transform=upstream.stream_transform(route, x.prepared) if sse else None,
            policy=settings.on_client_disconnect,
            grace=settings.disconnect_grace,
            max_buffered=_MAX_BUFFERED_BODY,
        )
        # The first bytes of an answer beginning a conversation that asked for
        # advanced RAG or web search, or turned the web off, wait for its row
        # (gateway/conversations.py).
        hold = self._conversation_hold(x, sse)
        loop = asyncio.get_running_loop()
        # The task that notices a client leaving, and the deadline, matter only
        # while this relay waits (on the upstream, on the client's socket); when
        # the whole body is already here, nothing below waits before the end:
        # neither is started until something would (the task could not have run
        # before, so it could not have noticed anything; the deadline is the one
        # it would have been, counted from here).
        total = settings.total_timeout
        since = loop.time()
        watcher: asyncio.Task[None] | None = None
        timer: asyncio.TimerHandle | None = None  # the stop call at the deadline
        if not client.complete(response):
            watcher = loop.create_task(_wait_for_disconnect(receive))
            timer = self._stop_timer(x, relay, relay.stop_at(total))
        forward = relay.forward
        meter_chunk = relay.meter_chunk
        first_byte = True
        # The last chunk, when the upstream's body ended with it: sent with the
        # end of the response, in one write to the client instead of two (what
        # the client reads is the same, at the same moment: nothing waits).
        ended = client.ended(response)
        last: bytes | None = None
        cancelled: asyncio.CancelledError | None = None
        # A send is waiting for the client: a deadline that runs out then finds
        # a client that read nothing more in time. Its chunk is metered after the
        # send (the meter's work does not delay the bytes), so one that never
        # completes leaves its chunk unmetered: metered by the ending instead
        # (`_meter_unsent`), since the upstream produced, and bills, it.
        sending = stalled = False
        unmetered: Exception | None = None  # what metering that chunk raised
        ending: list[RelayCommand]
        # A body already here whole, in one read (`UpstreamClient.whole`: a
        # blocking answer, usually) is relayed as the loop below relays its one
        # chunk - forwarded, kept to go with the end, metered - without the
        # loop's reader and deadline: nothing waits before the end.
        deadline: asyncio.Timeout | None = None
        try:
            whole = None if watcher is not None else client.whole(response)
            if whole is not None:
                out = forward(whole)
                if hold is not None:
                    released = await self._held(x, hold, whole, end=True)
                    hold = None
                    out = released if out is not None else None
                if out is not None:
                    x.first_byte(metrics)
                    last = out
                meter_chunk(whole)
            else:
                # (An answer stopped by a call at the deadline is read on for its
                # usage: `Relay.after_stop`.)
                limit = None if watcher is None else total + relay.after_stop(total)
                async with asyncio.timeout(limit) as deadline:
                    async for chunk in client.raw(response):
                        if watcher is not None and watcher.done() and relay.listening:
                            self._client_left(x)
                            for command in relay.client_left():
                                if isinstance(command, RelayStop):
                                    if command.task_id is not None:
                                        relay.stop_answered(await self._stop(x, command.task_id))
                                elif isinstance(command, ExtendDeadline):
                                    deadline.reschedule(loop.time() + command.seconds)
                                elif isinstance(command, StopAfter):
                                    if timer is not None:
                                        timer.cancel()  # the total's: the grace's now
                                    timer = self._stop_timer(x, relay, command)
                            if not relay.reading:
                                # Closing the response stops the answer; the chunk
                                # in hand is metered first (it may be the first
                                # sign the answer began, and billed).
                                meter_chunk(chunk)
                                if hold is not None:
                                    hold.feed(chunk)  # (it may name the conversation)
                                break
                        out = forward(chunk)
                        if hold is not None:
                            # Fed whether the client is there or not: a conversation
                            # begun is kept even if its first bytes go nowhere.
                            released = await self._held(
                                x, hold, chunk, end=ended is not None and ended()
                            )
                            if hold.resolved:
                                hold = None
                            out = released if out is not None else None
                        if out is not None:
                            if first_byte:
                                first_byte = False
                                x.first_byte(metrics)
                            if ended is not None and ended():
                                last = out  # the end is known: sent with it, below
                            else:
                                if watcher is None:
                                    watcher = loop.create_task(_wait_for_disconnect(receive))
                                    deadline.reschedule(since + total + relay.after_stop(total))
                                    timer = self._stop_timer(
                                        x, relay, relay.stop_at(since + total - loop.time())
                                    )
                                sending = True
                                await send(
                                    {"type": "http.response.body", "body": out, "more_body": True}
                                )
                                sending = False
                        meter_chunk(chunk)
        except (UpstreamBroken, TimeoutError) as exc:
            # TimeoutError: the deadline ran out (upstream.total_timeout, or the
            # grace once the client left); the upstream's own errors arrive mapped.
            kind: Literal["read", "timeout"] = (
                "read" if isinstance(exc, UpstreamBroken) and not exc.timed_out else "timeout"
            )
            metrics.inc("gateway_upstream_errors_total", kind=f"mid_stream_{kind}")
            log.warning(
                "request %s: upstream stream ended abnormally (%s): %r",
                x.request_id,
                kind,
                exc.__cause__ if isinstance(exc, UpstreamBroken) else exc,
            )
            if sending and isinstance(exc, TimeoutError):
                stalled = True
                log.warning(
                    "request %s: could not send an event: the client read nothing more in time",
                    x.request_id,
                )
                unmetered = _meter_unsent(meter_chunk, chunk)
            self._noticed(x, relay, watcher)
            ending = self._unmetered_ending(x, relay, unmetered) or relay.upstream_broken(kind)
        except EventTooLarge as exc:
            # A line or event past upstream.max_event_bytes: a broken (or hostile)
            # upstream, charged what was read (or the estimate).
            metrics.inc("gateway_upstream_errors_total", kind="event_too_large")
            log.warning("request %s: upstream stream refused: %s", x.request_id, exc)
            self._noticed(x, relay, watcher)
            ending = relay.event_too_large(exc.events)
        except asyncio.CancelledError as exc:
            # The server is going away (or cancelled this request): what was read
            # is still settled below, shielded, before the cancellation goes on.
            cancelled = exc
            if sending:
                unmetered = _meter_unsent(meter_chunk, chunk)
            self._noticed(x, relay, watcher)
            ending = self._unmetered_ending(x, relay, unmetered) or relay.shutdown()
        except Exception:
            log.exception("request %s: unexpected error while relaying an answer", x.request_id)
            if sending:
                _meter_unsent(meter_chunk, chunk)  # read or not, the failure charges an estimate
            self._noticed(x, relay, watcher)
            ending = relay.gateway_failed()
        else:
            self._noticed(x, relay, watcher)
            ending = relay.upstream_ended()
        finally:
            if watcher is not None:
                watcher.cancel()
            if timer is not None:
                timer.cancel()
        # What is left to send waits for the client no longer than the relay's
        # deadline, and not at all once that has run out: a client that stops
        # reading (its socket's buffers full) holds its connection, never the
        # answer's record, which follows the end of the response.
        when = None if deadline is None else deadline.when()
        ending_sends = _Ending(
            send,
            since + total if when is None else when,
            stalled=stalled,
        )
        forms = self.follows.paused_forms(x, relay.meter, None if sse else relay.buffer)
        if forms:
            # Kept before the client sees the end of an answer that paused for
            # human input, and before the last chunk, which may hold the form (a
            # blocking answer's last chunk completes its Content-Length: the
            # client has it all): it may submit the form at once (gateway/follow.py).
            await self._kept(self.follows.keep_forms(forms, x.user_id, x.request_id))
        if hold is not None:
            # The answer ended while its first bytes were held: they go with the
            # end (to a client still there), once what the conversation began
            # with is kept.
            released = await self._held(x, hold, b"", end=True)
            if any(isinstance(command, End) for command in ending):
                last = released
        if last is not None:
            if ending and isinstance(ending[0], End):
                ending[0] = End(last + ending[0].body)
            else:
                # Not the end of the response next (an error event, a client
                # gone): sent now, in order.
                await self._execute(x, RelaySend(last), ending_sends)
        for command in ending:
            await self._execute(x, command, ending_sends)
        if cancelled is not None:
            raise cancelled

    def _conversation_hold(self, x: Exchange, sse: bool) -> ConversationHold | None:
        """A hold on the answer's first bytes when it begins a Dify conversation
        that asked for advanced RAG or web search, or turned the web off
        (`Ticket.features`), else None.
        It is fed the upstream's bytes: Dify's answers are relayed byte for byte
        (no transform), so they are the client's too."""
        if x.conversation != "" or x.ticket is None or not x.ticket.features:
            return None
        assert x.target is not None
        limit = x.target.settings.max_event_bytes if sse else _MAX_BUFFERED_BODY
        return ConversationHold(sse=sse, limit=limit)

    async def _held(
        self, x: Exchange, hold: ConversationHold, chunk: bytes, *, end: bool = False
    ) -> bytes | None:
        """Feed the hold; while it holds, the keep-alives before the first event
        (None if there are none), else every byte held, to send now - once the
        conversation the bytes name is kept, so that no client can name it
        before its later messages are held to what it began with."""
        if not hold.feed(chunk, end=end):
            return hold.pings() or None
        assert x.ticket is not None
        if hold.found is None:
            log.warning(
                "request %s: the answer began no conversation it names; what it asked "
                "for is kept when the conversation is listed",
                x.request_id,
            )
        else:
            await self.conversations.remember(
                x.user_id,
                hold.found,
                x.ticket.features,
                upstream=x.ticket.upstream,
                now=self._clock.now(),
            )
        return hold.release()

    def _unmetered_ending(
        self, x: Exchange, relay: Relay, unmetered: Exception | None
    ) -> list[RelayCommand] | None:
        """The ending when metering the chunk whose send never completed raised
        (`_meter_unsent`); None when it did not."""
        if unmetered is None:
            return None
        if isinstance(unmetered, EventTooLarge):
            self._metrics.inc("gateway_upstream_errors_total", kind="event_too_large")
            log.warning("request %s: upstream stream refused: %s", x.request_id, unmetered)
            return relay.event_too_large(unmetered.events)
        log.error(
            "request %s: unexpected error while metering an answer",
            x.request_id,
            exc_info=unmetered,
        )
        return relay.gateway_failed()

    def _noticed(self, x: Exchange, relay: Relay, watcher: asyncio.Task[None] | None) -> None:
        """At the end of an answer: a client that left unnoticed is counted."""
        if relay.listening and watcher is not None and watcher.done():
            self._metrics.inc("gateway_client_disconnects_total")
            relay.client_left(at_end=True)

    async def _execute(self, x: Exchange, command: RelayCommand, send: _Ending) -> None:
        """Do one of the commands that end an answer's relay; a send waits for the
        client until the relay's deadline at most, and none is made once one has
        run out (`_Ending`)."""
        if isinstance(command, Settle | Refund):
            if command.metering_error is not None:
                log.error(
                    "request %s: the answer could not be metered",
                    x.request_id,
                    exc_info=command.metering_error,
                )
            if isinstance(command, Settle):
                await self._kept(self._record(x, command.result, command.outcome))
            else:
                await self._kept(self._refund_unused(x, command.result))
        elif isinstance(command, RelaySend | End):
            more = isinstance(command, RelaySend)
            message = {"type": "http.response.body", "body": command.body, "more_body": more}
            stalled = send.stalled
            try:
                if not await send(message) and not stalled:
                    # The client stopped reading: the answer is settled all the same.
                    log.warning(
                        "request %s: could not %s: the client read nothing more in time",
                        x.request_id,
                        "send an event" if more else "end the response",
                    )
            except Exception:  # the client is past helping; the answer is still settled
                what = "send an event" if more else "end the response"
                log.exception("request %s: could not %s", x.request_id, what)
        elif isinstance(command, RelayStop):
            if command.task_id is not None:
                self._keep(self._stop(x, command.task_id))
        elif isinstance(command, Count):
            self._metrics.inc(command.metric)
        elif isinstance(command, Notice):
            # Recorded; now tell the client why its answer ends here, as an SSE
            # error event and a proper end of the stream, if it still listens.
            with contextlib.suppress(Exception):
                if await send(
                    {"type": "http.response.body", "body": command.body, "more_body": True}
                ):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _history(
        self,
        x: Exchange,
        send: Send,
        response: httpx.Response,
        status: int,
        headers: Headers,
        days: int | None,
        *,
        listing: bool = False,
    ) -> None:
        """A conversation or message page limited to the plan's history window
        (``days``, None: none). ``listing``: a page of Dify conversations, whose
        items name conversations the client may continue: those that began
        asking for advanced RAG or web search are kept before the client sees
        the page (gateway/conversations.py).

        Fails closed: a page that cannot be read is not passed on unfiltered.
        """
        raw, page = await self._read_page(response, "history page")
        if listing:
            config = x.snap.config
            listed = listed_features(page, config.advanced_rag, config.web_search)
            if listed:
                assert x.target is not None
                await self.conversations.remember_listed(
                    x.user_id, listed, upstream=x.target.name, now=self._clock.now()
                )
        filtered = (
            page
            if days is None
            else x.dialect.filter_history(x.route, x.query, page, self._history_cutoff(days))
        )
        await self._send_page(x, send, status, headers, raw, page, filtered)

    @staticmethod
    def _lists_conversations(x: Exchange) -> bool:
        """Whether the request lists Dify conversations while the rules that
        read advanced RAG or web search from inputs are set."""
        rules = x.snap.config
        return (
            x.mount is not None
            and x.mount.kind == "dify"
            and x.route.kind == "conversations"
            and bool(rules.advanced_rag.request_path or rules.web_search.request_path)
        )

    async def _models(
        self,
        x: Exchange,
        send: Send,
        response: httpx.Response,
        status: int,
        headers: Headers,
        lists: list[tuple[str, ...]],
    ) -> None:
        """The upstream's model list limited to the allow-lists that apply
        (issue 21); fails closed like a history page."""
        raw, page = await self._read_page(response, "model list")
        filtered = x.dialect.filter_models(
            x.route, page, lambda model: all(allows(globs, model) for globs in lists)
        )
        await self._send_page(x, send, status, headers, raw, page, filtered)

    async def _model_union(self, x: Exchange, send: Send) -> None:
        """A model list on a mount several upstreams share (issue 23): each one's
        list, limited to the models it is routed (``models``), as one list, then
        limited to the allow-lists that apply. An upstream that cannot give its
        list is left out (logged); with none, the request fails as one would."""
        snap, mount, dialect = x.snap, x.mount, x.dialect
        assert mount is not None
        dialect.page_models(x.route, {"data": []}, x.query)  # bad paging refused first
        pages: list[dict[str, Any]] = []
        for name in mount.upstreams:
            serves = snap.routing.upstreams[name].serves
            pages += [
                dialect.filter_models(x.route, page, serves)
                for page in await self._model_pages(x, name)
            ]
        if not pages:
            raise UpstreamUnavailable("The upstream model list could not be read.")
        lists = await self._model_lists(x)
        merged = dialect.merge_models(pages)
        filtered = dialect.filter_models(
            x.route, merged, lambda model: all(allows(globs, model) for globs in lists)
        )
        body = orjson.dumps(dialect.page_models(x.route, filtered, x.query))
        metrics_status = "2xx"
        self._metrics.inc("gateway_requests_total", route=x.route.kind, status=metrics_status)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", x.request_id.encode()),
        ]
        await self._start(x, send, 200, headers)
        await send({"type": "http.response.body", "body": body})

    async def _model_pages(self, x: Exchange, name: str) -> list[dict[str, Any]]:
        """Upstream ``name``'s whole model list, as the pages it gives it in
        (one for OpenAI; Anthropic's, page after page, at most
        ``_MODEL_LIST_PAGES``). What could not be read is left out, logged."""
        target, client = x.snap.targets[name], self.clients[name]
        pages: list[dict[str, Any]] = []
        query = x.dialect.model_list_query(x.query, None)
        while query is not None:
            if len(pages) == _MODEL_LIST_PAGES:
                log.warning(
                    "request %s: the model list of upstream %s is longer than %d pages; "
                    "the rest left out",
                    x.request_id,
                    name,
                    _MODEL_LIST_PAGES,
                )
                break
            url = target.url + x.path + ("?" + query.decode("latin-1") if query else "")
            try:
                reply = await client.request(
                    "GET", url, headers=target.request_headers(x.headers.forward)
                )
                page = orjson.loads(reply.content) if reply.is_success else None
            except (UpstreamUnavailable, orjson.JSONDecodeError) as exc:
                page = exc
            if not isinstance(page, dict):
                what = "the rest of its" if pages else "no"
                log.warning("request %s: %s model list from upstream %s", x.request_id, what, name)
                break
            pages.append(page)
            after = x.dialect.model_list_query(x.query, page)
            query = None if after == query else after  # a cursor that does not move
        return pages

    async def _read_page(
        self, response: httpx.Response, what: Literal["history page", "model list"]
    ) -> tuple[bytearray, dict[str, Any]]:
        """A JSON object the gateway filters before passing it on, read whole."""
        # Whole sentences, so each is found in the message catalogue.
        history = what == "history page"
        raw = bytearray()
        try:
            async for chunk in UpstreamClient.decoded(response):
                raw += chunk
                if len(raw) > _MAX_BUFFERED_BODY:
                    raise UpstreamError(
                        "The upstream history page is too large to filter."
                        if history
                        else "The upstream model list is too large to filter."
                    )
        except UpstreamBroken as exc:
            raise UpstreamUnavailable(
                "The upstream history page could not be read."
                if history
                else "The upstream model list could not be read."
            ) from exc
        try:
            page = orjson.loads(raw)
        except orjson.JSONDecodeError:
            page = None
        if not isinstance(page, dict):
            raise UpstreamError(
                "The upstream history page is not a JSON object."
                if history
                else "The upstream model list is not a JSON object."
            )
        return raw, page

    async def _send_page(
        self,
        x: Exchange,
        send: Send,
        status: int,
        headers: Headers,
        raw: bytearray,
        page: dict[str, Any],
        filtered: dict[str, Any],
    ) -> None:
        body = bytes(raw) if filtered is page else orjson.dumps(filtered)
        # aiter_bytes decoded any Content-Encoding: describe the new body instead.
        headers = [(k, v) for k, v in headers if k not in (b"content-length", b"content-encoding")]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._start(x, send, status, headers)
        await send({"type": "http.response.body", "body": body})

    def _client_left(self, x: Exchange) -> None:
        """The client went away mid-answer (the relay decides what follows)."""
        self._metrics.inc("gateway_client_disconnects_total")
        assert x.target is not None
        policy = x.target.settings.on_client_disconnect
        log.info("request %s: client disconnected mid-answer; policy %s", x.request_id, policy)

    def _stop_timer(
        self, x: Exchange, relay: Relay, after: StopAfter | None
    ) -> asyncio.TimerHandle | None:
        """The timer of a relay's `StopAfter` (none: no timer)."""
        if after is None:
            return None
        return asyncio.get_running_loop().call_later(after.seconds, self._deadline_near, x, relay)

    def _deadline_near(self, x: Exchange, relay: Relay) -> None:
        """An answer's deadline has come: its stop call, if the relay asks for
        one, runs while the answer is read on (its result told to the relay,
        so that the ending does not stop it again)."""
        for command in relay.deadline_near():
            if isinstance(command, RelayStop) and command.task_id is not None:
                self._keep(self._stop_at_deadline(x, relay, command.task_id))

    async def _stop_at_deadline(self, x: Exchange, relay: Relay, task_id: str) -> None:
        relay.stop_answered(await self._stop(x, task_id))

    async def _stop(self, x: Exchange, task_id: str) -> bool:
        """Ask the upstream to stop generating an answer (same task id and user)."""
        stop = x.dialect.stop_request(x.route, task_id, x.user_id)
        target, client = x.target, x.client
        if stop is None or target is None or client is None:
            return False
        path, payload = stop
        try:
            reply = await client.request(
                "POST",
                target.url + path,
                content=payload,
                headers=[(b"content-type", b"application/json"), *target.credentials],
            )
        except UpstreamUnavailable as exc:
            log.warning(
                "request %s: could not stop task %s: %r", x.request_id, task_id, exc.__cause__
            )
            return False
        log.info(
            "request %s: stopped task %s upstream (%d)", x.request_id, task_id, reply.status_code
        )
        return reply.is_success

    # --- settle ----------------------------------------------------------------------

    async def _kept(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (recording an answer, or giving its reservation back) as a
        task the gateway keeps, shielded: a cancellation of the request - a client
        gone, a server shutting down - must never cut a ledger write half-way."""
        await asyncio.shield(self._keep(work))

    async def _settle_answer(self, x: Exchange, result: Metered) -> None:
        await self._settle(x, result, disconnected=False)

    async def _settle(self, x: Exchange, result: Metered, *, disconnected: bool) -> None:
        if result.usage is None:
            await self._refund_unused(x, result)
        else:
            await self._record(x, result, "disconnected" if disconnected else result.outcome)

    async def _refund_unused(self, x: Exchange, result: Metered) -> None:
        """An answer that produced nothing to charge: its query goes back."""
        log.info(
            "request %s: answer produced nothing to charge (%s%s); query returned",
            x.request_id,
            result.outcome,
            f", {result.error_code}" if result.error_code else "",
        )
        await self.admitter.refund(x.ticket, x.request_id)

    def _unpriced(self, x: Exchange, calls: tuple[str, ...]) -> None:
        """Paid calls an answer made that no ``[call_prices]`` entry prices
        (Dify's auto-play speech, review D2): it had streamed, so it is recorded
        without them; each is counted, and logged once per process and
        upstream, so the operator learns to price it."""
        upstream = x.target.name if x.target is not None else "-"
        for call in calls:
            self._metrics.inc("gateway_unpriced_calls_total", upstream=upstream, call=call)
            if (upstream, call) in self._warned:
                continue
            self._warned.add((upstream, call))
            log.warning(
                "upstream %s: answers make %s calls, which have no price: they are not "
                'charged; set [call_prices."%s"] (docs/security.md)',
                upstream,
                call,
                call,
            )

    async def _record(self, x: Exchange, result: Metered, outcome: str) -> None:
        """Record an answer's usage: from here the reservation is the ledger's."""
        ticket = x.ticket
        assert ticket is not None
        request_id = x.request_id
        usage = result.usage
        assert usage is not None
        if usage.estimated:
            log.warning(
                "request %s: upstream reported no usage (%s); charging an estimate of %d tokens",
                request_id,
                result.outcome,
                usage.total_tokens,
            )
        if usage.clamped:
            # A field out of range was bounded where it was read (usage.FieldReader):
            # the record is marked as bounds.bound_event marks one.
            outcome = "clamped"
            self._metrics.inc("gateway_usage_clamped_total")
            log.warning(
                "request %s: upstream reported out-of-range usage; recorded clamped: %s",
                request_id,
                ", ".join(usage.clamped),
            )
        if result.unpriced_calls:
            self._unpriced(x, result.unpriced_calls)
        # From here the reservation is the ledger's to settle, not to refund.
        ticket.release()
        upstream_ms, overhead_ms = x.timings()
        self._metrics.observe("gateway_upstream_seconds", upstream_ms / 1000, route=x.route.kind)
        snap = x.snap
        await self._settler.record(
            UsageEvent(
                answer_id=result.answer_id or f"gw-{request_id}",
                user_id=ticket.user_id,
                day=ticket.day,
                created_at=self._clock.now(),
                endpoint=x.route.name,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                cost=usage.cost,
                currency=usage.currency,
                outcome=outcome,
                estimated=usage.estimated,
                web_searches=(
                    int(used_web_search(result.metadata, snap.config.web_search))
                    if result.web_searches is None
                    else int(result.web_searches > 0)  # answers that searched (docs/features.md)
                ),
                conversation_id=result.conversation_id,
                request_id=request_id,
                upstream_latency_ms=round(upstream_ms, 3),
                overhead_ms=round(overhead_ms, 3),
                model=result.model,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                upstream=ticket.upstream,
            ),
            lease_id=ticket.lease_id,
            pending_id=ticket.pending_id,
            plan=ticket.plan,
            alerts=ticket.alerts,
            terms=snap.terms,
        )

    # --- the rest --------------------------------------------------------------------

    async def _send_error(
        self, send: Send, exc: GatewayError, x: Exchange, scope: Scope | None = None
    ) -> None:
        # The message in the user's language (Accept-Language); code, status and
        # headers never depend on it (gateway/messages.py).
        request_id = x.request_id
        messages = x.snap.messages
        language = messages.language(scope["headers"]) if scope is not None else messages.default
        message, language = messages.render(exc, language)
        response = render_error(
            exc,
            x.dialect.error_body,
            message=message,
            realm="api",
            request_id=request_id,
            language=language,
            outage_retry_after=b"5",
        )
        self._metrics.inc("gateway_refusals_total", code=exc.code)
        note_status(exc.status)
        await response.send(send)

    async def _preflight(self, x: Exchange, send: Send) -> None:
        """A CORS preflight carries no credentials by design: forwarded as it is
        (it produces no answer and names no user) so the upstream's CORS policy
        answers it - but only for a route the gateway would forward (default deny):
        the method it asks about must be one the dialect declares for the path."""
        asked = next(
            (v for k, v in x.headers.forward if k == b"access-control-request-method"), b""
        )
        method = asked.decode("latin-1").strip()
        if not method.isupper():
            raise NotFound("This endpoint is not available through the gateway.", code="not_found")
        snap, mount = x.snap, x.mount
        assert mount is not None
        self.guard.admit_route(
            method,
            x.path,
            x.dialect.route(method, x.path),
            call_prices=snap.config.call_prices,
            allow=mount.allow,
        )
        # It carries no body, so no model: answered by the mount's first upstream.
        first = mount.upstreams[0]
        target = snap.targets[first]
        url = target.url + x.path + ("?" + x.query.decode("latin-1") if x.query else "")
        response = await self.clients[first].request(
            "OPTIONS", url, headers=target.client_headers(x.headers.forward)
        )
        out = response_headers(response.headers.raw)
        out = [(k, v) for k, v in out if k not in (b"content-length", b"content-encoding")]
        out += [
            (b"content-length", str(len(response.content)).encode()),
            (b"x-request-id", x.request_id.encode()),
        ]
        await self._start(x, send, response.status_code, out)
        await send({"type": "http.response.body", "body": response.content})

    async def _multipart(
        self, x: Exchange, receive: Receive, rewriter: UserFieldRewriter
    ) -> tuple[AsyncIterator[bytes], int | None]:
        """A multipart body to forward, and its length when known.

        Uploads are held to the plan's ``file_size_mb``: decided from
        Content-Length when that settles it; otherwise the body is spooled (to a
        temporary file past 1 MB) and counted as it arrives, so no byte of a body
        that turns out too large is forwarded.
        """
        content_length = x.headers.content_length
        limit = None
        if x.route.is_upload:
            mb = (await self.admitter.plan_of(x.snap, x.user_id)).file_size_mb
            limit = None if mb is None else int(mb * 1024 * 1024)
        if (
            limit is not None
            and content_length is not None
            and content_length > limit + _MULTIPART_SLACK
        ):
            raise file_too_large(limit)
        # An upload_bytes limit reserves the file's real size before it is
        # forwarded (issue 21): the body is read whole first, bounded by the
        # limit. A count alone needs no size: the body streams through.
        reserves = x.upload_limits.most_bytes is not None
        if not reserves and (
            limit is None or (content_length is not None and content_length <= limit)
        ):
            length = None if content_length is None else content_length + rewriter.added_bytes
            return rewritten_multipart(receive, rewriter, x.failure, limit=limit), length
        try:
            spool, size = await spool_multipart(
                receive, rewriter, limit=limit, most_bytes=x.upload_limits.most_bytes
            )
        except MultipartError as exc:
            raise BadRequest(f"Malformed multipart body: {exc}") from exc
        except PastUploadLimits as exc:
            # More than any upload can carry: refused as its reservation would
            # refuse it (a size past a limit's maximum never fits).
            await self._reserve_upload(x, exc.file_bytes)
            raise AssertionError("an upload past its limits was reserved") from exc
        x.spool = spool
        return read_spool(spool), size

    async def _reserve_upload(self, x: Exchange, size: int) -> None:
        """Reserve the upload's file (``size`` bytes) or raise its refusal."""
        x.upload_ticket, x.rate_headers = await self.admitter.reserve_upload(
            x.snap, x.user_id, x.upload_limits, key=x.request_id, size=size
        )

    @staticmethod
    def _upload_kept(x: Exchange) -> None:
        """An upload's reservation is no longer given back when the request ends."""
        if x.upload_ticket is not None:
            x.upload_ticket.release()

    async def _count_upload(self, x: Exchange) -> None:
        """The upstream has (or may have) taken the upload's file (its
        reservation, released from its ticket, stays as its record): the file
        is counted, unless the reservation surely holds it already. By the
        request's key, so an upload whose reservation landed is not counted
        twice."""
        assert x.upload is not None
        size = x.upload.file_bytes
        ticket = x.upload_ticket
        if ticket is not None and not ticket.recount(size):
            return
        periods = periods_at(self._clock.now(), x.snap.tz)
        try:
            await self._storage.reserve_upload(
                x.user_id,
                key=x.request_id,
                day=periods.day,
                month_start=periods.month_start,
                size=size,
            )
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="upload")
            log.error(
                "request %s: could not count an upload of %d bytes: %s",
                x.request_id,
                size,
                exc.message,
            )


async def _read_small(x: Exchange, chunks: AsyncIterator[bytes]) -> tuple[bytes, bool]:
    """The first bytes of a body that should be small: (them, whole). Not
    whole: the body runs past ``_SMALL_BODY`` (the rest still in ``chunks``).
    A body cut by the upstream is what came of it (logged), whole."""
    held = bytearray()
    try:
        async for chunk in chunks:
            held += chunk
            if len(held) > _SMALL_BODY:
                return bytes(held), False
    except UpstreamBroken as exc:
        log.warning("request %s: upstream body ended abnormally: %r", x.request_id, exc.__cause__)
    return bytes(held), True


def _is_error(status: int) -> bool:
    """A reply whose body may quote an upstream key (`_without_keys`): not a
    2xx, nor a 304 (no body, and a Content-Length that is the stored one's)."""
    return not 200 <= status < 300 and status != _NOT_MODIFIED


def _coding(headers: Headers) -> bytes | None:
    """A reply's Content-Encoding, its whole list lower-cased; None for none
    (or identity)."""
    listed = b",".join(v for k, v in headers if k == b"content-encoding")
    codings = [c.strip().lower() for c in listed.split(b",") if c.strip()]
    codings = [c for c in codings if c != b"identity"]
    return b", ".join(codings) if codings else None


def _decoded(headers: Headers) -> Headers:
    """A reply's headers once its body is decoded: no Content-Encoding, and no
    Content-Length (the encoded body's)."""
    return [(k, v) for k, v in headers if k not in (b"content-length", b"content-encoding")]


def _decodable_accept(accept: bytes) -> bytes:
    """A client's Accept-Encoding as forwarded: only the codings the gateway
    decodes (`_DECODABLE`) and identity, with their weights; identity when
    none is left. A body in any of them passes on as it is (the client asked
    for it), and an error in any of them can be read (`_error_body`)."""
    kept = []
    for item in accept.split(b","):
        coding, _, params = item.partition(b";")
        coding = coding.strip().lower()
        if (coding in _DECODABLE or coding == b"identity") and not _refused(params):
            kept.append(item.strip())
    return b", ".join(kept) if kept else b"identity"


def _refused(params: bytes) -> bool:
    """Whether a coding's parameters weigh it 0 (``q=0``, ``q=0.000``): kept
    alone, ``identity;q=0`` would ask for no acceptable coding at all (review 6,
    R6-3)."""
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"q":
            try:
                return float(value.strip()) == 0
            except ValueError:
                return False
    return False


def _error_body(
    x: Exchange, response: httpx.Response, headers: Headers
) -> tuple[AsyncIterator[bytes], Headers] | None:
    """An error's body to read (`_read_small`), decoded when it is encoded (a
    client's Accept-Encoding is forwarded on routes that are not answers), so
    that a key in it is found; and the headers that go with it. None for an
    encoding the gateway does not decode (anything but one coding of
    `_DECODABLE`): such a body is not passed on (`_pass_unreadable`)."""
    coding = _coding(headers)
    if coding is None:
        return response.aiter_raw(), headers
    if coding not in _DECODABLE:
        return None
    return _inflated(x, response.aiter_raw(), coding), _decoded(headers)


async def _inflated(
    x: Exchange, chunks: AsyncIterator[bytes], coding: bytes
) -> AsyncIterator[bytes]:
    """A gzip or deflate body decoded a step (`_INFLATE_STEP`) at a time, and
    cut past `_MAX_ERROR_BODY` (review5 R5-2: httpx inflates each chunk in
    one go). A body that is not what it says raises `UpstreamBroken`; deflate
    is zlib-wrapped or raw, as httpx takes it."""
    wbits = 16 + zlib.MAX_WBITS if coding != b"deflate" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    total = 0
    begun = False
    if coding == b"deflate":
        # A zlib header is two bytes: the first chunk is made that long at least,
        # so that a raw stream is told apart before anything is decoded (a
        # one-byte first read was taken for zlib, and the body lost: review 6,
        # R6-2).
        chunks = _at_least(chunks, 2)
    async for data in chunks:
        if not data:
            continue
        while not inflater.eof:
            try:
                out = inflater.decompress(data, _INFLATE_STEP)
            except zlib.error as exc:
                if coding == b"deflate" and not begun:  # raw deflate, no zlib header
                    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                    begun = True
                    continue
                raise UpstreamBroken("The upstream connection was lost.", timed_out=False) from exc
            begun = True
            data = inflater.unconsumed_tail
            total += len(out)
            if total > _MAX_ERROR_BODY:
                log.warning(
                    "request %s: upstream error decoded past %d bytes: cut",
                    x.request_id,
                    _MAX_ERROR_BODY,
                )
                yield out[: len(out) - (total - _MAX_ERROR_BODY)]
                return
            if out:
                yield out
            if not data and len(out) < _INFLATE_STEP:
                break  # this chunk is decoded: the next one


async def _at_least(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """``chunks``, the first one (unless the body is shorter) ``size`` bytes at
    least."""
    held = b""
    started = False
    async for chunk in chunks:
        if not started:
            held += chunk
            if len(held) < size:
                continue
            chunk, started = held, True
        yield chunk
    if not started and held:
        yield held


def _without_keys(
    x: Exchange, headers: Headers, head: bytes, rest: AsyncIterator[bytes] | None
) -> tuple[Headers, bytes, AsyncIterator[bytes] | None]:
    """An error reply (`_pass_on`) without the key of any upstream the request
    was sent to (its fallbacks' too), nor the secret headers it was sent with
    (``headers_env``): some compatible servers and proxies quote the key they
    were sent in an auth or budget error, and the operator's key never leaves
    the gateway (docs/security.md). Content-Length follows: the whole body's
    length, none for a body passed on as it comes."""
    targets = x.snap.targets
    sent = [targets[name].settings for name in x.attempts if name in targets]
    if x.target is not None:
        sent.append(x.target.settings)
    mask = KeyMask(key for up in sent for key in (up.api_key, *up.header_secrets.values()))
    if rest is None:
        body = mask.whole(head)
        kept = [(k, v) for k, v in headers if k != b"content-length"]
        kept.append((b"content-length", str(len(body)).encode()))
        return kept, body, None
    if not mask:
        return headers, head, rest
    kept = [(k, v) for k, v in headers if k != b"content-length"]
    return kept, mask.feed(head), _masked(mask, rest)


async def _masked(mask: KeyMask, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The rest of a body passed on as it comes, masked (`KeyMask.feed`)."""
    async for chunk in chunks:
        passed = mask.feed(chunk)
        if passed:
            yield passed
    held = mask.end()
    if held:
        yield held


def _limits_uploads(limits: Iterable[Limit]) -> bool:
    """Whether any of ``limits`` counts uploads (`UPLOAD_METERS`)."""
    return any(limit.meter in UPLOAD_METERS for limit in limits)
