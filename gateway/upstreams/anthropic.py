"""The Anthropic dialect: Claude's Messages API (``https://api.anthropic.com/v1``).

Metered: ``POST /messages``, blocking or streamed. Usage comes from the answer
itself (anthropic_wire.py): ``message_start`` and ``message_delta`` in a stream,
the message's ``usage`` in a body. Anthropic reports tokens only; the cost comes
from ``[prices]`` (cache reads at ``cached_input``, cache writes at
``cache_write_input``, a 1-hour cache's at ``cache_write_1h_input``) plus the
server tools an answer ran (web search...) from
``[call_prices."anthropic.<tool>"]``. A request for a model or a server tool
without a price, one whose ``stream`` is not a JSON boolean, or one without a
positive integer ``max_tokens`` (the API requires it) is refused before admission.

Clients authenticate with their gateway key in ``x-api-key`` (what Anthropic's
SDKs send) or as a bearer token; the upstream gets the operator's key in
``x-api-key``. The end user is written into ``metadata.user_id``. Every other
route is declared in anthropic_routes.py with its role (default deny).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlencode

import orjson

from gateway.errors import BadRequest, Forbidden
from gateway.model_access import shown_model
from gateway.sse import ServerSentEvent
from gateway.upstreams import anthropic_routes
from gateway.upstreams.anthropic_wire import (
    MessageStreamMeter,
    ServerCalls,
    meter_message,
    prompt_chars,
    refuse_compaction,
    refuse_unpriced_betas,
)
from gateway.upstreams.base import (
    Headers,
    Prepared,
    Route,
    StreamMeter,
    drop_router_fields,
    is_online,
    keep_models,
    mcp_option,
    merge_model_lists,
    refuse_model_tool,
    refuse_option,
    refuse_plugin,
    searches_every_answer,
)
from gateway.upstreams.cache_ttl import asks_for_one_hour_cache, check_cache_ttls
from gateway.upstreams.terms import calls_cost, pricing_terms
from gateway.usage import Metered, Usage, estimate_tokens

if TYPE_CHECKING:
    from gateway.config import Config, UpstreamConfig

__all__ = ["AnthropicUpstream"]

log = logging.getLogger(__name__)

# GET /models pages (Anthropic's list is paged: ``limit`` 1 to 1000, default
# 20, and a cursor). On a shared mount the gateway reads each upstream's whole
# list in pages of the largest size, then pages the merged list itself.
_MODEL_PAGING: Final = frozenset({"limit", "after_id", "before_id"})
_MODEL_PAGE_DEFAULT: Final = 20
_MODEL_PAGE_MAX: Final = 1000

# Tools the client runs (its own "custom" tools, and Anthropic's client tools:
# bash, the text editor, computer use, memory) cost nothing past the answer's
# tokens. Every other tool type is a server tool Anthropic runs and may bill
# per use: priced in [call_prices."anthropic.<tool>"] or refused.
_CLIENT_TOOLS: Final = frozenset({"custom", "bash", "text_editor", "computer", "memory"})
# A tool type's version ("web_search_20250305") is priced as its tool.
_TOOL_VERSION: Final = re.compile(r"_20[0-9]{6}$")
# The server tools whose calls the usage counts (usage.server_tool_use); any
# other paid server tool an answer lists is charged one call per answer.
_COUNTED_TOOLS: Final = frozenset({"web_search", "web_fetch"})
# The server tool counted against web_searches_per_day (review-sec F4).
_WEB_SEARCH: Final = "web_search"

# Review-sec F2: what a request may ask for that Anthropic bills at the model's
# standard rates, which [prices] holds. ``service_tier`` "auto" (Anthropic's
# default: Priority Tier capacity when the organisation bought some, drawn from
# its commitment at the same per-token prices) and "standard_only" change no
# rate; ``speed`` "fast" (fast mode, up to 6x) and ``inference_geo`` "us"
# (US-only inference, 1.1x) do, and are refused, as are values the gateway does
# not know.
_PRICED_OPTIONS: Final = {
    "service_tier": frozenset({"auto", "standard_only"}),
    "speed": frozenset({"standard"}),
    "inference_geo": frozenset({"global"}),
}
# OpenRouter's options on its Anthropic-compatible endpoint: paid plugins, the
# host, fallback models and their order (`_check_router_options`).
_ROUTER_OPTIONS: Final = ("plugins", "provider", "models", "route")
# Where Anthropic reads a prompt cache's ``cache_control`` (and its ttl:
# cache_ttl.py), besides the top level.
_CACHED_PARTS: Final = ("system", "messages", "tools")
# Values the client or the model chose that are not content blocks: a tool's
# JSON Schema, a tool call's arguments.
_NOT_BLOCKS: Final = frozenset({"input_schema", "input"})

# Anthropic's error "type" per status (its API reference, "Errors").
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _requested_model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) and model else None


def _tool_name(tool: object) -> str | None:
    """A request tool's name as the gateway prices it: its type without the
    version date; "custom" for a tool without a type (the client's own)."""
    if not isinstance(tool, dict):
        return None
    kind = tool.get("type")
    if kind is None:
        return "custom"
    return _TOOL_VERSION.sub("", kind) if isinstance(kind, str) else None


def _tool_models(body: dict[str, Any]) -> list[tuple[str, object]]:
    """The server tools a Messages request lists that run a model of their own
    (the tool's ``model``: Anthropic's advisor), as (tool name, model)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    return [
        (name, tool.get("model"))
        for tool in tools
        if isinstance(tool, dict)
        and "model" in tool
        and (name := _tool_name(tool)) is not None
        and name not in _CLIENT_TOOLS
    ]


def _paid_tools(body: dict[str, Any]) -> list[str]:
    """The server tools a Messages request lists (those the client does not run)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    names = (_tool_name(tool) for tool in tools)
    return [name for name in names if name is not None and name not in _CLIENT_TOOLS]


class _PricedMeter:
    """A stream meter whose result is priced when it finishes."""

    __slots__ = ("_body", "_dialect", "_meter")

    def __init__(
        self, meter: MessageStreamMeter, dialect: AnthropicUpstream, body: dict[str, Any]
    ) -> None:
        self._meter, self._dialect, self._body = meter, dialect, body

    @property
    def task_id(self) -> str | None:
        return None  # no stop endpoint: an answer is stopped by closing its stream

    def feed(self, event: ServerSentEvent) -> None:
        self._meter.feed(event)

    def finish(self, *, cut: bool) -> Metered:
        metered = self._meter.finish(cut=cut)
        return self._dialect.priced(metered, self._body, self._meter.calls)


class AnthropicUpstream:
    """Anthropic's Messages API."""

    __slots__ = ("_allow_unpriced", "_call_prices", "_max_tokens", "_prices")

    kind = "anthropic"
    user_field = "user_id"  # no form or multipart route: never used
    stops_by_closing = True  # Anthropic stops generating when the client closes
    bills_errors = False  # an HTTP error is answered before any billed work
    key_header = b"x-api-key"  # where Anthropic's SDKs send the (gateway) key

    def __init__(self, config: Config | None = None) -> None:
        terms = pricing_terms(config, "anthropic.")
        self._prices = terms.prices
        self._max_tokens = terms.max_tokens
        self._allow_unpriced = terms.allow_unpriced
        self._call_prices = terms.call_prices

    def upstream_credentials(self, upstream: UpstreamConfig) -> tuple[tuple[bytes, bytes], ...]:
        # The workspace a key that can act in more than one works in (the SDK's
        # `workspace_id`; a workspace's own key may omit it).
        headers = [(b"x-api-key", upstream.api_key.encode())]
        if upstream.workspace:
            headers.append((b"anthropic-workspace-id", upstream.workspace.encode()))
        return tuple(headers)

    # --- requests ------------------------------------------------------------------

    def route(self, method: str, path: str) -> Route:
        return anthropic_routes.anthropic_route(method, path)

    def refine(self, route: Route, body: dict[str, Any] | None) -> Route:
        return anthropic_routes.refine_message(route, body)

    def check_headers(self, route: Route, headers: Headers) -> None:
        refuse_unpriced_betas(headers)

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
        if route is anthropic_routes.OPERATOR:
            raise Forbidden(
                "This endpoint is not available through the gateway: its usage cannot be metered.",
                code="endpoint_not_metered",
            )
        if body is None or not route.produces_answer:
            # count_tokens takes no metadata: passed on as it came, but for what
            # a router would read over it (review 10, R10-5).
            if body is not None:
                drop_router_fields(body)
            return Prepared(body, query)
        _check_request(body)
        self._check_priced(body)
        # The end user as Anthropic reads it, so nobody can act as someone else there.
        metadata = body.get("metadata")
        if metadata is None:
            body["metadata"] = {"user_id": user_id}
        elif isinstance(metadata, dict):
            metadata["user_id"] = user_id
        else:
            raise BadRequest("metadata must be an object.", code="invalid_param")
        # Not Anthropic's API, but the end user a router in front of it (LiteLLM)
        # reads before metadata.user_id (review 8, R8-3).
        body.pop("user", None)
        drop_router_fields(body)
        return Prepared(body, query)

    def _check_priced(self, body: dict[str, Any]) -> None:
        """Refuse, before admission, an answer whose cost could not be told."""
        model = _requested_model(body)
        _check_router_options(body, model)
        if not self._allow_unpriced and not self._prices.prices(model):
            named = f"The model {model!r}" if model is not None else "A request without a model"
            raise Forbidden(
                f"{named} has no price on this gateway, so its use cannot be charged.",
                code="model_not_priced",
            )
        for name, priced in _PRICED_OPTIONS.items():
            value = body.get(name)
            if value is None or (isinstance(value, str) and value in priced):
                continue
            if name == "service_tier":
                raise Forbidden(
                    f"The service tier {value!r} has no price on this gateway, "
                    "so it is not available.",
                    code="service_tier_not_priced",
                )
            option = f"{name}: {value!r}"
            refuse_option(option)
        # Review2 R2-2: a 1-hour cache only where the model's price sets its writes'.
        check_cache_ttls(body, self._prices, model, parts=_CACHED_PARTS, skip=_NOT_BLOCKS)
        refuse_compaction(body)
        for tool, runs in _tool_models(body):
            # Review-meter F2: the advisor consults its model as often as the
            # answer decides, each time over the whole transcript, billed by
            # that model's tokens (usage.iterations): no call price holds it.
            refuse_model_tool(tool, runs)
        for tool in _paid_tools(body):
            if tool not in self._call_prices:
                raise Forbidden(
                    f"The tool {tool!r} has no price on this gateway "
                    f'([call_prices."anthropic.{tool}"]), so it is not available.',
                    code="tool_not_priced",
                )

    def asks_for_one_hour_cache(self, body: dict[str, Any]) -> bool:
        """Whether a message asks for a 1-hour prompt cache (a ``"1h"`` ttl
        anywhere Anthropic reads one): only then may its answer write one, and
        its money bound holds every prompt token as a 1-hour write
        (gateway/quota/budget.py)."""
        return asks_for_one_hour_cache(body, _CACHED_PARTS, _NOT_BLOCKS)

    # --- model allow-lists (gateway/model_access.py) ---------------------------------

    def requested_models(
        self, route: Route, body: dict[str, Any] | None
    ) -> tuple[str | None, ...] | None:
        """The model a message runs (the body's ``model``; None when absent or
        not a string, which the upstream refuses anyway) and the model a model
        read names, and any model a server tool runs (the advisor's ``model``:
        review-meter F2; None when not a string). ``count_tokens`` runs no model
        and is not checked."""
        if route.model is not None:
            return (route.model,)
        if not route.admitted or body is None:
            return None
        model = body.get("model")
        asked = model if isinstance(model, str) and model else None
        tools = _tool_models(body)
        if not tools:
            return (asked,)
        runs = [run if isinstance(run, str) and run else None for _, run in tools]
        return (asked, *runs)

    def routed_model(self, route: Route, body: dict[str, Any] | None) -> str | None:
        """The body's ``model`` (any route that has one, a passthrough included),
        or the model a model read names."""
        if route.model is not None:
            return route.model
        model = body.get("model") if body is not None else None
        return model if isinstance(model, str) and model else None

    def merge_models(self, pages: list[dict[str, Any]]) -> dict[str, Any]:
        return merge_model_lists(pages)

    def model_list_query(self, query: bytes, previous: dict[str, Any] | None) -> bytes | None:
        """The next page of an upstream's whole model list: the client's query
        without its paging parameters (``beta`` and the like kept), the largest
        page Anthropic gives, after ``previous``'s last model while it says
        there are more."""
        params = [
            (name, value)
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            if name not in _MODEL_PAGING
        ]
        params.append(("limit", str(_MODEL_PAGE_MAX)))
        if previous is not None:
            last = previous.get("last_id")
            if previous.get("has_more") is not True or not isinstance(last, str) or not last:
                return None
            params.append(("after_id", last))
        return urlencode(params).encode("latin-1")

    def page_models(self, route: Route, merged: dict[str, Any], query: bytes) -> dict[str, Any]:
        """The page of the merged list the client's ``limit`` (1 to 1000,
        default 20), ``after_id`` or ``before_id`` names, with ``has_more`` (in
        the direction asked), ``first_id`` and ``last_id`` as Anthropic pages
        its own list. A cursor the list does not hold (a model gone since the
        page before) gives an empty last page."""
        params = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        try:
            limit = int(params.get("limit", _MODEL_PAGE_DEFAULT))
        except ValueError:
            limit = 0
        if not 1 <= limit <= _MODEL_PAGE_MAX:
            raise BadRequest("limit: the page size must be an integer from 1 to 1000.")
        after, before = params.get("after_id"), params.get("before_id")
        if after is not None and before is not None:
            raise BadRequest("after_id and before_id cannot both be set.")
        data: list[Any] = merged.get("data") or []
        ids = [item["id"] for item in data]  # merged: each an object with an id
        if before is not None:
            end = ids.index(before) if before in ids else 0
            start = max(0, end - limit)
            page, more = data[start:end], start > 0
        else:
            start = 0 if after is None else ids.index(after) + 1 if after in ids else len(data)
            page, more = data[start : start + limit], start + limit < len(data)
        return {
            **merged,
            "data": page,
            "has_more": more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }

    def filter_models(
        self, route: Route, page: dict[str, Any], allowed: Callable[[str], bool]
    ) -> dict[str, Any]:
        """``GET /models`` (``{"data": [{"type": "model", "id": ...}], "has_more",
        "first_id", "last_id"}``) with only the allowed models; a list it cannot
        read is emptied, not passed on whole. ``first_id``/``last_id`` stay the
        upstream's page cursors, so paging on goes on from where it was."""
        return keep_models(page, allowed)

    def is_streaming(self, route: Route, body: dict[str, Any]) -> bool:
        return body.get("stream") is True

    def asks_for_web_search(self, route: Route, body: dict[str, Any]) -> bool:
        """Whether a message may search the web (held by ``web_searches_per_day``,
        review-sec F4): it lists the ``web_search_*`` server tool."""
        return route.produces_answer and _WEB_SEARCH in _paid_tools(body)

    # --- answers -------------------------------------------------------------------

    def stream_meter(self, route: Route, body: dict[str, Any]) -> StreamMeter:
        one_hour = functools.partial(self.asks_for_one_hour_cache, body)
        return _PricedMeter(MessageStreamMeter(body, one_hour=one_hour), self, body)

    def stream_transform(self, route: Route, prepared: Prepared) -> None:
        return None  # the client gets the upstream's bytes untouched

    def meter_blocking(self, route: Route, body: dict[str, Any], response: bytes) -> Metered:
        calls = ServerCalls()
        one_hour = functools.partial(self.asks_for_one_hour_cache, body)
        return self.priced(meter_message(body, response, calls, one_hour=one_hour), body, calls)

    def billed_error(
        self, route: Route, body: dict[str, Any], status: int, content: bytes | None
    ) -> bool:
        return False

    @staticmethod
    def cost_unreported(route: Route, body: dict[str, Any]) -> bool:
        """Never: the gateway prices every answer from its usage and [prices]."""
        return False

    @staticmethod
    def cost_unbounded(route: Route, body: dict[str, Any]) -> str | None:
        """The MCP connector (``mcp_servers``, and the ``mcp_toolset`` tools
        that use them): Anthropic fetches each server's tool list and sends the
        results of its calls into the context, billed as input the body does not
        hold (review-limits F1)."""
        return mcp_option(body)

    def unanswered(self, route: Route, body: dict[str, Any]) -> Metered:
        prompt = estimate_tokens(prompt_chars(body))
        usage = Usage(prompt_tokens=prompt, total_tokens=prompt, estimated=True)
        model = _requested_model(body)
        metered = Metered(None, None, None, usage, "timeout", model=model)
        # The server tools an answer reports are not known until it reports them.
        return self.priced(metered, body, ServerCalls())

    def calls(self, body: dict[str, Any], reported: Mapping[str, int]) -> dict[str, int]:
        """The paid server-tool calls an answer is charged, by tool name: the web
        searches and fetches its usage reports, and one call per answer of any
        other paid server tool the request listed (their use is not reported)."""
        calls = {tool: count for tool, count in reported.items() if count}
        for tool in _paid_tools(body):
            if tool not in _COUNTED_TOOLS:
                calls[tool] = 1
        return calls

    def priced(self, metered: Metered, body: dict[str, Any], calls: ServerCalls) -> Metered:
        """``metered`` with its cost: tokens by the model that answered (else the
        one asked for), plus the server-tool calls at their call prices."""
        requested = _requested_model(body)
        model = metered.model or requested
        usage = metered.usage
        reported: Mapping[str, int] = calls.counts
        if not reported.get(_WEB_SEARCH) and searches_every_answer(metered.model):
            # The model that answered searches the web before every answer,
            # though the one asked for was not named so (a router's alias at its
            # /v1/messages; review F3): one web search, charged and counted.
            reported = {**reported, _WEB_SEARCH: 1}
        if usage is not None:
            usage, _ = self._prices.priced(
                usage, metered.model, requested, max_tokens=self._max_tokens
            )
            charged = self.calls(body, reported)
            if charged:
                usage = self._with_calls(usage, charged)
        searches = reported.get(_WEB_SEARCH, 0)
        if usage is metered.usage and model == metered.model and searches == metered.web_searches:
            return metered
        return dataclasses.replace(metered, usage=usage, model=model, web_searches=searches)

    def _with_calls(self, usage: Usage, calls: Mapping[str, int]) -> Usage:
        cost, currency = calls_cost(self._call_prices, calls)
        if currency is None:
            return usage
        if not usage.cost:
            usage = dataclasses.replace(usage, currency=currency)
        return dataclasses.replace(usage, cost=usage.cost + cost)

    def filter_history(
        self, route: Route, query: bytes, page: dict[str, Any], cutoff: float
    ) -> dict[str, Any]:
        return page  # no route of this API is a history page

    def stop_request(self, route: Route, task_id: str, user_id: str) -> tuple[str, bytes] | None:
        return None  # stops_by_closing

    # --- errors --------------------------------------------------------------------

    def error_body(self, status: int, code: str, message: str) -> bytes:
        kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        # Anthropic's shape; "code" is the gateway's own (its refusals' codes),
        # an extra member the SDKs ignore.
        return orjson.dumps(
            {"type": "error", "error": {"type": kind, "message": message, "code": code}}
        )

    def stream_error(self, status: int, code: str, message: str) -> bytes:
        # The SDKs raise on an "error" event, as Anthropic sends one mid-stream.
        return b"event: error\ndata: " + self.error_body(status, code, message) + b"\n\n"


def _check_router_options(body: dict[str, Any], model: str | None) -> None:
    """Refuse what a router's Anthropic-compatible endpoint (OpenRouter's
    /v1/messages) reads as paid work or a dearer choice: its plugins (a web
    search billed per result, OCR per page), its host routing, fallback
    models no price here was checked for, and an ``:online`` model (a web
    search on every answer). None is Anthropic's API, which refuses unknown
    fields; the OpenAI dialect prices the chat's web search instead (review 11)."""
    for name in _ROUTER_OPTIONS:
        if name in body:
            refuse_option(name)
    if is_online(model):
        refuse_plugin("web")
    if searches_every_answer(model):
        # A router's Perplexity Sonar or OpenAI search model searches the web
        # before every answer, a fee Anthropic's API has no place for: the
        # OpenAI dialect prices it as a chat's web search (review R-SONAR-1).
        assert model is not None
        option = f"model {shown_model(model)} (a web search on every answer)"
        refuse_option(option)


def _check_request(body: dict[str, Any]) -> None:
    """Refuse what the gateway would read otherwise than Anthropic: a ``stream``
    that is not a JSON boolean (a lax reading would stream unmetered), and a
    missing or invalid ``max_tokens`` (the API requires it; refused before
    anything is reserved)."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        # The text of OpenAI's refusal (gateway/messages.py "invalid_type").
        raise BadRequest(
            f"Invalid type for 'stream': expected a boolean, but got {_json_type(stream)} instead.",
            code="invalid_type",
        )
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(
            "max_tokens must be a positive integer (the Messages API requires it).",
            code="invalid_param",
        )


def _json_type(value: object) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, list):
        return "an array"
    return "an object"
