"""Resumed runs the gateway reads itself, so each is metered exactly once (issue 20).

A run that paused for human input (Dify's human-in-the-loop) resumes when its
form is submitted; the upstream answers the submit at once and does the rest of
the run's LLM work in its own worker, streaming it to whoever subscribes to the
run's events - nobody, one client, or several. Metering what the client reads
would charge a client that never reads nothing and one that reads twice twice.
So the submit is the metered answer (admitted like any answer), and the gateway
subscribes to the run's events itself, before it forwards the submit (a
subscriber misses what was published before it subscribed), meters them, and
settles the submit's reservation when the run ends, fails or pauses again, or
when the read gives up (bounded by ``upstream.total_timeout``; charged what was
read, or an estimate). The client's own read of the events is a scoped read.

The pieces:

- ``Paused`` (a stream meter): the forms a metered stream paused for, as
  (form token, run id); ``Follows.remember`` keeps them in the database (any
  process may receive the submit), keyed by the token's SHA-256.
- ``Resumable`` (a dialect): which request submits a form, the request that
  reads a run's events, and the meter of that read.
- ``Follows``: opens the read before the submit, and runs it after a 2xx submit
  as a background task the gateway keeps. At shutdown the task is cancelled and
  settles what it read (outcome "shutdown"); after a crash, the submit's pending
  row is recovered as an estimate like any answer's (docs/quotas.md).

Wire facts: docs/upstreams/dify.md, "Human input".
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx

from gateway.bodies import BodyFailure
from gateway.errors import (
    STORAGE_UNAVAILABLE,
    NotFound,
    StorageError,
    UpstreamBroken,
    UpstreamError,
)
from gateway.probes import Probes
from gateway.sse import EventTooLarge, SSEDecoder
from gateway.storage import PausedForm
from gateway.upstreams import Route, StreamMeter
from gateway.usage import Metered

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.metrics import Metrics
    from gateway.proxy import Exchange
    from gateway.storage import PausedForms

__all__ = ["Follow", "Follows", "Paused", "Resumable", "token_hash"]

log = logging.getLogger("gateway.follow")

_SSE = b"text/event-stream"


@runtime_checkable
class Paused(Protocol):
    """A stream meter that can tell which forms its run paused for."""

    @property
    def paused_forms(self) -> tuple[tuple[str, str], ...]: ...


class FollowMeter(StreamMeter, Paused, Protocol):
    """Meters the gateway's own read of a resumed run."""

    @property
    def done(self) -> bool:
        """The run ended, failed or paused again: the read stops here."""
        ...


# Whether a meter class is `Paused` (its instances have the property), by class.
_PAUSED: dict[type, bool] = {}


@runtime_checkable
class Resumable(Protocol):
    """A dialect whose runs can pause and be resumed by a request."""

    def resumed_form(self, route: Route, path: str) -> str | None:
        """The form token ``path`` submits (resuming a paused run), or None."""
        ...

    def follow_request(self, run_id: str, user_id: str) -> tuple[str, bytes]:
        """The path (relative to the base) and query that read a run's events."""
        ...

    def follow_meter(self, form_token: str) -> FollowMeter: ...

    def blocking_forms(self, route: Route, body: bytes | bytearray) -> list[tuple[str, str]]:
        """The (form token, run id) pairs a blocking answer paused for."""
        ...


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass(slots=True)
class Follow:
    """The read of one resumed run, opened before its submit is forwarded."""

    response: httpx.Response
    meter: FollowMeter
    creator: str  # the end user who started the run: Dify serves its events to them only

    async def close(self) -> None:
        await self.response.aclose()


