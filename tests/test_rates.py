"""Rates (issue 21): requests_per_minute and tokens_per_minute over a sliding
minute - no burst at a window's edge, a 429 whose Retry-After is when the
request fits, exact across processes sharing the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from gateway.clock import FixedClock
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, running_gateway
from tests.test_admission import CHAT, ask, plans, two_gateways

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = pytest.mark.warm_connections

# On a bucket's start (buckets of a minute's rate are 5 s long).
T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as c:
        yield c


async def test_requests_per_minute_refuses_until_the_request_fits(
    database_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(T0)
    async with running_gateway(
        database_url, settings=plans(requests_per_minute=3), clock=clock
    ) as h:
        admitted = [(await ask(client, h)).status_code for _ in range(3)]
        clock.advance(timedelta(seconds=30))
        refused = await ask(client, h)
        # The three requests of 12:00:00 leave the counted span at 12:01:05: the
        # minute plus, at most, one 5-second bucket (docs/quotas.md, "Rates").
        clock.advance(timedelta(seconds=34))
        still = await ask(client, h)
        clock.advance(timedelta(seconds=1))
        fits = await ask(client, h)
        await h.probes.wait_finished(4)
    assert admitted == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.json() == {
        "code": "request_rate_limit",
        "message": "You have reached your plan's limit of 3 requests a minute. "
        "Try again in 35 seconds.",
        "status": 429,
    }
    assert refused.headers["retry-after"] == "35"
    assert refused.headers["x-ratelimit-resource"] == "requests_per_minute"
    assert refused.headers["x-ratelimit-limit"] == "3"
    assert refused.headers["x-ratelimit-used"] == "3"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-reset"] == str(
        int((T0 + timedelta(seconds=65)).timestamp())
    )
    assert still.status_code == 429 and still.headers["retry-after"] == "1"
    assert fits.status_code == 200


async def test_no_burst_at_a_window_edge(database_url: str, client: httpx.AsyncClient) -> None:
    """A fixed minute would take 3 requests at 12:00:59 and 3 more at 12:01:00:
    six in two seconds. The sliding minute takes none more until the first three
    are a minute old."""
    clock = FixedClock(T0 + timedelta(seconds=59))
    async with running_gateway(
        database_url, settings=plans(requests_per_minute=3), clock=clock
    ) as h:
        burst = [(await ask(client, h)).status_code for _ in range(3)]
        statuses = []
        for _ in range(60):  # one request a second for the next minute
            clock.advance(timedelta(seconds=1))
            statuses.append((await ask(client, h)).status_code)
        clock.advance(timedelta(seconds=6))
        later = await ask(client, h)
    assert burst == [200, 200, 200]
    assert statuses == [429] * 60
    assert later.status_code == 200


async def test_tokens_per_minute_refuses_after_the_answer_that_crossed_it(
    database_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(T0)
    async with running_gateway(
        database_url, settings=plans(tokens_per_minute=1000), clock=clock
    ) as h:
        crossing = await ask(client, h)
        await h.probes.wait_finished(1)
        refused = await ask(client, h)
        clock.advance(timedelta(seconds=int(refused.headers["retry-after"])))
        fits = await ask(client, h)
    assert crossing.status_code == 200
    assert refused.status_code == 429 and refused.json()["code"] == "token_rate_limit"
    assert refused.headers["x-ratelimit-used"] == "1168"
    assert refused.headers["retry-after"] == "65"
    assert fits.status_code == 200


async def test_a_refunded_request_leaves_the_rate(
    database_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(T0)
    async with running_gateway(
        database_url, settings=plans(requests_per_minute=1), clock=clock
    ) as h:
        failed = await ask(client, h, **{"x-fake-status": "500"})
        await h.probes.wait_finished(1)
        ok = await ask(client, h)
        refused = await ask(client, h)
    assert failed.status_code == 500 and ok.status_code == 200
    assert refused.status_code == 429


async def test_a_user_override_replaces_the_plans_rate(
    database_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(T0)
    async with running_gateway(
        database_url, settings=plans(requests_per_minute=1), clock=clock
    ) as h:
        await h.storage.set_override(USER, "requests_per_minute", 2)
        results = [await ask(client, h) for _ in range(3)]
    assert [r.status_code for r in results] == [200, 200, 429]
    assert results[2].json()["message"].startswith("You have reached your limit of 2 requests")


@pytest.mark.postgres
async def test_forty_parallel_requests_across_two_processes_keep_the_rate(
    postgres_dsn: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with two_gateways(postgres_dsn, tmp_path, fake, {"requests_per_minute": 5}) as (
        ports,
        key,
        _,
    ):
        responses = await asyncio.gather(
            *(
                client.post(
                    f"http://127.0.0.1:{ports[i % 2]}/v1/chat-messages",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {key}"},
                )
                for i in range(40)
            )
        )
    assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 35
    assert fake.hits("/chat-messages") == 5
    refused = [r for r in responses if r.status_code == 429]
    assert {r.json()["code"] for r in refused} == {"request_rate_limit"}
    assert all(1 <= int(r.headers["retry-after"]) <= 65 for r in refused)


# --- the general form ----------------------------------------------------------------------


def test_general_limits_are_read_and_checked() -> None:
    from gateway.config import PlanLimit, parse_config, render_config
    from gateway.errors import ConfigError

    def plan(*limits: dict[str, object]) -> dict[str, object]:
        return {"plans": {"free": {"limits": list(limits)}}}

    config = parse_config(
        plan(
            {"meter": "input_tokens", "per": "day", "max": 5000},
            {"meter": "cost", "per": "month", "max": "2.50", "name": "spend"},
            {"meter": "queries", "per": "hour", "max": 30},
            {"meter": "cost", "per": "day", "max": "1", "models": ["gpt-4.1*"]},
        ),
        env={},
    )
    limits = config.plan("free").limits
    assert [(x.label, x.meter, x.per, x.max) for x in limits] == [
        ("input_tokens_per_day", "input_tokens", "day", 5000),
        ("spend", "cost", "month", Decimal("2.50")),
        ("queries_per_hour", "queries", "hour", 30),
        ("cost_per_day[gpt-4.1*]", "cost", "day", 1),
    ]
    assert limits[3].models == ("gpt-4.1*",)
    assert isinstance(limits[0], PlanLimit)
    assert "[[plans.free.limits]]" in render_config(config)
    refused = [
        ({"meter": "cost", "per": "minute", "max": 1}, "limits[0].per: a per-minute rate"),
        ({"meter": "queries", "per": "day"}, "limits[0].max: required"),
        ({"meter": "queries", "per": "minute", "max": 1, "models": ["gpt-4*"]}, "limits[0].models"),
        ({"meter": "web_searches", "per": "day", "max": 1, "models": ["x"]}, "limits[0].models"),
        ({"meter": "lines", "per": "day", "max": 1}, "limits[0].meter"),
    ]
    for entry, error in refused:
        with pytest.raises(ConfigError) as info:
            parse_config(plan(entry), env={})
        assert error in info.value.message
    # Two entries under one label: refusals, /v1/usage and limits.<name>
    # overrides could not tell them apart.
    twins = [
        ({"meter": "queries", "per": "hour", "max": 30}, {"meter": "queries", "per": "hour", "max": 9}),
        ({"meter": "cost", "per": "day", "max": "1", "name": "spend"},
         {"meter": "tokens", "per": "month", "max": 5, "name": "spend"}),
        ({"meter": "queries", "per": "hour", "max": 30, "name": "tokens_per_month"},
         {"meter": "tokens", "per": "month", "max": 5}),
    ]  # fmt: skip
    for first, second in twins:
        with pytest.raises(ConfigError) as info:
            parse_config(plan(first, second), env={})
        assert "limits[1].name: another entry of plans.free.limits is already called" in (
            info.value.message
        )
    # Distinct labels for one meter and window stay allowed.
    parse_config(
        plan(
            {"meter": "queries", "per": "hour", "max": 30},
            {"meter": "queries", "per": "hour", "max": 9, "name": "burst"},
        ),
        env={},
    )


async def test_a_general_limit_refuses_with_its_own_name(
    database_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(T0)
    settings = {
        "plans": {
            "free": {
                "limits": [
                    {"meter": "queries", "per": "hour", "max": 2},
                    {"meter": "input_tokens", "per": "day", "max": 100000},
                ]
            }
        }
    }
    async with running_gateway(database_url, settings=settings, clock=clock) as h:
        admitted = [(await ask(client, h)).status_code for _ in range(2)]
        clock.advance(timedelta(minutes=30))
        refused = await ask(client, h)
        # The two requests of 12:00 leave the hour's counted span at 13:05.
        clock.advance(timedelta(minutes=35))
        fits = await ask(client, h)
    assert admitted == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["code"] == "plan_limit"
    assert refused.json()["message"].startswith(
        "You have reached your plan's limit of 2 queries per hour."
    )
    assert refused.headers["x-ratelimit-resource"] == "queries_per_hour"
    assert refused.headers["retry-after"] == str(35 * 60)
    assert fits.status_code == 200


async def test_an_input_token_limit_counts_prompt_tokens_only(
    database_url: str, client: httpx.AsyncClient
) -> None:
    settings = {"plans": {"free": {"limits": [{"meter": "input_tokens", "per": "day", "max": 30}]}}}
    async with running_gateway(database_url, settings=settings) as h:
        first = await ask(client, h)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        second = await ask(client, h)
    assert first.status_code == 200
    assert event.prompt_tokens >= 30 and event.completion_tokens > 0
    assert second.status_code == 429 and second.json()["code"] == "plan_limit"
    assert second.headers["x-ratelimit-used"] == str(event.prompt_tokens)


async def test_the_headers_describe_the_limit_nearest_to_exhaustion(
    database_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(T0)
    settings = plans(queries_per_day=100, tokens_per_day=1500, requests_per_minute=200)
    async with running_gateway(database_url, settings=settings, clock=clock) as h:
        first = await ask(client, h)
        await h.probes.wait_finished(1)
        second = await ask(client, h)  # 1168 of 1500 tokens used: 22% left
    # Before any answer, every limit has all but this request left; the queries
    # of the day (99 of 100 left) are nearer than the minute's (199 of 200).
    assert first.headers["x-ratelimit-resource"] == "queries_per_day"
    assert second.headers["x-ratelimit-resource"] == "tokens_per_day"
    assert second.headers["x-ratelimit-remaining"] == "332"
    assert second.headers["x-ratelimit-used"] == "1168"


async def test_an_override_replaces_or_drops_a_general_limit(
    database_url: str, client: httpx.AsyncClient
) -> None:
    """Per-user (and per-team) overrides reach [[plans.NAME.limits]] entries by
    ``limits.<name>``: a new maximum, or null to drop the entry for the user."""
    clock = FixedClock(T0)
    settings = {"plans": {"free": {"limits": [{"meter": "queries", "per": "hour", "max": 5}]}}}
    async with running_gateway(database_url, settings=settings, clock=clock) as h:
        await h.gateway.accounts.set_override(USER, "limits.queries_per_hour", 2)
        lowered = [await ask(client, h) for _ in range(3)]
        await h.gateway.accounts.set_override(USER, "limits.queries_per_hour", None)
        dropped = [(await ask(client, h)).status_code for _ in range(5)]
        await h.gateway.accounts.clear_override(USER, "limits.queries_per_hour")
        plans_again = [await ask(client, h) for _ in range(4)]
        user = await h.storage.get_user(USER)
    assert [r.status_code for r in lowered] == [200, 200, 429]
    assert lowered[2].headers["x-ratelimit-resource"] == "queries_per_hour"
    assert lowered[2].headers["x-ratelimit-limit"] == "2"
    assert dropped == [200] * 5
    # The plan's 5 again, over what was counted while the entry applied (the
    # five asked without it were not counted in it).
    assert [r.status_code for r in plans_again] == [200, 200, 200, 429]
    assert plans_again[3].headers["x-ratelimit-limit"] == "5"
    assert user is not None and "limits.queries_per_hour" not in user.overrides


def test_general_limit_overrides_are_validated() -> None:
    from gateway.accounts import parse_override, parse_override_text
    from gateway.config import parse_config
    from gateway.errors import BadRequest

    assert parse_override("limits.cost_per_day[gpt-4.1*]", "2.50") == "2.50"
    assert parse_override_text("limits.queries_per_hour", "7") == "7"
    assert parse_override_text("limits.queries_per_hour", "unlimited") is None
    for name, value in [
        ("limits.queries_per_hour", -1),
        ("limits.queries_per_hour", "many"),
        ("limits.", 3),
        ("queries_per_hour", 3),
    ]:
        with pytest.raises(BadRequest):
            parse_override(name, value)
    plan = parse_config(
        {"plans": {"free": {"limits": [{"meter": "cost", "per": "day", "max": "9"}]}}}, env={}
    ).plan("free")
    assert plan.with_overrides({"limits.cost_per_day": "2.5"}).limits[0].max == Decimal("2.5")
    assert plan.with_overrides({"limits.cost_per_day": None}).limits == ()
    assert plan.with_overrides({"limits.other": "1"}) == plan  # names no entry: ignored
