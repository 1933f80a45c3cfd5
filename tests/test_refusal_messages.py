"""Refusals a frontend can show, against a real gateway: the message in the user's
language (Accept-Language), the reset time in the configured zone, operator
templates from TOML (reloaded with the rest), "your limit" for a per-user
override - and everything else about the refusal exactly as in English."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.clock import FixedClock
from gateway.config import load_config
from gateway.errors import ConfigError
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway, to_toml

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "x"}
# 23:00 in Ho Chi Minh City on 21 November: the day resets at 00:00 on the 22nd.
CLOCK = datetime(2026, 11, 21, 16, 0, tzinfo=UTC)
ENGLISH = "You have used all 1 questions of your plan for today. It resets at 2026-11-22 00:00 +07."
VIETNAMESE = (
    "Bạn đã dùng hết 1 câu hỏi hôm nay theo gói của bạn. "
    "Hạn mức sẽ được đặt lại lúc 00:00 ngày 22/11."
)


def settings(**extra: Any) -> dict[str, Any]:
    return {
        "plans": {"free": {"queries_per_day": 1}},
        "accounting": {"timezone": "Asia/Ho_Chi_Minh", "default_plan": "free"},
        **extra,
    }


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as c:
        yield c


async def ask(
    client: httpx.AsyncClient, h: Harness, key: str | None = None, **headers: str
) -> httpx.Response:
    return await client.post(f"{h.url}/v1/chat-messages", json=CHAT, headers=h.auth(key, **headers))


async def refused(client: httpx.AsyncClient, h: Harness, **headers: str) -> httpx.Response:
    """The second question of a user with one a day: refused at the limit."""
    assert (await ask(client, h)).status_code == 200
    await h.probes.wait_finished(1)
    response = await ask(client, h, **headers)
    assert response.status_code == 429
    return response


def same_refusal(a: httpx.Response, b: httpx.Response) -> None:
    """Two refusals that differ in nothing but their message's language."""
    assert a.status_code == b.status_code
    body_a, body_b = a.json(), b.json()
    assert list(body_a) == list(body_b) == ["code", "message", "status"]
    assert body_a["code"] == body_b["code"] and body_a["status"] == body_b["status"]
    skip = {"content-length", "content-language", "x-request-id", "date"}
    assert {k: v for k, v in a.headers.items() if k not in skip} == {
        k: v for k, v in b.headers.items() if k not in skip
    }


