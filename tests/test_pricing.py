"""PriceTable.priced: the cost of a usage, and every other field kept as it was."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from gateway.pricing import Audio, Price, PriceTable
from gateway.usage import Usage

PRICE = Price(
    input=Decimal("2.5"),
    output=Decimal("10"),
    cached_input=Decimal("1.25"),
    cache_write_input=Decimal("3.75"),
    cache_write_1h_input=Decimal("5"),
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
    cache_write_1h_tokens=40,
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
        + Decimal(60) * Decimal("3.75")
        + Decimal(40) * Decimal("5")
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


# --- Anthropic's 1-hour cache writes (billed at 2x input; the 5-minute ones 1.25x) ---

SONNET = Price(
    input=Decimal("3"),
    output=Decimal("15"),
    cached_input=Decimal("0.30"),
    cache_write_input=Decimal("3.75"),
    cache_write_1h_input=Decimal("6"),
)
# 1,000 uncached, 500 read, 800 written (300 of them to a 1-hour cache), 100 out.
WRITES = Usage(
    2300, 100, 2400, cached_tokens=500, cache_write_tokens=800, cache_write_1h_tokens=300
)


def test_one_hour_cache_writes_are_priced_at_their_own_rate() -> None:
    cost = SONNET.cost(WRITES)
    assert cost == Decimal("0.008325")  # (3000 + 150 + 1875 + 1800 + 1500) per million
    assert isinstance(cost, Decimal)
    # The same writes all to the 5-minute cache cost less: 300 x (6 - 3.75).
    five_minutes = dataclasses.replace(WRITES, cache_write_1h_tokens=0)
    assert cost - SONNET.cost(five_minutes) == Decimal("0.000675")


@pytest.mark.parametrize(
    ("price", "rate"),
    [
        # No 1-hour price: Anthropic's own 2x input, not the 5-minute 1.25x.
        (Price(input=Decimal("3"), cache_write_input=Decimal("3.75")), Decimal("6")),
        (Price(input=Decimal("3")), Decimal("6")),
        # ... or the 5-minute write's price, when a table sets that dearer.
        (Price(input=Decimal("3"), cache_write_input=Decimal("7")), Decimal("7")),
        # Set, it is what it says, cheaper or dearer.
        (Price(input=Decimal("3"), cache_write_1h_input=Decimal("4.5")), Decimal("4.5")),
        (Price(input=Decimal("0.000001"), cache_write_1h_input=Decimal("0")), Decimal("0")),
    ],
)
def test_the_rate_of_a_one_hour_write(price: Price, rate: Decimal) -> None:
    assert price.cache_write_1h_rate() == rate
    only = Usage(
        1_000_000, 0, 1_000_000, cache_write_tokens=1_000_000, cache_write_1h_tokens=1_000_000
    )
    assert price.cost(only) == rate


def test_one_hour_writes_are_a_part_of_the_writes_never_billed_twice() -> None:
    # More 1-hour writes than writes (a report no reading should make): at most
    # every write is a 1-hour one, and no prompt token is billed twice.
    odd = Usage(100, 0, 100, cache_write_tokens=30, cache_write_1h_tokens=80)
    assert SONNET.cost(odd) == (70 * Decimal("3") + 30 * Decimal("6")).scaleb(-6)


def test_priced_with_max_tokens_bounds_the_one_hour_writes_too() -> None:
    usage = Usage(5000, 0, 5000, cache_write_tokens=5000, cache_write_1h_tokens=5000)
    priced, _ = PriceTable({"claude": SONNET}).priced(usage, "claude", max_tokens=1000)
    assert priced.cost == Decimal("0.006")  # 1000 at 6 per million
    assert priced.cache_write_1h_tokens == 5000  # the counts kept as reported
