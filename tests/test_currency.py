"""Money in more than one currency (issue 25): a database keeps its totals in one
currency, every surface that shows money names it, and nothing adds two currencies.

The attack: an operator moves the prices from USD to VND over a database that
already holds USD costs. The day rows and lifetime totals hold one cost number
each, so the gateway must refuse to serve (start-up, `gateway serve`, reload) rather
than add VND to them, and every reading surface must keep saying USD.
"""

from __future__ import annotations

import asyncio
import csv
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import orjson
import pytest

from gateway.cli import main
from gateway.config import DatabaseConfig, parse_config
from gateway.currency import CurrencyMismatch, database_currency, serving, shown
from gateway.runtime import Gateway
from gateway.storage import Storage, UsageEvent, UsageGroup, open_storage
from tests.fakes.dify import FakeDify, Usage
from tests.harness import UPSTREAM_KEY, USER, running_gateway, to_toml

ADMIN = "currency-admin-token-" + "x" * 20
ENV = {"GATEWAY_ADMIN_TOKEN": ADMIN}


def priced(currency: str) -> dict[str, Any]:
    return {"prices": {"gpt-4o": {"input": "2.5", "output": "10", "currency": currency}}}


def config(currency: str | None) -> Any:
    return parse_config({"plans": {"free": {}}, **(priced(currency) if currency else {})}, env={})


def answer(answer_id: str, cost: str, currency: str, *, model: str = "gpt-4o") -> UsageEvent:
    today = datetime.now(UTC).date()
    return UsageEvent(
        answer_id=answer_id,
        user_id=USER,
        day=today,
        created_at=datetime.now(UTC),
        endpoint="chat/completions",
        prompt_tokens=60,
        completion_tokens=40,
        total_tokens=100,
        cost=Decimal(cost),
        currency=currency,
        model=model,
    )


async def seed(url: str, *events: UsageEvent) -> None:
    """Answers recorded by an earlier run of the gateway (the settle the proxy uses)."""
    storage = await open_storage(DatabaseConfig(url=url))
    try:
        await storage.migrate()
        await storage.ensure_user(USER, plan="free")
        for event in events:
            assert await storage.settle(event)
    finally:
        await storage.close()


def write_config(path: Path, url: str, currency: str | None) -> Path:
    data: dict[str, Any] = {
        "database": {"url": url},
        "accounting": {"timezone": "UTC", "default_plan": "free"},
        "plans": {"free": {}},
        **(priced(currency) if currency else {}),
    }
    path.write_text(to_toml(data))
    return path


# --- the rule, pure ---------------------------------------------------------------------

RULE = [
    # (configured currency, the ledger's cost per currency, the currency served or the error)
    (None, {}, "USD"),
    (None, {"VND": Decimal(5)}, "VND"),
    ("VND", {}, "VND"),
    ("VND", {"VND": Decimal(5)}, "VND"),
    # A currency whose rows cost nothing holds no money: nothing to add to.
    ("VND", {"USD": Decimal(0), "VND": Decimal(5)}, "VND"),
    ("VND", {"USD": Decimal(0)}, "VND"),
    ("VND", {"USD": Decimal("0.01")}, "prices.gpt-4o.currency is 'VND'.*holds costs in 'USD'"),
    (None, {"USD": Decimal(1), "VND": Decimal(5)}, "'USD' and 'VND'"),
    ("USD", {"USD": Decimal(1), "VND": Decimal(5)}, "'USD' and 'VND'"),
]


@pytest.mark.parametrize(("configured", "costs", "expected"), RULE)
def test_the_currency_served_or_refused(
    configured: str | None, costs: dict[str, Decimal], expected: str
) -> None:
    if len(expected) == 3:
        assert serving(config(configured), costs) == expected
    else:
        with pytest.raises(CurrencyMismatch, match=expected):
            serving(config(configured), costs)


