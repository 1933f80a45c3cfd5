"""The `gateway` command line.

Every command loads the configuration first; configuration and storage errors
print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import date, timedelta
from typing import Any, Literal

from gateway import __version__
from gateway.accounts import (
    Accounts,
    UnknownPlan,
    effective_plan,
    parse_override_text,
)
from gateway.clock import SystemClock, periods_at
from gateway.config import (
    ENV_CONFIG,
    LIMIT_NAMES,
    Config,
    is_override_name,
    load_config,
    render_config,
)
from gateway.currency import check as currency_check
from gateway.currency import shown
from gateway.errors import BadRequest, ConfigError, GatewayError, StorageError
from gateway.logs import configure_logging
from gateway.reports import money, team_report, user_general_view
from gateway.storage import OverrideValue, Storage, open_storage

EXIT_ERROR = 1
EXIT_CONFIG = 2


_LIMIT_HELP = (
    f"{', '.join(LIMIT_NAMES)}, or limits.NAME for a [[plans.NAME.limits]] entry "
    "(limits.queries_per_hour)"
)


def _override_name(name: str) -> str:
    """A limit name a per-user or per-team override can set (argparse type)."""
    if not is_override_name(name):
        raise argparse.ArgumentTypeError(f"no limit named {name!r} (limits: {_LIMIT_HELP})")
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        # Only the commands that deliver alerts (or check what serving needs) need
        # the alert webhook's signing secret (issue 25).
        config = load_config(args.config, alert_secrets=getattr(args, "delivers_alerts", False))
        if args.handler is not _demo:  # the demo logs by its own configuration
            configure_logging(config.server)
        result: int = args.handler(config, args)
        return result
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as exc:
        print(f"gateway: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _config_after_commands(parser: argparse.ArgumentParser) -> None:
    """Accept ``--config`` after any subcommand too (``gateway serve --config FILE``),
    as users type it. SUPPRESS keeps a subcommand from resetting a value given
    before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                sub.add_argument(
                    "--config", "-c", default=argparse.SUPPRESS, help="configuration file"
                )
                _config_after_commands(sub)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Usage-metering gateway for LLM chat APIs."
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help=f"configuration file (default: ${ENV_CONFIG} or ./gateway.toml)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default=None, help="bind address (default: server.host)")
    serve.add_argument("--port", type=int, default=None, help="port (default: server.port)")
    serve.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: server.workers)"
    )
    serve.set_defaults(handler=_serve, delivers_alerts=True)

    demo = commands.add_parser("demo", help="run the gateway with a built-in fake Dify upstream")
    demo.add_argument("--port", type=int, default=8000, help="gateway port (default: 8000)")
    demo.set_defaults(handler=_demo)

    commands.add_parser("migrate", help="apply database migrations").set_defaults(
        handler=_sync(_migrate)
    )
    commands.add_parser(
        "check-config", help="validate and print the effective configuration"
    ).set_defaults(handler=_check_config, delivers_alerts=True)

    users = commands.add_parser("users", help="manage users").add_subparsers(
        title="users commands", metavar="ACTION"
    )
    add = users.add_parser("add", help="create a user")
    add.add_argument("id")
    add.add_argument("--plan", default=None, help="plan (default: accounting.default_plan)")
    add.set_defaults(handler=_sync(_users_add))
    show = users.add_parser("show", help="a user's plan, usage today and lifetime totals")
    show.add_argument("id")
    show.set_defaults(handler=_sync(_users_show))
    set_plan = users.add_parser("set-plan", help="change a user's plan")
    set_plan.add_argument("id")
    set_plan.add_argument("plan")
    set_plan.set_defaults(handler=_sync(_users_set_plan))
    set_limit = users.add_parser("set-limit", help="override one plan limit for a user")
    set_limit.add_argument("id")
    set_limit.add_argument("name", type=_override_name, help=_LIMIT_HELP)
    set_limit.add_argument("value", help="a number, 'unlimited', or true/false for advanced_rag")
    set_limit.set_defaults(handler=_sync(_users_set_limit))
    clear_limit = users.add_parser("clear-limit", help="remove a per-user override")
    clear_limit.add_argument("id")
    clear_limit.add_argument("name", type=_override_name, help=_LIMIT_HELP)
    clear_limit.set_defaults(handler=_sync(_users_clear_limit))
    set_team = users.add_parser("set-team", help="put a user in a team (or --none: in none)")
    set_team.add_argument("id")
    set_team.add_argument("team", nargs="?", default=None)
    set_team.add_argument("--none", action="store_true", help="take the user out of their team")
    set_team.set_defaults(handler=_sync(_users_set_team))
    ls = users.add_parser("list", help="list users with their usage")
    ls.add_argument("--plan", default=None)
    ls.add_argument("--search", default=None, help="only ids containing this text")
    ls.add_argument("--sort", choices=("id", "lifetime_tokens", "tokens_today"), default="id")
    ls.add_argument("--desc", action="store_true", help="sort descending")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--offset", type=int, default=0)
    ls.set_defaults(handler=_sync(_users_list))

    teams = commands.add_parser("teams", help="manage teams").add_subparsers(
        title="teams commands", metavar="ACTION"
    )
    team_add = teams.add_parser("add", help="create a team")
    team_add.add_argument("id")
    team_add.add_argument("--plan", required=True, help="the team's plan")
    team_add.set_defaults(handler=_sync(_teams_add))
    team_show = teams.add_parser("show", help="a team's plan, members and usage (members summed)")
    team_show.add_argument("id")
    team_show.set_defaults(handler=_sync(_teams_show))
    team_plan = teams.add_parser("set-plan", help="change a team's plan")
    team_plan.add_argument("id")
    team_plan.add_argument("plan")
    team_plan.set_defaults(handler=_sync(_teams_set_plan))
    team_limit = teams.add_parser("set-limit", help="override one plan limit for a team")
    team_limit.add_argument("id")
    team_limit.add_argument("name", type=_override_name, help=_LIMIT_HELP)
    team_limit.add_argument("value", help="a number, 'unlimited', or true/false for advanced_rag")
    team_limit.set_defaults(handler=_sync(_teams_set_limit))
    team_clear = teams.add_parser("clear-limit", help="remove a per-team override")
    team_clear.add_argument("id")
    team_clear.add_argument("name", type=_override_name, help=_LIMIT_HELP)
    team_clear.set_defaults(handler=_sync(_teams_clear_limit))
    teams.add_parser("list", help="list teams with their members and today's usage").set_defaults(
        handler=_sync(_teams_list)
    )

    usage = commands.add_parser("usage", help="usage reports").add_subparsers(
        title="usage commands", metavar="ACTION"
    )
    export = usage.add_parser("export", help="export the ledger (or daily rows) for a date range")
    export.add_argument(
        "--from",
        dest="start",
        type=_day,
        default=None,
        help="first day, YYYY-MM-DD (default: 29 days ago)",
    )
    export.add_argument(
        "--to", dest="end", type=_day, default=None, help="last day, inclusive (default: today)"
    )
    export.add_argument("--user", default=None, help="only this user")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument(
        "--daily", action="store_true", help="export daily rows instead of the ledger"
    )
    export.add_argument(
        "--output", "-o", default=None, help="file to write (default: standard output)"
    )
    export.set_defaults(handler=_sync(_usage_export))

    keys = commands.add_parser("keys", help="manage per-user gateway keys").add_subparsers(
        title="keys commands", metavar="ACTION"
    )
    create = keys.add_parser("create", help="create a key for a user (printed once)")
    create.add_argument("id", help="user id")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument("--create-user", action="store_true", help="create the user if unknown")
    create.set_defaults(handler=_sync(_keys_create))
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_sync(_keys_revoke))
    keys_list = keys.add_parser("list", help="a user's keys (ids and names, never secrets)")
    keys_list.add_argument("id", help="user id")
    keys_list.set_defaults(handler=_sync(_keys_list))
    _config_after_commands(parser)
    return parser


