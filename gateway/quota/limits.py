"""Limits as data (issue 21): the one definition of what a limit is, which
limits apply to a request, what admission reserves and when a limit refuses.

Pure logic, no I/O. A limit is a *meter* counted over a *window* with a
*maximum*: ``queries`` per ``day``, ``tokens`` per ``month``, ``cost`` per
``day``, ``streams`` ``open`` at once. Both storage backends hold the counters
and apply `refuses` to them in their one atomic admission step (SQLite in
Python through this module; PostgreSQL in gateway_admit, by gateway_decide,
whose rule is this module's). tests/quota/test_limits.py tests the rule with
tables of cases; tests/storage/test_quota_model.py drives both backends
against a model of it.

Every plan key that sets a limit (``queries_per_day``, ``tokens_per_month``,
``cost_per_day``, ...) is one `Limit` here (`LEGACY_LIMITS`).

Two kinds of meter:

- *reserved* meters (queries, web searches, advanced-RAG queries, uploads,
  upload bytes, streams) are known before the answer: admission adds the
  request's amount and refuses when that would go past the maximum. A request
  that adds nothing to such a meter (a request not asking for web search, an
  answer for the upload meters) is not held by it. An upload is reserved in a
  step of its own (`upload_charge`), once its file's size is known.
- *measured* meters (tokens, input and output tokens, cost) are known when the
  answer ends: a limit on one refuses once the counter has reached the maximum;
  admission may also reserve an upper bound of what the answer can add (cost:
  docs/quotas.md, "Money budgets"), and then refuses when used plus that bound
  would go past it. Settle replaces the bound with the true amount.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from gateway.pricing import snapshot_base

Meter = Literal[
    "queries",
    "advanced_rag",
    "web_searches",
    "uploads",
    "upload_bytes",
    "input_tokens",
    "output_tokens",
    "tokens",
    "cost",
    "streams",
]
Per = Literal["day", "month", "open", "minute", "hour"]
LimitScope = Literal["user", "team"]

# The meters a day row counts, in the order of the usage_daily columns both
# backends read them from (the order is the storage's: PL/pgSQL indexes its
# arrays with it, 1-based).
DAY_METERS: tuple[Meter, ...] = (
    "queries",
    "advanced_rag",
    "web_searches",
    "uploads",
    "upload_bytes",
    "input_tokens",
    "output_tokens",
    "tokens",
    "cost",
)
METERS: tuple[Meter, ...] = (*DAY_METERS, "streams")
PERS: tuple[Per, ...] = ("day", "month", "open", "minute", "hour")
MEASURED: frozenset[Meter] = frozenset({"input_tokens", "output_tokens", "tokens", "cost"})

# Rates: windows that slide. A rate window of W seconds is counted in buckets of
# W / RATE_BUCKETS seconds; admission counts the current bucket and the
# RATE_BUCKETS before it, a span of at least W, so no span of W seconds ever
# holds more than the maximum (a burst at a window's edge cannot double it).
# The price is caution: what a bucket counted is held until the whole bucket
# has left the span, up to one bucket (5 s a minute, 5 minutes an hour) longer
# than strictly needed. Rates count queries (at admission) and tokens (when
# the answer is settled).
RATE_SECONDS: dict[Per, int] = {"minute": 60, "hour": 3600}
RATE_BUCKETS = 12
RATE_METERS: frozenset[Meter] = frozenset({"queries", "tokens"})
# What a per-model limit can count (its counters hold these).
MODEL_METERS: frozenset[Meter] = frozenset(
    {"queries", "input_tokens", "output_tokens", "tokens", "cost"}
)


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit: no more than ``max`` of ``meter`` per ``per``.

    ``name`` is what refusals and headers call it (the plan key for the keys
    plans always had, e.g. ``queries_per_day``)."""

    name: str
    meter: Meter
    per: Per
    max: Decimal
    # "team": counted over every member of the user's team, which the request
    # must fit too, in the same atomic step (a team's rate sums its members'
    # rate buckets: each member's admission counts in them).
    scope: LimitScope = "user"
    # Globs ("gpt-4.1*"): the limit applies to requests for a matching model and
    # counts only what such requests used (its own counters, `counter_key`).
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.models and (
            self.meter not in MODEL_METERS
            or self.per not in ("day", "month")
            or self.scope != "user"
        ):
            raise ValueError(
                f"{self.name}: a limit for some models counts queries, tokens or cost "
                "of the user per day or month"
            )
        if (self.meter == "streams") != (self.per == "open"):
            raise ValueError(f"{self.name}: streams are counted open at once, nothing else is")
        if self.per in RATE_SECONDS and self.meter not in RATE_METERS:
            raise ValueError(f"{self.name}: only queries and tokens have per-{self.per} rates")

    @property
    def is_rate(self) -> bool:
        return self.per in RATE_SECONDS

    @property
    def counter_key(self) -> str | None:
        """The key of a per-model limit's own counters (None: the user's)."""
        return "m:" + ",".join(sorted(set(self.models))) if self.models else None

    def applies_to(self, models: Iterable[str | None] | None) -> bool:
        """Whether the limit holds a request naming ``models`` (None: the
        dialect names none, as Dify: a per-model limit does not apply)."""
        if not self.models:
            return True
        return any(
            name is not None and fnmatch.fnmatchcase(name, glob)
            for model in models or ()
            if model is not None
            # A dated snapshot is its model's, as the price table prices it: a
            # limit on "gpt-4o" holds "gpt-4o-2024-08-06" (review-limits F6).
            for name in (model, snapshot_base(model))
            for glob in self.models
        )


