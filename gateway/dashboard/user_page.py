"""One user's page at /dashboard/users/{id}, and the forms on it.

Today's use against the user's limits, lifetime totals, the last 30 days (a chart
drawn by ``static/dashboard.js`` from ``data-series``, with the same numbers in a
table that needs no JavaScript), the plan, the keys and the export links. A form
posts and then redirects back to the page (post/redirect/get), except creating a
key: that answer is the page itself, the only place the new secret is ever shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo
from decimal import Decimal
from typing import Any, Final
from urllib.parse import quote, urlencode

import orjson
from starlette.responses import RedirectResponse, Response

from gateway.dashboard.formats import NumberFormat
from gateway.dashboard.render import (
    Html,
    badge,
    concat,
    message,
    options,
    render,
    team_path,
    user_path,
)
from gateway.dashboard.signin import Page, signed_in

CHART_DAYS: Final = 30

_LIMIT_LABELS: Final = {
    "queries_per_day": "Queries per day",
    "tokens_per_day": "Tokens per day",
    "tokens_per_month": "Tokens per month",
    "web_searches_per_day": "Web searches per day",
    "advanced_rag": "Advanced RAG",
    "file_size_mb": "Largest upload (MiB)",
    "chat_history_days": "Chat history (days)",
    "max_concurrent_streams": "Concurrent answers",
    "requests_per_minute": "Requests per minute",
    "tokens_per_minute": "Tokens per minute",
    "cost_per_day": "Spending per day",
    "cost_per_month": "Spending per month",
}

_USER = """<p class="crumbs"><a href="{base}/">Users</a> /</p>
<h1 class="user-id">{id}</h1>
<p class="muted">Plan <strong class="plan">{plan}</strong>{plan_note} · since {created} · today is {day} · times in {timezone}</p>
{notice}{secret}<div class="grid">
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
<h2>Lifetime</h2>
<dl class="totals">
<dt>Total tokens</dt><dd>{lifetime_tokens}</dd>
<dt>Prompt tokens</dt><dd>{prompt_tokens}</dd>
<dt>Completion tokens</dt><dd>{completion_tokens}</dd>
{unsplit}<dt>Cost</dt><dd>{lifetime_cost}</dd>
</dl>
<h2>Plan</h2>
<form class="row" method="post" action="{user_url}/plan">
{csrf}<label for="plan" class="visually-hidden">Plan</label>
<select id="plan" name="plan">{plan_options}</select>
<button type="submit">Change plan</button>
</form>
<h3>Overrides</h3>
{overrides}</section>
</div>
<section class="card">
<h2>Team</h2>
{team}<form class="row" method="post" action="{user_url}/team">
{csrf}<label for="team" class="visually-hidden">Team</label>
<select id="team" name="team">{team_options}</select>
<button type="submit">Change team</button>
</form>
</section>
<section class="card">
<h2>This month</h2>
{by_model}{by_upstream}</section>
<section class="card">
<h2>Last {days} days</h2>
<div id="chart" class="chart" role="img" aria-label="Tokens, queries and web searches per day, last {days} days" data-locale="{locale}" data-series="{series}"></div>
<noscript><p class="muted">The chart needs JavaScript; the table below has the same numbers.</p></noscript>
<details class="daily">
<summary>Daily numbers</summary>
<div class="scroll">
<table class="stack pairs">
<thead><tr><th scope="col">Day</th><th scope="col" class="num">Tokens</th><th scope="col" class="num">Prompt</th><th scope="col" class="num">Completion</th><th scope="col" class="num">Queries</th><th scope="col" class="num">Web searches</th><th scope="col" class="num">Cost</th></tr></thead>
<tbody>
{daily}</tbody>
</table>
</div>
</details>
</section>
<section class="card">
<h2>Keys</h2>
<div class="scroll">
<table class="keys stack">
<thead><tr><th scope="col">Id</th><th scope="col">Name</th><th scope="col">Prefix</th><th scope="col">Created</th><th scope="col">Status</th></tr></thead>
<tbody>
{keys}</tbody>
</table>
</div>
<form class="row" method="post" action="{user_url}/keys">
{csrf}<label for="key-name">New key</label>
<input id="key-name" name="name" maxlength="100" placeholder="name (optional)">
<button type="submit">Create key</button>
</form>
</section>
<section class="card">
<h2>Export</h2>
<p>Last {days} days: ledger <a href="{events_csv}">CSV</a> · <a href="{events_json}">JSON</a>; daily rows <a href="{daily_csv}">CSV</a> · <a href="{daily_json}">JSON</a></p>
<form class="row" method="get" action="{export}/events">
<input type="hidden" name="user" value="{id}">
<label>From <input type="date" name="from" value="{start}" required></label>
<label>To <input type="date" name="to" value="{end}" required></label>
<label>Format <select name="format"><option>csv</option><option>json</option></select></label>
<button type="submit">Ledger</button>
<button type="submit" formaction="{export}/daily">Daily rows</button>
</form>
</section>
"""

_LIMIT_ROW = """<tr><th scope="row">{label}</th><td class="num" data-label="Used">{used}</td><td class="num" data-label="Limit">{limit}</td><td class="num" data-label="Remaining">{remaining}{meter}</td><td data-label="Resets">{resets}</td></tr>
"""

_DAY_ROW = """<tr><td data-label="Day">{day}</td><td class="num" data-label="Tokens">{tokens}</td><td class="num" data-label="Prompt">{prompt}</td><td class="num" data-label="Completion">{completion}</td><td class="num" data-label="Queries">{queries}</td><td class="num" data-label="Web searches">{web}</td><td class="num" data-label="Cost">{cost}</td></tr>
"""

# This month's answers grouped by model or by named upstream (issue 23), as the
# usage and admin APIs give them (``month_by_model``, ``month_by_upstream``).
_GROUPS = """<h3>{title}</h3>
<div class="scroll">
<table class="{kind} stack">
<thead><tr><th scope="col">{label}</th><th scope="col" class="num">Answers</th><th scope="col" class="num">Tokens</th><th scope="col" class="num">Prompt</th><th scope="col" class="num">Completion</th><th scope="col" class="num">Cost</th></tr></thead>
<tbody>
{rows}</tbody>
</table>
</div>
"""

_GROUP_ROW = """<tr><th scope="row">{name}</th><td class="num" data-label="Answers">{answers}</td><td class="num" data-label="Tokens">{tokens}</td><td class="num" data-label="Prompt">{prompt}</td><td class="num" data-label="Completion">{completion}</td><td class="num" data-label="Cost">{cost}</td></tr>
"""

_KEY_ROW = """<tr><td data-label="Id"><code>{id}</code></td><td data-label="Name">{name}</td><td data-label="Prefix"><code>{prefix}…</code></td><td data-label="Created">{created}</td><td data-label="Status">{status}</td></tr>
"""

_REVOKE = """<form method="post" action="{action}" class="inline">
{csrf}<button type="submit" class="danger">Revoke</button>
</form>"""

_SECRET = """<div class="notice secret" role="status">
<p>Key <code>{id}</code> created. Copy the secret now: it is not shown again.</p>
<code class="secret-value">{secret}</code>
</div>
"""

_TEAM = """<p>In team <a href="{href}" class="team">{id}</a>, plan <strong>{plan}</strong>. Its usage today, the members' summed:</p>
<div class="scroll">
<table class="limits team-limits stack">
<thead><tr><th scope="col">Team limit</th><th scope="col" class="num">Used</th><th scope="col" class="num">Limit</th><th scope="col" class="num">Remaining</th><th scope="col">Resets</th></tr></thead>
<tbody>
{limits}</tbody>
</table>
</div>
"""

_NOTICES: Final = {"plan": "Plan changed.", "revoked": "Key revoked.", "team": "Team changed."}


def local_time(iso: str | None, tz: tzinfo) -> str:
    """An ISO 8601 time as ``2025-01-31 00:00`` in the accounting time zone."""
    return "—" if iso is None else f"{datetime.fromisoformat(iso).astimezone(tz):%Y-%m-%d %H:%M}"


def _amount(numbers: NumberFormat, value: object) -> str:
    if value is None:
        return "unlimited"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return numbers.number(value)
    return numbers.decimal(Decimal(str(value)), places=2, min_places=0)


def _unsplit(numbers: NumberFormat, lifetime: Mapping[str, Any]) -> Html:
    """Tokens of answers that reported a total but not its split (a blocking Dify
    workflow): said as such, so prompt + completion falling short reads right."""
    unsplit = lifetime["total_tokens"] - lifetime["prompt_tokens"] - lifetime["completion_tokens"]
    if unsplit <= 0:
        return Html("")
    return render("<dt>Split not reported</dt><dd>{n}</dd>\n", n=numbers.number(unsplit))


def _meter(numbers: NumberFormat, used: int, limit: int, remaining: int) -> Html:
    """How much of a limit is used: empty at none, full at the limit. ``optimum``
    below ``low`` makes a low value the good one, so the bar turns amber past 75 %
    and red past 90 % (a full green bar once read as "all of it left": issue 25)."""
    return render(
        '<meter min="0" max="{max}" low="{low}" high="{high}" optimum="0" value="{value}"'
        ' aria-label="{label}"></meter>',
        max=limit,
        low=limit * 0.75,
        high=limit * 0.9,
        value=min(used, limit),
        label=f"{numbers.number(used)} of {numbers.number(limit)} used, "
        f"{numbers.number(remaining)} left",
    )


def _money(numbers: NumberFormat, value: str | None) -> str:
    """A money budget's figure (an exact decimal string, None: unlimited)."""
    if value is None:
        return "unlimited"
    return numbers.decimal(Decimal(value), places=6, min_places=2)


