"""Teams in the dashboard (issue 21): the teams list at /dashboard/teams and a
page per team at /dashboard/teams/{id} - its plan, its members and its usage,
summed from its members' day rows (docs/admin.md, "The dashboard")."""

from __future__ import annotations

from decimal import Decimal
from typing import Final

from starlette.responses import RedirectResponse, Response

from gateway.dashboard.render import Html, badge, concat, options, render, team_path, user_path
from gateway.dashboard.signin import Page, signed_in
from gateway.dashboard.user_page import (
    CHART_DAYS,
    grouped_table,
    limit_rows,
    local_time,
    overrides_list,
)

_TEAMS = """<h1>Teams</h1>
<p class="muted">{summary}</p>
<div class="scroll">
<table class="teams stack">
<thead><tr><th scope="col">Team</th><th scope="col">Plan</th><th scope="col" class="num">Members</th>
<th scope="col" class="num">Tokens today</th><th scope="col" class="num">Queries today</th>
<th scope="col" class="num">Cost today</th></tr></thead>
<tbody>
{rows}</tbody>
</table>
</div>
"""

_TEAM_ROW = """<tr>
<td data-label="Team"><a href="{href}">{id}</a></td>
<td data-label="Plan">{plan}</td>
<td class="num" data-label="Members">{members}</td>
<td class="num" data-label="Tokens today">{tokens}</td>
<td class="num" data-label="Queries today">{queries}</td>
<td class="num" data-label="Cost today">{cost}</td>
</tr>
"""

_TEAM = """<p class="crumbs"><a href="{base}/teams">Teams</a> /</p>
<h1 class="team-id">{id}</h1>
<p class="muted">Plan <strong class="plan">{plan}</strong>{plan_note} · since {created} · today is {day} · usage is the members' summed</p>
{notice}<div class="grid">
<section class="card">
<h2>Today</h2>
<div class="scroll">
<table class="limits stack">
<thead><tr><th scope="col">Limit</th><th scope="col" class="num">Used</th><th scope="col" class="num">Limit</th><th scope="col" class="num">Remaining</th><th scope="col">Resets</th></tr></thead>
<tbody>
{limits}</tbody>
</table>
</div>
</section>
<section class="card">
<h2>This month</h2>
<dl class="totals">
<dt>Total tokens</dt><dd>{month_tokens}</dd>
<dt>Queries</dt><dd>{month_queries}</dd>
<dt>Cost</dt><dd>{month_cost}</dd>
</dl>
{by_upstream}<h2>Plan</h2>
<form class="row" method="post" action="{team_url}/plan">
{csrf}<label for="plan" class="visually-hidden">Plan</label>
<select id="plan" name="plan">{plan_options}</select>
<button type="submit">Change plan</button>
</form>
<h3>Overrides</h3>
{overrides}</section>
</div>
<section class="card">
<h2>Members</h2>
<div class="scroll">
<table class="members stack">
<thead><tr><th scope="col">User</th><th scope="col">Plan</th><th scope="col" class="num">Lifetime tokens</th><th scope="col" class="num">Lifetime cost</th></tr></thead>
<tbody>
{members}</tbody>
</table>
</div>
</section>
<section class="card">
<h2>Last {days} days</h2>
<div class="scroll">
<table class="stack pairs">
<thead><tr><th scope="col">Day</th><th scope="col" class="num">Tokens</th><th scope="col" class="num">Queries</th><th scope="col" class="num">Web searches</th><th scope="col" class="num">Cost</th></tr></thead>
<tbody>
{daily}</tbody>
</table>
</div>
</section>
"""

_MEMBER_ROW = """<tr><td data-label="User"><a href="{href}">{id}</a></td><td data-label="Plan">{plan}</td><td class="num" data-label="Lifetime tokens">{tokens}</td><td class="num" data-label="Lifetime cost">{cost}</td></tr>
"""