# The plan keys that set a limit, and the limit each is: the order is the order
# admission checks them in (the first that refuses is the one reported).
LEGACY_LIMITS: dict[str, tuple[Meter, Per]] = {
    "web_searches_per_day": ("web_searches", "day"),
    "queries_per_day": ("queries", "day"),
    "requests_per_minute": ("queries", "minute"),
    "tokens_per_day": ("tokens", "day"),
    "tokens_per_month": ("tokens", "month"),
    "tokens_per_minute": ("tokens", "minute"),
    "cost_per_day": ("cost", "day"),
    "cost_per_month": ("cost", "month"),
    "max_concurrent_streams": ("streams", "open"),
}


def limits_of(values: Mapping[str, int | Decimal | float | None]) -> tuple[Limit, ...]:
    """The limits a plan's keys set (None or absent: unlimited), in checking order."""
    found = []
    for name, (meter, per) in LEGACY_LIMITS.items():
        value = values.get(name)
        if value is not None:
            found.append(Limit(name, meter, per, Decimal(value)))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Charge:
    """What admission adds to the counters for one request (before settle)."""

    queries: int = 1
    advanced_rag: int = 0
    web_searches: int = 0
    cost: Decimal = Decimal(0)  # an upper bound of the answer's cost (settle corrects it)
    streams: int = 0  # 1: the request takes a stream slot
    # An upload (`upload_charge`): one upload and its file's bytes, no query.
    uploads: int = 0
    upload_bytes: int = 0

    def amount(self, meter: Meter) -> Decimal:
        if meter == "queries":
            return Decimal(self.queries)
        if meter == "advanced_rag":
            return Decimal(self.advanced_rag)
        if meter == "web_searches":
            return Decimal(self.web_searches)
        if meter == "uploads":
            return Decimal(self.uploads)
        if meter == "upload_bytes":
            return Decimal(self.upload_bytes)
        if meter == "cost":
            return self.cost
        if meter == "streams":
            return Decimal(self.streams)
        return Decimal(0)


# What an upload counts: its limits hold uploads only (an answer adds nothing to
# them), and are checked and reserved when the upload is asked.
UPLOAD_METERS: frozenset[Meter] = frozenset({"uploads", "upload_bytes"})


def upload_charge(size: int) -> Charge:
    """What an upload of a file of ``size`` bytes adds to the counters."""
    return Charge(queries=0, uploads=1, upload_bytes=size)


