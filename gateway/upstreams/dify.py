"""The Dify Service API dialect: routes, user placement, stop calls and usage metering.

Every wire fact used here is in docs/upstreams/dify.md (cited below as
"dify.md"). Usage is read only from Dify's own answers, never from the client.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, quote

import orjson

from gateway.http import with_param
from gateway.sse import ServerSentEvent
from gateway.upstreams import dify_routes
from gateway.upstreams.base import Headers, Prepared, Route
from gateway.upstreams.dify_files import named_files, uploaded_file_id
from gateway.upstreams.dify_history import filter_conversations, filter_messages, filter_variables
from gateway.upstreams.dify_resume import (
    PAUSE_EVENTS,
    SPEECH_EVENTS,
    ResumeMeter,
    blocking_forms,
    follow_request,
    forms_named,
    resumed_form,
)
from gateway.usage import (
    ZERO,
    FieldReader,
    Metered,
    Outcome,
    Usage,
    estimate_usage,
    unreadable_answer,
)

if TYPE_CHECKING:
    from gateway.config import Config, UpstreamConfig
    from gateway.pricing import CallPrice

__all__ = ["DifyStreamMeter", "DifyUpstream"]

log = logging.getLogger("gateway.upstreams")

# --- routes ------------------------------------------------------------------------------

# The route table lives in dify_routes.py (default deny, issue 20); the names the
# rest of this module and its tests use are re-exported here.
CHAT: Final = dify_routes.CHAT
COMPLETION: Final = dify_routes.COMPLETION
WORKFLOW: Final = dify_routes.WORKFLOW
UPLOAD: Final = dify_routes.UPLOAD
CONVERSATIONS: Final = dify_routes.CONVERSATIONS
MESSAGES: Final = dify_routes.MESSAGES

# Module-level so tests can count parses by patching it; looked up at call time.
_loads = orjson.loads

# Dify reads the user from the query string of requests without a body (dify.md).
_QUERY_USER_METHODS: Final = frozenset({"GET", "HEAD", "DELETE"})

_STOP_PREFIXES: Final[dict[str, str]] = {
    "chat": "/chat-messages/",
    "completion": "/completion-messages/",
    "workflow": "/workflows/tasks/",
}

# --- stream events ---------------------------------------------------------------------

# Dify names the event in the JSON key "event", which it always writes first; spacing
# varies by version (dify.md "JSON style varies"). Matching the start of the data
# avoids parsing every text chunk; anything else falls back to a full parse.
_EVENT_TYPE: Final = re.compile(r'\s*\{\s*"event"\s*:\s*"([a-z_]+)"')

# Events whose answer text is counted for the estimate, and where the text sits.
_TOP_LEVEL_TEXT: Final = frozenset({"message", "agent_message"})  # {"answer": ...}
_WORKFLOW_TEXT: Final = "text_chunk"  # {"data": {"text": ...}}
# Events that can carry usage or identifiers: always parsed.
_PARSED: Final = frozenset(
    {
        "message_end",
        "workflow_started",
        "workflow_finished",
        "node_finished",
        "error",
        "message_replace",
        *PAUSE_EVENTS,  # they name the paused run's forms (dify_resume.py)
    }
)
# An agent app's thought: a model call's text, tool call and the tool's result.
# Dify reports an agent's usage only in message_end, and a tool-calling model call
# streams no answer text, so a run that fails after one (the next call past the
# context window, a provider error) ends in an error event with neither. Every
# runner publishes a thought only once a model call answered: the function-calling
# one at the call's first chunk, the ReAct one after its first call (then as each
# later iteration opens), so any thought proves billed work (review D3). Parsed
# (a few per answer, for its tool call); its "thought" repeats text already
# streamed as agent_message, so only the tool call adds to the estimate.
_THOUGHT: Final = "agent_thought"
# Auto-play speech (dify_resume.SPEECH_EVENTS) is charged as the same speech
# asked for through /text-to-audio.
SPEECH_CALL: Final = dify_routes.TEXT_TO_AUDIO.call or "dify.text_to_audio"
# Events whose "id" is the message id; agent_thought's "id" is the thought's own id.
_MESSAGE_ID_EVENTS: Final = frozenset(
    {"message", "agent_message", "message_end", "message_replace"}
)
# Dify does not stream node_finished for these containers (they report through
# iteration_completed / loop_completed), and their metadata totals repeat their
# children's; skipped in case a version does send them, to never count twice.
_CONTAINER_NODES: Final = frozenset({"iteration", "loop"})

_NO_USAGE: Final = Usage()


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_zero(usage: Usage) -> bool:
    return not usage.total_tokens and not usage.cost


def _usage_from(raw: object) -> Usage:
    """``message_end.metadata.usage`` (or the blocking equivalent) as a Usage.

    Each number is read on its own (FieldReader): a bad one is derived from the
    others or bounded, and named in ``clamped``; the rest is kept. Raises
    ``ValueError`` when the usage is not an object, or nothing usable is left.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"usage is not an object: {raw!r}")
    read = FieldReader()
    prompt, completion, total = read.split(
        raw, "prompt_tokens", "completion_tokens", "total_tokens"
    )
    # Prices are decimal strings or numbers (dify.md "Usage"); the parts are a
    # fallback for a build that omits the total, or sends a bad one.
    cost = read.price(raw, "total_price") if raw.get("total_price") is not None else None
    if cost is None:
        cost = (read.price(raw, "prompt_price") or ZERO) + (
            read.price(raw, "completion_price") or ZERO
        )
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cost=cost,
        currency=_str_or_none(raw.get("currency")) or "USD",
    )
    return read.usable(usage)


