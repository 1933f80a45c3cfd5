"""Absurd numbers from a misbehaving upstream are recorded clamped and marked, never
lost, and the spool line for any event can always be written and replayed."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway import usage_bounds
from gateway.config import DatabaseConfig, parse_config
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.settle import Settler, Write, event_from_json, event_to_json
from gateway.storage import Storage, UsageEvent, open_storage
from gateway.storage.base import MAX_ID_CHARS, stored_id
from gateway.usage_bounds import CLAMPED, MAX_COST, MAX_MODEL_CHARS, bound_event
from tests.fakes.dify import FakeDify
from tests.fakes.openai import ANSWER_PIECES, FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, running_gateway
from tests.spool import spooled_lines
from tests.tcpproxy import TCPProxy
from tests.test_settle import EVENT
from tests.upstreams.test_openai_sdk import PRICES

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
BLOCKING = {**CHAT, "response_mode": "blocking"}
CAP = 50_000
SETTINGS: dict[str, Any] = {
    "plans": {"free": {"max_concurrent_streams": 1, "queries_per_day": 10}},
    "accounting": {"max_tokens_per_answer": CAP},
}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as c:
        yield c


@pytest.mark.parametrize(
    ("raw", "tokens", "cost"),
    [
        ({"total_tokens": 1e20}, CAP, Decimal("0.0013030")),
        ({"total_tokens": 1e300}, CAP, Decimal("0.0013030")),
        ({"total_tokens": 18446744073709551615}, CAP, Decimal("0.0013030")),
        ({"total_price": "1e400"}, 1168, MAX_COST),
        ({"total_price": "-5"}, 1168, Decimal(0)),
        ({"prompt_tokens": 1e300, "total_tokens": None}, CAP, Decimal("0.0013030")),
    ],
    ids=["1e20", "1e300", "u64-max", "price-1e400", "negative-price", "prompt-1e300"],
)
@pytest.mark.parametrize("body", [CHAT, BLOCKING], ids=["streaming", "blocking"])
async def test_absurd_usage_is_recorded_clamped_and_marked(
    database_url: str,
    client: httpx.AsyncClient,
    raw: dict[str, Any],
    tokens: int,
    cost: Decimal,
    body: dict[str, Any],
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, fake=fake, settings=SETTINGS) as h:
        headers = h.auth(**{"x-fake-usage-json": orjson.dumps(raw).decode()})
        first = await client.post(f"{h.url}/v1/chat-messages", json=body, headers=headers)
        await first.aread()
        await h.probes.wait_finished(1)
        # The answer's stream slot was given back: the next query is admitted.
        second = await client.post(f"{h.url}/v1/chat-messages", json=body, headers=h.auth())
        await h.probes.wait_finished(2)
        events = await h.events()
        clamped_total = h.gateway.metrics.get("gateway_usage_clamped_total")
    assert first.status_code == 200
    assert second.status_code == 200
    assert len(events) == 2
    marked = events[0]
    assert marked.outcome == CLAMPED
    assert marked.total_tokens == tokens
    assert marked.cost == cost
    assert marked.user_id == USER
    assert events[1].outcome == "complete"
    assert clamped_total == 1


async def test_the_per_answer_cap_is_configurable(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    settings = {"accounting": {"max_tokens_per_answer": 1000}}
    async with running_gateway(sqlite_url, settings=settings) as h:
        await client.post(f"{h.url}/v1/chat-messages", json=BLOCKING, headers=h.auth())
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    # The fake's default answer reports 1168 tokens: above this cap.
    assert (event.outcome, event.total_tokens) == (CLAMPED, 1000)


def test_a_cap_that_could_overflow_the_sums_is_refused() -> None:
    data = {"plans": {"free": {}}, "accounting": {"max_tokens_per_answer": 10**10}}
    with pytest.raises(ConfigError, match=r"accounting\.max_tokens_per_answer: must be at most"):
        parse_config(data, env={})


# --- bounds, pure -----------------------------------------------------------------


def test_a_sane_event_passes_unchanged() -> None:
    assert bound_event(EVENT, max_tokens=CAP) == (EVENT, [])


_EDGES: dict[str, list[object]] = {
    "prompt_tokens": [0, 1, CAP, CAP + 1, -1, True, 1.0, None],
    "completion_tokens": [0, CAP, CAP + 1, -1, False],
    "total_tokens": [0, CAP, CAP + 1, -1, 2**70],
    "cached_tokens": [0, EVENT.prompt_tokens, EVENT.prompt_tokens + 1, -1, True],
    "cache_write_tokens": [0, EVENT.prompt_tokens, EVENT.prompt_tokens + 1, -1],
    "reasoning_tokens": [0, EVENT.completion_tokens, EVENT.completion_tokens + 1, -1],
    "cost": [
        *(Decimal(v) for v in ("0", "-0", "1e-12", "1e-13", "-1e-30", "NaN", "Infinity")),
        MAX_COST, MAX_COST + Decimal("1e-12"), Decimal("1.000000000000"), 0.5, 1, None,
    ],
    "upstream_latency_ms": [None, 0.0, -0.0, 3, 1e299, 1e300, -1.0, float("nan"), True, "1"],
    "overhead_ms": [None, 0.5, float("inf"), 10**400],
    "model": [None, "m" * MAX_MODEL_CHARS, "m" * (MAX_MODEL_CHARS + 1), "gpt\x00", "\ud800", "é"],
    "answer_id": ["m1", "m\x00", "\udcff"],
    "currency": ["USD", "U\x00SD"],
    "request_id": [None, "r" * 1000, "r\ud800"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, values in _EDGES.items() for value in values]
)
def test_the_quick_check_for_an_event_in_range_agrees_with_the_bounds(
    name: str, value: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bound_event first asks whether any bound would change the event (the usual
    # answer's case); at each edge of each bound it gives what the bounds give.
    event = UsageEvent(**{**_fields(EVENT), name: value})
    quick = bound_event(event, max_tokens=CAP)
    monkeypatch.setattr(usage_bounds, "_in_range", lambda event, max_tokens: False)
    full = bound_event(event, max_tokens=CAP)
    assert (quick[0] is event) == (full[0] is event)
    assert repr(quick) == repr(full)  # repr: NaN is not equal to itself


def test_excess_price_digits_are_rounded_not_marked() -> None:
    event = UsageEvent(**{**_fields(EVENT), "cost": Decimal("1e-99999")})
    bounded, changed = bound_event(event, max_tokens=CAP)
    assert (bounded.cost, bounded.outcome, changed) == (Decimal(0), EVENT.outcome, [])


@pytest.mark.parametrize("part", ["cached_tokens", "cache_write_tokens"])
def test_a_prompt_part_past_the_prompt_is_bounded_by_it(part: str) -> None:
    event = UsageEvent(**{**_fields(EVENT), part: EVENT.prompt_tokens + 5})
    bounded, changed = bound_event(event, max_tokens=CAP)
    assert getattr(bounded, part) == EVENT.prompt_tokens
    assert changed == [part] and bounded.outcome == CLAMPED


def test_cache_writes_survive_the_spool() -> None:
    event = UsageEvent(**{**_fields(EVENT), "cache_write_tokens": 42})
    assert event_from_json(event_to_json(Write(event, None, None))).event == event


def _fields(event: UsageEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in event.__slots__}


# --- the spool, whatever the event holds -------------------------------------------

ABSURD = UsageEvent(
    **{
        **_fields(EVENT),
        "answer_id": "absurd-\ud800",  # a lone surrogate: orjson refuses it
        "prompt_tokens": 10**5000,  # past the int-to-decimal-string digit limit
        "completion_tokens": -(2**70),
        "total_tokens": 10**30,
        "cost": Decimal("NaN"),
        "upstream_latency_ms": float("inf"),
        "overhead_ms": float("nan"),
    }
)


def test_any_event_serialises_and_reads_back_exactly() -> None:
    write = event_from_json(event_to_json(Write(ABSURD, "lease-1", "req-1")))
    event = write.event
    assert (write.lease_id, write.pending_id) == ("lease-1", "req-1")
    assert event.answer_id == ABSURD.answer_id
    assert event.prompt_tokens == 10**5000
    assert event.completion_tokens == -(2**70)
    assert event.total_tokens == 10**30
    assert event.cost.is_nan()
    assert event.upstream_latency_ms == float("inf")
    assert event.overhead_ms is not None and event.overhead_ms != event.overhead_ms


def test_an_unwritable_spool_logs_the_whole_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool-is-a-directory"
    spool.mkdir()
    settler = Settler(None, metrics=Metrics(), spool=spool)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="gateway.settle"):
        settler._to_spool(Write(ABSURD, "lease-1"))
    (line,) = [r.getMessage() for r in caplog.records if "LOST usage record" in r.getMessage()]
    written = line[line.index("{") :].encode()
    assert event_from_json(written).event.total_tokens == 10**30


@pytest.mark.postgres
async def test_absurd_event_with_the_database_down_is_spooled_and_replayed_clamped(
    pg_behind_proxy: tuple[str, TCPProxy], tmp_path: Path
) -> None:
    url, proxy = pg_behind_proxy
    spool = tmp_path / "spool.jsonl"
    storage = await open_storage(DatabaseConfig(url=url, connect_timeout=1.0, command_timeout=2.0))
    try:
        await storage.ensure_user("alice", plan="free")
        await proxy.cut()
        settler = Settler(
            storage, metrics=Metrics(), spool=spool, retry_delays=(0,), max_tokens_per_answer=CAP
        )
        await settler.record(ABSURD)
        await settler.close()  # the pending retry fails too: the record goes to the spool
        assert len(spooled_lines(spool)) == 1
        await proxy.restore()
        # Replayed under the bound it was settled under, whatever the replaying
        # process's (review-once F6: the default's 10,000,000 here).
        replaying = Settler(storage, metrics=Metrics(), spool=spool)
        assert await replaying.replay() == 1
        events = [e async for e in storage.events(date(2026, 1, 1), date(2026, 12, 31))]
    finally:
        await storage.close()
    assert not spool.exists()
    (event,) = events
    assert event.answer_id == ABSURD.answer_id.encode("utf-8", "replace").decode()
    assert (event.outcome, event.total_tokens, event.prompt_tokens) == (CLAMPED, CAP, CAP)
    assert (event.completion_tokens, event.cost) == (0, Decimal(0))
    assert event.upstream_latency_ms is None and event.overhead_ms is None


# --- the OpenAI fields: cached and reasoning tokens, the model ------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"cached_tokens": 10**20}, {"cached_tokens": 1033}),
        ({"cached_tokens": 2000}, {"cached_tokens": 1033}),  # never more than the prompt
        ({"cached_tokens": -1}, {"cached_tokens": 0}),
        ({"reasoning_tokens": 2**63}, {"reasoning_tokens": 135}),
        (
            {"prompt_tokens": 10**20, "cached_tokens": 10**20},
            {"prompt_tokens": CAP, "cached_tokens": CAP},
        ),
        ({"model": "gpt\x00x"}, {"model": "gpt\ufffdx"}),
        ({"model": "gpt\ud800x"}, {"model": "gpt?x"}),
        ({"model": "m" * 5000}, {"model": "m" * MAX_MODEL_CHARS}),
    ],
    ids=[
        "cached-1e20",
        "cached-over-prompt",
        "cached-negative",
        "reasoning-2^63",
        "prompt-and-cached-1e20",
        "model-nul",
        "model-surrogate",
        "model-5000-chars",
    ],
)
async def test_openai_fields_are_bounded_and_recorded(
    storage: Storage, tmp_path: Path, change: dict[str, Any], expected: dict[str, Any]
) -> None:
    await storage.ensure_user("alice", plan="free")
    metrics = Metrics()
    settler = Settler(storage, metrics=metrics, spool=tmp_path / "spool", max_tokens_per_answer=CAP)
    await settler.record(UsageEvent(**{**_fields(EVENT), **change}))
    assert settler.pending == 0  # written at once, not left to a retry
    (event,) = [e async for e in storage.events(date(2026, 1, 1), date(2026, 12, 31))]
    assert event.outcome == CLAMPED
    assert {name: getattr(event, name) for name in expected} == expected
    assert metrics.get("gateway_storage_errors_total", operation="settle") == 0
    assert metrics.get("gateway_usage_clamped_total") == 1


def test_a_spooled_event_keeps_its_absurd_parts_exactly() -> None:
    event = UsageEvent(**{**_fields(EVENT), "cached_tokens": 10**30, "reasoning_tokens": 2**64})
    read = event_from_json(event_to_json(Write(event))).event
    assert (read.cached_tokens, read.reasoning_tokens) == (10**30, 2**64)


# Odd model names are unpriced: let through, to see them recorded.
OPENAI = {
    **SETTINGS,
    "upstream": {"kind": "openai"},
    "prices": PRICES,
    "pricing": {"unpriced_models": "allow"},
}
# gpt-4o-mini's prices per million tokens (tests/upstreams/test_openai_sdk.py).
INPUT, OUTPUT = Decimal("0.15"), Decimal("0.60")


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
@pytest.mark.parametrize(
    ("model", "headers", "expected"),
    [
        ("gpt-4o-mini", {"x-fake-cached-tokens": str(2**63)}, {"cached_tokens": 12}),
        (
            "gpt-4o-mini",
            {"x-fake-reasoning-tokens": str(2**64 - 1)},
            {"reasoning_tokens": len(ANSWER_PIECES)},
        ),
        ("gpt\x00x", {}, {"model": "gpt\ufffdx"}),
        ("m" * 5000, {}, {"model": "m" * MAX_MODEL_CHARS}),
        (  # priced as the tokens it is charged: the cap, not 2**63
            "gpt-4o-mini",
            {"x-fake-prompt-tokens": str(2**63)},
            {
                "prompt_tokens": CAP,
                "cost": (CAP * INPUT + len(ANSWER_PIECES) * OUTPUT).scaleb(-6),
            },
        ),
    ],
    ids=["cached-2^63", "reasoning-u64-max", "model-nul", "model-5000-chars", "prompt-2^63"],
)
async def test_absurd_openai_usage_is_recorded_clamped(
    database_url: str,
    client: httpx.AsyncClient,
    model: str,
    headers: dict[str, str],
    expected: dict[str, Any],
    stream: bool,
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with running_gateway(database_url, upstream=fake, settings=OPENAI) as h:
        url = f"{h.url}/v1/chat/completions"
        first = await client.post(url, json=body, headers=h.auth(**headers))
        await h.probes.wait_finished(1)
        events = await h.events()
        today = h.gateway.today()
        (daily,) = await h.gateway.storage.daily(today, today, user_id=USER)
        errors = h.gateway.metrics.get("gateway_storage_errors_total", operation="settle")
    assert first.status_code == 200
    (event,) = events
    assert event.outcome == CLAMPED
    assert {name: getattr(event, name) for name in expected} == expected
    assert errors == 0
    # Counted against the day's tokens like any answer.
    assert daily.total_tokens == event.total_tokens > 0


# --- upstream ids past what the database can index (review-rec REC-2) ----------------------


def _over_long_id(seed: str = "") -> str:
    """An id past PostgreSQL's b-tree entry limit (about 2,700 bytes) that does
    not compress: a buggy or hostile upstream's answer or conversation id."""
    return "".join(hashlib.sha256(f"{seed}{i}".encode()).hexdigest() for i in range(63))


