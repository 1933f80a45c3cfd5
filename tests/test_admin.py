"""The admin API, the end user's usage API, exports and the OpenAPI document."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import re
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.routing import Route

from gateway.admin import admin_routes
from gateway.cli import main
from gateway.clock import FixedClock
from gateway.config import DatabaseConfig
from gateway.export import csv_cell
from gateway.openapi import document
from gateway.storage import UsageEvent, open_storage
from tests.harness import USER, Harness, running_gateway

TOKEN = "admin-token-for-tests-0123456789"
CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
PLANS = {
    "plans": {
        "free": {"queries_per_day": 1, "tokens_per_day": 500_000},
        "pro": {"queries_per_day": 100},
    }
}


@pytest.fixture
async def gw(sqlite_url: str) -> AsyncIterator[Harness]:
    async with running_gateway(sqlite_url, settings=PLANS, env={"GATEWAY_ADMIN_TOKEN": TOKEN}) as h:
        yield h


async def admin(
    h: Harness, method: str, path: str, token: str | None = TOKEN, **kwargs: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=h.url, timeout=30) as client:
        return await client.request(method, path, headers=headers, **kwargs)


def ledger_event(
    answer_id: str, user: str, day: date, tokens: int, cost: str = "0.0000010"
) -> UsageEvent:
    return UsageEvent(
        answer_id=answer_id,
        user_id=user,
        day=day,
        created_at=datetime(day.year, day.month, day.day, 12, tzinfo=UTC),
        endpoint="chat-messages",
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        total_tokens=tokens,
        cost=Decimal(cost),
    )


# --- access -----------------------------------------------------------------------------


async def test_the_admin_surface_is_off_without_a_token(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url) as h:
        assert (await admin(h, "GET", "/admin/users")).status_code == 404
        assert (await admin(h, "GET", "/admin/openapi.json")).status_code == 404
        assert (await admin(h, "GET", "/admin/users", token=None)).status_code == 404


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1]])
async def test_admin_requests_need_the_token(gw: Harness, token: str | None) -> None:
    for method, path in (
        ("GET", "/admin/users"),
        ("GET", f"/admin/users/{USER}"),
        ("DELETE", "/admin/keys/x"),
        ("GET", "/admin/export/events"),
    ):
        response = await admin(gw, method, path, token=token)
        assert response.status_code == 401
        assert response.json() == {
            "code": "unauthorized",
            "message": "A valid admin token is required.",
            "status": 401,
        }
        assert response.headers["www-authenticate"] == 'Bearer realm="admin"'


def other_client(h: Harness) -> httpx.AsyncClient:
    """A client from another address (127.0.0.2: all of 127/8 is this machine)."""
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    return httpx.AsyncClient(base_url=h.url, timeout=30, transport=transport)


async def test_admin_token_guesses_are_throttled_per_client(sqlite_url: str) -> None:
    """The attack: guess the admin token as fast as the gateway answers. After
    ``admin.max_failures`` wrong tokens the client gets 429 with Retry-After, even
    for the right token, until the window ends; another address is unaffected."""
    clock = FixedClock(datetime(2026, 12, 6, 12, tzinfo=UTC))
    settings = {**PLANS, "admin": {"max_failures": 3, "failure_window": 60}}
    env = {"GATEWAY_ADMIN_TOKEN": TOKEN}
    async with running_gateway(sqlite_url, settings=settings, env=env, clock=clock) as h:
        for guess in ("a", "b", "c"):
            assert (await admin(h, "GET", "/admin/users", token=guess)).status_code == 401
        clock.advance(timedelta(seconds=15))
        refused = await admin(h, "GET", "/admin/users")  # the right token, too late
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "45"
        assert refused.json() == {
            "code": "too_many_attempts",
            "message": "Too many wrong tokens from this address; try again in 45 seconds.",
            "status": 429,
        }
        assert (await admin(h, "GET", "/admin/users", token=None)).status_code == 429
        async with other_client(h) as other:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            assert (await other.get("/admin/users", headers=headers)).status_code == 200
        clock.advance(timedelta(seconds=44))
        assert (await admin(h, "GET", "/admin/users")).headers["retry-after"] == "1"
        clock.advance(timedelta(seconds=1))  # the window has passed
        assert (await admin(h, "GET", "/admin/users")).status_code == 200


async def test_requests_without_a_token_are_not_guesses(sqlite_url: str) -> None:
    settings = {**PLANS, "admin": {"max_failures": 2}}
    async with running_gateway(
        sqlite_url, settings=settings, env={"GATEWAY_ADMIN_TOKEN": TOKEN}
    ) as h:
        for _ in range(5):
            assert (await admin(h, "GET", "/admin/users", token=None)).status_code == 401
        assert (await admin(h, "GET", "/admin/users")).status_code == 200


# --- users ------------------------------------------------------------------------------


async def test_list_users_paginates_sorts_filters_and_searches(gw: Harness) -> None:
    today = gw.gateway.today()
    for name, plan, lifetime, now in (
        ("bob", "pro", 500, 0),
        ("carol", "free", 50, 40),
        ("dave", "pro", 5000, 1),
    ):
        await gw.storage.ensure_user(name, plan=plan)
        await gw.storage.settle(
            ledger_event(f"{name}-old", name, today - timedelta(days=3), lifetime)
        )
        if now:
            await gw.storage.settle(ledger_event(f"{name}-now", name, today, now))

    page = (await admin(gw, "GET", "/admin/users", params={"limit": 2})).json()
    assert page["total"] == 4 and page["limit"] == 2 and page["offset"] == 0
    assert [u["id"] for u in page["data"]] == [USER, "bob"]
    assert [
        u["id"]
        for u in (await admin(gw, "GET", "/admin/users", params={"limit": 2, "offset": 2})).json()[
            "data"
        ]
    ] == ["carol", "dave"]

    by_lifetime = (
        await admin(gw, "GET", "/admin/users", params={"sort": "lifetime_tokens", "order": "desc"})
    ).json()
    assert [u["id"] for u in by_lifetime["data"]] == ["dave", "bob", "carol", USER]
    assert by_lifetime["data"][0]["lifetime"] == {
        "prompt_tokens": 2500,
        "completion_tokens": 2501,
        "total_tokens": 5001,
        "cost": "0.000002",
        "currency": "USD",
    }

    by_today = (
        await admin(
            gw, "GET", "/admin/users", params={"sort": "tokens_today", "order": "desc", "limit": 1}
        )
    ).json()
    assert [(u["id"], u["today"]["total_tokens"]) for u in by_today["data"]] == [("carol", 40)]

    pro = (await admin(gw, "GET", "/admin/users", params={"plan": "pro"})).json()
    assert (pro["total"], [u["id"] for u in pro["data"]]) == (2, ["bob", "dave"])
    found = (await admin(gw, "GET", "/admin/users", params={"search": "AR"})).json()
    assert [u["id"] for u in found["data"]] == ["carol"]

    for params in (
        {"limit": 0},
        {"limit": 501},
        {"sort": "plan"},
        {"order": "up"},
        {"offset": "x"},
    ):
        bad = await admin(gw, "GET", "/admin/users", params=params)
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_param"


async def test_one_user(gw: Harness) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
    await gw.probes.wait_finished(1)
    await gw.storage.set_override(USER, "tokens_per_day", 9000)
    detail = (await admin(gw, "GET", f"/admin/users/{USER}", params={"days": 7})).json()
    assert detail["user"] == USER and detail["plan"] == "free" and detail["stored_plan"] == "free"
    assert detail["overrides"] == {"tokens_per_day": 9000}
    assert detail["limits"]["tokens_per_day"] == {
        "limit": 9000,
        "used": 1168,
        "remaining": 7832,
        "resets_at": detail["limits"]["queries_per_day"]["resets_at"],
    }
    assert detail["lifetime"]["total_tokens"] == 1168 and detail["lifetime"]["cost"] == "0.001303"
    assert [k["id"] for k in detail["keys"]] == [gw.key_id]
    assert gw.key not in orjson.dumps(detail).decode()  # never the secret
    assert len(detail["daily"]) == 7 and detail["daily"][-1]["total_tokens"] == 1168
    missing = await admin(gw, "GET", "/admin/users/nobody")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


async def test_plan_changes_apply_at_once(gw: Harness) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 200
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 429
        changed = await admin(gw, "PUT", f"/admin/users/{USER}/plan", json={"plan": "pro"})
        assert changed.json() == {"id": USER, "plan": "pro"}
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 200
    assert (
        await admin(gw, "PUT", f"/admin/users/{USER}/plan", json={"plan": "gold"})
    ).status_code == 400
    assert (await admin(gw, "PUT", f"/admin/users/{USER}/plan", json={})).status_code == 400
    assert (
        await admin(gw, "PUT", "/admin/users/nobody/plan", json={"plan": "pro"})
    ).status_code == 404
    assert (
        await admin(gw, "PUT", f"/admin/users/{USER}/plan", content=b"{oops")
    ).status_code == 400


async def test_overrides(gw: Harness) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 200
        assert (
            await admin(gw, "PUT", f"/admin/users/{USER}/limits/queries_per_day", json={"value": 2})
        ).json() == {
            "id": USER,
            "name": "queries_per_day",
            "value": 2,
        }
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 200
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 429
        await admin(gw, "PUT", f"/admin/users/{USER}/limits/queries_per_day", json={"value": None})
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 200
        await admin(gw, "DELETE", f"/admin/users/{USER}/limits/queries_per_day")
        assert (
            await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        ).status_code == 429
    user = await gw.storage.get_user(USER)
    assert user is not None and dict(user.overrides) == {}
    for name, value in (
        ("queries_per_day", -1),
        ("queries_per_day", 1.5),
        ("queries_per_day", "5"),
        ("advanced_rag", 1),
        ("file_size_mb", True),
    ):
        assert (
            await admin(gw, "PUT", f"/admin/users/{USER}/limits/{name}", json={"value": value})
        ).status_code == 400
    assert (
        await admin(gw, "PUT", f"/admin/users/{USER}/limits/queries_per_day", json={})
    ).status_code == 400
    assert (
        await admin(gw, "PUT", f"/admin/users/{USER}/limits/bogus", json={"value": 1})
    ).status_code == 404
    assert (
        await admin(gw, "PUT", f"/admin/users/{USER}/limits/file_size_mb", json={"value": 2.5})
    ).status_code == 200


async def test_keys(gw: Harness) -> None:
    created = await admin(gw, "POST", f"/admin/users/{USER}/keys", json={"name": "phone"})
    assert created.status_code == 201
    key = created.json()
    assert (
        key["key"].startswith("gwk_")
        and key["name"] == "phone"
        and key["key"].startswith(key["prefix"])
    )
    async with httpx.AsyncClient(base_url=gw.url) as client:
        auth = {"Authorization": f"Bearer {key['key']}"}
        assert (await client.get("/v1/parameters", headers=auth)).status_code == 200
        revoked = await admin(gw, "DELETE", f"/admin/keys/{key['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        assert (await client.get("/v1/parameters", headers=auth)).status_code == 401  # at once
    assert (await admin(gw, "DELETE", "/admin/keys/key_unknown")).status_code == 404
    assert (await admin(gw, "POST", "/admin/users/nobody/keys", json={})).status_code == 404
    assert (
        await admin(gw, "POST", f"/admin/users/{USER}/keys", json={"name": 7})
    ).status_code == 400


# --- exports ---------------------------------------------------------------------------


async def test_csv_export_matches_the_ledger(gw: Harness) -> None:
    today = gw.gateway.today()
    await gw.storage.ensure_user("bob", plan="free")
    for i in range(30):
        await gw.storage.settle(
            ledger_event(
                f"a{i}",
                USER if i % 3 else "bob",
                today - timedelta(days=i % 5),
                100 + i,
                cost=f"0.00{i:02d}",
            )
        )
    start, end = today - timedelta(days=4), today
    response = await admin(
        gw,
        "GET",
        "/admin/export/events",
        params={"from": start.isoformat(), "to": end.isoformat(), "format": "csv"},
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert (
        response.headers["content-disposition"]
        == f'attachment; filename="events-{start}-{end}.csv"; '
        f"filename*=UTF-8''events-{start}-{end}.csv"
    )
    parsed = list(csv.DictReader(io.StringIO(response.text)))
    ledger = [e async for e in gw.storage.events(start, end)]
    assert [r["answer_id"] for r in parsed] == [e.answer_id for e in ledger]
    for row, event in zip(parsed, ledger, strict=True):
        assert int(row["total_tokens"]) == event.total_tokens
        assert Decimal(row["cost"]) == event.cost
        assert row["user_id"] == event.user_id and row["day"] == event.day.isoformat()
        assert row["estimated"] == "false"

    bob = await admin(
        gw,
        "GET",
        "/admin/export/events",
        params={"from": start.isoformat(), "user": "bob", "format": "json"},
    )
    assert {r["user_id"] for r in bob.json()} == {"bob"} and len(bob.json()) == 10
    daily = await admin(
        gw, "GET", "/admin/export/daily", params={"from": start.isoformat(), "format": "json"}
    )
    assert sum(r["total_tokens"] for r in daily.json()) == sum(e.total_tokens for e in ledger)
    daily_csv = list(
        csv.DictReader(
            io.StringIO(
                (
                    await admin(
                        gw, "GET", "/admin/export/daily", params={"from": start.isoformat()}
                    )
                ).text
            )
        )
    )
    assert len(daily_csv) == len(daily.json()) == 10

    for params in (
        {"from": "yesterday"},
        {"from": end.isoformat(), "to": start.isoformat()},
        {"format": "xml"},
    ):
        assert (await admin(gw, "GET", "/admin/export/events", params=params)).status_code == 400


# A user id and a model name that a spreadsheet would run as formulas (OWASP, "CSV
# Injection"): the export must write them as text.
EVIL_USER = '=HYPERLINK("http://evil","x")'
EVIL_MODEL = "@SUM(1+1)*cmd|' /C calc'!A0"


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://evil","x")', '\'=HYPERLINK("http://evil","x")'),
        ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\rx", "'\rx"),
        ("\nx", "'\nx"),
        ("  =1+1", "'  =1+1"),  # importers that trim spaces would still run it
        ("\uff1d1+1", "'\uff1d1+1"),  # full-width equals sign
        ("\uff20SUM(A1)", "'\uff20SUM(A1)"),
        ("\uff0b1", "'\uff0b1"),
        ("\uff0d1", "'\uff0d1"),
        ("-", "'-"),
        ("-1e3x", "'-1e3x"),
        # Plain numbers stay numbers: a negative cost, a signed count.
        ("-0.0012", "-0.0012"),
        ("-5", "-5"),
        ("+5", "+5"),
        ("-1.5E-7", "-1.5E-7"),
        ("-\uff11", "'-\uff11"),  # not an ASCII number
        # Nothing a spreadsheet runs: unchanged.
        ("alice", "alice"),
        ("a=b", "a=b"),
        ("2026-12-06", "2026-12-06"),
        ("", ""),
        ("'=already", "'=already"),
        (-3, -3),
        (Decimal("-0.5"), Decimal("-0.5")),
        (None, None),
        (True, "true"),
        (False, "false"),
    ],
)
def test_csv_cells_that_would_run_as_formulas_are_neutralised(value: Any, cell: Any) -> None:
    assert csv_cell(value) == cell


async def test_csv_exports_write_formula_like_ids_and_models_as_text(gw: Harness) -> None:
    """The attack: a user id and a model name chosen to be formulas reach an admin's
    spreadsheet through the export. The CSV carries them behind a single quote (read
    back with Python's csv module); JSON carries them raw."""
    today = gw.gateway.today()
    await gw.storage.ensure_user(EVIL_USER, plan="free")
    event = dataclasses.replace(ledger_event("evil-1", EVIL_USER, today, 100), model=EVIL_MODEL)
    await gw.storage.settle(event)
    params = {"from": today.isoformat(), "user": EVIL_USER}
    response = await admin(gw, "GET", "/admin/export/events", params={**params, "format": "csv"})
    assert response.status_code == 200
    (row,) = list(csv.DictReader(io.StringIO(response.text)))
    assert row["user_id"] == "'" + EVIL_USER
    assert row["model"] == "'" + EVIL_MODEL
    assert row["total_tokens"] == "100" and Decimal(row["cost"]) == event.cost
    daily = await admin(gw, "GET", "/admin/export/daily", params={**params, "format": "csv"})
    (day_row,) = list(csv.DictReader(io.StringIO(daily.text)))
    assert day_row["user_id"] == "'" + EVIL_USER
    raw = await admin(gw, "GET", "/admin/export/events", params={**params, "format": "json"})
    (json_row,) = raw.json()
    assert json_row["user_id"] == EVIL_USER and json_row["model"] == EVIL_MODEL


async def _export_peak(h: Harness, day: date) -> tuple[int, int, int]:
    """Stream one day's ledger export; returns (bytes, lines, peak traced memory)."""
    tracemalloc.start()
    try:
        received = lines = 0
        headers = {"Authorization": f"Bearer {TOKEN}"}
        params = {"from": day.isoformat(), "to": day.isoformat()}
        async with httpx.AsyncClient(base_url=h.url, timeout=60) as client:
            async with client.stream(
                "GET", "/admin/export/events", params=params, headers=headers
            ) as response:
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
                    lines += chunk.count(b"\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return received, lines, peak


async def test_a_large_export_streams_with_bounded_memory(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url, env={"GATEWAY_ADMIN_TOKEN": TOKEN}) as h:
        today = h.gateway.today()
        small_day, large_day = today - timedelta(days=1), today
        # Ledger rows written straight into the database file (fast): 2,000 on one
        # day (two of storage's reads, four chunks written), 12,000 on the next.
        path = sqlite_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            conn.executemany(
                "INSERT INTO usage_events (answer_id, user_id, day, created_at, endpoint, prompt_tokens, "
                "completion_tokens, total_tokens, cost, currency, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'USD', 'complete')",
                (
                    (
                        f"answer-{i:08d}",
                        USER,
                        (small_day if i < 2_000 else large_day).isoformat(),
                        datetime.now(UTC).isoformat(),
                        "chat-messages",
                        1000,
                        168,
                        1168,
                        "0.0013030",
                    )
                    for i in range(14_000)
                ),
            )
        small_bytes, small_lines, small_peak = await _export_peak(h, small_day)
        large_bytes, large_lines, large_peak = await _export_peak(h, large_day)
    assert (small_lines, large_lines) == (2_001, 12_001)  # a header and every row
    # Six times the rows, about the same memory: rows are read and written in
    # batches, never gathered (the peak covers server, storage and client alike).
    assert large_bytes > 5 * small_bytes
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)


# --- the OpenAPI document ------------------------------------------------------------


def test_openapi_describes_exactly_the_routes() -> None:
    served = {
        # A path's converter ({user_id:path}) is Starlette's, not OpenAPI's.
        ("/admin" + re.sub(r":\w+}", "}", r.path), m.lower())
        for r in admin_routes
        if isinstance(r, Route)
        for m in (r.methods or ())
        if m != "HEAD"
    }
    described = {(path, method) for path, item in document()["paths"].items() for method in item}
    assert served == described


async def test_openapi_is_served(gw: Harness) -> None:
    response = await admin(gw, "GET", "/admin/openapi.json")
    assert response.status_code == 200 and response.json()["openapi"] == "3.1.0"
    assert response.json() == orjson.loads(orjson.dumps(document()))


# --- what end users see ----------------------------------------------------------------


async def test_usage_for_the_end_user(gw: Harness) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        await client.post("/v1/chat-messages", json=CHAT, headers=gw.auth())
        await gw.probes.wait_finished(1)
        usage = (await client.get("/v1/usage", headers=gw.auth())).json()
        daily = (await client.get("/v1/usage/daily", params={"days": 7}, headers=gw.auth())).json()
        unauthorized = await client.get("/v1/usage")
        bad = await client.get("/v1/usage/daily", params={"days": 0}, headers=gw.auth())
    assert usage["user"] == USER and usage["plan"] == "free"
    queries = usage["limits"]["queries_per_day"]
    assert (queries["used"], queries["limit"], queries["remaining"]) == (1, 1, 0)
    assert datetime.fromisoformat(queries["resets_at"]).utcoffset() is not None
    assert usage["limits"]["tokens_per_day"]["remaining"] == 500_000 - 1168
    assert usage["limits"]["tokens_per_month"] == {
        "limit": None,
        "used": 1168,
        "remaining": None,
        "resets_at": usage["limits"]["tokens_per_month"]["resets_at"],
    }
    assert usage["limits"]["web_searches_per_day"]["limit"] is None
    assert usage["limits"]["advanced_rag"]["allowed"] is True
    assert usage["lifetime"] == {
        "prompt_tokens": 1033,
        "completion_tokens": 135,
        "total_tokens": 1168,
        "cost": "0.001303",
        "currency": "USD",
    }
    assert len(daily["data"]) == 7 and daily["data"][-1]["queries"] == 1
    assert [d["day"] for d in daily["data"]] == sorted(d["day"] for d in daily["data"])
    assert unauthorized.status_code == 401 and unauthorized.json()["code"] == "unauthorized"
    assert unauthorized.headers["www-authenticate"] == 'Bearer realm="api"'
    assert bad.status_code == 400


# --- the command line -------------------------------------------------------------------


def test_cli_export(tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    today = date.today()

    async def seed() -> None:
        storage = await open_storage(DatabaseConfig(url=sqlite_url))
        await storage.migrate()
        await storage.ensure_user(USER, plan="free")
        for i in range(5):
            await storage.settle(ledger_event(f"c{i}", USER, today, 10 * (i + 1)))
        await storage.ensure_user(EVIL_USER, plan="free")
        evil = ledger_event("c5", EVIL_USER, today, 60)
        await storage.settle(dataclasses.replace(evil, model=EVIL_MODEL))
        await storage.close()

    asyncio.run(seed())
    config = tmp_path / "cli.toml"
    config.write_text(f'[database]\nurl = "{sqlite_url}"\n[accounting]\ntimezone = "UTC"\n')
    out = tmp_path / "out.csv"
    assert (
        main(
            [
                "--config",
                str(config),
                "usage",
                "export",
                "--from",
                today.isoformat(),
                "--to",
                today.isoformat(),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    with out.open(newline="") as fh:
        parsed = list(csv.DictReader(fh))
    assert [int(r["total_tokens"]) for r in parsed] == [10, 20, 30, 40, 50, 60]
    # The formula-like id and model leave as text (CSV injection, docs/admin.md).
    assert [(r["user_id"], r["model"]) for r in parsed][-1] == ("'" + EVIL_USER, "'" + EVIL_MODEL)
    assert (
        main(
            [
                "--config",
                str(config),
                "usage",
                "export",
                "--format",
                "json",
                "--daily",
                "--from",
                today.isoformat(),
                "--to",
                today.isoformat(),
            ]
        )
        == 0
    )
    rows = {r["user_id"]: r for r in orjson.loads(capsys.readouterr().out)}
    assert rows[USER]["total_tokens"] == 150 and rows[EVIL_USER]["total_tokens"] == 60
    assert (
        main(
            [
                "--config",
                str(config),
                "usage",
                "export",
                "--from",
                today.isoformat(),
                "--to",
                (today - timedelta(days=1)).isoformat(),
            ]
        )
        == 2
    )
