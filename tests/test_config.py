from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.config import Config, load_config, parse_config, render_config, setting_paths
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config == parse_config({}, env={})
    assert config.source is None
    assert config.database.url == "sqlite:///gateway.db"
    assert list(config.plans) == ["free"]
    assert config.plans["free"].queries_per_day is None  # omitted means unlimited


@pytest.mark.parametrize(
    "path", [ROOT / "gateway.toml", *sorted((ROOT / "config").glob("*.toml"))], ids=lambda p: p.name
)
def test_shipped_configurations_are_valid(path: Path) -> None:
    config = load_config(path, env={})
    assert config.accounting.default_plan in config.plans


def test_repo_default_config() -> None:
    config = load_config(ROOT / "gateway.toml", env={})
    free = config.plans["free"]
    assert (
        free.queries_per_day,
        free.web_searches_per_day,
        free.advanced_rag,
        free.file_size_mb,
    ) == (50, 5, False, 10.0)
    assert config.accounting.timezone == "Asia/Ho_Chi_Minh"
    assert config.plans["pro"].tokens_per_month is None


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[plans.free]\nquerys_per_day = 5",
            "plans.free.querys_per_day: unknown key (did you mean 'queries_per_day'?",
        ),
        ("[servr]\nport = 1", "servr: unknown key"),
        ("[server]\nprot = 1", "server.prot: unknown key (did you mean 'port'?"),
        ("[server]\nport = '80'", "server.port: expected an integer, got a string ('80')"),
        ("[server]\nport = true", "server.port: expected an integer, got a boolean (True)"),
        ("[server]\nworkers = 0", "server.workers: expected a number >= 1, got 0"),
        (
            "[plans.free]\nqueries_per_day = -1",
            "plans.free.queries_per_day: expected a number >= 0, got -1",
        ),
        (
            "[plans.free]\nqueries_per_day = 1.5",
            "plans.free.queries_per_day: expected an integer, got a number (1.5)",
        ),
        ("[plans.free]\nadvanced_rag = 'yes'", "plans.free.advanced_rag: expected true or false"),
        (
            "[plans.free]\nfile_size_mb = -0.5",
            "plans.free.file_size_mb: expected a number >= 0, got -0.5",
        ),
        ("plans = 3", "plans: expected a table of [plans.NAME] tables"),
        ("[plans]", "plans: at least one [plans.NAME] table is required"),
        (
            "[accounting]\ndefault_plan = 'gold'",
            "accounting.default_plan: no plan named 'gold' (expected one of: free)",
        ),
        (
            "[accounting]\ntimezone = 'Mars/Olympus'",
            "accounting.timezone: unknown time zone 'Mars/Olympus'",
        ),
        (
            "[upstream]\nkind = 'claude'",
            "upstream.kind: expected one of 'anthropic', 'dify', 'openai', got 'claude'",
        ),
        ("[upstream]\nurl = 'ftp://x'", "upstream.url: expected an http:// or https:// URL"),
        (
            "[upstream]\nconnect_timeout = 0",
            "upstream.connect_timeout: expected a number >= 0.001, got 0.0",
        ),
        ("[database]\nurl = 'mysql://x'", "database.url: unsupported URL 'mysql://x'"),
        (
            "[database]\npool_min_size = 5\npool_max_size = 2",
            "database.pool_min_size: must not exceed",
        ),
        ("upstream = 1", "upstream: expected a table, got an integer (1)"),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert message in info.value.message
    assert "\n" not in info.value.message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})


def test_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[upstream]\napi_key_env = 'MY_DIFY_KEY'\n")
    env = {
        "GATEWAY_DATABASE_URL": "postgresql://u:secret@db/gw",
        "GATEWAY_UPSTREAM_URL": "https://dify.example.com/v1/",
        "MY_DIFY_KEY": "app-from-named-var",
        "GATEWAY_ADMIN_TOKEN": "admin-secret",
    }
    config = load_config(path, env=env)
    assert config.database.url == "postgresql://u:secret@db/gw"
    assert config.upstream.url == "https://dify.example.com/v1"
    assert config.upstream.api_key == "app-from-named-var"
    assert config.admin.token == "admin-secret"
    config = load_config(path, env={**env, "GATEWAY_UPSTREAM_API_KEY": "app-direct"})
    assert config.upstream.api_key == "app-direct"
    assert (
        load_config(env={"GATEWAY_CONFIG": str(path), "MY_DIFY_KEY": "k"}).upstream.api_key == "k"
    )


