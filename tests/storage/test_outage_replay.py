"""A long database outage, end to end through the settler and the recovery
(issue 20): an answer's record waits in the spool while a recovery charges its
pending row the prompt-only estimate; the replayed record then supersedes the
estimate - once, however often it is replayed. On both backends."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from gateway.clock import FixedClock
from gateway.errors import StorageError
from gateway.metrics import Metrics
from gateway.recovery import Recovery
from gateway.settle import Settler
from gateway.storage import AdmissionLimits, Pending, Storage, UsageEvent, WebSearch
from tests.spool import spooled_lines

NOW = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
DAY = date(2026, 11, 21)
MONTH = date(2026, 11, 1)


class Unreachable:
    """The storage while the database is away: settles fail, the rest is the real one's."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    async def settle(self, *args: object, **kwargs: object) -> bool:
        raise StorageError("connection refused")


async def test_a_replayed_record_supersedes_the_estimate_recovered_meanwhile(
    storage: Storage, tmp_path: Path
) -> None:
    await storage.ensure_user("alice", plan="free")
    admission = await storage.admit(
        "alice",
        day=DAY,
        month_start=MONTH,
        now=NOW,
        limits=AdmissionLimits(queries_per_day=10),
        lease=None,
        pending=Pending(id="req-1", endpoint="chat-messages", prompt_tokens=2, total_tokens=2),
        web_search=WebSearch(5),
    )
    assert admission.admitted and admission.web_search_reserved
    spool = tmp_path / "spool.jsonl"

    # The answer ends while the database is away: retried, then spooled.
    away = Settler(Unreachable(storage), metrics=Metrics(), spool=spool, retry_delays=())  # type: ignore[arg-type]
    real = UsageEvent(
        answer_id="dify-message-1",
        user_id="alice",
        day=DAY,
        created_at=NOW + timedelta(seconds=30),
        endpoint="chat-messages",
        prompt_tokens=2000,
        completion_tokens=336,
        total_tokens=2336,
        cost=Decimal("0.0046720"),
        web_searches=1,
        request_id="req-1",
    )
    await away.record(real, pending_id="req-1")
    await away.close()
    assert len(spooled_lines(spool)) == 1

    # Meanwhile a replica takes the answer for lost and charges its estimate.
    later = NOW + timedelta(hours=1)
    recovery = Recovery(
        storage, clock=FixedClock(later), metrics=Metrics(), after=timedelta(minutes=10)
    )
    assert await recovery.run_once() == 1
    (estimate,) = [e async for e in storage.events(DAY, DAY)]
    assert (estimate.total_tokens, estimate.outcome) == (2, "recovered")

    # The database is back: the replay records the real usage over the estimate.
    line = spool.read_bytes()
    back = Settler(storage, metrics=Metrics(), spool=spool)
    assert await back.replay() == 1
    # Replayed again (a crashed replay picked up twice): nothing changes.
    spool.write_bytes(line)
    assert await back.replay() == 1
    (row,) = [e async for e in storage.events(DAY, DAY)]
    assert (row.answer_id, row.total_tokens, row.cost, row.outcome, row.estimated) == (
        "dify-message-1",
        2336,
        Decimal("0.0046720"),
        "complete",
        False,
    )
    assert (row.request_id, row.web_searches) == ("req-1", 1)
    (daily,) = await storage.daily(DAY, DAY)
    assert (daily.queries, daily.total_tokens, daily.web_searches, daily.cost) == (
        1,
        2336,
        1,
        Decimal("0.0046720"),
    )
    user = await storage.get_user("alice")
    assert user is not None
    assert (user.lifetime_tokens, user.lifetime_cost) == (2336, Decimal("0.0046720"))
    assert await recovery.run_once() == 0
