"""A running gateway in front of a fake Dify, both on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from gateway.app import create_app
from gateway.clock import Clock
from gateway.config import Config, load_config, parse_config
from gateway.keys import new_key
from gateway.probes import Watermarks
from gateway.runtime import Gateway
from gateway.storage import Storage, UsageEvent, open_storage
from tests.fakes.dify import FakeDify
from tests.migrated import MIGRATED
from tests.servers import serve

UPSTREAM_KEY = "app-upstream-secret"
USER = "alice"


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds, checking every 5 ms; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def until_async(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """`until` for a condition that has to wait itself (one that asks the
    database): checked every 5 ms; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@dataclass
class Harness:
    url: str  # the gateway's base URL (without /v1)
    gateway: Gateway
    storage: Storage
    config: Config
    key: str  # a gateway key of USER
    key_id: str
    probes: Watermarks  # what the gateway finished: wait on these, never sleep
    fake: FakeDify | None = None
    upstream_url: str = ""
    app: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def auth(self, key: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}", **extra}

    async def events(self) -> list[UsageEvent]:
        start = datetime(2000, 1, 1).date()
        end = datetime(2100, 1, 1).date()
        return [e async for e in self.storage.events(start, end)]

    async def add_user(self, user_id: str, plan: str = "free") -> str:
        await self.storage.ensure_user(user_id, plan=plan)
        key = new_key()
        await self.storage.create_key(
            user_id,
            key_id=key.id,
            key_hash=key.hash,
            prefix=key.prefix,
            name="",
            now=datetime.now(UTC),
        )
        return key.secret


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@contextlib.asynccontextmanager
async def running_gateway(
    database_url: str,
    *,
    fake: FakeDify | None = None,
    upstream: Any = None,
    upstream_url: str | None = None,
    settings: dict[str, Any] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
    env: dict[str, str] | None = None,
    config_file: Path | None = None,
) -> AsyncIterator[Harness]:
    """The gateway on a free port, in front of ``upstream`` (an ASGI app, default a
    FakeDify) or of ``upstream_url``.

    ``settings`` are merged into a base configuration (a table set to None is
    left out of it); ``env`` adds environment
    variables (secrets) the configuration reads. With ``config_file``, the merged
    configuration is written there as TOML and loaded from it, so the gateway can
    reload it.
    """
    if upstream is None and upstream_url is None:
        fake = fake or FakeDify(api_key=UPSTREAM_KEY)
        upstream = fake
    async with contextlib.AsyncExitStack() as stack:
        if upstream_url is None:
            upstream_url = await stack.enter_async_context(serve(upstream)) + "/v1"
        data = _merge(
            {
                "upstream": {"url": upstream_url, "api_key_env": "TEST_UPSTREAM_KEY"},
                "database": {
                    "url": database_url,
                    "spool_file": "",
                    # A test's own clock keeps fake time, far from the database's:
                    # not checked at start-up unless the test sets it (test_skew.py).
                    **({"max_clock_offset": 0} if clock is not None else {}),
                },
                "accounting": {"timezone": "UTC", "default_plan": "free"},
                "plans": {"free": {}},
            },
            settings or {},
        )
        # A table set to None is left out: {"upstream": None} for named upstreams only.
        data = {key: value for key, value in data.items() if value is not None}
        environment = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})}
        if config_file is not None:
            config_file.write_text(to_toml(data))  # noqa: ASYNC240
            config = load_config(config_file, env=environment)
        else:
            config = parse_config(data, env=environment)
        storage = await open_storage(config.database)
        stack.push_async_callback(storage.close)
        if config.database.url not in MIGRATED:
            await storage.migrate()  # before the user and key below
        await storage.ensure_user(USER, plan=config.accounting.default_plan)
        key = new_key()
        await storage.create_key(
            USER,
            key_id=key.id,
            key_hash=key.hash,
            prefix=key.prefix,
            name="test",
            now=datetime.now(UTC),
        )
        probes = Watermarks()
        app = create_app(
            config,
            storage=storage,
            transport=transport,
            clock=clock,
            env=environment,
            probes=probes,
        )
        url = await stack.enter_async_context(serve(app, lifespan="on"))
        if fake is not None:
            # Held answers and pauses must end before uvicorn can shut down.
            stack.callback(fake.release_held)
            stack.callback(fake.end_pauses)
        yield Harness(
            url=url,
            gateway=app.gateway,
            storage=storage,
            config=config,
            key=key.secret,
            key_id=key.id,
            probes=probes,
            fake=fake,
            upstream_url=upstream_url,
            app=app,
        )


def direct_request(
    key: str, body: bytes, *headers: tuple[bytes, bytes]
) -> tuple[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]]]:
    """The ASGI scope and receive of a chat request from a client that never leaves,
    for driving the app directly (so that a test can cancel the request's task)."""
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat-messages",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            *headers,
        ],
    }
    return scope, receive


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configurations (tables, strings, numbers,
    booleans, lists of these or of tables, written inline)."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            scalars.append(f"{key} = {_value(value)}")
    out = []
    if prefix and (scalars or not tables):
        out.append(f"[{prefix}]")
    out.extend(scalars)
    for key, value in tables:
        out.append(to_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return f"[{', '.join(_value(item) for item in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_value(item)}" for key, item in value.items()) + "}"
    return _quote(str(value))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