def limit_rows(numbers: NumberFormat, limits: Mapping[str, Mapping[str, Any]], tz: tzinfo) -> Html:
    rows = []
    for name, entry in limits.items():
        label = _LIMIT_LABELS.get(name, name)
        if "allowed" in entry:  # a feature switch with a daily count
            cells = {
                "used": numbers.number(entry["used"]),
                "limit": "allowed" if entry["allowed"] else "not allowed",
                "remaining": "—",
                "meter": Html(""),
                "resets": local_time(entry.get("resets_at"), tz),
            }
        elif isinstance(entry.get("used"), str):  # money: exact decimal strings
            cells = {
                "used": _money(numbers, entry["used"]),
                "limit": _money(numbers, entry["limit"]),
                "remaining": _money(numbers, entry["remaining"]),
                "meter": Html(""),
                "resets": local_time(entry.get("resets_at"), tz),
            }
        elif "used" in entry:
            limit, used = entry["limit"], entry["used"]
            meter = _meter(numbers, used, limit, entry["remaining"]) if limit else Html("")
            cells = {
                "used": numbers.number(used),
                "limit": _amount(numbers, limit),
                "remaining": _amount(numbers, entry["remaining"]),
                "meter": meter,
                "resets": local_time(entry.get("resets_at"), tz),
            }
        else:  # a size or a span, not a counter
            cells = {
                "used": "—",
                "limit": _amount(numbers, entry["limit"]),
                "remaining": "—",
                "meter": Html(""),
                "resets": "—",
            }
        rows.append(render(_LIMIT_ROW, label=label, **cells))
    return concat(rows)


