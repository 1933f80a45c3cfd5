"""The spool is replayed as soon as the database answers again, by exactly one
process per file, and a file error during a replay never stops the gateway."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.clock import FixedClock
from gateway.config import DatabaseConfig
from gateway.errors import StorageError
from gateway.metrics import Metrics
from gateway.settle import Settler, Write, event_to_json
from gateway.storage import Storage, UsageEvent, open_storage
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, running_gateway, until
from tests.servers import free_port, start_gateway
from tests.spool import spooled_lines
from tests.tcpproxy import TCPProxy
from tests.test_settle import EVENT

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "blocking", "user": "x"}


def _spool_dir(tmp_path: Path) -> Path:
    """A directory of the spool's own (the SQLite database lives in tmp_path)."""
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


def _spool_records(spool: Path, count: int) -> list[UsageEvent]:
    events = [replace(EVENT, answer_id=f"m{i}") for i in range(count)]
    spool.write_bytes(b"".join(event_to_json(Write(e)) + b"\n" for e in events))
    return events


class SlowSettle:
    """A real storage whose settles yield to the event loop first, so two replays
    interleave as two worker processes would."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def settle(self, event: UsageEvent, **kwargs: Any) -> bool:
        await asyncio.sleep(0)
        return await self.storage.settle(event, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


async def test_two_workers_replaying_one_spool_settle_each_record_once(
    storage: Storage, tmp_path: Path
) -> None:
    await storage.ensure_user("alice", plan="free")
    folder = _spool_dir(tmp_path)
    spool = folder / "spool.jsonl"
    _spool_records(spool, 20)
    # A replay a crashed worker left behind is there too.
    orphan = folder / "spool.jsonl.999999.1.replaying"
    orphan.write_bytes(event_to_json(Write(replace(EVENT, answer_id="orphan"))) + b"\n")
    metrics = [Metrics(), Metrics()]
    settlers = [Settler(SlowSettle(storage), metrics=m, spool=spool) for m in metrics]  # type: ignore[arg-type]
    counts = await asyncio.gather(*(s.replay() for s in settlers))
    assert sum(counts) == 21
    settled = sum(m.get("gateway_answers_settled_total", outcome="cut") for m in metrics)
    duplicates = sum(m.get("gateway_answers_duplicate_total") for m in metrics)
    assert (settled, duplicates) == (21, 0)  # each record written by one worker only
    assert list(folder.iterdir()) == []
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 21 * 1168


async def test_a_file_error_during_replay_is_logged_not_raised(
    storage: Storage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await storage.ensure_user("alice", plan="free")
    folder = _spool_dir(tmp_path)
    spool = folder / "spool.jsonl"
    _spool_records(spool, 2)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "unlink", unlink)
    settler = Settler(storage, metrics=Metrics(), spool=spool)
    assert await settler.replay() == 2  # written; the file is kept for the next replay
    assert any("could not be removed" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert await settler.replay() == 2  # replayed again: changes nothing
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 2 * 1168
    assert list(folder.iterdir()) == []


class Down:
    """A real storage whose settles and pings fail while ``down``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.down = True

    async def settle(self, event: UsageEvent, **kwargs: Any) -> bool:
        if self.down:
            raise StorageError("database unreachable")
        return await self.storage.settle(event, **kwargs)

    async def ping(self) -> None:
        if self.down:
            raise StorageError("database unreachable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


async def test_the_spool_is_replayed_when_a_ping_answers(storage: Storage, tmp_path: Path) -> None:
    await storage.ensure_user("alice", plan="free")
    down = Down(storage)
    settler = Settler(down, metrics=Metrics(), spool=tmp_path / "spool", retry_delays=(0,))  # type: ignore[arg-type]
    replays = asyncio.create_task(settler.run_replays(interval=0.01))
    try:
        await settler.record(EVENT)
        await asyncio.wait(list(settler._tasks))
        assert (tmp_path / "spool").exists() and settler.backlog
        down.down = False
        await settler.wait_replayed(1)
    finally:
        replays.cancel()
    assert not (tmp_path / "spool").exists()
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 1168


@pytest.mark.postgres
@pytest.mark.parametrize("trigger", ["ping", "write"])
async def test_a_spooled_answer_lands_when_the_database_returns_without_a_restart(
    pg_behind_proxy: tuple[str, TCPProxy], tmp_path: Path, trigger: str
) -> None:
    url, proxy = pg_behind_proxy
    spool = tmp_path / "spool.jsonl"
    settings = {
        "admission": {"on_storage_error": {"queries": "open", "tokens": "open"}},
        "database": {
            "connect_timeout": 1.0,
            "command_timeout": 2.0,
            "spool_file": str(spool),
            # "write": only the next successful ledger write can start the replay.
            "replay_interval": 0.05 if trigger == "ping" else 3600,
        },
    }
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with (
        running_gateway(url, fake=fake, settings=settings) as h,
        httpx.AsyncClient(timeout=20) as client,
    ):
        warm = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth())
        assert warm.status_code == 200
        await h.probes.wait_finished(1)
        settler = h.gateway.settler
        settler._delays = (0,)  # spool at the first retry: the test stays fast
        await proxy.cut()
        lost = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(2)
        await h.gateway.idle()
        await asyncio.wait(list(settler._tasks))
        assert lost.status_code == 200
        assert len(spooled_lines(spool)) == 1
        await proxy.restore()
        if trigger == "write":
            after = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth())
            assert after.status_code == 200
        await settler.wait_replayed(1)
        events = await h.events()
    assert not spool.exists()
    assert len(events) == 3 if trigger == "write" else 2
    assert {e.user_id for e in events} == {USER}
    assert all(e.total_tokens == 1168 and not e.estimated for e in events)


