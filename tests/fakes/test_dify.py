"""The fake Dify upstream: its streams, errors and bookkeeping must be right before the
proxy's tests can trust it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from decimal import Decimal
from typing import Any, cast

import httpx
import orjson
import pytest
import uvicorn

from tests.fakes.dify import ANSWER_PIECES, FakeDify, Usage
from tests.harness import until

ANSWER = "".join(ANSWER_PIECES)
USAGE_KEYS = {
    "prompt_tokens",
    "prompt_unit_price",
    "prompt_price_unit",
    "prompt_price",
    "completion_tokens",
    "completion_unit_price",
    "completion_price_unit",
    "completion_price",
    "total_tokens",
    "total_price",
    "currency",
    "latency",
    "time_to_first_token",
    "time_to_generate",
}
DEFAULT_USAGE = {
    "prompt_tokens": 1033,
    "completion_tokens": 135,
    "total_tokens": 1168,
    "prompt_price": "0.0010330",
    "completion_price": "0.0002700",
    "total_price": "0.0013030",
    "currency": "USD",
}
STREAM = {"user": "alice", "query": "Xin chào", "inputs": {}, "response_mode": "streaming"}
BLOCKING = {"user": "alice", "query": "Xin chào", "inputs": {}, "response_mode": "blocking"}


# -- helpers ---------------------------------------------------------------------------


def client(fake: FakeDify) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=fake), base_url="http://dify/v1")


def parse_sse(body: bytes) -> list[Any]:
    """Each block as parsed JSON, or the string "ping" for a keep-alive."""
    items: list[Any] = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block:
            continue
        if block == b"event: ping":
            items.append("ping")
            continue
        assert block.startswith(b"data: ") and b"\n" not in block, block
        items.append(orjson.loads(block[6:]))
    return items


def names(items: Iterable[Any]) -> list[str]:
    return [item if isinstance(item, str) else item["event"] for item in items]


def events(items: Iterable[Any], name: str) -> list[dict[str, Any]]:
    return [item for item in items if not isinstance(item, str) and item["event"] == name]


async def stream(fake: FakeDify, path: str, scenario: str | None = None, **extra: Any) -> Any:
    headers = {"x-fake-scenario": scenario} if scenario else {}
    headers |= extra.pop("headers", {})
    async with client(fake) as c:
        response = await c.post(path, json=STREAM | extra, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.content)


class Call:
    """One request driven through raw ASGI: the body in the given chunks, then a client
    that stays connected until `leave` is set."""

    def __init__(
        self,
        app: FakeDify,
        method: str,
        path: str,
        *,
        chunks: list[bytes] | None = None,
        headers: dict[str, str] | None = None,
        query: bytes = b"",
    ) -> None:
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000),
            "server": ("dify", 80),
        }
        self._chunks = list(chunks or [b""])
        self.leave = asyncio.Event()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task = asyncio.create_task(app(self.scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if self._chunks:
            body = self._chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(self._chunks)}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Any) -> None:
        await self.sent.put(dict(message))

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.sent.get(), 5)

    async def rest(self) -> list[dict[str, Any]]:
        await asyncio.wait_for(self.task, 10)
        messages = []
        while not self.sent.empty():
            messages.append(self.sent.get_nowait())
        return messages


def chat_call(fake: FakeDify, scenario: str, path: str = "/v1/chat-messages", **extra: Any) -> Call:
    headers = {"content-type": "application/json", "x-fake-scenario": scenario}
    return Call(fake, "POST", path, chunks=[orjson.dumps(STREAM | extra)], headers=headers)


def body_of(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


@contextlib.asynccontextmanager
async def served(app: FakeDify) -> AsyncIterator[str]:
    """The app behind a real uvicorn on a free port: the base URL of its /v1."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done())
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await task


# -- chat-family streams ---------------------------------------------------------------


async def test_chat_stream_events_and_usage() -> None:
    fake = FakeDify()
    items = await stream(fake, "/chat-messages")
    assert names(items) == ["message", "ping"] + ["message"] * (len(ANSWER_PIECES) - 1) + [
        "message_end"
    ]
    messages = events(items, "message")
    assert len(messages) >= 5
    assert "".join(m["answer"] for m in messages) == ANSWER
    end = items[-1]
    ids = {(e["conversation_id"], e["message_id"], e["task_id"], e["id"]) for e in [*messages, end]}
    assert len(ids) == 1
    usage = end["metadata"]["usage"]
    assert set(usage) == USAGE_KEYS
    assert {k: usage[k] for k in DEFAULT_USAGE} == DEFAULT_USAGE
    assert isinstance(usage["latency"], float)
    assert end["metadata"]["retriever_resources"] == []
    assert fake.answers_started == fake.completed_answers == 1
    assert fake.running_tasks() == []


