"""A snapshot's plan views (issue 21, the hot path): a user's effective plan and
its limits - and their team's - are derived once per snapshot for each plan and
set of overrides, not per request; a reload starts afresh."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.accounts import effective_plan, team_plan
from gateway.config import parse_config
from gateway.quota.plans import admission_limits, plan_limits, team_limits
from gateway.snapshot import build_snapshot
from gateway.storage import Storage, User
from gateway.storage.sqlite import SQLiteStorage

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
PLANS: dict[str, Any] = {
    "free": {"queries_per_day": 10, "cost_per_day": "1.00"},
    "team": {"queries_per_day": 50, "requests_per_minute": 5},
}


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    store = await SQLiteStorage.open(str(tmp_path / "gateway.db"))
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


def user(plan: str = "free", overrides: dict[str, Any] | None = None, **kw: Any) -> User:
    return User("alice", plan, overrides or {}, 0, 0, 0, Decimal(0), T0, **kw)


def test_a_view_is_derived_once_per_plan_and_overrides(storage: Storage) -> None:
    config = parse_config({"plans": PLANS})
    snap = build_snapshot(config, storage)
    plain = snap.plan_view(user())
    assert snap.plan_view(user()) is plain
    assert plain.plan == effective_plan(config, user())
    assert plain.limits == plan_limits(plain.plan)
    assert plain.admission.limits == admission_limits(plain.plan).limits
    assert plain.own == frozenset() and not plain.per_model
    own = snap.plan_view(user(overrides={"queries_per_day": 3}))
    assert own is not plain and own.plan.queries_per_day == 3
    assert own.own == {"queries_per_day"}
    assert snap.plan_view(user(overrides={"queries_per_day": 3})) is own
    # A reload: the next snapshot derives from its own configuration.
    reloaded = build_snapshot(
        parse_config({"plans": {**PLANS, "free": {"queries_per_day": 20}}}), storage, snap
    )
    assert reloaded.plan_view(user()).plan.queries_per_day == 20


def test_model_lists_are_read_only_when_a_plan_has_one(storage: Storage) -> None:
    assert not build_snapshot(parse_config({"plans": PLANS}), storage).model_lists
    listed = {**PLANS, "team": {"models": ["gpt-4o*"]}}
    assert build_snapshot(parse_config({"plans": listed}), storage).model_lists
    per_model = {
        "free": {"limits": [{"meter": "cost", "per": "day", "max": "1", "models": ["o3"]}]}
    }
    view = build_snapshot(parse_config({"plans": per_model}), storage).plan_view(user())
    assert view.per_model


async def test_a_team_view_follows_the_teams_plan_and_overrides(storage: Storage) -> None:
    config = parse_config({"plans": PLANS})
    snap = build_snapshot(config, storage)
    await storage.create_team("acme", plan="team", now=T0)
    member = user(team="acme")
    view = await snap.team_view(member)
    assert view is not None and await snap.team_view(member) is view
    team = await storage.get_team("acme")
    assert team is not None
    assert view.plan == team_plan(config, team)
    assert view.limits == team_limits(view.plan)
    assert {x.name for x in view.limits} == {"team_queries_per_day", "team_requests_per_minute"}
    assert await snap.team_view(user()) is None  # in no team
    await storage.set_team_override("acme", "queries_per_day", 7)
    snap.teams.forget("acme")  # as the gateway's own change does
    changed = await snap.team_view(member)
    assert changed is not None and changed is not view
    assert changed.plan.queries_per_day == 7


async def test_a_users_and_a_teams_limits_are_put_together_once_per_pair(
    storage: Storage,
) -> None:
    """Admission's limit set of a user in a team is the same for every request
    of the pair of views: derived once, and never another team's."""
    config = parse_config({"plans": {**PLANS, "big": {"queries_per_day": 500}}})
    snap = build_snapshot(config, storage)
    await storage.create_team("acme", plan="team", now=T0)
    await storage.create_team("beta", plan="big", now=T0)
    mine = snap.plan_view(user(team="acme"))
    acme = await snap.team_view(user(team="acme"))
    beta = await snap.team_view(user(team="beta"))
    assert acme is not None and beta is not None
    together = mine.with_team(acme)
    assert together.limits == admission_limits(mine.limits, acme.limits).limits
    assert mine.with_team(acme) is together
    other = mine.with_team(beta)
    assert other.limits == admission_limits(mine.limits, beta.limits).limits
    assert other.limits != together.limits
    assert mine.with_team(acme) is together  # beta's did not replace it
    # A reload derives its own.
    reloaded = build_snapshot(config, storage, snap)
    again = await reloaded.team_view(user(team="acme"))
    assert again is not None and again is not acme
    assert reloaded.plan_view(user(team="acme")).with_team(again) is not together
