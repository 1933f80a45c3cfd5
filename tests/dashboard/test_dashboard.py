"""The admin dashboard: pure helpers by tables of cases, the HTTP surface with httpx,
and one walk through the pages in a real headless Chromium (Debian's, driven by
Playwright), against a real gateway on a free port.

Screenshots of the main pages go to artifacts/dashboard/ (git-ignored).
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from starlette.datastructures import Headers

from gateway.clock import FixedClock
from gateway.dashboard.formats import number_format
from gateway.dashboard.render import Html, render
from gateway.dashboard.session import (
    COOKIE,
    csrf_token,
    new_session,
    safe_next,
    same_origin,
    session_key,
    session_valid,
)
from gateway.dashboard.users_table import PAGE_SIZE
from gateway.keys import hash_key
from gateway.storage import AdmissionLimits, UsageEvent
from tests.browser import IN_BROWSER, require_chromium
from tests.harness import USER, Harness, running_gateway

TOKEN = "dashboard-admin-token-0123456789"
ENV = {"GATEWAY_ADMIN_TOKEN": TOKEN}
SETTINGS: dict[str, Any] = {
    "plans": {
        "free": {"queries_per_day": 100, "tokens_per_day": 50_000, "web_searches_per_day": 5},
        "pro": {"queries_per_day": 1000},
    },
    "dashboard": {"locale": "vi-VN"},
}
CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
BIG = "bob"  # a user with 1,234,567 lifetime tokens
EVIL = "<script>alert(1)</script>"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"


@contextlib.asynccontextmanager
async def admin_gateway(
    sqlite_url: str, settings: dict[str, Any] | None = None
) -> AsyncIterator[Harness]:
    merged = {**SETTINGS, **(settings or {})}
    async with running_gateway(sqlite_url, settings=merged, env=ENV) as h:
        yield h


def client(h: Harness) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=h.url, timeout=10, follow_redirects=False)


async def sign_in(c: httpx.AsyncClient) -> str:
    """Sign ``c`` in; returns the page's CSRF token."""
    response = await c.post("/dashboard/login", data={"token": TOKEN})
    assert response.status_code == 303, response.text
    page = await c.get("/dashboard/")
    assert page.status_code == 200
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert match is not None
    return match.group(1)


async def spend(
    h: Harness, user_id: str, tokens: int, *, day: date, web: int = 0, queries: int = 0
) -> None:
    """Usage for ``user_id`` on ``day``: settled tokens and admitted queries."""
    await h.storage.ensure_user(user_id, plan="free")
    prompt = tokens * 4 // 5
    await h.storage.settle(
        UsageEvent(
            answer_id=f"{user_id}-{day}-{tokens}",
            user_id=user_id,
            day=day,
            created_at=datetime.now(UTC),
            endpoint="chat-messages",
            prompt_tokens=prompt,
            completion_tokens=tokens - prompt,
            total_tokens=tokens,
            cost=Decimal(tokens) / Decimal(100_000),
            web_searches=web,
        )
    )
    for _ in range(queries):
        await h.storage.admit(
            user_id,
            day=day,
            month_start=day.replace(day=1),
            limits=AdmissionLimits(),
            now=datetime.now(UTC),
        )


# --- pure helpers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "value", "expected"),
    [
        ("vi-VN", 1_234_567, "1.234.567"),
        ("en-US", 1_234_567, "1,234,567"),
        ("en-GB", 1_234_567, "1,234,567"),
        ("de-DE", 1_234_567, "1.234.567"),
        ("fr-FR", 1_234_567, "1\u202f234\u202f567"),
        ("ja-JP", 1_234_567, "1,234,567"),
        ("vi-VN", 0, "0"),
        ("vi-VN", 999, "999"),
        ("vi-VN", -1234, "-1.234"),
        ("vi_vn", 1000, "1.000"),  # POSIX spelling
        ("de-AT", 1000, "1.000"),  # the language's format
        ("xx-YY", 1000, "1,000"),  # unknown: en-US
        ("", 1000, "1,000"),
    ],
)
def test_numbers_are_formatted_for_the_locale(locale: str, value: int, expected: str) -> None:
    assert number_format(locale).number(value) == expected


