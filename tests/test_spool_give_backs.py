"""A give-back the database missed is spooled, not dropped, and replayed before
a recovery could charge the request it gives back (review-once F2)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.clock import FixedClock
from gateway.errors import StorageError
from gateway.metrics import Metrics
from gateway.recovery import Recovery
from gateway.settle import (
    Refund,
    Settler,
    UploadRelease,
    Write,
    event_to_json,
    give_back_to_json,
    spool_line_from_json,
)
from gateway.storage import AdmissionLimits, Pending, Storage
from gateway.storage.base import stored_id
from tests.harness import USER, running_gateway
from tests.spool import spooled_lines
from tests.test_settle import EVENT

DAY = EVENT.day
MONTH = DAY.replace(day=1)
HOUR = timedelta(hours=1)


class Refusing:
    """A real storage whose give-backs (refunds and upload releases) all fail,
    as a database that stays away for them would."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.refused = 0

    async def refund(self, user_id: str, **kwargs: Any) -> bool:
        self.refused += 1
        raise StorageError("database unreachable")

    async def release_upload(self, user_id: str, *, key: str) -> None:
        self.refused += 1
        raise StorageError("database unreachable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


async def _admit(storage: Storage, pending_id: str, *, user: str = "alice") -> None:
    """An admitted answer with its pending row (a 5-token estimate), as
    admission writes it."""
    admitted = await storage.admit(
        user,
        day=DAY,
        month_start=MONTH,
        limits=AdmissionLimits(),
        now=EVENT.created_at,
        pending=Pending(id=pending_id, endpoint="chat-messages", total_tokens=5),
    )
    assert admitted.admitted


async def _queries(storage: Storage) -> int:
    return sum(row.queries for row in await storage.daily(DAY, DAY))


async def _recover_an_hour_later(storage: Storage) -> int:
    later = EVENT.created_at + HOUR
    recovery = Recovery(storage, clock=FixedClock(later), metrics=Metrics(), after=HOUR / 2)
    return await recovery.run_once()


async def test_a_refund_the_database_refused_is_not_charged_by_a_recovery(
    storage: Storage, tmp_path: Path
) -> None:
    """The attack on the user's wallet: a request the upstream failed is
    refunded, the database refuses the refund, the gateway shuts down while it
    is retried. Before, the refund was dropped and the next start's recovery
    charged the request the estimate of an answer never given."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    assert await _queries(storage) == 1
    spool = tmp_path / "spool.jsonl"
    refusing = Refusing(storage)
    down = Settler(refusing, metrics=Metrics(), spool=spool, retry_delays=(60,))  # type: ignore[arg-type]
    await down.refund("alice", day=DAY, lease_id=None, pending_id="r1")
    assert refusing.refused == 1 and down.pending == 1
    await down.close()  # shut down with the refund still being retried

    # The next start, as the gateway's: the spool's replay, then a recovery.
    replayed = await Settler(storage, metrics=Metrics(), spool=spool).replay()
    recovered = await _recover_an_hour_later(storage)
    assert [e async for e in storage.events(DAY, DAY)] == []  # not charged
    assert await _queries(storage) == 0  # the counters came back
    user = await storage.get_user("alice")
    assert user is not None and (user.lifetime_tokens, user.lifetime_cost) == (0, 0)
    assert (replayed, recovered) == (1, 0)


async def test_a_failed_answer_whose_refund_was_refused_is_not_charged_after_a_restart(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through the gateway: the upstream fails the request, the
    database refuses its refund, the gateway stops; the next start (its
    replay, then its recovery) charges the user nothing for it."""
    spool = tmp_path / "spool.jsonl"
    clock = FixedClock(EVENT.created_at)
    day = clock.now().date()
    settings = {
        "database": {"spool_file": str(spool), "recover_after": 900, "replay_interval": 3600},
        "plans": {"free": {"queries_per_day": 1}},
    }
    chat = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}

    async def refused(*args: Any, **kwargs: Any) -> bool:
        raise StorageError("database unreachable")

    async with running_gateway(database_url, settings=settings, clock=clock) as h:
        monkeypatch.setattr(h.storage, "refund", refused)
        async with httpx.AsyncClient(timeout=20) as client:
            failed = await client.post(
                f"{h.url}/v1/chat-messages", json=chat, headers=h.auth(**{"x-fake-status": "500"})
            )
        assert failed.status_code == 500
        await h.probes.wait_finished(1)
        await h.gateway.idle()
        assert sum(row.queries for row in await h.storage.daily(day, day)) == 1  # still held
    monkeypatch.undo()
    spooled = spooled_lines(spool) if spool.exists() else []  # the refund pending at shutdown

    clock.advance(HOUR)  # the pending row is old enough to recover
    async with running_gateway(database_url, settings=settings, clock=clock) as h:
        assert await h.events() == []  # not charged
        assert sum(row.queries for row in await h.storage.daily(day, day)) == 0
        async with httpx.AsyncClient(timeout=20) as client:
            again = await client.post(f"{h.url}/v1/chat-messages", json=chat, headers=h.auth())
        assert again.status_code == 200  # the day's one query came back
    assert [type(spool_line_from_json(line)) for line in spooled] == [Refund]
    assert not spool.exists()