@dataclass(frozen=True, slots=True)
class Counters:
    """What the counters held at admission, per (meter, window): after the
    request's charge when it was admitted, before it when refused."""

    used: Mapping[tuple[Meter, Per], Decimal] = field(default_factory=dict)
    team: Mapping[tuple[Meter, Per], Decimal] = field(default_factory=dict)  # the team's
    # Per-model limits' own counters: (counter key, meter, window) -> used.
    models: Mapping[tuple[str, Meter, Per], Decimal] = field(default_factory=dict)

    def of(self, meter: Meter, per: Per, scope: LimitScope = "user") -> Decimal:
        counted = self.team if scope == "team" else self.used
        return counted.get((meter, per), Decimal(0))

    def of_limit(self, limit: Limit) -> Decimal:
        """What ``limit`` counts."""
        key = limit.counter_key
        if key is not None:
            return self.models.get((key, limit.meter, limit.per), Decimal(0))
        return self.of(limit.meter, limit.per, limit.scope)

    # The counters plans always had, by their old names.
    @property
    def queries_today(self) -> int:
        return int(self.of("queries", "day"))

    @property
    def tokens_today(self) -> int:
        return int(self.of("tokens", "day"))

    @property
    def tokens_month(self) -> int:
        return int(self.of("tokens", "month"))

    @property
    def web_searches_today(self) -> int:
        return int(self.of("web_searches", "day"))

    @property
    def open_streams(self) -> int:
        return int(self.of("streams", "open"))


def counters_from(
    day: Sequence[Decimal | int],
    month: Sequence[Decimal | int] | None,
    streams: int,
    rates: Mapping[tuple[Meter, Per], Decimal] | None = None,
    *,
    team: Counters | None = None,
    models: Mapping[tuple[str, Meter, Per], Decimal] | None = None,
) -> Counters:
    """Counters from the storage's vectors (day and month sums in DAY_METERS
    order; the month is None when no monthly limit asked for it) and what the
    rate windows counted."""
    used: dict[tuple[Meter, Per], Decimal] = {}
    for at, meter in enumerate(DAY_METERS):
        used[(meter, "day")] = Decimal(day[at])
        if month is not None:
            used[(meter, "month")] = Decimal(month[at])
    used[("streams", "open")] = Decimal(streams)
    if rates:
        used.update(rates)
    return Counters(used, team.used if team is not None else {}, models or {})


# --- rates -------------------------------------------------------------------

# What an answer's pending row remembers of the rates it counts in (a bit mask):
# refund takes its query out of the query rates, settle adds its tokens to the
# token rates.
RATE_BITS: dict[tuple[Meter, Per], int] = {
    ("queries", "minute"): 1,
    ("queries", "hour"): 2,
    ("tokens", "minute"): 4,
    ("tokens", "hour"): 8,
}


def rate_bits(limits: Sequence[Limit]) -> int:
    bits = 0
    for limit in limits:
        bits |= RATE_BITS.get((limit.meter, limit.per), 0)
    return bits


def bucket_seconds(per: Per) -> int:
    return RATE_SECONDS[per] // RATE_BUCKETS


def bucket_of(per: Per, epoch: float) -> int:
    """The bucket of a rate window that a moment (Unix seconds) falls in."""
    return math.floor(epoch / bucket_seconds(per))


def first_counted(per: Per, epoch: float) -> int:
    """The oldest bucket admission counts at ``epoch``."""
    return bucket_of(per, epoch) - RATE_BUCKETS


def rate_used(buckets: Mapping[int, Decimal], per: Per, epoch: float) -> Decimal:
    """What a rate window counts at ``epoch``, from its buckets' amounts."""
    first = first_counted(per, epoch)
    return sum((amount for bucket, amount in buckets.items() if bucket >= first), Decimal(0))


