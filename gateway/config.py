"""Configuration: `gateway.toml` parsed into typed, frozen objects.

The dataclasses below are the one registry of settings. Their fields are the keys
of the file (``upstream.url`` is ``UpstreamConfig.url``), their types are what
the loader accepts, and `setting_paths()` lists them so a test can check that
docs/configuration.md documents every one. Secrets are never in the file: the
file names an environment variable and the value is resolved once, at load.

Anything wrong refuses start-up with one line naming the full key path and what
was expected, as a `ConfigError`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.errors import ConfigError
from gateway.http import cgi_spelling
from gateway.pricing import CallPrice, Price, check_currencies
from gateway.sse import DEFAULT_MAX_EVENT_BYTES
from gateway.upstreams import DIALECTS

DEFAULT_CONFIG_FILE = "gateway.toml"

# Environment variables that override the file (docs/configuration.md, "Environment overrides").
ENV_CONFIG = "GATEWAY_CONFIG"
ENV_DATABASE_URL = "GATEWAY_DATABASE_URL"
ENV_UPSTREAM_URL = "GATEWAY_UPSTREAM_URL"
ENV_UPSTREAM_API_KEY = "GATEWAY_UPSTREAM_API_KEY"
ENV_ADMIN_TOKEN = "GATEWAY_ADMIN_TOKEN"


# The largest accounting.max_tokens_per_answer: a billion answers at this cap still
# fit in a 64-bit counter.
MAX_TOKENS_PER_ANSWER_LIMIT = 10**9


def _setting(default: Any, *, minimum: float | None = None, secret: bool = False) -> Any:
    return field(default=default, metadata={"min": minimum, "secret": secret})


def _choice(default: str, choices: Mapping[str, object]) -> Any:
    """A string setting whose allowed values are the keys of a registry."""
    return field(default=default, metadata={"choices": choices})


def _resolved(default: Any = "") -> Any:
    """A value computed at load (a secret read from the environment), not a file key."""
    return field(default=default, repr=False, metadata={"resolved": True, "secret": True})


def _no_headers() -> Mapping[str, str]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = _setting(8000, minimum=0)
    workers: int = _setting(1, minimum=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_json_body_bytes: int = _setting(1_048_576, minimum=1)
    # A request body may pause this long between pieces before it is answered 408.
    body_timeout: float = _setting(30.0, minimum=0.001)
    # Request headers beyond these are answered 431 (the request line not counted).
    max_header_bytes: int = _setting(32_768, minimum=1)
    max_headers: int = _setting(100, minimum=1)
    reload_interval: float = _setting(2.0, minimum=0)
    shutdown_grace: int = _setting(30, minimum=0)  # whole seconds: uvicorn takes an int
    # issue 20, spool: the whole request head must arrive within head_timeout; a
    # worker holds at most max_connections connections (0: derived from the
    # open-files limit). Both applied by `gateway serve` (gateway/request_limits/protocol.py).
    head_timeout: float = _setting(10.0, minimum=0.001)
    max_connections: int = _setting(0, minimum=0)
    # A client that leaves the gateway's writes unread (its socket's buffers full)
    # this long has its connection closed (`gateway serve`).
    send_timeout: float = _setting(60.0, minimum=0.001)
    # --- issue 25, logs (gateway/logs.py) ---
    # "text": one line per record; "json": one JSON object per line. uvicorn's own
    # lines follow the same format.
    log_format: Literal["text", "json"] = "text"
    # A line per settled answer on the `gateway.answers` logger (user, status,
    # route, tokens, cost, outcome, time), at level info.
    answer_log: bool = True
    # --- end of issue 25, logs ---


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    kind: str = _choice("dify", DIALECTS)  # the dialects in gateway/upstreams
    url: str = "http://127.0.0.1:5001/v1"
    api_key_env: str = "DIFY_API_KEY"
    connect_timeout: float = _setting(5.0, minimum=0.001)
    read_timeout: float = _setting(60.0, minimum=0.001)
    total_timeout: float = _setting(600.0, minimum=0.001)
    max_connections: int = _setting(512, minimum=1)
    max_keepalive_connections: int = _setting(128, minimum=0)
    keepalive_expiry: float = _setting(30.0, minimum=0)
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    on_client_disconnect: Literal["drain", "stop"] = "drain"
    disconnect_grace: float = _setting(120.0, minimum=0)
    # issue 20, spool: the cap on one SSE line or event from the upstream
    max_event_bytes: int = _setting(DEFAULT_MAX_EVENT_BYTES, minimum=1024)
    # Default deny (issue 20): routes the dialect refuses that the operator forwards
    # anyway, unmetered: "METHOD /path-glob" (gateway/allowlist.py).
    allow: tuple[str, ...] = ()
    # --- issue 23, named upstreams (gateway/mounts.py) ---
    # The path prefix clients use; "" means the default: /v1 for [upstream],
    # /NAME/v1 for [upstreams.NAME]. Resolved at load.
    mount: str = ""
    # Globs of the model names it serves (OpenAI and Anthropic kinds); empty: all.
    models: tuple[str, ...] = ()
    # Upstreams of the same kind tried in order when this one fails before any
    # byte of the answer was relayed.
    fallbacks: tuple[str, ...] = ()
    # Fall back also after the request reached this upstream and no headers came
    # (a read timeout, a disconnect): its answer may be generated and billed
    # unrecorded (docs/configuration.md, "Fallbacks").
    fallback_after_timeout: bool = False
    # The account the operator's key acts for at an OpenAI upstream (the
    # OpenAI-Organization and OpenAI-Project headers) and an Anthropic one
    # (anthropic-workspace-id): who is billed, and whose files, vector stores
    # and assistants the key reaches. "" sends none (the key's default). A
    # client's own such headers are never forwarded (gateway/http.py).
    organization: str = ""
    project: str = ""
    workspace: str = ""
    name: str = field(default="default", metadata={"resolved": True})  # its NAME
    # --- end of issue 23 ---
    # Headers sent on every request to this upstream, for a router in front of
    # the provider (Portkey's x-portkey-provider, Helicone's Helicone-Auth):
    # name -> value, and name -> the environment variable that holds a secret
    # value. Checked at load (`_check_headers`); a client's header of such a
    # name is never forwarded to this upstream (`gateway.snapshot.Target`).
    headers: Mapping[str, str] = field(default_factory=_no_headers)
    headers_env: Mapping[str, str] = field(default_factory=_no_headers)
    api_key: str = _resolved()
    # headers_env's values, read at load: secrets, masked as the key is.
    header_secrets: Mapping[str, str] = field(
        default_factory=_no_headers,
        repr=False,
        metadata={"resolved": True, "secret": True},
    )


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str = "sqlite:///gateway.db"
    pool_min_size: int = _setting(1, minimum=0)
    pool_max_size: int = _setting(10, minimum=1)
    connect_timeout: float = _setting(5.0, minimum=0.001)
    command_timeout: float = _setting(5.0, minimum=0.001)
    spool_file: str = "gateway-spool.jsonl"
    recover_after: float = _setting(0.0, minimum=0)
    recover_interval: float = _setting(60.0, minimum=0)
    max_batch: int = _setting(64, minimum=1)
    # issue 20, spool: replay while running
    replay_interval: float = _setting(5.0, minimum=0)
    # PostgreSQL: the most this machine's clock may be from the database's at
    # start-up, in seconds (gateway/skew.py); 0: not checked.
    max_clock_offset: float = _setting(5.0, minimum=0)


@dataclass(frozen=True, slots=True)
class JWTConfig:
    algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    secret_env: str = "GATEWAY_JWT_SECRET"
    public_key_file: str = ""
    jwks_file: str = ""
    issuer: str = ""
    audience: str = ""
    leeway: float = _setting(0.0, minimum=0)
    require_exp: bool = True
    user_claim: str = "sub"
    plan_claim: str = ""
    secret: str = _resolved()  # the HS256 secret, from secret_env
    key_text: str = _resolved()  # the PEM public key or JWKS document, read at load


@dataclass(frozen=True, slots=True)
class TrustedHeaderConfig:
    service_key_env: str = "GATEWAY_SERVICE_KEY"
    user_header: str = "X-Gateway-User"
    service_key: str = _resolved()


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: Literal["api_key", "jwt", "trusted_header"] = "api_key"
    key_cache_ttl: float = _setting(30.0, minimum=0)
    unknown_users: Literal["create", "refuse"] = "create"
    jwt: JWTConfig = field(default_factory=JWTConfig)
    trusted_header: TrustedHeaderConfig = field(default_factory=TrustedHeaderConfig)


Policy = Literal["closed", "open"]


@dataclass(frozen=True, slots=True)
class StorageErrorPolicy:
    """What admission does, per check, when the database cannot be reached:
    refuse with 503 (``closed``) or let the request through unreserved (``open``)."""

    queries: Policy = "closed"
    tokens: Policy = "closed"
    streams: Policy = "open"


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    on_storage_error: StorageErrorPolicy = field(default_factory=StorageErrorPolicy)


@dataclass(frozen=True, slots=True)
class AccountingConfig:
    timezone: str = "UTC"
    default_plan: str = "free"
    # An answer reporting more tokens than this is recorded at this many, marked
    # "clamped" (docs/proxy.md); the bound keeps sums far from 64-bit overflow.
    max_tokens_per_answer: int = _setting(10_000_000, minimum=1)
    # Money budgets (docs/quotas.md, "Money budgets"): the output tokens an
    # answer request that sets no cap (max_tokens, ...) is reserved for, and the
    # cost reserved for an answer whose dialect prices it only when it ends (Dify).
    reserve_output_tokens: int = _setting(4096, minimum=0)
    answer_reservation: Decimal = _setting(Decimal(0), minimum=0)  # noqa: RUF009 (immutable)


@dataclass(frozen=True, slots=True)
class PricingConfig:
    # For dialects that price tokens themselves from [prices] (openai): a request
    # for a model the table does not price is refused before admission (403
    # model_not_priced), or let through with its tokens counted at cost 0.
    unpriced_models: Literal["refuse", "allow"] = "refuse"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token_env: str = ENV_ADMIN_TOKEN
    token: str = _resolved()
    # --- issue 20, admin surface: token guesses per client (gateway/throttle.py) ---
    # A client that sends this many wrong tokens (admin API, dashboard sign-in,
    # /metrics) is answered 429 until `failure_window` seconds after its first one.
    max_failures: int = _setting(10, minimum=1)
    failure_window: float = _setting(300.0, minimum=1)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Who may read /metrics (docs/metrics.md, "Access")."""

    # The environment variable holding a bearer token for scrapers; the admin
    # token is accepted too. With neither token set, /metrics is off (404).
    token_env: str = "GATEWAY_METRICS_TOKEN"
    token: str = _resolved()
    # true: anyone who can reach /metrics reads it, no token (a private network).
    public: bool = False
    # --- end of issue 20, admin surface ---


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    locale: str = "vi-VN"
    secure_cookie: bool = False
    session_hours: float = _setting(12.0, minimum=0.01)


