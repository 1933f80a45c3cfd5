from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, load_config, parse_config, render_config, setting_paths
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# What every [upstreams.NAME] must say (no defaults: they are [upstream]'s).
NAMED = "url = 'http://u/v1'\napi_key_env = 'K'"
NAMED_KEYS = {"url": "http://u/v1", "api_key_env": "K"}


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
        # issue 23, named upstreams
        ("upstreams = 1", "upstreams: expected a table of [upstreams.NAME] tables"),
        ("[upstreams]\nsupport = 1", "upstreams.support: expected a table, got an integer (1)"),
        ("[upstreams.support]\nmodles = []", "upstreams.support.modles: unknown key"),
        (
            "[upstreams.support]\napi_key_env = 'K'\nurl = 'ftp://x'",
            "upstreams.support.url: expected an http://",
        ),
        (
            f"[upstream]\n[upstreams.default]\n{NAMED}",
            "upstreams.default: the [upstream] table is already the upstream named 'default'",
        ),
        (
            f"[upstreams.admin]\n{NAMED}",
            "upstreams.admin.mount: '/admin/v1' would shadow the gateway's own /admin",
        ),
        (
            f"[upstreams.a]\n{NAMED}\nmount = '/metrics'",
            "upstreams.a.mount: '/metrics' would shadow the gateway's own /metrics",
        ),
        (
            f"[upstreams.a]\n{NAMED}\nmount = '/v1/usage'",
            "upstreams.a.mount: '/v1/usage' would shadow the gateway's own /v1/usage",
        ),
        ("[upstream]\nmount = '/dashboard'", "upstream.mount: '/dashboard' would shadow"),
        (
            f"[upstreams.a]\n{NAMED}\nkind = 'openai'\nfallbacks = ['b']",
            "upstreams.a.fallbacks[0]: no upstream named 'b' (expected one of: a)",
        ),
        (
            f"[upstreams.a]\n{NAMED}\nkind = 'openai'\nfallbacks = ['b']\n[upstreams.b]\n{NAMED}\nkind = 'anthropic'",
            "upstreams.a.fallbacks[0]: 'b' is a anthropic upstream",
        ),
        (
            f"[upstream]\nkind = 'openai'\n[upstreams.c]\n{NAMED}\nkind = 'anthropic'\nmount = '/v1'",
            "upstreams.c.mount: '/v1' is the mount of the openai upstream 'default'",
        ),
        (f"[upstreams.a]\n{NAMED}\nallow = ['get /x']", "upstreams.a.allow[0]: 'get /x': expected"),
        # A named upstream has no defaults for its URL and key variable: [upstream]'s
        # (a local Dify app, DIFY_API_KEY) would send another upstream's key.
        ("[upstreams.a]\nurl = 'http://u/v1'", "upstreams.a.api_key_env: required"),
        ("[upstreams.a]\napi_key_env = 'K'", "upstreams.a.url: required"),
        # `[upstreams]` with no NAME: nothing to serve (serve crashed at start).
        ("[upstreams]", "upstreams: the table names no upstream"),
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
        "GATEWAY_ADMIN_TOKEN": "admin-secret-0123456789",
    }
    config = load_config(path, env=env)
    assert config.database.url == "postgresql://u:secret@db/gw"
    assert config.upstream.url == "https://dify.example.com/v1"
    assert config.upstream.api_key == "app-from-named-var"
    assert config.admin.token == "admin-secret-0123456789"
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
            "GATEWAY_ADMIN_TOKEN": "tok-0123456789abcdef",
        },
    )
    text = render_config(config)
    assert "hunter2" not in text and "app-123" not in text and "tok-0123" not in text
    assert 'url = "postgresql://gw:***@db/gw"' in text
    assert 'api_key = "***"' in text and 'token = "***"' in text
    assert "queries_per_day = 5" in text and "# tokens_per_day = unlimited" in text