def rate_retry(buckets: Mapping[int, Decimal], limit: Limit, amount: Decimal, epoch: float) -> int:
    """Whole seconds (at least 1) until a request adding ``amount``, refused by
    the rate ``limit``, would fit: until enough of the oldest counted buckets
    have left the window. A request that can never fit waits the whole window."""
    first = first_counted(limit.per, epoch)
    counted = sorted((b, a) for b, a in buckets.items() if b >= first)
    used = sum((a for _, a in counted), Decimal(0))
    width = bucket_seconds(limit.per)
    for bucket, bucket_amount in counted:
        used -= bucket_amount
        if not refuses(limit, used, amount):
            # The bucket leaves the counted span when the current bucket is
            # RATE_BUCKETS + 1 past it.
            return max(math.ceil((bucket + RATE_BUCKETS + 1) * width - epoch), 1)
    return RATE_SECONDS[limit.per]


def refuses(limit: Limit, used: Decimal, amount: Decimal) -> bool:
    """Whether ``limit`` refuses a request adding ``amount`` to ``used``.

    The rule both backends apply (gateway_admit in PL/pgSQL is this function)."""
    if amount > 0 and used + amount > limit.max:
        return True
    return limit.meter in MEASURED and used >= limit.max


@dataclass(frozen=True, slots=True)
class Decision:
    refused: int | None  # the index of the limit that refused, or None: admitted
    web_searches: int  # web searches reserved (0 when the request is admitted without one)


def decide(
    counters: Counters, limits: Sequence[Limit], charge: Charge, *, web_optional: bool = False
) -> Decision:
    """Admit or refuse a request adding ``charge``, given the counters before it.

    A request asking for web search (``charge.web_searches``) whose web-search
    limits refuse is refused by that limit - or, with ``web_optional``, admitted
    without the web search (the caller turns it off in the request). Web-search
    limits are decided first, then the others in order; the first that refuses
    is the one reported."""
    web = charge.web_searches
    if web:
        for at, limit in enumerate(limits):
            if limit.meter == "web_searches" and refuses(
                limit, counters.of_limit(limit), Decimal(web)
            ):
                if not web_optional:
                    return Decision(at, 0)
                web = 0
                break
    for at, limit in enumerate(limits):
        if limit.meter == "web_searches":
            continue  # decided above: only a request asking for web search adds to it
        if refuses(limit, counters.of_limit(limit), charge.amount(limit.meter)):
            return Decision(at, 0)
    return Decision(None, web)


# The meters a `Charge` can add to (its `amount` is 0 for every other).
_CHARGED: tuple[Meter, ...] = (
    "queries",
    "advanced_rag",
    "web_searches",
    "uploads",
    "upload_bytes",
    "cost",
    "streams",
)


def charged(counters: Counters, charge: Charge, web_searches: int) -> Counters:
    """The counters after an admitted request's charge (the user's and the team's)."""
    amounts: dict[Meter, Decimal] = {}
    for meter in _CHARGED:
        amount = Decimal(web_searches) if meter == "web_searches" else charge.amount(meter)
        if amount:
            amounts[meter] = amount
    used = dict(counters.used)
    team = dict(counters.team)
    models = dict(counters.models)
    # Each counter looked at once (issue 24: not every meter and window asked
    # of each mapping, on every admission).
    for counted in (used, team):
        for key in counted:
            added = amounts.get(key[0])
            if added is not None:
                counted[key] += added
    for model_key in models:
        added = amounts.get(model_key[1])
        if added is not None:
            models[model_key] += added
    return Counters(used, team, models)


def rate_counts(
    rows: Iterable[Sequence[int | Decimal]], epoch: float
) -> dict[tuple[Meter, Per], Decimal]:
    """What each rate window counts at ``epoch``, from the storage's rows
    (meter, per, bucket, amount; meter and per numbered 1-based)."""
    buckets: dict[tuple[Meter, Per], dict[int, Decimal]] = {}
    for meter, per, bucket, amount in rows:
        key = (METERS[int(meter) - 1], PERS[int(per) - 1])
        buckets.setdefault(key, {})[int(bucket)] = Decimal(amount)
    return {key: rate_used(found, key[1], epoch) for key, found in buckets.items()}
