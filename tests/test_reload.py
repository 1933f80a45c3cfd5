"""Configuration reload: the file watcher and SIGHUP apply a valid file at once, an
invalid one is refused with one log line, sections that need a restart are not applied.

Each test runs a gateway whose configuration is loaded from a file, then edits
that file; nothing sleeps: tests wait on the gateway's `reloads` and `finished`
counters.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, Harness, running_gateway, to_toml

CHAT = {"query": "hi", "inputs": {}, "response_mode": "streaming", "user": "x"}
# At least 32 bytes: PyJWT warns about shorter HS256 keys (RFC 7518 section 3.2).
SECRET = "reload-hs256-secret-" + "k" * 32
ENV = {"TEST_JWT_SECRET": SECRET}


def limited(queries_per_day: int, *, reload_interval: float = 0.05) -> dict[str, Any]:
    return {
        "server": {"reload_interval": reload_interval},
        "plans": {"free": {"queries_per_day": queries_per_day}},
    }


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


class ConfigFile:
    """The configuration file the harness wrote, rewritten with changes to that original."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.original: dict[str, Any] = tomllib.loads(path.read_text())

    def write(self, **changes: Any) -> None:
        before = self.path.stat()
        self.path.write_text(to_toml(_merged(self.original, changes)))
        after = self.path.stat()
        if (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size):
            # The watcher compares modification time and size: an edit of the same
            # size within one timestamp tick of the file system looks unchanged. An
            # operator's edit comes later than that; move the time on as it would.
            os.utime(self.path, ns=(after.st_atime_ns, after.st_mtime_ns + 1_000_000))


def gateway_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.split(".")[0] == "gateway" and r.levelno >= level]


def sighup() -> None:
    # Without the gateway's handler, SIGHUP would end the test run.
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
    os.kill(os.getpid(), signal.SIGHUP)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


async def ask(client: httpx.AsyncClient, h: Harness, **headers: str) -> httpx.Response:
    return await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth(**headers))


async def statuses(client: httpx.AsyncClient, h: Harness, count: int) -> list[int]:
    return [(await ask(client, h)).status_code for _ in range(count)]


async def test_the_watcher_applies_a_changed_file(
    tmp_path: Path,
    sqlite_url: str,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    path = tmp_path / "gateway.toml"
    async with running_gateway(sqlite_url, config_file=path, settings=limited(1)) as h:
        file = ConfigFile(path)
        assert (await ask(client, h)).status_code == 200
        refused = await ask(client, h)
        assert refused.status_code == 429
        assert refused.json()["code"] == "daily_query_limit"

        file.write(plans={"free": {"queries_per_day": 3}})
        await h.probes.reloads.wait_for(1)
        assert h.gateway.config.plans["free"].queries_per_day == 3
        # One of today's three is used; the refusal did not count.
        assert await statuses(client, h, 3) == [200, 200, 429]
        await h.probes.wait_finished(5)
    assert h.probes.reloads.value == 1
    (applied,) = [
        r
        for r in gateway_records(caplog, logging.INFO)
        if "configuration reloaded" in r.getMessage()
    ]
    assert str(path) in applied.getMessage()
    # Nothing that needs a restart changed (the secrets are re-read from the same
    # environment, so the upstream section compares equal).
    assert gateway_records(caplog, logging.WARNING) == []


async def test_sighup_reloads_the_file(
    tmp_path: Path, sqlite_url: str, client: httpx.AsyncClient
) -> None:
    path = tmp_path / "gateway.toml"
    # reload_interval 0: no watcher, only the signal reloads.
    settings = limited(1, reload_interval=0)
    async with running_gateway(sqlite_url, config_file=path, settings=settings) as h:
        assert h.gateway.config.plans["free"].queries_per_day == 1
        ConfigFile(path).write(
            plans={
                "free": {"queries_per_day": 2, "tokens_per_day": 50_000},
                "pro": {"tokens_per_month": 1_000_000},
            }
        )
        sighup()
        await h.probes.reloads.wait_for(1)

        plans = h.gateway.config.plans
        assert set(plans) == {"free", "pro"}
        assert (plans["free"].queries_per_day, plans["free"].tokens_per_day) == (2, 50_000)
        assert plans["pro"].tokens_per_month == 1_000_000
        assert await statuses(client, h, 3) == [200, 200, 429]
        await h.probes.wait_finished(3)


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"plans": {"free": {"querys_per_day": 3}}}, "plans.free.querys_per_day"),
    (
        {"plans": {"free": {"queries_per_day": 3}}, "accounting": {"timezone": "Mars/Base"}},
        "accounting.timezone",
    ),
]


