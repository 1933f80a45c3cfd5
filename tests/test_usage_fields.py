"""One bad usage field costs only itself: it is bounded (or derived from the others),
the answer is recorded `clamped`, and the rest of the usage and its cost are kept
(docs/proxy.md, "Clamped answers")."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from gateway.upstreams.dify import _node_usage, _usage_from
from gateway.upstreams.openai_wire import usage_from
from gateway.usage import FieldReader, Usage
from gateway.usage_bounds import CLAMPED
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, running_gateway

DIFY: dict[str, Any] = {
    "prompt_tokens": 1033,
    "prompt_price": "0.0010330",
    "completion_tokens": 135,
    "completion_price": "0.0002700",
    "total_tokens": 1168,
    "total_price": "0.0013030",
    "currency": "USD",
}
PRICE = Decimal("0.0013030")


@pytest.mark.parametrize(
    ("bad", "tokens", "cost"),
    [
        ({"total_tokens": -5}, (1033, 135, 1168), PRICE),
        ({"total_tokens": 12.5}, (1033, 135, 1168), PRICE),
        ({"total_tokens": "lots"}, (1033, 135, 1168), PRICE),
        ({"total_tokens": True}, (1033, 135, 1168), PRICE),
        ({"prompt_tokens": -5}, (1033, 135, 1168), PRICE),  # what the total leaves
        ({"completion_tokens": "x"}, (1033, 135, 1168), PRICE),
        ({"completion_tokens": 134.2, "total_tokens": None}, (1033, 135, 1168), PRICE),
        ({"completion_tokens": -1, "total_tokens": None}, (1033, 0, 1033), PRICE),
        ({"total_price": "NaN"}, (1033, 135, 1168), PRICE),  # the parts' sum
        ({"total_price": float("nan")}, (1033, 135, 1168), PRICE),
        ({"total_price": "cheap", "prompt_price": None}, (1033, 135, 1168), Decimal("0.00027")),
        (
            {"total_price": "Infinity", "completion_price": []},
            (1033, 135, 1168),
            Decimal("0.001033"),
        ),
    ],
    ids=[
        "total-negative",
        "total-fraction",
        "total-text",
        "total-bool",
        "prompt-negative",
        "completion-text",
        "completion-fraction-rounded-up",
        "completion-negative-no-total",
        "price-nan-string",
        "price-nan-float",
        "price-text-one-part",
        "price-inf-bad-part",
    ],
)
def test_dify_usage_keeps_what_is_good(
    bad: dict[str, Any], tokens: tuple[int, int, int], cost: Decimal
) -> None:
    usage = _usage_from({**DIFY, **bad})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == tokens
    assert usage.cost == cost
    assert not usage.estimated
    assert usage.clamped  # names what was bad
    assert all("=" in field for field in usage.clamped)


def test_good_usage_is_not_marked() -> None:
    assert _usage_from(DIFY).clamped == ()
    assert usage_from({"prompt_tokens": 3, "completion_tokens": 4}).clamped == ()


@pytest.mark.parametrize(
    "raw",
    [{"prompt_tokens": "many"}, {"total_price": "cheap"}, {"total_tokens": -5}, [1033]],
)
def test_dify_usage_with_nothing_usable_left_is_refused(raw: object) -> None:
    # The caller then charges an estimate from the text: the better record.
    with pytest.raises(ValueError):
        _usage_from(raw)


@pytest.mark.parametrize(
    ("meta", "llm", "expected"),
    [
        (
            {"total_tokens": -3, "total_price": "0.5"},
            {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            Usage(10, 5, 15, Decimal("0.5")),
        ),
        (
            {"total_tokens": 15, "total_price": "NaN"},
            {"prompt_tokens": 10, "completion_tokens": 5},
            Usage(10, 5, 15, Decimal(0)),
        ),
        (
            {"total_tokens": 15, "total_price": "0.5"},
            {"prompt_tokens": 10.5, "completion_tokens": 5, "total_tokens": 15},
            Usage(10, 5, 15, Decimal("0.5")),  # the total tells the prompt
        ),
    ],
    ids=["meta-total-negative", "meta-price-nan", "llm-prompt-fraction"],
)
def test_dify_node_usage_keeps_what_is_good(
    meta: dict[str, Any], llm: dict[str, Any], expected: Usage
) -> None:
    usage = _node_usage({"execution_metadata": meta, "outputs": {"usage": llm}})
    assert usage.clamped
    assert usage == Usage(
        expected.prompt_tokens,
        expected.completion_tokens,
        expected.total_tokens,
        expected.cost,
        clamped=usage.clamped,
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": -5}, Usage(10, 5, 15)),
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 12.5}, Usage(10, 5, 15)),
        ({"prompt_tokens": 1.5, "completion_tokens": 5}, Usage(2, 5, 7)),
        ({"prompt_tokens": -1, "completion_tokens": 5, "total_tokens": 9}, Usage(4, 5, 9)),
        (
            {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": "cached"},
            Usage(10, 5, 15),
        ),
        (
            {
                "input_tokens": 10,
                "output_tokens": 5,
                "output_tokens_details": {"reasoning_tokens": True},
            },
            Usage(10, 5, 15),
        ),
        (
            {"input_tokens": 10, "output_tokens": "NaN", "total_tokens": 30},
            Usage(10, 20, 30),
        ),
    ],
    ids=[
        "total-negative",
        "total-fraction",
        "prompt-fraction",
        "prompt-negative-derived",
        "details-not-object",
        "reasoning-bool",
        "responses-output-derived",
    ],
)
def test_openai_usage_keeps_what_is_good(raw: dict[str, Any], expected: Usage) -> None:
    usage = usage_from(raw)
    assert usage.clamped
    assert usage == Usage(
        expected.prompt_tokens,
        expected.completion_tokens,
        expected.total_tokens,
        clamped=usage.clamped,
    )


def test_a_huge_exponent_is_not_made_into_a_huge_integer() -> None:
    read = FieldReader()
    assert read.tokens({"n": "1e999999999"}, "n") == 2**63 - 1
    assert read.clamped == ["n='1e999999999'"]


def test_clamped_parts_add_up() -> None:
    a = Usage(1, 1, 2, clamped=("total_tokens=-5",))
    b = Usage(1, 1, 2, clamped=("total_price='NaN'",))
    assert (a + b).clamped == ("total_tokens=-5", "total_price='NaN'")


CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
BLOCKING = {**CHAT, "response_mode": "blocking"}


@pytest.mark.parametrize(
    ("bad", "tokens", "cost"),
    [
        ({"total_tokens": -5}, 1168, PRICE),
        ({"total_tokens": 12.5}, 1168, PRICE),
        ({"total_price": "NaN"}, 1168, PRICE),
    ],
    ids=["total-negative", "total-fraction", "price-nan"],
)
@pytest.mark.parametrize("body", [CHAT, BLOCKING], ids=["streaming", "blocking"])
async def test_one_bad_field_is_recorded_clamped_with_the_rest_kept(
    sqlite_url: str, bad: dict[str, Any], tokens: int, cost: Decimal, body: dict[str, Any]
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake) as h:
        headers = h.auth(**{"x-fake-usage-json": orjson.dumps(bad).decode()})
        async with httpx.AsyncClient(timeout=20) as client:
            reply = await client.post(f"{h.url}/v1/chat-messages", json=body, headers=headers)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        clamped_total = h.gateway.metrics.get("gateway_usage_clamped_total")
    assert reply.status_code == 200
    assert (event.outcome, event.estimated) == (CLAMPED, False)
    assert (event.prompt_tokens, event.completion_tokens) == (1033, 135)
    assert event.total_tokens == tokens
    assert event.cost == cost
    assert clamped_total == 1
