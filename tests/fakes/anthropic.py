"""A fake Anthropic Messages API as a plain ASGI app, for the test suite.

It speaks the wire format of docs/upstreams/anthropic.md: ``POST /messages``
(blocking: one ``message`` object; streamed: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta``...,
``content_block_stop``, ``message_delta``, ``message_stop``),
``POST /messages/count_tokens``, ``GET /models`` and ``GET /models/{id}``, and
Anthropic's error shape (``{"type": "error", "error": {"type", "message"}}``,
as a body or an ``error`` event). Like the API it wants the key in
``x-api-key`` and an ``anthropic-version`` header. Paths are served with or
without a ``/v1`` prefix.

Tests steer it per request with headers:

- ``x-fake-input-tokens``, ``x-fake-output-tokens``, ``x-fake-cache-read-tokens``,
  ``x-fake-cache-creation-tokens``: the usage it reports;
  ``x-fake-cache-creation-1h-tokens``: how many of the cache writes went to a
  1-hour cache (``usage.cache_creation``, split by lifetime as Anthropic reports
  it: in the message's usage and message_start's, not in message_delta's, whose
  type in the SDK has no ``cache_creation``);
- ``x-fake-web-searches``: web searches it says it ran (``server_tool_use`` blocks
  and ``usage.server_tool_use.web_search_requests``);
- ``x-fake-tool-use``: answer with a call of this tool (a ``tool_use`` block whose
  input streams as ``input_json_delta``), stop reason ``tool_use``;
- ``x-fake-model``: the model it says answered (default: the one asked for);
- ``x-fake-delay-ms``: the pause between two streamed events;
- ``x-fake-status``: answer with this HTTP error status, in Anthropic's shape;
- ``x-fake-scenario``: ``cut`` (the connection drops after the text, before
  ``message_delta``), ``error_midstream`` (an ``overloaded_error`` event after the
  first piece of text), ``hold`` (pause after the first piece until the client
  closes the connection or `release_held` is called).

Like Anthropic, an answer stops being generated when its client closes the
connection; ``closed`` counts such answers. What it shares with the fake OpenAI is
in model_api.py.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import parse_qsl

import orjson

from gateway.types import Receive, Scope, Send
from tests.fakes.model_api import ANSWER_PIECES, FakeModelAPI, event, send_json

__all__ = ["ANSWER_PIECES", "TOOL_INPUT", "FakeAnthropic"]

JSON = dict[str, Any]

TOOL_INPUT: Final = {"location": "Hà Nội", "unit": "celsius"}
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps(
        {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}
    )


class FakeAnthropic(FakeModelAPI):
    def __init__(self, *, api_key: str, models: tuple[str, ...] = ("claude-sonnet-4-5",)) -> None:
        super().__init__(api_key=api_key, models=models)
        # Every x-api-key header of each request, in order (``requests`` keeps the last).
        self.key_headers: list[list[str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, headers, body = await self.record(scope, receive)
        self.key_headers.append(
            [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-api-key"]
        )
        if headers.get("x-api-key") != self.api_key:
            await send_json(send, 401, error_body(401, "invalid x-api-key"))
            return
        if "anthropic-version" not in headers:
            await send_json(send, 400, error_body(400, "anthropic-version: header is required"))
            return
        if "x-fake-status" in headers:
            status = int(headers["x-fake-status"])
            await send_json(send, status, error_body(status, f"Fake error {status}."))
            return
        method = scope["method"]
        if method == "GET" and (path == "/models" or path.startswith("/models/")):
            await self._models(send, path, scope.get("query_string", b""))
            return
        if method == "POST" and path == "/messages/count_tokens" and isinstance(body, dict):
            await send_json(send, 200, orjson.dumps({"input_tokens": 14}))
            return
        if method != "POST" or path != "/messages" or not isinstance(body, dict):
            await send_json(send, 404, error_body(404, "Not found"))
            return
        if not isinstance(body.get("max_tokens"), int):
            await send_json(send, 400, error_body(400, "max_tokens: Field required"))
            return
        await _Answer(self, headers, body, next(self._ids)).run(receive, send)

    async def _models(self, send: Send, path: str, query: bytes) -> None:
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m,
                "created_at": "2025-09-29T00:00:00Z",
            }
            for m in self.models
        ]
        if path == "/models":
            # Paged as Anthropic pages it: ``limit`` 1 to 1000 (default 20), and
            # the page after ``after_id`` or before ``before_id``.
            params = dict(parse_qsl(query.decode()))
            limit = int(params.get("limit", "20"))
            if not 1 <= limit <= 1000:
                await send_json(send, 400, error_body(400, "limit: out of range"))
                return
            ids = [model["id"] for model in data]
            if "before_id" in params:
                end = ids.index(params["before_id"])
                start = max(0, end - limit)
                shown, more = data[start:end], start > 0
            else:
                start = ids.index(params["after_id"]) + 1 if "after_id" in params else 0
                shown, more = data[start : start + limit], start + limit < len(data)
            page = {
                "data": shown,
                "has_more": more,
                "first_id": shown[0]["id"] if shown else None,
                "last_id": shown[-1]["id"] if shown else None,
            }
            await send_json(send, 200, orjson.dumps(page))
            return
        wanted = path.removeprefix("/models/")
        for model in data:
            if model["id"] == wanted:
                await send_json(send, 200, orjson.dumps(model))
                return
        await send_json(send, 404, error_body(404, f"model: {wanted}"))


class _Answer:
    """One request's answer, shaped by the steering headers."""

    def __init__(self, fake: FakeAnthropic, headers: dict[str, str], body: JSON, n: int) -> None:
        self.fake, self.headers, self.body = fake, headers, body
        self.model = headers.get("x-fake-model") or str(body.get("model") or "claude-sonnet-4-5")
        self.input = int(headers.get("x-fake-input-tokens", "12"))
        self.output = int(headers.get("x-fake-output-tokens", str(len(ANSWER_PIECES))))
        self.cache_read = int(headers.get("x-fake-cache-read-tokens", "0"))
        self.cache_creation = int(headers.get("x-fake-cache-creation-tokens", "0"))
        self.cache_creation_1h = int(headers.get("x-fake-cache-creation-1h-tokens", "0"))
        self.searches = int(headers.get("x-fake-web-searches", "0"))
        self.tool = headers.get("x-fake-tool-use")
        self.id = f"msg_fake{n:020d}"

    def usage(self, *, output: int) -> JSON:
        return {
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": max(self.cache_creation - self.cache_creation_1h, 0),
                "ephemeral_1h_input_tokens": self.cache_creation_1h,
            },
            "output_tokens": output,
            "server_tool_use": {"web_search_requests": self.searches, "web_fetch_requests": 0}
            if self.searches
            else None,
            "service_tier": "standard",
        }

    def blocks(self) -> list[JSON]:
        """The answer's content blocks, complete."""
        out: list[JSON] = []
        for i in range(self.searches):
            tool_id = f"srvtoolu_fake{i:04d}"
            out.append(
                {
                    "type": "server_tool_use",
                    "id": tool_id,
                    "name": "web_search",
                    "input": {"query": "thời tiết"},
                }
            )
            out.append(
                {
                    "type": "web_search_tool_result",
                    "tool_use_id": tool_id,
                    "content": [
                        {
                            "type": "web_search_result",
                            "url": "https://example.com/",
                            "title": "Example",
                            "encrypted_content": "ZmFrZQ==",
                            "page_age": None,
                        }
                    ],
                }
            )
        out.append({"type": "text", "text": "".join(ANSWER_PIECES)})
        if self.tool is not None:
            out.append(
                {"type": "tool_use", "id": "toolu_fake0001", "name": self.tool, "input": TOOL_INPUT}
            )
        return out

    def message(self, *, content: list[JSON], stop_reason: str | None, output: int) -> JSON:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": self.usage(output=output),
        }

    @property
    def stop_reason(self) -> str:
        return "tool_use" if self.tool is not None else "end_turn"

    async def run(self, receive: Receive, send: Send) -> None:
        if self.body.get("stream") is not True:
            body = self.message(
                content=self.blocks(), stop_reason=self.stop_reason, output=self.output
            )
            await send_json(send, 200, orjson.dumps(body))
            return
        events, first_text, before_delta = self.events()
        error = event("error", orjson.loads(error_body(529, "Overloaded")))
        await self.fake.stream(
            events,
            receive,
            send,
            headers=self.headers,
            after=first_text,
            cut=before_delta,
            error=error,
        )

    def events(self) -> tuple[list[bytes], int, int]:
        """The stream's events; the index of the first text delta and of message_delta."""
        start = self.message(content=[], stop_reason=None, output=1)
        # As Anthropic: no server tool has run yet when the message starts; the
        # searches are counted in message_delta's usage only.
        start["usage"]["server_tool_use"] = None
        out = [event("message_start", {"type": "message_start", "message": start})]
        first_text = 0
        for index, block in enumerate(self.blocks()):
            kind = block["type"]
            start = dict(block)
            if kind == "text":
                start["text"] = ""
            elif kind in ("tool_use", "server_tool_use"):
                start["input"] = {}
            out.append(
                event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": start},
                )
            )
            if index == 0:
                out.append(event("ping", {"type": "ping"}))
            if kind == "text":
                for piece in ANSWER_PIECES:
                    if not first_text:
                        first_text = len(out)
                    out.append(_delta(index, {"type": "text_delta", "text": piece}))
            elif kind in ("tool_use", "server_tool_use"):
                text = orjson.dumps(block["input"]).decode()
                for part in (text[: len(text) // 2], text[len(text) // 2 :]):
                    out.append(_delta(index, {"type": "input_json_delta", "partial_json": part}))
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": index}))
        before_delta = len(out)
        usage = self.usage(output=self.output)
        del usage["cache_creation"]  # not in the SDK's MessageDeltaUsage
        out.append(
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                    "usage": usage,
                },
            )
        )
        out.append(event("message_stop", {"type": "message_stop"}))
        return out, first_text, before_delta


def _delta(index: int, delta: JSON) -> bytes:
    return event(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )
