"""gateway_spool_bytes: what waits in the spool file, as an operator's alert reads it
(deploy/prometheus/alerts.yml, GatewaySpoolNotEmpty)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import MULTIPROC_ENV, Metrics
from gateway.settle import Settler
from gateway.storage import Storage
from tests.harness import running_gateway
from tests.test_settle import EVENT, Flaky

SCRAPER_TOKEN = "metrics-token-for-tests-0123456789"


def spool_bytes(text: str) -> float:
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_spool_bytes"
    ]
    assert len(found) == 1, found
    return found[0]


async def test_the_spool_size_follows_the_file_from_spooled_to_replayed(
    storage: Storage, tmp_path: Path
) -> None:
    await storage.ensure_user(EVENT.user_id, plan="free")
    spool = tmp_path / "spool.jsonl"
    metrics = Metrics()
    assert spool_bytes(metrics.render().decode()) == 0  # exported before anything spools
    down = Settler(Flaky(storage, failures=100), metrics=metrics, spool=spool, retry_delays=(0,))  # type: ignore[arg-type]
    await down.record(EVENT)
    await down.close()
    assert spool.stat().st_size > 0
    assert spool_bytes(metrics.render().decode()) == spool.stat().st_size

    # A replay under way still waits: its claimed file counts.
    claimed = spool.with_name(f"{spool.name}.1.2.replaying")
    spool.rename(claimed)
    assert spool_bytes(metrics.render().decode()) == claimed.stat().st_size
    claimed.rename(spool)

    healthy = Settler(storage, metrics=metrics, spool=spool)
    assert await healthy.replay() == 1
    assert spool_bytes(metrics.render().decode()) == 0


async def test_the_spool_size_is_read_from_disk_under_several_workers(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers (and replicas) share one file: its size is not summed over them."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "multiproc"))
    (tmp_path / "multiproc").mkdir()
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(b"x" * 100)
    first, second = Metrics(), Metrics()
    Settler(storage, metrics=first, spool=spool)
    Settler(storage, metrics=second, spool=spool)
    assert spool_bytes(first.render().decode()) == 100
    assert spool_bytes(second.render().decode()) == 100


async def test_the_spool_size_is_on_metrics(sqlite_url: str, tmp_path: Path) -> None:
    """Through the gateway: a line the start-up replay cannot read stays in the
    spool, and /metrics says how much waits there."""
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(b"not a usage record\n")
    settings = {"database": {"spool_file": str(spool)}}
    env = {"GATEWAY_METRICS_TOKEN": SCRAPER_TOKEN}
    async with running_gateway(sqlite_url, settings=settings, env=env) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            response = await client.get(
                "/metrics", headers={"Authorization": f"Bearer {SCRAPER_TOKEN}"}
            )
        assert response.status_code == 200
        assert spool_bytes(response.text) == spool.stat().st_size > 0
