"""The storage interface and the records it deals in.

Two backends implement `Storage`: SQLite (embedded, one machine) and PostgreSQL
(production, many replicas). `Storage` is the union of role Protocols
(`Lifecycle` with `Health`, `Directory` with `DirectoryReads`, `Accounting`,
`Outbox`, `ReportReads`, `Ownership`, `PausedForms`); components are typed with
the roles they use. Counters are exact across processes because the database
does the arithmetic: every counter changes only through an atomic, conditional
upsert, never read-modify-write in the application.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal, Protocol

from gateway.quota.limits import METERS, PERS, Limit, Meter, Per, limits_of
from gateway.quota.limits import Counters as Counters

# None: explicitly unlimited; str: an amount of money, as a decimal string.
OverrideValue = int | float | bool | str | None

# Column lists in the order the records take them; both backends' SQL uses them so
# that a row maps onto its record the same way everywhere.
USER_COLUMNS = (
    "u.id, u.plan, u.overrides, u.lifetime_prompt_tokens, u.lifetime_completion_tokens, "
    "u.lifetime_tokens, u.lifetime_cost, u.created_at, u.team_id"
)
USER_FIELDS = 9  # the columns of USER_COLUMNS, where a joined row's next table starts
TEAM_COLUMNS = "t.id, t.plan, t.overrides, t.created_at"
# Every team with its member count and its members' day rows of one day summed
# (the sums in DailyUsage's order from queries on; {cost_sum} as above).
TEAM_LIST_SELECT = (
    f"SELECT {TEAM_COLUMNS}, count(DISTINCT u.id), coalesce(sum(d.queries), 0), "
    "coalesce(sum(d.advanced_rag), 0), coalesce(sum(d.web_searches), 0), "
    "coalesce(sum(d.uploads), 0), coalesce(sum(d.upload_bytes), 0), "
    "coalesce(sum(d.prompt_tokens), 0), coalesce(sum(d.completion_tokens), 0), "
    "coalesce(sum(d.total_tokens), 0), {cost_sum} FROM teams t "
    "LEFT JOIN users u ON u.team_id = t.id "
    "LEFT JOIN usage_daily d ON d.user_id = u.id AND d.day = {p1} "
    "GROUP BY t.id, t.plan, t.overrides, t.created_at ORDER BY t.id"
)
# A team's usage: its members' day rows summed per day (DailyUsage's order, the
# team id in the user's place; the cost sum is the backend's exact decimal sum).
TEAM_DAILY_SELECT = (
    "SELECT d.day, sum(d.queries), sum(d.advanced_rag), sum(d.web_searches), "
    "sum(d.uploads), sum(d.upload_bytes), sum(d.prompt_tokens), sum(d.completion_tokens), "
    "sum(d.total_tokens), {cost_sum} FROM usage_daily d JOIN users u ON u.id = d.user_id "
    "WHERE u.team_id = {p1} AND d.day >= {p2} AND d.day <= {p3} GROUP BY d.day ORDER BY d.day"
)
DAILY_COLUMNS = (
    "user_id, day, queries, advanced_rag, web_searches, uploads, upload_bytes, "
    "prompt_tokens, completion_tokens, total_tokens, cost"
)
EVENT_COLUMNS = (
    "answer_id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens, "
    "total_tokens, cost, currency, outcome, estimated, web_searches, conversation_id, "
    "request_id, upstream_latency_ms, overhead_ms, model, cached_tokens, reasoning_tokens, "
    "cache_write_tokens, upstream"
)
USER_ROWS = "user_id = {p1}"
TEAM_ROWS = "user_id IN (SELECT id FROM users WHERE team_id = {p1})"


def usage_by_select(key: str, who: str) -> str:
    """The ledger's answers grouped by ``key`` (``model`` or ``upstream``) and
    currency, in UsageGroup's order; ``who`` picks the rows:
    one user's (USER_ROWS) or a team's current members' (TEAM_ROWS). Both backends
    fill in {cost_sum} (their exact decimal sum) and the {p1}-{p3} placeholders.
    Grouped by currency too: a sum never adds two currencies (issue 25)."""
    return (
        f"SELECT {key}, count(*), sum(prompt_tokens), sum(cached_tokens), "
        "sum(completion_tokens), sum(reasoning_tokens), sum(total_tokens), {cost_sum}, "
        f"currency FROM usage_events WHERE {who} AND day >= {{p2}} AND day <= {{p3}} "
        f"GROUP BY {key}, currency ORDER BY sum(total_tokens) DESC, {key}, currency"
    )


MODEL_USAGE_SELECT = usage_by_select("model", USER_ROWS)
UPSTREAM_USAGE_SELECT = usage_by_select("upstream", "{who}")
# The whole ledger's cost per currency (gateway/currency.py reads which currencies
# a database holds money in).
COSTS_BY_CURRENCY_SELECT = "SELECT currency, {cost_sum} FROM usage_events GROUP BY currency"
ALERT_COLUMNS = "n.user_id, n.kind, n.period, n.threshold, n.limit_value, n.used, n.created_at"
DELIVERY_COLUMNS = (
    "o.user_id, o.kind, o.period, o.threshold, o.channel, o.attempts, o.last_error, "
    "o.delivered_at, o.next_attempt_at"
)
KEY_COLUMNS = "id, user_id, name, prefix, created_at, revoked_at"
USER_SORTS: dict[str, str] = {
    "id": "u.id",
    "lifetime_tokens": "u.lifetime_tokens",
    "tokens_today": "coalesce(d.total_tokens, 0)",
}
UserSort = Literal["id", "lifetime_tokens", "tokens_today"]


@dataclass(frozen=True, slots=True)
class User:
    id: str
    plan: str
    overrides: Mapping[str, OverrideValue]
    lifetime_prompt_tokens: int
    lifetime_completion_tokens: int
    lifetime_tokens: int
    lifetime_cost: Decimal
    created_at: datetime
    # The user's team (issue 21), None when in none. Admission gets it on the user
    # record it resolves, so team-scope limits need no second read.
    team: str | None = None


@dataclass(frozen=True, slots=True)
class Team:
    """A team (issue 21): a plan and per-team overrides, as a user has; its usage
    is its members' day rows summed."""

    id: str
    plan: str
    overrides: Mapping[str, OverrideValue]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TeamSummary:
    team: Team
    members: int = 0
    today: DailyUsage = field(default_factory=lambda: DailyUsage(user_id="", day=date.min))


