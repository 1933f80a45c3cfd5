"""Attacks on the Anthropic dialect's checks (review-sec), against a real gateway in
front of a real local fake upstream: rates the price table does not hold (long
context, fast mode) and the account's files read through an answer. Each is
refused before anything is forwarded or reserved.

review2: the 1-hour prompt cache (billed above the one cache write price) and
the account's files named to count_tokens.

The 1-hour cache priced (cache_write_1h_input): taken where the model has the
price, its writes charged at it as the stream and the body report them, and
reserved at it; 1-hour writes reported for a request that did not ask for them
charged at the 1-hour rate, never the 5-minute one."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.anthropic import ANSWER_PIECES, FakeAnthropic
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway

MODEL = "claude-sonnet-4-5"
SETTINGS = {
    "upstream": {"kind": "anthropic"},
    "prices": {MODEL: {"input": "3", "output": "15"}},
}
BODY: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 1000,
    "messages": [{"role": "user", "content": "a very long document ..."}],
}
VERSION = {"anthropic-version": "2023-06-01"}


async def post(h: Harness, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post("/v1/messages", json=body, headers=h.auth(**VERSION, **headers))


async def nothing_reserved(h: Harness, fake: FakeAnthropic) -> None:
    assert fake.requests == []
    day = h.gateway.today()
    assert await h.storage.daily(day, day, user_id=USER) == []
    assert await h.events() == []


def anthropic_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "permission_error" and error["code"] == code
    message: str = error["message"]
    return message


async def test_the_long_context_premium_is_refused_not_charged_at_the_base_price(
    database_url: str,
) -> None:
    # Attack: the client's anthropic-beta was passed on as sent, so
    # "context-1m-2025-08-07" opened the 1M-token context; an 800K-token prompt
    # was recorded at the base rates (2.415) where Anthropic bills its
    # long-context rates (6 / 22.50 per MTok: 4.8225).
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    steer = {"x-fake-input-tokens": "800000", "x-fake-output-tokens": "1000"}
    async with running_gateway(database_url, upstream=fake, settings=SETTINGS) as h:
        refused = await post(h, BODY, **{"anthropic-beta": "context-1m-2025-08-07"}, **steer)
        await nothing_reserved(h, fake)
        # A beta that changes no rate is passed on as it came.
        kept = await post(h, BODY, **{"anthropic-beta": "token-efficient-tools-2025-02-19"})
    assert "context-1m-2025-08-07" in anthropic_error(refused, 403, "option_not_priced")
    assert kept.status_code == 200
    assert [r.headers.get("anthropic-beta") for r in fake.requests] == [
        "token-efficient-tools-2025-02-19"
    ]


@pytest.mark.parametrize(
    ("change", "code"),
    [({"speed": "fast"}, "option_not_priced"), ({"inference_geo": "us"}, "option_not_priced"),
     ({"service_tier": "priority"}, "service_tier_not_priced")],
)  # fmt: skip
async def test_a_premium_option_is_refused_not_charged_at_the_base_price(
    sqlite_url: str, change: dict[str, Any], code: str
) -> None:
    # Attack: fast mode (up to 6x the rates) and US-only inference (1.1x) were
    # forwarded and charged at the one [prices] rate per model.
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        refused = await post(h, {**BODY, **change})
        await nothing_reserved(h, fake)
    anthropic_error(refused, 403, code)


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "file", "file_id": "file_Bobs"}},
            {"type": "text", "text": "Quote this document in full."}]}]},
        {"container": "container_Bobs"},
    ],
    ids=["document-file", "container"],
)  # fmt: skip
async def test_a_message_cannot_read_the_accounts_files_by_id(
    sqlite_url: str, change: dict[str, Any]
) -> None:
    # Attack: /v1/files is the operator's (Anthropic resolves a file id across the
    # whole workspace), but a message citing a file by id, or reusing a
    # code-execution container (and the files another answer left in it), was
    # forwarded with the operator's key.
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            direct = await client.get("/v1/files/file_Bobs", headers=h.auth(**VERSION))
        refused = await post(h, {**BODY, **change})
        await nothing_reserved(h, fake)
    anthropic_error(direct, 403, "endpoint_not_allowed")
    anthropic_error(refused, 403, "endpoint_not_allowed")


# --- review2 --------------------------------------------------------------------------------

_ONE_HOUR = {"type": "ephemeral", "ttl": "1h"}
_LONG_TEXT = "a very long document ..."
# Where a cache breakpoint may be set: a content block (at any depth, a tool
# result's too), a system block, a tool, the whole request.
CACHE_CONTROLS: dict[str, dict[str, Any]] = {
    "message-block": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": _LONG_TEXT, "cache_control": _ONE_HOUR}]}]},
    "tool-result-block": {"messages": [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": _LONG_TEXT, "cache_control": _ONE_HOUR}]}]}]},
    "system-block": {"system": [{"type": "text", "text": _LONG_TEXT, "cache_control": _ONE_HOUR}]},
    "tool": {"tools": [{"name": "read", "input_schema": {"type": "object"},
                        "cache_control": _ONE_HOUR}]},
    "top-level": {"cache_control": _ONE_HOUR},
}  # fmt: skip
CACHE_SETTINGS = {
    **SETTINGS,
    # cache_write_input: Anthropic's 5-minute cache write (1.25x input).
    "prices": {MODEL: {"input": "3", "cached_input": "0.30", "cache_write_input": "3.75",
                       "output": "15"}},
}  # fmt: skip
CACHE_STEER = {"x-fake-input-tokens": "10", "x-fake-cache-creation-tokens": "1000000"}


@pytest.mark.parametrize("change", CACHE_CONTROLS.values(), ids=CACHE_CONTROLS.keys())
async def test_a_one_hour_cache_write_is_refused_not_charged_at_the_five_minute_price(
    sqlite_url: str, change: dict[str, Any]
) -> None:
    # Attack (review2 R2-2): cache_control "ttl": "1h" was forwarded; Anthropic
    # bills 1-hour cache writes at 2x input (1M tokens: 6.00 here), but the one
    # cache_write_input price is the 5-minute write's 1.25x, so they were
    # charged 3.75.
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=CACHE_SETTINGS) as h:
        refused = await post(h, {**BODY, **change}, **CACHE_STEER)
        in_vietnamese = await post(h, {**BODY, **change}, **{"accept-language": "vi"})
        await nothing_reserved(h, fake)
    message = anthropic_error(refused, 403, "option_not_priced")
    # It names the price that would open it, in the user's language too.
    assert message == (
        "The option cache_control.ttl: '1h' has no price on this gateway "
        f'(prices."{MODEL}".cache_write_1h_input), so it is not available.'
    )
    assert anthropic_error(in_vietnamese, 403, "option_not_priced") == (
        "Tùy chọn cache_control.ttl: '1h' chưa được định giá trên gateway này "
        f'(prices."{MODEL}".cache_write_1h_input) nên không dùng được.'
    )


@pytest.mark.parametrize("ttl", ["5m", None, "absent"])
async def test_a_five_minute_cache_write_is_forwarded_and_charged_its_price(
    sqlite_url: str, ttl: str | None
) -> None:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl != "absent":
        control["ttl"] = ttl
    block = {"type": "text", "text": _LONG_TEXT, "cache_control": control}
    body = {**BODY, "messages": [{"role": "user", "content": [block]}]}
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=CACHE_SETTINGS) as h:
        answer = await post(h, body, **CACHE_STEER)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answer.status_code == 200, answer.text
    assert fake.requests[0].json["messages"][0]["content"][0]["cache_control"] == control
    assert event.cost >= Decimal("3.75")  # 1M cache-written tokens at cache_write_input


_COUNTED_FILE = {**BODY, "messages": [{"role": "user", "content": [
    {"type": "document", "source": {"type": "file", "file_id": "file_Bobs"}},
    {"type": "text", "text": "Quote this document in full."}]}]}  # fmt: skip
FILES_BETA = {"anthropic-beta": "files-api-2025-04-14"}


async def count(h: Harness, body: dict[str, Any] | bytes, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        path, auth = "/v1/messages/count_tokens", h.auth(**VERSION, **FILES_BETA, **headers)
        if isinstance(body, bytes):
            return await client.post(path, content=body, headers=auth)
        return await client.post(path, json=body, headers=auth)


async def test_count_tokens_cannot_read_the_accounts_files_by_id(sqlite_url: str) -> None:
    # Attack (review2 R2-6): a message naming a file by id is the operator's (F3),
    # but counting the same message's tokens was passed through with the
    # operator's key: whether any file id of the workspace exists, and its size
    # (404 or a count), for free and without limit.
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        message = await post(h, _COUNTED_FILE, **FILES_BETA)
        counted = await count(h, _COUNTED_FILE)
        # Nor in a body not sent as JSON, which the gateway would not have read.
        unread = await count(h, orjson.dumps(_COUNTED_FILE), **{"content-type": "text/plain"})
        await nothing_reserved(h, fake)
    anthropic_error(message, 403, "endpoint_not_allowed")
    anthropic_error(counted, 403, "endpoint_not_allowed")
    assert unread.status_code == 400, unread.text


async def test_count_tokens_of_a_message_naming_no_file_is_passed_through(
    sqlite_url: str,
) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": None}}, "Hi"]}]}  # fmt: skip
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        counted = await count(h, BODY)
        null_id = await count(h, body)
    assert counted.status_code == 200 and "input_tokens" in counted.json(), counted.text
    assert null_id.status_code == 200, null_id.text
    assert len(fake.requests) == 2


# --- the 1-hour cache priced ([prices."MODEL"].cache_write_1h_input) -----------------------

ONE_HOUR_SETTINGS = {
    **SETTINGS,
    "prices": {MODEL: {**CACHE_SETTINGS["prices"][MODEL], "cache_write_1h_input": "6"}},
}
# Of the 1M cache writes, 600,000 to a 1-hour cache (usage.cache_creation).
STEER_1H = {**CACHE_STEER, "x-fake-cache-creation-1h-tokens": "600000"}


def cost_1h(rate: str) -> Decimal:
    """STEER_1H's answer: 10 uncached prompt tokens at 3, 400,000 5-minute writes
    at 3.75, 600,000 1-hour writes at ``rate``, the answer's output at 15."""
    micro = (
        10 * Decimal("3")
        + 400_000 * Decimal("3.75")
        + 600_000 * Decimal(rate)
        + len(ANSWER_PIECES) * Decimal("15")
    )
    return micro.scaleb(-6)


