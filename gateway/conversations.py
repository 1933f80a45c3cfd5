"""What a Dify conversation's first message asked for, kept for its later ones.

Dify answers every later message of a conversation with the inputs the
conversation began with, not the message's own (each chat app generator takes
``conversation.inputs if conversation else`` the request's): a conversation
begun with advanced RAG or web search runs them on every message after, whatever
those messages' inputs say (review-limits F5). So the gateway judges a later
message as asking for what its conversation's first message asked for, as well
as for what its own inputs ask (a conversation the gateway kept nothing for is
judged by its inputs alone, as before).

Two halves:

- `Conversations` keeps and reads what each conversation asked for: the
  database's `conversation_features` rows (PostgreSQL 0030 and 0031, SQLite
  0023 and 0024), read once per conversation and process (a row never
  changes; a conversation with no row is read again after `MISS_SECONDS`).
- `ConversationHold` finds a new conversation's id in the first bytes of its
  answer and holds those bytes back until the row is written: the client cannot
  name the conversation - on this replica or any other - before it is kept. Only
  a message that begins a conversation asking for one of the two is held, and
  only until its first event (a blocking answer, until its body is whole).
- `listed_features` reads the other way a client learns a conversation's id, a
  page of its conversations (``GET /conversations``): each item carries the
  inputs the conversation began with, so one that asked for either is kept
  before the page reaches the client. That covers a conversation whose answer
  never showed its id (cut, or its client gone, before the first event: Dify
  made the conversation all the same) and one begun before this release.

A conversation's row is kept only when it asked for something: a conversation
with no row began without them, or before this release (then its later messages
are judged by their own inputs, as before), or while the database was away (its
answer is let through, logged and counted, as web search fails open:
docs/features.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import orjson

from gateway.config import AdvancedRagConfig, WebSearchConfig
from gateway.errors import StorageError
from gateway.features import asks_for_advanced_rag, asks_for_web_search, turns_web_off
from gateway.sse import EventTooLarge, SSEDecoder
from gateway.storage import ConversationFeatures, Ownership
from gateway.upstreams.dify_files import canonical_uuid

if TYPE_CHECKING:
    from datetime import datetime

    from gateway.metrics import Metrics

log = logging.getLogger("gateway.conversations")

NOTHING: Final = ConversationFeatures()

# Conversations kept in memory, each a few hundred bytes; a full cache starts over
# (the rows are read again as asked).
_MAX_CACHED: Final = 65_536

# How long a conversation read with no row is believed to have none.
MISS_SECONDS: Final = 30.0

# Conversations the database did not take, held for a retry (a few hundred
# bytes each): past this many the oldest is dropped, logged.
_MAX_UNKEPT: Final = 10_000

# Dify's keep-alive, a frame of its own (docs/upstreams/dify.md).
_PING: Final = b"event: ping\n\n"


class Conversations:
    """What users' Dify conversations asked for when they began."""

    def __init__(
        self,
        storage: Ownership,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._storage = storage
        self._metrics = metrics
        self._clock = clock
        self._known: dict[tuple[str, str], ConversationFeatures] = {}
        # Conversations read with no row, and until when that is believed: a row
        # can still come for one (listed on another replica, a write retried).
        self._missing: dict[tuple[str, str], float] = {}
        # What the database did not take (`remember`), by key, with the upstream:
        # held here until a later write goes through, and never dropped with the
        # cache (for the replicas that cannot read it, it is the only record).
        self._unkept: dict[tuple[str, str], tuple[ConversationFeatures, str]] = {}

    async def features(self, user_id: str, conversation_id: str) -> ConversationFeatures:
        """What the conversation asked for when it began (`NOTHING` when nothing
        was kept for it). Without the database: `NOTHING`, logged and counted,
        and not cached (the next message asks again)."""
        key = (user_id, conversation_id)
        found = self._known.get(key)
        if found is not None:
            return found
        unkept = self._unkept.get(key)
        if unkept is not None:
            return unkept[0]
        until = self._missing.get(key)
        if until is not None and self._clock() < until:
            return NOTHING
        try:
            kept = await self._storage.conversation_features(user_id, conversation_id)
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="conversation_features")
            log.warning(
                "conversation %s of %s: what it began with not read, judged by its "
                "message alone: %s",
                conversation_id,
                user_id,
                exc.message,
            )
            return NOTHING
        if kept is None:
            # Most conversations have no row (they began asking for nothing): a
            # miss is believed for a while, not for good - a row comes later for
            # one whose id the client learnt from a list (read on another
            # replica, perhaps) rather than from its answer (review-conv2 F3).
            if len(self._missing) >= _MAX_CACHED:
                self._missing.clear()
            self._missing[key] = self._clock() + MISS_SECONDS
            return NOTHING
        self._put(key, kept)
        return kept

    async def remember(
        self,
        user_id: str,
        conversation_id: str,
        features: ConversationFeatures,
        *,
        upstream: str,
        now: datetime,
    ) -> None:
        """Keep what a new conversation asked for, in this process first (its own
        later messages find it even if the database does not take it) and then
        in the database. A database that does not take it is logged and
        counted, and the row is written with the next one that goes through:
        until then other replicas judge the conversation's later messages by
        their own inputs."""
        key = (user_id, conversation_id)
        self._put(key, features)
        self._missing.pop(key, None)
        if not await self._write(key, features, upstream, now):
            if len(self._unkept) >= _MAX_UNKEPT:
                dropped = next(iter(self._unkept))
                del self._unkept[dropped]
                log.error("conversation %s of %s: no longer held for a retry", *dropped[::-1])
            self._unkept[key] = (features, upstream)
            return
        for held, (was, where) in list(self._unkept.items()):
            if not await self._write(held, was, where, now):
                return  # (the database is away again: the rest wait on)
            del self._unkept[held]

    async def _write(
        self, key: tuple[str, str], features: ConversationFeatures, upstream: str, now: datetime
    ) -> bool:
        user_id, conversation_id = key
        try:
            await self._storage.remember_conversation(
                user_id, conversation_id, features, upstream=upstream, now=now
            )
        except StorageError as exc:
            self._metrics.inc("gateway_storage_errors_total", operation="remember_conversation")
            log.error(
                "conversation %s of %s: what it began with (%s) not kept: %s",
                conversation_id,
                user_id,
                features,
                exc.message,
            )
            return False
        return True

    async def remember_listed(
        self,
        user_id: str,
        listed: list[tuple[str, ConversationFeatures]],
        *,
        upstream: str,
        now: datetime,
    ) -> None:
        """Keep what the conversations of a page asked for (`listed_features`),
        those this process does not know already."""
        for conversation_id, features in listed:
            if self._known.get((user_id, conversation_id)) != features:
                await self.remember(user_id, conversation_id, features, upstream=upstream, now=now)

    def _put(self, key: tuple[str, str], features: ConversationFeatures) -> None:
        if len(self._known) >= _MAX_CACHED:
            self._known.clear()
        self._known[key] = features