def team_summary(team: Team, row: Any, *, day: date, cost: Decimal) -> TeamSummary:
    """The rest of a TEAM_LIST_SELECT row (from the member count on)."""
    queries, rag, web, uploads, upload_bytes, prompt, completion, total = map(int, row[1:9])
    today = DailyUsage(
        user_id=team.id,
        day=day,
        queries=queries,
        advanced_rag=rag,
        web_searches=web,
        uploads=uploads,
        upload_bytes=upload_bytes,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cost=cost,
    )
    return TeamSummary(team, int(row[0]), today)


def team_daily(team_id: str, row: Any, cost: Decimal) -> DailyUsage:
    """A row of TEAM_DAILY_SELECT (sums may come as decimals) as the team's day."""
    return DailyUsage(
        user_id=team_id,
        day=row[0] if isinstance(row[0], date) else date.fromisoformat(row[0]),
        queries=int(row[1]),
        advanced_rag=int(row[2]),
        web_searches=int(row[3]),
        uploads=int(row[4]),
        upload_bytes=int(row[5]),
        prompt_tokens=int(row[6]),
        completion_tokens=int(row[7]),
        total_tokens=int(row[8]),
        cost=cost,
    )


# What a per-model limit's counters hold, in the order `MODEL_COUNTERS_SELECT`
# reads them (usage_models' columns).
MODEL_COUNTER_METERS: tuple[Meter, ...] = (
    "queries",
    "input_tokens",
    "output_tokens",
    "tokens",
    "cost",
)
# Per key: today's counters, then the month's ({total}: the sum of money, sum or
# dec_sum; p1: the user, p2: today, p3: the month's first day; keys: an IN list
# or ANY array).
MODEL_COUNTERS_SELECT = (
    "SELECT scope, "
    + "".join(
        f"sum(CASE WHEN day = {{p2}} THEN {column} ELSE 0 END), "
        for column in ("queries", "prompt_tokens", "completion_tokens", "total_tokens")
    )
    + "{total}(CASE WHEN day = {p2} THEN cost END), sum(queries), sum(prompt_tokens), "
    "sum(completion_tokens), sum(total_tokens), {total}(cost) FROM usage_models "
    "WHERE user_id = {p1} AND scope {keys} AND day >= {p3} AND day <= {p2} GROUP BY scope"
)


def model_counters(rows: Sequence[Sequence[Any]]) -> dict[tuple[str, Meter, Per], Decimal]:
    """`Storage.model_counters` from `MODEL_COUNTERS_SELECT`'s rows."""
    found: dict[tuple[str, Meter, Per], Decimal] = {}
    width = len(MODEL_COUNTER_METERS)
    for row in rows:
        for at, meter in enumerate(MODEL_COUNTER_METERS):
            found[(row[0], meter, "day")] = Decimal(row[1 + at] or 0)
            found[(row[0], meter, "month")] = Decimal(row[1 + width + at] or 0)
    return found


def rate_buckets(rows: Sequence[Sequence[Any]]) -> dict[tuple[Meter, Per], dict[int, Decimal]]:
    """`Storage.rate_buckets` from rows of (meter, per, bucket, amount), meter
    and per numbered 1-based as usage_rates holds them."""
    found: dict[tuple[Meter, Per], dict[int, Decimal]] = {}
    for meter, per, bucket, amount in rows:
        window = found.setdefault((METERS[int(meter) - 1], PERS[int(per) - 1]), {})
        window[int(bucket)] = window.get(int(bucket), Decimal(0)) + Decimal(amount)
    return found