async def test_chat_stream_is_compact_utf8_one_event_per_chunk() -> None:
    call = chat_call(FakeDify(), "chat")
    messages = [await call.next()] + await call.rest()
    start, *bodies = messages
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert bodies[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    chunks = [m["body"] for m in bodies[:-1]]
    assert all(m["more_body"] for m in bodies[:-1])
    assert chunks[1] == b"event: ping\n\n"
    for chunk in chunks:
        assert chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1
    assert b'"event":"message"' in chunks[0] and b", " not in chunks[0]
    assert "Xin chào".encode() in chunks[0]


async def test_ids_are_fresh_unless_fixed_and_conversation_echoes() -> None:
    fake = FakeDify()
    first, second = (
        (await stream(fake, "/chat-messages"))[-1],
        (await stream(fake, "/chat-messages"))[-1],
    )
    for key in ("message_id", "task_id", "conversation_id"):
        assert first[key] != second[key]
    fixed = await stream(
        fake, "/chat-messages", conversation_id="conv-7", headers={"x-fake-message-id": "msg-1"}
    )
    assert {e["message_id"] for e in fixed if e != "ping"} == {"msg-1"}
    assert {e["conversation_id"] for e in fixed if e != "ping"} == {"conv-7"}


async def test_usage_headers_override() -> None:
    headers = {
        "x-fake-prompt-tokens": "10",
        "x-fake-completion-tokens": "20",
        "x-fake-total-price": "0.5",
    }
    usage = (await stream(FakeDify(), "/chat-messages", headers=headers))[-1]["metadata"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        10,
        20,
        30,
    )
    assert usage["total_price"] == "0.5"


async def test_raw_usage_header_replaces_fields_as_sent() -> None:
    headers = {"x-fake-usage-json": '{"total_tokens": 1e300, "total_price": "-5"}'}
    usage = (await stream(FakeDify(), "/chat-messages", headers=headers))[-1]["metadata"]["usage"]
    assert (usage["total_tokens"], usage["total_price"], usage["prompt_tokens"]) == (
        1e300,
        "-5",
        1033,
    )
    async with client(FakeDify()) as c:
        bad = await c.post("/chat-messages", json=STREAM, headers={"x-fake-usage-json": "[1]"})
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_param")


async def test_constructor_usage() -> None:
    fake = FakeDify(
        usage=Usage.priced(
            prompt_tokens=7, completion_tokens=3, prompt_price="0.1", completion_price="0.2"
        )
    )
    usage = (await stream(fake, "/chat-messages"))[-1]["metadata"]["usage"]
    assert (usage["total_tokens"], usage["total_price"]) == (10, "0.3")


async def test_agent_stream() -> None:
    items = await stream(FakeDify(), "/chat-messages", "agent")
    assert names(items)[:3] == ["agent_thought", "agent_message", "ping"]
    assert names(items)[-2:] == ["agent_thought", "message_end"]
    assert "".join(e["answer"] for e in events(items, "agent_message")) == ANSWER
    assert events(items, "agent_thought")[-1]["thought"] == ANSWER
    assert items[-1]["metadata"]["usage"]["total_tokens"] == 1168


async def test_completion_stream_has_no_conversation() -> None:
    items = await stream(FakeDify(), "/completion-messages")
    assert names(items)[-1] == "message_end"
    assert all("conversation_id" not in e for e in items if e != "ping")
    assert items[-1]["metadata"]["usage"]["prompt_tokens"] == 1033


@pytest.mark.parametrize(
    ("scenario", "tail"),
    [
        ("chatflow", ["message_end", "workflow_finished"]),
        ("chatflow_reversed", ["workflow_finished", "message_end"]),
    ],
)
async def test_chatflow_order(scenario: str, tail: list[str]) -> None:
    items = await stream(FakeDify(), "/chat-messages", scenario)
    seq = names(items)
    assert seq[:4] == ["workflow_started", "node_started", "node_finished", "node_started"]
    assert seq[-2:] == tail
    assert "".join(e["answer"] for e in events(items, "message")) == ANSWER
    end = events(items, "message_end")[0]
    finished = events(items, "workflow_finished")[0]
    assert end["metadata"]["usage"]["total_tokens"] == finished["data"]["total_tokens"] == 1168
    assert len({e["workflow_run_id"] for e in items if e != "ping" and "data" in e}) == 1


# -- workflows -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/workflows/run", "/workflows/wf-42/run"])
async def test_workflow_stream_sums(path: str) -> None:
    fake = FakeDify()
    items = await stream(fake, path)
    seq = [n for n in names(items) if n != "ping"]
    assert seq[0] == "workflow_started" and seq[-1] == "workflow_finished"
    assert seq.count("node_started") == seq.count("node_finished") == 5
    assert "".join(e["data"]["text"] for e in events(items, "text_chunk")) == ANSWER
    nodes = [e["data"] for e in events(items, "node_finished")]
    llm = [n for n in nodes if n["node_type"] == "llm"]
    code = [n for n in nodes if n["node_type"] == "code"]
    assert len(llm) == 2 and len(code) == 1
    assert not code[0]["execution_metadata"]
    for node in llm:
        assert set(node["outputs"]["usage"]) == USAGE_KEYS
        assert (
            node["execution_metadata"]["total_tokens"] == node["outputs"]["usage"]["total_tokens"]
        )
    prompt, completion, total, price = fake.expected_workflow_usage()
    assert (prompt, completion, total, price) == (1133, 185, 1318, Decimal("0.0014530"))
    assert sum(n["outputs"]["usage"]["prompt_tokens"] for n in llm) == prompt
    assert sum(n["outputs"]["usage"]["completion_tokens"] for n in llm) == completion
    assert sum(n["execution_metadata"]["total_tokens"] for n in llm) == total
    assert sum(Decimal(n["execution_metadata"]["total_price"]) for n in llm) == price
    finished = items[-1]
    assert finished["data"]["total_tokens"] == total
    assert finished["data"]["outputs"] == {"answer": ANSWER}
    assert finished["data"]["status"] == "succeeded"
    if path != "/workflows/run":
        assert finished["data"]["workflow_id"] == "wf-42"
    assert all("task_id" in e and "workflow_run_id" in e for e in items if e != "ping")


async def test_workflow_expected_usage_follows_headers() -> None:
    fake = FakeDify()
    headers = {"x-fake-prompt-tokens": "5", "x-fake-completion-tokens": "6"}
    items = await stream(fake, "/workflows/run", headers=headers)
    assert items[-1]["data"]["total_tokens"] == fake.expected_workflow_usage(headers)[2] == 161


# -- wire variants ---------------------------------------------------------------------


async def test_spaced_old_style_json() -> None:
    async with client(FakeDify()) as c:
        r = await c.post("/chat-messages", json=STREAM, headers={"x-fake-scenario": "spaced"})
    assert r.content.isascii()
    assert b'"event": "message", ' in r.content
    assert b"\\u00e0" in r.content  # the "à" of "chào"
    items = parse_sse(r.content)
    assert "".join(e["answer"] for e in events(items, "message")) == ANSWER
    assert items[-1]["metadata"]["usage"]["total_price"] == "0.0013030"


async def test_crlf_line_endings() -> None:
    async with client(FakeDify()) as c:
        r = await c.post("/chat-messages", json=STREAM, headers={"x-fake-scenario": "crlf"})
    assert b"\n" not in r.content.replace(b"\r\n", b"")
    assert r.content.endswith(b"\r\n\r\n") and b"event: ping\r\n\r\n" in r.content
    assert names(parse_sse(r.content))[-1] == "message_end"


async def test_onebyte_sends_single_bytes() -> None:
    call = chat_call(FakeDify(), "onebyte")
    start, *bodies = [await call.next()] + await call.rest()
    assert start["type"] == "http.response.start"
    assert all(len(m["body"]) == 1 and m["more_body"] for m in bodies[:-1])
    assert bodies[-1]["more_body"] is False
    items = parse_sse(body_of(bodies))
    assert "".join(e["answer"] for e in events(items, "message")) == ANSWER
    assert names(items)[-1] == "message_end"


async def test_scenarios_combine() -> None:
    items = await stream(FakeDify(), "/chat-messages", "agent,crlf")
    assert names(items)[-1] == "message_end"


async def test_delay_between_events() -> None:
    began = time.monotonic()
    await stream(FakeDify(), "/chat-messages", headers={"x-fake-delay-ms": "20"})
    assert time.monotonic() - began >= 0.02 * len(ANSWER_PIECES)


# -- failures inside the stream --------------------------------------------------------


async def test_error_midstream() -> None:
    fake = FakeDify()
    items = await stream(fake, "/chat-messages", "error_midstream")
    assert names(items) == ["message", "ping", "message", "error"]
    error = items[-1]
    assert (error["status"], error["code"]) == (400, "completion_request_error")
    assert error["message"] and error["message_id"] == items[0]["message_id"]
    assert "task_id" not in error
    assert (fake.answers_started, fake.completed_answers) == (1, 0)


async def test_error_first() -> None:
    items = await stream(FakeDify(), "/completion-messages", "error_first")
    assert names(items) == ["error"]


async def test_title_delay_keeps_connection_open_after_message_end() -> None:
    fake = FakeDify(title_delay=0.2)
    call = chat_call(fake, "title_delay")
    body = b""
    while b"message_end" not in body:
        body += (await call.next()).get("body", b"")
    ended = time.monotonic()
    assert fake.completed_answers == 1 and not call.task.done()
    last = (await call.rest())[-1]
    assert last["more_body"] is False and time.monotonic() - ended >= 0.15


# -- blocking mode ---------------------------------------------------------------------


async def test_blocking_chat_and_completion() -> None:
    async with client(FakeDify()) as c:
        chat = (await c.post("/chat-messages", json=BLOCKING | {"conversation_id": "c9"})).json()
        completion = (await c.post("/completion-messages", json=BLOCKING)).json()
    assert chat["event"] == "message" and chat["mode"] == "chat"
    assert chat["answer"] == ANSWER and chat["conversation_id"] == "c9"
    assert chat["id"] == chat["message_id"]
    usage = chat["metadata"]["usage"]
    assert set(usage) == USAGE_KEYS and {k: usage[k] for k in DEFAULT_USAGE} == DEFAULT_USAGE
    assert completion["mode"] == "completion" and "conversation_id" not in completion
    assert completion["metadata"]["usage"]["total_tokens"] == 1168


async def test_blocking_workflow() -> None:
    fake = FakeDify()
    async with client(fake) as c:
        body = (await c.post("/workflows/run", json=BLOCKING)).json()
    assert set(body) == {"task_id", "workflow_run_id", "data"}
    assert set(body["data"]) == {
        "id",
        "workflow_id",
        "status",
        "outputs",
        "error",
        "elapsed_time",
        "total_tokens",
        "total_steps",
        "created_at",
        "finished_at",
    }
    assert body["data"]["total_tokens"] == fake.expected_workflow_usage()[2]
    assert body["data"]["outputs"] == {"answer": ANSWER}


async def test_blocking_failures() -> None:
    fake = FakeDify()
    async with client(fake) as c:
        error = await c.post(
            "/chat-messages", json=BLOCKING, headers={"x-fake-scenario": "error_first"}
        )
        agent = await c.post("/chat-messages", json=BLOCKING, headers={"x-fake-scenario": "agent"})
    assert error.status_code == 400
    assert error.json() == {
        "code": "completion_request_error",
        "message": error.json()["message"],
        "status": 400,
    }
    assert agent.status_code == 400 and agent.json()["code"] == "invalid_param"
    assert fake.answers_started == 1


# -- HTTP errors -----------------------------------------------------------------------


async def test_auth() -> None:
    fake = FakeDify(api_key="app-secret")
    async with client(fake) as c:
        missing = await c.post("/chat-messages", json=BLOCKING)
        wrong = await c.post("/chat-messages", json=BLOCKING, headers={"authorization": "Bearer x"})
        right = await c.post(
            "/chat-messages", json=BLOCKING, headers={"authorization": "bearer app-secret"}
        )
    for r in (missing, wrong):
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer realm="api"'
        assert set(r.json()) == {"code", "message", "status"}
        assert (r.json()["code"], r.json()["status"]) == ("unauthorized", 401)
    assert right.status_code == 200
    assert fake.answers_started == 1 and len(fake.requests) == 3


MULTIPART_NO_USER = {"files": {"file": ("a.txt", b"abc", "text/plain")}}


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/chat-messages", {"json": {"query": "hi", "response_mode": "streaming"}}),
        ("POST", "/chat-messages", {"json": {"user": "", "query": "hi"}}),
        ("POST", "/completion-messages", {"json": {"inputs": {}}}),
        ("POST", "/workflows/run", {"json": {"inputs": {}}}),
        ("POST", "/workflows/wf-1/run", {"json": {"inputs": {}}}),
        ("POST", "/chat-messages/t1/stop", {"json": {}}),
        ("POST", "/completion-messages/t1/stop", {"json": {}}),
        ("POST", "/workflows/tasks/t1/stop", {"json": {}}),
        ("POST", "/files/upload", MULTIPART_NO_USER),
        ("GET", "/conversations", {}),
        ("GET", "/messages", {"params": {"conversation_id": "c0a8e1f2"}}),
    ],
)
async def test_user_is_required(method: str, path: str, kwargs: dict[str, Any]) -> None:
    fake = FakeDify()
    async with client(fake) as c:
        r = await c.request(method, path, **kwargs)
    assert r.status_code == 400
    assert r.json() == {"code": "invalid_param", "message": r.json()["message"], "status": 400}
    assert fake.answers_started == 0 and fake.stops == [] and fake.uploaded_bytes == []


