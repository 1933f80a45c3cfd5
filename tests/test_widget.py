"""The usage widget, <gateway-usage> at /widget.js (issue 25; docs/widget.md).

How it is served, over HTTP; then in a real Chromium on a page of another origin:
the remaining counts and the chart from real gateway data (after a real answer
through the fake Dify), in English and Vietnamese, and the errors a user sees.
Screenshots go to artifacts/widget/ (git-ignored; docs/widget.png is one of them).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.storage import AdmissionLimits, UsageEvent
from tests.browser import ARTIFACTS, IN_BROWSER, require_chromium, site
from tests.harness import USER, Harness, running_gateway
from tests.servers import free_port

WIDGET = ARTIFACTS / "widget"
PLANS = {
    "free": {
        "queries_per_day": 50,
        "tokens_per_day": 100_000,
        "tokens_per_month": 3_000_000,
        "web_searches_per_day": 5,
    }
}
CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}


def settings(origin: str) -> dict[str, Any]:
    return {"plans": PLANS, "cors": {"allow_origins": [origin]}}


# --- how it is served ----------------------------------------------------------------


async def test_the_widget_is_served_as_a_cacheable_script(sqlite_url: str) -> None:
    origin = "https://app.example.com"
    async with running_gateway(sqlite_url, settings=settings(origin)) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            response = await client.get("/widget.js", headers={"Origin": origin})
            again = await client.get(
                "/widget.js", headers={"If-None-Match": response.headers["etag"]}
            )
            head = await client.head("/widget.js")
            preflight = await client.options(
                "/widget.js",
                headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
            )
    assert response.status_code == 200  # today: 404
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.headers["cache-control"] == "public, max-age=3600"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["access-control-allow-origin"] == origin  # for crossorigin loads
    assert 'customElements.define("gateway-usage"' in response.text
    assert len(response.content) < 24_000  # small (and it loads nothing: see the browser test)
    assert again.status_code == 304 and again.content == b""
    assert head.status_code == 200
    assert preflight.status_code == 204


# --- in a real browser -----------------------------------------------------------------


def page(gateway: str, body: str, *, lang: str = "en") -> str:
    return f"""<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8"><title>Chat</title>
