"""Dify human-in-the-loop resumes are metered exactly once (issue 20): the form
submit is the metered answer and the gateway reads the resumed run itself, so
the run is charged whether the client reads its events zero, one or several
times. The real gateway in front of the fake Dify (tests/fakes/dify_hitl.py), both on real
sockets; the meter's rules table-tested below."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import parse_config
from gateway.follow import Follows
from gateway.sse import ServerSentEvent
from gateway.storage import UsageEvent, open_storage
from gateway.upstreams.dify import DifyUpstream
from gateway.upstreams.dify_resume import (
    ResumeMeter,
    blocking_forms,
    follow_request,
    forms_named,
    resumed_form,
)
from gateway.usage import Usage
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway

RUN = "run-1"
FORM = {"inputs": {"decision": "yes"}, "action": "approve", "user": "someone-else"}
RESUMED = {"x-fake-prompt-tokens": "4000", "x-fake-completion-tokens": "1000"}
WORKFLOW = {"inputs": {"topic": "hè"}, "response_mode": "streaming", "user": "x"}


@pytest.fixture
async def fake() -> FakeDify:
    return FakeDify(api_key=UPSTREAM_KEY)


@pytest.fixture
async def hold(fake: FakeDify) -> AsyncIterator[asyncio.Event]:
    """Resumed runs publish nothing until the test sets this."""
    fake.hitl.hold = asyncio.Event()
    try:
        yield fake.hitl.hold
    finally:
        fake.hitl.hold.set()  # let the fake's resumed runs end


async def client(h: Harness) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=h.url, timeout=10, headers=h.auth())


async def pause(h: Harness, *, streaming: bool = True) -> str:
    """Run a workflow that pauses for human input; returns its form token."""
    body = WORKFLOW | {"response_mode": "streaming" if streaming else "blocking"}
    headers = {"x-fake-scenario": "pause", "x-fake-message-id": RUN}
    async with await client(h) as c:
        response = await c.post("/v1/workflows/run", json=body, headers=headers)
    assert response.status_code == 200, response.text
    if not streaming:
        (form,) = response.json()["data"]["human_input_forms"]
        return str(form["form_token"])
    for line in response.text.splitlines():
        if line.startswith("data: ") and '"human_input_required"' in line:
            return str(orjson.loads(line[6:])["data"]["form_token"])
    raise AssertionError(f"no form in {response.text!r}")


async def submit(h: Harness, token: str, **headers: str) -> httpx.Response:
    async with await client(h) as c:
        return await c.post(f"/v1/form/human_input/{token}", json=FORM, headers=headers)


async def queries_today(h: Harness) -> int:
    rows = await h.storage.daily(h.gateway.today(), h.gateway.today())
    return sum(row.queries for row in rows)


def resumes(events: list[UsageEvent]) -> list[UsageEvent]:
    return [e for e in events if e.endpoint == "form/human_input"]


# --- the client never reads the resumed run ---------------------------------------------------


async def test_a_submit_nobody_reads_the_events_of_is_charged_the_resumed_work(
    database_url: str, fake: FakeDify
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        token = await pause(h)
        submitted = await submit(h, token, **RESUMED)
        assert submitted.status_code == 200 and submitted.json() == {}
        # The attack: never open the events stream; the run goes on in Dify's worker.
        await h.probes.followed.wait_for(1)
        (resumed,) = resumes(await h.events())
        assert await queries_today(h) == 2  # the paused stream and the resume
    assert (resumed.prompt_tokens, resumed.completion_tokens) == (4000, 1000)
    assert resumed.total_tokens == 5000 and resumed.cost == fake.usage.total_price
    assert resumed.outcome == "complete" and not resumed.estimated
    assert resumed.user_id == USER and resumed.answer_id.startswith("gw-")
    # The gateway subscribed to the run's events (as the run's user, past replayed
    # pauses) before it forwarded the submit, so no event could be missed.
    paths = [(r.method, r.path) for r in fake.requests]
    follow = paths.index(("GET", f"/v1/workflow/{RUN}/events"))
    assert follow < paths.index(("POST", f"/v1/form/human_input/{token}"))
    assert fake.requests[follow].query == {"user": USER, "continue_on_pause": "true"}
    assert fake.requests[follow].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert fake.submitted_forms == [(token, USER)]  # the caller, not the body's user


# --- the client reads the events several times ------------------------------------------------


async def test_events_read_twice_are_charged_once(
    database_url: str, fake: FakeDify, hold: asyncio.Event
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        token = await pause(h)
        assert (await submit(h, token, **RESUMED)).status_code == 200
        async with await client(h) as c:
            path = f"/v1/workflow/{RUN}/events"
            reads = [
                asyncio.ensure_future(c.get(path, params={"user": "x"})),
                # A reconnect asking for the replay, passed on unchanged.
                asyncio.ensure_future(c.get(path, params={"include_state_snapshot": "true"})),
            ]
            async with asyncio.timeout(10):
                await fake.hitl.wait_subscribers(RUN, 3)  # the gateway's and the client's two
            hold.set()
            first, second = await asyncio.gather(*reads)
        for read in (first, second):
            assert read.status_code == 200 and b"node_finished" in read.content
        await h.probes.followed.wait_for(1)
        await h.probes.wait_finished(4)
        events = await h.events()
        assert await queries_today(h) == 2
    (resumed,) = resumes(events)
    assert len(events) == 2 and resumed.total_tokens == 5000
    queries = [r.query for r in fake.requests if r.path.endswith("/events")]
    assert {"user": USER, "include_state_snapshot": "true"} in queries


# --- quota ----------------------------------------------------------------------------------


async def test_a_resume_past_the_quota_is_refused_but_its_events_can_be_read(
    database_url: str, fake: FakeDify
) -> None:
    settings = {"plans": {"free": {"queries_per_day": 1}}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        token = await pause(h)  # the last query
        refused = await submit(h, token, **RESUMED)
        async with await client(h) as c, c.stream("GET", f"/v1/workflow/{RUN}/events") as read:
            # Reading a run is a scoped read: free, and only the run's own user's.
            assert read.status_code == 200
            assert await anext(read.aiter_bytes()) == b"event: ping\n\n"
    assert refused.status_code == 429 and refused.json()["code"] == "daily_query_limit"
    assert fake.submitted_forms == []  # nothing resumed
    assert fake.hitl.subscriptions == 1 and fake.requests[-1].query == {"user": USER}


async def test_a_form_the_gateway_never_saw_is_refused_and_its_query_returned(
    database_url: str, fake: FakeDify
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        refused = await submit(h, "form-guessed", **RESUMED)
        await h.probes.wait_finished(1)
        assert await queries_today(h) == 0 and await h.events() == []
    assert refused.status_code == 404 and refused.json()["code"] == "not_found"
    assert fake.requests == []


async def test_another_users_form_is_refused_as_if_unknown(
    database_url: str, fake: FakeDify
) -> None:
    # The attack: a form token leaked from someone else's paused run, submitted
    # with the attacker's own key. Refused exactly as a form never seen.
    async with running_gateway(database_url, fake=fake) as h:
        token = await pause(h)
        mallory = await h.add_user("mallory")
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as c:
            refused = await c.post(
                f"/v1/form/human_input/{token}", json=FORM, headers=h.auth(mallory)
            )
        owner = await submit(h, token, **RESUMED)  # the run's own user still can
        await h.probes.followed.wait_for(1)
    assert refused.status_code == 404 and refused.json()["code"] == "not_found"
    assert owner.status_code == 200
    assert fake.submitted_forms == [(token, USER)]


async def test_a_run_paused_in_a_blocking_answer_is_followed_too(
    database_url: str, fake: FakeDify
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        token = await pause(h, streaming=False)
        assert (await submit(h, token, **RESUMED)).status_code == 200
        await h.probes.followed.wait_for(1)
        (resumed,) = resumes(await h.events())
    assert resumed.total_tokens == 5000 and resumed.outcome == "complete"


async def test_a_blocking_answer_s_form_is_kept_before_the_client_has_the_answer(
    database_url: str, fake: FakeDify, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A blocking answer is complete for the client once its Content-Length is
    # sent: the form in it must be kept by then, or a client that submits at
    # once is refused 404 (it was, now and then, when the last chunk went out
    # before the form was kept). The gateway is called as an ASGI app here, so
    # the order of what it sends and what it keeps is exact.
    order: list[str] = []
    keep_forms = Follows.keep_forms

    async def recording(self: Follows, *args: Any, **kwargs: Any) -> None:
        await keep_forms(self, *args, **kwargs)
        order.append("kept")

    monkeypatch.setattr(Follows, "keep_forms", recording)
    async with running_gateway(database_url, fake=fake) as h:
        body = orjson.dumps(WORKFLOW | {"response_mode": "blocking"})
        headers = [
            (b"host", b"gateway"),
            (b"authorization", f"Bearer {h.key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-fake-scenario", b"pause"),
            (b"x-fake-message-id", RUN.encode()),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/workflows/run",
            "raw_path": b"/v1/workflows/run",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        sent = [False]
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the client stays
            return {"type": "http.disconnect"}

        length = 0
        received = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal length, received
            if message["type"] == "http.response.start":
                length = int(dict(message["headers"])[b"content-length"])
                return
            received += len(message.get("body", b""))
            if received and received == length:
                order.append("answer complete")

        async with asyncio.timeout(10):
            await h.app(scope, receive, send)
    assert order == ["kept", "answer complete"]


# --- the read breaks, or the gateway stops ----------------------------------------------------


async def test_a_follow_cut_by_the_upstream_is_charged_what_it_read(
    database_url: str, fake: FakeDify
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        token = await pause(h)
        assert (await submit(h, token, **RESUMED, **{"x-fake-scenario": "cut"})).status_code == 200
        await h.probes.followed.wait_for(1)
        (resumed,) = resumes(await h.events())
        assert await queries_today(h) == 2
    # The text it streamed before the cut ("Đã duyệt.", 9 characters), estimated.
    assert resumed.outcome == "cut" and resumed.estimated
    assert resumed.completion_tokens > 0 and resumed.cost == 0


async def test_a_follow_refusing_an_event_too_large_is_charged_what_it_read(
    database_url: str, fake: FakeDify
) -> None:
    settings = {"upstream": {"max_event_bytes": 4096}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        token = await pause(h)
        huge = {"x-fake-scenario": "huge"}
        assert (await submit(h, token, **RESUMED, **huge)).status_code == 200
        await h.probes.followed.wait_for(1)
        (resumed,) = resumes(await h.events())
    # The node's report came after the refused event: an estimate, the query spent.
    assert resumed.outcome == "cut" and resumed.estimated and resumed.total_tokens > 0


async def test_a_follow_that_gives_up_charges_an_estimate(
    database_url: str, fake: FakeDify, hold: asyncio.Event
) -> None:
    # The resumed run says nothing within upstream.total_timeout (counted from the
    # submit's arrival, so the submit's pending row is settled before any
    # recovery could take it for lost).
    settings = {"upstream": {"total_timeout": 0.5}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        token = await pause(h)
        assert (await submit(h, token, **RESUMED)).status_code == 200
        await h.probes.followed.wait_for(1)
        (resumed,) = resumes(await h.events())
        assert await queries_today(h) == 2
    assert resumed.outcome == "cut" and resumed.estimated and resumed.total_tokens > 0


async def test_shutdown_settles_a_resumed_run_still_being_read(
    database_url: str, fake: FakeDify, hold: asyncio.Event
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        token = await pause(h)
        assert (await submit(h, token, **RESUMED)).status_code == 200
        async with asyncio.timeout(10):
            await fake.hitl.wait_subscribers(RUN, 1)
        config = h.config
        # Leaving the block stops the gateway with the resumed run still running.
    storage = await open_storage(config.database)
    try:
        events = [
            e
            async for e in storage.events(datetime(2000, 1, 1).date(), datetime(2100, 1, 1).date())
        ]
        # Nothing left pending: a recovery finds nothing to charge.
        far = datetime.now(UTC) + timedelta(days=1)
        assert await storage.recover(before=far, now=far) == []
    finally:
        await storage.close()
    (resumed,) = resumes(events)
    assert resumed.outcome == "shutdown" and resumed.estimated and resumed.total_tokens > 0


# --- the meter ------------------------------------------------------------------------------

UP = DifyUpstream()


def _events(*payloads: dict[str, Any]) -> list[ServerSentEvent]:
    return [ServerSentEvent(event="message", data=orjson.dumps(p).decode()) for p in payloads]


def _node(execution: str, tokens: int) -> dict[str, Any]:
    return {
        "event": "node_finished",
        "task_id": "t9",
        "workflow_run_id": "r9",
        "data": {
            "id": execution,
            "node_type": "llm",
            "outputs": {"usage": {"prompt_tokens": tokens - 10, "completion_tokens": 10}},
            "execution_metadata": {"total_tokens": tokens, "total_price": "0.001"},
        },
    }


def _pause(token: str) -> dict[str, Any]:
    reasons = [{"TYPE": "human_input_required", "form_token": token}]
    return {"event": "workflow_paused", "workflow_run_id": "r9", "data": {"reasons": reasons}}


def _asked(token: str) -> dict[str, Any]:
    return {"event": "human_input_required", "workflow_run_id": "r9", "data": {"form_token": token}}


STARTED = {"event": "workflow_started", "workflow_run_id": "r9", "data": {"reason": "initial"}}
RESUMED_START = {"event": "workflow_started", "workflow_run_id": "r9", "data": {}}
FINISHED = {"event": "workflow_finished", "workflow_run_id": "r9", "data": {"total_tokens": 9999}}


def meter_of(*payloads: dict[str, Any]) -> ResumeMeter:
    meter = UP.follow_meter("tok")
    for event in _events(*payloads):
        meter.feed(event)
    return meter


@pytest.mark.parametrize(
    ("payloads", "tokens", "outcome", "done"),
    [
        # Live (Redis pub/sub): the resumed nodes, never workflow_finished's total.
        pytest.param([RESUMED_START, _node("b", 500), FINISHED], 500, "complete", True, id="live"),
        # A replay from the run's start (Redis Streams): the part before the
        # pause this resume ends is not charged again.
        pytest.param(
            [STARTED, _node("a", 300), _asked("tok"), _pause("tok"), _node("b", 500), FINISHED],
            500,
            "complete",
            True,
            id="replayed",
        ),
        # ... also when the pause names its form only in the request before it.
        pytest.param(
            [STARTED, _node("a", 300), _asked("tok"), _pause("x"), _node("b", 500), FINISHED],
            500,
            "complete",
            True,
            id="replayed-unnamed-pause",
        ),
        # A multi-pause run replayed: earlier pauses do not end the read.
        pytest.param(
            [
                *(STARTED, _node("a", 300), _pause("t0"), _node("m", 200)),
                *(_asked("tok"), _pause("tok"), _node("b", 500), FINISHED),
            ],
            500,
            "complete",
            True,
            id="replayed-two-pauses",
        ),
        # A new pause ends the read: the next resume is followed in turn.
        pytest.param(
            [_node("b", 500), _asked("t2"), _pause("t2")], 500, "complete", True, id="new-pause"
        ),
        # A node reported twice (replay overlapping live events) counts once.
        pytest.param(
            [_node("b", 500), _node("b", 500), FINISHED], 500, "complete", True, id="twice"
        ),
        # No model ran after the resume: the query alone.
        pytest.param([FINISHED], 0, "complete", True, id="no-nodes"),
        # The stream ended before the run did.
        pytest.param([_node("b", 500)], 500, "cut", False, id="unfinished"),
    ],
)
def test_the_resume_meter(
    payloads: list[dict[str, Any]], tokens: int, outcome: str, done: bool
) -> None:
    meter = meter_of(*payloads)
    assert meter.done is done
    result = meter.finish(cut=not done)
    assert result.outcome == outcome and result.answer_id is None
    assert result.usage is not None and result.usage.total_tokens == tokens
    assert meter.task_id is None  # the gateway never stops a resumed run


def test_the_resume_meter_keeps_a_new_pauses_forms_and_stops_reading() -> None:
    meter = meter_of(_node("b", 500), _asked("t2"), _pause("t2"), _node("c", 700))
    assert meter.done and meter.paused_forms == (("t2", "r9"), ("t2", "r9"))
    assert meter.finish(cut=False).usage == Usage(490, 10, 500, Decimal("0.001"))


def test_text_without_node_reports_is_estimated_and_an_error_ends_the_read() -> None:
    chunk = {"event": "text_chunk", "workflow_run_id": "r9", "data": {"text": "x" * 40}}
    usage = meter_of(chunk).finish(cut=True).usage
    assert usage is not None and usage.estimated and usage.completion_tokens == 10
    failed = meter_of(_node("b", 500), {"event": "error", "code": "internal_server_error"})
    assert failed.done and failed.finish(cut=False).outcome == "error"


SPEECH = {"event": "tts_message", "workflow_run_id": "r9", "audio": "UklGRg==" * 100}
SPEECH_END = {"event": "tts_message_end", "workflow_run_id": "r9", "audio": ""}


def test_auto_play_speech_of_a_resumed_run_is_charged_once() -> None:
    """Review D2: the resumed part's speech (auto-play TTS) is a text-to-audio
    call, charged at its price as in any streamed answer; speech of the paused
    part, replayed, was the paused stream's to charge."""
    config = parse_config(
        {"call_prices": {"dify.text_to_audio": {"price": "0.01", "currency": "USD"}}}, env={}
    )
    up = DifyUpstream(config)
    resumed = [RESUMED_START, _node("b", 500), SPEECH, SPEECH, SPEECH_END, FINISHED]
    replayed = [STARTED, SPEECH, _asked("tok"), _pause("tok"), _node("b", 500), FINISHED]
    for payloads, cost in ((resumed, Decimal("0.011")), (replayed, Decimal("0.001"))):
        meter = up.follow_meter("tok")
        for event in _events(*payloads):
            meter.feed(event)
        result = meter.finish(cut=False)
        assert result.usage is not None and result.usage.cost == cost
        assert result.unpriced_calls == ()
    # Unpriced, it is recorded as reported and named.
    unpriced = meter_of(*resumed).finish(cut=False)
    assert unpriced.usage is not None and unpriced.usage.cost == Decimal("0.001")
    assert unpriced.unpriced_calls == ("dify.text_to_audio",)


