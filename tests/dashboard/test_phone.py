"""The dashboard on a phone, in a real headless Chromium (issue 25): no page wider
than the screen, every column and button on it, and a limit's bar that reads
right when nothing is left."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from gateway.keys import new_key
from tests.browser import IN_BROWSER
from tests.dashboard.test_dashboard import (
    CHAT,
    TOKEN,
    admin_gateway,
    screenshots,  # noqa: F401  (a fixture)
    spend,
)
from tests.harness import USER

PHONE = {"width": 375, "height": 800}
# Everything visible on the page that lies (partly) outside the screen, as
# "tag.class: left-right"; for tables, each cell of each row.
OFF_SCREEN = """() => {
  const width = window.innerWidth;
  const out = [];
  for (const el of document.querySelectorAll('button, input, select, td, th, a, meter, .bar')) {
    const box = el.getBoundingClientRect();
    if (box.width === 0 && box.height === 0) continue;  // not displayed
    if (el.closest('details:not([open])') && !el.closest('summary')) continue;
    if (box.left < -0.5 || box.right > width + 0.5) {
      out.push(`${el.tagName.toLowerCase()}.${el.className}: ${Math.round(box.left)}-${Math.round(box.right)} ${el.textContent.trim().slice(0, 30)}`);
    }
  }
  return out;
}"""


@IN_BROWSER
async def test_the_dashboard_fits_a_phone(sqlite_url: str, screenshots: Path, browser: Any) -> None:  # noqa: F811
    settings = {
        "plans": {
            "free": {"queries_per_day": 2, "tokens_per_day": 50_000, "web_searches_per_day": 5},
            "pro": {"queries_per_day": 1000},
        }
    }
    async with admin_gateway(sqlite_url, settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as api:
            for _ in range(2):  # the day's two queries: none left
                response = await api.post("/v1/chat-messages", json=CHAT, headers=h.auth())
                assert response.status_code == 200
        await h.probes.wait_finished(2)
        for i in range(3):
            key = new_key()
            await h.storage.create_key(
                USER,
                key_id=key.id,
                key_hash=key.hash,
                prefix=key.prefix,
                name=f"a rather long key name {i}",
                now=datetime.now(UTC),
            )
        for i in range(5):
            await spend(h, f"someone-with-a-long-id-{i}@example.com", 10**i, day=h.gateway.today())

        page = await (await browser.new_context(viewport=PHONE)).new_page()
        await page.goto(f"{h.url}/dashboard/")
        await page.fill("#token", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{h.url}/dashboard/")
        pages = {
            "users": "/dashboard/",
            "user": f"/dashboard/users/{USER}",
            "alerts": "/dashboard/alerts",
        }
        for name, path in pages.items():
            await page.goto(h.url + path)
            await page.click(".daily summary") if name == "user" else None
            await page.screenshot(path=screenshots / f"phone-{name}.png", full_page=True)
            await page.screenshot(path=screenshots / f"phone-{name}-top.png")
            width = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], (name, width)
            assert await page.evaluate(OFF_SCREEN) == [], name
            for button in await page.locator("button").all():
                assert await button.is_visible()

        # The users table keeps every column, each cell under its column's name.
        await page.goto(h.url + "/dashboard/")
        labels = await page.locator("table.users tbody tr", has_text=USER).evaluate(
            "tr => [...tr.cells].map(c => getComputedStyle(c, '::before').content)"
        )
        assert labels == [
            '"User"',
            '"Plan"',
            '"Team"',
            '"Lifetime tokens"',
            '"Lifetime cost"',
            '"Tokens today"',
            '"Queries today"',
        ]

        # Nothing left today: the queries bar is full and in the warning colour.
        await page.goto(f"{h.url}/dashboard/users/{USER}")
        queries = page.locator("table.limits tr", has_text="Queries per day")
        assert "0" in await queries.locator("td").nth(2).inner_text()  # remaining
        bar = queries.locator("meter")
        state = await bar.evaluate(
            "m => ({value: m.value, max: m.max, low: m.low, high: m.high,"
            " optimum: m.optimum, label: m.getAttribute('aria-label')})"
        )
        assert state["value"] == state["max"] == 2
        # optimum below low: a low value is good; at or past high, the bar is red.
        assert state["optimum"] < state["low"] <= state["high"] <= state["value"]
        assert state["label"] == "2 of 2 used, 0 left"
        await page.locator("table.limits").screenshot(path=screenshots / "phone-limits.png")
        await page.locator("table.keys").screenshot(path=screenshots / "phone-keys.png")