# --- issue 25, CORS: pages on other origins (gateway/cors.py, docs/widget.md) ---
@dataclass(frozen=True, slots=True)
class CorsConfig:
    # Origins (scheme://host[:port]) whose pages may call /v1 and load the widget;
    # empty: CORS is left to the upstream as before. "*" allows every origin.
    allow_origins: tuple[str, ...] = ()
    # Send Access-Control-Allow-Credentials (cookies, TLS client certificates);
    # bearer tokens do not need it. Not with "*".
    allow_credentials: bool = False
    # Request headers a preflight allows (Authorization must be named: the
    # wildcard never covers it).
    allow_headers: tuple[str, ...] = ("Authorization", "Content-Type", "X-Trace-Id")
    # How long a browser may cache a preflight's answer (Chromium caps it at 7200).
    max_age: int = _setting(600, minimum=0)


def _resolve_cors(cors: CorsConfig) -> CorsConfig:
    from gateway.cors import normalise_origin

    origins = []
    for index, origin in enumerate(cors.allow_origins):
        try:
            origins.append(normalise_origin(origin))
        except ValueError as exc:
            raise ConfigError(f"cors.allow_origins[{index}]: {exc}") from None
    if cors.allow_credentials and "*" in origins:
        raise ConfigError(
            'cors.allow_origins: "*" cannot be used with cors.allow_credentials = true '
            "(browsers refuse it); list the origins"
        )
    for index, name in enumerate(cors.allow_headers):
        if not name or not all(c.isalnum() or c in "!#$%&'+-.^_`|~" for c in name):
            raise ConfigError(
                f"cors.allow_headers[{index}]: expected a header name, got {name!r} "
                "(the wildcard is not supported: name each header)"
            )
    return dataclasses.replace(cors, allow_origins=tuple(dict.fromkeys(origins)))


# --- end of issue 25, CORS ---


Scalar = bool | int | float | str  # a JSON scalar a rule may write into a request


@dataclass(frozen=True, slots=True)
class WebSearchConfig:
    # An answer used web search when one of these paths (dotted, into the answer's
    # metadata - message_end.metadata, or a workflow's outputs) holds one of the values.
    answer_paths: tuple[str, ...] = ("source",)
    answer_values: tuple[str, ...] = ("web_search", "kb_fallback_web")
    # A request asks for web search when this path of its JSON body holds one of
    # these values ("" turns the check off).
    request_path: str = "inputs.search_mode"
    request_values: tuple[str, ...] = ("web",)
    # Once the day's web searches are used up: refuse requests that ask for web
    # search, or forward every answer request with `disable_path` set to
    # `disable_value` so the app will not search (nor fall back to the web).
    when_exhausted: Literal["refuse", "disable"] = "refuse"
    disable_path: str = "inputs.allow_web_fallback"
    disable_value: Scalar = False
    count_timeout: float = _setting(1.0, minimum=0.001)


