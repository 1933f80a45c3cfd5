"""Users' plans, overrides and keys: the one set of rules the CLI, the admin API,
the dashboard and admission all apply (no I/O beyond the storage calls given).

- `effective_plan`: a user's plan with their overrides applied.
- `team_plan`: a team's plan with the team's overrides applied (issue 21).
- `check_plan` / `check_team_id`: one validation of a plan name and a team id.
- `parse_override` / `parse_override_text`: one validation of a per-user limit,
  from JSON (null is unlimited) or as typed on the command line.
- `issue_key`: the one way a key is made and stored; the secret exists only in
  what it returns.
- `Accounts`: the admin operations (add a user, change a plan, set or clear an
  override, create or revoke a key; create a team, its plan and overrides, a
  user's team), each once: the check, the storage change,
  and the cache invalidation a running gateway needs (`Caches`). The admin API,
  the dashboard and the CLI all call these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Protocol

from gateway.config import (
    GENERAL_PREFIX,
    LIMIT_NAMES,
    MONEY_LIMITS,
    Config,
    Plan,
    is_override_name,
)
from gateway.errors import BadRequest, NotFound
from gateway.keys import new_key
from gateway.storage import ApiKey, Directory, OverrideValue, Team, User

__all__ = [
    "NO_CACHES",
    "Accounts",
    "Caches",
    "UnknownPlan",
    "check_plan",
    "check_team_id",
    "effective_plan",
    "issue_key",
    "parse_override",
    "parse_override_text",
    "team_plan",
]

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_UNLIMITED = frozenset({"unlimited", "none"})


def effective_plan(config: Config, user: User) -> Plan:
    """The limits that apply to ``user``: their plan with their overrides applied
    (a plan no longer configured falls back as `Config.plan` decides)."""
    return config.plan(user.plan).with_overrides(user.overrides)


def team_plan(config: Config, team: Team) -> Plan:
    """The limits that apply to ``team`` as a whole (issue 21): its plan with the
    team's overrides applied, as `effective_plan` does for a user."""
    return config.plan(team.plan).with_overrides(team.overrides)


class UnknownPlan(BadRequest):
    """A plan name the configuration in force does not define."""

    def __init__(self, plan: str, plans: list[str]) -> None:
        super().__init__(f"No plan named {plan!r} (plans: {', '.join(plans)}).")
        self.plan = plan
        self.plans = plans


def check_plan(config: Config, plan: str) -> None:
    """Refuse a plan name the configuration does not define (users' and teams')."""
    if plan not in config.plans:
        raise UnknownPlan(plan, sorted(config.plans))


# An operator's name for a team: it goes into URLs, CSV cells and the dashboard.
_TEAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def check_team_id(team_id: str) -> None:
    """Refuse a team id other than 1 to 64 letters, digits and ``. _ @ -``
    (starting with a letter or digit)."""
    if _TEAM_ID.fullmatch(team_id) is None:
        raise BadRequest(
            f"Invalid team id {team_id!r}: 1 to 64 letters, digits, '.', '_', '@' or '-'."
        )


def parse_override(name: str, value: object) -> OverrideValue:
    """A per-user override as JSON gives it: a number >= 0 (whole, except for
    ``file_size_mb``), null for unlimited, or a boolean for ``advanced_rag``."""
    if not is_override_name(name):
        raise BadRequest(
            f"No limit named {name!r} (limits: {', '.join(LIMIT_NAMES)}, "
            f"or {GENERAL_PREFIX}NAME for a [[plans.NAME.limits]] entry)."
        )
    if name == "advanced_rag":
        if not isinstance(value, bool):
            raise BadRequest("advanced_rag: expected true or false.")
        return value
    if value is None:
        return None
    if name in MONEY_LIMITS or name.startswith(GENERAL_PREFIX):
        # A general limit's new max, kept exact (its meter may be money).
        return _money(name, value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value < math.inf  # NaN and infinity are no limits to store
    ):
        raise BadRequest(f"{name}: expected a number >= 0 or null (unlimited).")
    if name != "file_size_mb" and not float(value).is_integer():
        raise BadRequest(f"{name}: expected a whole number.")
    return value if name == "file_size_mb" else int(value)