async def test_a_give_back_retried_until_given_up_is_spooled(
    storage: Storage, tmp_path: Path
) -> None:
    """Retried about 22 s and then only logged before; now it goes to the
    spool, counted with the records spooled."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    assert (
        await storage.reserve_upload("alice", key="up-1", day=DAY, month_start=MONTH, size=300)
    ).admitted
    spool = tmp_path / "spool.jsonl"
    metrics = Metrics()
    down = Settler(Refusing(storage), metrics=metrics, spool=spool, retry_delays=(0, 0))  # type: ignore[arg-type]
    await down.refund("alice", day=DAY, lease_id="l1", pending_id="r1")
    await down.release_upload("alice", key="up-1", size=300)
    await asyncio.wait(list(down._tasks))
    assert [spool_line_from_json(line) for line in spooled_lines(spool)] == [
        Refund("alice", DAY, "l1", "r1"),
        UploadRelease("alice", "up-1", 300),
    ]
    assert metrics.get("gateway_settle_spooled_total") == 2
    assert down.backlog

    assert await Settler(storage, metrics=Metrics(), spool=spool).replay() == 2
    (row,) = await storage.daily(DAY, DAY)
    assert (row.queries, row.uploads, row.upload_bytes) == (0, 0, 0)


async def test_shutdown_with_a_give_back_pending_spools_it(
    storage: Storage, tmp_path: Path
) -> None:
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    down = Settler(Refusing(storage), metrics=Metrics(), spool=spool, retry_delays=(60,))  # type: ignore[arg-type]
    await down.refund("alice", day=DAY, lease_id=None, pending_id="r1")
    await down.release_upload("alice", key="up-1", size=300)
    assert down.pending == 2
    await down.close()
    assert sorted(map(str, map(spool_line_from_json, spooled_lines(spool)))) == [
        "give-back of an upload of 300 bytes of alice (up-1)",
        f"refund of request r1 for alice on {DAY}",
    ]
    # One failing while the process shuts down goes there at once.
    await down.refund("alice", day=DAY, lease_id=None, pending_id="r2")
    assert len(spooled_lines(spool)) == 3 and down.pending == 0


async def test_a_give_back_replayed_twice_gives_back_once(storage: Storage, tmp_path: Path) -> None:
    """Replays repeat lines (a replay that crashed is picked up again): the
    pending row, and the upload's reservation, make each give-back count once."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    await _admit(storage, "r2")
    for key in ("up-1", "up-2"):
        assert (
            await storage.reserve_upload("alice", key=key, day=DAY, month_start=MONTH, size=300)
        ).admitted
    spool = tmp_path / "spool.jsonl"
    lines = [
        give_back_to_json(Refund("alice", DAY, None, "r1")),
        give_back_to_json(UploadRelease("alice", "up-1", 300)),
    ]
    spool.write_bytes(b"\n".join(lines * 2) + b"\n")
    settler = Settler(storage, metrics=Metrics(), spool=spool)
    assert await settler.replay() == 4
    spool.write_bytes(b"\n".join(lines) + b"\n")
    assert await settler.replay() == 2
    (row,) = await storage.daily(DAY, DAY)
    assert (row.queries, row.uploads, row.upload_bytes) == (1, 1, 300)  # r2 and up-2 kept


