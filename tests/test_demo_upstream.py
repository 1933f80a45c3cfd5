"""The demo's fake Dify (gateway/demo_upstream.py) behind a real gateway: what
`gateway demo` promises - a streamed answer whose usage is recorded - holds."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from gateway.demo_upstream import ANSWER_PIECES, DemoDify
from tests.harness import UPSTREAM_KEY, USER, running_gateway

QUESTION = {"query": "Xin chào", "inputs": {}, "user": "anyone"}


def _sse(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[5:]) for line in data.split(b"\n") if line.startswith(b"data:")]


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
async def test_an_answer_is_relayed_and_its_usage_recorded(sqlite_url: str, mode: str) -> None:
    async with running_gateway(sqlite_url, upstream=DemoDify(api_key=UPSTREAM_KEY)) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            body = QUESTION | {"response_mode": mode}
            response = await client.post("/v1/chat-messages", json=body, headers=h.auth())
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert response.status_code == 200
    if mode == "streaming":
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        events = _sse(response.content)
        assert [e["event"] for e in events] == ["message"] * len(ANSWER_PIECES) + ["message_end"]
        assert "".join(e["answer"] for e in events[:-1]) == "".join(ANSWER_PIECES)
        assert len({(e["message_id"], e["conversation_id"], e["task_id"]) for e in events}) == 1
        metadata = events[-1]["metadata"]
    else:
        answer = response.json()
        assert answer["answer"] == "".join(ANSWER_PIECES)
        assert answer["mode"] == "chat"
        metadata = answer["metadata"]
    assert metadata["usage"]["total_tokens"] == 1168
    assert metadata["usage"]["total_price"] == "0.0013030"
    assert event.user_id == USER
    assert (event.prompt_tokens, event.completion_tokens, event.total_tokens) == (1033, 135, 1168)
    assert event.cost == Decimal("0.0013030")


async def test_its_refusals_are_in_difys_shape() -> None:
    app = DemoDify(api_key="app-demo")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dify") as client:
        good = {"Authorization": "Bearer app-demo"}
        wrong_key = await client.post(
            "/v1/chat-messages", json=QUESTION, headers={"Authorization": "Bearer other"}
        )
        no_user = await client.post("/v1/chat-messages", json={"query": "?"}, headers=good)
        not_json = await client.post("/v1/chat-messages", content=b"[", headers=good)
        elsewhere = await client.post("/v1/workflows/run", json=QUESTION, headers=good)
        wrong_method = await client.get("/v1/chat-messages", headers=good)
    assert (wrong_key.status_code, wrong_key.json()) == (
        401,
        {"code": "unauthorized", "message": "Access token is invalid", "status": 401},
    )
    assert wrong_key.headers["www-authenticate"] == 'Bearer realm="api"'
    assert (no_user.status_code, no_user.json()["code"]) == (400, "invalid_param")
    assert no_user.json()["message"] == "Arg user must be provided."
    assert (not_json.status_code, not_json.json()["code"]) == (400, "invalid_param")
    assert (elsewhere.status_code, elsewhere.json()) == (
        404,
        {
            "code": "not_found",
            "message": "The requested URL /v1/workflows/run is not served here.",
            "status": 404,
        },
    )
    assert (wrong_method.status_code, wrong_method.json()["code"]) == (405, "method_not_allowed")
