"""Anthropic's compaction and advisor through a router's OpenAI-compatible
routes (review of the review-meter fixes): a router in front of Claude
(LiteLLM) takes both on its chat and responses routes, adds the beta header
itself, and passes on a usage without the steps. Each test is the request an
attacker sends, refused before admission."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, running_gateway

pytestmark = [pytest.mark.asyncio]

CLAUDE = "claude-sonnet-4-6"
HAIKU = "claude-haiku-4-5"
OPUS = "claude-opus-4-8"
# A router in front of Claude (LiteLLM) configured as an `openai` upstream, as
# docs/upstreams/openai.md describes: Claude's prices, the OpenAI wire.
ROUTER_PRICES = {
    CLAUDE: {"input": "3", "output": "15", "cache_write_input": "3.75"},
    HAIKU: {"input": "1", "output": "5", "cache_write_input": "1.25"},
    OPUS: {"input": "5", "output": "25", "cache_write_input": "6.25"},
}
STEER = {"x-fake-prompt-tokens": "23000", "x-fake-completion-tokens": "1000"}


def router_settings(**extra: Any) -> dict[str, Any]:
    return {"upstream": {"kind": "openai"}, "prices": ROUTER_PRICES, **extra}


async def post(h: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post(path, json=body, headers=h.auth(**STEER))


# --- compaction ---------------------------------------------------------------------

COMPACT_EDITS = {"edits": [{"type": "compact_20260112", "trigger": {"type": "input_tokens"}}]}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {
                "model": CLAUDE,
                "messages": [{"role": "user", "content": "Go on with the task."}],
                "context_management": COMPACT_EDITS,
            },
        ),
        (
            "/v1/responses",
            {
                "model": CLAUDE,
                "input": "Go on with the task.",
                "context_management": [{"type": "compaction", "compact_threshold": 1000}],
            },
        ),
    ],
    ids=["chat-anthropic-edits", "responses-compaction"],
)
async def test_compaction_through_an_openai_upstream_router_is_refused(
    database_url: str, path: str, body: dict[str, Any]
) -> None:
    """The attack: the same compaction the Anthropic dialect now refuses, sent to
    a router in front of Claude through the ``openai`` dialect. LiteLLM
    forwards a chat's ``context_management`` to Anthropic unchanged and adds
    the beta header itself (BerriAI/litellm#16528), and maps a response's
    ``context_management: [{"type": "compaction"}]`` to Anthropic's
    ``compact_20260112`` edit with the ``compact-2026-01-12`` beta
    (BerriAI/litellm#41456): the gateway's anthropic-beta check never sees a
    beta, and the OpenAI-shaped usage the router reports has no
    ``iterations`` - the compaction step over the whole conversation (180,000
    tokens in Anthropic's example) was charged nothing."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY, models=(CLAUDE,))
    async with running_gateway(database_url, upstream=fake, settings=router_settings()) as h:
        response = await post(h, path, body)
        if response.status_code == 200:
            await h.probes.wait_finished(1)
    forwarded = [r.json.get("context_management") for r in fake.requests]
    assert response.status_code == 403, (response.status_code, forwarded)
    assert response.json()["error"]["code"] == "option_not_priced"
    assert fake.requests == []


# --- the advisor ----------------------------------------------------------------------


async def test_the_advisor_through_an_openai_upstream_router_is_refused(database_url: str) -> None:
    """The attack: a plan of Haiku alone reaches Opus as the advisor, through a
    router's chat route, where the operator priced the tool's type (LiteLLM
    passes Anthropic's server tools in ``tools`` on: docs/upstreams/openai.md,
    review 10 R10-1). The Anthropic dialect refuses such a tool whatever its
    call price (tool_not_bounded) and holds its model by the plan's list; the
    openai dialect did neither: ``requested_models`` read a tool's model on
    /responses only, and `_chat_calls` charged the one call price. The plan's
    list refuses it first, before anything is reserved."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY, models=(HAIKU,))
    settings = router_settings(
        plans={"free": {"models": [HAIKU]}},
        call_prices={"openai.advisor_20260301": {"price": "0.01"}},
    )
    body = {
        "model": HAIKU,
        "messages": [{"role": "user", "content": "Plan the migration."}],
        "tools": [{"type": "advisor_20260301", "name": "advisor", "model": OPUS}],
    }
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        plain_opus = await post(h, "/v1/chat/completions", {**body, "model": OPUS, "tools": []})
        via_advisor = await post(h, "/v1/chat/completions", body)
        if via_advisor.status_code == 200:
            await h.probes.wait_finished(1)
    assert plain_opus.status_code == 403  # Opus itself is outside the plan
    assert via_advisor.status_code == 403, via_advisor.text
    assert via_advisor.json()["error"]["code"] == "model_not_in_plan"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("path", "tool_type", "price"),
    [
        ("/v1/chat/completions", "advisor_20260301", "openai.advisor_20260301"),
        ("/v1/responses", "advisor_20260301", "openai.advisor_20260301"),
    ],
    ids=["chat", "responses"],
)
async def test_a_routers_advisor_is_refused_whatever_its_call_price(
    database_url: str, path: str, tool_type: str, price: str
) -> None:
    """LiteLLM takes the advisor tool on its Chat Completions route (and runs
    the advisor loop itself for non-Anthropic models; docs.litellm.ai,
    "Advisor Tool"), adding the beta header itself. With the tool priced (as
    any server tool through a router must be), the openai dialect charged one
    call price for consultations of Opus over the whole transcript, as often
    as the answer decides: the Anthropic dialect refuses exactly this
    (tool_not_bounded, `test_a_tool_that_runs_a_model_of_its_own_is_refused_whatever_its_call_price`)."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY, models=(HAIKU,))
    settings = router_settings(call_prices={price: {"price": "0.01"}})
    tool = {"type": tool_type, "name": "advisor", "model": OPUS}
    body: dict[str, Any] = {"model": HAIKU, "tools": [tool]}
    if path.endswith("responses"):
        body["input"] = "Plan the migration."
    else:
        body["messages"] = [{"role": "user", "content": "Plan the migration."}]
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        response = await post(h, path, body)
        if response.status_code == 200:
            await h.probes.wait_finished(1)
    assert response.status_code == 403, response.text[:200]
    assert response.json()["error"]["code"] == "tool_not_bounded"
    assert fake.requests == []
