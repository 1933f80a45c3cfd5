"""The relay of one answer as a state machine, with no I/O (sans-io).

`Proxy._relay_answer` reads the upstream, watches the client and keeps the
deadlines; it tells a `Relay` what happened (events, the methods below) and does
what the relay returns (commands, the dataclasses below). Whether an answer is
charged what its meter read, charged an estimate, or given back - the
exactly-once promise - is decided here, once, by `Relay._end`: the one place that
makes a `Settle` or a `Refund`, and it refuses to run twice.

States, named as mitmproxy names its stream states (`layers/http/__init__.py`)::

    streaming --client_left(drain, or stop call)--> draining
    streaming|draining --deadline_near (a stop call at the deadline, read on)--> the same
    streaming --client_left(stop, by closing)--> stopped (the chunk in hand is metered)
    streaming|draining --upstream_ended--------------------> finished
    streaming|draining --upstream_broken/deadline/too_large-> cut
    streaming|draining|stopped --shutdown------------------> shutdown
    streaming|draining|stopped --gateway_failed------------> failed
    stopped --upstream_ended---------------------------------> cut

docs/architecture.md draws the whole table, with the commands of each step.
On the hot path a chunk costs two calls and no allocation beyond what the
dialect's transform and meter make: `forward` returns the bytes to send (or None
once the client has gone), `meter_chunk` feeds the decoder and meter (or the buffer of
a blocking answer) - in that order, so a chunk that breaks the decoder was still
passed on as the upstream sent it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.sse import ServerSentEvent, SSEDecoder
from gateway.upstreams import Route, StreamMeter, StreamTransform, Upstream
from gateway.usage import Metered

State = Literal["streaming", "draining", "stopped", "finished", "cut", "shutdown", "failed"]
# What the upstream's connection ended as, for the client and the log.
Broken = Literal["read", "timeout"]
Policy = Literal["drain", "stop"]

ENDINGS: frozenset[State] = frozenset({"finished", "cut", "shutdown", "failed"})


class RelayEnded(RuntimeError):
    """An event reached a relay whose answer has already ended: a bug in its
    driver. Raised rather than settling (or refunding) an answer twice."""


# --- commands --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send these bytes to the client; the response goes on."""

    body: bytes


@dataclass(frozen=True, slots=True)
class End:
    """End the response, with these last bytes (held back by the transform, or an
    error event)."""

    body: bytes


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the answer upstream. ``task_id`` None: by closing the connection (the
    driver stops reading); otherwise by the dialect's stop call. ``wait``: the
    driver awaits the call and reports `stop_answered`; otherwise the call runs in
    the background (the answer is already over for the gateway)."""

    task_id: str | None
    wait: bool = True


@dataclass(frozen=True, slots=True)
class ExtendDeadline:
    """The client has gone: keep reading (to meter) for at most ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class StopAfter:
    """In ``seconds``, unless the answer has ended, tell the relay its deadline
    has come (`deadline_near`) and do what it returns."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Count:
    """Increment this counter (a metric with no labels)."""

    metric: str


@dataclass(frozen=True, slots=True)
class Settle:
    """Record the answer: ``result`` is what it cost, ``outcome`` the ledger's."""

    result: Metered
    outcome: str
    metering_error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Refund:
    """Nothing to charge: give the reservation back (``result`` says why)."""

    result: Metered
    metering_error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Notice:
    """After the answer is recorded: tell a client still listening why it ends
    (an SSE error event, then the end of the response)."""

    body: bytes


Command = Send | End | Stop | ExtendDeadline | StopAfter | Count | Settle | Refund | Notice


# How long an answer stopped by a call at its deadline (upstream.total_timeout,
# or the grace once its client left) is read on: the upstream ends a stopped
# answer with the usage so far (Dify's message_end). At most the deadline's own
# length. The longest an answer can take counts it (snapshot.longest_answer).
STOP_LEAD = 10.0


def _ignore(event: ServerSentEvent) -> None:
    pass