def test_the_refusal_says_what_to_do() -> None:
    with pytest.raises(CurrencyMismatch) as refused:
        serving(config("VND"), {"USD": Decimal(1)})
    message = refused.value.message
    assert "usage_events.currency" in message and "[database] url" in message
    assert "back to 'USD'" in message and "gateway usage export" in message


def test_readers_name_the_ledger_currency_whatever_the_configuration_says() -> None:
    # The CLI reads totals written in USD: they are USD even if the file now says VND.
    assert shown({"USD": Decimal(1)}, config("VND")) == "USD"
    assert shown({}, config("VND")) == "VND"
    assert shown({}, config(None)) == "USD"
    with pytest.raises(CurrencyMismatch):
        database_currency({"USD": Decimal(1), "VND": Decimal(2)})


# --- storage: the ledger's sums per currency --------------------------------------------


async def test_ledger_sums_are_grouped_by_currency(storage: Storage) -> None:
    await storage.ensure_user(USER, plan="free")
    for event in (
        answer("a1", "0.5", "USD"),
        answer("a2", "0.25", "USD"),
        answer("a3", "12000", "VND"),
        answer("a4", "0", "EUR"),
    ):
        assert await storage.settle(event)
    assert await storage.costs_by_currency() == {
        "USD": Decimal("0.75"),
        "VND": Decimal(12000),
        "EUR": Decimal(0),
    }
    today = datetime.now(UTC).date()
    by_model = await storage.usage_by_model(USER, start=today, end=today)
    # One model, three currencies: three rows, never one cost of 12000.75.
    assert sorted(by_model, key=lambda m: m.currency) == [
        UsageGroup("gpt-4o", 1, 60, 0, 40, 0, 100, Decimal(0), "EUR"),
        UsageGroup("gpt-4o", 2, 120, 0, 80, 0, 200, Decimal("0.75"), "USD"),
        UsageGroup("gpt-4o", 1, 60, 0, 40, 0, 100, Decimal(12000), "VND"),
    ]


# --- every surface names the currency ---------------------------------------------------


async def test_usage_admin_exports_and_dashboard_name_the_currency(database_url: str) -> None:
    await seed(database_url, answer("v1", "1234.5", "VND"), answer("v2", "100", "VND"))
    async with (
        running_gateway(
            database_url, settings={**priced("VND"), "dashboard": {"locale": "en-US"}}, env=ENV
        ) as h,
        _client(h.url) as http,
    ):
        admin = {"Authorization": f"Bearer {ADMIN}"}
        usage = (await http.get("/v1/usage", headers=h.auth())).json()
        daily = (await http.get("/v1/usage/daily?days=2", headers=h.auth())).json()
        users = (await http.get("/admin/users", headers=admin)).json()
        detail = (await http.get(f"/admin/users/{USER}", headers=admin)).json()
        events = orjson.loads(
            (await http.get("/admin/export/events?format=json", headers=admin)).content
        )
        days_csv = (await http.get("/admin/export/daily?format=csv", headers=admin)).text
        openapi = (await http.get("/admin/openapi.json", headers=admin)).json()
        signed_in = await http.post("/dashboard/login", data={"token": ADMIN})
        assert signed_in.status_code == 303
        table = await _dashboard(http, "/dashboard/")
        page = await _dashboard(http, f"/dashboard/users/{USER}")
    assert usage["currency"] == "VND"
    assert (usage["today"]["cost"], usage["today"]["currency"]) == ("1334.5", "VND")
    assert (usage["lifetime"]["cost"], usage["lifetime"]["currency"]) == ("1334.5", "VND")
    assert [(m["cost"], m["currency"]) for m in usage["month_by_model"]] == [("1334.5", "VND")]
    assert daily["currency"] == "VND"
    assert all(row["currency"] == "VND" for row in daily["data"])
    assert daily["data"][-1]["cost"] == "1334.5"
    (listed,) = users["data"]
    assert listed["lifetime"]["currency"] == listed["today"]["currency"] == "VND"
    assert all(row["currency"] == "VND" for row in detail["daily"])
    assert detail["lifetime"]["currency"] == "VND"
    assert {(e["cost"], e["currency"]) for e in events} == {("1234.5", "VND"), ("100", "VND")}
    (row,) = csv.DictReader(days_csv.splitlines())
    assert (row["cost"], row["currency"]) == ("1334.5", "VND")
    schemas = openapi["components"]["schemas"]
    assert (
        "currency" in schemas["Day"]["properties"]
        and "currency" in schemas["Lifetime"]["properties"]
    )
    assert "1,334.5000\u00a0VND" in table
    assert page.count("\u00a0VND") >= 2  # the lifetime cost and today's row
    assert "\u00a0USD" not in table + page


