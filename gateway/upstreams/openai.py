"""The OpenAI-compatible dialect: OpenAI itself, and servers that speak its API.

Metered: ``/chat/completions`` and ``/completions`` (blocking or streamed),
``/embeddings`` and ``/responses`` (blocking or streamed). Usage comes from the
upstream's own answer (docs/upstreams/openai.md): to get it in a streamed chat completion,
the gateway sets ``stream_options.include_usage`` and, when the client had not
asked for it, hides the extra usage chunk from the client. OpenAI reports tokens
only; the cost comes from the ``[prices]`` table, plus the paid tool calls an
answer made (web search, image generation...) from ``[call_prices]``. A request
for a model or a paid tool without a price, or with a boolean the gateway reads
that is not a JSON boolean, is refused before admission (issue 20).

Every other route is declared in openai_routes.py with its role (default deny):
``GET /models`` passes through, a stored response or chat completion is
forwarded only to the user whose answer created it, and everything else (files,
fine-tuning, images, audio, batches...) is refused. Background responses are
refused too: their usage never passes through the request.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson

from gateway.errors import BadRequest, Forbidden
from gateway.model_access import shown_model
from gateway.pricing import Audio, Price, PriceTable
from gateway.sse import ServerSentEvent
from gateway.upstreams import openai_routes
from gateway.upstreams.anthropic_wire import refuse_compaction, refuse_unpriced_betas
from gateway.upstreams.base import (
    Headers,
    Prepared,
    Route,
    StreamMeter,
    drop_router_fields,
    is_online,
    is_sonar,
    keep_models,
    mcp_option,
    merge_model_lists,
    refuse,
    refuse_model_tool,
    refuse_option,
    refuse_plugin,
    searches_every_answer,
    shown_value,
)
from gateway.upstreams.cache_ttl import (
    INJECTION_POINTS,
    asks_for_one_hour_cache,
    check_cache_ttls,
)
from gateway.upstreams.openai_fallbacks import check_fallbacks, fallback_models
from gateway.upstreams.openai_routes import object_id_meter, with_object_id
from gateway.upstreams.openai_wire import (
    ChatStreamMeter,
    Extras,
    ResponsesStreamMeter,
    is_usage_only,
    meter_body,
    prompt_chars,
    usage_marks,
)
from gateway.upstreams.terms import calls_cost, pricing_terms
from gateway.upstreams.transforms import DropEvents
from gateway.usage import Metered, Usage, estimate_tokens

if TYPE_CHECKING:
    from gateway.config import Config, UpstreamConfig

__all__ = ["OpenAIUpstream"]

log = logging.getLogger(__name__)

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

# The booleans the gateway reads to decide how to meter a request. OpenAI refuses
# anything but true, false or null in them; lax compatible servers (vLLM, other
# pydantic ones) take 1, "true", "yes"... as true, so a value the gateway read as
# "not true" would stream unmetered, or run in the background. The gateway refuses
# what OpenAI refuses (docs/upstreams/openai.md, "Booleans").
_BOOLEANS: Final = ("stream", "background", "store")
_STREAM_OPTION_BOOLEANS: Final = ("include_usage",)

# Tools a Responses request may list that cost nothing past the answer's tokens:
# the client runs them (function, custom, local_shell, apply_patch), or OpenAI
# bills only the tokens (remote MCP servers). Every other tool is a paid call,
# priced in [call_prices."openai.<type>"] or refused (issue 20).
_FREE_TOOLS: Final = frozenset({"function", "custom", "local_shell", "apply_patch", "mcp"})
# A dated tool version ("web_search_preview_2025_03_11") is priced as its tool.
_TOOL_VERSION: Final = re.compile(r"_20[0-9]{2}_[0-9]{2}_[0-9]{2}$")
# The web-search tools: a response's web_search_call items are calls of the one
# the request listed.
_WEB_SEARCH_TOOLS: Final = ("web_search", "web_search_preview")
# Responses tools that run a model of their own, named by the tool's "model"
# (OpenAI's default when it is left out): checked against a plan's allow-list.
_MODEL_TOOLS: Final = frozenset({"image_generation"})
# Perplexity's Sonar models (`base.SONAR`): one fee an answer, whatever number
# of queries its usage reports (``num_search_queries``): Perplexity bills these
# models per request, not per query.
# Sonar Deep Research bills each search it runs ($5 per 1,000), as many as it
# decides ("you cannot control the exact number of search queries"), and its
# citation and reasoning tokens at rates of their own: no request bounds it.
_SONAR_UNBOUNDED: Final = re.compile(r"(?:^|[/._-])sonar-deep-research(?:[-_.:]|$)", re.IGNORECASE)
# OpenRouter's Sonar Pro Search (``perplexity/sonar-pro-search``) is Perplexity's
# Pro Search: $18 per 1,000 requests, three times sonar-pro's default fee, which
# one chat_web_search price cannot hold beside the others (review R-SONAR-3).
_SONAR_PRO_SEARCH: Final = re.compile(r"(?:^|[/._-])sonar-pro-search(?:[-_.:]|$)", re.IGNORECASE)
# What a Sonar request fee is set by beside the model, and the values one
# chat_web_search price holds: Perplexity's defaults, a "low" search context and
# a standard search. "medium" and "high" ($8 and $12 per 1,000 requests of sonar
# against $5) and Pro Search ("pro", or "auto", which may choose it: $14 to $22)
# bill more for the same call price, and are refused (as the web plugin's extra
# results are, review 10 R10-3).
_SONAR_FEE_OPTIONS: Final = {
    "search_context_size": frozenset({"low"}),
    "search_type": frozenset({"fast"}),
}
# The service tiers an answer may ask for (review-sec F2): absent or null, "auto"
# and "default" run at the project's standard rates, which [prices] holds, and
# "flex" at lower ones. Any other ("priority", billed at about twice the standard
# rates; "scale", the operator's reserved capacity) is refused: no price of the
# table covers it.
_PRICED_TIERS: Final = frozenset({"auto", "default", "flex"})
# Per-answer calls of a chat completion.
_CHAT_WEB_SEARCH: Final = "chat_web_search"
# What a fallback that searches on every answer calls, off a chat (`check_fallbacks`).
_SEARCHED: Final = (_CHAT_WEB_SEARCH,)
# OpenRouter's web search: its plugin, and the model suffix that adds it. It
# bills per result: a chat's web search price holds its default of five.
_WEB_PLUGIN: Final = "web"
_WEB_RESULTS: Final = 5
_WEB_PLUGIN_KEYS: Final = frozenset({"id", "max_results", "search_prompt"})
_WEB_OPTION: Final = "plugins.web (more than 5 results, or another engine)"
# OpenRouter's provider routing values that filter no host out (review 11).
_PROVIDER_NEUTRAL: Final = {
    "allow_fallbacks": True,
    "data_collection": "allow",
    "zdr": False,
    "require_parameters": False,
    "sort": "price",
}
_AUDIO_OUTPUT: Final = "audio_output"
# Where a router in front of Claude (LiteLLM, Portkey, OpenRouter) reads
# Anthropic's ``cache_control`` and passes it on, ttl included (review4 R4-2):
# a message's content parts, a tool, a Responses input item, the top level.
# A function's JSON Schema ("parameters") is the client's, not a block. LiteLLM
# also puts a ``cache_control`` (ttl included) on the messages a request's
# injection points name (cache_ttl.INJECTION_POINTS, review5 R5-7).
_CACHED_PARTS: Final = ("messages", "tools", "input")
_NOT_BLOCKS: Final = frozenset({"parameters"})
_INJECTED: Final = (INJECTION_POINTS,)

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

    __slots__ = ("_body", "_dialect", "_meter", "_route", "feed")

    def __init__(
        self,
        meter: ChatStreamMeter | ResponsesStreamMeter,
        dialect: OpenAIUpstream,
        route: Route,
        body: dict[str, Any],
    ) -> None:
        self._meter, self._dialect = meter, dialect
        self._route, self._body = route, body
        # Each event goes to the meter itself: no call of this one's between.
        self.feed: Callable[[ServerSentEvent], None] = meter.feed

    @property
    def task_id(self) -> str | None:
        return None  # no stop endpoint: an answer is stopped by closing its stream

    def finish(self, *, cut: bool) -> Metered:
        metered = self._meter.finish(cut=cut)
        return self._dialect.priced_with(metered, self._route, self._body, self._meter.extras)


def _requested_model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) and model else None


class OpenAIUpstream:
    """The OpenAI API (``https://api.openai.com/v1``) and compatible servers."""

    __slots__ = ("_allow_unpriced", "_call_prices", "_max_tokens", "_prices")

    kind = "openai"
    user_field = "user"
    stops_by_closing = True  # OpenAI stops generating when the client closes
    bills_errors = False  # an HTTP error is answered before any billed work
    key_header = None  # the gateway key comes as a bearer token only

    def __init__(self, config: Config | None = None) -> None:
        terms = pricing_terms(config, "openai.")
        self._prices = terms.prices
        self._max_tokens = terms.max_tokens
        self._allow_unpriced = terms.allow_unpriced
        self._call_prices = terms.call_prices

    # --- requests ------------------------------------------------------------------

    def upstream_credentials(self, upstream: UpstreamConfig) -> tuple[tuple[bytes, bytes], ...]:
        # The organization and project OpenAI bills the key's calls to, and
        # whose files, vector stores and assistants it reaches (the SDKs'
        # `organization` / `project`; without them, the key's defaults).
        headers = [(b"authorization", f"Bearer {upstream.api_key}".encode())]
        if upstream.organization:
            headers.append((b"openai-organization", upstream.organization.encode()))
        if upstream.project:
            headers.append((b"openai-project", upstream.project.encode()))
        return tuple(headers)

    def route(self, method: str, path: str) -> Route:
        return openai_routes.openai_route(method, path)

    def refine(self, route: Route, body: dict[str, Any] | None) -> Route:
        return openai_routes.refine_answer(route, body)

    def check_headers(self, route: Route, headers: Headers) -> None:
        # The service tier is a body field (_check_priced); a router in front of
        # Claude passes a client's anthropic-beta on (review 9, R9-6).
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
        if route is _REFUSED:
            raise Forbidden(
                "This endpoint is not available through the gateway: its usage cannot be metered.",
                code="endpoint_not_metered",
            )
        if body is None:
            return Prepared(None, query)
        if route.produces_answer:
            # Before anything else reads them: a body the upstream could read
            # otherwise than the gateway is refused, with nothing reserved.
            _check_booleans(body)
            self._check_priced(route, body)
        # The end user as OpenAI reads it, so nobody can act as someone else there:
        # "user", and its successor "safety_identifier" when the client sent one
        # (not every endpoint, nor every compatible server, takes the newer field).
        body["user"] = user_id
        if "safety_identifier" in body:
            body["safety_identifier"] = user_id
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            # A router parses a string one as JSON, and reads its tags (review 9).
            raise BadRequest("metadata must be an object.", code="invalid_param")
        drop_router_fields(body)
        # The names a compatible server gives its answer when the client chooses
        # them (vLLM's request_id, SGLang's rid): a stored answer is recorded
        # under the upstream's name, once, so a client reusing one would have
        # each repeat taken for a retry of one answer and charged once. Dropped;
        # vLLM names answers by the X-Request-Id header first, which carries the
        # gateway's own request id (proxy.py, `_forward`).
        body.pop("request_id", None)
        body.pop("rid", None)
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

    def _check_priced(self, route: Route, body: dict[str, Any]) -> None:
        """Refuse, before admission, an answer whose cost could not be told: a
        model the price table does not price (unless ``pricing.unpriced_models``
        allows it at cost 0), a paid tool without a call price, or a prompt cache
        whose lifetime the model's price does not open (cache_ttl.py)."""
        model = _requested_model(body)
        if not self._allow_unpriced and not self._prices.prices(model):
            named = f"The model {model!r}" if model is not None else "A request without a model"
            raise Forbidden(
                f"{named} has no price on this gateway, so its use cannot be charged.",
                code="model_not_priced",
            )
        # A router's fallbacks (openai_fallbacks.py): priced, and no dearer than model.
        # (Off a chat, a fallback that searches on every answer is a paid call
        # the model asked for does not make, as on a chat: review of the
        # session, alias F1.)
        calls = (
            (lambda name: _chat_calls({**body, "model": name}))
            if route.kind == "chat"
            else (lambda name: _SEARCHED if searches_every_answer(name) else ())
        )
        check_fallbacks(body, model, self._prices, allow_unpriced=self._allow_unpriced, calls=calls)
        tier = body.get("service_tier")
        if tier is not None and (not isinstance(tier, str) or tier not in _PRICED_TIERS):
            raise Forbidden(
                f"The service tier {tier!r} has no price on this gateway, so it is not available.",
                code="service_tier_not_priced",
            )
        # Review4 R4-2: a router in front of Claude passes cache_control on.
        check_cache_ttls(
            body, self._prices, model, parts=_CACHED_PARTS, skip=_NOT_BLOCKS, injected=_INJECTED
        )
        _check_plugins(route, body, model)
        _check_sonar(route, body, model, self._prices, allow_unpriced=self._allow_unpriced)
        # A router in front of Claude takes Anthropic's compaction and advisor
        # on its OpenAI-compatible routes, the beta header added by itself, and
        # reports their steps in no usage it passes on (review of the fixes).
        refuse_compaction(body)
        for tool, runs in _model_tools(body):
            refuse_model_tool(tool, runs)
        if route.kind == "chat":
            asked = _chat_calls(body)
        elif route.kind == "response":
            asked = [tool for tool in _response_tools(body) if tool not in _FREE_TOOLS]
        else:
            return
        for tool in asked:
            if tool not in self._call_prices:
                shown = shown_model(tool)  # a client's type: any length
                raise Forbidden(
                    f"The tool {shown} has no price on this gateway "
                    f'([call_prices."openai.{shown[1:-1]}"]), so it is not available.',
                    code="tool_not_priced",
                )
        if route.kind == "chat":
            _check_server_searches(body)
        else:
            _check_tool_options(body)

    def asks_for_one_hour_cache(self, body: dict[str, Any]) -> bool:
        """Whether a request asks a router in front of Claude for a 1-hour
        prompt cache (a ``"1h"`` ttl where it reads one): its money bound then
        holds every prompt token as a 1-hour write (gateway/quota/budget.py)."""
        return asks_for_one_hour_cache(body, _CACHED_PARTS, _NOT_BLOCKS, _INJECTED)

    def is_streaming(self, route: Route, body: dict[str, Any]) -> bool:
        return body.get("stream") is True

    def asks_for_web_search(self, route: Route, body: dict[str, Any]) -> bool:
        """Whether an answer may search the web (held by ``web_searches_per_day``,
        review-sec F4): a chat completion with ``web_search_options`` or a search
        model; a response listing a ``web_search*`` tool, or asking a search model."""
        if route.kind == "chat":
            return any(_is_web_search(call) for call in _chat_calls(body))
        if route.kind != "response":
            return False
        return any(_is_web_search(tool) for tool in _response_tools(body)) or searches_every_answer(
            _requested_model(body)
        )

    # --- model allow-lists (issue 21, gateway/model_access.py) ---------------------

    def requested_models(
        self, route: Route, body: dict[str, Any] | None
    ) -> tuple[str | None, ...] | None:
        """The models an answer or paid call runs: the body's ``model`` (None when
        absent or not a string: the upstream would pick one itself, e.g. a stored
        prompt's), the fallbacks a router may answer with instead
        (openai_fallbacks.py), and a Responses tool's own ``model``
        (``image_generation`` runs one; without it OpenAI picks its default, so
        it is None too). A model read (``GET /models/ID``) names its model.
        Moderations, free and keeping nothing, are not checked."""
        if route.model is not None:
            return (route.model,)
        if not route.admitted or body is None:
            return None
        models: list[str | None] = [_requested_model(body), *fallback_models(body)]
        tools = body.get("tools")
        for tool in tools if isinstance(tools, list) else ():
            if not isinstance(tool, dict):
                continue
            kind = tool.get("type")
            runs_model = (
                route.kind == "response"
                and isinstance(kind, str)
                and _TOOL_VERSION.sub("", kind) in _MODEL_TOOLS
            )
            # Any tool's own model, on a chat too (a router's advisor).
            if "model" in tool or runs_model:
                model = tool.get("model")
                models.append(model if isinstance(model, str) and model else None)
        return tuple(models)

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
        return query if previous is None else None  # the list is one page

    def page_models(self, route: Route, merged: dict[str, Any], query: bytes) -> dict[str, Any]:
        return merged  # the list is not paged

    def filter_models(
        self, route: Route, page: dict[str, Any], allowed: Callable[[str], bool]
    ) -> dict[str, Any]:
        """``GET /models`` (``{"object": "list", "data": [{"id": ...}, ...]}``)
        with only the allowed models; a list it cannot read is emptied, not
        passed on whole."""
        return keep_models(page, allowed)

    # --- answers -------------------------------------------------------------------

    def stream_meter(self, route: Route, body: dict[str, Any]) -> StreamMeter:
        meter: ChatStreamMeter | ResponsesStreamMeter
        if route.kind == "response":
            meter = ResponsesStreamMeter(body)
        else:
            meter = ChatStreamMeter(body)
        # Recorded under the object id a stored answer gets (openai_routes.py).
        return object_id_meter(route, body, _PricedMeter(meter, self, route, body))

    def stream_transform(self, route: Route, prepared: Prepared) -> DropEvents | None:
        if prepared.memo != _HIDE_USAGE:
            return None
        # The client did not ask for the usage chunk: it gets the stream without it.
        return DropEvents(is_usage_only, marks=usage_marks)

    def meter_blocking(self, route: Route, body: dict[str, Any], response: bytes) -> Metered:
        extras = Extras()
        metered = meter_body(body, response, extras)
        priced = self.priced_with(metered, route, body, extras)
        return with_object_id(route, body, extras.answer, priced)  # openai_routes.py

    def priced_with(
        self, metered: Metered, route: Route, body: dict[str, Any], extras: Extras
    ) -> Metered:
        """An answer's ``metered`` usage priced with what else it reported.

        Cache writes a router reported without their cache's lifetime are
        charged as 1-hour writes when the request asked for a 1-hour cache:
        Anthropic may have written every one of them to it (review4 R4-2)."""
        usage = metered.usage
        if extras.unattributed_writes and usage is not None and self.asks_for_one_hour_cache(body):
            written_1h = usage.cache_write_1h_tokens + extras.unattributed_writes
            usage = dataclasses.replace(
                usage, cache_write_1h_tokens=min(written_1h, usage.cache_write_tokens)
            )
            metered = dataclasses.replace(metered, usage=usage)
        calls = self.calls(route, body, extras.calls.counts())
        if searches_every_answer(metered.model) and not any(map(_is_web_search, calls)):
            # The model that answered searches on every answer, though the one
            # asked for is not named so (a router's alias of its deployment, on
            # any answer route: reviews R-SONAR-2, F5): its search is charged
            # and counted all the same, as a search model's chat is. (Not
            # reserved: the request did not say. Learning the name from the
            # answer let one user's fallback make a model a search model for
            # everyone: review of the session, alias F1.)
            calls[_CHAT_WEB_SEARCH] = 1
        ran = route.kind == "response"
        return self.priced(
            metered, _requested_model(body), calls=calls, ran=ran, audio=extras.audio
        )

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
        """A remote MCP tool (``{"type": "mcp"}``, on responses, and on a chat
        through a router that takes it): the server's tool list and the results
        of its calls are billed as input the body does not hold. Anthropic's
        ``mcp_servers`` too, which a router in front of Claude passes on
        (review-last L3)."""
        return mcp_option(body)

    def unanswered(self, route: Route, body: dict[str, Any]) -> Metered:
        prompt = estimate_tokens(prompt_chars(body))
        usage = Usage(prompt_tokens=prompt, total_tokens=prompt, estimated=True)
        model = _requested_model(body)
        # The calls the request itself decides (a search model searches on every
        # answer); a response's tool calls are not known until it reports them.
        calls = self.calls(route, body, {})
        metered = Metered(None, None, None, usage, "timeout", model=model)
        return self.priced(metered, model, calls=calls)

    def calls(
        self, route: Route, body: dict[str, Any], reported: Mapping[str, int]
    ) -> dict[str, int]:
        """The paid calls an answer is charged, by call name (``[call_prices]``
        without the ``openai.`` prefix): a response's tool calls as it reported
        them, and a chat completion's web search and audio output, one per answer
        that asked for them."""
        if route.kind == "chat":
            return dict.fromkeys(_chat_calls(body), 1)
        if route.kind != "response":
            return {}
        calls: dict[str, int] = {}
        for tool, count in reported.items():
            if tool == "web_search":
                tool = self._web_search_tool(body)
            if tool in _FREE_TOOLS:
                continue
            calls[tool] = calls.get(tool, 0) + count
        return calls

    def _web_search_tool(self, body: dict[str, Any]) -> str:
        """Which web-search tool a response's ``web_search_call`` items are calls
        of: the one the request listed; of two, the dearer."""
        listed = [tool for tool in _response_tools(body) if tool in _WEB_SEARCH_TOOLS]
        priced = [tool for tool in listed if tool in self._call_prices]
        if not priced:
            return listed[0] if listed else "web_search"
        return max(priced, key=lambda tool: self._call_prices[tool].price)

    def price(self, model: str | None) -> Price | None:
        """The price `priced` charges an answer by, when the upstream names the
        model asked for (``model``): None when the table prices none."""
        return self._prices.find(model)

    def priced(
        self,
        metered: Metered,
        requested: str | None,
        *,
        calls: Mapping[str, int] | None = None,
        ran: bool = False,
        audio: Audio | None = None,
    ) -> Metered:
        """``metered`` with its cost from the price table: by the model that
        answered, else the one asked for, plus its paid ``calls`` at their call
        prices. The model recorded is the one that answered, or the one asked for
        when the upstream named none. ``ran``: the answer itself reported the
        calls, which are then charged even when nothing else is. ``audio``: the
        audio tokens among its counts, at the model's audio prices."""
        model = metered.model or requested
        usage = metered.usage
        if usage is not None:
            usage, _ = self._prices.priced(
                usage, metered.model, requested, max_tokens=self._max_tokens, audio=audio
            )
        searches = 0
        unpriced = metered.unpriced_calls
        if calls:
            usage = self._with_calls(usage, calls, ran=ran)
            searches = sum(count for call, count in calls.items() if _is_web_search(call))
            if usage is not None and any(call not in self._call_prices for call in calls):
                # A call the answer made that no price covers (a search an
                # alias's search model ran: admission could not refuse it):
                # counted as unpriced, as Dify's speech is (review F3).
                unpriced += tuple(
                    f"openai.{call}" for call in calls if call not in self._call_prices
                )
        if (
            usage is metered.usage
            and model == metered.model
            and searches == metered.web_searches
            and unpriced is metered.unpriced_calls
        ):
            return metered
        # Built whole, not with dataclasses.replace (a loop over the fields on
        # every priced answer); tests/upstreams/test_openai.py fails if a field of
        # Metered is not passed on here.
        return Metered(
            metered.answer_id,
            metered.task_id,
            metered.conversation_id,
            usage,
            metered.outcome,
            error_code=metered.error_code,
            metadata=metered.metadata,
            model=model,
            web_searches=searches,
            unpriced_calls=unpriced,
        )

    def _with_calls(
        self, usage: Usage | None, calls: Mapping[str, int], *, ran: bool
    ) -> Usage | None:
        """``usage`` with the cost of ``calls`` added (exact decimals)."""
        cost, currency = calls_cost(self._call_prices, calls)
        if currency is None:
            return usage
        if usage is None:
            if not ran:
                return None  # an answer that failed before any text: nothing ran
            # The answer failed before any text but after its tools ran: they are
            # billed all the same.
            usage = Usage(estimated=True, currency=currency)
        elif not usage.cost:
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
        kind = _ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        return orjson.dumps(
            {"error": {"message": message, "type": kind, "param": None, "code": code}}
        )

    def stream_error(self, status: int, code: str, message: str) -> bytes:
        # The SDKs raise on a data line holding an "error" object, in any stream.
        return b"data: " + self.error_body(status, code, message) + b"\n\n"


def _check_booleans(body: dict[str, Any]) -> None:
    """Refuse a boolean the gateway reads that is not true, false or null."""
    for name in _BOOLEANS:
        _check_boolean(name, body.get(name))
    options = body.get("stream_options")
    if isinstance(options, dict):
        for name in _STREAM_OPTION_BOOLEANS:
            _check_boolean(f"stream_options.{name}", options.get(name))


def _check_boolean(name: str, value: object) -> None:
    if value is None or isinstance(value, bool):
        return
    raise BadRequest(
        f"Invalid type for '{name}': expected a boolean, but got {_json_type(value)} instead.",
        code="invalid_type",
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


# Review-meter F3, F4: a paid tool's options that bill more than its one call
# price. A container's memory past the default 1 GB (OpenAI bills a session by
# its size: 4, 16, 64 times the 1 GB price), and image previews (each of
# ``partial_images`` 100 image output tokens more, which no usage reports).
_DEFAULT_MEMORY: Final = "1g"
_CONTAINER_FIELDS: Final = ("container", "environment")


def _check_tool_options(body: dict[str, Any]) -> None:
    """Refuse a Responses tool asking for what its call price does not hold:
    a code interpreter's (or a hosted shell's) container with a
    ``memory_limit`` other than the default, an image generation with
    ``partial_images`` (403 ``option_not_priced``)."""
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        for field in _CONTAINER_FIELDS:
            container = tool.get(field)
            if isinstance(container, dict):
                memory = container.get("memory_limit")
                if memory is not None and memory != _DEFAULT_MEMORY:
                    refuse_option(f"memory_limit: {shown_value(memory)}")
        partial = tool.get("partial_images")
        if partial is not None and partial != 0:
            refuse_option(f"partial_images: {shown_value(partial)}")


def _model_tools(body: dict[str, Any]) -> list[tuple[str, object]]:
    """The tools a request lists that name a model of their own, but those
    priced per call whatever model they run (``image_generation``): as (tool
    name, model)."""
    tools = body.get("tools")
    found = []
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and "model" in tool:
            kind = tool.get("type")
            name = _TOOL_VERSION.sub("", kind) if isinstance(kind, str) else repr(kind)[:64]
            if name not in _MODEL_TOOLS:
                found.append((name, tool.get("model")))
    return found


def _response_tools(body: dict[str, Any]) -> list[str]:
    """The tool types a Responses request lists, dated versions as their tool."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    names = []
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str):
            names.append(_TOOL_VERSION.sub("", kind))
    return names


def _chat_calls(body: dict[str, Any]) -> list[str]:
    """The paid calls a chat completion makes on every answer: a web search (a
    search model - OpenAI's, or Perplexity's Sonar - or ``web_search_options``)
    and audio output."""
    calls = []
    model = _requested_model(body)
    if (
        body.get("web_search_options") is not None
        or searches_every_answer(model)
        or _asks_openrouters_web(body, model)
    ):
        calls.append(_CHAT_WEB_SEARCH)
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        calls.append(_AUDIO_OUTPUT)
    # A tool the server runs itself (a router's openrouter:web_search, Claude's
    # web_search_* through LiteLLM): a paid call, priced by its type or refused
    # (review 10, R10-1), as a response's tools are (`_FREE_TOOLS` cost nothing).
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in _FREE_TOOLS:
                calls.append(kind if isinstance(kind, str) else "(no type)")
    return calls


def _check_sonar(
    route: Route,
    body: dict[str, Any],
    model: str | None,
    prices: PriceTable,
    *,
    allow_unpriced: bool,
) -> None:
    """Perplexity's Sonar models (the one asked for, or a router's fallback):
    one request fee an answer, charged as one ``chat_web_search``. Refused: Deep
    Research, which bills every search it decides to run (nothing bounds them
    at admission); Pro Search, whose fee is three times the others'; a Sonar
    model priced only by ``"*"`` (review R-SONAR-3: the call price was set for
    the Sonar models the table names, and a catch-all would take any other at
    it); a Sonar model off a chat completion (its search is priced and counted
    on chats only, as OpenRouter's ``:online`` is); and the
    ``web_search_options`` that raise the request fee above the default one
    (`_SONAR_FEE_OPTIONS`)."""
    sonar = False
    for name in (model, *fallback_models(body)):
        if not isinstance(name, str) or not is_sonar(name):
            continue
        if _SONAR_UNBOUNDED.search(name) is not None:
            refuse("model_not_bounded", model=shown_model(name))
        if _SONAR_PRO_SEARCH.search(name) is not None:
            option = f"model {shown_model(name)} (a dearer search fee)"
            refuse_option(option)
        if not allow_unpriced and prices.name(name) is None:
            refuse("model_not_priced", model=shown_model(name))
        if route.kind != "chat":
            option = f"model {shown_model(name)} (a web search off a chat completion)"
            refuse_option(option)
        sonar = True
    options = body.get("web_search_options")
    if not sonar or not isinstance(options, dict):
        return
    for key, priced in _SONAR_FEE_OPTIONS.items():
        value = options.get(key)
        if value is None or (isinstance(value, str) and value in priced):
            continue
        shown = shown_model(value) if isinstance(value, str) else _json_type(value)
        option = f"web_search_options.{key} {shown} (a dearer search fee)"
        refuse_option(option)


def _check_server_searches(body: dict[str, Any]) -> None:
    """A chat's server-run web search is charged one call an answer: held to
    one search's worth, as the web plugin is (review 11, R11-2) - OpenRouter's
    at most `_WEB_RESULTS` results, Claude's (through LiteLLM) ``max_uses: 1``."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str) or kind in _FREE_TOOLS or not _is_web_search(kind):
            continue
        assert isinstance(tool, dict)
        parameters = tool.get("parameters")
        results = (
            parameters.get("max_results", _WEB_RESULTS)
            if isinstance(parameters, dict)
            else _WEB_RESULTS
        )
        uses = tool.get("max_uses", 1 if kind.startswith("openrouter:") else None)
        if not (type(results) is int and 1 <= results <= _WEB_RESULTS and uses == 1):
            option = f"tools.{shown_model(kind)} (more than one search an answer)"
            refuse_option(option)


def _is_web_search(call: str) -> bool:
    """Whether a paid call is a web search, counted against
    ``web_searches_per_day`` (review-sec F4): OpenAI's (``web_search``,
    ``web_search_preview``, ``chat_web_search``), and a server-run tool named
    one (``openrouter:web_search``, Claude's ``web_search_20250305``; review 11)."""
    return "web_search" in call


def _asks_openrouters_web(body: dict[str, Any], model: str | None) -> bool:
    """OpenRouter's web search, which it bills per result on top of the model
    (review 9, R9-7): its ``web`` plugin, or a model named with ``:online``."""
    if is_online(model):
        return True
    plugins = body.get("plugins")
    return isinstance(plugins, list) and any(
        isinstance(p, dict) and p.get("id") == _WEB_PLUGIN for p in plugins
    )


def _check_plugins(route: Route, body: dict[str, Any], model: str | None) -> None:
    """OpenRouter's ``plugins`` and ``provider``, and its ``:online`` models:
    paid work beside the model's, or a host dearer than the one the table
    prices (reviews 9 and 10). A chat's ``web`` plugin (at most
    `_WEB_RESULTS` results, OpenRouter's default) and ``:online`` model are its
    web search, priced and counted as a chat's; any other plugin, a web search
    off a chat, and a provider choice that may cost more are refused."""
    if route.kind != "chat":
        for name in (model, *fallback_models(body)):
            if isinstance(name, str) and is_online(name):
                refuse_plugin(_WEB_PLUGIN)
    plugins = body.get("plugins")
    if plugins is not None:
        if not isinstance(plugins, list):
            raise BadRequest("plugins must be an array.", code="invalid_param")
        for plugin in plugins:
            name = plugin.get("id") if isinstance(plugin, dict) else None
            if route.kind != "chat" or name != _WEB_PLUGIN:
                refuse_plugin(name)
            assert isinstance(plugin, dict)
            results = plugin.get("max_results", _WEB_RESULTS)
            if not set(plugin) <= _WEB_PLUGIN_KEYS or not (
                type(results) is int and 1 <= results <= _WEB_RESULTS
            ):
                refuse_option(_WEB_OPTION)
    provider = body.get("provider")
    if provider is not None:
        if not isinstance(provider, dict):
            raise BadRequest("provider must be an object.", code="invalid_param")
        for key, value in provider.items():
            if key not in _PROVIDER_NEUTRAL or value != _PROVIDER_NEUTRAL[key]:
                option = f"provider.{shown_model(str(key))}"
                refuse_option(option)


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