Handler = Callable[[Config, argparse.Namespace], int]


def _sync(fn: Callable[[Storage, Config, argparse.Namespace], Awaitable[int]]) -> Handler:
    """Run an async command against a migrated storage."""

    def handler(config: Config, args: argparse.Namespace) -> int:
        async def run() -> int:
            storage = await open_storage(config.database)
            try:
                await storage.migrate()
                return await fn(storage, config, args)
            finally:
                await storage.close()

        return asyncio.run(run())

    return handler


# --- serving ----------------------------------------------------------------------


def _serve(config: Config, args: argparse.Namespace) -> int:
    import uvicorn

    if config.source:
        # Workers are separate processes: they find the same file through the environment.
        os.environ[ENV_CONFIG] = os.path.abspath(config.source)
    from gateway.app import GC_TUNING_ENV

    os.environ[GC_TUNING_ENV] = "1"
    workers = args.workers or config.server.workers
    _check_database(config)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with
    # the handler it found in place: ours, so a graceful stop exits 0 (as does a
    # SIGTERM arriving before uvicorn took over).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with _metrics_directory(workers):
        uvicorn.run(
            "gateway.app:create_app",
            factory=True,
            host=args.host or config.server.host,
            port=args.port if args.port is not None else config.server.port,
            workers=workers,
            log_level=config.server.log_level,
            # No uvicorn logging set-up: this process's log is configured (main),
            # and each worker's by the app factory, in server.log_format.
            log_config=None,
            loop="auto",  # uvloop where installed
            # httptools, with the request head bounded as it arrives (docs/configuration.md)
            http="gateway.request_limits.protocol:BoundedHeadProtocol",
            server_header=False,
            # On SIGTERM: stop accepting, let open answers finish for this long, then
            # cancel them - the proxy still records what each one read (docs/proxy.md).
            timeout_graceful_shutdown=config.server.shutdown_grace,
        )
    return 0


