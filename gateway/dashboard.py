"""The admin dashboard at /dashboard: a users table and a page per user (issue 6).

Mounted by the app as ``Mount("/dashboard", routes=dashboard.routes)``; every
handler finds the gateway at ``request.app.state.gateway``.

- With no admin token configured the dashboard answers 404, like the admin API.
- Signing in with the admin token sets a stateless session cookie: an expiry time
  and a nonce, signed with HMAC-SHA256 under a key derived from the token, so
  rotating the token ends every session.
- Each state-changing POST carries a CSRF token (an HMAC of the session value) and
  must not come from another origin (the ``Origin`` header, when sent, names this
  host): OWASP's "signed double-submit" and "verify the origin" defences.
- Pages are built from the templates below by `render`, which escapes every value
  that is not already HTML. The tables are complete without JavaScript; the
  30-day chart is drawn by ``static/dashboard.js``. Nothing is loaded from another
  origin (the Content-Security-Policy says so too).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import html
import importlib.resources
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.runtime import Gateway
from gateway.storage import UserSort

COOKIE: Final = "gateway_dashboard"
PAGE_SIZE: Final = 50
CHART_DAYS: Final = 30
_MAX_FORM_BYTES: Final = 16 * 1024

# --- numbers for a locale (pure) ---------------------------------------------------

# (thousands separator, decimal separator), as CLDR and so the browsers' Intl give them.
_LOCALES: Final[dict[str, tuple[str, str]]] = {
    "en-US": (",", "."),
    "en-GB": (",", "."),
    "vi-VN": (".", ","),
    "de-DE": (".", ","),
    "fr-FR": ("\u202f", ","),  # narrow no-break space
    "ja-JP": (",", "."),
}
_BY_TAG: Final = {tag.lower(): tag for tag in _LOCALES}
_BY_LANGUAGE: Final = {"en": "en-US", "vi": "vi-VN", "de": "de-DE", "fr": "fr-FR", "ja": "ja-JP"}


@dataclass(frozen=True, slots=True)
class NumberFormat:
    locale: str  # the tag in use after fallback; the chart's Intl.NumberFormat gets it too
    group: str
    point: str

    def number(self, value: int) -> str:
        digits = f"{abs(value):,}".replace(",", self.group)
        return f"-{digits}" if value < 0 else digits

    def decimal(self, value: Decimal, *, places: int, min_places: int = 0) -> str:
        """Rounded to ``places`` decimals, trailing zeros kept down to ``min_places``."""
        rounded = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
        whole, _, fraction = f"{abs(rounded):f}".partition(".")
        fraction = fraction.rstrip("0").ljust(min_places, "0")
        text = self.number(int(whole)) + (self.point + fraction if fraction else "")
        return f"-{text}" if rounded < 0 else text

    def money(self, value: Decimal) -> str:
        # Fixed decimals, so that a column of costs lines up.
        return self.decimal(value, places=4, min_places=4)


def number_format(locale: str) -> NumberFormat:
    """The format of a BCP 47 tag: the tag itself, else its language, else en-US."""
    wanted = locale.replace("_", "-").lower()
    tag = _BY_TAG.get(wanted) or _BY_LANGUAGE.get(wanted.split("-")[0], "en-US")
    group, point = _LOCALES[tag]
    return NumberFormat(locale=tag, group=group, point=point)


# --- HTML with escaping ------------------------------------------------------------


class Html(str):
    """Text that is already HTML: inserted into templates unchanged."""

    __slots__ = ()


def escape(value: object) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def render(template: str, /, **values: object) -> Html:
    """``template`` with each ``{name}`` replaced by its value, escaped unless it is Html."""
    return Html(template.format_map({name: escape(value) for name, value in values.items()}))


def concat(parts: Iterable[Html]) -> Html:
    return Html("".join(parts))


# --- sessions and CSRF tokens (pure) -----------------------------------------------


def session_key(admin_token: str) -> bytes:
    # A key of its own rather than the token: a cookie never reveals anything the
    # admin API would accept, and a new token invalidates every cookie.
    return hmac.new(admin_token.encode(), b"gateway dashboard session v1", hashlib.sha256).digest()


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()


def new_session(key: bytes, *, now: float, hours: float) -> str:
    expires = str(int(now + hours * 3600))
    nonce = secrets.token_urlsafe(12)
    return f"{expires}.{nonce}.{_mac(key, 'session', expires, nonce)}"


def session_valid(key: bytes, value: str, *, now: float) -> bool:
    expires, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    # isascii: str.isdigit() also accepts digits that int() refuses ("²").
    if not (expires.isascii() and expires.isdigit() and len(expires) < 16 and nonce and mac):
        return False
    good = hmac.compare_digest(mac.encode(), _mac(key, "session", expires, nonce).encode())
    return good and int(expires) > now


def csrf_token(key: bytes, session: str) -> str:
    return _mac(key, "csrf", session)


def same_origin(headers: Headers) -> bool:
    """False when the browser says the request comes from another origin."""
    origin = headers.get("origin")
    if origin is None:
        # Older browsers omit Origin on same-origin form posts; Fetch Metadata still tells.
        return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    host = headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc.lower() == host.lower()


def safe_next(value: str | None, base: str) -> str:
    """Where to go after signing in: a path inside the dashboard, nothing else."""
    if (
        value
        and value.startswith(base + "/")
        and "//" not in value
        and "\\" not in value
        and all(32 < ord(c) < 127 for c in value)
    ):
        return value
    return base + "/"


# --- responses ---------------------------------------------------------------------

_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def _static_version() -> str:
    # Computed once: a new release changes the URLs, so browsers never mix old and new.
    digest = hashlib.sha256()
    folder = importlib.resources.files("gateway") / "static"
    for name in ("dashboard.css", "dashboard.js"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


_VERSION: Final = _static_version()

_LAYOUT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title} · Gateway admin</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{base}/static/dashboard.css?v={version}">
{script}</head>
<body>
<header class="top">
<a class="brand" href="{base}/">Gateway <span>admin</span></a>
{nav}</header>
<main>
{body}</main>
</body>
</html>
"""