@dataclass(frozen=True, slots=True)
class AdvancedRagConfig:
    # A request asks for advanced RAG when this path of its JSON body holds one of
    # these values ("" turns the check off).
    request_path: str = "inputs.rag_mode"
    request_values: tuple[str, ...] = ("advanced",)


# The limits a plan can set and a per-user override can replace. An omitted limit
# is unlimited; `advanced_rag` is a feature switch.
LimitName = Literal[
    "queries_per_day",
    "tokens_per_day",
    "tokens_per_month",
    "web_searches_per_day",
    "requests_per_minute",
    "tokens_per_minute",
    "cost_per_day",
    "cost_per_month",
    "advanced_rag",
    "file_size_mb",
    "chat_history_days",
    "max_concurrent_streams",
]
LIMIT_NAMES: tuple[LimitName, ...] = typing.get_args(LimitName)
# A per-user (or per-team) override of a [[plans.NAME.limits]] entry is named
# this and the entry's name (`PlanLimit.label`): "limits.queries_per_hour",
# "limits.cost_per_day[gpt-4.1*]". Its value replaces the entry's max (null:
# the entry does not apply).
GENERAL_PREFIX = "limits."


def is_override_name(name: str) -> bool:
    """Whether ``name`` names something a per-user override can set: a plan key
    of LIMIT_NAMES or a general limit (GENERAL_PREFIX and its name)."""
    return name in LIMIT_NAMES or (
        name.startswith(GENERAL_PREFIX)
        and 0 < len(name) - len(GENERAL_PREFIX) <= 200
        and name.isprintable()
    )


# The limits that are amounts of money (decimal strings in overrides too).
MONEY_LIMITS: frozenset[str] = frozenset({"cost_per_day", "cost_per_month"})


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """Threshold alerts (docs/admin.md, "Alerts"): announced once per user, limit,
    period and threshold, by webhook and/or email, from a durable outbox."""

    # Percentages of each limit a plan sets (queries, tokens, web searches; per
    # day or month) that are announced when usage reaches them. Empty: no alerts.
    thresholds: tuple[int, ...] = _setting((), minimum=1)
    webhook_url: str = ""
    # A Standard Webhooks secret: "whsec_" and the base64 of the key.
    webhook_secret_env: str = "GATEWAY_WEBHOOK_SECRET"
    webhook_timeout: float = _setting(10.0, minimum=0.001)
    email_to: tuple[str, ...] = ()
    email_from: str = "gateway@localhost"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = _setting(25, minimum=1)
    smtp_username: str = ""
    smtp_password_env: str = "GATEWAY_SMTP_PASSWORD"
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_timeout: float = _setting(10.0, minimum=0.001)
    max_attempts: int = _setting(10, minimum=1)
    retry_initial: float = _setting(1.0, minimum=0)
    retry_max: float = _setting(600.0, minimum=0)
    poll_interval: float = _setting(2.0, minimum=0.01)
    webhook_secret: str = _resolved()
    smtp_password: str = _resolved()

    @property
    def channels(self) -> tuple[str, ...]:
        return (("webhook",) if self.webhook_url else ()) + (("email",) if self.email_to else ())


# --- issue 25, refusal messages (gateway/messages.py) ---
@dataclass(frozen=True, slots=True)
class MessagesConfig:
    """Refusal messages: the language for a request whose Accept-Language names
    none the gateway has, and the operator's templates ([messages.LANG])."""

    default_language: Literal["en", "vi"] = "en"
    # language -> message code -> template, validated at load (not a file key).
    templates: Mapping[str, Mapping[str, str]] = field(
        default_factory=dict, metadata={"resolved": True}
    )


