"""Who the operator's key acts for is the operator's choice: a client's
``OpenAI-Organization`` / ``OpenAI-Project`` (and Anthropic's
``anthropic-workspace-id`` / ``anthropic-user-profile-id``) are never forwarded,
whatever the dialect; the upstream's table sets them instead (``organization``,
``project``, ``workspace``) - a real gateway in front of real local fakes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.types import Receive, Scope, Send
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.dify import FakeDify
from tests.fakes.openai import FakeOpenAI
from tests.harness import UPSTREAM_KEY, running_gateway
from tests.servers import serve
from tests.test_named_upstreams import BACKUP_KEY, KEYS, Refuses, chat, gateway, openai

# What an attacker sends along with an ordinary request: another organization's
# and project's ids (known from a shared screenshot, a leaked log, an error
# message), to be billed to them and reach their files, vector stores and
# assistants with the operator's key - and Anthropic's equivalents.
VICTIM = {
    "OpenAI-Organization": "org-victim",
    "OpenAI-Project": "proj-victim",
    "anthropic-workspace-id": "wrkspc_victim",
    "anthropic-user-profile-id": "uprof_victim",
}
ACCOUNT = frozenset(name.lower() for name in VICTIM)
PRICES = {
    "gpt-4o-mini": {"input": "0.15", "output": "0.60"},
    "claude-sonnet-4-5": {"input": "3", "output": "15"},
}


class Seen:
    """An upstream's app, recording each request's raw header list (a header
    sent twice shows twice)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers: list[list[tuple[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.headers.append(
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            )
        await self.app(scope, receive, send)

    def account(self) -> list[list[tuple[str, str]]]:
        """The account headers of each request."""
        return [[(k, v) for k, v in headers if k in ACCOUNT] for headers in self.headers]


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        ({}, []),
        (
            {"organization": "org-operator", "project": "proj_operator"},
            [("openai-organization", "org-operator"), ("openai-project", "proj_operator")],
        ),
    ],
    ids=["not-set", "operators"],
)
async def test_a_client_cannot_choose_the_openai_organization_or_project(
    sqlite_url: str, configured: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    upstream = Seen(FakeOpenAI(api_key=UPSTREAM_KEY))
    settings = {"upstream": {"kind": "openai", **configured}, "prices": PRICES}
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post(
                "/v1/chat/completions", json=chat("gpt-4o-mini"), headers=h.auth(**VICTIM)
            )
            listed = await client.get("/v1/models", headers=h.auth(**VICTIM))
        await h.probes.wait_finished(1)
    assert answered.status_code == 200 and listed.status_code == 200
    assert upstream.account() == [expected, expected]


async def test_a_client_cannot_choose_the_anthropic_workspace_or_user_profile(
    sqlite_url: str,
) -> None:
    # anthropic-workspace-id picks the workspace of a key that can act in more
    # than one; anthropic-user-profile-id attributes the call to a user profile
    # (and, with the body's billing_policy, bills the customer behind it).
    upstream = Seen(FakeAnthropic(api_key=UPSTREAM_KEY))
    settings = {
        "upstream": {"kind": "anthropic", "workspace": "wrkspc_operator"},
        "prices": PRICES,
    }
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post(
                "/v1/messages",
                json=body,
                headers=h.auth(**VICTIM, **{"anthropic-version": "2023-06-01"}),
            )
        await h.probes.wait_finished(1)
    assert answered.status_code == 200, answered.text
    assert upstream.account() == [[("anthropic-workspace-id", "wrkspc_operator")]]


async def test_a_dify_upstream_gets_no_account_header_either(sqlite_url: str) -> None:
    upstream = Seen(FakeDify(api_key=UPSTREAM_KEY))
    body = {"inputs": {}, "query": "hi", "response_mode": "blocking"}
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post("/v1/chat-messages", json=body, headers=h.auth(**VICTIM))
    assert answered.status_code == 200, answered.text
    assert upstream.account() == [[]]


async def test_each_upstream_tried_sends_its_own_account(sqlite_url: str) -> None:
    # A fallback is another account's upstream: its own key and organization,
    # not the first one's as well.
    primary = Refuses(503)
    backup = Seen(FakeOpenAI(api_key=BACKUP_KEY))
    async with serve(primary) as primary_url, serve(backup) as backup_url:
        upstreams = {
            "primary": openai(
                primary_url + "/v1",
                "HOSTED_KEY",
                mount="/v1",
                fallbacks=["backup"],
                organization="org-primary",
                project="proj_primary",
            ),
            "backup": openai(backup_url + "/v1", "BACKUP_KEY", organization="org-backup"),
        }
        async with gateway(sqlite_url, upstreams) as h:
            async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
                answered = await client.post(
                    "/v1/chat/completions", json=chat("gpt-4o-mini"), headers=h.auth(**VICTIM)
                )
            await h.probes.wait_finished(1)
    assert answered.status_code == 200, answered.text
    (tried,) = primary.headers
    assert (tried["openai-organization"], tried["openai-project"]) == (
        "org-primary",
        "proj_primary",
    )
    assert "anthropic-workspace-id" not in tried and "anthropic-user-profile-id" not in tried
    assert backup.account() == [[("openai-organization", "org-backup")]]
    (sent,) = backup.headers
    assert ("authorization", f"Bearer {BACKUP_KEY}") in sent


# --- what a router in front of the provider reads, and the client's cookies ------------

# LiteLLM reads the end user from these before the body's user ("always checked,
# no configuration required": STANDARD_CUSTOMER_ID_HEADERS); its spend, end-user
# budgets and rate limits follow them. Tags choose other deployments.
NAMES_ALICE = {
    "x-litellm-end-user-id": "alice",
    "x-litellm-customer-id": "alice",
    "x-litellm-tags": "premium",
    "x-portkey-virtual-key": "operators-other-key",
    "x-portkey-custom-host": "https://attacker.example",
    "helicone-user-id": "alice",
    "cf-aig-custom-cost": '{"total_cost": 0}',
}
ROUTERS = ("x-litellm-", "x-portkey-", "helicone-", "cf-aig-")


async def test_a_user_cannot_name_another_user_to_a_router_upstream(sqlite_url: str) -> None:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    upstream = Seen(fake)
    settings = {"upstream": {"kind": "openai"}, "prices": PRICES}
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        mallory = await h.add_user("mallory")
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post(
                "/v1/chat/completions",
                json=chat("gpt-4o-mini"),
                headers={"Authorization": f"Bearer {mallory}", **NAMES_ALICE},
            )
        await h.probes.wait_finished(1)
    assert answered.status_code == 200, answered.text
    (sent,) = fake.requests
    assert sent.json["user"] == "mallory"  # the body says who it is...
    (headers,) = upstream.headers
    # ...and no header says otherwise, nor picks a key, host, budget or deployment.
    assert [(k, v) for k, v in headers if k.startswith(ROUTERS)] == []


async def test_a_key_of_the_clients_never_goes_with_the_operators(sqlite_url: str) -> None:
    # The gateway sends an Anthropic upstream the operator's key in x-api-key,
    # and no Authorization; LiteLLM reads Azure's api-key before x-api-key, so
    # a client's api-key was the key a LiteLLM upstream authenticated.
    upstream = Seen(FakeAnthropic(api_key=UPSTREAM_KEY))
    settings = {"upstream": {"kind": "anthropic"}, "prices": PRICES}
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
    others = {"api-key": "sk-other", "x-goog-api-key": "other", "ocp-apim-subscription-key": "o"}
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post(
                "/v1/messages",
                json=body,
                headers={"x-api-key": h.key, "anthropic-version": "2023-06-01", **others},
            )
        await h.probes.wait_finished(1)
    assert answered.status_code == 200, answered.text
    (headers,) = upstream.headers
    keys = [(k, v) for k, v in headers if k in {*others, "x-api-key", "authorization"}]
    assert keys == [("x-api-key", UPSTREAM_KEY)]


async def test_the_end_users_cookies_stay_with_the_gateway(sqlite_url: str) -> None:
    # A frontend on the gateway's site (same origin, or a parent-domain cookie):
    # the browser attaches its session cookie to every /v1 call.
    upstream = Seen(FakeOpenAI(api_key=UPSTREAM_KEY))
    settings = {"upstream": {"kind": "openai"}, "prices": PRICES}
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post(
                "/v1/chat/completions",
                json=chat("gpt-4o-mini"),
                headers=h.auth(Cookie="chat_session=s3cr3t-session-of-alice"),
            )
            listed = await client.get("/v1/models", headers=h.auth(Cookie="chat_session=s3"))
        await h.probes.wait_finished(1)
    assert answered.status_code == 200 and listed.status_code == 200
    assert [[v for k, v in headers if k == "cookie"] for headers in upstream.headers] == [[], []]


# --- what the upstream says about the operator's account -------------------------------

# As OpenAI and Anthropic send them with every answer (the rate limits are the
# account's: every user's traffic, summed).
OPERATORS_ACCOUNT = [
    (b"openai-organization", b"acme-operator-org"),
    (b"openai-project", b"proj_OperatorProject123"),
    (b"x-ratelimit-limit-tokens", b"30000000"),
    (b"x-ratelimit-remaining-tokens", b"29123456"),
    (b"x-ratelimit-remaining-requests", b"9871"),
    (b"x-ratelimit-remaining", b"9871"),
    (b"anthropic-organization-id", b"0b1c-operator"),
    (b"anthropic-ratelimit-tokens-remaining", b"1999000"),
    (b"x-litellm-key-spend", b"1234.5"),
]
# What a client's SDK reads to retry, poll or name its request.
FOR_THE_CLIENT = [
    (b"retry-after-ms", b"1500"),
    (b"x-should-retry", b"false"),
    (b"request-id", b"req_011"),
    (b"openai-processing-ms", b"210"),
]


class WithHeaders:
    """An upstream's app, its responses sent with ``extra`` headers."""

    def __init__(self, app: Any, extra: list[tuple[bytes, bytes]]) -> None:
        self.app, self.extra = app, extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_extra(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], *self.extra]}
            await send(message)

        await self.app(scope, receive, with_extra)


