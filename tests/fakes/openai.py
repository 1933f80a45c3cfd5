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
- ``x-fake-usage-extra``: a JSON object merged into the usage object it reports,
  as an LLM router in front of Claude adds Anthropic's cache counts
  (``cache_creation_input_tokens``, ``prompt_tokens_details`` with
  ``cache_creation_tokens``...);
- ``x-fake-model``: the model it says answered (default: the one asked for);
- ``x-fake-id``: the answer's id (default: one of its own for each answer), as
  an upstream that repeats ids does;
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
  `release_held` is called; a blocking answer is held before its headers),
  ``perplexity`` (a chat completion shaped as Perplexity's Sonar models answer:
  ``citations`` and ``search_results`` beside the answer, and a usage object with
  Perplexity's search fields - ``search_context_size``, ``num_search_queries``,
  ``citation_tokens``, a ``cost`` breakdown - on every streamed chunk, with no
  usage-only chunk, whatever ``include_usage`` says).

Like OpenAI, an answer stops being generated when its client closes the
connection (there is no stop endpoint); ``closed`` counts such answers. What it
shares with the fake Anthropic is in model_api.py.

``FakeOpenAI(lax=True)`` reads booleans as lax compatible servers do (vLLM and
other pydantic servers): ``1``, ``"true"``, ``"yes"``, ``"on"`` are true.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Final

import orjson

from gateway.types import Receive, Scope, Send
from tests.fakes.model_api import (
    ANSWER_PIECES,
    FakeModelAPI,
    RecordedRequest,
    data,
    scenario,
    send_json,
)
from tests.fakes.model_api import event as sse_event

__all__ = ["ANSWER_PIECES", "FakeOpenAI", "RecordedRequest"]

JSON = dict[str, Any]

_ERROR_TYPES: Final = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
}


def error_body(status: int, message: str, *, code: str | None = None) -> bytes:
    kind, default_code = _ERROR_TYPES.get(status, ("invalid_request_error", None))
    return orjson.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code or default_code}}
    )


# What pydantic's lax mode reads as true (vLLM's request models are pydantic).
_LAX_TRUE: Final = frozenset({"1", "true", "yes", "on", "t", "y"})


class FakeOpenAI(FakeModelAPI):
    def __init__(
        self, *, api_key: str, models: tuple[str, ...] = ("gpt-4o-mini",), lax: bool = False
    ) -> None:
        super().__init__(api_key=api_key, models=models)
        self.lax = lax

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, headers, body = await self.record(scope, receive)
        if headers.get("authorization") != f"Bearer {self.api_key}":
            await send_json(send, 401, error_body(401, "Incorrect API key provided."))
            return
        if "x-fake-status" in headers:
            status = int(headers["x-fake-status"])
            await send_json(send, status, error_body(status, f"Fake error {status}."))
            return
        if scope["method"] == "GET" and path == "/models":
            data = [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                for m in self.models
            ]
            await send_json(send, 200, orjson.dumps({"object": "list", "data": data}))
            return
        if scope["method"] != "POST" or path not in _HANDLERS or not isinstance(body, dict):
            await send_json(send, 404, error_body(404, f"Unknown request URL: {path}."))
            return
        answer = _Answer(self, path, headers, body, next(self._ids))
        await answer.run(receive, send)


_HANDLERS: Final = frozenset({"/chat/completions", "/completions", "/embeddings", "/responses"})


class _Answer:
    """One request's answer, shaped by the path and the steering headers."""

    def __init__(
        self, fake: FakeOpenAI, path: str, headers: dict[str, str], body: JSON, n: int
    ) -> None:
        self.fake, self.path, self.headers, self.body = fake, path, headers, body
        self.model = headers.get("x-fake-model") or str(body.get("model") or "gpt-4o-mini")
        self.scenario = scenario(headers)
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
        self.tool_calls = [t for t in headers.get("x-fake-tool-calls", "").split(",") if t]
        self.container = headers.get("x-fake-container", "cntr_fake")
        self.usage_extra: JSON = orjson.loads(headers.get("x-fake-usage-extra", "{}"))
        self.created = int(time.time())
        self.id = headers.get("x-fake-id") or {
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
        if "perplexity" in self.scenario:
            return {**self._perplexity_usage(), **self.usage_extra}
        return {**self._chat_usage(), **self.usage_extra}

    def _perplexity_usage(self) -> JSON:
        # docs.perplexity.ai/api-reference/chat-completions-post: its usage, cost
        # in USD (here a sonar request at a "low" search context: $5 per 1,000).
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "search_context_size": "low",
            "citation_tokens": None,
            "num_search_queries": 1,
            "reasoning_tokens": self.reasoning or None,
            "cost": {
                "input_tokens_cost": self.prompt / 1_000_000,
                "output_tokens_cost": self.completion / 1_000_000,
                "request_cost": 0.005,
                "total_cost": (self.prompt + self.completion) / 1_000_000 + 0.005,
            },
        }

    def usage_so_far(self, pieces: int) -> JSON:
        """A Perplexity chunk's usage: the completion tokens written so far."""
        written = min(pieces, self.completion)
        return {
            **self.chat_usage(),
            "completion_tokens": written,
            "total_tokens": self.prompt + written,
        }

    def _search_fields(self) -> JSON:
        if "perplexity" not in self.scenario:
            return {}
        url = "https://example.com/news"
        return {
            "citations": [url],
            "search_results": [{"title": "News", "url": url, "date": None}],
        }

    def _chat_usage(self) -> JSON:
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
        return {**self._response_usage(), **self.usage_extra}

    def _response_usage(self) -> JSON:
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
            **self._search_fields(),
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
            await send_json(send, 200, orjson.dumps(self.embeddings()))
        elif not stream:
            if "hold" in self.scenario:
                await self.fake.held(receive)
            if self.path == "/chat/completions":
                body = self.chat_completion()
            elif self.path == "/completions":
                body = self.completion_body()
            else:
                body = self.response("completed", text="".join(ANSWER_PIECES))
            await send_json(send, 200, orjson.dumps(body))
        elif self.path == "/responses":
            events = self.response_events()
            # Held or failed after the first piece of text; cut before the usage.
            first = next(
                i
                for i, e in enumerate(events)
                if e.startswith(b"event: response.output_text.delta\n")
            )
            await self._stream(events, receive, send, after=first, cut=len(events) - 1)
        else:
            await self._stream(self.chunks(), receive, send, after=1, cut=len(ANSWER_PIECES) + 1)

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
        perplexity = "perplexity" in self.scenario and chat
        if perplexity:
            # Perplexity sends the usage so far on every chunk, and no chunk of its own.
            include_usage = False
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
            if perplexity:
                usage_null = {"usage": self.usage_so_far(i + 1), **self._search_fields()}
            out.append(data({**base, "choices": [choice], **usage_null}))
        if perplexity:
            usage_null = {"usage": self.chat_usage(), **self._search_fields()}
        last: JSON = (
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
        )
        out.append(data({**base, "choices": [last], **usage_null}))
        if include_usage:
            out.append(data({**base, "choices": [], "usage": self.chat_usage()}))
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
            return sse_event(kind, {"type": kind, "sequence_number": next(seq), **fields})

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
        error = error_body(500, "The server had an error while processing your request.")
        await self.fake.stream(
            events,
            receive,
            send,
            headers=self.headers,
            after=after,
            cut=cut,
            error=b"data: " + error + b"\n\n",
        )