def test_render_masks_secrets() -> None:
    config = parse_config(
        {"plans": {"free": {"queries_per_day": 5}}},
        env={
            "GATEWAY_DATABASE_URL": "postgresql://gw:hunter2@db/gw",
            "DIFY_API_KEY": "app-123",
            "GATEWAY_ADMIN_TOKEN": "tok",
        },
    )
    text = render_config(config)
    assert "hunter2" not in text and "app-123" not in text and 'tok"' not in text
    assert 'url = "postgresql://gw:***@db/gw"' in text
    assert 'api_key = "***"' in text and 'token = "***"' in text
    assert "queries_per_day = 5" in text and "# tokens_per_day = unlimited" in text


def test_overrides_replace_plan_limits() -> None:
    plan = parse_config(
        {"plans": {"free": {"queries_per_day": 5, "advanced_rag": False}}}, env={}
    ).plans["free"]
    mine = plan.with_overrides({"queries_per_day": None, "advanced_rag": True, "bogus": 3})
    assert (mine.queries_per_day, mine.advanced_rag, mine.name) == (None, True, "free")
    assert plan.with_overrides({}) is plan


def test_every_setting_is_documented() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    missing = [path for path in setting_paths() if f"`{path}`" not in docs]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    documented = set(re.findall(r"^\| `([a-z_<>.]+\.[a-z_<>.]+)` \|", docs, flags=re.M))
    stale = documented - set(setting_paths())
    assert not stale, f"docs/configuration.md documents settings that do not exist: {stale}"


def test_plan_lookup_falls_back_to_default() -> None:
    config = parse_config({"plans": {"free": {}, "pro": {"queries_per_day": 9}}}, env={})
    assert config.plan("pro").queries_per_day == 9
    assert config.plan("retired").name == "free"
    assert isinstance(config, Config)


def test_call_prices_are_parsed_as_decimals_and_refused_when_negative() -> None:
    config = parse_config(
        {"call_prices": {"openai.web_search": {"price": "0.01"}, "dify.text_to_audio": {}}},
        env={},
    )
    assert config.call_prices["openai.web_search"].price == Decimal("0.01")
    assert config.call_prices["openai.web_search"].currency == "USD"
    assert config.call_prices["dify.text_to_audio"].price == Decimal(0)
    with pytest.raises(ConfigError, match=r"call_prices\.x\.price"):
        parse_config({"call_prices": {"x": {"price": "-1"}}}, env={})
    with pytest.raises(ConfigError, match="call_prices"):
        parse_config({"call_prices": {"x": "0.01"}}, env={})


def test_prices_in_more_than_one_currency_are_refused_naming_both_keys() -> None:
    # gpt-4o-mini in VND and gpt-4o in USD would be added into one total (issue 25).
    prices = {"gpt-4o": {"input": "2.5"}, "gpt-4o-mini": {"input": "3900", "currency": "VND"}}
    with pytest.raises(ConfigError, match=r"prices\.gpt-4o-mini\.currency.*prices\.gpt-4o\."):
        parse_config({"prices": prices}, env={})
    calls = {"dify.text_to_audio": {"price": "0.01", "currency": "EUR"}, "dify.x": {}}
    with pytest.raises(ConfigError, match=r"call_prices\.dify\.x\.currency"):
        parse_config({"call_prices": calls}, env={})
    same = {"gpt-4o": {"currency": "VND"}, "gpt-4o-mini": {"currency": "VND"}}
    assert parse_config({"prices": same}, env={}).prices["gpt-4o"].currency == "VND"