def _messages(table: object) -> MessagesConfig:
    """``[messages]``: ``default_language`` and one table of templates per language."""
    from gateway.messages import LANGUAGES, check_templates

    if table is None:
        return MessagesConfig()
    if not isinstance(table, dict):
        raise ConfigError(f"messages: expected a table, got {_kind(table)}")
    settings = {k: v for k, v in table.items() if not isinstance(v, dict)}
    for key in settings:
        if key != "default_language":
            raise ConfigError(
                f"messages.{key}: unknown key (expected default_language, or a "
                f"[messages.LANGUAGE] table of templates: {', '.join(LANGUAGES)})"
            )
    config: MessagesConfig = _build(MessagesConfig, settings, "messages.")
    templates: dict[str, Mapping[str, str]] = {}
    for language, own in table.items():
        if not isinstance(own, dict):
            continue
        if language not in LANGUAGES:
            raise ConfigError(
                f"messages.{language}: unknown language (expected one of: {', '.join(LANGUAGES)})"
            )
        try:
            templates[language] = types.MappingProxyType(
                check_templates(own, f"messages.{language}.")
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return dataclasses.replace(config, templates=types.MappingProxyType(templates))


# --- end of issue 25, refusal messages ---


# The meters and windows a [[plans.NAME.limits]] entry can name (issue 21; the
# streams open at once are max_concurrent_streams; rates - per minute or hour -
# count queries and tokens).
LimitMeter = Literal[
    "queries",
    "tokens",
    "input_tokens",
    "output_tokens",
    "cost",
    "web_searches",
    "advanced_rag",
    # Reserved when an upload is asked (docs/quotas.md, "Uploads"), not at admission.
    "uploads",
    "upload_bytes",
]
LimitPer = Literal["day", "month", "minute", "hour"]
RATE_METERS: frozenset[str] = frozenset({"queries", "tokens"})
MODEL_LIMIT_METERS: frozenset[str] = frozenset(
    {"queries", "tokens", "input_tokens", "output_tokens", "cost"}
)


@dataclass(frozen=True, slots=True)
class PlanLimit:
    """One ``[[plans.NAME.limits]]`` entry: no more than ``max`` of ``meter`` per
    ``per`` (docs/quotas.md, "Limits as data")."""

    meter: LimitMeter = "queries"
    per: LimitPer = "day"
    max: Decimal = _setting(Decimal(0), minimum=0)  # noqa: RUF009 (immutable)
    # What refusals and headers call it; default "<meter>_per_<per>", with the
    # models in brackets for a per-model limit ("cost_per_day[gpt-4.1*]").
    name: str = ""
    # Globs: the limit holds requests for these models only, and counts only them.
    models: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        models = f"[{','.join(self.models)}]" if self.models else ""
        return f"{self.meter}_per_{self.per}{models}"


@dataclass(frozen=True, slots=True)
class Plan:
    name: str = _resolved("")
    queries_per_day: int | None = _setting(None, minimum=0)
    tokens_per_day: int | None = _setting(None, minimum=0)
    tokens_per_month: int | None = _setting(None, minimum=0)
    web_searches_per_day: int | None = _setting(None, minimum=0)
    advanced_rag: bool = True
    file_size_mb: float | None = _setting(None, minimum=0)
    chat_history_days: int | None = _setting(None, minimum=0)
    max_concurrent_streams: int | None = _setting(None, minimum=0)
    # Rates over a sliding minute (docs/quotas.md, "Rates").
    requests_per_minute: int | None = _setting(None, minimum=0)
    tokens_per_minute: int | None = _setting(None, minimum=0)
    # Money budgets, in the price table's currency: decimal strings ("2.50").
    cost_per_day: Decimal | None = _setting(None, minimum=0)  # noqa: RUF009 (None is immutable)
    cost_per_month: Decimal | None = _setting(None, minimum=0)  # noqa: RUF009 (None is immutable)
    # Replaces alerts.thresholds for this plan ([] turns alerts off for it).
    alert_thresholds: tuple[int, ...] | None = _setting(None, minimum=1)
    # Issue 21: the models this plan may use, as globs ("llama-3*"), matched
    # case-sensitively against the model a request names. Unset: any model.
    models: tuple[str, ...] | None = None
    # Issue 21: a request whose answer's cost bound the money budgets left
    # cannot pay for is sent with its output-token cap lowered to what they can
    # (OpenAI and Anthropic dialects; docs/quotas.md, "Money budgets").
    lower_output_cap: bool = False
    # [[plans.NAME.limits]], the general form (read apart from the plan's keys).
    limits: tuple[PlanLimit, ...] = field(default=(), metadata={"resolved": True})

    def with_overrides(self, overrides: Mapping[str, object]) -> Plan:
        """This plan with per-user overrides applied (unknown names are ignored):
        plan keys by name, ``[[plans.NAME.limits]]`` entries by
        ``limits.<their name>`` (a new maximum, or null: the entry is dropped;
        one naming no entry of this plan is ignored)."""
        known: dict[str, object] = {
            k: Decimal(str(v)) if k in MONEY_LIMITS and v is not None else v
            for k, v in overrides.items()
            if k in LIMIT_NAMES
        }
        if self.limits and any(k.startswith(GENERAL_PREFIX) for k in overrides):
            general = []
            for entry in self.limits:
                key = GENERAL_PREFIX + entry.label
                if key not in overrides:
                    general.append(entry)
                elif (value := overrides[key]) is not None:
                    general.append(dataclasses.replace(entry, max=Decimal(str(value))))
            known["limits"] = tuple(general)
        return dataclasses.replace(self, **known) if known else self  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    # The single [upstream] table as written (the upstream named "default");
    # what the gateway forwards to is `upstreams`.
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    accounting: AccountingConfig = field(default_factory=AccountingConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    web_search: WebSearchConfig = field(default_factory=WebSearchConfig)
    advanced_rag: AdvancedRagConfig = field(default_factory=AdvancedRagConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)  # issue 25
    plans: Mapping[str, Plan] = field(default_factory=lambda: {"free": Plan(name="free")})
    # [prices."MODEL"]: what a million tokens of a model cost, for upstreams that
    # report tokens but no money (docs/upstreams/openai.md).
    prices: Mapping[str, Price] = field(default_factory=dict)
    # [call_prices."NAME"]: what one paid side call costs (a tool an answer ran, an
    # endpoint billed per call); names are "<dialect>.<call>" (docs/configuration.md).
    call_prices: Mapping[str, CallPrice] = field(default_factory=dict)
    messages: MessagesConfig = field(default_factory=MessagesConfig)  # issue 25
    # Issue 23: every upstream by name, in the file's order - [upstream] as
    # "default" (also when neither table is written) and each [upstreams.NAME] -
    # each with its mount resolved and its key read. Built at load.
    upstreams: Mapping[str, UpstreamConfig] = field(
        default_factory=lambda: {"default": dataclasses.replace(UpstreamConfig(), mount="/v1")},
        metadata={"resolved": True},
    )
    source: str | None = _resolved(None)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.accounting.timezone)

    @property
    def primary(self) -> UpstreamConfig:
        """The upstream whose dialect shapes what is answered outside any mount
        (a refusal before the path is read, /v1/usage): the one at /v1, else the first."""
        ups = self.upstreams.values()
        return next((u for u in ups if u.mount == "/v1"), next(iter(ups)))

    def plan(self, name: str) -> Plan:
        """The named plan, or the default plan when the name is no longer configured."""
        return self.plans.get(name) or self.plans[self.accounting.default_plan]


# --- loading -------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    alert_secrets: bool = True,
) -> Config:
    """Load and validate the configuration.

    ``path`` defaults to ``$GATEWAY_CONFIG``, then ``./gateway.toml``; a missing
    default file means built-in defaults. ``env`` defaults to ``os.environ``.
    ``alert_secrets=False`` (commands that deliver no alerts) does not require the
    alert webhook's secret.
    """
    env = os.environ if env is None else env
    explicit = path is not None or ENV_CONFIG in env
    file = Path(path if path is not None else env.get(ENV_CONFIG, DEFAULT_CONFIG_FILE))
    data: dict[str, Any] = {}
    if file.exists() or explicit:
        try:
            with file.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{file}: no such configuration file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    return parse_config(
        data, env=env, source=str(file) if data or explicit else None, alert_secrets=alert_secrets
    )


