"""Day-two defects found while trying the gateway as an operator (issue 25)."""

from __future__ import annotations

import asyncio
import dataclasses
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth import Authenticator
from gateway.cli import main
from gateway.config import AuthConfig, Config, DatabaseConfig, parse_config
from gateway.errors import STORAGE_UNAVAILABLE, ConfigError
from gateway.http import response_headers
from gateway.keys import hash_key
from gateway.storage import ApiKey, UsageEvent, open_storage
from tests.fakes.dify import FakeDify
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
        await h.probes.wait_finished(1)
        await proxy.cut()
        during = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth())
        assert during.status_code == 200  # ...so the outage alone is survived
        # An operator changes a plan while the database is down.
        text = path.read_text().replace("queries_per_day = 10", "queries_per_day = 20")
        path.write_text(text)
        assert await h.gateway.reload()
        assert h.gateway.config.plans["free"].queries_per_day == 20
        after = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth())
        await h.probes.wait_finished(3)
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


# --- check-config -------------------------------------------------------------------


FULL = """
[upstream]
kind = "openai"
url = "https://api.openai.com/v1"
allow = ["GET /models/*"]

[database]
url = "sqlite:///{db}"

[metrics]
public = true

[pricing]
unpriced_models = "allow"

[alerts]
thresholds = [80, 100]
webhook_url = "https://hooks.example.com/gw"

[plans.free]
queries_per_day = 5
alert_thresholds = [50]

[prices."gpt-4o-mini"]
input = "0.15"
output = "0.60"

[call_prices."openai.web_search"]
price = "0.01"
"""


def write_full(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(FULL.format(db=tmp_path / "g.db"))
    return path


def test_check_config_prints_every_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_WEBHOOK_SECRET", "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHM=")
    monkeypatch.setenv("DIFY_API_KEY", "sk-test")
    assert main(["--config", str(write_full(tmp_path)), "check-config"]) == 0
    out = capsys.readouterr().out
    rendered = tomllib.loads(out)  # the output is TOML
    # Every section of the configuration, however late it was added.
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(getattr(Config(), f.name)):
            assert f.name in rendered, f.name
    assert rendered["alerts"]["thresholds"] == [80, 100]
    assert rendered["alerts"]["webhook_url"] == "https://hooks.example.com/gw"
    assert rendered["alerts"]["webhook_secret"] == "***"  # never the secret
    assert "c2VjcmV0" not in out
    assert rendered["pricing"]["unpriced_models"] == "allow"
    assert rendered["metrics"]["public"] is True
    assert rendered["upstream"]["allow"] == ["GET /models/*"]
    assert rendered["plans"]["free"]["alert_thresholds"] == [50]
    assert rendered["prices"]["gpt-4o-mini"]["input"] == "0.15"
    assert rendered["call_prices"]["openai.web_search"]["price"] == "0.01"


def test_unknown_top_level_key_hint_names_every_table() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"plan": {"free": {}}})
    message = caught.value.message
    assert message.startswith("plan: unknown key (did you mean 'plans'? expected one of: ")
    listed = message.split("expected one of: ")[1].rstrip(")").split(", ")
    assert {"plans", "prices", "call_prices", "alerts", "metrics", "pricing"} <= set(listed)


def test_check_config_warns_that_the_upstream_key_is_unset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DIFY_API_KEY", raising=False)
    monkeypatch.delenv("GATEWAY_UPSTREAM_API_KEY", raising=False)
    path = tmp_path / "gateway.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "g.db"}"\n')
    assert main(["--config", str(path), "check-config"]) == 0
    err = capsys.readouterr().err
    assert "gateway: warning: the upstream API key is not set: set DIFY_API_KEY" in err
    monkeypatch.setenv("DIFY_API_KEY", "app-1")
    assert main(["--config", str(path), "check-config"]) == 0
    assert "warning" not in capsys.readouterr().err


# --- commands that deliver nothing need no delivery secret -----------------------------


def test_set_limit_needs_no_webhook_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_WEBHOOK_SECRET", raising=False)
    path = write_full(tmp_path)
    assert main(["--config", str(path), "users", "add", "alice"]) == 0
    assert main(["--config", str(path), "users", "set-limit", "alice", "queries_per_day", "9"]) == 0
    assert "queries_per_day = 9 (override)" in capsys.readouterr().out
    # What delivers alerts still refuses to start without it.
    assert main(["--config", str(path), "check-config"]) == 2
    assert "GATEWAY_WEBHOOK_SECRET is not set" in capsys.readouterr().err


