"""Nothing lost when a gateway process dies or is stopped mid-answer: real
`gateway serve` processes in front of a fake Dify streaming slowly, killed with
SIGKILL or stopped with SIGTERM, on SQLite and on PostgreSQL (docs/quotas.md,
"Crash safety"; docs/proxy.md, "Shutting down")."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import DatabaseConfig
from gateway.keys import new_key
from gateway.storage import Storage, UsageEvent, open_storage
from gateway.testing.fake_upstream import FakeDify
from gateway.usage import estimate_tokens
from tests.harness import UPSTREAM_KEY, USER, to_toml
from tests.processes import GatewayProcess
from tests.servers import serve

CHAT = {"query": "Xin chào, hãy kể một câu chuyện", "inputs": {}, "response_mode": "streaming"}
ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
ALL_TIME = (date(2000, 1, 1), date(2100, 1, 1))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Storage]:
    storage = await open_storage(DatabaseConfig(url=database_url))
    await storage.migrate()
    try:
        yield storage
    finally:
        await storage.close()


async def user_key(storage: Storage) -> str:
    await storage.ensure_user(USER, plan="free")
    key = new_key()
    await storage.create_key(
        USER, key_id=key.id, key_hash=key.hash, prefix=key.prefix, name="", now=datetime.now(UTC)
    )
    return key.secret


def write_config(path: Path, database_url: str, upstream_url: str, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "server": {"log_level": "info", "reload_interval": 0},
        "upstream": {"url": upstream_url + "/v1", "api_key_env": "TEST_UPSTREAM_KEY"},
        "database": {"url": database_url, "spool_file": str(path.parent / "spool.jsonl")},
        "accounting": {"timezone": "UTC", "default_plan": "free"},
        "plans": {"free": {"max_concurrent_streams": 5}},
    }
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    path.write_text(to_toml(data))
    return path


async def events(storage: Storage) -> list[UsageEvent]:
    return [e async for e in storage.events(*ALL_TIME)]


async def open_answer(
    client: httpx.AsyncClient, url: str, key: str, **headers: str
) -> tuple[httpx.Response, AsyncIterator[bytes]]:
    """Start a streaming answer and wait for its first bytes (admitted, forwarded,
    the upstream answering)."""
    request = client.build_request(
        "POST",
        f"{url}/v1/chat-messages",
        json=CHAT,
        headers={"Authorization": f"Bearer {key}", **headers},
    )
    response = await client.send(request, stream=True)
    assert response.status_code == 200
    chunks = response.aiter_raw()
    await anext(chunks)
    return response, chunks


async def test_a_gateway_killed_mid_answer_leaves_it_to_be_recovered_as_an_estimate(
    database_url: str, store: Storage, tmp_path: Path
) -> None:
    key = await user_key(store)
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with serve(fake) as upstream, httpx.AsyncClient(timeout=30) as client:
        config = write_config(
            tmp_path / "gateway.toml",
            database_url,
            upstream,
            upstream={"total_timeout": 2.0, "disconnect_grace": 0.5},
            database={"recover_after": 2.5, "recover_interval": 0.2},
        )
        first = await GatewayProcess.start(config, ENV)
        try:
            response, _ = await open_answer(client, first.url, key, **{"x-fake-scenario": "hold"})
            # Mid-answer, the process dies without a chance to record anything.
            await first.kill()
            await response.aclose()
        finally:
            await first.kill()
        assert await events(store) == []
        (day,) = await store.daily(*ALL_TIME)
        assert day.queries == 1  # the query was spent at admission

        second = await GatewayProcess.start(config, ENV)
        try:
            await second.wait_for_line("recovered 1 pending answer")
        finally:
            assert await second.terminate() == 0
            fake.release_held()
    (recovered,) = await events(store)
    prompt = estimate_tokens(len(CHAT["query"]))  # type: ignore[arg-type]
    assert (recovered.outcome, recovered.estimated, recovered.endpoint) == (
        "recovered",
        True,
        "chat-messages",
    )
    assert (recovered.prompt_tokens, recovered.total_tokens) == (prompt, prompt)
    assert recovered.answer_id == f"gw-{recovered.request_id}"
    (day,) = await store.daily(*ALL_TIME)
    assert (day.queries, day.total_tokens) == (1, prompt)  # the query stays spent
    user = await store.get_user(USER)
    assert user is not None and user.lifetime_tokens == prompt
    # Nothing else pending, and its stream slot is free.
    assert await store.recover(before=datetime(2100, 1, 1, tzinfo=UTC), now=datetime.now(UTC)) == []
    assert await store.open_streams(USER, now=datetime.now(UTC)) == 0


async def test_sigterm_lets_open_answers_finish_within_the_grace_and_charges_the_rest(
    database_url: str, store: Storage, tmp_path: Path
) -> None:
    key = await user_key(store)
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with serve(fake) as upstream, httpx.AsyncClient(timeout=30) as client:
        config = write_config(
            tmp_path / "gateway.toml", database_url, upstream, server={"shutdown_grace": 3}
        )
        gateway = await GatewayProcess.start(config, ENV)
        try:
            # One answer that ends well within the grace, one that never would.
            quick, quick_rest = await open_answer(
                client, gateway.url, key, **{"x-fake-delay-ms": "100"}
            )
            held, held_rest = await open_answer(
                client, gateway.url, key, **{"x-fake-scenario": "hold"}
            )
            gateway.signal(signal.SIGTERM)
            await gateway.wait_for_line("Waiting for connections to close")
            # No new requests once shutting down.
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{gateway.url}/healthz")
            quick_body = b"".join([chunk async for chunk in quick_rest])
            held_body = b"".join([chunk async for chunk in held_rest])
            code = await gateway.wait()
        finally:
            await gateway.kill()
            fake.release_held()
        await quick.aclose()
        await held.aclose()
    assert code == 0, gateway.log
    assert b"message_end" in quick_body and b"message_end" not in held_body
    assert b"shutting_down" in held_body  # told why, and the stream ended properly
    by_outcome = {e.outcome: e for e in await events(store)}
    assert set(by_outcome) == {"complete", "shutdown"}
    finished, cut = by_outcome["complete"], by_outcome["shutdown"]
    # The answer that finished is recorded exactly as the upstream reported it...
    assert not finished.estimated
    assert (finished.prompt_tokens, finished.completion_tokens) == (
        fake.usage.prompt_tokens,
        fake.usage.completion_tokens,
    )
    assert finished.cost == fake.usage.total_price
    # ...the one cut at the end of the grace as an estimate of what was read.
    assert cut.estimated and cut.total_tokens > 0
    assert await store.recover(before=datetime(2100, 1, 1, tzinfo=UTC), now=datetime.now(UTC)) == []
    assert not (tmp_path / "spool.jsonl").exists()  # nothing needed the spool
    (day,) = await store.daily(*ALL_TIME)
    assert day.queries == 2