@pytest.mark.parametrize("status", ["200", "429"])
async def test_the_operators_account_headers_stay_with_the_gateway(
    sqlite_url: str, status: str
) -> None:
    upstream = WithHeaders(FakeOpenAI(api_key=UPSTREAM_KEY), OPERATORS_ACCOUNT + FOR_THE_CLIENT)
    settings = {
        "upstream": {"kind": "openai"},
        "prices": PRICES,
        "plans": {"free": {"queries_per_day": 10}},
    }
    steer = {} if status == "200" else {"x-fake-status": status}
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post(
                "/v1/chat/completions",
                json=chat("gpt-4o-mini", stream=False),
                headers=h.auth(**steer),
            )
        await h.probes.wait_finished(1)
    assert answered.status_code == int(status), answered.text
    got = answered.headers
    relayed = [
        (name, value)
        for name, value in OPERATORS_ACCOUNT
        if value.decode() in got.get_list(name.decode())
    ]
    assert relayed == [], f"the operator's account, told to an end user: {relayed}"
    # The gateway's own X-RateLimit-* (the caller's limit, as admitted) are there.
    assert got.get_list("x-ratelimit-remaining") == ["9"]
    assert (got["x-ratelimit-limit"], got["x-ratelimit-resource"]) == ("10", "queries_per_day")
    assert [(k, got.get(k.decode())) for k, _ in FOR_THE_CLIENT] == [
        (k, v.decode()) for k, v in FOR_THE_CLIENT
    ]


