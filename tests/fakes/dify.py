"""A fake of Dify's Service API as a plain ASGI app, for the test suite.

It speaks Dify 1.x's wire format (the protocol notes in docs/upstreams/dify.md): SSE answers whose
``message_end`` carries usage, blocking JSON answers, Dify's error shape, stop endpoints,
file upload and the conversation/message listings. Paths are served with or without a
``/v1`` prefix, so it works as an upstream base of ``http://host:port`` or ``.../v1``.

Tests steer it per request with headers:

- ``x-fake-scenario``: one or more of the names in :data:`SCENARIOS`, comma-separated
  (``agent,onebyte``). ``chat``/``completion``/``workflow`` name the path's own shape.
- ``x-fake-prompt-tokens``, ``x-fake-completion-tokens``, ``x-fake-total-price``: usage.
- ``x-fake-message-id``: a fixed message id (workflow run id for workflows).
- ``x-fake-delay-ms``: the pause between events (before an upload's answer: its store).
- ``x-fake-metadata``: a JSON object merged into ``message_end.metadata`` (and a
  workflow's ``outputs``), e.g. ``{"source": "web_search"}``.
- ``x-fake-status``: answer with this HTTP error status and no answer.
- ``x-fake-audio-bytes``: text-to-audio answers this many bytes of audio.
- ``x-fake-usage-json``: a JSON object whose fields replace those of every usage
  object sent, raw (``{"total_tokens": 1e300}``), to play a misbehaving upstream.

Like Dify, an answer keeps being generated after the client disconnects; only the
stop endpoint (same task id and user) ends it early.

It builds on the pieces of Dify's wire format that ``gateway demo``'s small fake
(gateway/demo_upstream.py) defines: the usage object, the error shape, the key check,
the message envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NoReturn
from urllib.parse import parse_qsl

import orjson

from gateway.demo_upstream import (
    ANSWER_PIECES,
    JSON_HEADERS,
    SSE_HEADERS,
    DifyError,
    Usage,
    blocking_message,
    check_key,
    message_end,
    message_head,
    not_served,
    read_body,
    request_headers,
    require_user,
    response_headers,
    send_json,
    serve_lifespan,
    strip_v1,
)
from gateway.types import Message, Receive, Scope, Send
from tests.fakes.dify_hitl import HumanInput

__all__ = ["ANSWER_PIECES", "SCENARIOS", "FakeDify", "RecordedRequest", "Usage"]

JSON = dict[str, Any]
Headers = list[tuple[bytes, bytes]]

_BASE_SHAPES: Final = frozenset({"chat", "completion", "workflow"})
_CHAT_SHAPES: Final = frozenset({"agent", "chatflow", "chatflow_reversed"})
_FORMATS: Final = frozenset({"spaced", "crlf", "onebyte"})
_BEHAVIOURS: Final = frozenset(
    {"error_midstream", "error_first", "cut", "title_delay", "hold", "pause"}
)
_MODIFIERS: Final = _FORMATS | _BEHAVIOURS | {"status"}
SCENARIOS: Final = _BASE_SHAPES | _CHAT_SHAPES | _MODIFIERS

_STATUS_CODES: Final = {
    400: "invalid_param",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "file_too_large",
    415: "unsupported_file_type",
    429: "too_many_requests",
}

# Node ids look like Dify's (millisecond timestamps from the editor).
_START = ("1711528914102", "start", "Start")
_LLM_A = ("1711528917469", "llm", "LLM")
_CODE = ("1711528920123", "code", "Code")
_LLM_B = ("1711528925011", "llm", "LLM 2")
_END = ("1711528930555", "end", "End")
_ANSWER = ("answer", "answer", "Answer")
_Node = tuple[str, str, str]
# workflow_finished fields that a blocking workflow answer leaves out
_WORKFLOW_STREAM_ONLY: Final = frozenset({"created_by", "exceptions_count", "files"})


class _UpstreamCut(Exception):
    """Raised on purpose by scenario "cut" so uvicorn aborts the connection mid-body."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str  # as received, including any /v1 prefix
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes  # empty for uploads, which are counted, not kept
    json: Any  # the parsed JSON body, or None


# The second LLM node of the workflow scenario costs a fixed amount, so a test can
# predict the workflow's sums from the configured usage alone.
_NODE_B_USAGE: Final = Usage(
    prompt_tokens=100,
    completion_tokens=50,
    total_tokens=150,
    prompt_price=Decimal("0.0000500"),
    completion_price=Decimal("0.0001000"),
    total_price=Decimal("0.0001500"),
    prompt_unit_price=Decimal("0.0005"),
    completion_unit_price=Decimal("0.002"),
    price_unit=Decimal("0.001"),
    currency="USD",
)


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


