"""The answer relay's state machine (gateway/relay.py), with no sockets: every
path from its first chunk to its one ending, as a table, and random sequences of
events that must still end exactly once."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admission import Ticket
from gateway.relay import (
    Count,
    End,
    ExtendDeadline,
    Notice,
    Policy,
    Refund,
    Relay,
    RelayEnded,
    Send,
    Settle,
    Stop,
    StopAfter,
)
from gateway.sse import ServerSentEvent, SSEDecoder
from gateway.upstreams import Route
from gateway.usage import Metered, Usage

ROUTE = Route("chat", "chat-messages")
USAGE = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cost=Decimal("0.01"))
ESTIMATE = Usage(prompt_tokens=3, completion_tokens=0, total_tokens=3, estimated=True)

TEXT = b'data: {"text": "hi"}\n\n'
USAGE_EVENT = b"event: usage\ndata: {}\n\n"


class FakeDialect:
    """What the relay asks of a dialect, with answers a test can read."""

    def __init__(self, *, stops_by_closing: bool = False) -> None:
        self.stops_by_closing = stops_by_closing

    def stream_error(self, status: int, code: str, message: str) -> bytes:
        return f"event: error\ndata: {status} {code}\n\n".encode()

    def unanswered(self, route: Route, body: dict[str, Any]) -> Metered:
        return Metered(None, None, None, ESTIMATE, "timeout")

    def meter_blocking(self, route: Route, body: dict[str, Any], response: bytes) -> Metered:
        if response == b'{"usage": 15}':
            return Metered("a1", None, None, USAGE, "complete")
        # Unreadable: the dialect charges its estimate (as Dify's does).
        return Metered(None, None, None, ESTIMATE, "cut")


@dataclass
class FakeMeter:
    """Text makes an estimate, a `usage` event the real usage."""

    task_id: str | None = "t1"
    text: int = 0
    usage: bool = False
    finished: list[bool] = field(default_factory=list)
    broken: bool = False

    def feed(self, event: ServerSentEvent) -> None:
        if event.event == "usage":
            self.usage = True
        else:
            self.text += 1

    def finish(self, *, cut: bool) -> Metered:
        self.finished.append(cut)
        if self.broken:
            raise RuntimeError("a bug in the meter")
        if self.usage:
            return Metered("a1", self.task_id, None, USAGE, "complete")
        if self.text:
            estimate = Usage(completion_tokens=1, total_tokens=1, estimated=True)
            return Metered("a1", self.task_id, None, estimate, "cut" if cut else "error")
        return Metered(None, self.task_id, None, None, "cut" if cut else "error")


class Upper:
    """A transform that holds nothing back until flushed."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk.upper()

    def flush(self) -> bytes:
        return b"<flushed>"


def relay(
    *,
    sse: bool = True,
    policy: Policy = "drain",
    stops_by_closing: bool = False,
    task_id: str | None = "t1",
    transform: Upper | None = None,
    max_event_bytes: int = 1024,
) -> Relay:
    return Relay(
        FakeDialect(stops_by_closing=stops_by_closing),  # type: ignore[arg-type]
        ROUTE,
        {},
        sse=sse,
        meter=FakeMeter(task_id=task_id) if sse else None,
        decoder=SSEDecoder(max_event_bytes=max_event_bytes) if sse else None,
        transform=transform,
        policy=policy,
        grace=7.0,
        max_buffered=1024,
    )


def chunk(r: Relay, data: bytes) -> bytes | None:
    """The driver's hot path: forward, then meter."""
    out = r.forward(data)
    r.meter_chunk(data)
    return out


def decision(commands: list[Any]) -> Settle | Refund:
    (one,) = [c for c in commands if isinstance(c, Settle | Refund)]
    return one


# --- the table -----------------------------------------------------------------------


def test_normal_end_with_usage_is_settled_complete() -> None:
    r = relay(transform=Upper())
    assert chunk(r, TEXT) == TEXT.upper()
    assert chunk(r, USAGE_EVENT) == USAGE_EVENT.upper()
    commands = r.upstream_ended()
    assert commands == [End(b"<flushed>"), Settle(commands[1].result, "complete")]  # type: ignore[union-attr]
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.result.usage == USAGE
    assert r.state == "finished" and r.meter is not None and r.meter.finished == [False]  # type: ignore[attr-defined]


def test_end_without_usage_is_settled_on_an_estimate() -> None:
    r = relay()
    chunk(r, TEXT)
    commands = r.upstream_ended()
    settle = decision(commands)
    assert isinstance(settle, Settle)
    assert settle.result.usage is not None and settle.result.usage.estimated
    assert settle.outcome == "error"
    assert commands[0] == End(b"")


