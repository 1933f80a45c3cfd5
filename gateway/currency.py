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

Pure decisions here; the one storage read (`Storage.costs_by_currency`) is made
by the callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Final

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.storage import Storage

__all__ = [
    "DEFAULT_CURRENCY",
    "CurrencyMismatch",
    "check",
    "configured",
    "database_currency",
    "serving",
    "shown",
]

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


async def check(storage: Storage, config: Config) -> str:
    """`serving` over what ``storage``'s ledger holds."""
    return serving(config, await storage.costs_by_currency())
