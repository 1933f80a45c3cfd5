"""Anthropic's sampling steps beyond the answer (review-meter F1, F2): server-side
compaction and the advisor tool, which Anthropic bills beside the answer and
reports only in ``usage.iterations``. A real gateway in front of a local
upstream that answers as Anthropic documents (its "Compaction" and advisor
tool pages): the requests are refused before admission, and an answer that
reports iterations anyway is charged the sum of its steps."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from gateway.types import Receive, Scope, Send
from tests.harness import Harness, running_gateway
from tests.servers import read_body

VERSION = {"anthropic-version": "2023-06-01"}
HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-6"
OPUS = "claude-opus-4-8"
# Anthropic's list prices per million tokens (input, output).
PRICES = {
    HAIKU: {"input": "1", "output": "5"},
    SONNET: {"input": "3", "output": "15"},
    OPUS: {"input": "5", "output": "25"},
}
MILLION = Decimal(1_000_000)


def _cost(model: str, tokens_in: int, tokens_out: int) -> Decimal:
    price = PRICES[model]
    return (tokens_in * Decimal(price["input"]) + tokens_out * Decimal(price["output"])) / MILLION


class CannedAnthropic:
    """An Anthropic Messages upstream that answers every ``POST /messages`` with
    one message whose ``usage`` the test gives (blocking), or the same message as
    Anthropic streams it (message_start, a text block, message_delta with the
    final usage, message_stop). Keeps each request body it got."""

    def __init__(self, usage: dict[str, Any], *, start_usage: dict[str, Any] | None = None):
        self.usage = usage
        self.start_usage = start_usage
        self.requests: list[dict[str, Any]] = []

    def message(self, model: str, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "msg_01review0000000000000",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "Here is the answer."}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = orjson.loads(await read_body(receive))
        self.requests.append(body)
        model = str(body.get("model"))
        if body.get("stream") is not True:
            payload = orjson.dumps(self.message(model, self.usage))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        start = self.message(model, self.start_usage or {"input_tokens": 1, "output_tokens": 1})
        start["content"], start["stop_reason"] = [], None
        events = [
            ("message_start", {"type": "message_start", "message": start}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "Here is the answer."},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": self.usage,
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for name, data in events:
            chunk = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def anthropic_settings(**extra: Any) -> dict[str, Any]:
    return {"upstream": {"kind": "anthropic"}, "prices": PRICES, **extra}


async def post_message(h: Harness, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        response = await client.post(
            "/v1/messages", json=body, headers=h.auth(**VERSION, **headers)
        )
        await response.aread()
        return response


# --- compaction (review-meter F1) ---------------------------------------------------------

# Anthropic's own example (docs "Compaction", "Understanding usage"): the
# compaction step read 180,000 tokens and wrote a 3,500-token summary; the
# answer then read 23,000 and wrote 1,000. "The top-level input_tokens and
# output_tokens do not include compaction iteration usage ... sum across all
# entries in the usage.iterations array."
COMPACTION_USAGE = {
    "input_tokens": 23000,
    "output_tokens": 1000,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "iterations": [
        {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500},
        {"type": "message", "input_tokens": 23000, "output_tokens": 1000},
    ],
}
BODY: dict[str, Any] = {
    "model": SONNET,
    "max_tokens": 4096,
    "messages": [{"role": "user", "content": "Go on with the task (a long session)."}],
}
COMPACT_EDIT = {"edits": [{"type": "compact_20260112"}]}


@pytest.mark.parametrize(
    ("headers", "extra"),
    [
        ({"anthropic-beta": "compact-2026-01-12"}, {"context_management": COMPACT_EDIT}),
        ({"anthropic-beta": "interleaved-thinking-2025-05-14, Compact-2026-01-12"}, {}),
        ({}, {"context_management": {"edits": [{"type": "COMPACT_20270101"}]}}),
    ],
    ids=["beta-and-edit", "beta-in-a-list", "edit-alone"],
)
async def test_server_side_compaction_is_refused_before_admission(
    database_url: str, headers: dict[str, str], extra: dict[str, Any]
) -> None:
    """The attack: compaction turned on, whose step over the whole conversation
    (180,000 tokens in Anthropic's example) was charged nothing."""
    upstream = CannedAnthropic(COMPACTION_USAGE)
    async with running_gateway(database_url, upstream=upstream, settings=anthropic_settings()) as h:
        response = await post_message(h, {**BODY, **extra}, **headers)
        events = await h.events()
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "option_not_priced"
    assert upstream.requests == [] and events == []


async def test_edits_that_only_shorten_the_prompt_are_passed_on(database_url: str) -> None:
    upstream = CannedAnthropic({"input_tokens": 1000, "output_tokens": 100})
    edits = {"edits": [{"type": "clear_tool_uses_20250919"}, {"type": "clear_thinking_20251015"}]}
    async with running_gateway(database_url, upstream=upstream, settings=anthropic_settings()) as h:
        response = await post_message(
            h,
            {**BODY, "context_management": edits},
            **{"anthropic-beta": "context-management-2025-06-27"},
        )
        assert response.status_code == 200, response.text
        await h.probes.wait_finished(1)
        events = await h.events()
    assert upstream.requests[0]["context_management"] == edits
    assert [e.cost for e in events] == [_cost(SONNET, 1000, 100)]


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streamed"])
async def test_an_answer_reporting_iterations_is_charged_the_sum_of_its_steps(
    database_url: str, stream: bool
) -> None:
    """An upstream that compacts on its own (a router, or a beta the gateway does
    not know): the top-level counts leave the compaction step out; Anthropic
    bills every step. 0.084 was charged where 0.6765 is billed."""
    upstream = CannedAnthropic(
        COMPACTION_USAGE, start_usage={"input_tokens": 23000, "output_tokens": 1}
    )
    async with running_gateway(database_url, upstream=upstream, settings=anthropic_settings()) as h:
        response = await post_message(h, {**BODY, "stream": stream})
        assert response.status_code == 200, response.text
        await h.probes.wait_finished(1)
        events = await h.events()
    billed = _cost(SONNET, 180000 + 23000, 3500 + 1000)
    assert [e.cost for e in events] == [billed]
    assert (events[0].prompt_tokens, events[0].completion_tokens) == (203000, 4500)


async def test_iterations_never_lower_the_top_level_counts_and_bad_ones_are_named(
    database_url: str,
) -> None:
    usage = {
        "input_tokens": 5000,
        "output_tokens": 700,
        "iterations": [{"type": "message", "input_tokens": 10, "output_tokens": "x"}, 7],
    }
    upstream = CannedAnthropic(usage)
    async with running_gateway(database_url, upstream=upstream, settings=anthropic_settings()) as h:
        response = await post_message(h, BODY)
        assert response.status_code == 200, response.text
        await h.probes.wait_finished(1)
        events = await h.events()
    assert [e.cost for e in events] == [_cost(SONNET, 5000, 700)]
    assert events[0].outcome == "clamped"


# --- the advisor tool (review-meter F2) --------------------------------------------------

ADVISOR_TOOL = {"type": "advisor_20260301", "name": "advisor", "model": OPUS}
ADVISOR_BETA = {"anthropic-beta": "advisor-tool-2026-03-01"}


async def test_the_advisors_model_is_held_by_the_plans_model_list(database_url: str) -> None:
    """The attack: a plan of Haiku alone reaches Opus as the advisor Haiku
    consults (asked for directly, Opus is refused)."""
    upstream = CannedAnthropic({"input_tokens": 1000, "output_tokens": 100})
    settings = anthropic_settings(
        plans={"free": {"models": [HAIKU]}},
        call_prices={"anthropic.advisor": {"price": "0.01"}},
    )
    body = {**BODY, "model": HAIKU, "tools": [ADVISOR_TOOL]}
    async with running_gateway(database_url, upstream=upstream, settings=settings) as h:
        plain_opus = await post_message(h, {**body, "model": OPUS, "tools": []})
        via_advisor = await post_message(h, body, **ADVISOR_BETA)
    assert plain_opus.status_code == 403
    assert via_advisor.status_code == 403, via_advisor.text
    assert via_advisor.json()["error"]["code"] == "model_not_in_plan"
    assert upstream.requests == []


async def test_a_tool_that_runs_a_model_of_its_own_is_refused_whatever_its_call_price(
    database_url: str,
) -> None:
    """The attack: three consultations of Opus over a 40,000-token transcript
    ($0.72 at Opus's rates) charged one flat call price ($0.01)."""
    upstream = CannedAnthropic({"input_tokens": 1000, "output_tokens": 100})
    settings = anthropic_settings(call_prices={"anthropic.advisor": {"price": "0.01"}})
    async with running_gateway(database_url, upstream=upstream, settings=settings) as h:
        response = await post_message(h, {**BODY, "tools": [ADVISOR_TOOL]}, **ADVISOR_BETA)
        events = await h.events()
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "tool_not_bounded"
    assert "'advisor'" in error["message"] and repr(OPUS) in error["message"]
    assert upstream.requests == [] and events == []


# --- review of the fixes: the same spellings through x-api-key ---------------------


@pytest.mark.parametrize("tail", [b"\xa0", b"\x85\xa0\x85"], ids=["nbsp", "mix"])
async def test_an_x_api_key_with_unicode_whitespace_is_not_the_authorizations_key(
    database_url: str, tail: bytes
) -> None:
    """A3 trims the bearer token of SP and HTAB only, but the check that the
    Authorization header and the dialect's x-api-key carry one credential
    (gateway/http.py `request_headers`) still trims x-api-key with `str.strip`:
    ``x-api-key: KEY<NBSP>`` beside ``Authorization: Bearer KEY`` is taken for
    the same key and answered. A rate limiter or WAF in front that judges an
    Anthropic SDK's caller by x-api-key (what the SDK sends) sees endless
    spellings of one key - the very thing A3 closed on Authorization, and the
    reason the check exists."""
    upstream = CannedAnthropic({"input_tokens": 10, "output_tokens": 5})
    async with running_gateway(database_url, upstream=upstream, settings=anthropic_settings()) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.post(
                "/v1/messages",
                json=BODY,
                headers={
                    "Authorization": f"Bearer {h.key}",
                    "x-api-key": h.key.encode() + tail,
                    "anthropic-version": "2023-06-01",
                },
            )
            if response.status_code == 200:
                await h.probes.wait_finished(1)
    assert response.status_code in (400, 401), (response.status_code, response.text[:160])
    assert upstream.requests == []
