"""What a configuration reload changes, as one frozen value swapped atomically.

A `Snapshot` is built whole from a configuration (`build_snapshot`) and never
changed; a reload builds the next one and `Current.install` makes it the one in
force in a single assignment. A request reads ``current.snapshot`` once, when it
arrives, and carries it to its end: its plan check, its dialect (routes, meter,
prices), its refusal messages and the terms it is settled on all come from one
version of the configuration, whatever a reload does meanwhile. A request that
arrives after the reload sees the new one.

What a reload does not change (the ``server``, ``upstream``, ``upstreams`` and
``database`` sections need a restart, except the upstreams' ``models``,
``fallbacks`` and ``headers`` (with ``headers_env``), which follow a reload
that changes nothing else of them) is in
every snapshot too, so a request needs nothing else to know where and how to
forward: the mounts and their routing (issue 23, gateway/mounts.py) and each
named upstream's address, key and timeouts (`Target`).
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx

from gateway.accounts import effective_plan, team_plan
from gateway.auth import Authenticator, TeamDirectory, UserDirectory
from gateway.config import GENERAL_PREFIX, Config, Plan, UpstreamConfig, is_override_name
from gateway.http import Headers, cgi_spelling
from gateway.messages import Catalogue
from gateway.mounts import RoutingTable, UpstreamRoute
from gateway.pricing import PriceTable
from gateway.quota.limits import Limit
from gateway.quota.plans import admission_limits, plan_limits, team_limits
from gateway.relay import STOP_LEAD
from gateway.settle import Terms
from gateway.storage import AdmissionLimits, Directory, User
from gateway.upstreams import Upstream, get_upstream

__all__ = ["Current", "PlanView", "Snapshot", "Target", "build_snapshot", "recover_after"]

log = logging.getLogger("gateway")

# Plan views kept per snapshot (one per plan and set of overrides in use): past
# this many, the cache starts again (a bound, not an eviction policy).
_VIEWS = 4096
# Team pairings kept per user's plan view (`PlanView.with_team`), with the same bound.
_TEAMS = 256


@dataclasses.dataclass(frozen=True, slots=True)
class PlanView:
    """An effective plan (a user's or a team's, overrides applied) and what the
    hot path derives from it, computed once per snapshot and set of overrides
    rather than per request (gateway/quota/plans.py)."""

    plan: Plan
    # The limits it sets, in checking order: the user's (`plan_limits`) or, for
    # a team, its team-scope ones (`team_limits`).
    limits: tuple[Limit, ...]
    own: frozenset[str]  # the limits its own overrides set ("your limit")
    # True when some limit holds only requests for some models (admission then
    # filters per request); otherwise ``admission`` is the whole set.
    per_model: bool
    admission: AdmissionLimits
    # A team's view -> the admission limits of this view with that team's (as
    # `admission_limits` orders them), for a view without per-model limits:
    # keyed by the team view's id and kept with it (compared by identity), so
    # an id reused after the snapshot's cache started again is never mistaken.
    _teams: dict[int, tuple[PlanView, AdmissionLimits]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )

    def with_team(self, team: PlanView) -> AdmissionLimits:
        """This view's admission limits, then ``team``'s (a view without
        per-model limits: the same for every request of the pair)."""
        kept = self._teams.get(id(team))
        if kept is not None and kept[0] is team:
            return kept[1]
        limits = admission_limits(self.limits, team.limits)
        if len(self._teams) >= _TEAMS:
            self._teams.clear()
        self._teams[id(team)] = (team, limits)
        return limits


def _view(plan: Plan, limits: tuple[Limit, ...], own: frozenset[str]) -> PlanView:
    per_model = any(limit.models for limit in limits)
    return PlanView(plan, limits, own, per_model, AdmissionLimits(limits))


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One named upstream, as a request is forwarded to it."""

    name: str
    settings: UpstreamConfig  # its table: timeouts, disconnect policy, event cap
    url: str  # its base URL, without a trailing "/"
    # The headers with its own key (and the account it acts for), in its
    # dialect's form, then the operator's own (its ``headers`` and ``headers_env``).
    credentials: tuple[tuple[bytes, bytes], ...] = dataclasses.field(repr=False)
    blocking_timeout: httpx.Timeout  # a blocking answer may take as long as any answer
    # The operator's header names as a CGI-reading server tells them apart (`cgi_spelling`): a
    # client's of the same name is never sent to this upstream, beside or
    # instead of the operator's, in either spelling.
    owned: frozenset[bytes] = frozenset()

    def request_headers(self, forward: Headers) -> Headers:
        """A request's headers for this upstream: the client's that are
        forwarded (``forward``, with the gateway's own), without those the
        operator sets here, then this upstream's `credentials`."""
        if not self.owned:
            return [*forward, *self.credentials]
        return [*self.client_headers(forward), *self.credentials]

    def client_headers(self, forward: Headers) -> Headers:
        """``forward`` without the headers the operator sets here (a request
        sent with no credentials: a CORS preflight), in either spelling a
        server reading them as CGI variables takes for one
        (`gateway.http.cgi_spelling`)."""
        owned = self.owned
        if not owned:
            return forward
        return [(name, value) for name, value in forward if cgi_spelling(name) not in owned]


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """One version of everything derived from the configuration in force."""

    config: Config
    tz: ZoneInfo  # accounting.timezone: the local day of the limits
    # The dialect of the primary upstream (config.primary): the shape of what is
    # answered outside any mount. A request uses its mount's, from `dialects`.
    upstream: Upstream
    dialects: Mapping[str, Upstream]  # by kind, with their own settings (prices)
    terms: Terms  # what an answer is settled on: its token bound, the metric labels
    messages: Catalogue  # refusal messages (issue 25)
    auth: Authenticator  # key and user caches carried over from the previous one
    users: UserDirectory
    teams: TeamDirectory  # issue 21
    user_header: bytes  # auth.trusted_header.user_header, lower case
    # From the sections fixed until a restart:
    routing: RoutingTable  # mounts, models and fallbacks (issue 23)
    targets: Mapping[str, Target]  # by upstream name
    lease_ttl: timedelta  # a stream lease outlives the longest an answer can take
    # Whether any plan has a model allow-list (none: no request's models are read
    # for one).
    model_lists: bool = False
    # (plan name, overrides) -> its PlanView; filled as requests come.
    _views: dict[object, PlanView] = dataclasses.field(default_factory=dict, repr=False)

    def today(self, now: datetime) -> date:
        """The local calendar day at ``now``, in the configured time zone."""
        return now.astimezone(self.tz).date()

    async def identify(self, authorization: bytes | None, user_header: bytes | None) -> str:
        """The end user behind a request's credential (created on first use, or
        refused, in the modes that can name users the gateway has not seen)."""
        config = self.config
        identity = await self.auth.authenticate(authorization, user_header)
        if config.auth.mode != "api_key":
            await self.users.resolve(
                identity,
                default_plan=config.accounting.default_plan,
                create=config.auth.unknown_users == "create",
            )
        return identity.user_id

    def plan_view(self, user: User) -> PlanView:
        """The user's effective plan (`effective_plan`) and its limits, computed
        once per snapshot for each plan and set of overrides."""
        overrides = user.overrides
        key: object = (user.plan, frozenset(overrides.items())) if overrides else user.plan
        view = self._views.get(key)
        if view is None:
            plan = effective_plan(self.config, user)
            own = frozenset(
                name.removeprefix(GENERAL_PREFIX) for name in overrides if is_override_name(name)
            )
            view = self._keep(key, _view(plan, plan_limits(plan), own))
        return view

    async def team_view(self, user: User) -> PlanView | None:
        """The effective plan of ``user``'s team (its plan with the team's
        overrides) and its team-scope limits, or None when the user is in no
        team. The team-scope limits a request must also fit (issue 21); a team
        removed from under a cached user counts as none."""
        if user.team is None:
            return None
        team = await self.teams.get(user.team)
        if team is None:
            return None
        overrides = team.overrides
        key = ("team", team.plan, frozenset(overrides.items()))
        view = self._views.get(key)
        if view is None:
            plan = team_plan(self.config, team)
            view = self._keep(key, _view(plan, team_limits(plan), frozenset()))
        return view

    async def team_plan(self, user: User) -> Plan | None:
        """The effective plan of ``user``'s team, or None (`team_view`)."""
        view = await self.team_view(user)
        return view.plan if view is not None else None

    def _keep(self, key: object, view: PlanView) -> PlanView:
        if len(self._views) >= _VIEWS:
            self._views.clear()
        self._views[key] = view
        return view