def grouped_table(
    numbers: NumberFormat, groups: Sequence[Mapping[str, Any]], *, by: str, title: str
) -> Html:
    """A table of this month's answers per ``by`` ("model" or "upstream"), a row
    per group and currency, from a report's ``month_by_<by>``."""
    rows = concat(
        render(
            _GROUP_ROW,
            name=group[by] if group[by] is not None else "—",
            answers=numbers.number(group["answers"]),
            tokens=numbers.number(group["total_tokens"]),
            prompt=numbers.number(group["prompt_tokens"]),
            completion=numbers.number(group["completion_tokens"]),
            cost=numbers.amount(Decimal(group["cost"]), group["currency"]),
        )
        for group in groups
    ) or Html('<tr><td colspan="6" class="muted">No answers this month.</td></tr>\n')
    return render(_GROUPS, title=title, kind=f"by-{by}", label=by.capitalize(), rows=rows)


def overrides_list(numbers: NumberFormat, overrides: Mapping[str, Any]) -> Html:
    if not overrides:
        return Html('<p class="muted">None: the plan applies as configured.</p>\n')
    items = concat(
        render(
            "<dt>{label}</dt><dd>{value}</dd>",
            label=_LIMIT_LABELS.get(name, name),
            value=_amount(numbers, value),
        )
        for name, value in sorted(overrides.items())
    )
    return render('<dl class="totals">{items}</dl>\n', items=items)


