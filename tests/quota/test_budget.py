"""Money budgets (issue 21): cost_per_day and cost_per_month are hard caps.
Admission reserves an upper bound of the answer's cost, settle turns it into the
true cost, and no reservation is left once the answers have ended."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from gateway.admission import Admitter
from gateway.clock import FixedClock
from gateway.config import DatabaseConfig, load_config, parse_config
from gateway.metrics import Metrics
from gateway.pricing import Audio
from gateway.quota.budget import (
    SCHEMA_TOOL_PROMPT,
    TOOL_USE_PROMPT,
    bound_usage,
    cost_bound,
    lowered_cap,
    output_cap,
    with_cap,
)
from gateway.settle import Settler
from gateway.snapshot import build_snapshot
from gateway.storage import AdmissionLimits, Pending, open_storage
from gateway.upstreams import Route
from gateway.upstreams.anthropic import AnthropicUpstream
from gateway.upstreams.openai import OpenAIUpstream
from gateway.usage import Metered
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.dify import FakeDify
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway, to_toml, until
from tests.test_admission import CHAT, HCM, two_gateways

# Its tests on postgres_dsn take warm connections (tests/conftest.py).
pytestmark = pytest.mark.warm_connections

# A token of this model costs 0.001 to read and 0.002 to write.
PRICES = {"budget-model": {"input": "1000", "output": "2000"}}
# The fake reports 10 prompt and 50 completion tokens: 0.01 + 0.10.
STEER = {"x-fake-prompt-tokens": "10", "x-fake-completion-tokens": "50"}
ANSWER_COST = Decimal("0.11")
BODY = {
    "model": "budget-model",
    "messages": [{"role": "user", "content": "Xin chào"}],
    "max_tokens": 100,
}
# At most one token per byte of the body as forwarded (the gateway names the
# user in it), and the 100 output tokens asked for.
BOUND = len(orjson.dumps({**BODY, "user": USER})) * Decimal("0.001") + 100 * Decimal("0.002")
T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)  # 16:00 in Ho Chi Minh City


def settings(**plan: Any) -> dict[str, Any]:
    return {
        "upstream": {"kind": "openai"},
        "prices": PRICES,
        "plans": {"free": plan},
        "accounting": {"timezone": HCM, "default_plan": "free"},
    }


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as c:
        yield c


async def ask(client: httpx.AsyncClient, h: Harness, body: dict[str, Any] = BODY) -> httpx.Response:
    return await client.post(
        f"{h.url}/v1/chat/completions", json=body, headers={**h.auth(), **STEER}
    )


# --- the bound --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "cap"),
    [
        ({"max_completion_tokens": 5, "max_tokens": 9}, 9),  # the larger: see below
        ({"max_tokens": 9}, 9),
        ({"max_output_tokens": 7}, 7),
        ({"max_tokens": True}, None),
        ({"max_tokens": -1}, None),
        ({"max_tokens": "9"}, 9),
        ({"max_tokens": "9.5"}, None),
        ({}, None),
    ],
)
def test_output_cap(body: dict[str, Any], cap: int | None) -> None:
    assert output_cap(body) == cap


@pytest.mark.parametrize(
    ("kind", "body", "cap"),
    [
        # vLLM / SGLang: ``max_completion_tokens or max_tokens``: a 0 is "not set".
        ("chat", {"max_completion_tokens": 0, "max_tokens": 1000}, 1000),
        ("chat", {"max_completion_tokens": "0", "max_tokens": 1000}, 1000),
        ("chat", {"max_completion_tokens": 0.0, "max_tokens": "1000"}, 1000),
        # No field gives a positive count: no bound (the server's default length).
        ("chat", {"max_completion_tokens": 0}, None),
        ("chat", {"max_completion_tokens": 0, "max_tokens": 0}, None),
        ("completion", {"max_tokens": 0}, None),
        ("response", {"max_output_tokens": "0"}, None),
        ("message", {"max_tokens": 0}, None),
        # A server that knows only max_tokens reads it: of two caps, the larger.
        ("chat", {"max_completion_tokens": 5, "max_tokens": 1000}, 1000),
        ("chat", {"max_completion_tokens": 1000, "max_tokens": "5"}, 1000),
        # A negative cap (llama.cpp: -1 is "no limit") or no count after a 0.
        ("chat", {"max_completion_tokens": 0, "max_tokens": -1}, None),
        ("chat", {"max_completion_tokens": 0, "max_tokens": "lots"}, None),
    ],
)
def test_a_cap_of_0_is_not_a_bound_but_unset_as_lenient_servers_read_it(
    kind: str, body: dict[str, Any], cap: int | None
) -> None:
    """Review-sec F1: ``max_completion_tokens: 0`` was read as a cap of no output
    at all, though vLLM and SGLang read it as unset and write up to
    ``max_tokens`` (or, with no other cap, the rest of the context)."""
    assert output_cap(body, kind) == cap


def test_a_zero_cap_beside_a_real_one_is_lowered_with_it(tmp_path: Path) -> None:
    """``lower_output_cap`` lowers the cap a lenient server honours (``max_tokens``,
    behind a ``max_completion_tokens`` of 0), writing the lowered cap into both."""
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(settings()))
    upstream = OpenAIUpstream(load_config(path, env={}))
    route = Route("chat", "chat/completions", role="answer")
    request = {**BODY, "max_tokens": 1000, "max_completion_tokens": 0}
    remaining = cost_bound(
        upstream, route, {**BODY, "max_tokens": 500}, reserve_output_tokens=4096,
        answer_reservation=Decimal(0),
    )  # fmt: skip
    cap = lowered_cap(upstream, route, request, remaining, reserve_output_tokens=4096)
    assert cap is not None and 1 <= cap <= 500
    capped = with_cap(request, route, cap)
    assert (capped["max_completion_tokens"], capped["max_tokens"]) == (cap, cap)


def test_the_bound_covers_every_answer_the_request_can_get() -> None:
    usage, bounded = bound_usage({**BODY, "n": 3}, reserve_output_tokens=4096)
    assert bounded and usage.completion_tokens == 300
    assert usage.prompt_tokens == len(orjson.dumps({**BODY, "n": 3}))
    usage, bounded = bound_usage({"model": "m"}, reserve_output_tokens=4096)
    assert not bounded and usage.completion_tokens == 4096


def test_the_bound_holds_a_prediction_as_output() -> None:
    """Predicted Outputs: the predicted tokens an answer does not use are billed
    at the completion rate (review-limits F7): at most one a byte of the
    prediction, for each answer, beside the cap."""
    prediction = {"type": "content", "content": "a " * 100}
    body = {**BODY, "n": 2, "prediction": prediction}
    usage, bounded = bound_usage(body, reserve_output_tokens=4096, kind="chat")
    assert bounded and usage.completion_tokens == 2 * (100 + len(orjson.dumps(prediction)))
    assert usage.prompt_tokens == len(orjson.dumps(body))


async def test_a_prediction_the_answer_rejects_is_held_by_a_hard_budget(
    database_url: str, client: httpx.AsyncClient
) -> None:
    """Review-limits F7, the attack: one output token asked for and a prediction
    of 20,000 tokens, which the answer rejects and OpenAI bills at the output
    rate (4x the input's here): reserved about 40, billed about 80, against a
    budget of 50. It is now refused before it is sent."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    prices = {"budget-model": {"input": "1000", "output": "4000"}}
    body = {
        "model": "budget-model",
        "max_completion_tokens": 1,
        "messages": [{"role": "user", "content": "Rewrite the text below."}],
        "prediction": {"type": "content", "content": "a " * 20000},
    }
    async with running_gateway(
        database_url,
        upstream=fake,
        settings={**settings(cost_per_day="50.00"), "prices": prices},
        clock=FixedClock(T0),
    ) as h:
        response = await ask(client, h, body)
        rows = await h.storage.daily(T0.date(), T0.date())
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "daily_cost_limit"
    assert fake.requests == [] and sum((r.cost for r in rows), Decimal(0)) == 0


_MCP_SERVER = {"type": "url", "url": "https://attacker.example/mcp", "name": "big"}
_MCP_TOOL = {
    "type": "mcp",
    "server_label": "big",
    "server_url": "https://attacker.example/mcp",
    "require_approval": "never",
}


@pytest.mark.parametrize(
    ("kind", "path", "body"),
    [
        (
            "anthropic",
            "/v1/messages",
            {
                "model": "budget-model",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "use the tools"}],
                "mcp_servers": [_MCP_SERVER],
            },
        ),
        (
            "anthropic",
            "/v1/messages",
            {
                "model": "budget-model",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "use the tools"}],
                "mcp_servers": [_MCP_SERVER],
                "tools": [{"type": "mcp_toolset", "mcp_server_name": "big"}],
            },
        ),
        (
            "openai",
            "/v1/responses",
            {"model": "budget-model", "input": "use the tools", "max_output_tokens": 10,
             "tools": [_MCP_TOOL]},
        ),
    ],
    ids=["anthropic-mcp-servers", "anthropic-mcp-toolset", "openai-mcp-tool"],
)  # fmt: skip
@pytest.mark.parametrize("budget", [True, False], ids=["money-budget", "no-money-budget"])
async def test_a_remote_mcp_server_is_refused_where_a_money_budget_applies(
    database_url: str, kind: str, path: str, body: dict[str, Any], budget: bool
) -> None:
    """Review-limits F1, the attack: a remote MCP server's tool list and the
    results of its calls are billed as input the body does not hold - a request
    of 300 bytes and 10 output tokens was admitted under a budget of 1.00 and
    billed 50,000 input tokens (50.00). Where a money budget applies its bound
    is not one: refused 403 `cost_unbounded`, nothing sent. Without one, it is
    forwarded and charged what the answer reports."""
    fake: FakeAnthropic | FakeOpenAI = (
        FakeAnthropic(api_key=UPSTREAM_KEY)
        if kind == "anthropic"
        else FakeOpenAI(api_key=UPSTREAM_KEY)
    )
    plan = {"cost_per_day": "1.00"} if budget else {"queries_per_day": 10}
    headers = (
        {"anthropic-version": "2023-06-01", "anthropic-beta": "mcp-client-2025-11-20"}
        if kind == "anthropic"
        else {}
    )
    async with running_gateway(
        database_url,
        upstream=fake,
        # (A server tool must have a call price: the toolset's calls cost tokens only.)
        settings={
            **settings(**plan),
            "upstream": {"kind": kind},
            "call_prices": {"anthropic.mcp_toolset": {"price": "0"}},
        },
        clock=FixedClock(T0),
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as http:
            response = await http.post(path, json=body, headers=h.auth(**headers))
        if not budget:
            await h.probes.wait_finished(1)
    if budget:
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == "cost_unbounded"
        assert "mcp" in error["message"]
        assert fake.requests == []
    else:
        assert response.status_code == 200, response.text
        assert len(fake.requests) == 1


_BASH = {"type": "bash_20250124", "name": "bash"}
_OWN_TOOL = {"name": "lookup", "input_schema": {"type": "object"}}


@pytest.mark.parametrize(
    ("tools", "added"),
    [
        (None, 0),
        ([], 0),
        ([_OWN_TOOL], TOOL_USE_PROMPT),
        ([{"type": "function", "function": {"name": "f"}}], TOOL_USE_PROMPT),
        ([_OWN_TOOL, _BASH], TOOL_USE_PROMPT + SCHEMA_TOOL_PROMPT),
        ([{"type": "web_search_20250305", "name": "web_search"}, _BASH], 1024 + 2 * 1536),
    ],
    ids=["none", "empty", "own", "openai-function", "bash", "two-schema-tools"],
)
def test_the_bound_holds_the_prompt_a_provider_adds_for_tools(
    tools: list[Any] | None, added: int
) -> None:
    body: dict[str, Any] = {"model": "m", "max_tokens": 10, "messages": []}
    if tools is not None:
        body["tools"] = tools
    usage, _ = bound_usage(body, reserve_output_tokens=4096, kind="message")
    assert usage.prompt_tokens == len(orjson.dumps(body)) + added


async def test_a_tool_use_prompt_does_not_pass_a_hard_budget(
    database_url: str, client: httpx.AsyncClient
) -> None:
    """Review-limits F2, the attack: a tiny Messages request listing the bash
    tool. Anthropic bills its tool-use system prompt (346 tokens) and the bash
    tool's definition (245) as input beside the body's 129 bytes: reserved
    0.23, billed 0.82 against a budget of 0.50. The bound now holds them:
    refused before it is sent."""
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    body = {
        "model": "claude-x",
        "max_tokens": 10,
        "tools": [_BASH],
        "messages": [{"role": "user", "content": "ls"}],
    }
    billed = len(orjson.dumps(body)) + 346 + 245  # what Anthropic reports, at most
    async with running_gateway(
        database_url,
        upstream=fake,
        settings={
            **settings(cost_per_day="0.50"),
            "upstream": {"kind": "anthropic"},
            "prices": {"claude-x": {"input": "1000", "output": "10000"}},
        },
        clock=FixedClock(T0),
    ) as h:
        response = await client.post(
            f"{h.url}/v1/messages",
            json=body,
            headers={
                **h.auth(),
                "anthropic-version": "2023-06-01",
                "x-fake-input-tokens": str(billed),
                "x-fake-output-tokens": "10",
            },
        )
        await h.probes.wait_finished(1)
        rows = await h.storage.daily(T0.date(), T0.date())
    assert response.status_code == 429, response.text
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert fake.requests == [] and sum((r.cost for r in rows), Decimal(0)) == 0


def test_the_cost_bound_prices_the_bound_with_the_price_table(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(settings()))
    config = load_config(path, env={})
    upstream = OpenAIUpstream(config)
    route = Route(name="chat/completions", kind="chat", role="answer")
    bound = cost_bound(
        upstream, route, BODY, reserve_output_tokens=4096, answer_reservation=Decimal("9")
    )
    assert bound == len(orjson.dumps(BODY)) * Decimal("0.001") + 100 * Decimal("0.002")
    # A dialect that prices answers only when they end reserves the configured amount.
    assert cost_bound(
        object(), route, BODY, reserve_output_tokens=4096, answer_reservation=Decimal("0.5")
    ) == Decimal("0.5")


def test_the_cost_bound_of_a_sonar_answer_holds_its_search_fee() -> None:
    # Perplexity's Sonar models bill a request fee for the search every answer
    # runs: a budget's bound holds it, so a budget is still a hard cap.
    config = parse_config(
        {
            "upstream": {"kind": "openai"},
            "prices": {"perplexity/sonar": PRICES["budget-model"]},
            "call_prices": {"openai.chat_web_search": {"price": "0.006"}},
        },
        env={},
    )
    route = Route(name="chat/completions", kind="chat", role="answer")
    body = {**BODY, "model": "perplexity/sonar"}
    bound = cost_bound(
        OpenAIUpstream(config),
        route,
        body,
        reserve_output_tokens=4096,
        answer_reservation=Decimal(0),
    )
    tokens = len(orjson.dumps(body)) * Decimal("0.001") + 100 * Decimal("0.002")
    assert bound == tokens + Decimal("0.006")


# --- end to end ---------------------------------------------------------------------------


async def test_a_budget_reserves_the_bound_and_settles_the_true_cost(
    database_url: str, client: httpx.AsyncClient
) -> None:
    budget = 2 * ANSWER_COST + BOUND  # two answers, then exactly room for one bound
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        database_url,
        upstream=fake,
        settings=settings(cost_per_day=str(budget)),
        clock=FixedClock(T0),
    ) as h:
        answered = []
        for _ in range(3):
            answered.append(await ask(client, h))
            await h.probes.wait_finished(len(answered))
        refused = await ask(client, h)
        rows = await h.storage.daily(T0.date(), T0.date())
    assert [r.status_code for r in answered] == [200, 200, 200]
    # Each answer is charged its true cost; its bound was reserved only meanwhile.
    assert [(row.cost, row.queries) for row in rows] == [(3 * ANSWER_COST, 3)]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "daily_cost_limit"
    assert refused.json()["error"]["message"] == (
        f"You have used all {budget} of your plan's budget for today. "
        "It resets at 2026-11-22 00:00 +07."
    )
    assert refused.headers["x-ratelimit-resource"] == "cost_per_day"
    assert refused.headers["x-ratelimit-limit"] == str(budget)
    assert refused.headers["x-ratelimit-used"] == str(3 * ANSWER_COST)
    assert refused.headers["retry-after"] == str(8 * 3600)