def _chain(ups: Mapping[str, UpstreamConfig], first: str) -> list[UpstreamConfig]:
    """The upstreams a request sent to ``first`` may try, as RoutingTable.attempts
    orders them (depth first, each once), before any is left out for its models."""
    chain: list[UpstreamConfig] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in ups:
            return
        seen.add(name)
        chain.append(ups[name])
        for fallback in ups[name].fallbacks:
            visit(fallback)

    visit(first)
    return chain


def longest_answer(config: Config) -> float:
    """The longest an answer can take, in seconds, from its admission: along the
    longest chain of fallbacks a request may walk (issue 23), each attempt but
    the last waiting for its headers (a blocking answer: connect_timeout, then
    up to total_timeout), the last one its deadline, then the grace given to one
    whose client left, each read on after the stop call it brings."""
    longest = 0.0
    for first in config.upstreams:
        chain = _chain(config.upstreams, first)
        waits = sum(up.connect_timeout + up.total_timeout for up in chain)
        for last in chain:
            ends = last.total_timeout + last.disconnect_grace
            if not get_upstream(last.kind, config).stops_by_closing:
                # Each deadline read on after the stop call it brings (relay.STOP_LEAD).
                ends += min(STOP_LEAD, last.total_timeout) + min(STOP_LEAD, last.disconnect_grace)
            longest = max(longest, waits - last.connect_timeout - last.total_timeout + ends)
    return longest


