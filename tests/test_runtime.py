"""The lifecycle and the wiring: what exists before start, the started state as
one object, and the configuration snapshot a reload swaps whole."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.runtime import Gateway
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
