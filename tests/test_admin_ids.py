"""The admin API for any user id (review-auth A4, A6): an id in any script
exported, an id holding "/" managed by every user route."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.harness import running_gateway

pytestmark = [pytest.mark.asyncio, pytest.mark.warm_connections]

PLANS: dict[str, Any] = {"free": {}, "suspended": {"queries_per_day": 0}}

ADMIN_TOKEN = "adm-" + "a" * 40


async def test_the_admin_export_of_a_user_whose_id_is_not_latin1_is_served(
    postgres_dsn: str,
) -> None:
    """gateway/admin.py `_export` puts the ``user`` filter in the
    Content-Disposition filename, keeping every character `str.isalnum` takes:
    ``dũng`` (Vietnamese, which the gateway speaks) cannot be written in a
    Latin-1 header, and the export fails with an unhandled exception (500)
    instead of the user's ledger."""
    settings = {"admin": {"token_env": "TEST_ADMIN_TOKEN"}}
    async with running_gateway(
        postgres_dsn, settings=settings, env={"TEST_ADMIN_TOKEN": ADMIN_TOKEN}
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.get(
                "/admin/export/events",
                params={"user": "dũng"},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
        assert response.status_code == 200, response.status_code
        disposition = response.headers["content-disposition"]
    assert disposition == (
        'attachment; filename="events-{0}-{1}-d_ng.csv"; '
        "filename*=UTF-8''events-{0}-{1}-d%C5%A9ng.csv"
    ).format(*_range(disposition))


def _range(disposition: str) -> tuple[str, str]:
    """The export's default dates, as its file name gives them."""
    name = disposition.split('"')[1]
    return name[7:17], name[18:28]


# --- A6: a user whose id holds "/" cannot be managed through the admin API -----------


async def test_the_admin_api_can_suspend_a_user_whose_id_holds_a_slash(postgres_dsn: str) -> None:
    """`valid_user_id` accepts "/" (JWT subjects and backends' ids hold it:
    URIs, "tenant/user"), but the admin routes match ``{user_id}`` against the
    percent-decoded path, one segment: ``/admin/users/auth0%7Cx%2Fy/plan`` is
    404. The operator cannot look at, suspend, limit, move or give a key to
    such a user through the admin API; the dashboard (``{user_id:path}``)
    and the CLI can."""
    settings = {"admin": {"token_env": "TEST_ADMIN_TOKEN"}, "plans": PLANS}
    async with running_gateway(
        postgres_dsn, settings=settings, env={"TEST_ADMIN_TOKEN": ADMIN_TOKEN}
    ) as h:
        user = f"tenant-{secrets.token_hex(4)}/mallory"
        await h.storage.ensure_user(user, plan="free")
        team = f"acme-{secrets.token_hex(4)}"
        await h.storage.create_team(team, plan="free", now=datetime.now(UTC))
        path = f"/admin/users/{quote(user, safe='')}"
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.put(f"{path}/plan", json={"plan": "suspended"}, headers=auth)
            # Every other user route, by the same id.
            limit = f"{path}/limits/queries_per_day"
            limited = await client.put(limit, json={"value": 5}, headers=auth)
            cleared = await client.delete(limit, headers=auth)
            moved = await client.put(f"{path}/team", json={"team": team}, headers=auth)
            keyed = await client.post(f"{path}/keys", json={"name": "phone"}, headers=auth)
            shown = await client.get(path, headers=auth)
        assert response.status_code == 200, response.status_code
        for answer in (limited, cleared, moved, keyed, shown):
            assert answer.status_code in (200, 201), (answer.request.url, answer.text)
        stored = await h.storage.get_user(user)
        assert stored is not None and (stored.plan, stored.team) == ("suspended", team)
        assert shown.json()["user"] == user
