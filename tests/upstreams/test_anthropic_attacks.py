"""Attacks on the Anthropic dialect's checks (review-sec), against a real gateway in
front of a real local fake upstream: rates the price table does not hold (long
context, fast mode) and the account's files read through an answer. Each is
refused before anything is forwarded or reserved."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.fakes.anthropic import FakeAnthropic
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