def test_an_over_long_id_becomes_a_prefix_and_a_digest_of_the_whole() -> None:
    long_id, other = _over_long_id("a"), _over_long_id("b")
    event = replace(EVENT, answer_id=long_id, conversation_id=other)
    bounded, changed = bound_event(event, max_tokens=CAP)
    assert changed == ["answer_id", "conversation_id"] and bounded.outcome == CLAMPED
    assert len(bounded.answer_id) == len(bounded.conversation_id or "") == MAX_ID_CHARS
    assert bounded.answer_id.startswith(long_id[:128])
    assert bounded.answer_id.endswith(hashlib.sha256(long_id.encode()).hexdigest())
    # The same id maps the same way every time (a replay, a lookup); another,
    # even one with the same beginning, maps elsewhere.
    assert bound_event(event, max_tokens=CAP)[0] == bounded
    same_start = long_id[:1000] + "x" + long_id[1001:]
    assert stored_id(same_start) != stored_id(long_id) == bounded.answer_id
    # Every real id is kept as it is.
    kept = replace(EVENT, answer_id="resp_" + "a" * 200, conversation_id=str(uuid.uuid4()))
    assert bound_event(kept, max_tokens=CAP) == (kept, [])
    assert stored_id("x" * MAX_ID_CHARS) == "x" * MAX_ID_CHARS


