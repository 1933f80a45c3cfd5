"""The gateway's clock against the database's (gateway/skew.py): measured at
start-up and before each recovery pass, exported, a start refused past
``database.max_clock_offset``; and a recovery by a clock ahead of the others'
charges no answer still streaming (gateway/recovery.py)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from gateway.clock import FixedClock, Offset, SystemClock
from gateway.config import DatabaseConfig, parse_config
from gateway.errors import ClockError, ConfigError, StorageError
from gateway.metrics import Metrics
from gateway.recovery import Recovery
from gateway.runtime import Gateway
from gateway.skew import ClockWatch
from gateway.storage import AdmissionLimits, Pending, Storage, open_storage
from tests.harness import running_gateway
from tests.servers import free_port, kill_tree, start_gateway

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming"}
OFFSET = "gateway_clock_offset_seconds"
T0 = datetime(2026, 12, 8, 1, 0, tzinfo=UTC)

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
    await _admit_r1(storage, admitted)
    ahead = FixedClock(now + timedelta(minutes=30))
    recovery = Recovery(storage, clock=ahead, metrics=Metrics(), after=timedelta(minutes=10))
    assert await recovery.run_once() == 1


class ScriptedDatabase:
    """A Health whose clock answer is scripted: each call runs the next step, which
    may move this machine's clock (the time the call took, a step by the time
    service) and returns the database's clock or raises."""

    def __init__(self, steps: list[Callable[[], datetime]]) -> None:
        self._steps = list(steps)

    async def ping(self) -> None:
        return None

    async def database_time(self) -> datetime | None:
        return self._steps.pop(0)()


def watch(steps: list[Callable[[], datetime]], clock: FixedClock, bound: float = 5) -> ClockWatch:
    return ClockWatch(ScriptedDatabase(steps), clock=clock, metrics=Metrics(), bound=bound)


# --- the measure's samples (review-skew F1-F4) ---------------------------------------


async def test_one_slow_first_query_does_not_let_a_clock_70s_ahead_start() -> None:
    """The first query on a fresh connection times out (skew.py itself says it
    may be slow: that is why it takes three samples); the next two say this
    machine is 70 s ahead. The start must still be refused, not waved through
    with a warning."""
    clock = FixedClock(T0)

    def timed_out() -> datetime:
        raise StorageError("PostgreSQL error: TimeoutError: ")

    def database() -> datetime:
        return clock.now() - timedelta(seconds=70)

    with pytest.raises(ClockError):
        await watch([timed_out, database, database], clock).at_start()


async def test_a_clock_stepped_right_during_the_start_measure_is_not_refused() -> None:
    """chrony steps the clock 8 s back (to the right time) while the first sample
    is in flight; the other two samples find it within milliseconds of the
    database's. The round trip is read on the wall clock: the first sample's is
    -8 s, the "shortest", kept as the best, and its negative half-round-trip is
    added to the offset instead of subtracted: the start is refused for a clock
    that is right."""
    clock = FixedClock(T0 + timedelta(seconds=8))  # 8 s ahead until the step

    def stepped() -> datetime:
        clock.set(T0 + timedelta(milliseconds=1))  # chrony's step: now right
        return T0

    def database() -> datetime:
        clock.advance(timedelta(milliseconds=1))
        at = clock.now()
        clock.advance(timedelta(milliseconds=1))
        return at

    offset = await watch([stepped, database, database], clock).at_start()
    assert offset is not None
    assert offset.round_trip >= 0
    assert abs(offset.seconds) < 0.1


async def test_the_gauge_shows_the_least_the_offset_can_be() -> None:
    """The machine's clock is right; under load the measure waits 4 s for a
    pooled connection (all of it before the database reads its clock): the
    midpoint makes that a 2 s offset, +/- 2 s. The gauge shows what the offset
    is at least - 0 here - so GatewayClockOffset fires for a clock that is off,
    not for a busy database; a clock 70 s off still shows about 70."""
    clock = FixedClock(T0)

    def queued() -> datetime:
        clock.advance(timedelta(seconds=4))  # waiting for a connection
        at = clock.now()  # the database reads its clock (the same as ours)
        clock.advance(timedelta(milliseconds=1))
        return at

    def ahead() -> datetime:
        return clock.now() - timedelta(seconds=70)

    busy = watch([queued], clock)
    await busy.check()
    assert busy._metrics.get(OFFSET) == 0
    off = watch([ahead], clock)
    await off.check()
    assert off._metrics.get(OFFSET) == pytest.approx(-70, abs=0.01)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_max_clock_offset_nan_or_inf_is_refused(value: float) -> None:
    """TOML has ``nan`` and ``inf``: ``max_clock_offset = nan`` passed the
    ``minimum=0`` check (nan < 0 is false) and turned the check off without a
    word (every comparison with nan is false), as inf does."""
    with pytest.raises(ConfigError, match=r"database\.max_clock_offset"):
        parse_config(
            {
                "database": {"url": "sqlite:///x.db", "max_clock_offset": value},
                "plans": {"free": {}},
            },
            env={},
        )


async def test_a_nan_bound_that_got_in_refuses_rather_than_checks_nothing() -> None:
    """A nan bound that got in (the configuration refuses one) refuses the
    start rather than letting a clock an hour ahead start unchecked."""
    clock = FixedClock(T0)

    def database() -> datetime:
        return clock.now() - timedelta(hours=1)

    with pytest.raises(ClockError):
        await watch([database] * 3, clock, bound=math.nan).at_start()