_NAV = """<nav>
<a href="{base}/">Users</a>
<form method="post" action="{base}/logout">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit" class="link">Sign out</button>
</form>
</nav>
"""

_SCRIPT = '<script src="{base}/static/dashboard.js?v={version}" defer></script>\n'


def _document(
    base: str,
    title: str,
    body: Html,
    *,
    csrf: str | None = None,
    script: bool = False,
    status: int = 200,
) -> HTMLResponse:
    page = render(
        _LAYOUT,
        title=title,
        base=base,
        version=_VERSION,
        script=render(_SCRIPT, base=base, version=_VERSION) if script else Html(""),
        nav=render(_NAV, base=base, csrf=csrf) if csrf is not None else Html(""),
        body=body,
    )
    return HTMLResponse(page, status_code=status, headers=_HEADERS)


def _not_found() -> Response:
    # The same answer as for any unknown path: the admin surface is off.
    return PlainTextResponse("Not Found", status_code=404)


def _message(base: str, title: str, text: str, *, status: int, csrf: str | None = None) -> Response:
    body = render('<h1>{title}</h1>\n<p class="notice error">{text}</p>\n', title=title, text=text)
    return _document(base, title, body, csrf=csrf, status=status)


def _forbidden(base: str) -> Response:
    return _message(
        base,
        "Refused",
        "This form came from another site or has expired. Reload the page and try again.",
        status=403,
    )


def _base(request: Request) -> str:
    # Where the dashboard is mounted ("/dashboard"), including any proxy root path.
    return str(request.scope.get("root_path", "")).rstrip("/")


def _user_url(base: str, user_id: str) -> str:
    return f"{base}/users/{quote(user_id, safe='')}"