def test_broken_before_the_first_byte_is_refunded_with_an_error_event() -> None:
    r = relay()
    commands = r.upstream_broken("read")
    assert commands[0] == Send(b"event: error\ndata: 502 upstream_error\n\n")
    assert commands[1] == End(b"")
    refund = decision(commands)
    assert isinstance(refund, Refund) and refund.result.outcome == "cut"
    # Nothing was generated that has a task to stop? The meter names one: stopped.
    assert Stop("t1", wait=False) in commands
    assert r.state == "cut"


def test_broken_after_the_first_byte_is_charged_what_was_read() -> None:
    r = relay(transform=Upper())
    chunk(r, TEXT)
    commands = r.upstream_broken("timeout")
    # Cut: what the transform held is not flushed into a broken stream.
    assert commands[:2] == [Send(b"event: error\ndata: 502 upstream_error\n\n"), End(b"")]
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.outcome == "cut"
    assert settle.result.usage is not None and settle.result.usage.estimated


def test_client_gone_then_drained_to_the_end_is_settled_disconnected() -> None:
    r = relay()
    chunk(r, TEXT)
    # Read on for the grace; stopped by a call at its end (`deadline_near`), read on
    # for as long again (at most STOP_LEAD) for the usage the stop brings.
    assert r.client_left() == [ExtendDeadline(14.0), StopAfter(7.0)]
    assert r.state == "draining" and not r.listening and r.reading
    assert chunk(r, USAGE_EVENT) is None  # metered, not sent
    commands = r.upstream_ended()
    assert not any(isinstance(c, End | Send | Stop) for c in commands)
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.outcome == "disconnected"
    assert settle.result.usage == USAGE
    assert r.meter.finished == [True]  # type: ignore[union-attr]  # the meter knows it was left


def test_client_gone_with_stop_by_closing_meters_the_chunk_in_hand() -> None:
    r = relay(policy="stop", stops_by_closing=True)
    chunk(r, TEXT)
    assert r.client_left() == [Stop(None)]
    assert r.state == "stopped" and not r.reading
    r.meter_chunk(USAGE_EVENT)  # the chunk in hand
    commands = r.upstream_ended()
    assert str(r.state) == "cut"  # (mypy narrowed the state to "stopped" above)
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.outcome == "disconnected"
    assert not any(isinstance(c, Stop) for c in commands)  # closing was the stop


def test_client_gone_with_a_stop_call_that_worked() -> None:
    r = relay(policy="stop")
    chunk(r, TEXT)
    assert r.client_left() == [Stop("t1"), ExtendDeadline(7.0)]
    r.stop_answered(True)
    commands = r.deadline()  # the stopped answer never ended: the grace ran out
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.outcome == "disconnected"
    assert not any(isinstance(c, Stop | Send | End) for c in commands)


def test_client_gone_with_a_stop_call_that_failed_is_stopped_again_at_the_end() -> None:
    r = relay(policy="stop")
    chunk(r, TEXT)
    r.client_left()
    r.stop_answered(False)
    commands = r.deadline()
    assert Stop("t1", wait=False) in commands
    assert isinstance(decision(commands), Settle)


def test_stop_policy_without_a_task_id_drains() -> None:
    r = relay(policy="stop", task_id=None)
    assert r.client_left() == [ExtendDeadline(14.0), StopAfter(7.0)]
    assert r.state == "draining"
    assert r.deadline_near() == []  # still no task to stop by a call


def test_a_drained_answer_is_stopped_when_its_grace_ends_and_read_to_its_usage() -> None:
    """Drained to the end of its grace, the answer is stopped by a call and read
    on: the upstream ends a stopped answer with the usage so far (Dify's
    message_end), which is charged - cut at the grace's end instead, it was
    an estimate, which prices no money for Dify."""
    r = relay()
    chunk(r, TEXT)
    assert r.client_left() == [ExtendDeadline(14.0), StopAfter(7.0)]
    assert r.deadline_near() == [Stop("t1")]
    r.stop_answered(True)
    assert r.deadline_near() == []  # stopped once
    assert chunk(r, USAGE_EVENT) is None
    commands = r.upstream_ended()
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.outcome == "disconnected"
    assert settle.result.usage == USAGE
    assert not any(isinstance(c, Stop) for c in commands)


def test_a_drained_answer_whose_stop_failed_is_stopped_again_when_cut() -> None:
    r = relay()
    chunk(r, TEXT)
    r.client_left()
    assert r.deadline_near() == [Stop("t1")]
    r.stop_answered(False)
    commands = r.deadline()
    assert Stop("t1", wait=False) in commands
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.result.usage is not None
    assert settle.result.usage.estimated