class _Out:
    """Where an answer goes: SSE frames as they are made, or one JSON body at the end."""

    __slots__ = ("_nl", "_onebyte", "_send", "_spaced", "count", "disconnected", "finished")

    def __init__(self, send: Send, flags: frozenset[str]) -> None:
        self._send = send
        self._spaced = "spaced" in flags
        self._nl = b"\r\n" if "crlf" in flags else b"\n"
        self._onebyte = "onebyte" in flags
        self.count = 0  # events made so far
        self.disconnected = False
        self.finished = False  # the final body message is on its way

    def dumps(self, payload: JSON) -> bytes:
        if self._spaced:
            # Older Dify builds: json.dumps defaults, ", " / ": " and \uXXXX escapes.
            return json.dumps(payload).encode("ascii")
        return orjson.dumps(payload)

    def frame(self, payload: JSON) -> bytes:
        return b"data: " + self.dumps(payload) + self._nl + self._nl

    def ping(self) -> bytes:
        return b"event: ping" + self._nl + self._nl

    async def start(self, status: int, headers: Headers) -> None:
        await self._emit({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes, *, more: bool = True) -> None:
        if not more:
            self.finished = True
        if self._onebyte:
            for i in range(len(data)):
                chunk = data[i : i + 1]
                await self._emit({"type": "http.response.body", "body": chunk, "more_body": True})
            if not more:
                await self._emit({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._emit({"type": "http.response.body", "body": data, "more_body": more})

    async def _emit(self, message: Message) -> None:
        if self.disconnected:
            return  # like Dify: the answer goes on, nobody reads it
        try:
            await self._send(message)
        except OSError:  # ASGI 2.4 lets servers raise this once the client is gone
            self.disconnected = True


@dataclass(slots=True, eq=False)
class _Run:
    """One answer being generated: its ids, plan and progress."""

    shape: str  # chat, completion, workflow, agent, chatflow, chatflow_reversed
    flags: frozenset[str]
    streaming: bool
    user: str
    usage: Usage
    pieces: Sequence[str]
    delay: float
    message_id: str
    conversation_id: str | None
    workflow_id: str
    inputs: Any
    task_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    workflow_run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    text: list[str] = field(default_factory=list)
    first_token: float | None = None
    extra_metadata: JSON = field(default_factory=dict)  # merged into message_end.metadata / outputs
    raw_usage: JSON = field(default_factory=dict)  # replaces fields of every usage object sent
    result: JSON | None = None  # the blocking-mode body, once the answer is complete
    error: JSON | None = None  # the error that ended the answer, if one did

    @property
    def chat_family(self) -> bool:
        return self.shape not in ("completion", "workflow")

    @property
    def answer(self) -> str:
        return "".join(self.text)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def usage_so_far(self) -> Usage:
        if self.stopped.is_set() and len(self.text) < len(self.pieces):
            return self.usage.cut_to(len(self.text), len(self.pieces))
        return self.usage

    def usage_json(self, usage: Usage) -> JSON:
        first = None if self.first_token is None else self.first_token - self.started
        return {**usage.to_json(latency=self.elapsed(), first_token=first), **self.raw_usage}

    def envelope(self, event: str) -> JSON:
        if self.shape == "workflow":
            return {"event": event, "task_id": self.task_id, "workflow_run_id": self.message_id}
        return message_head(
            event,
            conversation_id=self.conversation_id if self.chat_family else None,
            message_id=self.message_id,
            created_at=self.created_at,
            task_id=self.task_id,
        )

    def workflow_event(self, event: str, data: JSON) -> JSON:
        if self.shape == "workflow":
            return self.envelope(event) | {"data": data}
        head = self.envelope(event)
        del head["id"]
        return head | {"workflow_run_id": self.workflow_run_id, "data": data}

    def node_id(self, node: _Node) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.task_id}/{node[0]}"))

    def node_started(self, node: _Node, index: int, prev: _Node | None) -> JSON:
        data = {
            "id": self.node_id(node),
            "node_id": node[0],
            "node_type": node[1],
            "title": node[2],
            "index": index,
            "predecessor_node_id": None if prev is None else prev[0],
            "inputs": None,
            "created_at": self.created_at,
        }
        return self.workflow_event("node_started", data)

    def node_finished(
        self, node: _Node, index: int, prev: _Node | None, outputs: JSON, usage: Usage | None
    ) -> JSON:
        data = self.node_started(node, index, prev)["data"] | {
            "process_data": None,
            "outputs": outputs,
            "status": "succeeded",
            "error": None,
            "elapsed_time": round(self.elapsed(), 6),
            # Code nodes report an empty object, start/end nodes null: both occur.
            "execution_metadata": (
                ({} if node[1] == "code" else None)
                if usage is None
                else {
                    "total_tokens": usage.total_tokens,
                    "total_price": str(usage.total_price),
                    "currency": usage.currency,
                }
            ),
            "finished_at": int(time.time()),
            "files": [],
        }
        return self.workflow_event("node_finished", data)

    def llm_outputs(self, text: str, usage: Usage) -> JSON:
        return {"text": text, "usage": self.usage_json(usage), "finish_reason": "stop"}

    def workflow_result(self, total_tokens: int, steps: int, outputs: JSON) -> JSON:
        stopped = self.stopped.is_set()
        return {
            "id": self.workflow_run_id if self.shape != "workflow" else self.message_id,
            "workflow_id": self.workflow_id,
            "status": "stopped" if stopped else "succeeded",
            "outputs": outputs | self.extra_metadata,
            "error": "Workflow execution stopped by user." if stopped else None,
            "elapsed_time": round(self.elapsed(), 6),
            "total_tokens": total_tokens,
            "total_steps": steps,
            "created_at": self.created_at,
            "finished_at": int(time.time()),
        }

    def message_end(self, usage: Usage) -> JSON:
        return message_end(
            self.envelope("message_end"), self.usage_json(usage), self.extra_metadata
        )

    def fail(self) -> JSON:
        """Record the scenario's model failure and return its SSE error event."""
        self.error = {
            "code": "completion_request_error",
            "message": "[openai] Server Unavailable Error, the model is overloaded",
            "status": 400,
        }
        head = self.envelope("error")
        head.pop("task_id")
        head.pop("id", None)
        return head | self.error


class _MultipartCounter:
    """Counts the bytes of a multipart/form-data file part without keeping them (RFC 7578).

    Chunks are fed as they arrive. Whatever could be the start of a delimiter is held
    back until the next chunk, so a boundary split across chunks is still found.
    """

    _FIELD_CAP = 64 * 1024
    _HEADER_CAP = 16 * 1024

    def __init__(self, boundary: bytes) -> None:
        self._delim = b"\r\n--" + boundary
        # The body opens with "--boundary" and no CRLF; pretending there was one makes
        # the first delimiter look like all the others (RFC 2046 section 5.1.1).
        self._buf = bytearray(b"\r\n")
        self._state = "preamble"
        self._name = ""
        self._filename: str | None = None
        self._content_type: str | None = None
        self._size = 0
        self._value = bytearray()
        self.files: list[tuple[str, str, str | None, int]] = []  # name, filename, type, size
        self.fields: dict[str, str] = {}
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        if self.error is None and self._state != "done":
            self._buf += data
            while self._step():
                pass

    def close(self) -> None:
        if self.error is None and self._state != "done":
            self.error = "multipart body ended before its closing delimiter"

    def _step(self) -> bool:
        buf, delim = self._buf, self._delim
        if self._state == "preamble":
            i = buf.find(delim)
            if i < 0:
                del buf[: max(0, len(buf) - len(delim) + 1)]
                return False
            del buf[: i + len(delim)]
            self._state = "delimiter"
            return True
        if self._state == "delimiter":
            if len(buf) < 2:
                return False
            if buf.startswith(b"--"):
                self._state = "done"
                buf.clear()
                return False
            i = buf.find(b"\r\n")
            if i < 0 or buf[:i].strip(b" \t"):  # only whitespace may follow a delimiter
                if i >= 0 or len(buf) > 1024:
                    self.error = "malformed multipart delimiter line"
                return False
            del buf[: i + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if len(buf) < 2:
                return False
            if buf.startswith(b"\r\n"):
                head = b""
                del buf[:2]
            else:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(buf) > self._HEADER_CAP:
                        self.error = "multipart part headers too long"
                    return False
                head = bytes(buf[:i])
                del buf[: i + 4]
            self._begin(head)
            self._state = "body"
            return True
        if self._state == "body":
            i = buf.find(delim)
            if i < 0:
                safe = len(buf) - len(delim) + 1
                if safe > 0:
                    self._data(buf, safe)
                    del buf[:safe]
                return False
            self._data(buf, i)
            del buf[: i + len(delim)]
            self._end()
            self._state = "delimiter"
            return True
        return False

    def _begin(self, head: bytes) -> None:
        self._name, self._filename, self._content_type = "", None, None
        self._size = 0
        self._value.clear()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "content-disposition":
                params = _params(value)
                self._name = params.get("name", "")
                self._filename = params.get("filename")
            elif key == "content-type":
                self._content_type = value.strip()

    def _data(self, buf: bytearray, n: int) -> None:
        if self._filename is not None:
            self._size += n
        elif len(self._value) < self._FIELD_CAP:
            self._value += buf[: min(n, self._FIELD_CAP - len(self._value))]

    def _end(self) -> None:
        if self._filename is not None:
            self.files.append((self._name, self._filename, self._content_type, self._size))
        else:
            self.fields[self._name] = self._value.decode("utf-8", "replace")


_PARAM = re.compile(r';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _params(value: str) -> dict[str, str]:
    """The parameters of a header value such as ``form-data; name="file"``."""
    found: dict[str, str] = {}
    for match in _PARAM.finditer(value):
        text = match.group(2).strip()
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        found[match.group(1).lower()] = text
    return found


def _static(payload: JSON) -> bytes:
    return orjson.dumps(payload)


_PARAMETERS: Final = _static(
    {
        "opening_statement": "Xin chào! Hỏi tôi bất cứ điều gì.",
        "suggested_questions": ["Bạn có thể làm gì?"],
        "suggested_questions_after_answer": {"enabled": False},
        "speech_to_text": {"enabled": False},
        "text_to_speech": {"enabled": False, "voice": "", "language": ""},
        "retriever_resource": {"enabled": True},
        "annotation_reply": {"enabled": False},
        "more_like_this": {"enabled": False},
        "sensitive_word_avoidance": {"enabled": False},
        "user_input_form": [],
        "file_upload": {"image": {"enabled": False, "number_limits": 3}},
        "system_parameters": {
            "file_size_limit": 15,
            "image_file_size_limit": 10,
            "audio_file_size_limit": 50,
            "video_file_size_limit": 100,
            "workflow_file_upload_limit": 10,
        },
    }
)
_META: Final = _static({"tool_icons": {}})
_INFO: Final = _static(
    {
        "name": "Fake Dify",
        "description": "A fake Dify app served by the gateway's test suite",
        "tags": [],
        "mode": "chat",
        "author_name": "gateway",
    }
)


def _as_uuid(value: str) -> str:
    """A conversation id as Dify reads it (`uuid_value`: Python's `uuid.UUID`,
    so upper case, braces, a urn prefix or no hyphens name one conversation)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


def _default_conversations() -> list[JSON]:
    base = 1_705_398_420
    return [
        {
            "id": f"c0a8e1f2-0000-4000-8000-00000000000{i}",
            "name": name,
            "inputs": {},
            "status": "normal",
            "introduction": "",
            "created_at": base - 3600 * i,
            "updated_at": base - 3600 * i + 60,
        }
        for i, name in enumerate(["Chào hỏi", "Weather in Hanoi", "Recipe ideas"], start=1)
    ]


def _default_messages() -> list[JSON]:
    conversation = "c0a8e1f2-0000-4000-8000-000000000001"
    pairs = [("Xin chào", "Xin chào! Tôi có thể giúp gì?"), ("Hello", "Hi there!"), ("?", "!")]
    return [
        {
            "id": f"5ad4cb98-0000-4000-8000-00000000000{i}",
            "conversation_id": conversation,
            "parent_message_id": None,
            "inputs": {},
            "query": query,
            "answer": answer,
            "message_files": [],
            "feedback": None,
            "retriever_resources": [],
            "agent_thoughts": [],
            "status": "normal",
            "error": None,
            "message_tokens": 1033,
            "answer_tokens": 135,
            "total_tokens": 1168,
            "total_price": "0.0013030",
            "currency": "USD",
            "created_at": 1_705_398_000 + 60 * i,
        }
        for i, (query, answer) in enumerate(pairs, start=1)
    ]


def _int_range(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise DifyError(400, "invalid_param", f"{name} must be an integer in [{low}, {high}]")
    return value


_SIDE_CALLS: Final = frozenset(
    {"suggested", "rename", "text_to_audio", "audio_to_text", "form_submit", "workflow_logs"}
)


_ROUTES: Final = (
    ("POST", re.compile(r"/chat-messages"), "chat"),
    ("POST", re.compile(r"/completion-messages"), "completion"),
    ("POST", re.compile(r"/workflows/run"), "workflow"),
    ("POST", re.compile(r"/workflows/tasks/(?P<task>[^/]+)/stop"), "stop"),
    ("POST", re.compile(r"/workflows/(?P<workflow>[^/]+)/run"), "workflow"),
    ("POST", re.compile(r"/(?:chat|completion)-messages/(?P<task>[^/]+)/stop"), "stop"),
    ("POST", re.compile(r"/files/upload"), "upload"),
    ("GET", re.compile(r"/conversations"), "conversations"),
    ("GET", re.compile(r"/messages"), "messages"),
    ("GET", re.compile(r"/parameters"), "parameters"),
    # Side calls Dify bills to the app's model provider (docs/upstreams/dify.md).
    ("GET", re.compile(r"/messages/(?P<message>[^/]+)/suggested"), "suggested"),
    ("POST", re.compile(r"/conversations/(?P<conversation>[^/]+)/name"), "rename"),
    ("POST", re.compile(r"/text-to-audio"), "text_to_audio"),
    ("POST", re.compile(r"/audio-to-text"), "audio_to_text"),
    # Human input: a paused run resumes on the form's submit; its events stream on.
    ("POST", re.compile(r"/form/human_input/(?P<token>[^/]+)"), "form_submit"),
    ("GET", re.compile(r"/workflow/(?P<task>[^/]+)/events"), "resume_events"),
    # An operator endpoint: every end user's runs.
    ("GET", re.compile(r"/workflows/logs"), "workflow_logs"),
    ("GET", re.compile(r"/meta"), "meta"),
    ("GET", re.compile(r"/info"), "info"),
)


def _json_object_header(headers: dict[str, str], name: str) -> JSON:
    """The JSON object a steering header holds ({} without the header)."""
    if name not in headers:
        return {}
    try:
        value = orjson.loads(headers[name])
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise DifyError(400, "invalid_param", f"{name} must be a JSON object")
    return value


class FakeDify:
    """A fake Dify Service API; see the module docstring for the request headers."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        usage: Usage | None = None,
        answer: Sequence[str] = ANSWER_PIECES,
        delay: float = 0.0,
        title_delay: float = 0.3,
        max_upload_bytes: int = 15 * 1024 * 1024,
    ) -> None:
        if len(answer) < 3:
            raise ValueError("answer needs at least 3 pieces (error and cut scenarios send 2)")
        self.api_key = api_key
        self.usage = Usage.priced() if usage is None else usage
        self.answer = tuple(answer)
        self.delay = delay
        self.title_delay = title_delay
        self.max_upload_bytes = max_upload_bytes
        self.workflow_id = str(uuid.uuid4())

        self.requests: list[RecordedRequest] = []
        self.answers_started = 0
        self.completed_answers = 0  # reached their natural end, or a stop
        self.disconnects = 0  # clients that left while their answer was being made
        self.stops: list[str] = []  # task ids named by stop calls
        # A stop answered "success" and not acted on (Dify's known bugs with
        # some app types): the answer runs on.
        self.stops_ignored = False
        self.uploaded_bytes: list[int] = []
        self.upload_fields: list[dict[str, str]] = []  # the form fields beside the file
        self.holding = 0  # "hold" answers waiting on `release` right now
        self.conversations: list[JSON] = _default_conversations()
        # The inputs each conversation began with, by its id: Dify answers every
        # later message of a conversation with them, not with the message's own
        # (`conversation.inputs if conversation else ...`; review-limits F5).
        self.conversation_inputs: dict[str, Any] = {}
        self.ran_inputs: list[Any] = []  # the inputs each answer ran with, in order
        # Human input: paused runs, their forms and subscribers (dify_hitl.py).
        self.hitl = HumanInput()
        self.messages: list[JSON] = _default_messages()
        self._running: dict[str, _Run] = {}
        self._release: asyncio.Event | None = None
        self._over: asyncio.Event | None = None

    # -- helpers for tests ---------------------------------------------------------

    @property
    def submitted_forms(self) -> list[tuple[str, str]]:
        """(form token, user) of every form submitted."""
        return self.hitl.submitted

    @property
    def release(self) -> asyncio.Event:
        """Set to let "hold" answers go on; made on first use, inside the running loop."""
        if self._release is None:
            self._release = asyncio.Event()
        return self._release

    def release_held(self) -> None:
        self.release.set()

    def end_pauses(self) -> None:
        """The test is over: every ``x-fake-delay-ms`` pause of an upload or a side
        call ends now, and any to come is skipped. Such a pause outlasts the
        gateway's read timeout in the tests of a slow upstream, and the server
        shutting down waits for the request still pausing (seconds a run)."""
        if self._over is None:
            self._over = asyncio.Event()
        self._over.set()

    async def _slow(self, seconds: float) -> None:
        if self._over is None:
            self._over = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._over.wait(), seconds)

    def hits(self, path: str) -> int:
        """How many requests reached `path`; a ``/v1`` prefix is ignored on both sides."""
        wanted = strip_v1(path)
        return sum(1 for r in self.requests if strip_v1(r.path) == wanted)

    def running_tasks(self) -> list[str]:
        return list(self._running)

    def expected_workflow_usage(
        self, headers: dict[str, str] | None = None
    ) -> tuple[int, int, int, Decimal]:
        """(prompt, completion, total tokens, total price) summed over a workflow's nodes."""
        a, b = self._usage_for(headers or {}), _NODE_B_USAGE
        return (
            a.prompt_tokens + b.prompt_tokens,
            a.completion_tokens + b.completion_tokens,
            a.total_tokens + b.total_tokens,
            a.total_price + b.total_price,
        )

    # -- ASGI ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1000})
            return
        method: str = scope["method"]
        path: str = scope["path"]
        headers = request_headers(scope)
        query = dict(
            parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        )
        kind, params = self._route(method, strip_v1(path))

        body: bytes | None = b""
        if kind != "upload":  # uploads are streamed through the multipart counter
            body = await read_body(receive)
            if body is None:
                return
        parsed: Any = None
        if body:
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(body)
        self.requests.append(RecordedRequest(method, path, query, headers, body, parsed))

        try:
            if kind in ("not_found", "method_not_allowed"):
                raise not_served(path, other_method=kind == "method_not_allowed")
            check_key(headers, self.api_key)
            self._check_status(headers)
            await self._dispatch(kind, params, headers, query, parsed, receive, send)
        except DifyError as exc:
            await exc.send(send)

    def _route(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        allowed = False
        for route_method, pattern, kind in _ROUTES:
            match = pattern.fullmatch(path)
            if match is not None:
                if route_method == method:
                    return kind, match.groupdict()
                allowed = True
        return ("method_not_allowed" if allowed else "not_found"), {}

    def _check_status(self, headers: dict[str, str]) -> None:
        raw = headers.get("x-fake-status")
        names = {n.strip() for n in headers.get("x-fake-scenario", "").split(",")}
        if raw is None and "status" not in names:
            return
        try:
            status = int(raw or 500)
        except ValueError:
            raise DifyError(400, "invalid_param", "x-fake-status must be an integer") from None
        code = _STATUS_CODES.get(
            status, "internal_server_error" if status >= 500 else "bad_request"
        )
        raise DifyError(status, code, f"Fake upstream answered {status} as asked")

    async def _dispatch(
        self,
        kind: str,
        params: dict[str, str],
        headers: dict[str, str],
        query: dict[str, str],
        body: Any,
        receive: Receive,
        send: Send,
    ) -> None:
        if kind in ("chat", "completion", "workflow"):
            run = self._plan(kind, params, headers, body)
            await self._answer(run, receive, send)
        elif kind == "stop":
            await self._stop(params["task"], body, send)
        elif kind == "upload":
            await self._upload(headers, receive, send)
        elif kind == "conversations":
            await self._conversations(query, send)
        elif kind == "messages":
            await self._messages(query, send)
        elif kind in _SIDE_CALLS:
            await self._side_call(kind, params, headers, query, body, send)
        elif kind == "resume_events":
            user = require_user(query.get("user"))
            await self.hitl.events(params["task"], user, query, receive, send)
        else:
            static = {"parameters": _PARAMETERS, "meta": _META, "info": _INFO}[kind]
            await send_json(send, 200, static)

    # -- answers -------------------------------------------------------------------

    def _usage_for(self, headers: dict[str, str]) -> Usage:
        usage = self.usage
        prompt = headers.get("x-fake-prompt-tokens")
        completion = headers.get("x-fake-completion-tokens")
        price = headers.get("x-fake-total-price")
        try:
            if prompt is not None or completion is not None:
                p = usage.prompt_tokens if prompt is None else int(prompt)
                c = usage.completion_tokens if completion is None else int(completion)
                usage = replace(usage, prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
            if price is not None:
                usage = replace(usage, total_price=Decimal(price))
        except (ValueError, InvalidOperation):
            raise DifyError(400, "invalid_param", "bad x-fake usage header") from None
        return usage

    def _shape(self, kind: str, headers: dict[str, str]) -> tuple[str, frozenset[str]]:
        names = frozenset(
            n.strip() for n in headers.get("x-fake-scenario", "").split(",") if n.strip()
        )
        if unknown := names - SCENARIOS:
            raise DifyError(400, "invalid_param", f"unknown x-fake-scenario {sorted(unknown)}")
        if wrong := names & _BASE_SHAPES - {kind}:
            raise DifyError(400, "invalid_param", f"scenario {sorted(wrong)} is not for {kind}")
        shapes = names & _CHAT_SHAPES
        if len(shapes) > 1 or (shapes and kind != "chat"):
            raise DifyError(400, "invalid_param", f"scenario {sorted(shapes)} is not for {kind}")
        return (next(iter(shapes)) if shapes else kind), names & _MODIFIERS

    def _plan(self, kind: str, params: dict[str, str], headers: dict[str, str], body: Any) -> _Run:
        if not isinstance(body, dict):
            raise DifyError(400, "invalid_param", "The request body must be a JSON object.")
        user = require_user(body.get("user"))
        shape, flags = self._shape(kind, headers)
        streaming = body.get("response_mode") == "streaming"
        if shape == "agent" and not streaming:
            raise DifyError(400, "invalid_param", "Agent Chat App does not support blocking mode")
        delay = self.delay
        if "x-fake-delay-ms" in headers:
            try:
                delay = float(headers["x-fake-delay-ms"]) / 1000
            except ValueError:
                raise DifyError(400, "invalid_param", "bad x-fake-delay-ms") from None
        conversation = body.get("conversation_id") if kind == "chat" else None
        extra = _json_object_header(headers, "x-fake-metadata")
        raw_usage = _json_object_header(headers, "x-fake-usage-json")
        conversation_id = (
            _as_uuid(conversation) if isinstance(conversation, str) and conversation else None
        ) or (str(uuid.uuid4()) if kind == "chat" else None)
        inputs = body.get("inputs") or {}
        if conversation_id is not None:
            inputs = self.conversation_inputs.setdefault(conversation_id, inputs)
        self.ran_inputs.append(inputs)
        return _Run(
            extra_metadata=extra,
            raw_usage=raw_usage,
            shape=shape,
            flags=flags,
            streaming=streaming,
            user=user,
            usage=self._usage_for(headers),
            pieces=self.answer,
            delay=delay,
            message_id=headers.get("x-fake-message-id") or str(uuid.uuid4()),
            conversation_id=conversation_id,
            workflow_id=params.get("workflow") or self.workflow_id,
            inputs=inputs,
        )

    async def _answer(self, run: _Run, receive: Receive, send: Send) -> None:
        out = _Out(send, run.flags)
        watcher = asyncio.create_task(self._watch(receive, out))
        self._running[run.task_id] = run
        self.answers_started += 1
        try:
            if run.streaming:
                await out.start(200, response_headers(SSE_HEADERS))
            if run.shape == "workflow":
                await self._workflow(run, out)
            else:
                await self._chat(run, out)
            if run.streaming:
                if "title_delay" in run.flags and run.error is None:
                    # Dify names the conversation after message_end, before it closes.
                    await asyncio.sleep(self.title_delay)
                await out.write(b"", more=False)
            else:
                await self._blocking(run, out)
        finally:
            self._running.pop(run.task_id, None)
            watcher.cancel()
            await asyncio.wait([watcher])
            if not watcher.cancelled():
                watcher.exception()  # retrieved, so asyncio does not log it

    async def _watch(self, receive: Receive, out: _Out) -> None:
        """Notice the client leaving; the answer itself carries on regardless."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not out.finished:
            out.disconnected = True
            self.disconnects += 1

    async def _blocking(self, run: _Run, out: _Out) -> None:
        if run.error is not None:
            status, body = run.error["status"], out.dumps(run.error)
        else:
            assert run.result is not None
            status, body = 200, out.dumps(run.result)
        await out.start(status, response_headers(JSON_HEADERS, len(body)))
        await out.write(body, more=False)

    async def _event(self, run: _Run, out: _Out, payload: JSON, *, pause: bool = True) -> None:
        if pause:
            await self._pause(run, out)
        out.count += 1
        if run.streaming:
            await out.write(out.frame(payload))

    async def _pause(self, run: _Run, out: _Out) -> None:
        if out.count and run.delay > 0 and not run.stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.stopped.wait(), run.delay)

    async def _pieces(self, run: _Run, out: _Out, make: Callable[[str], JSON]) -> bool:
        """Send the answer piece by piece; False when the scenario made it fail instead."""
        if "error_first" in run.flags:
            await self._event(run, out, run.fail())
            return False
        for piece in run.pieces:
            await self._pause(run, out)
            if run.stopped.is_set():
                break
            await self._event(run, out, make(piece), pause=False)
            run.text.append(piece)
            if len(run.text) == 1:
                run.first_token = time.monotonic()
                if run.streaming:
                    await out.write(out.ping())
                if "hold" in run.flags:
                    self.holding += 1
                    try:
                        await _first_of(self.release, run.stopped)
                    finally:
                        self.holding -= 1
            elif len(run.text) == 2:
                if "error_midstream" in run.flags:
                    await self._event(run, out, run.fail())
                    return False
                if "cut" in run.flags:
                    await self._cut(run, out)
        return True

    async def _cut(self, run: _Run, out: _Out) -> NoReturn:
        if not run.streaming:
            # A blocking answer dies after promising more bytes than it sends.
            partial = b'{"event": "message", "task_id": "' + run.task_id.encode()
            await out.start(200, response_headers(JSON_HEADERS, 4096))
            await out.write(partial)
        raise _UpstreamCut(f"fake upstream cut task {run.task_id} on purpose (scenario 'cut')")

    async def _node(
        self, run: _Run, out: _Out, node: _Node, index: int, prev: _Node | None, outputs: JSON
    ) -> None:
        await self._event(run, out, run.node_started(node, index, prev))
        await self._event(run, out, run.node_finished(node, index, prev, outputs, None))

    async def _chat(self, run: _Run, out: _Out) -> None:
        chatflow = run.shape in ("chatflow", "chatflow_reversed")
        agent = run.shape == "agent"
        thought_id = str(uuid.uuid4())

        def thought(text: str) -> JSON:
            head = run.envelope("agent_thought") | {"id": thought_id, "position": 1}
            return head | {
                "thought": text,
                "observation": "",
                "tool": "",
                "tool_labels": {},
                "tool_input": "",
                "message_files": [],
            }

        def message(piece: str) -> JSON:
            payload = run.envelope("agent_message" if agent else "message") | {"answer": piece}
            if chatflow:
                payload["from_variable_selector"] = [_LLM_A[0], "text"]
            return payload

        if chatflow:
            started: JSON = {"id": run.workflow_run_id, "workflow_id": run.workflow_id}
            started |= {"sequence_number": 1, "inputs": run.inputs, "created_at": run.created_at}
            await self._event(run, out, run.workflow_event("workflow_started", started))
            await self._node(run, out, _START, 1, None, run.inputs)
            await self._event(run, out, run.node_started(_LLM_A, 2, _START))
        if agent:
            await self._event(run, out, thought(""))
        if not await self._pieces(run, out, message):
            return
        usage, answer = run.usage_so_far(), run.answer
        if agent:
            await self._event(run, out, thought(answer))
        end = run.message_end(usage)
        if chatflow:
            outputs = run.llm_outputs(answer, usage)
            await self._event(run, out, run.node_finished(_LLM_A, 2, _START, outputs, usage))
            steps = 2
            if not run.stopped.is_set():
                await self._node(run, out, _ANSWER, 3, _LLM_A, {"answer": answer})
                steps = 3
            result = run.workflow_result(usage.total_tokens, steps, {"answer": answer})
            finished = run.workflow_event("workflow_finished", result)
            # Dify versions disagree on which of the two comes last.
            order = [end, finished] if run.shape == "chatflow" else [finished, end]
            for payload in order:
                await self._event(run, out, payload)
        else:
            await self._event(run, out, end)
        mode = {"chat": "chat", "agent": "agent-chat", "completion": "completion"}
        run.result = blocking_message(
            run.envelope("message"),
            mode=mode.get(run.shape, "advanced-chat"),
            answer=answer,
            metadata=end["metadata"],
        )
        self.completed_answers += 1

    async def _workflow(self, run: _Run, out: _Out) -> None:
        started: JSON = {"id": run.message_id, "workflow_id": run.workflow_id, "sequence_number": 1}
        started |= {"inputs": run.inputs, "created_at": run.created_at}
        if "pause" in run.flags:
            started["reason"] = "initial"
        await self._event(run, out, run.workflow_event("workflow_started", started))
        if "pause" in run.flags:
            await self._pause_for_input(run, out)
            return
        await self._node(run, out, _START, 1, None, run.inputs)
        await self._event(run, out, run.node_started(_LLM_A, 2, _START))

        def chunk(piece: str) -> JSON:
            data = {"text": piece, "from_variable_selector": [_LLM_A[0], "text"]}
            return run.workflow_event("text_chunk", data)

        if not await self._pieces(run, out, chunk):
            return
        usage, answer = run.usage_so_far(), run.answer
        outputs = run.llm_outputs(answer, usage)
        await self._event(run, out, run.node_finished(_LLM_A, 2, _START, outputs, usage))
        total, steps = usage.total_tokens, 2
        # A stop skips the nodes that have not started yet, as Dify's does.
        if not run.stopped.is_set():
            await self._node(run, out, _CODE, 3, _LLM_A, {"result": len(answer)})
            steps += 1
        if not run.stopped.is_set():
            await self._event(run, out, run.node_started(_LLM_B, 4, _CODE))
            outputs = run.llm_outputs("Tóm tắt: lời chào.", _NODE_B_USAGE)
            finished = run.node_finished(_LLM_B, 4, _CODE, outputs, _NODE_B_USAGE)
            await self._event(run, out, finished)
            steps, total = steps + 1, total + _NODE_B_USAGE.total_tokens
        if not run.stopped.is_set():
            await self._node(run, out, _END, 5, _LLM_B, {"answer": answer})
            steps += 1
        data = run.workflow_result(total, steps, {"answer": answer})
        data |= {"created_by": {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, run.user))}}
        data |= {"exceptions_count": 0, "files": []}
        await self._event(run, out, run.workflow_event("workflow_finished", data))
        run.result = {"task_id": run.task_id, "workflow_run_id": run.message_id}
        run.result["data"] = {k: v for k, v in data.items() if k not in _WORKFLOW_STREAM_ONLY}
        self.completed_answers += 1

    async def _pause_for_input(self, run: _Run, out: _Out) -> None:
        """Scenario "pause": one LLM node, then a human-input form, and the run
        pauses (dify_hitl.py resumes it when the form is submitted)."""
        await self._node(run, out, _START, 1, None, run.inputs)
        await self._event(run, out, run.node_started(_LLM_A, 2, _START))
        text = "Bản nháp."
        await self._event(run, out, run.workflow_event("text_chunk", {"text": text}))
        outputs = run.llm_outputs(text, run.usage)
        await self._event(run, out, run.node_finished(_LLM_A, 2, _START, outputs, run.usage))
        form = self.hitl.pause(
            run_id=run.message_id,
            task_id=run.task_id,
            user=run.user,
            workflow_id=run.workflow_id,
            tokens=run.usage.total_tokens,
        )
        await self._event(run, out, run.workflow_event("human_input_required", form))
        paused = self.hitl.paused_data(self.hitl.runs[run.message_id])
        await self._event(run, out, run.workflow_event("workflow_paused", paused))
        run.result = {"task_id": run.task_id, "workflow_run_id": run.message_id}
        run.result |= {"event": "workflow_paused", "data": paused | {"human_input_forms": [form]}}
        self.completed_answers += 1

    # -- other endpoints -----------------------------------------------------------

    async def _stop(self, task_id: str, body: Any, send: Send) -> None:
        user = require_user(body.get("user") if isinstance(body, dict) else None)
        self.stops.append(task_id)
        run = self._running.get(task_id)
        # Dify only honours a stop from the user who started the task, and says
        # "success" either way.
        if run is not None and run.user == user and not self.stops_ignored:
            run.stopped.set()
        await send_json(send, 200, b'{"result":"success"}')

    async def _upload(self, headers: dict[str, str], receive: Receive, send: Send) -> None:
        content_type = headers.get("content-type", "")
        boundary = _params(content_type).get("boundary")
        if not content_type.lower().startswith("multipart/form-data") or not boundary:
            raise DifyError(400, "no_file_uploaded", "Please upload your file.")
        counter = _MultipartCounter(boundary.encode("latin-1"))
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            counter.feed(message.get("body", b""))
            if not message.get("more_body", False):
                break
        counter.close()
        if counter.error is not None:
            raise DifyError(400, "invalid_param", counter.error)
        user = require_user(counter.fields.get("user"))
        if not any(name == "file" for name, *_ in counter.files):
            raise DifyError(400, "no_file_uploaded", "Please upload your file.")
        if len(counter.files) > 1:
            raise DifyError(400, "too_many_files", "Only one file is allowed.")
        _, filename, mime, size = counter.files[0]
        if "x-fake-delay-ms" in headers:  # a slow store: uploads under way overlap
            await self._slow(float(headers["x-fake-delay-ms"]) / 1000)
        self.uploaded_bytes.append(size)
        self.upload_fields.append(dict(counter.fields))
        if size > self.max_upload_bytes:
            raise DifyError(413, "file_too_large", f"File size exceeded. {size} > limit")
        extension = filename.rpartition(".")[2].lower() if "." in filename else ""
        info = {
            "id": str(uuid.uuid4()),
            "name": filename,
            "size": size,
            "extension": extension,
            "mime_type": mime or mimetypes.guess_type(filename)[0] or "application/octet-stream",
            "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, user)),
            "created_at": int(time.time()),
            "preview_url": None,
        }
        await send_json(send, 201, orjson.dumps(info))

    async def _side_call(
        self,
        kind: str,
        params: dict[str, str],
        headers: dict[str, str],
        query: dict[str, str],
        body: Any,
        send: Send,
    ) -> None:
        """The small paid calls and the form submit: each answers at once (or after
        ``x-fake-delay-ms``)."""
        if "x-fake-delay-ms" in headers:
            await self._slow(float(headers["x-fake-delay-ms"]) / 1000)
        if kind == "suggested":
            require_user(query.get("user"))
            payload: JSON = {"result": "success", "data": ["Bạn là ai?", "Còn gì nữa?"]}
        elif kind == "audio_to_text":
            # Multipart with a form user (not parsed here: the body was recorded).
            payload = {"text": "Xin chào"}
        elif kind == "workflow_logs":
            payload = {"page": 1, "limit": 20, "total": 0, "has_more": False, "data": []}
        else:
            if not isinstance(body, dict):
                raise DifyError(400, "invalid_param", "The request body must be a JSON object.")
            user = require_user(body.get("user")) if kind == "form_submit" else body.get("user")
            if kind == "rename":
                name = "Cuộc trò chuyện mới" if body.get("auto_generate") else body.get("name")
                payload = {"id": params["conversation"], "name": name, "status": "normal"}
            elif kind == "form_submit":
                usage = self._usage_for(headers).to_json(latency=0.1, first_token=None)
                names = {n.strip() for n in headers.get("x-fake-scenario", "").split(",")}
                text = "x" * 65536 if "huge" in names else "Đã duyệt."
                payload = self.hitl.submit(
                    params["token"], str(user), usage=usage, cut="cut" in names, text=text
                )
            else:  # text_to_audio: Dify answers audio bytes (x-fake-audio-bytes of them)
                audio = b"ID3fake-mp3"
                if "x-fake-audio-bytes" in headers:
                    audio = audio.ljust(int(headers["x-fake-audio-bytes"]), b"\0")
                headers_out = response_headers(((b"content-type", b"audio/mpeg"),), len(audio))
                await send({"type": "http.response.start", "status": 200, "headers": headers_out})
                await send({"type": "http.response.body", "body": audio, "more_body": False})
                return
        await send_json(send, 200, orjson.dumps(payload))

    async def _conversations(self, query: dict[str, str], send: Send) -> None:
        require_user(query.get("user"))
        limit = _int_range(query, "limit", 20, 1, 100)
        items = self.conversations
        last_id = query.get("last_id")
        if last_id:
            ids = [c.get("id") for c in items]
            if last_id not in ids:
                raise DifyError(404, "not_found", "Last Conversation Not Exists.")
            items = items[ids.index(last_id) + 1 :]
        page = {"limit": limit, "has_more": len(items) > limit, "data": items[:limit]}
        await send_json(send, 200, orjson.dumps(page))

    async def _messages(self, query: dict[str, str], send: Send) -> None:
        require_user(query.get("user"))
        conversation = query.get("conversation_id")
        if not conversation:
            raise DifyError(400, "invalid_param", "conversation_id is required")
        limit = _int_range(query, "limit", 20, 1, 100)
        items = [m for m in self.messages if m.get("conversation_id") == conversation]
        if not items and all(c.get("id") != conversation for c in self.conversations):
            raise DifyError(404, "not_found", "Conversation Not Exists.")
        first_id = query.get("first_id")
        if first_id:
            ids = [m.get("id") for m in items]
            if first_id not in ids:
                raise DifyError(404, "not_found", "First Message Not Exists.")
            items = items[: ids.index(first_id)]
        # Dify pages backwards through history: the newest `limit` messages before
        # first_id, oldest first; has_more says older ones remain.
        page = {"limit": limit, "has_more": len(items) > limit, "data": items[-limit:]}
        await send_json(send, 200, orjson.dumps(page))
