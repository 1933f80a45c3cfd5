"""The teams directory (issue 21): the CLI, the admin API, exports, the team's
plan as admission reads it, and team usage summed from its members."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from gateway.cli import main
from gateway.clock import periods_at
from gateway.config import DatabaseConfig
from gateway.storage import UsageEvent, open_storage
from tests.harness import USER, Harness, running_gateway

TOKEN = "admin-token-for-tests-0123456789"
CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
PLANS = {
    "plans": {
        "free": {
            "queries_per_day": 5,
            "tokens_per_day": 500_000,
            "limits": [{"meter": "output_tokens", "per": "day", "max": 100_000}],
        },
        "pro": {
            "queries_per_day": 100,
            "tokens_per_month": 9_000_000,
            "limits": [{"meter": "tokens", "per": "month", "max": 100_000, "name": "monthly"}],
        },
    }
}


def answer(answer_id: str, user: str, day: date, tokens: int, cost: str) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=day,
        created_at=datetime(day.year, day.month, day.day, 6, tzinfo=UTC),
        endpoint="chat-messages",
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        total_tokens=tokens,
        cost=Decimal(cost),
    )


# --- the command line ----------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[database]
url = "{database_url}"
spool_file = ""
[accounting]
timezone = "Asia/Ho_Chi_Minh"
default_plan = "free"
[plans.free]
queries_per_day = 50
[[plans.free.limits]]
meter = "tokens"
per = "month"
max = 1000
name = "monthly"
[plans.pro]
queries_per_day = 1000
tokens_per_day = 70000
[[plans.pro.limits]]
meter = "tokens"
per = "day"
max = 5000
"""
    )
    return path


