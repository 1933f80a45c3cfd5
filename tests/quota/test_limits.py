"""The accounting core's rules (gateway/quota/limits.py), as tables of cases."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.config import Plan
from gateway.quota.limits import (
    Charge,
    Counters,
    Limit,
    charged,
    counters_from,
    decide,
    limits_of,
    refuses,
)
from gateway.quota.plans import plan_limits

D = Decimal


def limit(name: str, meter: str, per: str, value: str | int) -> Limit:
    return Limit(name, meter, per, D(value))  # type: ignore[arg-type]


QUERIES = limit("queries_per_day", "queries", "day", 3)
TOKENS_DAY = limit("tokens_per_day", "tokens", "day", 1000)
TOKENS_MONTH = limit("tokens_per_month", "tokens", "month", 5000)
COST_DAY = limit("cost_per_day", "cost", "day", "2.00")
WEB = limit("web_searches_per_day", "web_searches", "day", 2)
STREAMS = limit("max_concurrent_streams", "streams", "open", 2)


@pytest.mark.parametrize(
    ("lim", "used", "amount", "refused"),
    [
        # Reserved meters: refused when the amount would go past the maximum.
        (QUERIES, 2, 1, False),
        (QUERIES, 3, 1, True),
        (QUERIES, 5, 1, True),
        (STREAMS, 1, 1, False),
        (STREAMS, 2, 1, True),
        # A request adding nothing to a reserved meter is not held by it.
        (WEB, 2, 0, False),
        (WEB, 1, 1, False),
        (WEB, 2, 1, True),
        # Measured meters: refused once the counter reached the maximum...
        (TOKENS_DAY, 999, 0, False),
        (TOKENS_DAY, 1000, 0, True),
        (TOKENS_DAY, 1500, 0, True),
        # ... and, with a bound reserved, when used plus the bound goes past it.
        (COST_DAY, "1.50", "0.50", False),
        (COST_DAY, "1.50", "0.51", True),
        (COST_DAY, "2.00", "0", True),
        (COST_DAY, "1.99", "0", False),
    ],
)
def test_refuses(lim: Limit, used: object, amount: object, refused: bool) -> None:
    assert refuses(lim, D(str(used)), D(str(amount))) is refused


def test_streams_are_the_only_open_meter() -> None:
    with pytest.raises(ValueError):
        Limit("x", "queries", "open", D(1))
    with pytest.raises(ValueError):
        Limit("x", "streams", "day", D(1))


def used(**values: int | str) -> Counters:
    """Counters from meter_per=value, e.g. queries_day=3."""
    found = {}
    for key, value in values.items():
        meter, per = key.rsplit("_", 1)
        found[(meter, per)] = D(str(value))
    return Counters(found)  # type: ignore[arg-type]


ALL = (WEB, QUERIES, TOKENS_DAY, TOKENS_MONTH, COST_DAY, STREAMS)


@pytest.mark.parametrize(
    ("counters", "charge", "optional", "refused", "web"),
    [
        (used(), Charge(), False, None, 0),
        (used(queries_day=3), Charge(), False, "queries_per_day", 0),
        (used(tokens_day=1000), Charge(), False, "tokens_per_day", 0),
        (used(tokens_month=5000, tokens_day=10), Charge(), False, "tokens_per_month", 0),
        (used(cost_day="1.90"), Charge(cost=D("0.20")), False, "cost_per_day", 0),
        (used(cost_day="1.80"), Charge(cost=D("0.20")), False, None, 0),
        (used(streams_open=2), Charge(streams=1), False, "max_concurrent_streams", 0),
        # Without a lease asked for (no stream limit), open streams hold nothing.
        (used(streams_open=2), Charge(), False, None, 0),
        # Web search: reserved while the allowance lasts ...
        (used(web_searches_day=1), Charge(web_searches=1), False, None, 1),
        # ... then refused first, before any other limit ...
        (used(web_searches_day=2, queries_day=3), Charge(web_searches=1), False,
         "web_searches_per_day", 0),
        # ... or, when optional, admitted without one (other limits still hold).
        (used(web_searches_day=2), Charge(web_searches=1), True, None, 0),
        (used(web_searches_day=2, queries_day=3), Charge(web_searches=1), True,
         "queries_per_day", 0),
        # A request not asking for web search is not held by a spent allowance.
        (used(web_searches_day=9), Charge(), False, None, 0),
        # The first limit that refuses, in order, is the one reported.
        (used(queries_day=3, tokens_day=1000), Charge(), False, "queries_per_day", 0),
    ],
)  # fmt: skip
def test_decide(
    counters: Counters, charge: Charge, optional: bool, refused: str | None, web: int
) -> None:
    decision = decide(counters, ALL, charge, web_optional=optional)
    assert (None if decision.refused is None else ALL[decision.refused].name) == refused
    assert decision.web_searches == web


def test_charged_adds_the_charge_to_every_window_counted() -> None:
    before = counters_from([2, 0, 1, 0, 0, 0, 0, 10, D("0.5")], [9, 0, 4, 0, 0, 0, 0, 90, 3], 1)
    after = charged(before, Charge(advanced_rag=1, web_searches=1, cost=D("0.25"), streams=1), 0)
    assert (after.queries_today, after.of("queries", "month")) == (3, D(10))
    assert (after.of("advanced_rag", "day"), after.of("advanced_rag", "month")) == (1, 1)
    # The web search the decision did not grant is not added.
    assert after.web_searches_today == 1
    assert (after.of("cost", "day"), after.of("cost", "month")) == (D("0.75"), D("3.25"))
    assert after.open_streams == 2
    assert after.tokens_today == 10 and after.tokens_month == 90


def test_every_plan_key_that_set_a_limit_is_a_limit() -> None:
    plan = Plan(
        name="p",
        queries_per_day=50,
        tokens_per_day=1000,
        tokens_per_month=20000,
        web_searches_per_day=5,
        max_concurrent_streams=2,
    )
    assert [(x.name, x.meter, x.per, x.max) for x in plan_limits(plan)] == [
        ("web_searches_per_day", "web_searches", "day", 5),
        ("queries_per_day", "queries", "day", 50),
        ("tokens_per_day", "tokens", "day", 1000),
        ("tokens_per_month", "tokens", "month", 20000),
        ("max_concurrent_streams", "streams", "open", 2),
    ]
    # Omitted (None) is unlimited; zero is a limit.
    assert plan_limits(Plan(name="free")) == ()
    assert limits_of({"queries_per_day": 0}) == (Limit("queries_per_day", "queries", "day", D(0)),)


def test_the_storage_error_policy_covers_every_new_kind() -> None:
    from gateway.config import PlanLimit, StorageErrorPolicy
    from gateway.quota.plans import closed_checks

    closed = StorageErrorPolicy(queries="closed", tokens="closed", streams="closed")
    assert closed_checks(closed, Plan(name="p", requests_per_minute=5)) == ["queries"]
    assert closed_checks(closed, Plan(name="p", cost_per_day=D("1"))) == ["tokens"]
    assert closed_checks(closed, Plan(name="p", tokens_per_minute=9)) == ["tokens"]
    general = Plan(name="p", limits=(PlanLimit(meter="input_tokens", per="day", max=D(9)),))
    assert closed_checks(closed, general) == ["tokens"]
    hourly = Plan(name="p", limits=(PlanLimit(meter="queries", per="hour", max=D(9)),))
    assert closed_checks(closed, hourly) == ["queries"]
    assert closed_checks(StorageErrorPolicy(tokens="open"), general) == []


def test_charged_knows_every_meter_a_charge_adds_to() -> None:
    """`charged` asks a charge only of the meters it can add to (issue 24): a
    charge of everything adds nothing to any other meter."""
    import dataclasses

    from gateway.quota.limits import _CHARGED, METERS, Charge

    # Every field of a charge set (a field added later is set too).
    everything = Charge(**{field.name: 1 for field in dataclasses.fields(Charge)})
    assert {meter for meter in METERS if everything.amount(meter)} == set(_CHARGED)