def summed(rows: Sequence[DailyUsage], *, user_id: str, day: date) -> DailyUsage:
    """Day rows added up into one (``day`` names the result, e.g. the range's start)."""
    total = DailyUsage(user_id=user_id, day=day)
    for row in rows:
        total = DailyUsage(
            user_id=user_id,
            day=day,
            queries=total.queries + row.queries,
            advanced_rag=total.advanced_rag + row.advanced_rag,
            web_searches=total.web_searches + row.web_searches,
            uploads=total.uploads + row.uploads,
            upload_bytes=total.upload_bytes + row.upload_bytes,
            prompt_tokens=total.prompt_tokens + row.prompt_tokens,
            completion_tokens=total.completion_tokens + row.completion_tokens,
            total_tokens=total.total_tokens + row.total_tokens,
            cost=total.cost + row.cost,
        )
    return total


# How long a paused run's form is kept: longer than Dify lets a form wait (its
# human-input timeouts are counted in hours or days).
PAUSED_FORM_DAYS = 30


@dataclass(frozen=True, slots=True)
class PausedForm:
    """A paused run's human-input form, as the stream that paused named it (issue 20):
    submitting the form (by its token) resumes the run ``run_id`` of ``user_id``."""

    token_hash: str  # SHA-256 of the form token, hex: the token is a capability
    run_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str  # public identifier, safe to show and to revoke by
    user_id: str
    name: str
    prefix: str  # the first characters of the secret, to recognise it
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class DailyUsage:
    user_id: str
    day: date
    queries: int = 0
    advanced_rag: int = 0
    web_searches: int = 0
    uploads: int = 0
    upload_bytes: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True, init=False)
class AdmissionLimits:
    """The limits admission enforces (gateway/quota/limits.py), in checking order.

    The keyword arguments are the plan keys plans always had, for callers that
    set those only; None means unlimited."""

    limits: tuple[Limit, ...]
    # Derived from ``limits`` once (a limit set is built once per plan view and
    # read on every admission): whether any counts open streams, the team's
    # counters, money.
    counts_streams: bool
    has_team: bool
    counts_cost: bool

    def __init__(
        self,
        limits: Sequence[Limit] = (),
        *,
        queries_per_day: int | None = None,
        tokens_per_day: int | None = None,
        tokens_per_month: int | None = None,
        max_concurrent_streams: int | None = None,
        cost_per_day: Decimal | None = None,
        cost_per_month: Decimal | None = None,
    ) -> None:
        legacy = limits_of(
            {
                "queries_per_day": queries_per_day,
                "tokens_per_day": tokens_per_day,
                "tokens_per_month": tokens_per_month,
                "cost_per_day": cost_per_day,
                "cost_per_month": cost_per_month,
                "max_concurrent_streams": max_concurrent_streams,
            }
        )
        every = (*legacy, *limits)
        object.__setattr__(self, "limits", every)
        object.__setattr__(self, "counts_streams", any(x.meter == "streams" for x in every))
        object.__setattr__(self, "has_team", any(x.scope == "team" for x in every))
        object.__setattr__(self, "counts_cost", any(x.meter == "cost" for x in every))

    def with_web_search(self, web_search: WebSearch | None) -> tuple[Limit, ...]:
        """The limits with a web search's own allowance first (`WebSearch.limit`)."""
        if web_search is None or web_search.limit is None:
            return self.limits
        own = Limit("web_searches_per_day", "web_searches", "day", Decimal(web_search.limit))
        return (own, *self.limits)


@dataclass(frozen=True, slots=True)
class Lease:
    """An open answer's claim on one of the user's concurrent-stream slots.

    Released when the answer is settled or its query refunded; a lease whose
    gateway died simply expires.
    """

    id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Pending:
    """An admitted answer as admission records it, before it is forwarded.

    Written in the admission's own round trip and removed by whichever comes
    first of settle, refund or recovery; recovery charges the estimate it
    carries (the dialect's estimate for an answer never seen) when the gateway
    that admitted it died.
    """

    id: str  # the request id (a stream lease, if any, has the same id)
    endpoint: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = Decimal(0)
    currency: str = "USD"
    # The upper bound of the answer's cost admission reserved against money
    # budgets (gateway/quota/limits.py): settle, refund and recovery release it.
    reserved_cost: Decimal = Decimal(0)
    # The upstream the answer was sent to (issue 23): a recovery records it.
    upstream: str = "default"


@dataclass(frozen=True, slots=True)
class WebSearch:
    """A request that asks for web search, as admission reserves it.

    Admission reserves one web search on the user's day counter in the same
    atomic step as the query, while ``limit`` allows it (None: unlimited). With
    none left, ``when_exhausted`` decides in that same step: ``refuse`` refuses
    the request (``web_searches_per_day``, nothing reserved), ``disable`` admits
    it without a web search reserved (the caller turns web search off). The
    reservation is kept on the answer's pending row: settle replaces it with
    the count the answer used, a refund gives it back, a recovery keeps it.
    """

    limit: int | None
    when_exhausted: Literal["refuse", "disable"] = "refuse"


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    refused_by: str | None  # the name of the limit that refused
    counters: Counters  # after the reservation when admitted
    web_search_reserved: bool = False  # one web search was reserved for the answer
    refused: Limit | None = None  # the limit that refused
    # A refusal by a rate limit: whole seconds until the request would fit.
    retry_after: int | None = None