async def test_status_scenario() -> None:
    fake = FakeDify()
    async with client(fake) as c:
        r = await c.post("/chat-messages", json=STREAM, headers={"x-fake-status": "503"})
        r429 = await c.post("/chat-messages", json=STREAM, headers={"x-fake-status": "429"})
    assert r.status_code == 503
    assert r.json()["status"] == 503 and r.json()["code"] == "internal_server_error"
    assert r429.json()["code"] == "too_many_requests"
    assert fake.answers_started == 0 and fake.hits("/chat-messages") == 2


async def test_unknown_path_method_and_scenario() -> None:
    async with client(FakeDify()) as c:
        missing = await c.get("/nope")
        method = await c.get("/chat-messages")
        scenario = await c.post("/chat-messages", json=STREAM, headers={"x-fake-scenario": "bogus"})
        misplaced = await c.post(
            "/workflows/run", json=STREAM, headers={"x-fake-scenario": "agent"}
        )
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    assert method.status_code == 405
    assert scenario.status_code == misplaced.status_code == 400


async def test_static_endpoints_and_records() -> None:
    fake = FakeDify()
    async with client(fake) as c:
        for path in ("/parameters", "/meta", "/info"):
            r = await c.get(path)
            assert r.status_code == 200 and isinstance(r.json(), dict)
        await c.post("/chat-messages?x=1", json=BLOCKING, headers={"X-Trace-Id": "req-1"})
    record = fake.requests[-1]
    assert (record.method, record.path, record.query) == ("POST", "/v1/chat-messages", {"x": "1"})
    assert record.headers["x-trace-id"] == "req-1"
    assert record.json == BLOCKING and orjson.loads(record.body) == BLOCKING
    assert fake.hits("/chat-messages") == fake.hits("/v1/chat-messages") == 1