@pytest.mark.parametrize(
    ("settings", "env", "refusal"),
    [
        pytest.param(
            {"auth": {"mode": "jwt"}},
            {"GATEWAY_JWT_SECRET": "secret"},
            "auth.jwt.secret_env: GATEWAY_JWT_SECRET holds 6 bytes",
            id="hs256-secret",
        ),
        pytest.param(
            {"auth": {"mode": "jwt"}},
            {"GATEWAY_JWT_SECRET": "s" * 31},
            "GATEWAY_JWT_SECRET holds 31 bytes; .* at least 32",
            id="hs256-secret-one-short",
        ),
        pytest.param(
            {"auth": {"mode": "trusted_header"}},
            {"GATEWAY_SERVICE_KEY": "svc"},
            "auth.trusted_header.service_key_env: GATEWAY_SERVICE_KEY holds 3 bytes",
            id="service-key",
        ),
        pytest.param(
            {}, {"GATEWAY_ADMIN_TOKEN": "admin"}, "admin.token_env: GATEWAY_ADMIN_TOKEN", id="admin"
        ),
        pytest.param(
            {"admin": {"token_env": "OPS_TOKEN"}},
            {"OPS_TOKEN": "p" * 15},
            "admin.token_env: OPS_TOKEN holds 15 bytes; .* at least 16",
            id="admin-own-variable",
        ),
        pytest.param({}, {"GATEWAY_METRICS_TOKEN": "metrics"}, "metrics.token_env", id="metrics"),
    ],
)
def test_a_guessable_secret_is_refused_at_load(
    settings: dict[str, Any], env: dict[str, str], refusal: str
) -> None:
    """Attack (review 3, #8): GATEWAY_JWT_SECRET=secret was taken; any user holds a
    token it signed and can find a six-letter key offline in seconds, then sign a
    token for anyone. A five-letter admin token is within the throttle's guesses."""
    with pytest.raises(ConfigError, match=refusal):
        parse_config({"plans": {"free": {}}, **settings}, env=env)
    strong = {name: "x" * 32 for name in env}
    parse_config({"plans": {"free": {}}, **settings}, env=strong)


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


def test_the_one_hour_cache_write_price_is_an_optional_decimal_never_negative() -> None:
    prices = {
        "claude-sonnet-4-5": {
            "input": "3",
            "cache_write_input": "3.75",
            "cache_write_1h_input": "6.00",
        },
        "claude-haiku-4-5": {"input": "1"},
    }
    config = parse_config({"prices": prices}, env={})
    assert config.prices["claude-sonnet-4-5"].cache_write_1h_input == Decimal("6.00")
    assert config.prices["claude-haiku-4-5"].cache_write_1h_input is None
    with pytest.raises(
        ConfigError, match=r"prices\.m\.cache_write_1h_input: expected a number >= 0"
    ):
        parse_config({"prices": {"m": {"input": "1", "cache_write_1h_input": "-6"}}}, env={})
    with pytest.raises(ConfigError, match=r"prices\.m\.cache_write_1h_input"):
        parse_config({"prices": {"m": {"cache_write_1h_input": "six"}}}, env={})


def test_the_shipped_anthropic_prices_bill_one_hour_writes_at_twice_the_input() -> None:
    config = load_config(ROOT / "config" / "anthropic.toml", env={})
    assert config.prices
    for model, price in config.prices.items():
        assert price.cache_write_1h_input == 2 * price.input, model
        assert price.cache_write_input == price.input * Decimal("1.25"), model
    assert config.prices["claude-sonnet-4-5"].cache_write_1h_input == Decimal("6.00")


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


# --- issue 23: named upstreams ----------------------------------------------------------


def test_a_single_upstream_table_is_the_upstream_named_default_at_v1() -> None:
    config = parse_config(
        {"upstream": {"kind": "openai", "url": "https://api.example.com/v1/"}},
        env={"DIFY_API_KEY": "sk-1"},
    )
    (default,) = config.upstreams.values()
    assert default is config.upstream and config.primary is default
    assert (default.name, default.mount, default.url, default.api_key) == (
        "default",
        "/v1",
        "https://api.example.com/v1",
        "sk-1",
    )
    # Without any upstream table: the built-in default, as before.
    assert parse_config({}, env={}).upstreams["default"].mount == "/v1"