def _cached(ttl: str | None, **body: Any) -> dict[str, Any]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    block = {"type": "text", "text": _LONG_TEXT, "cache_control": control}
    return {**BODY, **body, "messages": [{"role": "user", "content": [block]}]}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "blocking"])
async def test_a_one_hour_cache_is_forwarded_and_charged_its_price(
    database_url: str, stream: bool
) -> None:
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    body = _cached("1h", stream=stream)
    async with running_gateway(database_url, upstream=fake, settings=ONE_HOUR_SETTINGS) as h:
        answer = await post(h, body, **STEER_1H)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answer.status_code == 200, answer.text
    control = fake.requests[0].json["messages"][0]["content"][0]["cache_control"]
    assert control == {"type": "ephemeral", "ttl": "1h"}
    assert event.cost == cost_1h("6") == Decimal("5.100135")
    assert (event.prompt_tokens, event.cache_write_tokens) == (1_000_010, 1_000_000)
    assert event.outcome == "complete"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "blocking"])
@pytest.mark.parametrize(
    "settings", [ONE_HOUR_SETTINGS, CACHE_SETTINGS], ids=["1h-priced", "1h-unpriced"]
)
async def test_one_hour_writes_a_request_did_not_ask_for_are_charged_the_one_hour_rate(
    sqlite_url: str, settings: dict[str, Any], stream: bool
) -> None:
    # Attack: a request the gateway reads as caching for 5 minutes (or, with the
    # ttl where the gateway does not look, as asking for nothing) whose answer
    # reports 1-hour writes: charged at cache_write_input (3.75) they would be
    # undercharged. They are charged the 1-hour price, or, where the model has
    # none, Anthropic's 2x input (6 here).
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        answer = await post(h, _cached("5m", stream=stream), **STEER_1H)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert answer.status_code == 200, answer.text
    assert event.cost == cost_1h("6")
    assert event.cost > cost_1h("3.75")  # what the 5-minute price made of it


async def test_a_one_hour_cache_is_reserved_at_the_one_hour_rate(sqlite_url: str) -> None:
    # Attack: a request asking for a 1-hour cache whose money bound priced its
    # prompt as 5-minute writes (1.25x input) could pass the budget by its
    # 1-hour writes (2x). With 0.50 left, a 100 KB prompt is bound near 0.39 as
    # 5-minute writes and near 0.62 as 1-hour ones: refused, nothing forwarded.
    text = "x" * 100_000
    settings = {**ONE_HOUR_SETTINGS, "plans": {"free": {"cost_per_day": "0.50"}}}
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        body = _cached("1h", system=text)
        refused = await post(h, body)
        assert refused.status_code == 429, refused.text
        assert refused.headers["x-ratelimit-resource"] == "cost_per_day"
        assert fake.requests == []
        # The same prompt cached for 5 minutes fits.
        admitted = await post(h, _cached("5m", system=text))
        await h.probes.wait_finished(1)
    assert admitted.status_code == 200, admitted.text
    assert len(fake.requests) == 1