async def test_answers_settled_beside_an_over_long_id_are_recorded(
    storage: Storage, tmp_path: Path
) -> None:
    """Review-rec REC-2: bob's two answers are settled in the same group-commit
    batch as an answer whose upstream id PostgreSQL cannot index. Before, the
    database refused the whole batch, its retries went out together and failed
    again, all three were spooled, and every replay stopped at the first line
    as if the database were down: bob's answers were never recorded. Now the
    id is bounded before it is written: all three are recorded, once."""
    await storage.ensure_user("alice", plan="free")
    await storage.ensure_user("bob", plan="free")
    spool = tmp_path / "spool.jsonl"
    settler = Settler(storage, metrics=Metrics(), spool=spool, retry_delays=(0, 0.01))
    long_id = _over_long_id()
    await asyncio.gather(
        settler.record(_answer(long_id, "alice", 10, "ra")),
        settler.record(_answer("b1", "bob", 7, "rb1")),
        settler.record(_answer("b2", "bob", 5, "rb2")),
    )
    if settler.pending:
        await asyncio.wait(list(settler._tasks))
    for _ in range(3):  # replays (run_replays', a restart's) change nothing more
        await Settler(storage, metrics=Metrics(), spool=spool).replay()
    events = await _events(storage)
    assert sorted(e.answer_id for e in events if e.user_id == "bob") == ["b1", "b2"]
    (alices,) = [e for e in events if e.user_id == "alice"]
    assert (alices.answer_id, alices.outcome) == (stored_id(long_id), CLAMPED)
    users = {u: await storage.get_user(u) for u in ("alice", "bob")}
    assert {u: user.lifetime_tokens for u, user in users.items() if user} == {
        "alice": 10,
        "bob": 12,
    }
    assert not spool.exists()
    # Its owner is found by the id the upstream gave (a later request naming
    # the object), and its record written again is a duplicate.
    owner = await storage.answer_owner(long_id)
    assert owner is not None and owner.user_id == "alice"
    await settler.record(_answer(long_id, "alice", 10, "ra"))
    user = await storage.get_user("alice")
    assert user is not None and user.lifetime_tokens == 10


