"""The Dify dialect, driven by event sequences shaped like docs/upstreams/dify.md."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from typing import Any

import orjson
import pytest

from gateway.config import parse_config
from gateway.errors import BadRequest
from gateway.sse import ServerSentEvent
from gateway.upstreams import dify, get_upstream
from gateway.upstreams.base import Route
from gateway.upstreams.dify import DifyStreamMeter, DifyUpstream
from gateway.usage import Metered, Usage, estimate_tokens

UP = DifyUpstream()
CHAT = dify.CHAT
COMPLETION = dify.COMPLETION
WORKFLOW = dify.WORKFLOW
PING = ServerSentEvent(event="ping", data="")


def ev(obj: dict[str, Any] | str, *, id: str | None = None) -> ServerSentEvent:
    data = obj if isinstance(obj, str) else orjson.dumps(obj).decode()
    return ServerSentEvent(event="message", data=data, id=id)


def run(
    route: Route,
    events: list[ServerSentEvent],
    body: dict[str, Any] | None = None,
    *,
    cut: bool = False,
) -> tuple[DifyStreamMeter, Metered]:
    meter = UP.stream_meter(route, body if body is not None else {"query": "hi", "inputs": {}})
    for event in events:
        meter.feed(event)
    return meter, meter.finish(cut=cut)


# --- chat, as on the wire in dify.md's example -------------------------------------------

DOC_MESSAGE_1 = (
    '{"event":"message","conversation_id":"c1","message_id":"m1","created_at":1705398420,'
    '"task_id":"t1","id":"m1","answer":"Hi"}'
)
DOC_MESSAGE_2 = (
    '{"event":"message","conversation_id":"c1","message_id":"m1","created_at":1705398420,'
    '"task_id":"t1","id":"m1","answer":" there"}'
)
DOC_USAGE: dict[str, Any] = {
    "prompt_tokens": 1033,
    "prompt_unit_price": "0.001",
    "prompt_price_unit": "0.001",
    "prompt_price": "0.0010330",
    "completion_tokens": 135,
    "completion_unit_price": "0.002",
    "completion_price_unit": "0.001",
    "completion_price": "0.0002700",
    "total_tokens": 1168,
    "total_price": "0.0013030",
    "currency": "USD",
    "latency": 1.38,
}
DOC_MESSAGE_END = (
    '{"event":"message_end","conversation_id":"c1","message_id":"m1","created_at":1705398420,'
    '"task_id":"t1","id":"m1","metadata":{"usage":'
    + orjson.dumps(DOC_USAGE).decode()
    + ',"retriever_resources":[]},"files":null}'
)
DOC_COMPLETE = Usage(
    prompt_tokens=1033, completion_tokens=135, total_tokens=1168, cost=Decimal("0.0013030")
)
CHAT_ENVELOPE: dict[str, Any] = {
    "conversation_id": "c1",
    "message_id": "m1",
    "created_at": 1705398420,
    "task_id": "t1",
    "id": "m1",
}


def message(
    answer: str, *, event: str = "message", envelope: dict[str, Any] = CHAT_ENVELOPE
) -> ServerSentEvent:
    return ev({"event": event, **envelope, "answer": answer})


def message_end(usage: Any, *, envelope: dict[str, Any] = CHAT_ENVELOPE) -> ServerSentEvent:
    metadata = {"usage": usage, "retriever_resources": []}
    return ev({"event": "message_end", **envelope, "metadata": metadata})


def error(code: str = "provider_quota_exceeded", status: int = 400) -> ServerSentEvent:
    # dify.md: envelope + {"code","status","message"}, no task_id.
    return ev(
        {
            "event": "error",
            "conversation_id": "c1",
            "message_id": "m1",
            "status": status,
            "code": code,
            "message": "Your quota for Dify Hosted Model Provider has been exhausted.",
        }
    )


def test_chat_stream_from_the_doc() -> None:
    events = [ev(DOC_MESSAGE_1), PING, ev(DOC_MESSAGE_2), ev(DOC_MESSAGE_END)]
    meter, result = run(CHAT, events)
    assert result == Metered(
        answer_id="m1",
        task_id="t1",
        conversation_id="c1",
        usage=DOC_COMPLETE,
        outcome="complete",
        metadata={"usage": DOC_USAGE, "retriever_resources": []},
    )
    assert result.usage is not None
    assert str(result.usage.cost) == "0.0013030"
    assert meter.malformed == ()


def test_task_id_is_known_after_the_first_event() -> None:
    meter = UP.stream_meter(CHAT, {})
    assert meter.task_id is None
    meter.feed(PING)
    assert meter.task_id is None
    meter.feed(ev(DOC_MESSAGE_1, id="1"))
    assert meter.task_id == "t1"


def test_task_id_from_an_unexpected_first_event() -> None:
    meter = UP.stream_meter(CHAT, {})
    meter.feed(ev({"event": "message_file", "id": "f1", "type": "image", "task_id": "t9"}))
    assert meter.task_id == "t9"


# --- agent, completion, chatflow -----------------------------------------------------------

AGENT_ENVELOPE: dict[str, Any] = {
    "conversation_id": "c2",
    "message_id": "m2",
    "created_at": 1705407629,
    "task_id": "t2",
    "id": "m2",
}


def agent_thought(position: int, thought: str, tool: str = "") -> ServerSentEvent:
    return ev(
        {
            "event": "agent_thought",
            "id": f"thought-{position}",  # not the message id
            "task_id": "t2",
            "message_id": "m2",
            "position": position,
            "thought": thought,
            "observation": "",
            "tool": tool,
            "tool_labels": {},
            "tool_input": "",
            "created_at": 1705407629,
            "message_files": [],
            "conversation_id": "c2",
        }
    )


def test_agent_stream() -> None:
    usage = {**DOC_USAGE, "prompt_tokens": 500, "completion_tokens": 40, "total_tokens": 540}
    usage["total_price"] = "0.0005800"
    events = [
        agent_thought(1, "", tool="dalle3"),
        message("I drew", event="agent_message", envelope=AGENT_ENVELOPE),
        message(" a cat.", event="agent_message", envelope=AGENT_ENVELOPE),
        agent_thought(1, "I drew a cat.", tool="dalle3"),
        ev({"event": "message_file", "id": "f1", "type": "image", "belongs_to": "assistant"}),
        message_end(usage, envelope=AGENT_ENVELOPE),
    ]
    _, result = run(CHAT, events)
    assert (result.answer_id, result.task_id, result.conversation_id) == ("m2", "t2", "c2")
    assert result.outcome == "complete"
    assert result.usage == Usage(
        prompt_tokens=500, completion_tokens=40, total_tokens=540, cost=Decimal("0.0005800")
    )


COMPLETION_ENVELOPE: dict[str, Any] = {
    "message_id": "m4",
    "created_at": 1705407629,
    "task_id": "t4",
    "id": "m4",
}


def test_completion_stream() -> None:
    usage: dict[str, Any] = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    usage |= {"total_price": "0.0000840", "currency": "RMB"}
    events = [
        message("Once", envelope=COMPLETION_ENVELOPE),
        message(" upon a time", envelope=COMPLETION_ENVELOPE),
        message_end(usage, envelope=COMPLETION_ENVELOPE),
    ]
    _, result = run(COMPLETION, events, {"inputs": {"topic": "cats"}, "query": ""})
    assert (result.answer_id, result.task_id, result.conversation_id) == ("m4", "t4", None)
    assert result.usage == Usage(
        prompt_tokens=12,
        completion_tokens=30,
        total_tokens=42,
        cost=Decimal("0.0000840"),
        currency="RMB",
    )


CHATFLOW_ENVELOPE: dict[str, Any] = {
    "conversation_id": "c3",
    "message_id": "m3",
    "created_at": 1705407629,
    "task_id": "t3",
    "id": "m3",
}


def workflow_started(task: str, run_id: str) -> ServerSentEvent:
    data = {"id": run_id, "workflow_id": "w1", "sequence_number": 7, "created_at": 1705407629}
    return ev(
        {"event": "workflow_started", "task_id": task, "workflow_run_id": run_id, "data": data}
    )


def node_finished(
    task: str,
    run_id: str,
    node_type: str,
    *,
    meta: dict[str, Any] | None = None,
    llm: dict[str, Any] | None = None,
    **extra: Any,
) -> ServerSentEvent:
    outputs: dict[str, Any] = {"text": "..."}
    if llm is not None:
        outputs["usage"] = llm
    data = {
        "id": f"exec-{node_type}",
        "node_id": f"node-{node_type}",
        "node_type": node_type,
        "title": node_type.upper(),
        "index": 2,
        "inputs": {},
        "outputs": outputs,
        "status": "succeeded",
        "elapsed_time": 0.5,
        "execution_metadata": meta,
        "created_at": 1705407629,
        **extra,
    }
    return ev({"event": "node_finished", "task_id": task, "workflow_run_id": run_id, "data": data})


def workflow_finished(task: str, run_id: str, total: Any, outputs: Any = None) -> ServerSentEvent:
    data: dict[str, Any] = {
        "id": run_id,
        "workflow_id": "w1",
        "status": "succeeded",
        "outputs": outputs,
        "error": None,
        "elapsed_time": 2.1,
        "total_steps": 4,
        "created_at": 1705407629,
        "finished_at": 1705407631,
    }
    if total is not None:
        data["total_tokens"] = total
    return ev(
        {"event": "workflow_finished", "task_id": task, "workflow_run_id": run_id, "data": data}
    )


def llm_usage(prompt: int, completion: int, price: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "total_price": price,
        "currency": "USD",
        "latency": 0.9,
    }


def llm_meta(total: int, price: Any) -> dict[str, Any]:
    return {"total_tokens": total, "total_price": price, "currency": "USD"}


CHATFLOW_LLM = node_finished(
    "t3", "r3", "llm", meta=llm_meta(120, "0.0002000"), llm=llm_usage(100, 20, "0.0002000")
)
CHATFLOW_HEAD = [
    workflow_started("t3", "r3"),
    ev({"event": "node_started", "task_id": "t3", "workflow_run_id": "r3", "data": {}}),
    message("Hello", envelope=CHATFLOW_ENVELOPE),
    message(" world", envelope=CHATFLOW_ENVELOPE),
    CHATFLOW_LLM,
]
CHATFLOW_END = message_end(llm_usage(100, 20, "0.0002000"), envelope=CHATFLOW_ENVELOPE)
CHATFLOW_WF_END = workflow_finished("t3", "r3", 120, {"answer": "Hello world"})


@pytest.mark.parametrize(
    "tail",
    [[CHATFLOW_END, CHATFLOW_WF_END], [CHATFLOW_WF_END, CHATFLOW_END]],
    ids=["message_end-first", "workflow_finished-first"],
)
def test_chatflow_counts_message_end_once_in_either_order(tail: list[ServerSentEvent]) -> None:
    _, result = run(CHAT, [*CHATFLOW_HEAD, *tail])
    assert result.outcome == "complete"
    assert (result.answer_id, result.task_id, result.conversation_id) == ("m3", "t3", "c3")
    assert result.usage == Usage(
        prompt_tokens=100, completion_tokens=20, total_tokens=120, cost=Decimal("0.0002000")
    )
    assert result.metadata is not None and "usage" in result.metadata


def test_chatflow_without_message_end_uses_the_workflow() -> None:
    # dify.md: message_end is sometimes missing in chatflows.
    _, result = run(CHAT, [*CHATFLOW_HEAD, CHATFLOW_WF_END])
    assert result.outcome == "complete"
    assert result.answer_id == "m3"
    assert result.usage == Usage(
        prompt_tokens=100, completion_tokens=20, total_tokens=120, cost=Decimal("0.0002000")
    )
    assert result.metadata == {"answer": "Hello world"}


def test_chatflow_with_all_zero_message_end_prefers_the_nodes() -> None:
    # dify.md: some chatflows report zero usage although an LLM ran.
    zero = message_end(llm_usage(0, 0, "0"), envelope=CHATFLOW_ENVELOPE)
    _, result = run(CHAT, [*CHATFLOW_HEAD, zero, CHATFLOW_WF_END])
    assert result.usage is not None
    assert (result.usage.total_tokens, result.usage.cost) == (120, Decimal("0.0002000"))


def test_chatflow_without_llm_keeps_its_zero_usage() -> None:
    zero = message_end(llm_usage(0, 0, "0"), envelope=CHATFLOW_ENVELOPE)
    events = [workflow_started("t3", "r3"), message("Static", envelope=CHATFLOW_ENVELOPE), zero]
    _, result = run(CHAT, [*events, workflow_finished("t3", "r3", 0)])
    assert result.outcome == "complete"
    assert result.usage == Usage()


# --- workflow ------------------------------------------------------------------------------


def text_chunk(text: str) -> ServerSentEvent:
    data = {"text": text, "from_variable_selector": ["node-llm", "text"]}
    return ev({"event": "text_chunk", "task_id": "t5", "workflow_run_id": "r5", "data": data})


WORKFLOW_EVENTS = [
    workflow_started("t5", "r5"),
    node_finished("t5", "r5", "start", meta=None),
    node_finished("t5", "r5", "llm", meta=llm_meta(60, "0.0000700"), llm=llm_usage(50, 10, "7E-5")),
    node_finished("t5", "r5", "code", meta={}),
    text_chunk("Summary: "),
    text_chunk("cats sleep a lot."),
    node_finished("t5", "r5", "llm", meta=llm_meta(35, "8E-7"), llm=llm_usage(30, 5, "8E-7")),
]


def test_workflow_sums_nodes_and_takes_the_total_from_workflow_finished() -> None:
    events = [*WORKFLOW_EVENTS, workflow_finished("t5", "r5", 95, {"summary": "cats"})]
    _, result = run(WORKFLOW, events, {"inputs": {"text": "a long text"}})
    assert result == Metered(
        answer_id="r5",
        task_id="t5",
        conversation_id=None,
        usage=Usage(
            prompt_tokens=80, completion_tokens=15, total_tokens=95, cost=Decimal("0.0000708")
        ),
        outcome="complete",
        metadata={"summary": "cats"},
    )


def test_workflow_total_falls_back_to_the_node_totals() -> None:
    _, result = run(WORKFLOW, [*WORKFLOW_EVENTS, workflow_finished("t5", "r5", None)])
    assert result.usage is not None
    assert result.usage.total_tokens == 95
    assert result.metadata is None


@pytest.mark.parametrize("total", [-5, "lots", 12.5])
def test_a_bad_workflow_total_costs_only_itself(total: Any) -> None:
    # The nodes' own reports stand in for a bad workflow_finished total; the answer
    # keeps its split and price and is marked clamped (issue 20, "Nothing lost").
    _, result = run(WORKFLOW, [*WORKFLOW_EVENTS, workflow_finished("t5", "r5", total)])
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (80, 95)
    assert result.usage.cost == Decimal("0.0000708")
    assert result.usage.clamped and "total_tokens" in result.usage.clamped[0]


@pytest.mark.parametrize(("total", "expected"), [(12.5, 13), (-5, None), ("lots", None)])
def test_a_bad_blocking_workflow_total_is_bounded(total: Any, expected: int | None) -> None:
    response = {"task_id": "t", "workflow_run_id": "r", "data": {"total_tokens": total}}
    result = UP.meter_blocking(WORKFLOW, BODY, blocking(response))
    if expected is None:  # nothing usable is left: charged the estimate downstream
        assert result.usage is None
    else:
        assert result.usage is not None and result.usage.total_tokens == expected
        assert result.usage.clamped


def test_workflow_does_not_count_iteration_containers_twice() -> None:
    inner = {"iteration_id": "node-iteration", "iteration_index": 0}
    events = [
        workflow_started("t5", "r5"),
        node_finished(
            "t5", "r5", "llm", meta=llm_meta(10, "0.01"), llm=llm_usage(8, 2, "0.01"), **inner
        ),
        node_finished(
            "t5", "r5", "llm", meta=llm_meta(10, "0.01"), llm=llm_usage(8, 2, "0.01"), **inner
        ),
        node_finished("t5", "r5", "iteration", meta=llm_meta(20, "0.02")),
        workflow_finished("t5", "r5", 20),
    ]
    _, result = run(WORKFLOW, events)
    assert result.usage == Usage(
        prompt_tokens=16, completion_tokens=4, total_tokens=20, cost=Decimal("0.02")
    )


def test_workflow_cut_after_nodes_reports_what_the_nodes_reported() -> None:
    _, result = run(WORKFLOW, WORKFLOW_EVENTS[:4], cut=True)
    assert result.outcome == "cut"
    assert result.answer_id == "r5"
    assert result.usage == Usage(
        prompt_tokens=50, completion_tokens=10, total_tokens=60, cost=Decimal("0.0000700")
    )


# --- prices and number forms ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "expected"),
    [
        ("0.0013030", Decimal("0.0013030")),
        ("0E-7", Decimal(0)),
        ("8E-7", Decimal("0.0000008")),
        ("0", Decimal(0)),
        ("0.0", Decimal(0)),
        (0.0013, Decimal("0.0013")),
        (2, Decimal(2)),
        (None, Decimal("0.0013030")),  # null: prompt_price + completion_price
    ],
)
def test_prices(price: Any, expected: Decimal) -> None:
    _, result = run(CHAT, [ev(DOC_MESSAGE_1), message_end({**DOC_USAGE, "total_price": price})])
    assert result.outcome == "complete"
    assert result.usage is not None
    assert result.usage.cost == expected


def test_missing_total_tokens_is_the_sum() -> None:
    usage = {k: v for k, v in DOC_USAGE.items() if k != "total_tokens"}
    _, result = run(CHAT, [message_end(usage)])
    assert result.usage == DOC_COMPLETE


def test_missing_total_price_sums_the_parts() -> None:
    usage = {k: v for k, v in DOC_USAGE.items() if k != "total_price"}
    _, result = run(CHAT, [message_end(usage)])
    assert result.usage == DOC_COMPLETE


def test_spaced_json_with_unicode_escapes() -> None:
    # Older Dify: `json.dumps` defaults, spaces after separators and \uXXXX escapes.
    def old(obj: dict[str, Any]) -> ServerSentEvent:
        return ev(json.dumps(obj))

    events = [
        old({"event": "message", **CHAT_ENVELOPE, "answer": "你好"}),
        old({"event": "message", **CHAT_ENVELOPE, "answer": "世界"}),
        old({"event": "message_end", **CHAT_ENVELOPE, "metadata": {"usage": DOC_USAGE}}),
    ]
    assert events[0].data.startswith('{"event": "message", ')
    assert "\\u4f60" in events[0].data
    _, result = run(CHAT, events)
    assert result.usage == DOC_COMPLETE
    assert (result.answer_id, result.task_id, result.conversation_id) == ("m1", "t1", "c1")


def test_escapes_only_inflate_the_estimate() -> None:
    text = ["你好", "世界", "再见", "朋友们"]
    events = [ev(json.dumps({"event": "message", **CHAT_ENVELOPE, "answer": t})) for t in text]
    _, result = run(CHAT, events, {}, cut=True)
    assert result.usage is not None
    assert result.usage.completion_tokens >= estimate_tokens(len("".join(text)))


def test_event_type_not_first_falls_back_to_a_full_parse() -> None:
    reordered = '{"task_id":"t1","event":"message_end","message_id":"m1","metadata":{"usage":%s}}'
    _, result = run(CHAT, [ev(reordered % orjson.dumps(DOC_USAGE).decode())])
    assert result.outcome == "complete"
    assert (result.answer_id, result.task_id, result.usage) == ("m1", "t1", DOC_COMPLETE)


def test_unknown_events_are_ignored() -> None:
    events = [
        ev(DOC_MESSAGE_1),
        ev({"event": "reasoning_chunk", "task_id": "t1", "data": {"text": "hmm"}}),
        ev({"event": "brand_new_event", "task_id": "t1", "whatever": [1, 2]}),
        ev({"event": "tts_message", "task_id": "t1", "audio": "UklGRg=="}),
        ev('{"event":"ping"}'),
        ev("not json at all"),
        ev('["message_end"]'),
        ev(DOC_MESSAGE_END),
        ev({"event": "tts_message_end", "task_id": "t1", "audio": ""}),
    ]
    _, result = run(CHAT, events)
    assert result.outcome == "complete"
    assert result.usage == DOC_COMPLETE
    # Auto-play speech is not ignored (review D2): with no price for it, the
    # answer costs what Dify reports and the speech is named as unpriced.
    assert result.unpriced_calls == ("dify.text_to_audio",)


# --- failures ------------------------------------------------------------------------------

TEXT = [
    "The quick brown fox ",
    "jumps over the lazy dog. ",
    "Pack my box with five dozen liquor jugs. ",
    "How vexingly quick daft zebras jump! ",
    "Sphinx of black quartz, judge my vow.",
]
BODY = {"query": "Tell me a pangram", "inputs": {"tone": "dry", "n": 3}, "user": "u1"}
PROMPT_ESTIMATE = estimate_tokens(len("Tell me a pangram") + len("dry"))


@pytest.mark.parametrize(
    ("events", "cut", "outcome", "code", "text"),
    [
        ([error()], False, "error", "provider_quota_exceeded", None),
        (
            [*[message(t) for t in TEXT], error("internal_server_error", 500)],
            False,
            "error",
            "internal_server_error",
            TEXT,
        ),
        ([message(t) for t in TEXT], True, "cut", None, TEXT),
        ([message(t) for t in TEXT], False, "cut", None, TEXT),
        ([], True, "cut", None, None),
        ([], False, "cut", None, None),
        ([PING, PING], False, "cut", None, None),
        # The run began (its task named) before any text: the prompt is billed.
        ([message("")], True, "cut", None, []),
        ([ev({"event": "workflow_started", **CHAT_ENVELOPE})], True, "cut", None, []),
    ],
    ids=[
        "error-before-text",
        "error-after-text",
        "cut-after-text",
        "ended-without-usage",
        "cut-empty",
        "no-events",
        "only-pings",
        "empty-text",
        "only-started",
    ],
)
def test_failures(
    events: list[ServerSentEvent],
    cut: bool,
    outcome: str,
    code: str | None,
    text: list[str] | None,
) -> None:
    """``text``: what came of the answer before it failed, None where nothing
    shows the upstream began (no usage: the reservation is given back)."""
    _, result = run(CHAT, events, BODY, cut=cut)
    assert result.outcome == outcome
    assert result.error_code == code
    if text is None:
        assert result.usage is None
        return
    usage = result.usage
    assert usage is not None and usage.estimated
    assert usage.cost == 0
    assert usage.prompt_tokens == PROMPT_ESTIMATE
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    expected = len("".join(text)) / 4
    assert abs(usage.completion_tokens - expected) <= 0.2 * expected


def test_no_events_knows_nothing() -> None:
    _, result = run(CHAT, [])
    assert result == Metered(None, None, None, None, "cut")


@pytest.mark.parametrize(
    "bad_end",
    [
        '{"event":"message_end","conversation_id":"c1","message_id":"m1","metadata":{"usage":{',
        '{"event": "message_end", "task_id": "t1", "metadata": {"usage": {"prompt_tokens": "many"}}}',
        '{"event":"message_end","task_id":"t1","metadata":{"usage":{"total_price":"cheap"}}}',
        '{"event":"message_end","task_id":"t1","metadata":{"usage":[1033]}}',
        '{"event":"message_end","task_id":"t1","metadata":"usage"}',
    ],
    ids=["truncated", "bad-tokens", "bad-price", "usage-not-object", "metadata-string"],
)
def test_malformed_message_end(bad_end: str) -> None:
    meter, result = run(CHAT, [message(t) for t in TEXT] + [ev(bad_end)], BODY)
    assert meter.malformed == ("message_end",)
    assert result.outcome == "cut"
    assert result.error_code == "malformed_usage"
    assert result.usage is not None and result.usage.estimated
    assert result.answer_id == "m1"


def test_malformed_error_event_is_still_an_error() -> None:
    meter, result = run(CHAT, [ev('{"event":"error","code":')])
    assert meter.malformed == ("error",)
    assert (result.outcome, result.error_code, result.usage) == ("error", None, None)


def test_malformed_node_finished_does_not_stop_metering() -> None:
    bad = node_finished("t5", "r5", "llm", meta={"total_tokens": -3, "total_price": "1"})
    events = [*WORKFLOW_EVENTS, bad, workflow_finished("t5", "r5", 95)]
    meter, result = run(WORKFLOW, events)
    # The bad total is bounded, the node's price kept (tests/test_usage_fields.py).
    assert meter.malformed == ()
    assert result.outcome == "complete"
    assert result.usage is not None and result.usage.cost == Decimal("1.0000708")


def test_plain_text_events_are_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    loads = dify._loads

    def counting(data: str | bytes) -> Any:
        nonlocal calls
        calls += 1
        return loads(data)

    monkeypatch.setattr(dify, "_loads", counting)
    events = [message(f"token {i} ") for i in range(100)]
    events[50:50] = [PING, ev({"event": "tts_message", "task_id": "t1", "audio": "AAAA"})]
    _, result = run(CHAT, [*events, ev(DOC_MESSAGE_END)])
    assert calls == 2  # the first message and message_end
    assert result.usage == DOC_COMPLETE


# --- blocking ------------------------------------------------------------------------------


def blocking(obj: Any) -> bytes:
    return obj if isinstance(obj, bytes) else orjson.dumps(obj)


BLOCKING_CHAT: dict[str, Any] = {
    "event": "message",
    "task_id": "t1",
    "id": "m1",
    "message_id": "m1",
    "conversation_id": "c1",
    "mode": "chat",
    "answer": "Hi there",
    "metadata": {"usage": DOC_USAGE, "retriever_resources": []},
    "created_at": 1705407629,
}
BLOCKING_WORKFLOW = {
    "task_id": "t5",
    "workflow_run_id": "r5",
    "data": {
        "id": "r5",
        "workflow_id": "w1",
        "status": "succeeded",
        "outputs": {"summary": "cats"},
        "error": None,
        "elapsed_time": 2.1,
        "total_tokens": 95,
        "total_steps": 4,
        "created_at": 1705407629,
        "finished_at": 1705407631,
    },
}
NO_ANSWER = Metered(None, None, None, None, "cut")


@pytest.mark.parametrize(
    ("route", "response", "expected"),
    [
        (
            CHAT,
            BLOCKING_CHAT,
            Metered("m1", "t1", "c1", DOC_COMPLETE, "complete", metadata=BLOCKING_CHAT["metadata"]),
        ),
        (
            COMPLETION,
            {k: v for k, v in BLOCKING_CHAT.items() if k != "conversation_id"},
            Metered("m1", "t1", None, DOC_COMPLETE, "complete", metadata=BLOCKING_CHAT["metadata"]),
        ),
        (
            WORKFLOW,
            BLOCKING_WORKFLOW,
            Metered(
                "r5", "t5", None, Usage(total_tokens=95), "complete", metadata={"summary": "cats"}
            ),
        ),
        (
            WORKFLOW,
            {"task_id": "t5", "workflow_run_id": "r5", "data": {"outputs": None}},
            Metered("r5", "t5", None, None, "cut"),
        ),
        (
            CHAT,
            {"code": "invalid_param", "message": "query is required", "status": 400},
            Metered(None, None, None, None, "error", error_code="invalid_param"),
        ),
        (WORKFLOW, {"result": "success"}, NO_ANSWER),
        (CHAT, {"result": "success"}, NO_ANSWER),
    ],
    ids=[
        "chat",
        "completion",
        "workflow",
        "workflow-no-total",
        "error-body",
        "irrelevant-workflow",
        "irrelevant-chat",
    ],
)
def test_meter_blocking(route: Route, response: Any, expected: Metered) -> None:
    assert UP.meter_blocking(route, BODY, blocking(response)) == expected


@pytest.mark.parametrize(
    "response",
    [b'{"event":"message","answer":"Hi', b"", b"[1, 2, 3]", b"<html>Bad gateway</html>"],
    ids=["truncated", "empty", "array", "html"],
)
def test_unreadable_blocking_answer_is_charged_an_estimate(response: bytes) -> None:
    # Dify answered 2xx: whatever it generated was billed, so the user is too.
    result = UP.meter_blocking(CHAT, BODY, response)
    prompt = PROMPT_ESTIMATE
    completion = estimate_tokens(len(response))
    assert result == Metered(
        None,
        None,
        None,
        Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            estimated=True,
        ),
        "cut",
        error_code="unreadable_answer",
    )


def test_blocking_answer_without_usage_is_estimated() -> None:
    response = {**BLOCKING_CHAT, "answer": "".join(TEXT), "metadata": {}}
    result = UP.meter_blocking(CHAT, BODY, blocking(response))
    assert (result.outcome, result.answer_id) == ("cut", "m1")
    assert result.usage is not None and result.usage.estimated
    assert result.usage.completion_tokens == estimate_tokens(len("".join(TEXT)))


# --- routing, stop, error body, user -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kind", "name", "role"),
    [
        ("POST", "/chat-messages", "chat", "chat-messages", "answer"),
        ("POST", "/chat-messages/", "chat", "chat-messages", "answer"),
        ("POST", "/completion-messages", "completion", "completion-messages", "answer"),
        ("POST", "/workflows/run", "workflow", "workflows/run", "answer"),
        ("POST", "/workflows/run/", "workflow", "workflows/run", "answer"),
        ("POST", "/workflows/0b5f-4a1c/run", "workflow", "workflows/run", "answer"),
        ("POST", "/form/human_input/tok-1", "resume", "form/human_input", "answer"),
        ("GET", "/workflow/run-1/events", "resume_events", "workflow/events", "scoped"),
        ("POST", "/chat-messages/t1/stop", "stop", "chat-messages/stop", "scoped"),
        ("POST", "/completion-messages/t1/stop/", "stop", "completion-messages/stop", "scoped"),
        ("POST", "/workflows/tasks/t1/stop", "stop", "workflows/tasks/stop", "scoped"),
        ("POST", "/files/upload", "upload", "files/upload", "scoped"),
        ("GET", "/conversations", "conversations", "conversations", "scoped"),
        ("GET", "/messages", "messages", "messages", "scoped"),
        ("DELETE", "/conversations/c1", "conversation", "conversations/delete", "scoped"),
        ("POST", "/conversations/c1/name", "rename", "conversations/name", "scoped"),
        ("GET", "/conversations/c1/variables", "variables", "conversations/variables", "scoped"),
        ("PUT", "/conversations/c1/variables/v1", "variables", "conversations/variables", "scoped"),
        ("POST", "/messages/m1/feedbacks", "feedback", "messages/feedbacks", "scoped"),
        ("GET", "/form/human_input/tok-1", "form", "form/human_input", "scoped"),
        ("GET", "/messages/m1/suggested", "suggested", "messages/suggested", "side_cost"),
        ("POST", "/text-to-audio", "text_to_audio", "text-to-audio", "side_cost"),
        ("POST", "/audio-to-text", "audio_to_text", "audio-to-text", "side_cost"),
        ("GET", "/parameters", "info", "parameters", "passthrough"),
        ("GET", "/meta", "info", "meta", "passthrough"),
        ("GET", "/info", "info", "info", "passthrough"),
        ("GET", "/site", "info", "site", "passthrough"),
        ("GET", "/", "info", "index", "passthrough"),
        ("GET", "/workflows/logs", "operator", "operator", "operator"),
        ("GET", "/workflows/run/r1", "operator", "operator", "operator"),
        ("GET", "/app/feedbacks", "operator", "operator", "operator"),
        ("POST", "/apps/annotations", "operator", "operator", "operator"),
        ("DELETE", "/apps/annotations/a1", "operator", "operator", "operator"),
        ("POST", "/apps/annotation-reply/enable", "operator", "operator", "operator"),
        ("GET", "/apps/annotation-reply/enable/status/j1", "operator", "operator", "operator"),
        ("GET", "/datasets", "operator", "operator", "operator"),
        ("POST", "/datasets/d1/document/create-by-text", "operator", "operator", "operator"),
        ("GET", "/workspaces/current/models/model-types/llm", "operator", "operator", "operator"),
        ("GET", "/end-users/e1", "operator", "operator", "operator"),
        ("GET", "/files/f1/preview", "operator", "operator", "operator"),
        # Anything else, including a known path with another method: unknown.
        ("GET", "/chat-messages", "unknown", "unknown", "unknown"),
        ("POST", "/conversations", "unknown", "unknown", "unknown"),
        ("POST", "/parameters", "unknown", "unknown", "unknown"),
        ("HEAD", "/workflows/logs", "unknown", "unknown", "unknown"),
        ("POST", "/chat-messages/t1/stop/more", "unknown", "unknown", "unknown"),
        ("POST", "/workflows/a/b/run", "unknown", "unknown", "unknown"),
        ("GET", "/workflows/logsX", "unknown", "unknown", "unknown"),
        ("GET", "/node-executions", "unknown", "unknown", "unknown"),
    ],
)
def test_route(method: str, path: str, kind: str, name: str, role: str) -> None:
    route = UP.route(method, path)
    assert (route.kind, route.name, route.role) == (kind, name, role)
    assert route.produces_answer == (role == "answer")
    # (A conversation's variables as read: a chatflow's memory, review-limits F3.)
    history = kind in ("conversations", "messages") or (kind, method) == ("variables", "GET")
    assert route.is_history == history
    assert route.is_upload == (kind == "upload")
    assert (route.call is not None) == (role == "side_cost")


@pytest.mark.parametrize(
    ("body", "generates"),
    [
        (None, False),
        ({}, False),
        ({"name": "x"}, False),
        ({"auto_generate": False}, False),
        ({"auto_generate": None}, False),
        ({"auto_generate": 0}, False),
        ({"auto_generate": 0.0}, False),
        ({"auto_generate": True}, True),
        ({"auto_generate": 1}, True),
        # Older Dify parses with reqparse's type=bool: any non-empty string is true.
        ({"auto_generate": "false"}, True),
        ({"auto_generate": "true"}, True),
        ({"auto_generate": "0"}, True),
        ({"auto_generate": []}, True),
    ],
)
def test_a_rename_that_generates_is_a_side_cost(body: Any, generates: bool) -> None:
    route = UP.refine(UP.route("POST", "/conversations/c1/name"), body)
    assert route.role == ("side_cost" if generates else "scoped")
    if generates:
        assert route.call == "dify.auto_generate_name"


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (CHAT, ("/chat-messages/t-1/stop", b'{"user":"u1"}')),
        (COMPLETION, ("/completion-messages/t-1/stop", b'{"user":"u1"}')),
        (WORKFLOW, ("/workflows/tasks/t-1/stop", b'{"user":"u1"}')),
        (dify.UPLOAD, None),
        (UP.route("GET", "/parameters"), None),
    ],
)
def test_stop_request(route: Route, expected: tuple[str, bytes] | None) -> None:
    assert UP.stop_request(route, "t-1", "u1") == expected


def test_stop_request_quotes_the_task_id() -> None:
    assert UP.stop_request(CHAT, "a/b?c", 'u"1') == (
        "/chat-messages/a%2Fb%3Fc/stop",
        b'{"user":"u\\"1"}',
    )


def test_error_body() -> None:
    body = UP.error_body(429, "quota_exceeded", "Monthly quota reached")
    assert body == b'{"code":"quota_exceeded","message":"Monthly quota reached","status":429}'


def test_user_and_streaming() -> None:
    body: dict[str, Any] = {"query": "hi", "user": "spoofed", "response_mode": "streaming"}
    prepared = UP.prepare(CHAT, body, b"", "alice", method="POST", request_id="r-1")
    assert prepared.body is body and body["user"] == "alice"
    assert prepared.headers == [(b"x-trace-id", b"r-1")]
    assert UP.stream_transform(CHAT, prepared) is None
    assert not UP.stops_by_closing
    assert UP.user_field == "user"
    assert UP.kind == "dify"
    assert UP.is_streaming(CHAT, body)
    assert not UP.is_streaming(CHAT, {"response_mode": "blocking"})
    assert not UP.is_streaming(CHAT, {})
    assert isinstance(get_upstream("dify"), DifyUpstream)
    assert isinstance(UP.stream_meter(CHAT, body), DifyStreamMeter)


@pytest.mark.parametrize(
    ("method", "query", "expected"),
    [
        # Requests without a body always name the user in the query.
        ("GET", b"", b"user=alice"),
        ("GET", b"limit=20", b"limit=20&user=alice"),
        ("DELETE", b"user=mallory", b"user=alice"),
        ("HEAD", b"a=1", b"a=1&user=alice"),
        # Others only get it replaced when they name one, in any spelling.
        ("POST", b"", b""),
        ("POST", b"a=1", b"a=1"),
        ("POST", b"user=victim", b"user=alice"),
        ("POST", b"%75ser=victim", b"user=alice"),
        ("POST", b"a=1&us%65r=victim&b=2", b"a=1&b=2&user=alice"),
    ],
)
def test_prepare_sets_the_query_user(method: str, query: bytes, expected: bytes) -> None:
    prepared = UP.prepare(Route("other", "x"), None, query, "alice", method=method, request_id="r")
    assert prepared.query == expected
    assert prepared.body is None


def test_stream_error_is_an_sse_frame_in_dify_shape() -> None:
    frame = UP.stream_error(502, "upstream_error", "lost")
    assert frame == b'data: {"code":"upstream_error","message":"lost","status":502}\n\n'


def test_filter_history_by_route() -> None:
    old = {"id": "o", "created_at": 10, "updated_at": 10}
    new = {"id": "n", "created_at": 2000, "updated_at": 2000}
    page = {"data": [new, old], "has_more": True}
    assert UP.filter_history(dify.CONVERSATIONS, b"", page, 1000) == {
        "data": [new],
        "has_more": False,
    }
    ascending = {"data": [old, new], "has_more": True}
    assert UP.filter_history(dify.CONVERSATIONS, b"sort_by=updated_at", ascending, 1000) == {
        "data": [new],
        "has_more": True,
    }
    assert UP.filter_history(dify.MESSAGES, b"", {"data": [old, new], "has_more": True}, 1000) == {
        "data": [new],
        "has_more": False,
    }


@pytest.mark.parametrize(
    "began",
    [
        [{"event": "workflow_started", "workflow_run_id": "r1", "data": {}}],
        [
            {"event": "workflow_started", "workflow_run_id": "r1", "data": {}},
            {"event": "node_started", "workflow_run_id": "r1", "data": {"node_type": "llm"}},
        ],
        [{"event": "message", "message_id": "m1", "answer": ""}],
        [{"event": "agent_thought", "message_id": "m1", "thought": ""}],
    ],
    ids=["workflow_started", "llm_node_started", "empty_message", "empty_agent_thought"],
)
def test_an_answer_cut_after_it_began_is_charged_its_prompt(began: list[dict[str, Any]]) -> None:
    """A stream cut (client gone under the stop policy, stalled, deadline, upstream
    broken) after Dify named its task but before any text or node usage: the
    prompt is with the model, which bills it, so the prompt's estimate is charged
    (as OpenAI's and Anthropic's meters charge a stream that began), never a refund."""
    events = [ev({**obj, "task_id": "t1"}) for obj in began]
    _, result = run(CHAT, events, BODY, cut=True)
    assert result.outcome == "cut" and result.task_id == "t1"
    usage = result.usage
    assert usage is not None and usage.estimated
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_ESTIMATE, 0)


# --- text-to-audio of a message, titles of new conversations (review F8, F6) ----------------


def test_text_to_audio_of_a_message_names_the_answer_the_ledger_must_give_the_caller() -> None:
    """Dify 1.x speaks any message by id (no user check): the route names it as
    an owned answer, in the ledger's spelling; the text form stays the plain
    priced call, and an id Dify reads as none (empty) too."""
    route = UP.route("POST", "/text-to-audio")
    message = "0B7D4A52-7F3E-4C55-9A3C-2F1E6D3C9B10"
    spoken = UP.refine(route, {"message_id": message, "voice": "x"})
    assert spoken.owned_answer == message.lower() and spoken.role == "side_cost"
    assert spoken.call == "dify.text_to_audio" and not spoken.by_body
    assert UP.refine(route, {"text": "Xin chào"}) is route
    assert UP.refine(route, {"text": "Xin chào", "message_id": ""}) is route
    assert UP.refine(route, {"text": "Xin chào", "message_id": None}) is route
    assert UP.refine(route, None) is route
    with pytest.raises(BadRequest):
        UP.refine(route, {"message_id": ["a"]})


def _titled(price: str = "0.001", currency: str = "USD") -> DifyUpstream:
    config = parse_config(
        {"call_prices": {"dify.auto_generate_name": {"price": price, "currency": currency}}},
        env={},
    )
    return DifyUpstream(config)


PRICED_ANSWER = orjson.dumps(
    {
        "event": "message",
        "task_id": "t",
        "message_id": "m",
        "conversation_id": "c",
        "answer": "hi",
        "metadata": {"usage": {"total_tokens": 3, "total_price": "0.002", "currency": "USD"}},
    }
)


def test_a_new_conversations_title_is_added_to_its_answers_cost() -> None:
    up = _titled()
    chat = up.route("POST", "/chat-messages")
    new = {"query": "hi", "inputs": {}}
    blocking = up.meter_blocking(chat, new, PRICED_ANSWER)
    assert blocking.usage is not None and blocking.usage.cost == Decimal("0.003")
    # A timeout's estimate too: the title is made as the run starts.
    unanswered = up.unanswered(chat, new).usage
    assert unanswered is not None and unanswered.cost == Decimal("0.001")
    # Not for a conversation that goes on, nor for a completion (no conversation).
    going_on = up.meter_blocking(chat, {**new, "conversation_id": "c"}, PRICED_ANSWER)
    assert going_on.usage is not None and going_on.usage.cost == Decimal("0.002")
    completion = up.meter_blocking(up.route("POST", "/completion-messages"), new, PRICED_ANSWER)
    assert completion.usage is not None and completion.usage.cost == Decimal("0.002")
    # An error body ran nothing: no title either.
    error = b'{"code": "invalid_param", "message": "x", "status": 400}'
    assert up.meter_blocking(chat, new, error).usage is None
    # Without the price (the default), the answer costs what Dify reports.
    plain = UP.meter_blocking(chat, new, PRICED_ANSWER)
    assert plain.usage is not None and plain.usage.cost == Decimal("0.002")


def test_a_title_priced_in_another_currency_than_difys_is_left_out() -> None:
    """Decimals of two currencies are never added: the title is left out (logged)
    when Dify priced the answer in another currency; a free answer takes it."""
    up = _titled(currency="EUR")
    chat = up.route("POST", "/chat-messages")
    new = {"query": "hi", "inputs": {}}
    mixed = up.meter_blocking(chat, new, PRICED_ANSWER).usage
    assert mixed is not None and (mixed.cost, mixed.currency) == (Decimal("0.002"), "USD")
    free = PRICED_ANSWER.replace(b'"0.002"', b'"0"')
    alone = up.meter_blocking(chat, new, free).usage
    assert alone is not None and (alone.cost, alone.currency) == (Decimal("0.001"), "EUR")


def _drawn_stream(rng: random.Random) -> list[ServerSentEvent]:
    """Dify-like events, mostly text events of a few types whose envelopes and
    types begin alike (message, message_end, agent_message; spaced or not),
    with pings, ids, escapes, usage and events that are not JSON."""
    envelopes = ['{"event": "%s", ', '{"event":"%s",', ' { "event" : "%s", ', '{"event": "%s"}']
    kinds = ["message", "message", "message", "agent_message", "message_end", "messages", "m"]
    events: list[ServerSentEvent] = []
    for _ in range(rng.randint(1, 30)):
        roll = rng.random()
        if roll < 0.05:
            events.append(PING)
            continue
        if roll < 0.1:
            events.append(
                ev(rng.choice(['{"event": "message"', "not json", '{"event": "message"}']))
            )
            continue
        kind = rng.choice(kinds)
        head = rng.choice(envelopes[:3]) % kind
        answer = json.dumps("".join(rng.choice('ab\u00e9\n"') for _ in range(rng.randint(0, 9))))
        if kind == "message_end" and rng.random() < 0.5:
            body = '"task_id": "t1", "message_id": "m1", "metadata": {"usage": %s}}'
            events.append(ev(head + body % orjson.dumps(DOC_USAGE).decode()))
            continue
        ids = rng.choice(['"task_id": "t1", ', f'"task_id": "t{rng.randint(1, 3)}", ', ""])
        events.append(ev(head + ids + '"answer": ' + answer + "}"))
    return events


@pytest.mark.parametrize("seed", range(60))
def test_the_hot_paths_memo_meters_as_the_match_does(seed: int) -> None:
    # DifyStreamMeter.feed reads an event that begins with what _EVENT_TYPE
    # matched in the last hot one without the match: the same meter read
    # without that memo (cleared before every event) ends the same.
    events = _drawn_stream(random.Random(seed))
    with_memo, without = UP.stream_meter(CHAT, {}), UP.stream_meter(CHAT, {})
    for event in events:
        with_memo.feed(event)
        without._hot = None
        without.feed(event)
        assert with_memo._text_chars == without._text_chars
        assert with_memo.task_id == without.task_id
    assert with_memo.malformed == without.malformed
    assert with_memo.finish(cut=True) == without.finish(cut=True)


# --- auto-play speech (review D2) ------------------------------------------------------------

# With an app's text-to-speech auto-play on, Dify synthesises the answer's speech
# while it streams (tts_message, base64 audio, then tts_message_end): a paid TTS
# call that message_end's usage leaves out.
AUDIO = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA=" * 200


def speech(task: str, message_id: str) -> list[ServerSentEvent]:
    head = {"task_id": task, "message_id": message_id, "created_at": 1705407629}
    return [
        ev({"event": "tts_message", **head, "audio": AUDIO}),
        ev({"event": "tts_message", **head, "audio": AUDIO}),
        ev({"event": "tts_message_end", **head, "audio": ""}),
    ]


def _speaking(price: str = "0.01", currency: str = "USD") -> DifyUpstream:
    config = parse_config(
        {"call_prices": {"dify.text_to_audio": {"price": price, "currency": currency}}}, env={}
    )
    return DifyUpstream(config)


WORKFLOW_COMPLETE = [*WORKFLOW_EVENTS, workflow_finished("t5", "r5", 95, {"summary": "cats"})]
AGENT_USAGE = {**DOC_USAGE, "total_price": "0.0005800"}
SPOKEN: list[tuple[Route, list[ServerSentEvent], Decimal]] = [
    (CHAT, [ev(DOC_MESSAGE_1), *speech("t1", "m1"), ev(DOC_MESSAGE_END)], Decimal("0.0013030")),
    (
        CHAT,
        [
            agent_thought(1, "", tool="dalle3"),
            message("I drew a cat.", event="agent_message", envelope=AGENT_ENVELOPE),
            *speech("t2", "m2"),
            message_end(AGENT_USAGE, envelope=AGENT_ENVELOPE),
        ],
        Decimal("0.0005800"),
    ),
    (CHAT, [*CHATFLOW_HEAD, *speech("t3", "m3"), CHATFLOW_END, CHATFLOW_WF_END], Decimal("0.0002")),
    (
        WORKFLOW,
        [*WORKFLOW_EVENTS[:5], *speech("t5", "r5"), *WORKFLOW_COMPLETE[5:]],
        Decimal("7.08E-5"),
    ),
]


@pytest.mark.parametrize(
    ("route", "events", "reported"), SPOKEN, ids=["chat", "agent", "chatflow", "workflow"]
)
def test_auto_play_speech_is_charged_as_a_text_to_audio_call(
    route: Route, events: list[ServerSentEvent], reported: Decimal
) -> None:
    """Attack: a user of an app with auto-play TTS streams answers, each with the
    speech of the whole answer, which /text-to-audio would charge (or refuse
    unpriced). Charged: the call's price on top of what Dify reports, once per
    answer however many audio chunks came."""
    up = _speaking()
    meter = up.stream_meter(route, {"query": "hi", "inputs": {}, "conversation_id": "c"})
    for event in events:
        meter.feed(event)
    result = meter.finish(cut=False)
    assert result.outcome == "complete"
    assert result.usage is not None and result.usage.cost == reported + Decimal("0.01")
    assert result.unpriced_calls == ()
    # The same answer without speech costs what Dify reports.
    silent = up.stream_meter(route, {"query": "hi", "inputs": {}, "conversation_id": "c"})
    for event in events:
        if b"tts_message" not in event.data.encode()[:40]:
            silent.feed(event)
    plain = silent.finish(cut=False).usage
    assert plain is not None and plain.cost == reported


def test_speech_and_a_new_conversations_title_are_both_charged() -> None:
    config = parse_config(
        {
            "call_prices": {
                "dify.text_to_audio": {"price": "0.01", "currency": "USD"},
                "dify.auto_generate_name": {"price": "0.001", "currency": "USD"},
            }
        },
        env={},
    )
    up = DifyUpstream(config)
    meter = up.stream_meter(CHAT, {"query": "hi", "inputs": {}})  # a new conversation
    for event in [ev(DOC_MESSAGE_1), *speech("t1", "m1"), ev(DOC_MESSAGE_END)]:
        meter.feed(event)
    usage = meter.finish(cut=False).usage
    assert usage is not None and usage.cost == Decimal("0.0013030") + Decimal("0.011")


def test_speech_in_an_answer_cut_short_is_charged_with_its_estimate() -> None:
    up = _speaking(price="0.02")
    meter = up.stream_meter(CHAT, {"query": "hi", "inputs": {}, "conversation_id": "c1"})
    for event in [ev(DOC_MESSAGE_1), *speech("t1", "m1")[:1]]:
        meter.feed(event)
    result = meter.finish(cut=True)
    assert result.outcome == "cut"
    assert result.usage is not None and result.usage.estimated
    assert (result.usage.cost, result.usage.currency) == (Decimal("0.02"), "USD")


def test_speech_in_an_answer_that_charged_nothing_adds_nothing() -> None:
    up = _speaking()
    meter = up.stream_meter(CHAT, {"query": "hi", "inputs": {}})
    for event in [*speech("t1", "m1"), error()]:
        meter.feed(event)
    result = meter.finish(cut=False)
    assert result.usage is None and result.unpriced_calls == ()


def test_unpriced_speech_is_recorded_as_reported_and_named() -> None:
    for route, events, reported in SPOKEN:
        _, result = run(route, events, {"query": "hi", "inputs": {}, "conversation_id": "c"})
        assert result.usage is not None and result.usage.cost == reported
        assert result.unpriced_calls == ("dify.text_to_audio",)


def test_speech_is_told_by_its_name_and_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The audio is large base64: the meter knows the event by its name alone,
    even before any other event named the task."""
    parsed: list[str] = []
    loads = dify._loads

    def counting(data: str | bytes) -> Any:
        parsed.append(data if isinstance(data, str) else data.decode())
        return loads(data)

    monkeypatch.setattr(dify, "_loads", counting)
    up = _speaking()
    meter = up.stream_meter(CHAT, {"query": "hi", "inputs": {}, "conversation_id": "c1"})
    for event in [
        *speech("t1", "m1")[:1],
        ev(DOC_MESSAGE_1),
        *speech("t1", "m1"),
        ev(DOC_MESSAGE_END),
    ]:
        meter.feed(event)
    usage = meter.finish(cut=False).usage
    assert usage is not None and usage.cost == Decimal("0.0113030")
    assert not any("tts_message" in data for data in parsed)
    assert len(parsed) == 2  # the first message and message_end