async def test_a_cheaper_request_fits_where_a_dearer_one_does_not(
    database_url: str, client: httpx.AsyncClient
) -> None:
    """The bound is the request's own: a smaller max_tokens fits a budget that a
    larger one would pass."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        database_url, upstream=fake, settings=settings(cost_per_day=str(BOUND - Decimal("0.01")))
    ) as h:
        dear = await ask(client, h)
        cheap = await ask(client, h, {**BODY, "max_tokens": 50})
    assert dear.status_code == 429 and dear.json()["error"]["code"] == "daily_cost_limit"
    assert cheap.status_code == 200


async def test_a_user_budget_override_is_a_decimal(
    database_url: str, client: httpx.AsyncClient
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        database_url, upstream=fake, settings=settings(cost_per_month="0.01")
    ) as h:
        refused = await ask(client, h)
        await h.gateway.accounts.set_override(USER, "cost_per_month", str(BOUND))
        user = await h.storage.get_user(USER)
        admitted = await ask(client, h)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "monthly_cost_limit"
    assert user is not None and user.overrides["cost_per_month"] == str(BOUND)
    assert admitted.status_code == 200


async def _after(dsn: str, budget: Decimal, bound: Decimal) -> tuple[Decimal, Decimal, bool]:
    """Once the gateways have stopped: what USER spent, what is still reserved,
    and whether a request reserving ``bound`` is admitted under ``budget``."""
    conn = await asyncpg.connect(dsn)
    try:
        spent, reserved = await conn.fetchrow(
            "SELECT coalesce(sum(cost), 0), coalesce(sum(cost_reserved), 0) FROM usage_daily"
        )
    finally:
        await conn.close()
    storage = await open_storage(DatabaseConfig(url=dsn))
    try:
        now = datetime.now(UTC)
        admission = await storage.admit(
            USER,
            day=now.date(),
            month_start=now.date().replace(day=1),
            limits=AdmissionLimits(cost_per_day=budget),
            now=now,
            pending=Pending("after", "chat/completions", reserved_cost=bound),
        )
    finally:
        await storage.close()
    return Decimal(spent), Decimal(reserved), admission.admitted


@pytest.mark.postgres
async def test_forty_parallel_answers_across_two_processes_never_pass_the_budget(
    postgres_dsn: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    budget = Decimal("1.00")
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with two_gateways(
        postgres_dsn,
        tmp_path,
        fake,
        {"cost_per_day": str(budget)},
        upstream={"kind": "openai"},
        settings={"prices": PRICES},
    ) as (ports, key, storage):
        responses = await asyncio.gather(
            *(
                client.post(
                    f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions",
                    json=BODY,
                    headers={"Authorization": f"Bearer {key}", **STEER, "x-fake-delay-ms": "5"},
                )
                for i in range(40)
            )
        )
    # The processes have stopped, so every answer has ended and been recorded.
    admitted = sum(r.status_code == 200 for r in responses)
    spent, reserved, room = await _after(postgres_dsn, budget, BOUND)
    assert {r.status_code for r in responses} == {200, 429}
    refused = [r.json()["error"]["code"] for r in responses if r.status_code == 429]
    assert set(refused) == {"daily_cost_limit"}
    assert spent == admitted * ANSWER_COST <= budget
    assert admitted >= int(budget // BOUND)
    assert reserved == 0
    # No reservation is left: what is left of the budget is spendable at once.
    assert room == (spent + BOUND <= budget)


@pytest.mark.postgres
async def test_dify_reserves_the_configured_amount_per_answer(
    postgres_dsn: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """Dify prices an answer only when it ends: each reserves
    accounting.answer_reservation, and with a reservation at least an answer's
    price the budget is a hard cap too (docs/quotas.md)."""
    price = Decimal("0.0013030")  # what the fake Dify reports for an answer
    budget = Decimal("0.01")
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with two_gateways(
        postgres_dsn,
        tmp_path,
        fake,
        {"cost_per_day": str(budget)},
        settings={
            "accounting": {
                "timezone": HCM,
                "default_plan": "free",
                "answer_reservation": "0.002",
            }
        },
    ) as (ports, key, storage):
        responses = await asyncio.gather(
            *(
                client.post(
                    f"http://127.0.0.1:{ports[i % 2]}/v1/chat-messages",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {key}", "x-fake-delay-ms": "5"},
                )
                for i in range(40)
            )
        )
    admitted = sum(r.status_code == 200 for r in responses)
    spent, reserved, room = await _after(postgres_dsn, budget, Decimal("0.002"))
    assert spent == admitted * price <= budget
    assert admitted >= int(budget // Decimal("0.002"))
    assert reserved == 0
    assert room == (spent + Decimal("0.002") <= budget)
    assert {r.json()["code"] for r in responses if r.status_code == 429} == {"daily_cost_limit"}


async def test_usage_lists_budgets_as_decimal_strings_and_rates(
    database_url: str, client: httpx.AsyncClient
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        database_url,
        upstream=fake,
        settings=settings(cost_per_day="1.50", cost_per_month="30", requests_per_minute=10),
        clock=FixedClock(T0),
    ) as h:
        await ask(client, h)
        await h.probes.wait_finished(1)
        usage = (await client.get(f"{h.url}/v1/usage", headers=h.auth())).json()
    limits = usage["limits"]
    assert limits["cost_per_day"] == {
        "limit": "1.5",
        "used": "0.11",
        "remaining": "1.39",
        "resets_at": "2026-11-22T00:00:00+07:00",
    }
    assert limits["cost_per_month"]["remaining"] == "29.89"
    assert limits["requests_per_minute"]["used"] == 1
    assert limits["requests_per_minute"]["remaining"] == 9


async def test_a_per_model_budget_holds_and_counts_only_its_models(
    database_url: str, client: httpx.AsyncClient
) -> None:
    prices = {**PRICES, "other-model": {"input": "1000", "output": "2000"}}
    budget = ANSWER_COST + BOUND - Decimal("0.01")  # room for one answer's bound, not two
    limit = {"meter": "cost", "per": "day", "max": str(budget), "models": ["budget-*"]}
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        database_url,
        upstream=fake,
        settings={**settings(limits=[limit]), "prices": prices},
        clock=FixedClock(T0),
    ) as h:
        other = {**BODY, "model": "other-model"}
        # Another model's spending does not count toward the budget...
        for n in range(3):
            assert (await ask(client, h, other)).status_code == 200
            await h.probes.wait_finished(n + 1)
        first = await ask(client, h)
        await h.probes.wait_finished(4)
        second = await ask(client, h)
        third = await ask(client, h, other)  # ...nor is it held by it
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "plan_limit"
    assert second.headers["x-ratelimit-resource"] == "cost_per_day[budget-*]"
    assert second.json()["error"]["message"].startswith(
        f"You have reached your plan's limit of {budget} cost (budget-*) per day."
    )
    assert second.headers["x-ratelimit-used"] == str(ANSWER_COST)
    assert third.status_code == 200


async def test_a_per_model_limit_holds_the_models_dated_snapshots(
    database_url: str, client: httpx.AsyncClient
) -> None:
    """Review-limits F6, the attack: a limit on "budget-model" (one query a
    day) passed by asking for its snapshots, which the price table prices, and
    the upstream serves, as that model. A name that only starts like it is
    another model, held by the limit no more than the table prices it so."""
    limit = {"meter": "queries", "per": "day", "max": 1, "models": ["budget-model"]}
    prices = {**PRICES, "budget-model-mini": {"input": "1000", "output": "2000"}}
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(
        database_url,
        upstream=fake,
        settings={**settings(limits=[limit]), "prices": prices},
        clock=FixedClock(T0),
    ) as h:
        first = await ask(client, h)
        await h.probes.wait_finished(1)
        snapshots = [
            await ask(client, h, {**BODY, "model": model})
            for model in ("budget-model-2024-08-06", "budget-model-20241120", "budget-model-0613")
        ]
        other = await ask(client, h, {**BODY, "model": "budget-model-mini"})
    assert first.status_code == 200
    assert [r.status_code for r in snapshots] == [429, 429, 429]
    assert snapshots[0].headers["x-ratelimit-resource"] == "queries_per_day[budget-model]"
    assert other.status_code == 200


def test_the_cost_bound_of_an_anthropic_request() -> None:
    from gateway.config import parse_config

    config = parse_config(
        {"upstream": {"kind": "anthropic"}, "prices": {"claude-x": {"input": "3", "output": "15"}}},
        env={},
    )
    body = {
        "model": "claude-x",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    route = Route(name="messages", kind="chat", role="answer")
    bound = cost_bound(
        AnthropicUpstream(config),
        route,
        body,
        reserve_output_tokens=4096,
        answer_reservation=Decimal("9"),
    )
    # One token per byte of the body at 3 per million, 1,000 output tokens at 15.
    assert bound == (len(orjson.dumps(body)) * 3 + 1000 * 15) * Decimal("1e-6")


@pytest.mark.parametrize(
    ("price", "ttl", "prompt_rate"),
    [
        # A 1-hour cache through a router in front of Claude (review4 R4-2): every
        # prompt token may be a 1-hour write, at cache_write_1h_input.
        ({"cache_write_input": "3.75", "cache_write_1h_input": "6"}, "1h", "6"),
        ({"cache_write_1h_input": "6"}, "1h", "6"),  # no 5-minute price of its own
        # A 5-minute one's at cache_write_input; none, at input.
        ({"cache_write_input": "3.75", "cache_write_1h_input": "6"}, "5m", "3.75"),
        ({"cache_write_1h_input": "6"}, None, "3"),
    ],
)
def test_the_cost_bound_of_a_cache_through_a_router(
    price: dict[str, str], ttl: str | None, prompt_rate: str
) -> None:
    prices = {"claude-x": {"input": "3", "output": "15", **price}}
    config = parse_config({"upstream": {"kind": "openai"}, "prices": prices}, env={})
    part: dict[str, Any] = {"type": "text", "text": "a long document"}
    if ttl is not None:
        part["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    body = {
        "model": "claude-x",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": [part]}],
    }
    bound = cost_bound(
        OpenAIUpstream(config),
        _route("chat"),
        body,
        reserve_output_tokens=4096,
        answer_reservation=Decimal("9"),
    )
    prompt = len(orjson.dumps(body))
    assert bound == (prompt * Decimal(prompt_rate) + 1000 * 15) * Decimal("1e-6")


# --- the bound: what the upstream will actually honour (review of issue 21) -------------


def _route(kind: str) -> Route:
    return Route(kind, {"chat": "chat/completions", "completion": "completions"}.get(kind, kind))


@pytest.mark.parametrize(
    ("kind", "body", "output"),
    [
        # A cap the endpoint does not read bounds nothing: OpenAI-compatible servers
        # ignore it and answer up to their own limit.
        ("chat", {"max_output_tokens": 1}, 4096),
        ("response", {"max_tokens": 1}, 4096),
        ("response", {"max_completion_tokens": 1}, 4096),
        ("completion", {"max_completion_tokens": 1}, 4096),
        ("chat", {"max_completion_tokens": 5, "max_tokens": 9}, 9),
        ("response", {"max_output_tokens": 7}, 7),
        ("message", {"max_tokens": 7}, 7),
    ],
)
def test_the_bound_reads_only_the_cap_the_endpoint_honours(
    kind: str, body: dict[str, Any], output: int
) -> None:
    usage, _ = bound_usage(body, reserve_output_tokens=4096, kind=kind)
    assert usage.completion_tokens == output


@pytest.mark.parametrize(
    ("body", "output"),
    [
        # Lenient servers (pydantic's lax mode: vLLM, llama.cpp's server) read
        # numbers sent as strings or as integral floats.
        ({"max_tokens": 100, "n": "3"}, 300),
        ({"max_tokens": 100, "n": 3.0}, 300),
        ({"max_tokens": "100", "n": 2}, 200),
        ({"max_tokens": 100.0}, 100),
        # The honoured field cannot be read as a count: the next one is no bound.
        ({"max_completion_tokens": "100000", "max_tokens": 10}, 100000),
        ({"max_completion_tokens": "lots", "max_tokens": 10}, 4096),
    ],
)
def test_the_bound_reads_numbers_as_a_lenient_upstream_does(
    body: dict[str, Any], output: int
) -> None:
    usage, _ = bound_usage(body, reserve_output_tokens=4096, kind="chat")
    assert usage.completion_tokens == output


def test_the_bound_of_a_completion_counts_its_best_of_candidates(tmp_path: Path) -> None:
    """Completions' ``best_of`` generates that many answers server-side and bills
    every one of them (OpenAI: "can quickly consume your token quota")."""
    body = {"model": "budget-model", "prompt": "Xin chào", "max_tokens": 10, "best_of": 5}
    usage, bounded = bound_usage(body, reserve_output_tokens=4096, kind="completion")
    assert bounded and usage.completion_tokens == 50
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(settings()))
    upstream = OpenAIUpstream(load_config(path, env={}))
    bound = cost_bound(
        upstream,
        _route("completion"),
        body,
        reserve_output_tokens=4096,
        answer_reservation=Decimal(0),
    )
    assert bound == len(orjson.dumps(body)) * Decimal("0.001") + 50 * Decimal("0.002")


def test_the_bound_prices_every_token_at_the_dearest_rate_it_can_be_billed_at(
    tmp_path: Path,
) -> None:
    """An audio answer's completion tokens are billed at ``audio_output``, a
    prompt written to Anthropic's cache at ``cache_write_input``: the bound that
    priced them all as text passed far below the answer's cost."""
    prices = {
        "audio-model": {"input": "1000", "output": "2000", "audio_output": "16000"},
        "claude-x": {"input": "1000", "output": "2000", "cache_write_input": "2000"},
    }
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml({**settings(), "prices": prices}))
    config = load_config(path, env={})
    body = {
        "model": "audio-model",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "messages": [{"role": "user", "content": "Xin chào"}],
        "max_completion_tokens": 100,
    }
    bound = cost_bound(
        OpenAIUpstream(config),
        _route("chat"),
        body,
        reserve_output_tokens=4096,
        answer_reservation=Decimal(0),
    )
    assert bound == len(orjson.dumps(body)) * Decimal("0.001") + 100 * Decimal("0.016")

    from gateway.upstreams.anthropic import AnthropicUpstream

    message = {
        "model": "claude-x",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Xin chào"}],
    }
    bound = cost_bound(
        AnthropicUpstream(config),
        _route("message"),
        message,
        reserve_output_tokens=4096,
        answer_reservation=Decimal(0),
    )
    assert bound == len(orjson.dumps(message)) * Decimal("0.002") + 100 * Decimal("0.002")