async def _read_form(request: Request) -> dict[str, str] | None:
    """An urlencoded form body (the first value of each field); None when too large."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return None
    form: dict[str, str] = {}
    for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        form.setdefault(name, value)
    return form


# --- signed-in pages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    """What a signed-in handler works with."""

    request: Request
    gateway: Gateway
    base: str
    csrf: str
    numbers: NumberFormat
    form: Mapping[str, str] = field(default_factory=dict)

    def document(
        self, title: str, body: Html, *, script: bool = False, status: int = 200
    ) -> HTMLResponse:
        return _document(self.base, title, body, csrf=self.csrf, script=script, status=status)

    def csrf_field(self) -> Html:
        return render('<input type="hidden" name="csrf" value="{csrf}">', csrf=self.csrf)


Handler = Callable[[Page], Awaitable[Response]]


def _admin(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Sign-in, origin and CSRF checks around a page or form handler."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        token = gateway.config.admin.token
        if not token:
            return _not_found()
        base = _base(request)
        post = request.method == "POST"
        if post and not same_origin(request.headers):
            return _forbidden(base)
        key = session_key(token)
        session = request.cookies.get(COOKIE, "")
        if not session_valid(key, session, now=gateway.clock.now().timestamp()):
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            target = safe_next(back if not post else None, base)
            return RedirectResponse(f"{base}/login?{urlencode({'next': target})}", 303)
        csrf = csrf_token(key, session)
        form: Mapping[str, str] = {}
        if post:
            parsed = await _read_form(request)
            if parsed is None:
                return _message(base, "Too large", "The form is too large.", status=413)
            if not hmac.compare_digest(parsed.get("csrf", "").encode(), csrf.encode()):
                return _forbidden(base)
            form = parsed
        page = Page(
            request=request,
            gateway=gateway,
            base=base,
            csrf=csrf,
            numbers=number_format(gateway.config.dashboard.locale),
            form=form,
        )
        try:
            return await handler(page)
        except GatewayError as exc:
            title = "Not found" if exc.status == 404 else "Could not do that"
            return _message(base, title, exc.message, status=exc.status, csrf=csrf)

    return endpoint


# --- sign-in and sign-out -----------------------------------------------------------

_LOGIN = """<section class="card login">
<h1>Sign in</h1>
{error}<form method="post" action="{base}/login">
<input type="hidden" name="next" value="{next}">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>
</section>
"""


async def login(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    token = gateway.config.admin.token
    if not token:
        return _not_found()
    base = _base(request)
    now = gateway.clock.now().timestamp()
    key = session_key(token)
    if request.method != "POST":
        target = safe_next(request.query_params.get("next"), base)
        if session_valid(key, request.cookies.get(COOKIE, ""), now=now):
            return RedirectResponse(target, 303)
        return _document(base, "Sign in", render(_LOGIN, base=base, next=target, error=""))
    if not same_origin(request.headers):
        return _forbidden(base)
    form = await _read_form(request)
    if form is None:
        return _message(base, "Too large", "The form is too large.", status=413)
    target = safe_next(form.get("next"), base)
    if not hmac.compare_digest(form.get("token", "").encode(), token.encode()):
        error = Html('<p class="notice error" role="alert">That is not the admin token.</p>\n')
        body = render(_LOGIN, base=base, next=target, error=error)
        return _document(base, "Sign in", body, status=401)
    settings = gateway.config.dashboard
    response = RedirectResponse(target, 303)
    response.set_cookie(
        COOKIE,
        new_session(key, now=now, hours=settings.session_hours),
        max_age=int(settings.session_hours * 3600),
        path=base or "/",
        secure=settings.secure_cookie,
        httponly=True,
        samesite="strict",
    )
    return response


@_admin
async def logout(page: Page) -> Response:
    response = RedirectResponse(f"{page.base}/login", 303)
    response.delete_cookie(
        COOKIE,
        path=page.base or "/",
        secure=page.gateway.config.dashboard.secure_cookie,
        httponly=True,
        samesite="strict",
    )
    return response


# --- users table -------------------------------------------------------------------

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
<table class="users">
<thead><tr>{head}</tr></thead>
<tbody>
{rows}</tbody>
</table>
</div>
{pager}"""

