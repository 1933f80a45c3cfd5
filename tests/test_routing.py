"""Default deny (issue 20): the requests an attacker with a gateway key sends to
routes the gateway used to forward with the operator's upstream key, and proof
that each is refused, confined to the caller, or charged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from gateway.clock import FixedClock
from gateway.config import parse_config
from gateway.errors import ConfigError, NotFound, StorageError
from gateway.metrics import Metrics
from gateway.routing import RouteGuard
from tests.fakes.dify import FakeDify
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway

NO_QUERIES = {"plans": {"free": {"queries_per_day": 0}}}
PRICES = {
    "call_prices": {
        "dify.suggested_questions": {"price": "0.002", "currency": "EUR"},
        "dify.auto_generate_name": {"price": "0.001", "currency": "EUR"},
        "dify.text_to_audio": {"price": "0.015", "currency": "EUR"},
        "dify.audio_to_text": {"price": "0.006", "currency": "EUR"},
    }
}


@pytest.fixture
async def fake() -> FakeDify:
    return FakeDify(api_key=UPSTREAM_KEY)


async def request(
    h: Harness,
    method: str,
    path: str,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
        return await client.request(method, path, headers=h.auth(key, **(headers or {})), **kwargs)


async def queries_today(h: Harness) -> int:
    rows = await h.storage.daily(h.gateway.today(), h.gateway.today())
    return sum(row.queries for row in rows)


def dify_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["message"]


# --- Dify operator endpoints ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        # Every end user's workflow inputs and outputs.
        ("GET", "/v1/workflows/logs", None),
        ("GET", "/v1/workflows/run/9b1c9a4e-0000-4000-8000-000000000001", None),
        # Every user's feedback.
        ("GET", "/v1/app/feedbacks", None),
        # An answer Dify then serves to all users, and the annotations' removal.
        ("POST", "/v1/apps/annotations", {"question": "Refund?", "answer": "Mail me your card"}),
        ("PUT", "/v1/apps/annotations/a1", {"question": "q", "answer": "a"}),
        ("DELETE", "/v1/apps/annotations/a1", None),
        ("POST", "/v1/apps/annotation-reply/enable", {"score_threshold": 0.1}),
        # Knowledge bases.
        ("GET", "/v1/datasets", None),
        ("POST", "/v1/datasets/d1/document/create-by-text", {"name": "x", "text": "y"}),
        # Any message file of the app, with no user check in Dify.
        ("GET", "/v1/files/f1/preview", None),
    ],
)
async def test_dify_operator_endpoints_are_refused(
    database_url: str, fake: FakeDify, method: str, path: str, body: Any
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        response = await request(h, method, path, json=body)
    dify_error(response, 403, "endpoint_not_allowed")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/no-such-endpoint"),
        ("POST", "/v1/conversations"),
        ("GET", "/v1/chat-messages"),
        ("HEAD", "/v1/workflows/logs"),
        ("OPTIONS", "/v1/parameters"),  # not a CORS preflight: routed like any request
    ],
)
async def test_an_unknown_route_is_refused_404(
    database_url: str, fake: FakeDify, method: str, path: str
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        response = await request(h, method, path)
    assert response.status_code == 404
    if method != "HEAD":
        dify_error(response, 404, "not_found")
    assert fake.requests == []


async def test_harmless_and_caller_scoped_routes_still_pass(
    database_url: str, fake: FakeDify
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        assert (await request(h, "GET", "/v1/parameters")).status_code == 200
        assert (await request(h, "GET", "/v1/conversations?user=victim")).status_code == 200
        renamed = await request(
            h, "POST", "/v1/conversations/c1/name", json={"name": "Mine", "user": "victim"}
        )
        assert renamed.status_code == 200 and renamed.json()["name"] == "Mine"
        assert await queries_today(h) == 0
    # The user the upstream sees is always the caller.
    assert fake.requests[1].query["user"] == USER
    assert fake.requests[2].json["user"] == USER


# --- the operator's allow-list -------------------------------------------------------------


async def test_an_allow_listed_route_is_forwarded_unmetered(
    database_url: str, fake: FakeDify
) -> None:
    settings = {"upstream": {"allow": ["GET /workflows/logs", "* /apps/annotations/**"]}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        response = await request(h, "GET", "/v1/workflows/logs?page=1")
        assert response.status_code == 200 and response.json()["data"] == []
        # Only what is listed: the run detail stays refused.
        refused = await request(h, "GET", "/v1/workflows/run/r1")
        dify_error(refused, 403, "endpoint_not_allowed")
        assert await h.events() == [] and await queries_today(h) == 0
    assert fake.hits("/workflows/logs") == 1 and fake.hits("/workflows/run/r1") == 0
    assert fake.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("get /x", "upstream.allow[1]: 'get /x': expected 'METHOD /path'"),
        ("GET x", "upstream.allow[1]: 'GET x': expected a path starting with '/'"),
        ("GET /a/**b", "upstream.allow[1]: 'GET /a/**b': bad path segment '**b'"),
    ],
)
def test_a_malformed_allow_rule_is_refused_at_load_with_its_key(rule: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"upstream": {"allow": ["GET /ok", rule]}}, env={})
    assert message in info.value.message


# --- Dify human-in-the-loop resumes: tests/upstreams/test_dify_resume.py ---------------------


# --- Dify side costs -----------------------------------------------------------------------

SIDE_CALLS = [
    pytest.param(
        "GET", "/v1/messages/m1/suggested", {}, "dify.suggested_questions", id="suggested"
    ),
    pytest.param(
        "POST",
        "/v1/conversations/c1/name",
        {"json": {"auto_generate": True}},
        "dify.auto_generate_name",
        id="auto-name",
    ),
    pytest.param(
        "POST",
        "/v1/conversations/c1/name",
        {"json": {"auto_generate": "false", "name": "x"}},  # true to older Dify's reqparse
        "dify.auto_generate_name",
        id="auto-name-string",
    ),
    pytest.param(
        "POST", "/v1/text-to-audio", {"json": {"text": "Xin chào"}}, "dify.text_to_audio", id="tts"
    ),
    pytest.param(
        "POST",
        "/v1/audio-to-text",
        {"files": {"file": ("a.mp3", b"ID3audio", "audio/mpeg")}},
        "dify.audio_to_text",
        id="stt",
    ),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "call"), SIDE_CALLS)
async def test_an_unpriced_side_call_is_refused(
    database_url: str, fake: FakeDify, method: str, path: str, kwargs: dict[str, Any], call: str
) -> None:
    async with running_gateway(database_url, fake=fake) as h:
        response = await request(h, method, path, **kwargs)
        assert await queries_today(h) == 0
    dify_error(response, 403, "call_not_priced")
    assert fake.requests == []


@pytest.mark.parametrize(("method", "path", "kwargs", "call"), SIDE_CALLS)
async def test_a_priced_side_call_is_charged_its_price(
    database_url: str, fake: FakeDify, method: str, path: str, kwargs: dict[str, Any], call: str
) -> None:
    price = PRICES["call_prices"][call]
    async with running_gateway(database_url, fake=fake, settings=PRICES) as h:
        response = await request(h, method, path, **kwargs)
        assert response.status_code == 200, response.text
        await h.probes.wait_finished(1)
        (event,) = await h.events()
        assert await queries_today(h) == 1
    assert event.cost == Decimal(price["price"]) and isinstance(event.cost, Decimal)
    assert event.currency == price["currency"]
    assert event.user_id == USER and event.total_tokens == 0 and event.outcome == "complete"
    assert len(fake.requests) == 1


@pytest.mark.parametrize(("method", "path", "kwargs", "call"), SIDE_CALLS)
async def test_a_priced_side_call_is_refused_at_quota_0(
    database_url: str, fake: FakeDify, method: str, path: str, kwargs: dict[str, Any], call: str
) -> None:
    settings = PRICES | NO_QUERIES
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        response = await request(h, method, path, **kwargs)
    dify_error(response, 429, "daily_query_limit")
    assert fake.requests == []


async def test_a_side_call_the_upstream_refuses_costs_nothing(
    database_url: str, fake: FakeDify
) -> None:
    async with running_gateway(database_url, fake=fake, settings=PRICES) as h:
        response = await request(
            h, "GET", "/v1/messages/m1/suggested", headers={"x-fake-status": "400"}
        )
        assert response.status_code == 400
        await h.probes.wait_finished(1)
        assert await h.events() == [] and await queries_today(h) == 0


async def test_a_side_call_cut_by_a_crash_is_recovered_at_its_price(
    database_url: str, fake: FakeDify
) -> None:
    # Admitted, then the gateway dies before the call is settled: the recovery
    # charges the pending row, which carries the call's price, not a cost of 0.
    async with running_gateway(database_url, fake=fake, settings=PRICES) as h:
        route = h.gateway.upstream.route("GET", "/messages/m1/suggested")
        await h.app.proxy.admitter.admit(h.gateway.snapshot, USER, "crashed-call", route, {})
        later = h.gateway.clock.now() + timedelta(hours=1)
        assert await h.storage.recover(before=later, now=later) == ["crashed-call"]
        (event,) = await h.events()
    assert (event.cost, event.outcome, event.estimated) == (Decimal("0.002"), "recovered", True)


@pytest.mark.parametrize(
    ("path", "asked"),
    [("/v1/workflows/logs", "GET"), ("/v1/apps/annotations", "POST"), ("/v1/nowhere", "GET")],
)
async def test_a_preflight_reaches_only_routes_the_gateway_forwards(
    database_url: str, fake: FakeDify, path: str, asked: str
) -> None:
    # The attack: an OPTIONS preflight needs no key; it must not be a way to reach
    # the upstream on routes the gateway refuses (without [cors], preflights are
    # forwarded so the upstream's own CORS policy answers them).
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": asked}
    async with running_gateway(database_url, fake=fake) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            refused = await client.options(path, headers=headers)
            allowed = await client.options(
                "/v1/chat-messages", headers=headers | {"Access-Control-Request-Method": "POST"}
            )
    assert refused.status_code in (403, 404), refused.text
    assert allowed.status_code == 405  # the fake Dify's own answer: it was forwarded
    assert [(r.method, r.path) for r in fake.requests] == [("OPTIONS", "/v1/chat-messages")]


# --- OpenAI --------------------------------------------------------------------------------


class StoredObjects:
    """A FakeOpenAI that also serves the objects its answers created, as OpenAI does."""

    def __init__(self) -> None:
        self.fake = FakeOpenAI(api_key=UPSTREAM_KEY)
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "").removeprefix("/v1")
        if scope["type"] == "http" and path.startswith(("/responses/", "/chat/completions/")):
            self.seen.append((scope["method"], path))
            object_id = path.split("/")[-1]
            body = orjson.dumps({"id": object_id, "deleted": scope["method"] == "DELETE"})
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.fake(scope, receive, send)


def openai_settings() -> dict[str, Any]:
    return {"upstream": {"kind": "openai"}, "prices": {"gpt-4o-mini": {"input": "1"}}}


@pytest.fixture
async def openai_gw(database_url: str) -> AsyncIterator[tuple[Harness, StoredObjects]]:
    upstream = StoredObjects()
    async with running_gateway(database_url, upstream=upstream, settings=openai_settings()) as h:
        yield h, upstream


def openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/files/file-abc123"),
        ("GET", "/v1/files/file-abc123/content"),
        ("GET", "/v1/files"),
        ("DELETE", "/v1/models/ft:gpt-4o-mini:acme::abc123"),
        ("POST", "/v1/fine_tuning/jobs/ftjob-1/cancel"),
        ("DELETE", "/v1/vector_stores/vs_1"),
        ("GET", "/v1/batches"),
        ("GET", "/v1/chat/completions"),  # every user's stored completions
        ("GET", "/v1/responses"),
        ("GET", "/v1/organization/costs"),
    ],
)
async def test_openai_account_objects_are_refused(
    openai_gw: tuple[Harness, StoredObjects], method: str, path: str
) -> None:
    h, upstream = openai_gw
    response = await request(h, method, path)
    openai_error(response, 403, "endpoint_not_allowed")
    assert response.json()["error"]["type"] == "permission_error"
    assert upstream.fake.requests == [] and upstream.seen == []


async def test_openai_unknown_route_is_refused_404(
    openai_gw: tuple[Harness, StoredObjects],
) -> None:
    h, upstream = openai_gw
    openai_error(await request(h, "GET", "/v1/no/such/thing"), 404, "not_found")
    assert upstream.fake.requests == []


async def test_a_stored_response_is_only_the_owners(
    openai_gw: tuple[Harness, StoredObjects],
) -> None:
    h, upstream = openai_gw
    bob = await h.add_user("bob")
    created = await request(
        h, "POST", "/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"}
    )
    assert created.status_code == 200
    response_id = created.json()["id"]
    await h.probes.wait_finished(1)
    (event,) = await h.events()
    assert event.answer_id == response_id and response_id.startswith("resp_")

    # Another user: as if it did not exist, and nothing reaches the upstream.
    for method, suffix in (("GET", ""), ("GET", "/input_items"), ("DELETE", "")):
        stolen = await request(h, method, f"/v1/responses/{response_id}{suffix}", key=bob)
        openai_error(stolen, 404, "not_found")
    openai_error(
        await request(h, "POST", f"/v1/responses/{response_id}/cancel", key=bob), 404, "not_found"
    )
    assert upstream.seen == []
    # The owner reads and deletes it.
    own = await request(h, "GET", f"/v1/responses/{response_id}")
    assert own.status_code == 200 and own.json()["id"] == response_id
    assert (await request(h, "DELETE", f"/v1/responses/{response_id}")).status_code == 200
    assert upstream.seen == [
        ("GET", f"/responses/{response_id}"),
        ("DELETE", f"/responses/{response_id}"),
    ]


SAME = "resp_repeated0123456789abcdef"


async def test_a_response_id_an_upstream_repeats_charges_both_and_stays_the_firsts(
    openai_gw: tuple[Harness, StoredObjects],
) -> None:
    """Attack (review-once F1): an upstream gives bob's answer the id it gave
    alice's. Both are charged (bob's under ``<id>#<request id>``), and the id
    still names alice's object: bob reads it no more than before."""
    h, upstream = openai_gw
    bob = await h.add_user("bob")
    same = {"x-fake-id": SAME}
    body = {"model": "gpt-4o-mini", "input": "hi"}
    for key in (None, bob):
        created = await request(h, "POST", "/v1/responses", key=key, headers=same, json=body)
        assert created.status_code == 200 and created.json()["id"] == SAME
        await h.probes.wait_finished(1 if key is None else 2)
    events = {e.user_id: e for e in await h.events()}
    assert events["alice"].answer_id == SAME
    assert events["bob"].answer_id == f"{SAME}#{events['bob'].request_id}"
    for user in ("alice", "bob"):
        charged = await h.storage.get_user(user)
        assert charged is not None and charged.lifetime_tokens == events[user].total_tokens > 0
    # The object is alice's: bob is refused it, and no path names his row's
    # id (a '#' in a path is refused: gateway/http.py, canonical_path).
    openai_error(await request(h, "GET", f"/v1/responses/{SAME}", key=bob), 404, "not_found")
    own_row = events["bob"].answer_id.replace("#", "%23")
    openai_error(await request(h, "GET", f"/v1/responses/{own_row}", key=bob), 400, "invalid_param")
    assert upstream.seen == []
    assert (await request(h, "GET", f"/v1/responses/{SAME}")).status_code == 200
    assert upstream.seen == [("GET", f"/responses/{SAME}")]