# --- the operator's headers for a router in front of the provider ----------------------

# What Portkey's hosted gateway needs with every request (the operator's Portkey
# key, and the provider it should call with the key in Authorization), and a
# header of the operator's own outside the routers' families.
PORTKEY_KEY = "pk-operator-portkey-secret"
OPERATORS = {
    "x-portkey-api-key": PORTKEY_KEY,
    "x-portkey-provider": "openai",
    "x-custom-tenant": "acme",
}
ROUTER = {
    "headers": {"x-portkey-provider": "openai", "X-Custom-Tenant": "acme"},
    "headers_env": {"x-portkey-api-key": "PORTKEY_KEY"},
}
# What a client sends to choose them instead: its own Portkey key (its own
# account's logs and budget), another provider, another tenant - twice, and in
# another case.
CHOSEN = [
    ("x-portkey-api-key", "pk-attackers-own"),
    ("X-Portkey-Provider", "anthropic"),
    ("x-custom-tenant", "victim"),
    ("X-CUSTOM-TENANT", "victim-again"),
    ("x_custom_tenant", "victim-as-a-cgi-variable"),  # HTTP_X_CUSTOM_TENANT too
]


def operators(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers of ``OPERATORS``' names in one request (in either spelling a
    server reading them as CGI variables takes for one), sorted."""
    return sorted((k, v) for k, v in headers if k.replace("_", "-") in OPERATORS)


async def test_a_client_cannot_send_the_headers_the_operator_sets_for_the_router(
    sqlite_url: str,
) -> None:
    # An answer, a side call (the model list) and one whose body is streamed
    # through as it is read (an embeddings call is an answer; /files is not
    # metered: a Dify upload below): each carries the operator's headers, once.
    upstream = Seen(FakeOpenAI(api_key=UPSTREAM_KEY))
    settings = {"upstream": {"kind": "openai", **ROUTER}, "prices": PRICES}
    async with running_gateway(
        sqlite_url, upstream=upstream, settings=settings, env={"PORTKEY_KEY": PORTKEY_KEY}
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post(
                "/v1/chat/completions",
                json=chat("gpt-4o-mini"),
                headers=[*h.auth().items(), *CHOSEN],
            )
            listed = await client.get("/v1/models", headers=[*h.auth().items(), *CHOSEN])
        await h.probes.wait_finished(1)
    assert answered.status_code == 200 and listed.status_code == 200
    expected = sorted(OPERATORS.items())
    assert [operators(headers) for headers in upstream.headers] == [expected, expected]


async def test_a_dify_upstreams_headers_go_with_its_uploads_and_stop_calls(sqlite_url: str) -> None:
    upstream = Seen(FakeDify(api_key=UPSTREAM_KEY))
    settings = {"upstream": ROUTER}
    async with running_gateway(
        sqlite_url, upstream=upstream, settings=settings, env={"PORTKEY_KEY": PORTKEY_KEY}
    ) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            sent = [*h.auth().items(), *CHOSEN]
            uploaded = await client.post(
                "/v1/files/upload",
                files={"file": ("a.txt", b"hello", "text/plain")},
                headers=sent,
            )
            answered = await client.post(
                "/v1/chat-messages",
                json={"inputs": {}, "query": "hi", "response_mode": "blocking"},
                headers=sent,
            )
            stopped = await client.post(
                "/v1/chat-messages/task-1/stop", json={"user": "x"}, headers=sent
            )
    assert (uploaded.status_code, answered.status_code) == (201, 200), answered.text
    assert stopped.status_code == 200, stopped.text
    expected = sorted(OPERATORS.items())
    assert [operators(headers) for headers in upstream.headers] == [expected] * 3


async def test_a_fallback_never_gets_the_headers_of_the_upstream_before_it(
    sqlite_url: str,
) -> None:
    # Helicone in front of the primary only: its Helicone-Auth (the operator's
    # Helicone key) must not reach the backup, a third party's server; the
    # client's own never reaches either.
    primary = Seen(Refuses(503))
    backup = Seen(FakeOpenAI(api_key=BACKUP_KEY))
    helicone = "Bearer sk-helicone-operator-secret"
    async with serve(primary) as primary_url, serve(backup) as backup_url:
        upstreams = {
            "primary": openai(
                primary_url + "/v1",
                "HOSTED_KEY",
                mount="/v1",
                fallbacks=["backup"],
                headers={"x-custom-tenant": "acme"},
                headers_env={"Helicone-Auth": "HELICONE_KEY"},
            ),
            "backup": openai(backup_url + "/v1", "BACKUP_KEY"),
        }
        async with running_gateway(
            sqlite_url,
            upstream_url="http://127.0.0.1:9/v1",
            settings={"upstream": None, "upstreams": upstreams, "prices": PRICES},
            env={**KEYS, "HELICONE_KEY": helicone},
        ) as h:
            async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
                answered = await client.post(
                    "/v1/chat/completions",
                    json=chat("gpt-4o-mini"),
                    headers=h.auth(
                        **{"Helicone-Auth": "Bearer sk-helicone-attacker", "x-custom-tenant": "me"}
                    ),
                )
            await h.probes.wait_finished(1)
    assert answered.status_code == 200, answered.text
    (tried,) = primary.headers
    assert sorted((k, v) for k, v in tried if k in ("helicone-auth", "x-custom-tenant")) == [
        ("helicone-auth", helicone),
        ("x-custom-tenant", "acme"),
    ]
    (sent,) = backup.headers
    assert [v for k, v in sent if k == "helicone-auth"] == []
    # A name the backup's operator set nothing for is the client's there, as
    # any header outside the routers' families is.
    assert [v for k, v in sent if k == "x-custom-tenant"] == ["me"]


class RawSeen:
    """An upstream's app, recording each request's header values as bytes."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers: list[list[tuple[bytes, bytes]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.headers.append(list(scope["headers"]))
        await self.app(scope, receive, send)