def _check_database(config: Config) -> None:
    """Refuse to serve, with main's one-line error, prices in another currency
    than the money the database holds (gateway/currency.py), or a clock further
    from the database's than ``database.max_clock_offset`` (gateway/skew.py).
    Each worker's start-up checks again; checked here first so the refusal is
    one line and a failing exit, not a traceback in uvicorn's "application
    startup failed" (with several workers uvicorn's parent then exits 0:
    review-skew F5). A database that cannot be reached now is left to the
    workers' start-up, as it was before."""

    async def run() -> None:
        from gateway.metrics import Metrics
        from gateway.skew import ClockWatch

        storage = await open_storage(config.database)
        try:
            await storage.migrate()
            await currency_check(storage, config)
            watch = ClockWatch(
                storage,
                clock=SystemClock(),
                metrics=Metrics(),
                bound=config.database.max_clock_offset,
            )
            await watch.at_start()
        finally:
            await storage.close()

    with contextlib.suppress(StorageError):
        asyncio.run(run())


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


@contextlib.contextmanager
def _metrics_directory(workers: int) -> Iterator[None]:
    """Several workers share their metrics through files in a fresh directory
    (prometheus_client's multiprocess mode; see docs/metrics.md). A directory
    given in the environment is used as it is: wiping it between runs is then
    the operator's."""
    from gateway.metrics import MULTIPROC_ENV

    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        yield
        return
    path = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ[MULTIPROC_ENV] = path  # the workers inherit it
    try:
        yield
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)


