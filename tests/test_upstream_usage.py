"""Issue 23, usage by upstream: the ledger records which named upstream answered
(the ticket's, which routing sets), a recovered answer the one its admission
named; every surface that shows usage by model shows it by upstream too."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.admission import Admitter, Ticket
from gateway.cli import main
from gateway.errors import StorageError
from gateway.storage import Storage
from tests.fakes.dify import FakeDify
from tests.harness import USER, Harness, running_gateway
from tests.servers import serve

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


# --- the surfaces ------------------------------------------------------------------

ADMIN = {"Authorization": "Bearer admin-token-0123456789"}
# One answer of the fake Dify (tests/test_proxy.py, FULL).
ANSWER = {"prompt_tokens": 1033, "completion_tokens": 135, "total_tokens": 1168}


def by_upstream(upstream: str, answers: int) -> dict[str, Any]:
    """What every surface shows for ``answers`` fake Dify answers of ``upstream``."""
    return {
        "upstream": upstream,
        "answers": answers,
        "prompt_tokens": ANSWER["prompt_tokens"] * answers,
        "cached_tokens": 0,
        "completion_tokens": ANSWER["completion_tokens"] * answers,
        "reasoning_tokens": 0,
        "total_tokens": ANSWER["total_tokens"] * answers,
        "cost": str(Decimal("0.001303") * answers),
        "currency": "USD",
    }


async def test_usage_by_upstream_on_every_surface(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Answers of three upstreams: /v1/usage, the admin API's user and team
    details, the exports and the CLI's `users show` and `teams show` sum them per
    upstream, as they do per model."""
    config_file = tmp_path / "gateway.toml"
    env = {"GATEWAY_ADMIN_TOKEN": "admin-token-0123456789"}
    async with running_gateway(database_url, env=env, config_file=config_file) as h:
        bob = await h.add_user("bob")
        await h.gateway.accounts.create_team("ops", plan="free")
        await h.gateway.accounts.set_team(USER, "ops")
        await h.gateway.accounts.set_team("bob", "ops")
        routed = RoutedTo(h.app.proxy.admitter, "default")
        h.app.proxy.admitter = routed
        sent = [("a1", "support", None), ("a2", "support", None), ("a3", "default", None)]
        sent += [("a4", "research", None), ("b1", "research", bob)]
        for message_id, upstream, key in sent:
            routed.upstream = upstream
            await chat(h, message_id, key)
        await h.probes.wait_finished(len(sent))
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
            mine = (await http.get("/v1/usage", headers=h.auth())).json()
            detail = (await http.get(f"/admin/users/{USER}", headers=ADMIN)).json()
            team = (await http.get("/admin/teams/ops", headers=ADMIN)).json()
            as_json = await http.get(f"/admin/export/events?format=json&user={USER}", headers=ADMIN)
            as_csv = await http.get("/admin/export/events?format=csv", headers=ADMIN)
        cli = ["--config", str(config_file)]
        environ = {"TEST_UPSTREAM_KEY": "x", **env}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in environ.items():
                patch.setenv(name, value)
            capsys.readouterr()
            assert await asyncio.to_thread(main, [*cli, "users", "show", USER]) == 0
            shown = capsys.readouterr().out
            assert await asyncio.to_thread(main, [*cli, "teams", "show", "ops"]) == 0
            team_shown = capsys.readouterr().out

    alice = [by_upstream("support", 2), by_upstream("default", 1), by_upstream("research", 1)]
    assert mine["month_by_upstream"] == alice  # what the end user sees
    assert detail["month_by_upstream"] == alice  # and the admin
    # The team's: its members' answers (research: alice's and bob's).
    assert team["month_by_upstream"] == [
        by_upstream("research", 2),
        by_upstream("support", 2),
        by_upstream("default", 1),
    ]
    # Dify names no model: one row without one, as before.
    assert [(m["model"], m["answers"]) for m in mine["month_by_model"]] == [(None, 4)]

    rows = {row["answer_id"]: row["upstream"] for row in orjson.loads(as_json.content)}
    assert rows == {"a1": "support", "a2": "support", "a3": "default", "a4": "research"}
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert {row["answer_id"]: row["upstream"] for row in table} == rows | {"b1": "research"}
    header = as_csv.text.splitlines()[0].split(",")
    assert header.index("upstream") == header.index("model") - 1

    assert "this month by upstream:" in shown
    assert "  support   2 answers, 2336 tokens, cost 0.002606 USD" in shown
    assert "  default   1 answer, 1168 tokens, cost 0.001303 USD" in shown
    assert "  research  1 answer, 1168 tokens, cost 0.001303 USD" in shown
    assert "this month by model:" in shown and "  -  4 answers, 4672 tokens" in shown
    assert "this month by upstream:" in team_shown
    assert "  research  2 answers, 2336 tokens, cost 0.002606 USD" in team_shown
    assert "  default   1 answer, 1168 tokens, cost 0.001303 USD" in team_shown