async def test_a_latin_1_header_value_reaches_the_upstream_as_configured(sqlite_url: str) -> None:
    # R8-4. The load accepts a Latin-1 value ("printable ASCII or Latin-1",
    # docs/configuration.md) and `_target` encodes it as Latin-1, but the
    # default transport (httpx-aiohttp, `UpstreamClient._open_aiohttp`, and the
    # model list through httpx) writes header values back as UTF-8: the router
    # reads "Ã\x89quipe" (RFC 9110 5.5: a value's octets are ISO-8859-1 if
    # anything). Either the value goes as configured, or such a value is
    # refused at load.
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    value = "\u00c9quipe A"  # "Équipe A"
    try:
        parse_config({"upstream": {"headers": {"x-team": value}}}, env={})
    except ConfigError:
        return  # refused at load: nothing is sent otherwise than configured
    upstream = RawSeen(FakeOpenAI(api_key=UPSTREAM_KEY))
    settings = {"upstream": {"kind": "openai", "headers": {"x-team": value}}, "prices": PRICES}
    async with running_gateway(sqlite_url, upstream=upstream, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
            answered = await client.post(
                "/v1/chat/completions", json=chat("gpt-4o-mini"), headers=h.auth()
            )
            listed = await client.get("/v1/models", headers=h.auth())
        await h.probes.wait_finished(1)
    assert (answered.status_code, listed.status_code) == (200, 200)
    sent = [[v for k, v in headers if k == b"x-team"] for headers in upstream.headers]
    assert sent == [[value.encode("latin-1")]] * 2