async def test_two_gateway_serve_workers_replay_one_spool_once(tmp_path: Path) -> None:
    """The reported failure: `gateway serve --workers 2` with a spool to replay;
    both workers start, and each record lands once."""
    folder = _spool_dir(tmp_path)
    spool = folder / "spool.jsonl"
    database = tmp_path / "gateway.db"
    setup = await open_storage(DatabaseConfig(url=f"sqlite:///{database}"))
    try:
        await setup.migrate()
        await setup.ensure_user("alice", plan="free")
    finally:
        await setup.close()
    _spool_records(spool, 2000)
    orphan = folder / "spool.jsonl.999999.1.replaying"  # a crashed replay's leftovers
    orphan.write_bytes(event_to_json(Write(replace(EVENT, answer_id="orphan"))) + b"\n")
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[server]\nreload_interval = 0\n\n"
        f'[database]\nurl = "sqlite:///{database}"\nspool_file = "{spool}"\n\n[plans.free]\n'
    )
    port = free_port()
    proc = await start_gateway(config, port, workers=2)  # both workers' startups complete
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            health = await client.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        proc.terminate()
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode(errors="replace")
        await proc.wait()
    assert health.status_code == 200
    assert "Traceback" not in log and "startup failed" not in log
    storage = await open_storage(DatabaseConfig(url=f"sqlite:///{database}"))
    try:
        user = await storage.get_user("alice")
        events = [e async for e in storage.events(EVENT.day, EVENT.day)]
    finally:
        await storage.close()
    assert len(events) == 2001
    assert user is not None and user.lifetime_tokens == 2001 * 1168
    assert list(folder.iterdir()) == []


@pytest.mark.postgres
async def test_a_recovery_pass_replays_the_spool_before_it_estimates(
    pg_behind_proxy: tuple[str, TCPProxy], tmp_path: Path
) -> None:
    """An answer admitted, then recorded while the database was away (spooled): when
    the database returns after the answer's pending row is old enough to recover,
    the real record still lands, not the recovery's prompt-only estimate."""
    url, proxy = pg_behind_proxy
    spool = tmp_path / "spool.jsonl"
    clock = FixedClock(datetime(2026, 12, 6, 9, 0, tzinfo=UTC))
    settings = {
        "upstream": {"total_timeout": 2.0, "disconnect_grace": 0.5},
        "database": {
            "connect_timeout": 1.0,
            "command_timeout": 2.0,
            "spool_file": str(spool),
            "recover_after": 2.5,
            "recover_interval": 0.05,
            "replay_interval": 3600,  # only the recovery pass can replay in time
        },
    }
    body = {**CHAT, "response_mode": "streaming"}
    async with (
        running_gateway(url, settings=settings, clock=clock) as h,
        httpx.AsyncClient(timeout=20) as client,
    ):
        settler = h.gateway.settler
        settler._delays = (0,)  # spool at the first retry: the test stays fast
        request = client.build_request(
            "POST",
            f"{h.url}/v1/chat-messages",
            json=body,
            headers=h.auth(**{"x-fake-delay-ms": "20"}),
        )
        response = await client.send(request, stream=True)
        chunks = response.aiter_raw()
        await anext(chunks)  # admitted: its pending row is written
        await proxy.cut()
        async for _ in chunks:
            pass
        await h.probes.wait_finished(1)
        await h.gateway.idle()
        if settler._tasks:  # (the retry may have spooled it already)
            await asyncio.wait(list(settler._tasks))
        # Each recovery pass (every 50 ms) claims the spool to replay it, and
        # spools the record again while the database is away: read it between two.

        def spooled() -> int:
            try:
                return len(spooled_lines(spool))
            except FileNotFoundError:  # claimed by a pass's replay just now
                return 0

        await until(lambda: spooled() == 1)
        clock.advance(timedelta(minutes=5))  # the pending row is now old enough
        passes = h.probes.recoveries.value
        await proxy.restore()
        await h.probes.recoveries.wait_for(passes + 3)  # recovery passes with it back
        (event,) = await h.events()
    assert (event.total_tokens, event.estimated, event.outcome) == (1168, False, "complete")