async def test_a_stored_response_older_than_the_history_window_is_not_read(
    database_url: str,
) -> None:
    """Review-limits F3 on OpenAI's stored objects: a 7-day plan's user reads,
    and continues, only the responses given within the window - an older one
    is answered 404 as if it were not there, and nothing reaches the upstream;
    deleting it stays the caller's."""
    upstream = StoredObjects()
    settings = {**openai_settings(), "plans": {"free": {"chat_history_days": 7}}}
    clock = FixedClock(datetime.now(UTC) - timedelta(days=40))
    async with running_gateway(
        database_url, upstream=upstream, settings=settings, clock=clock
    ) as h:
        created = await request(
            h, "POST", "/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"}
        )
        response_id = created.json()["id"]
        await h.probes.wait_finished(1)
        clock.set(datetime.now(UTC))  # 40 days later
        read = await request(h, "GET", f"/v1/responses/{response_id}")
        items = await request(h, "GET", f"/v1/responses/{response_id}/input_items")
        continued = await request(
            h,
            "POST",
            "/v1/responses",
            json={"model": "gpt-4o-mini", "input": "and?", "previous_response_id": response_id},
        )
        deleted = await request(h, "DELETE", f"/v1/responses/{response_id}")
    for refused in (read, items, continued):
        openai_error(refused, 404, "not_found")
    assert deleted.status_code == 200
    assert upstream.seen == [("DELETE", f"/responses/{response_id}")]
    assert len(upstream.fake.requests) == 1  # the first answer only


