"""Prices per model and the cost of an answer: pure arithmetic on decimals.

Upstreams such as OpenAI report tokens but not money, so the gateway prices the
tokens itself from the table in ``[prices."MODEL"]`` (docs/upstreams/openai.md). Prices are
per one million tokens, as providers publish them; the arithmetic is exact
(``Decimal`` all the way, the division a shift of the exponent).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal

from gateway.usage import ZERO, Usage

__all__ = ["CallPrice", "Price", "PriceTable"]


@dataclass(frozen=True, slots=True)
class Price:
    """What one million tokens of a model cost.

    ``cached_input`` prices prompt tokens read from the provider's prompt cache;
    None bills them at ``input``. Reasoning tokens are part of the completion
    tokens and billed as output, as providers bill them.
    """

    # The configuration loader refuses negative prices ("min").
    input: Decimal = field(default=ZERO, metadata={"min": 0})
    output: Decimal = field(default=ZERO, metadata={"min": 0})
    cached_input: Decimal | None = field(default=None, metadata={"min": 0})
    currency: str = "USD"

    def cost(self, usage: Usage) -> Decimal:
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        micro = (
            (usage.prompt_tokens - cached) * self.input
            + cached * cached_price
            + usage.completion_tokens * self.output
        )
        # Per million tokens: an exact shift of the decimal exponent, no rounding.
        return micro.scaleb(-6) if micro else ZERO


@dataclass(frozen=True, slots=True)
class CallPrice:
    """What one use of a paid side call costs: a tool an answer ran (OpenAI's
    ``web_search``), or an upstream endpoint billed per call (Dify's
    text-to-audio). Named in ``[call_prices."NAME"]`` (docs/configuration.md);
    a paid call without a price is refused, never forwarded free."""

    price: Decimal = field(default=ZERO, metadata={"min": 0})
    currency: str = "USD"


class PriceTable:
    """Finds a model's price: by its exact name, else by the longest configured
    name it extends with a ``-`` (a dated snapshot such as ``gpt-4o-2024-08-06``
    priced as ``gpt-4o``), else the ``"*"`` entry when there is one."""

    __slots__ = ("_by_length", "_prices")

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)
        self._by_length = sorted((name for name in prices if name != "*"), key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._prices)

    def name(self, model: str) -> str | None:
        """The configured name that prices ``model`` (itself, or the base name of
        a snapshot), not counting ``"*"``; None when the table names none."""
        if model in self._prices and model != "*":
            return model
        for name in self._by_length:
            if model.startswith(name) and model[len(name) : len(name) + 1] == "-":
                return name
        return None

    def find(self, *models: str | None) -> Price | None:
        """The price of the first of ``models`` the table names, else ``"*"``."""
        for model in models:
            name = None if model is None else self.name(model)
            if name is not None:
                return self._prices[name]
        return self._prices.get("*")

    def label(self, model: str | None) -> str:
        """``model`` as a metrics label: the configured name that prices it, so
        the label values are the table's few names whatever a client asks for;
        ``"other"`` for a model the table does not name; ``""`` for none (Dify)."""
        if model is None:
            return ""
        return self.name(model) or "other"

    def priced(
        self, usage: Usage, *models: str | None, max_tokens: int | None = None
    ) -> tuple[Usage, bool]:
        """``usage`` with its cost from the first of ``models`` the table prices
        (the model that answered, then the one asked for); and whether one was found.
        Unpriced usage keeps the cost it had.

        With ``max_tokens``, counts above it are priced as ``max_tokens``: the ledger
        records them at that bound (docs/proxy.md, "Clamped answers"), and the cost
        is that of the tokens charged. The counts themselves are left as reported,
        for the ledger's bounds to find and mark."""
        price = self.find(*models)
        if price is None:
            return usage, False
        counted = usage
        if max_tokens is not None:
            counted = replace(
                usage,
                prompt_tokens=min(usage.prompt_tokens, max_tokens),
                completion_tokens=min(usage.completion_tokens, max_tokens),
                cached_tokens=min(usage.cached_tokens, max_tokens),
            )
        return replace(usage, cost=price.cost(counted), currency=price.currency), True
