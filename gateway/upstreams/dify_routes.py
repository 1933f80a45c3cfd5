"""Dify's route table: every Service API route the gateway knows, each with its role.

Default deny (issue 20): a route not declared here is refused 404; an operator
route (one that reads or changes every end user's data with the app key) is
refused 403. The table and the Dify behaviour each role relies on are in
docs/security.md and docs/upstreams/dify.md ("Routes").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Final

from gateway.errors import BadRequest
from gateway.upstreams.base import Route
from gateway.upstreams.dify_files import canonical_uuid

__all__ = [
    "AUTO_NAME",
    "CHAT",
    "COMPLETION",
    "CONVERSATIONS",
    "MESSAGES",
    "RENAME",
    "RESUME_EVENTS",
    "RESUME_SUBMIT",
    "TEXT_TO_AUDIO",
    "UNKNOWN",
    "UPLOAD",
    "WORKFLOW",
    "asks_to_generate",
    "canonical_conversation",
    "conversation_of",
    "dify_route",
    "names_new_conversation",
    "spoken_message",
]

# --- answers -----------------------------------------------------------------------------

CHAT: Final = Route("chat", "chat-messages", role="answer")  # chat, agent, chatflow
COMPLETION: Final = Route("completion", "completion-messages", role="answer")
WORKFLOW: Final = Route("workflow", "workflows/run", role="answer")
# Human-in-the-loop: submitting a paused run's form resumes the run (Dify answers {}
# and the LLM work goes on in its worker). The submit is the metered answer: it is
# admitted (a user with nothing left cannot resume anything), and the gateway reads
# the resumed run's events itself to settle it (gateway/follow.py). The client's
# own read of those events is a scoped read, neither admitted nor metered, so the
# run is charged once however often it is read. docs/upstreams/dify.md, "Human input".
RESUME_SUBMIT: Final = Route("resume", "form/human_input", role="answer")
# Dify serves a run's events only to the end user who started it.
RESUME_EVENTS: Final = Route("resume_events", "workflow/events", role="scoped")

# --- caller-scoped (Dify filters by the `user` the gateway sets) --------------------------

UPLOAD: Final = Route("upload", "files/upload", role="scoped", is_upload=True)
CONVERSATIONS: Final = Route("conversations", "conversations", role="scoped", is_history=True)
MESSAGES: Final = Route("messages", "messages", role="scoped", is_history=True)
RENAME: Final = Route("rename", "conversations/name", role="scoped", by_body=True)

# --- side costs (priced per call from [call_prices]) --------------------------------------

AUTO_NAME: Final = Route(
    "auto_name", "conversations/name", role="side_cost", call="dify.auto_generate_name"
)
_SUGGESTED: Final = Route(
    "suggested", "messages/suggested", role="side_cost", call="dify.suggested_questions"
)
# Its body decides what it reads (review F8): a `message_id` makes Dify speak that
# message's answer, which Dify 1.x looks up by id alone (no end user, not even the
# app: AudioService.transcript_tts), so the message must be the caller's answer.
TEXT_TO_AUDIO: Final = Route(
    "text_to_audio", "text-to-audio", role="side_cost", call="dify.text_to_audio", by_body=True
)
_AUDIO_TO_TEXT: Final = Route(
    "audio_to_text", "audio-to-text", role="side_cost", call="dify.audio_to_text"
)

UNKNOWN: Final = Route("unknown", "unknown")
_OPERATOR: Final = Route("operator", "operator", role="operator")


def _scoped(kind: str, name: str) -> Route:
    return Route(kind, name, role="scoped")


def _passthrough(name: str) -> Route:
    return Route("info", name, role="passthrough")


# Keyed by (method, path without surrounding slashes). ASGI methods are upper case.
_EXACT: Final[dict[tuple[str, str], Route]] = {
    ("POST", "chat-messages"): CHAT,
    ("POST", "completion-messages"): COMPLETION,
    ("POST", "workflows/run"): WORKFLOW,
    ("POST", "files/upload"): UPLOAD,
    ("GET", "conversations"): CONVERSATIONS,
    ("GET", "messages"): MESSAGES,
    ("POST", "text-to-audio"): TEXT_TO_AUDIO,
    ("POST", "audio-to-text"): _AUDIO_TO_TEXT,
    # App settings any end user's frontend reads (no user data).
    ("GET", "parameters"): _passthrough("parameters"),
    ("GET", "meta"): _passthrough("meta"),
    ("GET", "info"): _passthrough("info"),
    ("GET", "site"): _passthrough("site"),
    ("GET", ""): _passthrough("index"),
}

_SEG = r"[^/]+"
# (method, pattern, route), tried in order after the exact table.
_PATTERNS: Final[tuple[tuple[str, re.Pattern[str], Route], ...]] = tuple(
    (method, re.compile(pattern), route)
    for method, pattern, route in (
        # POST /workflows/{workflow_id}/run runs a specific published version.
        ("POST", rf"workflows/{_SEG}/run", WORKFLOW),
        # Stop calls: Dify stops a task only for the user who started it. The ledger
        # names them without the task id, so they aggregate.
        ("POST", rf"chat-messages/{_SEG}/stop", _scoped("stop", "chat-messages/stop")),
        ("POST", rf"completion-messages/{_SEG}/stop", _scoped("stop", "completion-messages/stop")),
        ("POST", rf"workflows/tasks/{_SEG}/stop", _scoped("stop", "workflows/tasks/stop")),
        # Conversations: Dify looks each one up with the caller's end user.
        ("DELETE", rf"conversations/{_SEG}", _scoped("conversation", "conversations/delete")),
        ("POST", rf"conversations/{_SEG}/name", RENAME),
        (
            "GET",
            rf"conversations/{_SEG}/variables",
            # A chatflow's memory of the conversation: held to the history
            # window as its messages are (review-limits F3).
            Route("variables", "conversations/variables", role="scoped", is_history=True),
        ),
        (
            "PUT",
            rf"conversations/{_SEG}/variables/{_SEG}",
            _scoped("variables", "conversations/variables"),
        ),
        # Messages: feedback and suggestions look the message up with the end user.
        ("POST", rf"messages/{_SEG}/feedbacks", _scoped("feedback", "messages/feedbacks")),
        ("GET", rf"messages/{_SEG}/suggested", _SUGGESTED),
        # Human input: the form token is a capability the caller's own stream gave it.
        ("GET", rf"form/human_input/{_SEG}", _scoped("form", "form/human_input")),
        ("POST", rf"form/human_input/{_SEG}", RESUME_SUBMIT),
        ("GET", rf"workflow/{_SEG}/events", RESUME_EVENTS),
        # --- operator only: every end user's data, with the app key -------------------
        ("GET", r"workflows/logs", _OPERATOR),  # every run's inputs and outputs
        ("GET", rf"workflows/run/{_SEG}", _OPERATOR),  # any run, no user check
        ("GET", r"app/feedbacks", _OPERATOR),  # every user's feedback
        ("*", r"apps/annotations(?:/.*)?", _OPERATOR),  # answers served to all users
        ("*", r"apps/annotation-reply(?:/.*)?", _OPERATOR),
        ("*", r"datasets(?:/.*)?", _OPERATOR),  # knowledge bases
        ("*", r"workspaces(?:/.*)?", _OPERATOR),  # the workspace's models
        ("GET", rf"end-users/{_SEG}", _OPERATOR),  # any end user's record
        # Any message file of the app, by id, with no user check (file_preview.py).
        ("GET", rf"files/{_SEG}/preview", _OPERATOR),
    )
)


def dify_route(method: str, path: str) -> Route:
    """The route of a request; ``path`` is relative to the API base."""
    key = path.strip("/")
    route = _EXACT.get((method, key))
    if route is not None:
        return route
    for wanted, pattern, candidate in _PATTERNS:
        if (wanted == method or wanted == "*") and pattern.fullmatch(key):
            return candidate
    return UNKNOWN


def spoken_message(route: Route, body: dict[str, Any] | None) -> Route:
    """Text-to-audio, as its body makes it: with a ``message_id``, a read of that
    answer, which the ledger must show is the caller's (``owned_answer``; 404
    otherwise); with text alone, the plain priced call. An empty id is none, as
    Dify reads it (``if message_id:``); one that is not a string is refused."""
    message_id = body.get("message_id") if body is not None else None
    if message_id is None or message_id == "":
        return route
    if not isinstance(message_id, str):
        raise BadRequest("The message_id must be a string.")
    # The ledger keeps Dify's ids as Dify writes them (lower case); Dify reads
    # any spelling of the same UUID as that id.
    return dataclasses.replace(route, owned_answer=canonical_uuid(message_id), by_body=False)


def _false_to_every_version(value: object) -> bool:
    """Whether every Dify version reads this boolean field as false: false and
    0 only (reqparse's ``type=bool`` reads "false" as true; pydantic's lax bool
    reads "yes" as true)."""
    if value is False:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def conversation_of(route: Route, body: dict[str, Any] | None) -> str | None:
    """The conversation a chat message continues, "" for a message that begins
    one; None for any other route. Dify answers a conversation's later messages
    with the inputs its first message gave (review-limits F5):
    gateway/conversations.py holds them to what that message asked for.

    The id as Dify reads it (``normalize_conversation_id``): stripped, blank (or
    absent, null, empty) begins a conversation, and anything else is read as a
    UUID (``uuid.UUID``: upper case, braces, a ``urn:uuid:`` prefix or no
    hyphens name the same conversation), so the gateway keeps and looks it up
    in its canonical form. The dialect forwards that form (`canonical_conversation`):
    the gateway and Dify read one value."""
    if route is not CHAT or body is None:
        return None
    found = body.get("conversation_id")
    if not isinstance(found, str):
        return ""
    found = found.strip()
    return canonical_uuid(found) if found else ""


def canonical_conversation(route: Route, body: dict[str, Any] | None) -> None:
    """Write a chat message's ``conversation_id`` in the form `conversation_of`
    reads (canonical, "" for blank), so that Dify reads what the gateway judged."""
    if body is not None and isinstance(body.get("conversation_id"), str):
        read = conversation_of(route, body)
        if read is not None:
            body["conversation_id"] = read


def names_new_conversation(route: Route, body: dict[str, Any] | None) -> bool:
    """Whether a chat request starts a conversation whose title Dify generates
    with the app's model (review F6): no ``conversation_id`` (absent, null,
    empty or blank: Dify starts a new one) and ``auto_generate_name`` not false
    (absent is true: Dify's default). An explicit null is no generation
    (reqparse keeps it as None; pydantic refuses the request)."""
    if conversation_of(route, body) != "":
        return False
    assert body is not None
    if "auto_generate_name" not in body:
        return True
    value = body["auto_generate_name"]
    return value is not None and not _false_to_every_version(value)


def asks_to_generate(body: dict[str, Any] | None) -> bool:
    """Whether a rename asks Dify to generate the name (an LLM call).

    Dify parses ``auto_generate`` loosely, and differently by version: pydantic's
    lax bool (1.x: "true", "1", "yes", 1 are true) or, in older builds, reqparse's
    ``type=bool``, where any non-empty string - "false" included - is true. So
    only the values every version reads as false count as "no": absent, null,
    false and 0.
    """
    if body is None:
        return False
    value = body.get("auto_generate")
    return value is not None and not _false_to_every_version(value)