def recover_after(config: Config) -> timedelta:
    """How old a pending answer is when its gateway is taken for dead
    (docs/quotas.md, "Crash safety"): never before the longest answer could end."""
    longest = longest_answer(config)
    after = config.database.recover_after or longest + 60
    if after < longest:
        log.warning(
            "database.recover_after (%s s) is shorter than the longest an answer can take; using %s s",
            after,
            longest,
        )
        after = longest
    return timedelta(seconds=after)


def build_snapshot(
    config: Config, storage: Directory, previous: Snapshot | None = None
) -> Snapshot:
    """Everything derived from ``config``, built before anything is swapped in: a
    failure leaves the running snapshot whole. The key and user caches outlive a
    reload (gateway/auth.py): what they hold is in the database, which a reload
    does not change."""
    # Rebuilt so that a dialect's own settings (prices) follow a reload.
    dialects = {up.kind: get_upstream(up.kind, config) for up in config.upstreams.values()}
    return Snapshot(
        config=config,
        tz=config.tz,
        upstream=dialects[config.primary.kind],
        dialects=types.MappingProxyType(dialects),
        terms=Terms(config.accounting.max_tokens_per_answer, PriceTable(config.prices)),
        messages=Catalogue(config.messages.default_language, config.messages.templates),
        auth=Authenticator(
            storage,
            config.auth,
            plans=config.plans,
            previous=previous.auth if previous is not None else None,
        ),
        users=UserDirectory(
            storage,
            ttl=config.auth.key_cache_ttl,
            previous=previous.users if previous is not None else None,
        ),
        teams=TeamDirectory(
            storage,
            ttl=config.auth.key_cache_ttl,
            previous=previous.teams if previous is not None else None,
        ),
        user_header=config.auth.trusted_header.user_header.lower().encode(),
        routing=routing_table(config),
        targets=types.MappingProxyType(
            {name: _target(up, dialects[up.kind]) for name, up in config.upstreams.items()}
        ),
        lease_ttl=timedelta(seconds=longest_answer(config) + 60),
        model_lists=any(plan.models is not None for plan in config.plans.values()),
    )


def routing_table(config: Config) -> RoutingTable:
    """The mounts of ``config``'s upstreams (checked at load: gateway/mounts.py)."""
    return RoutingTable(
        [
            UpstreamRoute(
                name, up.kind, up.mount, models=up.models, fallbacks=up.fallbacks, allow=up.allow
            )
            for name, up in config.upstreams.items()
        ]
    )


def _target(up: UpstreamConfig, dialect: Upstream) -> Target:
    # The operator's headers for a router in front of the provider, checked at
    # load (gateway/config.py `_check_headers`): lower case, as HTTP/2 sends them.
    own = tuple(
        (name.lower().encode(), value.encode())  # visible ASCII (checked at load)
        for name, value in (*up.headers.items(), *up.header_secrets.items())
    )
    return Target(
        name=up.name,
        settings=up,
        url=up.url,
        # The headers that carry the operator's key for this upstream: its
        # dialect's (Anthropic's x-api-key). Never another upstream's key, nor
        # another upstream's headers.
        credentials=dialect.upstream_credentials(up) + own,
        owned=frozenset(cgi_spelling(name) for name, _ in own),
        blocking_timeout=httpx.Timeout(
            connect=up.connect_timeout,
            read=up.total_timeout,
            write=up.read_timeout,
            pool=up.connect_timeout,
        ),
    )


class Current:
    """The snapshot in force. Read ``snapshot`` once per request (or per report)
    and keep what was read; `install` swaps in the next one."""

    __slots__ = ("snapshot",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def install(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