def parse_config(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    source: str | None = None,
    alert_secrets: bool = True,
) -> Config:
    env = os.environ if env is None else env
    data = dict(data)
    plans_table = data.pop("plans", None)
    prices_table = data.pop("prices", None)
    call_prices_table = data.pop("call_prices", None)
    messages = _messages(data.pop("messages", None))  # issue 25
    # Issue 23: [upstream] and [upstreams.NAME], in the file's order.
    order = [key for key in data if key in ("upstream", "upstreams")]
    upstreams_table = data.pop("upstreams", None)
    config: Config = _build(
        Config, data, "", skip={"plans", "prices", "call_prices", "messages", "upstreams"}
    )

    plans: dict[str, Plan] = {}
    if plans_table is None:
        plans = dict(Config().plans)
    elif not isinstance(plans_table, dict):
        raise ConfigError(
            f"plans: expected a table of [plans.NAME] tables, got {_kind(plans_table)}"
        )
    else:
        for name, table in plans_table.items():
            if not isinstance(table, dict):
                raise ConfigError(f"plans.{name}: expected a table, got {_kind(table)}")
            table = dict(table)
            limits = _plan_limits(table.pop("limits", None), f"plans.{name}.limits")
            plans[name] = dataclasses.replace(
                _build(Plan, table, f"plans.{name}."), name=name, limits=limits
            )
            _check_model_globs(plans[name].models, f"plans.{name}.models")
        if not plans:
            raise ConfigError("plans: at least one [plans.NAME] table is required")

    prices: dict[str, Price] = {}
    if prices_table is not None:
        if not isinstance(prices_table, dict):
            raise ConfigError(
                f"prices: expected a table of [prices.MODEL] tables, got {_kind(prices_table)}"
            )
        for name, table in prices_table.items():
            if not isinstance(table, dict):
                raise ConfigError(f"prices.{name}: expected a table, got {_kind(table)}")
            prices[name] = _build(Price, table, f"prices.{name}.")

    call_prices: dict[str, CallPrice] = {}
    if call_prices_table is not None:
        if not isinstance(call_prices_table, dict):
            raise ConfigError(
                "call_prices: expected a table of [call_prices.NAME] tables, "
                f"got {_kind(call_prices_table)}"
            )
        for name, table in call_prices_table.items():
            if not isinstance(table, dict):
                raise ConfigError(f"call_prices.{name}: expected a table, got {_kind(table)}")
            call_prices[name] = _build(CallPrice, table, f"call_prices.{name}.")
    # A tool's cost is added to its answer's, which the dialect prices from [prices].
    check_currencies(prices, call_prices)

    accounting = config.accounting
    if accounting.default_plan not in plans:
        raise ConfigError(
            f"accounting.default_plan: no plan named {accounting.default_plan!r} "
            f"(expected one of: {', '.join(sorted(plans))})"
        )
    try:
        ZoneInfo(accounting.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"accounting.timezone: unknown time zone {accounting.timezone!r} "
            "(expected an IANA name such as 'Asia/Ho_Chi_Minh' or 'UTC')"
        ) from None

    database = config.database
    if ENV_DATABASE_URL in env:
        database = dataclasses.replace(database, url=env[ENV_DATABASE_URL])
    if not database.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(
            f"database.url: unsupported URL {mask_url(database.url)!r} "
            "(expected sqlite:///PATH or postgresql://USER@HOST/DB)"
        )
    if database.pool_min_size > database.pool_max_size:
        raise ConfigError("database.pool_min_size: must not exceed database.pool_max_size")
    if config.accounting.max_tokens_per_answer > MAX_TOKENS_PER_ANSWER_LIMIT:
        raise ConfigError(
            f"accounting.max_tokens_per_answer: must be at most {MAX_TOKENS_PER_ANSWER_LIMIT}"
        )

    upstreams = _upstreams(config.upstream, upstreams_table, order, env)
    # [upstream] as loaded, when it is in force (written, or implied by no table).
    upstream = (
        upstreams["default"] if "upstreams" not in order or "upstream" in order else config.upstream
    )

    admin = config.admin
    admin_token = env.get(ENV_ADMIN_TOKEN) or env.get(admin.token_env, "")
    _unguessable(
        admin_token,
        "admin.token_env",
        ENV_ADMIN_TOKEN if env.get(ENV_ADMIN_TOKEN) else admin.token_env,
    )
    admin = dataclasses.replace(admin, token=admin_token)
    metrics_token = env.get(config.metrics.token_env, "")
    _unguessable(metrics_token, "metrics.token_env", config.metrics.token_env)
    metrics = dataclasses.replace(config.metrics, token=metrics_token)
    auth = _resolve_auth(config.auth, env, base=Path(source).parent if source else Path.cwd())

    return dataclasses.replace(
        config,
        alerts=_resolve_alerts(config.alerts, env, require_secret=alert_secrets),
        cors=_resolve_cors(config.cors),
        upstream=upstream,
        database=database,
        admin=admin,
        metrics=metrics,
        auth=auth,
        plans=types.MappingProxyType(plans),
        prices=types.MappingProxyType(prices),
        call_prices=types.MappingProxyType(call_prices),
        messages=messages,
        upstreams=types.MappingProxyType(upstreams),
        source=source,
    )