class ConversationHold:
    """The first bytes of an answer that begins a conversation, held until the
    conversation's id in them is known (`feed` returns True) and kept: the
    driver then writes the row and sends `release()`.

    A stream is read up to its first event with data (Dify's first event names
    the conversation: ``message``, ``agent_thought``, ``workflow_started``...);
    a blocking answer until its body is whole (``end``). ``limit``: for a
    stream, the relay's own bound on an event (one past it ends the answer
    anyway), so a first event the relay passes on is always read; for a
    blocking answer, the most of it held. Past that, or with no id where it
    should be, the bytes go on without a row (logged by the driver: `found`
    stays None; the conversation is kept when it is listed)."""

    __slots__ = ("_decoder", "_held", "_limit", "found", "resolved")

    def __init__(self, *, sse: bool, limit: int) -> None:
        self._decoder = SSEDecoder(max_event_bytes=limit) if sse else None
        self._held = bytearray()
        # (A stream's first event may follow keep-alives and comments: room for them.)
        self._limit = 2 * limit if sse else limit
        self.found: str | None = None
        self.resolved = False

    def feed(self, chunk: bytes, *, end: bool = False) -> bool:
        """Hold ``chunk``; whether the conversation's id is now decided (found, or
        there is none to find). ``end``: nothing more will come."""
        self._held += chunk
        if self.resolved:
            return True
        decoder = self._decoder
        if decoder is not None:
            try:
                events = decoder.feed(chunk)
                if end:
                    events += decoder.flush()
            except EventTooLarge:
                events, end = [], True
            for event in events:
                if event.data:
                    self.found = _conversation_id(event.data)
                    self.resolved = True
                    return True
        elif end:
            self.found = _conversation_id(bytes(self._held))
        if end or len(self._held) > self._limit:
            self.resolved = True
        return self.resolved

    def pings(self) -> bytes:
        """Dify's keep-alive frames at the front of what is held, taken out to be
        sent now: they name nothing, and a client (or a proxy in front of it)
        that hears nothing while Dify retrieves may give up on the answer."""
        held = self._held
        end = 0
        while held.startswith(_PING, end):
            end += len(_PING)
        taken = bytes(held[:end])
        del held[:end]
        return taken

    def release(self) -> bytes:
        """The bytes held, to send now; the hold is over."""
        held = bytes(self._held)
        self._held.clear()
        return held


def listed_features(
    page: object, advanced_rag: AdvancedRagConfig, web_search: WebSearchConfig
) -> list[tuple[str, ConversationFeatures]]:
    """The conversations of a Dify conversation page that began asking for
    advanced RAG or web search, or with the web turned off, judged by the rules
    as a request is, from the ``inputs`` each item carries (the conversation's
    first inputs, as Dify keeps them). A search its inputs turned off (the
    `disable` rewrite's value at ``disable_path``) is no search, as at
    admission."""
    data = page.get("data") if isinstance(page, dict) else None
    if not isinstance(data, list):
        return []
    found: list[tuple[str, ConversationFeatures]] = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("inputs"), dict):
            continue
        conversation_id = item.get("id")
        if not isinstance(conversation_id, str) or not conversation_id:
            continue
        advanced = asks_for_advanced_rag(item, advanced_rag)
        off = turns_web_off(item, web_search)
        searches = asks_for_web_search(item, web_search) and not off
        if advanced or searches or off:
            found.append(
                (canonical_uuid(conversation_id), ConversationFeatures(advanced, searches, off))
            )
    return found


def _conversation_id(data: str | bytes) -> str | None:
    """The ``conversation_id`` of a JSON object (an event's data, a blocking
    answer), or None."""
    try:
        obj: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    found = obj.get("conversation_id")
    return canonical_uuid(found) if isinstance(found, str) and found else None
