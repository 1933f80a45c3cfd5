"""Prices per model and the cost of an answer: pure arithmetic on decimals.

Upstreams such as OpenAI report tokens but not money, so the gateway prices the
tokens itself from the table in ``[prices."MODEL"]`` (docs/upstreams/openai.md). Prices are
per one million tokens, as providers publish them; the arithmetic is exact
(``Decimal`` all the way, the division a shift of the exponent).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from gateway.errors import ConfigError
from gateway.usage import ZERO, Usage

__all__ = [
    "CACHE_WRITE_1H_RATE",
    "Audio",
    "CallPrice",
    "Price",
    "PriceTable",
    "check_currencies",
    "is_snapshot_suffix",
]

# What a dated snapshot adds to its model's name, and nothing else: OpenAI's
# "-2024-08-06" and older "-0613"/"-1106" (month and day), and the "-20241022" of
# other providers. A name that goes on past the date ("gpt-4-1106-preview") or
# adds anything that is not a date ("o3-pro", "gpt-4o-mini-tts") is another
# model, with a price of its own (issue 20).
_MONTH_DAY: Final = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"
_MONTH_DAY_DASHED: Final = r"(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_SNAPSHOT: Final = re.compile(
    rf"-(?:20[0-9]{{2}}-{_MONTH_DAY_DASHED}|20[0-9]{{2}}{_MONTH_DAY}|{_MONTH_DAY})"
)


# What Anthropic bills a 1-hour cache write at, in multiples of the input price
# (its pricing page, "Prompt caching": 5-minute writes 1.25x, 1-hour writes 2x,
# reads 0.1x): the price of a 1-hour write [prices] does not set.
CACHE_WRITE_1H_RATE: Final = Decimal(2)


def is_snapshot_suffix(suffix: str) -> bool:
    """Whether ``suffix`` (what follows a model name) is a snapshot's date."""
    return _SNAPSHOT.fullmatch(suffix) is not None


_SNAPSHOT_AT_END: Final = re.compile(_SNAPSHOT.pattern + "$")


def snapshot_base(model: str) -> str | None:
    """The model a dated snapshot is of ("gpt-4o" of "gpt-4o-2024-08-06"), as
    the price table prices it; None for a name that ends in no date."""
    found = _SNAPSHOT_AT_END.search(model)
    return model[: found.start()] if found is not None and found.start() else None


@dataclass(frozen=True, slots=True)
class Price:
    """What one million tokens of a model cost.

    ``cached_input`` prices prompt tokens read from the provider's prompt cache;
    None bills them at ``input``. ``cache_write_input`` prices prompt tokens
    written to it (Anthropic bills cache writes above the input rate); None bills
    them at ``input``. ``cache_write_1h_input`` prices those of the cache writes
    that went to a 1-hour cache (Anthropic's ``ttl: "1h"``, billed at 2x input
    where the 5-minute write is 1.25x); None bills them at ``CACHE_WRITE_1H_RATE``
    times ``input`` (Anthropic's own multiplier), or at the 5-minute write's price
    when that is dearer, never below either (`cache_write_1h_rate`). Reasoning
    tokens are part of the completion tokens and billed as output, as providers
    bill them. ``audio_input`` and
    ``audio_output`` price the audio tokens among the prompt and completion
    tokens (OpenAI's audio models bill them at an audio rate); None bills them
    at ``input`` and ``output``.
    """

    # The configuration loader refuses negative prices ("min").
    input: Decimal = field(default=ZERO, metadata={"min": 0})
    output: Decimal = field(default=ZERO, metadata={"min": 0})
    cached_input: Decimal | None = field(default=None, metadata={"min": 0})
    cache_write_input: Decimal | None = field(default=None, metadata={"min": 0})
    cache_write_1h_input: Decimal | None = field(default=None, metadata={"min": 0})
    audio_input: Decimal | None = field(default=None, metadata={"min": 0})
    audio_output: Decimal | None = field(default=None, metadata={"min": 0})
    currency: str = "USD"

    def cost(self, usage: Usage, *, audio: Audio | None = None) -> Decimal:
        return self.cost_of(
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.cache_write_tokens,
            audio,
            cache_write_1h_tokens=usage.cache_write_1h_tokens,
        )

    def cache_write_1h_rate(self) -> Decimal:
        """The price of one million 1-hour cache writes: ``cache_write_1h_input``,
        else the dearer of ``CACHE_WRITE_1H_RATE`` x ``input`` and the 5-minute
        write's price: 1-hour writes the request did not ask for (or that a
        model without the price reported) are never charged below what
        Anthropic bills for them."""
        if self.cache_write_1h_input is not None:
            return self.cache_write_1h_input
        five_minutes = self.input if self.cache_write_input is None else self.cache_write_input
        return max(self.input * CACHE_WRITE_1H_RATE, five_minutes)

    def cost_of(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        cache_write_tokens: int,
        audio: Audio | None = None,
        *,
        cache_write_1h_tokens: int = 0,
    ) -> Decimal:
        """`cost` from the counts themselves (no `Usage` built to hold them)."""
        cached = min(cached_tokens, prompt_tokens)
        # Cache reads and cache writes are both parts of the prompt tokens, and
        # the 1-hour writes a part of the writes.
        written = min(cache_write_tokens, prompt_tokens - cached)
        written_1h = min(cache_write_1h_tokens, written)
        cached_price = self.input if self.cached_input is None else self.cached_input
        write_price = self.input if self.cache_write_input is None else self.cache_write_input
        micro = (
            (prompt_tokens - cached - written) * self.input
            + cached * cached_price
            + (written - written_1h) * write_price
            + completion_tokens * self.output
        )
        if written_1h > 0:
            micro += written_1h * self.cache_write_1h_rate()
        if audio is not None:
            # Audio tokens are counted among the prompt (not cached) and completion
            # tokens, already priced above at the text rate: add the difference.
            heard = min(audio.prompt, prompt_tokens - cached - written)
            spoken = min(audio.completion, completion_tokens)
            if self.audio_input is not None:
                micro += heard * (self.audio_input - self.input)
            if self.audio_output is not None:
                micro += spoken * (self.audio_output - self.output)
        # Per million tokens: an exact shift of the decimal exponent, no rounding.
        return micro.scaleb(-6) if micro else ZERO


