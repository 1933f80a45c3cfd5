"""The fake Dify `gateway demo` runs in front of: Dify's chat endpoint, and nothing else.

``POST /chat-messages`` (with or without a ``/v1`` prefix) answers in Dify 1.x's wire
format (docs/upstreams/dify.md): streamed, a ``message`` event per piece of a fixed
Vietnamese greeting and a ``message_end`` whose ``metadata.usage`` carries the tokens and
price; blocking, one JSON answer with the same usage. It checks the app key as Dify does
and refuses in Dify's error shape (``{"code", "message", "status"}``).

The pieces of Dify's wire format defined here (the usage object, the error shape, the
message envelope) are the ones the test suite's fake Dify (tests/fakes/dify.py), which
plays the rest of the API and its failures, builds on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final

import orjson

from gateway.types import Receive, Scope, Send

__all__ = ["ANSWER_PIECES", "DemoDify", "DifyError", "Usage"]

JSON = dict[str, Any]
Headers = list[tuple[bytes, bytes]]

# Nine pieces so that a stop after k pieces bills exactly k * 15 of the default 135
# completion tokens; non-ASCII so chunk splits land inside UTF-8 characters.
ANSWER_PIECES: Final = (
    "Xin chào",
    "!",
    " Tôi",
    " có thể",
    " giúp",
    " gì",
    " cho bạn",
    " hôm nay",
    "?",
)

JSON_HEADERS: Final = ((b"content-type", b"application/json"),)
# Werkzeug adds the charset to every text/* mimetype, so this is what Dify sends.
SSE_HEADERS: Final = ((b"content-type", b"text/event-stream; charset=utf-8"),)
_CENT: Final = Decimal("0.0000001")  # Dify quantizes prices to 7 places


@dataclass(frozen=True, slots=True)
class Usage:
    """The usage Dify reports for an answer (``metadata.usage``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_price: Decimal
    completion_price: Decimal
    total_price: Decimal
    prompt_unit_price: Decimal
    completion_unit_price: Decimal
    price_unit: Decimal
    currency: str

    @classmethod
    def priced(
        cls,
        *,
        prompt_tokens: int = 1033,
        completion_tokens: int = 135,
        total_tokens: int | None = None,
        prompt_price: str = "0.0010330",
        completion_price: str = "0.0002700",
        total_price: str | None = None,
        prompt_unit_price: str = "0.001",
        completion_unit_price: str = "0.002",
        price_unit: str = "0.001",
        currency: str = "USD",
    ) -> Usage:
        """A usage whose totals are the sums unless given (a misbehaving upstream's are not)."""
        prompt, completion = Decimal(prompt_price), Decimal(completion_price)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens
            if total_tokens is None
            else total_tokens,
            prompt_price=prompt,
            completion_price=completion,
            total_price=prompt + completion if total_price is None else Decimal(total_price),
            prompt_unit_price=Decimal(prompt_unit_price),
            completion_unit_price=Decimal(completion_unit_price),
            price_unit=Decimal(price_unit),
            currency=currency,
        )

    def cut_to(self, produced: int, planned: int) -> Usage:
        """The usage of an answer stopped after `produced` of `planned` pieces."""
        tokens = self.completion_tokens * produced // planned
        price = (tokens * self.completion_unit_price * self.price_unit).quantize(
            _CENT, ROUND_HALF_UP
        )
        return replace(
            self,
            completion_tokens=tokens,
            total_tokens=self.prompt_tokens + tokens,
            completion_price=price,
            total_price=self.prompt_price + price,
        )

    def to_json(self, *, latency: float, first_token: float | None) -> JSON:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_unit_price": str(self.prompt_unit_price),
            "prompt_price_unit": str(self.price_unit),
            "prompt_price": str(self.prompt_price),
            "completion_tokens": self.completion_tokens,
            "completion_unit_price": str(self.completion_unit_price),
            "completion_price_unit": str(self.price_unit),
            "completion_price": str(self.completion_price),
            "total_tokens": self.total_tokens,
            "total_price": str(self.total_price),
            "currency": self.currency,
            "latency": latency,
            "time_to_first_token": first_token,
            "time_to_generate": None if first_token is None else latency - first_token,
        }


