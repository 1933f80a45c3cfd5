"""The paused forms a resume is followed by (issue 20), on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.storage import PausedForm, Storage
from gateway.storage.base import PAUSED_FORM_DAYS

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


async def test_a_form_is_found_by_its_token_hash_and_the_first_record_wins(
    storage: Storage,
) -> None:
    first = PausedForm("h1", "run-1", "alice")
    await storage.remember_forms([first, PausedForm("h2", "run-2", "bob")], now=NOW)
    # A second record of a token (a reconnect replaying the pause) changes nothing.
    await storage.remember_forms([PausedForm("h1", "run-9", "mallory")], now=NOW)
    assert await storage.paused_form("h1") == first
    assert await storage.paused_form("h2") == PausedForm("h2", "run-2", "bob")
    assert await storage.paused_form("h3") is None
    await storage.remember_forms([], now=NOW)  # nothing to keep is fine


async def test_forms_older_than_the_retention_are_forgotten(storage: Storage) -> None:
    await storage.remember_forms([PausedForm("old", "run-1", "alice")], now=NOW)
    later = NOW + timedelta(days=PAUSED_FORM_DAYS, seconds=1)
    await storage.remember_forms([PausedForm("new", "run-2", "alice")], now=later)
    assert await storage.paused_form("old") is None
    assert await storage.paused_form("new") is not None
