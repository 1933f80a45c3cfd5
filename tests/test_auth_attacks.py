"""Attacks on authentication and identity (review-auth A1-A3): a change made by
another process that never reached a busy user, a token minted for another
audience taken as its subject, one key under endless spellings. Each test is
the request an attacker sends, and the proof it is refused."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.accounts import Accounts
from tests.harness import Harness, running_gateway

pytestmark = [pytest.mark.asyncio, pytest.mark.warm_connections]

SERVICE_KEY = "svc-" + "s" * 40
JWT_SECRET = "review-hs256-secret-" + "k" * 32
ENV = {"TEST_SERVICE_KEY": SERVICE_KEY, "TEST_JWT_SECRET": JWT_SECRET}
CHAT = {"query": "hi", "inputs": {}, "response_mode": "blocking", "user": "x"}
# "suspended" answers nothing: where an operator puts a user to stop them.
PLANS: dict[str, Any] = {"free": {}, "suspended": {"queries_per_day": 0}}
TRUSTED: dict[str, Any] = {
    "auth": {"mode": "trusted_header", "trusted_header": {"service_key_env": "TEST_SERVICE_KEY"}},
    "plans": PLANS,
}
JWT: dict[str, Any] = {
    "auth": {"mode": "jwt", "jwt": {"secret_env": "TEST_JWT_SECRET"}},
    "plans": PLANS,
}


class FakeClock:
    """The monotonic clock of the gateway's user cache, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache_clock(h: Harness) -> FakeClock:
    """The running gateway's user cache read on a clock of the test's."""
    clock = FakeClock()
    h.gateway.snapshot.users._users._clock = clock
    return clock