def test_the_forms_a_pause_names() -> None:
    assert forms_named("human_input_required", _asked("t1"), None) == [("t1", "r9")]
    # The run from the stream when the event lacks it; null tokens are skipped.
    bare = {"event": "human_input_required", "data": {"form_token": None}}
    assert forms_named("human_input_required", bare, "r1") == []
    assert forms_named("workflow_paused", _pause("t1") | {"workflow_run_id": None}, "r1") == [
        ("t1", "r1")
    ]
    # Only the fixed fields: a token deeper in the data (a run's outputs) is not one.
    deep = {"workflow_run_id": "r9", "data": {"outputs": {"form_token": "mine"}}}
    assert forms_named("workflow_paused", deep, None) == []


def test_the_forms_of_a_blocking_pause() -> None:
    body = {
        "task_id": "t",
        "workflow_run_id": "r1",
        "data": {"status": "paused", "human_input_forms": [{"form_token": "t1"}]},
    }
    assert blocking_forms(orjson.dumps(body)) == [("t1", "r1")]
    assert blocking_forms(b'{"answer": "form_token"}') == []
    assert blocking_forms(b"not json form_token") == []


def test_the_follow_request_and_the_submitted_form() -> None:
    path, query = follow_request("r/1", "dũng x")
    assert path == "/workflow/r%2F1/events"
    assert query == b"user=d%C5%A9ng%20x&continue_on_pause=true"
    assert resumed_form("/form/human_input/tok-1") == "tok-1"
    assert resumed_form("/form/human_input/tok-1/x") is None
    submit = UP.route("POST", "/form/human_input/tok-1")
    assert UP.resumed_form(submit, "/form/human_input/tok-1") == "tok-1"
    assert (
        UP.resumed_form(UP.route("GET", "/form/human_input/tok-1"), "/form/human_input/tok-1")
        is None
    )
    assert UP.route("GET", "/workflow/r1/events").role == "scoped"


def test_a_paused_chatflow_stream_names_its_form_to_keep() -> None:
    # The stream that pauses (here a chatflow's, through /chat-messages) names the
    # form and its run: kept so that the submit can be followed.
    chat = UP.route("POST", "/chat-messages")
    meter = UP.stream_meter(chat, {"query": "Duyệt giúp tôi"})
    envelope = {"conversation_id": "c1", "message_id": "m1", "task_id": "t1"}
    for event in _events(
        envelope | {"event": "workflow_started", "workflow_run_id": "r7", "data": {}},
        envelope
        | {"event": "human_input_required", "workflow_run_id": "r7"}
        | {"data": {"form_token": "tok-7", "node_id": "n"}},
        envelope | {"event": "workflow_paused", "workflow_run_id": "r7", "data": {"reasons": []}},
    ):
        meter.feed(event)
    assert meter.paused_forms == (("tok-7", "r7"),)
