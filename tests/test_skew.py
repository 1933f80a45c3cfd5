"""The gateway's clock against the database's (gateway/skew.py): measured at
start-up and before each recovery pass, exported, a start refused past
``database.max_clock_offset``; and a recovery by a clock ahead of the others'
charges no answer still streaming (gateway/recovery.py)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from gateway.clock import FixedClock, Offset
from gateway.config import parse_config
from gateway.errors import ClockError, ConfigError
from gateway.metrics import Metrics
from gateway.recovery import Recovery
from gateway.runtime import Gateway
from gateway.storage import AdmissionLimits, Pending, Storage
from tests.harness import running_gateway

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming"}
OFFSET = "gateway_clock_offset_seconds"

# SQLite is one machine: nothing to measure, no replica with another clock.
ON_POSTGRES = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


def config(database_url: str, **database: object) -> object:
    return parse_config(
        {
            "database": {"url": database_url, "spool_file": "", **database},
            "accounting": {"timezone": "UTC"},
            "plans": {"free": {}},
        },
        env={},
    )


# --- the measure ----------------------------------------------------------------------


def test_the_offset_is_taken_against_the_midpoint_of_the_round_trip() -> None:
    sent = datetime(2026, 12, 8, 1, 0, tzinfo=UTC)
    offset = Offset.between(
        sent, sent + timedelta(seconds=70, milliseconds=100), sent + timedelta(milliseconds=200)
    )
    assert offset.seconds == pytest.approx(70.0)  # the database read at our +100 ms
    assert offset.round_trip == pytest.approx(0.2)
    assert offset.local == sent + timedelta(milliseconds=100)
    # Past a bound only if past it however the round trip split.
    assert offset.beyond(69.85) and not offset.beyond(69.95)
    behind = Offset.between(sent, sent - timedelta(seconds=3), sent)
    assert behind.seconds == -3.0 and behind.beyond(2.5) and not behind.beyond(3)


def test_max_clock_offset_is_parsed_and_checked() -> None:
    assert config("sqlite:///x.db").database.max_clock_offset == 5.0  # type: ignore[attr-defined]
    parsed = config("sqlite:///x.db", max_clock_offset=1.5)
    assert parsed.database.max_clock_offset == 1.5  # type: ignore[attr-defined]
    assert config("sqlite:///x.db", max_clock_offset=0).database.max_clock_offset == 0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"database\.max_clock_offset"):
        config("sqlite:///x.db", max_clock_offset=-1)
    with pytest.raises(ConfigError, match=r"database\.max_clock_offset"):
        config("sqlite:///x.db", max_clock_offset="5s")


# --- start-up -------------------------------------------------------------------------


async def test_a_gateway_whose_clock_is_far_from_the_database_does_not_start(
    database_url: str, storage: Storage
) -> None:
    ahead = FixedClock(datetime.now(UTC) + timedelta(seconds=70))
    gateway = Gateway(config(database_url), clock=ahead, storage=storage)  # type: ignore[arg-type]
    if database_url.startswith("sqlite"):
        # One machine, one clock: nothing to measure, nothing refused.
        await gateway.start()
        try:
            assert gateway.metrics.get(OFFSET) == 0
        finally:
            await gateway.stop()
        return
    with pytest.raises(ClockError) as refused:
        await gateway.start()
    message = refused.value.message
    # Both clocks, the offset and the setting, in the one line the operator reads.
    assert "this machine's clock (" + ahead.now().isoformat() + ")" in message
    assert "ahead of the database's (2" in message
    assert "database.max_clock_offset (5 s)" in message
    seconds = float(message.split(") is ")[1].split(" s ")[0])
    assert 60 < seconds <= 70  # the database's clock went on meanwhile


@ON_POSTGRES
async def test_a_gateway_near_the_database_clock_starts_and_exports_the_offset(
    database_url: str, storage: Storage
) -> None:
    behind = FixedClock(datetime.now(UTC) - timedelta(seconds=2))
    gateway = Gateway(config(database_url), clock=behind, storage=storage)  # type: ignore[arg-type]
    await gateway.start()
    try:
        assert 1.9 < gateway.metrics.get(OFFSET) < 5
    finally:
        await gateway.stop()
    # 0 turns the check off, not the measure.
    ahead = FixedClock(datetime.now(UTC) + timedelta(hours=1))
    unchecked = Gateway(
        config(database_url, max_clock_offset=0),  # type: ignore[arg-type]
        clock=ahead,
        storage=storage,
    )
    await unchecked.start()
    try:
        assert -3600 < unchecked.metrics.get(OFFSET) < -3590
    finally:
        await unchecked.stop()


# --- while serving --------------------------------------------------------------------


@ON_POSTGRES
async def test_a_clock_that_drifts_past_the_bound_is_logged_and_the_gateway_serves_on(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FixedClock(datetime.now(UTC))
    # A bound wide enough for a loaded machine's start-up to pass under the
    # standing clock, a jump well past it.
    settings = {"database": {"max_clock_offset": 20, "recover_interval": 0.01}}
    async with running_gateway(database_url, settings=settings, clock=clock) as h:
        assert abs(h.gateway.metrics.get(OFFSET)) < 20  # started: within the bound
        caplog.set_level(logging.INFO, logger="gateway.skew")
        clock.set(datetime.now(UTC) + timedelta(seconds=120))  # the machine's clock jumps
        passes = h.probes.recoveries.value
        await h.probes.recoveries.wait_for(passes + 2)
        assert -120 < h.gateway.metrics.get(OFFSET) < -100
        errors = [r for r in caplog.records if r.name == "gateway.skew" and r.levelname == "ERROR"]
        assert errors and "ahead of the database's" in errors[0].getMessage()
        assert "Still serving" in errors[0].getMessage()
        # It serves on, and /metrics says it.
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            answer = await client.post(
                "/v1/chat-messages", json={**CHAT, "response_mode": "blocking"}, headers=h.auth()
            )
            assert answer.status_code == 200
        # Set right again: said once.
        clock.set(datetime.now(UTC))
        passes = h.probes.recoveries.value
        await h.probes.recoveries.wait_for(passes + 2)
        back = [r.getMessage() for r in caplog.records if "back within" in r.getMessage()]
        assert len(back) == 1
        assert abs(h.gateway.metrics.get(OFFSET)) < 20


# --- recovery -------------------------------------------------------------------------


@ON_POSTGRES
async def test_a_recovery_by_a_clock_ahead_charges_no_answer_still_streaming(
    database_url: str,
) -> None:
    """One replica admits an answer and streams it; another, whose clock runs
    ahead by more than recover_after, looks for lost answers meanwhile. On
    PostgreSQL the age is also taken on the database's clock: the live answer
    is left to its gateway, and charged once, what it used."""
    settings = {"database": {"recover_interval": 0}}
    async with running_gateway(database_url, settings=settings) as h:
        assert h.fake is not None
        after = h.gateway.recover_after
        ahead = FixedClock(datetime.now(UTC) + after + timedelta(minutes=5))
        other_replica = Recovery(h.storage, clock=ahead, metrics=Metrics(), after=after)
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            async with client.stream(
                "POST",
                "/v1/chat-messages",
                json=CHAT,
                headers=h.auth(**{"x-fake-scenario": "hold"}),
            ) as response:
                chunks = response.aiter_raw()
                assert b'"event":"message"' in await anext(chunks)
                assert h.fake.holding == 1  # the answer is streaming
                assert await other_replica.run_once() == 0
                h.fake.release_held()
                rest = b"".join([chunk async for chunk in chunks])
        assert b"message_end" in rest
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert event.outcome != "recovered" and not event.estimated
        assert not event.answer_id.startswith("gw-")


async def test_a_recovery_by_a_clock_ahead_still_charges_a_dead_gateways_answer(
    database_url: str, storage: Storage
) -> None:
    """The database's clock only ever holds a recovery back: an answer admitted
    long ago (its gateway gone) is charged by a replica ahead as by any other."""
    now = datetime.now(UTC)
    admitted = now - timedelta(hours=1)
    await storage.ensure_user("alice", plan="free")
    admission = await storage.admit(
        "alice",
        day=admitted.date(),
        month_start=admitted.date().replace(day=1),
        now=admitted,
        limits=AdmissionLimits(queries_per_day=10),
        pending=Pending(id="r1", endpoint="chat-messages", total_tokens=25, cost=Decimal(0)),
    )
    assert admission.admitted
    ahead = FixedClock(now + timedelta(minutes=30))
    recovery = Recovery(storage, clock=ahead, metrics=Metrics(), after=timedelta(minutes=10))
    assert await recovery.run_once() == 1