def test_named_upstreams_in_file_order_with_their_mounts_and_own_keys(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
[upstreams.support]
url = "http://dify-a/v1"
api_key_env = "SUPPORT_KEY"

[upstream]
kind = "dify"
url = "http://dify-root/v1"
api_key_env = "ROOT_KEY"

[upstreams.research]
url = "http://dify-b/v1"
api_key_env = "RESEARCH_KEY"
mount = "/labs/research/v1"
"""
    )
    env = {
        "SUPPORT_KEY": "app-a",
        "RESEARCH_KEY": "app-b",
        "ROOT_KEY": "app-root",
        # The environment overrides go to the upstream named "default" only.
        "GATEWAY_UPSTREAM_URL": "http://override/v1",
        "GATEWAY_UPSTREAM_API_KEY": "app-override",
    }
    config = load_config(path, env=env)
    # [upstreams.*] is one table in TOML, read where it first appears.
    assert list(config.upstreams) == ["support", "research", "default"]
    got = {n: (u.mount, u.url, u.api_key) for n, u in config.upstreams.items()}
    assert got == {
        "support": ("/support/v1", "http://dify-a/v1", "app-a"),
        "research": ("/labs/research/v1", "http://dify-b/v1", "app-b"),
        "default": ("/v1", "http://override/v1", "app-override"),
    }
    assert config.primary.name == "default"  # the one at /v1
    text = render_config(config)
    assert '[upstreams."support"]' in text and 'mount = "/support/v1"' in text
    assert "app-a" not in text and "app-b" not in text


def test_a_named_upstream_without_api_key_env_is_refused_not_sent_another_key() -> None:
    # Review of issue 23: [upstream] (Dify) reads DIFY_API_KEY by default; a
    # [upstreams.claude] that left api_key_env out read it too, and was sent the
    # Dify app's key, to Anthropic.
    table = {
        "upstream": {"url": "http://dify.local/v1"},
        "upstreams": {"claude": {"kind": "anthropic", "url": "https://api.anthropic.com/v1"}},
    }
    with pytest.raises(ConfigError, match=r"upstreams\.claude\.api_key_env: required"):
        parse_config(table, env={"DIFY_API_KEY": "app-dify-secret"})
    # [upstream] alone keeps its defaults.
    legacy = parse_config({"upstream": {}}, env={"DIFY_API_KEY": "app-dify-secret"})
    assert legacy.upstream.api_key == "app-dify-secret"
    assert legacy.upstream.url == "http://127.0.0.1:5001/v1"


def test_an_upstreams_account_is_set_on_the_kind_that_reads_it() -> None:
    # The organization, project (OpenAI) and workspace (Anthropic) the
    # operator's key acts for: sent as headers (a client's own are dropped).
    config = parse_config(
        {
            "upstream": {"kind": "openai", "organization": "org-A1", "project": "proj_B2"},
            "upstreams": {
                "claude": {"kind": "anthropic", "workspace": "wrkspc_C3", **NAMED_KEYS},
            },
        },
        env={},
    )
    assert (config.upstream.organization, config.upstream.project) == ("org-A1", "proj_B2")
    assert config.upstreams["claude"].workspace == "wrkspc_C3"
    text = render_config(config)
    assert 'organization = "org-A1"' in text and 'workspace = "wrkspc_C3"' in text


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"kind": "dify", "organization": "org-1"}, r"upstream\.organization: only .*'openai'"),
        ({"kind": "anthropic", "project": "proj_1"}, r"upstream\.project: only .*'openai'"),
        ({"kind": "openai", "workspace": "wrkspc_1"}, r"upstream\.workspace: only .*'anthropic'"),
        ({"kind": "openai", "organization": "org 1"}, r"upstream\.organization: expected an id"),
        ({"kind": "openai", "project": "proj\r\nx: y"}, r"upstream\.project: expected an id"),
        ({"kind": "anthropic", "workspace": "wrkspc_é"}, r"upstream\.workspace: expected an id"),
        ({"kind": "openai", "organization": 7}, r"upstream\.organization: expected a string"),
    ],
)
def test_an_upstreams_account_is_refused_where_it_would_not_be_read_or_sent_intact(
    table: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"upstream": table}, env={})


# --- an upstream's own headers (a router in front of the provider) ----------------------

PORTKEY = {
    "kind": "openai",
    "url": "https://api.portkey.ai/v1",
    "api_key_env": "OPENAI_API_KEY",
    "headers": {"x-portkey-provider": "openai", "X-Custom-Tenant": "acme"},
    "headers_env": {"x-portkey-api-key": "PORTKEY_API_KEY"},
}
PORTKEY_SECRET = "pk-portkey-secret-7f3a"


def test_an_upstreams_headers_are_read_and_their_secrets_never_shown() -> None:
    config = parse_config(
        {"upstreams": {"portkey": PORTKEY}},
        env={"OPENAI_API_KEY": "sk-operator", "PORTKEY_API_KEY": PORTKEY_SECRET},
    )
    portkey = config.upstreams["portkey"]
    assert dict(portkey.headers) == {"x-portkey-provider": "openai", "X-Custom-Tenant": "acme"}
    assert dict(portkey.header_secrets) == {"x-portkey-api-key": PORTKEY_SECRET}
    text = render_config(config)
    assert 'headers = {"x-portkey-provider" = "openai", "X-Custom-Tenant" = "acme"}' in text
    assert 'headers_env = {"x-portkey-api-key" = "PORTKEY_API_KEY"}' in text
    assert PORTKEY_SECRET not in text and PORTKEY_SECRET not in repr(config)
    # None by default, on [upstream] too.
    assert parse_config({}, env={}).upstream.headers == {}


def _headers_error(table: dict[str, object], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as refused:
        parse_config(
            {"upstreams": {"portkey": {**NAMED_KEYS, "kind": "openai", **table}}},
            env={"K": "sk-k", **(env or {})},
        )
    return str(refused.value)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        *((name, "frames each request") for name in ("Host", "Content-Length", "content-type")),
        *((name, "frames each request") for name in ("Transfer-Encoding", "connection", "TE")),
        *((name, "frames each request") for name in ("Accept-Encoding", "Expect", "Upgrade")),
        *((name, "frames each request") for name in ("Proxy-Authorization", "proxy-x")),
        *((name, "frames each request") for name in ("keep-alive", "trailer")),
        *((name, "frames each request") for name in ("content-encoding",)),
        *((name, "api_key_env") for name in ("Authorization", "x-api-key", "X_Api_Key")),
        ("OpenAI-Organization", "organization option"),
        ("openai-project", "project option"),
        ("anthropic-workspace-id", "workspace option"),
        ("x-request-id", "its own request id"),
        ("X-Trace-Id", "own trace id"),
        ("anthropic-beta", "unseen by the meter"),
    ],
)
def test_a_header_the_gateway_sets_itself_is_refused_naming_the_key(name: str, why: str) -> None:
    # Framing (a second Content-Length is request smuggling), the upstream key,
    # the account options, and what the meter checks per request.
    for table in ("headers", "headers_env"):
        message = _headers_error({table: {name: "E"}}, {"E": "v"})
        assert message.startswith(f'upstreams.portkey.{table}."{name}": '), message
        assert why in message, message


@pytest.mark.parametrize(
    ("table", "env", "message"),
    [
        ({"headers": {"bad name": "v"}}, {}, 'headers."bad name": not a valid HTTP header name'),
        ({"headers": {"x:y": "v"}}, {}, 'headers."x:y": not a valid HTTP header name'),
        ({"headers": {"": "v"}}, {}, 'headers."": not a valid HTTP header name'),
        ({"headers": {"x-a": 7}}, {}, 'headers."x-a": expected a string'),
        ({"headers": "x-a: b"}, {}, "headers: expected a table of strings"),
        ({"headers_env": {"x-a": "MISSING"}}, {}, 'headers_env."x-a": the environment variable'),
        ({"headers_env": {"x-a": "EMPTY"}}, {"EMPTY": ""}, "EMPTY is not set or empty"),
        (
            {"headers": {"X-Tenant": "a"}, "headers_env": {"x-tenant": "E"}},
            {"E": "v"},
            'headers_env."x-tenant": the header is already set by '
            'upstreams.portkey.headers."X-Tenant"',
        ),
        (
            {"headers": {"x-tenant": "a", "X-TENANT": "b"}},
            {},
            'headers."X-TENANT": the header is already set by upstreams.portkey.headers."x-tenant"',
        ),
    ],
)
def test_an_upstreams_headers_are_refused_naming_the_key(
    table: dict[str, object], env: dict[str, str], message: str
) -> None:
    assert message in _headers_error(table, env)


@pytest.mark.parametrize(
    "value",
    [
        "secret\r\nx-injected: 1",  # a header of its own, or a request smuggled after it
        "secret\nx",
        "secret\x00",
        "secret\x7f",
        " secret",
        "secret\t",
        "",
        "sk-\u20ac",  # past Latin-1: no byte to send it as
    ],
)
def test_a_header_value_that_cannot_be_sent_intact_is_refused_without_quoting_it(
    value: str,
) -> None:
    literal = _headers_error({"headers": {"helicone-auth": value}})
    assert literal.startswith('upstreams.portkey.headers."helicone-auth": the value is not')
    secret = _headers_error({"headers_env": {"helicone-auth": "HELICONE"}}, {"HELICONE": value})
    if value:
        assert secret.startswith(
            'upstreams.portkey.headers_env."helicone-auth": the value of HELICONE is not'
        )
    # An operator may have put a key in `headers` by mistake: neither is quoted.
    assert "secret" not in literal and "secret" not in secret


def test_a_header_value_may_hold_spaces_and_tabs_inside() -> None:
    config = parse_config(
        {"upstream": {"headers": {"helicone-property-team": "A team\tB"}}}, env={}
    )
    assert config.upstream.headers["helicone-property-team"] == "A team\tB"


def test_azures_api_key_header_may_carry_the_operators_key() -> None:
    # No dialect sends the upstream key in api-key (Azure OpenAI's): an Azure
    # deployment takes the operator's key there, from headers_env. A client's
    # api-key is still never forwarded (gateway/http.py, `_KEY_HEADERS`).
    config = parse_config(
        {"upstream": {"kind": "openai", "headers_env": {"api-key": "AZURE_KEY"}}},
        env={"AZURE_KEY": "azure-operator-key-123"},
    )
    assert config.upstream.header_secrets == {"api-key": "azure-operator-key-123"}


def test_check_config_warns_of_one_key_variable_read_at_two_hosts() -> None:
    from gateway.cli import config_warnings

    def warnings(second_url: str) -> list[str]:
        config = parse_config(
            {
                "upstreams": {
                    "openai": {
                        "kind": "openai",
                        "url": "https://api.openai.com/v1",
                        "api_key_env": "OPENAI_API_KEY",
                    },
                    "other": {
                        "kind": "openai",
                        "url": second_url,
                        "api_key_env": "OPENAI_API_KEY",
                        "mount": "/other/v1",
                    },
                }
            },
            env={"OPENAI_API_KEY": "sk-1"},
        )
        return [w for w in config_warnings(config) if "same API key" in w]

    assert warnings("https://API.openai.com/v1/") == []  # one host: one account's key
    assert warnings("https://llm.example.com/v1") == [
        "upstreams openai, other read the same API key (OPENAI_API_KEY) but are at different "
        "hosts (api.openai.com, llm.example.com): each is sent the others' key; give each its "
        "own api_key_env"
    ]


def test_check_config_warns_of_a_header_secret_read_by_upstreams_at_two_hosts() -> None:
    """A `headers_env` variable is a secret as the key is: one read by upstreams
    at two hosts (or one upstream's key that is another's header) is sent to
    the host it was not meant for."""
    from gateway.cli import config_warnings

    def warnings(second: dict[str, object]) -> list[str]:
        config = parse_config(
            {
                "upstreams": {
                    "portkey": {
                        "kind": "openai",
                        "url": "https://api.portkey.ai/v1",
                        "api_key_env": "OPENAI_API_KEY",
                        "headers_env": {"x-portkey-api-key": "PORTKEY_API_KEY"},
                    },
                    "other": {
                        "kind": "openai",
                        "url": "https://llm.example.com/v1",
                        "api_key_env": "OTHER_KEY",
                        "mount": "/other/v1",
                        **second,
                    },
                }
            },
            env={"OPENAI_API_KEY": "sk-1", "PORTKEY_API_KEY": "pk-1", "OTHER_KEY": "sk-2"},
        )
        return [w for w in config_warnings(config) if "same" in w]

    assert warnings({}) == []
    assert warnings({"headers_env": {"x-auth": "PORTKEY_API_KEY"}}) == [
        "upstreams portkey, other read the same secret (PORTKEY_API_KEY, in headers_env) but "
        "are at different hosts (api.portkey.ai, llm.example.com): each is sent the others' "
        "secret; give each its own variable"
    ]
    assert warnings({"api_key_env": "PORTKEY_API_KEY"}) == [
        "upstreams portkey, other read the same secret (PORTKEY_API_KEY, in api_key_env and "
        "headers_env) but are at different hosts (api.portkey.ai, llm.example.com): each is "
        "sent the others' secret; give each its own variable"
    ]


def test_only_named_upstreams_leave_no_default() -> None:
    config = parse_config(
        {
            "upstreams": {
                "hosted": {**NAMED_KEYS, "kind": "openai", "models": ["gpt-*"], "mount": "/v1"},
                "local": {**NAMED_KEYS, "kind": "openai", "mount": "/v1", "fallbacks": ["hosted"]},
            }
        },
        env={},
    )
    assert list(config.upstreams) == ["hosted", "local"]
    assert config.upstreams["local"].fallbacks == ("hosted",)
    assert config.primary.name == "hosted"
    text = render_config(config)
    assert "[upstream]" not in text  # not in force: check-config does not show it
    assert '[upstreams."hosted"]' in text and 'fallbacks = ["hosted"]' in text


def test_the_shipped_examples_of_several_upstreams() -> None:
    two = load_config(ROOT / "config" / "two-dify-apps.toml", env={})
    assert {name: (u.kind, u.mount) for name, u in two.upstreams.items()} == {
        "support": ("dify", "/support/v1"),
        "research": ("dify", "/research/v1"),
    }
    mixed = load_config(ROOT / "config" / "mixed-upstreams.toml", env={})
    assert {name: (u.kind, u.mount) for name, u in mixed.upstreams.items()} == {
        "openai": ("openai", "/v1"),
        "local": ("openai", "/v1"),
        "openai-backup": ("openai", "/openai-backup/v1"),
        "anthropic": ("anthropic", "/anthropic/v1"),
    }
    assert mixed.upstreams["openai"].fallbacks == ("openai-backup",)
    assert mixed.primary.name == "openai"


def test_check_config_names_each_upstream_without_its_key() -> None:
    from gateway.cli import config_warnings

    config = parse_config(
        {
            "upstreams": {
                "support": {"url": "http://dify/v1", "api_key_env": "SUPPORT_KEY"},
                "research": {"url": "http://dify/v1", "api_key_env": "RESEARCH_KEY"},
            }
        },
        env={"SUPPORT_KEY": "app-1"},
    )
    assert config_warnings(config) == [
        "the API key of upstream research is not set: set RESEARCH_KEY "
        "(upstreams.research.api_key_env); it will refuse every request"
    ]


# --- review 8 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("anthropic_beta", "unseen by the meter"),
        ("x_request_id", "its own request id"),
        ("openai_organization", "organization option"),
        ("x_api_key", "api_key_env"),
    ],
)
def test_a_refused_header_in_its_underscore_spelling_is_refused_too(name: str, why: str) -> None:
    # R8-2. A router behind a server reading headers as CGI variables takes
    # anthropic_beta for anthropic-beta (both HTTP_ANTHROPIC_BETA): the very
    # spelling the gateway now drops from a client (`_dropped_as_cgi_reads`) is
    # accepted from the operator, where the dashed one is refused.
    message = _headers_error({"headers": {name: "v"}})
    assert message.startswith(f'upstreams.portkey.headers."{name}": '), message
    assert why in message, message


def test_one_header_in_two_spellings_a_cgi_server_takes_for_one_is_refused() -> None:
    # R8-2. x-tenant and x_tenant are one header there, as X-Tenant and x-tenant
    # are everywhere (refused already): which value would the router read?
    message = _headers_error({"headers": {"x-tenant": "a", "x_tenant": "b"}})
    assert 'headers."x_tenant": the header is already set by' in message, message


def test_a_header_value_of_the_wrong_type_is_refused_without_quoting_it() -> None:
    # R8-8. "Load errors never quote either (an operator may have put a key in
    # `headers` by mistake)" (docs/configuration.md): a TOML number there -
    # an account number or numeric token written unquoted - is quoted by
    # `_coerce`'s type error.
    message = _headers_error({"headers": {"x-account-token": 73519046628411}})
    assert message.startswith('upstreams.portkey.headers."x-account-token": expected a string')
    assert "73519046628411" not in message, message


@pytest.mark.parametrize("table", ["headers", "headers_env"])
@pytest.mark.parametrize("value", ["Authorization: Bearer sk-live-4f9a2c", 73519046628411])
def test_a_headers_table_written_as_one_value_is_refused_without_quoting_it(
    table: str, value: object
) -> None:
    # R9-5. R8-8 stopped quoting a wrongly typed value inside the table; the
    # table itself written as a string or a number (`headers = "Authorization:
    # Bearer sk-..."`, the mistake the docs name) is still quoted by `_kind`
    # in "expected a table of strings, got a string ('...')".
    message = _headers_error({table: value})
    assert "sk-live-4f9a2c" not in message and "73519046628411" not in message, message


def test_one_header_spelled_with_a_dot_and_a_dash_is_refused() -> None:
    # As x-tenant and x_tenant: a server that makes every other character "_"
    # (lighttpd) reads x.tenant as the same header.
    message = _headers_error({"headers": {"x-tenant": "a", "x.tenant": "b"}})
    assert 'headers."x.tenant": the header is already set by' in message, message
    message = _headers_error({"headers": {"anthropic.beta": "v"}})
    assert "unseen by the meter" in message, message


def test_check_config_warns_of_a_claude_price_without_its_cache_writes() -> None:
    """Review-meter F5: Anthropic bills a 5-minute cache write at 1.25x input; a
    price without cache_write_input charges the writes a client asks for
    (cache_control) at input."""
    from gateway.cli import config_warnings

    def warnings(kind: str, prices: dict[str, dict[str, str]]) -> list[str]:
        config = parse_config(
            {"upstream": {"kind": kind}, "prices": prices}, env={"UPSTREAM_API_KEY": "k"}
        )
        return [w for w in config_warnings(config) if "cache_write_input" in w]

    sonnet = {"input": "3", "output": "15"}
    assert warnings("anthropic", {"claude-sonnet-4-5": sonnet}) == [
        "prices.'claude-sonnet-4-5' has no cache_write_input: Anthropic bills 5-minute cache "
        "writes at 1.25x input, and they are charged at input; set it (1.25 times its input "
        "price)"
    ]
    assert len(warnings("anthropic", {"*": sonnet})) == 1  # what an anthropic upstream may use
    assert warnings("anthropic", {"gpt-4o-mini": sonnet}) == []  # (review of the fixes: noise)
    assert len(warnings("openai", {"anthropic/Claude-Sonnet-4.5": sonnet})) == 1  # a router's
    assert warnings("openai", {"gpt-4o": sonnet}) == []
    assert (
        warnings("anthropic", {"claude-sonnet-4-5": {**sonnet, "cache_write_input": "3.75"}}) == []
    )


def test_the_effective_configuration_shows_an_unset_rate_as_what_is_billed_instead() -> None:
    """An unset price of a cache write or of audio was shown as "unlimited",
    which reads as free or as uncapped: it is the rate charged instead."""
    config = parse_config(
        {"upstream": {"kind": "openai"}, "prices": {"gpt-4o": {"input": "2.5", "output": "10"}}}
    )
    text = render_config(config)
    section = text[text.index('[prices."gpt-4o"]') :]
    assert "unlimited" not in section.split("\n\n")[0]
    assert "# cache_write_input = the input price" in section
    assert "# audio_output = the output price" in section


def test_check_config_warns_of_a_jwt_mode_without_an_audience() -> None:
    """Review of the fixes: a token that names an audience is refused unless it
    names the configured one, and most providers' tokens name one: a
    deployment upgraded without setting it is told why every token is 401."""
    from gateway.cli import config_warnings

    def warnings(jwt: dict[str, str]) -> list[str]:
        config = parse_config(
            {"auth": {"mode": "jwt", "jwt": {"secret_env": "JWT_SECRET", **jwt}}},
            env={"JWT_SECRET": "s" * 32, "GATEWAY_UPSTREAM_API_KEY": "k"},
        )
        return [w for w in config_warnings(config) if "audience" in w]

    assert warnings({}) == [
        "auth.jwt.audience is not set: a token that names an audience (aud) is refused, as the "
        "tokens of most identity providers (Auth0, Entra ID, Cognito, Google, Keycloak, Okta) "
        "do; set it to the audience they are issued for"
    ]
    assert warnings({"audience": "https://gateway.example/api"}) == []