def admission(
    limits: Sequence[Limit],
    refused: int | None,
    counters: Counters,
    web_searches: int,
    *,
    retry_after: int | None = None,
) -> Admission:
    """The Admission for a decision over ``limits`` (``refused``: an index)."""
    if refused is None:
        return Admission(True, None, counters, web_search_reserved=web_searches > 0)
    return Admission(
        False, limits[refused].name, counters, refused=limits[refused], retry_after=retry_after
    )


# The longest upstream id (an answer's, a Dify conversation's) kept as it is.
# PostgreSQL refuses a b-tree index entry over about 2,700 bytes, and both ids
# are indexed (usage_events' answer_id and (user_id, conversation_id);
# conversation_features' key): an upstream's id longer than that, buggy or
# hostile, failed every write of it, and with it its group-commit batch and the
# spool's replay (review-rec REC-2). Real ids are far shorter (a UUID, OpenAI's
# ``resp_...`` of about 50 characters).
MAX_ID_CHARS = 256
_ID_DIGEST_CHARS = 64  # a SHA-256 in hex


def stored_id(value: str) -> str:
    """An upstream's id as the database keeps it: itself when it is at most
    `MAX_ID_CHARS` characters long (every real one), else a prefix of it, ``~``
    and the SHA-256 of the whole, `MAX_ID_CHARS` characters in all. Distinct
    ids stay distinct and one id maps the same way every time, on either
    backend: a retry or a replay of a record finds the row it wrote, and a
    lookup by the id the upstream gave (`Ownership.answer_owner`, a
    conversation's) finds the row recorded under it. Recording bounds the ids
    with it (gateway/usage_bounds.py), and the lookups apply it in turn."""
    if len(value) <= MAX_ID_CHARS:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{value[: MAX_ID_CHARS - _ID_DIGEST_CHARS - 1]}~{digest}"


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One settled answer: a row of the ledger."""

    # The upstream's message id or workflow run id; unique: one that another
    # request's answer holds is recorded as "<id>#<request id>" (`Accounting.settle`).
    answer_id: str
    user_id: str
    day: date
    created_at: datetime
    endpoint: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = Decimal(0)
    currency: str = "USD"
    outcome: str = "complete"
    estimated: bool = False
    web_searches: int = 0
    conversation_id: str | None = None
    request_id: str | None = None
    upstream_latency_ms: float | None = None
    overhead_ms: float | None = None
    model: str | None = None  # the model that answered, when the upstream names it
    cached_tokens: int = 0  # of prompt_tokens, read from the provider's prompt cache
    reasoning_tokens: int = 0  # of completion_tokens, spent reasoning
    cache_write_tokens: int = 0  # of prompt_tokens, written to the provider's prompt cache
    # The named upstream that answered (issue 23; "default": the `[upstream]` table).
    upstream: str = "default"


@dataclass(frozen=True, slots=True)
class AnswerOwner:
    """Whose ledger row an answer id is, and which named upstream gave it (where
    the object the answer created is kept: issue 23)."""

    user_id: str
    upstream: str = "default"
    # When the answer was given (its ledger row's): the plan's history window
    # holds reads of it (review-limits F3). None where a caller has no row's.
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ConversationFeatures:
    """What a Dify conversation's first message asked for, which Dify runs again
    on every later message of it (it answers them with the conversation's first
    inputs: review-limits F5)."""

    advanced_rag: bool = False
    web_search: bool = False
    # Its first inputs turned the web off (the `disable` rewrite's value): Dify
    # never searches in it, whatever later messages say (review-conv2 F1).
    web_off: bool = False

    def __bool__(self) -> bool:
        return self.advanced_rag or self.web_search or self.web_off


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """Answers of one model, or of one named upstream (issue 23), over a range of
    days, from the ledger: a user's, or a team's members'."""

    # The model (None: answers whose upstream names no model, Dify's), or the
    # upstream ("default": the `[upstream]` table, and every answer before issue 23).
    key: str | None
    answers: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = Decimal(0)
    currency: str = "USD"  # of ``cost``: a group's answers in two currencies are two rows


def usage_group(row: Any, cost: Decimal) -> UsageGroup:
    """A row of a usage_by_select query (sums may come as decimals) as a UsageGroup."""
    return UsageGroup(
        key=row[0],
        answers=int(row[1]),
        prompt_tokens=int(row[2]),
        cached_tokens=int(row[3]),
        completion_tokens=int(row[4]),
        reasoning_tokens=int(row[5]),
        total_tokens=int(row[6]),
        cost=cost,
        currency=row[8],
    )


@dataclass(frozen=True, slots=True)
class UserSummary:
    user: User
    today: DailyUsage = field(default_factory=lambda: DailyUsage(user_id="", day=date.min))


# A threshold alert watches a limit by its name (issue 21: any limit per day or
# month - money budgets, [[plans.NAME.limits]] entries, per-model ones, the
# team's - not only these four, which both backends compare with the user's
# day rows directly; the others carry an `alert_spec`).
AlertLimit = str
ALERT_LIMITS: tuple[AlertLimit, ...] = (
    "queries_per_day",
    "tokens_per_day",
    "tokens_per_month",
    "web_searches_per_day",
)