async def _dashboard(http: httpx.AsyncClient, path: str) -> str:
    response = await http.get(path)
    assert response.status_code == 200, response.text
    return response.text


def _client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=10)


# --- the attack: USD to VND over a database that holds USD -----------------------------


async def test_a_currency_change_over_a_database_with_costs_is_refused_at_start(
    database_url: str,
) -> None:
    await seed(database_url, answer("u1", "0.75", "USD"))
    storage = await open_storage(DatabaseConfig(url=database_url))
    try:
        settings = {"database": {"url": database_url}, "plans": {"free": {}}, **priced("VND")}
        gateway = Gateway(parse_config(settings, env={}), storage=storage)
        with pytest.raises(CurrencyMismatch, match=r"prices\.gpt-4o\.currency is 'VND'.*'USD'"):
            await gateway.start()
    finally:
        await storage.close()


def test_gateway_serve_refuses_in_one_line(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(seed(sqlite_url, answer("u1", "0.75", "USD")))
    path = write_config(tmp_path / "vnd.toml", sqlite_url, "VND")
    # Returns before uvicorn would take the port: the check runs first. (`serve`
    # sets its process's variables first: they are this process's, put back after.)
    with mock.patch.dict(os.environ):
        assert main(["--config", str(path), "serve", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("gateway: configuration error: ")
    assert "prices.gpt-4o.currency is 'VND'" in err and "holds costs in 'USD'" in err


async def test_a_reload_to_another_currency_is_refused_and_usd_stays_usd(
    tmp_path: Path, database_url: str
) -> None:
    await seed(database_url, answer("u1", "0.75", "USD"))
    path = tmp_path / "gateway.toml"
    settings = {**priced("USD"), "server": {"reload_interval": 0}}
    async with running_gateway(database_url, settings=settings, config_file=path) as h:
        text = path.read_text()
        path.write_text(text.replace('currency = "USD"', 'currency = "VND"'))
        assert await h.gateway.reload() is False
        assert h.gateway.config.prices["gpt-4o"].currency == "USD"  # the running one stays
        async with _client(h.url) as http:
            usage = (await http.get("/v1/usage", headers=h.auth())).json()
    assert usage["lifetime"] == {
        "prompt_tokens": 60,
        "completion_tokens": 40,
        "total_tokens": 100,
        "cost": "0.75",
        "currency": "USD",
    }


async def test_a_reload_to_another_currency_applies_while_no_cost_is_recorded(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = tmp_path / "gateway.toml"
    settings = {**priced("USD"), "server": {"reload_interval": 0}}
    async with running_gateway(sqlite_url, settings=settings, config_file=path) as h:
        path.write_text(path.read_text().replace('currency = "USD"', 'currency = "VND"'))
        assert await h.gateway.reload() is True
        async with _client(h.url) as http:
            usage = (await http.get("/v1/usage", headers=h.auth())).json()
    assert usage["currency"] == usage["today"]["currency"] == "VND"


def _cli(path: Path, *args: str) -> list[str]:
    return ["--config", str(path), *args]


def test_the_cli_names_the_ledger_currency_not_the_new_configuration(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(seed(sqlite_url, answer("u1", "0.75", "USD"), answer("u2", "0.5", "USD")))
    path = write_config(tmp_path / "vnd.toml", sqlite_url, "VND")
    assert main(_cli(path, "users", "show", USER)) == 0
    shown_text = capsys.readouterr().out
    assert "cost 1.25 USD" in shown_text and "  cost          1.25 USD" in shown_text
    assert "VND" not in shown_text
    assert main(_cli(path, "users", "list")) == 0
    listed = capsys.readouterr().out
    assert "1.25 USD" in listed and "VND" not in listed
    assert main(_cli(path, "usage", "export", "--daily", "--format", "json")) == 0
    (day,) = orjson.loads(capsys.readouterr().out)
    assert (day["cost"], day["currency"]) == ("1.25", "USD")


def test_a_database_that_already_mixes_currencies_shows_no_sum(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Written before prices in two currencies were refused (issue 25): the day row
    # and the lifetime total hold 0.75 + 12000 as one number.
    asyncio.run(
        seed(sqlite_url, answer("u1", "0.75", "USD"), answer("v1", "12000", "VND", model="m"))
    )
    path = write_config(tmp_path / "usd.toml", sqlite_url, "USD")
    for command in (["users", "show", USER], ["users", "list"], ["usage", "export", "--daily"]):
        assert main(_cli(path, *command)) == 2, command
        captured = capsys.readouterr()
        assert "12000.75" not in captured.out
        assert "'USD' and 'VND'" in captured.err
    with mock.patch.dict(os.environ):  # what `serve` sets for its process
        assert main(_cli(path, "serve", "--port", "1")) == 2
    assert "'USD' and 'VND'" in capsys.readouterr().err
    # The ledger itself keeps each answer's own currency: it still exports.
    assert main(_cli(path, "usage", "export", "--format", "json")) == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert sorted((r["cost"], r["currency"]) for r in rows) == [("0.75", "USD"), ("12000", "VND")]


# --- an upstream that names its own currency (Dify) -------------------------------------

CHAT = {"query": "hi", "inputs": {}, "response_mode": "blocking", "user": "x"}


async def test_without_prices_the_first_cost_reported_fixes_the_currency(
    database_url: str,
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY, usage=Usage.priced(currency="VND"))
    async with running_gateway(database_url, fake=fake) as h, _client(h.url) as http:
        assert h.gateway.currency == "USD"  # nothing names one yet
        assert (
            await http.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        ).status_code == 200
        await h.probes.wait_finished(1)
        usage = (await http.get("/v1/usage", headers=h.auth())).json()
    assert usage["currency"] == usage["lifetime"]["currency"] == "VND"
    assert usage["lifetime"]["cost"] == "0.001303"


async def test_an_upstream_cost_in_another_currency_is_said_and_refused_next_start(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await seed(database_url, answer("u1", "0.75", "USD"))
    fake = FakeDify(api_key=UPSTREAM_KEY, usage=Usage.priced(currency="VND"))
    async with running_gateway(database_url, fake=fake) as h, _client(h.url) as http:
        assert (
            await http.post("/v1/chat-messages", json=CHAT, headers=h.auth())
        ).status_code == 200
        await h.probes.wait_finished(1)
        usage = (await http.get("/v1/usage", headers=h.auth())).json()
        recorded = [e.currency for e in await h.events()]
    # Recorded (never lost), labelled with the database's currency, and said loudly.
    assert usage["currency"] == "USD"
    assert recorded == ["USD", "VND"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("recorded a cost in VND" in m and "keeps its money in USD" in m for m in errors)
    storage = await open_storage(DatabaseConfig(url=database_url))
    try:
        again = Gateway(parse_config({"plans": {"free": {}}}, env={}), storage=storage)
        with pytest.raises(CurrencyMismatch, match="'USD' and 'VND'"):
            await again.start()
    finally:
        await storage.close()
