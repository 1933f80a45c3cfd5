"""The users table at /dashboard/: search, plan filter, sorting and paging.

The query string is the table's whole state (``q``, ``plan``, ``sort``, ``order``,
``page``), so every view is a link; a value the table does not know falls back to
the default instead of failing. Token counts are badges, dimmed when zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal
from urllib.parse import urlencode

from starlette.responses import Response

from gateway.dashboard.render import (
    Html,
    badge,
    concat,
    options,
    render,
    team_path,
    user_path,
)
from gateway.dashboard.signin import Page, signed_in
from gateway.storage import UserSort

PAGE_SIZE: Final = 50

Order = Literal["asc", "desc"]
_SORTS: Final[dict[str, UserSort]] = {
    "id": "id",
    "lifetime_tokens": "lifetime_tokens",
    "tokens_today": "tokens_today",
}
_FIRST_ORDER: Final[dict[str, Order]] = {
    "id": "asc",
    "lifetime_tokens": "desc",
    "tokens_today": "desc",
}


@dataclass(frozen=True, slots=True)
class UsersQuery:
    """The table's state, read from the query string and written back into links."""

    q: str = ""
    plan: str = ""
    sort: UserSort = "lifetime_tokens"
    order: Order = "desc"
    page: int = 1

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> UsersQuery:
        sort = _SORTS.get(params.get("sort", ""), "lifetime_tokens")
        wanted = params.get("order", "")
        order: Order = (
            "asc" if wanted == "asc" else "desc" if wanted == "desc" else _FIRST_ORDER[sort]
        )
        page = params.get("page", "1")
        return cls(
            q=params.get("q", "").strip()[:200],
            plan=params.get("plan", "").strip()[:200],
            sort=sort,
            order=order,
            page=max(int(page), 1) if page.isascii() and page.isdigit() and len(page) < 8 else 1,
        )

    def link(self, base: str, **changes: Any) -> str:
        query = replace(self, **changes)
        params = {
            "q": query.q,
            "plan": query.plan,
            "sort": query.sort,
            "order": query.order,
            "page": str(query.page) if query.page > 1 else "",
        }
        return f"{base}/?{urlencode({k: v for k, v in params.items() if v})}"


_USERS = """<h1>Users</h1>
<form class="filters" method="get" action="{base}/" role="search">
<input type="hidden" name="sort" value="{sort}">
<input type="hidden" name="order" value="{order}">
<label>Search <input type="search" name="q" value="{q}" placeholder="user id"></label>
<label>Plan <select name="plan">{plans}</select></label>
<button type="submit">Filter</button>
</form>
<p class="muted">{summary}</p>
<div class="scroll">
<table class="users stack">
<thead><tr>{head}</tr></thead>
<tbody>
{rows}</tbody>
</table>
</div>
{pager}"""

_USER_ROW = """<tr>
<td data-label="User"><a href="{href}">{id}</a></td>
<td data-label="Plan">{plan}</td>
<td data-label="Team">{team}</td>
<td class="num" data-label="Lifetime tokens">{lifetime_tokens}</td>
<td class="num" data-label="Lifetime cost">{lifetime_cost}</td>
<td class="num" data-label="Tokens today">{tokens_today}</td>
<td class="num" data-label="Queries today">{queries_today}</td>
</tr>
"""


def _sort_header(query: UsersQuery, base: str, column: UserSort, label: str, num: bool) -> Html:
    current = query.sort == column
    order: Order = ("asc" if query.order == "desc" else "desc") if current else _FIRST_ORDER[column]
    return render(
        '<th scope="col"{cls}{aria}><a href="{href}">{label}{arrow}</a></th>',
        cls=Html(' class="num"') if num else Html(""),
        aria=render(' aria-sort="{s}"', s="ascending" if query.order == "asc" else "descending")
        if current
        else Html(""),
        href=query.link(base, sort=column, order=order, page=1),
        label=label,
        arrow=(" ▲" if query.order == "asc" else " ▼") if current else "",
    )


def _pager(query: UsersQuery, base: str, pages: int) -> Html:
    if pages <= 1:
        return Html("")
    prev = (
        render(
            '<a rel="prev" href="{href}">← Previous</a>', href=query.link(base, page=query.page - 1)
        )
        if query.page > 1
        else Html('<span class="muted">← Previous</span>')
    )
    nxt = (
        render('<a rel="next" href="{href}">Next →</a>', href=query.link(base, page=query.page + 1))
        if query.page < pages
        else Html('<span class="muted">Next →</span>')
    )
    return render(
        '<nav class="pager" aria-label="Pages">{prev}<span>Page {page} of {pages}</span>{next}</nav>\n',
        prev=prev,
        next=nxt,
        page=query.page,
        pages=pages,
    )


@signed_in
async def users(page: Page) -> Response:
    gateway, base, numbers = page.gateway, page.base, page.numbers
    query = UsersQuery.parse(page.request.query_params)
    plan, search = query.plan or None, query.q or None
    total = await gateway.storage.count_users(plan=plan, search=search)
    pages = max(1, -(-total // PAGE_SIZE))
    query = replace(query, page=min(query.page, pages))
    summaries = await gateway.storage.list_users(
        day=gateway.today(),
        plan=plan,
        search=search,
        sort=query.sort,
        descending=query.order == "desc",
        limit=PAGE_SIZE,
        offset=(query.page - 1) * PAGE_SIZE,
    )
    rows = concat(
        render(
            _USER_ROW,
            href=user_path(base, s.user.id),
            id=s.user.id,
            plan=s.user.plan,
            team=render(
                '<a href="{href}">{id}</a>', href=team_path(base, s.user.team), id=s.user.team
            )
            if s.user.team is not None
            else Html('<span class="muted">—</span>'),
            lifetime_tokens=badge(numbers.number(s.user.lifetime_tokens), s.user.lifetime_tokens),
            lifetime_cost=numbers.amount(s.user.lifetime_cost, gateway.currency),
            tokens_today=badge(numbers.number(s.today.total_tokens), s.today.total_tokens),
            queries_today=numbers.number(s.today.queries),
        )
        for s in summaries
    ) or Html('<tr><td colspan="7" class="muted">No users match.</td></tr>\n')
    head = concat(
        [
            _sort_header(query, base, "id", "User", num=False),
            Html('<th scope="col">Plan</th>'),
            Html('<th scope="col">Team</th>'),
            _sort_header(query, base, "lifetime_tokens", "Lifetime tokens", num=True),
            Html('<th scope="col" class="num">Lifetime cost</th>'),
            _sort_header(query, base, "tokens_today", "Tokens today", num=True),
            Html('<th scope="col" class="num">Queries today</th>'),
        ]
    )
    plans = [("", "All plans"), *((name, name) for name in gateway.config.plans)]
    if query.plan and query.plan not in gateway.config.plans:
        plans.append((query.plan, query.plan))
    body = render(
        _USERS,
        base=base,
        sort=query.sort,
        order=query.order,
        q=query.q,
        plans=options(plans, query.plan),
        summary=f"{numbers.number(total)} user{'' if total == 1 else 's'}"
        + (f" · page {query.page} of {pages}" if pages > 1 else ""),
        head=head,
        rows=rows,
        pager=_pager(query, base, pages),
    )
    return page.document("Users", body)