class Relay:
    """One answer's relay: feed it events, do what it returns."""

    __slots__ = (
        "_decode",
        "_feed",
        "_metering",
        "body",
        "buffer",
        "decoder",
        "dialect",
        "ending",
        "grace",
        "max_buffered",
        "meter",
        "policy",
        "route",
        "sse",
        "state",
        "stop_sent",
        "transform",
    )

    def __init__(
        self,
        dialect: Upstream,
        route: Route,
        body: dict[str, Any],
        *,
        sse: bool,
        meter: StreamMeter | None,
        decoder: SSEDecoder | None,
        transform: StreamTransform | None,
        policy: Policy,
        grace: float,
        max_buffered: int,
    ) -> None:
        self.dialect = dialect
        self.route = route
        self.body = body
        self.sse = sse
        self.meter = meter
        self.decoder = decoder
        self.transform = transform
        self.policy = policy
        self.grace = grace
        self.max_buffered = max_buffered  # of a blocking answer, kept to meter it
        self.buffer = bytearray()
        self._metering = decoder is not None and meter is not None
        # Bound once: the hot path calls them for every chunk and event.
        self._decode = decoder.feed if self._metering and decoder is not None else None
        self._feed = meter.feed if meter is not None else _ignore
        self.state: State = "streaming"
        self.stop_sent = False  # a stop reached the upstream (closing, or a call it took)
        self.ending: Settle | Refund | None = None

    @property
    def listening(self) -> bool:
        """The client is still there, as far as the relay knows."""
        return self.state == "streaming"

    @property
    def reading(self) -> bool:
        """The driver goes on reading the upstream."""
        return self.state == "streaming" or self.state == "draining"

    # --- the hot path ------------------------------------------------------------

    def forward(self, chunk: bytes) -> bytes | None:
        """An upstream chunk: what to send the client now (None: nothing, the
        client has gone)."""
        state = self.state
        if state == "streaming":
            transform = self.transform
            return chunk if transform is None else transform.feed(chunk)
        if state == "draining" or state == "stopped":
            return None
        raise RelayEnded(f"a chunk after the answer ended ({state})")

    def meter_chunk(self, chunk: bytes) -> None:
        """Read the same chunk for what it costs (may raise `EventTooLarge`)."""
        decode = self._decode
        if decode is not None:
            feed = self._feed
            for event in decode(chunk):
                feed(event)
        elif len(self.buffer) < self.max_buffered:
            self.buffer += chunk

    # --- the client --------------------------------------------------------------

    def client_left(self, *, at_end: bool = False) -> list[Command]:
        """The client was noticed gone. Mid-answer (``at_end`` False) the policy
        applies: read on for the grace period, or stop the answer upstream."""
        self._check()
        if self.state != "streaming":
            return []
        if at_end:
            self.state = "draining"
            return []
        meter = self.meter
        if self.policy == "stop" and meter is not None:
            if self.dialect.stops_by_closing:
                self.state = "stopped"
                self.stop_sent = True
                return [Stop(None)]
            task_id = meter.task_id
            self.state = "draining"
            if task_id is not None:
                return [Stop(task_id), ExtendDeadline(self.grace)]
        self.state = "draining"
        stop = self.stop_at(self.grace)
        if stop is None:
            return [ExtendDeadline(self.grace)]
        return [ExtendDeadline(self.grace + self.after_stop(self.grace)), stop]

    @property
    def stops_by_call(self) -> bool:
        """A streamed answer the upstream stops by a call (and ends with the
        usage so far: Dify's message_end)."""
        return self.meter is not None and not self.dialect.stops_by_closing

    def stop_at(self, seconds: float) -> StopAfter | None:
        """For a deadline ``seconds`` away (``upstream.total_timeout`` from the
        start, the grace once the client left): a stop call when it comes
        (`deadline_near`), after which the answer is read on for
        `after_stop` seconds more, for the usage the upstream ends a stopped
        answer with. Cut at the deadline instead, an answer still running was
        charged an estimate, which prices no money for Dify."""
        if not self.stops_by_call or seconds <= 0:
            return None
        return StopAfter(seconds)

    def after_stop(self, seconds: float) -> float:
        """How long past a deadline ``seconds`` away the answer is read, after
        its stop call: `STOP_LEAD`, at most the deadline's own length (none
        for an answer stopped otherwise)."""
        return min(STOP_LEAD, seconds) if self.stops_by_call else 0.0

    def deadline_near(self) -> list[Command]:
        """The deadline has come (`StopAfter`): stop the answer upstream by a call,
        if it is still being read and the upstream named its task; the driver
        reports the call's result (`stop_answered`) and reads on."""
        meter = self.meter
        if (
            not self.reading
            or self.stop_sent
            or meter is None
            or meter.task_id is None
            or self.dialect.stops_by_closing
        ):
            return []
        return [Stop(meter.task_id)]

    def stop_answered(self, ok: bool) -> None:
        """The result of a `Stop` call the driver awaited."""
        self.stop_sent = ok

    # --- endings -----------------------------------------------------------------

    def upstream_ended(self) -> list[Command]:
        """The upstream's body is over (or, once stopped, the driver stopped reading)."""
        self._check()
        # Read to its end, the answer is not cut (the meter is still told when the
        # client left); stopped by closing, it is.
        stopped = self.state == "stopped"
        return self._end("cut" if stopped else "finished", cut=stopped)

    def upstream_broken(self, kind: Broken) -> list[Command]:
        """The upstream connection failed (or timed out) mid-answer."""
        self._check()
        head: list[Command] = []
        if self.sse and self.state == "streaming":
            head.append(
                Send(
                    self.dialect.stream_error(
                        502, "upstream_error", "The upstream connection was lost."
                    )
                )
            )
        return self._end("cut", cut=True, head=head)

    def deadline(self) -> list[Command]:
        """The total deadline, or the grace after the client left, ran out."""
        return self.upstream_broken("timeout")

    def event_too_large(self, events: Iterable[ServerSentEvent]) -> list[Command]:
        """The stream held a line or event past ``upstream.max_event_bytes``;
        ``events`` are the ones the same chunk completed before it."""
        self._check()
        if self.meter is not None:
            for event in events:
                self.meter.feed(event)
        head: list[Command] = []
        if self.state == "streaming":
            # A blank line first ends whatever part of the line was passed on.
            head.append(
                Send(
                    b"\n\n"
                    + self.dialect.stream_error(
                        502, "upstream_error", "The upstream sent an event too large to relay."
                    )
                )
            )
        return self._end("cut", cut=True, head=head, too_large=True)

    def shutdown(self) -> list[Command]:
        """The server is going away (or cancelled this request): what was read is
        settled, then the client (if listening) is told why the answer ends."""
        self._check()
        return self._end("shutdown", cut=True)

    def gateway_failed(self) -> list[Command]:
        """A bug while relaying or metering: the answer has begun (and may be
        billed upstream), so it is charged, never refunded."""
        self._check()
        return self._end("failed", cut=True)

    # --- the one decision --------------------------------------------------------

    def _check(self) -> None:
        if self.state in ENDINGS:
            raise RelayEnded(f"an event after the answer ended ({self.state})")

    def _end(
        self,
        ending: State,
        *,
        cut: bool,
        head: list[Command] | None = None,
        too_large: bool = False,
    ) -> list[Command]:
        if self.state in ENDINGS or self.ending is not None:
            raise RelayEnded(f"the answer already ended ({self.state})")
        listening = self.state == "streaming"
        disconnected = not listening
        failed = ending == "failed"
        self.state = ending
        commands: list[Command] = head if head is not None else []
        if ending != "shutdown" and listening:
            transform = self.transform
            rest = b"" if transform is None or cut else transform.flush()
            if failed and self.sse:
                rest += self.dialect.stream_error(
                    500, "internal_server_error", "The gateway failed while relaying the answer."
                )
            commands.append(End(rest))
        result, error = self._result(cut=cut or disconnected, failed=failed)
        if too_large and result.usage is None:
            # The upstream produced (and may bill) something: never free.
            result = dataclasses.replace(
                self.dialect.unanswered(self.route, self.body),
                answer_id=result.answer_id,
                outcome="cut",
                error_code="event_too_large",
            )
        if ending == "shutdown" and result.outcome != "complete":
            # Cut by the server's shutdown: charged what was read, or the estimate.
            commands.append(Count("gateway_answers_cut_at_shutdown_total"))
            result = dataclasses.replace(result, outcome="shutdown")
        meter = self.meter
        if (
            cut
            and not self.stop_sent
            and result.outcome != "complete"
            and meter is not None
            and meter.task_id
        ):
            # We stopped reading an answer the upstream may still be generating
            # (and billing): tell it to stop, in the background.
            commands.append(Stop(meter.task_id, wait=False))
        decision: Settle | Refund
        if result.usage is None:
            decision = Refund(result, error)
        else:
            decision = Settle(result, "disconnected" if disconnected else result.outcome, error)
        self.ending = decision
        commands.append(decision)
        if ending == "shutdown" and self.sse and listening:
            commands.append(
                Notice(
                    self.dialect.stream_error(
                        503, "shutting_down", "The gateway is shutting down; the answer was cut."
                    )
                )
            )
        return commands

    def _result(self, *, cut: bool, failed: bool) -> tuple[Metered, BaseException | None]:
        """What the answer cost, from its meter; if metering itself fails (or the
        relay failed), at least the dialect's estimate for an unanswered request."""
        error: BaseException | None = None
        try:
            if self._metering:
                assert self.decoder is not None and self.meter is not None
                for event in self.decoder.flush():
                    self.meter.feed(event)
                result = self.meter.finish(cut=cut)
            else:
                result = self.dialect.meter_blocking(self.route, self.body, bytes(self.buffer))
        except Exception as exc:
            error = exc
            failed = True
            result = Metered(None, None, None, None, "cut")
        if failed and result.usage is None:
            estimate = self.dialect.unanswered(self.route, self.body)
            result = dataclasses.replace(
                estimate, answer_id=result.answer_id, outcome="cut", error_code="gateway_error"
            )
        return result, error
