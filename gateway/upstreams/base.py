"""The seam between the proxy core and one upstream API (Dify now, OpenAI next).

The proxy core knows HTTP, SSE framing and accounting; a dialect knows the API:
which paths produce billable answers, where the end user's id goes, how usage
appears in a stream or a blocking body, how to stop a running answer, and the
shape of an error body. Adding an upstream means adding one module here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.sse import ServerSentEvent
from gateway.usage import Metered

RouteKind = Literal[
    "chat",  # chat-messages (chat, agent, chatflow apps)
    "completion",  # completion-messages
    "workflow",  # workflows/run
    "stop",  # stopping a running answer
    "upload",  # file upload (multipart)
    "conversations",  # conversation list
    "messages",  # message history
    "other",  # anything else: forwarded, not metered
]


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    name: str  # the endpoint as the ledger records it, e.g. "chat-messages"

    @property
    def produces_answer(self) -> bool:
        return self.kind in ("chat", "completion", "workflow")


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


class Upstream(Protocol):
    kind: str

    def route(self, method: str, path: str) -> Route:
        """Classify a request; ``path`` is relative to the API base, e.g. "/chat-messages"."""
        ...

    def error_body(self, status: int, code: str, message: str) -> bytes:
        """An error body in this API's own shape, so frontends show it unchanged."""
        ...

    def set_user(self, body: dict[str, Any], user_id: str) -> None:
        """Write the authenticated end user into a JSON request body."""
        ...

    @property
    def user_field(self) -> str:
        """The query-string parameter / form field that names the end user."""
        ...

    def is_streaming(self, route: Route, body: dict[str, Any]) -> bool:
        """Whether a request for ``route`` with this JSON body will be answered as SSE."""
        ...

    def stream_meter(self, route: Route, body: dict[str, Any]) -> StreamMeter: ...

    def meter_blocking(self, route: Route, body: dict[str, Any], response: bytes) -> Metered:
        """Usage of an answer given as one JSON body (blocking mode)."""
        ...

    def unanswered(self, route: Route, body: dict[str, Any]) -> Metered:
        """An estimate for an answer request the upstream took but never answered
        in time (it may have generated, and billed, the answer all the same)."""
        ...

    def stop_request(self, route: Route, task_id: str, user_id: str) -> tuple[str, bytes] | None:
        """The path (relative to the base) and JSON body that stop a running answer."""
        ...