@pytest.mark.parametrize(
    ("price", "rate"),
    [
        ({"cache_write_input": "3.75", "cache_write_1h_input": "6"}, Decimal("6")),
        # (A model without the 1-hour price is refused the ttl; its bound would be
        # at the rate its 1-hour writes are charged: 2x input.)
        ({"cache_write_input": "3.75"}, Decimal("6")),
    ],
)
def test_the_cost_bound_of_a_one_hour_cache_holds_its_writes(
    price: dict[str, str], rate: Decimal
) -> None:
    """A request asking for a 1-hour cache may have its whole prompt written to
    one, at 2x input: a bound at the 5-minute 1.25x would be passed."""
    from gateway.config import parse_config

    prices = {"claude-x": {"input": "3", "output": "15", **price}}
    upstream = AnthropicUpstream(
        parse_config({"upstream": {"kind": "anthropic"}, "prices": prices}, env={})
    )
    block = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    body = {
        "model": "claude-x",
        "max_tokens": 1000,
        "system": [block],
        "messages": [{"role": "user", "content": "hi"}],
    }
    route = Route(name="messages", kind="chat", role="answer")

    def bound(body: dict[str, Any]) -> Decimal:
        return cost_bound(
            upstream, route, body, reserve_output_tokens=4096, answer_reservation=Decimal(0)
        )

    prompt = len(orjson.dumps(body))
    assert bound(body) == (prompt * rate + 1000 * 15) * Decimal("1e-6")
    # The same prompt cached for 5 minutes is bound at the 5-minute write's 3.75.
    five = {**body, "system": [{**block, "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}
    prompt = len(orjson.dumps(five))
    assert bound(five) == (prompt * Decimal("3.75") + 1000 * 15) * Decimal("1e-6")


async def test_a_zero_max_completion_tokens_does_not_hide_max_tokens_from_the_budget(
    database_url: str, client: httpx.AsyncClient
) -> None:
    """Review-sec F1, the attack: a request whose ``max_tokens: 1000`` bound does
    not fit the day's budget is refused; the same with ``max_completion_tokens:
    0`` added was admitted on a bound of no output, and a vLLM/SGLang server
    (``max_completion_tokens or max_tokens``) wrote 1000 tokens: 2.01 spent of
    a 1.00 budget. Now both are refused, and nothing reaches the upstream."""
    body = {**BODY, "max_tokens": 1000}  # a bound of more than 2.00
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    steer = {**STEER, "x-fake-completion-tokens": "1000"}  # what such a server writes
    async with running_gateway(
        database_url, upstream=fake, settings=settings(cost_per_day="1.00"), clock=FixedClock(T0)
    ) as h:
        answers = [
            await client.post(
                f"{h.url}/v1/chat/completions", json=sent, headers={**h.auth(), **steer}
            )
            for sent in (body, {**body, "max_completion_tokens": 0})
        ]
        rows = await h.storage.daily(T0.date(), T0.date())
    assert [a.status_code for a in answers] == [429, 429]
    assert answers[1].json()["error"]["code"] == "daily_cost_limit"
    assert fake.requests == []
    assert sum((row.cost for row in rows), Decimal(0)) == 0


# --- lower_output_cap ----------------------------------------------------------------------


@pytest.mark.parametrize("lower", [True, False])
async def test_a_plan_may_lower_the_output_cap_to_what_the_budget_can_pay_for(
    database_url: str, client: httpx.AsyncClient, lower: bool
) -> None:
    """With ``lower_output_cap``, a request whose bound the budget cannot pay for
    is forwarded with its max_tokens lowered to the largest the rest of the
    budget pays for (its reservation that cap's bound); one that cannot pay even
    for a one-token answer is refused as without the option. The fake writes as
    many tokens as the cap allows: the budget is spent to the last token's
    worth and never passed."""
    size = len(orjson.dumps({**BODY, "user": USER}))  # with max_tokens 100
    first = Decimal("0.01") + 100 * Decimal("0.002")  # what the first answer costs
    # Then room for the bound of a 40-token answer (a body one byte shorter).
    budget = first + (size - 1) * Decimal("0.001") + 40 * Decimal("0.002")
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    steer = {**STEER, "x-fake-completion-tokens": "cap"}
    async with running_gateway(
        database_url,
        upstream=fake,
        settings=settings(cost_per_day=str(budget), lower_output_cap=lower),
        clock=FixedClock(T0),
    ) as h:
        results = []
        for _ in range(3):
            results.append(
                await client.post(
                    f"{h.url}/v1/chat/completions", json=BODY, headers={**h.auth(), **steer}
                )
            )
            await h.probes.wait_finished(sum(r.status_code == 200 for r in results))
        rows = await h.storage.daily(T0.date(), T0.date())
    if not lower:
        assert [r.status_code for r in results] == [200, 429, 429]
        return
    assert [r.status_code for r in results] == [200, 200, 429]
    assert results[2].json()["error"]["code"] == "daily_cost_limit"
    sent = [r.json for r in fake.requests]
    assert [body["max_tokens"] for body in sent] == [100, 40]
    # Nothing else of the body changed.
    assert {**sent[1], "max_tokens": 100} == sent[0]
    spent = first + Decimal("0.01") + 40 * Decimal("0.002")
    assert [(row.cost, row.queries) for row in rows] == [(spent, 2)]
    assert spent <= budget


@pytest.mark.parametrize(
    ("kind", "body", "fields"),
    [
        ("chat", {"max_completion_tokens": 500, "max_tokens": 500}, {"max_completion_tokens", "max_tokens"}),
        ("chat", {}, {"max_completion_tokens"}),
        ("response", {"max_output_tokens": 500}, {"max_output_tokens"}),
        ("completion", {"max_tokens": 500}, {"max_tokens"}),
    ],
)  # fmt: skip
def test_the_lowered_cap_is_the_largest_whose_bound_fits(
    tmp_path: Path, kind: str, body: dict[str, Any], fields: set[str]
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(settings()))
    config = load_config(path, env={})
    upstream = OpenAIUpstream(config)
    route = Route(kind, kind)
    request = {"model": "budget-model", "input": "Xin chào", **body}

    def bound(cap: int) -> Decimal:
        return cost_bound(
            upstream, route, with_cap(request, route, cap), reserve_output_tokens=4096,
            answer_reservation=Decimal(0),
        )  # fmt: skip

    remaining = bound(123) + Decimal("0.001")  # not enough for 124 (0.002 more)
    cap = lowered_cap(upstream, route, request, remaining, reserve_output_tokens=4096)
    assert cap == 123
    capped = with_cap(request, route, 123)
    assert {k for k in capped if capped[k] != request.get(k)} == fields
    assert lowered_cap(upstream, route, request, bound(1) - Decimal("0.0001"),
                       reserve_output_tokens=4096) is None  # fmt: skip


def test_an_anthropic_message_cap_is_lowered(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml({**settings(), "upstream": {"kind": "anthropic"}}))
    upstream = AnthropicUpstream(load_config(path, env={}))
    route = Route("message", "messages", role="answer")
    request = {"model": "budget-model", "max_tokens": 1000, "messages": []}
    bound = cost_bound(
        upstream, route, with_cap(request, route, 300), reserve_output_tokens=4096,
        answer_reservation=Decimal(0),
    )  # fmt: skip
    assert lowered_cap(upstream, route, request, bound, reserve_output_tokens=4096) == 300


@pytest.mark.postgres
async def test_forty_parallel_lowered_answers_across_two_processes_never_pass_the_budget(
    postgres_dsn: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """lower_output_cap under concurrency: the lowered caps are reserved in the
    same atomic step as any bound, so answers that write all their cap allows
    still never spend past the budget, and none is left reserved."""
    budget = 3 * BOUND + Decimal("0.2")  # three whole bounds, then room for a lowered one
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with two_gateways(
        postgres_dsn,
        tmp_path,
        fake,
        {"cost_per_day": str(budget), "lower_output_cap": True},
        upstream={"kind": "openai"},
        settings={"prices": PRICES},
    ) as (ports, key, _):
        sent = [
            asyncio.ensure_future(
                client.post(
                    f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions",
                    json=BODY,
                    headers={
                        "Authorization": f"Bearer {key}",
                        **STEER,
                        "x-fake-completion-tokens": "cap",
                        # Every answer waits until all 40 are decided: a settle
                        # gives back what its bound held beyond its cost, and
                        # with answers settling in between, the room could pass
                        # from a whole bound to less than any lowered one and no
                        # cap be lowered.
                        "x-fake-scenario": "hold",
                    },
                )
            )
            for i in range(40)
        ]
        # Decided: refused (answered at once) or admitted (at the upstream, held).
        await until(lambda: len(fake.requests) + sum(s.done() for s in sent) == 40, timeout=30)
        fake.release_held()
        responses = await asyncio.gather(*sent)
    spent, reserved, _ = await _after(postgres_dsn, budget, BOUND)
    caps = [r.json["max_tokens"] for r in fake.requests]
    assert {r.status_code for r in responses} == {200, 429}
    assert sum(r.status_code == 200 for r in responses) == len(caps)
    assert any(cap < 100 for cap in caps)  # some were lowered
    assert spent == sum(Decimal("0.01") + cap * Decimal("0.002") for cap in caps)
    assert spent <= budget and reserved == 0


async def test_an_anthropic_request_is_sent_with_its_max_tokens_lowered(database_url: str) -> None:
    """lower_output_cap on the Anthropic dialect, against a real server: the
    upstream sees max_tokens lowered to the largest whose bound the budget pays
    for, the rest of the body as sent."""
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"kind": "anthropic"},
        "prices": PRICES,
        "plans": {"free": {"cost_per_day": "1.00", "lower_output_cap": True}},
    }
    body = {
        "model": "budget-model",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as http:
            response = await http.post(
                "/v1/messages",
                json=body,
                headers={"x-api-key": h.key, "anthropic-version": "2023-06-01",
                         "x-fake-input-tokens": "10", "x-fake-output-tokens": "5"},
            )  # fmt: skip
        await h.probes.wait_finished(1)
        upstream = AnthropicUpstream(h.gateway.config)
    assert response.status_code == 200
    (sent,) = fake.requests
    cap = sent.json["max_tokens"]
    assert 1 <= cap < 1000
    assert {**sent.json, "max_tokens": 1000} == {**body, "metadata": sent.json["metadata"]}
    route = Route("message", "messages", role="answer")

    def bound(tokens: int) -> Decimal:
        return cost_bound(
            upstream, route, {**sent.json, "max_tokens": tokens}, reserve_output_tokens=4096,
            answer_reservation=Decimal(0),
        )  # fmt: skip

    assert bound(cap) <= Decimal("1.00") < bound(cap + 1)


async def test_usage_lists_every_general_limit_of_the_user_and_the_team(
    database_url: str, client: httpx.AsyncClient
) -> None:
    """Issue 21: /v1/usage lists each [[plans.NAME.limits]] entry, the user's
    and their team's, by the name overrides use, with what it counts."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    mine = [
        {"meter": "queries", "per": "hour", "max": 30},
        {"meter": "cost", "per": "day", "max": "1.5", "models": ["budget-*"]},
        {"meter": "input_tokens", "per": "month", "max": 1000},
        {"meter": "output_tokens", "per": "month", "max": 1000, "name": "writing"},
        {"meter": "uploads", "per": "day", "max": 5},
    ]
    teams = [
        {"meter": "tokens", "per": "day", "max": 1000},
        {"meter": "queries", "per": "hour", "max": 20},
    ]
    config = settings(limits=mine)
    config["plans"]["team"] = {"limits": teams}
    config["prices"] = {**PRICES, "other-model": {"input": "1000", "output": "2000"}}
    async with running_gateway(
        database_url, upstream=fake, settings=config, clock=FixedClock(T0)
    ) as h:
        bob = await h.add_user("bob")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_team("bob", "acme")
        for n, body in enumerate([BODY, BODY, {**BODY, "model": "other-model"}]):
            assert (await ask(client, h, body)).status_code == 200
            await h.probes.wait_finished(n + 1)
        asked = await client.post(
            f"{h.url}/v1/chat/completions",
            json=BODY,
            headers={"Authorization": f"Bearer {bob}", **STEER},
        )
        assert asked.status_code == 200
        await h.probes.wait_finished(4)
        usage = (await client.get(f"{h.url}/v1/usage", headers=h.auth())).json()
    day_reset, month_reset = "2026-11-22T00:00:00+07:00", "2026-12-01T00:00:00+07:00"
    # The hour's oldest counted bucket (09:00-09:05 UTC) leaves its span at
    # 10:05 UTC, 17:05 in Ho Chi Minh City.
    hour_reset = "2026-11-21T17:05:00+07:00"
    limits = usage["limits"]
    assert limits["queries_per_hour"] == {
        "meter": "queries",
        "per": "hour",
        "scope": "user",
        "models": [],
        "used": 3,
        "limit": 30,
        "remaining": 27,
        "resets_at": hour_reset,
    }
    # Only the two answers of a budget-* model count, as exact decimal strings.
    assert limits["cost_per_day[budget-*]"] == {
        "meter": "cost",
        "per": "day",
        "scope": "user",
        "models": ["budget-*"],
        "used": str(2 * ANSWER_COST),
        "limit": "1.5",
        "remaining": str(Decimal("1.5") - 2 * ANSWER_COST),
        "resets_at": day_reset,
    }
    assert {k: limits["input_tokens_per_month"][k] for k in ("used", "remaining")} == {
        "used": 30,
        "remaining": 970,
    }
    assert limits["writing"]["meter"] == "output_tokens"
    assert (limits["writing"]["used"], limits["writing"]["resets_at"]) == (150, month_reset)
    assert limits["uploads_per_day"] == {
        "meter": "uploads",
        "per": "day",
        "scope": "user",
        "models": [],
        "used": 0,
        "limit": 5,
        "remaining": 5,
        "resets_at": day_reset,
    }
    assert limits["queries_per_day"]["limit"] is None  # the plan's keys as before
    # The team's entries count both members: alice's 180 tokens and bob's 60.
    # The unnamed tokens-per-day entry goes by its override's name, as the plan
    # key tokens_per_day (unset here: unlimited) has its own.
    team = usage["team_limits"]
    assert team["tokens_per_day"]["limit"] is None
    assert team["limits.tokens_per_day"] == {
        "meter": "tokens",
        "per": "day",
        "scope": "team",
        "models": [],
        "used": 240,
        "limit": 1000,
        "remaining": 760,
        "resets_at": day_reset,
    }
    assert (team["queries_per_hour"]["used"], team["queries_per_hour"]["resets_at"]) == (
        4,
        hour_reset,
    )


def test_the_dashboard_shows_general_limits_as_the_usage_api_gives_them() -> None:
    """The dashboard's limits table renders each [[plans.NAME.limits]] entry of
    a usage view: counts with their meter, money as exact decimals."""
    from zoneinfo import ZoneInfo

    from gateway.dashboard.formats import number_format
    from gateway.dashboard.user_page import limit_rows

    limits = {
        "queries_per_hour": {
            "meter": "queries", "per": "hour", "scope": "user", "models": [],
            "used": 3, "limit": 30, "remaining": 27, "resets_at": "2026-11-21T17:05:00+07:00",
        },
        "cost_per_day[budget-*]": {
            "meter": "cost", "per": "day", "scope": "user", "models": ["budget-*"],
            "used": "0.22", "limit": "1.5", "remaining": "1.28",
            "resets_at": "2026-11-22T00:00:00+07:00",
        },
    }  # fmt: skip
    rows = str(limit_rows(number_format("en-US"), limits, ZoneInfo(HCM)))
    hour, cost = rows.split("</tr>")[:2]
    assert '<th scope="row">queries_per_hour</th>' in hour
    assert 'data-label="Used">3</td>' in hour and 'aria-label="3 of 30 used, 27 left"' in hour
    assert 'data-label="Resets">2026-11-21 17:05</td>' in hour
    assert '<th scope="row">cost_per_day[budget-*]</th>' in cost
    assert 'data-label="Used">0.22</td>' in cost and 'data-label="Remaining">1.28</td>' in cost


@pytest.mark.parametrize(
    "price",
    [
        {"input": "0.15", "output": "0.60"},
        {"input": "0.15", "cached_input": "0.075", "output": "0.60"},
        {"input": "0.15", "output": "0.60", "audio_input": "0.01"},  # cheaper audio
        {"input": "0.15", "output": "0.60", "audio_output": "9"},
        {"input": "0.15", "output": "0.60", "audio_input": "3", "cache_write_input": "0.2"},
        {"input": "0.15", "output": "0.60", "cache_write_input": "0.1"},
    ],
)
@pytest.mark.parametrize("model", ["gpt-x", "unpriced-model"])
def test_the_bound_is_the_dearest_of_every_way_the_tokens_can_be_billed(
    price: dict[str, str], model: str
) -> None:
    """The bound prices only the ways of billing that a price's rates can make
    dearer (one way when it sets no audio or cache-write rate): always the
    dearest of them all, to the same decimal."""
    data = {**settings(), "prices": {"gpt-x": price}, "pricing": {"unpriced_models": "allow"}}
    data["call_prices"] = {"openai.web_search": {"price": "0.025"}}
    config = parse_config(data, env={})
    upstream = OpenAIUpstream(config)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Xin chào"}],
        "web_search_options": {},
        "max_completion_tokens": 300,
        "n": 2,
    }
    route = _route("chat")
    bound = cost_bound(
        upstream, route, body, reserve_output_tokens=4096, answer_reservation=Decimal(7)
    )
    # Every way, as the bound was first computed.
    usage, _ = bound_usage(body, reserve_output_tokens=4096, kind="chat")
    written = dataclasses.replace(usage, cache_write_tokens=usage.prompt_tokens)
    calls = upstream.calls(route, body, {})
    costs = []
    for tokens in (usage, written):
        metered = Metered(None, None, None, tokens, "timeout", model=model)
        for heard, spoken in ((0, 0), (tokens.prompt_tokens, 0), (0, tokens.completion_tokens),
                              (tokens.prompt_tokens, tokens.completion_tokens)):  # fmt: skip
            audio = Audio(prompt=heard, completion=spoken)
            priced = upstream.priced(metered, model, calls=calls, audio=audio)
            assert priced.usage is not None
            costs.append(priced.usage.cost)
    assert bound == max(costs)
    assert str(bound) == str(max(costs))  # the same decimal, exponent and all
    assert (bound > 0) == (model == "gpt-x")


def test_a_dify_answer_reserves_the_configured_amount_whatever_its_body() -> None:
    """Dify prices an answer only when it ends: the bound is the configured
    reservation, without the body being read for one."""
    body: dict[str, Any] = {"query": "x", "inputs": {}, "max_tokens": "not a number"}
    reserved = Decimal("0.05")
    assert (
        cost_bound(
            object(), _route("chat"), body, reserve_output_tokens=1, answer_reservation=reserved
        )
        == reserved
    )


async def test_a_bounded_pending_row_is_the_estimates_with_the_bound_added(
    tmp_path: Path,
) -> None:
    """The pending row of a request a money budget holds is built once, with its
    bound: it is the unbounded row with the bound reserved and carried as its
    cost (at least), for an answer of each dialect and for a priced side call."""
    config = parse_config(
        {
            "database": {"url": f"sqlite:///{tmp_path / 'g.db'}"},
            "upstreams": {
                "dify": {"url": "http://127.0.0.1:9/v1", "api_key_env": "K", "mount": "/v1"},
                "oai": {"kind": "openai", "url": "http://127.0.0.1:9/v1", "api_key_env": "K"},
            },
            "prices": {"gpt-x": {"input": "0.15", "output": "0.60"}},
            "call_prices": {"dify.text_to_audio": {"price": "0.2"}},
            "accounting": {"answer_reservation": "0.05"},
            "plans": {"free": {}},
        },
        env={"K": "secret"},
    )
    storage = await open_storage(config.database)
    try:
        snap = build_snapshot(config, storage)
        metrics = Metrics()
        settler = Settler(storage, metrics=metrics, spool=None)
        admitter = Admitter(storage, settler, clock=FixedClock(T0), metrics=metrics)
        dify, openai = snap.dialects["dify"], snap.dialects["openai"]
        chat = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}], "n": 2}
        cases = [
            (dify, dify.route("POST", "/chat-messages"), {"query": "Xin chào", "inputs": {}}),
            (openai, openai.route("POST", "/chat/completions"), chat),
            (dify, dify.route("POST", "/text-to-audio"), {"text": "Xin chào"}),
        ]
        bounds = []
        for dialect, route, body in cases:
            plain = admitter._pending(snap, dialect, "r1", route, body, "dify")
            bounded = admitter._pending(snap, dialect, "r1", route, body, "dify", bounded=True)
            bound = bounded.reserved_cost
            assert plain.reserved_cost == 0
            assert bounded == dataclasses.replace(
                plain, reserved_cost=bound, cost=max(plain.cost, bound)
            )
            bounds.append(bound)
        assert bounds[0] == Decimal("0.05")  # Dify: the configured reservation
        assert bounds[1] > 0
        assert bounds[2] == Decimal("0.2")  # a side call: its price
    finally:
        await storage.close()


# --- an answer whose cost no one reports (review-dify D1) ---------------------------------


WORKFLOW = {"inputs": {"q": "hi"}}


@pytest.mark.parametrize("scope", ["user", "team"])
@pytest.mark.parametrize("mode", [None, "blocking"])
async def test_a_blocking_workflow_run_is_refused_where_a_money_budget_applies(
    sqlite_url: str, client: httpx.AsyncClient, scope: str, mode: str | None
) -> None:
    """Dify's blocking workflow body reports the run's total tokens and no price
    (the streamed run's node events carry the nodes' prices): forwarded, it was
    recorded at cost 0, and a user under a money budget ran workflows past it.
    Where a budget applies - the user's or the team's - such a run is refused
    before anything is reserved or sent (Dify runs a workflow blocking when no
    response_mode is given)."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    budget = {"cost_per_day": "100"}
    plans = {"free": budget if scope == "user" else {}, "team": budget}
    config = {"plans": plans, "accounting": {"timezone": HCM, "default_plan": "free"}}
    async with running_gateway(sqlite_url, upstream=fake, settings=config) as h:
        if scope == "team":
            await h.gateway.accounts.create_team("acme", plan="team")
            await h.gateway.accounts.set_team(USER, "acme")
        body = WORKFLOW if mode is None else {**WORKFLOW, "response_mode": mode}
        refused = await client.post(f"{h.url}/v1/workflows/run", json=body, headers=h.auth())
        assert refused.status_code == 403
        assert refused.json()["code"] == "cost_unreported"
        assert '"response_mode": "streaming"' in refused.json()["message"]
        assert fake.hits("/workflows/run") == 0
        days = await h.storage.daily(date(2000, 1, 1), date(2100, 1, 1), user_id=USER)
        assert sum(day.queries for day in days) == 0
        # Streamed, the same run is forwarded and charged what its nodes cost.
        streamed = await client.post(
            f"{h.url}/v1/workflows/run",
            json={**WORKFLOW, "response_mode": "streaming"},
            headers=h.auth(**{"x-fake-message-id": "run-s"}),
        )
        assert streamed.status_code == 200
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert event.answer_id == "run-s" and event.cost == fake.expected_workflow_usage()[3]
        assert event.cost > 0


async def test_a_blocking_workflow_run_without_a_money_budget_is_forwarded(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    """Without a money budget nothing depends on the run's cost: it goes through
    as before, recorded with its tokens (docs/upstreams/dify.md)."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    config = {"plans": {"free": {"tokens_per_day": 100_000}}}
    async with running_gateway(sqlite_url, upstream=fake, settings=config) as h:
        response = await client.post(
            f"{h.url}/v1/workflows/run",
            json={**WORKFLOW, "response_mode": "blocking"},
            headers=h.auth(**{"x-fake-message-id": "run-b"}),
        )
        assert response.status_code == 200
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert event.answer_id == "run-b"
        assert event.total_tokens == fake.expected_workflow_usage()[2]