async def test_a_give_back_whose_pending_row_a_real_record_settled_does_nothing(
    storage: Storage, tmp_path: Path
) -> None:
    """A refund spooled for a request whose answer was recorded after all (its
    real record settled the pending row): the replayed refund gives nothing
    back, and the one of another request still does."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    await _admit(storage, "r2")
    spool = tmp_path / "spool.jsonl"
    down = Settler(Refusing(storage), metrics=Metrics(), spool=spool, retry_delays=(60,))  # type: ignore[arg-type]
    await down.refund("alice", day=DAY, lease_id=None, pending_id="r1")
    await down.refund("alice", day=DAY, lease_id=None, pending_id="r2")
    await down.close()
    assert await storage.settle(EVENT, pending_id="r1")

    assert await Settler(storage, metrics=Metrics(), spool=spool).replay() == 2
    assert await _queries(storage) == 1  # r1's, settled; r2's given back
    (event,) = [e async for e in storage.events(DAY, DAY)]
    assert (event.answer_id, event.total_tokens) == ("m1", 1168)
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 1168


async def test_a_spool_of_records_and_give_backs_replays_both_and_old_lines_still_read(
    storage: Storage, tmp_path: Path
) -> None:
    """A line without ``_give_back`` is a record, as every line of earlier
    versions: a file of records alone, or mixed with give-backs, replays."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    await _admit(storage, "r2")
    spool = tmp_path / "spool.jsonl"
    record = event_to_json(Write(EVENT, None, "r1"))
    assert "_give_back" not in orjson.loads(record)
    refund = give_back_to_json(Refund("alice", DAY, None, "r2"))
    # The record first, then its own pending row's refund (nothing: settled), then r2's.
    again = give_back_to_json(Refund("alice", DAY, None, "r1"))
    spool.write_bytes(b"\n" + record + b"\n\n" + again + b"\n\n" + refund + b"\n")
    assert await Settler(storage, metrics=Metrics(), spool=spool).replay() == 3
    assert await _queries(storage) == 1
    assert [e.answer_id async for e in storage.events(DAY, DAY)] == ["m1"]