async def _user_page(
    page: Page, user_id: str, *, secret: tuple[str, str] | None = None, status: int = 200
) -> Response:
    gateway, base, numbers, tz = page.gateway, page.base, page.numbers, page.gateway.tz
    detail = await gateway.reports.detail(user_id, days=CHART_DAYS)
    user_url = user_path(base, user_id)
    daily = detail["daily"]
    start, end = daily[0]["day"], daily[-1]["day"]
    export = f"{base}/export"  # see gateway.dashboard.exports

    def export_link(kind: str, fmt: str) -> str:
        params = {"from": start, "to": end, "user": user_id, "format": fmt}
        return f"{export}/{kind}?{urlencode(params)}"

    keys = concat(
        render(
            _KEY_ROW,
            id=k["id"],
            name=k["name"] or "—",
            prefix=k["prefix"],
            created=local_time(k["created_at"], tz),
            status=render("revoked {when}", when=local_time(k["revoked_at"], tz))
            if k["revoked_at"]
            else render(
                _REVOKE,
                action=f"{user_url}/keys/{quote(k['id'], safe='')}/revoke",
                csrf=page.csrf_field(),
            ),
        )
        for k in detail["keys"]
    ) or Html('<tr><td colspan="5" class="muted">No keys.</td></tr>\n')
    days = concat(
        render(
            _DAY_ROW,
            day=row["day"],
            tokens=numbers.number(row["total_tokens"]),
            prompt=numbers.number(row["prompt_tokens"]),
            completion=numbers.number(row["completion_tokens"]),
            queries=numbers.number(row["queries"]),
            web=numbers.number(row["web_searches"]),
            cost=numbers.amount(Decimal(row["cost"]), row["currency"]),
        )
        for row in reversed(daily)
    )
    series = [
        {k: row[k] for k in ("day", "total_tokens", "queries", "web_searches")} for row in daily
    ]
    lifetime = detail["lifetime"]
    stored = detail["stored_plan"]
    plans = list(gateway.config.plans)
    notice = _NOTICES.get(page.request.query_params.get("done", ""))
    team = detail["team"]
    team_html = (
        render(
            _TEAM,
            href=team_path(base, team["id"]),
            id=team["id"],
            plan=team["plan"],
            limits=limit_rows(numbers, team["limits"], tz),
        )
        if team is not None
        else Html('<p class="muted">In no team.</p>\n')
    )
    teams = [
        ("", "No team"),
        *((t.team.id, t.team.id) for t in await gateway.storage.list_teams(day=gateway.today())),
    ]
    body = render(
        _USER,
        base=base,
        id=user_id,
        plan=detail["plan"],
        plan_note=""
        if stored == detail["plan"]
        else f" (stored plan {stored!r} is no longer configured)",
        created=local_time(detail["created_at"], tz),
        day=detail["day"],
        timezone=detail["timezone"],
        notice=render('<p class="notice" role="status">{n}</p>\n', n=notice) if notice else "",
        secret=render(_SECRET, id=secret[0], secret=secret[1]) if secret else "",
        limits=limit_rows(numbers, detail["limits"], tz),
        lifetime_tokens=badge(numbers.number(lifetime["total_tokens"]), lifetime["total_tokens"]),
        prompt_tokens=numbers.number(lifetime["prompt_tokens"]),
        completion_tokens=numbers.number(lifetime["completion_tokens"]),
        unsplit=_unsplit(numbers, lifetime),
        lifetime_cost=numbers.amount(Decimal(lifetime["cost"]), lifetime["currency"]),
        user_url=user_url,
        csrf=page.csrf_field(),
        plan_options=options(((p, p) for p in plans), detail["plan"]),
        overrides=overrides_list(numbers, detail["overrides"]),
        team=team_html,
        by_model=grouped_table(numbers, detail["month_by_model"], by="model", title="By model"),
        by_upstream=grouped_table(
            numbers, detail["month_by_upstream"], by="upstream", title="By upstream"
        ),
        team_options=options(teams, team["id"] if team is not None else ""),
        days=CHART_DAYS,
        locale=numbers.locale,
        series=orjson.dumps(series).decode(),
        daily=days,
        keys=keys,
        export=export,
        events_csv=export_link("events", "csv"),
        events_json=export_link("events", "json"),
        daily_csv=export_link("daily", "csv"),
        daily_json=export_link("daily", "json"),
        start=start,
        end=end,
    )
    return page.document(user_id, body, script=True, status=status)


@signed_in
async def user(page: Page) -> Response:
    return await _user_page(page, page.request.path_params["user_id"])


def _back_to(page: Page, user_id: str, done: str) -> Response:
    # Post/redirect/get: a reload shows the page instead of repeating the change.
    return RedirectResponse(f"{user_path(page.base, user_id)}?done={done}", 303)


@signed_in
async def change_plan(page: Page) -> Response:
    user_id = page.request.path_params["user_id"]
    await page.gateway.reports.user(user_id)
    await page.gateway.accounts.set_plan(user_id, page.form.get("plan", ""))
    return _back_to(page, user_id, "plan")


@signed_in
async def change_team(page: Page) -> Response:
    user_id = page.request.path_params["user_id"]
    await page.gateway.reports.user(user_id)
    await page.gateway.accounts.set_team(user_id, page.form.get("team") or None)
    return _back_to(page, user_id, "team")


@signed_in
async def create_key(page: Page) -> Response:
    user_id = page.request.path_params["user_id"]
    record, secret = await page.gateway.accounts.create_key(
        user_id, name=page.form.get("name", "")[:100]
    )
    # The secret exists only in this response; the page is not stored (Cache-Control).
    return await _user_page(page, user_id, secret=(record.id, secret), status=201)


@signed_in
async def revoke_key(page: Page) -> Response:
    user_id, key_id = page.request.path_params["user_id"], page.request.path_params["key_id"]
    keys = await page.gateway.storage.list_keys(user_id)
    if not any(k.id == key_id for k in keys):
        return message(
            page.base, "Not found", f"No key {key_id!r} of this user.", status=404, csrf=page.csrf
        )
    await page.gateway.accounts.revoke_key(key_id)
    return _back_to(page, user_id, "revoked")