async def test_a_conversation_with_an_over_long_id_is_recorded_and_found(
    storage: Storage, tmp_path: Path
) -> None:
    """A Dify conversation id the database cannot index (review-rec REC-2): the
    answer is recorded, and the conversation's upstream is found by the id the
    upstream gave, as the proxy asks for it (`conversation_upstream`)."""
    await storage.ensure_user("alice", plan="free")
    settler = Settler(storage, metrics=Metrics(), spool=tmp_path / "spool.jsonl")
    conversation = _over_long_id("conversation")
    answer = replace(_answer("m1", "alice", 10, "ra"), conversation_id=conversation)
    await settler.record(replace(answer, upstream="research"))
    assert settler.pending == 0
    (recorded,) = await _events(storage)
    assert recorded.conversation_id == stored_id(conversation)
    assert await storage.conversation_upstream("alice", conversation) == "research"


def _answer(answer_id: str, user: str, tokens: int, request_id: str) -> UsageEvent:
    return replace(
        EVENT,
        answer_id=answer_id,
        user_id=user,
        prompt_tokens=tokens,
        completion_tokens=0,
        total_tokens=tokens,
        request_id=request_id,
        estimated=False,
        outcome="complete",
    )


async def _events(storage: Storage) -> list[UsageEvent]:
    return [e async for e in storage.events(EVENT.day, EVENT.day)]