async def test_a_user_without_answers_has_no_upstream_rows(database_url: str) -> None:
    env = {"GATEWAY_ADMIN_TOKEN": "admin-token-0123456789"}
    async with running_gateway(database_url, env=env) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as http:
            mine = (await http.get("/v1/usage", headers=h.auth())).json()
    assert mine["month_by_upstream"] == [] and mine["month_by_model"] == []


# --- named upstreams, configured ---------------------------------------------------


async def test_named_upstreams_answers_and_a_recovered_one_by_upstream(database_url: str) -> None:
    """Two Dify apps at their mounts (issue 23): the ledger and /v1/usage say
    which app answered; an answer under way when a recovery charges it (its
    gateway taken for dead) is estimated for the app it was sent to, and its
    real record, arriving later, replaces the estimate there."""
    support, research = FakeDify(api_key="support-key"), FakeDify(api_key="research-key")
    async with contextlib.AsyncExitStack() as stack:
        support_url = await stack.enter_async_context(serve(support))
        research_url = await stack.enter_async_context(serve(research))
        stack.callback(research.release_held)
        h = await stack.enter_async_context(
            running_gateway(
                database_url,
                upstream_url="http://127.0.0.1:9/v1",  # no [upstream]: unused
                settings={
                    "upstream": None,
                    "upstreams": {
                        "support": {"url": support_url + "/v1", "api_key_env": "SUPPORT_KEY"},
                        "research": {"url": research_url + "/v1", "api_key_env": "RESEARCH_KEY"},
                    },
                },
                env={"SUPPORT_KEY": "support-key", "RESEARCH_KEY": "research-key"},
            )
        )
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            for message_id in ("s1", "s2"):
                headers = h.auth(**{"x-fake-message-id": message_id})
                answered = await client.post(
                    "/support/v1/chat-messages", json=CHAT, headers=headers
                )
                assert answered.status_code == 200
            await h.probes.wait_finished(2)  # both settled: only the held one is pending
            held = h.auth(**{"x-fake-scenario": "hold", "x-fake-message-id": "r1"})
            async with client.stream(
                "POST", "/research/v1/chat-messages", json=CHAT, headers=held
            ) as response:
                chunks = response.aiter_raw()
                assert b'"event":"message"' in await asyncio.wait_for(anext(chunks), timeout=5)
                request_id = response.headers["x-request-id"]
                later = h.gateway.clock.now() + timedelta(hours=1)
                recovered_ids = await h.storage.recover(before=later, now=later)
                recovered = {e.answer_id: e.upstream for e in await h.events()}
                research.release_held()
                assert b"message_end" in b"".join([chunk async for chunk in chunks])
            await h.probes.wait_finished(3)
            events = {e.answer_id: (e.upstream, e.outcome) for e in await h.events()}
            mine = (await client.get("/v1/usage", headers=h.auth())).json()
    assert recovered_ids == [request_id]
    assert recovered == {"s1": "support", "s2": "support", f"gw-{request_id}": "research"}
    assert events == {
        "s1": ("support", "complete"),
        "s2": ("support", "complete"),
        "r1": ("research", "complete"),
    }
    assert mine["month_by_upstream"] == [by_upstream("support", 2), by_upstream("research", 1)]
