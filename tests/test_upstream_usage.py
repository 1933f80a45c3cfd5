"""Issue 23, usage by upstream: the ledger records which named upstream answered
(the ticket's, which routing sets), a recovered answer the one its admission
named; every surface that shows usage by model shows it by upstream too."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx

from gateway.admission import Admitter, Ticket
from gateway.errors import StorageError
from gateway.storage import Storage
from tests.harness import Harness, running_gateway

CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "streaming", "user": "mallory"}


class RoutedTo:
    """The admitter as routing uses it: every admission names ``upstream``."""

    def __init__(self, admitter: Admitter, upstream: str) -> None:
        self._admitter = admitter
        self.upstream = upstream
        self.tickets: list[Ticket] = []

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        # In place of the upstream the proxy's routing chose.
        ticket, headers = await self._admitter.admit(*args, **{**kwargs, "upstream": self.upstream})
        self.tickets.append(ticket)
        return ticket, headers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._admitter, name)


async def chat(h: Harness, message_id: str, key: str | None = None) -> None:
    async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
        headers = h.auth(key, **{"x-fake-message-id": message_id})
        response = await client.post("/v1/chat-messages", json=CHAT, headers=headers)
        assert response.status_code == 200, response.text


# --- the ledger --------------------------------------------------------------------


async def test_an_answer_is_recorded_as_the_upstream_its_ticket_names(database_url: str) -> None:
    async with running_gateway(database_url) as h:
        await chat(h, "m-default")
        await h.probes.wait_finished(1)
        routed = RoutedTo(h.app.proxy.admitter, "support")
        h.app.proxy.admitter = routed
        await chat(h, "m-support")
        await h.probes.wait_finished(2)
        # A fallback answered the next one: routing set the ticket's upstream.
        routed.upstream = "research"
        await chat(h, "m-research")
        await h.probes.wait_finished(3)
        events = {e.answer_id: e.upstream for e in await h.events()}
    assert events == {"m-default": "default", "m-support": "support", "m-research": "research"}
    assert [t.upstream for t in routed.tickets] == ["support", "research"]


async def test_an_answer_cut_by_a_crash_is_recovered_as_the_upstream_it_was_sent_to(
    database_url: str,
) -> None:
    async with running_gateway(database_url) as h:
        route = h.gateway.upstream.route("POST", "/chat-messages")
        admitter = h.app.proxy.admitter
        ticket, _ = await admitter.admit(h.gateway.snapshot, "alice", "lost-1", route, dict(CHAT))
        assert ticket.upstream == "default"
        ticket, _ = await admitter.admit(
            h.gateway.snapshot, "alice", "lost-2", route, dict(CHAT), upstream="research"
        )
        assert ticket.upstream == "research"
        later = h.gateway.clock.now() + timedelta(hours=1)
        assert sorted(await h.storage.recover(before=later, now=later)) == ["lost-1", "lost-2"]
        events = {e.answer_id: (e.upstream, e.outcome) for e in await h.events()}
    assert events == {
        "gw-lost-1": ("default", "recovered"),
        "gw-lost-2": ("research", "recovered"),
    }


class Unreachable:
    """A real storage whose admissions fail as with the database away."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        raise StorageError("database unreachable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


async def test_a_fail_open_admission_keeps_the_upstream_on_its_ticket(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url) as h:
        route = h.gateway.upstream.route("POST", "/chat-messages")
        running = h.app.proxy.admitter
        admitter = Admitter(
            Unreachable(h.storage),  # type: ignore[arg-type]
            running._settler,
            clock=h.gateway.clock,
            metrics=running._metrics,
        )
        ticket, _ = await admitter.admit(
            h.gateway.snapshot, "alice", "open-1", route, dict(CHAT), upstream="support"
        )
    assert (ticket.reserved, ticket.pending_id, ticket.upstream) == (False, None, "support")