def test_an_answer_still_running_at_its_total_deadline_is_stopped_and_read_to_its_usage() -> None:
    """The client still there, the answer reaches ``upstream.total_timeout``: a
    stop call then, and the answer read on (10 s at most, as long again for a
    shorter deadline) to the usage the upstream ends it with, which the client
    receives too."""
    r = relay()
    assert (r.stop_at(600.0), r.after_stop(600.0)) == (StopAfter(600.0), 10.0)
    assert (r.stop_at(4.0), r.after_stop(4.0)) == (StopAfter(4.0), 4.0)
    chunk(r, TEXT)
    assert r.deadline_near() == [Stop("t1")]
    r.stop_answered(True)
    assert chunk(r, USAGE_EVENT) == USAGE_EVENT  # still sent: the client listens
    settle = decision(r.upstream_ended())
    assert isinstance(settle, Settle) and settle.outcome == "complete"
    assert settle.result.usage == USAGE


def test_no_stop_call_before_a_deadline_where_it_cannot_help() -> None:
    """Stopped by closing (OpenAI, Anthropic), no meter (a blocking answer), no
    task named yet, the answer over."""
    r = relay(stops_by_closing=True)
    assert (r.stop_at(600.0), r.after_stop(600.0)) == (None, 0.0)
    assert r.client_left() == [ExtendDeadline(7.0)]  # closing at the end is the stop
    assert r.deadline_near() == []
    assert relay(sse=False).stop_at(600.0) is None
    r = relay(task_id=None)
    assert r.deadline_near() == []
    r = relay()
    r.client_left()
    r.upstream_ended()
    assert r.deadline_near() == []  # the answer is over


def test_grace_expired_before_any_text_is_refunded() -> None:
    r = relay()
    r.client_left()
    commands = r.deadline()
    refund = decision(commands)
    assert isinstance(refund, Refund) and refund.result.outcome == "cut"
    assert not any(isinstance(c, Send | End) for c in commands)  # nobody listens


def test_shutdown_mid_stream_is_settled_then_the_client_told() -> None:
    r = relay(transform=Upper())
    chunk(r, TEXT)
    commands = r.shutdown()
    assert r.state == "shutdown"
    assert Count("gateway_answers_cut_at_shutdown_total") in commands
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.outcome == "shutdown"
    # No End before the settle: the notice comes after it, and ends the stream.
    assert not any(isinstance(c, End) for c in commands)
    assert commands[-1] == Notice(b"event: error\ndata: 503 shutting_down\n\n")
    assert commands.index(settle) < len(commands) - 1


def test_shutdown_after_a_complete_answer_is_not_counted_as_cut() -> None:
    r = relay()
    chunk(r, TEXT + USAGE_EVENT)
    commands = r.shutdown()
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.outcome == "complete"
    assert not any(isinstance(c, Count) for c in commands)


def test_shutdown_after_the_client_left_sends_nothing() -> None:
    r = relay()
    r.client_left(at_end=True)
    commands = r.shutdown()
    assert not any(isinstance(c, Notice | Send | End) for c in commands)
    refund = decision(commands)  # nothing was read: nothing to charge
    assert isinstance(refund, Refund) and refund.result.outcome == "shutdown"


def test_event_too_large_is_never_free() -> None:
    r = relay(max_event_bytes=16)
    chunk_out = r.forward(b"data: " + b"x" * 64)
    assert chunk_out is not None  # passed on before the decoder refused it
    with pytest.raises(Exception) as refused:
        r.meter_chunk(b"data: " + b"x" * 64)
    commands = r.event_too_large(getattr(refused.value, "events", []))
    assert commands[0] == Send(b"\n\nevent: error\ndata: 502 upstream_error\n\n")
    settle = decision(commands)
    assert isinstance(settle, Settle)
    assert settle.result.usage == ESTIMATE and settle.result.error_code == "event_too_large"
    assert settle.outcome == "cut"


def test_event_too_large_keeps_the_usage_the_same_chunk_completed() -> None:
    r = relay()
    commands = r.event_too_large([ServerSentEvent("usage", "{}")])
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.result.usage == USAGE


def test_gateway_bug_mid_relay_is_charged_with_an_error_event() -> None:
    r = relay(transform=Upper())
    commands = r.gateway_failed()
    assert commands[0] == End(b"event: error\ndata: 500 internal_server_error\n\n")
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.result.usage == ESTIMATE
    assert settle.result.error_code == "gateway_error" and settle.outcome == "cut"
    assert r.state == "failed"


def test_a_meter_that_fails_at_the_end_is_charged_the_estimate() -> None:
    r = relay()
    r.meter.broken = True  # type: ignore[union-attr]
    commands = r.upstream_ended()
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.result.usage == ESTIMATE
    assert isinstance(settle.metering_error, RuntimeError)


def test_a_blocking_answer_is_buffered_and_metered_once() -> None:
    r = relay(sse=False)
    assert chunk(r, b'{"usage": ') == b'{"usage": '
    assert chunk(r, b"15}") == b"15}"
    commands = r.upstream_ended()
    assert commands[0] == End(b"")
    settle = decision(commands)
    assert isinstance(settle, Settle) and settle.result.usage == USAGE


