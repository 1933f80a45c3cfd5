"""Usage by upstream in the dashboard (issue 23): a user's page shows this
month's answers per model and per named upstream, a team's page its members'
per upstream."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from gateway.storage import UsageEvent
from tests.dashboard.test_dashboard import admin_gateway, client, sign_in
from tests.dashboard.test_teams import cells
from tests.harness import USER, Harness

EVIL = "<img src=x onerror=alert(1)>"


async def answer(
    h: Harness,
    answer_id: str,
    tokens: int,
    *,
    user: str = USER,
    upstream: str = "default",
    model: str | None = None,
    cost: str = "0.01",
    currency: str = "USD",
    days_ago: int = 0,
) -> None:
    assert await h.storage.settle(
        UsageEvent(
            answer_id=answer_id,
            user_id=user,
            day=h.gateway.today() - timedelta(days=days_ago),
            created_at=datetime.now(UTC),
            endpoint="chat-messages",
            prompt_tokens=tokens - 10,
            completion_tokens=10,
            total_tokens=tokens,
            cost=Decimal(cost),
            currency=currency,
            model=model,
            upstream=upstream,
        )
    )


async def test_the_user_and_team_pages_show_usage_by_upstream_beside_by_model(
    sqlite_url: str,
) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        await h.storage.ensure_user("bob", plan="free")
        await answer(h, "a1", 500, upstream="openai", model="gpt-4o")
        await answer(h, "a2", 300, upstream="openai", model="gpt-4o")
        await answer(h, "a3", 1200, upstream="local", model="llama-3")
        await answer(h, "a4", 100)  # the default upstream's, naming no model
        await answer(h, "a5", 50, upstream=EVIL, model=EVIL)
        await answer(h, "b1", 2000, user="bob", upstream="openai", model="gpt-4o")
        await h.gateway.accounts.create_team("acme", plan="free")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_team("bob", "acme")
        await sign_in(c)

        page = (await c.get(f"/dashboard/users/{USER}")).text
        # Numbers in the dashboard's locale (vi-VN: "." groups thousands).
        assert cells(page, "by-upstream") == [
            ["local", "1", "1.200", "1.190", "10", "0,0100\xa0USD"],
            ["openai", "2", "800", "780", "20", "0,0200\xa0USD"],
            ["default", "1", "100", "90", "10", "0,0100\xa0USD"],
            [EVIL, "1", "50", "40", "10", "0,0100\xa0USD"],
        ]
        assert [row[:3] for row in cells(page, "by-model")] == [
            ["llama-3", "1", "1.200"],
            ["gpt-4o", "2", "800"],
            ["—", "1", "100"],
            [EVIL, "1", "50"],
        ]
        assert EVIL not in page  # escaped wherever it is shown

        team = (await c.get("/dashboard/teams/acme")).text
        assert [row[:3] for row in cells(team, "by-upstream")] == [
            ["openai", "3", "2.800"],
            ["local", "1", "1.200"],
            ["default", "1", "100"],
            [EVIL, "1", "50"],
        ]
        assert EVIL not in team

        # A user with no answers this month (one last month is not this month's).
        await h.storage.ensure_user("carol", plan="free")
        await answer(h, "c1", 70, user="carol", upstream="openai", days_ago=40)
        empty = (await c.get("/dashboard/users/carol")).text
        assert cells(empty, "by-upstream") == [["No answers this month."]]
        assert cells(empty, "by-model") == [["No answers this month."]]
