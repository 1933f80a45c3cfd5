"""A Dify conversation's later messages run with what its first one asked for
(review-limits F5, gateway/conversations.py).

Dify answers every later message of a conversation with the inputs the
conversation began with, not the message's own (the fake does the same:
`FakeDify.conversation_inputs`). Before the fix the gateway judged each message
by its own inputs: a conversation begun with advanced RAG ran it uncounted on
every later message (and past a plan downgrade), and one begun with web search
went on searching past a spent allowance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.conversations import MISS_SECONDS, ConversationHold, Conversations, listed_features
from gateway.errors import StorageError
from gateway.metrics import Metrics
from gateway.storage import ConversationFeatures, Storage
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway, until
from tests.test_admission import two_gateways
from tests.test_hardening import _delete_user
from tests.test_named_upstreams import RESEARCH_KEY, SUPPORT_KEY, dify_with_fallback

CHAT = {"query": "Và hôm qua?", "inputs": {}, "response_mode": "streaming", "user": "x"}
ADVANCED = {**CHAT, "inputs": {"rag_mode": "advanced"}}
WEB = {**CHAT, "inputs": {"search_mode": "web"}}
WEB_ANSWER = {"x-fake-metadata": orjson.dumps({"source": "web_search"}).decode()}
NOW = datetime(2026, 12, 8, 9, 30, tzinfo=UTC)


def plans(**free: Any) -> dict[str, Any]:
    return {"plans": {"free": free, "basic": {"advanced_rag": False}}}


async def post(
    h: Harness, body: dict[str, Any], *, url: str | None = None, **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url or h.url, timeout=20) as client:
        return await client.post("/v1/chat-messages", json=body, headers=h.auth(**headers))


def conversation_of(response: httpx.Response) -> str:
    """The conversation id an answer names (its first event's, or the body's)."""
    if response.headers["content-type"].startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data:"):
                found: str = orjson.loads(line[5:])["conversation_id"]
                return found
        raise AssertionError(response.text)
    found = response.json()["conversation_id"]
    return str(found)


async def today_row(h: Harness) -> Any:
    day = h.gateway.today()
    rows = await h.storage.daily(day, day, user_id=USER)
    return rows[0] if rows else None


# --- attacks ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
async def test_advanced_rag_begun_in_a_conversation_is_counted_on_every_later_message(
    database_url: str, mode: str
) -> None:
    """Attack: one message with advanced RAG (counted once), then plain ones in
    the same conversation: Dify runs advanced RAG on each (the fake shows the
    inputs it ran with), and each must count as an advanced-RAG query."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        first = await post(h, {**ADVANCED, "response_mode": mode})
        conversation = conversation_of(first)
        later = [
            await post(h, {**CHAT, "conversation_id": conversation, "response_mode": mode})
            for _ in range(2)
        ]
        await h.probes.wait_finished(3)
        row = await today_row(h)
    assert [r.status_code for r in (first, *later)] == [200, 200, 200]
    assert fake.ran_inputs == [{"rag_mode": "advanced"}] * 3  # what Dify ran
    assert (row.queries, row.advanced_rag) == (3, 3)