def alert_spec(limit: Limit) -> str:
    """What a limit counts, as an alert check carries it to the database:
    ``meter:per:scope:key``, meter and window numbered 1-based as quota.METERS
    and quota.PERS, scope 1 the user and 2 the team, key the per-model
    counters' (empty for none)."""
    return (
        f"{METERS.index(limit.meter) + 1}:{PERS.index(limit.per) + 1}:"
        f"{2 if limit.scope == 'team' else 1}:{limit.counter_key or ''}"
    )


def parse_alert_spec(spec: str) -> tuple[Meter, Per, str, str | None]:
    """(meter, per, scope, key) of an `alert_spec`."""
    meter, per, scope, key = spec.split(":", 3)
    return (
        METERS[int(meter) - 1],
        PERS[int(per) - 1],
        "team" if scope == "2" else "user",
        key or None,
    )


@dataclass(frozen=True, slots=True)
class AlertCheck:
    """One limit of a user's plan (or team's) and the percentages of it that
    are announced."""

    limit: AlertLimit
    period: str  # the day (2026-12-02) or month (2026-12) the usage counts in
    value: int | Decimal  # the limit itself, > 0 (money: a Decimal)
    thresholds: tuple[int, ...]
    # What the limit counts (`alert_spec`); None for the ALERT_LIMITS.
    spec: str | None = None


@dataclass(frozen=True, slots=True)
class AlertRequest:
    """What a settle checks for threshold crossings, in its own transaction."""

    checks: tuple[AlertCheck, ...]
    month_start: date
    channels: tuple[str, ...]  # one outbox row per crossing and channel


