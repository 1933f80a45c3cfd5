"""A fake OpenAI-compatible API as a plain ASGI app, for the test suite.

It speaks the wire format of docs/upstreams/openai.md: ``/chat/completions`` and
``/completions`` (blocking, or streamed as ``data:`` chunks ending in
``data: [DONE]``, with the usage-only last chunk only when the request set
``stream_options.include_usage``), ``/embeddings``, ``/responses`` (blocking, or
streamed as ``event: response.*`` events with usage in ``response.completed``),
``/models``, and OpenAI's error shape. Paths are served with or without a
``/v1`` prefix.

Tests steer it per request with headers:

- ``x-fake-prompt-tokens``, ``x-fake-completion-tokens``, ``x-fake-cached-tokens``,
  ``x-fake-reasoning-tokens``: the usage it reports (``x-fake-completion-tokens:
  cap``: as many as the request's output-token cap allows, as a model that
  writes until it is stopped);
- ``x-fake-audio-prompt-tokens``, ``x-fake-audio-completion-tokens``: the audio
  tokens among them (chat completions' ``*_tokens_details.audio_tokens``);
- ``x-fake-model``: the model it says answered (default: the one asked for);
- ``x-fake-delay-ms``: the pause between two streamed events;
- ``x-fake-status``: answer with this HTTP error status, in OpenAI's error shape;
- ``x-fake-tool-calls``: a comma-separated list of output item types
  (``web_search_call``, ``image_generation_call``, ``code_interpreter_call``...)
  a response reports before its message, as hosted tool calls; streamed as
  ``response.output_item.added`` and ``.done`` events. ``x-fake-container``: the
  ``container_id`` of its code interpreter calls (default ``cntr_fake``);
- ``x-fake-scenario``: ``cut`` (the connection drops after the text, before any
  usage), ``no_usage`` (ignore ``include_usage``, as some compatible servers do),
  ``error_midstream`` (an error ``data:`` line after the first piece),
  ``hold`` (pause after the first piece until the client closes the connection or
  `release_held` is called).

Like OpenAI, an answer stops being generated when its client closes the
connection (there is no stop endpoint); ``closed`` counts such answers.

``FakeOpenAI(lax=True)`` reads booleans as lax compatible servers do (vLLM and
other pydantic servers): ``1``, ``"true"``, ``"yes"``, ``"on"`` are true.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.types import Receive, Scope, Send

__all__ = ["ANSWER_PIECES", "FakeOpenAI", "RecordedRequest"]

JSON = dict[str, Any]

ANSWER_PIECES: Final = ("Xin chào", "!", " Tôi", " có thể", " giúp", " gì", "?")
_JSON: Final = [(b"content-type", b"application/json")]
_SSE: Final = [(b"content-type", b"text/event-stream; charset=utf-8")]
_ERROR_TYPES: Final = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
}


class _Cut(Exception):
    """Raised on purpose (scenario "cut") so uvicorn aborts the connection mid-body."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str  # without any /v1 prefix
    headers: dict[str, str]
    json: Any
    raw: bytes = b""  # the body as received


def error_body(status: int, message: str, *, code: str | None = None) -> bytes:
    kind, default_code = _ERROR_TYPES.get(status, ("invalid_request_error", None))
    return orjson.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code or default_code}}
    )


# What pydantic's lax mode reads as true (vLLM's request models are pydantic).
_LAX_TRUE: Final = frozenset({"1", "true", "yes", "on", "t", "y"})


