"""The seam between the proxy core and one upstream API (a "dialect").

The proxy core knows HTTP, SSE framing and accounting; a dialect knows the API.
Adding an upstream means adding one module here and one line in the registry
(``gateway/upstreams/__init__.py``); the proxy never names an endpoint, a field
or a header of any one API. What a dialect provides, in the order the proxy
uses it for one request:

``key_header`` and ``upstream_credentials(upstream)``
    Where this API's clients send their key besides ``Authorization: Bearer``
    (Anthropic's ``x-api-key``; None: nowhere else) - the gateway reads the
    gateway key there and never forwards that header - and the headers that
    carry the operator's key upstream, with the account it acts for (OpenAI's
    organization and project, Anthropic's workspace) as the upstream's table
    sets it.

``route(method, path) -> Route``
    Classifies a request (``path`` is relative to the API base, e.g.
    "/chat-messages"). Which kinds of route exist is the dialect's business: the
    proxy only reads the route's ``role`` (see ``Role``: answer, side_cost,
    scoped, passthrough, operator, unknown - default deny: a route the dialect
    does not declare is refused), ``is_history`` (a page filtered to the plan's
    history window), ``is_upload`` (a file held to the plan's file size and
    counted), ``call`` (a side cost's price name), ``owned_answer`` (the answer
    the ledger must show is the caller's), its ``kind`` (a label for metrics
    and logs) and its ``name`` (the endpoint as the ledger records it).

``refine(route, body) -> Route``
    For a route whose role the body decides (``by_body``), the route once the
    JSON body is read.

``requested_models(route, body) -> tuple[str | None, ...] | None``
    The models a request asks the upstream to run, read where the upstream
    reads them (the body's ``model``, a tool's own ``model``, a model read's
    path): checked against the plan's allow-list before anything is reserved
    or forwarded (gateway/model_access.py). None: the request names no model
    the gateway can check (a Dify app fixes its own; a route that runs none);
    a None item: the request should name a model and does not.

``filter_models(route, page, allowed) -> dict``
    A model list (``route.lists_models``) holding only the models for which
    ``allowed(id)`` is true; returns ``page`` itself when nothing was removed.

``routed_model(route, body) -> str | None`` and ``merge_models(pages) -> dict``
    Issue 23, several upstreams on one mount: the model that picks the upstream
    (the body's ``model``, or the model a model read names; None: the request
    names none and goes to the mount's first upstream), and the model lists of
    the mount's upstreams as one list.

``model_list_query(query, previous) -> bytes | None`` and ``page_models(route, merged, query) -> dict``
    The model list of a shared mount, for an API whose list is paged
    (Anthropic's): the query string asking one upstream for the first page of
    its whole list (``previous`` None: the client's query without its paging
    parameters, for the largest page) or for the page after ``previous`` (None:
    that was the last); and the page the client asked for (its paging
    parameters in ``query``) of the merged list. An API whose list is one page
    (OpenAI's) forwards the client's query once and answers the list whole.

``check_headers(route, headers)``
    Refuses, before anything is reserved, a request whose headers (as they
    would be forwarded) ask the upstream for something the gateway does not
    price: Anthropic's long-context beta (review-sec F2). Most dialects read
    no header and return at once.

``prepare(route, body, query, user_id, *, method, request_id) -> Prepared``
    Puts the authenticated end user where this API reads it: into the parsed
    JSON request body (``body``, rewritten in place; None when the request has
    no JSON body) and/or the raw query string. May also rewrite the body for
    metering (an OpenAI-style dialect asks for ``stream_options.include_usage``)
    and add upstream request headers (Dify's ``x-trace-id``). Whatever the
    dialect must remember about what it did goes in ``Prepared.memo``; the
    proxy hands the ``Prepared`` back to ``stream_transform``. Runs before
    admission, so a body it cannot handle is refused with nothing reserved.
    Form and multipart bodies are not parsed: the proxy writes the user into
    the field named ``user_field``.

``is_streaming(route, body)``
    A hint whether the answer will be SSE (it picks the upstream timeout; the
    response's Content-Type decides how it is read).

``stream_meter(route, body) -> StreamMeter``, ``meter_blocking(route, body, response)``,
``unanswered(route, body)``
    Usage of a streamed answer, of a blocking (one JSON body) answer, and an
    estimate for an answer the upstream took but never answered in time.
    ``body`` is always the JSON body as sent upstream. A meter names the paid
    calls an answer made that no call price covers in ``Metered.unpriced_calls``
    (counted, logged once: the answer had already run).

``cost_unreported(route, body) -> bool``
    Whether the answer will not say what it cost and the gateway cannot price
    it (Dify's blocking workflow run): admission refuses it where a money
    budget applies, which could not hold it.

``cost_unbounded(route, body) -> str | None``
    What in the request makes the upstream add to the prompt what the body
    does not hold, so that no bound of its cost can be told (a remote MCP
    server's tool list and results): admission refuses it where a money budget
    applies, naming it; None for a request whose bound holds.

``stream_transform(route, prepared) -> StreamTransform | None``
    Lets the dialect change what the client receives of a stream, e.g. hide
    an SSE event it made the upstream add (an injected final usage chunk).
    The meter still sees every upstream byte. None (the usual answer) costs
    nothing per chunk: the upstream bytes are passed on untouched.
    ``gateway.upstreams.transforms.DropEvents`` drops whole events by a predicate.

``filter_history(route, query, page, cutoff) -> dict``
    A history page (``route.is_history``) limited to items at or after the
    POSIX time ``cutoff``; returns ``page`` itself when nothing was removed.

``stop_request(route, task_id, user_id) -> (path, body) | None`` and ``stops_by_closing``
    How a running answer is stopped upstream: a POST of ``body`` to ``path``,
    or, for an API without a stop endpoint (``stops_by_closing`` True), by
    closing the upstream connection - the proxy then stops reading and closes it.

``bills_errors`` and ``billed_error(route, body, status, content) -> bool``
    Whether an HTTP error answering an answer request may come after the
    upstream ran, and billed, some of it (a Dify blocking run that failed after
    its LLM nodes ran). Where ``bills_errors``, the proxy reads such an error
    whole and asks ``billed_error``: True keeps the query spent and charges the
    prompt's estimate (outcome ``error``), as a stream that ends in an error
    event is charged; False gives the reservation back.

``error_body(status, code, message)`` and ``stream_error(status, code, message)``
    The API's own error shapes, as a response body and as a complete SSE frame
    sent when a stream breaks after its headers went out, so frontends show the
    gateway's refusals unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, Protocol, runtime_checkable

from gateway.errors import BadRequest, Forbidden
from gateway.messages import ENTRIES, english
from gateway.model_access import shown_model
from gateway.sse import ServerSentEvent
from gateway.usage import Metered

if TYPE_CHECKING:
    from gateway.config import UpstreamConfig

Headers = list[tuple[bytes, bytes]]


# What the gateway does with a route (docs/security.md, "Roles"). Closed: a route
# the dialect does not know is "unknown", and the proxy refuses it.
#   answer       a metered answer: admitted, forwarded, metered from the upstream's
#                own report, settled
#   side_cost    a paid call priced per use (``call`` names its [call_prices] entry):
#                admitted like an answer and settled at that price; refused when the
#                price is not configured
#   scoped       a read or write the upstream confines to the caller's own objects
#                (the gateway sets the user), or whose object the ledger shows is the
#                caller's (``owned_answer``)
#   passthrough  harmless for anyone to call: forwarded unmetered
#   operator     for the operator only (it reads or changes every user's data, or
#                spends money the gateway cannot meter): refused 403
#   unknown      not in the dialect's table: refused 404
Role = Literal["answer", "side_cost", "scoped", "passthrough", "operator", "unknown"]


@dataclass(frozen=True, slots=True)
class Route:
    """One class of request, as a dialect sees it; the proxy reads only the roles."""

    kind: str  # a label for metrics and logs, e.g. "chat"
    name: str  # the endpoint as the ledger records it, e.g. "chat-messages"
    role: Role = "unknown"
    is_history: bool = False  # a history page, filtered to the plan's window
    is_upload: bool = False  # a file upload, held to the plan's file size and counted
    # side_cost: the [call_prices."NAME"] entry that prices one call
    call: str | None = None
    # scoped: the upstream object (an answer's id) the ledger must show is the caller's
    owned_answer: str | None = None
    # The body decides the role (e.g. a rename that asks Dify to generate the name):
    # the proxy asks the dialect's ``refine`` once the JSON body is read.
    by_body: bool = False
    # Issue 21, model allow-lists: a list of the upstream's models (filtered to the
    # plan's), and the one model a read of a model names (checked against it).
    lists_models: bool = False
    model: str | None = None

    @property
    def produces_answer(self) -> bool:
        """A billable answer: admitted, metered, settled."""
        return self.role == "answer"

    @property
    def admitted(self) -> bool:
        """Reserved through admission before it is forwarded (answers and side costs)."""
        return self.role == "answer" or self.role == "side_cost"


@dataclass(slots=True)
class Prepared:
    """What ``prepare`` made of one request, before it is forwarded.

    ``body`` is the JSON body to send (the same dict ``prepare`` was given,
    rewritten), ``query`` the raw query string to send, ``headers`` upstream
    request headers added unless the client sent a header of that name, and
    ``memo`` anything the dialect wants back in ``stream_transform``.

    ``file_ids``: the upstream's stored files the request names by id, which
    must be uploads the gateway kept for the caller (``KeepsUploads``; review
    F9), else it is refused 404; ``files_by_value``: it gives files otherwise
    than as such uploads (a URL the upstream fetches itself), refused when the
    caller's plan limits uploads (F5).
    """

    body: dict[str, Any] | None
    query: bytes
    headers: Headers = field(default_factory=list)
    memo: Any = None
    file_ids: frozenset[str] = frozenset()
    files_by_value: bool = False


class StreamMeter(Protocol):
    """Reads one streamed answer's events and tells what it cost.

    ``feed`` is called for every decoded SSE event, on the hot path: it must stay
    cheap for plain text events and JSON-parse only events that can carry usage
    or identifiers.
    """

    @property
    def task_id(self) -> str | None: ...

    def feed(self, event: ServerSentEvent) -> None: ...

    def finish(self, *, cut: bool) -> Metered:
        """The answer's usage once the stream is over.

        ``cut`` is True when the stream did not end normally (connection error,
        timeout, or reading stopped early after a client disconnect).
        """
        ...


class StreamTransform(Protocol):
    """Changes the bytes of one stream on their way to the client.

    ``feed`` gets every upstream chunk and returns what to send now (it may
    hold bytes back, e.g. an incomplete event, and return b"" to send nothing);
    ``flush`` returns what is still held when the stream is over.
    """

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Upstream(Protocol):
    """One upstream API's dialect; see the module docstring for the order of use."""

    @property
    def kind(self) -> str:
        """The ``upstream.kind`` setting that selects this dialect."""
        ...

    @property
    def user_field(self) -> str:
        """The form / multipart field that names the end user."""
        ...

    @property
    def stops_by_closing(self) -> bool:
        """True when a running answer is stopped by closing the upstream connection."""
        ...

    @property
    def bills_errors(self) -> bool:
        """True when an HTTP error answering an answer may come after billed work."""
        ...

    def billed_error(
        self, route: Route, body: dict[str, Any], status: int, content: bytes | None
    ) -> bool:
        """Whether this HTTP error (its whole body) came after billed work (see
        above); ``content`` None: a body in an encoding the gateway cannot read,
        of an error that may or may not have come after billed work."""
        ...

    @property
    def key_header(self) -> bytes | None:
        """A request header, besides Authorization, that carries the client's key."""
        ...

    def upstream_credentials(self, upstream: UpstreamConfig) -> tuple[tuple[bytes, bytes], ...]:
        """The request headers that give the upstream the operator's key
        (``upstream.api_key``) and the account it acts for, as ``upstream`` sets
        it: who is billed and whose stored objects the key reaches are the
        operator's choice, so a client's own such headers are never forwarded
        (`gateway.http`)."""
        ...

    def route(self, method: str, path: str) -> Route:
        """Classify a request; ``path`` is relative to the API base, e.g. "/chat-messages"."""
        ...

    def refine(self, route: Route, body: dict[str, Any] | None) -> Route:
        """The route once its JSON body is known; called only for ``route.by_body``."""
        ...

    def check_headers(self, route: Route, headers: Headers) -> None:
        """Refuse a request whose forwarded headers change its price (see above)."""
        ...

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
        """Set the end user (and anything else the API needs) on a request."""
        ...

    def is_streaming(self, route: Route, body: dict[str, Any]) -> bool:
        """Whether a request for ``route`` with this JSON body will be answered as SSE."""
        ...

    def stream_meter(self, route: Route, body: dict[str, Any]) -> StreamMeter: ...

    def stream_transform(self, route: Route, prepared: Prepared) -> StreamTransform | None:
        """What to change in a stream before the client sees it; None: nothing."""
        ...

    def meter_blocking(self, route: Route, body: dict[str, Any], response: bytes) -> Metered:
        """Usage of an answer given as one JSON body (blocking mode)."""
        ...

    def unanswered(self, route: Route, body: dict[str, Any]) -> Metered:
        """An estimate for an answer request the upstream took but never answered
        in time (it may have generated, and billed, the answer all the same)."""
        ...

    def cost_unreported(self, route: Route, body: dict[str, Any]) -> bool:
        """Whether the answer to this request will not say what it cost, and the
        gateway cannot price it either (Dify's blocking workflow run: its body
        holds its total tokens only). A money budget cannot hold such an answer:
        admission refuses it where one applies (`Admitter.admit`)."""
        ...

    def cost_unbounded(self, route: Route, body: dict[str, Any]) -> str | None:
        """What makes the upstream add to the prompt what the body does not hold
        (a remote MCP server's tools and results, billed as input), so that the
        answer's money bound is not one: admission refuses it where a money
        budget applies (`Admitter.admit`, review-limits F1). None: it holds."""
        ...

    def requested_models(
        self, route: Route, body: dict[str, Any] | None
    ) -> tuple[str | None, ...] | None:
        """The models the request names, where the upstream reads them (see above)."""
        ...

    def filter_models(
        self, route: Route, page: dict[str, Any], allowed: Callable[[str], bool]
    ) -> dict[str, Any]:
        """A model list limited to the allowed models (see above)."""
        ...

    def routed_model(self, route: Route, body: dict[str, Any] | None) -> str | None:
        """The model that picks the upstream on a shared mount (see above)."""
        ...

    def merge_models(self, pages: list[dict[str, Any]]) -> dict[str, Any]:
        """Several upstreams' model lists (at least one) as one (see above)."""
        ...

    def model_list_query(self, query: bytes, previous: dict[str, Any] | None) -> bytes | None:
        """What to ask an upstream of a shared mount for next (see above)."""
        ...

    def page_models(self, route: Route, merged: dict[str, Any], query: bytes) -> dict[str, Any]:
        """The client's page of a shared mount's model list (see above)."""
        ...

    def filter_history(
        self, route: Route, query: bytes, page: dict[str, Any], cutoff: float
    ) -> dict[str, Any]:
        """A history page without the items older than ``cutoff`` (POSIX seconds)."""
        ...

    def stop_request(self, route: Route, task_id: str, user_id: str) -> tuple[str, bytes] | None:
        """The path (relative to the base) and JSON body that stop a running answer."""
        ...

    def error_body(self, status: int, code: str, message: str) -> bytes:
        """An error body in this API's own shape, so frontends show it unchanged."""
        ...

    def stream_error(self, status: int, code: str, message: str) -> bytes:
        """A complete SSE frame telling the client a stream broke after it began."""
        ...