@dataclass(frozen=True, slots=True)
class Crossing:
    """A threshold a settle found crossed for the first time (announced once)."""

    user_id: str
    limit: AlertLimit
    period: str
    threshold: int
    value: int | Decimal  # money: a Decimal
    used: int | Decimal


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One delivery of one crossing on one channel, claimed by a worker."""

    id: int
    channel: str
    crossing: Crossing
    created_at: datetime
    attempts: int


@dataclass(frozen=True, slots=True)
class Delivery:
    channel: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class Alert:
    """A crossing as recorded (the notifications table) and how its deliveries went."""

    crossing: Crossing
    created_at: datetime
    deliveries: tuple[Delivery, ...]


def delivery(
    channel: str,
    attempts: int,
    last_error: str | None,
    delivered_at: datetime | None,
    next_attempt_at: object,
) -> Delivery:
    status: Literal["pending", "delivered", "failed"] = (
        "delivered" if delivered_at is not None else "pending" if next_attempt_at else "failed"
    )
    return Delivery(channel, status, attempts, last_error, delivered_at)


def alerts_with_deliveries(
    crossings: list[tuple[Crossing, datetime]],
    deliveries: Sequence[tuple[tuple[str, str, str, int], Delivery]],
) -> list[Alert]:
    by_key: dict[tuple[str, str, str, int], list[Delivery]] = {}
    for key, found in deliveries:
        by_key.setdefault(key, []).append(found)
    return [
        Alert(c, created_at, tuple(by_key.get((c.user_id, c.limit, c.period, c.threshold), ())))
        for c, created_at in crossings
    ]


def crossed(used: int | Decimal, check: AlertCheck, threshold: int) -> bool:
    """Exact arithmetic (integers, or decimals for money): used/value >= threshold%."""
    return used * 100 >= check.value * threshold


class Health(Protocol):
    """Whether the database answers (/readyz; the settler, before a spool replay),
    and what its clock says."""

    async def ping(self) -> None:
        """Raise `StorageError` unless the database answers."""
        ...

    async def database_time(self) -> datetime | None:
        """The database's clock now (PostgreSQL: ``clock_timestamp()``), for
        gateway/skew.py to measure this machine's clock against; None where the
        database is a file on this machine (SQLite: its clock is this one's)."""
        ...


class Lifecycle(Health, Protocol):
    """The database itself: its schema and its connections (and its health)."""

    async def migrate(self) -> int:
        """Apply pending migrations; returns how many ran. Safe to run concurrently."""
        ...

    async def close(self) -> None: ...


class DirectoryReads(Protocol):
    """Who exists, read: users, teams and API keys, with their plans, overrides
    and teams."""

    async def get_user(self, user_id: str) -> User | None: ...

    async def get_team(self, team_id: str) -> Team | None: ...

    async def team_members(self, team_id: str) -> list[User]:
        """The team's users, ordered by id."""
        ...

    async def find_key(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not."""
        ...

    async def list_keys(self, user_id: str) -> list[ApiKey]: ...


class Directory(DirectoryReads, Protocol):
    """Who exists, read and changed: the admin operations (`accounts.Accounts`,
    which also tell the caches) and the user directory, which adds a user on
    first sight (gateway/auth.py)."""

    async def ensure_user(self, user_id: str, *, plan: str) -> User:
        """The user, created with ``plan`` if new."""
        ...

    async def set_plan(self, user_id: str, plan: str) -> None:
        """Raises `NotFound` for an unknown user."""
        ...

    async def set_override(self, user_id: str, name: str, value: OverrideValue) -> None: ...

    async def clear_override(self, user_id: str, name: str) -> None: ...

    async def create_team(self, team_id: str, *, plan: str, now: datetime) -> Team:
        """Raises `Conflict` when a team of that id exists."""
        ...

    async def set_team_plan(self, team_id: str, plan: str) -> None:
        """Raises `NotFound` for an unknown team."""
        ...

    async def set_team_override(self, team_id: str, name: str, value: OverrideValue) -> None:
        """Raises `NotFound` for an unknown team."""
        ...

    async def clear_team_override(self, team_id: str, name: str) -> None: ...

    async def set_team(self, user_id: str, team_id: str | None) -> None:
        """Put the user in the team (None: in none). Raises `NotFound` for an
        unknown user or team."""
        ...

    async def create_key(
        self, user_id: str, *, key_id: str, key_hash: str, prefix: str, name: str, now: datetime
    ) -> ApiKey: ...

    async def revoke_key(self, key_id: str, *, now: datetime) -> ApiKey:
        """Raises `NotFound` for an unknown key id; revoking twice keeps the first time."""
        ...


class Accounting(Protocol):
    """The request path's counters: admission reserves, settle records, refund
    gives back, recovery charges what a dead gateway left pending."""

    async def admit(
        self,
        user_id: str,
        *,
        day: date,
        month_start: date,
        limits: AdmissionLimits,
        now: datetime,
        lease: Lease | None = None,
        advanced_rag: bool = False,
        pending: Pending | None = None,
        web_search: WebSearch | None = None,
        team: str | None = None,
    ) -> Admission:
        """Reserve one query for (user, day) only while every limit allows it,
        atomically, in one round trip; return the counters either way. When
        admitted and ``lease`` is given, the lease is taken in the same step
        (open streams are counted only when ``limits.max_concurrent_streams`` is
        set; leases expired at ``now`` do not count); ``advanced_rag`` counts the
        query as an advanced-RAG one too; ``pending`` is recorded (created at
        ``now``, on ``day``) in the same step. ``web_search`` (the request asks
        for it) reserves one web search in the same step, or refuses, or admits
        without one (see `WebSearch`); the reservation is kept on ``pending``,
        so a request asking for web search should come with one. ``team``: the
        user's team, whose members' counters the team-scope limits count (the
        team's row is locked first, so the team's admissions are one at a time)."""
        ...

    async def rate_counts(self, user_id: str, *, now: datetime) -> dict[tuple[Meter, Per], Decimal]:
        """What each of the user's rate windows counts at ``now`` (the windows
        admission has counted the user in; gateway/quota/limits.py, "rates")."""
        ...

    async def reserve_upload(
        self,
        user_id: str,
        *,
        key: str,
        day: date,
        month_start: date,
        size: int,
        limits: Sequence[Limit] = (),
        team: str | None = None,
    ) -> Admission:
        """Count one upload of ``size`` bytes on the user's day only while every
        one of ``limits`` (uploads and upload bytes per day or month: the
        user's, and with ``team`` the team's, whose row is locked first as
        `admit` locks it) allows it, atomically, in one round trip; return the
        counters of ``limits`` either way (after the upload when admitted). With
        no limits the upload is counted, unconditionally. An admitted upload
        stays counted (it is the upload's record) unless `release_upload` gives
        it back; one reserved under ``limits`` whose caller was cancelled while
        the call was in flight is given back.

        Keyed by ``key`` (the request's id): an upload counted under it already
        is admitted without a check and counted once; only its bytes become
        ``size`` (on the day it was counted). So a count after a call whose
        outcome was lost, or of the bytes of a file reserved by its count
        alone, is exact."""
        ...

    async def release_upload(self, user_id: str, *, key: str) -> None:
        """Give back the upload `reserve_upload` counted under ``key`` (the
        upstream refused it, or never got it), if it is still counted: a second
        call, or one for an upload never counted, does nothing."""
        ...

    async def refund(
        self,
        user_id: str,
        *,
        day: date,
        lease_id: str | None = None,
        pending_id: str | None = None,
    ) -> bool:
        """Give back one reserved query (no answer was produced) and its lease.

        With ``pending_id``, only while that pending answer is still there (it is
        removed, and the web search reserved with it given back too): returns
        False, releasing the lease and nothing else, when it was already
        settled, refunded or recovered."""
        ...

    async def move_pending(self, pending_id: str, *, upstream: str) -> bool:
        """The named upstream a pending answer is now sent to (a fallback took
        it, issue 23): a recovery charges its estimate there. False, changing
        nothing, when the pending answer is no longer there (settled, refunded
        or recovered)."""
        ...

    async def settle(
        self,
        event: UsageEvent,
        *,
        lease_id: str | None = None,
        pending_id: str | None = None,
        alerts: AlertRequest | None = None,
    ) -> bool:
        """Record one answer in the ledger, the day row and the lifetime totals,
        in one transaction, releasing its lease. Returns False, changing nothing
        else, when this request's answer is already recorded (a row under its id,
        or one derived from it below, with the same ``request_id``: a retried
        write, a replayed spool line) - or, with ``pending_id``, when that
        pending answer is no longer there (settled or refunded already); it is
        removed otherwise, and the web search admission reserved with it is
        replaced by the count the answer used (``web_searches``).

        An answer id the ledger holds for another request's answer (an upstream
        repeating ids, review-once F1) is a new answer: recorded, and charged,
        under ``<id>#<request id>`` (that too taken by another request's: with
        ``#<request id>`` added again, and so on). The row of the id itself
        stays the first answer's (`answer_owner`). An event with no
        ``request_id`` cannot be told from another request's: its id taken, it
        is a duplicate.

        With ``pending_id`` whose pending answer a recovery charged as an
        estimate (the ledger row ``gw-<pending id>``, outcome "recovered"), the
        answer supersedes the estimate, once: that ledger row takes this
        answer's id (as above: ``<id>#<request id>`` when another request's
        answer holds it) and figures, and the day row and lifetime totals move by
        the difference. Returns True then; a second settle finds no estimate
        left and changes nothing.

        With ``alerts``, the same transaction records each threshold now crossed
        for the first time in the notifications table (unique per user, limit,
        period and threshold: once, also across replicas) and queues one outbox
        row per channel for it."""
        ...

    async def recover(self, *, before: datetime, now: datetime, limit: int = 100) -> list[str]:
        """Charge up to ``limit`` pending answers admitted before ``before`` as
        estimates (outcome "recovered", answer id ``gw-<pending id>`` - as in
        `settle` when another request's answer holds it -, request id the
        pending id, recorded at ``now``), releasing their leases; their
        queries, and any web search reserved, stay spent. Returns the
        pending ids recovered. Safe to run from many processes at once: each
        pending answer is recovered by one of them, or settled by its gateway.
        PostgreSQL also takes only answers older than ``now - before`` by the
        database's own clock, so that a caller whose clock is ahead does not
        charge live ones (gateway/recovery.py)."""
        ...


class Outbox(Protocol):
    """The alerts' outbox: delivery rows claimed, delivered, failed (gateway/alerts.py)."""

    async def claim_outbox(
        self, *, now: datetime, claim_until: datetime, limit: int = 20
    ) -> list[OutboxItem]:
        """Due, undelivered outbox rows not claimed by another worker, now claimed
        until ``claim_until`` (rows another replica is claiming are skipped)."""
        ...

    async def outbox_delivered(self, item_id: int, *, now: datetime) -> None: ...

    async def outbox_failed(self, item_id: int, *, error: str, retry_at: datetime | None) -> None:
        """Count a failed attempt; retry at ``retry_at``, or never again if None."""
        ...


