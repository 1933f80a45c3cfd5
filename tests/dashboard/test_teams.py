"""Teams in the dashboard (issue 21): the users table's team column, the team
section of a user's page, the teams list and a team's page with its members and
their usage summed; changing a user's team and a team's plan with the forms."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime

from tests.dashboard.test_dashboard import admin_gateway, client, sign_in, spend
from tests.harness import USER


def cells(page: str, css: str) -> list[list[str]]:
    """The text of each row of the table with class ``css``."""
    table = re.search(rf'<table class="{css}[^"]*">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert table is not None, css
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    return [
        [
            html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
            for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)
        ]
        for row in rows
    ]


async def test_teams_in_the_dashboard(sqlite_url: str) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        today = h.gateway.today()
        await spend(h, USER, 1000, day=today, queries=2)
        await spend(h, "bob", 2500, day=today, queries=1, web=1)
        await spend(h, "carol", 9999, day=today)
        await h.gateway.accounts.create_team("acme", plan="pro")
        # The gateway refuses such an id; one written to the database by other
        # means is still shown escaped.
        await h.storage.create_team("<b>x</b>", plan="free", now=datetime.now(UTC))
        csrf = await sign_in(c)

        # The user's team, set with the form (and refused for a team that does not exist).
        url = f"/dashboard/users/{USER}/team"
        assert (await c.post(url, data={"team": "acme"})).status_code == 403  # no CSRF token
        moved = await c.post(url, data={"team": "acme", "csrf": csrf})
        assert moved.status_code == 303
        assert moved.headers["location"] == f"/dashboard/users/{USER}?done=team"
        assert (
            await c.post("/dashboard/users/bob/team", data={"team": "acme", "csrf": csrf})
        ).status_code == 303
        unknown = await c.post("/dashboard/users/carol/team", data={"team": "nope", "csrf": csrf})
        assert unknown.status_code == 404
        assert (await h.storage.get_user("carol")).team is None  # type: ignore[union-attr]

        table = (await c.get("/dashboard/")).text
        assert '<th scope="col">Team</th>' in table
        teams_of = {row[0]: row[2] for row in cells(table, "users")}
        assert teams_of == {USER: "acme", "bob": "acme", "carol": "—"}
        assert 'href="/dashboard/teams/acme"' in table

        page = (await c.get(f"/dashboard/users/{USER}")).text
        assert '<a href="/dashboard/teams/acme" class="team">acme</a>' in page
        assert '<option value="acme" selected>acme</option>' in page
        team_limits = {row[0]: row[1:4] for row in cells(page, "limits team-limits")}
        # The team's plan (pro: 1.000 queries) against alice's and bob's queries summed.
        assert team_limits["Queries per day"] == ["3", "1.000", "997"]
        own = {row[0]: row[1] for row in cells(page, "limits")}
        assert own["Tokens per day"] == "1.000"  # her own usage, not the team's
        assert "In no team." in (await c.get("/dashboard/users/carol")).text

        listing = (await c.get("/dashboard/teams")).text
        rows = cells(listing, "teams")
        assert rows[1][:6] == ["acme", "pro", "2", "3.500", "3", rows[1][5]]
        assert rows[1][5].startswith("0,035")  # vi-VN money
        assert "<b>x</b>" not in listing and "&lt;b&gt;x&lt;/b&gt;" in listing
        assert 'href="/dashboard/teams/%3Cb%3Ex%3C%2Fb%3E"' in listing
        assert '<a href="/dashboard/teams">Teams</a>' in listing  # in the header

        team = await c.get("/dashboard/teams/acme")
        assert team.status_code == 200
        members = cells(team.text, "members")
        assert [row[0] for row in members] == [USER, "bob"]
        limits = {row[0]: row[1:4] for row in cells(team.text, "limits")}
        assert limits["Tokens per day"] == ["3.500", "unlimited", "unlimited"]
        assert limits["Web searches per day"][0] == "1"
        daily = cells(team.text, "stack pairs")
        assert daily[0][:3] == [today.isoformat(), "3.500", "3"] and len(daily) == 30
        assert (await c.get("/dashboard/teams/nobody")).status_code == 404
        escaped = await c.get("/dashboard/teams/%3Cb%3Ex%3C%2Fb%3E")
        assert escaped.status_code == 200 and "<b>x</b>" not in escaped.text

        # The team's plan, changed with the team page's form.
        changed = await c.post("/dashboard/teams/acme/plan", data={"plan": "free", "csrf": csrf})
        assert changed.status_code == 303
        assert changed.headers["location"] == "/dashboard/teams/acme?done=plan"
        assert (await h.storage.get_team("acme")).plan == "free"  # type: ignore[union-attr]
        bad = await c.post("/dashboard/teams/acme/plan", data={"plan": "gold", "csrf": csrf})
        assert bad.status_code == 400
        page = (await c.get("/dashboard/teams/acme?done=plan")).text
        assert "Plan changed." in page
        assert {row[0]: row[2] for row in cells(page, "limits")}["Tokens per day"] == "50.000"

        # Out of the team.
        assert (await c.post(url, data={"team": "", "csrf": csrf})).status_code == 303
        assert (await h.storage.get_user(USER)).team is None  # type: ignore[union-attr]
        members = cells((await c.get("/dashboard/teams/acme")).text, "members")
        assert [row[0] for row in members] == ["bob"]
