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
from typing import Any, Final
from urllib.parse import unquote

from gateway.upstreams.base import Route, names_file

__all__ = ["MESSAGE", "OPERATOR", "UNKNOWN", "anthropic_route", "refine_message"]

# by_body: a message that names the account's files or a container by id is the
# operator's (``refine_message``).
MESSAGE: Final = Route("message", "messages", role="answer", by_body=True)
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


# A message that names the account's objects by id (review-sec F3): a file
# (``source.type == "file"``, ``container_upload``), which Anthropic looks up
# across the whole workspace as on the /files routes, which are the operator's;
# an existing code-execution container (``container``, its id, holding another
# answer's files); or the workspace's own skills (``container.skills`` of type
# "custom", the /skills routes' objects).
_ACCOUNT_FILES: Final = Route("account_files", "account_files", role="operator")


def _names_container(container: object) -> bool:
    if isinstance(container, str):
        return True  # the id of an existing container
    if not isinstance(container, dict):
        return False
    if container.get("id") is not None:
        return True
    skills = container.get("skills")
    return isinstance(skills, list) and any(
        not isinstance(skill, dict) or skill.get("type") != "anthropic" for skill in skills
    )


def refine_message(route: Route, body: dict[str, Any] | None) -> Route:
    """A message, as its body makes it: operator-only when it names the
    account's files, a container or its skills (above)."""
    if body is None or route is not MESSAGE:
        return route
    if names_file(body.get("messages")) or _names_container(body.get("container")):
        return _ACCOUNT_FILES
    return route
