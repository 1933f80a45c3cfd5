"""The streaming proxy end to end: real sockets, a fake Dify, a real database."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import shutil
import socket
import types
import zlib
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

import gateway.proxy
from gateway.request_limits.protocol import BoundedHeadProtocol, HeadSettings
from gateway.upstream_client import UpstreamClient
from gateway.upstreams.dify import DifyUpstream
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, direct_request, running_gateway
from tests.servers import read_body, serve

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "mallory"}
FULL = (1033, 135, 1168, Decimal("0.0013030"))


@pytest.fixture
async def gw(sqlite_url: str) -> AsyncIterator[Harness]:
    async with running_gateway(sqlite_url) as harness:
        yield harness


async def stream(
    h: Harness, path: str, body: dict[str, Any], **headers: str
) -> tuple[httpx.Response, bytes]:
    async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
        async with client.stream("POST", path, json=body, headers=h.auth(**headers)) as response:
            data = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, data


def usage_of(event: Any) -> tuple[int, int, int, Decimal]:
    return (event.prompt_tokens, event.completion_tokens, event.total_tokens, event.cost)


def sse_events(data: bytes) -> list[dict[str, Any]]:
    text = data.decode().replace("\r\n", "\n")
    return [orjson.loads(line[5:]) for line in text.split("\n") if line.startswith("data:")]


# --- byte-exact pass-through -------------------------------------------------------


class Scripted:
    """An upstream that answers every request with fixed chunks (and records requests)."""

    def __init__(
        self, chunks: list[bytes], *, content_type: bytes = b"text/event-stream", status: int = 200
    ) -> None:
        self.chunks = chunks
        self.content_type = content_type
        self.status = status
        self.requests: list[tuple[dict[bytes, bytes], bytes, bytes]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = await read_body(receive)
        self.requests.append((dict(scope["headers"]), scope["query_string"], body))
        if self.gate is not None:
            await self.gate.wait()
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [
                    (b"content-type", self.content_type),
                    (b"x-upstream", b"yes"),
                    (b"keep-alive", b"timeout=5"),
                ],
            }
        )
        for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


DIFY_EXAMPLE = (
    b'data: {"event":"message","conversation_id":"c1","message_id":"m1","created_at":1705398420,"task_id":"t1","id":"m1","answer":"Hi"}\n\n'
    b"event: ping\n\n"
    b'data: {"event":"message","conversation_id":"c1","message_id":"m1","created_at":1705398420,"task_id":"t1","id":"m1","answer":" there"}\n\n'
    b'data: {"event":"message_end","conversation_id":"c1","message_id":"m1","created_at":1705398420,"task_id":"t1","id":"m1","metadata":{"usage":{"prompt_tokens":1033,"prompt_unit_price":"0.001","prompt_price_unit":"0.001","prompt_price":"0.0010330","completion_tokens":135,"completion_unit_price":"0.002","completion_price_unit":"0.001","completion_price":"0.0002700","total_tokens":1168,"total_price":"0.0013030","currency":"USD","latency":1.38},"retriever_resources":[]},"files":null}\n\n'
)


@pytest.mark.parametrize(
    "chunks",
    [
        [DIFY_EXAMPLE],
        [DIFY_EXAMPLE[i : i + 1] for i in range(len(DIFY_EXAMPLE))],
        [
            DIFY_EXAMPLE.replace(b"\n", b"\r\n")[i : i + 7]
            for i in range(0, len(DIFY_EXAMPLE) * 2, 7)
        ],
    ],
    ids=["whole", "one-byte", "crlf-7-byte"],
)
async def test_stream_passes_through_byte_for_byte_and_is_metered(
    sqlite_url: str, chunks: list[bytes]
) -> None:
    upstream = Scripted([c for c in chunks if c])
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        response, data = await stream(h, "/v1/chat-messages", CHAT)
        await h.probes.wait_finished(1)
        assert response.status_code == 200
        assert data == b"".join(chunks)
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-upstream"] == "yes"
        assert "keep-alive" not in response.headers  # hop-by-hop, dropped
        (event,) = await h.events()
        assert usage_of(event) == FULL
        assert (event.answer_id, event.conversation_id, event.user_id, event.outcome) == (
            "m1",
            "c1",
            USER,
            "complete",
        )
        assert (
            event.endpoint == "chat-messages"
            and event.request_id == response.headers["x-request-id"]
        )
        headers, _, body = upstream.requests[0]
        assert orjson.loads(body)["user"] == USER
        assert headers[b"authorization"] == f"Bearer {UPSTREAM_KEY}".encode()
        assert headers[b"x-trace-id"] == response.headers["x-request-id"].encode()
        assert headers[b"accept-encoding"] == b"identity"


# --- every Dify answer shape -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "scenario"),
    [
        ("/v1/chat-messages", "chat"),
        ("/v1/chat-messages", "agent"),
        ("/v1/chat-messages", "chatflow"),
        ("/v1/chat-messages", "chatflow_reversed"),
        ("/v1/chat-messages", "spaced"),
        ("/v1/chat-messages", "crlf"),
        ("/v1/chat-messages", "onebyte"),
        ("/v1/chat-messages", "title_delay"),
        ("/v1/completion-messages", "completion"),
        ("/v1/completion-messages", "completion,spaced"),
    ],
)
async def test_streamed_answers_are_recorded_once(gw: Harness, path: str, scenario: str) -> None:
    response, data = await stream(
        gw, path, CHAT, **{"x-fake-scenario": scenario, "x-fake-message-id": "msg-1"}
    )
    await gw.probes.wait_finished(1)
    assert response.status_code == 200
    kinds = [e["event"] for e in sse_events(data)]
    assert "message_end" in kinds
    (event,) = await gw.events()
    assert usage_of(event) == FULL
    assert event.answer_id == "msg-1" and event.outcome == "complete" and not event.estimated


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
async def test_workflow_runs_are_recorded(gw: Harness, mode: str) -> None:
    body = {"inputs": {"q": "hi"}, "response_mode": mode, "user": "mallory"}
    response, data = await stream(gw, "/v1/workflows/run", body, **{"x-fake-message-id": "run-1"})
    await gw.probes.wait_finished(1)
    assert response.status_code == 200
    (event,) = await gw.events()
    assert gw.fake is not None
    prompt, completion, total, cost = gw.fake.expected_workflow_usage()
    assert event.answer_id == "run-1" and event.total_tokens == total
    if mode == "streaming":  # node events carry the split and the price
        assert (event.prompt_tokens, event.completion_tokens, event.cost) == (
            prompt,
            completion,
            cost,
        )
    assert event.endpoint == "workflows/run"


@pytest.mark.parametrize("path", ["/v1/chat-messages", "/v1/completion-messages"])
async def test_blocking_answers_are_recorded(gw: Harness, path: str) -> None:
    response, data = await stream(
        gw, path, {**CHAT, "response_mode": "blocking"}, **{"x-fake-message-id": "b-1"}
    )
    await gw.probes.wait_finished(1)
    assert response.status_code == 200
    assert orjson.loads(data)["metadata"]["usage"]["total_tokens"] == 1168
    (event,) = await gw.events()
    assert usage_of(event) == FULL and event.answer_id == "b-1"


async def test_answers_under_one_upstream_id_are_each_charged(database_url: str) -> None:
    """Attack (review-once F1): an upstream that gives every answer the same
    message id - two of alice's, one of bob's. Each is charged (under
    ``<id>#<request id>`` after the first); only a record of the same request
    is a duplicate (a retried write, a replayed spool line: tests/storage). The
    id stays the first answer's (whose object it names)."""
    async with running_gateway(database_url) as gw:
        bob = await gw.add_user("bob")
        for n, key in enumerate((gw.key, gw.key, bob), start=1):
            headers = {"Authorization": f"Bearer {key}", "x-fake-message-id": "same"}
            await stream(gw, "/v1/chat-messages", CHAT, **headers)
            await gw.probes.wait_finished(n)
        events = await gw.events()  # in settle order
        assert [e.user_id for e in events] == [USER, USER, "bob"]
        assert [e.answer_id for e in events] == ["same"] + [
            f"same#{e.request_id}" for e in events[1:]
        ]
        assert all(usage_of(e) == FULL for e in events)
        for user, answers in ((USER, 2), ("bob", 1)):
            charged = await gw.storage.get_user(user)
            assert charged is not None and charged.lifetime_tokens == answers * 1168
        assert gw.gateway.metrics.get("gateway_answers_duplicate_total") == 0
        owner = await gw.storage.answer_owner("same")
        assert owner is not None and owner.user_id == USER


# --- failures ---------------------------------------------------------------------------


async def test_error_event_after_text_charges_an_estimate(gw: Harness) -> None:
    response, data = await stream(
        gw, "/v1/chat-messages", CHAT, **{"x-fake-scenario": "error_midstream"}
    )
    await gw.probes.wait_finished(1)
    assert [e["event"] for e in sse_events(data)][-1] == "error"
    (event,) = await gw.events()
    assert event.outcome == "error" and event.estimated
    assert 0 < event.completion_tokens < 20 and event.cost == 0


async def test_error_event_before_text_charges_nothing(gw: Harness) -> None:
    await stream(gw, "/v1/chat-messages", CHAT, **{"x-fake-scenario": "error_first"})
    await gw.probes.wait_finished(1)
    assert await gw.events() == []
    (row,) = await gw.storage.daily(*_today(gw))
    assert row.queries == 0  # the reserved query was given back


def _sse(*events: dict[str, Any]) -> list[bytes]:
    return [b"data: " + orjson.dumps(event) + b"\n\n" for event in events]


AGENT_HEAD = {"conversation_id": "c1", "message_id": "m1", "task_id": "t1", "created_at": 1}
TOOL_INPUT = '{"webscraper": {"url": "http://example.com/big"}}'


def _thought(thought_id: str, position: int, **work: str) -> dict[str, Any]:
    fields = {"thought": "", "observation": "", "tool": "", "tool_input": ""} | work
    return {
        "event": "agent_thought",
        **AGENT_HEAD,
        "id": thought_id,
        "position": position,
        **fields,
    }


CONTEXT_ERROR = {
    "event": "error",
    "conversation_id": "c1",
    "message_id": "m1",
    "status": 400,
    "code": "completion_request_error",
    "message": "[openai] Bad Request Error, maximum context length exceeded",
}


async def test_an_agent_run_failing_after_its_tool_call_is_charged_not_refunded(
    sqlite_url: str,
) -> None:
    """Review D3. Attack: steer an agent app into a failure after its first,
    billed model call (its tool's result past the context window): Dify streams
    thoughts, no text, no usage, then an error. Recorded as an estimate with
    outcome error; the query stays spent."""
    upstream = Scripted(
        _sse(
            _thought("th1", 1),
            {"event": "agent_message", **AGENT_HEAD, "id": "m1", "answer": ""},
            _thought("th1", 1, tool="webscraper", tool_input=TOOL_INPUT),
            _thought("th1", 1, tool="webscraper", tool_input=TOOL_INPUT, observation="x" * 20_000),
            _thought("th2", 2),
            CONTEXT_ERROR,
        )
    )
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        body = {**CHAT, "query": "fetch http://example.com/big and summarise it"}
        response, data = await stream(h, "/v1/chat-messages", body)
        assert response.status_code == 200
        assert [e["event"] for e in sse_events(data)][-1] == "error"
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert (event.answer_id, event.outcome, event.estimated) == ("m1", "error", True)
        assert event.completion_tokens > 0 and event.prompt_tokens > 0
        (row,) = await h.storage.daily(*_today(h))
        assert row.queries == 1  # not given back


SPOKEN = [
    *DIFY_EXAMPLE.split(b"\n\n")[:3],
    *(
        b'data: {"event":"tts_message","conversation_id":"c1","message_id":"m1",'
        b'"created_at":1705398420,"task_id":"t1","audio":"' + b"UklGRg==" * 4000 + b'"}'
        for _ in range(3)
    ),
    DIFY_EXAMPLE.split(b"\n\n")[3],
    b'data: {"event":"tts_message_end","conversation_id":"c1","message_id":"m1",'
    b'"created_at":1705398420,"task_id":"t1","audio":""}',
]
SPOKEN_STREAM = b"".join(chunk + b"\n\n" for chunk in SPOKEN)


async def test_auto_play_speech_in_a_streamed_answer_is_charged(sqlite_url: str) -> None:
    """Review D2. Attack: stream answers of an app with auto-play text-to-speech;
    the speech Dify synthesises is charged at /text-to-audio's price."""
    settings = {"call_prices": {"dify.text_to_audio": {"price": "0.01", "currency": "USD"}}}
    upstream = Scripted([SPOKEN_STREAM])
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        _, data = await stream(h, "/v1/chat-messages", {**CHAT, "conversation_id": "c1"})
        assert data == SPOKEN_STREAM  # passed on untouched
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert usage_of(event) == (*FULL[:3], FULL[3] + Decimal("0.01"))
        assert h.gateway.metrics.get("gateway_unpriced_calls_total") == 0


async def test_unpriced_auto_play_speech_is_recorded_counted_and_logged_once(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a price the speech has streamed: each answer is recorded as Dify
    reported it, counted in gateway_unpriced_calls_total, and the operator warned
    once per process and upstream."""
    upstream = Scripted([SPOKEN_STREAM])
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        for n, answer in enumerate((b"m1", b"m2")):
            upstream.chunks = [SPOKEN_STREAM.replace(b'"m1"', b'"' + answer + b'"')]
            await stream(h, "/v1/chat-messages", {**CHAT, "conversation_id": "c1"})
            await h.probes.wait_finished(n + 1)
        events = await h.events()
        assert sorted((e.answer_id, usage_of(e)) for e in events) == [("m1", FULL), ("m2", FULL)]
        labels = {"upstream": "default", "call": "dify.text_to_audio"}
        assert h.gateway.metrics.get("gateway_unpriced_calls_total", **labels) == 2
        warned = [r for r in caplog.records if "dify.text_to_audio" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelname == "WARNING"
        assert "default" in warned[0].getMessage()


async def test_upstream_cut_mid_stream_ends_with_an_error_event_and_an_estimate(
    gw: Harness,
) -> None:
    response, data = await stream(gw, "/v1/chat-messages", CHAT, **{"x-fake-scenario": "cut"})
    await gw.probes.wait_finished(1)
    events = sse_events(data)
    assert [e["event"] for e in events[:2]] == ["message", "message"]
    assert events[-1] == {
        "code": "upstream_error",
        "message": "The upstream connection was lost.",
        "status": 502,
    }
    (event,) = await gw.events()
    assert event.outcome == "cut" and event.estimated and event.total_tokens > 0


async def test_upstream_http_errors_pass_through_and_refund(gw: Harness) -> None:
    response, data = await stream(gw, "/v1/chat-messages", CHAT, **{"x-fake-status": "429"})
    await gw.probes.wait_finished(1)
    assert response.status_code == 429
    assert orjson.loads(data)["code"] == "too_many_requests"
    assert await gw.events() == []
    (row,) = await gw.storage.daily(*_today(gw))
    assert row.queries == 0


async def test_upstream_unreachable_is_502(sqlite_url: str) -> None:
    async with serve(Scripted([])) as dead:  # a port that is certainly closed afterwards
        pass
    async with running_gateway(sqlite_url, upstream_url=dead + "/v1") as h:
        response, data = await stream(h, "/v1/chat-messages", CHAT)
        assert response.status_code == 502
        assert orjson.loads(data) == {
            "code": "upstream_unavailable",
            "message": "The upstream service is unreachable.",
            "status": 502,
        }
        assert response.headers["retry-after"] == "5"
        (row,) = await h.storage.daily(*_today(h))
        assert row.queries == 0


async def test_upstream_slow_to_answer_is_504(sqlite_url: str) -> None:
    upstream = Scripted([DIFY_EXAMPLE])
    upstream.gate = asyncio.Event()  # never set: the upstream never sends its headers
    async with running_gateway(
        sqlite_url, upstream=upstream, settings={"upstream": {"read_timeout": 0.2}}
    ) as h:
        response, data = await stream(h, "/v1/chat-messages", CHAT)
        assert response.status_code == 504
        assert orjson.loads(data)["code"] == "upstream_timeout"
        upstream.gate.set()


@pytest.mark.parametrize(
    ("fault", "status", "code", "charged"),
    [
        (httpx.ConnectError("refused"), 502, "upstream_unavailable", False),
        (httpx.ConnectTimeout("slow"), 504, "upstream_timeout", False),
        (httpx.PoolTimeout("busy"), 504, "upstream_timeout", False),
        (httpx.RemoteProtocolError("garbage"), 502, "upstream_unavailable", False),
        # The request reached the upstream, which may be answering (and billing)
        # still: the query stays spent and an estimate is recorded.
        (httpx.ReadTimeout("slow"), 504, "upstream_timeout", True),
    ],
)
async def test_transport_faults_map_to_gateway_errors(
    sqlite_url: str, fault: Exception, status: int, code: str, charged: bool
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise fault

    async with running_gateway(
        sqlite_url, upstream_url="http://upstream.invalid/v1", transport=httpx.MockTransport(fail)
    ) as h:
        response, data = await stream(h, "/v1/chat-messages", CHAT)
        await h.probes.wait_finished(1)
        assert response.status_code == status
        assert orjson.loads(data)["code"] == code
        (row,) = await h.storage.daily(*_today(h))
        events = await h.events()
    assert row.queries == int(charged)
    if charged:
        (event,) = events
        assert event.outcome == "timeout" and event.estimated and event.completion_tokens == 0
        assert event.prompt_tokens == 2  # "Xin chào": 8 characters
    else:
        assert events == []


# --- the client leaving --------------------------------------------------------------


async def _leave_after_first_event(h: Harness, **headers: str) -> None:
    async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
        async with client.stream(
            "POST", "/v1/chat-messages", json=CHAT, headers=h.auth(**headers)
        ) as response:
            async for chunk in response.aiter_raw():
                if b'"event":"message"' in chunk:
                    break  # leaving the block closes the connection mid-answer


async def test_client_disconnect_still_charges_the_whole_answer_once(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.02)
    async with running_gateway(sqlite_url, fake=fake) as h:
        await _leave_after_first_event(h)
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert usage_of(event) == FULL and event.outcome == "disconnected" and not event.estimated
        assert fake.completed_answers == 1 and fake.stops == []
        assert h.gateway.metrics.get("gateway_client_disconnects_total") == 1


async def test_client_disconnect_with_stop_policy_stops_the_answer(sqlite_url: str) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.05)
    settings = {"upstream": {"on_client_disconnect": "stop"}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        await _leave_after_first_event(h)
        await h.probes.wait_finished(1)
        assert len(fake.stops) == 1
        stop = next(r for r in fake.requests if r.path.endswith("/stop"))
        assert stop.json == {"user": USER}
        assert stop.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        (event,) = await h.events()
        assert event.outcome == "disconnected" and not event.estimated
        assert 0 < event.completion_tokens < 135  # only what was produced


async def test_first_event_reaches_the_client_while_the_upstream_holds_the_rest(
    gw: Harness,
) -> None:
    assert gw.fake is not None
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        async with client.stream(
            "POST", "/v1/chat-messages", json=CHAT, headers=gw.auth(**{"x-fake-scenario": "hold"})
        ) as response:
            chunks = response.aiter_raw()
            first = await asyncio.wait_for(anext(chunks), timeout=5)
            assert b'"event":"message"' in first and b"message_end" not in first
            assert gw.fake.holding == 1  # the upstream has not sent the rest yet
            gw.fake.release_held()
            rest = b"".join([chunk async for chunk in chunks])
    assert b"message_end" in rest
    await gw.probes.wait_finished(1)
    assert len(await gw.events()) == 1


# --- identity and rewriting ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "Missing gateway key: send 'Authorization: Bearer <your key>'."),
        ("Basic dXNlcjpwYXNz", "Missing gateway key: send 'Authorization: Bearer <your key>'."),
        ("Bearer gwk_not-a-real-key", "Invalid gateway key."),
        (f"Bearer {UPSTREAM_KEY}", "Invalid gateway key."),
    ],
)
async def test_bad_credentials_are_401_in_dify_shape(
    gw: Harness, authorization: str | None, message: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with httpx.AsyncClient(base_url=gw.url) as client:
        response = await client.post("/v1/chat-messages", json=CHAT, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"code": "unauthorized", "message": message, "status": 401}
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'
    assert gw.fake is not None and gw.fake.requests == []


async def test_a_revoke_in_process_takes_effect_at_once(gw: Harness) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        assert (await client.get("/v1/parameters", headers=gw.auth())).status_code == 200
        await gw.gateway.accounts.revoke_key(gw.key_id)
        response = await client.get("/v1/parameters", headers=gw.auth())
    assert response.status_code == 401
    assert response.json()["message"] == "This gateway key has been revoked."


async def test_user_is_replaced_in_body_query_and_form(gw: Harness) -> None:
    assert gw.fake is not None
    async with httpx.AsyncClient(base_url=gw.url) as client:
        await client.get(
            "/v1/conversations", params={"user": "mallory", "limit": "5"}, headers=gw.auth()
        )
        await client.get("/v1/messages?conversation_id=c1", headers=gw.auth())
        await client.post(
            "/v1/messages/m1/feedbacks",
            json={"rating": "like", "user": "mallory"},
            headers=gw.auth(),
        )
        upload = await client.post(
            "/v1/files/upload",
            files={"file": ("notes.txt", b"x" * 300_000, "text/plain")},
            data={"user": "mallory"},
            headers=gw.auth(),
        )
    conversations, messages, feedback = gw.fake.requests[:3]
    assert conversations.query == {"user": USER, "limit": "5"}
    assert messages.query == {"conversation_id": "c1", "user": USER}
    assert feedback.json == {"rating": "like", "user": USER}
    assert upload.status_code == 201
    assert gw.fake.uploaded_bytes == [300_000]
    # The client's own field is renamed in place (same length, so Content-Length
    # stays exact) and ours is the only `user` the upstream sees.
    assert gw.fake.upload_fields[0] == {"user": USER, "_ser": "mallory"}


async def test_headers_both_ways(gw: Harness) -> None:
    assert gw.fake is not None
    headers = gw.auth(
        **{
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic x",
            "X-Trace-Id": "client-trace-1",
            "X-Custom": "kept",
        }
    )
    async with httpx.AsyncClient(base_url=gw.url) as client:
        response = await client.get("/v1/parameters", headers=headers)
    seen = gw.fake.requests[0].headers
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen["x-trace-id"] == "client-trace-1" and seen["x-custom"] == "kept"
    for hop in ("x-hop", "keep-alive", "proxy-authorization"):
        assert hop not in seen
    assert response.headers["x-request-id"] and response.headers["x-request-id"] != "client-trace-1"


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_param"),
        (b"[1, 2]", "application/json", 400, "invalid_param"),
        (b"", "application/json", 400, "invalid_param"),
        (b'{"query": "' + b"x" * 2_000_000 + b'"}', "application/json", 413, "request_too_large"),
    ],
)
async def test_bad_bodies_are_refused_in_dify_shape(
    gw: Harness, content: bytes, content_type: str, status: int, code: str
) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        response = await client.post(
            "/v1/chat-messages", content=content, headers=gw.auth(**{"Content-Type": content_type})
        )
    assert response.status_code == status
    assert response.json()["code"] == code and response.json()["status"] == status
    assert gw.fake is not None and gw.fake.requests == []


async def test_oversized_body_without_content_length_is_refused(gw: Harness) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    async with httpx.AsyncClient(base_url=gw.url) as client:
        response = await client.post(
            "/v1/chat-messages",
            content=body(),
            headers=gw.auth(**{"Content-Type": "application/json"}),
        )
    assert response.status_code == 413


async def test_official_sdk_streams_through_the_gateway(gw: Harness) -> None:
    from dify_client import ChatClient  # type: ignore[import-untyped]

    def chat() -> list[str]:
        client = ChatClient(gw.key)
        client.base_url = f"{gw.url}/v1"
        response = client.create_chat_message(
            inputs={}, query="Xin chào", user="sdk-user", response_mode="streaming"
        )
        response.raise_for_status()
        return [line.decode() for line in response.iter_lines() if line]

    lines = await asyncio.to_thread(chat)
    assert any('"message_end"' in line for line in lines)
    await gw.probes.wait_finished(1)
    (event,) = await gw.events()
    assert usage_of(event) == FULL and event.user_id == USER
    assert gw.fake is not None and gw.fake.requests[0].json["user"] == USER  # type: ignore[index]


async def test_gateway_endpoints(gw: Harness) -> None:
    await stream(gw, "/v1/chat-messages", CHAT)
    await gw.probes.wait_finished(1)
    async with httpx.AsyncClient(base_url=gw.url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        # No metrics or admin token here: /metrics is off (tests/test_metrics.py).
        assert (await client.get("/metrics")).status_code == 404
        metrics = gw.gateway.metrics.render().decode()
        assert 'gateway_answers_settled_total{outcome="complete"} 1' in metrics
        assert (await client.get("/nope")).status_code == 404


def _today(h: Harness) -> tuple[Any, Any]:
    from gateway.clock import periods_at

    day = periods_at(h.gateway.clock.now(), h.gateway.tz).day
    return day, day


async def test_malformed_multipart_is_400(gw: Harness) -> None:
    body = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nhello'  # never closed
    async with httpx.AsyncClient(base_url=gw.url) as client:
        response = await client.post(
            "/v1/files/upload",
            content=body,
            headers=gw.auth(**{"Content-Type": "multipart/form-data; boundary=XyZ"}),
        )
        no_boundary = await client.post(
            "/v1/files/upload",
            content=body,
            headers=gw.auth(**{"Content-Type": "multipart/form-data"}),
        )
    assert response.status_code == 400 and response.json()["code"] == "invalid_param"
    assert "multipart" in response.json()["message"].lower()
    assert no_boundary.status_code == 400


# --- the last chunk and the end of the response ---------------------------------------

_EVENTS = [
    b'data: {"event": "message", "message_id": "m-last", "conversation_id": "c-1", '
    b'"task_id": "t-1", "answer": "Xin "}\n\n',
    b'data: {"event": "message", "message_id": "m-last", "conversation_id": "c-1", '
    b'"task_id": "t-1", "answer": "chao"}\n\n',
    b'data: {"event": "message_end", "message_id": "m-last", "conversation_id": "c-1", '
    b'"task_id": "t-1", "metadata": {"usage": {"prompt_tokens": 7, "completion_tokens": 3, '
    b'"total_tokens": 10, "total_price": "0.0001", "currency": "USD"}}}\n\n',
]


def _chunked(*payloads: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads)


_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@contextlib.asynccontextmanager
async def _raw_upstream(
    answer: Callable[[asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A Dify upstream that writes its answer as ``answer`` says, on the socket."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await answer(writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def _relayed(
    url: str,
    sqlite_url: str,
    on_body: Callable[[dict[str, Any]], None] = lambda m: None,
    chat: dict[str, Any] = CHAT,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The messages the gateway sends its client for one answer (streamed, by
    default) from ``url``, driven directly through the app, and the answers in
    the ledger."""
    async with running_gateway(sqlite_url, upstream_url=url) as h:
        scope, receive = direct_request(h.key, orjson.dumps(chat))
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":
                on_body(message)

        await h.app(scope, receive, send)
        await h.probes.wait_finished(1)
        return sent, await h.events()


async def test_a_last_chunk_that_came_with_the_end_is_sent_with_it(sqlite_url: str) -> None:
    """The upstream's last events and the end of its body arrived together: the
    client gets them with the end of the response in one message (one write),
    not a message of events then an empty one."""

    async def at_once(writer: asyncio.StreamWriter) -> None:
        writer.write(_HEAD + _chunked(*_EVENTS) + b"0\r\n\r\n")
        await writer.drain()

    async with _raw_upstream(at_once) as url:
        sent, events = await _relayed(url, sqlite_url)
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert bodies == [{"type": "http.response.body", "body": b"".join(_EVENTS), "more_body": False}]
    (event,) = events
    assert (event.answer_id, event.total_tokens, event.outcome) == ("m-last", 10, "complete")


async def test_a_chunk_is_sent_before_the_end_of_the_body_is_known(sqlite_url: str) -> None:
    """Nothing waits for the end: events that arrive before it are passed on
    at once (the upstream ends its body only once the client has them)."""
    passed_on = asyncio.Event()

    async def in_two(writer: asyncio.StreamWriter) -> None:
        writer.write(_HEAD + _chunked(*_EVENTS))
        await writer.drain()
        await passed_on.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    def on_body(message: dict[str, Any]) -> None:
        if message["body"]:
            passed_on.set()

    async with _raw_upstream(in_two) as url:
        sent, events = await _relayed(url, sqlite_url, on_body)
    bodies = [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]
    assert b"".join(body for body, _ in bodies) == b"".join(_EVENTS)
    assert bodies[-1] == (b"", False) and all(more for _, more in bodies[:-1])
    (event,) = events
    assert (event.answer_id, event.total_tokens) == ("m-last", 10)


def _blocking_answer(answer: str) -> bytes:
    """A Dify blocking chat answer: its head and its JSON body."""
    body = orjson.dumps(
        {
            "event": "message",
            "task_id": "t-1",
            "id": "m-whole",
            "message_id": "m-whole",
            "conversation_id": "c-1",
            "mode": "chat",
            "answer": answer,
            "metadata": {
                "usage": {
                    "prompt_tokens": 7,
                    "completion_tokens": 3,
                    "total_tokens": 10,
                    "total_price": "0.0001",
                    "currency": "USD",
                }
            },
            "created_at": 1,
        }
    )
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


_BLOCKING_CHAT = {**CHAT, "response_mode": "blocking"}


@pytest.fixture
def chunk_reads(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Response]:
    """The answers whose body the relay read with its chunk reader
    (`UpstreamClient.raw`), not whole."""
    reads: list[httpx.Response] = []
    raw = UpstreamClient.raw

    def counted(response: httpx.Response) -> AsyncIterator[bytes]:
        reads.append(response)
        return raw(response)

    monkeypatch.setattr(UpstreamClient, "raw", staticmethod(counted))
    return reads


async def test_a_blocking_answer_here_whole_is_relayed_from_one_read(
    sqlite_url: str, chunk_reads: list[httpx.Response]
) -> None:
    """A blocking answer whose whole body came with its head is read at once
    (`UpstreamClient.whole`), without the chunk reader: the client gets it with
    the end of the response, in one message, and it is recorded once."""
    answer = _blocking_answer("Xin chao")

    async def at_once(writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    async with _raw_upstream(at_once) as url:
        sent, events = await _relayed(url, sqlite_url, chat=_BLOCKING_CHAT)
    body = answer.partition(b"\r\n\r\n")[2]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert bodies == [{"type": "http.response.body", "body": body, "more_body": False}]
    assert chunk_reads == []
    (event,) = events
    assert (event.answer_id, event.total_tokens, event.outcome) == ("m-whole", 10, "complete")


@pytest.mark.parametrize("arrival", ["longer than one read", "in two parts"])
async def test_a_blocking_answer_not_here_whole_is_read_in_chunks(
    sqlite_url: str, chunk_reads: list[httpx.Response], arrival: str
) -> None:
    """A blocking answer longer than one read, or still arriving, goes through
    the chunk reader as before: the same bytes, passed on as they come, and
    recorded once."""
    long = arrival == "longer than one read"
    answer = _blocking_answer("x" * (20_000 if long else 100))
    passed_on = asyncio.Event()

    async def write(writer: asyncio.StreamWriter) -> None:
        if long:
            writer.write(answer)
        else:
            writer.write(answer[:-10])
            await writer.drain()
            await passed_on.wait()
            writer.write(answer[-10:])
        await writer.drain()

    def on_body(message: dict[str, Any]) -> None:
        if message["body"]:
            passed_on.set()

    async with _raw_upstream(write) as url:
        sent, events = await _relayed(url, sqlite_url, on_body, chat=_BLOCKING_CHAT)
    bodies = [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]
    assert b"".join(body for body, _ in bodies) == answer.partition(b"\r\n\r\n")[2]
    assert len(bodies) >= 2 and not bodies[-1][1] and all(more for _, more in bodies[:-1])
    assert len(chunk_reads) == 1
    (event,) = events
    assert (event.answer_id, event.total_tokens, event.outcome) == ("m-whole", 10, "complete")


# --- a client that stops reading -----------------------------------------------------

# upstream.total_timeout in these tests: the relay's deadline, which only has to
# fire. It is also the upstream's read timeout, so it leaves the fake upstream
# room to answer on a loaded machine.
STALL_DEADLINE = 0.3


async def _stalled_request(
    h: Harness,
    body: dict[str, Any],
    path: str = "/v1/chat-messages",
    headers: bytes = b"",
) -> asyncio.StreamWriter:
    """A request (a chat by default) from a client that never reads its answer (a
    small receive buffer, so the gateway's writes back up at once); the connection
    stays open."""
    host, _, port = h.url.removeprefix("http://").partition(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    _, writer = await asyncio.open_connection(sock=sock)
    payload = orjson.dumps(body)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n".encode()
        + headers
        + f"Authorization: Bearer {h.key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    return writer


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
async def test_an_answer_whose_client_stops_reading_is_still_recorded(
    sqlite_url: str, mode: str
) -> None:
    """A client that keeps its connection open but reads nothing (its socket's
    buffers full) holds the gateway's writes, not the answer's record: the relay
    ends at upstream.total_timeout, and what it still has to send waits no longer
    before the answer is settled."""
    piece = "x" * 2_000_000  # megabytes of answer: more than the sockets hold
    fake = FakeDify(api_key=UPSTREAM_KEY, answer=[piece, piece, piece, piece])
    settings = {"upstream": {"total_timeout": STALL_DEADLINE}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        writer = await _stalled_request(h, {**CHAT, "response_mode": mode})
        try:
            await h.probes.wait_finished(1, timeout=15)
            (event,) = await h.events()
        finally:
            writer.transport.abort()
    assert event.completion_tokens > 0  # charged, while the client was still connected


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
async def test_an_answer_whose_head_waits_for_its_client_is_still_recorded(
    sqlite_url: str, mode: str
) -> None:
    """The response's head can wait for the client too (uvicorn drains first:
    behind an answer pipelined before it and not read). A send that never
    returns for the head, as uvicorn's for a client that reads nothing: the head
    waits no longer than upstream.total_timeout, and the answer is then relayed
    as to a client that left, and recorded."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {"upstream": {"total_timeout": STALL_DEADLINE}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        scope, receive = direct_request(h.key, orjson.dumps({**CHAT, "response_mode": mode}))
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            await asyncio.Event().wait()  # the client reads nothing

        async with asyncio.timeout(15):
            await h.app(scope, receive, send)
            await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert [m["type"] for m in sent] == ["http.response.start"]  # nothing after it
    assert event.completion_tokens > 0


class _GatewayServe(BoundedHeadProtocol):
    """The protocol of `gateway serve`, with its send timeout far off: what ends a
    connection below is the gateway's own doing."""

    settings = HeadSettings(
        head_limit=65536,
        refusal=b"",
        head_timeout=10.0,
        timeout=b"",
        max_connections=20,
        busy=b"",
        send_timeout=30.0,
    )


@pytest.mark.parametrize("call", ["answer", "side call"])
async def test_a_response_whose_head_could_not_be_sent_ends_its_connection(
    sqlite_url: str, call: str
) -> None:
    """Under `gateway serve`: a chat (or a paid side call) pipelined behind an
    answer its client does not read, so its head waits, and gives up at
    upstream.total_timeout; it is recorded (charged) all the same. The connection
    is then closed: uvicorn's own 500 (a write waiting on the client without a
    limit) would tell a client that reads again that a request it was charged
    for failed. Closed, not aborted: the answer before it, handed over whole,
    still reaches a client that reads again."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"total_timeout": STALL_DEADLINE},
        "call_prices": {"dify.text_to_audio": {"price": "0.015", "currency": "EUR"}},
    }
    if call == "answer":
        path, payload = "/v1/chat-messages", orjson.dumps({**CHAT, "response_mode": "blocking"})
    else:
        path, payload = "/v1/text-to-audio", orjson.dumps({"text": "Xin chào", "user": "mallory"})
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        big = b"x" * 8_000_000  # more than the sockets on both ends hold

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/big":
                headers = [(b"content-length", str(len(big)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": big})
                return
            await h.app(scope, receive, send)

        async with serve(app, http=f"{__name__}:_GatewayServe") as url:
            host, _, port = url.removeprefix("http://").partition(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(
                b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n"
                + f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {h.key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            try:
                await h.probes.wait_finished(1, timeout=15)
                (event,) = await h.events()
                # The client reads again: what was written before, then the end
                # (a close, or one after a 500: the reading ends either way).
                data = bytearray()  # (bytes += a piece: 8 MB copied per read, ~3 s)
                async with asyncio.timeout(15):
                    with contextlib.suppress(ConnectionError):
                        while piece := await reader.read(1 << 20):
                            data += piece
            finally:
                writer.transport.abort()
    if call == "answer":
        assert event.completion_tokens > 0  # recorded once, as for a client that left
    else:
        assert event.cost == Decimal("0.015")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert rest[: len(big)] == big  # the answer before it, whole
    assert b"HTTP/1.1 500" not in data


@pytest.mark.parametrize("where", ["ending", "relay"])
async def test_no_send_after_one_that_ran_out(sqlite_url: str, where: str) -> None:
    """A send that ran out at the deadline (the client read nothing more in time)
    leaves that client stalled: the sends after it are not made, even if the
    client reads again at once (here the stalled send never returns, and the ones
    after it would have gone out at once), so it can never get a response ended
    as if whole with a piece missing. ``ending``: the answer holds mid-stream past
    upstream.total_timeout, and the ending's first send (an error event, before
    the end of the stream) runs out; ``relay``: the answer's first event runs out,
    the ending (the same two sends) would follow."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    fake.stops_ignored = True  # held past the deadline, whatever stop it is sent
    settings = {"upstream": {"total_timeout": STALL_DEADLINE}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        # Events apart: the first is passed on alone, before the end is known.
        scenario = [(b"x-fake-scenario", b"hold")] if where == "ending" else []
        scenario.append((b"x-fake-delay-ms", b"20"))
        scope, receive = direct_request(h.key, orjson.dumps(CHAT), *scenario)
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            body = message.get("body", b"")
            if (b"upstream_error" in body) if where == "ending" else len(sent) == 2:
                await asyncio.Event().wait()  # the client reads nothing, until...

        async with asyncio.timeout(15):
            await h.app(scope, receive, send)
            await h.probes.wait_finished(1)
            if where == "relay":
                # The stop call runs in the background, after the record.
                await h.gateway.idle()
        events = await h.events()
        stops = list(fake.stops)
    stalled = sent[-1]["body"]  # and nothing after it
    assert b"upstream_error" in stalled if where == "ending" else b"data:" in stalled
    assert len([m for m in sent if b"upstream_error" in m.get("body", b"")]) <= 1
    assert all(m.get("more_body", True) for m in sent)  # never ended
    # Charged what was read, the event whose send ran out included: it holds the
    # first text (and the task id), which the upstream produced and bills. Its
    # meter learnt the task id from it, so the answer was stopped upstream too.
    (event,) = events
    assert event.completion_tokens > 0
    if where == "relay":
        assert stops


async def test_a_side_call_whose_client_stops_reading_is_still_charged(sqlite_url: str) -> None:
    """A paid side call's reply (text to audio) to a client that keeps its
    connection open but reads nothing: its sends wait no longer than
    upstream.total_timeout, and the call is charged while the client is still
    connected."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {
        "upstream": {"total_timeout": STALL_DEADLINE},
        "call_prices": {"dify.text_to_audio": {"price": "0.015", "currency": "EUR"}},
    }
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        writer = await _stalled_request(
            h,
            {"text": "Xin chào", "user": "mallory"},
            path="/v1/text-to-audio",
            headers=b"x-fake-audio-bytes: 8000000\r\n",
        )
        try:
            await h.probes.wait_finished(1, timeout=15)
            (event,) = await h.events()
            assert not writer.transport.is_closing()  # the client is still there
        finally:
            writer.transport.abort()
    assert event.cost == Decimal("0.015") and event.currency == "EUR"


async def test_a_send_that_waits_is_finished_under_its_deadline_or_cut_by_it() -> None:
    """The ending's sends take their first step bare; one that must wait goes on
    as awaited (its result, its errors), cancelled at the deadline."""
    ready = asyncio.Event()
    done: list[str] = []

    async def send(message: str) -> None:
        await ready.wait()
        await asyncio.sleep(0)
        done.append(message)

    steps = send("a").__await__()
    waiting = steps.send(None)
    asyncio.get_running_loop().call_soon(ready.set)
    await gateway.proxy._Rest(steps, waiting)
    assert done == ["a"]

    ready.clear()
    steps = send("b").__await__()
    waiting = steps.send(None)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await gateway.proxy._Rest(steps, waiting)
    assert done == ["a"]


async def test_the_shutdown_notice_waits_for_its_client_no_longer_than_the_deadline(
    sqlite_url: str,
) -> None:
    """A request cancelled (the server going away) whose client reads nothing
    more: the shutdown notice's send gives up at upstream.total_timeout, and the
    cancellation goes on; the answer is recorded as cut by the shutdown."""
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.05)
    settings = {"upstream": {"total_timeout": STALL_DEADLINE}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        scope, receive = direct_request(h.key, orjson.dumps(CHAT))
        first_chunk = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message.get("body"):
                first_chunk.set()
            if b"shutting_down" in message.get("body", b""):
                await asyncio.Event().wait()  # the client reads nothing more

        task = asyncio.create_task(h.app(scope, receive, send))
        await first_chunk.wait()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=15)
        if not done:
            task.cancel()  # the notice's send waited without a bound
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert done
    assert event.outcome == "shutdown"


async def test_an_answer_cancelled_while_its_first_event_waits_for_the_client_is_charged(
    sqlite_url: str,
) -> None:
    """The server goes away (the request is cancelled) while the answer's first
    event waits for a client that reads nothing: that event, the first text,
    came from the upstream and is billed there, so the answer is charged what it
    holds, never refunded."""
    fake = FakeDify(api_key=UPSTREAM_KEY, delay=0.05)
    # The shutdown notice's send waits for this client too, until the deadline.
    settings = {"upstream": {"total_timeout": STALL_DEADLINE}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        scope, receive = direct_request(h.key, orjson.dumps(CHAT))
        waiting = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message.get("body"):
                waiting.set()
                await asyncio.Event().wait()  # the client reads nothing

        task = asyncio.create_task(h.app(scope, receive, send))
        await waiting.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert event.outcome == "shutdown"
    assert event.estimated and event.completion_tokens > 0


async def test_a_meter_that_fails_on_the_event_whose_send_ran_out_is_charged(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in metering the event whose send ran out at the deadline (the
    client read nothing more): the answer is charged as for the relay's other
    failures, at least the estimate, never refunded, and the error is logged
    rather than escaping the relay."""
    import gateway.relay

    def broken(self: gateway.relay.Relay, chunk: bytes) -> None:
        raise RuntimeError("a meter bug")

    monkeypatch.setattr(gateway.relay.Relay, "meter_chunk", broken)
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {"upstream": {"total_timeout": STALL_DEADLINE}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        scope, receive = direct_request(h.key, orjson.dumps(CHAT), (b"x-fake-delay-ms", b"20"))
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len(sent) == 2:  # the first event: the client reads nothing more
                await asyncio.Event().wait()

        async with asyncio.timeout(15):
            await h.app(scope, receive, send)
            await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert event.estimated and event.total_tokens > 0
    assert event.outcome == "cut"


# --- an upstream error that quotes the operator's key ---------------------------------


class QuotesKey:
    """An upstream that refuses every request with ``status`` and an error that
    quotes the key it was sent, as some OpenAI-compatible servers' and proxies'
    auth and budget errors do: ``padding`` bytes before it (and the key again
    at the end), gzip-encoded when the client accepts it and ``gzipped``."""

    def __init__(
        self,
        status: int,
        *,
        padding: int = 0,
        gzipped: bool = False,
        header: bytes = b"authorization",
    ) -> None:
        # (304: no body, and the Content-Length of the representation the client has)
        self.status, self.padding, self.gzipped = status, padding, gzipped
        self.header = header  # the header whose key it quotes
        self.requests = 0
        self.accept_encoding: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        self.requests += 1
        headers = dict(scope["headers"])
        self.accept_encoding = headers.get(b"accept-encoding")
        key = headers.get(self.header, b"").decode().removeprefix("Bearer ")
        message = f"{'.' * self.padding}Budget exceeded for key {key}. ({key})"
        body = orjson.dumps({"error": {"message": message, "type": "insufficient_quota"}})
        out = [(b"content-type", b"application/json")]
        if self.gzipped and b"gzip" in headers.get(b"accept-encoding", b""):
            body = gzip.compress(body)
            out.append((b"content-encoding", b"gzip"))
        out.append((b"content-length", str(len(body)).encode()))
        if self.status == 304:
            body, out = b"", [(b"etag", b'"v1"'), (b"content-length", b"1234")]
        await send({"type": "http.response.start", "status": self.status, "headers": out})
        await send({"type": "http.response.body", "body": body})


OPENAI = {
    "upstream": {"kind": "openai"},
    "prices": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}},
}
OPENAI_CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _masked(response: httpx.Response, key: str) -> str:
    """The error's message, once checked to be whole, valid and keyless."""
    assert key not in response.text, f"the end user read the operator's key: {response.text}"
    if "content-length" in response.headers:
        assert int(response.headers["content-length"]) == len(response.content)
    message: str = orjson.loads(response.content)["error"]["message"]
    return message


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_error_quoting_the_operators_key_reaches_the_user_masked(
    sqlite_url: str, stream: bool
) -> None:
    upstream = QuotesKey(403)
    async with running_gateway(sqlite_url, upstream=upstream, settings=OPENAI) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.post(
                "/v1/chat/completions", json={**OPENAI_CHAT, "stream": stream}, headers=h.auth()
            )
        await h.probes.wait_finished(1)
    assert upstream.requests == 1 and response.status_code == 403
    assert _masked(response, UPSTREAM_KEY) == "Budget exceeded for key ***. (***)"


async def test_a_dify_error_quoting_the_key_is_masked_and_still_read_for_its_charge(
    sqlite_url: str,
) -> None:
    # Dify's errors answering an answer are read whole (`_relay_error`) to tell
    # whether the run had begun: that read is masked as it is passed on.
    upstream = QuotesKey(400)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        response, data = await stream(h, "/v1/chat-messages", CHAT)
        await h.probes.wait_finished(1)
        assert await h.events() == []  # refused before the run: nothing charged
    assert response.status_code == 400
    assert UPSTREAM_KEY.encode() not in data and b"Budget exceeded for key ***." in data
    assert int(response.headers["content-length"]) == len(data)


async def test_an_encoded_error_quoting_the_key_is_masked_decoded(sqlite_url: str) -> None:
    # A route that is no answer forwards the client's Accept-Encoding: the
    # upstream's gzip is undone, so that the key in it is found.
    upstream = QuotesKey(401, gzipped=True)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.get(
                "/v1/parameters", headers=h.auth(**{"Accept-Encoding": "gzip"})
            )
    assert upstream.requests == 1 and response.status_code == 401
    assert "content-encoding" not in response.headers
    assert _masked(response, UPSTREAM_KEY).endswith("Budget exceeded for key ***. (***)")


async def test_a_clients_accept_encoding_is_forwarded_with_only_what_the_gateway_decodes(
    sqlite_url: str,
) -> None:
    # review5 R5-1: a browser's "br, zstd" let the upstream answer an error in
    # an encoding httpx cannot decode here, and the key in it went unmasked.
    upstream = QuotesKey(401, gzipped=True)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.get(
                "/v1/parameters",
                headers=h.auth(**{"Accept-Encoding": "gzip;q=1.0, deflate, br, zstd, *;q=0.1"}),
            )
            only_brotli = await client.get(
                "/v1/parameters", headers=h.auth(**{"Accept-Encoding": "br"})
            )
    assert upstream.accept_encoding == b"identity"  # the last request's: br alone
    assert response.status_code == only_brotli.status_code == 401
    assert _masked(response, UPSTREAM_KEY).endswith("Budget exceeded for key ***. (***)")
    assert _masked(only_brotli, UPSTREAM_KEY).endswith("Budget exceeded for key ***. (***)")


async def test_the_accept_encoding_forwarded_keeps_the_clients_decodable_codings(
    sqlite_url: str,
) -> None:
    upstream = QuotesKey(401)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            await client.get(
                "/v1/parameters",
                headers=h.auth(**{"Accept-Encoding": "gzip;q=1.0, deflate, br, zstd, *;q=0.1"}),
            )
    assert upstream.accept_encoding == b"gzip;q=1.0, deflate"


async def test_a_client_that_names_no_coding_or_refuses_identity_has_identity_asked_for(
    sqlite_url: str,
) -> None:
    """Review 6: with no Accept-Encoding the HTTP client asked the upstream for
    its own defaults (br and zstd where their libraries are installed), whose
    errors the gateway cannot read (R6-4); ``identity;q=0, br`` was forwarded as
    ``identity;q=0`` alone, asking for no acceptable coding (R6-3)."""
    upstream = QuotesKey(401)
    seen = []
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            del client.headers["accept-encoding"]
            await client.get("/v1/parameters", headers=h.auth())
            seen.append(upstream.accept_encoding)
            await client.get(
                "/v1/parameters", headers=h.auth(**{"Accept-Encoding": "identity;q=0, br"})
            )
            seen.append(upstream.accept_encoding)
            await client.get(
                "/v1/parameters", headers=h.auth(**{"Accept-Encoding": "gzip;q=0.000, deflate"})
            )
            seen.append(upstream.accept_encoding)
    assert seen == [b"identity", b"identity", b"deflate"]


# {"error":{"message":"Budget exceeded for key app-upstream-secret.
# (app-upstream-secret)","type":"insufficient_quota"}} compressed with Brotli
# (node: zlib.brotliCompressSync). The key is not in these bytes as they are.
_BR_ERROR = base64.b64decode(
    "G3UAIIzEOCbxRlHEQVBuS1UuKbiYZbhPlhVBWen0OeXAvWVp1JbQAQ9083vKSkIwo71chawoYIOTh6G3pVDU8Tn6"
    "zTPtpl/aC+NbJzKYRHpAk7B2GGc="
)


class QuotesKeyInBrotli:
    """An upstream (behind Cloudflare, nginx's brotli module...) that refuses
    with an error quoting the key it was sent, Brotli-encoded when the client
    accepts ``br`` - or ``always``, whatever it was asked for."""

    def __init__(self, *, always: bool = False, coding: bytes = b"br") -> None:
        self.always, self.coding = always, coding
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        self.requests += 1
        headers = dict(scope["headers"])
        assert headers.get(b"authorization") == f"Bearer {UPSTREAM_KEY}".encode()
        out = [(b"content-type", b"application/json"), (b"retry-after", b"7")]
        body = orjson.dumps({"error": {"message": "Budget exceeded for key " + UPSTREAM_KEY}})
        if self.always or b"br" in headers.get(b"accept-encoding", b""):
            body = _BR_ERROR
            out.append((b"content-encoding", self.coding))
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 401, "headers": out})
        await send({"type": "http.response.body", "body": body})


async def _brotli_decoded(body: bytes) -> bytes | None:
    """``body`` Brotli-decoded by node, as the end user can; None without node."""
    node = shutil.which("node")
    if node is None:
        return None
    script = (
        "process.stdout.write(require('zlib').brotliDecompressSync(require('fs').readFileSync(0)))"
    )
    process = await asyncio.create_subprocess_exec(
        node, "-e", script, stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    decoded, _ = await process.communicate(body)
    return decoded


async def test_a_browsers_error_reaches_it_whole_and_keyless(sqlite_url: str) -> None:
    # review5 R5-1, as the review found it: the Brotli error went out still
    # compressed, labelled plain JSON, and one decompression gave the key.
    upstream = QuotesKeyInBrotli()
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.get(
                "/v1/parameters",
                headers=h.auth(**{"Accept-Encoding": "gzip, deflate, br, zstd"}),
            )
    assert upstream.requests == 1 and response.status_code == 401
    recovered = await _brotli_decoded(response.content)
    assert recovered is None or UPSTREAM_KEY.encode() not in recovered, recovered
    assert "content-encoding" not in response.headers and response.content != _BR_ERROR
    assert _masked(response, UPSTREAM_KEY) == "Budget exceeded for key ***"


@pytest.mark.parametrize("coding", [b"br", b"gzip, br", b"zstd"])
async def test_an_error_in_an_encoding_the_gateway_cannot_decode_is_replaced_by_its_own(
    sqlite_url: str, coding: bytes
) -> None:
    # The attack: an upstream (or a router in front of it) that answers an
    # error in Brotli whatever it was asked for. The key it may quote cannot be
    # looked for in it: the gateway's own error goes instead, in the dialect's
    # shape, with the upstream's status and Retry-After.
    upstream = QuotesKeyInBrotli(always=True, coding=coding)
    async with running_gateway(sqlite_url, upstream=upstream, settings=OPENAI) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.get("/v1/models/gpt-4o-mini", headers=h.auth())
    assert upstream.requests == 1 and response.status_code == 401
    assert response.content != _BR_ERROR and "content-encoding" not in response.headers
    recovered = await _brotli_decoded(response.content)
    assert recovered is None or UPSTREAM_KEY.encode() not in recovered
    assert response.headers["retry-after"] == "7"
    assert response.headers["content-type"] == "application/json"
    assert _masked(response, UPSTREAM_KEY) == "The upstream's error could not be read."
    assert orjson.loads(response.content)["error"]["code"] == "upstream_error"


async def test_an_encoded_error_is_decoded_with_a_bound(sqlite_url: str) -> None:
    # review5 R5-2: a 60 KiB gzip error (60 MiB of zeros) was inflated whole,
    # held as 16.8 MB, and 60 MiB went to the client.
    inflated = 60 * 1024 * 1024
    bomb = gzip.compress(b"\0" * inflated, compresslevel=9)
    assert len(bomb) < 64 * 1024

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        out = [
            (b"content-type", b"application/json"),
            (b"content-encoding", b"gzip"),
            (b"content-length", str(len(bomb)).encode()),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": out})
        await send({"type": "http.response.body", "body": bomb})

    largest = 0
    real = gateway.proxy._read_small

    async def watched(x: Any, chunks: Any) -> tuple[bytes, bool]:
        nonlocal largest
        body, whole = await real(x, chunks)
        largest = max(largest, len(body))
        return body, whole

    gateway.proxy._read_small = watched  # type: ignore[assignment]
    try:
        async with running_gateway(sqlite_url, upstream=upstream) as h:
            async with httpx.AsyncClient(base_url=h.url, timeout=30) as client:
                async with client.stream(
                    "GET", "/v1/parameters", headers=h.auth(**{"Accept-Encoding": "gzip"})
                ) as response:
                    received = b"".join([raw async for raw in response.aiter_raw()])
    finally:
        gateway.proxy._read_small = real  # type: ignore[assignment]
    assert response.status_code == 401
    # What the gateway held of the error at once, and what it sent for it: cut.
    assert largest <= 2 * gateway.proxy._SMALL_BODY, f"held {largest} bytes of one error"
    assert received == b"\0" * gateway.proxy._MAX_ERROR_BODY


class QuotesKeyAsEvents:
    """An upstream that refuses a streamed answer with an error status and an
    event-stream body quoting the key it was sent (servers that stream every
    reply to stream=true once the request is parsed), in two chunks cut
    inside the key."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        self.requests += 1
        key = dict(scope["headers"]).get(b"authorization", b"").decode().removeprefix("Bearer ")
        event = orjson.dumps({"error": {"message": f"Budget exceeded for key {key}."}})
        body = b"data: " + event + b"\n\n"
        cut = body.index(key.encode()) + 5
        out = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 402, "headers": out})
        await send({"type": "http.response.body", "body": body[:cut], "more_body": True})
        await send({"type": "http.response.body", "body": body[cut:]})


async def test_an_event_stream_error_quoting_the_key_is_masked(sqlite_url: str) -> None:
    # review5 R5-3: an error status with an event-stream body was relayed as
    # it came, unmasked.
    upstream = QuotesKeyAsEvents()
    async with running_gateway(sqlite_url, upstream=upstream, settings=OPENAI) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.post(
                "/v1/chat/completions", json={**OPENAI_CHAT, "stream": True}, headers=h.auth()
            )
        await h.probes.wait_finished(1)
    assert upstream.requests == 1 and response.status_code == 402
    assert response.headers["content-type"] == "text/event-stream"
    assert UPSTREAM_KEY not in response.text, f"the end user read the key: {response.text}"
    assert response.text == 'data: {"error":{"message":"Budget exceeded for key ***."}}\n\n'


async def test_a_long_error_quoting_the_key_is_masked_past_what_is_read_whole(
    sqlite_url: str,
) -> None:
    # Past the 64 KiB read whole, the rest is passed on as it comes: masked as
    # it comes, a key cut between two reads too, with no Content-Length.
    padding = gateway.proxy._SMALL_BODY - 40
    upstream = QuotesKey(403, padding=padding)
    async with running_gateway(sqlite_url, upstream=upstream, settings=OPENAI) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.post("/v1/chat/completions", json=OPENAI_CHAT, headers=h.auth())
    assert response.status_code == 403 and "content-length" not in response.headers
    assert _masked(response, UPSTREAM_KEY) == "." * padding + "Budget exceeded for key ***. (***)"


async def test_a_fallbacks_error_quoting_its_own_key_is_masked(sqlite_url: str) -> None:
    from tests.test_named_upstreams import BACKUP_KEY, Refuses, gateway, openai

    primary, backup = Refuses(503), QuotesKey(401)
    async with serve(primary) as primary_url, serve(backup) as backup_url:
        upstreams = {
            "primary": openai(primary_url + "/v1", "HOSTED_KEY", mount="/v1", fallbacks=["backup"]),
            "backup": openai(backup_url + "/v1", "BACKUP_KEY", mount="/backup/v1"),
        }
        async with gateway(sqlite_url, upstreams) as h:
            async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
                response = await client.post(
                    "/v1/chat/completions", json=OPENAI_CHAT, headers=h.auth()
                )
    assert len(primary.headers) == 1 and backup.requests == 1
    assert response.status_code == 401
    assert _masked(response, BACKUP_KEY) == "Budget exceeded for key ***. (***)"


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_quoting_a_secret_header_of_the_operators_reaches_the_user_masked(
    sqlite_url: str, stream: bool
) -> None:
    # A router's own key (Portkey's x-portkey-api-key, from headers_env) is the
    # operator's secret as the upstream key is: Portkey and LiteLLM quote the
    # key they were sent in an auth or budget error.
    secret = "pk-portkey-operator-secret"
    upstream = QuotesKey(401, header=b"x-portkey-api-key")
    settings = {
        **OPENAI,
        "upstream": {"kind": "openai", "headers_env": {"x-portkey-api-key": "PORTKEY_KEY"}},
    }
    async with running_gateway(
        sqlite_url, upstream=upstream, settings=settings, env={"PORTKEY_KEY": secret}
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.post(
                "/v1/chat/completions",
                json={**OPENAI_CHAT, "stream": stream},
                headers=h.auth(**{"x-portkey-api-key": "pk-a-clients-own-key"}),
            )
        await h.probes.wait_finished(1)
    assert upstream.requests == 1 and response.status_code == 401
    assert _masked(response, secret) == "Budget exceeded for key ***. (***)"


async def test_a_not_modified_reply_is_passed_on_as_it_is(sqlite_url: str) -> None:
    upstream = QuotesKey(304)
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.get(
                "/v1/parameters", headers=h.auth(**{"If-None-Match": '"v1"'})
            )
    assert response.status_code == 304 and response.content == b""
    assert (response.headers["etag"], response.headers["content-length"]) == ('"v1"', "1234")


async def _inflate(parts: list[bytes], coding: bytes) -> bytes:
    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    x = types.SimpleNamespace(request_id="test")
    out = b""
    async for chunk in gateway.proxy._inflated(x, chunks(), coding):  # type: ignore[arg-type]
        out += chunk
    return out


@pytest.mark.parametrize("wbits", [-zlib.MAX_WBITS, zlib.MAX_WBITS], ids=["raw", "zlib"])
async def test_a_deflate_error_is_decoded_however_its_first_bytes_are_cut(wbits: int) -> None:
    """Review 6, R6-2: a raw deflate body whose first read was one byte was taken
    for zlib-wrapped (its header is two bytes), and the error's body lost."""
    message = b'{"error":{"message":"model not found","type":"invalid_request_error"}}'
    compressor = zlib.compressobj(wbits=wbits)
    body = compressor.compress(message) + compressor.flush()
    for cut in range(4):
        parts = [body[:cut], body[cut:]] if cut else [body]
        assert await _inflate([b"", *parts], b"deflate") == message
    assert await _inflate([body[:1], body[1:2], body[2:]], b"deflate") == message


class _Stream(httpx.AsyncByteStream):
    """A response body from the given parts, that says whether it was closed."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part

    async def aclose(self) -> None:
        self.closed = True


async def test_a_billed_failure_broken_past_its_error_closes_the_upstreams_response() -> None:
    """A Dify blocking answer's billed 500 whose gzip breaks after the error's
    JSON (a bad trailer, here) is the answer (`_billed_failure`), from what was
    read of it; the upstream's response, left part-read, is closed there and
    then: not left holding its connection until garbage collection."""
    error = orjson.dumps({"code": "internal_server_error", "message": "node failed"})
    packed = gzip.compress(error)
    broken = packed[:-8] + bytes(8)  # the CRC and length wrong
    stream = _Stream([broken[:-8], broken[-8:]])  # the error, then the trailer
    response = httpx.Response(500, headers={"content-encoding": "gzip"}, stream=stream)
    dify = DifyUpstream()
    x = types.SimpleNamespace(
        request_id="test",
        dialect=dify,
        route=dify.route("POST", "/chat-messages"),
        answer_body={"response_mode": "blocking", "query": "hi"},
    )
    proxy = object.__new__(gateway.proxy.Proxy)
    billed = await proxy._billed_failure(x, response)  # type: ignore[arg-type]
    assert billed is not None and billed.content == error
    assert stream.closed


async def test_a_blocking_chatflow_that_pauses_is_charged_its_estimate(
    sqlite_url: str,
) -> None:
    """A chatflow asked in blocking mode (no response_mode) that runs an LLM
    node and pauses for human input answers with the pause (dify.md, "Human
    input"): no usage, no answer text. Dify billed the node, and the resume's
    meter counts only what follows the pause: the paused answer is charged the
    prompt's estimate, not refunded (review F2). (Its cost is not reported:
    docs/quotas.md.)"""

    class PausedChatflow:
        hits = 0

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            assert scope["type"] == "http"
            PausedChatflow.hits += 1
            while (await receive()).get("more_body"):
                pass
            body = (
                b'{"event":"workflow_paused","task_id":"t-1","workflow_run_id":"run-c",'
                b'"conversation_id":"c-1","message_id":"m-1","data":{"workflow_run_id":"run-c",'
                b'"status":"paused","paused_nodes":["hi"],"reasons":[],'
                b'"human_input_forms":[{"form_id":"f1","node_id":"hi","form_token":"tok-1"}]}}'
            )
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    upstream = PausedChatflow()
    settings = {"plans": {"free": {"queries_per_day": 1}}}
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            body = {"query": "Soạn thư " * 100, "inputs": {}, "conversation_id": "c-1"}
            response = await client.post("/v1/chat-messages", json=body, headers=h.auth())
            assert response.status_code == 200
            await h.probes.wait_finished(1)
            again = await client.post("/v1/chat-messages", json=body, headers=h.auth())
        (event,) = await h.events()
    assert event.estimated and event.prompt_tokens > 0 and event.outcome == "cut"
    assert again.status_code == 429  # the query was not given back
    assert PausedChatflow.hits == 1


async def test_a_paused_workflow_padded_with_unused_inputs_keeps_its_nodes_cost(
    sqlite_url: str,
) -> None:
    """A streamed workflow that pauses for human input ends with no
    workflow_finished: it is charged the larger of its finished nodes' reports
    (priced) and an estimate from the prompt (no price). The prompt counts every
    string in `inputs`, which the caller writes (Dify drops the keys the app does
    not declare): padded, the estimate's tokens win - and the nodes' cost, what
    Dify billed, stays with them (review F1)."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {"plans": {"free": {"cost_per_day": "100"}}}
    async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
        body = {"inputs": {"topic": "hè", "pad": "x" * 400_000}, "response_mode": "streaming"}
        headers = {**h.auth(), "x-fake-scenario": "pause", "x-fake-message-id": "run-p"}
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            response = await client.post("/v1/workflows/run", json=body, headers=headers)
        assert response.status_code == 200 and b"workflow_paused" in response.content
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert fake.usage.total_price > 0
    assert event.estimated and event.prompt_tokens >= 100_000  # the estimate's tokens
    assert event.cost == fake.usage.total_price  # the node's price, as Dify billed it