def _node_usage(data: dict[str, Any]) -> Usage:
    """One ``node_finished.data``: price and total from ``execution_metadata``, the
    prompt/completion split from ``outputs.usage`` (LLM nodes only; dify.md "Usage").
    Each number is read on its own, as in _usage_from.
    """
    meta = data.get("execution_metadata")
    outputs = data.get("outputs")
    llm = outputs.get("usage") if isinstance(outputs, dict) else None
    read = FieldReader()
    prompt = completion = 0
    llm_total: int | None = None
    if isinstance(llm, dict):
        prompt, completion, split_total = read.split(
            llm, "prompt_tokens", "completion_tokens", "total_tokens"
        )
        if llm.get("total_tokens") is not None:
            llm_total = split_total
    total = 0
    cost = ZERO
    currency = "USD"
    if isinstance(meta, dict):
        if meta.get("total_tokens") is not None:
            total = read.total(meta, "total_tokens", llm_total or prompt + completion)
        elif llm_total is not None:
            total = llm_total
        cost = read.price(meta, "total_price") or ZERO
        currency = _str_or_none(meta.get("currency")) or "USD"
    elif meta is not None:
        raise ValueError(f"execution_metadata is not an object: {meta!r}")
    elif llm_total is not None:
        total = llm_total
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cost=cost,
        currency=currency,
    )
    return read.usable(usage)


def _with_call(usage: Usage | None, price: CallPrice | None) -> Usage | None:
    """``usage`` with one paid side call added to its cost (exact decimals), as
    the other dialects add theirs (terms.calls_cost); an answer that ran
    nothing (no usage) makes no call. Dify prices its own usage in its own
    currency: a call priced in another one cannot be added to it, and is left
    out, logged (docs/configuration.md, "Currency")."""
    if usage is None or price is None:
        return usage
    if not usage.cost:
        usage = dataclasses.replace(usage, currency=price.currency)
    elif usage.currency != price.currency:
        log.warning(
            "a call priced in %s left out of an answer Dify priced in %s",
            price.currency,
            usage.currency,
        )
        return usage
    return dataclasses.replace(usage, cost=usage.cost + price.price)


def _charge_speech(result: Metered, price: CallPrice | None) -> Metered:
    """An answer that streamed auto-play speech, with its TTS call: added to the
    cost at ``[call_prices."dify.text_to_audio"]`` as the title is (`_with_call`);
    without that price the answer streamed it anyway, so it is recorded as
    reported and the call named in ``unpriced_calls`` (counted, logged:
    docs/security.md). An answer charged nothing (usage None) made no call."""
    usage = result.usage
    if usage is None:
        return result
    if price is None or (usage.cost and usage.currency != price.currency):
        # (A price in another currency than Dify's own cannot be added to its
        # cost: left out as an unpriced call is, and counted as one, review R2-2.)
        return dataclasses.replace(result, unpriced_calls=(*result.unpriced_calls, SPEECH_CALL))
    return dataclasses.replace(result, usage=_with_call(usage, price))


