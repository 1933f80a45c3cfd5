"""The Anthropic route table: every route the gateway knows, each with its role.

Default deny, as for the other dialects (docs/security.md): a route not declared
here is refused 404. ``POST /messages`` is the metered answer; counting a
prompt's tokens and reading the model list cost nothing and keep nothing, so
they pass through. Everything account-wide, or paid in a way the request does
not show (message batches, whose answers are fetched later by anyone holding
the key; files; skills; the admin API under ``/organizations``; the legacy text
completions) is the operator's, refused 403. The table is in docs/security.md
and docs/upstreams/anthropic.md.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

from gateway.upstreams.base import Route

__all__ = ["MESSAGE", "OPERATOR", "UNKNOWN", "anthropic_route"]

MESSAGE: Final = Route("message", "messages", role="answer")
OPERATOR: Final = Route("operator", "operator", role="operator")
UNKNOWN: Final = Route("unknown", "unknown")
_MODELS: Final = Route("models", "models", role="passthrough", lists_models=True)

_EXACT: Final[dict[tuple[str, str], Route]] = {
    ("POST", "messages"): MESSAGE,
    ("POST", "messages/count_tokens"): Route(
        "count_tokens", "messages/count_tokens", "passthrough"
    ),
    ("GET", "models"): _MODELS,
}
_MODEL: Final = re.compile(r"models/([^/]+)")
# Account-wide objects and paid work the gateway cannot meter: operator only.
_OPERATOR_PREFIXES: Final = frozenset(
    {"complete", "files", "organizations", "skills", "agents", "environments", "sessions"}
)


def anthropic_route(method: str, path: str) -> Route:
    """The route of a request; ``path`` is relative to the API base."""
    key = path.strip("/")
    route = _EXACT.get((method, key))
    if route is not None:
        return route
    model = _MODEL.fullmatch(key) if method == "GET" else None
    if model is not None:
        # A model read names its model: checked against the plan's allow-list.
        return Route("models", "models", role="passthrough", model=unquote(model.group(1)))
    if key == "messages/batches" or key.startswith("messages/batches/"):
        return OPERATOR
    if key.split("/", 1)[0] in _OPERATOR_PREFIXES:
        return OPERATOR
    return UNKNOWN