class DifyError(Exception):
    """A refusal, answered in Dify's error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> bytes:
        return orjson.dumps({"code": self.code, "message": self.message, "status": self.status})

    async def send(self, send: Send) -> None:
        extra = [(b"www-authenticate", b'Bearer realm="api"')] if self.status == 401 else []
        await send_json(send, self.status, self.body(), extra)


def response_headers(base: Sequence[tuple[bytes, bytes]], length: int | None = None) -> Headers:
    headers = list(base)
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return headers


async def send_json(
    send: Send, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    headers = response_headers(JSON_HEADERS, len(body)) + list(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def read_body(receive: Receive) -> bytes | None:
    """The request's whole body, or None when the client left before sending it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def serve_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def request_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def strip_v1(path: str) -> str:
    return path[3:] if path.startswith("/v1/") else path


def check_key(headers: dict[str, str], api_key: str | None) -> None:
    """Dify's app key check (none when `api_key` is None)."""
    if api_key is None:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise DifyError(
            401, "unauthorized", "Authorization header must be provided and start with 'Bearer'"
        )
    if token.strip() != api_key:
        raise DifyError(401, "unauthorized", "Access token is invalid")


def not_served(path: str, *, other_method: bool) -> DifyError:
    """The 404 of a path not served (405 if it is, for another method)."""
    status, code = (405, "method_not_allowed") if other_method else (404, "not_found")
    return DifyError(status, code, f"The requested URL {path} is not served here.")


def require_user(value: object) -> str:
    if not isinstance(value, str) or not value:
        # Dify's validate_app_token raises ValueError, which its API maps to 400.
        raise DifyError(400, "invalid_param", "Arg user must be provided.")
    return value


def message_head(
    event: str, *, conversation_id: str | None, message_id: str, created_at: int, task_id: str
) -> JSON:
    """The fields a chat or completion answer's events open with (no conversation for a
    completion)."""
    head: JSON = {"event": event}
    if conversation_id is not None:
        head["conversation_id"] = conversation_id
    head |= {"message_id": message_id, "created_at": created_at}
    return head | {"task_id": task_id, "id": message_id}


def message_end(head: JSON, usage: JSON, extra_metadata: JSON) -> JSON:
    metadata = {"usage": usage, "retriever_resources": []} | extra_metadata
    return head | {"metadata": metadata, "files": None}


def blocking_message(head: JSON, *, mode: str, answer: str, metadata: JSON) -> JSON:
    """A blocking answer's body, from its ``message`` event's head."""
    body: JSON = {"event": "message", "task_id": head["task_id"], "id": head["id"]}
    body["message_id"] = head["message_id"]
    if "conversation_id" in head:
        body["conversation_id"] = head["conversation_id"]
    return body | {
        "mode": mode,
        "answer": answer,
        "metadata": metadata,
        "created_at": head["created_at"],
    }


def sse_frame(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class DemoDify:
    """Dify's ``POST /chat-messages``, answering every question with the same greeting."""

    def __init__(self, *, api_key: str, delay: float = 0.05) -> None:
        self.api_key = api_key
        self.delay = delay  # between two streamed pieces
        self.usage = Usage.priced()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if body is None:
            return
        try:
            path = strip_v1(scope["path"])
            if path != "/chat-messages" or scope["method"] != "POST":
                raise not_served(scope["path"], other_method=path == "/chat-messages")
            check_key(request_headers(scope), self.api_key)
            await self._answer(_json_object(body), send)
        except DifyError as exc:
            await exc.send(send)

    async def _answer(self, request: JSON, send: Send) -> None:
        require_user(request.get("user"))
        started = time.monotonic()
        conversation = request.get("conversation_id")
        if not isinstance(conversation, str) or not conversation:
            conversation = str(uuid.uuid4())  # a new conversation
        head = message_head(
            "message",
            conversation_id=conversation,
            message_id=str(uuid.uuid4()),
            created_at=int(time.time()),
            task_id=str(uuid.uuid4()),
        )
        streaming = request.get("response_mode") == "streaming"
        if streaming:
            start = {"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)}
            await send(start)
        for i, piece in enumerate(ANSWER_PIECES):
            if i and streaming:
                await asyncio.sleep(self.delay)  # the pace of a model writing its answer
            if streaming:
                frame = sse_frame(head | {"answer": piece})
                await send({"type": "http.response.body", "body": frame, "more_body": True})
        latency = time.monotonic() - started
        usage = self.usage.to_json(latency=latency, first_token=0.0)
        end = message_end(head | {"event": "message_end"}, usage, {})
        if streaming:
            await send({"type": "http.response.body", "body": sse_frame(end), "more_body": False})
            return
        answer = "".join(ANSWER_PIECES)
        body = blocking_message(head, mode="chat", answer=answer, metadata=end["metadata"])
        await send_json(send, 200, orjson.dumps(body))


def _json_object(body: bytes) -> JSON:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise DifyError(400, "invalid_param", "The request body must be a JSON object.")
    return parsed
