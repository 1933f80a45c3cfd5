"""The log of every entry point (issue 25): real `gateway serve` processes (one
worker and several), the uvicorn factory path, the answer line, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import logs
from gateway.cli import main
from gateway.config import DatabaseConfig, ServerConfig
from gateway.keys import new_key
from gateway.storage import open_storage
from tests.fakes.dify import FakeDify
from tests.forkserver import PIPE, python_m
from tests.harness import UPSTREAM_KEY, USER, running_gateway, to_toml
from tests.processes import GatewayProcess
from tests.servers import accepting, free_port, serve, spawn_gateway

ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
BLOCKING = {"query": "Xin chào", "inputs": {}, "response_mode": "blocking"}
# An ISO 8601 timestamp with milliseconds and its UTC offset, then the level.
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
)
JSON_KEYS = {"time", "level", "logger", "request_id", "message"}


@dataclass
class Setup:
    url: str  # the fake Dify's API base
    config: Path
    key: str


@contextlib.asynccontextmanager
async def setup(tmp_path: Path, **server: Any) -> AsyncIterator[Setup]:
    """A fake Dify on a real socket, a SQLite database with USER and a key, and a
    configuration file for gateway processes in front of it."""
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    storage = await open_storage(DatabaseConfig(url=database_url))
    try:
        await storage.migrate()
        await storage.ensure_user(USER, plan="free")
        key = new_key()
        await storage.create_key(
            USER,
            key_id=key.id,
            key_hash=key.hash,
            prefix=key.prefix,
            name="",
            now=datetime.now(UTC),
        )
    finally:
        await storage.close()
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with serve(fake) as upstream:
        data: dict[str, Any] = {
            "server": {"log_level": "debug", "reload_interval": 0, **server},
            "upstream": {"url": upstream + "/v1", "api_key_env": "TEST_UPSTREAM_KEY"},
            "database": {"url": database_url, "spool_file": str(tmp_path / "spool.jsonl")},
            "accounting": {"timezone": "UTC", "default_plan": "free"},
            "plans": {"free": {}},
        }
        config = tmp_path / "gateway.toml"
        config.write_text(to_toml(data))
        try:
            yield Setup(upstream, config, key.secret)
        finally:
            fake.release_held()


async def answer(url: str, key: str) -> httpx.Response:
    """One blocking answer through the gateway at ``url``."""
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{url}/v1/chat-messages", json=BLOCKING, headers={"Authorization": f"Bearer {key}"}
        )
    assert response.status_code == 200, response.text
    return response


async def ask(url: str, key: str) -> str:
    """One blocking answer through the gateway at ``url``; returns its request id."""
    return (await answer(url, key)).headers["x-request-id"]


async def count_lines(process: GatewayProcess, text: str, count: int) -> None:
    """Wait until ``count`` log lines contain ``text``."""
    async with asyncio.timeout(30):
        while sum(text in line for line in process.lines) < count:
            await process.wait_for_line(text)  # ends at once if the process died
            process._new_line.clear()
            if sum(text in line for line in process.lines) < count:
                await process._new_line.wait()


async def test_serve_logs_gateway_lines_with_request_id(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        process = await GatewayProcess.start(s.config, ENV)
        try:
            answered = await answer(process.url, s.key)
            request_id = answered.headers["x-request-id"]
            line = await process.wait_for_line(f"gateway.answers [{request_id}]")
            await process.wait_for_line(f"gateway.settle [{request_id}] recorded answer")
            async with httpx.AsyncClient() as client:
                refused = await client.post(
                    f"{process.url}/v1/chat-messages",
                    json=BLOCKING,
                    headers={"Authorization": "Bearer gwk_wrong"},
                )
            assert refused.status_code == 401
            # One Date each (uvicorn's; the fake Dify's is not relayed), no Server.
            for response in (answered, refused):
                assert len(response.headers.get_list("date")) == 1
                assert "server" not in response.headers
            refusal_id = refused.headers["x-request-id"]
            await process.wait_for_line(f"gateway.proxy [{refusal_id}] refused 401 unauthorized")
        finally:
            assert await process.terminate() == 0
    assert TEXT_LINE.match(line), line
    assert f"user={USER} status=200 route=chat-messages outcome=complete" in line
    assert re.search(r" total_tokens=\d+ ", line) and re.search(r" cost=\d+\.\d+ ", line)
    assert re.search(r" upstream_ms=[\d.]+ overhead_ms=[\d.]+", line)
    # uvicorn's own lines share the format (a single handler for both).
    running = next(line for line in process.lines if "Uvicorn running on" in line)
    assert TEXT_LINE.match(running) and " uvicorn.error [-] " in running, running
    assert any(f"uvicorn.access [{request_id}]" in line for line in process.lines)


async def test_serve_json_log_with_two_workers(tmp_path: Path) -> None:
    async with setup(tmp_path, log_format="json", workers=2) as s:
        port = free_port()
        process = GatewayProcess(await spawn_gateway(s.config, port, ENV, workers=2), port)
        try:
            await count_lines(process, "Application startup complete", 2)
            # A worker listens on the socket only after its "startup complete": a
            # request sent on that line alone could be refused (a ConnectError).
            await accepting(port)
            request_id = await ask(process.url, s.key)
            await process.wait_for_line('"logger":"gateway.answers"')
        finally:
            assert await process.terminate() == 0
    entries = [json.loads(line) for line in process.lines]  # every line is one object
    assert all(entry.keys() >= JSON_KEYS for entry in entries), entries
    (answer,) = [e for e in entries if e["logger"] == "gateway.answers"]
    assert answer["request_id"] == request_id
    assert (answer["user"], answer["status"], answer["route"]) == (USER, 200, "chat-messages")
    assert answer["total_tokens"] > 0 and answer["outcome"] == "complete"
    assert isinstance(answer["cost"], str) and Decimal(answer["cost"]) > 0
    assert isinstance(answer["upstream_ms"], float) and isinstance(answer["overhead_ms"], float)
    datetime.fromisoformat(answer["time"]).utcoffset()  # with an offset
    assert datetime.fromisoformat(answer["time"]).tzinfo is not None
    # Both workers and the supervising process logged, all in JSON.
    loggers = {e["logger"] for e in entries}
    assert {"uvicorn.error", "gateway.answers", "uvicorn.access"} <= loggers


async def test_factory_path_logs_in_the_configured_format(tmp_path: Path) -> None:
    async with setup(tmp_path, log_format="json") as s:
        port = free_port()
        proc = await python_m(
            "uvicorn",
            "gateway.app:create_app",
            "--factory",
            "--port",
            str(port),
            env={**os.environ, **ENV, "GATEWAY_CONFIG": str(s.config)},
            stderr=PIPE,
        )
        process = GatewayProcess(proc, port)
        try:
            await process.wait_for_line("Uvicorn running on")
            request_id = await ask(process.url, s.key)
            await process.wait_for_line('"logger":"gateway.answers"')
        finally:
            await process.terminate()
    entries = [json.loads(line) for line in process.lines if line.startswith("{")]
    # From the factory call on, uvicorn's lines too are JSON.
    running = next(e for e in entries if "Uvicorn running on" in e["message"])
    assert running["logger"] == "uvicorn.error"
    (answer,) = [e for e in entries if e["logger"] == "gateway.answers"]
    assert (answer["request_id"], answer["user"]) == (request_id, USER)


async def test_answer_line_carries_user_tokens_and_cost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=logs.ANSWERS_LOGGER)
    async with running_gateway(f"sqlite:///{tmp_path / 'g.db'}") as h:
        request_id = await ask(h.url, h.key)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    (record,) = [r for r in caplog.records if r.name == logs.ANSWERS_LOGGER]
    fields = record.fields  # type: ignore[attr-defined]
    assert record.request_id == request_id  # type: ignore[attr-defined]
    assert fields["user"] == USER and fields["status"] == 200
    assert (fields["prompt_tokens"], fields["completion_tokens"], fields["total_tokens"]) == (
        event.prompt_tokens,
        event.completion_tokens,
        event.total_tokens,
    )
    assert fields["cost"] == str(event.cost) and Decimal(fields["cost"]) == event.cost
    assert f"cost={event.cost} " in record.getMessage()


async def test_answer_line_off_by_setting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logs.ANSWERS_LOGGER)
    async with running_gateway(
        f"sqlite:///{tmp_path / 'g.db'}", settings={"server": {"answer_log": False}}
    ) as h:
        await ask(h.url, h.key)
        await h.probes.wait_finished(1)
        assert len(await h.events()) == 1
    assert not [r for r in caplog.records if r.name == logs.ANSWERS_LOGGER]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide loggers: put them back."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    gateway_level = logging.getLogger("gateway").level
    uvicorn = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
        for name in logs.UVICORN_LOGGERS
    }
    yield
    root.handlers[:] = handlers
    logging.getLogger("gateway").setLevel(gateway_level)
    for name, (saved, propagate) in uvicorn.items():
        logging.getLogger(name).handlers[:] = saved
        logging.getLogger(name).propagate = propagate


def test_cli_commands_log_in_the_configured_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        to_toml(
            {
                "server": {"log_format": "json", "log_level": "debug"},
                "database": {"url": f"sqlite:///{tmp_path / 'g.db'}"},
            }
        )
    )
    assert main(["--config", str(config), "migrate"]) == 0
    logging.getLogger("gateway.cli").debug("a command's log line")
    err = capsys.readouterr().err.strip().splitlines()
    entry = json.loads(err[-1])
    assert (entry["logger"], entry["level"], entry["message"]) == (
        "gateway.cli",
        "DEBUG",
        "a command's log line",
    )
    # Configured once: a second command replaces the handler, never stacks one.
    assert main(["--config", str(config), "migrate"]) == 0
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_gateway", False)]
    assert len(ours) == 1


def test_text_format_names_the_request(restore_logging: None) -> None:
    handler = logs.make_handler("text")
    record = logging.LogRecord(
        "gateway.proxy", logging.WARNING, __file__, 1, "hello %s", ("x",), None
    )

    async def within_a_request() -> None:
        logs.bind_request("abc-1")
        handler.filter(record)

    asyncio.run(within_a_request())
    line = handler.format(record)
    assert TEXT_LINE.match(line) and line.endswith(" WARNING gateway.proxy [abc-1] hello x")
    outside = logging.LogRecord("gateway", logging.INFO, __file__, 1, "idle", (), None)
    handler.filter(outside)
    assert handler.format(outside).endswith(" INFO gateway [-] idle")
    assert ServerConfig().log_format == "text" and ServerConfig().answer_log
