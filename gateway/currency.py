"""The one currency a database keeps its money in (issue 25).

Each day row (``usage_daily.cost``) and each user's lifetime total
(``users.lifetime_cost``) holds one cost number with no currency beside it, and
cost limits compare against those numbers. They are only sums while every cost
added into them was in the same currency. The ledger (``usage_events``) records
each answer's currency, so it can say which currency the totals are in.

The rule (docs/configuration.md, "Currency"): a database holds costs in one
currency. The gateway refuses to serve when the configured prices are in another
currency than the costs the ledger already holds, or when the ledger already
holds costs in more than one; what is summed from the ledger itself (usage per
model) is grouped by currency and never added across currencies.

Pure decisions here; the one storage read (`ReportReads.costs_by_currency`) is made
by the callers. `Money` is the running gateway's state of it (gateway/runtime.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Final

from gateway.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.storage import ReportReads

__all__ = [
    "DEFAULT_CURRENCY",
    "CurrencyMismatch",
    "Money",
    "check",
    "configured",
    "database_currency",
    "serving",
    "shown",
]

log = logging.getLogger("gateway")

# What an answer is recorded in when nothing names a currency (Dify's usage
# without one, a configuration without prices): the record's own default.
DEFAULT_CURRENCY: Final = "USD"


class CurrencyMismatch(ConfigError):
    """The configuration and the database disagree on the currency of money (or
    the database already mixes two); the message says what to do."""


def configured(config: Config) -> tuple[str, str] | None:
    """The configured currency and the key that sets it (``prices.MODEL.currency``),
    or None without prices. The loader has refused prices in more than one
    currency (`gateway.pricing.check_currencies`), so the first entry speaks for all."""
    for model, price in config.prices.items():
        return f"prices.{model}.currency", price.currency
    for name, call_price in config.call_prices.items():
        return f"call_prices.{name}.currency", call_price.currency
    return None


def database_currency(costs: Mapping[str, Decimal]) -> str | None:
    """The one currency of the ledger's costs (``costs``: the ledger's cost per
    currency), None when it holds none. Raises `CurrencyMismatch` when it holds
    costs in more than one: its day rows and lifetime totals add them already."""
    found = sorted(currency for currency, total in costs.items() if total)
    if len(found) > 1:
        raise CurrencyMismatch(
            "the database's ledger holds costs in "
            + " and ".join(repr(c) for c in found)
            + " (usage_events.currency); its day rows and lifetime totals hold one cost "
            "number each, so they add these together and no currency is right for them. "
            "Export the ledger (gateway usage export), whose rows keep their own currency, "
            "and point [database] url at a new database"
        )
    return found[0] if found else None


def serving(config: Config, costs: Mapping[str, Decimal]) -> str:
    """The currency the gateway records and shows money in, given the ledger's cost
    per currency: the configured one, which must be the ledger's if it holds any.

    Raises `CurrencyMismatch` naming the configuration key, the currency found in
    the ledger and what to do, so that no total ever adds two currencies."""
    held = database_currency(costs)
    setting = configured(config)
    if setting is None:
        return held or DEFAULT_CURRENCY
    key, wanted = setting
    if held is not None and held != wanted:
        raise CurrencyMismatch(
            f"{key} is {wanted!r}, but this database already holds costs in {held!r} "
            "(usage_events.currency); its day rows, lifetime totals and cost limits hold "
            f"one cost number each and cannot add {wanted} to {held}. Set the currency "
            f"back to {held!r}, or point [database] url at a new database for {wanted} "
            "(export this one first with gateway usage export)"
        )
    return wanted


def shown(costs: Mapping[str, Decimal], config: Config) -> str:
    """The currency of the database's totals, for tools that only read them (the
    CLI): the ledger's own currency whatever the configuration now says, else the
    configured one. Raises `CurrencyMismatch` when the ledger mixes currencies."""
    held = database_currency(costs)
    if held is not None:
        return held
    setting = configured(config)
    return setting[1] if setting is not None else DEFAULT_CURRENCY


async def check(storage: ReportReads, config: Config) -> str:
    """`serving` over what ``storage``'s ledger holds."""
    return serving(config, await storage.costs_by_currency())


class Money:
    """The currency a running gateway records and shows money in (``code``).

    Fixed at start by the prices or by the costs the ledger holds; without either,
    the first cost an upstream reports in its own currency (Dify's) fixes it
    (`cost_recorded`, told by the settler). A reload may change it only as
    `after_reload` allows.
    """

    __slots__ = ("_fixed", "code")

    def __init__(self, config: Config, costs: Mapping[str, Decimal]) -> None:
        # Refuses to serve a configuration whose prices are in another currency
        # than the money the database holds.
        self.code = serving(config, costs)
        # Whether a price or a recorded cost has fixed it.
        self._fixed = configured(config) is not None or database_currency(costs) is not None

    async def after_reload(self, storage: ReportReads, new: Config) -> str:
        """The currency money is recorded in under ``new``: the one in force when
        ``new`` prices in it too (no database read, so a reload during a database
        outage still applies); else the database is asked whether it holds costs in
        another currency (`serving`), and the reload is refused if it does or
        cannot say."""
        running = self.code
        setting = configured(new)
        if setting is None or setting[1] == running:
            return running
        try:
            return await check(storage, new)
        except StorageError as exc:
            raise StorageError(
                f"{setting[0]} changes the currency to {setting[1]!r}, and the database "
                f"cannot say whether it holds costs in {running!r}: {exc.message}"
            ) from exc

    def reloaded(self, code: str, new: Config) -> None:
        """The reload to ``new`` was applied, recording money in ``code``."""
        self.code = code
        self._fixed = self._fixed or configured(new) is not None

    def cost_recorded(self, code: str) -> None:
        """A cost in currency ``code`` was recorded. Without prices the upstream
        names the currency (Dify reports its own with each answer): the first cost
        fixes the database's. Another one after that already sits in the totals
        (the ledger row keeps it, never lost): said loudly, and the next start-up
        refuses (docs/configuration.md, "Currency")."""
        if code == self.code:
            self._fixed = True
        elif not self._fixed:
            self.code, self._fixed = code, True
        else:
            log.error(
                "recorded a cost in %s, but this database keeps its money in %s: its day "
                "rows and lifetime totals now add both, and the gateway will refuse to "
                "start on it (docs/configuration.md, Currency)",
                code,
                self.code,
            )