@runtime_checkable
class KeepsUploads(Protocol):
    """A dialect whose answers name uploaded files by id (Dify's): the gateway
    keeps whose each accepted upload is (review F9)."""

    def uploaded_file_id(self, route: Route, body: bytes | bytearray) -> str | None:
        """The id of the file an accepted upload (``route.is_upload``) created,
        read from the upstream's reply ``body``; None when it names none."""
        ...


def keep_models(page: dict[str, Any], allowed: Callable[[str], bool]) -> dict[str, Any]:
    """A model list whose ``data`` holds objects named by ``id`` (OpenAI's and
    Anthropic's shape), with only the allowed models; returns ``page`` itself
    when nothing was removed. A list it cannot read is emptied, not passed on
    whole."""
    data = page.get("data")
    if not isinstance(data, list):
        return {**page, "data": []}
    kept = [
        item
        for item in data
        if isinstance(item, dict) and isinstance(item.get("id"), str) and allowed(item["id"])
    ]
    return page if len(kept) == len(data) else {**page, "data": kept}


def merge_model_lists(pages: list[dict[str, Any]]) -> dict[str, Any]:
    """Model lists in OpenAI's and Anthropic's shape as one: the models of each
    ``data`` in order, an id listed twice kept once (the first), the first
    page's other fields. Paging fields describe the merged list as one whole
    page (``has_more`` false, ``first_id``/``last_id`` its ends), which the
    dialect's ``page_models`` then pages as the client asked."""
    seen: set[str] = set()
    data: list[Any] = []
    for page in pages:
        items = page.get("data")
        for item in items if isinstance(items, list) else ():
            model = item.get("id") if isinstance(item, dict) else None
            if isinstance(model, str) and model not in seen:
                seen.add(model)
                data.append(item)
    merged = {**pages[0], "data": data}
    if "has_more" in merged:
        merged["has_more"] = False
    if "first_id" in merged:
        merged["first_id"] = data[0]["id"] if data else None
    if "last_id" in merged:
        merged["last_id"] = data[-1]["id"] if data else None
    return merged


