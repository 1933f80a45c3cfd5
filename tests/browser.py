"""A real Chromium and pages on other origins, for the dashboard, CORS and widget tests.

Debian's /usr/bin/chromium driven by Playwright, skipped when missing unless
GATEWAY_REQUIRE_BROWSER is set (CI). A pytest process launches it once (the
``browser`` fixture in tests/conftest.py); each test opens its own contexts, closed
after it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import serve

CHROMIUM = "/usr/bin/chromium"
# The features Playwright's Chromium switches turn off (Playwright 1.65,
# coreBundle.js `disabledFeatures`: HTTP kept on HTTP, no Lens, Media Router,
# optimization hints, network time or AI-mode requests...).
_PLAYWRIGHTS_DISABLED = [
    "AvoidUnnecessaryBeforeUnloadCheckSync",
    "DestroyProfileOnBrowserClose",
    "HttpsUpgrades",
    "HttpsFirstBalancedModeAutoEnable",
    "LensOverlay",
    "MediaRouter",
    "PaintHolding",
    "ThirdPartyStoragePartitioning",
    "AvoidCorsURLLoaderRestartOnRedirect",
    "OptimizationHints",
    "NetworkTimeServiceQuerying",
    "AimEnabled",
    "PreconnectToSearch",
]
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    # Chromium's new headless mode is the whole browser: each window (a
    # context's first page) renders two WebUI popups of its address bar, each in
    # a renderer of its own (~0.5 s of CPU). WebUIOmniboxPopup turns off the
    # omnibox's; a fifth of the browser tests' Chromium CPU. The pages under test
    # never see the address bar. Chromium reads the last --disable-features it is
    # given, so Playwright's own list (its chromiumSwitches), which this
    # one would otherwise replace, is repeated before it.
    "--disable-features=" + ",".join([*_PLAYWRIGHTS_DISABLED, "WebUIOmniboxPopup"]),
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        if os.environ.get("GATEWAY_REQUIRE_BROWSER"):
            pytest.fail(f"{reason} (GATEWAY_REQUIRE_BROWSER is set)", pytrace=False)
        pytest.skip(reason)


class Site:
    """A web site on its own origin (another port): serves the HTML it is given."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {"/": "<!doctype html><title>empty</title>"}
        self.url = ""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        page = self.pages.get(scope["path"])
        if scope["path"] == "/favicon.ico":  # asked for by every page; not an error
            page = ""
        body = (page if page is not None else "not found").encode()
        await send(
            {
                "type": "http.response.start",
                "status": (200 if page else 204) if page is not None else 404,
                "headers": [
                    (b"content-type", b"text/html; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def site() -> AsyncIterator[Site]:
    """A `Site` on 127.0.0.1 and a free port (an origin of its own)."""
    s = Site()
    async with serve(s) as url:
        s.url = url
        yield s


IN_BROWSER = pytest.mark.asyncio(loop_scope="session")
"""The mark of a test that takes the ``browser`` fixture (tests/conftest.py): it runs
in the session's event loop, where the pytest process's one Chromium lives."""


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium (a Playwright Browser)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()
