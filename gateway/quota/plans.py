"""Plans and admission decisions (pure logic, no I/O).

Turns a user's effective plan and the counters admission returned into the
answer the client sees: which limit refused and the rate-limit headers (the
message an end user reads is in gateway/messages.py, per language). The database does the atomic part (see
`Storage.admit`); this module only describes the result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal

from gateway.clock import Periods
from gateway.config import Plan, StorageErrorPolicy
from gateway.quota.limits import LEGACY_LIMITS, RATE_SECONDS, Counters, Limit, limits_of
from gateway.storage import Admission, AdmissionLimits

# Error codes per limit, in the upstream's error body (docs/quotas.md).
LIMIT_CODES: dict[str, str] = {
    "queries_per_day": "daily_query_limit",
    "tokens_per_day": "daily_token_limit",
    "tokens_per_month": "monthly_token_limit",
    "max_concurrent_streams": "concurrent_stream_limit",
    "web_searches_per_day": "web_search_limit",
    "requests_per_minute": "request_rate_limit",
    "tokens_per_minute": "token_rate_limit",
    "cost_per_day": "daily_cost_limit",
    "cost_per_month": "monthly_cost_limit",
}


def plan_limits(plan: Plan) -> tuple[Limit, ...]:
    """The limits a plan sets (gateway/quota/limits.py), in checking order: its keys,
    then its ``[[plans.NAME.limits]]``, the open streams last."""
    keys = limits_of({name: getattr(plan, name, None) for name in LEGACY_LIMITS})
    general = tuple(Limit(x.label, x.meter, x.per, x.max, models=x.models) for x in plan.limits)
    streams = tuple(x for x in keys if x.per == "open")
    return (*(x for x in keys if x.per != "open"), *general, *streams)


def team_limits(plan: Plan) -> tuple[Limit, ...]:
    """The limits a team's plan sets, counted over the team (issue 21): named
    ``team_<name>``; its rates too (over the members' rate buckets)."""
    return tuple(
        replace(limit, name=f"team_{limit.name}", scope="team")
        for limit in plan_limits(plan)
        if not limit.models  # per-model limits are the user's
    )


def admission_limits(
    plan: Plan | Sequence[Limit],
    team: Sequence[Limit] = (),
    *,
    models: Iterable[str | None] | None = None,
) -> AdmissionLimits:
    """The user's plan's limits (or those limits, `plan_limits`), then their
    team's (open streams last); of the per-model limits, those for a model the
    request names (``models``)."""
    mine = tuple(
        x for x in (plan_limits(plan) if isinstance(plan, Plan) else plan) if x.applies_to(models)
    )
    streams = tuple(x for x in (*mine, *team) if x.per == "open")
    return AdmissionLimits((*(x for x in (*mine, *team) if x.per != "open"), *streams))


def closed_checks(policy: StorageErrorPolicy, plan: Plan) -> list[str]:
    """The checks that refuse a request when the database is unreachable: those
    whose policy is ``closed`` and whose limit the plan actually sets."""
    applies = {
        "queries": plan.queries_per_day is not None or plan.requests_per_minute is not None,
        "tokens": any(
            value is not None
            for value in (
                plan.tokens_per_day,
                plan.tokens_per_month,
                plan.tokens_per_minute,
                plan.cost_per_day,
                plan.cost_per_month,
            )
        ),
        "streams": plan.max_concurrent_streams is not None,
    }
    # [[plans.NAME.limits]]: queries follow the queries check, the rest the tokens one.
    for limit in plan.limits:
        if limit.meter in ("uploads", "upload_bytes"):
            continue  # reserved when an upload is asked, not at admission
        applies["queries" if limit.meter == "queries" else "tokens"] = True
    return [check for check, used in applies.items() if used and getattr(policy, check) == "closed"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One limit as the X-RateLimit-* headers describe it."""

    resource: str  # the limit's name, e.g. "queries_per_day"
    limit: Decimal
    used: Decimal
    reset: datetime | None  # None: the limit does not reset with time

    @property
    def remaining(self) -> Decimal:
        return max(self.limit - self.used, Decimal(0))

    def retry_after(self, now: datetime) -> int:
        """Whole seconds until the limit resets (at least 1)."""
        if self.reset is None:
            return 1
        return max(math.ceil((self.reset - now).total_seconds()), 1)

    def headers(self) -> list[tuple[bytes, bytes]]:
        # Named as GitHub's API names them; Reset is a Unix time in seconds.
        headers = [
            (b"x-ratelimit-limit", _number(self.limit)),
            (b"x-ratelimit-remaining", _number(self.remaining)),
            (b"x-ratelimit-used", _number(self.used)),
            (b"x-ratelimit-resource", self.resource.encode()),
        ]
        if self.reset is not None:
            headers.append((b"x-ratelimit-reset", _epoch(self.reset)))
        return headers


# Both are functions of the value alone (equal decimals give the same text, equal
# instants the same second): the few limits, counts and resets a gateway shows
# are written once, not on every response.
@functools.lru_cache(maxsize=4096)
def _number(value: Decimal) -> bytes:
    """A count as a whole number, an amount of money as its exact decimal."""
    return str(value.normalize() if value != value.to_integral_value() else int(value)).encode()


@functools.lru_cache(maxsize=256)
def _epoch(at: datetime) -> bytes:
    """``at`` as the Unix time in whole seconds, rounded up."""
    return str(math.ceil(at.timestamp())).encode()


def reset_of(limit: Limit, periods: Periods) -> datetime | None:
    """When ``limit``'s calendar window starts again (None: it counts what is
    open, or slides)."""
    if limit.per == "day":
        return periods.day_resets_at
    if limit.per == "month":
        return periods.month_resets_at
    return None


def rate_limit(limit: Limit, counters: Counters, periods: Periods) -> RateLimit | None:
    """The RateLimit view of one limit, or None for one that counts what is open
    at once (streams: no used/remaining a client can plan with)."""
    if limit.per == "open":
        return None
    return RateLimit(
        limit.name,
        limit.max,
        counters.of_limit(limit),
        reset_of(limit, periods),
    )


def reported_limit(
    admission: Admission, limits: Iterable[Limit], periods: Periods, *, now: datetime
) -> RateLimit | None:
    """The limit the response headers describe: the one that refused, or else the
    one nearest to exhaustion of ``limits`` (those the request was admitted
    under: the user's and their team's; the smallest share of its maximum left;
    on a tie the first in checking order). A rate resets, at the latest, a
    window from now - or, when it refused, when the request fits (its
    Retry-After)."""
    refused = admission.refused
    if refused is not None:
        if refused.is_rate:
            wait = timedelta(seconds=admission.retry_after or 1)
            return RateLimit(
                refused.name,
                refused.max,
                admission.counters.of_limit(refused),
                now + wait,
            )
        return rate_limit(refused, admission.counters, periods)
    # The shares are compared without a RateLimit built for each limit: only
    # the nearest one's is (the same values `rate_limit` gives it).
    counters = admission.counters
    zero = Decimal(0)
    nearest: tuple[Decimal, Limit, Decimal] | None = None
    for limit in limits:
        if limit.per == "open":
            continue
        used = counters.of_limit(limit)
        maximum = limit.max
        share = max(maximum - used, zero) / maximum if maximum else zero
        if nearest is None or share < nearest[0]:
            nearest = (share, limit, used)
    if nearest is None:
        return None
    _, limit, used = nearest
    if limit.is_rate:
        reset: datetime | None = now + timedelta(seconds=RATE_SECONDS[limit.per])
    else:
        reset = reset_of(limit, periods)
    return RateLimit(limit.name, limit.max, used, reset)