def run(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


def test_teams_on_the_command_line(
    config_file: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config_file, "teams", "add", "acme", "--plan", "pro") == 0
    assert run(config_file, "teams", "add", "acme", "--plan", "free") == 1
    assert "exists already" in capsys.readouterr().err
    assert run(config_file, "teams", "add", "beta", "--plan", "gold") == 2
    assert "no plan named 'gold'" in capsys.readouterr().err
    assert run(config_file, "teams", "add", "bad team", "--plan", "free") == 2
    assert run(config_file, "teams", "add", "=cmd|x", "--plan", "free") == 2
    assert run(config_file, "teams", "add", "--plan", "free", "beta") == 0
    assert run(config_file, "teams", "set-plan", "beta", "gold") == 2
    assert run(config_file, "teams", "set-plan", "nobody", "pro") == 1
    assert run(config_file, "teams", "set-plan", "beta", "pro") == 0
    assert run(config_file, "teams", "set-limit", "acme", "queries_per_day", "2000") == 0
    capsys.readouterr()

    for user in ("alice", "bob", "carol"):
        assert run(config_file, "users", "add", user) == 0
    assert run(config_file, "users", "set-team", "alice", "acme") == 0
    assert run(config_file, "users", "set-team", "bob", "acme") == 0
    assert run(config_file, "users", "set-team", "carol", "nobody") == 1
    assert "no team 'nobody'" in capsys.readouterr().err
    assert run(config_file, "users", "set-team", "nobody", "acme") == 1
    assert run(config_file, "users", "set-team", "carol") == 2  # neither a team nor --none
    assert run(config_file, "users", "set-team", "carol", "acme", "--none") == 2
    capsys.readouterr()

    # Usage today (the configured time zone's day) by both members and an outsider.
    today = periods_at(datetime.now(UTC), ZoneInfo("Asia/Ho_Chi_Minh")).day

    async def seed() -> None:
        storage = await open_storage(DatabaseConfig(url=database_url))
        try:
            await storage.settle(answer("a1", "alice", today, 300, "0.0001"))
            await storage.settle(answer("b1", "bob", today, 700, "0.00025"))
            await storage.settle(answer("c1", "carol", today, 5000, "1"))
        finally:
            await storage.close()

    asyncio.run(seed())

    assert run(config_file, "users", "show", "alice") == 0
    shown = capsys.readouterr().out
    assert "team:      acme (plan pro)" in shown
    assert "tokens        300 / unlimited" in shown  # alice herself, on free
    assert "  queries       0 / 2000" in shown  # the team: settles alone count no query
    assert "  tokens        1000 / 70000" in shown  # the team: alice + bob
    assert "  cost          0.00035 USD" in shown
    # The [[plans.NAME.limits]] entries, alice's and her team's (the team's
    # unnamed tokens-per-day entry by its override name: tokens_per_day is a key).
    assert "limits:\n  monthly  300 / 1000  (resets " in shown
    assert "team limits:\n  limits.tokens_per_day  1000 / 5000  (resets " in shown
    assert run(config_file, "users", "show", "carol") == 0
    assert "team:      -" in capsys.readouterr().out

    assert run(config_file, "teams", "show", "acme") == 0
    shown = capsys.readouterr().out
    assert "members:   alice, bob" in shown and "queries_per_day=2000" in shown
    assert "tokens        1000 / 70000" in shown
    assert run(config_file, "teams", "show", "nobody") == 1

    assert run(config_file, "teams", "list") == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("TEAM") and "TOKENS TODAY" in listing[0]
    assert listing[1].split() == ["acme", "pro", "2", "0", "1000", "0.00035", "USD"]
    assert listing[2].split()[:3] == ["beta", "pro", "0"] and listing[-1] == "(2 teams)"

    assert run(config_file, "users", "list") == 0
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert rows == {"alice": "acme", "bob": "acme", "carol": "-"}

    assert run(config_file, "users", "set-team", "bob", "--none") == 0
    assert run(config_file, "teams", "clear-limit", "acme", "queries_per_day") == 0
    capsys.readouterr()
    assert run(config_file, "teams", "show", "acme") == 0
    shown = capsys.readouterr().out
    assert "members:   alice\n" in shown and "tokens        300 / 70000" in shown
    assert "queries       0 / 1000" in shown


# --- the admin API, exports, admission's view of a team ----------------------------------


@pytest.fixture
async def gw(database_url: str) -> AsyncIterator[Harness]:
    async with running_gateway(
        database_url, settings=PLANS, env={"GATEWAY_ADMIN_TOKEN": TOKEN}
    ) as h:
        yield h


async def admin(h: Harness, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=30) as client:
        return await client.request(
            method, path, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs
        )


async def test_teams_through_the_admin_api(gw: Harness) -> None:
    created = await admin(gw, "POST", "/admin/teams", json={"id": "acme", "plan": "pro"})
    assert created.status_code == 201 and created.json()["id"] == "acme"
    again = await admin(gw, "POST", "/admin/teams", json={"id": "acme", "plan": "free"})
    assert again.status_code == 409 and again.json()["code"] == "conflict"
    for body in ({"id": "beta", "plan": "gold"}, {"id": "beta"}, {"plan": "pro"}):
        assert (await admin(gw, "POST", "/admin/teams", json=body)).status_code == 400
    assert (
        await admin(gw, "POST", "/admin/teams", json={"id": "a/b", "plan": "pro"})
    ).status_code == 400

    await gw.add_user("bob")
    await gw.add_user("carol")
    for user in (USER, "bob"):
        put = await admin(gw, "PUT", f"/admin/users/{user}/team", json={"team": "acme"})
        assert put.json() == {"id": user, "team": "acme"}
    assert (
        await admin(gw, "PUT", "/admin/users/carol/team", json={"team": "nobody"})
    ).status_code == 404
    assert (
        await admin(gw, "PUT", "/admin/users/nobody/team", json={"team": "acme"})
    ).status_code == 404
    for body in ({}, {"team": 5}):
        assert (await admin(gw, "PUT", "/admin/users/carol/team", json=body)).status_code == 400

    # Usage: one answer through the gateway by alice, ledger rows for bob and carol.
    async with httpx.AsyncClient(base_url=gw.url) as client:
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 200
    await gw.probes.wait_finished(1)
    today = gw.gateway.today()
    await gw.storage.settle(answer("b1", "bob", today, 832, "0.000697"))
    await gw.storage.settle(answer("c1", "carol", today, 5000, "1"))

    detail = (await admin(gw, "GET", "/admin/teams/acme", params={"days": 3})).json()
    assert detail["members"] == [USER, "bob"] and detail["plan"] == "pro"
    assert detail["today"]["total_tokens"] == 1168 + 832
    assert detail["today"]["queries"] == 1 and detail["today"]["cost"] == "0.002"
    assert detail["limits"]["queries_per_day"]["used"] == 1
    assert detail["limits"]["tokens_per_month"] == {
        "limit": 9_000_000,
        "used": 2000,
        "remaining": 8_998_000,
        "resets_at": detail["limits"]["tokens_per_month"]["resets_at"],
    }
    assert [d["total_tokens"] for d in detail["daily"]] == [0, 0, 2000]
    # The team plan's [[plans.NAME.limits]] entry, over the members (issue 21).
    assert {k: detail["limits"]["monthly"][k] for k in ("scope", "used", "limit")} == {
        "scope": "team",
        "used": 2000,
        "limit": 100_000,
    }
    assert (await admin(gw, "GET", "/admin/teams/nobody")).status_code == 404

    user = (await admin(gw, "GET", f"/admin/users/{USER}")).json()
    assert user["plan"] == "free" and user["today"]["total_tokens"] == 1168
    assert user["team"]["id"] == "acme" and user["team"]["today"]["total_tokens"] == 2000
    assert "members" not in user["team"]
    assert user["team"]["limits"]["monthly"]["used"] == 2000
    mine = user["limits"]["output_tokens_per_day"]
    assert (mine["scope"], mine["limit"]) == ("user", 100_000)
    assert mine["used"] == user["today"]["completion_tokens"] > 0
    overridden = await admin(
        gw, "PUT", "/admin/teams/acme/limits/limits.monthly", json={"value": 3000}
    )
    assert overridden.status_code == 200
    detail = (await admin(gw, "GET", "/admin/teams/acme")).json()
    assert (detail["limits"]["monthly"]["limit"], detail["limits"]["monthly"]["remaining"]) == (
        3000,
        1000,
    )
    cleared = await admin(gw, "DELETE", "/admin/teams/acme/limits/limits.monthly")
    assert cleared.status_code == 200
    assert (await admin(gw, "GET", "/admin/users/carol")).json()["team"] is None

    teams = (await admin(gw, "GET", "/admin/teams")).json()["data"]
    assert [(t["id"], t["plan"], t["members"], t["today"]["cost"]) for t in teams] == [
        ("acme", "pro", 2, "0.002")
    ]
    users = (await admin(gw, "GET", "/admin/users")).json()["data"]
    assert {u["id"]: u["team"] for u in users} == {USER: "acme", "bob": "acme", "carol": None}

    # Plan and limits of the team.
    assert (
        await admin(gw, "PUT", "/admin/teams/acme/plan", json={"plan": "gold"})
    ).status_code == 400
    assert (
        await admin(gw, "PUT", "/admin/teams/nobody/plan", json={"plan": "free"})
    ).status_code == 404
    moved = await admin(gw, "PUT", "/admin/teams/acme/plan", json={"plan": "free"})
    assert moved.json() == {"id": "acme", "plan": "free"}
    limit = await admin(gw, "PUT", "/admin/teams/acme/limits/queries_per_day", json={"value": 7})
    assert limit.json() == {"id": "acme", "name": "queries_per_day", "value": 7}
    assert (
        await admin(gw, "PUT", "/admin/teams/acme/limits/queries_per_day", json={"value": -1})
    ).status_code == 400
    assert (
        await admin(gw, "PUT", "/admin/teams/acme/limits/nope", json={"value": 1})
    ).status_code == 404
    detail = (await admin(gw, "GET", "/admin/teams/acme")).json()
    assert detail["overrides"] == {"queries_per_day": 7}
    assert detail["limits"]["queries_per_day"]["limit"] == 7

    # Exports name each row's user's team.
    for dataset, key in (("events", "answer_id"), ("daily", "user_id")):
        exported = await admin(gw, "GET", f"/admin/export/{dataset}")
        found = {row[key]: row["team"] for row in csv.DictReader(io.StringIO(exported.text))}
        if dataset == "daily":
            assert found == {USER: "acme", "bob": "acme", "carol": ""}
        else:
            assert found["b1"] == "acme" and found["c1"] == ""
        as_json = (await admin(gw, "GET", f"/admin/export/{dataset}?format=json")).json()
        assert {row["user_id"]: row["team"] for row in as_json}["carol"] is None

    # Out of the team: the team's usage no longer counts them.
    cleared = await admin(gw, "PUT", "/admin/users/bob/team", json={"team": None})
    assert cleared.json() == {"id": "bob", "team": None}
    detail = (await admin(gw, "GET", "/admin/teams/acme")).json()
    assert detail["members"] == [USER] and detail["today"]["total_tokens"] == 1168


async def test_admission_sees_the_team_and_its_plan_at_once(gw: Harness) -> None:
    """The user record admission resolves carries the team; the team's effective
    plan (its plan with the team's overrides) is one call away, and changes made
    through the gateway apply to the next request, not after a cache TTL."""
    gateway = gw.gateway
    free = gateway.config.accounting.default_plan
    user = await gateway.snapshot.users.get(USER, default_plan=free)
    assert user.team is None and await gateway.snapshot.team_plan(user) is None

    await gateway.accounts.create_team("acme", plan="pro")
    await gateway.accounts.set_team(USER, "acme")
    user = await gateway.snapshot.users.get(USER, default_plan=free)
    assert user.team == "acme"
    plan = await gateway.snapshot.team_plan(user)
    assert plan is not None and (plan.name, plan.queries_per_day) == ("pro", 100)

    await gateway.accounts.set_team_override("acme", "queries_per_day", 3)
    plan = await gateway.snapshot.team_plan(user)
    assert plan is not None and plan.queries_per_day == 3
    await gateway.accounts.set_team_plan("acme", "free")
    plan = await gateway.snapshot.team_plan(user)
    assert plan is not None and (plan.name, plan.queries_per_day, plan.tokens_per_day) == (
        "free",
        3,
        500_000,
    )
    await gateway.accounts.clear_team_override("acme", "queries_per_day")
    plan = await gateway.snapshot.team_plan(user)
    assert plan is not None and plan.queries_per_day == 5

    await gateway.accounts.set_team(USER, None)
    user = await gateway.snapshot.users.get(USER, default_plan=free)
    assert user.team is None and await gateway.snapshot.team_plan(user) is None