def test_speech_whose_event_type_is_not_first_is_still_charged() -> None:
    up = _speaking()
    meter = up.stream_meter(CHAT, {"query": "hi", "inputs": {}, "conversation_id": "c1"})
    late = '{"audio": "UklGRg==", "task_id": "t1", "event": "tts_message"}'
    for event in [ev(DOC_MESSAGE_1), ev(late), ev(DOC_MESSAGE_END)]:
        meter.feed(event)
    usage = meter.finish(cut=False).usage
    assert usage is not None and usage.cost == Decimal("0.0113030")


# --- an agent run that fails after its tool calls (review D3) ----------------------------

AGENT_HEAD: dict[str, Any] = {
    "conversation_id": "c2",
    "message_id": "m2",
    "task_id": "t2",
    "created_at": 1705407629,
}
TOOL_INPUT = '{"webscraper": {"url": "http://example.com/big"}}'


def thought(thought_id: str, position: int, **work: str) -> ServerSentEvent:
    fields = {"thought": "", "observation": "", "tool": "", "tool_input": ""} | work
    return ev(
        {
            "event": "agent_thought",
            **AGENT_HEAD,
            "id": thought_id,
            "position": position,
            **fields,
            "tool_labels": {},
            "message_files": [],
        }
    )


CONTEXT_ERROR = ev(
    {
        "event": "error",
        "conversation_id": "c2",
        "message_id": "m2",
        "status": 400,
        "code": "completion_request_error",
        "message": "[openai] Bad Request Error, maximum context length exceeded",
    }
)
# FunctionCallAgentRunner: the model answers with a tool call (no answer text),
# the tool runs, the next model call fails.
TOOL_CALLED = [
    thought("th1", 1),
    message("", event="agent_message", envelope={**AGENT_HEAD, "id": "m2"}),
    thought("th1", 1, tool="webscraper", tool_input=TOOL_INPUT),
    thought(
        "th1",
        1,
        tool="webscraper",
        tool_input=TOOL_INPUT,
        observation='{"webscraper": "' + "x" * 2000 + '"}',
    ),
    thought("th2", 2),
]