async def test_an_invalid_file_is_refused_and_the_running_configuration_stays(
    tmp_path: Path,
    sqlite_url: str,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "gateway.toml"
    async with running_gateway(sqlite_url, config_file=path, settings=limited(1)) as h:
        file = ConfigFile(path)
        running = h.gateway.config
        assert await statuses(client, h, 2) == [200, 429]

        for reloads, (change, key) in enumerate(INVALID, start=1):
            caplog.clear()
            file.write(**change)
            await h.probes.reloads.wait_for(reloads)
            assert h.gateway.config is running
            assert await statuses(client, h, 1) == [429]
            (error,) = gateway_records(caplog, logging.ERROR)
            message = error.getMessage()
            assert key in message and "\n" not in message
            assert "keeping the running configuration" in message

        # The watcher keeps watching: the corrected file is applied.
        caplog.clear()
        file.write(plans={"free": {"queries_per_day": 3}})
        await h.probes.reloads.wait_for(len(INVALID) + 1)
        assert h.gateway.config.plans["free"].queries_per_day == 3
        assert await statuses(client, h, 1) == [200]
        await h.probes.wait_finished(5)
    assert gateway_records(caplog, logging.ERROR) == []


async def test_sections_that_need_a_restart_are_logged_and_not_applied(
    tmp_path: Path,
    sqlite_url: str,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "gateway.toml"
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = limited(1)
    async with running_gateway(sqlite_url, fake=fake, config_file=path, settings=settings) as h:
        file = ConfigFile(path)
        running = h.gateway.config
        file.write(
            server={"max_json_body_bytes": 100},
            # Port 9 (discard): were this applied, requests would fail with 502.
            upstream={"url": "http://127.0.0.1:9/v1", "read_timeout": 7.0},
            database={"url": f"sqlite:///{tmp_path / 'other.db'}", "command_timeout": 2.0},
            plans={"free": {"queries_per_day": 2}},
        )
        await h.probes.reloads.wait_for(1)

        config = h.gateway.config
        assert config.server is running.server
        assert config.upstream is running.upstream
        assert config.database is running.database
        assert config.plans["free"].queries_per_day == 2  # the rest is applied
        assert await statuses(client, h, 3) == [200, 200, 429]
        assert fake.hits("/chat-messages") == 2
        await h.probes.wait_finished(3)
    (warning,) = gateway_records(caplog, logging.WARNING)
    message = warning.getMessage()
    assert "server, upstream, database" in message and "restart" in message
    assert not (tmp_path / "other.db").exists()


async def test_an_upstreams_headers_follow_a_reload(
    tmp_path: Path, sqlite_url: str, client: httpx.AsyncClient
) -> None:
    # A router's headers are sent per request, not a connection's: a rotated
    # Helicone key (headers_env) or a changed tenant follows a reload.
    path = tmp_path / "gateway.toml"
    fake = FakeDify(api_key=UPSTREAM_KEY)
    env = {"HELICONE_KEY": "Bearer sk-helicone-one", "HELICONE_NEXT": "Bearer sk-helicone-two"}
    settings = {
        **limited(10),
        "upstream": {
            "headers": {"x-tenant": "acme"},
            "headers_env": {"helicone-auth": "HELICONE_KEY"},
        },
    }
    async with running_gateway(
        sqlite_url, fake=fake, config_file=path, settings=settings, env=env
    ) as h:
        assert (await ask(client, h, **{"x-tenant": "mine"})).status_code == 200
        ConfigFile(path).write(
            upstream={
                "headers": {"x-tenant": "acme-2"},
                "headers_env": {"helicone-auth": "HELICONE_NEXT"},
            }
        )
        await h.probes.reloads.wait_for(1)
        assert (await ask(client, h, **{"x-tenant": "mine"})).status_code == 200
        await h.probes.wait_finished(2)
    sent = [(r.headers["x-tenant"], r.headers["helicone-auth"]) for r in fake.requests]
    assert sent == [("acme", "Bearer sk-helicone-one"), ("acme-2", "Bearer sk-helicone-two")]


async def test_an_auth_change_takes_effect_at_once(
    tmp_path: Path, sqlite_url: str, client: httpx.AsyncClient
) -> None:
    path = tmp_path / "gateway.toml"
    settings = limited(5, reload_interval=0)
    async with running_gateway(sqlite_url, config_file=path, settings=settings, env=ENV) as h:
        assert h.fake is not None
        assert (await ask(client, h)).status_code == 200

        ConfigFile(path).write(auth={"mode": "jwt", "jwt": {"secret_env": "TEST_JWT_SECRET"}})
        sighup()
        await h.probes.reloads.wait_for(1)

        refused = await ask(client, h)  # a gateway key is no JWT
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        # The secret is read from the gateway's environment at reload.
        token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 300}, SECRET)
        response = await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth(token))
        assert response.status_code == 200, response.text
        assert h.fake.requests[-1].json["user"] == "carol"
        await h.probes.wait_finished(3)