Settle = Callable[["Exchange", Metered], Coroutine[Any, Any, None]]
# Runs a task the gateway keeps (gateway/runtime.py: spawn, keep).
Run = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class Follows:
    """Opens, runs and settles the gateway's reads of resumed runs."""

    __slots__ = (
        "_checked",
        "_clock",
        "_dialect",
        "_keep",
        "_metrics",
        "_probes",
        "_settle",
        "_spawn",
        "_storage",
    )

    def __init__(
        self,
        storage: PausedForms,
        *,
        clock: Clock,
        metrics: Metrics,
        spawn: Run,
        keep: Run,
        settle: Settle,
        probes: Probes,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._metrics = metrics
        self._spawn = spawn  # cancelled at shutdown
        self._keep = keep  # waited for at shutdown
        self._settle = settle  # the proxy's: records the answer, or refunds it
        self._checked: object = None
        self._dialect: Resumable | None = None
        self._probes = probes  # told of each resumed run read and settled

    def _resumable(self, x: Exchange) -> Resumable | None:
        """The request's dialect, if its runs can be resumed (checked once per
        dialect object: a reload makes a new one)."""
        upstream = x.dialect
        if upstream is not self._checked:
            self._checked = upstream
            self._dialect = upstream if isinstance(upstream, Resumable) else None
        return self._dialect

    def paused_forms(
        self, x: Exchange, meter: object, body: bytes | bytearray | None
    ) -> Sequence[tuple[str, str]]:
        """The forms an answer paused for, from its stream's meter or its blocking
        body; usually none (and then cheaply)."""
        dialect = self._resumable(x)
        if dialect is None:
            return ()
        if meter is not None:
            # isinstance against a runtime-checkable protocol inspects the class's
            # members every time: asked once per meter class instead.
            paused = _PAUSED.get(type(meter))
            if paused is None:
                paused = _PAUSED[type(meter)] = isinstance(meter, Paused)
            return meter.paused_forms if paused else ()  # type: ignore[attr-defined]
        return dialect.blocking_forms(x.route, body) if body else ()

    async def keep_forms(
        self, forms: Sequence[tuple[str, str]], user_id: str, request_id: str
    ) -> None:
        """Keep paused forms (never fails: the resume of a form not kept is refused,
        see ``open``)."""
        if not forms:
            return
        rows = [PausedForm(token_hash(token), run, user_id) for token, run in forms]
        try:
            await self._storage.remember_forms(rows, now=self._clock.now())
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="remember_forms")
            log.error("request %s: could not keep a paused run's forms: %s", request_id, exc)

    async def open(self, x: Exchange) -> Follow | None:
        """For a request that resumes a run: subscribe to the run's events, before
        the request is forwarded. None for any other request.

        Fails closed - nothing is forwarded, the reservation goes back - when the
        run cannot be followed: a form no stream through the gateway paused for
        (404, as the upstream answers an unknown form; a client that submits
        before its paused stream has ended may try again at once), a database
        or upstream failure (503, 502)."""
        upstream = self._resumable(x)
        if upstream is None:
            return None
        token = upstream.resumed_form(x.route, x.path)
        if token is None:
            return None
        try:
            form = await self._storage.paused_form(token_hash(token))
        except StorageError as exc:
            # Fails closed, before anything is forwarded: the reservation goes back.
            self._metrics.inc("gateway_storage_errors_total", operation="paused_form")
            raise StorageError(STORAGE_UNAVAILABLE) from exc
        if form is not None and form.user_id != x.user_id:
            # Another user's paused run: refused exactly as an unknown form, so a
            # leaked token neither resumes nor reveals someone else's run.
            log.warning(
                "request %s: refused the submit of a form another user's run paused for",
                x.request_id,
            )
            form = None
        if form is None:
            log.info("request %s: refused the submit of a form the gateway never saw", x.request_id)
            raise NotFound(
                "Form not found: no paused run the gateway has seen waits for it.",
                code="not_found",
                headers=[(b"retry-after", b"1")],
            )
        path, query = upstream.follow_request(form.run_id, form.user_id)
        target, client = x.target, x.client
        assert target is not None and client is not None  # chosen before forwarding
        url = target.url + path + "?" + query.decode("latin-1")
        headers = [
            *target.credentials,
            (b"accept-encoding", b"identity"),
            (b"x-trace-id", x.request_id.encode()),
        ]
        try:
            # The upstream answers once the subscription is live (Dify's first
            # byte is a ping sent after it subscribed): from here no event of the
            # resumed run can be missed.
            response = await client.open(
                "GET",
                url,
                headers=headers,
                content=None,
                timeout=client.streaming_timeout,
                failure=BodyFailure(),
            )
        except UpstreamError:
            self._metrics.inc("gateway_upstream_errors_total", kind="follow_open")
            raise
        content_type = response.headers.get("content-type", "").encode("latin-1").lower()
        if not response.is_success or not content_type.startswith(_SSE):
            self._metrics.inc("gateway_upstream_errors_total", kind="follow_open")
            log.warning(
                "request %s: the upstream refused to stream the resumed run (%d)",
                x.request_id,
                response.status_code,
            )
            await response.aclose()
            raise UpstreamError("The upstream would not stream the resumed run; nothing was sent.")
        return Follow(response, upstream.follow_meter(token), form.user_id)

    def start(self, x: Exchange, follow: Follow) -> asyncio.Task[None]:
        """The submit was accepted: read the run in a task the gateway keeps, which
        owns the submit's reservation from here. ``spawn``, not ``keep``: shutdown
        cancels it (and it settles what it read) rather than wait for the run."""
        return self._spawn(self._read(x, follow))

    async def _read(self, x: Exchange, follow: Follow) -> None:
        metrics = self._metrics
        assert x.target is not None
        settings = x.target.settings
        response, meter = follow.response, follow.meter
        decoder = SSEDecoder(max_event_bytes=settings.max_event_bytes)
        cut = False
        cancelled: asyncio.CancelledError | None = None
        try:
            try:
                # Bounded like any answer, from the submit's arrival: its pending row
                # is then settled before a recovery could take it for lost.
                elapsed = time.perf_counter() - x.started
                async with asyncio.timeout(settings.total_timeout - elapsed):
                    async for chunk in response.aiter_raw():
                        for event in decoder.feed(chunk):
                            meter.feed(event)
                        if meter.done:
                            break
                if not meter.done:
                    for event in decoder.flush():
                        meter.feed(event)
            finally:
                await response.aclose()
        except (UpstreamBroken, TimeoutError) as exc:
            # TimeoutError: the read's deadline; the upstream's errors arrive mapped.
            cut = True
            timed_out = not isinstance(exc, UpstreamBroken) or exc.timed_out
            kind = "follow_timeout" if timed_out else "follow_read"
            metrics.inc("gateway_upstream_errors_total", kind=kind)
            log.warning("request %s: the resumed run's read ended: %r", x.request_id, exc)
        except EventTooLarge as exc:
            # A line or event past upstream.max_event_bytes, as for any answer: the
            # read ends, charged what it read.
            cut = True
            metrics.inc("gateway_upstream_errors_total", kind="event_too_large")
            log.warning("request %s: the resumed run's read refused: %s", x.request_id, exc)
            for event in exc.events:
                meter.feed(event)
        except asyncio.CancelledError as exc:
            cut = True
            cancelled = exc
        except Exception:
            cut = True
            log.exception("request %s: unexpected error while reading a resumed run", x.request_id)
        result = self._result(x, meter, cut=cut)
        if cancelled is not None:
            # The gateway is shutting down: charged what was read, or the estimate.
            metrics.inc("gateway_answers_cut_at_shutdown_total")
            result = dataclasses.replace(result, outcome="shutdown")
        # A new pause: its resume is followed in turn.
        await self.keep_forms(meter.paused_forms, follow.creator, x.request_id)
        try:
            await asyncio.shield(self._keep(self._settle(x, result)))
        finally:
            self._probes.run_followed()
        if cancelled is not None:
            raise cancelled

    def _result(self, x: Exchange, meter: FollowMeter, *, cut: bool) -> Metered:
        try:
            result = meter.finish(cut=cut or not meter.done)
        except Exception:
            log.exception("request %s: the resumed run could not be metered", x.request_id)
            result = Metered(None, None, None, None, "cut")
        if result.usage is None:
            # Nothing read that says what the run did: it did run (the submit was
            # accepted), so the query stays spent and an estimate is recorded.
            estimate = x.dialect.unanswered(x.route, x.answer_body)
            result = dataclasses.replace(result, usage=estimate.usage)
        return result