@pytest.mark.parametrize(
    ("locale", "value", "expected"),
    [
        ("vi-VN", "1234.5", "1.234,5000"),
        ("vi-VN", "0.0013030", "0,0013"),
        ("vi-VN", "0.00005", "0,0001"),  # half up
        ("en-US", "12.34567", "12.3457"),
        ("en-US", "1234567.5", "1,234,567.5000"),
        ("fr-FR", "1234.5", "1\u202f234,5000"),
        ("en-US", "0", "0.0000"),
        ("de-DE", "-0.5", "-0,5000"),
    ],
)
def test_money_is_formatted_for_the_locale(locale: str, value: str, expected: str) -> None:
    assert number_format(locale).money(Decimal(value)) == expected


def test_decimals_keep_only_the_places_asked_for() -> None:
    vi = number_format("vi-VN")
    assert vi.decimal(Decimal("1.5"), places=2) == "1,5"
    assert vi.decimal(Decimal("2"), places=2) == "2"
    assert vi.decimal(Decimal("1234.567"), places=2, min_places=2) == "1.234,57"


def test_the_locale_in_use_is_given_to_the_chart() -> None:
    assert number_format("vi-vn").locale == "vi-VN"
    assert number_format("nope").locale == "en-US"


def test_sessions_are_signed_expire_and_die_with_the_token() -> None:
    key = session_key(TOKEN)
    value = new_session(key, now=1_000_000, hours=1)
    assert session_valid(key, value, now=1_000_000)
    assert session_valid(key, value, now=1_000_000 + 3599)
    assert not session_valid(key, value, now=1_000_000 + 3600)  # expired
    assert not session_valid(session_key(TOKEN + "-rotated"), value, now=1_000_000)
    expires, nonce, mac = value.split(".")
    forged = f"{int(expires) + 3600}.{nonce}.{mac}"  # a later expiry, same signature
    assert not session_valid(key, forged, now=1_000_000)
    for junk in ("", "x", "1.2", "1..", "a.b.c", value + "0", "²." + value.partition(".")[2]):
        assert not session_valid(key, junk, now=0)
    # Each sign-in is its own session with its own CSRF token.
    other = new_session(key, now=1_000_000, hours=1)
    assert csrf_token(key, value) != csrf_token(key, other)
    assert TOKEN not in value


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"host": "gw.example:8000"}, True),  # no Origin: not a browser's cross-site form
        ({"host": "gw.example:8000", "origin": "http://gw.example:8000"}, True),
        ({"host": "gw.example", "origin": "https://gw.example"}, True),  # TLS ended by a proxy
        ({"host": "gw.example:8000", "origin": "http://evil.example"}, False),
        ({"host": "gw.example:8000", "origin": "http://gw.example:8001"}, False),
        ({"host": "gw.example", "origin": "null"}, False),
        ({"host": "gw.example", "sec-fetch-site": "cross-site"}, False),
        ({"host": "gw.example", "sec-fetch-site": "same-site"}, False),
        ({"host": "gw.example", "sec-fetch-site": "same-origin"}, True),
    ],
)
def test_same_origin(headers: dict[str, str], allowed: bool) -> None:
    assert same_origin(Headers(headers)) is allowed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/dashboard/users/bob", "/dashboard/users/bob"),
        ("/dashboard/?sort=id", "/dashboard/?sort=id"),
        (None, "/dashboard/"),
        ("https://evil.example/", "/dashboard/"),
        ("//evil.example/dashboard/", "/dashboard/"),
        ("/dashboard//evil.example", "/dashboard/"),
        ("/dashboard/\\evil", "/dashboard/"),
        ("/dashboardx", "/dashboard/"),
        ("/dashboard/a\r\nSet-Cookie: x=y", "/dashboard/"),
    ],
)
def test_only_dashboard_paths_are_followed_after_sign_in(value: str | None, expected: str) -> None:
    assert safe_next(value, "/dashboard") == expected


def test_render_escapes_everything_but_html() -> None:
    out = render("<p title={a}>{b}{c}</p>", a='"x" & y', b=EVIL, c=Html("<b>ok</b>"))
    assert (
        out == "<p title=&quot;x&quot; &amp; y>&lt;script&gt;alert(1)&lt;/script&gt;<b>ok</b></p>"
    )