async def test_a_key_file_without_keys_is_refused_on_reload(
    tmp_path: Path,
    sqlite_url: str,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "gateway.toml"
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    settings = limited(5, reload_interval=0)
    async with running_gateway(sqlite_url, config_file=path, settings=settings) as h:
        running = h.gateway.config
        ConfigFile(path).write(
            auth={"mode": "jwt", "jwt": {"algorithm": "ES256", "jwks_file": "jwks.json"}}
        )
        sighup()
        await h.probes.reloads.wait_for(1)
        assert h.gateway.config is running
        assert (await ask(client, h)).status_code == 200
        await h.probes.wait_finished(1)
    (error,) = gateway_records(caplog, logging.ERROR)
    assert "auth.jwt.jwks_file" in error.getMessage()


async def test_an_emptied_file_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    path = tmp_path / "gateway.toml"
    async with running_gateway(
        sqlite_url, config_file=path, settings=limited(5, reload_interval=0)
    ) as h:
        running = h.gateway.config
        path.write_text("\n")  # an editor that truncated the file before writing it
        assert await h.gateway.reload() is False
        assert h.gateway.config is running
        assert h.gateway.metrics.get("gateway_config_reloads_total", result="refused") == 1


async def test_a_reload_mid_answer_leaves_that_answer_on_the_version_it_began_with(
    tmp_path: Path, sqlite_url: str, client: httpx.AsyncClient
) -> None:
    """A request reads the configuration once, when it arrives (gateway/snapshot.py):
    an answer under way when a reload lands is settled on the terms it began with
    (here the token cap), and the next request gets the new ones."""
    path = tmp_path / "gateway.toml"
    settings = {
        "accounting": {"max_tokens_per_answer": 5},
        "plans": {"free": {"queries_per_day": 10}},
    }
    async with running_gateway(sqlite_url, config_file=path, settings=settings) as h:
        assert h.fake is not None
        file = ConfigFile(path)
        held = {"x-fake-scenario": "hold"}
        async with client.stream(
            "POST", f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth(**held)
        ) as answer:
            chunks = answer.aiter_raw()
            body = [await anext(chunks)]  # the answer is streaming: it began
            file.write(accounting={"max_tokens_per_answer": 1_000_000})
            assert await h.gateway.reload()
            assert h.gateway.config.accounting.max_tokens_per_answer == 1_000_000
            h.fake.release_held()
            body += [chunk async for chunk in chunks]
        assert answer.status_code == 200 and b"message_end" in b"".join(body)
        await h.probes.wait_finished(1)
        after = await ask(client, h)
        assert after.status_code == 200
        await h.probes.wait_finished(2)
        began_before, began_after = sorted(await h.events(), key=lambda e: e.created_at)
    # Settled on the cap in force when it arrived, though it ended after the reload:
    assert began_before.outcome == "clamped" and began_before.total_tokens == 5
    # The request that arrived after the reload is held to the new cap only.
    assert began_after.outcome == "complete" and began_after.total_tokens > 5