@pytest.mark.parametrize(
    "spell",
    [str.upper, lambda c: "{" + c + "}", lambda c: "urn:uuid:" + c, lambda c: c.replace("-", "")],
    ids=["upper-case", "braces", "urn", "no-hyphens"],
)
async def test_another_spelling_of_the_conversation_id_is_the_same_conversation(
    sqlite_url: str, spell: Any
) -> None:
    """Attack: Dify reads `conversation_id` as a UUID (Python's `uuid.UUID`:
    upper case, braces, a urn prefix, no hyphens), so each spelling continues
    the one conversation, begun with advanced RAG: each must count as it."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        conversation = conversation_of(await post(h, ADVANCED))
        spelled = spell(conversation)
        assert spelled != conversation
        later = await post(h, {**CHAT, "conversation_id": spelled})
        await h.probes.wait_finished(2)
        row = await today_row(h)
    assert later.status_code == 200
    assert fake.ran_inputs == [{"rag_mode": "advanced"}] * 2  # Dify's one conversation
    assert (row.queries, row.advanced_rag) == (2, 2)


async def test_a_plan_downgrade_stops_advanced_rag_in_a_conversation_begun_with_it(
    database_url: str,
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        conversation = conversation_of(await post(h, ADVANCED))
        await h.gateway.accounts.set_plan(USER, "basic")
        refused = await post(h, {**CHAT, "conversation_id": conversation})
        other = await post(h, CHAT)  # a conversation begun without it is fine
    assert refused.status_code == 403
    assert refused.json()["code"] == "feature_not_in_plan"
    assert other.status_code == 200
    assert fake.hits("/chat-messages") == 2


@pytest.mark.parametrize("when_exhausted", ["refuse", "disable"])
async def test_web_search_begun_in_a_conversation_is_held_to_the_allowance(
    database_url: str, when_exhausted: str
) -> None:
    """Attack: a conversation begun with web search (the day's one search), then
    a message with no inputs in it: Dify searches again with the conversation's
    inputs. It must be refused - also where a spent allowance would otherwise
    disable the search by rewriting the message's inputs, which Dify ignores."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    settings = {**plans(web_searches_per_day=1), "web_search": {"when_exhausted": when_exhausted}}
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        conversation = conversation_of(await post(h, WEB, **WEB_ANSWER))
        await h.probes.wait_finished(1)
        refused = await post(h, {**CHAT, "conversation_id": conversation}, **WEB_ANSWER)
        other = await post(h, CHAT)  # a conversation begun without it is not held
        await h.probes.wait_finished(3)
        row = await today_row(h)
    assert refused.status_code == 429
    assert refused.json()["code"] == "web_search_limit"
    assert other.status_code == 200
    assert fake.hits("/chat-messages") == 2
    assert (row.queries, row.web_searches) == (2, 1)


async def test_a_later_message_sent_to_another_replica_at_the_first_event_is_counted(
    database_url: str, tmp_path: Path
) -> None:
    """Attack across replicas: read the conversation's id from the first event of
    an answer still streaming and send the next message at once to a second
    gateway. The row is written before the first event reaches the client, so
    the second gateway already knows what the conversation began with."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    limits = {"advanced_rag": False}
    settings = {"plans": {"free": limits, "pro": {"advanced_rag": True}}}
    async with two_gateways(database_url, tmp_path, fake, limits, settings=settings) as (
        ports,
        key,
        storage,
    ):
        # The plan refuses advanced RAG: begin on one with it allowed for a moment.
        await storage.set_plan(USER, "pro")
        headers = {"authorization": f"Bearer {key}", "x-fake-scenario": "hold"}
        async with (
            httpx.AsyncClient(timeout=20) as client,
            client.stream(
                "POST",
                f"http://127.0.0.1:{ports[0]}/v1/chat-messages",
                json=ADVANCED,
                headers=headers,
            ) as first,
        ):
            lines = first.aiter_lines()
            data = await anext(line async for line in lines if line.startswith("data:"))
            conversation = orjson.loads(data[5:])["conversation_id"]
            await storage.set_plan(USER, "free")
            later = await client.post(
                f"http://127.0.0.1:{ports[1]}/v1/chat-messages",
                json={**CHAT, "conversation_id": conversation},
                headers={"authorization": f"Bearer {key}"},
            )
            fake.release.set()
            async for _ in lines:
                pass
    assert later.status_code == 403, later.text
    assert later.json()["code"] == "feature_not_in_plan"


async def test_a_conversation_learnt_from_the_list_is_kept_before_the_list_is_sent(
    database_url: str,
) -> None:
    """Attack: a conversation whose id the answer never showed (its stream cut,
    or its client gone, before the first event - Dify made the conversation all
    the same - or one begun before this release) is found in the user's list
    of conversations, with the inputs it began with, and continued. The list
    is read first: the conversation is kept, and its later messages count."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    begun = "3f2b8a9e-1c4d-4e5f-8a7b-9c0d1e2f3a4b"
    fake.conversations.insert(
        0,
        {"id": begun, "name": "old", "inputs": {"rag_mode": "advanced"}, "status": "normal",
         "introduction": "", "created_at": 1_765_000_000, "updated_at": 1_765_000_000},
    )  # fmt: skip
    fake.conversation_inputs[begun] = {"rag_mode": "advanced"}
    async with running_gateway(database_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            listed = await client.get("/v1/conversations", params={"user": "x"}, headers=h.auth())
        kept = await h.storage.conversation_features(USER, begun)
        later = await post(h, {**CHAT, "conversation_id": begun})
        await h.probes.wait_finished(2)
        row = await today_row(h)
    assert listed.status_code == 200
    assert listed.json() == {"limit": 20, "has_more": False, "data": fake.conversations}
    assert kept == ConversationFeatures(advanced_rag=True)
    assert later.status_code == 200 and fake.ran_inputs == [{"rag_mode": "advanced"}]
    assert (row.queries, row.advanced_rag) == (1, 1)


def test_a_listed_conversation_is_judged_as_its_first_message_was() -> None:
    from gateway.config import AdvancedRagConfig, WebSearchConfig

    page = {
        "data": [
            {"id": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "inputs": {"rag_mode": "advanced"}},
            {"id": "c-2", "inputs": {"search_mode": "web"}},
            {"id": "c-3", "inputs": {"search_mode": "web", "allow_web_fallback": False}},
            {"id": "c-4", "inputs": {}},
            {"id": "c-5"},
            "not an item",
        ]
    }
    assert listed_features(page, AdvancedRagConfig(), WebSearchConfig()) == [
        ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", ConversationFeatures(advanced_rag=True)),
        ("c-2", ConversationFeatures(web_search=True)),
        ("c-3", ConversationFeatures(web_off=True)),  # begun with the web turned off
    ]
    assert listed_features({"data": "no"}, AdvancedRagConfig(), WebSearchConfig()) == []


# --- the hold on the first bytes --------------------------------------------------------


async def test_the_answer_that_begins_the_conversation_reaches_the_client_unchanged(
    database_url: str,
) -> None:
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        held = await post(h, ADVANCED)
        plain = await post(h, CHAT)
        blocking = await post(h, {**ADVANCED, "response_mode": "blocking"})
        kept = await h.storage.conversation_features(USER, conversation_of(held))
        unkept = await h.storage.conversation_features(USER, conversation_of(plain))
        kept_blocking = await h.storage.conversation_features(USER, conversation_of(blocking))
    events = [line for line in held.text.splitlines() if line.startswith("data:")]
    assert [orjson.loads(e[5:])["event"] for e in events][-1] == "message_end"
    assert "".join(orjson.loads(e[5:]).get("answer", "") for e in events) == "".join(fake.answer)
    assert blocking.json()["answer"] == "".join(fake.answer)
    assert kept == kept_blocking == ConversationFeatures(advanced_rag=True)
    assert unkept is None  # nothing is kept, nor held, for a plain conversation


async def test_without_the_database_the_answer_goes_on_and_this_process_remembers(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that does not take the row fails open, as web search does:
    the answer is delivered, the failure logged and counted, and this process's
    own memory still holds the conversation's later messages to it."""
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, fake=fake, settings=plans(advanced_rag=True)) as h:

        async def broken(*args: object, **kwargs: object) -> None:
            raise StorageError("database unreachable")

        monkeypatch.setattr(h.storage, "remember_conversation", broken)
        first = await post(h, ADVANCED)
        later = await post(h, {**CHAT, "conversation_id": conversation_of(first)})
        await h.probes.wait_finished(2)
        row = await today_row(h)
        failures = h.gateway.metrics.get(
            "gateway_storage_errors_total", operation="remember_conversation"
        )
    assert first.status_code == later.status_code == 200
    assert (row.queries, row.advanced_rag) == (2, 2)
    assert failures == 1
    assert any("not kept" in r.message for r in caplog.records if r.levelno == logging.ERROR)


def test_the_hold_lets_go_at_the_first_event_with_data() -> None:
    hold = ConversationHold(sse=True, limit=1 << 20)
    assert not hold.feed(b"event: ping\n\n")  # no data: held on
    assert not hold.feed(b'data: {"event":"message","conversation_id":"c-1"')
    assert hold.feed(b',"answer":"x"}\n\ndata: {"event":"message_end"}\n\n')
    assert hold.found == "c-1"
    assert hold.release() == (
        b'event: ping\n\ndata: {"event":"message","conversation_id":"c-1","answer":"x"}\n\n'
        b'data: {"event":"message_end"}\n\n'
    )


def test_the_hold_lets_dify_keep_alives_through() -> None:
    hold = ConversationHold(sse=True, limit=1 << 20)
    assert not hold.feed(b'event: ping\n\nevent: ping\n\ndata: {"event"')
    assert hold.pings() == b"event: ping\n\nevent: ping\n\n"
    assert hold.pings() == b""
    assert hold.feed(b': "message", "conversation_id": "c-3"}\n\n')
    assert hold.release() == b'data: {"event": "message", "conversation_id": "c-3"}\n\n'


def test_the_hold_of_a_blocking_answer_waits_for_its_whole_body() -> None:
    hold = ConversationHold(sse=False, limit=1 << 20)
    assert not hold.feed(b'{"conversation_id": "c-2", "answer": "a')
    assert hold.feed(b'b"}', end=True)
    assert hold.found == "c-2" and hold.release() == b'{"conversation_id": "c-2", "answer": "ab"}'


@pytest.mark.parametrize(
    ("sse", "chunks"),
    [
        (True, [b'data: {"event":"error","message":"no"}\n\n']),  # no id in the first event
        (True, [b"data: not json\n\n"]),
        (True, [b": comment\n" * 10, b": more\n" * 5]),  # past twice the limit, no event
        (False, [b"not json"]),
    ],
    ids=["error-event", "not-json", "past-the-limit", "blocking-not-json"],
)
def test_the_hold_gives_up_without_an_id(sse: bool, chunks: list[bytes]) -> None:
    hold = ConversationHold(sse=sse, limit=64)
    resolved = [hold.feed(chunk) for chunk in chunks[:-1]]
    resolved.append(hold.feed(chunks[-1], end=not sse))
    assert resolved[-1] and not any(resolved[:-1])
    assert hold.found is None
    assert hold.release() == b"".join(chunks)


# --- storage, both backends --------------------------------------------------------------


async def test_storage_keeps_the_first_record_for_users_who_are_there(
    database_url: str, storage: Storage
) -> None:
    await storage.ensure_user("ann", plan="free")
    await storage.remember_conversation(
        "ann", "c-1", ConversationFeatures(advanced_rag=True), upstream="default", now=NOW
    )
    await storage.remember_conversation(
        "ann", "c-1", ConversationFeatures(web_search=True), upstream="default", now=NOW
    )
    await storage.remember_conversation(  # nobody: nothing kept
        "ghost", "c-2", ConversationFeatures(web_search=True), upstream="default", now=NOW
    )
    assert await storage.conversation_features("ann", "c-1") == ConversationFeatures(True, False)
    assert await storage.conversation_features("bob", "c-1") is None  # a user's own
    assert await storage.conversation_features("ghost", "c-2") is None
    await _delete_user(database_url, "ann")
    assert await storage.conversation_features("ann", "c-1") is None  # gone with the user


class Rows:
    """The two `Ownership` methods `Conversations` uses, over a dict; ``down``:
    the database does not answer."""

    def __init__(
        self, rows: dict[tuple[str, str], ConversationFeatures] | None = None, *, down: bool = False
    ) -> None:
        self.rows = dict(rows or {})
        self.down = down
        self.reads = 0

    async def remember_conversation(
        self,
        user_id: str,
        conversation_id: str,
        features: ConversationFeatures,
        *,
        upstream: str,
        now: datetime,
    ) -> None:
        if self.down:
            raise StorageError("database unreachable")
        self.rows.setdefault((user_id, conversation_id), features)

    async def conversation_features(
        self, user_id: str, conversation_id: str
    ) -> ConversationFeatures | None:
        if self.down:
            raise StorageError("database unreachable")
        self.reads += 1
        return self.rows.get((user_id, conversation_id))


async def test_the_process_reads_a_conversation_once() -> None:
    store = Rows({("ann", "c-1"): ConversationFeatures(web_search=True)})
    conversations = Conversations(store, Metrics())  # type: ignore[arg-type]
    for _ in range(3):
        assert await conversations.features("ann", "c-1") == ConversationFeatures(web_search=True)
        assert not await conversations.features("ann", "c-2")
    assert store.reads == 2


# --- review-conv: Dify's own reading of ids, and its list of conversations -------------


class Dify(FakeDify):
    """FakeDify with real Dify's reading of conversation ids and listing of new
    conversations; with ``gated``, a streamed answer beginning a conversation waits (pinging, as
    Dify does while a long retrieval runs) before its first event until ``gate``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gated = False
        self._gate: asyncio.Event | None = None
        self._begins: set[str] = set()  # the answers that begin a conversation

    @property
    def gate(self) -> asyncio.Event:
        if self._gate is None:
            self._gate = asyncio.Event()
        return self._gate

    def _plan(self, kind: str, params: dict[str, str], headers: dict[str, str], body: Any) -> Any:
        begins = True
        if kind == "chat" and isinstance(body, dict):
            value = body.get("conversation_id")
            begins = not value
            if isinstance(value, str):
                value = value.strip()
                body = {**body, "conversation_id": str(uuid.UUID(value)) if value else None}
        run = super()._plan(kind, params, headers, body)
        if begins:
            self._begins.add(run.task_id)
        if kind == "chat" and all(c["id"] != run.conversation_id for c in self.conversations):
            now = int(time.time())
            self.conversations.insert(
                0,
                {
                    "id": run.conversation_id,
                    "name": "",
                    "inputs": run.inputs,
                    "status": "normal",
                    "introduction": "",
                    "created_at": now,
                    "updated_at": now,
                },
            )
        return run

    async def _chat(self, run: Any, out: Any) -> None:
        if self.gated and run.streaming and run.task_id in self._begins:
            while not self.gate.is_set():
                await out.write(out.ping())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.gate.wait(), 0.005)
        await super()._chat(run, out)


def _new_conversation(listing: httpx.Response, fake: Dify) -> str:
    """The id ``GET /conversations`` names that the fake's defaults do not."""
    defaults = {c["id"] for c in FakeDify(api_key=UPSTREAM_KEY).conversations}
    found = [c["id"] for c in listing.json()["data"] if c["id"] not in defaults]
    assert len(found) == 1, listing.text
    return str(found[0])


# --- another spelling of the same conversation -----------------------------------------


@pytest.mark.parametrize(
    "spell",
    [
        str.upper,
        lambda c: "{" + c + "}",
        lambda c: "urn:uuid:" + c,
        lambda c: c.replace("-", ""),
        lambda c: f" {c}\n",
    ],
    ids=["upper", "braces", "urn", "no-hyphens", "whitespace"],
)
async def test_another_spelling_of_the_conversation_id_is_held_after_a_downgrade(
    database_url: str, spell: Any
) -> None:
    """Attack: begin a conversation with advanced RAG while the plan has it; after a
    downgrade, send the next message naming the conversation in another spelling
    of its UUID. Dify reads it as the same conversation and runs advanced RAG with
    its first inputs; the gateway's lookup (dict key, TEXT primary key) misses."""
    fake = Dify(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        conversation = conversation_of(await post(h, ADVANCED))
        await h.gateway.accounts.set_plan(USER, "basic")
        later = await post(h, {**CHAT, "conversation_id": spell(conversation)})
    assert later.status_code == 403, (later.status_code, fake.ran_inputs)
    assert fake.ran_inputs == [{"rag_mode": "advanced"}]


# --- the client leaves before the first event -------------------------------------------


async def _begin_and_leave(h: Harness, fake: Dify) -> None:
    """Begin a conversation with advanced RAG, and leave before its first event."""
    fake.gated = True
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        task = asyncio.create_task(
            client.post("/v1/chat-messages", json=ADVANCED, headers=h.auth())
        )
        await until(lambda: bool(fake.conversation_inputs))  # Dify has the conversation
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # The gateway notices at the next ping; then the first event comes.
    await until(lambda: h.gateway.metrics.get("gateway_client_disconnects_total") >= 1)
    fake.gate.set()
    await h.probes.wait_finished(1)


async def test_a_client_that_leaves_before_the_first_event_cannot_escape_the_row(
    database_url: str,
) -> None:
    """Attack: begin a conversation with advanced RAG (counted once) and drop the
    connection before the first event (during the retrieval). The gateway reads
    the answer on (drain) but never feeds the hold, so no row is written; the
    conversation's id is in ``GET /conversations``. After a downgrade (or with the
    allowance spent) every later message in it runs advanced RAG uncounted."""
    fake = Dify(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        await _begin_and_leave(h, fake)
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            listing = await client.get("/v1/conversations", headers=h.auth())
        conversation = _new_conversation(listing, fake)
        kept = await h.storage.conversation_features(USER, conversation)
        await h.gateway.accounts.set_plan(USER, "basic")
        later = await post(h, {**CHAT, "conversation_id": conversation})
    assert later.status_code == 403, (kept, later.status_code, fake.ran_inputs)


# --- the id is known from the list before the hold lets go -----------------


async def test_a_conversation_named_from_the_list_while_its_first_answer_is_held(
    database_url: str, tmp_path: Path
) -> None:
    """Attack across replicas: begin a conversation with advanced RAG on replica A;
    while its first answer is held (Dify is still retrieving), read the new id
    from ``GET /conversations`` and send a plain message naming it to replica B.
    B finds no row yet and caches the miss (`Conversations.features`), so once the
    first answer is over and the row kept, B still judges every later message by
    its own inputs: advanced RAG past the downgrade, on B only."""
    fake = Dify(api_key=UPSTREAM_KEY)
    limits = {"advanced_rag": False}
    # Each request reads the plan afresh (no cached key: the downgrade is seen at once).
    settings = {
        "plans": {"free": limits, "pro": {"advanced_rag": True}},
        "auth": {"key_cache_ttl": 0},
    }
    async with two_gateways(database_url, tmp_path, fake, limits, settings=settings) as (
        ports,
        key,
        storage,
    ):
        await storage.set_plan(USER, "pro")
        fake.gated = True
        auth = {"authorization": f"Bearer {key}"}
        a, b = (f"http://127.0.0.1:{port}" for port in ports)
        async with httpx.AsyncClient(timeout=20) as client:
            first = asyncio.create_task(
                client.post(f"{a}/v1/chat-messages", json=ADVANCED, headers=auth)
            )
            await until(lambda: bool(fake.conversation_inputs))
            listing = await client.get(f"{b}/v1/conversations", headers=auth)
            conversation = _new_conversation(listing, fake)
            await storage.set_plan(USER, "free")
            during = await client.post(
                f"{b}/v1/chat-messages",
                json={**CHAT, "conversation_id": conversation},
                headers=auth,
            )
            fake.gate.set()
            assert (await first).status_code == 200
            kept = await storage.conversation_features(USER, conversation)
            after_b, after_a = [
                await client.post(
                    f"{url}/v1/chat-messages",
                    json={**CHAT, "conversation_id": conversation},
                    headers=auth,
                )
                for url in (b, a)
            ]
    assert kept is not None and kept.advanced_rag  # the row is there by now
    assert [during.status_code, after_b.status_code, after_a.status_code] == [403, 403, 403]


@pytest.mark.parametrize("blank", [" ", "\n", " \t "])
async def test_a_blank_conversation_id_begins_a_conversation_that_is_kept(
    database_url: str, blank: str
) -> None:
    """Attack without any race: begin the conversation with advanced RAG and
    ``conversation_id`` of white space only. Dify (ChatRequestPayload strips it:
    blank is none) begins a new conversation with these inputs; the gateway
    (`conversation_of`: a non-empty string continues one) neither holds the
    answer nor keeps a row. Every later message then runs advanced RAG past the
    downgrade."""
    fake = Dify(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, fake=fake, settings=plans(advanced_rag=True)) as h:
        first = await post(h, {**ADVANCED, "conversation_id": blank})
        conversation = conversation_of(first)
        kept = await h.storage.conversation_features(USER, conversation)
        await h.gateway.accounts.set_plan(USER, "basic")
        later = await post(h, {**CHAT, "conversation_id": conversation})
    assert first.status_code == 200
    assert later.status_code == 403, (kept, later.status_code, fake.ran_inputs)


async def test_a_row_the_database_did_not_take_is_held_and_written_with_the_next() -> None:
    """The database refuses the row of c-1: this process still judges c-1 by it,
    also once its cache has started over (random ids fill it cheaply), and the
    row is written with the next one the database takes, so the other replicas
    learn it too."""

    store = Rows(down=True)
    metrics = Metrics()
    conversations = Conversations(store, metrics)  # type: ignore[arg-type]
    advanced = ConversationFeatures(advanced_rag=True)
    await conversations.remember("ann", "c-1", advanced, upstream="default", now=NOW)
    conversations._known.clear()  # the cache started over
    assert await conversations.features("ann", "c-1") == advanced  # without the database
    store.down = False
    searching = ConversationFeatures(web_search=True)
    await conversations.remember("ann", "c-2", searching, upstream="default", now=NOW)
    assert store.rows == {("ann", "c-1"): advanced, ("ann", "c-2"): searching}
    assert metrics.get("gateway_storage_errors_total", operation="remember_conversation") == 1


class FallingBack(Dify):
    """A Dify app as [web_search]'s defaults describe it: an answer that finds
    nothing in the knowledge base falls back to the web (``source`` is
    ``kb_fallback_web``) unless the inputs it RUNS WITH turn the fallback off
    (``allow_web_fallback`` false). Dify runs a conversation's later messages
    with the conversation's first inputs, so that is the value read."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent_inputs: list[Any] = []  # the inputs each request carried

    def _plan(self, kind: str, params: dict[str, str], headers: dict[str, str], body: Any) -> Any:
        if isinstance(body, dict):
            self.sent_inputs.append(body.get("inputs"))
        run = super()._plan(kind, params, headers, body)
        if isinstance(run.inputs, dict) and run.inputs.get("allow_web_fallback") is not False:
            run.extra_metadata = {**run.extra_metadata, "source": "kb_fallback_web"}
        return run


# --- `disable` mode and a conversation's first inputs (review-conv2 F1) ----------------


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
async def test_disable_mode_refuses_a_conversation_that_may_fall_back_once_the_allowance_is_spent(
    database_url: str, mode: str
) -> None:
    """Attack: with ``when_exhausted = "disable"`` the gateway promises that once the
    day's searches are spent no answer falls back to the web (it sets
    ``inputs.allow_web_fallback = false`` on every answer request). Begin a
    plain conversation while searches are left (nothing is rewritten: the
    conversation's inputs let the app fall back), spend the allowance, then go
    on chatting in that conversation: the rewrite lands on the later message's
    inputs, which Dify ignores, and the app falls back to the web on every
    message, past the allowance (1 a day here; 4 searches run)."""
    fake = FallingBack(api_key=UPSTREAM_KEY)
    settings = {
        "plans": {"free": {"web_searches_per_day": 1}},
        "web_search": {"when_exhausted": "disable"},
    }
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        first = await post(h, {**CHAT, "response_mode": mode})  # the day's one search
        conversation = conversation_of(first)
        await h.probes.wait_finished(1)
        later = [
            await post(h, {**CHAT, "conversation_id": conversation, "response_mode": mode})
            for _ in range(3)
        ]
        await h.probes.wait_finished(4)
        row = await today_row(h)
    assert first.status_code == 200
    # Before, each later message was forwarded with the fallback turned off in
    # its inputs, which Dify does not read: the app fell back on all four.
    searched = sum(1 for inputs in fake.ran_inputs if inputs.get("allow_web_fallback") is not False)
    seen = (fake.sent_inputs, fake.ran_inputs, [r.status_code for r in later], row.web_searches)
    assert searched <= 1, seen
    assert row.web_searches <= 1, seen


async def test_disable_mode_continues_a_conversation_begun_with_the_web_off(
    database_url: str,
) -> None:
    """The other side: a conversation begun once the allowance was spent has the
    web turned off in its first inputs (the rewrite), so Dify never searches in
    it: its later messages are forwarded, and one begun while searches were
    left is refused. A plan with no web-search allowance is not held at all."""
    fake = FallingBack(api_key=UPSTREAM_KEY)
    settings = {
        "plans": {"free": {"web_searches_per_day": 1}, "open": {}},
        "web_search": {"when_exhausted": "disable"},
    }
    async with running_gateway(database_url, fake=fake, settings=settings) as h:
        early = conversation_of(await post(h, CHAT))  # falls back: the day's one search
        await h.probes.wait_finished(1)
        late = conversation_of(await post(h, CHAT))  # begun with the web off
        await h.probes.wait_finished(2)
        go_on = await post(h, {**CHAT, "conversation_id": late})
        refused = await post(h, {**CHAT, "conversation_id": early})
        await h.gateway.accounts.set_plan(USER, "open")
        unlimited = await post(h, {**CHAT, "conversation_id": early})
    assert go_on.status_code == 200
    assert refused.status_code == 429 and refused.json()["code"] == "web_search_limit"
    assert unlimited.status_code == 200


async def test_a_miss_is_read_again_after_a_while() -> None:
    """A conversation read with no row is believed to have none for
    `MISS_SECONDS`, then read again: a row can come later (listed on another
    replica), and that replica's later messages must find it (review-conv2 F3)."""

    store = Rows()
    now = [100.0]
    conversations = Conversations(store, Metrics(), clock=lambda: now[0])  # type: ignore[arg-type]
    assert not await conversations.features("ann", "c-1")
    listed = ConversationFeatures(advanced_rag=True)
    store.rows[("ann", "c-1")] = listed  # kept from a list read on another replica
    now[0] += MISS_SECONDS - 1
    assert not await conversations.features("ann", "c-1")
    now[0] += 2
    assert await conversations.features("ann", "c-1") == listed
    assert store.reads == 2


@pytest.mark.parametrize(
    "spell", [str.upper, lambda c: "{" + c + "}"], ids=["upper-case", "braces"]
)
async def test_another_spelling_of_a_conversation_goes_to_the_app_that_made_it(
    database_url: str, spell: Any
) -> None:
    """On a Dify mount with a fallback app, a conversation lives in the app that
    began it (the ledger's record, `_conversation_attempts`): the app is picked
    by the id as Dify reads it, so an upper-case or braced id reaches that app
    too, not the mount's first, which has no such conversation (review-conv2
    F4)."""
    support = FakeDify(api_key=SUPPORT_KEY)
    research = FakeDify(api_key=RESEARCH_KEY)
    async with dify_with_fallback(database_url, support, research) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            blocking = {**CHAT, "response_mode": "blocking"}
            first = await client.post("/support/v1/chat-messages", json=blocking, headers=h.auth())
            conversation = first.json()["conversation_id"]
            await h.probes.wait_finished(1)
            second = await client.post(
                "/support/v1/chat-messages",
                json={**blocking, "conversation_id": spell(conversation)},
                headers=h.auth(),
            )
    assert first.status_code == 200
    assert second.status_code == 200
    # Both messages of the conversation reach research, the app that has it.
    assert [r.path for r in research.requests] == ["/v1/chat-messages"] * 2, support.requests