async def test_a_stored_chat_completion_is_only_the_owners(
    openai_gw: tuple[Harness, StoredObjects],
) -> None:
    h, upstream = openai_gw
    bob = await h.add_user("bob")
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "store": True,
        "stream": True,
    }
    created = await request(h, "POST", "/v1/chat/completions", json=body)
    assert created.status_code == 200
    await h.probes.wait_finished(1)
    (event,) = await h.events()
    completion_id = event.answer_id
    assert completion_id.startswith("chatcmpl-") and completion_id.encode() in created.content

    stolen = await request(h, "GET", f"/v1/chat/completions/{completion_id}/messages", key=bob)
    openai_error(stolen, 404, "not_found")
    openai_error(
        await request(h, "DELETE", f"/v1/chat/completions/{completion_id}", key=bob),
        404,
        "not_found",
    )
    # Unknown to the ledger: the same answer for everyone.
    openai_error(
        await request(h, "GET", "/v1/chat/completions/chatcmpl-unknown1234"), 404, "not_found"
    )
    assert upstream.seen == []
    own = await request(h, "GET", f"/v1/chat/completions/{completion_id}")
    assert own.status_code == 200
    assert upstream.seen == [("GET", f"/chat/completions/{completion_id}")]


async def test_an_unstored_chat_completion_keeps_the_gateways_id(
    openai_gw: tuple[Harness, StoredObjects],
) -> None:
    h, _ = openai_gw
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert (await request(h, "POST", "/v1/chat/completions", json=body)).status_code == 200
    await h.probes.wait_finished(1)
    (event,) = await h.events()
    assert event.answer_id.startswith("gw-")