# --- `gateway serve` refused for its clock (review-skew F5) ------------------------

# Loaded by every process of `gateway serve` (the workers are spawned, not
# forked): this machine's clock 70 s ahead of the database's.
AHEAD = """\
from datetime import UTC, datetime, timedelta

import gateway.clock

gateway.clock.SystemClock.now = lambda self: datetime.now(UTC) + timedelta(seconds=70)
"""


@pytest.mark.postgres
@pytest.mark.parametrize("workers", [1, 2])
async def test_gateway_serve_refused_for_its_clock_fails_with_one_line(
    own_database: str, tmp_path: Path, workers: int
) -> None:
    """`gateway serve` on a machine 70 s ahead: the start is refused in one line
    and a failing exit. Before, it was a traceback in uvicorn's "Application
    startup failed", and with more than one worker the command then exited 0,
    as a clean stop (review-skew F5): the clock is now checked in the parent
    first, as the currency is (cli._check_database)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AHEAD)
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[server]\nreload_interval = 0\n\n"
        f'[database]\nurl = "{own_database}"\nspool_file = ""\n\n[plans.free]\n'
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(config),
        "serve",
        "--port",
        str(free_port()),
        "--workers",
        str(workers),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    log = err.decode(errors="replace")
    assert "ahead of the database's" in log  # refused for its clock
    assert proc.returncode != 0
    assert "gateway: error: this machine's clock" in log
    assert "Traceback" not in log


# --- the database's cutoff in the session's time zone (review-skew F6) ----------------


def last_fall_back(zone: ZoneInfo, before: datetime) -> datetime:
    """The latest instant before ``before`` at which ``zone`` put its clocks back."""
    at = before.replace(minute=0, second=0, microsecond=0)
    while True:
        earlier = at - timedelta(hours=1)
        if earlier.astimezone(zone).utcoffset() > at.astimezone(zone).utcoffset():  # type: ignore[operator]
            return at
        at = earlier


@pytest.mark.postgres
async def test_a_recover_after_of_days_is_not_stretched_by_the_sessions_dst(
    own_database: str,
) -> None:
    """gateway_recover's cutoff by the database's clock is ``now() - (p_now -
    p_before)``: the difference of two timestamptz is justified into days
    ("40 days", not 960 hours), and a timestamptz minus days is reckoned in the
    session's TimeZone (the database's default: the gateway sets none). Across
    a fall-back that is 25 hours a day: with clocks that agree, an answer older
    than recover_after is left pending an hour more. (Needs recover_after of a
    day or more, or `p_now` a day from `now()`.) The cutoff is now `p_before`
    moved back by the clocks' difference alone (review-skew F6)."""
    zone = ZoneInfo("America/New_York")
    conn = await asyncpg.connect(own_database)
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"ALTER DATABASE \"{database}\" SET timezone TO 'America/New_York'")
    finally:
        await conn.close()
    now = datetime.now(UTC)
    after = timedelta(days=(now - last_fall_back(zone, now)).days + 1)
    admitted = now - after - timedelta(minutes=30)  # lost half an hour past the age
    storage = await open_storage(DatabaseConfig(url=own_database))
    try:
        await storage.ensure_user("alice", plan="free")
        await _admit_r1(storage, admitted)
        recovery = Recovery(storage, clock=SystemClock(), metrics=Metrics(), after=after)
        assert await recovery.run_once() == 1
    finally:
        await storage.close()


async def test_the_offset_gauge_reads_0_on_sqlite_under_several_workers(
    tmp_path: Path,
) -> None:
    """docs/metrics.md: "0 on SQLite"; docs/deploy.md: "the gauge stays 0". Under
    `gateway serve --workers 2` (the metrics shared through files) a gauge never
    set in `livemostrecent` mode has no sample: /metrics shows its HELP and TYPE
    lines and no value, where gateway_streams_in_flight (`livesum`) shows 0. The
    measure now sets it to 0 where there is nothing to measure (review-skew F7)."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[server]\nreload_interval = 0\n\n[metrics]\npublic = true\n\n"
        f'[database]\nurl = "sqlite:///{tmp_path / "gateway.db"}"\nspool_file = ""\n\n'
        "[plans.free]\n"
    )
    port = free_port()
    proc = await start_gateway(config, port, workers=2)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(f"http://127.0.0.1:{port}/metrics")
    finally:
        kill_tree(proc)
        await proc.wait()
    assert answer.status_code == 200
    assert "\ngateway_streams_in_flight 0.0\n" in answer.text
    assert "\ngateway_clock_offset_seconds 0.0\n" in answer.text


async def _admit_r1(storage: Storage, admitted: datetime) -> None:
    """Alice's request r1, admitted at ``admitted`` and pending since (its
    gateway gone)."""
    admission = await storage.admit(
        "alice",
        day=admitted.date(),
        month_start=admitted.date().replace(day=1),
        now=admitted,
        limits=AdmissionLimits(queries_per_day=10),
        pending=Pending(id="r1", endpoint="chat-messages", total_tokens=25, cost=Decimal(0)),
    )
    assert admission.admitted
