"""The OpenAI-compatible dialect: OpenAI itself, and servers that speak its API.

Metered: ``/chat/completions`` and ``/completions`` (blocking or streamed),
``/embeddings`` and ``/responses`` (blocking or streamed). Usage comes from the
upstream's own answer (docs/upstreams/openai.md): to get it in a streamed chat completion,
the gateway sets ``stream_options.include_usage`` and, when the client had not
asked for it, hides the extra usage chunk from the client. OpenAI reports tokens
only; the cost comes from the ``[prices]`` table.

Every other route is declared in openai_routes.py with its role (default deny):
``GET /models`` passes through, a stored response or chat completion is
forwarded only to the user whose answer created it, and everything else (files,
fine-tuning, images, audio, batches...) is refused. Background responses are
refused too: their usage never passes through the request.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Final

import orjson

from gateway.bounds import DEFAULT_MAX_TOKENS_PER_ANSWER
from gateway.errors import BadRequest, Forbidden
from gateway.pricing import PriceTable
from gateway.sse import ServerSentEvent
from gateway.upstreams import openai_routes
from gateway.upstreams.base import Prepared, Route, StreamMeter
from gateway.upstreams.openai_routes import object_id_meter, with_object_id
from gateway.upstreams.openai_wire import (
    ChatStreamMeter,
    ResponsesStreamMeter,
    has_usage_object,
    is_usage_only,
    meter_body,
    prompt_chars,
)
from gateway.upstreams.transforms import DropEvents
from gateway.usage import Metered, Usage, estimate_tokens

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["OpenAIUpstream"]

# The route table lives in openai_routes.py (default deny, issue 20).
_CHAT: Final = openai_routes.CHAT
_COMPLETION: Final = openai_routes.COMPLETION
# Operator-only routes never reach prepare (the proxy refuses them); prepare still
# refuses one, should it ever be handed one.
_REFUSED: Final = openai_routes.OPERATOR
# Streams whose usage needs stream_options.include_usage.
_USAGE_OPTION_KINDS: Final = frozenset({"chat", "completion"})
# The memo that tells stream_transform the usage chunk is the gateway's own.
_HIDE_USAGE: Final = "hide-usage-chunk"

# OpenAI's error "type" per status, as its API sends them.
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "insufficient_quota",
}


class _PricedMeter:
    """A stream meter whose result is priced from the table when it finishes."""

    __slots__ = ("_dialect", "_meter", "_model")

    def __init__(
        self,
        meter: ChatStreamMeter | ResponsesStreamMeter,
        dialect: OpenAIUpstream,
        model: str | None,
    ) -> None:
        self._meter, self._dialect, self._model = meter, dialect, model

    @property
    def task_id(self) -> str | None:
        return None  # no stop endpoint: an answer is stopped by closing its stream

    def feed(self, event: ServerSentEvent) -> None:
        self._meter.feed(event)

    def finish(self, *, cut: bool) -> Metered:
        return self._dialect.priced(self._meter.finish(cut=cut), self._model)


def _requested_model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) and model else None


class OpenAIUpstream:
    """The OpenAI API (``https://api.openai.com/v1``) and compatible servers."""

    __slots__ = ("_max_tokens", "_prices")

    kind = "openai"
    user_field = "user"
    stops_by_closing = True  # OpenAI stops generating when the client closes

    def __init__(self, config: Config | None = None) -> None:
        self._prices = PriceTable(config.prices if config is not None else {})
        self._max_tokens = (
            config.accounting.max_tokens_per_answer
            if config is not None
            else DEFAULT_MAX_TOKENS_PER_ANSWER
        )

    # --- requests ------------------------------------------------------------------

    def route(self, method: str, path: str) -> Route:
        return openai_routes.openai_route(method, path)

    def refine(self, route: Route, body: dict[str, Any] | None) -> Route:
        return openai_routes.refine_response(route, body)

    def prepare(
        self,
        route: Route,
        body: dict[str, Any] | None,
        query: bytes,
        user_id: str,
        *,
        method: str,
        request_id: str,
    ) -> Prepared:
        if route is _REFUSED:
            raise Forbidden(
                "This endpoint is not available through the gateway: its usage cannot be metered.",
                code="endpoint_not_metered",
            )
        if body is None:
            return Prepared(None, query)
        # The end user as OpenAI reads it, so nobody can act as someone else there:
        # "user", and its successor "safety_identifier" when the client sent one
        # (not every endpoint, nor every compatible server, takes the newer field).
        body["user"] = user_id
        if "safety_identifier" in body:
            body["safety_identifier"] = user_id
        memo = None
        if route.kind == "response" and body.get("background") is True:
            # A background response is answered later, to whoever polls for it:
            # its usage never passes through this request.
            raise BadRequest(
                "Background responses are not available through the gateway.",
                code="background_not_supported",
            )
        if route.kind in _USAGE_OPTION_KINDS and body.get("stream") is True:
            memo = _ask_for_usage(body)
        return Prepared(body, query, memo=memo)

    def is_streaming(self, route: Route, body: dict[str, Any]) -> bool:
        return body.get("stream") is True

    # --- answers -------------------------------------------------------------------

    def stream_meter(self, route: Route, body: dict[str, Any]) -> StreamMeter:
        meter: ChatStreamMeter | ResponsesStreamMeter
        if route.kind == "response":
            meter = ResponsesStreamMeter(body)
        else:
            meter = ChatStreamMeter(body)
        # Recorded under the object id a stored answer gets (openai_routes.py).
        return object_id_meter(route, body, _PricedMeter(meter, self, _requested_model(body)))

    def stream_transform(self, route: Route, prepared: Prepared) -> DropEvents | None:
        if prepared.memo != _HIDE_USAGE:
            return None
        # The client did not ask for the usage chunk: it gets the stream without it.
        return DropEvents(is_usage_only, may_drop=has_usage_object)

    def meter_blocking(self, route: Route, body: dict[str, Any], response: bytes) -> Metered:
        metered = self.priced(meter_body(body, response), _requested_model(body))
        return with_object_id(route, body, response, metered)  # openai_routes.py

    def unanswered(self, route: Route, body: dict[str, Any]) -> Metered:
        prompt = estimate_tokens(prompt_chars(body))
        usage = Usage(prompt_tokens=prompt, total_tokens=prompt, estimated=True)
        model = _requested_model(body)
        return self.priced(Metered(None, None, None, usage, "timeout", model=model), model)

    def priced(self, metered: Metered, requested: str | None) -> Metered:
        """``metered`` with its cost from the price table: by the model that
        answered, else the one asked for. The model recorded is the one that
        answered, or the one asked for when the upstream named none."""
        model = metered.model or requested
        usage = metered.usage
        if usage is not None:
            usage, _ = self._prices.priced(
                usage, metered.model, requested, max_tokens=self._max_tokens
            )
        if usage is metered.usage and model == metered.model:
            return metered
        return dataclasses.replace(metered, usage=usage, model=model)

    def filter_history(
        self, route: Route, query: bytes, page: dict[str, Any], cutoff: float
    ) -> dict[str, Any]:
        return page  # no route of this API is a history page

    def stop_request(self, route: Route, task_id: str, user_id: str) -> tuple[str, bytes] | None:
        return None  # stops_by_closing

    # --- errors --------------------------------------------------------------------

    def error_body(self, status: int, code: str, message: str) -> bytes:
        kind = _ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        return orjson.dumps(
            {"error": {"message": message, "type": kind, "param": None, "code": code}}
        )

    def stream_error(self, status: int, code: str, message: str) -> bytes:
        # The SDKs raise on a data line holding an "error" object, in any stream.
        return b"data: " + self.error_body(status, code, message) + b"\n\n"


def _ask_for_usage(body: dict[str, Any]) -> str | None:
    """Make a streamed chat completion end with its usage; returns the memo that
    tells whether the client must not see the usage chunk."""
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return _HIDE_USAGE
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object.", code="invalid_param")
    if options.get("include_usage") is True:
        return None
    options["include_usage"] = True
    return _HIDE_USAGE