_USER_ROW = """<tr>
<td><a href="{href}">{id}</a></td>
<td>{plan}</td>
<td class="num">{lifetime_tokens}</td>
<td class="num">{lifetime_cost}</td>
<td class="num">{tokens_today}</td>
<td class="num">{queries_today}</td>
</tr>
"""


def _badge(text: str, value: int) -> Html:
    return render(
        '<span class="{cls}">{text}</span>', cls="badge" if value else "badge zero", text=text
    )


def _options(values: Iterable[tuple[str, str]], selected: str) -> Html:
    return concat(
        render(
            '<option value="{value}"{sel}>{label}</option>',
            value=value,
            label=label,
            sel=Html(" selected") if value == selected else Html(""),
        )
        for value, label in values
    )


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


@_admin
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
            href=_user_url(base, s.user.id),
            id=s.user.id,
            plan=s.user.plan,
            lifetime_tokens=_badge(numbers.number(s.user.lifetime_tokens), s.user.lifetime_tokens),
            lifetime_cost=numbers.money(s.user.lifetime_cost),
            tokens_today=_badge(numbers.number(s.today.total_tokens), s.today.total_tokens),
            queries_today=numbers.number(s.today.queries),
        )
        for s in summaries
    ) or Html('<tr><td colspan="6" class="muted">No users match.</td></tr>\n')
    head = concat(
        [
            _sort_header(query, base, "id", "User", num=False),
            Html('<th scope="col">Plan</th>'),
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
        plans=_options(plans, query.plan),
        summary=f"{numbers.number(total)} user{'' if total == 1 else 's'}"
        + (f" · page {query.page} of {pages}" if pages > 1 else ""),
        head=head,
        rows=rows,
        pager=_pager(query, base, pages),
    )
    return page.document("Users", body)


# --- one user ------------------------------------------------------------------------

_LIMIT_LABELS: Final = {
    "queries_per_day": "Queries per day",
    "tokens_per_day": "Tokens per day",
    "tokens_per_month": "Tokens per month",
    "web_searches_per_day": "Web searches per day",
    "advanced_rag": "Advanced RAG",
    "file_size_mb": "Largest upload (MiB)",
    "chat_history_days": "Chat history (days)",
    "max_concurrent_streams": "Concurrent answers",
}

_USER = """<p class="crumbs"><a href="{base}/">Users</a> /</p>
<h1 class="user-id">{id}</h1>
<p class="muted">Plan <strong class="plan">{plan}</strong>{plan_note} · since {created} · today is {day} · times in {timezone}</p>
{notice}{secret}<div class="grid">
<section class="card">
<h2>Today</h2>
<div class="scroll">
<table class="limits">
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
<dt>Cost</dt><dd>{lifetime_cost}</dd>
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
<h2>Last {days} days</h2>
<div id="chart" class="chart" role="img" aria-label="Tokens, queries and web searches per day, last {days} days" data-locale="{locale}" data-series="{series}"></div>
<noscript><p class="muted">The chart needs JavaScript; the table below has the same numbers.</p></noscript>
<details class="daily">
<summary>Daily numbers</summary>
<div class="scroll">
<table>
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
<table class="keys">
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

_LIMIT_ROW = """<tr><th scope="row">{label}</th><td class="num">{used}</td><td class="num">{limit}</td><td class="num">{remaining}{meter}</td><td>{resets}</td></tr>
"""

_DAY_ROW = """<tr><td>{day}</td><td class="num">{tokens}</td><td class="num">{prompt}</td><td class="num">{completion}</td><td class="num">{queries}</td><td class="num">{web}</td><td class="num">{cost}</td></tr>
"""

_KEY_ROW = """<tr><td><code>{id}</code></td><td>{name}</td><td><code>{prefix}…</code></td><td>{created}</td><td>{status}</td></tr>
"""

_REVOKE = """<form method="post" action="{action}" class="inline">
{csrf}<button type="submit" class="danger">Revoke</button>
</form>"""

_SECRET = """<div class="notice secret" role="status">
<p>Key <code>{id}</code> created. Copy the secret now: it is not shown again.</p>
<code class="secret-value">{secret}</code>
</div>
"""

_NOTICES: Final = {"plan": "Plan changed.", "revoked": "Key revoked."}


def _when(iso: str | None, tz: tzinfo) -> str:
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


def _limit_rows(numbers: NumberFormat, limits: Mapping[str, Mapping[str, Any]], tz: tzinfo) -> Html:
    rows = []
    for name, entry in limits.items():
        label = _LIMIT_LABELS.get(name, name)
        if "allowed" in entry:  # a feature switch with a daily count
            cells = {
                "used": numbers.number(entry["used"]),
                "limit": "allowed" if entry["allowed"] else "not allowed",
                "remaining": "—",
                "meter": Html(""),
                "resets": _when(entry.get("resets_at"), tz),
            }
        elif "used" in entry:
            limit, used = entry["limit"], entry["used"]
            meter = (
                render('<meter min="0" max="{max}" value="{value}"></meter>', max=limit, value=used)
                if limit
                else Html("")
            )
            cells = {
                "used": numbers.number(used),
                "limit": _amount(numbers, limit),
                "remaining": _amount(numbers, entry["remaining"]),
                "meter": meter,
                "resets": _when(entry.get("resets_at"), tz),
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


def _overrides(numbers: NumberFormat, overrides: Mapping[str, Any]) -> Html:
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
    user_url = _user_url(base, user_id)
    daily = detail["daily"]
    start, end = daily[0]["day"], daily[-1]["day"]
    export = f"{base}/export"  # see _AdminExport

    def export_link(kind: str, fmt: str) -> str:
        params = {"from": start, "to": end, "user": user_id, "format": fmt}
        return f"{export}/{kind}?{urlencode(params)}"

    keys = concat(
        render(
            _KEY_ROW,
            id=k["id"],
            name=k["name"] or "—",
            prefix=k["prefix"],
            created=_when(k["created_at"], tz),
            status=render("revoked {when}", when=_when(k["revoked_at"], tz))
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
            cost=numbers.money(Decimal(row["cost"])),
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
    body = render(
        _USER,
        base=base,
        id=user_id,
        plan=detail["plan"],
        plan_note=""
        if stored == detail["plan"]
        else f" (stored plan {stored!r} is no longer configured)",
        created=_when(detail["created_at"], tz),
        day=detail["day"],
        timezone=detail["timezone"],
        notice=render('<p class="notice" role="status">{n}</p>\n', n=notice) if notice else "",
        secret=render(_SECRET, id=secret[0], secret=secret[1]) if secret else "",
        limits=_limit_rows(numbers, detail["limits"], tz),
        lifetime_tokens=_badge(numbers.number(lifetime["total_tokens"]), lifetime["total_tokens"]),
        prompt_tokens=numbers.number(lifetime["prompt_tokens"]),
        completion_tokens=numbers.number(lifetime["completion_tokens"]),
        lifetime_cost=numbers.money(Decimal(lifetime["cost"])),
        user_url=user_url,
        csrf=page.csrf_field(),
        plan_options=_options(((p, p) for p in plans), detail["plan"]),
        overrides=_overrides(numbers, detail["overrides"]),
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


@_admin
async def user(page: Page) -> Response:
    return await _user_page(page, page.request.path_params["user_id"])


def _back_to(page: Page, user_id: str, done: str) -> Response:
    # Post/redirect/get: a reload shows the page instead of repeating the change.
    return RedirectResponse(f"{_user_url(page.base, user_id)}?done={done}", 303)


@_admin
async def change_plan(page: Page) -> Response:
    user_id = page.request.path_params["user_id"]
    await page.gateway.reports.user(user_id)
    await page.gateway.set_plan(user_id, page.form.get("plan", ""))
    return _back_to(page, user_id, "plan")


@_admin
async def create_key(page: Page) -> Response:
    user_id = page.request.path_params["user_id"]
    await page.gateway.reports.user(user_id)
    record, secret = await page.gateway.create_key(user_id, name=page.form.get("name", "")[:100])
    # The secret exists only in this response; the page is not stored (Cache-Control).
    return await _user_page(page, user_id, secret=(record.id, secret), status=201)


@_admin
async def revoke_key(page: Page) -> Response:
    user_id, key_id = page.request.path_params["user_id"], page.request.path_params["key_id"]
    keys = await page.gateway.storage.list_keys(user_id)
    if not any(k.id == key_id for k in keys):
        return _message(
            page.base, "Not found", f"No key {key_id!r} of this user.", status=404, csrf=page.csrf
        )
    await page.gateway.revoke_key(key_id)
    return _back_to(page, user_id, "revoked")


# --- exports ----------------------------------------------------------------------------


class _AdminExport(Response):
    """Hands a signed-in request to the admin API's export endpoint, which streams the
    file. A link cannot carry the admin API's bearer token, and the session cookie is
    scoped to the dashboard; the parameters and output are the admin API's own."""

    def __init__(self, dataset: str, token: str) -> None:
        super().__init__()
        self.dataset, self.token = dataset, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = str(scope.get("app_root_path", ""))
        path = f"{root}/admin/export/{self.dataset}"
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"authorization", b"cookie")]
        headers.append((b"authorization", f"Bearer {self.token}".encode()))
        inner = {k: v for k, v in scope.items() if k not in ("path_params", "endpoint", "route")}
        inner.update(path=path, raw_path=path.encode(), root_path=root, headers=headers)
        await scope["app"](inner, receive, send)


