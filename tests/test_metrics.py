"""/metrics as Prometheus reads it: parsed with prometheus_client's own parser."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.clock import FixedClock
from gateway.config import DatabaseConfig
from gateway.keys import new_key
from gateway.metrics import COUNTERS, GAUGES, HISTOGRAMS, Metrics
from gateway.storage import open_storage
from tests.fakes.dify import FakeDify
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway, to_toml
from tests.servers import free_port, serve, start_gateway
from tests.upstreams.test_openai_sdk import MINI_COST, STEER, openai_settings

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming"}
SOURCE = Path(__file__).parent.parent / "gateway"
METRICS_TOKEN = "metrics-token-for-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
# The default metrics.token_env: a scraper's bearer token.
METRICS_ENV = {"GATEWAY_METRICS_TOKEN": METRICS_TOKEN}
SCRAPER = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


def test_every_name_the_code_counts_is_declared() -> None:
    counted = set()
    observed = set()
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        counted |= set(re.findall(r'\.inc\(\s*"(gateway_\w+)"', text))
        observed |= set(re.findall(r'observe\(\s*"(gateway_\w+)"', text))
    assert counted and observed
    assert counted <= set(COUNTERS)
    assert observed <= set(HISTOGRAMS)


def test_every_declared_metric_is_exported_before_it_is_counted() -> None:
    families = {f.name for f in text_string_to_metric_families(Metrics().render().decode())}
    # The parser names a counter family without its _total suffix.
    assert {name.removesuffix("_total") for name in COUNTERS} <= families
    assert set(HISTOGRAMS) | set(GAUGES) <= families


def test_an_undeclared_name_is_an_error_not_a_silent_counter() -> None:
    with pytest.raises(KeyError):
        Metrics().inc("gateway_never_declared_total")


def test_counts_summed_in_one_process_read_back_as_prometheus_counts_them() -> None:
    """In one process the hot path's counts wait in plain sums until /metrics is
    read; what is read is what counting each value into prometheus_client at
    once gives (as under several workers, where every value is written through)."""
    values = [0.0005, 0.0004, 0.0011, 2.0, 1.0, 0.0, 1e9, float("inf"), -1.0, float("nan")]

    def count(metrics: Metrics) -> None:
        for at, seconds in enumerate(values):
            metrics.observe("gateway_overhead_seconds", seconds, route="chat")
            metrics.observe("gateway_admission_seconds", seconds)
            metrics.inc("gateway_requests_total", route="chat", status="2xx")
            metrics.inc("gateway_tokens_total", at, plan="p", model="m", kind="prompt")
            metrics.inc("gateway_client_disconnects_total")
            with metrics.streaming(True):
                metrics.inc("gateway_cost_total", 0.1, plan="p", model="m", currency="USD")
        metrics.streaming(True).__enter__()  # one answer still streaming

    summed = Metrics()
    count(summed)
    assert summed.get("gateway_requests_total", route="chat", status="2xx") == len(values)
    count(summed)  # more after a read: added to what was handed over
    deferred = samples(summed.render().decode())
    at_once = Metrics()
    at_once._deferred = False  # what the multiprocess mode does
    count(at_once)
    count(at_once)
    now = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in samples(at_once.render().decode())
    }
    for s in deferred:
        if s.name.endswith("_created"):
            continue  # when each metric was made
        key = (s.name, tuple(sorted(s.labels.items())))
        if s.name.endswith("_sum") and s.name.startswith(
            ("gateway_overhead_seconds", "gateway_admission_seconds")
        ):
            assert s.value != s.value and now[key] != now[key]  # NaN was observed
        else:
            # Counts exactly; sums of floats up to their order of addition.
            assert s.value == pytest.approx(now[key], rel=1e-12), key
    assert value(summed.render().decode(), "gateway_streams_in_flight") == 2


def test_a_label_missing_or_not_declared_is_an_error_at_once() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError):
        metrics.inc("gateway_requests_total")
    with pytest.raises(ValueError):
        metrics.inc("gateway_requests_total", route="chat", colour="red")
    with pytest.raises(ValueError):
        metrics.observe("gateway_overhead_seconds", 0.1)
    with pytest.raises(ValueError):
        metrics.inc("gateway_requests_total", -1, route="chat", status="2xx")


async def test_a_streamed_answer_is_measured(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with (
        running_gateway(sqlite_url, fake=fake, env=METRICS_ENV) as h,
        httpx.AsyncClient() as client,
    ):
        async with client.stream(
            "POST",
            f"{h.url}/v1/chat-messages",
            json=CHAT,
            headers=h.auth(**{"x-fake-scenario": "hold"}),
        ) as held:
            chunks = held.aiter_raw()
            await anext(chunks)  # the answer is being relayed
            during = (await client.get(f"{h.url}/metrics", headers=SCRAPER)).text
            fake.release_held()
            async for _ in chunks:
                pass
        await h.probes.wait_finished(1)
        response = await client.get(f"{h.url}/metrics", headers=SCRAPER)
    after = response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert value(during, "gateway_streams_in_flight") == 1
    assert value(after, "gateway_streams_in_flight") == 0
    assert value(after, "gateway_answers_settled_total", outcome="complete") == 1
    # Dify's chat answers name no model: the label is empty.
    labels = {"plan": "free", "model": ""}
    assert value(after, "gateway_tokens_total", kind="prompt", **labels) == 1033
    assert value(after, "gateway_tokens_total", kind="completion", **labels) == 135
    assert value(after, "gateway_cost_total", currency="USD", **labels) == pytest.approx(0.001303)
    for name, labelled in (
        ("gateway_time_to_first_byte_seconds", True),
        ("gateway_overhead_seconds", True),
        ("gateway_upstream_seconds", True),
        ("gateway_admission_seconds", False),
        ("gateway_settle_seconds", False),
    ):
        route = {"route": "chat"} if labelled else {}
        assert value(after, f"{name}_count", **route) == 1, name
        assert value(after, f"{name}_bucket", le="+Inf", **route) == 1, name
    upstream = value(after, "gateway_upstream_seconds_sum", route="chat")
    first_byte = value(after, "gateway_time_to_first_byte_seconds_sum", route="chat")
    assert upstream is not None and first_byte is not None and first_byte > 0
    assert value(after, "gateway_requests_total", route="chat", status="2xx") == 1


@pytest.fixture
async def fake_url() -> AsyncIterator[str]:
    async with serve(FakeDify(api_key=UPSTREAM_KEY)) as url:
        yield url + "/v1"


async def test_serve_with_workers_sums_every_worker(tmp_path: Path, fake_url: str) -> None:
    """Under ``--workers 2`` any worker answers /metrics with the sum of both."""
    database = f"sqlite:///{tmp_path / 'gateway.db'}"
    storage = await open_storage(DatabaseConfig(url=database))
    await storage.migrate()
    await storage.ensure_user(USER, plan="free")
    key = new_key()
    await storage.create_key(
        USER, key_id=key.id, key_hash=key.hash, prefix=key.prefix, name="", now=datetime.now(UTC)
    )
    await storage.close()
    config = tmp_path / "gateway.toml"
    config.write_text(
        to_toml(
            {
                "upstream": {"url": fake_url, "api_key_env": "TEST_UPSTREAM_KEY"},
                "database": {"url": database, "spool_file": ""},
                "accounting": {"timezone": "UTC", "default_plan": "free"},
                "plans": {"free": {}},
            }
        )
    )
    port = free_port()
    env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, **METRICS_ENV}
    process = await start_gateway(config, port, env, workers=2)
    try:
        url = f"http://127.0.0.1:{port}"
        asked = 8
        for _ in range(asked):
            # A new connection each: the kernel spreads them over the workers.
            async with httpx.AsyncClient() as client:
                response = await client.post(
                    f"{url}/v1/chat-messages",
                    json={**CHAT, "response_mode": "blocking"},
                    headers={"Authorization": f"Bearer {key.secret}"},
                )
                assert response.status_code == 200
        for _ in range(6):
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"{url}/metrics", headers=SCRAPER)).text
                # Every worker asks for the token (each reads the same configuration).
                assert (await client.get(f"{url}/metrics")).status_code == 401
            assert value(text, "gateway_requests_total", route="chat", status="2xx") == asked
            assert value(text, "gateway_admission_seconds_count") == asked
    finally:
        process.terminate()
        await process.wait()


async def test_tokens_and_cost_are_counted_by_the_model_that_answered(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        sqlite_url, upstream=fake, settings=openai_settings(), env=METRICS_ENV
    ) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            response = await client.post("/v1/chat/completions", json=body, headers=h.auth(**STEER))
            assert response.status_code == 200
            await h.probes.wait_finished(1)
            text = (await client.get("/metrics", headers=SCRAPER)).text
    labels = {"plan": "free", "model": "gpt-4o-mini"}
    assert value(text, "gateway_tokens_total", kind="prompt", **labels) == 1200
    assert value(text, "gateway_tokens_total", kind="completion", **labels) == 700
    cost = value(text, "gateway_cost_total", currency="USD", **labels)
    assert cost == pytest.approx(float(MINI_COST))


@pytest.mark.parametrize(
    ("asked", "answered", "label"),
    [
        # A snapshot is labelled with the configured name that prices it.
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        # Any other name a client (or a compatible server) chooses is one label.
        ("made-up-1", None, "other"),
        ("gpt-4o-mini", "x" * 300, "other"),
        ("gpt-4o-mini\x00", None, "other"),
    ],
    ids=["snapshot", "unpriced", "long", "nul"],
)
async def test_the_model_label_is_a_priced_name_or_other(
    sqlite_url: str, asked: str, answered: str | None, label: str
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    steer = {**STEER, **({"x-fake-model": answered} if answered else {})}
    # Unpriced models let through, to see how they are labelled.
    settings = openai_settings(pricing={"unpriced_models": "allow"})
    async with running_gateway(sqlite_url, upstream=fake, settings=settings, env=METRICS_ENV) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            body = {"model": asked, "messages": [{"role": "user", "content": "hi"}]}
            response = await client.post("/v1/chat/completions", json=body, headers=h.auth(**steer))
            assert response.status_code == 200
            await h.probes.wait_finished(1)
            text = (await client.get("/metrics", headers=SCRAPER)).text
    models = {s.labels["model"] for s in samples(text) if s.name.startswith("gateway_tokens_total")}
    assert models == {label}
    assert value(text, "gateway_tokens_total", kind="prompt", plan="free", model=label) == 1200


async def test_the_model_labels_follow_a_reload_of_the_prices(
    sqlite_url: str, tmp_path: Path
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    path = tmp_path / "gateway.toml"
    body = {"model": "o9", "messages": [{"role": "user", "content": "hi"}]}
    settings = openai_settings(pricing={"unpriced_models": "allow"})  # o9, unpriced at first
    async with running_gateway(
        sqlite_url, upstream=fake, settings=settings, config_file=path, env=METRICS_ENV
    ) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            await client.post("/v1/chat/completions", json=body, headers=h.auth(**STEER))
            await h.probes.wait_finished(1)
            path.write_text(path.read_text() + '\n[prices."o9"]\ninput = "1"\noutput = "1"\n')
            assert await h.gateway.reload()
            await client.post("/v1/chat/completions", json=body, headers=h.auth(**STEER))
            await h.probes.wait_finished(2)
            text = (await client.get("/metrics", headers=SCRAPER)).text
    labels = {"plan": "free", "kind": "prompt"}
    assert value(text, "gateway_tokens_total", model="other", **labels) == 1200
    assert value(text, "gateway_tokens_total", model="o9", **labels) == 1200


# --- access -----------------------------------------------------------------------------


async def scrape(h: Harness, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=h.url) as client:
        return await client.get("/metrics", headers=headers)


async def test_metrics_are_off_without_any_token(sqlite_url: str) -> None:
    """The attack: anyone who reaches the gateway reads what every plan and model
    cost. With no token configured (and no explicit opt-out), there is nothing to read."""
    async with running_gateway(sqlite_url) as h:
        response = await scrape(h)
        assert response.status_code == 404
        assert b"gateway_cost_total" not in response.content
        assert response.json()["code"] == "not_found"
        assert "metrics.public" in response.json()["message"]
        assert (await scrape(h, "anything")).status_code == 404


@pytest.mark.parametrize(
    ("env", "token", "status"),
    [
        pytest.param(METRICS_ENV, None, 401, id="metrics-token-none-sent"),
        pytest.param(METRICS_ENV, "wrong", 401, id="metrics-token-wrong"),
        pytest.param(METRICS_ENV, METRICS_TOKEN, 200, id="metrics-token"),
        pytest.param(METRICS_ENV, ADMIN_TOKEN, 401, id="admin-token-not-configured"),
        pytest.param({"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}, None, 401, id="admin-only-none-sent"),
        pytest.param({"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}, ADMIN_TOKEN, 200, id="admin-token"),
        pytest.param(
            {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, **METRICS_ENV}, ADMIN_TOKEN, 200, id="both-admin"
        ),
        pytest.param(
            {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, **METRICS_ENV}, METRICS_TOKEN, 200, id="both"
        ),
        pytest.param(
            {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, **METRICS_ENV}, "", 401, id="both-none-sent"
        ),
    ],
)
async def test_metrics_need_the_metrics_or_the_admin_token(
    sqlite_url: str, env: dict[str, str], token: str | None, status: int
) -> None:
    async with running_gateway(sqlite_url, env=env) as h:
        response = await scrape(h, token)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="metrics"'
        assert response.json()["code"] == "unauthorized"
        assert b"gateway_cost_total" not in response.content
        for secret in (METRICS_TOKEN, ADMIN_TOKEN):
            assert secret not in response.text
    else:
        assert "gateway_cost_total" in response.text


async def test_metrics_public_is_an_explicit_opt_out(sqlite_url: str) -> None:
    settings = {"metrics": {"public": True}}
    env = {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, **METRICS_ENV}
    async with running_gateway(sqlite_url, settings=settings, env=env) as h:
        response = await scrape(h)
        assert response.status_code == 200 and "gateway_cost_total" in response.text
        assert (await scrape(h, "wrong")).status_code == 200  # no token is looked at


async def test_metrics_token_guesses_are_throttled_like_the_admin_tokens(sqlite_url: str) -> None:
    """/metrics takes the admin token: guessing there counts as guessing it."""
    clock = FixedClock(datetime(2026, 12, 6, 12, tzinfo=UTC))
    settings = {"admin": {"max_failures": 2, "failure_window": 30}}
    env = {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, **METRICS_ENV}
    async with running_gateway(sqlite_url, settings=settings, env=env, clock=clock) as h:
        assert [(await scrape(h, f"guess-{i}")).status_code for i in range(2)] == [401, 401]
        throttled = await scrape(h, METRICS_TOKEN)
        assert throttled.status_code == 429 and throttled.headers["retry-after"] == "30"
        assert throttled.json()["code"] == "too_many_attempts"
        async with httpx.AsyncClient(
            base_url=h.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as client:
            assert (await client.get("/admin/users")).status_code == 429  # the same count
        clock.advance(timedelta(seconds=30))
        assert (await scrape(h, METRICS_TOKEN)).status_code == 200
