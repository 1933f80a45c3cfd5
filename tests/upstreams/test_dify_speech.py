"""Auto-play speech as a review of its first version found it charged (R2-1,
R2-2): tts_message_end alone is no TTS call, and a price in another currency
than Dify's is counted as unpriced, not dropped."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gateway.config import parse_config
from gateway.sse import ServerSentEvent
from gateway.upstreams.dify import DifyUpstream
from tests.upstreams.test_dify import (
    AGENT_ENVELOPE,
    CHAT,
    CHATFLOW_LLM,
    DOC_USAGE,
    agent_thought,
    error,
    ev,
    message,
    message_end,
    workflow_started,
)


def _speaking(price: str = "0.01", currency: str = "USD") -> DifyUpstream:
    config = parse_config(
        {"call_prices": {"dify.text_to_audio": {"price": price, "currency": currency}}}, env={}
    )
    return DifyUpstream(config)


def _run(up: DifyUpstream, events: list[ServerSentEvent], *, cut: bool = False) -> Any:
    meter = up.stream_meter(CHAT, {"query": "hi", "inputs": {}, "conversation_id": "c"})
    for event in events:
        meter.feed(event)
    return meter.finish(cut=cut)


# Dify's _wrapper_process_stream_response yields tts_message_end whenever the app
# has auto-play on (`if tts_publisher: yield MessageAudioEndStreamResponse(audio="")`),
# whether or not any audio came; AppGeneratorTTSPublisher._runtime calls invoke_tts
# only for non-blank text, and the chatflow pipeline feeds it text_chunk only.
TTS_END = ev({"event": "tts_message_end", "task_id": "t3", "audio": ""})

# A chatflow that runs an LLM node (priced 0.0002) and pauses for human input
# before its answer node streams any text: no speech was synthesised.
PAUSED_BEFORE_TEXT = [
    workflow_started("t3", "r3"),
    CHATFLOW_LLM,
    ev(
        {
            "event": "human_input_required",
            "task_id": "t3",
            "workflow_run_id": "r3",
            "data": {"form_token": "tok-1", "node_id": "hi"},
        }
    ),
    ev(
        {
            "event": "workflow_paused",
            "task_id": "t3",
            "workflow_run_id": "r3",
            "data": {"status": "paused", "reasons": []},
        }
    ),
    TTS_END,
]


def test_speech_end_alone_is_not_a_tts_call_paused_chatflow() -> None:
    """R2-1: a paused chatflow with no answer text is charged a TTS call that
    Dify never made (tts_message_end only, no tts_message)."""
    result = _run(_speaking(), PAUSED_BEFORE_TEXT, cut=False)
    assert result.usage is not None
    assert result.usage.cost == Decimal("0.0002000")  # the LLM node, no speech
    assert result.unpriced_calls == ()


def test_speech_end_alone_is_not_a_tts_call_failed_chatflow() -> None:
    """R2-1: a chatflow whose LLM node ran and a later node failed, no text."""
    events = [
        workflow_started("t3", "r3"),
        CHATFLOW_LLM,
        error("internal_server_error", 500),
        TTS_END,
    ]
    result = _run(_speaking(), events)
    assert result.outcome == "error"
    assert result.usage is not None and result.usage.cost == Decimal("0.0002000")


def test_speech_end_alone_is_not_counted_unpriced() -> None:
    """R2-1, unpriced: no call made, so none counted in gateway_unpriced_calls_total."""
    result = _run(DifyUpstream(), PAUSED_BEFORE_TEXT)
    assert result.unpriced_calls == ()


def test_speech_end_alone_not_charged_on_an_agent_error_after_a_thought() -> None:
    """R2-1 with D3: an agent run whose tool-calling call streamed no text,
    then failed: charged the estimate (right), plus a TTS call that never happened."""
    events = [
        agent_thought(1, "", tool="dalle3"),
        message("", event="agent_message", envelope=AGENT_ENVELOPE),
        error("completion_request_error"),
        ev({"event": "tts_message_end", "task_id": "t2", "audio": ""}),
    ]
    result = _run(_speaking(), events)
    assert result.outcome == "error"
    assert result.usage is not None and result.usage.estimated
    assert result.usage.cost == 0  # the estimate has no price; no speech call was made


def test_speech_end_alone_not_charged_on_an_empty_chat_answer() -> None:
    """R2-1: a chat answer whose text is empty (Dify billed the model call; the
    TTS publisher got no text) is charged a speech call."""
    events = [
        message(""),
        message_end(DOC_USAGE),
        ev({"event": "tts_message_end", "task_id": "t1", "audio": ""}),
    ]
    result = _run(_speaking(), events)
    assert result.outcome == "complete"
    assert result.usage is not None and result.usage.cost == Decimal("0.0013030")


def test_speech_priced_in_another_currency_is_not_silently_dropped() -> None:
    """R2-2: speech priced in EUR on an app Dify prices in USD: _with_call
    leaves the call out (a log line per answer), yet unpriced_calls stays empty,
    so gateway_unpriced_calls_total never counts the speech that went free."""
    audio = ev({"event": "tts_message", "task_id": "t1", "audio": "UklGRg==" * 50})
    events = [message("Hi there."), audio, message_end(DOC_USAGE), TTS_END]
    result = _run(_speaking(currency="EUR"), events)
    assert result.usage is not None
    charged = result.usage.cost != Decimal("0.0013030")
    assert charged or result.unpriced_calls == ("dify.text_to_audio",)