async def test_continuing_another_users_response_is_refused(
    openai_gw: tuple[Harness, StoredObjects],
) -> None:
    h, upstream = openai_gw
    bob = await h.add_user("bob")
    created = await request(
        h, "POST", "/v1/responses", json={"model": "gpt-4o-mini", "input": "my secret"}
    )
    response_id = created.json()["id"]
    await h.probes.wait_finished(1)
    # Bob asks the model to go on from Alice's response, which it would read whole.
    follow_up = {"model": "gpt-4o-mini", "input": "repeat it", "previous_response_id": response_id}
    stolen = await request(h, "POST", "/v1/responses", key=bob, json=follow_up)
    openai_error(stolen, 404, "not_found")
    assert len(upstream.fake.requests) == 1
    # Alice may go on from her own.
    own = await request(h, "POST", "/v1/responses", json=follow_up)
    assert own.status_code == 200
    assert len(upstream.fake.requests) == 2
    # A response inside a conversation: operator-only, like the conversations.
    in_conversation = {"model": "gpt-4o-mini", "input": "hi", "conversation": "conv_123"}
    openai_error(
        await request(h, "POST", "/v1/responses", json=in_conversation), 403, "endpoint_not_allowed"
    )
    assert len(upstream.fake.requests) == 2


@pytest.mark.parametrize(
    "item",
    [
        {"type": "item_reference", "id": "msg_alices"},
        {"id": "msg_alices"},  # the type is optional for a reference
    ],
)
async def test_a_response_reading_stored_items_by_reference_is_refused(
    openai_gw: tuple[Harness, StoredObjects], item: dict[str, str]
) -> None:
    # The attack: name another user's stored item in the input; OpenAI looks item
    # ids up across the project, and the ledger cannot tell whose an item is.
    h, upstream = openai_gw
    body = {"model": "gpt-4o-mini", "input": [item, {"role": "user", "content": "repeat it"}]}
    openai_error(await request(h, "POST", "/v1/responses", json=body), 403, "endpoint_not_allowed")
    assert upstream.fake.requests == []
    # Messages with their own content, and items passed back whole, still go.
    own = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "hi"}]}
    assert (await request(h, "POST", "/v1/responses", json=own)).status_code == 200