def _demo(config: Config, args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(port=args.port, log=config.server)


async def _migrate(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    # _sync has already migrated; report the state.
    print(f"database {_describe_db(config)} is up to date")
    return 0


def _check_config(config: Config, args: argparse.Namespace) -> int:
    sys.stdout.write(render_config(config))
    for warning in config_warnings(config):
        print(f"gateway: warning: {warning}", file=sys.stderr)
    return 0


def config_warnings(config: Config) -> list[str]:
    """What a valid configuration still gets wrong: `check-config` says it, as
    `gateway serve` logs it at start."""
    from gateway.config import ENV_UPSTREAM_API_KEY

    warnings = []
    for name, upstream in config.upstreams.items():
        if upstream.api_key:
            continue
        if upstream is config.upstream:
            warnings.append(
                f"the upstream API key is not set: set {upstream.api_key_env} "
                f"(upstream.api_key_env) or {ENV_UPSTREAM_API_KEY}; the upstream will refuse "
                "every request"
            )
        else:
            warnings.append(
                f"the API key of upstream {name} is not set: set {upstream.api_key_env} "
                f"(upstreams.{name}.api_key_env); it will refuse every request"
            )
    # One variable read by upstreams at different hosts, as their key or as one of
    # their headers (headers_env): one of them is sent a secret that was meant for
    # another (or the operator's single secret is sent to both).
    hosts: dict[str, dict[str, str]] = {}
    settings: dict[str, set[str]] = {}
    for name, upstream in config.upstreams.items():
        host = _host(upstream.url)
        for variable, setting in (
            (upstream.api_key_env, "api_key_env"),
            *((variable, "headers_env") for variable in upstream.headers_env.values()),
        ):
            hosts.setdefault(variable, {})[name] = host
            settings.setdefault(variable, set()).add(setting)
    for variable, by_name in hosts.items():
        if len(set(by_name.values())) < 2:
            continue
        names, where = ", ".join(by_name), ", ".join(sorted(set(by_name.values())))
        if settings[variable] == {"api_key_env"}:
            warnings.append(
                f"upstreams {names} read the same API key ({variable}) but are at different "
                f"hosts ({where}): each is sent the others' key; give each its own api_key_env"
            )
        else:
            warnings.append(
                f"upstreams {names} read the same secret ({variable}, in "
                f"{' and '.join(sorted(settings[variable]))}) but are at different hosts "
                f"({where}): each is sent the others' secret; give each its own variable"
            )
    if config.auth.mode == "jwt" and not config.auth.jwt.audience:
        # Review-auth A2: a token that names an audience is refused unless it
        # names this one; most identity providers' tokens name one.
        warnings.append(
            "auth.jwt.audience is not set: a token that names an audience (aud) is "
            "refused, as the tokens of most identity providers (Auth0, Entra ID, Cognito, "
            "Google, Keycloak, Okta) do; set it to the audience they are issued for"
        )
    # Review-meter F5: a prompt's 5-minute cache writes, which a client asks
    # for at will (cache_control), are billed by Anthropic at 1.25x input and
    # charged at input where the price does not set them. A Claude model's
    # price (an anthropic upstream's, or a router's in front of it), and the
    # "*" price where an anthropic upstream may use it.
    anthropic = any(upstream.kind == "anthropic" for upstream in config.upstreams.values())
    for model, price in config.prices.items():
        if price.cache_write_input is None and (
            "claude" in model.lower() or (anthropic and model == "*")
        ):
            warnings.append(
                f"prices.{model!r} has no cache_write_input: Anthropic bills 5-minute cache "
                "writes at 1.25x input, and they are charged at input; set it "
                "(1.25 times its input price)"
            )
    if all(upstream.kind == "dify" for upstream in config.upstreams.values()):
        # Issue 21: a Dify app fixes its own model; no request names one.
        for name, plan in config.plans.items():
            if plan.models is not None:
                warnings.append(
                    f"plans.{name}.models: a Dify upstream's requests name no model, so "
                    "the allow-list does not apply (docs/quotas.md, 'Model allow-lists')"
                )
    return warnings


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "").lower()


def _describe_db(config: Config) -> str:
    from gateway.config import mask_url

    return mask_url(config.database.url)


# --- users --------------------------------------------------------------------------


def _accounts(storage: Storage, config: Config) -> Accounts:
    """The admin operations (gateway/accounts.py), as the admin API runs them."""
    return Accounts(storage, config=lambda: config)


def _plan_refused(exc: UnknownPlan) -> ConfigError:
    """A plan the configuration does not define: a usage error (exit 2)."""
    return ConfigError(f"no plan named {exc.plan!r} (expected one of: {', '.join(exc.plans)})")


async def _users_add(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    plan = args.plan or config.accounting.default_plan
    try:
        existing = await _accounts(storage, config).add_user(args.id, plan=plan)
    except UnknownPlan as exc:
        raise _plan_refused(exc) from None
    if existing is not None:
        print(f"user {args.id!r} already exists (plan {existing.plan})")
        return EXIT_ERROR
    print(f"created user {args.id!r} on plan {plan}")
    return 0


async def _users_show(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    user = await storage.get_user(args.id)
    if user is None:
        print(f"gateway: error: no user {args.id!r}", file=sys.stderr)
        return EXIT_ERROR
    period = periods_at(SystemClock().now(), config.tz)
    rows = await storage.daily(period.month_start, period.day, user_id=user.id)
    today = next((r for r in rows if r.day == period.day), None)
    month_tokens = sum(r.total_tokens for r in rows)
    plan = effective_plan(config, user)
    currency = await _currency(storage, config)

    def limit(value: object) -> str:
        return "unlimited" if value is None else str(value)

    lines = [
        f"user:      {user.id}",
        f"plan:      {user.plan}"
        + ("" if user.plan in config.plans else f" (not configured; using {plan.name})"),
        f"created:   {user.created_at.astimezone(config.tz).isoformat(timespec='seconds')}",
        f"lifetime:  {user.lifetime_tokens} tokens "
        f"({token_split(user.lifetime_tokens, user.lifetime_prompt_tokens, user.lifetime_completion_tokens)}), "
        f"cost {money(user.lifetime_cost)} {currency}",
        f"today ({period.day.isoformat()}, {config.accounting.timezone}):",
        f"  queries       {today.queries if today else 0} / {limit(plan.queries_per_day)}",
        f"  tokens        {today.total_tokens if today else 0} / {limit(plan.tokens_per_day)}",
        f"  web searches  {today.web_searches if today else 0} / {limit(plan.web_searches_per_day)}",
        f"  cost          {money(today.cost) if today else 0} {currency}",
        f"this month:    {month_tokens} tokens / {limit(plan.tokens_per_month)}",
    ]
    # The plan's [[plans.NAME.limits]] entries (issue 21), as /v1/usage shows them.
    general = await user_general_view(storage, plan, user.id, rows, period, now=SystemClock().now())
    lines += _general_lines("", general)
    # This month's answers per model and per named upstream (issue 23), from the
    # ledger, as /v1/usage and the admin API show them.
    models = await storage.usage_by_model(user.id, start=period.month_start, end=period.day)
    lines += _grouped_lines(
        "by model",
        [(m.key or "-", m.answers, m.total_tokens, money(m.cost), m.currency) for m in models],
    )
    upstreams = await storage.usage_by_upstream(user.id, start=period.month_start, end=period.day)
    lines += _grouped_lines(
        "by upstream",
        [(u.key or "-", u.answers, u.total_tokens, money(u.cost), u.currency) for u in upstreams],
    )
    if user.overrides:
        lines.append(
            "overrides:  " + ", ".join(f"{k}={limit(v)}" for k, v in sorted(user.overrides.items()))
        )
    team = await storage.get_team(user.team) if user.team is not None else None
    if team is None:
        lines.append("team:      -")
    else:
        report = await team_report(storage, config, team, period, currency=currency, members=False)
        lines.append(f"team:      {team.id} (plan {report['plan']})")
        lines += _team_usage_lines(report, config)
    keys = await storage.list_keys(user.id)
    for key in keys:
        state = (
            f"revoked {key.revoked_at.isoformat(timespec='seconds')}"
            if key.revoked_at
            else "active"
        )
        lines.append(f"key:        {key.id}  {key.prefix}…  {key.name or '-'}  {state}")
    print("\n".join(lines))
    return 0


def _grouped_lines(title: str, groups: Sequence[tuple[str, int, int, str, str]]) -> list[str]:
    """This month's ledger rows summed per model or upstream and currency (name,
    answers, tokens, cost, currency), a line each: none when the month has none."""
    if not groups:
        return []
    width = max(len(group[0]) for group in groups)
    return [f"this month {title}:"] + [
        f"  {name:<{width}}  {answers} answer{'' if answers == 1 else 's'}, {tokens} tokens, "
        f"cost {cost} {currency}"
        for name, answers, tokens, cost, currency in groups
    ]


def _general_lines(who: str, limits: dict[str, dict[str, Any]]) -> list[str]:
    """The ``[[plans.NAME.limits]]`` entries of a usage view (those saying what
    they count), a line each: name, used / limit, and when it resets."""
    general = {name: entry for name, entry in limits.items() if "meter" in entry}
    if not general:
        return []
    width = max(len(name) for name in general)
    return [f"{who}limits:"] + [
        f"  {name:<{width}}  {entry['used']} / {entry['limit']}"
        + (f"  (resets {entry['resets_at']})" if entry["resets_at"] else "")
        for name, entry in general.items()
    ]


def _team_usage_lines(report: dict[str, Any], config: Config) -> list[str]:
    """A team's usage (its members summed) against its plan, for `users show`
    and `teams show`."""

    def used(name: str) -> str:
        entry = report["limits"][name]
        limit = "unlimited" if entry["limit"] is None else entry["limit"]
        return f"{entry['used']} / {limit}"

    return [
        f"team today ({report['today']['day']}, {config.accounting.timezone}, members summed):",
        f"  queries       {used('queries_per_day')}",
        f"  tokens        {used('tokens_per_day')}",
        f"  web searches  {used('web_searches_per_day')}",
        f"  cost          {report['today']['cost']} {report['currency']}",
        f"team this month: {used('tokens_per_month')} tokens, "
        f"cost {report['month']['cost']} {report['currency']}",
        *_general_lines("team ", report["limits"]),
    ]


async def _currency(storage: Storage, config: Config) -> str:
    """The currency of the database's totals: its ledger's, whatever the
    configuration now says (a refused mix raises, so no sum is shown unlabelled)."""
    return shown(await storage.costs_by_currency(), config)


def token_split(total: int, prompt: int, completion: int) -> str:
    """How ``total`` tokens divide, saying which part is not known: some answers
    report a total without its split (a blocking Dify workflow reports only its
    nodes' prompt and completion tokens), so prompt + completion can fall short."""
    unsplit = total - prompt - completion
    if unsplit <= 0:
        return f"{prompt} prompt, {completion} completion"
    if not prompt and not completion:
        return "prompt/completion split not reported"
    return f"{prompt} prompt, {completion} completion, {unsplit} with the split not reported"


async def _users_set_plan(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    try:
        await _accounts(storage, config).set_plan(args.id, args.plan)
    except UnknownPlan as exc:
        raise _plan_refused(exc) from None
    print(f"user {args.id!r} is now on plan {args.plan}")
    return 0


def parse_limit_value(name: str, raw: str) -> OverrideValue:
    """A per-user override as typed; a bad one is a usage error (exit 2)."""
    try:
        return parse_override_text(name, raw)
    except BadRequest as exc:
        raise ConfigError(f"{exc.message} Got {raw!r}.") from None


async def _users_set_limit(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    value = await _accounts(storage, config).set_override(
        args.id, args.name, parse_limit_value(args.name, args.value)
    )
    print(f"user {args.id!r}: {args.name} = {'unlimited' if value is None else value} (override)")
    return 0


async def _users_clear_limit(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    await _accounts(storage, config).clear_override(args.id, args.name)
    print(f"user {args.id!r}: {args.name} follows the plan again")
    return 0


async def _users_set_team(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    if (args.team is None) == (not args.none):
        raise ConfigError("users set-team: give a team, or --none to take the user out of theirs")
    await _accounts(storage, config).set_team(args.id, args.team)
    if args.team is None:
        print(f"user {args.id!r} is in no team")
    else:
        print(f"user {args.id!r} is now in team {args.team}")
    return 0


async def _users_list(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    day = periods_at(SystemClock().now(), config.tz).day
    summaries = await storage.list_users(
        day=day,
        plan=args.plan,
        search=args.search,
        sort=args.sort,
        descending=args.desc,
        limit=args.limit,
        offset=args.offset,
    )
    currency = await _currency(storage, config)
    rows: list[tuple[Any, ...]] = [
        (
            "USER",
            "PLAN",
            "TEAM",
            "LIFETIME TOKENS",
            "LIFETIME COST",
            "QUERIES TODAY",
            "TOKENS TODAY",
        )
    ]
    for s in summaries:
        rows.append(
            (
                s.user.id,
                s.user.plan,
                s.user.team or "-",
                s.user.lifetime_tokens,
                f"{money(s.user.lifetime_cost)} {currency}",
                s.today.queries,
                s.today.total_tokens,
            )
        )
    _print_table(rows)
    total = await storage.count_users(plan=args.plan, search=args.search)
    print(f"({len(summaries)} of {total} users)")
    return 0


def _print_table(rows: list[tuple[Any, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


# --- teams (issue 21) ---------------------------------------------------------------


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """A team id or plan name refused by the one validation (gateway/accounts.py)
    is a usage error, as a bad plan for a user is."""
    try:
        yield
    except UnknownPlan as exc:
        raise _plan_refused(exc) from None
    except BadRequest as exc:
        raise ConfigError(exc.message) from None


async def _teams_add(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    with _usage_errors():
        await _accounts(storage, config).create_team(args.id, plan=args.plan)
    print(f"created team {args.id!r} on plan {args.plan}")
    return 0


async def _teams_show(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    team = await storage.get_team(args.id)
    if team is None:
        print(f"gateway: error: no team {args.id!r}", file=sys.stderr)
        return EXIT_ERROR
    report = await team_report(
        storage,
        config,
        team,
        periods_at(SystemClock().now(), config.tz),
        currency=await _currency(storage, config),
    )
    note = "" if team.plan in config.plans else f" (not configured; using {report['plan']})"
    lines = [
        f"team:      {team.id}",
        f"plan:      {team.plan}{note}",
        f"created:   {team.created_at.astimezone(config.tz).isoformat(timespec='seconds')}",
        f"members:   {', '.join(report['members']) or '-'}",
    ]
    if team.overrides:
        lines.append(
            "overrides:  "
            + ", ".join(
                f"{k}={'unlimited' if v is None else v}" for k, v in sorted(team.overrides.items())
            )
        )
    by_upstream = [
        (u["upstream"], u["answers"], u["total_tokens"], u["cost"], u["currency"])
        for u in report["month_by_upstream"]
    ]
    lines += _team_usage_lines(report, config) + _grouped_lines("by upstream", by_upstream)
    print("\n".join(lines))
    return 0


async def _teams_set_plan(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    with _usage_errors():
        await _accounts(storage, config).set_team_plan(args.id, args.plan)
    print(f"team {args.id!r} is now on plan {args.plan}")
    return 0


async def _teams_set_limit(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    value = await _accounts(storage, config).set_team_override(
        args.id, args.name, parse_limit_value(args.name, args.value)
    )
    print(f"team {args.id!r}: {args.name} = {'unlimited' if value is None else value} (override)")
    return 0


async def _teams_clear_limit(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    await _accounts(storage, config).clear_team_override(args.id, args.name)
    print(f"team {args.id!r}: {args.name} follows the plan again")
    return 0


async def _teams_list(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    day = periods_at(SystemClock().now(), config.tz).day
    rows: list[tuple[Any, ...]] = [
        ("TEAM", "PLAN", "MEMBERS", "QUERIES TODAY", "TOKENS TODAY", "COST TODAY")
    ]
    teams = await storage.list_teams(day=day)
    currency = await _currency(storage, config)
    for summary in teams:
        today = summary.today
        rows.append(
            (
                summary.team.id,
                summary.team.plan,
                summary.members,
                today.queries,
                today.total_tokens,
                f"{money(today.cost)} {currency}",
            )
        )
    _print_table(rows)
    print(f"({len(teams)} teams)")
    return 0


# --- usage --------------------------------------------------------------------------


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}") from None


async def _usage_export(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    from gateway.export import encode, rows

    today = periods_at(SystemClock().now(), config.tz).day
    end = args.end or today
    start = args.start or end - timedelta(days=29)
    if end < start:
        raise ConfigError("--to must not be before --from")
    dataset: Literal["events", "daily"] = "daily" if args.daily else "events"
    # A ledger row carries its own currency; the day rows the database's, which
    # only a database mixing currencies cannot name (refused, gateway/currency.py).
    currency = await _currency(storage, config) if dataset == "daily" else ""
    columns, source = rows(storage, dataset, start, end, user_id=args.user, currency=currency)
    progress = None
    if sys.stderr.isatty() and dataset == "events":
        total = await storage.count_events(start, end, user_id=args.user)
        progress = _progress_bar(total)
    # A command-line tool: blocking writes are what it is for.
    out = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: SIM115, ASYNC230
    try:
        async for chunk in encode(columns, source, args.format, progress=progress):
            out.write(chunk)
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    if progress is not None:
        print(file=sys.stderr)
    return 0


def _progress_bar(total: int) -> Callable[[int], None]:
    def show(done: int) -> None:
        width = 30
        filled = width * done // total if total else width
        percent = 100 * done // total if total else 100
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows {percent}%"
        )
        sys.stderr.flush()

    return show


# --- keys --------------------------------------------------------------------------


async def _keys_create(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    record, secret = await _accounts(storage, config).create_key(
        args.id, name=args.name, create_user=args.create_user
    )
    print(
        f"created key {record.id} for user {record.user_id!r}; it is shown only this once:",
        file=sys.stderr,
    )
    print(secret)
    return 0


async def _keys_revoke(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    key = await _accounts(storage, config).revoke_key(args.key_id)
    assert key.revoked_at is not None
    print(
        f"key {key.id} of user {key.user_id!r} revoked at {key.revoked_at.isoformat(timespec='seconds')}"
    )
    return 0


async def _keys_list(storage: Storage, config: Config, args: argparse.Namespace) -> int:
    for key in await storage.list_keys(args.id):
        state = (
            f"revoked {key.revoked_at.isoformat(timespec='seconds')}"
            if key.revoked_at
            else "active"
        )
        print(
            f"{key.id}  {key.prefix}…  {key.name or '-'}  {key.created_at.isoformat(timespec='seconds')}  {state}"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