def names_file(value: object) -> bool:
    """Whether a request's content (messages, input items and their parts, at
    any depth) names an upstream file by id: an object with a non-null
    ``file_id`` (OpenAI's chat ``file`` part and Responses ``input_file`` /
    ``input_image``, Anthropic's ``source.type == "file"`` and
    ``container_upload``). The upstream looks such an id up across the whole
    account, as it does on its /files routes, which are the operator's
    (review-sec F3). Strings are not looked into: a tool's JSON arguments are
    text to the upstream."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("file_id") is not None:
                return True
            stack.extend(child for child in node.values() if isinstance(child, dict | list))
        elif isinstance(node, list):
            stack.extend(child for child in node if isinstance(child, dict | list))
    return False


# What a router in front of the provider reads in a body as its operator's
# choices, as it reads the header families the gateway drops (gateway/http.py,
# `_ROUTER_PREFIXES`): none of them is the providers' API (reviews 8 and 9).
# Taken out: LiteLLM's own metadata (its ``user`` is the end user, read before
# the gateway's ``metadata.user_id``), the tags it routes and budgets by, and
# the body forms of its x-litellm-timeout, -stream-timeout and -num-retries.
_ROUTER_FIELDS: Final = ("litellm_metadata", "tags", "timeout", "stream_timeout", "num_retries")
# Taken out of ``metadata``: LiteLLM's spend-log metadata and a deployment's
# prices (``model_info``), which it registers for every later call.
_ROUTER_METADATA: Final = ("spend_logs_metadata", "model_info")
# Refused: ``extra_body`` is a client library's option, not an API field, and
# LiteLLM hands it to the OpenAI SDK, which merges it over the checked fields
# (``model``, ``user``, ``service_tier``); ``api_base``/``base_url`` with
# ``api_key`` send the call, with a key of the client's, to a host of its choice.
_REFUSED_FIELDS: Final = (
    "extra_body",
    "extra_headers",  # headers LiteLLM sends on (an unpriced anthropic-beta)
    "headers",
    "api_base",
    "base_url",
    "api_key",
)


# Models that search the web before every answer, billed per answer whatever
# the request asks: OpenAI's search models (gpt-4o-search-preview,
# gpt-4o-mini-search-preview-2025-03-11, gpt-5-search-api) and Perplexity's
# Sonar models (docs.perplexity.ai/getting-started/pricing: ``sonar``,
# ``sonar-pro``, ``sonar-reasoning-pro``...), asked of Perplexity itself, after a
# router's provider prefix (OpenRouter's ``perplexity/sonar-pro``), with a
# router's variant suffix (``:floor``), or inside a router's own name for its
# deployment (LiteLLM's example ``perplexity-sonar-reasoning-model``; review
# R-SONAR-2) - "sonar" as a part of the name, between separators. Not a name
# that only holds the letters ("mysonar", "sonarqube-coder").
_SEARCH_MODEL: Final = re.compile(r"-search(?:-|$)")
SONAR: Final = re.compile(r"(?:^|[/._-])sonar(?:[-_.:]|$)", re.IGNORECASE)


def searches_every_answer(model: str | None) -> bool:
    """Whether ``model`` searches the web before every answer (`SONAR`, and
    OpenAI's ``-search`` models). Asked several times of every OpenAI answer:
    a usual name is looked at once (`_CACHED_NAME`)."""
    if model is None:
        return False
    return _searches_cached(model) if len(model) <= _CACHED_NAME else _searches(model)


def is_sonar(model: str) -> bool:
    """Whether ``model`` is one of Perplexity's Sonar models (`SONAR`)."""
    return _sonar_cached(model) if len(model) <= _CACHED_NAME else _sonar(model)


def is_online(model: str | None) -> bool:
    """Whether ``model`` is an OpenRouter ``:online`` model: its web plugin,
    billed per result, on every answer (review 9, R9-7)."""
    return model is not None and model.lower().endswith(":online")


def _searches(model: str) -> bool:
    return _SEARCH_MODEL.search(model) is not None or is_sonar(model)


def _sonar(model: str) -> bool:
    return SONAR.search(model) is not None


# The longest model name the checks above keep their answer for. A client names
# the model, and a request refused afterwards (an unpriced model) still asked:
# names of any length kept would let a caller pin the body limit's size a name,
# a thousand times over (review of the session, F1). Real names are far shorter.
_CACHED_NAME: Final = 128
_searches_cached = functools.lru_cache(maxsize=1024)(_searches)
_sonar_cached = functools.lru_cache(maxsize=1024)(_sonar)


def shown_value(value: object) -> str:
    """A client's value in a refusal: a string as a model name is shown
    (quoted, cut), any other value by its cut repr."""
    return shown_model(value) if isinstance(value, str) else repr(value)[:64]


def refuse_option(option: str) -> NoReturn:
    """Refuse a request for an option that would cost more than the gateway
    prices (403 ``option_not_priced``; ``option`` as the message shows it)."""
    refuse("option_not_priced", option=option)


def refuse(key: str, **fields: str) -> NoReturn:
    """403 with the message ``key`` of gateway/messages.py, in the caller's
    language where it is known (its code is the message's)."""
    raise Forbidden(english(key, **fields), code=ENTRIES[key].code, key=key, fields=fields)


def refuse_model_tool(tool: str, model: object) -> NoReturn:
    """Refuse a server tool that runs a model of its own as often as the answer
    decides, billed by that model's tokens (Anthropic's advisor, also through a
    router's OpenAI-compatible routes): no call price holds it (403
    ``tool_not_bounded``; review-meter F2)."""
    refuse("tool_not_bounded", tool=shown_model(tool), model=shown_value(model))


def refuse_plugin(name: object) -> NoReturn:
    """Refuse a router's plugin that bills work the gateway does not price
    (403 ``tool_not_priced``)."""
    refuse("plugin_not_priced", plugin=shown_value(name))


def mcp_option(body: dict[str, Any]) -> str | None:
    """What in a request asks the upstream for a remote MCP server, whose tool
    list and results it bills as input the body does not hold (review-limits
    F1): Anthropic's ``mcp_servers`` (which a router in front of Claude passes
    on too), or a tool whose type is an MCP one (``mcp``, ``mcp_toolset``); as
    a refusal names it, else None."""
    if body.get("mcp_servers"):
        return "mcp_servers"
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.lower().startswith("mcp"):
            return f"tools: {shown_model(kind)}"
    return None


def drop_router_fields(body: dict[str, Any]) -> None:
    """Take out of a body what a router in front of the provider reads as its
    operator's choices (`_ROUTER_FIELDS`, `_ROUTER_METADATA`, per-request
    prices ``*_cost_per_*``, ``metadata.tags`` when not a string: the
    providers' metadata values are strings); refuse what would override what
    the gateway checked (`_REFUSED_FIELDS`). A ``metadata`` that is not an
    object is left to the dialect (refused: a router parses a string one)."""
    for name in _REFUSED_FIELDS:
        if name in body:
            raise BadRequest(
                f"The field {name} is not accepted: it is not part of the API, and a "
                "router in front of the provider would read it over what the gateway checked.",
                code="invalid_param",
            )
    for name in _ROUTER_FIELDS:
        body.pop(name, None)
    for name in [name for name in body if "_cost_per_" in name]:
        del body[name]
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        for name in _ROUTER_METADATA:
            metadata.pop(name, None)
        if not isinstance(metadata.get("tags", ""), str):
            del metadata["tags"]
