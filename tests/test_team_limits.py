"""Team limits (issue 21): a member's request must fit both their own plan's
limits and their team's plan's, counted over the whole team, in the same atomic
admission step - exact across processes sharing the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from gateway.clock import FixedClock
from gateway.keys import new_key
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, running_gateway
from tests.test_admission import CHAT, ask, two_gateways

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = pytest.mark.warm_connections

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def settings(**team_plan: object) -> dict[str, object]:
    return {"plans": {"free": {"queries_per_day": 10}, "team": team_plan}}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as c:
        yield c


async def test_members_share_their_teams_limit(
    database_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(
        database_url, settings=settings(queries_per_day=3), clock=FixedClock(T0)
    ) as h:
        bob = await h.add_user("bob")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_team("bob", "acme")
        alice = [await ask(client, h) for _ in range(2)]
        bobs = [await ask(client, h, Authorization=f"Bearer {bob}") for _ in range(2)]
        # Out of the team, bob has his own plan's 10 again.
        await h.gateway.accounts.set_team("bob", None)
        alone = await ask(client, h, Authorization=f"Bearer {bob}")
    assert [r.status_code for r in alice] == [200, 200]
    assert [r.status_code for r in bobs] == [200, 429]
    refused = bobs[1]
    assert refused.json()["code"] == "team_limit"
    assert refused.json()["message"] == (
        "Your team has reached its limit of 3 queries per day. It frees up at 2026-11-22 00:00 UTC."
    )
    assert refused.headers["x-ratelimit-resource"] == "team_queries_per_day"
    assert refused.headers["x-ratelimit-used"] == "3"
    assert alone.status_code == 200


async def test_a_member_is_held_by_their_own_limit_too(
    database_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(database_url, settings=settings(queries_per_day=100)) as h:
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_override(USER, "queries_per_day", 1)
        results = [await ask(client, h) for _ in range(2)]
    assert [r.status_code for r in results] == [200, 429]
    assert results[1].json()["code"] == "daily_query_limit"


@pytest.mark.postgres
@pytest.mark.parametrize("team_limit", ["queries_per_day", "requests_per_minute"])
async def test_forty_parallel_requests_of_two_members_across_two_processes(
    postgres_dsn: str, tmp_path: Path, client: httpx.AsyncClient, team_limit: str
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with two_gateways(
        postgres_dsn,
        tmp_path,
        fake,
        {"queries_per_day": 100},
        settings={"plans": {"free": {"queries_per_day": 100}, "team": {team_limit: 5}}},
    ) as (ports, key, storage):
        await storage.ensure_user("bob", plan="free")
        bob = new_key()
        await storage.create_key(
            "bob", key_id=bob.id, key_hash=bob.hash, prefix=bob.prefix, name="", now=T0
        )
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute("DELETE FROM teams WHERE id = 'race'")  # of an earlier run
        finally:
            await conn.close()
        await storage.create_team("race", plan="team", now=T0)
        await storage.set_team(USER, "race")
        await storage.set_team("bob", "race")
        responses = await asyncio.gather(
            *(
                client.post(
                    f"http://127.0.0.1:{ports[i % 2]}/v1/chat-messages",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {key if i % 4 < 2 else bob.secret}"},
                )
                for i in range(40)
            )
        )
    assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 35
    assert fake.hits("/chat-messages") == 5
    assert {r.json()["code"] for r in responses if r.status_code == 429} == {"team_limit"}
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SELECT sum(queries) FROM usage_daily") == 5
    finally:
        await conn.close()


async def test_usage_lists_the_team_limits_too(
    database_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(
        database_url,
        settings=settings(queries_per_day=3, cost_per_day="1.00", requests_per_minute=5),
        clock=FixedClock(T0),
    ) as h:
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await ask(client, h)
        await h.probes.wait_finished(1)
        usage = (await client.get(f"{h.url}/v1/usage", headers=h.auth())).json()
        alone = await h.add_user("solo")
        solo = (
            await client.get(f"{h.url}/v1/usage", headers={"Authorization": f"Bearer {alone}"})
        ).json()
    team = usage["team_limits"]
    assert team["queries_per_day"] == {
        "limit": 3,
        "used": 1,
        "remaining": 2,
        "resets_at": "2026-11-22T00:00:00+00:00",
    }
    assert team["cost_per_day"]["limit"] == "1"
    # The team's sliding minute: its members' rate windows summed.
    assert team["requests_per_minute"] == {
        "limit": 5,
        "used": 1,
        "remaining": 4,
        # When the oldest counted bucket (09:00:00-05) leaves the minute.
        "resets_at": "2026-11-21T09:01:05+00:00",
    }
    assert usage["limits"]["queries_per_day"]["limit"] == 10  # the user's own plan
    assert solo["team_limits"] is None


async def test_a_team_rate_holds_its_members_together(
    database_url: str, client: httpx.AsyncClient
) -> None:
    """requests_per_minute on the team's plan: the members' requests share one
    sliding minute (the members' own plan has no rate), refused with the
    seconds until the team's window lets the request through."""
    clock = FixedClock(T0)
    async with running_gateway(
        database_url, settings=settings(requests_per_minute=3), clock=clock
    ) as h:
        bob = await h.add_user("bob")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_team("bob", "acme")
        alice = [await ask(client, h) for _ in range(2)]
        clock.advance(timedelta(seconds=10))
        bobs = [await ask(client, h, Authorization=f"Bearer {bob}") for _ in range(2)]
        clock.advance(timedelta(seconds=int(bobs[1].headers["retry-after"])))
        later = await ask(client, h, Authorization=f"Bearer {bob}")
        await h.probes.wait_finished(4)
    assert [r.status_code for r in alice] == [200, 200]
    assert [r.status_code for r in bobs] == [200, 429]
    refused = bobs[1]
    assert refused.json()["code"] == "team_limit"
    # Alice's two of 9:00:00 leave the window at 9:01:05, 55 s after 9:00:10.
    assert refused.headers["retry-after"] == "55"
    assert refused.headers["x-ratelimit-resource"] == "team_requests_per_minute"
    assert refused.headers["x-ratelimit-used"] == "3"
    assert refused.json()["message"].startswith(
        "Your team has reached its limit of 3 queries per minute."
    )
    assert later.status_code == 200


async def test_a_team_token_rate_counts_every_members_answers(
    database_url: str, client: httpx.AsyncClient
) -> None:
    clock = FixedClock(T0)
    async with running_gateway(
        database_url, settings=settings(tokens_per_minute=1000), clock=clock
    ) as h:
        bob = await h.add_user("bob")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_team("bob", "acme")
        crossing = await ask(client, h)
        await h.probes.wait_finished(1)
        refused = await ask(client, h, Authorization=f"Bearer {bob}")
    assert crossing.status_code == 200
    assert refused.status_code == 429
    assert refused.json()["code"] == "team_limit"
    assert refused.headers["x-ratelimit-resource"] == "team_tokens_per_minute"
    assert refused.headers["x-ratelimit-used"] == "1168"
    assert refused.headers["retry-after"] == "65"


async def test_admitted_answers_headers_name_the_team_limit_nearest_to_exhaustion(
    database_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(
        database_url, settings=settings(queries_per_day=4), clock=FixedClock(T0)
    ) as h:
        bob = await h.add_user("bob")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_team("bob", "acme")
        await ask(client, h, Authorization=f"Bearer {bob}")
        answered = await ask(client, h)
        await h.probes.wait_finished(2)
    assert answered.status_code == 200
    # The user's own 10 a day have 9 left (90 %), the team's 4 have 2 (50 %).
    assert answered.headers["x-ratelimit-resource"] == "team_queries_per_day"
    assert answered.headers["x-ratelimit-limit"] == "4"
    assert answered.headers["x-ratelimit-used"] == "2"
    assert answered.headers["x-ratelimit-remaining"] == "2"