@dataclass(frozen=True, slots=True)
class Audio:
    """The audio tokens among an answer's prompt and completion tokens, where the
    upstream reports them (OpenAI's ``*_tokens_details.audio_tokens``)."""

    prompt: int = 0
    completion: int = 0


@dataclass(frozen=True, slots=True)
class CallPrice:
    """What one use of a paid side call costs: a tool an answer ran (OpenAI's
    ``web_search``), or an upstream endpoint billed per call (Dify's
    text-to-audio). Named in ``[call_prices."NAME"]`` (docs/configuration.md);
    a paid call without a price is refused, never forwarded free."""

    price: Decimal = field(default=ZERO, metadata={"min": 0})
    currency: str = "USD"


class PriceTable:
    """Finds a model's price: by its exact name, else by the configured name it
    extends with a snapshot's date (``gpt-4o-2024-08-06`` priced as ``gpt-4o``,
    ``gpt-4-0613`` as ``gpt-4``; see ``is_snapshot_suffix``), else the ``"*"``
    entry when there is one."""

    __slots__ = ("_by_length", "_prices")

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)
        self._by_length = sorted((name for name in prices if name != "*"), key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._prices)

    def name(self, model: str) -> str | None:
        """The configured name that prices ``model`` (itself, or the base name of
        a dated snapshot), not counting ``"*"``; None when the table names none."""
        if model in self._prices and model != "*":
            return model
        for name in self._by_length:
            if model.startswith(name) and is_snapshot_suffix(model[len(name) :]):
                return name
        return None

    def prices(self, model: str | None) -> bool:
        """Whether the table has a price for ``model`` (its own, or ``"*"``)."""
        return self.find(model) is not None

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
        self,
        usage: Usage,
        *models: str | None,
        max_tokens: int | None = None,
        audio: Audio | None = None,
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
        prompt = usage.prompt_tokens
        completion = usage.completion_tokens
        cached = usage.cached_tokens
        written = usage.cache_write_tokens
        written_1h = usage.cache_write_1h_tokens
        if max_tokens is not None:
            prompt = min(prompt, max_tokens)
            completion = min(completion, max_tokens)
            cached = min(cached, max_tokens)
            written = min(written, max_tokens)
            written_1h = min(written_1h, max_tokens)
        cost = price.cost_of(
            prompt, completion, cached, written, audio, cache_write_1h_tokens=written_1h
        )
        # Built whole rather than with dataclasses.replace (a loop over the fields
        # on every priced answer); tests/test_pricing.py fails if a field of Usage
        # is not passed on here.
        return Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cost=cost,
            currency=price.currency,
            estimated=usage.estimated,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            cache_write_1h_tokens=usage.cache_write_1h_tokens,
            clamped=usage.clamped,
        ), True


def check_currencies(prices: Mapping[str, Price], call_prices: Mapping[str, CallPrice]) -> None:
    """Refuse prices in more than one currency: ``[prices]`` entries that differ
    from each other, and ``[call_prices]`` entries that differ from each other or
    from ``[prices]``. Costs are added into one lifetime, daily and monthly total
    per user, and a tool's cost into the cost of the answer that ran it; none of
    that can add VND to USD (issue 25). Raises ``ConfigError`` naming both keys."""
    keyed = [(f"prices.{m}", p.currency) for m, p in prices.items()]
    keyed += [(f"call_prices.{c}", p.currency) for c, p in call_prices.items()]
    if keyed:
        first_key, first = keyed[0]
        for key, currency in keyed[1:]:
            if currency != first:
                raise ConfigError(
                    f"{key}.currency: {currency!r} differs from {first_key}.currency "
                    f"{first!r} (costs are added into one total per user, so every "
                    "price must be in one currency)"
                )