def test_an_agent_run_failing_after_its_tool_call_is_charged_an_estimate() -> None:
    """Attack: steer an agent into a failure after its first, billed model call
    (a tool result past the context window): the stream ends in an error with
    no text and no usage. Charged an estimate (the prompt and the tool call),
    marked estimated, never refunded."""
    body = {"query": "fetch http://example.com/big and summarise it", "inputs": {}}
    _, result = run(CHAT, [*TOOL_CALLED, CONTEXT_ERROR], {**body, "conversation_id": "c2"})
    assert (result.outcome, result.error_code) == ("error", "completion_request_error")
    assert result.answer_id == "m2" and result.task_id == "t2"
    assert result.usage is not None and result.usage.estimated
    assert result.usage.prompt_tokens == estimate_tokens(len(body["query"]))
    assert result.usage.completion_tokens == estimate_tokens(len(TOOL_INPUT))  # counted once


@pytest.mark.parametrize(
    "work",
    [{}, {"thought": "Let me look."}, {"tool": "webscraper"}, {"observation": "page"}],
    ids=["empty", "thought", "tool", "observation"],
)
def test_any_thought_proves_a_model_call(work: dict[str, str]) -> None:
    """Dify publishes a thought only once a model call answered (the
    function-calling runner at the call's first chunk, still empty): a run
    failing after any is charged the prompt's estimate at least."""
    _, result = run(CHAT, [thought("th1", 1, **work), CONTEXT_ERROR], {"query": "q" * 40})
    assert result.outcome == "error"
    assert result.usage is not None and result.usage.estimated
    assert result.usage.prompt_tokens == estimate_tokens(40)


def test_an_agent_run_failing_at_its_first_model_call_is_refunded() -> None:
    """The call that fails before answering (a quota, a provider not set up, a
    bad request) publishes no thought: the run costs nothing, as before."""
    _, result = run(CHAT, [error()], {"query": "fetch it", "inputs": {}, "conversation_id": "c2"})
    assert (result.outcome, result.error_code) == ("error", "provider_quota_exceeded")
    assert result.usage is None


def test_an_agent_run_that_ends_reports_dify_usage_not_the_estimate() -> None:
    usage = {**DOC_USAGE, "total_price": "0.0005800"}
    events = [*TOOL_CALLED, message_end(usage, envelope={**AGENT_HEAD, "id": "m2"})]
    _, result = run(CHAT, events)
    assert result.outcome == "complete"
    assert result.usage is not None and not result.usage.estimated
    assert result.usage.cost == Decimal("0.0005800")
