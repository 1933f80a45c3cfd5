"""The pricing terms a dialect that prices its own answers (OpenAI's, Anthropic's)
reads from the configuration, read one way for both."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from gateway.pricing import CallPrice, PriceTable
from gateway.usage_bounds import DEFAULT_MAX_TOKENS_PER_ANSWER

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger("gateway.upstreams")


@dataclass(frozen=True, slots=True)
class PricingTerms:
    """The model prices, the per-answer token cap, whether an unpriced model is
    answered, and the dialect's side calls' prices by name (without its prefix)."""

    prices: PriceTable
    max_tokens: int
    allow_unpriced: bool
    call_prices: Mapping[str, CallPrice]


def pricing_terms(config: Config | None, prefix: str) -> PricingTerms:
    """The dialect's pricing terms; without a configuration (tests of the wire
    format alone) nothing is priced and nothing is refused."""
    if config is None:
        return PricingTerms(PriceTable({}), DEFAULT_MAX_TOKENS_PER_ANSWER, True, {})
    return PricingTerms(
        PriceTable(config.prices),
        config.accounting.max_tokens_per_answer,
        config.pricing.unpriced_models == "allow",
        {
            name.removeprefix(prefix): price
            for name, price in config.call_prices.items()
            if name.startswith(prefix)
        },
    )


def calls_cost(
    call_prices: Mapping[str, CallPrice], calls: Mapping[str, int]
) -> tuple[Decimal, str | None]:
    """What an answer's side calls cost (exact decimals) and in which currency
    (None: none of them has a price). A call without a price is refused at the
    request unless the answer ran a tool it did not list (a stored prompt's
    tools): it cannot be priced, so it is said."""
    cost = Decimal(0)
    currency = None
    for tool, count in calls.items():
        price = call_prices.get(tool)
        if price is None:
            log.warning("an answer ran %d call(s) of %r, which has no price", count, tool)
            continue
        cost += price.price * count
        currency = price.currency
    return cost, currency
