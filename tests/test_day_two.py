"""Day-two defects found while trying the gateway as an operator (issue 25)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from gateway.auth import Authenticator
from gateway.config import AuthConfig
from gateway.keys import hash_key
from gateway.storage import ApiKey
from gateway.testing.fake_upstream import FakeDify
from tests.harness import UPSTREAM_KEY, running_gateway
from tests.tcpproxy import TCPProxy

NOW = datetime(2026, 12, 6, tzinfo=UTC)
CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "blocking"}


# --- a reload during a database outage ------------------------------------------------


async def test_reload_during_a_database_outage_keeps_serving(
    pg_behind_proxy: tuple[str, TCPProxy], tmp_path: Path
) -> None:
    url, proxy = pg_behind_proxy
    path = tmp_path / "gateway.toml"
    settings: dict[str, Any] = {
        # Admission lets requests through while the database is away...
        "admission": {"on_storage_error": {"queries": "open", "tokens": "open", "streams": "open"}},
        "database": {
            "connect_timeout": 1.0,
            "command_timeout": 2.0,
            "spool_file": str(tmp_path / "spool.jsonl"),
        },
        "server": {"reload_interval": 0},
        "plans": {"free": {"queries_per_day": 10}},
    }
    async with (
        running_gateway(
            url, fake=FakeDify(api_key=UPSTREAM_KEY), settings=settings, config_file=path
        ) as h,
        httpx.AsyncClient(timeout=20) as client,
    ):
        answer = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth())
        assert answer.status_code == 200  # the key is cached
        await h.gateway.wait_finished(1)
        await proxy.cut()
        during = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth())
        assert during.status_code == 200  # ...so the outage alone is survived
        # An operator changes a plan while the database is down.
        text = path.read_text().replace("queries_per_day = 10", "queries_per_day = 20")
        path.write_text(text)
        assert await h.gateway.reload()
        assert h.gateway.config.plans["free"].queries_per_day == 20
        after = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.gateway.wait_finished(3)
        await h.gateway.settler.close()  # the ledger writes go to the spool
        await proxy.restore()
    # Before: the reload emptied the key cache, the key lookup needed the database: 503.
    assert after.status_code == 200, after.text


def test_reload_keeps_keys_but_a_lower_ttl_applies_at_once() -> None:
    now = [100.0]
    digest = hash_key("gwk_x")
    key = ApiKey(id="k1", user_id="u", name="", prefix="gwk_x", created_at=NOW, revoked_at=None)
    first = Authenticator(None, AuthConfig(key_cache_ttl=30), clock=lambda: now[0])  # type: ignore[arg-type]
    first._keys.put(digest, key)
    kept = Authenticator(None, AuthConfig(key_cache_ttl=30), previous=first)  # type: ignore[arg-type]
    assert kept._keys.get(digest) is key
    now[0] += 10
    shorter = Authenticator(None, AuthConfig(key_cache_ttl=5), previous=kept)  # type: ignore[arg-type]
    # Cached for 30 s at t=100; with a 5 s ttl from t=110 it would live to 130 > 115.
    assert shorter._keys.get(digest) is None
    off = Authenticator(None, AuthConfig(key_cache_ttl=0), previous=first)  # type: ignore[arg-type]
    off._keys.put(digest, key)
    assert off._keys.get(digest) is None
