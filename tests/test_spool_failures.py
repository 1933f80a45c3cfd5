"""The spool under what a failing disk or database does to it (review-once F4,
F5, F6): a line the disk cut short takes no other record with it, a record the
database refuses for good holds back none after it, and a replayed record
keeps the token bound it was settled under."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import signal
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from gateway.metrics import Metrics
from gateway.settle import Settler, Write, event_to_json
from gateway.storage import Storage, UsageEvent
from tests.harness import until
from tests.spool import spooled_lines
from tests.test_spool_replay import Down


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """A full disk, for this process, from ``limit`` bytes of any file on: the
    kernel writes what fits and returns the shorter count (RLIMIT_FSIZE, with
    SIGXFSZ ignored, as a full filesystem does with ENOSPC after a partial write)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _event(answer_id: str) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id="alice",
        day=date(2026, 12, 7),
        created_at=datetime(2026, 12, 7, 23, 0, tzinfo=UTC),
        endpoint="chat-messages",
        prompt_tokens=1000,
        completion_tokens=100,
        total_tokens=1100,
        cost=Decimal("0.01"),
    )


async def test_a_spool_line_cut_short_by_a_full_disk_does_not_take_the_next_record(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review-once F4: `Settler._append` ignored os.write's count. On a full disk
    the kernel writes part of the line and returns a short count: the record is
    reported spooled (no "LOST usage record" line with its JSON, the documented
    last resort), and the next record, spooled once space is back, is appended
    to the torn line. The replay finds one unreadable line and keeps it forever:
    both answers are lost, the second although its whole line was written."""
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(b"")
    db = Down(storage)
    settler = Settler(db, metrics=Metrics(), spool=spool, retry_delays=())  # type: ignore[arg-type]
    with _file_size_limit(40):  # the disk fills 40 bytes into the first line
        await settler.record(_event("m-first"))
        await until(lambda: settler.pending == 0)
    await settler.record(_event("m-second"))  # space is back
    await until(lambda: settler.pending == 0)
    db.down = False
    await settler.replay()
    events = [e async for e in storage.events(date(2000, 1, 1), date(2100, 1, 1))]
    # The second record was spooled whole: it must be replayed.
    assert "m-second" in [e.answer_id for e in events], spool.read_bytes()
    # The torn one is the log's, whole, where it can be replayed from.
    lost = [r.getMessage() for r in caplog.records if "LOST usage record" in r.getMessage()]
    assert len(lost) == 1 and '"answer_id":"m-first"' in lost[0], lost


async def test_one_record_the_database_refuses_does_not_hold_back_the_spool(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review-once F5: a replay stopped at the first record that fails (settle.py
    `_replay_lines`: ``down = True``) and appends it, then every record after
    it, to the spool again, in the same order. A record the database refuses
    for good - its user deleted while the record waited in the spool - is
    therefore first in every later replay: no record spooled after it is ever
    written again. Their pending rows are
    recovered as prompt-only estimates instead of the answers' real cost."""
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    ghost = dataclasses.replace(_event("m-ghost"), user_id="deleted-meanwhile")
    spool.write_bytes(
        event_to_json(Write(ghost)) + b"\n" + event_to_json(Write(_event("m-alice"))) + b"\n"
    )
    settler = Settler(storage, metrics=Metrics(), spool=spool)  # type: ignore[arg-type]
    for _ in range(3):  # the replays at start-up and as the database answers
        await settler.replay()
    events = [e async for e in storage.events(date(2000, 1, 1), date(2100, 1, 1))]
    assert [e.answer_id for e in events] == ["m-alice"], spool.read_bytes()
    # The refused one is kept whole beside the spool and in the log, once.
    rejected = spooled_lines(tmp_path / "spool.jsonl.rejected")
    assert [orjson.loads(line)["answer_id"] for line in rejected] == ["m-ghost"]
    assert not spool.exists() or spool.read_bytes() == b""
    logged = [r.getMessage() for r in caplog.records if "REJECTED" in r.getMessage()]
    assert len(logged) == 1 and "m-ghost" in logged[0]


async def test_a_spooled_record_keeps_the_bound_it_was_settled_under(
    storage: Storage, tmp_path: Path
) -> None:
    """Review-once F6: `record` bounds an answer under the terms it began under (here the
    default 10 000 000 tokens), but those terms are not spooled (settle.py
    `Write.terms`): the replay, after a restart with a lower
    `accounting.max_tokens_per_answer`, bounds the record again under the new
    terms and writes fewer tokens than the answer used, and than `record`
    logged (`gateway.answers`) as settled."""
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    db = Down(storage)
    before = Settler(db, metrics=Metrics(), spool=spool, retry_delays=())  # type: ignore[arg-type]
    big = dataclasses.replace(
        _event("m-big"), prompt_tokens=40_000, completion_tokens=10_000, total_tokens=50_000
    )
    await before.record(big)
    await until(lambda: before.pending == 0)
    # Restarted with a lower bound (a reload would do the same).
    after = Settler(storage, metrics=Metrics(), spool=spool, max_tokens_per_answer=20_000)  # type: ignore[arg-type]
    assert await after.replay() == 1
    (event,) = [e async for e in storage.events(date(2000, 1, 1), date(2100, 1, 1))]
    assert (event.total_tokens, event.outcome) == (50_000, "complete")
