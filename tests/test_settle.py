"""The settler never loses a usage record: retries, spool file, replay."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

import gateway.settle
from gateway.errors import StorageError
from gateway.metrics import Metrics
from gateway.settle import Settler, Write, event_from_json, event_to_json
from gateway.storage import AdmissionLimits, AlertCheck, AlertRequest, Pending, Storage, UsageEvent
from gateway.usage_bounds import DEFAULT_MAX_TOKENS_PER_ANSWER, bound_event
from tests.spool import spooled_lines

EVENT = UsageEvent(
    answer_id="m1",
    user_id="alice",
    day=date(2026, 11, 21),
    created_at=datetime(2026, 11, 21, 3, 4, 5, tzinfo=UTC),
    endpoint="chat-messages",
    prompt_tokens=1033,
    completion_tokens=135,
    total_tokens=1168,
    cost=Decimal("0.0013030"),
    estimated=True,
    outcome="cut",
    upstream_latency_ms=12.5,
)


class Flaky:
    """Delegates to a real storage, failing the first ``failures`` settles."""

    def __init__(self, storage: Storage, failures: int) -> None:
        self.storage = storage
        self.failures = failures

    async def settle(
        self,
        event: UsageEvent,
        *,
        lease_id: str | None = None,
        pending_id: str | None = None,
        alerts: Any = None,
    ) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise StorageError("database unreachable")
        return await self.storage.settle(
            event, lease_id=lease_id, pending_id=pending_id, alerts=alerts
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def test_events_round_trip_through_json() -> None:
    assert event_from_json(event_to_json(Write(EVENT))) == Write(EVENT)
    assert event_from_json(event_to_json(Write(EVENT, "lease-1"))) == Write(EVENT, "lease-1")
    both = Write(EVENT, "lease-1", "req-1")
    assert event_from_json(event_to_json(both)) == both


def test_the_upstream_rides_the_spool_and_a_line_from_before_it_reads_as_default() -> None:
    routed = replace(EVENT, upstream="research", model="gpt-4o")
    line = event_to_json(Write(routed, "lease-1", "req-1"))
    assert orjson.loads(line)["upstream"] == "research"
    assert event_from_json(line) == Write(routed, "lease-1", "req-1")
    # A spool line written before issue 23 has no upstream field.
    older = orjson.loads(line)
    del older["upstream"]
    assert event_from_json(orjson.dumps(older)).event == replace(routed, upstream="default")


async def test_a_spooled_record_from_before_upstreams_lands_as_the_default_upstreams(
    storage: Storage, tmp_path: Path
) -> None:
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    older = orjson.loads(event_to_json(Write(EVENT)))
    del older["upstream"]
    newer = event_to_json(Write(replace(EVENT, answer_id="m2", upstream="support")))
    spool.write_bytes(orjson.dumps(older) + b"\n" + newer + b"\n")
    assert await Settler(storage, metrics=Metrics(), spool=spool).replay() == 2
    events = {e.answer_id: e.upstream async for e in storage.events(EVENT.day, EVENT.day)}
    assert events == {"m1": "default", "m2": "support"}


async def test_a_failed_write_is_retried(storage: Storage, tmp_path: Path) -> None:
    await storage.ensure_user("alice", plan="free")
    metrics = Metrics()
    settler = Settler(
        Flaky(storage, failures=2),
        metrics=metrics,
        spool=tmp_path / "spool",
        retry_delays=(0, 0, 0),
    )  # type: ignore[arg-type]
    await settler.record(EVENT)
    assert settler.pending == 1
    await next(iter(settler._tasks))
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 1168
    assert metrics.get("gateway_settle_retries_total") == 2
    assert not (tmp_path / "spool").exists()


async def test_a_record_is_bounded_once_and_its_retry_bounds_it_again(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # record bounds the answer (for its log line and its write); its first write
    # does not bound it again, a retry (or a replay) does.
    bounded: list[str] = []

    def counted(event: UsageEvent, *, max_tokens: int) -> tuple[UsageEvent, list[str]]:
        bounded.append(event.answer_id)
        return bound_event(event, max_tokens=max_tokens)

    monkeypatch.setattr(gateway.settle, "bound_event", counted)
    await storage.ensure_user("alice", plan="free")
    settler = Settler(
        Flaky(storage, failures=1),
        metrics=Metrics(),
        spool=tmp_path / "spool",
        retry_delays=(0,),
    )  # type: ignore[arg-type]
    huge = replace(EVENT, total_tokens=10**30)
    await settler.record(huge)
    assert bounded == ["m1"]
    await next(iter(settler._tasks))
    assert bounded == ["m1", "m1"]
    user = await storage.get_user("alice")
    clamped, _ = bound_event(huge, max_tokens=DEFAULT_MAX_TOKENS_PER_ANSWER)
    assert user is not None and user.lifetime_tokens == clamped.total_tokens < 10**30


async def test_records_that_cannot_be_written_are_spooled_and_replayed(
    storage: Storage, tmp_path: Path
) -> None:
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    settler = Settler(
        Flaky(storage, failures=100), metrics=Metrics(), spool=spool, retry_delays=(0, 0)
    )  # type: ignore[arg-type]
    await settler.record(EVENT)
    await next(iter(settler._tasks))
    assert len(spooled_lines(spool)) == 1

    # Shutting down with a retry pending spools it too.
    slow = Settler(Flaky(storage, failures=100), metrics=Metrics(), spool=spool, retry_delays=(60,))  # type: ignore[arg-type]
    await slow.record(replace(EVENT, answer_id="m2"))
    await slow.close()
    assert len(spooled_lines(spool)) == 2

    # The next start replays both; replaying again changes nothing.
    healthy = Settler(storage, metrics=Metrics(), spool=spool)
    assert await healthy.replay() == 2
    assert not spool.exists()
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 2 * 1168
    assert await healthy.replay() == 0


ALERTS = AlertRequest(
    (AlertCheck("tokens_per_day", "2026-11-21", 2000, (50, 100)),),
    date(2026, 11, 1),
    ("webhook",),
)


async def test_a_spooled_answer_is_checked_for_alerts_when_replayed(
    storage: Storage, tmp_path: Path
) -> None:
    """The crossing a spooled answer made is announced at replay, not only when
    some later answer of the same period happens to settle."""
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    # Retried until given up, and pending at shutdown: both ways keep the check.
    down = Settler(Flaky(storage, failures=100), metrics=Metrics(), spool=spool, retry_delays=(0,))  # type: ignore[arg-type]
    await down.record(EVENT, plan="free", alerts=ALERTS)  # 1168 of 2000: 50%
    await next(iter(down._tasks))
    slow = Settler(Flaky(storage, failures=100), metrics=Metrics(), spool=spool, retry_delays=(60,))  # type: ignore[arg-type]
    await slow.record(replace(EVENT, answer_id="m2"), plan="free", alerts=ALERTS)  # 2336: 100%
    await slow.close()
    assert await storage.list_alerts() == []

    metrics = Metrics()
    assert await Settler(storage, metrics=metrics, spool=spool).replay() == 2
    crossed = {(a.crossing.threshold, a.crossing.used) for a in await storage.list_alerts()}
    assert crossed == {(50, 1168), (100, 2336)}
    assert metrics.get("gateway_tokens_total", plan="free", model="", kind="prompt") == 2 * 1033


async def test_a_spooled_alert_check_that_cannot_be_read_does_not_cost_the_record(
    storage: Storage, tmp_path: Path
) -> None:
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    line = orjson.loads(event_to_json(Write(EVENT, alerts=ALERTS)))
    line["_alerts"]["checks"] = [["tokens_per_week", "2026-W47", 1, [50]]]
    older = event_to_json(Write(replace(EVENT, answer_id="m2")))  # a line from before alert checks
    spool.write_bytes(orjson.dumps(line) + b"\n" + older + b"\n")
    assert await Settler(storage, metrics=Metrics(), spool=spool).replay() == 2
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 2 * 1168
    assert await storage.list_alerts() == []


async def test_a_spooled_record_claims_its_pending_answer_when_replayed(
    storage: Storage, tmp_path: Path
) -> None:
    """Spooled at shutdown, replayed at the next start: the answer's pending row
    goes with the replay (no recovery charges it again); an answer a recovery
    charged first is counted once, its late replay superseding the estimate."""
    await storage.ensure_user("alice", plan="free")
    hour = timedelta(hours=1)
    for name, admitted_at in (("r1", EVENT.created_at), ("r2", EVENT.created_at - hour)):
        assert (
            await storage.admit(
                "alice",
                day=EVENT.day,
                month_start=EVENT.day.replace(day=1),
                limits=AdmissionLimits(),
                now=admitted_at,
                pending=Pending(id=name, endpoint="chat-messages", total_tokens=5),
            )
        ).admitted
    spool = tmp_path / "spool.jsonl"
    down = Settler(Flaky(storage, failures=100), metrics=Metrics(), spool=spool, retry_delays=(60,))  # type: ignore[arg-type]
    await down.record(EVENT, pending_id="r1")
    await down.record(replace(EVENT, answer_id="m2"), pending_id="r2")
    await down.close()
    # r2 is old enough to be taken for lost before the replay: recovered as an estimate.
    assert await storage.recover(before=EVENT.created_at - hour / 2, now=EVENT.created_at) == ["r2"]
    metrics = Metrics()
    healthy = Settler(storage, metrics=metrics, spool=spool)
    assert await healthy.replay() == 2
    later = EVENT.created_at + hour
    assert await storage.recover(before=later, now=later) == []  # r1 went with its replay
    events = {e.answer_id: e async for e in storage.events(EVENT.day, EVENT.day)}
    assert sorted(events) == ["m1", "m2"]  # one row per admitted answer, real figures
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 2 * 1168
    assert metrics.get("gateway_answers_duplicate_total") == 0


class Held:
    """Delegates to a real storage; each settle is held at ``entered`` until
    ``go`` is set, having been written first when ``lands`` is true (a write
    whose commit arrived just as it was given up)."""

    def __init__(self, storage: Storage, *, lands: bool) -> None:
        self.storage = storage
        self.lands = lands
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def settle(
        self,
        event: UsageEvent,
        *,
        lease_id: str | None = None,
        pending_id: str | None = None,
        alerts: Any = None,
    ) -> bool:
        written = False
        if self.lands:
            written = await self.storage.settle(
                event, lease_id=lease_id, pending_id=pending_id, alerts=alerts
            )
        self.entered.set()
        await self.go.wait()
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


@pytest.mark.parametrize("lands", [False, True], ids=["not-written", "written-as-given-up"])
async def test_a_record_given_up_in_flight_is_spooled_and_counted_once(
    storage: Storage, tmp_path: Path, lands: bool
) -> None:
    """A shutdown past its grace cancels the answers still being recorded: one
    cancelled while its ledger write was on its way lost its exact usage (its
    pending row's estimate was charged later instead). It is spooled; replayed,
    it is counted once whether or not the cancelled write landed (review of the
    shutdown fix)."""
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    held = Held(storage, lands=lands)
    settler = Settler(held, metrics=Metrics(), spool=spool)  # type: ignore[arg-type]
    recording = asyncio.ensure_future(settler.record(EVENT))
    await held.entered.wait()
    recording.cancel()
    with pytest.raises(asyncio.CancelledError):
        await recording
    assert len(spooled_lines(spool)) == 1

    healthy = Settler(storage, metrics=Metrics(), spool=spool)
    assert await healthy.replay() == 1
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 1168


async def test_a_landed_record_under_an_id_another_request_took_is_replayed_once(
    storage: Storage, tmp_path: Path
) -> None:
    """An answer whose id an earlier request's answer has (an upstream that
    repeats ids, review-once F1), given up in flight after its write landed and
    replayed from the spool: charged, once (same request: a duplicate)."""
    await storage.ensure_user("alice", plan="free")
    assert await storage.settle(replace(EVENT, request_id="r0", total_tokens=10))
    spool = tmp_path / "spool.jsonl"
    held = Held(storage, lands=True)
    settler = Settler(held, metrics=Metrics(), spool=spool)  # type: ignore[arg-type]
    recording = asyncio.ensure_future(settler.record(replace(EVENT, request_id="r1")))
    await held.entered.wait()
    recording.cancel()
    with pytest.raises(asyncio.CancelledError):
        await recording
    assert len(spooled_lines(spool)) == 1

    metrics = Metrics()
    healthy = Settler(storage, metrics=metrics, spool=spool)
    assert await healthy.replay() == 1
    assert metrics.get("gateway_answers_duplicate_total") == 1
    events = [e async for e in storage.events(EVENT.day, EVENT.day)]
    assert [(e.answer_id, e.total_tokens) for e in events] == [("m1", 10), ("m1#r1", 1168)]
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 10 + 1168