@pytest.mark.parametrize(
    "prompt",
    [
        {"id": "pmpt_operators_app"},
        {"id": "pmpt_operators_app", "version": "2", "variables": {"city": "Huế"}},
        "pmpt_operators_app",
    ],
    ids=["by-id", "with-variables", "bare-id"],
)
@pytest.mark.parametrize("allow", [[], ["POST /responses"]], ids=["default", "allow-listed"])
async def test_a_response_running_a_stored_prompt_is_refused(
    database_url: str, prompt: object, allow: list[str]
) -> None:
    """The attack (review-sec F13): a stored prompt (``prompt.id``, an object of the
    project that any frontend using it shows) brings tools the gateway never sees.
    ``code_interpreter`` without a call price is refused when listed, but ran
    through the prompt and was charged 0 (its model and files went unchecked too).
    A response that runs a stored prompt is operator-only, like conversations and
    item references, and ``upstream.allow`` does not open it."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {**openai_settings(), "upstream": {"kind": "openai", "allow": allow}}
    async with running_gateway(database_url, upstream=fake, settings=settings) as h:
        listed = {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "code_interpreter"}]}
        openai_error(await request(h, "POST", "/v1/responses", json=listed), 403, "tool_not_priced")
        body = {"model": "gpt-4o-mini", "input": "hi", "prompt": prompt}
        via_prompt = await request(
            h,
            "POST",
            "/v1/responses",
            json=body,
            headers={"x-fake-tool-calls": "code_interpreter_call"},
        )
        openai_error(via_prompt, 403, "endpoint_not_allowed")
        assert fake.requests == []
        assert await h.events() == []
        # "prompt": null names no stored prompt: answered.
        plain = await request(h, "POST", "/v1/responses", json={**body, "prompt": None})
        assert plain.status_code == 200, plain.text
    assert len(fake.requests) == 1


async def test_a_side_call_the_upstream_took_but_never_answered_is_charged_its_price(
    database_url: str, fake: FakeDify
) -> None:
    settings = PRICES | {"upstream": {"read_timeout": 0.1}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        response = await request(
            h, "POST", "/v1/text-to-audio", json={"text": "hi"}, headers={"x-fake-delay-ms": "500"}
        )
        assert response.status_code == 504
        await h.probes.wait_finished(1)
        (event,) = await h.events()
    assert event.cost == Decimal("0.015") and event.currency == "EUR"
    assert event.outcome == "timeout"


class _Uploads:
    """The `Ownership` reads `RouteGuard.check_files` makes, counted."""

    def __init__(self, owners: dict[str, str], *, down: bool = False) -> None:
        self.owners, self.down, self.queries = owners, down, 0

    async def upload_owners(self, upload_ids: Any) -> dict[str, str]:
        self.queries += 1
        if self.down:
            raise StorageError("down")
        return {i: self.owners[i] for i in upload_ids if i in self.owners}


async def test_the_files_an_answer_attaches_are_checked_in_one_query() -> None:
    """Review F9: a request naming many files costs one lookup, not one per file;
    one file not the caller's refuses the whole request; without the records,
    nobody's files are attached (503)."""
    ids = frozenset(f"f-{n}" for n in range(50))
    uploads = _Uploads(dict.fromkeys(ids, "alice") | {"f-bob": "bob"})
    guard = RouteGuard(uploads, metrics=Metrics())  # type: ignore[arg-type]
    await guard.check_files(ids, "alice")
    assert uploads.queries == 1
    with pytest.raises(NotFound, match="f-bob"):
        await guard.check_files(ids | {"f-bob"}, "alice")
    with pytest.raises(NotFound, match="f-unknown"):
        await guard.check_files(frozenset({"f-unknown"}), "alice")
    assert uploads.queries == 3
    down = RouteGuard(_Uploads({}, down=True), metrics=Metrics())  # type: ignore[arg-type]
    with pytest.raises(StorageError) as refused:
        await down.check_files(frozenset({"f-1"}), "alice")
    assert refused.value.status == 503
