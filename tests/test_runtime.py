"""The lifecycle and the wiring: what exists before start, the started state as
one object, and the configuration snapshot a reload swaps whole."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import tls
from gateway.config import parse_config
from gateway.runtime import Gateway, make_client
from tests.harness import running_gateway


def test_before_start_only_the_configuration_exists() -> None:
    config = parse_config({"plans": {"free": {}}})
    gateway = Gateway(config)
    assert gateway.config is config
    with pytest.raises(RuntimeError, match="not started"):
        gateway.running  # noqa: B018
    with pytest.raises(RuntimeError, match="not started"):
        gateway.storage  # noqa: B018


async def test_the_started_parts_share_one_snapshot_swapped_whole(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = tmp_path / "gateway.toml"
    async with running_gateway(sqlite_url, config_file=path) as h:
        running = h.gateway.running
        before = running.current.snapshot
        assert running.services.current is running.current
        with pytest.raises(dataclasses.FrozenInstanceError):
            before.config = before.config  # type: ignore[misc]

        path.write_text(path.read_text() + "\n[plans.gold]\nqueries_per_day = 5\n")
        assert await h.gateway.reload()
        after = running.current.snapshot
        assert after is not before and "gold" in after.config.plans
        assert "gold" not in before.config.plans  # the old version is whole, unchanged
        assert after.upstream is not before.upstream  # a dialect per version

        path.write_text("[plans.free]\nqueries_per_day = -1\n")
        assert not await h.gateway.reload()
        assert running.current.snapshot is after  # a refused reload swaps nothing


async def test_the_upstreams_clients_load_the_ca_bundle_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each httpx client loaded the whole CA bundle, about 40 ms of CPU on the event
    loop, at a start for every upstream (and again for the alerts' webhooks); the
    clients now share one context per CA source, whichever transport they use."""
    loads: list[object] = []
    load = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args or kwargs)
        load(self, *args, **kwargs)

    # As a process outside the suite makes them (tests/conftest.py shares httpx's).
    for module in (httpx, httpx._transports.default):
        monkeypatch.setattr(module, "create_ssl_context", httpx._config.create_ssl_context)
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    monkeypatch.setattr(tls, "_contexts", {})
    config = parse_config(
        {
            "upstreams": {
                name: {
                    "url": f"https://{name}.example/v1",
                    "kind": "openai",
                    "api_key_env": "K",
                    "transport": t,
                }
                for name, t in (("a", "aiohttp"), ("b", "aiohttp"), ("c", "httpx"))
            },
            "plans": {"free": {}},
        },
        env={},
    )
    clients = [make_client(up) for up in config.upstreams.values()]
    try:
        assert len(loads) == 1
        contexts = {id(c._transport.ssl_context) for c in clients[:2]}  # type: ignore[attr-defined]
        assert contexts == {id(tls.client_context())}
    finally:
        for client in clients:
            await client.aclose()
