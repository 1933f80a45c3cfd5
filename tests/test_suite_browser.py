"""The suite's Chromium: the switches `tests/browser.py` adds keep Playwright's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.browser import CHROMIUM_ARGS


def test_the_features_playwright_turns_off_stay_off() -> None:
    """Chromium reads the last --disable-features it is given: ours replaced
    Playwright's list (HTTP kept on HTTP, no AI-mode or network-time requests...).
    A Playwright that turns off more must have them repeated in tests/browser.py."""
    playwright = pytest.importorskip("playwright")
    bundle = Path(playwright.__file__).parent / "driver/package/lib/coreBundle.js"
    if not bundle.exists():
        pytest.skip(f"no {bundle}: this Playwright is laid out otherwise")
    listed = re.search(r"disabledFeatures = \[(.*?)\]", bundle.read_text(), re.S)
    assert listed is not None, "Playwright's disabledFeatures list is not where it was"
    theirs = set(re.findall(r'^\s*"(\w+)"', listed.group(1), re.M))
    (ours,) = [
        a.split("=", 1)[1].split(",") for a in CHROMIUM_ARGS if a.startswith("--disable-features=")
    ]
    # Windows' and Edge's own are no matter here.
    missing = (
        theirs
        - set(ours)
        - {
            "TcpPortRandomizationWin",
            "msForceBrowserSignIn",
            "msEdgeUpdateLaunchServicesPreferredVersion",
        }
    )
    assert theirs and not missing, (
        f"add to tests/browser.py _PLAYWRIGHTS_DISABLED: {sorted(missing)}"
    )