async def test_a_give_back_the_replay_cannot_write_holds_the_recovery_back(
    storage: Storage, tmp_path: Path
) -> None:
    """The database fails the replayed refund: it stays in the spool, and the
    recovery pass waits rather than charge the request it gives back."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(give_back_to_json(Refund("alice", DAY, None, "r1")) + b"\n")
    down = Settler(Refusing(storage), metrics=Metrics(), spool=spool)  # type: ignore[arg-type]
    assert not await down.replay_before_recovery()
    assert len(spooled_lines(spool)) == 1
    healthy = Settler(storage, metrics=Metrics(), spool=spool)
    assert await healthy.replay_before_recovery()
    assert not spool.exists() and await _queries(storage) == 0
    # Nothing spooled: nothing to wait for.
    assert await healthy.replay_before_recovery()


async def test_a_refund_still_retried_holds_the_recovery_back(
    storage: Storage, tmp_path: Path
) -> None:
    """A refund this process still retries in memory (the database failed it a
    moment ago) holds the recovery pass back too; an upload's release, which no
    recovery touches, does not."""
    spool = tmp_path / "spool.jsonl"
    down = Settler(Refusing(storage), metrics=Metrics(), spool=spool, retry_delays=(60,))  # type: ignore[arg-type]
    await down.release_upload("alice", key="up-1", size=300)
    assert down.pending == 1 and await down.replay_before_recovery()
    await down.refund("alice", day=DAY, lease_id=None, pending_id="r1")
    assert down.pending == 2 and not await down.replay_before_recovery()
    await down.close()
    assert len(spooled_lines(spool)) == 2


async def test_a_refund_without_its_pending_row_is_not_spooled(
    storage: Storage, tmp_path: Path
) -> None:
    """Without the pending row nothing makes a replayed refund count once; and no
    recovery charges a query that has none: logged, as before."""
    spool = tmp_path / "spool.jsonl"
    down = Settler(Refusing(storage), metrics=Metrics(), spool=spool, retry_delays=(60,))  # type: ignore[arg-type]
    await down.refund("alice", day=DAY, lease_id="l1")
    await down.close()
    assert not spool.exists()


async def test_a_give_back_with_no_spool_is_logged_whole_and_counted_lost(
    storage: Storage, caplog: Any
) -> None:
    metrics = Metrics()
    down = Settler(Refusing(storage), metrics=metrics, spool=None, retry_delays=(60,))  # type: ignore[arg-type]
    await down.refund("alice", day=DAY, lease_id=None, pending_id="r1")
    await down.close()
    assert metrics.get("gateway_settle_lost_total") == 1
    (lost,) = [r.getMessage() for r in caplog.records if "LOST give-back" in r.getMessage()]
    assert spool_line_from_json(lost.split(": ", 1)[1].encode()) == Refund("alice", DAY, None, "r1")


async def test_a_recovery_pass_replays_a_refund_another_worker_spooled(
    database_url: str, tmp_path: Path
) -> None:
    """Another worker sharing the spool refunded a request the database then
    refused: this gateway's recovery pass, with no backlog of its own, replays
    the spool before it recovers, so the request is not charged. Before, a
    pass replayed only what the same process had spooled."""
    spool = tmp_path / "spool.jsonl"
    clock = FixedClock(EVENT.created_at)
    settings = {
        "database": {
            "spool_file": str(spool),
            "recover_after": 900,
            "recover_interval": 0.05,
            "replay_interval": 3600,  # only the recovery pass replays in time
        },
    }
    async with running_gateway(database_url, settings=settings, clock=clock) as h:
        day: date = clock.now().date()
        admitted = await h.storage.admit(
            USER,
            day=day,
            month_start=day.replace(day=1),
            limits=AdmissionLimits(),
            now=clock.now(),
            pending=Pending(id="r1", endpoint="chat-messages", total_tokens=5),
        )
        assert admitted.admitted
        # The other worker's line (appended as the settler appends).
        h.gateway.settler._append(give_back_to_json(Refund(USER, day, None, "r1")))
        assert not h.gateway.settler.backlog
        clock.advance(HOUR)  # the pending row is now old enough to recover
        passes = h.probes.recoveries.value
        await h.probes.recoveries.wait_for(passes + 2)
        assert await h.events() == []
        assert sum(row.queries for row in await h.storage.daily(day, day)) == 0
    assert not spool.exists()


async def test_a_refund_in_a_crashed_replays_file_is_given_before_the_recovery(
    storage: Storage, tmp_path: Path
) -> None:
    """A worker claimed the spool (renamed it ``<spool>.<pid>.<ns>.replaying``)
    and was killed in the middle of its replay (OOM, kill -9, a node lost): the
    refund of r1 is in the file it left, and nothing was spooled since, so
    ``<spool>`` itself is absent. The next pass replays that file before it
    recovers. Before (review-rec REC-5), the failed ``stat`` of the absent spool
    hid the claimed file: no replay, and the recovery charged r1."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    spool = tmp_path / "spool.jsonl"
    left = tmp_path / "spool.jsonl.4242.1765000000000000000.replaying"
    left.write_bytes(b"\n" + give_back_to_json(Refund("alice", DAY, None, "r1")) + b"\n")
    assert not spool.exists()

    settler = Settler(storage, metrics=Metrics(), spool=spool)  # the next start's
    if await settler.replay_before_recovery():
        await _recover_an_hour_later(storage)

    assert [e async for e in storage.events(DAY, DAY)] == []  # never charged
    assert await _queries(storage) == 0
    assert not left.exists()