async def test_lifespan() -> None:
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Any] = []

    async def receive() -> Any:
        return next(incoming)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await FakeDify()({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# -- uploads ---------------------------------------------------------------------------

BOUNDARY = "----fakeBoundary7MA4YWxkTrZu0gW"
# Near-misses of the delimiter inside the file must be counted as content.
FILE = b"\r\n--" + BOUNDARY[:-1].encode() + b"x\r\n" + bytes(range(256)) * 4 + b"\r\n-"


def multipart(content: bytes, *, user: str | None = "alice", user_first: bool = True) -> bytes:
    user_part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user}\r\n'.encode()
        if user is not None
        else b""
    )
    file_part = (
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="ghi chú.txt"\r\n'
            "Content-Type: text/plain\r\n\r\n"
        ).encode()
        + content
        + b"\r\n"
    )
    parts = user_part + file_part if user_first else file_part + user_part
    return parts + f"--{BOUNDARY}--\r\n".encode()


async def upload(fake: FakeDify, chunks: list[bytes]) -> tuple[int, Any]:
    headers = {"content-type": f'multipart/form-data; boundary="{BOUNDARY}"'}
    call = Call(fake, "POST", "/v1/files/upload", chunks=chunks, headers=headers)
    start, *rest = [await call.next()] + await call.rest()
    return start["status"], orjson.loads(body_of(rest))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 1 << 20])