def _upstreams(
    single: UpstreamConfig, named: object, order: list[str], env: Mapping[str, str]
) -> dict[str, UpstreamConfig]:
    """Every upstream by name, in the file's order (issue 23): ``[upstream]`` is
    the one named "default" at /v1 - also when neither table is written - and
    each ``[upstreams.NAME]`` is at /NAME/v1 unless its ``mount`` says otherwise.
    Each is checked, its URL's trailing "/" dropped, its key read; the
    environment overrides go to the upstream named "default"."""
    from gateway.mounts import UpstreamRoute, check_upstreams

    tables: dict[str, tuple[str, UpstreamConfig]] = {}
    if named is not None and not isinstance(named, dict):
        raise ConfigError(
            f"upstreams: expected a table of [upstreams.NAME] tables, got {_kind(named)}"
        )
    for part in order or ["upstream"]:
        if part == "upstream":
            tables["default"] = (
                "upstream",
                dataclasses.replace(single, mount=single.mount or "/v1"),
            )
            continue
        assert isinstance(named, dict)
        if not named:
            raise ConfigError(
                "upstreams: the table names no upstream; add [upstreams.NAME] tables "
                "or remove [upstreams]"
            )
        for name, table in named.items():
            key = f"upstreams.{name}"
            if not isinstance(table, dict):
                raise ConfigError(f"{key}: expected a table, got {_kind(table)}")
            if name == "default" and "upstream" in order:
                raise ConfigError(
                    f"{key}: the [upstream] table is already the upstream named 'default'; "
                    "rename this one, or move [upstream] here"
                )
            upstream: UpstreamConfig = _build(UpstreamConfig, table, f"{key}.")
            # No defaults for these: [upstream]'s are a local Dify app's URL and
            # DIFY_API_KEY, which would send another upstream's key to this one.
            for required in ("url", "api_key_env"):
                if required not in table:
                    raise ConfigError(
                        f"{key}.{required}: required for a named upstream "
                        "(the defaults belong to [upstream])"
                    )
            tables[name] = (
                key,
                dataclasses.replace(upstream, name=name, mount=upstream.mount or f"/{name}/v1"),
            )
    found: dict[str, UpstreamConfig] = {}
    for name, (key, upstream) in tables.items():
        url = upstream.url
        api_key = env.get(upstream.api_key_env, "")
        if name == "default":
            url = env.get(ENV_UPSTREAM_URL, url)
            api_key = env.get(ENV_UPSTREAM_API_KEY) or api_key
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.url: expected an http:// or https:// URL, got {url!r}")
        _check_allow_list(upstream.allow, key)
        _check_account(upstream, key)
        found[name] = dataclasses.replace(
            upstream,
            url=url.rstrip("/"),
            api_key=api_key,
            header_secrets=_check_headers(upstream, key, env),
        )
    try:
        check_upstreams(
            [
                UpstreamRoute(
                    name,
                    u.kind,
                    u.mount,
                    models=u.models,
                    fallbacks=u.fallbacks,
                    allow=u.allow,
                    key=tables[name][0],
                )
                for name, u in found.items()
            ]
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return found


# Which kind of upstream takes each account option (`UpstreamConfig.organization`
# ...); the dialect sends it (`Upstream.upstream_credentials`).
_ACCOUNT_OPTIONS: dict[str, str] = {
    "organization": "openai",
    "project": "openai",
    "workspace": "anthropic",
}
_ACCOUNT_EXAMPLES: dict[str, str] = {
    "organization": "org-...",
    "project": "proj_...",
    "workspace": "wrkspc_...",
}


def _check_account(upstream: UpstreamConfig, key: str) -> None:
    """An upstream's account options: only on the kind that reads them, each an
    id as the API gives it (visible ASCII, no spaces: it is sent as a header)."""
    for option, kind in _ACCOUNT_OPTIONS.items():
        value: str = getattr(upstream, option)
        if not value:
            continue
        if upstream.kind != kind:
            raise ConfigError(
                f"{key}.{option}: only an upstream of kind {kind!r} takes it; "
                f"this one is of kind {upstream.kind!r}"
            )
        if not all("!" <= char <= "~" for char in value):
            raise ConfigError(
                f"{key}.{option}: expected an id such as "
                f"{_ACCOUNT_EXAMPLES[option]!r} (visible ASCII, no spaces), got {value!r}"
            )


# An HTTP header's name (RFC 9110 5.6.2: a token).
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What a header's value may hold: visible ASCII, spaces and tabs inside; never
# CR, LF, NUL or another control. Not RFC 9110's obs-text (5.5): its octets
# are Latin-1 at best, and the transports write a str value as UTF-8 (review
# 8, R8-4), so a router would read another value than the one configured.
_HEADER_VALUE: Final = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?")
# Headers an upstream's `headers` may not set, with why: the gateway sets them
# itself (framing, its key, the account options, its request id), or they
# would change what an answer costs unseen by the meter.
_OWNED_HEADERS: Final = {
    **dict.fromkeys(
        (
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "host",
            "content-length",
            "content-type",
            "content-encoding",
            "accept-encoding",
            "expect",
        ),
        "the gateway frames each request itself",
    ),
    **dict.fromkeys(
        ("authorization", "x-api-key"),
        "the gateway sends the upstream key there: set it with api_key_env",
    ),
    "openai-organization": "set it with the upstream's organization option",
    "openai-project": "set it with the upstream's project option",
    "anthropic-workspace-id": "set it with the upstream's workspace option",
    "x-request-id": "the gateway sends its own request id",
    "x-trace-id": "a request's own trace id is sent there (the client's, or the gateway's)",
    # A client's is checked per request (`Upstream.check_headers`): one set
    # here could open rates the price table does not hold.
    "anthropic-beta": "it can change what an answer costs unseen by the meter",
}


def _check_headers(upstream: UpstreamConfig, key: str, env: Mapping[str, str]) -> Mapping[str, str]:
    """An upstream's ``headers`` and ``headers_env``, checked; returns the
    secret values ``headers_env`` names, read from ``env``. A value is never
    quoted in an error: an operator may have put a key in ``headers`` by
    mistake, and ``headers_env``'s are secrets."""
    seen: dict[str, str] = {}  # a name as a CGI-reading server reads it -> the key that set it
    secrets: dict[str, str] = {}
    for table in ("headers", "headers_env"):
        for name, value in getattr(upstream, table).items():
            path = f"{key}.{table}.{_toml_value(name)}"
            if not _HEADER_NAME.fullmatch(name):
                raise ConfigError(f"{path}: not a valid HTTP header name")
            # As a server reading headers as CGI variables tells names apart: it
            # takes x_tenant (and, lighttpd, x.tenant) for x-tenant (all
            # HTTP_X_TENANT; review 8, R8-2; `gateway.http.cgi_spelling`).
            lower = cgi_spelling(name.lower().encode("ascii")).decode("ascii")
            if lower in seen:
                raise ConfigError(f"{path}: the header is already set by {seen[lower]}")
            why = _OWNED_HEADERS.get(lower)
            if why is None and lower.startswith("proxy-"):
                why = "the gateway frames each request itself"
            if why is not None:
                raise ConfigError(f"{path}: this header cannot be set here: {why}")
            seen[lower] = path
            if table == "headers_env":
                variable, value = value, env.get(value, "")
                if not value:
                    raise ConfigError(
                        f"{path}: the environment variable {variable} is not set or empty"
                    )
                secrets[name] = value
                what = f"the value of {variable}"
            else:
                what = "the value"
            if not _HEADER_VALUE.fullmatch(value):
                raise ConfigError(
                    f"{path}: {what} is not a valid header value (visible ASCII, "
                    "with spaces and tabs inside only)"
                )
    return types.MappingProxyType(secrets)


def _check_model_globs(globs: tuple[str, ...] | None, path: str) -> None:
    """A plan's model allow-list: each glob a non-empty string with no
    surrounding whitespace (a request's model is matched as sent, so such a glob
    could only be a mistake)."""
    for index, glob in enumerate(globs or ()):
        if not glob or glob != glob.strip():
            raise ConfigError(
                f"{path}[{index}]: expected a model name or glob such as "
                f'"gpt-4o-mini" or "llama-3*", got {glob!r}'
            )


def _check_allow_list(rules: tuple[str, ...], key: str = "upstream") -> None:
    """``upstream.allow``: each rule must parse (issue 20, default deny)."""
    from gateway.allowlist import parse_rule

    for index, rule in enumerate(rules):
        try:
            parse_rule(rule)
        except ValueError as exc:
            raise ConfigError(f"{key}.allow[{index}]: {exc}") from None


def _resolve_alerts(
    alerts: AlertsConfig, env: Mapping[str, str], *, require_secret: bool = True
) -> AlertsConfig:
    secret = ""
    if alerts.webhook_url:
        if not alerts.webhook_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"alerts.webhook_url: expected an http:// or https:// URL, got {alerts.webhook_url!r}"
            )
        secret = env.get(alerts.webhook_secret_env, "")
        if not require_secret:
            # A command that sends nothing (issue 25: `users set-limit`) needs no
            # signing secret; the commands that send check it.
            secret = secret if _is_webhook_secret(secret) else ""
        elif not secret:
            raise ConfigError(
                f"alerts.webhook_secret_env: the environment variable {alerts.webhook_secret_env} "
                "is not set (webhooks are always signed)"
            )
        elif not _is_webhook_secret(secret):
            raise ConfigError(
                f"alerts.webhook_secret_env: {alerts.webhook_secret_env} is not a Standard "
                "Webhooks secret ('whsec_' followed by base64)"
            )
        else:
            # The key, not its text: one captured signature lets anyone try keys
            # offline (a 1-byte key falls in 256 tries).
            key = base64.b64decode(secret.removeprefix("whsec_"))
            if len(key) < MIN_TOKEN_BYTES:
                raise ConfigError(
                    f"alerts.webhook_secret_env: {alerts.webhook_secret_env}'s key is "
                    f"{len(key)} bytes; a key that short can be guessed - use at least "
                    f"{MIN_TOKEN_BYTES} (Standard Webhooks: 24 to 64 random bytes)"
                )
    return dataclasses.replace(
        alerts,
        webhook_secret=secret,
        smtp_password=env.get(alerts.smtp_password_env, "") if alerts.smtp_username else "",
    )


