"""The spool and the MCP refusal under the review of their fixes (review-last):
a record appended while another worker tears a line, a forged token bound in a
hand-edited line, a record lost to a full disk counted as spooled, and
Anthropic's `mcp_servers` through a router's OpenAI-compatible routes. Each
test is the scenario that got past a fix, and the proof it no longer does."""

from __future__ import annotations

import contextlib
import os
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.clock import FixedClock
from gateway.config import MAX_TOKENS_PER_ANSWER_LIMIT
from gateway.metrics import Metrics
from gateway.settle import Settler, Write, event_to_json
from gateway.storage import Storage
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, running_gateway, until
from tests.quota.test_budget import T0, settings
from tests.test_spool_failures import _event, _file_size_limit
from tests.test_spool_replay import Down

pytestmark = pytest.mark.warm_connections


async def _events(storage: Storage) -> list[Any]:
    return [e async for e in storage.events(date(2000, 1, 1), date(2100, 1, 1))]


async def test_a_record_appended_while_another_worker_tears_a_line_is_not_lost(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review-last L1. `Settler._append` read the spool's last byte, then wrote: two steps
    under a *shared* lock, which every other appender holds at once. Worker B
    reads "\\n" (the file ends well), worker A's short write (full disk) then
    leaves a torn line, and B's line, written without the newline it now
    needs, is glued to the torn one: the replay keeps the pair as one
    unreadable line, and B's record - spooled whole, reported spooled, not
    logged as LOST - is never written."""
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(event_to_json(Write(_event("m-zero"))) + b"\n")
    worker_a = Settler(Down(storage), metrics=Metrics(), spool=spool, retry_delays=())
    worker_b = Settler(Down(storage), metrics=Metrics(), spool=spool, retry_delays=())
    real_write = os.write
    torn = False

    def write(fd: int, data: Any) -> int:
        nonlocal torn
        if not torn:
            torn = True
            # Just before B's write lands (whatever B looked at before it):
            # A's append, which the disk cuts 40 bytes in (logged LOST).
            size = spool.stat().st_size
            with _file_size_limit(size + 40), contextlib.suppress(OSError):
                worker_a._append(event_to_json(Write(_event("m-torn-a"))))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    await worker_b.record(_event("m-b"))
    await until(lambda: worker_b.pending == 0)
    monkeypatch.setattr(os, "write", real_write)
    assert torn
    replayer = Settler(storage, metrics=Metrics(), spool=spool)
    await replayer.replay()
    ids = {e.answer_id for e in await _events(storage)}
    assert "m-b" in ids, (ids, spool.read_bytes())


async def test_a_forged_max_tokens_in_the_spool_is_held_by_the_configured_limit(
    storage: Storage, tmp_path: Path
) -> None:
    """Review-last L2. `event_from_json` took any positive int for ``_max_tokens``: spool
    lines (hand-edited - the log's LOST records are replayed by pasting them
    back - or corrupted) that say 2**62 are replayed under that bound, past
    config's `MAX_TOKENS_PER_ANSWER_LIMIT`, which exists so that no sum
    overflows. The first is written as it is (4.6e18 tokens, "complete", not
    clamped); on PostgreSQL the second overflows the user's bigint lifetime
    sums, the replay takes that for the database being down, and every replay
    stops there, holding back the records after it (F5's blocking again)."""
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    huge = 2**62
    lines = []
    for n in range(2):  # two: their sum overflows PostgreSQL's bigint lifetime totals
        forged = orjson.loads(event_to_json(Write(_event(f"m-forged-{n}"))))
        forged.update(prompt_tokens=huge, completion_tokens=0, total_tokens=huge, _max_tokens=huge)
        lines.append(orjson.dumps(forged))
    lines.append(event_to_json(Write(_event("m-after"))))
    spool.write_bytes(b"\n".join(lines) + b"\n")
    settler = Settler(storage, metrics=Metrics(), spool=spool)
    for _ in range(3):
        await settler.replay()
    events = {e.answer_id: e for e in await _events(storage)}
    assert "m-after" in events, spool.read_bytes()
    for name in ("m-forged-0", "m-forged-1"):
        if name in events:
            assert events[name].total_tokens <= MAX_TOKENS_PER_ANSWER_LIMIT, events[name]


async def test_an_anthropic_mcp_server_through_a_router_is_refused_where_money_counts(
    database_url: str,
) -> None:
    """Review-last L3. `OpenAIUpstream.cost_unbounded` read only ``tools``. A router in front
    of Claude (LiteLLM, Portkey, OpenRouter) passes Anthropic's own fields on -
    the gateway refuses its ``context_management`` compaction and its
    ``cache_control`` ttl for that reason (openai.py `_check_priced`) - and
    Anthropic's MCP connector is a top-level ``mcp_servers``: forwarded under
    a money budget of 1.00, the server's tool list and results billed as input
    the body does not hold (review-limits F1's attack, one field over)."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    body = {
        "model": "budget-model",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "use the tools"}],
        "mcp_servers": [{"type": "url", "url": "https://attacker.example/mcp", "name": "big"}],
    }
    async with running_gateway(
        database_url,
        upstream=fake,
        settings={**settings(cost_per_day="1.00"), "upstream": {"kind": "openai"}},
        clock=FixedClock(T0),
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as http:
            response = await http.post("/v1/chat/completions", json=body, headers=h.auth())
        if response.status_code == 200:
            await h.probes.wait_finished(1)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "cost_unbounded"
    assert fake.requests == []


async def test_a_record_lost_to_a_full_disk_is_not_counted_spooled(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review-last L4. F4 made a short write a `LOST usage record`, but `_to_spool` counted
    `gateway_settle_spooled_total` before it appends: the record the disk cut
    short is counted spooled (the GatewayUsageSpooled alert tells the operator
    a restart replays it), and no metric counts it lost - only the log has it,
    and the log is where it must be replayed from."""
    await storage.ensure_user("alice", plan="free")
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(b"")
    metrics = Metrics()
    settler = Settler(Down(storage), metrics=metrics, spool=spool, retry_delays=())
    with _file_size_limit(40):
        await settler.record(_event("m-lost"))
        await until(lambda: settler.pending == 0)
    assert any("LOST usage record" in r.getMessage() for r in caplog.records)
    assert metrics.get("gateway_settle_spooled_total") == 0