def _prompt_chars(body: dict[str, Any]) -> int:
    query = body.get("query")
    chars = len(query) if isinstance(query, str) else 0
    inputs = body.get("inputs")
    if isinstance(inputs, dict):
        chars += sum(len(v) for v in inputs.values() if isinstance(v, str))
    return chars


class DifyStreamMeter:
    """Meters one streamed Dify answer (chat, agent, completion, chatflow or workflow).

    Parses as little JSON as it can: plain text events are parsed once per event
    type, then only measured (see ``feed``).
    """

    __slots__ = (
        "_conversation_id",
        "_error",
        "_error_code",
        "_forms",
        "_hot",
        "_hot_len",
        "_hot_overhead",
        "_malformed",
        "_message_id",
        "_message_usage",
        "_metadata",
        "_nodes",
        "_overhead",
        "_prompt_chars",
        "_route",
        "_speech",
        "_speech_price",
        "_task_id",
        "_text_chars",
        "_thought",
        "_title_price",
        "_tool_inputs",
        "_workflow_clamped",
        "_workflow_finished",
        "_workflow_outputs",
        "_workflow_run_id",
        "_workflow_total",
    )

    def __init__(
        self,
        route: Route,
        body: dict[str, Any],
        *,
        title_price: CallPrice | None = None,
        speech_price: CallPrice | None = None,
    ) -> None:
        self._route = route
        # The title Dify generates for a new conversation (review F6): charged
        # with the answer, at the rename's call price, when one is set.
        self._title_price = title_price
        # Auto-play speech (review D2, SPEECH_EVENTS): charged at the price of
        # /text-to-audio once the stream carries any.
        self._speech_price = speech_price
        self._speech = False
        # An agent's thought, which shows a model call (_THOUGHT), and the length
        # of each thought's tool call, by the thought's id (Dify resends a
        # thought as it fills in).
        self._thought = False
        self._tool_inputs: dict[str, int] = {}
        self._prompt_chars = _prompt_chars(body)
        self._task_id: str | None = None
        self._message_id: str | None = None
        self._conversation_id: str | None = None
        self._workflow_run_id: str | None = None
        # Answer text characters seen, and per text event type the length of the
        # data around the text (learned from that type's first event).
        self._text_chars = 0
        self._overhead: dict[str, int] = {}
        # The last event read on the hot path: what _EVENT_TYPE matched (its
        # length), and its type's envelope (`feed`).
        self._hot: str | None = None
        self._hot_len = 0
        self._hot_overhead = 0
        self._message_usage: Usage | None = None
        self._metadata: dict[str, Any] | None = None
        self._workflow_finished = False
        self._workflow_total: int | None = None
        self._workflow_clamped: tuple[str, ...] = ()  # a bad workflow_finished total
        self._workflow_outputs: dict[str, Any] | None = None
        self._nodes = _NO_USAGE
        self._error = False
        self._error_code: str | None = None
        self._malformed: list[str] = []
        self._forms: list[tuple[str, str]] = []

    @property
    def task_id(self) -> str | None:
        return self._task_id

    @property
    def paused_forms(self) -> tuple[tuple[str, str], ...]:
        """(form token, workflow run id) of each form the run paused for; the
        gateway keeps them to follow the run once the form is submitted."""
        return tuple(self._forms)

    @property
    def malformed(self) -> tuple[str, ...]:
        """Types of the events whose JSON could not be read, in order, for the proxy to log."""
        return tuple(self._malformed)

    def feed(self, event: ServerSentEvent) -> None:
        data = event.data
        if data[: self._hot_len] == self._hot:
            # The hot path's event again (below): data that begins with the very
            # text _EVENT_TYPE matched in the last one is matched alike (the
            # match ends at the type's closing quote), so it is of that type,
            # its envelope measured - without the match. (None until then:
            # no slice equals it.)
            extra = len(data) - self._hot_overhead
            if extra > 0:
                self._text_chars += extra
            return
        if not data:  # `event: ping` keep-alives carry no data (dify.md)
            return
        match = _EVENT_TYPE.match(data)
        if match is not None:
            kind = match.group(1)
            overhead = self._overhead.get(kind)
            if overhead is not None:
                self._hot, self._hot_len, self._hot_overhead = match.group(0), match.end(), overhead
                # The hot path. The answer's length is estimated as the data's length
                # minus the envelope measured on this type's first event. Escapes
                # inflate it (`\n` is two characters, `\uXXXX` six, as older Dify
                # versions write non-ASCII) and envelopes can vary slightly; it is good
                # enough for an estimate used only when Dify never reports usage.
                extra = len(data) - overhead
                if extra > 0:
                    self._text_chars += extra
                return
            if kind in SPEECH_EVENTS:
                self._speech = True  # by its name: the audio is never parsed
                return
            if not (
                kind in _PARSED
                or kind in _TOP_LEVEL_TEXT
                or kind == _WORKFLOW_TEXT
                or kind == _THOUGHT
                or self._task_id is None  # learn the task id early to allow a stop call
            ):
                return
            obj = self._parse(data, kind)
        else:
            obj = self._parse(data, None)
            if obj is None:
                return
            kind = obj.get("event")
            if not isinstance(kind, str):
                return
        if obj is None:
            # A text event failing to parse does not hide usage; a usage event does.
            if kind == "error":
                self._error = True
            return
        self._handle(kind, obj, data)

    def _parse(self, data: str, kind: str | None) -> dict[str, Any] | None:
        try:
            obj = _loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        if kind in _PARSED:
            self._malformed.append(kind)
        return None

    def _handle(self, kind: str, obj: dict[str, Any], data: str) -> None:
        self._learn_ids(kind, obj)
        if kind in _TOP_LEVEL_TEXT:
            self._count_text(kind, obj.get("answer"), data)
        elif kind == _WORKFLOW_TEXT:
            inner = obj.get("data")
            self._count_text(kind, inner.get("text") if isinstance(inner, dict) else None, data)
        elif kind == "message_end":
            self._on_message_end(obj)
        elif kind == "node_finished":
            self._on_node_finished(obj)
        elif kind == "workflow_finished":
            self._on_workflow_finished(obj)
        elif kind == "error":
            self._error = True
            if self._error_code is None:
                self._error_code = _str_or_none(obj.get("code"))
        elif kind in PAUSE_EVENTS:
            self._forms += forms_named(kind, obj, self._workflow_run_id)
        elif kind == _THOUGHT:
            self._on_thought(obj)
        elif kind in SPEECH_EVENTS:  # an event whose type was not first (a full parse)
            self._speech = True
        # message_replace (moderation) swaps the shown answer but not what the model
        # generated, so the text count stays; workflow_started only brings ids.

    def _learn_ids(self, kind: str, obj: dict[str, Any]) -> None:
        if self._task_id is None:
            self._task_id = _str_or_none(obj.get("task_id"))
        if self._conversation_id is None:
            self._conversation_id = _str_or_none(obj.get("conversation_id"))
        if self._message_id is None:
            self._message_id = _str_or_none(obj.get("message_id"))
            if self._message_id is None and kind in _MESSAGE_ID_EVENTS:
                self._message_id = _str_or_none(obj.get("id"))
        if self._workflow_run_id is None:
            self._workflow_run_id = _str_or_none(obj.get("workflow_run_id"))

    def _count_text(self, kind: str, text: object, data: str) -> None:
        if not isinstance(text, str):
            return
        self._text_chars += len(text)
        if kind not in self._overhead:
            self._overhead[kind] = len(data) - len(text)

    def _on_thought(self, obj: dict[str, Any]) -> None:
        """An agent's thought, even an empty one, shows a model call Dify billed
        (_THOUGHT); its tool call is text the model generated."""
        self._thought = True
        tool_input = obj.get("tool_input")
        if isinstance(tool_input, str) and tool_input:
            key = _str_or_none(obj.get("id")) or ""
            self._tool_inputs[key] = max(self._tool_inputs.get(key, 0), len(tool_input))

    def _on_message_end(self, obj: dict[str, Any]) -> None:
        metadata = obj.get("metadata")
        if metadata is None:
            return
        if not isinstance(metadata, dict):
            self._malformed.append("message_end")
            return
        self._metadata = metadata
        raw = metadata.get("usage")
        if raw is None:
            return
        try:
            self._message_usage = _usage_from(raw)
        except ValueError:
            self._malformed.append("message_end")

    def _on_node_finished(self, obj: dict[str, Any]) -> None:
        data = obj.get("data")
        if not isinstance(data, dict):
            self._malformed.append("node_finished")
            return
        if data.get("node_type") in _CONTAINER_NODES:
            return
        try:
            self._nodes = self._nodes + _node_usage(data)
        except ValueError:
            self._malformed.append("node_finished")

    def _on_workflow_finished(self, obj: dict[str, Any]) -> None:
        data = obj.get("data")
        if not isinstance(data, dict):
            self._malformed.append("workflow_finished")
            return
        if data.get("total_tokens") is not None:
            # Read on its own like any usage field: a bad total costs only itself
            # (the nodes' own reports stand in for it) and marks the answer clamped.
            read = FieldReader()
            total = read.tokens(data, "total_tokens")
            if read.clamped:
                self._workflow_clamped = tuple(read.clamped)
            else:
                self._workflow_total = total
        self._workflow_finished = True
        outputs = data.get("outputs")
        if isinstance(outputs, dict):
            self._workflow_outputs = outputs

    def _workflow_usage(self) -> Usage | None:
        """Workflow usage (dify.md): the total from workflow_finished, price and split
        summed over the nodes; None until workflow_finished arrived."""
        if not self._workflow_finished:
            return None
        nodes = self._nodes
        if self._workflow_clamped:
            nodes = dataclasses.replace(nodes, clamped=nodes.clamped + self._workflow_clamped)
        if self._workflow_total is None:
            return nodes
        return Usage(
            prompt_tokens=nodes.prompt_tokens,
            completion_tokens=nodes.completion_tokens,
            total_tokens=self._workflow_total,
            cost=nodes.cost,
            currency=nodes.currency,
            clamped=nodes.clamped,
        )

    def _reported_usage(self) -> Usage | None:
        message = self._message_usage
        workflow = self._workflow_usage()
        if message is None:
            return workflow
        # A chatflow sends message_end and workflow_finished in either order; the two
        # describe the same run, so message_end alone is counted. Except for the known
        # chatflow bug of all-zero usage (dify.md "Disconnects"): then the nodes' own
        # reports, when they show tokens, are the better record.
        if _is_zero(message):
            alternative = workflow if workflow is not None else self._nodes
            if not _is_zero(alternative):
                return alternative
        return message

    def _partial_usage(self) -> Usage | None:
        """The best lower bound when Dify reported no final usage: what finished nodes
        reported, or an estimate from the text (an agent's tool calls included)
        and the request, whichever is larger. An agent's thought alone makes an
        estimate: its model call was billed, text or not."""
        generated = self._text_chars + sum(self._tool_inputs.values())
        estimate = (
            estimate_usage(self._prompt_chars, generated) if generated or self._thought else None
        )
        nodes = self._nodes if not _is_zero(self._nodes) else None
        if estimate is None or nodes is None:
            return estimate or nodes
        if nodes.total_tokens >= estimate.total_tokens:
            return nodes
        # More tokens in the estimate (the prompt's size, which the caller writes:
        # an input the app does not declare counts there and costs nothing
        # upstream), which has no price: the cost the nodes reported stays
        # (review F1), never less than what Dify billed.
        return dataclasses.replace(estimate, cost=nodes.cost, currency=nodes.currency)

    def finish(self, *, cut: bool) -> Metered:
        # `cut` does not change the outcome here: without usage, a cut stream and one
        # that simply ended are both "cut" (Dify has no terminator; dify.md).
        usage = self._reported_usage()
        if usage is not None:
            return self._metered(usage, "complete")
        partial = self._partial_usage()
        if self._error:
            return self._metered(partial, "error", code=self._error_code)
        if partial is None and self._task_id is not None:
            # The run began (Dify named its task) but no text or node usage came
            # yet: the prompt is with the model, which bills it (and any hidden
            # reasoning). Never free, whatever ended it: a client leaving after
            # the first event would otherwise be refunded its query, every time.
            partial = estimate_usage(self._prompt_chars, 0)
        # Naming the cause lets the ledger tell a broken usage event from a lost stream.
        code = "malformed_usage" if self._malformed else None
        return self._metered(partial, "cut", code=code)

    def _metered(
        self, usage: Usage | None, outcome: Outcome, *, code: str | None = None
    ) -> Metered:
        if self._route.kind == "workflow":
            answer_id = self._workflow_run_id or self._message_id
        else:
            answer_id = self._message_id or self._workflow_run_id
        metadata = self._metadata if self._metadata is not None else self._workflow_outputs
        result = Metered(
            answer_id=answer_id,
            task_id=self._task_id,
            conversation_id=self._conversation_id,
            usage=_with_call(usage, self._title_price),
            outcome=outcome,
            error_code=code,
            metadata=metadata,
        )
        return _charge_speech(result, self._speech_price) if self._speech else result


