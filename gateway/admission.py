"""Admission: what the gateway decides before an answer request is forwarded.

In order: the plan's feature switches (advanced RAG: 403), the day's web-search
allowance for requests that ask for web search (a plain read that fails open),
then the one atomic storage step that reserves the query - and a stream slot, and
counts advanced RAG - while the plan's limits allow it. What was reserved is kept
on a `Ticket` until the answer is settled or the reservation given back.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import date
from typing import TYPE_CHECKING, Any

from gateway.accounts import effective_plan
from gateway.alerts import alert_request
from gateway.clock import Periods, periods_at
from gateway.config import Plan
from gateway.errors import Forbidden, QuotaExceeded, StorageError
from gateway.features import asks_for_advanced_rag, asks_for_web_search, set_path
from gateway.plans import (
    LIMIT_CODES,
    RateLimit,
    admission_limits,
    closed_checks,
    refusal_message,
    reported_limit,
)
from gateway.storage import AlertRequest, Lease, Pending
from gateway.upstreams import Route

if TYPE_CHECKING:
    from gateway.runtime import Gateway

log = logging.getLogger("gateway.admission")

Headers = list[tuple[bytes, bytes]]

# A refusal for too many open answers has no reset time; clients may retry soon.
STREAM_RETRY_AFTER = 5


class Ticket:
    """The accounting state of one answer request."""

    __slots__ = (
        "alerts",
        "body_changed",
        "day",
        "lease_id",
        "pending_id",
        "plan",
        "reserved",
        "user_id",
    )

    def __init__(
        self,
        user_id: str,
        day: date,
        *,
        reserved: bool,
        lease_id: str | None,
        pending_id: str | None = None,
        plan: str = "",
    ) -> None:
        self.user_id = user_id
        self.plan = plan  # the plan's name, for metrics
        self.alerts: AlertRequest | None = None  # the thresholds its settle checks
        self.day = day  # the local day the answer is counted on: the day it was asked
        self.reserved = reserved  # a query is reserved and must be settled or refunded
        self.lease_id = lease_id
        # The answer's pending row (docs/quotas.md, "Crash safety"): settle and
        # refund claim it, so neither can count after a recovery did.
        self.pending_id = pending_id
        self.body_changed = False  # admission rewrote the request body (web search off)


class Admitter:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def plan_of(self, user_id: str) -> Plan:
        """The user's effective plan: their plan with their overrides applied."""
        config = self.gw.config
        user = await self.gw.users.get(user_id, default_plan=config.accounting.default_plan)
        return effective_plan(config, user)

    async def admit(
        self, user_id: str, request_id: str, route: Route, body: dict[str, Any]
    ) -> tuple[Ticket, Headers]:
        """Reserve the answer or raise the refusal; may rewrite ``body`` (web search)."""
        gw = self.gw
        config = gw.config
        now = gw.clock.now()
        periods = periods_at(now, gw.tz)
        plan = config.plan(config.accounting.default_plan)
        try:
            plan = await self.plan_of(user_id)
            advanced = asks_for_advanced_rag(body, config.advanced_rag)
            if advanced and not plan.advanced_rag:
                raise Forbidden("Advanced RAG is not included in your plan.")
            web_spent = await self._web_searches_spent(user_id, request_id, body, plan, periods)
            limits = admission_limits(plan)
            lease = None
            if limits.max_concurrent_streams is not None:
                lease = Lease(id=request_id, expires_at=now + gw.lease_ttl)
            admission = await gw.storage.admit(
                user_id,
                day=periods.day,
                month_start=periods.month_start,
                limits=limits,
                now=now,
                lease=lease,
                advanced_rag=advanced,
                pending=self._pending(request_id, route, body),
            )
        except StorageError as exc:
            return self._storage_failed(exc, plan, user_id, request_id, periods)

        shown = reported_limit(admission, plan, periods)
        rate_headers = shown.headers() if shown is not None else []
        if not admission.admitted:
            assert admission.refused_by is not None
            limit = getattr(plan, admission.refused_by)
            reset = shown.reset.astimezone(gw.tz) if shown and shown.reset else None
            retry = shown.retry_after(now) if shown else STREAM_RETRY_AFTER
            raise QuotaExceeded(
                refusal_message(admission.refused_by, limit, reset),
                code=LIMIT_CODES[admission.refused_by],
                headers=[(b"retry-after", str(retry).encode()), *rate_headers],
            )
        rule = config.web_search
        if (
            rule.when_exhausted == "disable"
            and plan.web_searches_per_day is not None
            and (web_spent or admission.counters.web_searches_today >= plan.web_searches_per_day)
        ):
            # The allowance is used up: make sure this answer neither searches nor
            # falls back to the web.
            set_path(body, rule.disable_path, rule.disable_value)
            disabled = True
        else:
            disabled = False
        ticket = Ticket(
            user_id,
            periods.day,
            reserved=True,
            lease_id=lease.id if lease else None,
            pending_id=request_id,
            plan=plan.name,
        )
        ticket.body_changed = disabled
        ticket.alerts = alert_request(plan, config.alerts, periods)
        return ticket, rate_headers

    def _pending(self, request_id: str, route: Route, body: dict[str, Any]) -> Pending:
        """The pending row admission writes: what a recovery charges if this
        process dies before the answer is settled - the dialect's estimate for an
        answer that was never seen (the prompt's size)."""
        usage = self.gw.upstream.unanswered(route, body).usage
        if usage is None:
            return Pending(id=request_id, endpoint=route.name)
        return Pending(
            id=request_id,
            endpoint=route.name,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cost=usage.cost,
            currency=usage.currency,
        )

    async def _web_searches_spent(
        self, user_id: str, request_id: str, body: dict[str, Any], plan: Plan, periods: Periods
    ) -> bool:
        """For a request that asks for web search: whether the day's allowance is
        used up (refusing it when so configured). Fails open: a count that cannot
        be read never blocks the user."""
        gw = self.gw
        rule = gw.config.web_search
        limit = plan.web_searches_per_day
        if limit is None or not asks_for_web_search(body, rule):
            return False
        try:
            async with asyncio.timeout(rule.count_timeout):
                used = await gw.storage.web_searches_today(user_id, day=periods.day)
        except (StorageError, TimeoutError) as exc:
            gw.metrics.inc("gateway_web_search_count_failures_total")
            log.warning(
                "request %s: could not read the web-search count, allowing (fail-open): %r",
                request_id,
                exc,
            )
            return False
        if used < limit:
            return False
        if rule.when_exhausted == "refuse":
            shown = RateLimit("web_searches_per_day", limit, used, periods.day_resets_at)
            raise QuotaExceeded(
                refusal_message(
                    "web_searches_per_day", limit, periods.day_resets_at.astimezone(gw.tz)
                ),
                code=LIMIT_CODES["web_searches_per_day"],
                headers=[
                    (b"retry-after", str(shown.retry_after(gw.clock.now())).encode()),
                    *shown.headers(),
                ],
            )
        return True

    def _storage_failed(
        self, exc: StorageError, plan: Plan, user_id: str, request_id: str, periods: Periods
    ) -> tuple[Ticket, Headers]:
        gw = self.gw
        gw.metrics.inc("gateway_storage_errors_total", operation="admit")
        closed = closed_checks(gw.config.admission.on_storage_error, plan)
        if closed:
            log.error(
                "request %s: admission could not reach the database; refused (fail-closed for %s): %s",
                request_id,
                ", ".join(closed),
                exc.message,
            )
            gw.metrics.inc("gateway_admission_storage_failures_total", policy="closed")
            raise StorageError(
                "The usage database is unavailable; try again shortly.",
                headers=[(b"retry-after", b"5")],
            ) from exc
        log.error(
            "request %s: admission could not reach the database; let through unreserved (fail-open): %s",
            request_id,
            exc.message,
        )
        gw.metrics.inc("gateway_admission_storage_failures_total", policy="open")
        return Ticket(user_id, periods.day, reserved=False, lease_id=None, plan=plan.name), []

    async def refund(self, ticket: Ticket | None, request_id: str) -> None:
        """Return a reserved query (and its stream slot): no answer was produced."""
        if ticket is None or not ticket.reserved:
            return
        ticket.reserved = False
        await self.gw.settler.refund(
            ticket.user_id, day=ticket.day, lease_id=ticket.lease_id, pending_id=ticket.pending_id
        )