_DAY_ROW = """<tr><td data-label="Day">{day}</td><td class="num" data-label="Tokens">{tokens}</td><td class="num" data-label="Queries">{queries}</td><td class="num" data-label="Web searches">{web}</td><td class="num" data-label="Cost">{cost}</td></tr>
"""

_NOTICES: Final = {"plan": "Plan changed."}


@signed_in
async def teams(page: Page) -> Response:
    gateway, numbers = page.gateway, page.numbers
    found = await gateway.storage.list_teams(day=gateway.today())
    rows = [
        render(
            _TEAM_ROW,
            href=team_path(page.base, s.team.id),
            id=s.team.id,
            plan=s.team.plan,
            members=numbers.number(s.members),
            tokens=badge(numbers.number(s.today.total_tokens), s.today.total_tokens),
            queries=numbers.number(s.today.queries),
            cost=numbers.amount(s.today.cost, gateway.currency),
        )
        for s in found
    ]
    body = render(
        _TEAMS,
        summary=f"{len(found)} team{'' if len(found) == 1 else 's'}",
        rows=concat(rows)
        or Html(
            '<tr><td colspan="6" class="muted">No teams: <code>gateway teams add</code>.</td></tr>\n'
        ),
    )
    return page.document("Teams", body)


@signed_in
async def team(page: Page) -> Response:
    gateway, base, numbers, tz = page.gateway, page.base, page.numbers, page.gateway.tz
    team_id = page.request.path_params["team_id"]
    detail = await gateway.reports.team(team_id, days=CHART_DAYS)
    members = await gateway.storage.team_members(team_id)
    member_rows = concat(
        render(
            _MEMBER_ROW,
            href=user_path(base, m.id),
            id=m.id,
            plan=m.plan,
            tokens=badge(numbers.number(m.lifetime_tokens), m.lifetime_tokens),
            cost=numbers.amount(m.lifetime_cost, gateway.currency),
        )
        for m in members
    ) or Html('<tr><td colspan="4" class="muted">No members.</td></tr>\n')
    daily = concat(
        render(
            _DAY_ROW,
            day=row["day"],
            tokens=numbers.number(row["total_tokens"]),
            queries=numbers.number(row["queries"]),
            web=numbers.number(row["web_searches"]),
            cost=numbers.amount(Decimal(row["cost"]), row["currency"]),
        )
        for row in reversed(detail["daily"])
    )
    month, stored = detail["month"], detail["stored_plan"]
    notice = _NOTICES.get(page.request.query_params.get("done", ""))
    body = render(
        _TEAM,
        base=base,
        id=team_id,
        plan=detail["plan"],
        plan_note=""
        if stored == detail["plan"]
        else f" (stored plan {stored!r} is no longer configured)",
        created=local_time(detail["created_at"], tz),
        day=detail["today"]["day"],
        notice=render('<p class="notice" role="status">{n}</p>\n', n=notice) if notice else "",
        limits=limit_rows(numbers, detail["limits"], tz),
        month_tokens=badge(numbers.number(month["total_tokens"]), month["total_tokens"]),
        month_queries=numbers.number(month["queries"]),
        month_cost=numbers.amount(Decimal(month["cost"]), month["currency"]),
        by_upstream=grouped_table(
            numbers, detail["month_by_upstream"], by="upstream", title="By upstream"
        ),
        team_url=team_path(base, team_id),
        csrf=page.csrf_field(),
        plan_options=options(((p, p) for p in gateway.config.plans), detail["plan"]),
        overrides=overrides_list(numbers, detail["overrides"]),
        members=member_rows,
        days=CHART_DAYS,
        daily=daily,
    )
    return page.document(team_id, body)


@signed_in
async def change_team_plan(page: Page) -> Response:
    team_id = page.request.path_params["team_id"]
    await page.gateway.reports.team(team_id, days=1)  # 404 for an unknown team
    await page.gateway.accounts.set_team_plan(team_id, page.form.get("plan", ""))
    return RedirectResponse(f"{team_path(page.base, team_id)}?done=plan", 303)
