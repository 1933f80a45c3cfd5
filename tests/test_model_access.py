"""Model allow-lists (issue 21): a plan's ``models`` globs, checked where the
upstream reads the model, before anything is reserved or forwarded; the model
list filtered to them. Against a real gateway and a real local fake upstream."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli import config_warnings
from gateway.config import parse_config
from gateway.errors import ConfigError, Forbidden
from gateway.model_access import allows, check_models
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway
from tests.tcpproxy import TCPProxy

PRICES = {
    "gpt-4o-mini": {"input": "0.15", "output": "0.60"},
    "gpt-4o": {"input": "2.5", "output": "10"},
    "GPT-4O": {"input": "2.5", "output": "10"},
    "llama-3-8b": {"input": "0.05", "output": "0.08"},
}
SETTINGS: dict[str, Any] = {
    "upstream": {"kind": "openai"},
    "prices": PRICES,
    "call_prices": {"openai.image_generation": {"price": "0.04"}},
    "plans": {
        "free": {"queries_per_day": 10, "models": ["gpt-4o-mini", "llama-3*"]},
        "pro": {"queries_per_day": 10},
        "images": {"models": ["gpt-4o-mini", "gpt-image-1"]},
    },
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Xin chào"}]}
STEER = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "100"}
LISTED = ("gpt-4o-mini", "gpt-4o", "llama-3-70b", "text-embedding-3-small", "GPT-4O-MINI")


async def request(
    h: Harness, method: str, path: str, *, key: str | None = None, **kwargs: Any
) -> httpx.Response:
    headers = {**h.auth(key, **STEER), **kwargs.pop("headers", {})}
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.request(method, path, headers=headers, **kwargs)


async def nothing_reserved(h: Harness, fake: FakeOpenAI) -> None:
    """No request reached the upstream, and no counter or ledger row moved."""
    assert fake.requests == []
    day = h.gateway.today()
    assert await h.storage.daily(day, day) == []
    assert await h.events() == []
    assert await h.storage.open_streams(USER, now=h.gateway.clock.now()) == 0


def refusal(response: httpx.Response) -> str:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}  # OpenAI's shape
    assert (error["code"], error["type"]) == ("model_not_in_plan", "permission_error")
    message: str = error["message"]
    return message


# --- refused before anything happens --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4o", "stream": True}),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}),
        ("/v1/embeddings", {"model": "gpt-4o", "input": "hi"}),
        ("/v1/responses", {"model": "gpt-4o", "input": "hi"}),
    ],
    ids=["chat", "chat-stream", "completion", "embedding", "response"],
)
async def test_a_model_outside_the_plan_is_refused_before_anything_is_reserved(
    database_url: str, path: str, body: dict[str, Any]
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(database_url, upstream=fake, settings=SETTINGS) as h:
        refused = await request(h, "POST", path, json=body)
        await nothing_reserved(h, fake)
    assert refusal(refused) == "The model 'gpt-4o' is not available on your plan."


async def test_allowed_models_and_globs_are_answered_and_charged(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        for model in ("gpt-4o-mini", "llama-3-8b"):
            answered = await request(
                h, "POST", "/v1/chat/completions", json={**CHAT, "model": model}
            )
            assert answered.status_code == 200, answered.text
        await h.probes.wait_finished(2)
        events = await h.events()
    assert sorted((e.model, e.total_tokens) for e in events) == [
        ("gpt-4o-mini", 1100),
        ("llama-3-8b", 1100),
    ]
    assert [r.json["model"] for r in fake.requests] == ["gpt-4o-mini", "llama-3-8b"]


async def test_a_plan_without_an_allow_list_takes_any_model(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        await h.storage.set_plan(USER, "pro")
        answered = await request(
            h, "POST", "/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}
        )
    assert answered.status_code == 200


async def test_the_refusal_is_in_the_users_language(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        vi = await request(
            h,
            "POST",
            "/v1/chat/completions",
            json={**CHAT, "model": "gpt-4o"},
            headers={"accept-language": "vi"},
        )
        unnamed = await request(
            h,
            "POST",
            "/v1/chat/completions",
            json={"messages": CHAT["messages"]},
            headers={"accept-language": "vi-VN"},
        )
    assert refusal(vi) == "Mô hình 'gpt-4o' không có trong gói của bạn."
    assert refusal(unnamed).startswith("Gói của bạn chỉ cho phép một số mô hình")


# --- attacks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        # An upstream that reads model names case-insensitively or trims them
        # would run gpt-4o: the gateway matches the string it forwards, exactly.
        ("GPT-4O", "'GPT-4O'"),
        ("Gpt-4o-Mini", "'Gpt-4o-Mini'"),
        (" gpt-4o", "' gpt-4o'"),
        ("gpt-4o-mini ", "'gpt-4o-mini '"),
        ("gpt-4o-mini\n", "'gpt-4o-mini\\n'"),
        ("gpt-4o-mini\u0000", "'gpt-4o-mini\\x00'"),
        ("gpt\u20114o-mini", "'gpt\u20114o-mini'"),  # a non-breaking hyphen
        ("x" * 5000, "'" + "x" * 100 + "…'"),  # echoed, but not all of it
    ],
    ids=["upper", "mixed", "leading-space", "trailing-space", "newline", "nul", "nbhyphen", "long"],
)
async def test_spellings_of_a_model_are_matched_exactly_as_sent(
    sqlite_url: str, model: str, shown: str
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        refused = await request(h, "POST", "/v1/chat/completions", json={**CHAT, "model": model})
        await nothing_reserved(h, fake)
    assert refusal(refused) == f"The model {shown} is not available on your plan."


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": CHAT["messages"]}),
        ("/v1/chat/completions", {**CHAT, "model": None}),
        ("/v1/chat/completions", {**CHAT, "model": ""}),
        ("/v1/chat/completions", {**CHAT, "model": ["gpt-4o-mini"]}),
        ("/v1/chat/completions", {**CHAT, "model": {"id": "gpt-4o-mini"}}),
        ("/v1/embeddings", {"input": "hi"}),
        # (A stored prompt, which carries a model of its own, is refused whatever
        # the plan: tests/test_routing.py.)
        ("/v1/responses", {"input": "hi"}),
    ],
    ids=["missing", "null", "empty", "list", "object", "embedding", "response"],
)
async def test_a_request_that_names_no_model_is_refused(
    sqlite_url: str, path: str, body: dict[str, Any]
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        refused = await request(h, "POST", path, json=body)
        await nothing_reserved(h, fake)
    assert "name the model to use" in refusal(refused)


async def test_a_tool_that_runs_its_own_model_is_checked_too(sqlite_url: str) -> None:
    # The Responses image_generation tool runs an image model named in the tool
    # (OpenAI's default without one): a model the top-level check never saw.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    tool = {"type": "image_generation", "model": "gpt-image-1"}
    body = {"model": "gpt-4o-mini", "input": "draw", "tools": [tool]}
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        named = await request(h, "POST", "/v1/responses", json=body)
        unnamed = await request(
            h, "POST", "/v1/responses", json={**body, "tools": [{"type": "image_generation"}]}
        )
        dated = await request(
            h,
            "POST",
            "/v1/responses",
            json={**body, "tools": [{"type": "image_generation_2025_01_01", "quality": "low"}]},
        )
        await nothing_reserved(h, fake)
        # On a plan that lists the image model, the same request goes through.
        await h.storage.set_plan(USER, "images")
        h.gateway.snapshot.users.forget(USER)
        allowed = await request(h, "POST", "/v1/responses", json=body)
    assert refusal(named) == "The model 'gpt-image-1' is not available on your plan."
    assert "name the model to use" in refusal(unnamed)
    assert "name the model to use" in refusal(dated)
    assert allowed.status_code == 200, allowed.text


@pytest.mark.parametrize("allowed_last", [True, False])
async def test_a_repeated_model_key_is_read_once_as_the_upstream_reads_it(
    sqlite_url: str, allowed_last: bool
) -> None:
    # {"model": A, ..., "model": B}: JSON parsers disagree on which wins (Python and
    # orjson take the last, some take the first). The gateway forwards the body it
    # parsed, re-serialised: the upstream can only see the model that was checked.
    first, last = ("gpt-4o", "gpt-4o-mini") if allowed_last else ("gpt-4o-mini", "gpt-4o")
    raw = (
        b'{"model": "' + first.encode() + b'", "messages": [{"role": "user", "content": "hi"}], '
        b'"model": "' + last.encode() + b'"}'
    )
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        response = await request(
            h,
            "POST",
            "/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
        if not allowed_last:
            await nothing_reserved(h, fake)
    if allowed_last:
        assert response.status_code == 200
        (sent,) = fake.requests
        assert sent.raw.count(b'"model"') == 1 and b'"model":"gpt-4o-mini"' in sent.raw
    else:
        assert refusal(response) == "The model 'gpt-4o' is not available on your plan."


# --- the model list and model reads ----------------------------------------------------


async def test_the_model_list_shows_only_the_plans_models(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY, models=LISTED)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        listed = await request(h, "GET", "/v1/models")
        pro_key = await h.add_user("bob", plan="pro")
        everything = await request(h, "GET", "/v1/models", key=pro_key)
    assert listed.status_code == 200
    body = listed.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["gpt-4o-mini", "llama-3-70b"]
    assert int(listed.headers["content-length"]) == len(listed.content)
    assert [m["id"] for m in everything.json()["data"]] == list(LISTED)
    # Read uncompressed, so the gateway can filter whatever the client accepts.
    assert fake.requests[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/v1/models/gpt-4o-mini", True),
        ("/v1/models/llama-3-70b", True),
        ("/v1/models/gpt-4o", False),
        ("/v1/models/GPT-4O-MINI", False),
        ("/v1/models/gpt%2D4o", False),  # the upstream decodes the path: gpt-4o
    ],
)
async def test_reading_a_model_outside_the_plan_is_refused(
    sqlite_url: str, path: str, forwarded: bool
) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    async with running_gateway(sqlite_url, upstream=fake, settings=SETTINGS) as h:
        response = await request(h, "GET", path)
    if forwarded:
        assert [r.path for r in fake.requests] == [path.removeprefix("/v1")]
    else:
        assert fake.requests == []
        assert "is not available on your plan" in refusal(response)


async def test_a_teams_allow_list_applies_with_the_users(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY, models=LISTED)
    settings = {**SETTINGS, "plans": {**SETTINGS["plans"], "team": {"models": ["gpt-4o*"]}}}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        await h.storage.set_plan(USER, "pro")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        refused = await request(
            h, "POST", "/v1/chat/completions", json={**CHAT, "model": "llama-3-8b"}
        )
        await nothing_reserved(h, fake)
        listed = await request(h, "GET", "/v1/models")
        await h.storage.set_plan(USER, "free")  # both lists now: only gpt-4o-mini is in each
        h.gateway.snapshot.users.forget(USER)
        both = await request(h, "GET", "/v1/models")
    assert refusal(refused) == "The model 'llama-3-8b' is not available on your plan."
    assert [m["id"] for m in listed.json()["data"]] == ["gpt-4o-mini", "gpt-4o"]
    assert [m["id"] for m in both.json()["data"]] == ["gpt-4o-mini"]


# --- Dify names no model ---------------------------------------------------------------


def test_check_config_warns_that_a_dify_upstream_names_no_model() -> None:
    dify = parse_config({"plans": {"free": {"models": ["gpt-4o-mini"]}}}, env={"X": "1"})
    warnings = [w for w in config_warnings(dify) if "models" in w]
    assert warnings == [
        "plans.free.models: a Dify upstream's requests name no model, so the allow-list "
        "does not apply (docs/quotas.md, 'Model allow-lists')"
    ]
    openai = parse_config({**SETTINGS, "prices": {}, "call_prices": {}}, env={})
    assert not [w for w in config_warnings(openai) if "models" in w]


async def test_a_dify_request_is_not_held_to_a_model_list(sqlite_url: str) -> None:
    # A Dify app runs the model its builder chose; requests name none
    # (docs/configuration.md): the list cannot apply, and does not refuse.
    settings = {"plans": {"free": {"models": ["gpt-4o-mini"]}}}
    chat = {"query": "Xin chào", "inputs": {}, "response_mode": "blocking", "user": "x"}
    async with running_gateway(sqlite_url, settings=settings) as h:
        answered = await request(h, "POST", "/v1/chat-messages", json=chat)
    assert answered.status_code == 200


# --- the rule itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("globs", "model", "allowed"),
    [
        (None, "anything", True),
        ((), "gpt-4o-mini", False),
        (("gpt-4o-mini",), "gpt-4o-mini", True),
        (("gpt-4o-mini",), "gpt-4o-mini-2024-07-18", False),
        (("gpt-4o-mini*",), "gpt-4o-mini-2024-07-18", True),
        (("llama-3*",), "llama-3.1-70b", True),
        (("llama-3*",), "Llama-3.1-70b", False),
        (("llama-3*",), "meta/llama-3", False),
        (("*mini",), "gpt-4o-mini", True),
        (("gpt-4o-mini", "o?"), "o3", True),
        (("gpt-4o-mini", "o?"), "o33", False),
        (("[go]pt",), "opt", True),
    ],
)
def test_allows(globs: tuple[str, ...] | None, model: str, allowed: bool) -> None:
    assert allows(globs, model) is allowed


def test_check_models_refuses_the_first_model_not_allowed() -> None:
    check_models(None, [None, "x"])
    check_models(("a*",), ["ab", "ac"])
    with pytest.raises(Forbidden, match="'b'") as refused:
        check_models(("a*",), ["ab", "b", None])
    assert refused.value.status == 403 and refused.value.code == "model_not_in_plan"
    with pytest.raises(Forbidden, match="name the model"):
        check_models(("a*",), ["ab", None])


@pytest.mark.parametrize(
    ("models", "error"),
    [
        ("gpt-4o", "plans.free.models: expected an array of strings"),
        ([1], "plans.free.models[0]: expected a string"),
        ([""], "plans.free.models[0]: expected a model name or glob"),
        (["gpt-4o "], "plans.free.models[0]: expected a model name or glob"),
    ],
)
def test_a_bad_allow_list_is_refused_at_load(models: object, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"plans": {"free": {"models": models}}}, env={})


def test_an_allow_list_loads_as_given() -> None:
    config = parse_config({"plans": {"free": {"models": ["gpt-4o-mini", "llama-3*"]}}}, env={})
    assert config.plans["free"].models == ("gpt-4o-mini", "llama-3*")
    assert parse_config({}, env={}).plans["free"].models is None


async def test_a_team_that_cannot_be_read_leaves_the_users_own_list(sqlite_url: str) -> None:
    # The database fails under the team's row (here its table is gone): the request
    # is held to the user's own list, as admission fails open, and it is counted.
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {**SETTINGS, "plans": {**SETTINGS["plans"], "team": {"models": ["llama-3*"]}}}
    async with running_gateway(sqlite_url, upstream=fake, settings=settings) as h:
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        refused = await request(h, "POST", "/v1/chat/completions", json=CHAT)
        with contextlib.closing(sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))) as db:
            db.execute("ALTER TABLE teams RENAME TO teams_gone")
            db.commit()
        h.gateway.snapshot.teams.forget("acme")  # past the cache's TTL
        answered = await request(h, "POST", "/v1/chat/completions", json=CHAT)
        elsewhere = await request(
            h, "POST", "/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}
        )
        metrics = h.gateway.metrics.render().decode()
    assert "'gpt-4o-mini' is not available" in refusal(refused)
    assert answered.status_code == 200
    assert "'gpt-4o' is not available" in refusal(elsewhere)  # the user's own list holds
    # Counted at each failed read: the model check of both requests, and the
    # admission of the one admitted (it reads the team's limits; docs/quotas.md,
    # "Team limits", fails open the same way).
    assert 'gateway_storage_errors_total{operation="team"} 3' in metrics


async def test_a_database_outage_holds_the_default_plans_list_and_serves(
    pg_behind_proxy: tuple[str, TCPProxy], tmp_path: Path
) -> None:
    # The user's row is past the cache's TTL when the database goes away: as
    # admission does (admission.on_storage_error), the check falls back to the
    # default plan's list instead of refusing every answer with a 503.
    url, proxy = pg_behind_proxy
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    settings = {
        **SETTINGS,
        "admission": {"on_storage_error": {"queries": "open", "tokens": "open", "streams": "open"}},
        "database": {
            "connect_timeout": 1.0,
            "command_timeout": 2.0,
            "spool_file": str(tmp_path / "spool.jsonl"),
        },
    }
    async with running_gateway(url, upstream=fake, settings=settings) as h:
        assert (await request(h, "POST", "/v1/chat/completions", json=CHAT)).status_code == 200
        await h.probes.wait_finished(1)
        h.gateway.snapshot.users.forget(USER)  # past the cache's TTL
        await proxy.cut()
        during = await request(h, "POST", "/v1/chat/completions", json=CHAT)
        elsewhere = await request(
            h, "POST", "/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}
        )
        await h.probes.wait_finished(3)
        await h.gateway.settler.close()  # the ledger writes go to the spool
        await proxy.restore()
    assert during.status_code == 200, during.text
    assert "'gpt-4o' is not available" in refusal(elsewhere)  # the default plan's list