@pytest.mark.parametrize("user_first", [True, False])
async def test_upload_counts_bytes_in_any_chunking(size: int, user_first: bool) -> None:
    fake = FakeDify()
    body = multipart(FILE, user_first=user_first)
    status, info = await upload(fake, [body[i : i + size] for i in range(0, len(body), size)])
    assert status == 201
    assert info["size"] == len(FILE) and fake.uploaded_bytes == [len(FILE)]
    assert (info["name"], info["extension"], info["mime_type"]) == (
        "ghi chú.txt",
        "txt",
        "text/plain",
    )
    assert set(info) >= {"id", "name", "size", "extension", "mime_type", "created_by", "created_at"}
    assert isinstance(info["created_at"], int)


async def test_upload_every_two_chunk_split() -> None:
    fake = FakeDify()
    body = multipart(b"--" + BOUNDARY.encode()[:5] + b"\r\n")
    for cut in range(len(body) + 1):
        status, info = await upload(fake, [body[:cut], body[cut:]])
        assert status == 201 and info["size"] == len(BOUNDARY[:5]) + 4, cut


async def test_upload_with_httpx_and_errors() -> None:
    fake = FakeDify(max_upload_bytes=100)
    async with client(fake) as c:
        ok = await c.post(
            "/files/upload", files={"file": ("p.png", b"x" * 100, "image/png")}, data={"user": "u"}
        )
        big = await c.post(
            "/files/upload", files={"file": ("p.png", b"x" * 101)}, data={"user": "u"}
        )
        none = await c.post("/files/upload", files={"other": ("p.png", b"x")}, data={"user": "u"})
        two = await c.post(
            "/files/upload",
            files=[("file", ("a", b"1")), ("file", ("b", b"2"))],
            data={"user": "u"},
        )
        truncated = await c.post(
            "/files/upload",
            content=multipart(b"abc")[:-10],
            headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
    assert ok.status_code == 201 and ok.json()["size"] == 100 and ok.json()["extension"] == "png"
    assert (big.status_code, big.json()["code"]) == (413, "file_too_large")
    assert (none.status_code, none.json()["code"]) == (400, "no_file_uploaded")
    assert (two.status_code, two.json()["code"]) == (400, "too_many_files")
    assert truncated.status_code == 400
    assert fake.uploaded_bytes == [100, 101]
    assert fake.requests[0].body == b""


# -- listings --------------------------------------------------------------------------


async def test_conversations_paging() -> None:
    fake = FakeDify()
    async with client(fake) as c:
        first = (await c.get("/conversations", params={"user": "u", "limit": 2})).json()
        last_id = first["data"][-1]["id"]
        second = (await c.get("/conversations", params={"user": "u", "last_id": last_id})).json()
        bad = await c.get("/conversations", params={"user": "u", "limit": 0})
        unknown = await c.get("/conversations", params={"user": "u", "last_id": "zzz"})
        fake.conversations = [{"id": str(i), "created_at": i, "updated_at": i} for i in range(25)]
        many = (await c.get("/conversations", params={"user": "u"})).json()
    assert (first["limit"], first["has_more"], len(first["data"])) == (2, True, 2)
    assert (second["limit"], second["has_more"], len(second["data"])) == (20, False, 1)
    assert all(isinstance(c["created_at"], int) for c in first["data"] + second["data"])
    assert {"id", "name", "inputs", "status", "introduction", "created_at", "updated_at"} <= set(
        first["data"][0]
    )
    assert bad.status_code == 400 and unknown.status_code == 404
    assert (many["has_more"], len(many["data"])) == (True, 20)


async def test_messages_paging() -> None:
    fake = FakeDify()
    conversation = fake.messages[0]["conversation_id"]
    ids = [m["id"] for m in fake.messages]
    async with client(fake) as c:
        query = {"user": "u", "conversation_id": conversation, "limit": 2}
        newest = (await c.get("/messages", params=query)).json()
        older = (
            await c.get("/messages", params=query | {"first_id": newest["data"][0]["id"]})
        ).json()
        missing = await c.get("/messages", params={"user": "u", "conversation_id": "none"})
    assert [m["id"] for m in newest["data"]] == ids[1:] and newest["has_more"] is True
    assert [m["id"] for m in older["data"]] == ids[:1] and older["has_more"] is False
    assert missing.status_code == 404


# -- stop and hold ---------------------------------------------------------------------


async def test_stop_ends_a_held_stream_with_partial_usage() -> None:
    fake = FakeDify()
    call = chat_call(fake, "hold")
    assert (await call.next())["status"] == 200
    first = parse_sse((await call.next())["body"])[0]
    await until(lambda: fake.holding == 1)
    assert fake.running_tasks() == [first["task_id"]]
    async with client(fake) as c:
        r = await c.post(f"/chat-messages/{first['task_id']}/stop", json={"user": "alice"})
    assert r.status_code == 200 and r.json() == {"result": "success"}
    items = parse_sse(body_of(await call.rest()))
    assert names(items) == ["ping", "message_end"]
    usage = items[-1]["metadata"]["usage"]
    # 1 of 9 pieces was produced: 135 // 9 completion tokens at 0.002 * 0.001 each.
    assert (usage["completion_tokens"], usage["total_tokens"]) == (15, 1048)
    assert (usage["completion_price"], usage["total_price"]) == ("0.0000300", "0.0010630")
    assert fake.stops == [first["task_id"]] and fake.completed_answers == 1
    assert fake.running_tasks() == [] and fake.holding == 0


async def test_stop_from_another_user_is_ignored_and_release_continues() -> None:
    fake = FakeDify()
    call = chat_call(fake, "hold")
    await call.next()
    task_id = parse_sse((await call.next())["body"])[0]["task_id"]
    async with client(fake) as c:
        await c.post(f"/chat-messages/{task_id}/stop", json={"user": "mallory"})
    assert not call.task.done() and fake.stops == [task_id]
    fake.release_held()
    items = parse_sse(body_of(await call.rest()))
    assert items[-1]["metadata"]["usage"]["completion_tokens"] == 135


async def test_stop_a_workflow() -> None:
    fake = FakeDify()
    call = chat_call(fake, "hold", path="/v1/workflows/run")
    body = b""
    while b"text_chunk" not in body:
        body += (await call.next()).get("body", b"")
    task_id = parse_sse(body)[0]["task_id"]
    await until(lambda: fake.holding == 1)
    async with client(fake) as c:
        await c.post(f"/workflows/tasks/{task_id}/stop", json={"user": "alice"})
    items = parse_sse(body + body_of(await call.rest()))
    assert names(items)[-2:] == ["node_finished", "workflow_finished"]
    data = items[-1]["data"]
    assert (data["status"], data["total_tokens"]) == ("stopped", 1033 + 15)
    assert items[-2]["data"]["execution_metadata"]["total_tokens"] == 1048


async def test_client_leaving_does_not_stop_generation() -> None:
    fake = FakeDify()
    call = chat_call(fake, "hold")
    await call.next()
    await call.next()
    call.leave.set()
    await until(lambda: fake.disconnects == 1)
    fake.release_held()
    await call.rest()
    assert fake.completed_answers == 1


# -- over a real server ----------------------------------------------------------------


async def test_cut_aborts_the_connection() -> None:
    fake = FakeDify()
    lines: list[str] = []
    async with served(fake) as base, httpx.AsyncClient(base_url=base) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream(
                "POST", "/chat-messages", json=STREAM, headers={"x-fake-scenario": "cut"}
            ) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    lines.append(line)
        # The server still works after the abort.
        assert (await c.get("/parameters")).status_code == 200
    data = [orjson.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [e["event"] for e in data] == ["message", "message"]
    assert (fake.answers_started, fake.completed_answers) == (1, 0)


async def test_cut_blocking_answer_is_short_of_its_content_length() -> None:
    fake = FakeDify()
    async with served(fake) as base, httpx.AsyncClient(base_url=base) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post("/completion-messages", json=BLOCKING, headers={"x-fake-scenario": "cut"})
    assert (fake.answers_started, fake.completed_answers) == (1, 0)


async def test_real_server_streams_unbuffered_and_keeps_generating_after_disconnect() -> None:
    fake = FakeDify()
    async with served(fake) as base, httpx.AsyncClient(base_url=base) as c:
        hold = {"x-fake-scenario": "hold"}
        async with (
            c.stream("POST", "/chat-messages", json=STREAM, headers=hold) as r,
            contextlib.aclosing(cast(AsyncGenerator[str, None], r.aiter_lines())) as lines,
        ):
            first = await anext(lines)
            # The first event arrives while the rest of the answer is held back.
            assert orjson.loads(first[6:])["answer"] == ANSWER_PIECES[0]
            assert fake.holding == 1
        await until(lambda: fake.disconnects == 1)
        assert fake.completed_answers == 0
        fake.release_held()
        await until(lambda: fake.completed_answers == 1)
