"""PriceTable.priced: the cost of a usage, and every other field kept as it was."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from gateway.pricing import Audio, Price, PriceTable
from gateway.usage import Usage

PRICE = Price(
    input=Decimal("2.5"),
    output=Decimal("10"),
    cached_input=Decimal("1.25"),
    cache_write_input=Decimal("3.75"),
    audio_input=Decimal("40"),
    audio_output=Decimal("80"),
    currency="EUR",
)
# Every field away from its default, so a field priced() forgets to pass on shows.
USAGE = Usage(
    prompt_tokens=1000,
    completion_tokens=300,
    total_tokens=1300,
    cost=Decimal("99"),
    currency="VND",
    estimated=True,
    cached_tokens=200,
    reasoning_tokens=50,
    cache_write_tokens=100,
    clamped=("total_tokens=-5",),
)


def test_every_field_of_usage_is_set_away_from_its_default() -> None:
    # The guard of the next test: a field added to Usage must be set in USAGE.
    for f in dataclasses.fields(Usage):
        assert getattr(USAGE, f.name) != f.default, f.name


def test_priced_sets_cost_and_currency_and_keeps_every_other_field() -> None:
    priced, found = PriceTable({"gpt-4o": PRICE}).priced(USAGE, "gpt-4o")
    assert found
    expected_cost = (
        Decimal(700) * Decimal("2.5")
        + Decimal(200) * Decimal("1.25")
        + Decimal(100) * Decimal("3.75")
        + Decimal(300) * Decimal("10")
    ).scaleb(-6)
    assert priced == dataclasses.replace(USAGE, cost=expected_cost, currency="EUR")


def test_priced_with_max_tokens_prices_the_bound_and_keeps_the_counts() -> None:
    audio = Audio(prompt=10, completion=20)
    priced, _ = PriceTable({"gpt-4o": PRICE}).priced(USAGE, "gpt-4o", max_tokens=150, audio=audio)
    bounded = dataclasses.replace(
        USAGE, prompt_tokens=150, completion_tokens=150, cached_tokens=150, cache_write_tokens=100
    )
    assert priced == dataclasses.replace(
        USAGE, cost=PRICE.cost(bounded, audio=audio), currency="EUR"
    )
    # 150 prompt tokens: 150 cached, none written; 150 completion tokens; audio 0 + 20.
    assert priced.cost == (
        Decimal(150) * Decimal("1.25") + Decimal(150) * Decimal("10") + 20 * Decimal(70)
    ).scaleb(-6)


def test_unpriced_usage_is_returned_as_it_is() -> None:
    assert PriceTable({"gpt-4o": PRICE}).priced(USAGE, "other", None) == (USAGE, False)
