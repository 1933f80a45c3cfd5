"""The teams directory (issue 21) in the storage contract: both backends."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from gateway.errors import Conflict, NotFound
from gateway.storage import Storage, UsageEvent

NOW = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
DAY = date(2026, 11, 21)


def event(answer_id: str, user: str, *, day: date = DAY, tokens: int, cost: str) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=day,
        created_at=NOW,
        endpoint="chat-messages",
        prompt_tokens=tokens - 1,
        completion_tokens=1,
        total_tokens=tokens,
        cost=Decimal(cost),
        web_searches=1,
    )


async def test_a_team_is_created_once_and_read_back(storage: Storage) -> None:
    team = await storage.create_team("acme", plan="pro", now=NOW)
    assert (team.id, team.plan, dict(team.overrides), team.created_at) == ("acme", "pro", {}, NOW)
    assert await storage.get_team("acme") == team
    with pytest.raises(Conflict):
        await storage.create_team("acme", plan="free", now=NOW)
    assert (await storage.get_team("acme")).plan == "pro"  # type: ignore[union-attr]
    assert await storage.get_team("nobody") is None


async def test_team_plan_and_overrides(storage: Storage) -> None:
    await storage.create_team("acme", plan="free", now=NOW)
    await storage.set_team_plan("acme", "pro")
    await storage.set_team_override("acme", "queries_per_day", 500)
    await storage.set_team_override("acme", "tokens_per_day", None)
    team = await storage.get_team("acme")
    assert team is not None and team.plan == "pro"
    assert dict(team.overrides) == {"queries_per_day": 500, "tokens_per_day": None}
    await storage.clear_team_override("acme", "queries_per_day")
    team = await storage.get_team("acme")
    assert team is not None and dict(team.overrides) == {"tokens_per_day": None}
    for call in (
        storage.set_team_plan("nobody", "pro"),
        storage.set_team_override("nobody", "queries_per_day", 1),
        storage.clear_team_override("nobody", "queries_per_day"),
    ):
        with pytest.raises(NotFound):
            await call


async def test_users_join_and_leave_a_team(storage: Storage) -> None:
    await storage.create_team("acme", plan="pro", now=NOW)
    await storage.create_team("zeta", plan="free", now=NOW)
    for user in ("carol", "alice", "bob"):
        await storage.ensure_user(user, plan="free")
    assert (await storage.get_user("alice")).team is None  # type: ignore[union-attr]
    await storage.set_team("alice", "acme")
    await storage.set_team("carol", "acme")
    await storage.set_team("bob", "zeta")
    alice = await storage.get_user("alice")
    assert alice is not None and alice.team == "acme" and alice.plan == "free"
    assert [u.id for u in await storage.team_members("acme")] == ["alice", "carol"]
    assert [(s.team.id, s.members) for s in await storage.list_teams()] == [
        ("acme", 2),
        ("zeta", 1),
    ]
    # The team travels with the user record everywhere it is read.
    listed = {s.user.id: s.user.team for s in await storage.list_users(day=DAY)}
    assert listed == {"alice": "acme", "bob": "zeta", "carol": "acme"}
    assert (await storage.ensure_user("carol", plan="pro")).team == "acme"
    assert await storage.user_teams() == {"alice": "acme", "bob": "zeta", "carol": "acme"}

    await storage.set_team("carol", None)
    assert (await storage.get_user("carol")).team is None  # type: ignore[union-attr]
    assert [u.id for u in await storage.team_members("acme")] == ["alice"]
    with pytest.raises(NotFound, match="team"):
        await storage.set_team("alice", "nobody")
    assert (await storage.get_user("alice")).team == "acme"  # type: ignore[union-attr]
    with pytest.raises(NotFound, match="user"):
        await storage.set_team("nobody", "acme")


async def test_team_usage_is_its_members_day_rows_summed(storage: Storage) -> None:
    await storage.create_team("acme", plan="pro", now=NOW)
    for user in ("alice", "bob", "outsider"):
        await storage.ensure_user(user, plan="free")
    await storage.set_team("alice", "acme")
    await storage.set_team("bob", "acme")
    yesterday = DAY - timedelta(days=1)
    await storage.settle(event("a1", "alice", tokens=100, cost="0.1000001"))
    await storage.settle(event("a2", "alice", day=yesterday, tokens=10, cost="0.2"))
    await storage.settle(event("b1", "bob", tokens=50, cost="0.0000002"))
    await storage.settle(event("o1", "outsider", tokens=1000, cost="9"))

    rows = await storage.team_daily("acme", start=yesterday, end=DAY)
    assert [(r.user_id, r.day, r.total_tokens, r.cost, r.web_searches) for r in rows] == [
        ("acme", yesterday, 10, Decimal("0.2"), 1),
        ("acme", DAY, 150, Decimal("0.1000003"), 2),
    ]
    assert rows[1].prompt_tokens == 148 and rows[1].completion_tokens == 2
    assert await storage.team_daily("acme", start=DAY + timedelta(days=1), end=DAY) == []
    assert await storage.team_daily("nobody", start=yesterday, end=DAY) == []