<style>
  body {{ font-family: "DejaVu Sans", sans-serif; margin: 12px; background: #fff; color: #1f2328; }}
  gateway-usage {{ width: 520px; margin-bottom: 12px; }}
</style>
<script src="{gateway}/widget.js" defer></script>
</head><body>
{body}
</body></html>"""


async def spend(h: Harness, tokens: int, *, back: int, queries: int) -> None:
    """Earlier usage of USER, ``back`` days ago, straight into storage."""
    day = h.gateway.today() - timedelta(days=back)
    prompt = tokens * 4 // 5
    await h.storage.settle(
        UsageEvent(
            answer_id=f"past-{back}",
            user_id=USER,
            day=day,
            created_at=datetime.now(UTC),
            endpoint="chat-messages",
            prompt_tokens=prompt,
            completion_tokens=tokens - prompt,
            total_tokens=tokens,
            cost=Decimal(tokens) / Decimal(100_000),
        )
    )
    for _ in range(queries):
        await h.storage.admit(
            USER,
            day=day,
            month_start=day.replace(day=1),
            limits=AdmissionLimits(),
            now=datetime.now(UTC),
        )


DEFINED = "() => customElements.get('gateway-usage') !== undefined"
LOADED = """el => new Promise((resolve, reject) => {
  if (el.state === "ready") return resolve();
  el.addEventListener("gateway-usage-load", () => resolve(), {once: true});
  el.addEventListener("gateway-usage-error", e => reject(new Error(e.detail.message)), {once: true});
})"""

RELOADED = """(el, lang) => new Promise(resolve => {
  el.addEventListener("gateway-usage-load", () => resolve(), {once: true});
  el.setAttribute("lang", lang);
})"""


def en(n: int) -> str:
    return f"{n:,}"


def vi(n: int) -> str:
    return f"{n:,}".replace(",", ".")


@pytest.fixture
def screenshots() -> Path:
    require_chromium()
    WIDGET.mkdir(parents=True, exist_ok=True)
    return WIDGET


@IN_BROWSER
async def test_the_widget_in_chromium_on_another_origin(
    sqlite_url: str, screenshots: Path, browser: Any
) -> None:
    """Remaining counts, reset times and the 30-day chart, from real gateway data, in
    English and Vietnamese, on a page of another origin that hands over its token."""
    async with site() as web:
        async with running_gateway(sqlite_url, settings=settings(web.url)) as h:
            async with httpx.AsyncClient(base_url=h.url, timeout=10) as api:
                answer = await api.post("/v1/chat-messages", json=CHAT, headers=h.auth())
                assert answer.status_code == 200
                await h.probes.wait_finished(1)
                for back in range(1, 30, 2):
                    await spend(h, 20_000 + back * 1_537, back=back, queries=3 + back % 5)
                usage = (await api.get("/v1/usage", headers=h.auth())).json()
                daily = (await api.get("/v1/usage/daily", headers=h.auth())).json()["data"]
            limits = usage["limits"]
            today_tokens = usage["today"]["total_tokens"]
            assert today_tokens > 0 and limits["queries_per_day"]["used"] == 1

            # The token is handed over by a callback, set before the deferred script
            # defines the element (the property is passed on when it is).
            web.pages["/chat"] = page(
                h.url,
                '<gateway-usage id="usage"></gateway-usage>\n'
                "<script>document.getElementById('usage').getToken = "
                f"async () => {json.dumps(h.key)};</script>",
            )
            context = await browser.new_context(
                viewport={"width": 560, "height": 700}, timezone_id="UTC", locale="en-US"
            )
            tab = await context.new_page()
            requests: list[Any] = []
            tab.on("request", lambda r: requests.append(r))
            errors: list[str] = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            await tab.goto(web.url + "/chat")
            await tab.wait_for_function(DEFINED, timeout=10_000)
            widget = tab.locator("gateway-usage")
            await widget.evaluate(LOADED)

            # English: what is left today and this month, and when it resets.
            def left(name: str) -> Any:
                return widget.locator(f"[data-limit={name}] dd")

            q, t, m = (limits[k] for k in ("queries_per_day", "tokens_per_day", "tokens_per_month"))
            assert await left("queries_per_day").inner_text() == f"{q['remaining']} of 50 left"
            assert await left("tokens_per_day").inner_text() == (
                f"{en(t['remaining'])} of 100,000 left"
            )
            assert await left("tokens_per_month").inner_text() == (
                f"{en(m['remaining'])} of 3,000,000 left"
            )
            assert await left("web_searches_per_day").inner_text() == "5 of 5 left"
            assert await widget.get_by_role("heading", name="Today").count() == 1
            assert await widget.get_by_role("heading", name="This month").count() == 1
            resets = widget.locator("time")
            assert await resets.first.get_attribute("datetime") == q["resets_at"]
            assert await resets.last.get_attribute("datetime") == m["resets_at"]
            assert (await resets.first.inner_text()).endswith("12:00 AM")
            today_box = widget.locator("[part=today] p")
            assert re.fullmatch(
                r"Resets \w{3} 12:00 AM \(in (\d+ hours?|\d+ minutes?)\)",
                await today_box.inner_text(),
            )
            assert "Plan: free" in await widget.locator(".head").inner_text()

            # The chart: one labelled bar per day, today's as tall as its tokens say.
            chart = widget.get_by_role("img", name=re.compile(r"^Tokens per day, last 30 days"))
            assert await chart.count() == 1
            bars = widget.locator("svg rect")
            assert await bars.count() == 30
            values = [int(await bars.nth(i).get_attribute("data-value") or -1) for i in range(30)]
            assert values == [row["total_tokens"] for row in daily]
            assert await bars.last.get_attribute("class") == "today"
            tallest = max(values)
            heights = [(await bars.nth(i).bounding_box() or {})["height"] for i in range(30)]
            assert heights[values.index(tallest)] > 80
            assert heights[-1] == pytest.approx(
                heights[values.index(tallest)] * today_tokens / tallest, abs=1.5
            )
            assert await bars.last.locator("title").text_content() == (
                f"{datetime.fromisoformat(daily[-1]['day']).strftime('%b %-d')}: {en(today_tokens)}"
            )
            # The same numbers as a table, for screen readers and for anyone.
            table = widget.locator("table")
            assert await table.locator("tbody tr").count() == 30
            await widget.locator("summary").click()
            last_row = table.locator("tbody tr").last
            assert (await last_row.locator("td").last.inner_text()) == en(today_tokens)
            await widget.locator("summary").click()
            await widget.screenshot(path=screenshots / "widget-en.png")

            # Vietnamese, numbers as Vietnamese write them.
            await widget.evaluate(RELOADED, "vi")
            assert await left("queries_per_day").inner_text() == f"Còn {q['remaining']} / 50"
            assert await left("tokens_per_day").inner_text() == (
                f"Còn {vi(t['remaining'])} / 100.000"
            )
            assert await widget.get_by_role("heading", name="Hôm nay").count() == 1
            assert await widget.get_by_role("heading", name="Tháng này").count() == 1
            assert await widget.get_by_role("img", name=re.compile("^Token mỗi ngày")).count() == 1
            assert "Gói: free" in await widget.locator(".head").inner_text()
            await widget.screenshot(path=screenshots / "widget-vi.png")

            # A language it does not speak: English.
            await widget.evaluate(RELOADED, "fr")
            assert await widget.get_by_role("heading", name="Today").count() == 1

            # The token travelled in the Authorization header, never in a URL.
            calls = [r for r in requests if "/v1/usage" in r.url]
            assert calls and all(r.headers.get("authorization") == f"Bearer {h.key}" for r in calls)
            assert all(h.key not in r.url for r in requests)
            # Nothing but the page and the gateway: no CDN, no dependency.
            assert all(r.url.startswith((web.url + "/", h.url + "/")) for r in requests)
            assert errors == []
            await context.close()


@IN_BROWSER
async def test_the_widget_shows_its_errors(
    sqlite_url: str, screenshots: Path, browser: Any
) -> None:
    """A bad token (401), a gateway that cannot be reached, a 429 and no token at all:
    each is a visible, announced message, never a blank box."""
    async with site() as web:
        async with running_gateway(sqlite_url, settings=settings(web.url)) as h:
            closed = f"http://127.0.0.1:{free_port()}"
            limited = f"{h.url}/limited/"
            web.pages["/errors"] = page(
                h.url,
                '<gateway-usage id="expired" token="not-a-key"></gateway-usage>'
                f'<gateway-usage id="offline" token="{h.key}" base="{closed}"></gateway-usage>'
                f'<gateway-usage id="busy" token="{h.key}" base="{limited}"></gateway-usage>'
                '<gateway-usage id="anonymous" lang="vi"></gateway-usage>',
            )
            context = await browser.new_context(viewport={"width": 560, "height": 900})
            tab = await context.new_page()
            crashes: list[str] = []
            tab.on("pageerror", lambda e: crashes.append(str(e)))

            async def too_many(route: Any) -> None:
                # A 429 as the gateway sends one, with the CORS headers it adds.
                await route.fulfill(
                    status=429,
                    headers={
                        "Retry-After": "30",
                        "Access-Control-Allow-Origin": web.url,
                        "Access-Control-Expose-Headers": "Retry-After",
                    },
                    content_type="application/json",
                    body='{"code": "too_many_attempts", "message": "slow down", "status": 429}',
                )

            await tab.route(limited + "**", too_many)
            await tab.goto(web.url + "/errors")
            await tab.wait_for_function(DEFINED, timeout=10_000)
            for name in ("expired", "offline", "busy"):
                await tab.locator(f"#{name}[state=error]").wait_for()
            await tab.locator("#anonymous[state=signed-out]").wait_for()

            def alert(name: str) -> Any:
                return tab.locator(f"#{name}").get_by_role("alert")

            assert await alert("expired").inner_text() == (
                "Your session has expired or your token is not valid. Sign in again."
            )
            assert await alert("offline").inner_text() == (
                "Cannot reach the usage service. Check your connection and try again."
            )
            assert await alert("busy").inner_text() == (
                "Too many requests. Try again in 30 seconds."
            )
            assert await alert("anonymous").inner_text() == "Đăng nhập để xem mức sử dụng."
            for name in ("expired", "offline", "busy"):
                assert await tab.locator(f"#{name}").get_by_role("button").inner_text() == (
                    "Try again"
                )
            await tab.screenshot(path=screenshots / "widget-errors.png", full_page=True)

            # The page signs the user in again: a token set later is used at once.
            expired = tab.locator("#expired")
            await expired.evaluate(f"el => {{ el.token = {json.dumps(h.key)}; }}")
            await tab.locator("#expired[state=ready]").wait_for()
            assert (
                "50 left" in await expired.locator("[data-limit=queries_per_day] dd").inner_text()
            )
            assert crashes == []
            await context.close()


@IN_BROWSER
async def test_a_refreshed_token_is_asked_for_after_a_401(sqlite_url: str, browser: Any) -> None:
    """get-token style pages: a JWT that expired is replaced once, not shown as an error."""
    require_chromium()
    async with site() as web:
        async with running_gateway(sqlite_url, settings=settings(web.url)) as h:
            web.pages["/jwt"] = page(
                h.url,
                '<gateway-usage id="usage"></gateway-usage><script>'
                "window.asked = [];"
                "document.getElementById('usage').getToken = async ({refresh}) => {"
                "  window.asked.push(refresh);"
                f"  return refresh ? {json.dumps(h.key)} : 'expired-token';"
                "};</script>",
            )
            tab = await browser.new_page()
            await tab.goto(web.url + "/jwt")
            await tab.wait_for_function(DEFINED, timeout=10_000)
            await tab.locator("gateway-usage").evaluate(LOADED)
            assert await tab.evaluate("window.asked") == [False, True]


@IN_BROWSER
async def test_a_used_up_limit_is_a_full_bar_in_the_danger_colour(
    sqlite_url: str, browser: Any
) -> None:
    """At "0 left" the bar is full and red (not an empty green one, the dashboard's bug
    in issue 25), near the limit it warns, and the page's custom properties apply."""
    require_chromium()
    async with site() as web:
        plans = {"free": {"queries_per_day": 2, "tokens_per_day": 1_000}}
        async with running_gateway(
            sqlite_url, settings={"plans": plans, "cors": {"allow_origins": [web.url]}}
        ) as h:
            await spend(h, 850, back=0, queries=2)
            web.pages["/full"] = page(
                h.url,
                "<style>gateway-usage { --gateway-usage-danger: rgb(200, 0, 0);"
                " --gateway-usage-warning: rgb(0, 0, 200); }</style>"
                f'<gateway-usage token="{h.key}"></gateway-usage>',
            )
            tab = await browser.new_page()
            await tab.goto(web.url + "/full")
            await tab.wait_for_function(DEFINED, timeout=10_000)
            widget = tab.locator("gateway-usage")
            await widget.evaluate(LOADED)
            queries = widget.locator("[data-limit=queries_per_day]")
            assert await queries.locator("dd").inner_text() == "0 of 2 left"
            fill = queries.locator(".bar span")
            assert await fill.evaluate("e => getComputedStyle(e).backgroundColor") == (
                "rgb(200, 0, 0)"
            )
            track = await queries.locator(".bar").bounding_box()
            used = await fill.bounding_box()
            assert track and used and used["width"] == track["width"]
            tokens = widget.locator("[data-limit=tokens_per_day]")
            assert await tokens.locator("dd").inner_text() == "150 of 1,000 left"
            assert await tokens.locator(".bar span").evaluate(
                "e => getComputedStyle(e).backgroundColor"
            ) == ("rgb(0, 0, 200)")