# --- users show: a total whose split is not known -------------------------------------


async def test_users_show_says_which_tokens_have_no_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "g.db"}"\n')
    storage = await open_storage(DatabaseConfig(url=f"sqlite:///{tmp_path / 'g.db'}"))
    try:
        await storage.migrate()
        await storage.ensure_user("wf", plan="free")
        # A blocking Dify workflow: its total, and only its nodes' prompt/completion.
        await storage.settle(
            UsageEvent(
                answer_id="run-1",
                user_id="wf",
                day=NOW.date(),
                created_at=NOW,
                endpoint="workflows/run",
                prompt_tokens=4132,
                completion_tokens=540,
                total_tokens=5990,
            )
        )
    finally:
        await storage.close()
    assert await asyncio.to_thread(main, ["--config", str(path), "users", "show", "wf"]) == 0
    out = capsys.readouterr().out
    assert (
        "lifetime:  5990 tokens (4132 prompt, 540 completion, 1318 with the split not reported)"
        in out
    )


def test_token_split() -> None:
    from gateway.cli import token_split

    assert token_split(10, 6, 4) == "6 prompt, 4 completion"
    assert token_split(10, 0, 0) == "prompt/completion split not reported"
    assert token_split(0, 0, 0) == "0 prompt, 0 completion"


async def test_dashboard_says_which_tokens_have_no_split(tmp_path: Path) -> None:
    from tests.dashboard.test_dashboard import admin_gateway, client, sign_in

    async with admin_gateway(f"sqlite:///{tmp_path / 'g.db'}") as h, client(h) as c:
        await h.storage.ensure_user("wf", plan="free")
        await h.storage.settle(
            UsageEvent(
                answer_id="run-1",
                user_id="wf",
                day=h.gateway.today(),
                created_at=NOW,
                endpoint="workflows/run",
                prompt_tokens=4132,
                completion_tokens=540,
                total_tokens=5990,
            )
        )
        await sign_in(c)
        page = (await c.get("/dashboard/users/wf")).text
    assert "<dt>Split not reported</dt><dd>1.318</dd>" in page


# --- one Date header ----------------------------------------------------------------


def test_relayed_responses_leave_date_and_server_to_the_gateways_server() -> None:
    upstream = [
        (b"Date", b"Sun, 06 Dec 2026 12:00:00 GMT"),
        (b"Server", b"nginx"),
        (b"Content-Type", b"application/json"),
        (b"X-Request-Id", b"theirs"),
    ]
    assert response_headers(upstream) == [(b"content-type", b"application/json")]


# --- what a database outage tells those who ask ---------------------------------------


@pytest.mark.postgres
async def test_a_database_outage_does_not_tell_anyone_where_the_database_is(
    pg_behind_proxy: tuple[str, TCPProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """Attack (review 3, #5): with no credential at all, /readyz answered the
    driver's words, and so did /v1/usage to any bearer token (the key lookup
    fails first): 'PostgreSQL error: ConnectionRefusedError: ... ('10.x.y.z',
    5432)', or the database's user or name in other errors. Now a fixed message;
    the words go to the log, for the operator."""
    url, proxy = pg_behind_proxy
    settings = {"database": {"connect_timeout": 1.0, "command_timeout": 2.0}}
    async with running_gateway(url, settings=settings) as h:
        await proxy.cut()
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            ready = await client.get("/readyz")
            usage = await client.get("/v1/usage", headers={"Authorization": "Bearer gwk_x"})
            daily = await client.get("/v1/usage/daily", headers={"Authorization": "Bearer gwk_x"})
        await proxy.restore()
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "reason": STORAGE_UNAVAILABLE}
    for answer in (usage, daily):
        assert answer.status_code == 503
        assert answer.json()["message"] == STORAGE_UNAVAILABLE
    for answer in (ready, usage, daily):
        assert "PostgreSQL" not in answer.text and str(proxy.port) not in answer.text
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("not ready: PostgreSQL error" in m for m in logged)
    assert any(m.startswith("/v1/usage: PostgreSQL error") for m in logged)
