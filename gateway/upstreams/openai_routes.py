"""The OpenAI-compatible route table: every route the gateway knows, each with its role.

Default deny (issue 20): before, every request that was not a POST was
forwarded with the operator's key, so any user could delete fine-tuned models,
files, vector stores and stored answers, or read stored chat completions and
file contents. Now a route not declared here is refused 404, and the API's
account-wide objects (files, fine-tuning, vector stores, batches, assistants,
the organization...) are operator-only, refused 403. Objects an answer created
for a user (a stored response, a stored chat completion) are forwarded only to
that user: the ledger records the upstream's object id as the answer's id (see
``ObjectIdMeter``), and the proxy checks it (``Route.owned_answer``). The table
is in docs/security.md and docs/upstreams/openai.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Final
from urllib.parse import unquote

import orjson

from gateway.sse import ServerSentEvent
from gateway.upstreams.base import Route, StreamMeter, names_file
from gateway.usage import Metered

__all__ = [
    "CHAT",
    "COMPLETION",
    "EMBEDDING",
    "OPERATOR",
    "RESPONSE",
    "UNKNOWN",
    "ObjectIdMeter",
    "openai_route",
    "refine_answer",
    "with_object_id",
]

# by_body (both): an answer whose input names the account's files by id is the
# operator's (``refine_answer``).
CHAT: Final = Route("chat", "chat/completions", role="answer", by_body=True)
COMPLETION: Final = Route("completion", "completions", role="answer")
EMBEDDING: Final = Route("embedding", "embeddings", role="answer")
# by_body: a response that continues a stored one (previous_response_id) or a
# conversation reads what those hold; ``refine`` names them for the proxy's checks.
RESPONSE: Final = Route("response", "responses", role="answer", by_body=True)
OPERATOR: Final = Route("operator", "operator", role="operator")
UNKNOWN: Final = Route("unknown", "unknown")

_EXACT: Final[dict[tuple[str, str], Route]] = {
    ("POST", "chat/completions"): CHAT,
    ("POST", "completions"): COMPLETION,
    ("POST", "embeddings"): EMBEDDING,
    ("POST", "responses"): RESPONSE,
    ("GET", "models"): Route("models", "models", role="passthrough", lists_models=True),
    # Free, and keeps nothing.
    ("POST", "moderations"): Route("moderation", "moderations", role="passthrough"),
    # Lists of every user's stored answers.
    ("GET", "chat/completions"): OPERATOR,
    ("GET", "responses"): OPERATOR,
}

_SEG = r"[^/]+"
# Objects an answer created, forwarded only to the user the ledger names:
# (methods, pattern, kind, ledger name). The object's id is the pattern's group 1.
_OWNED: Final[tuple[tuple[frozenset[str], re.Pattern[str], str, str], ...]] = tuple(
    (frozenset(methods), re.compile(pattern), kind, name)
    for methods, pattern, kind, name in (
        (("GET", "DELETE"), rf"responses/({_SEG})", "stored_response", "responses/object"),
        (("GET",), rf"responses/({_SEG})/input_items", "stored_response", "responses/input_items"),
        (("POST",), rf"responses/({_SEG})/cancel", "stored_response", "responses/cancel"),
        (
            ("GET", "POST", "DELETE"),
            rf"chat/completions/({_SEG})",
            "stored_chat",
            "chat/completions/object",
        ),
        (
            ("GET",),
            rf"chat/completions/({_SEG})/messages",
            "stored_chat",
            "chat/completions/messages",
        ),
    )
)
_MODEL: Final = re.compile(rf"models/({_SEG})")
# Account-wide objects and paid endpoints the gateway cannot meter: operator only.
# (Conversations too: the ledger cannot yet tell whose a conversation is.)
_OPERATOR_PREFIXES: Final = frozenset(
    {
        "assistants",
        "audio",
        "batches",
        "chatkit",
        "containers",
        "conversations",
        "evals",
        "files",
        "fine_tuning",
        "fine-tunes",
        "images",
        "organization",
        "projects",
        "realtime",
        "threads",
        "uploads",
        "vector_stores",
        "videos",
    }
)


def openai_route(method: str, path: str) -> Route:
    """The route of a request; ``path`` is relative to the API base."""
    key = path.strip("/")
    route = _EXACT.get((method, key))
    if route is not None:
        return route
    for methods, pattern, kind, name in _OWNED:
        if method in methods:
            match = pattern.fullmatch(key)
            if match is not None:
                return Route(kind, name, role="scoped", owned_answer=match.group(1))
    model = _MODEL.fullmatch(key)
    if model is not None:
        # Reading a model is harmless; deleting one (a fine-tuned model) is not.
        # The model read is the one the upstream decodes from the path (issue 21:
        # checked against the plan's allow-list).
        if method != "GET":
            return OPERATOR
        return Route("models", "models", role="passthrough", model=unquote(model.group(1)))
    if key.split("/", 1)[0] in _OPERATOR_PREFIXES:
        return OPERATOR
    return UNKNOWN


# A response that would read or extend a conversation: operator-only like the
# conversations themselves (the ledger cannot tell whose a conversation is).
_IN_CONVERSATION: Final = Route("response", "responses/conversation", role="operator")


# A response whose input names stored items by id: OpenAI looks the id up across the
# whole project, and the ledger does not know whose an item is.
_ITEM_REFERENCE: Final = Route("response", "responses/item_reference", role="operator")


def _is_item_reference(item: object) -> bool:
    """An input item OpenAI resolves by id from storage: ``type`` "item_reference",
    or (the type being optional for it) an id with no content of its own."""
    if not isinstance(item, dict) or "id" not in item:
        return False
    kind = item.get("type")
    return kind == "item_reference" or (kind is None and "content" not in item)


# An answer whose input or tools name the account's files, vector stores or
# containers by id: OpenAI looks them up across the whole project, as on the
# /files, /vector_stores and /containers routes, which are the operator's
# (review-sec F3): the model would read, and quote, any of them.
_ACCOUNT_FILES: Final = Route("account_files", "account_files", role="operator")


def _tool_names_objects(tool: object) -> bool:
    """A Responses tool that reads the account's stored objects: ``file_search``
    (its vector stores), ``code_interpreter`` in an existing container or with
    files by id."""
    if not isinstance(tool, dict):
        return False
    kind = tool.get("type")
    if kind == "file_search":
        return True
    if kind == "code_interpreter":
        container = tool.get("container")
        return (
            isinstance(container, str)
            or names_file(container)
            or (isinstance(container, dict) and bool(container.get("file_ids")))
        )
    return False


def refine_answer(route: Route, body: dict[str, Any] | None) -> Route:
    """An answer request, as its body makes it. Either kind that names the
    account's files (or a response's tools its vector stores or containers) is
    operator-only. A new response that continues a stored response is checked
    like a read of that response (its owner must be the caller), since the
    model is given everything the earlier one held; one that reads a
    conversation or a stored item by reference is operator-only."""
    if body is None:
        return route
    if route is CHAT:
        return _ACCOUNT_FILES if names_file(body.get("messages")) else route
    if route is not RESPONSE:
        return route
    if body.get("conversation") is not None:
        return _IN_CONVERSATION
    items = body.get("input")
    if isinstance(items, list) and any(_is_item_reference(item) for item in items):
        return _ITEM_REFERENCE
    tools = body.get("tools")
    # A stored prompt's variables may be input parts too.
    if (
        names_file(items)
        or names_file(body.get("prompt"))
        or (isinstance(tools, list) and any(_tool_names_objects(tool) for tool in tools))
    ):
        return _ACCOUNT_FILES
    previous = body.get("previous_response_id")
    if isinstance(previous, str):
        return dataclasses.replace(route, owned_answer=previous, by_body=False)
    return route


# --- the upstream object id an answer is recorded under ----------------------------------

# An id this short may repeat (some compatible servers number their answers from a
# small range, such as "chatcmpl-123"); the ledger is unique on the answer id and
# would take a repeat for a retry of the same answer, and drop it. Such answers keep
# the gateway's own id (and so cannot be read back through the gateway).
_MIN_ID_SUFFIX: Final = 8
_ID_PREFIXES: Final = {"response": "resp_", "chat": "chatcmpl-"}


def _keeps_object(route: Route, body: dict[str, Any]) -> bool:
    """Whether the upstream keeps the answer as an object its user may read back:
    a response (stored unless ``store`` is false) or a chat completion asked for
    with ``store`` true."""
    if route.kind == "response":
        return body.get("store") is not False
    return route.kind == "chat" and body.get("store") is True


def _usable_id(route: Route, value: object) -> str | None:
    prefix = _ID_PREFIXES.get(route.kind)
    if (
        prefix is not None
        and isinstance(value, str)
        and value.startswith(prefix)
        and len(value) - len(prefix) >= _MIN_ID_SUFFIX
    ):
        return value
    return None


def _object_id(route: Route, obj: object) -> str | None:
    if not isinstance(obj, dict):
        return None
    if route.kind == "response" and isinstance(obj.get("response"), dict):
        return _usable_id(route, obj["response"].get("id"))  # a response.* stream event
    return _usable_id(route, obj.get("id"))


def with_object_id(route: Route, body: dict[str, Any], answer: object, metered: Metered) -> Metered:
    """A blocking answer's ``metered`` recorded under the object id it created;
    ``answer`` is its body as the meter parsed it (None if unreadable)."""
    if metered.answer_id is not None or not _keeps_object(route, body):
        return metered
    answer_id = _object_id(route, answer)
    return metered if answer_id is None else dataclasses.replace(metered, answer_id=answer_id)


class ObjectIdMeter:
    """A stream meter whose result is recorded under the object id the stream names
    (a chat chunk's ``id``, a ``response.created`` event's ``response.id``). Only
    events up to the first one naming it are parsed."""

    __slots__ = ("_id", "_looking", "_meter", "_route")

    def __init__(self, meter: StreamMeter, route: Route) -> None:
        self._meter, self._route = meter, route
        self._id: str | None = None
        self._looking = True

    @property
    def task_id(self) -> str | None:
        return self._meter.task_id

    def feed(self, event: ServerSentEvent) -> None:
        self._meter.feed(event)
        if self._looking and event.data and event.data != "[DONE]":
            try:
                obj = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                return
            self._id = _object_id(self._route, obj)
            # The first event names the object, or the stream does not name it.
            self._looking = False

    def finish(self, *, cut: bool) -> Metered:
        metered = self._meter.finish(cut=cut)
        if self._id is None or metered.answer_id is not None:
            return metered
        return dataclasses.replace(metered, answer_id=self._id)


def object_id_meter(route: Route, body: dict[str, Any], meter: StreamMeter) -> StreamMeter:
    """``meter``, recording the answer under its object id when the upstream keeps it."""
    return ObjectIdMeter(meter, route) if _keeps_object(route, body) else meter
