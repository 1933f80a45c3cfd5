"""Admission: what the gateway decides before an answer request is forwarded.

In order: the plan's feature switches (advanced RAG: 403), then the one atomic
storage step that reserves the query - and a stream slot, and a web search for a
request that asks for one, and counts advanced RAG - while the plan's limits
allow it. The web-search allowance is decided in that same step (issue 20: read
apart from it, 20 parallel requests with one search left all ran a search):
refused, or admitted with web search turned off, as `web_search.when_exhausted`
says. Whether a request asks for web search is the `[web_search]` rule's for a
Dify app, the dialect's own for OpenAI and Anthropic (their web-search tools;
review-sec F4). What was reserved is kept on a `Ticket` (and the web search on
the answer's pending row) until the answer is settled or the reservation given back.

An upload is admitted apart, once its file's size is known (`reserve_upload`:
its count and bytes against the user's and the team's upload limits, in one
atomic step), and kept on an `UploadTicket` until the upstream takes the file or
the reservation is given back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol

from gateway.alerts import alert_request
from gateway.clock import Periods, periods_at
from gateway.config import Plan, WebSearchConfig
from gateway.conversations import NOTHING
from gateway.errors import STORAGE_UNAVAILABLE, Forbidden, QuotaExceeded, StorageError
from gateway.features import asks_for_advanced_rag, asks_for_web_search, set_path, turns_web_off
from gateway.messages import english
from gateway.quota.budget import cost_bound, lowered_cap, with_cap
from gateway.quota.limits import UPLOAD_METERS, Limit, refuses, upload_charge
from gateway.quota.plans import (
    LIMIT_CODES,
    RateLimit,
    admission_limits,
    closed_checks,
    reported_limit,
    reset_of,
)
from gateway.storage import (
    Accounting,
    Admission,
    AdmissionLimits,
    AlertRequest,
    ConversationFeatures,
    Lease,
    Pending,
    ReportReads,
    User,
    WebSearch,
)
from gateway.upstreams import Route, Upstream
from gateway.upstreams.anthropic import AnthropicUpstream
from gateway.upstreams.openai import OpenAIUpstream

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.metrics import Metrics
    from gateway.settle import Settler
    from gateway.snapshot import PlanView, Snapshot

log = logging.getLogger("gateway.admission")

ZERO = Decimal(0)

Headers = list[tuple[bytes, bytes]]


# Review-sec F4: the dialects that read web search in a request and count the
# searches an answer ran themselves (a tool, a search model; the answer's own
# report), where Dify apps need the [web_search] rule's paths.
_COUNTS_OWN_SEARCHES = (OpenAIUpstream, AnthropicUpstream)


def _asks_for_web_search(
    dialect: Upstream, route: Route, body: dict[str, Any], rule: WebSearchConfig
) -> Literal["refuse", "disable"] | None:
    """None when the request does not ask for web search; else what to do once
    the day's searches are spent. The ``disable`` rewrite is a Dify input: an
    OpenAI or Anthropic request that asks for a search it has no allowance for
    is refused."""
    if isinstance(dialect, _COUNTS_OWN_SEARCHES):
        return "refuse" if dialect.asks_for_web_search(route, body) else None
    return rule.when_exhausted if asks_for_web_search(body, rule) else None


def _continued_search(
    searches: Literal["refuse", "disable"] | None,
    conversation: ConversationFeatures,
    rule: WebSearchConfig,
) -> Literal["refuse", "disable"] | None:
    """Whether a message continuing a Dify conversation may search, and what
    then once the day's searches are spent. Dify answers it with the
    conversation's first inputs, whatever the message's say (review-limits F5):
    one whose first inputs turned the web off never searches; one that asked
    for web search does; and in ``disable`` mode any other may fall back to the
    web, which the rewrite of the message's inputs cannot stop (review-conv2
    F1). Those last two need room for a search, and are refused without."""
    if conversation.web_off:
        return None
    if conversation.web_search or rule.when_exhausted == "disable":
        return "refuse"
    return searches


def _turns_web_off(dialect: Upstream, body: dict[str, Any], rule: WebSearchConfig) -> bool:
    """Whether a Dify request's inputs turn the web off (the `disable` rewrite's
    value at its path, written by the gateway or sent by the client)."""
    return not isinstance(dialect, _COUNTS_OWN_SEARCHES) and turns_web_off(body, rule)


def _plain(value: Decimal | int) -> Decimal | int:
    """A count as an int (as messages always showed it), money as its decimal."""
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    return value


def limit_refusal(
    resource: str,
    limit: Decimal | int,
    *,
    used: Decimal | int,
    reset: datetime | None,
    own: bool,
    headers: Headers,
    seconds: int | None = None,
    refused: Limit | None = None,
) -> QuotaExceeded:
    """The 429 for ``resource``, its message named for gateway/messages.py: the
    user's own limit (a per-user override) or their plan's, reset time in the
    accounting time zone."""
    if refused is not None and refused.scope == "team":
        code = "team_limit"
    else:
        code = LIMIT_CODES.get(resource, "plan_limit")
    key = code + ("_own" if own and code in LIMIT_CODES.values() else "")
    fields: dict[str, object] = {"limit": _plain(limit)}
    if refused is not None and code in ("plan_limit", "team_limit"):
        what = refused.meter.replace("_", " ")
        if refused.models:
            what += f" ({', '.join(refused.models)})"
        fields.update(what=what, window=refused.per)
    if resource != "max_concurrent_streams":
        fields.update(used=_plain(used), reset=reset)
    if seconds is not None:
        fields.update(seconds=seconds, remaining=max(_plain(limit) - _plain(used), 0))
    return QuotaExceeded(
        english(key, **fields),
        code=code,
        headers=headers,
        key=key,
        fields=fields,
    )


# A refusal for too many open answers has no reset time; clients may retry soon.
STREAM_RETRY_AFTER = 5


class Ticket:
    """The accounting state of one answer request."""

    __slots__ = (
        "alerts",
        "body_changed",
        "day",
        "features",
        "lease_id",
        "pending_id",
        "plan",
        "reserved",
        "upstream",
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
        upstream: str = "default",
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
        # What the answer runs with, of advanced RAG and web search: a Dify
        # conversation it begins runs them on every later message (review-limits
        # F5, gateway/conversations.py).
        self.features = NOTHING
        # The named upstream the answer goes to (issue 23), recorded in the ledger
        # with it; whoever sends the request elsewhere (a fallback) sets it.
        self.upstream = upstream

    def release(self) -> bool:
        """The reservation leaves the ticket - to the ledger (settled) or back to
        the user (refunded); True if it was still held. The one place
        ``reserved`` turns false."""
        held = self.reserved
        self.reserved = False
        return held


class AdmissionStorage(Accounting, ReportReads, Protocol):
    """Admission reserves (accounting), and reads the day rows an upload's
    limits are checked against (`Admitter.upload_limits`)."""


@dataclass(frozen=True, slots=True)
class UploadLimits:
    """The limits on uploads that hold a user's upload (`quota.limits.UPLOAD_METERS`,
    theirs and their team's), the team, and which of them the user's own
    overrides set (a refusal by one says "your limit")."""

    limits: tuple[Limit, ...] = ()
    team: str | None = None
    own: frozenset[str] = frozenset()

    @property
    def most_bytes(self) -> int | None:
        """The largest file any upload can carry under these limits (None: no
        limit counts bytes): past it an upload is refused however little was
        used, so no more of it needs to be read."""
        maxes = [int(limit.max) for limit in self.limits if limit.meter == "upload_bytes"]
        return min(maxes) if maxes else None


NO_UPLOAD_LIMITS = UploadLimits()


class UploadTicket:
    """An upload's reservation (issue 21), keyed by its request id: counted
    before the file is forwarded; it stays as the upload's record once the
    upstream has taken the file, and is given back otherwise.

    ``size``: the bytes reserved (0 when only the count mattered and the file
    was not read yet: its bytes are counted once the upstream has taken it).
    ``known``: whether the reservation surely landed; one whose outcome was
    lost (the database failed to answer) is counted again, under the same
    key, once the upstream has taken the file, and given back otherwise -
    both exact whether or not it landed (`Storage.reserve_upload`)."""

    __slots__ = ("day", "key", "known", "reserved", "size", "user_id")

    def __init__(self, user_id: str, key: str, day: date, size: int, *, known: bool) -> None:
        self.user_id = user_id
        self.key = key
        self.day = day  # the local day it is counted on
        self.size = size  # the file's bytes reserved
        self.known = known
        self.reserved = True

    def release(self) -> bool:
        """The reservation leaves the ticket - to the record (the upstream took
        the file) or back to the user; True if it was still held."""
        held = self.reserved
        self.reserved = False
        return held

    def recount(self, size: int) -> bool:
        """Whether the upload must be counted again (same key) once the
        upstream has taken its file of ``size`` bytes: the reservation's
        outcome was lost, or it did not hold the file's bytes."""
        return not self.known or size != self.size