async def test_the_gateway_started_after_a_replay_crashed_does_not_charge_its_refund(
    storage: Storage, database_url: str, tmp_path: Path
) -> None:
    """The same through a gateway's start-up: the database was back, a worker
    replaying the spool died, the gateway starts an hour later. Its start-up
    recovery does not charge the request whose refund waits in the file left
    behind (review-rec REC-5)."""
    await storage.ensure_user(USER, plan="free")
    await _admit(storage, "r1", user=USER)
    spool = tmp_path / "spool.jsonl"
    left = tmp_path / "spool.jsonl.4242.1765000000000000000.replaying"
    left.write_bytes(b"\n" + give_back_to_json(Refund(USER, DAY, None, "r1")) + b"\n")
    clock = FixedClock(EVENT.created_at + HOUR)
    settings = {"database": {"spool_file": str(spool), "recover_after": 900}}
    async with running_gateway(database_url, settings=settings, clock=clock) as h:
        assert await h.events() == []  # r1 not charged
        assert await _queries(h.storage) == 0


async def test_a_refund_behind_a_record_with_an_over_long_id_does_not_stop_recovery(
    storage: Storage, tmp_path: Path
) -> None:
    """The spool holds, first, a record whose upstream id PostgreSQL cannot index
    (spooled by a release before ids were bounded), then a refund. Before
    (review-rec REC-2), each replay took the refused record for an outage, put
    both back, and `replay_before_recovery` answered False on every pass: no
    recovery pass ran again, in any worker sharing the spool, and the refund
    was never given. Now the replay bounds the id and writes both."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    spool = tmp_path / "spool.jsonl"
    over_long = "".join(f"{i:x}{i * 7919 % 65521:x}" for i in range(1200))  # ~9 KB, unrepeated
    line = event_to_json(Write(replace(EVENT, answer_id=over_long, request_id="rx")))
    refund = give_back_to_json(Refund("alice", DAY, None, "r1"))
    spool.write_bytes(b"\n" + line + b"\n\n" + refund + b"\n")
    ready = [await Settler(storage, metrics=Metrics(), spool=spool).replay_before_recovery()]
    ready.append(await Settler(storage, metrics=Metrics(), spool=spool).replay_before_recovery())
    assert ready == [True, True]  # the recovery passes run
    assert await _queries(storage) == 0  # r1's query came back
    assert not spool.exists()
    (recorded,) = [e async for e in storage.events(DAY, DAY)]
    assert (recorded.answer_id, recorded.total_tokens) == (stored_id(over_long), 1168)


class HeldRefunds:
    """A real storage whose refunds wait at the door until let in: a worker in
    the middle of replaying the spool (a long one, after an outage), holding
    the claimed file's lock."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.arrived = asyncio.Event()
        self.go = asyncio.Event()

    async def refund(self, user_id: str, **kwargs: Any) -> bool:
        self.arrived.set()
        await self.go.wait()
        return bool(await self.storage.refund(user_id, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


async def test_a_refund_another_worker_is_replaying_holds_this_ones_recovery_back(
    storage: Storage, tmp_path: Path
) -> None:
    """Two workers share the spool. Worker B claimed it (renamed and locked it)
    and is replaying; the refund of r1 is in it, not given back yet. Worker A's
    recovery pass asks `replay_before_recovery`, which finds the claimed file
    locked, skips it - and said "ready": the recovery charged r1 the estimate of
    an answer never produced, and B's refund then found the pending row gone
    and gave nothing back (review-rec REC-1). A file another worker replays now
    holds the pass back, as a refund still waiting does."""
    await storage.ensure_user("alice", plan="free")
    await _admit(storage, "r1")
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(give_back_to_json(Refund("alice", DAY, None, "r1")) + b"\n")
    held = HeldRefunds(storage)
    worker_b = Settler(held, metrics=Metrics(), spool=spool)  # type: ignore[arg-type]
    replaying = asyncio.create_task(worker_b.replay())
    await held.arrived.wait()

    # Worker A's pass, as gateway/runtime.py runs it.
    worker_a = Settler(storage, metrics=Metrics(), spool=spool)
    if await worker_a.replay_before_recovery():
        await _recover_an_hour_later(storage)
    held.go.set()
    await replaying

    assert [e async for e in storage.events(DAY, DAY)] == []  # never charged
    assert await _queries(storage) == 0  # the query came back
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 0