class FakeOpenAI:
    def __init__(
        self, *, api_key: str, models: tuple[str, ...] = ("gpt-4o-mini",), lax: bool = False
    ) -> None:
        self.api_key = api_key
        self.models = models
        self.lax = lax
        self.requests: list[RecordedRequest] = []
        self.sent: list[bytes] = []  # each streamed answer's body, as sent
        self.closed = 0  # streamed answers whose client closed the connection mid-answer
        self.closed_event = asyncio.Event()
        self._release = asyncio.Event()
        self._ids = itertools.count(1)

    def release_held(self) -> None:
        self._release.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"].removeprefix("/v1")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        raw = bytearray()
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(RecordedRequest(scope["method"], path, headers, body, bytes(raw)))
        if headers.get("authorization") != f"Bearer {self.api_key}":
            await self._json(send, 401, error_body(401, "Incorrect API key provided."))
            return
        if "x-fake-status" in headers:
            status = int(headers["x-fake-status"])
            await self._json(send, status, error_body(status, f"Fake error {status}."))
            return
        if scope["method"] == "GET" and path == "/models":
            data = [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                for m in self.models
            ]
            await self._json(send, 200, orjson.dumps({"object": "list", "data": data}))
            return
        if scope["method"] != "POST" or path not in _HANDLERS or not isinstance(body, dict):
            await self._json(send, 404, error_body(404, f"Unknown request URL: {path}."))
            return
        answer = _Answer(self, path, headers, body, next(self._ids))
        await answer.run(receive, send)

    @staticmethod
    async def _json(send: Send, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*_JSON, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


_HANDLERS: Final = frozenset({"/chat/completions", "/completions", "/embeddings", "/responses"})


class _Answer:
    """One request's answer, shaped by the path and the steering headers."""

    def __init__(
        self, fake: FakeOpenAI, path: str, headers: dict[str, str], body: JSON, n: int
    ) -> None:
        self.fake, self.path, self.body = fake, path, body
        self.model = headers.get("x-fake-model") or str(body.get("model") or "gpt-4o-mini")
        self.scenario = frozenset(filter(None, headers.get("x-fake-scenario", "").split(",")))
        self.prompt = int(headers.get("x-fake-prompt-tokens", "12"))
        completion = headers.get("x-fake-completion-tokens", str(len(ANSWER_PIECES)))
        if completion == "cap":
            caps = ("max_completion_tokens", "max_tokens", "max_output_tokens")
            completion = str(next(body[name] for name in caps if body.get(name) is not None))
        self.completion = int(completion)
        self.cached = int(headers.get("x-fake-cached-tokens", "0"))
        self.reasoning = int(headers.get("x-fake-reasoning-tokens", "0"))
        self.audio_prompt = int(headers.get("x-fake-audio-prompt-tokens", "0"))
        self.audio_completion = int(headers.get("x-fake-audio-completion-tokens", "0"))
        self.delay = int(headers.get("x-fake-delay-ms", "0")) / 1000
        self.tool_calls = [t for t in headers.get("x-fake-tool-calls", "").split(",") if t]
        self.container = headers.get("x-fake-container", "cntr_fake")
        self.created = int(time.time())
        self.id = {
            "/chat/completions": f"chatcmpl-fake{n:06d}",
            "/completions": f"cmpl-fake{n:06d}",
            "/responses": f"resp_fake{n:06d}",
        }.get(path, "")

    def flag(self, value: object) -> bool:
        """A boolean of the request, read strictly (OpenAI) or laxly (vLLM)."""
        if not self.fake.lax or isinstance(value, bool):
            return value is True
        if isinstance(value, int | float):
            return value == 1
        return isinstance(value, str) and value.strip().lower() in _LAX_TRUE

    def tool_items(self, status: str = "completed") -> list[JSON]:
        items: list[JSON] = []
        for i, kind in enumerate(self.tool_calls):
            item: JSON = {"id": f"{kind}_{self.id}_{i}", "type": kind, "status": status}
            if kind == "code_interpreter_call":
                item["container_id"] = self.container
            items.append(item)
        return items

    # --- usage objects -------------------------------------------------------------

    def chat_usage(self) -> JSON:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {
                "cached_tokens": self.cached,
                "audio_tokens": self.audio_prompt,
            },
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": self.audio_completion,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def response_usage(self) -> JSON:
        return {
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": 0},
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.prompt + self.completion,
        }

    # --- bodies ----------------------------------------------------------------------

    def chat_completion(self) -> JSON:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(ANSWER_PIECES)},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self.chat_usage(),
            "system_fingerprint": "fp_fake",
        }

    def completion_body(self) -> JSON:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "text": "".join(ANSWER_PIECES),
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self.chat_usage(),
        }

    def embeddings(self) -> JSON:
        inputs = self.body.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.0, 0.5, -0.5]}
                for i in range(count)
            ],
            "model": self.model,
            "usage": {"prompt_tokens": self.prompt, "total_tokens": self.prompt},
        }

    def response(self, status: str, *, text: str = "", usage: bool = True) -> JSON:
        output = self.tool_items() if status != "in_progress" else []
        output += (
            [
                {
                    "id": f"msg_{self.id}",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
            if text
            else []
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": self.response_usage() if usage else None,
        }

    # --- answering ----------------------------------------------------------------------

    async def run(self, receive: Receive, send: Send) -> None:
        stream = self.flag(self.body.get("stream"))
        if self.path == "/embeddings":
            await FakeOpenAI._json(send, 200, orjson.dumps(self.embeddings()))
        elif not stream:
            if self.path == "/chat/completions":
                body = self.chat_completion()
            elif self.path == "/completions":
                body = self.completion_body()
            else:
                body = self.response("completed", text="".join(ANSWER_PIECES))
            await FakeOpenAI._json(send, 200, orjson.dumps(body))
        else:
            await send({"type": "http.response.start", "status": 200, "headers": list(_SSE)})
            if self.path == "/responses":
                events = self.response_events()
                # Held or failed after the first piece of text; cut before the usage.
                first = next(
                    i
                    for i, e in enumerate(events)
                    if e.startswith(b"event: response.output_text.delta\n")
                )
                await self._stream(events, receive, send, after=first, cut=len(events) - 1)
            else:
                events = self.chunks()
                await self._stream(events, receive, send, after=1, cut=len(ANSWER_PIECES) + 1)

    def chunks(self) -> list[bytes]:
        options = self.body.get("stream_options")
        include_usage = (
            isinstance(options, dict)
            and self.flag(options.get("include_usage"))
            and "no_usage" not in self.scenario
        )
        chat = self.path == "/chat/completions"
        base: JSON = {
            "id": self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
        }
        usage_null: JSON = {"usage": None} if include_usage else {}
        out: list[bytes] = []
        pieces = list(ANSWER_PIECES)
        for i, piece in enumerate(pieces):
            if chat:
                delta: JSON = {"content": piece}
                if i == 0:
                    delta = {"role": "assistant", "content": piece}
                choice: JSON = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            out.append(_data({**base, "choices": [choice], **usage_null}))
        last: JSON = (
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
        )
        out.append(_data({**base, "choices": [last], **usage_null}))
        if include_usage:
            out.append(_data({**base, "choices": [], "usage": self.chat_usage()}))
        out.append(b"data: [DONE]\n\n")
        return out

    def response_events(self) -> list[bytes]:
        """OpenAI's event sequence for a streamed response, which the official SDK's
        ``responses.stream()`` checks (issue 25): created, in_progress, each output
        item added and done (hosted tool calls, then the message with its text
        part and deltas), completed with the usage."""
        seq = itertools.count(0)
        item = f"msg_{self.id}"
        text = "".join(ANSWER_PIECES)

        def event(kind: str, **fields: Any) -> bytes:
            return _event(kind, {"type": kind, "sequence_number": next(seq), **fields})

        out = [
            event("response.created", response=self.response("in_progress", usage=False)),
            event("response.in_progress", response=self.response("in_progress", usage=False)),
        ]
        tools = self.tool_items()
        for index, call in enumerate(tools):
            out.append(
                event(
                    "response.output_item.added",
                    output_index=index,
                    item={**call, "status": "in_progress"},
                )
            )
            out.append(event("response.output_item.done", output_index=index, item=call))
        at: JSON = {"item_id": item, "output_index": len(tools), "content_index": 0}
        message: JSON = {"id": item, "type": "message", "role": "assistant"}
        out.append(
            event(
                "response.output_item.added",
                output_index=len(tools),
                item={**message, "status": "in_progress", "content": []},
            )
        )
        empty_part: JSON = {"type": "output_text", "text": "", "annotations": []}
        out.append(event("response.content_part.added", **at, part=empty_part))
        for piece in ANSWER_PIECES:
            out.append(event("response.output_text.delta", **at, delta=piece, logprobs=[]))
        part: JSON = {"type": "output_text", "text": text, "annotations": []}
        out.append(event("response.output_text.done", **at, text=text, logprobs=[]))
        out.append(event("response.content_part.done", **at, part=part))
        out.append(
            event(
                "response.output_item.done",
                output_index=len(tools),
                item={**message, "status": "completed", "content": [part]},
            )
        )
        out.append(event("response.completed", response=self.response("completed", text=text)))
        return out

    async def _stream(
        self, events: list[bytes], receive: Receive, send: Send, *, after: int, cut: int
    ) -> None:
        """Send ``events``; the scenarios act after event ``after`` (hold,
        error_midstream) or drop the connection before event ``cut`` (cut)."""
        sent = bytearray()
        self.fake.sent.append(b"")
        gone = asyncio.ensure_future(_closed(receive))
        try:
            for i, event in enumerate(events):
                if "cut" in self.scenario and i >= cut:
                    raise _Cut("scenario cut: the connection drops before the usage")
                if i and self.delay:
                    await asyncio.wait({gone}, timeout=self.delay)
                if gone.done():
                    # Like OpenAI: the client closed the stream, the answer stops.
                    self.fake.closed += 1
                    self.fake.closed_event.set()
                    return
                sent += event
                self.fake.sent[-1] = bytes(sent)
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if i == after and "error_midstream" in self.scenario:
                    error = error_body(
                        500, "The server had an error while processing your request."
                    )
                    await send({"type": "http.response.body", "body": b"data: " + error + b"\n\n"})
                    return
                if i == after and "hold" in self.scenario:
                    released = asyncio.ensure_future(self.fake._release.wait())
                    await asyncio.wait({gone, released}, return_when=asyncio.FIRST_COMPLETED)
                    released.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()


async def _closed(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _data(obj: JSON) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _event(kind: str, obj: JSON) -> bytes:
    return b"event: " + kind.encode() + b"\n" + _data(obj)