# --- the HTTP surface --------------------------------------------------------------


async def test_the_dashboard_is_off_without_an_admin_token(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url, settings=SETTINGS) as h, client(h) as c:
        assert not h.config.admin.token
        for path in (
            "/dashboard/",
            "/dashboard/login",
            "/dashboard/users/alice",
            "/dashboard/static/dashboard.css",
        ):
            assert (await c.get(path)).status_code == 404, path
        response = await c.post("/dashboard/login", data={"token": ""})
        assert response.status_code == 404
        assert "set-cookie" not in response.headers


async def test_signed_out_pages_redirect_to_the_login_page(sqlite_url: str) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        response = await c.get("/dashboard/")
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard/login?next=%2Fdashboard%2F"
        response = await c.get("/dashboard/users/alice?x=1")
        assert response.status_code == 303
        assert response.headers["location"] == (
            "/dashboard/login?next=" + quote("/dashboard/users/alice?x=1", safe="")
        )
        # A forged or stale cookie is no session.
        c.cookies.set(COOKIE, "9999999999.abc.def", domain="127.0.0.1", path="/dashboard")
        assert (await c.get("/dashboard/")).status_code == 303
        page = await c.get("/dashboard/login")
        assert page.status_code == 200
        assert (await c.head("/dashboard/login")).status_code == 200
        assert 'name="token" type="password"' in page.text
        assert (await c.get("/dashboard/static/dashboard.css")).status_code == 200