# A blocking answer's errors that come after the run started (`billed_error`).
_BILLED_ERRORS = frozenset({(500, "internal_server_error"), (400, "completion_request_error")})
# The statuses of the billed errors, "Run failed:"'s 400 among them.
_BILLED_STATUSES = frozenset({status for status, _ in _BILLED_ERRORS} | {400})
# A chatflow's run that failed (a node after its LLM nodes): Dify 1.x raises it
# as ValueError(f"Run failed: {error}"), which its API answers 400
# invalid_param - the code of a parameter refused before any work, told apart
# by this message (review R2-5; api/core/app/apps/advanced_chat).
_RUN_FAILED = "Run failed:"


class DifyUpstream:
    """The Dify Service API (``.../v1``), as described in dify.md."""

    __slots__ = ("_speech_price", "_title_price")

    kind = "dify"
    user_field = "user"
    stops_by_closing = False
    # A blocking run that fails after its LLM nodes ran (a code or HTTP node
    # after them, the model failing mid-answer) is answered as an HTTP error,
    # with no usage: Dify's blocking pipelines raise the run's error.
    bills_errors = True
    key_header = None  # the gateway key comes as a bearer token only

    def __init__(self, config: Config | None = None) -> None:
        """Dify reports usage with its price; the gateway adds two calls it
        leaves out: the title Dify generates for a new conversation, at the
        rename's call price (``[call_prices."dify.auto_generate_name"]``, review
        F6; without that price the title is not charged, docs/security.md), and
        the auto-play speech of a streamed answer, at the price of
        ``/text-to-audio`` (``[call_prices."dify.text_to_audio"]``, review D2;
        without it the answer is recorded and the speech counted as unpriced)."""
        prices = config.call_prices if config is not None else {}
        self._title_price = prices.get(dify_routes.AUTO_NAME.call or "")
        self._speech_price = prices.get(SPEECH_CALL)

    def upstream_credentials(self, upstream: UpstreamConfig) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"authorization", f"Bearer {upstream.api_key}".encode()),)

    def route(self, method: str, path: str) -> Route:
        return dify_routes.dify_route(method, path)

    def check_headers(self, route: Route, headers: Headers) -> None:
        return None  # no header of Dify's changes what an answer costs

    def refine(self, route: Route, body: dict[str, Any] | None) -> Route:
        if route is dify_routes.RENAME and dify_routes.asks_to_generate(body):
            return dify_routes.AUTO_NAME  # Dify asks the app's model for a title
        if route is dify_routes.TEXT_TO_AUDIO:
            return dify_routes.spoken_message(route, body)
        return route

    def error_body(self, status: int, code: str, message: str) -> bytes:
        return orjson.dumps({"code": code, "message": message, "status": status})

    def stream_error(self, status: int, code: str, message: str) -> bytes:
        return b"data: " + self.error_body(status, code, message) + b"\n\n"

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
        if body is not None:
            body["user"] = user_id
            # The conversation as the gateway reads it (review-conv F1).
            dify_routes.canonical_conversation(route, body)
        # Requests without a body name the user in the query; any other request
        # that names one there gets it replaced, in whatever spelling it was given.
        query = with_param(query, "user", user_id, add=method in _QUERY_USER_METHODS)
        # Dify accepts the request id as its trace id (1-128 of [A-Za-z0-9_-]), so
        # its logs and the gateway's name the same request.
        prepared = Prepared(body, query, [(b"x-trace-id", request_id.encode())])
        if route.produces_answer:
            # The files the answer attaches, which Dify finds in the whole
            # workspace: the proxy checks they are the caller's uploads.
            files = named_files(body)
            if files:
                prepared.file_ids, prepared.files_by_value = files.ids, files.by_value
        return prepared

    def uploaded_file_id(self, route: Route, body: bytes | bytearray) -> str | None:
        return uploaded_file_id(body) if route.is_upload else None

    def stream_transform(self, route: Route, prepared: Prepared) -> None:
        return None  # the client gets Dify's stream byte for byte

    def requested_models(
        self, route: Route, body: dict[str, Any] | None
    ) -> tuple[str | None, ...] | None:
        # A Dify app runs the model its builder chose; no request names one, so a
        # plan's model allow-list cannot apply (docs/configuration.md).
        return None

    def filter_models(
        self, route: Route, page: dict[str, Any], allowed: Callable[[str], bool]
    ) -> dict[str, Any]:
        return page  # no route of this API lists models

    def routed_model(self, route: Route, body: dict[str, Any] | None) -> str | None:
        return None  # the app fixes its model: one Dify upstream per mount

    def merge_models(self, pages: list[dict[str, Any]]) -> dict[str, Any]:
        return pages[0]  # never asked: no route of this API lists models

    def model_list_query(self, query: bytes, previous: dict[str, Any] | None) -> bytes | None:
        return None  # never asked: no route of this API lists models

    def page_models(self, route: Route, merged: dict[str, Any], query: bytes) -> dict[str, Any]:
        return merged  # never asked: no route of this API lists models

    def filter_history(
        self, route: Route, query: bytes, page: dict[str, Any], cutoff: float
    ) -> dict[str, Any]:
        if route.kind == "conversations":
            params = parse_qs(query.decode("latin-1"))
            return filter_conversations(
                page, cutoff, sort_by=params.get("sort_by", ["-updated_at"])[0]
            )
        if route.kind == "variables":
            return filter_variables(page, cutoff)
        return filter_messages(page, cutoff)

    def is_streaming(self, route: Route, body: dict[str, Any]) -> bool:
        """A hint only: Dify streams when ``response_mode`` is "streaming", but agent
        apps stream whatever was asked (dify.md), and the gateway cannot know the app
        type. The proxy core decides from the response's Content-Type."""
        return body.get("response_mode") == "streaming"

    def _title(self, route: Route, body: dict[str, Any]) -> CallPrice | None:
        """The price of the title Dify generates with this answer, if it does
        and the title is priced."""
        price = self._title_price
        return (
            price if price is not None and dify_routes.names_new_conversation(route, body) else None
        )

    def stream_meter(self, route: Route, body: dict[str, Any]) -> DifyStreamMeter:
        return DifyStreamMeter(
            route, body, title_price=self._title(route, body), speech_price=self._speech_price
        )

    # --- human-input resumes, followed by the gateway (gateway/follow.py) ------------

    def resumed_form(self, route: Route, path: str) -> str | None:
        """The form token a request submits, when it resumes a paused run."""
        return resumed_form(path) if route is dify_routes.RESUME_SUBMIT else None

    def follow_request(self, run_id: str, user_id: str) -> tuple[str, bytes]:
        return follow_request(run_id, user_id)

    def blocking_forms(self, route: Route, body: bytes | bytearray) -> list[tuple[str, str]]:
        return blocking_forms(body) if route.kind in ("chat", "workflow") else []

    def follow_meter(self, form_token: str) -> ResumeMeter:
        # Only the work after the pause (dify_resume.py).
        return ResumeMeter(
            _node_usage,
            form_token=form_token,
            spoken=functools.partial(_charge_speech, price=self._speech_price),
        )

    def meter_blocking(self, route: Route, body: dict[str, Any], response: bytes) -> Metered:
        try:
            obj = _loads(response)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            return unreadable_answer(_prompt_chars(body), response)
        task_id = _str_or_none(obj.get("task_id"))
        if "answer" not in obj and "data" not in obj and isinstance(obj.get("code"), str):
            # An error body {"code","message","status"} (dify.md "Errors over HTTP").
            return Metered(None, task_id, None, None, "error", error_code=obj["code"])
        if route.kind == "workflow":
            return self._meter_blocking_workflow(obj, task_id)
        answer_id = _str_or_none(obj.get("message_id")) or _str_or_none(obj.get("id"))
        conversation_id = _str_or_none(obj.get("conversation_id"))
        metadata = obj.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else None
        try:
            usage: Usage | None = _usage_from(metadata.get("usage") if metadata else None)
            outcome: Outcome = "complete"
        except ValueError:
            answer = obj.get("answer")
            usage = None
            if isinstance(answer, str) and answer:
                usage = estimate_usage(_prompt_chars(body), len(answer))
            elif task_id is not None:
                # The run began (Dify named its task) and ended with neither an
                # answer nor a usage: a chatflow's blocking pause for human input
                # (dify.md), its LLM nodes before the pause billed, and charged by
                # no resume (whose meter counts only what follows it). Never free,
                # as in a stream (review F2): the prompt's estimate.
                usage = estimate_usage(_prompt_chars(body), 0)
            outcome = "cut"
        usage = _with_call(usage, self._title(route, body))
        return Metered(answer_id, task_id, conversation_id, usage, outcome, metadata=metadata)

    @staticmethod
    def _meter_blocking_workflow(obj: dict[str, Any], task_id: str | None) -> Metered:
        # A blocking workflow reports only data.total_tokens: no split, no price (dify.md).
        run_id = _str_or_none(obj.get("workflow_run_id"))
        data = obj.get("data")
        if not isinstance(data, dict):
            return Metered(run_id, task_id, None, None, "cut")
        outputs = data.get("outputs")
        metadata = outputs if isinstance(outputs, dict) else None
        if data.get("total_tokens") is None:
            return Metered(run_id, task_id, None, None, "cut", metadata=metadata)
        read = FieldReader()  # a bad total is bounded (a fraction rounded up), not dropped
        try:
            usage = read.usable(Usage(total_tokens=read.tokens(data, "total_tokens")))
        except ValueError:
            return Metered(run_id, task_id, None, None, "cut", metadata=metadata)
        return Metered(run_id, task_id, None, usage, "complete", metadata=metadata)

    def billed_error(
        self, route: Route, body: dict[str, Any], status: int, content: bytes | None
    ) -> bool:
        """A blocking answer's error in Dify's own shape that says the run had
        started: ``internal_server_error`` (500: a node failed after others
        ran), ``completion_request_error`` (400: the model failed, maybe
        mid-answer) or ``invalid_param`` with "Run failed:" (400: a chatflow's
        node failed after others ran). Streamed, the same run would have sent its usage so far;
        blocking, the gateway charges the prompt's estimate. Other codes (a
        parameter, the app or its provider refused) come before any work, and an
        error page of a proxy in front of Dify (502, 503) is no run at all. A
        body the gateway cannot read (``content`` None) of a status a billed
        error has is taken as billed: it may be a run that began (review 6,
        R6-1), and no other status is one (review 7, R7-1)."""
        if body.get("response_mode") == "streaming" or not route.produces_answer:
            return False
        if content is None:
            return status in _BILLED_STATUSES
        try:
            error = orjson.loads(content)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(error, dict):
            return False
        code = error.get("code")
        if (status, code) in _BILLED_ERRORS:
            return True
        message = error.get("message")
        return (
            status == 400
            and code == "invalid_param"
            and isinstance(message, str)
            and message.startswith(_RUN_FAILED)
        )

    @staticmethod
    def cost_unreported(route: Route, body: dict[str, Any]) -> bool:
        """A workflow run not streamed (Dify runs it blocking unless asked to
        stream): its body reports its total tokens, and no price nor split (the
        streamed run's ``node_finished`` events carry the nodes' prices; dify.md)."""
        return route.kind == "workflow" and body.get("response_mode") != "streaming"

    @staticmethod
    def cost_unbounded(route: Route, body: dict[str, Any]) -> str | None:
        """None: a Dify answer's money is reserved as a whole (the plan's
        answer reservation), not bounded from the body."""
        return None

    def unanswered(self, route: Route, body: dict[str, Any]) -> Metered:
        # Only the prompt is known: the answer, if any, was never seen (its
        # title, if any, is generated as the run starts).
        usage = _with_call(estimate_usage(_prompt_chars(body), 0), self._title(route, body))
        return Metered(None, None, None, usage, "timeout")

    def stop_request(self, route: Route, task_id: str, user_id: str) -> tuple[str, bytes] | None:
        prefix = _STOP_PREFIXES.get(route.kind)
        if prefix is None:
            return None
        # The task id comes from Dify's stream, but it still goes into a path: quote it.
        return f"{prefix}{quote(task_id, safe='')}/stop", orjson.dumps({"user": user_id})