async def ask(h: Harness, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
        return await client.post("/v1/chat-messages", json=CHAT, headers=headers)


def as_user(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SERVICE_KEY}", "X-Gateway-User": user}


def with_token(user: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"sub": user, "iat": now, "exp": now + 600}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


MODES: dict[str, tuple[dict[str, Any], Callable[[str], dict[str, str]]]] = {
    "trusted_header": (TRUSTED, as_user),
    "jwt": (JWT, with_token),
}


# --- A1: the user cache of the trusted-header and JWT modes never expired ------------


@pytest.mark.parametrize("mode", list(MODES))
async def test_a_plan_change_by_another_process_reaches_an_active_user_within_the_ttl(
    postgres_dsn: str, mode: str
) -> None:
    """docs/configuration.md, auth.key_cache_ttl: a plan change made in another
    process (the CLI's `gateway users set-plan`, another replica's admin API)
    takes effect "in other processes within this time" (30 s). In the
    trusted-header and JWT modes every request put the user back in the cache
    with a new 30 s (`UserDirectory.resolve`), so a user who asked at least every
    30 s kept the plan they had, forever: the operator's suspension never landed."""
    settings, credential = MODES[mode]
    async with running_gateway(postgres_dsn, settings=settings, env=ENV) as h:
        clock = cache_clock(h)
        user = f"carol-{secrets.token_hex(4)}"
        assert (await ask(h, credential(user))).status_code == 200  # cached at t=1000
        # The operator suspends them from the CLI: a process with no cache to tell.
        await Accounts(h.storage, config=lambda: h.config).set_plan(user, "suspended")
        statuses = []
        for _ in range(6):  # one request every 20 s of the cache's clock, 2 minutes
            clock.now += 20
            statuses.append((await ask(h, credential(user))).status_code)
        # 20 s after the change the old plan may still hold; from 40 s on it must not.
        assert statuses[1:] == [429] * 5, statuses


async def test_a_team_move_by_another_process_reaches_an_active_user_within_the_ttl(
    postgres_dsn: str,
) -> None:
    """The same for a team: the team a user is in is a column of the user's
    row, so a user put into a team from the CLI (`gateway users set-team`) by
    the operator - a team whose plan answers nothing - never has its limits
    applied while they keep asking."""
    settings, credential = MODES["trusted_header"]
    async with running_gateway(postgres_dsn, settings=settings, env=ENV) as h:
        clock = cache_clock(h)
        user = f"frank-{secrets.token_hex(4)}"
        team = f"frozen-{secrets.token_hex(4)}"
        assert (await ask(h, credential(user))).status_code == 200  # cached at t=1000
        await h.storage.create_team(team, plan="suspended", now=datetime.now(UTC))
        await Accounts(h.storage, config=lambda: h.config).set_team(user, team)
        statuses = []
        for _ in range(6):
            clock.now += 20
            statuses.append((await ask(h, credential(user))).status_code)
        assert statuses[1:] == [429] * 5, statuses


@pytest.mark.parametrize("mode", list(MODES))
async def test_control_a_user_who_pauses_past_the_ttl_gets_the_new_plan(
    postgres_dsn: str, mode: str
) -> None:
    """Control (passed before the fix too): the suspended plan refuses, and a cached user is
    read again once the TTL has passed without a request in between."""
    settings, credential = MODES[mode]
    async with running_gateway(postgres_dsn, settings=settings, env=ENV) as h:
        clock = cache_clock(h)
        user = f"dave-{secrets.token_hex(4)}"
        assert (await ask(h, credential(user))).status_code == 200
        await Accounts(h.storage, config=lambda: h.config).set_plan(user, "suspended")
        clock.now += 40
        assert (await ask(h, credential(user))).status_code == 429


async def test_control_a_team_move_reaches_a_user_who_pauses_past_the_ttl(
    postgres_dsn: str,
) -> None:
    """Control (passed before the fix too): the frozen team refuses its members once the
    user's row is read again."""
    settings, credential = MODES["trusted_header"]
    async with running_gateway(postgres_dsn, settings=settings, env=ENV) as h:
        clock = cache_clock(h)
        user = f"gina-{secrets.token_hex(4)}"
        team = f"frozen-{secrets.token_hex(4)}"
        assert (await ask(h, credential(user))).status_code == 200
        await h.storage.create_team(team, plan="suspended", now=datetime.now(UTC))
        await Accounts(h.storage, config=lambda: h.config).set_team(user, team)
        clock.now += 40
        assert (await ask(h, credential(user))).status_code == 429


# --- A3: a bearer token was read with Python's whitespace trimmed off its ends --------


@pytest.mark.parametrize(
    "tail", [b"\xa0", b"\x85", b"\xa0\x85\xa0\x85"], ids=["nbsp", "nel", "mix"]
)
async def test_a_gateway_key_with_unicode_whitespace_appended_is_not_the_same_key(
    postgres_dsn: str, tail: bytes
) -> None:
    """`gateway.http.bearer_token` decodes the header as Latin-1 and trimmed it
    with `str.strip`, which takes U+00A0 (NBSP) and U+0085 (NEL) for whitespace;
    RFC 9110 5.5 allows only spaces and tabs around a field value (what
    `header_user_id` trims, for this very reason). So one key had endless
    spellings the gateway accepted as that key, each a different credential to
    anything in front of it that judges the caller by the header's bytes (a rate
    limiter, a WAF or log correlation keyed on Authorization): the gateway's own
    argument for refusing two credentials that disagree (http.request_headers)."""
    async with running_gateway(postgres_dsn) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
            response = await client.post(
                "/v1/chat-messages",
                json=CHAT,
                headers={"Authorization": b"Bearer " + h.key.encode() + tail},
            )
        assert response.status_code == 401, (response.status_code, response.text[:120])


# --- A2: a token minted for another audience was accepted ----------------------------


def _rs256(tmp_path: Path, **auth: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    """An identity provider's key, and a gateway in JWT mode on its public key
    with no audience or issuer configured."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "idp.pem").write_bytes(pem)
    jwt_settings = {"algorithm": "RS256", "public_key_file": str(tmp_path / "idp.pem")}
    return key, {"auth": {"mode": "jwt", **auth, "jwt": jwt_settings}, "plans": PLANS}


async def test_a_token_minted_for_another_api_of_the_same_idp_is_refused(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """With ``auth.jwt.audience`` unset (the default) the gateway turned PyJWT's
    audience check off altogether (``verify_aud: False``): PyJWT's own default
    refuses a token that carries an ``aud`` when the application names none.
    So an access token the same identity provider issued to another API (aud
    names that API) was accepted: that API, or whoever it leaks to, replays a
    user's token here and spends the user's quota and reads their conversations
    with the operator's key (RFC 8725 3.9, token substitution across audiences)."""
    key, settings = _rs256(tmp_path)
    victim = f"erin-{secrets.token_hex(4)}"
    now = int(time.time())
    # What erin's browser sent to the calendar API, and that API now sends here.
    token = jwt.encode(
        {"sub": victim, "aud": "https://calendar.example/api", "iat": now, "exp": now + 600},
        key,
        algorithm="RS256",
    )
    async with running_gateway(postgres_dsn, settings=settings, env=ENV) as h:
        response = await ask(h, {"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, (response.status_code, response.text[:120])


async def test_a_token_of_another_project_on_a_shared_signing_key_is_not_its_subject(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The shape of Firebase (Google's ``securetoken`` keys sign the ID tokens of
    every Firebase project; a project's owner picks any ``uid`` through a custom
    token, and it comes back as the ID token's ``sub``): the gateway keyed with
    the shared key and no audience or issuer configured took a token the
    attacker's own project issued, naming a known user of the operator's
    project, as that user - even with ``unknown_users = "refuse"``."""
    shared, settings = _rs256(tmp_path, unknown_users="refuse")
    victim = f"uid-{secrets.token_hex(8)}"
    now = int(time.time())
    forged = jwt.encode(
        {
            "iss": "https://securetoken.google.com/attackers-project",
            "aud": "attackers-project",
            "sub": victim,
            "iat": now,
            "exp": now + 600,
        },
        shared,  # the provider signs every project's tokens with it
        algorithm="RS256",
    )
    async with running_gateway(postgres_dsn, settings=settings, env=ENV) as h:
        await h.storage.ensure_user(victim, plan="free")  # a user of the operator's app
        assert h.fake is not None
        seen = len(h.fake.requests)
        response = await ask(h, {"Authorization": f"Bearer {forged}"})
        forwarded = [r.json.get("user") for r in h.fake.requests[seen:]]
        assert response.status_code == 401, (response.status_code, forwarded)
