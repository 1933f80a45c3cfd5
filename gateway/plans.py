"""Plans and admission decisions (pure logic, no I/O).

Turns a user's effective plan and the counters admission returned into the
answer the client sees: which limit refused and the rate-limit headers (the
message an end user reads is in gateway/messages.py, per language). The database does the atomic part (see
`Storage.admit`); this module only describes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from gateway.clock import Periods
from gateway.config import Plan, StorageErrorPolicy
from gateway.storage import Admission, AdmissionLimits, Counters

# Error codes per limit, in the upstream's error body (docs/quotas.md).
LIMIT_CODES: dict[str, str] = {
    "queries_per_day": "daily_query_limit",
    "tokens_per_day": "daily_token_limit",
    "tokens_per_month": "monthly_token_limit",
    "max_concurrent_streams": "concurrent_stream_limit",
    "web_searches_per_day": "web_search_limit",
}


def admission_limits(plan: Plan) -> AdmissionLimits:
    return AdmissionLimits(
        queries_per_day=plan.queries_per_day,
        tokens_per_day=plan.tokens_per_day,
        tokens_per_month=plan.tokens_per_month,
        max_concurrent_streams=plan.max_concurrent_streams,
    )


def closed_checks(policy: StorageErrorPolicy, plan: Plan) -> list[str]:
    """The checks that refuse a request when the database is unreachable: those
    whose policy is ``closed`` and whose limit the plan actually sets."""
    applies = {
        "queries": plan.queries_per_day is not None,
        "tokens": plan.tokens_per_day is not None or plan.tokens_per_month is not None,
        "streams": plan.max_concurrent_streams is not None,
    }
    return [check for check, used in applies.items() if used and getattr(policy, check) == "closed"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One limit as the X-RateLimit-* headers describe it."""

    resource: str  # the plan limit's name, e.g. "queries_per_day"
    limit: int
    used: int
    reset: datetime | None  # None: the limit does not reset with time

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)

    def retry_after(self, now: datetime) -> int:
        """Whole seconds until the limit resets (at least 1)."""
        if self.reset is None:
            return 1
        return max(math.ceil((self.reset - now).total_seconds()), 1)

    def headers(self) -> list[tuple[bytes, bytes]]:
        # Named as GitHub's API names them; Reset is a Unix time in seconds.
        headers = [
            (b"x-ratelimit-limit", str(self.limit).encode()),
            (b"x-ratelimit-remaining", str(self.remaining).encode()),
            (b"x-ratelimit-used", str(self.used).encode()),
            (b"x-ratelimit-resource", self.resource.encode()),
        ]
        if self.reset is not None:
            headers.append((b"x-ratelimit-reset", str(math.ceil(self.reset.timestamp())).encode()))
        return headers


def rate_limit(resource: str, plan: Plan, counters: Counters, periods: Periods) -> RateLimit | None:
    """The RateLimit view of one limit of ``plan``, or None if it is unlimited."""
    if resource == "queries_per_day" and plan.queries_per_day is not None:
        return RateLimit(
            resource, plan.queries_per_day, counters.queries_today, periods.day_resets_at
        )
    if resource == "tokens_per_day" and plan.tokens_per_day is not None:
        return RateLimit(
            resource, plan.tokens_per_day, counters.tokens_today, periods.day_resets_at
        )
    if resource == "tokens_per_month" and plan.tokens_per_month is not None:
        return RateLimit(
            resource, plan.tokens_per_month, counters.tokens_month, periods.month_resets_at
        )
    if resource == "web_searches_per_day" and plan.web_searches_per_day is not None:
        return RateLimit(
            resource, plan.web_searches_per_day, counters.web_searches_today, periods.day_resets_at
        )
    return None


def reported_limit(admission: Admission, plan: Plan, periods: Periods) -> RateLimit | None:
    """The limit the response headers describe: the one that refused, or else the
    first configured of queries, tokens today, tokens this month."""
    if admission.refused_by is not None:
        return rate_limit(admission.refused_by, plan, admission.counters, periods)
    for resource in ("queries_per_day", "tokens_per_day", "tokens_per_month"):
        found = rate_limit(resource, plan, admission.counters, periods)
        if found is not None:
            return found
    return None