def _export(dataset: Literal["events", "daily"]) -> Callable[[Request], Awaitable[Response]]:
    async def export(page: Page) -> Response:
        return _AdminExport(dataset, page.gateway.config.admin.token)

    export.__name__ = f"export_{dataset}"
    return _admin(export)


# --- static files and routes ----------------------------------------------------------


class _Static:
    """The dashboard's CSS and JS, absent like the rest of it when no admin token is set."""

    def __init__(self) -> None:
        self.files = StaticFiles(packages=[("gateway", "static")])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Gateway = scope["app"].state.gateway
        response = self.files if gateway.config.admin.token else _not_found()
        await response(scope, receive, send)


# Relative to the mount point: the app mounts them with Mount("/dashboard", routes=routes).
# POST routes come first: a user id may contain "/", so the user page's path pattern
# would match their paths too.
routes: list[BaseRoute] = [
    Route("/", users, methods=["GET"], name="dashboard_users"),
    Route("/login", login, methods=["GET", "POST"], name="dashboard_login"),
    Route("/logout", logout, methods=["POST"], name="dashboard_logout"),
    Route(
        "/users/{user_id:path}/keys/{key_id}/revoke",
        revoke_key,
        methods=["POST"],
        name="dashboard_revoke_key",
    ),
    Route("/users/{user_id:path}/keys", create_key, methods=["POST"], name="dashboard_create_key"),
    Route("/users/{user_id:path}/plan", change_plan, methods=["POST"], name="dashboard_plan"),
    Route("/users/{user_id:path}", user, methods=["GET"], name="dashboard_user"),
    Route("/export/events", _export("events"), methods=["GET"], name="dashboard_export_events"),
    Route("/export/daily", _export("daily"), methods=["GET"], name="dashboard_export_daily"),
    Mount("/static", app=_Static(), name="dashboard_static"),
]

__all__ = ["COOKIE", "routes"]