def _money(name: str, value: object) -> str:
    """A money limit: a decimal string or number >= 0, kept as its exact decimal
    string (never through a float)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"{name}: expected an amount >= 0 (a decimal string) or null.")
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else repr(value))
    except InvalidOperation:
        raise BadRequest(f"{name}: expected an amount >= 0 (a decimal string) or null.") from None
    if not amount.is_finite() or amount < 0:
        raise BadRequest(f"{name}: expected an amount >= 0 (a decimal string) or null.")
    return str(amount)


def parse_override_text(name: str, raw: str) -> OverrideValue:
    """A per-user override as typed: a number, "unlimited", or true/false; then
    checked exactly as `parse_override` checks JSON."""
    text = raw.strip().lower()
    value: object
    if name == "advanced_rag":
        value = True if text in _TRUE else False if text in _FALSE else raw
    elif text in _UNLIMITED:
        value = None
    elif name in MONEY_LIMITS or name.startswith(GENERAL_PREFIX):
        value = raw
    else:
        try:
            value = float(text) if name == "file_size_mb" else int(text)
        except ValueError:
            value = raw
    return parse_override(name, value)


async def issue_key(
    storage: Directory, user_id: str, *, name: str = "", now: datetime
) -> tuple[ApiKey, str]:
    """A new key for an existing user; returns the record and the secret (shown once)."""
    key = new_key()
    record = await storage.create_key(
        user_id, key_id=key.id, key_hash=key.hash, prefix=key.prefix, name=name, now=now
    )
    return record, key.secret


class Caches(Protocol):
    """What a running gateway caches of users and keys (gateway/auth.py): told
    when an admin operation changes the rows behind them."""

    def forget_user(self, user_id: str) -> None: ...

    def forget_key(self, key_id: str) -> None: ...

    def forget_team(self, team_id: str) -> None: ...


class _NoCaches:
    """A process that caches nothing (the CLI): nothing to forget."""

    def forget_user(self, user_id: str) -> None:
        return None

    def forget_key(self, key_id: str) -> None:
        return None

    def forget_team(self, team_id: str) -> None:
        return None


NO_CACHES: Caches = _NoCaches()


class Accounts:
    """The admin operations on users, plans, overrides and keys.

    ``config`` gives the configuration in force (a reload may change the plans);
    ``caches`` are told what to forget, so a change takes effect at once in this
    process (other processes' caches expire: ``auth.key_cache_ttl``).
    """

    __slots__ = ("_caches", "_config", "_now", "_storage")

    def __init__(
        self,
        storage: Directory,
        *,
        config: Callable[[], Config],
        caches: Caches = NO_CACHES,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._storage = storage
        self._config = config
        self._caches = caches
        self._now = now

    def _plan(self, plan: str) -> str:
        check_plan(self._config(), plan)
        return plan

    async def add_user(self, user_id: str, *, plan: str | None = None) -> User | None:
        """Create a user on ``plan`` (default: the default plan); returns the user
        that already exists instead, changed in nothing."""
        plan = self._plan(plan or self._config().accounting.default_plan)
        existing = await self._storage.get_user(user_id)
        if existing is not None:
            return existing
        await self._storage.ensure_user(user_id, plan=plan)
        return None

    async def set_plan(self, user_id: str, plan: str) -> None:
        """Move a user to another configured plan."""
        await self._storage.set_plan(user_id, self._plan(plan))
        self._caches.forget_user(user_id)

    async def set_override(self, user_id: str, name: str, value: object) -> OverrideValue:
        """Override one limit for a user (``value`` as JSON gives it, checked by
        `parse_override`); returns the value stored."""
        parsed = parse_override(name, value)
        await self._storage.set_override(user_id, name, parsed)
        self._caches.forget_user(user_id)
        return parsed

    async def clear_override(self, user_id: str, name: str) -> None:
        """Remove a per-user override: the plan's limit applies again."""
        await self._storage.clear_override(user_id, name)
        self._caches.forget_user(user_id)

    async def create_key(
        self, user_id: str, *, name: str = "", create_user: bool = False
    ) -> tuple[ApiKey, str]:
        """A new key for a user (created on the default plan with ``create_user``,
        else one that must exist); returns the record and the secret (shown once)."""
        if create_user:
            default = self._config().accounting.default_plan
            await self._storage.ensure_user(user_id, plan=default)
        elif await self._storage.get_user(user_id) is None:
            raise NotFound(f"No user {user_id!r}.")
        return await issue_key(self._storage, user_id, name=name, now=self._now())

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key; it stops working in this process at once."""
        key = await self._storage.revoke_key(key_id, now=self._now())
        self._caches.forget_key(key_id)
        return key

    # --- teams (issue 21) ---

    async def create_team(self, team_id: str, *, plan: str) -> Team:
        check_team_id(team_id)
        return await self._storage.create_team(team_id, plan=self._plan(plan), now=self._now())

    async def set_team_plan(self, team_id: str, plan: str) -> None:
        await self._storage.set_team_plan(team_id, self._plan(plan))
        self._caches.forget_team(team_id)

    async def set_team_override(self, team_id: str, name: str, value: object) -> OverrideValue:
        """Override one limit for a team (``value`` as JSON gives it)."""
        parsed = parse_override(name, value)
        await self._storage.set_team_override(team_id, name, parsed)
        self._caches.forget_team(team_id)
        return parsed

    async def clear_team_override(self, team_id: str, name: str) -> None:
        await self._storage.clear_team_override(team_id, name)
        self._caches.forget_team(team_id)

    async def set_team(self, user_id: str, team_id: str | None) -> None:
        """Put a user in a team, or (None) in none; their next request sees it."""
        await self._storage.set_team(user_id, team_id)
        self._caches.forget_user(user_id)
