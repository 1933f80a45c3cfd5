"""Users' plans, overrides and keys: the one set of rules the CLI, the admin API,
the dashboard and admission all apply (no I/O beyond the storage calls given).

- `effective_plan`: a user's plan with their overrides applied.
- `team_plan`: a team's plan with the team's overrides applied (issue 21).
- `check_plan` / `check_team_id`: one validation of a plan name and a team id.
- `parse_override` / `parse_override_text`: one validation of a per-user limit,
  from JSON (null is unlimited) or as typed on the command line.
- `issue_key`: the one way a key is made and stored; the secret exists only in
  what it returns.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

from gateway.config import LIMIT_NAMES, Config, Plan
from gateway.errors import BadRequest
from gateway.keys import new_key
from gateway.storage import ApiKey, OverrideValue, Storage, Team, User

__all__ = [
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


def check_plan(config: Config, plan: str) -> None:
    """Refuse a plan name the configuration does not define (users' and teams')."""
    if plan not in config.plans:
        raise BadRequest(f"No plan named {plan!r} (plans: {', '.join(sorted(config.plans))}).")


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
    if name not in LIMIT_NAMES:
        raise BadRequest(f"No limit named {name!r} (limits: {', '.join(LIMIT_NAMES)}).")
    if name == "advanced_rag":
        if not isinstance(value, bool):
            raise BadRequest("advanced_rag: expected true or false.")
        return value
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value < math.inf  # NaN and infinity are no limits to store
    ):
        raise BadRequest(f"{name}: expected a number >= 0 or null (unlimited).")
    if name != "file_size_mb" and not float(value).is_integer():
        raise BadRequest(f"{name}: expected a whole number.")
    return value if name == "file_size_mb" else int(value)


def parse_override_text(name: str, raw: str) -> OverrideValue:
    """A per-user override as typed: a number, "unlimited", or true/false; then
    checked exactly as `parse_override` checks JSON."""
    text = raw.strip().lower()
    value: object
    if name == "advanced_rag":
        value = True if text in _TRUE else False if text in _FALSE else raw
    elif text in _UNLIMITED:
        value = None
    else:
        try:
            value = float(text) if name == "file_size_mb" else int(text)
        except ValueError:
            value = raw
    return parse_override(name, value)


async def issue_key(
    storage: Storage, user_id: str, *, name: str = "", now: datetime
) -> tuple[ApiKey, str]:
    """A new key for an existing user; returns the record and the secret (shown once)."""
    key = new_key()
    record = await storage.create_key(
        user_id, key_id=key.id, key_hash=key.hash, prefix=key.prefix, name=name, now=now
    )
    return record, key.secret