class ReportReads(Protocol):
    """Reads for reports, exports and the admin views: the ledger, the day rows,
    the listings with their usage, what the limits' counters hold, the alerts."""

    async def list_users(
        self,
        *,
        day: date,
        plan: str | None = None,
        search: str | None = None,
        sort: UserSort = "id",
        descending: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> list[UserSummary]: ...

    async def count_users(self, *, plan: str | None = None, search: str | None = None) -> int: ...

    async def list_teams(self, *, day: date) -> list[TeamSummary]:
        """Every team with its member count and its members' usage on ``day``
        summed, ordered by id."""
        ...

    async def team_daily(self, team_id: str, *, start: date, end: date) -> list[DailyUsage]:
        """The team's current members' day rows with start <= day <= end, summed
        per day (``user_id`` is the team id), ordered by day."""
        ...

    async def user_teams(self) -> dict[str, str]:
        """User id -> team id, for every user in a team (exports)."""
        ...

    async def open_streams(self, user_id: str, *, now: datetime) -> int:
        """The user's stream leases not yet expired at ``now``."""
        ...

    async def rate_buckets(
        self, user_ids: Sequence[str]
    ) -> dict[tuple[Meter, Per], dict[int, Decimal]]:
        """The rate buckets of these users (a team's members), summed per rate
        window and bucket, in one read: what the usage views show of the rates
        (`quota.rate_used`) and when their oldest counted bucket leaves. Buckets
        past their window may be among them."""
        ...

    async def model_counters(
        self, user_id: str, keys: Sequence[str], *, day: date, month_start: date
    ) -> dict[tuple[str, Meter, Per], Decimal]:
        """What the user's per-model limits' own counters (usage_models, their
        `Limit.counter_key` ``keys``) hold today and this month, in one read:
        (key, meter, "day" or "month") for each of MODEL_METERS; cost is what was
        spent (what answers under way reserved is not)."""
        ...

    async def list_alerts(self, *, user_id: str | None = None, limit: int = 100) -> list[Alert]:
        """Recorded crossings, newest first, with their deliveries."""
        ...

    async def daily(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> list[DailyUsage]:
        """Day rows with start <= day <= end, ordered by day then user."""
        ...

    def events(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> AsyncIterator[UsageEvent]:
        """Ledger rows with start <= day <= end in settle order, streamed in batches."""
        ...

    def iter_daily(
        self, start: date, end: date, *, user_id: str | None = None
    ) -> AsyncIterator[DailyUsage]:
        """Like `daily`, streamed in batches (for exports of any size)."""
        ...

    async def count_events(self, start: date, end: date, *, user_id: str | None = None) -> int: ...

    async def usage_by_model(self, user_id: str, *, start: date, end: date) -> list[UsageGroup]:
        """The user's ledger with start <= day <= end summed per model and
        currency, the model with the most tokens first."""
        ...

    async def usage_by_upstream(self, user_id: str, *, start: date, end: date) -> list[UsageGroup]:
        """The user's ledger with start <= day <= end summed per named upstream
        and currency (issue 23), the upstream with the most tokens first."""
        ...

    async def team_usage_by_upstream(
        self, team_id: str, *, start: date, end: date
    ) -> list[UsageGroup]:
        """`usage_by_upstream` over the team's current members' ledger rows (as
        `team_daily` sums its current members' day rows)."""
        ...

    async def costs_by_currency(self) -> dict[str, Decimal]:
        """The whole ledger's cost summed per currency (a currency whose rows cost
        nothing has a zero sum). Reads every ledger row: for start-up and reloads."""
        ...


class Ownership(Protocol):
    """Who an answer, a conversation or an upload belongs to, read before a
    request may touch what it made (issue 20, default deny; issue 23,
    upstreams; review F9, Dify's uploads)."""

    async def answer_owner(self, answer_id: str) -> AnswerOwner | None:
        """The user whose ledger row has this answer id (an upstream object id such as
        OpenAI's ``resp_...``) and the upstream that gave it, or None when the
        ledger has no such answer. The row of the id is its first answer's: one
        the upstream gave another request later under the same id is kept under
        ``<id>#<request id>`` (`settle`), and does not make its user the owner. Read before a caller may see or change the
        object the answer created (and to send the request where it is kept).
        An id too long to index is looked up as it was recorded (`stored_id`)."""
        ...

    async def conversation_upstream(self, user_id: str, conversation_id: str) -> str | None:
        """The upstream that answered the first recorded message of this user's
        conversation (a Dify conversation lives in the app that made it), or None
        when the ledger has none."""
        ...

    async def remember_conversation(
        self,
        user_id: str,
        conversation_id: str,
        features: ConversationFeatures,
        *,
        upstream: str,
        now: datetime,
    ) -> None:
        """Keep what this user's new conversation asked for (`ConversationFeatures`),
        before the client can name the conversation. The first record of a
        conversation wins; nothing is kept for a user who is not there (a user's
        deletion forgets the user's conversations: PostgreSQL 0030, SQLite 0023)."""
        ...

    async def conversation_features(
        self, user_id: str, conversation_id: str
    ) -> ConversationFeatures | None:
        """What this user's conversation asked for when it began, as kept by
        `remember_conversation`, or None when nothing was kept for it."""
        ...

    async def remember_upload(
        self, upload_id: str, *, user_id: str, upstream: str, now: datetime
    ) -> None:
        """Keep whose an upload is: a file the upstream accepted from ``user_id``
        under ``upload_id`` (review F9: Dify lets any answer of the workspace
        attach a file by its id). The first record of an id wins. Nothing is
        kept for a user who is not there (deleted while the upload was under
        way): a user's deletion forgets the user's uploads (PostgreSQL 0029,
        SQLite 0022), and one made again under the same id is somebody new."""
        ...

    async def upload_owners(self, upload_ids: Collection[str]) -> dict[str, str]:
        """The user each of these upload ids was kept for (`remember_upload`),
        by id; an id kept for nobody is left out. One query however many ids."""
        ...


class PausedForms(Protocol):
    """Paused runs' forms kept for their resumes (issue 20, gateway/follow.py)."""

    async def remember_forms(self, forms: Sequence[PausedForm], *, now: datetime) -> None:
        """Keep paused runs' forms (the first record of a token wins), and forget
        those kept more than ``PAUSED_FORM_DAYS`` days before ``now``."""
        ...

    async def paused_form(self, token_hash: str) -> PausedForm | None:
        """The form kept under this token hash, or None."""
        ...


class Storage(
    Lifecycle, Directory, Accounting, Outbox, ReportReads, Ownership, PausedForms, Protocol
):
    """What the gateway needs from a database: every role above, which each
    backend implements in one class. All methods are safe to call concurrently
    from many tasks and from many processes sharing the database.

    A component is given only the roles it uses, so that it cannot reach past
    them (issue 22): settling and recovery `Accounting`, the admin operations
    `Directory`, authentication `DirectoryReads`, the alerts worker `Outbox`,
    reports and exports `ReportReads`, the route guard `Ownership`, resumed
    runs `PausedForms`; one that needs several names them in a Protocol of its
    own (`proxy.ProxyStorage`, `admission.AdmissionStorage`, ...). The whole is
    for what opens and closes the database: gateway/runtime.py and the CLI."""