async def test_sign_in_sets_a_strict_http_only_session_cookie(sqlite_url: str) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        response = await c.post(
            "/dashboard/login", data={"token": TOKEN, "next": "/dashboard/users/alice"}
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard/users/alice"
        cookie = response.headers["set-cookie"]
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert cookie.startswith(f"{COOKIE}=")
        assert "httponly" in attributes
        assert "samesite=strict" in cookie.lower()
        assert "path=/dashboard;" in cookie.lower() + ";"
        assert "max-age=43200" in cookie.lower()  # dashboard.session_hours = 12
        assert "secure" not in attributes
        assert TOKEN not in cookie
        assert (await c.get("/dashboard/users/alice")).status_code == 200
        # Signed in, the login page sends you on.
        assert (await c.get("/dashboard/login")).status_code == 303


async def test_a_secure_cookie_when_configured(sqlite_url: str) -> None:
    settings = {"dashboard": {"locale": "vi-VN", "secure_cookie": True, "session_hours": 2}}
    async with admin_gateway(sqlite_url, settings) as h, client(h) as c:
        response = await c.post("/dashboard/login", data={"token": TOKEN})
        cookie = response.headers["set-cookie"].lower()
        assert "; secure" in cookie
        assert "max-age=7200" in cookie


async def test_a_wrong_token_is_refused_without_a_cookie(sqlite_url: str) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        for token in ("wrong", "", TOKEN + "x", TOKEN[:-1], "ký tự"):
            response = await c.post("/dashboard/login", data={"token": token})
            assert response.status_code == 401
            assert "set-cookie" not in response.headers
            assert "not the admin token" in response.text
        assert (await c.get("/dashboard/")).status_code == 303


def throttling_gateway(
    sqlite_url: str, clock: FixedClock
) -> contextlib.AbstractAsyncContextManager[Harness]:
    settings = {**SETTINGS, "admin": {"max_failures": 3, "failure_window": 120}}
    return running_gateway(sqlite_url, settings=settings, env=ENV, clock=clock)


def from_another_address(h: Harness) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    return httpx.AsyncClient(base_url=h.url, timeout=10, transport=transport)


async def test_sign_in_guesses_are_throttled_per_client(sqlite_url: str) -> None:
    """The attack: guess the admin token at the sign-in form. After
    ``admin.max_failures`` wrong tokens the form answers 429 with Retry-After and
    sets no cookie, even for the right token, until the window ends; another
    address signs in meanwhile."""
    clock = FixedClock(datetime(2026, 12, 6, 12, tzinfo=UTC))
    async with throttling_gateway(sqlite_url, clock) as h, client(h) as c:
        for guess in ("a", "b", "c"):
            assert (await c.post("/dashboard/login", data={"token": guess})).status_code == 401
        response = await c.post("/dashboard/login", data={"token": TOKEN})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "120"
        assert "set-cookie" not in response.headers
        assert "Too many wrong tokens from this address" in response.text
        # The admin API counts the same guesses.
        api = await c.get("/admin/users", headers={"Authorization": f"Bearer {TOKEN}"})
        assert api.status_code == 429
        async with from_another_address(h) as other:
            signed_in = await other.post("/dashboard/login", data={"token": TOKEN})
            assert signed_in.status_code == 303 and "set-cookie" in signed_in.headers
        clock.advance(timedelta(seconds=119))
        assert (await c.post("/dashboard/login", data={"token": TOKEN})).status_code == 429
        clock.advance(timedelta(seconds=1))
        assert (await c.post("/dashboard/login", data={"token": TOKEN})).status_code == 303


async def test_a_signed_in_export_is_not_throttled(sqlite_url: str) -> None:
    """A session is not a guess: its export (the admin API, handed the token inside
    the app) works while its address is throttled for guessing."""
    clock = FixedClock(datetime(2026, 12, 6, 12, tzinfo=UTC))
    async with throttling_gateway(sqlite_url, clock) as h, client(h) as c:
        await sign_in(c)
        for guess in ("a", "b", "c"):
            bad = await c.get("/admin/users", headers={"Authorization": f"Bearer {guess}"})
            assert bad.status_code == 401
        api = await c.get("/admin/users", headers={"Authorization": f"Bearer {TOKEN}"})
        assert api.status_code == 429
        export = await c.get("/dashboard/export/daily", params={"format": "json"})
        assert export.status_code == 200, export.text


async def test_csv_exports_from_the_dashboard_neutralise_formulas(sqlite_url: str) -> None:
    evil = '=HYPERLINK("http://evil","x")'
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        await spend(h, evil, 10, day=h.gateway.today())
        await sign_in(c)
        response = await c.get("/dashboard/export/events", params={"user": evil})
        (row,) = list(csv.DictReader(io.StringIO(response.text)))
        assert row["user_id"] == "'" + evil


async def test_posts_need_the_csrf_token_and_this_origin(sqlite_url: str) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        evil = {"Origin": "http://evil.example"}
        response = await c.post("/dashboard/login", data={"token": TOKEN}, headers=evil)
        assert response.status_code == 403
        assert "set-cookie" not in response.headers
        csrf = await sign_in(c)
        url = f"/dashboard/users/{USER}/plan"
        assert (await c.post(url, data={"plan": "pro"})).status_code == 403
        assert (await c.post(url, data={"plan": "pro", "csrf": "0" * 64})).status_code == 403
        assert (
            await c.post(url, data={"plan": "pro", "csrf": csrf}, headers=evil)
        ).status_code == (403)
        assert (await c.post(url, json={"plan": "pro", "csrf": csrf})).status_code == 403
        user = await h.storage.get_user(USER)
        assert user is not None and user.plan == "free"
        same = {"Origin": h.url}
        response = await c.post(url, data={"plan": "pro", "csrf": csrf}, headers=same)
        assert response.status_code == 303
        assert response.headers["location"] == f"/dashboard/users/{USER}?done=plan"
        user = await h.storage.get_user(USER)
        assert user is not None and user.plan == "pro"
        # An unknown plan is refused with the reason.
        response = await c.post(url, data={"plan": "gold", "csrf": csrf})
        assert response.status_code == 400
        assert "No plan named" in response.text
        # Sign-out is a POST with the token too; afterwards the cookie is gone.
        assert (await c.post("/dashboard/logout")).status_code == 403
        response = await c.post("/dashboard/logout", data={"csrf": csrf})
        assert response.status_code == 303
        assert "max-age=0" in response.headers["set-cookie"].lower()
        assert (await c.get("/dashboard/")).status_code == 303


async def test_user_ids_are_escaped(sqlite_url: str) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        await spend(h, EVIL, 1234, day=h.gateway.today())
        await h.storage.create_key(
            EVIL,
            key_id="key_x",
            key_hash="h",
            prefix="gwk_<b>",
            name='"><img src=x>',
            now=datetime.now(UTC),
        )
        await sign_in(c)
        table = await c.get("/dashboard/")
        assert EVIL not in table.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in table.text
        href = "/dashboard/users/" + quote(EVIL, safe="")
        assert f'href="{href}"' in table.text
        page = await c.get(href)
        assert page.status_code == 200
        assert EVIL not in page.text
        assert "<img src=x>" not in page.text and "gwk_<b>" not in page.text
        assert '<h1 class="user-id">&lt;script&gt;alert(1)&lt;/script&gt;</h1>' in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        missing = await c.get("/dashboard/users/" + quote("<nobody>", safe=""))
        assert missing.status_code == 404
        assert "<nobody>" not in missing.text


async def test_the_table_sorts_filters_and_pages(sqlite_url: str) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        today = h.gateway.today()
        for i in range(55):
            await spend(h, f"user{i:02d}", (i + 1) * 1000, day=today - timedelta(days=i % 3))
        await h.storage.set_plan("user07", "pro")
        await sign_in(c)

        def ids(text: str) -> list[str]:
            return re.findall(r'<td[^>]*><a href="/dashboard/users/[^"]+">([^<]+)</a></td>', text)

        first = await c.get("/dashboard/")  # default: most lifetime tokens first
        assert ids(first.text)[:3] == ["user54", "user53", "user52"]
        assert len(ids(first.text)) == PAGE_SIZE
        assert "56 users" in first.text  # and alice
        assert '<span class="badge">55.000</span>' in first.text
        second = await c.get("/dashboard/", params={"page": 2})
        assert ids(second.text) == ["user04", "user03", "user02", "user01", "user00", USER]
        by_id = await c.get("/dashboard/", params={"sort": "id", "order": "asc"})
        assert ids(by_id.text)[:2] == [USER, "user00"]
        assert 'aria-sort="ascending"' in by_id.text
        today_first = await c.get("/dashboard/", params={"sort": "tokens_today", "order": "desc"})
        assert ids(today_first.text)[0] == "user54"  # 54 % 3 == 0: spent today
        found = await c.get("/dashboard/", params={"q": "USER1"})
        assert sorted(ids(found.text)) == [f"user{i}" for i in range(10, 20)]
        pro = await c.get("/dashboard/", params={"plan": "pro"})
        assert ids(pro.text) == ["user07"]
        for page in ("-3", "0", "²", "9" * 5000, "x"):
            junk = await c.get(
                "/dashboard/", params={"sort": "x;drop", "order": "up", "page": page}
            )
            assert junk.status_code == 200
            assert ids(junk.text)[0] == "user54"
        last = await c.get("/dashboard/", params={"page": "999"})  # past the end: the last page
        assert ids(last.text) == ids(second.text)


async def test_exports_are_the_admin_apis_behind_the_session(sqlite_url: str) -> None:
    async with admin_gateway(sqlite_url) as h, client(h) as c:
        today = h.gateway.today()
        for back in range(3):
            await spend(h, BIG, 1000 + back, day=today - timedelta(days=back), queries=2)
        await spend(h, "carol", 5, day=today)
        query = {"from": str(today - timedelta(days=29)), "to": str(today), "user": BIG}
        signed_out = await c.get("/dashboard/export/events", params={**query, "format": "csv"})
        assert signed_out.status_code == 303
        await sign_in(c)
        page = await c.get(f"/dashboard/users/{BIG}")
        assert "/dashboard/export/events?" + urlencode({**query, "format": "csv"}) in html.unescape(
            page.text
        )
        response = await c.get("/dashboard/export/events", params={**query, "format": "csv"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert "attachment" in response.headers["content-disposition"]
        events = list(csv.DictReader(io.StringIO(response.text)))
        assert sorted(int(e["total_tokens"]) for e in events) == [1000, 1001, 1002]
        assert {e["user_id"] for e in events} == {BIG}
        response = await c.get("/dashboard/export/daily", params={**query, "format": "json"})
        assert response.status_code == 200
        assert [row["queries"] for row in response.json()] == [2, 2, 2]
        bad = await c.get("/dashboard/export/daily", params={"from": "yesterday"})
        assert bad.status_code == 400  # the admin API's own answer


# --- in a real browser ------------------------------------------------------------


@pytest.fixture
def screenshots() -> Path:
    require_chromium()
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@IN_BROWSER
async def test_the_dashboard_in_chromium(sqlite_url: str, screenshots: Path, browser: Any) -> None:
    """Sign in, read the table, open a user, see the chart, change the plan, make and
    revoke a key, sign out - as an admin would, in headless Chromium."""
    async with admin_gateway(sqlite_url) as h:
        # Usage through the gateway itself, and more straight into storage.
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as api:
            for _ in range(3):
                response = await api.post("/v1/chat-messages", json=CHAT, headers=h.auth())
                assert response.status_code == 200
        await h.probes.wait_finished(3)
        today = h.gateway.today()
        await spend(h, BIG, 1_000_000, day=today - timedelta(days=20), queries=40, web=4)
        for back in range(0, 30, 3):
            await spend(
                h,
                BIG,
                20_000 + back * 313,
                day=today - timedelta(days=back),
                queries=5 + back % 7,
                web=back % 4,
            )
        bob = await h.storage.get_user(BIG)
        assert bob is not None
        await spend(h, BIG, 1_234_567 - bob.lifetime_tokens, day=today, queries=3, web=1)
        for i in range(8):
            await spend(h, f"user-{i}", 10**i, day=today)

        requests: list[str] = []
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        # 1. Signed out: the login page. A wrong token is refused.
        await page.goto(f"{h.url}/dashboard/")
        assert page.url.startswith(f"{h.url}/dashboard/login")
        await page.screenshot(path=screenshots / "login.png")
        await page.fill("#token", "not-the-token")
        async with page.expect_response(lambda r: r.request.method == "POST") as info:
            await page.click("button[type=submit]")
        assert (await info.value).status == 401
        assert await page.locator("[role=alert]").inner_text() == ("That is not the admin token.")
        assert await context.cookies() == []
        await page.screenshot(path=screenshots / "login-refused.png")
        errors.clear()  # the refused sign-in's 401, logged by the console

        # 2. Signed in: the users table, numbers formatted for vi-VN.
        await page.fill("#token", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{h.url}/dashboard/")
        row = page.locator("table.users tbody tr", has_text=BIG)
        assert await row.locator("td").nth(3).inner_text() == "1.234.567"
        assert await row.locator("td .badge").count() == 2  # lifetime and today
        big = page.locator("table.users tbody tr", has_text="user-7")
        assert await big.locator("td").nth(3).inner_text() == "10.000.000"
        alice = page.locator("table.users tbody tr", has_text=USER)
        assert await alice.locator("td").nth(6).inner_text() == "3"  # queries today
        assert await alice.locator("td").nth(3).inner_text() == "3.504"  # 3 x 1,168
        await page.screenshot(path=screenshots / "users.png", full_page=True)

        # Sort by id, search. Each click navigates: the table is read once the new
        # page has loaded (read while it loaded, it had no rows: a failure seen on a
        # loaded machine).
        await page.click("th a:has-text('User')")
        await page.wait_for_url(lambda url: "sort=id" in url)
        await page.fill("input[name=q]", "user-")
        await page.click("form.filters button")
        await page.wait_for_url(lambda url: "q=user-" in url)
        assert await page.locator("table.users tbody tr").count() == 8

        # 3. A user's page: the chart is drawn; the table of days is there too.
        await page.goto(f"{h.url}/dashboard/")
        await page.click(f"table.users a:text-is('{BIG}')")
        await page.wait_for_url(f"{h.url}/dashboard/users/{BIG}")
        svg = page.locator("#chart svg")
        await svg.wait_for()
        box = await svg.bounding_box()
        assert box is not None and box["width"] > 200 and box["height"] > 100
        bars = page.locator("#chart svg rect")
        assert await bars.count() == 2 * 30
        tallest = await page.evaluate(
            "Math.max(...[...document.querySelectorAll('#chart rect')]"
            ".map(r => r.getBBox().height))"
        )
        assert tallest > 50
        line = page.locator("#chart svg path.s-queries")
        line_box = await line.bounding_box()
        assert line_box is not None and line_box["width"] > 100
        assert await page.locator(".daily tbody tr").count() == 30
        assert await page.locator(".totals dd .badge").inner_text() == "1.234.567"
        limits = await page.locator("table.limits").inner_text()
        assert "unlimited" in limits  # tokens per month on free
        assert "50.000" in limits  # tokens per day on free
        csv_link = await page.locator("a:text-is('CSV')").first.get_attribute("href")
        assert csv_link is not None and csv_link.startswith("/dashboard/export/events?")
        download = await context.request.get(h.url + csv_link)
        assert download.status == 200
        assert f"{BIG},,{today}" in await download.text()  # in no team
        await page.click(".daily summary")
        await page.screenshot(path=screenshots / "user.png", full_page=True)

        # 4. Change the plan.
        await page.select_option("#plan", "pro")
        await page.click("button:has-text('Change plan')")
        await page.wait_for_url(f"{h.url}/dashboard/users/{BIG}?done=plan")
        assert await page.locator("strong.plan").inner_text() == "pro"
        assert await page.locator("[role=status]").inner_text() == "Plan changed."
        stored = await h.storage.get_user(BIG)
        assert stored is not None and stored.plan == "pro"

        # 5. Create a key: its secret is shown once.
        await page.fill("#key-name", "ci laptop")
        async with page.expect_response(lambda r: r.request.method == "POST") as info:
            await page.click("button:has-text('Create key')")
        assert (await info.value).status == 201
        secret = await page.locator(".secret-value").inner_text()
        assert secret.startswith("gwk_")
        key = await h.storage.find_key(hash_key(secret))
        assert key is not None and key.user_id == BIG and key.revoked_at is None
        await page.screenshot(path=screenshots / "key-created.png", full_page=True)
        await page.goto(f"{h.url}/dashboard/users/{BIG}")
        assert secret not in await page.content()
        assert await page.locator(".secret-value").count() == 0
        assert key.prefix in await page.locator("table.keys").inner_text()

        # 6. Revoke it.
        key_row = page.locator("table.keys tbody tr", has_text="ci laptop")
        await key_row.locator("button:has-text('Revoke')").click()
        await page.wait_for_url(f"{h.url}/dashboard/users/{BIG}?done=revoked")
        assert "revoked" in await key_row.inner_text()
        key = await h.storage.find_key(hash_key(secret))
        assert key is not None and key.revoked_at is not None

        # 7. A POST without the CSRF token, with the browser's own session: 403.
        (cookie,) = await context.cookies()
        assert cookie["name"] == COOKIE and cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
        async with client(h) as c:
            c.cookies.set(COOKIE, cookie["value"], domain="127.0.0.1", path="/dashboard")
            assert (await c.get(f"/dashboard/users/{BIG}")).status_code == 200
            forged = await c.post(f"/dashboard/users/{BIG}/plan", data={"plan": "free"})
            assert forged.status_code == 403
        stored = await h.storage.get_user(BIG)
        assert stored is not None and stored.plan == "pro"

        # 8. Narrow screens: nothing wider than the viewport but the tables' scrollers.
        await page.set_viewport_size({"width": 375, "height": 800})
        await page.reload()
        await page.wait_for_function("document.querySelector('#chart svg') !== null")
        await page.wait_for_timeout(300)  # the chart redraws for the new width
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        chart_width = await page.evaluate(
            "document.querySelector('#chart svg').getBoundingClientRect().width"
        )
        assert 200 < chart_width <= 375
        await page.screenshot(path=screenshots / "user-narrow.png", full_page=True)
        await page.goto(f"{h.url}/dashboard/")
        await page.screenshot(path=screenshots / "users-narrow.png", full_page=True)

        # 9. Sign out.
        await page.click("button:has-text('Sign out')")
        await page.wait_for_url(f"{h.url}/dashboard/login")
        assert await context.cookies() == []
        await page.goto(f"{h.url}/dashboard/users/{BIG}")
        assert page.url.startswith(f"{h.url}/dashboard/login")

        assert errors == []
        # Everything came from the gateway: no CDN, no other host.
        assert requests and all(u.startswith(h.url + "/") for u in requests), requests
    for name in ("login", "users", "user", "key-created", "user-narrow"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 1000