def test_an_unreadable_blocking_answer_is_charged_an_estimate() -> None:
    r = relay(sse=False)
    chunk(r, b"<html>not json</html>")
    settle = decision(r.upstream_ended())
    assert isinstance(settle, Settle) and settle.result.usage == ESTIMATE


def test_a_blocking_answer_past_the_buffer_is_cut_short_not_grown() -> None:
    r = relay(sse=False)
    chunk(r, b"x" * 1000)
    chunk(r, b"y" * 1000)
    chunk(r, b"z" * 1000)
    assert len(r.buffer) == 2000  # one chunk past the cap, then no more
    assert isinstance(decision(r.upstream_ended()), Settle)


def test_a_broken_blocking_answer_sends_no_sse_error_event() -> None:
    r = relay(sse=False)
    commands = r.upstream_broken("read")
    assert commands[0] == End(b"")
    assert isinstance(decision(commands), Settle)  # the dialect's estimate


@pytest.mark.parametrize(
    "ending",
    ["upstream_ended", "deadline", "shutdown", "gateway_failed"],
)
def test_a_second_ending_raises(ending: str) -> None:
    r = relay()
    r.upstream_ended()
    with pytest.raises(RelayEnded):
        getattr(r, ending)()
    with pytest.raises(RelayEnded):
        r.forward(TEXT)
    with pytest.raises(RelayEnded):
        r.client_left()
    with pytest.raises(RelayEnded):
        r.event_too_large([])


# --- random sequences ------------------------------------------------------------------

EVENTS = st.sampled_from(
    [
        "chunk",
        "usage",
        "client_left",
        "client_left_at_end",
        "ended",
        "broken",
        "deadline",
        "too_large",
        "shutdown",
        "failed",
        "stop_ok",
        "stop_failed",
        "deadline_near",
    ]
)


def feed(r: Relay, event: str) -> list[Any]:
    if event == "chunk":
        chunk(r, TEXT)
        return []
    if event == "usage":
        chunk(r, USAGE_EVENT)
        return []
    if event == "client_left":
        return r.client_left()
    if event == "client_left_at_end":
        return r.client_left(at_end=True)
    if event == "ended":
        return r.upstream_ended()
    if event == "broken":
        return r.upstream_broken("read")
    if event == "deadline":
        return r.deadline()
    if event == "too_large":
        return r.event_too_large([])
    if event == "shutdown":
        return r.shutdown()
    if event == "failed":
        return r.gateway_failed()
    if event == "deadline_near":
        return r.deadline_near()
    if event == "stop_ok":
        r.stop_answered(True)
        return []
    r.stop_answered(False)
    return []


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(EVENTS, max_size=12),
    sse=st.booleans(),
    policy=st.sampled_from(["drain", "stop"]),
    stops_by_closing=st.booleans(),
)
def test_any_sequence_ends_exactly_once(
    events: list[str], sse: bool, policy: Policy, stops_by_closing: bool
) -> None:
    r = relay(sse=sse, policy=policy, stops_by_closing=stops_by_closing)
    endings: list[Settle | Refund] = []
    ended = False
    sent_after_client_left = False
    for event in events:
        if ended:
            if event in ("stop_ok", "stop_failed"):
                continue
            if event == "deadline_near":
                assert r.deadline_near() == []  # (a timer that fired late: nothing)
                continue
            with pytest.raises(RelayEnded):
                feed(r, event)
            continue
        was_listening = r.listening
        if event in ("chunk", "usage") and not r.reading:
            # The driver stops reading once stopped: it ends the relay instead.
            event = "ended"
        out_commands = feed(r, event)
        endings += [c for c in out_commands if isinstance(c, Settle | Refund)]
        if not was_listening and any(isinstance(c, Send | End | Notice) for c in out_commands):
            sent_after_client_left = True
        ended = r.state in ("finished", "cut", "shutdown", "failed")
        if ended:
            assert len(endings) == 1
            assert isinstance(out_commands[-1], Settle | Refund | Notice)
    if not ended:
        endings += [c for c in r.upstream_ended() if isinstance(c, Settle | Refund)]
    assert len(endings) == 1
    assert r.ending is endings[0]
    assert not sent_after_client_left
    ending = endings[0]
    if isinstance(ending, Refund):
        assert ending.result.usage is None
    else:
        assert ending.result.usage is not None


def test_a_ticket_gives_its_reservation_up_once() -> None:
    ticket = Ticket("u1", date(2026, 1, 1), reserved=True, lease_id=None)
    assert ticket.release() is True
    assert ticket.release() is False  # a second settle or refund finds nothing held
    assert not ticket.reserved
