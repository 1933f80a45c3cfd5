"""Dify's human-in-the-loop resumes, as the gateway meters them (issue 20).

A workflow or chatflow run that pauses for human input names its form's token
(``human_input_required``, ``workflow_paused``); ``POST /form/human_input/{token}``
resumes the run in Dify's worker and answers ``{}`` at once. The rest of the
run's LLM work is streamed by ``GET /workflow/{run_id}/events`` to whoever
subscribes - nobody, one client or several (docs/upstreams/dify.md, "Human
input").

So the submit is the metered answer, and the gateway reads the run's events
itself (``gateway/follow.py``), subscribed before the submit is forwarded: the
run is charged once, whatever the client reads. This module holds the Dify part:
where the paused stream names the form, the follower's request, and its meter.

The meter counts only the work done after the resume: the nodes that finish in
the followed stream (``node_finished``, read as for a workflow), or, if none
does, an estimate from the text it streamed. ``workflow_finished``'s total and a
chatflow's ``message_end`` usage describe the whole run, the part before the
pause included, which the paused stream was already charged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote

import orjson

from gateway.sse import ServerSentEvent
from gateway.usage import Metered, Outcome, Usage, estimate_usage

__all__ = [
    "PAUSE_EVENTS",
    "ResumeMeter",
    "blocking_forms",
    "follow_request",
    "forms_named",
    "resumed_form",
]

_EVENT_TYPE: Final = re.compile(r'\s*\{\s*"event"\s*:\s*"([a-z_]+)"')
_TEXT: Final = frozenset({"text_chunk", "message", "agent_message"})
# Containers repeat their children's totals (see dify.py, _CONTAINER_NODES).
_CONTAINER_NODES: Final = frozenset({"iteration", "loop"})
# The events that name a paused run's forms.
PAUSE_EVENTS: Final = frozenset({"human_input_required", "workflow_paused"})
_PARSED: Final = _TEXT | PAUSE_EVENTS | {"node_finished", "workflow_started", "error"}
_ENDS: Final = frozenset({"workflow_finished"})
# Auto-play speech (review D2): with the app's text-to-speech on and auto-play
# enabled, Dify synthesises the answer's speech while it streams (its
# AppGeneratorTTSPublisher, for chat, agent, chatflow and workflow apps alike) and
# sends it as tts_message events, then tts_message_end: a paid TTS call left out of
# the usage it reports. Known by the event's name alone: its base64 audio is
# never parsed. tts_message_end alone is no call: Dify sends it whenever
# auto-play is on, and calls the model only for text (review R2-1: a pause or a
# failure before any text, an empty answer). The stream meter's (dify.py) and
# a resumed run's alike.
SPEECH_EVENTS: Final = frozenset({"tts_message"})
_FORM_PATH: Final = re.compile(r"/*form/human_input/([^/]+)/*")


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def forms_named(kind: str, obj: dict[str, Any], run_id: str | None) -> list[tuple[str, str]]:
    """The (form token, workflow run id) pairs a pause event names.

    ``human_input_required`` carries the form in ``data`` (``form_token``; null for
    a form not offered to the Service API). ``workflow_paused`` lists its reasons
    in ``data.reasons`` (a human-input reason has ``form_token`` in newer builds)
    and, in a blocking answer, the forms in ``data.human_input_forms``. Only these
    fixed fields are read, never a ``form_token`` found deeper (a run's outputs can
    hold text a user chose). The run is the envelope's ``workflow_run_id``, else
    the run the stream named before.
    """
    run = _str_or_none(obj.get("workflow_run_id")) or run_id
    data = obj.get("data")
    if run is None or not isinstance(data, dict):
        return []
    if kind == "human_input_required":
        candidates: list[object] = [data]
    else:
        candidates = []
        for key in ("reasons", "human_input_forms"):
            items = data.get(key)
            candidates += items if isinstance(items, list) else []
    return [
        (token, run)
        for item in candidates
        if isinstance(item, dict) and (token := _str_or_none(item.get("form_token")))
    ]


def blocking_forms(body: bytes | bytearray) -> list[tuple[str, str]]:
    """The forms a blocking answer paused for: Dify answers a run that pauses in
    blocking mode with ``{"event": "workflow_paused", "workflow_run_id", "data":
    {"status": "paused", "reasons": [...], "human_input_forms": [...], ...}}`` (a
    workflow's answer may lack the ``event``)."""
    if b"form_token" not in body:
        return []  # the common case, without parsing the body again
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(obj, dict):
        return []
    data = obj.get("data")
    paused = isinstance(data, dict) and data.get("status") == "paused"
    if obj.get("event") != "workflow_paused" and not paused:
        return []
    return list(dict.fromkeys(forms_named("workflow_paused", obj, None)))


def resumed_form(path: str) -> str | None:
    """The form token of a submit's path (``form/human_input/{token}``)."""
    match = _FORM_PATH.fullmatch(path)
    return match.group(1) if match else None


def follow_request(run_id: str, user_id: str) -> tuple[str, bytes]:
    """The path and query of the gateway's own read of a resumed run's events.

    ``user`` is the end user who started the run (Dify serves a run's events only
    to them). ``continue_on_pause``: the stream does not end at a replayed
    ``workflow_paused`` (Dify's Redis Streams transport replays a run's retained
    events from its start); the meter ends the read at a new pause itself. No
    ``include_state_snapshot``: it would replay the part before the pause.
    """
    query = f"user={quote(user_id, safe='')}&continue_on_pause=true"
    return f"/workflow/{quote(run_id, safe='')}/events", query.encode()


class ResumeMeter:
    """Sums what the nodes of a resumed run report after its resume.

    ``done`` turns True at the run's end: ``workflow_finished``, an ``error``, or a
    new pause (a ``workflow_paused`` that does not name the submitted form). A
    ``workflow_paused`` naming the submitted form is the paused part replayed
    (Redis Streams): what came before it is forgotten. So is what comes before
    any pause in a replay that starts at the run's first ``workflow_started``.
    """

    __slots__ = (
        "_done",
        "_error",
        "_form_token",
        "_forms",
        "_node_ids",
        "_node_usage",
        "_nodes",
        "_ours_asked",
        "_replaying",
        "_run_id",
        "_seen_nodes",
        "_speech",
        "_spoken",
        "_task_id",
        "_text_chars",
    )

    def __init__(
        self,
        node_usage: Callable[[dict[str, Any]], Usage],
        *,
        form_token: str | None = None,
        spoken: Callable[[Metered], Metered] | None = None,
    ) -> None:
        # How one node_finished.data reads as usage: the workflow meter's own rule
        # (dify.py, _node_usage), so both read node reports alike.
        self._node_usage = node_usage
        # How a run that streamed auto-play speech is charged: the stream meter's
        # own rule too (dify.py, _charge_speech).
        self._spoken = spoken
        self._speech = False
        self._form_token = form_token
        self._task_id: str | None = None
        self._run_id: str | None = None
        self._nodes = Usage()
        self._node_ids: set[str] = set()
        self._seen_nodes = False
        self._text_chars = 0
        self._error: str | None = None
        self._done = False
        self._replaying = False
        self._ours_asked = False  # the submitted form's own request was replayed
        self._forms: list[tuple[str, str]] = []

    @property
    def task_id(self) -> str | None:
        # The gateway does not stop a resumed run it follows: the client's submit
        # started it, and it is charged what it does.
        return None

    @property
    def done(self) -> bool:
        """The run ended, failed or paused again: nothing more to read."""
        return self._done

    @property
    def paused_forms(self) -> tuple[tuple[str, str], ...]:
        """The forms of a new pause: the next resume is followed in turn."""
        return tuple(self._forms)

    def feed(self, event: ServerSentEvent) -> None:
        data = event.data
        if not data or self._done:
            return
        match = _EVENT_TYPE.match(data)
        kind = match.group(1) if match else None
        if kind in SPEECH_EVENTS:
            self._speech = True
            return
        if kind is not None and kind not in _PARSED and kind not in _ENDS:
            return
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
        elif kind == "workflow_started":
            inner = obj.get("data")
            if isinstance(inner, dict) and inner.get("reason") == "initial":
                # The run's own start: a replay of its events from the beginning.
                self._replaying = True
                self._forget()
        elif kind == "human_input_required":
            named = forms_named(kind, obj, self._run_id)
            if any(token == self._form_token for token, _ in named):
                self._ours_asked = True  # replayed: the pause that follows is the old one
            else:
                self._forms += named
        elif kind == "workflow_paused":
            self._on_pause(obj)
        elif kind in _ENDS:
            self._done = True
        elif kind == "error":
            self._error = _str_or_none(obj.get("code")) or "error"
            self._done = True
        elif kind in SPEECH_EVENTS:  # its type was not first (a full parse)
            self._speech = True

    def _on_pause(self, obj: dict[str, Any]) -> None:
        named = forms_named("workflow_paused", obj, self._run_id)
        if self._ours_asked or any(t == self._form_token for t, _ in named):
            # The pause this resume ends: everything so far was the paused part.
            self._replaying = self._ours_asked = False
            self._forget()
        elif self._replaying:
            self._forget()  # an earlier pause of a multi-pause run, replayed
        else:
            self._forms += named
            self._done = True

    def _forget(self) -> None:
        self._nodes = Usage()
        self._seen_nodes = False
        self._text_chars = 0
        self._speech = False
        self._forms = []

    def _on_node(self, data: object) -> None:
        if not isinstance(data, dict) or data.get("node_type") in _CONTAINER_NODES:
            return
        execution = _str_or_none(data.get("id"))
        if execution is not None:
            if execution in self._node_ids:
                return  # a node reported twice (a replay overlapping the live events)
            self._node_ids.add(execution)
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
        if self._error:
            outcome: Outcome = "error"
        elif self._done and not cut:
            outcome = "complete"
            if usage is None:
                usage = Usage()  # the resumed part ran no model: the query alone
        else:
            outcome = "cut"
        # answer_id None: the ledger keys the row by the submit (gw-<request id>),
        # since the run's own id already names the row of the stream that paused.
        result = Metered(None, self._task_id, None, usage, outcome, error_code=self._error)
        if self._speech and self._spoken is not None:
            return self._spoken(result)
        return result