def _is_webhook_secret(secret: str) -> bool:
    if not secret.startswith("whsec_"):
        return False
    try:
        return bool(base64.b64decode(secret.removeprefix("whsec_"), validate=True))
    except binascii.Error:
        return False


# The shortest secrets taken, in bytes. An HS256 secret is attacked offline:
# every user holds a token it signed, and can try keys against it at leisure
# until one signs a token for anyone (RFC 7518 3.2: a key as long as the hash,
# 256 bits, or longer). The other secrets are guessed online, one request per
# guess (the admin token's throttled): 16 bytes is still out of reach there.
MIN_HS256_BYTES: Final = 32
MIN_TOKEN_BYTES: Final = 16


def _unguessable(secret: str, key: str, variable: str, *, least: int = MIN_TOKEN_BYTES) -> None:
    """Refuse a secret (when set) short enough to be guessed."""
    size = len(secret.encode())
    if 0 < size < least:
        raise ConfigError(
            f"{key}: {variable} holds {size} bytes; a secret that short can be guessed - "
            f"use at least {least} (`openssl rand -hex 32` makes 64)"
        )


def _resolve_auth(auth: AuthConfig, env: Mapping[str, str], *, base: Path) -> AuthConfig:
    """Read the secrets and key files the chosen auth mode needs, refusing what is missing."""
    jwt, trusted = auth.jwt, auth.trusted_header
    if auth.mode == "jwt":
        if jwt.algorithm == "HS256":
            secret = env.get(jwt.secret_env, "")
            if not secret:
                raise ConfigError(
                    f"auth.jwt.secret_env: the environment variable {jwt.secret_env} "
                    "holding the HS256 secret is not set"
                )
            _unguessable(secret, "auth.jwt.secret_env", jwt.secret_env, least=MIN_HS256_BYTES)
            jwt = dataclasses.replace(jwt, secret=secret)
        else:
            if bool(jwt.public_key_file) == bool(jwt.jwks_file):
                raise ConfigError(
                    f"auth.jwt.public_key_file: {jwt.algorithm} needs exactly one of "
                    "auth.jwt.public_key_file or auth.jwt.jwks_file"
                )
            key = "public_key_file" if jwt.public_key_file else "jwks_file"
            path = base / getattr(jwt, key)
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigError(f"auth.jwt.{key}: cannot read {path}: {exc.strerror}") from None
            _check_key(jwt.algorithm, key, text)
            jwt = dataclasses.replace(jwt, key_text=text)
    if auth.mode == "trusted_header":
        service_key = env.get(trusted.service_key_env, "")
        if not service_key:
            raise ConfigError(
                f"auth.trusted_header.service_key_env: the environment variable "
                f"{trusted.service_key_env} holding the service key is not set"
            )
        _unguessable(service_key, "auth.trusted_header.service_key_env", trusted.service_key_env)
        trusted = dataclasses.replace(trusted, service_key=service_key)
    return dataclasses.replace(auth, jwt=jwt, trusted_header=trusted)