def _check_bounded(dialect: Upstream, route: Route, body: dict[str, Any]) -> None:
    """Refuse, where a money budget applies, an answer it could not hold: one
    whose cost would be recorded as nothing (review-dify D1), or whose bound is
    none, the upstream adding to the prompt what the body does not hold
    (review-limits F1)."""
    if dialect.cost_unreported(route, body):
        raise Forbidden(english("cost_unreported"), code="cost_unreported", key="cost_unreported")
    option = dialect.cost_unbounded(route, body)
    if option is not None:
        fields = {"option": option}
        raise Forbidden(
            english("cost_unbounded", **fields),
            code="cost_unbounded",
            key="cost_unbounded",
            fields=fields,
        )


class Admitter:
    """Admits answer requests against the plans of a request's `Snapshot`, and
    gives reservations back (through the settler, which retries)."""

    __slots__ = ("_clock", "_metrics", "_settler", "_storage")

    def __init__(
        self, storage: AdmissionStorage, settler: Settler, *, clock: Clock, metrics: Metrics
    ) -> None:
        self._storage = storage
        self._settler = settler
        self._clock = clock
        self._metrics = metrics

    async def plan_of(self, snap: Snapshot, user_id: str) -> Plan:
        """The user's effective plan: their plan with their overrides applied."""
        return (await self._plan(snap, user_id))[1].plan

    async def _plan(self, snap: Snapshot, user_id: str) -> tuple[User, PlanView]:
        """The user and their effective plan's view: the plan, its limits, and
        the limits in it that their own overrides set (a refusal by one of
        these says "your limit")."""
        user = await snap.users.get(user_id, default_plan=snap.config.accounting.default_plan)
        return user, snap.plan_view(user)

    async def _team(self, snap: Snapshot, user: User) -> tuple[str | None, PlanView | None]:
        """The user's team and its plan's view, whose team-scope limits (issue
        21) the request must fit too, in the same atomic step. A team the
        database cannot give leaves the user's own limits (fail-open, as for the
        team's model list), logged and counted."""
        try:
            view = await snap.team_view(user)
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="team")
            log.warning("team of %s not read, its limits not applied: %s", user.id, exc.message)
            return None, None
        if view is None or user.team is None or not view.limits:
            return None, None
        return user.team, view

    async def admit(
        self,
        snap: Snapshot,
        user_id: str,
        request_id: str,
        route: Route,
        body: dict[str, Any],
        *,
        dialect: Upstream | None = None,
        upstream: str = "default",
        conversation: ConversationFeatures | None = None,
    ) -> tuple[Ticket, Headers]:
        """Reserve the answer or raise the refusal; may rewrite ``body`` (web search).
        ``dialect`` is the request's (its mount's, issue 23; default the primary
        upstream's); ``upstream``: the named upstream the answer is sent to, kept
        on the pending row (a recovery charges it there) and on the ticket.
        ``conversation``: what the Dify conversation the message continues asked
        for when it began (`NOTHING` if nothing was kept for it; None: the
        message continues none), which Dify runs again whatever the message's
        inputs say (review-limits F5): the message is judged as asking for it
        too."""
        if dialect is None:
            dialect = snap.upstream
        config = snap.config
        now = self._clock.now()
        periods = periods_at(now, snap.tz)
        plan = config.plan(config.accounting.default_plan)
        web_search: WebSearch | None = None
        own: frozenset[str] = frozenset()
        began = NOTHING if conversation is None else conversation
        advanced = began.advanced_rag or asks_for_advanced_rag(body, config.advanced_rag)
        searches = _asks_for_web_search(dialect, route, body, config.web_search)
        if conversation is not None:
            searches = _continued_search(searches, conversation, config.web_search)
        if searches is not None:
            web_search = WebSearch(None, searches)
        try:
            user, view = await self._plan(snap, user_id)
            plan, own = view.plan, view.own
            if advanced and not plan.advanced_rag:
                key = "feature_not_in_plan_own" if "advanced_rag" in own else "feature_not_in_plan"
                raise Forbidden(english(key), key=key)
            team, team_view = await self._team(snap, user)
            per_model = view.per_model or (team_view is not None and team_view.per_model)
            if team_view is None and not per_model:
                limits = view.admission  # the same for every request of the plan
            elif not per_model:
                assert team_view is not None
                limits = view.with_team(team_view)  # the same for every request of the pair
            else:
                limits = admission_limits(
                    view.limits,
                    team_view.limits if team_view is not None else (),
                    models=(dialect.requested_models(route, body) if per_model else None),
                )
            if limits.counts_cost:
                _check_bounded(dialect, route, body)
            pending = self._pending(
                snap, dialect, request_id, route, body, upstream, bounded=limits.counts_cost
            )
            lease = None
            if limits.counts_streams:
                lease = Lease(id=request_id, expires_at=now + snap.lease_ttl)
            capped: dict[str, Any] | None = None
            while True:
                admission = await self._storage.admit(
                    user_id,
                    day=periods.day,
                    month_start=periods.month_start,
                    limits=limits,
                    now=now,
                    lease=lease,
                    advanced_rag=advanced,
                    pending=pending,
                    web_search=web_search,
                    team=team,
                )
                if admission.admitted or capped is not None or not plan.lower_output_cap:
                    break
                lowered = self._lowered(
                    snap, dialect, admission, limits, request_id, route, body, upstream
                )
                if lowered is None:
                    break  # refused as without the option
                capped, pending = lowered
            if capped is not None and admission.admitted:
                body.update(capped)  # only the cap fields change
        except StorageError as exc:
            failed = self._storage_failed(
                snap,
                exc,
                plan,
                user_id,
                request_id,
                periods,
                asks_web=web_search is not None,
                upstream=upstream,
            )
            failed[0].features = ConversationFeatures(
                advanced, web_search is not None, _turns_web_off(dialect, body, config.web_search)
            )
            return failed

        shown = reported_limit(admission, limits.limits, periods, now=now)
        rate_headers = shown.headers() if shown is not None else []
        if not admission.admitted:
            assert admission.refused is not None
            limit = admission.refused.max
            reset = shown.reset.astimezone(snap.tz) if shown and shown.reset else None
            retry = shown.retry_after(now) if shown else STREAM_RETRY_AFTER
            rate = admission.refused.is_rate
            raise limit_refusal(
                admission.refused.name,
                limit,
                used=shown.used if shown else limit,
                reset=reset,
                own=admission.refused.scope == "user" and admission.refused.name in own,
                headers=[(b"retry-after", str(retry).encode()), *rate_headers],
                seconds=retry if rate else None,
                refused=admission.refused,
            )
        rule = config.web_search
        if (
            rule.when_exhausted == "disable"
            and not isinstance(dialect, _COUNTS_OWN_SEARCHES)
            and plan.web_searches_per_day is not None
            and (
                not admission.web_search_reserved
                if web_search is not None
                else admission.counters.web_searches_today >= plan.web_searches_per_day
            )
        ):
            # The allowance is used up (or what is left is reserved by answers
            # under way): make sure this answer neither searches nor falls back to
            # the web. A request that asked and got one keeps it.
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
            upstream=upstream,
        )
        ticket.body_changed = disabled or capped is not None
        web_off = disabled or _turns_web_off(dialect, body, rule)
        if advanced or (web_search is not None and not disabled) or web_off:
            ticket.features = ConversationFeatures(
                advanced, web_search is not None and not disabled, web_off
            )
        ticket.alerts = alert_request(plan, config.alerts, periods, limits.limits)
        return ticket, rate_headers

    def _pending(
        self,
        snap: Snapshot,
        dialect: Upstream,
        request_id: str,
        route: Route,
        body: dict[str, Any],
        upstream: str,
        *,
        bounded: bool = False,
    ) -> Pending:
        """The pending row admission writes: what a recovery charges if this
        process dies before the answer is settled - the dialect's estimate for an
        answer that was never seen (the prompt's size); for a paid side call, its
        price (the call, once admitted, is the upstream's to carry out and bill).
        ``upstream``: the named upstream it goes to, built in (not replaced after).
        ``bounded`` (a money budget holds the request): it reserves the upper
        bound of the answer's cost too (`_cost_bound`), and carries at least that
        bound as its cost. Built once, whole."""
        if route.role == "side_cost":
            price = snap.config.call_prices.get(route.call or "")
            if price is not None:
                return Pending(
                    id=request_id,
                    endpoint=route.name,
                    cost=price.price,
                    currency=price.currency,
                    reserved_cost=price.price if bounded else ZERO,
                    upstream=upstream,
                )
        usage = dialect.unanswered(route, body).usage
        cost = ZERO if usage is None else usage.cost
        reserved = ZERO
        if bounded:
            reserved = self._cost_bound(snap, dialect, route, body, cost)
            cost = max(cost, reserved)
        if usage is None:
            return Pending(
                id=request_id,
                endpoint=route.name,
                cost=cost,
                reserved_cost=reserved,
                upstream=upstream,
            )
        return Pending(
            id=request_id,
            endpoint=route.name,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cost=cost,
            currency=usage.currency,
            reserved_cost=reserved,
            upstream=upstream,
        )

    def _lowered(
        self,
        snap: Snapshot,
        dialect: Upstream,
        refusal: Admission,
        limits: AdmissionLimits,
        request_id: str,
        route: Route,
        body: dict[str, Any],
        upstream: str,
    ) -> tuple[dict[str, Any], Pending] | None:
        """For a request refused by a money budget, on a plan with
        ``lower_output_cap``: the body's cap fields lowered to the largest cap
        whose cost bound every money budget's remainder (as the refusal read
        the counters) can pay for, and the pending row reserving that bound;
        None when even a one-token answer does not fit (docs/quotas.md)."""
        refused = refusal.refused
        if refused is None or refused.meter != "cost" or route.role == "side_cost":
            return None
        remaining = min(
            limit.max - refusal.counters.of_limit(limit)
            for limit in limits.limits
            if limit.meter == "cost"
        )
        if remaining <= 0:
            return None
        cap = lowered_cap(
            dialect,
            route,
            body,
            remaining,
            reserve_output_tokens=snap.config.accounting.reserve_output_tokens,
        )
        if cap is None:
            return None
        capped = with_cap(body, route, cap)
        pending = self._pending(snap, dialect, request_id, route, capped, upstream, bounded=True)
        changed = {name: value for name, value in capped.items() if body.get(name) != value}
        return changed, pending

    @staticmethod
    def _cost_bound(
        snap: Snapshot, dialect: Upstream, route: Route, body: dict[str, Any], cost: Decimal
    ) -> Decimal:
        """The upper bound of the answer's cost that its pending row reserves
        against the money budgets (gateway/quota/budget.py); a recovery charges
        at least that bound, the most the answer could have cost. A paid side
        call's bound is its cost (``cost``: its price, or its estimate's)."""
        if route.role == "side_cost":
            return cost
        accounting = snap.config.accounting
        return cost_bound(
            dialect,
            route,
            body,
            reserve_output_tokens=accounting.reserve_output_tokens,
            answer_reservation=accounting.answer_reservation,
        )

    def _storage_failed(
        self,
        snap: Snapshot,
        exc: StorageError,
        plan: Plan,
        user_id: str,
        request_id: str,
        periods: Periods,
        *,
        asks_web: bool = False,
        upstream: str = "default",
    ) -> tuple[Ticket, Headers]:
        metrics = self._metrics
        metrics.inc("gateway_storage_errors_total", operation="admit")
        closed = closed_checks(snap.config.admission.on_storage_error, plan)
        if closed:
            log.error(
                "request %s: admission could not reach the database; refused (fail-closed for %s): %s",
                request_id,
                ", ".join(closed),
                exc.message,
            )
            metrics.inc("gateway_admission_storage_failures_total", policy="closed")
            raise StorageError(
                STORAGE_UNAVAILABLE,
                headers=[(b"retry-after", b"5")],
            ) from exc
        log.error(
            "request %s: admission could not reach the database; let through unreserved (fail-open): %s",
            request_id,
            exc.message,
        )
        metrics.inc("gateway_admission_storage_failures_total", policy="open")
        if asks_web and plan.web_searches_per_day is not None:
            # The web-search allowance fails open with the rest: a storage hiccup
            # never blocks a user wrongly here (docs/features.md).
            metrics.inc("gateway_web_search_count_failures_total")
            log.warning(
                "request %s: web-search allowance not checked, allowing (fail-open)", request_id
            )
        ticket = Ticket(
            user_id, periods.day, reserved=False, lease_id=None, plan=plan.name, upstream=upstream
        )
        return ticket, []

    async def upload_limits(self, snap: Snapshot, user_id: str) -> UploadLimits:
        """The upload limits that hold the user's uploads, and refuse one (429,
        as an answer's refusal) that they leave no room for whatever its size,
        before its body is read: one upload more than an ``uploads`` limit
        allows, or a limit of ``upload_bytes`` already reached (an empty file
        too). This reads the counters; `reserve_upload` is the exact step.
        Counters the database cannot give leave the check to it (fail-open
        there); a user's plan it cannot give refuses the upload (503): without
        it no limit is known, not even the largest file one lets through."""
        try:
            user, view = await self._plan(snap, user_id)
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="upload")
            raise StorageError(
                STORAGE_UNAVAILABLE,
                headers=[(b"retry-after", b"5")],
            ) from exc
        team, team_view = await self._team(snap, user)
        held = tuple(
            limit
            for limit in (*view.limits, *(team_view.limits if team_view is not None else ()))
            if limit.meter in UPLOAD_METERS
        )
        if not held:
            return NO_UPLOAD_LIMITS
        limits = UploadLimits(held, team=team, own=view.own)
        now = self._clock.now()
        periods = periods_at(now, snap.tz)
        try:
            mine = await self._storage.daily(periods.month_start, periods.day, user_id=user_id)
            theirs = (
                await self._storage.team_daily(team, start=periods.month_start, end=periods.day)
                if team is not None and any(limit.scope == "team" for limit in held)
                else []
            )
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="upload")
            log.warning(
                "uploads of %s not read, their limits not checked: %s", user_id, exc.message
            )
            return limits
        for limit in held:
            rows = theirs if limit.scope == "team" else mine
            used = Decimal(
                sum(
                    getattr(row, limit.meter)
                    for row in rows
                    if limit.per == "month" or row.day == periods.day
                )
            )
            if refuses(limit, used, Decimal(1)):
                raise self._upload_refusal(snap, limits, limit, used, periods, now)
        return limits

    async def reserve_upload(
        self, snap: Snapshot, user_id: str, limits: UploadLimits, *, key: str, size: int
    ) -> tuple[UploadTicket, Headers]:
        """Reserve an upload of a file of ``size`` bytes (its real size, read
        before the file is forwarded, or 0 when no limit counts bytes) under
        ``limits``, keyed by ``key`` (the request id), atomically with every
        other upload and answer of the user and their team, or raise the
        refusal: the ticket and the rate-limit headers. A database that fails
        to answer lets the upload through (fail-open) on a ticket whose outcome
        is not known (`UploadTicket.known`); a file larger than a limit's
        maximum is refused then too: no upload can make it fit."""
        now = self._clock.now()
        periods = periods_at(now, snap.tz)
        try:
            counted = await self._storage.reserve_upload(
                user_id,
                key=key,
                day=periods.day,
                month_start=periods.month_start,
                size=size,
                limits=limits.limits,
                team=limits.team,
            )
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="upload")
            charge = upload_charge(size)
            for limit in limits.limits:
                if refuses(limit, Decimal(0), charge.amount(limit.meter)):
                    raise self._upload_refusal(
                        snap, limits, limit, Decimal(0), periods, now
                    ) from exc
            log.warning(
                "upload of %s not known to be reserved, its limits not applied (fail-open): %s",
                user_id,
                exc.message,
            )
            # It may have landed (an answer lost after the commit): the later
            # count and the give-back go by its key, so neither counts it twice.
            return UploadTicket(user_id, key, periods.day, size, known=False), []
        shown = reported_limit(counted, limits.limits, periods, now=now)
        if not counted.admitted:
            assert counted.refused is not None
            refused = counted.refused
            raise self._upload_refusal(
                snap, limits, refused, counted.counters.of_limit(refused), periods, now
            )
        ticket = UploadTicket(user_id, key, periods.day, size, known=True)
        return ticket, shown.headers() if shown is not None else []

    async def release_upload(self, ticket: UploadTicket) -> None:
        """Give back an upload the upstream did not take (refused it, failed, or
        never got it). By its key, so it is given back once at most - also one
        whose reservation may not have landed; retried by the settler."""
        if not ticket.release():
            return
        await self._settler.release_upload(ticket.user_id, key=ticket.key, size=ticket.size)

    @staticmethod
    def _upload_refusal(
        snap: Snapshot,
        limits: UploadLimits,
        limit: Limit,
        used: Decimal,
        periods: Periods,
        now: datetime,
    ) -> QuotaExceeded:
        reset = reset_of(limit, periods)
        shown = RateLimit(limit.name, limit.max, used, reset)
        return limit_refusal(
            limit.name,
            limit.max,
            used=used,
            reset=reset.astimezone(snap.tz) if reset else None,
            own=limit.scope == "user" and limit.name in limits.own,
            headers=[(b"retry-after", str(shown.retry_after(now)).encode()), *shown.headers()],
            refused=limit,
        )

    async def refund(self, ticket: Ticket | None, request_id: str) -> None:
        """Return a reserved query (and its stream slot): no answer was produced."""
        if ticket is None or not ticket.release():
            return
        await self._settler.refund(
            ticket.user_id, day=ticket.day, lease_id=ticket.lease_id, pending_id=ticket.pending_id
        )
