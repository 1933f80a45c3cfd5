"""What a user has used and has left, assembled for the usage API, the admin API,
the dashboard and the CLI.

Read-only views over storage: one place that knows how plan limits, overrides,
counters and reset times fit together, so every surface says the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from gateway.accounts import effective_plan, team_plan
from gateway.clock import Periods, periods_at
from gateway.config import GENERAL_PREFIX, LIMIT_NAMES, MONEY_LIMITS, Config, Plan
from gateway.errors import NotFound
from gateway.quota.limits import (
    RATE_BUCKETS,
    Limit,
    LimitScope,
    Meter,
    Per,
    bucket_seconds,
    first_counted,
    rate_used,
)
from gateway.quota.plans import plan_limits
from gateway.storage import (
    DailyUsage,
    DirectoryReads,
    ReportReads,
    Team,
    UsageGroup,
    User,
    summed,
)

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.snapshot import Current, Snapshot


class ReportStorage(ReportReads, DirectoryReads, Protocol):
    """Reports read usage (`ReportReads`) of the users, teams and keys of the
    directory; they change nothing."""


# Limits whose "used" comes from a counter, and the period that resets them.
_DAILY = ("queries_per_day", "tokens_per_day", "web_searches_per_day")
_MONTHLY = ("tokens_per_month",)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def money(value: Decimal) -> str:
    """Money as an exact decimal string (never a float in JSON)."""
    return format(value.normalize(), "f") if value else "0"


def daily_dict(row: DailyUsage, currency: str) -> dict[str, Any]:
    """A day row as the APIs show it; ``currency`` is the database's (the day rows
    hold one cost number, in the one currency gateway/currency.py keeps them in)."""
    return {
        "day": row.day.isoformat(),
        "queries": row.queries,
        "advanced_rag": row.advanced_rag,
        "web_searches": row.web_searches,
        "uploads": row.uploads,
        "upload_bytes": row.upload_bytes,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.total_tokens,
        "cost": money(row.cost),
        "currency": currency,
    }


def lifetime_dict(user: User, currency: str) -> dict[str, Any]:
    return {
        "prompt_tokens": user.lifetime_prompt_tokens,
        "completion_tokens": user.lifetime_completion_tokens,
        "total_tokens": user.lifetime_tokens,
        "cost": money(user.lifetime_cost),
        "currency": currency,
    }


def group_dict(name: str, row: UsageGroup) -> dict[str, Any]:
    """One model's or one named upstream's answers, ``name`` ("model" or
    "upstream") keying the group."""
    return {
        name: row.key,
        "answers": row.answers,
        "prompt_tokens": row.prompt_tokens,
        "cached_tokens": row.cached_tokens,
        "completion_tokens": row.completion_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "total_tokens": row.total_tokens,
        "cost": money(row.cost),
        "currency": row.currency,
    }


# What a day row counts for each meter a limit can count (DailyUsage's fields).
_DAY_FIELDS: dict[Meter, str] = {
    "queries": "queries",
    "advanced_rag": "advanced_rag",
    "web_searches": "web_searches",
    "uploads": "uploads",
    "upload_bytes": "upload_bytes",
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "tokens": "total_tokens",
    "cost": "cost",
}
Buckets = Mapping[tuple[Meter, Per], Mapping[int, Decimal]]
# The plan keys that are rates, and what they count (per minute).
_MINUTE_RATES: dict[str, Meter] = {"requests_per_minute": "queries", "tokens_per_minute": "tokens"}


def rate_reset(
    buckets: Mapping[int, Decimal], per: Per, now: datetime, periods: Periods
) -> datetime | None:
    """When a rate window's oldest counted bucket leaves it (what it counted is
    then free again, as a refusal's Retry-After counts), in the periods' time
    zone: None when it counts nothing."""
    epoch = now.timestamp()
    first = first_counted(per, epoch)
    counted = [bucket for bucket, amount in buckets.items() if bucket >= first and amount]
    if not counted:
        return None
    leaves = (min(counted) + RATE_BUCKETS + 1) * bucket_seconds(per)
    return datetime.fromtimestamp(leaves, periods.day_resets_at.tzinfo)


def general_limits(plan: Plan) -> list[tuple[str, Limit]]:
    """The plan's ``[[plans.NAME.limits]]`` entries as limits, each with the
    name overrides call it by (`PlanLimit.label`)."""
    labels = {entry.label for entry in plan.limits}
    return [(limit.name, limit) for limit in plan_limits(plan) if limit.name in labels]


def general_view(
    limits: list[tuple[str, Limit]],
    today: DailyUsage,
    month: DailyUsage,
    periods: Periods,
    *,
    now: datetime,
    buckets: Buckets,
    models: Mapping[tuple[str, Meter, Per], Decimal],
    scope: LimitScope | None = None,
) -> dict[str, dict[str, Any]]:
    """Each ``[[plans.NAME.limits]]`` entry (issue 21): what it counts (meter,
    per, scope, models), used, limit, remaining and resets_at; money as exact
    decimal strings. ``today`` and ``month`` are the day rows the entries count
    (the user's, or the team's members' summed); ``buckets`` the rate buckets;
    ``models`` the per-model limits' own counters (`ReportReads.model_counters`)."""
    view: dict[str, dict[str, Any]] = {}
    for name, limit in limits:
        resets: datetime | None
        if limit.is_rate:
            window = buckets.get((limit.meter, limit.per), {})
            used = rate_used(window, limit.per, now.timestamp())
            resets = rate_reset(window, limit.per, now, periods)
        else:
            key = limit.counter_key
            if key is not None:
                used = models.get((key, limit.meter, limit.per), Decimal(0))
            else:
                row = today if limit.per == "day" else month
                used = Decimal(getattr(row, _DAY_FIELDS[limit.meter]))
            resets = periods.day_resets_at if limit.per == "day" else periods.month_resets_at
        remaining = max(limit.max - used, Decimal(0))
        shown: Callable[[Decimal], Any] = money if limit.meter == "cost" else int
        view[name] = {
            "meter": limit.meter,
            "per": limit.per,
            "scope": scope or limit.scope,
            "models": list(limit.models),
            "used": shown(used),
            "limit": shown(limit.max),
            "remaining": shown(remaining),
            "resets_at": _iso(resets),
        }
    return view


def limits_view(
    plan: Plan,
    today: DailyUsage,
    month_tokens: int,
    open_streams: int,
    periods: Periods,
    *,
    month_cost: Decimal = Decimal(0),
    buckets: Buckets | None = None,
    now: datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Each limit of the (overridden) plan's keys: used, limit, remaining,
    resets_at (`general_view` adds its ``[[plans.NAME.limits]]`` entries).

    ``limit`` and ``remaining`` are null when unlimited; ``resets_at`` is null for
    limits that do not reset with time (and a rate counting nothing);
    ``buckets`` are the rate buckets counted at ``now``.
    """
    buckets = buckets or {}
    moment = now or datetime.now(UTC)
    rates = {key: rate_used(found, key[1], moment.timestamp()) for key, found in buckets.items()}
    rate_resets = {
        name: rate_reset(buckets.get((meter, "minute"), {}), "minute", moment, periods)
        for name, meter in _MINUTE_RATES.items()
    }
    used: dict[str, Any] = {
        "queries_per_day": today.queries,
        "tokens_per_day": today.total_tokens,
        "web_searches_per_day": today.web_searches,
        "tokens_per_month": month_tokens,
        "max_concurrent_streams": open_streams,
        "advanced_rag": today.advanced_rag,
        "requests_per_minute": int(rates.get(("queries", "minute"), 0)),
        "tokens_per_minute": int(rates.get(("tokens", "minute"), 0)),
        "cost_per_day": today.cost,
        "cost_per_month": month_cost,
    }
    view: dict[str, dict[str, Any]] = {}
    for name in LIMIT_NAMES:
        limit = getattr(plan, name)
        entry: dict[str, Any] = {"limit": limit}
        if name == "advanced_rag":
            entry = {
                "allowed": bool(limit),
                "used": used[name],
                "resets_at": _iso(periods.day_resets_at),
            }
        elif name in MONEY_LIMITS:
            # Money as exact decimal strings; used is what was spent (answers
            # under way hold their reservations apart).
            entry = {
                "limit": None if limit is None else money(limit),
                "used": money(used[name]),
                "remaining": None if limit is None else money(max(limit - used[name], Decimal(0))),
                "resets_at": _iso(
                    periods.day_resets_at if name == "cost_per_day" else periods.month_resets_at
                ),
            }
        elif name in used:
            entry["used"] = used[name]
            entry["remaining"] = None if limit is None else max(limit - used[name], 0)
            reset = (
                periods.day_resets_at
                if name in _DAILY
                else periods.month_resets_at
                if name in _MONTHLY
                else rate_resets.get(name)
            )
            entry["resets_at"] = _iso(reset)
        view[name] = entry
    return view


def add_general(limits: dict[str, dict[str, Any]], general: Mapping[str, dict[str, Any]]) -> None:
    """Adds ``[[plans.NAME.limits]]`` entries to a view of the plan's keys, each
    by its name; one whose name a plan key has too (an entry counting tokens per
    day unnamed is "tokens_per_day") by its override's name ("limits." and the
    name), so neither hides the other."""
    for name, entry in general.items():
        key = name if name not in limits else GENERAL_PREFIX + name
        limits[key] = entry


async def user_general_view(
    storage: ReportReads,
    plan: Plan,
    user_id: str,
    rows: list[DailyUsage],
    periods: Periods,
    *,
    now: datetime,
    buckets: Buckets | None = None,
) -> dict[str, dict[str, Any]]:
    """`general_view` of a user's plan: ``rows`` are the user's day rows of this
    month; ``buckets`` their rate buckets (read when not given). One read for
    the rates and one for the per-model counters, each only when an entry needs it."""
    general = general_limits(plan)
    if not general:
        return {}
    if buckets is None:
        rated = any(limit.is_rate for _, limit in general)
        buckets = await storage.rate_buckets([user_id]) if rated else {}
    keys = sorted({k for _, limit in general if (k := limit.counter_key) is not None})
    per_model = await storage.model_counters(
        user_id, keys, day=periods.day, month_start=periods.month_start
    )
    today = next((r for r in rows if r.day == periods.day), DailyUsage(user_id, periods.day))
    month = summed(rows, user_id=user_id, day=periods.month_start)
    return general_view(general, today, month, periods, now=now, buckets=buckets, models=per_model)


def fill_days(rows: list[DailyUsage], user_id: str, start: date, end: date) -> list[DailyUsage]:
    """One row per day from ``start`` to ``end``, zeros where nothing happened."""
    by_day = {row.day: row for row in rows}
    days = (end - start).days + 1
    return [
        by_day.get(
            start + timedelta(days=i), DailyUsage(user_id=user_id, day=start + timedelta(days=i))
        )
        for i in range(days)
    ]


async def team_report(
    storage: ReportStorage,
    config: Config,
    team: Team,
    periods: Periods,
    *,
    currency: str,
    members: bool = True,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A team's plan, limits and usage: its current members' day rows summed
    (issue 21) - today, this month, and each limit of the team's plan against
    them (a team has no stream counter of its own: ``max_concurrent_streams``
    shows its limit only). The same view for the CLI, the admin API and the
    dashboard; with ``members``, the members and the month per upstream too."""
    rows = await storage.team_daily(team.id, start=periods.month_start, end=periods.day)
    today = summed([r for r in rows if r.day == periods.day], user_id=team.id, day=periods.day)
    month = summed(rows, user_id=team.id, day=periods.month_start)
    plan = team_plan(config, team)
    users = await storage.team_members(team.id)
    moment = now or datetime.now(UTC)
    general = general_limits(plan)
    buckets: Buckets = {}
    if users and (
        plan.requests_per_minute is not None
        or plan.tokens_per_minute is not None
        or any(limit.is_rate for _, limit in general)
    ):
        # A team's rate sums its members' rate windows (docs/quotas.md, "Team
        # limits"): their buckets, in one read.
        buckets = await storage.rate_buckets([user.id for user in users])
    limits = limits_view(
        plan,
        today,
        month.total_tokens,
        0,
        periods,
        month_cost=month.cost,
        buckets=buckets,
        now=moment,
    )
    # Its [[plans.NAME.limits]] entries, over its members (per-model limits are
    # each member's own: `plans.team_limits`).
    team_general = [(name, limit) for name, limit in general if not limit.models]
    add_general(
        limits,
        general_view(
            team_general,
            today,
            month,
            periods,
            now=moment,
            buckets=buckets,
            models={},
            scope="team",
        ),
    )
    limits["max_concurrent_streams"] = {"limit": plan.max_concurrent_streams}
    report: dict[str, Any] = {
        "id": team.id,
        "plan": plan.name,
        "stored_plan": team.plan,
        "overrides": dict(team.overrides),
        "created_at": team.created_at.isoformat(),
        "limits": limits,
        "currency": currency,
        "today": daily_dict(today, currency),
        "month": daily_dict(month, currency),
    }
    if members:
        # The team's own view (not the team part of a member's): its members and
        # this month's answers per named upstream (issue 23), from the ledger.
        report["members"] = [user.id for user in users]
        upstreams = await storage.team_usage_by_upstream(
            team.id, start=periods.month_start, end=periods.day
        )
        report["month_by_upstream"] = [group_dict("upstream", u) for u in upstreams]
    return report


class Reports:
    """Reads usage for one user at a time, against the configuration in force
    (read once per report)."""

    __slots__ = ("_clock", "_currency", "_current", "_storage")

    def __init__(
        self,
        storage: ReportStorage,
        *,
        clock: Clock,
        current: Current,
        currency: Callable[[], str],
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._current = current
        self._currency = currency  # the database's (gateway/currency.py)

    def _periods(self, snap: Snapshot) -> Periods:
        return periods_at(self._clock.now(), snap.tz)

    async def user(self, user_id: str) -> User:
        user = await self._storage.get_user(user_id)
        if user is None:
            raise NotFound(f"No user {user_id!r}.")
        return user

    async def usage(self, user: User) -> dict[str, Any]:
        """The user's limits and what is left of them, with lifetime totals."""
        return await self._usage(self._current.snapshot, user)

    async def _usage(self, snap: Snapshot, user: User) -> dict[str, Any]:
        periods = self._periods(snap)
        rows = await self._storage.daily(periods.month_start, periods.day, user_id=user.id)
        today = next(
            (r for r in rows if r.day == periods.day), DailyUsage(user_id=user.id, day=periods.day)
        )
        streams = await self._storage.open_streams(user.id, now=self._clock.now())
        models = await self._storage.usage_by_model(
            user.id, start=periods.month_start, end=periods.day
        )
        upstreams = await self._storage.usage_by_upstream(
            user.id, start=periods.month_start, end=periods.day
        )
        plan: Plan = effective_plan(snap.config, user)
        team = await self._user_team(snap, user)
        currency = self._currency()
        now = self._clock.now()
        buckets = await self._storage.rate_buckets([user.id])
        month = summed(rows, user_id=user.id, day=periods.month_start)
        limits = limits_view(
            plan,
            today,
            month.total_tokens,
            streams,
            periods,
            month_cost=month.cost,
            buckets=buckets,
            now=now,
        )
        # The plan's [[plans.NAME.limits]] entries, by the names overrides use.
        add_general(
            limits,
            await user_general_view(
                self._storage, plan, user.id, rows, periods, now=now, buckets=buckets
            ),
        )
        return {
            "user": user.id,
            "plan": plan.name,
            "timezone": snap.config.accounting.timezone,
            "day": periods.day.isoformat(),
            "limits": limits,
            # The team's limits the caller's requests must fit too (issue 21).
            "team_limits": (team or {}).get("limits"),
            "currency": currency,
            "today": daily_dict(today, currency),
            "lifetime": lifetime_dict(user, currency),
            # This calendar month's answers per model and currency, from the ledger
            # (cached and reasoning tokens are parts of the prompt and completion
            # tokens).
            "month_by_model": [group_dict("model", m) for m in models],
            # The same per named upstream (issue 23): "default" is the `[upstream]`
            # table's, and every answer recorded before upstreams had names.
            "month_by_upstream": [group_dict("upstream", u) for u in upstreams],
        }

    async def team(self, team_id: str, *, days: int = 30) -> dict[str, Any]:
        """One team for admins: its plan, limits, usage and members, with its
        members' usage summed per day over the last ``days`` days."""
        snap = self._current.snapshot
        team = await self._storage.get_team(team_id)
        if team is None:
            raise NotFound(f"No team {team_id!r}.")
        periods = self._periods(snap)
        currency = self._currency()
        report = await team_report(
            self._storage, snap.config, team, periods, currency=currency, now=self._clock.now()
        )
        start = periods.day - timedelta(days=days - 1)
        rows = await self._storage.team_daily(team_id, start=start, end=periods.day)
        filled = fill_days(rows, team_id, start, periods.day)
        report["daily"] = [daily_dict(r, currency) for r in filled]
        return report

    async def _user_team(self, snap: Snapshot, user: User) -> dict[str, Any] | None:
        """The team part of a user's detail: the team's plan, limits and usage
        (its members summed), or None when the user is in no team."""
        if user.team is None:
            return None
        team = await self._storage.get_team(user.team)
        if team is None:
            return None
        return await team_report(
            self._storage,
            snap.config,
            team,
            self._periods(snap),
            currency=self._currency(),
            members=False,
            now=self._clock.now(),
        )

    async def daily(self, user_id: str, days: int) -> list[DailyUsage]:
        """The last ``days`` local days (today included), zero-filled."""
        return await self._daily(self._current.snapshot, user_id, days)

    async def _daily(self, snap: Snapshot, user_id: str, days: int) -> list[DailyUsage]:
        end = self._periods(snap).day
        start = end - timedelta(days=days - 1)
        rows = await self._storage.daily(start, end, user_id=user_id)
        return fill_days(rows, user_id, start, end)

    async def detail(self, user_id: str, *, days: int = 30) -> dict[str, Any]:
        """Everything about one user, for admins."""
        snap = self._current.snapshot
        currency = self._currency()
        user = await self.user(user_id)
        keys = await self._storage.list_keys(user_id)
        return {
            **await self._usage(snap, user),
            "stored_plan": user.plan,
            "overrides": dict(user.overrides),
            "team": await self._user_team(snap, user),
            "created_at": user.created_at.isoformat(),
            "keys": [
                {
                    "id": k.id,
                    "name": k.name,
                    "prefix": k.prefix,
                    "created_at": k.created_at.isoformat(),
                    "revoked_at": _iso(k.revoked_at),
                }
                for k in keys
            ],
            "daily": [daily_dict(r, currency) for r in await self._daily(snap, user_id, days)],
        }
