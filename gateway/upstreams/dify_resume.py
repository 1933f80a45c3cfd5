"""Metering of a resumed human-in-the-loop run (``GET /workflow/{task_id}/events``).

A run that paused for human input resumes when its form is submitted; the rest
of its LLM work is streamed by the events endpoint (docs/upstreams/dify.md,
"Human input"). Its ``workflow_finished`` total and a chatflow's ``message_end``
usage describe the whole run, the part before the pause included, which the
first stream already charged. So only the work this stream shows is counted:
the nodes that finish in it (``node_finished``, as for a workflow), or, if none
does, an estimate from the text it streamed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import orjson

from gateway.sse import ServerSentEvent
from gateway.usage import Metered, Outcome, Usage, estimate_usage

__all__ = ["ResumeMeter", "without_snapshot"]

_EVENT_TYPE: Final = re.compile(r'\s*\{\s*"event"\s*:\s*"([a-z_]+)"')
_TEXT: Final = frozenset({"text_chunk", "message", "agent_message"})
# Containers repeat their children's totals (see dify.py, _CONTAINER_NODES).
_CONTAINER_NODES: Final = frozenset({"iteration", "loop"})
_PARSED: Final = _TEXT | {"node_finished", "error"}


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


class ResumeMeter:
    """Sums what the nodes of a resumed run report in this stream."""

    __slots__ = (
        "_error",
        "_node_usage",
        "_nodes",
        "_run_id",
        "_seen_nodes",
        "_task_id",
        "_text_chars",
    )

    def __init__(self, node_usage: Callable[[dict[str, Any]], Usage]) -> None:
        # How one node_finished.data reads as usage: the workflow meter's own rule
        # (dify.py, _node_usage), so both read node reports alike.
        self._node_usage = node_usage
        self._task_id: str | None = None
        self._run_id: str | None = None
        self._nodes = Usage()
        self._seen_nodes = False
        self._text_chars = 0
        self._error: str | None = None

    @property
    def task_id(self) -> str | None:
        # The events endpoint has no stop call of its own: the gateway does not
        # stop a resumed run (the form submit already started it).
        return None

    def feed(self, event: ServerSentEvent) -> None:
        data = event.data
        if not data:
            return
        match = _EVENT_TYPE.match(data)
        kind = match.group(1) if match else None
        if kind is not None and kind not in _PARSED and self._run_id is not None:
            return  # nothing to learn from it (ids are known)
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("event") if kind is None else kind
        if self._task_id is None:
            self._task_id = _str_or_none(obj.get("task_id"))
        if self._run_id is None:
            self._run_id = _str_or_none(obj.get("workflow_run_id"))
        if kind == "node_finished":
            self._on_node(obj.get("data"))
        elif kind == "text_chunk":
            inner = obj.get("data")
            text = inner.get("text") if isinstance(inner, dict) else None
            self._text_chars += len(text) if isinstance(text, str) else 0
        elif kind in _TEXT:
            text = obj.get("answer")
            self._text_chars += len(text) if isinstance(text, str) else 0
        elif kind == "error":
            self._error = _str_or_none(obj.get("code")) or "error"

    def _on_node(self, data: object) -> None:
        if not isinstance(data, dict) or data.get("node_type") in _CONTAINER_NODES:
            return
        try:
            usage = self._node_usage(data)
        except ValueError:
            return
        self._seen_nodes = True
        self._nodes = self._nodes + usage

    def finish(self, *, cut: bool) -> Metered:
        usage: Usage | None = None
        if self._seen_nodes and (self._nodes.total_tokens or self._nodes.cost):
            usage = self._nodes
        elif self._text_chars:
            usage = estimate_usage(0, self._text_chars)
        outcome: Outcome = "error" if self._error else ("cut" if cut else "complete")
        if usage is None and outcome == "complete":
            outcome = "cut"  # nothing to charge: the reservation goes back
        # answer_id None: the ledger keys the row by the request (gw-<id>), since the
        # run's own id already names the row of the stream that paused.
        return Metered(
            None,
            self._task_id,
            None,
            usage,
            outcome,
            error_code=self._error,
        )


def without_snapshot(query: bytes) -> bytes:
    """The query without ``include_state_snapshot``: a snapshot replays the events of
    the run before the pause, which the gateway could not tell from new work."""
    if b"include_state_snapshot" not in query.lower() and b"%" not in query:
        return query
    from urllib.parse import unquote_to_bytes

    kept = [
        part
        for part in query.split(b"&")
        if unquote_to_bytes(part.split(b"=", 1)[0].replace(b"+", b" ")).lower()
        != b"include_state_snapshot"
    ]
    return b"&".join(kept)