async def test_a_daily_limit_refusal_reads_in_vietnamese_with_the_reset_in_the_configured_zone(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(sqlite_url, settings=settings(), clock=FixedClock(CLOCK)) as h:
        vietnamese = await refused(client, h, **{"Accept-Language": "vi-VN,vi;q=0.9,en;q=0.8"})
        english = await ask(client, h)
    assert vietnamese.json() == {"code": "daily_query_limit", "message": VIETNAMESE, "status": 429}
    assert vietnamese.headers["content-language"] == "vi"
    assert english.json()["message"] == ENGLISH
    assert english.headers["content-language"] == "en"
    # Everything but the message is as in English: code, status, Retry-After, X-RateLimit-*.
    same_refusal(vietnamese, english)
    assert vietnamese.headers["retry-after"] == "3600"
    assert vietnamese.headers["x-ratelimit-resource"] == "queries_per_day"
    assert vietnamese.headers["x-ratelimit-remaining"] == "0"


async def test_english_is_the_default(sqlite_url: str, client: httpx.AsyncClient) -> None:
    async with running_gateway(sqlite_url, settings=settings(), clock=FixedClock(CLOCK)) as h:
        unnamed = await refused(client, h)
        french = await ask(client, h, **{"Accept-Language": "fr-FR, fr;q=0.9"})
    assert unnamed.json()["message"] == french.json()["message"] == ENGLISH
    assert unnamed.headers["content-language"] == french.headers["content-language"] == "en"


async def test_the_default_language_is_configurable(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    vi_default = settings(messages={"default_language": "vi"})
    async with running_gateway(sqlite_url, settings=vi_default, clock=FixedClock(CLOCK)) as h:
        unnamed = await refused(client, h)
        english = await ask(client, h, **{"Accept-Language": "en-GB"})
    assert unnamed.json()["message"] == VIETNAMESE
    assert english.json()["message"] == ENGLISH


async def test_an_operator_template_from_toml_is_used_and_reloaded(
    sqlite_url: str, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    template = "Bạn đã dùng hết {limit} câu hỏi hôm nay. Hạn mức được đặt lại {reset}."
    config_file = tmp_path / "gateway.toml"
    own = settings(messages={"vi": {"queries_per_day": template}})
    async with running_gateway(
        sqlite_url, settings=own, clock=FixedClock(CLOCK), config_file=config_file
    ) as h:
        first = await refused(client, h, **{"Accept-Language": "vi"})
        english = await ask(client, h)
        text = config_file.read_text().replace(
            "Bạn đã dùng hết {limit}", "Hôm nay bạn đã hỏi đủ {used}/{limit}"
        )
        config_file.write_text(text)
        assert await h.gateway.reload() is True
        reloaded = await ask(client, h, **{"Accept-Language": "vi"})
    assert first.json()["message"] == (
        "Bạn đã dùng hết 1 câu hỏi hôm nay. Hạn mức được đặt lại lúc 00:00 ngày 22/11."
    )
    assert english.json()["message"] == ENGLISH  # other languages keep the built-in text
    assert reloaded.json()["message"] == (
        "Hôm nay bạn đã hỏi đủ 1/1 câu hỏi hôm nay. Hạn mức được đặt lại lúc 00:00 ngày 22/11."
    )


async def test_a_limit_set_by_an_override_says_your_limit(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    plan = settings(plans={"free": {"queries_per_day": 100, "tokens_per_day": 10**6}})
    async with running_gateway(sqlite_url, settings=plan, clock=FixedClock(CLOCK)) as h:
        await h.gateway.accounts.set_override(USER, "queries_per_day", 1)
        vietnamese = await refused(client, h, **{"Accept-Language": "vi"})
        english = await ask(client, h)
        # Another user on the same plan, and an override of a limit that did not refuse.
        bob = await h.add_user("bob")
        await h.gateway.accounts.set_override("bob", "tokens_per_day", 5)
        bob_answer = await ask(client, h, bob)
    assert vietnamese.json() == {
        "code": "daily_query_limit",
        "message": "Bạn đã dùng hết 1 câu hỏi hôm nay theo hạn mức của bạn. "
        "Hạn mức sẽ được đặt lại lúc 00:00 ngày 22/11.",
        "status": 429,
    }
    assert english.json()["message"] == (
        "You have reached your limit of 1 questions for today. It resets at 2026-11-22 00:00 +07."
    )
    assert "plan" not in english.json()["message"]
    same_refusal(vietnamese, english)
    assert english.headers["x-ratelimit-limit"] == "1"
    assert bob_answer.status_code == 200


async def test_an_override_of_another_limit_still_says_your_plan(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(sqlite_url, settings=settings(), clock=FixedClock(CLOCK)) as h:
        await h.gateway.accounts.set_override(USER, "tokens_per_day", 10**6)
        response = await refused(client, h)
    assert response.json()["message"] == ENGLISH


async def test_refusals_raised_in_english_elsewhere_are_translated_too(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    async with running_gateway(sqlite_url, settings=settings()) as h:
        bad_key = await ask(client, h, "gw-wrong", **{"Accept-Language": "vi"})
        bad_json = await client.post(
            f"{h.url}/v1/chat-messages",
            content=b"{not json",
            headers=h.auth(**{"Accept-Language": "vi", "Content-Type": "application/json"}),
        )
    assert bad_key.status_code == 401
    assert bad_key.json() == {
        "code": "unauthorized",
        "message": "Khóa gateway không hợp lệ.",
        "status": 401,
    }
    assert bad_key.headers["www-authenticate"] == 'Bearer realm="api"'
    assert bad_key.headers["content-language"] == "vi"
    assert bad_json.status_code == 400
    assert bad_json.json() == {
        "code": "invalid_param",
        "message": "Nội dung yêu cầu không phải JSON hợp lệ.",
        "status": 400,
    }


async def test_openai_refusals_keep_their_shape_in_vietnamese(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    openai = {
        "upstream": {"kind": "openai"},
        "prices": {"gpt-4o-mini": {"input": "1", "output": "2"}},
    }
    async with running_gateway(sqlite_url, upstream=fake, settings=openai) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as c:
            body = {"model": "o3-pro", "messages": [{"role": "user", "content": "Xin chào"}]}
            vi = await c.post(
                "/v1/chat/completions", json=body, headers=h.auth(**{"Accept-Language": "vi"})
            )
            en = await c.post("/v1/chat/completions", json=body, headers=h.auth())
    assert vi.status_code == en.status_code == 403
    assert vi.json() == {
        "error": {
            "message": "Mô hình 'o3-pro' chưa được định giá trên gateway này nên không thể tính phí.",
            "type": "permission_error",
            "param": None,
            "code": "model_not_priced",
        }
    }
    assert en.json()["error"] == {**vi.json()["error"], "message": en.json()["error"]["message"]}
    assert en.json()["error"]["message"].startswith("The model 'o3-pro' has no price")
    assert fake.requests == []


def test_an_invalid_template_in_the_file_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml({"messages": {"vi": {"queries_per_day": "Hết {limt} câu."}}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message.startswith("messages.vi.queries_per_day: unknown placeholder {limt}")


async def test_an_invalid_template_on_reload_keeps_the_running_messages(
    sqlite_url: str, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    config_file = tmp_path / "gateway.toml"
    own = settings(messages={"vi": {"queries_per_day": "Hết {limit} câu."}})
    async with running_gateway(
        sqlite_url, settings=own, clock=FixedClock(CLOCK), config_file=config_file
    ) as h:
        config_file.write_text(config_file.read_text().replace("{limit}", "{limits}"))
        assert await h.gateway.reload() is False
        response = await refused(client, h, **{"Accept-Language": "vi"})
    assert response.json()["message"] == "Hết 1 câu."


async def test_a_feature_turned_off_by_an_override_says_so(
    sqlite_url: str, client: httpx.AsyncClient
) -> None:
    advanced = {**CHAT, "inputs": {"rag_mode": "advanced"}}
    async with running_gateway(sqlite_url, settings=settings()) as h:
        await h.gateway.accounts.set_override(USER, "advanced_rag", False)
        vi = await client.post(
            f"{h.url}/v1/chat-messages",
            json=advanced,
            headers=h.auth(**{"Accept-Language": "vi"}),
        )
        en = await client.post(f"{h.url}/v1/chat-messages", json=advanced, headers=h.auth())
    assert vi.status_code == en.status_code == 403
    assert vi.json() == {
        "code": "feature_not_in_plan",
        "message": "RAG nâng cao đã bị tắt đối với tài khoản của bạn.",
        "status": 403,
    }
    assert en.json()["message"] == "Advanced RAG is turned off for your account."