def _plan_limits(entries: Any, path: str) -> tuple[PlanLimit, ...]:
    """The ``[[plans.NAME.limits]]`` entries (issue 21), each checked."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected an array of tables ([[{path}]]), got {_kind(entries)}")
    found: list[PlanLimit] = []
    for at, entry in enumerate(entries):
        prefix = f"{path}[{at}]."
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}[{at}]: expected a table, got {_kind(entry)}")
        for key in ("meter", "per", "max"):
            if key not in entry:
                raise ConfigError(f"{prefix}{key}: required")
        limit: PlanLimit = _build(PlanLimit, entry, prefix)
        if limit.per in ("minute", "hour") and limit.meter not in RATE_METERS:
            raise ConfigError(
                f"{prefix}per: a per-{limit.per} rate counts queries or tokens, not {limit.meter}"
            )
        if limit.models and (
            limit.per not in ("day", "month") or limit.meter not in MODEL_LIMIT_METERS
        ):
            raise ConfigError(
                f"{prefix}models: a limit for some models counts queries, tokens, "
                "input_tokens, output_tokens or cost, per day or month"
            )
        # The label is what refusals, /v1/usage and overrides (limits.<label>)
        # name the entry by: two entries under one label could not be told apart.
        if any(other.label == limit.label for other in found):
            raise ConfigError(
                f"{prefix}name: another entry of {path} is already called {limit.label!r}; "
                "give one of them its own name"
            )
        found.append(limit)
    return tuple(found)


def _check_key(algorithm: str, key: str, text: str) -> None:
    """Refuse a key file that holds no usable key for ``algorithm`` now, rather than
    failing on every request later."""
    import jwt as pyjwt
    from jwt.algorithms import get_default_algorithms

    try:
        if key == "jwks_file":
            keys = pyjwt.PyJWKSet.from_json(text).keys
            if not any(k.algorithm_name in (algorithm, "") for k in keys):
                raise ValueError(f"no {algorithm} key in the set")
        else:
            get_default_algorithms()[algorithm].prepare_key(text)
    except (pyjwt.PyJWTError, ValueError, TypeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"auth.jwt.{key}: not a usable {algorithm} key ({detail})") from None


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    """The resolved annotations of a settings class, kept: ``typing.get_type_hints``
    evaluates every string annotation again at each call (most of the cost of
    parsing a configuration). The callers only read them."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _build(
    cls: type[Any],
    table: Mapping[str, Any],
    prefix: str,
    *,
    skip: frozenset[str] | set[str] = frozenset(),
) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("resolved")}
    unknown = [key for key in table if key not in fields or key in skip]
    if unknown:
        # Every key this table takes, the tables read on their own (plans, prices,
        # call_prices) included.
        choices = list(fields)
        close = difflib.get_close_matches(unknown[0], choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key ({hint}expected one of: {', '.join(choices)})"
        )
    values: dict[str, Any] = {}
    for name, value in table.items():
        f = fields[name]
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a table, got {_kind(value)}")
            values[name] = _build(tp, value, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            values[name] = _coerce(value, tp, f"{prefix}{name}", f.metadata.get("min"))
            allowed = f.metadata.get("choices")
            if allowed is not None and values[name] not in allowed:
                listed = ", ".join(repr(c) for c in allowed)
                raise ConfigError(f"{prefix}{name}: expected one of {listed}, got {value!r}")
    return cls(**values)


def _coerce(value: Any, tp: Any, path: str, minimum: float | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Mapping:  # a table of strings (an upstream's headers)
        if not isinstance(value, dict):
            # Not quoted: it may be a header with its key (review 9, R9-5).
            kind = _kind(value, quoted=False)
            raise ConfigError(f"{path}: expected a table of strings, got {kind}")
        if args[1] is str:  # a value is never quoted: it may be a key (review 8, R8-8)
            for name, item in value.items():
                if not isinstance(item, str):
                    kind = _kind(item, quoted=False)
                    raise ConfigError(f"{path}.{_toml_value(name)}: expected a string, got {kind}")
            return types.MappingProxyType(dict(value))
        return types.MappingProxyType(
            {
                name: _coerce(item, args[1], f"{path}.{_toml_value(name)}", minimum)
                for name, item in value.items()
            }
        )
    if tp == Scalar:
        if isinstance(value, dict | list):
            raise ConfigError(f"{path}: expected a string, number or boolean, got {_kind(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        # Otherwise only `X | None` unions occur; TOML has no null, so the value is an X.
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, path, minimum)
    if origin is tuple:
        item_type = args[0]
        if not isinstance(value, list):
            items = "strings" if item_type is str else "integers"
            raise ConfigError(f"{path}: expected an array of {items}, got {_kind(value)}")
        return tuple(
            _coerce(item, item_type, f"{path}[{index}]", minimum)
            for index, item in enumerate(value)
        )
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: expected one of {choices}, got {value!r}")
        return value
    if tp is Decimal:
        return _decimal(value, path, minimum)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_kind(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {_kind(value)}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_kind(value)}")
        return value
    else:  # pragma: no cover - a setting of a type this loader does not know
        raise TypeError(f"{path}: unsupported setting type {tp!r}")
    if minimum is not None and value < minimum:
        bound = int(minimum) if float(minimum).is_integer() else minimum
        raise ConfigError(f"{path}: expected a number >= {bound}, got {value!r}")
    return value


def _decimal(value: Any, path: str, minimum: float | None) -> Decimal:
    """A price: a decimal string ("0.15", exact) or a TOML number (through its
    shortest repr, so 0.15 is 0.15 and not its binary expansion)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f'{path}: expected a decimal string such as "0.15", got {_kind(value)}')
    try:
        result = Decimal(value.strip() if isinstance(value, str) else repr(value))
    except InvalidOperation:
        raise ConfigError(f"{path}: expected a decimal number, got {value!r}") from None
    if not result.is_finite():
        raise ConfigError(f"{path}: expected a finite decimal number, got {value!r}")
    if minimum is not None and result < Decimal(repr(minimum)):
        raise ConfigError(f"{path}: expected a number >= {minimum:g}, got {value!r}")
    return result


def _kind(value: object, *, quoted: bool = True) -> str:
    """A value's TOML kind for an error, with the value itself unless not
    ``quoted`` (one that may be a secret)."""
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a table",
        list: "an array",
    }
    name = names.get(type(value), type(value).__name__)
    return f"{name} ({value!r})" if quoted and not isinstance(value, dict | list) else name


def mask_url(url: str) -> str:
    """A database URL with its password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


# --- introspection ---------------------------------------------------------------


def setting_paths() -> list[str]:
    """Every key the file accepts, as full paths (``plans.<name>.queries_per_day``)."""
    paths: list[str] = []

    def walk(cls: type[Any], prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("resolved") or f.name in (
                "plans",
                "prices",
                "call_prices",
                "messages",
                "upstreams",
            ):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                paths.append(prefix + f.name)

    walk(Config, "")
    walk(UpstreamConfig, "upstreams.<name>.")  # issue 23
    walk(Plan, "plans.<name>.")
    walk(PlanLimit, "plans.<name>.limits[].")
    walk(Price, "prices.<model>.")
    walk(CallPrice, "call_prices.<name>.")
    # issue 25: refusal messages
    walk(MessagesConfig, "messages.")
    paths.append("messages.<language>.<code>")
    return paths


# What an unset setting means, as `render_config` shows it (else "unlimited").
_UNSET: Final = {"alert_thresholds": "alerts.thresholds", "models": "any model"}
_UNSET_PRICES: Final = {
    "cached_input": "the input price",
    "cache_write_input": "the input price",
    "cache_write_1h_input": "not set: a 1-hour cache is refused; writes reported anyway at 2x input",
    "audio_input": "the input price",
    "audio_output": "the output price",
}


def render_config(config: Config) -> str:
    """The effective configuration as TOML, secrets masked (for `gateway check-config`)."""
    lines = [f"# effective configuration (source: {config.source or 'built-in defaults'})"]

    def emit(title: str, obj: Any) -> None:
        lines.append("")
        lines.append(f"[{title}]")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if (f.name in ("name", "limits") and isinstance(obj, Plan)) or dataclasses.is_dataclass(
                value
            ):
                continue
            if value is None:
                # A plan's alert_thresholds unset means "as alerts.thresholds"; a
                # price's rate unset, the rate it is billed at instead.
                unset = _UNSET_PRICES if isinstance(obj, Price) else _UNSET
                shown = unset.get(f.name, "unlimited")
                lines.append(f"# {f.name} = {shown}")
                continue
            if f.metadata.get("secret"):
                if f.name in ("key_text", "header_secrets"):
                    continue  # a document; headers_env's values (named by headers_env)
                value = "***" if value else "(not set)"
            elif f.name == "url" and isinstance(obj, DatabaseConfig):
                value = mask_url(value)
            lines.append(f"{f.name} = {_toml_value(value)}")

    def emit_tree(title: str, obj: Any) -> None:
        emit(title, obj)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                emit_tree(f"{title}.{f.name}", value)

    # Every section of Config, in its order: one added later is never left out
    # (issue 25: [alerts], [metrics] and [pricing] once were).
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "upstream" and config.upstreams.get("default") is not value:
            continue  # no [upstream] in force: only [upstreams.NAME] (written below)
        if dataclasses.is_dataclass(value) and f.name != "messages":  # written below
            emit_tree(f.name, value)
    for name, named in config.upstreams.items():
        if named is not config.upstream:  # [upstream] is written above
            emit(f"upstreams.{_toml_value(name)}", named)
    for name, plan in config.plans.items():
        emit(f"plans.{name}", plan)
        for limit in plan.limits:
            lines.extend(["", f"[[plans.{name}.limits]]"])
            for key in ("meter", "per", "max", "name", "models"):
                value = getattr(limit, key)
                if value not in ("", ()):
                    lines.append(f"{key} = {_toml_value(value)}")
    for model, price in config.prices.items():
        emit(f"prices.{_toml_value(model)}", price)
    for name, call_price in config.call_prices.items():
        emit(f"call_prices.{_toml_value(name)}", call_price)
    # issue 25: refusal messages, with the operator's templates
    lines.extend(["", "[messages]"])
    lines.append(f"default_language = {_toml_value(config.messages.default_language)}")
    for language, templates in config.messages.templates.items():
        lines.extend(["", f"[messages.{language}]"])
        # JSON string escapes are TOML's: a template may hold a newline or a quote.
        lines.extend(
            f"{code} = {json.dumps(text, ensure_ascii=False)}" for code, text in templates.items()
        )
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, Mapping):  # an inline table
        pairs = ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + pairs + "}" if pairs else "{}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Decimal):
        return f'"{value}"'
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
