"""Who the upstream is told the user is: JWT, trusted-header and gateway-key identity,
end to end through the HTTP gateway in front of a fake Dify.

One gateway per configuration, shared by the module's tests (starting one costs
more than all its requests): each test uses users of its own and looks only at
the upstream requests it caused.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm

from gateway.auth import header_user_id, valid_user_id
from gateway.config import load_config
from gateway.errors import ConfigError
from tests.fakes.dify import RecordedRequest
from tests.harness import UPSTREAM_KEY, USER, Harness, running_gateway, to_toml

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = {"query": "hi", "inputs": {}, "response_mode": "streaming", "user": "mallory"}
# At least 32 bytes: PyJWT warns about shorter HS256 keys (RFC 7518 section 3.2).
SECRET = "test-hs256-secret-" + "k" * 32
OTHER_SECRET = "another-hs256-secret-" + "x" * 32
SERVICE_KEY = "svc-" + "s" * 40
ISSUER = "https://idp.example"
AUDIENCE = "gateway"
HS256 = {"secret_env": "TEST_JWT_SECRET"}
ENV = {"TEST_JWT_SECRET": SECRET, "TEST_SERVICE_KEY": SERVICE_KEY}
PLANS = {"free": {"queries_per_day": 1}, "pro": {}}


# --- tokens ---------------------------------------------------------------------------


def new_user() -> str:
    return f"user-{secrets.token_hex(4)}"


def claims(sub: str | None, **extra: Any) -> dict[str, Any]:
    """A token's claims, times relative to the wall clock the gateway checks them
    against; a claim given as None is left out."""
    now = int(time.time())
    out = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def ago(seconds: int) -> int:
    return int(time.time()) - seconds


def hence(seconds: int) -> int:
    return int(time.time()) + seconds


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"


def unsigned(payload: dict[str, Any]) -> str:
    """An ``alg: none`` token: header, payload and an empty signature."""
    return _segments({"alg": "none", "typ": "JWT"}, payload) + "."


def forged_hs256(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token MACed with ``key``, built by hand: PyJWT refuses to use a PEM
    public key as an HMAC secret, which is exactly the forgery to try."""
    signing_input = _segments({"alg": "HS256", "typ": "JWT"}, payload)
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


# --- requests -------------------------------------------------------------------------


async def send(
    h: Harness,
    headers: dict[str, str],
    *,
    method: str = "POST",
    path: str = "/v1/chat-messages",
) -> tuple[httpx.Response, list[RecordedRequest]]:
    """One request through the gateway; the answer and the upstream requests it caused."""
    assert h.fake is not None
    seen = len(h.fake.requests)
    async with httpx.AsyncClient(base_url=h.url, timeout=10) as client:
        if method == "POST":
            response = await client.post(path, json=CHAT, headers=headers)
        else:
            response = await client.request(method, path, headers=headers)
    return response, h.fake.requests[seen:]


def assert_unauthorized(response: httpx.Response, pattern: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'
    body = orjson.loads(response.content)
    # Dify's error shape, compact and in this key order, so frontends show it unchanged.
    assert list(body) == ["code", "message", "status"]
    assert response.content == orjson.dumps(body)
    assert body["code"] == "unauthorized" and body["status"] == 401
    assert re.search(pattern, body["message"], re.IGNORECASE), body["message"]
    for secret in (SECRET, OTHER_SECRET, SERVICE_KEY, UPSTREAM_KEY):
        assert secret not in response.text


def assert_forwarded_as(request: RecordedRequest, user: str, *hidden: str) -> None:
    """The upstream saw ``user``, the upstream key, and none of ``hidden``."""
    if request.method == "GET":
        assert request.query["user"] == user
    else:
        assert request.json["user"] == user
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-gateway-user" not in request.headers
    for text in hidden:
        assert all(text not in value for value in request.headers.values())
        assert text.encode() not in request.body
        assert all(text not in value for value in request.query.values())


# --- gateways -------------------------------------------------------------------------


def jwt_settings(**jwt_config: Any) -> dict[str, Any]:
    return {"auth": {"mode": "jwt", "jwt": jwt_config}, "plans": PLANS}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_keys() -> dict[str, ec.EllipticCurvePrivateKey]:
    return {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("k1", "k2")}


@pytest.fixture(scope="module")
def rsa_pem(rsa_key: rsa.RSAPrivateKey) -> bytes:
    return rsa_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _gateway(
    tmp: Path, settings: dict[str, Any], env: dict[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[Harness]:
    return running_gateway(f"sqlite:///{tmp / 'gateway.db'}", settings=settings, env=env)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    """HS256 with issuer, audience and a plan claim; free allows one query a day."""
    settings = jwt_settings(**HS256, issuer=ISSUER, audience=AUDIENCE, plan_claim="plan")
    async with _gateway(tmp_path_factory.mktemp("hs"), settings, ENV) as h:
        yield h


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lenient(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    """HS256 with leeway, no exp required, no issuer, audience or plan claim."""
    settings = jwt_settings(**HS256, leeway=30.0, require_exp=False)
    async with _gateway(tmp_path_factory.mktemp("lenient"), settings, ENV) as h:
        yield h


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def closed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    """HS256, refusing users the gateway has not seen."""
    settings = jwt_settings(**HS256, audience=AUDIENCE)
    settings["auth"]["unknown_users"] = "refuse"
    async with _gateway(tmp_path_factory.mktemp("closed"), settings, ENV) as h:
        yield h


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rs(tmp_path_factory: pytest.TempPathFactory, rsa_pem: bytes) -> AsyncIterator[Harness]:
    tmp = tmp_path_factory.mktemp("rs")
    (tmp / "public.pem").write_bytes(rsa_pem)
    settings = jwt_settings(
        algorithm="RS256", public_key_file=str(tmp / "public.pem"), audience=AUDIENCE
    )
    async with _gateway(tmp, settings) as h:
        yield h


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def es(
    tmp_path_factory: pytest.TempPathFactory, ec_keys: dict[str, ec.EllipticCurvePrivateKey]
) -> AsyncIterator[Harness]:
    tmp = tmp_path_factory.mktemp("es")
    keys = [
        {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid}
        for kid, key in ec_keys.items()
    ]
    (tmp / "jwks.json").write_text(json.dumps({"keys": keys}))
    settings = jwt_settings(algorithm="ES256", jwks_file=str(tmp / "jwks.json"), audience=AUDIENCE)
    async with _gateway(tmp, settings) as h:
        yield h


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trusted(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    settings = {
        "auth": {
            "mode": "trusted_header",
            "trusted_header": {"service_key_env": "TEST_SERVICE_KEY"},
        }
    }
    async with _gateway(tmp_path_factory.mktemp("trusted"), settings, ENV) as h:
        yield h


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api_key(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    async with _gateway(tmp_path_factory.mktemp("api_key"), {}) as h:
        yield h


# --- JWT HS256 ------------------------------------------------------------------------


async def test_a_valid_token_is_forwarded_as_its_subject(hs: Harness) -> None:
    user = new_user()
    token = hs256(claims(user))
    assert await hs.storage.get_user(user) is None

    response, (forwarded,) = await send(hs, bearer(token, **{"X-Gateway-User": "mallory"}))
    assert response.status_code == 200, response.text
    assert_forwarded_as(forwarded, user, token, "mallory")

    created = await hs.storage.get_user(user)
    assert created is not None and created.plan == "free"
    assert await hs.storage.get_user("mallory") is None

    # Non-answer routes carry the user in the query string.
    response, (forwarded,) = await send(
        hs, bearer(token), method="GET", path="/v1/conversations?user=mallory"
    )
    assert response.status_code == 200, response.text
    assert_forwarded_as(forwarded, user, token, "mallory")


HS_REFUSALS = [
    pytest.param(lambda u: bearer(hs256(claims(u, exp=ago(60)))), r"expired", id="expired"),
    pytest.param(
        lambda u: bearer(hs256(claims(u, nbf=hence(300)))), r"not yet valid", id="not-yet-valid"
    ),
    pytest.param(
        lambda u: bearer(hs256(claims(u), OTHER_SECRET)), r"signature", id="bad-signature"
    ),
    pytest.param(
        lambda u: bearer(hs256(claims(u, aud="another-service"))), r"audience", id="wrong-audience"
    ),
    pytest.param(lambda u: bearer(hs256(claims(u, aud=None))), r"'aud'", id="no-audience"),
    pytest.param(
        lambda u: bearer(hs256(claims(u, iss="https://evil.example"))),
        r"issuer",
        id="wrong-issuer",
    ),
    pytest.param(lambda u: bearer(hs256(claims(u, exp=None))), r"'exp'", id="no-exp"),
    pytest.param(lambda u: bearer(hs256(claims(None))), r"'sub'", id="no-sub"),
    pytest.param(lambda u: bearer(hs256(claims(""))), r"'sub'", id="empty-sub"),
    pytest.param(lambda u: bearer(hs256(claims(u + "\u00a0"))), r"'sub'", id="sub-ending-in-nbsp"),
    pytest.param(lambda u: bearer(unsigned(claims(u))), r"algorithm 'none'", id="alg-none"),
    pytest.param(
        lambda u: bearer(jwt.encode(claims(u), SECRET * 2, algorithm="HS512")),
        r"algorithm 'HS512'",
        id="other-hmac-alg",
    ),
    pytest.param(lambda u: bearer("not-a-jwt"), r"malformed", id="malformed"),
    pytest.param(lambda u: bearer("@@@.@@@.@@@"), r"malformed", id="malformed-base64"),
    pytest.param(lambda u: {}, r"missing token", id="no-authorization"),
    pytest.param(lambda u: {"Authorization": "Basic dXNlcjpwdw=="}, r"missing token", id="basic"),
]


@pytest.mark.parametrize(("make_headers", "pattern"), HS_REFUSALS)
async def test_a_bad_token_is_refused_before_the_upstream(
    hs: Harness, make_headers: Callable[[str], dict[str, str]], pattern: str
) -> None:
    user = new_user()
    response, forwarded = await send(hs, make_headers(user))
    assert_unauthorized(response, pattern)
    assert forwarded == []
    assert await hs.storage.get_user(user) is None


@pytest.mark.parametrize(
    "extra",
    [
        # Callables: times are taken when the test runs, not when it is collected.
        pytest.param(lambda: {"exp": ago(5)}, id="expired-within-leeway"),
        pytest.param(lambda: {"nbf": hence(5)}, id="not-before-within-leeway"),
        pytest.param(lambda: {"exp": None}, id="no-exp-when-not-required"),
        pytest.param(lambda: {"iss": "anybody"}, id="iss-not-configured"),
    ],
)
async def test_leeway_and_optional_checks_accept(
    lenient: Harness, extra: Callable[[], dict[str, Any]]
) -> None:
    user = new_user()
    token = hs256(claims(user, **{"aud": None, **extra()}))
    response, (forwarded,) = await send(lenient, bearer(token))
    assert response.status_code == 200, response.text
    assert_forwarded_as(forwarded, user, token)


async def test_a_token_naming_an_audience_is_refused_where_none_is_configured(
    lenient: Harness,
) -> None:
    """Review-auth A2: the audience check was off without auth.jwt.audience, so a
    token the identity provider minted for another API (or another client on
    shared signing keys) was taken as its subject. PyJWT's rule: a token that
    names an audience is refused unless the gateway names it."""
    user = new_user()
    response, forwarded = await send(lenient, bearer(hs256(claims(user, aud="another-api"))))
    assert_unauthorized(response, r"audience")
    assert forwarded == []
    assert await lenient.storage.get_user(user) is None


async def test_exp_is_checked_when_present_even_when_not_required(lenient: Harness) -> None:
    user = new_user()
    response, forwarded = await send(lenient, bearer(hs256(claims(user, aud=None, exp=ago(120)))))
    assert_unauthorized(response, r"expired")
    assert forwarded == []


# --- the plan claim -------------------------------------------------------------------


async def ask_twice(h: Harness, token: str) -> list[int]:
    return [(await send(h, bearer(token)))[0].status_code for _ in range(2)]


async def test_a_plan_claim_puts_a_new_user_on_that_plan(hs: Harness) -> None:
    pro, free = new_user(), new_user()
    # pro has no daily limit; free allows one query.
    assert await ask_twice(hs, hs256(claims(pro, plan="pro"))) == [200, 200]
    assert await ask_twice(hs, hs256(claims(free))) == [200, 429]
    assert (await hs.storage.get_user(pro)).plan == "pro"  # type: ignore[union-attr]
    assert (await hs.storage.get_user(free)).plan == "free"  # type: ignore[union-attr]


async def test_a_plan_claim_moves_a_known_user(hs: Harness) -> None:
    user = new_user()
    await hs.storage.ensure_user(user, plan="free")
    response, _ = await send(hs, bearer(hs256(claims(user, plan="pro"))))
    assert response.status_code == 200, response.text
    assert (await hs.storage.get_user(user)).plan == "pro"  # type: ignore[union-attr]

    # Back to free, at once: today's query already used free's one.
    response, _ = await send(hs, bearer(hs256(claims(user, plan="free"))))
    assert response.status_code == 429 and response.json()["code"] == "daily_query_limit"
    assert (await hs.storage.get_user(user)).plan == "free"  # type: ignore[union-attr]


async def test_a_plan_claim_naming_no_configured_plan_is_ignored(hs: Harness) -> None:
    user = new_user()
    assert await ask_twice(hs, hs256(claims(user, plan="gold"))) == [200, 429]
    assert (await hs.storage.get_user(user)).plan == "free"  # type: ignore[union-attr]


async def test_the_plan_claim_is_ignored_when_not_configured(lenient: Harness) -> None:
    new, known = new_user(), new_user()
    await lenient.storage.ensure_user(known, plan="free")
    for user in (new, known):
        response, _ = await send(lenient, bearer(hs256(claims(user, aud=None, plan="pro"))))
        assert response.status_code == 200, response.text
        assert (await lenient.storage.get_user(user)).plan == "free"  # type: ignore[union-attr]


# --- unknown users --------------------------------------------------------------------


async def test_unknown_users_can_be_refused(closed: Harness) -> None:
    user = new_user()
    response, nothing = await send(closed, bearer(hs256(claims(user))))
    assert_unauthorized(response, r"^Unknown user\.$")
    assert nothing == []
    assert await closed.storage.get_user(user) is None

    await closed.storage.ensure_user(user, plan="pro")
    token = hs256(claims(user))
    response, (forwarded,) = await send(closed, bearer(token))
    assert response.status_code == 200, response.text
    assert_forwarded_as(forwarded, user, token)
    assert (await closed.storage.get_user(user)).plan == "pro"  # type: ignore[union-attr]


# --- RS256 and ES256 ------------------------------------------------------------------


async def test_rs256_with_a_public_key_file(rs: Harness, rsa_key: rsa.RSAPrivateKey) -> None:
    user = new_user()
    token = jwt.encode(claims(user), rsa_key, algorithm="RS256")
    response, (forwarded,) = await send(rs, bearer(token))
    assert response.status_code == 200, response.text
    assert_forwarded_as(forwarded, user, token)
    assert (await rs.storage.get_user(user)).plan == "free"  # type: ignore[union-attr]


async def test_rs256_refuses_hs256_keyed_with_the_public_key(rs: Harness, rsa_pem: bytes) -> None:
    # The forgery is well formed: the same construction keyed with a real secret
    # is a valid HS256 token.
    check = forged_hs256(claims("x"), SECRET.encode())
    assert jwt.decode(check, SECRET, algorithms=["HS256"], audience=AUDIENCE)["sub"] == "x"

    user = new_user()
    response, forwarded = await send(rs, bearer(forged_hs256(claims(user), rsa_pem)))
    assert_unauthorized(response, r"algorithm 'HS256'")
    assert forwarded == []
    assert await rs.storage.get_user(user) is None


async def test_rs256_refuses_a_token_of_another_key(rs: Harness) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    response, forwarded = await send(
        rs, bearer(jwt.encode(claims(new_user()), other, algorithm="RS256"))
    )
    assert_unauthorized(response, r"signature")
    assert forwarded == []


async def test_es256_with_a_jwks_file_picks_the_key_by_kid(
    es: Harness, ec_keys: dict[str, ec.EllipticCurvePrivateKey]
) -> None:
    for kid, key in ec_keys.items():
        user = new_user()
        token = jwt.encode(claims(user), key, algorithm="ES256", headers={"kid": kid})
        response, (forwarded,) = await send(es, bearer(token))
        assert response.status_code == 200, response.text
        assert_forwarded_as(forwarded, user, token)


@pytest.mark.parametrize(
    ("kid", "pattern"),
    [
        pytest.param("k3", r"key id", id="unknown-kid"),
        pytest.param(None, r"key id", id="no-kid-among-several-keys"),
        pytest.param("k2", r"signature", id="kid-of-another-key"),
    ],
)
async def test_es256_refuses_a_token_whose_kid_does_not_name_its_key(
    es: Harness, ec_keys: dict[str, ec.EllipticCurvePrivateKey], kid: str | None, pattern: str
) -> None:
    user = new_user()
    headers = {"kid": kid} if kid else None
    token = jwt.encode(claims(user), ec_keys["k1"], algorithm="ES256", headers=headers)
    response, forwarded = await send(es, bearer(token))
    assert_unauthorized(response, pattern)
    assert forwarded == []
    assert await es.storage.get_user(user) is None


async def test_es256_refuses_other_algorithms(es: Harness, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(new_user()), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    response, forwarded = await send(es, bearer(token))
    assert_unauthorized(response, r"algorithm 'RS256'")
    assert forwarded == []


@pytest.mark.parametrize(
    ("algorithm", "key", "text"),
    [
        pytest.param("RS256", "public_key_file", "not a key\n", id="pem"),
        pytest.param("ES256", "jwks_file", '{"keys": []}', id="jwks"),
    ],
)
async def test_a_key_file_that_holds_no_key_is_refused_at_load(
    tmp_path: Path, algorithm: str, key: str, text: str
) -> None:
    (tmp_path / "key").write_text(text)
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(
        to_toml({"auth": {"mode": "jwt", "jwt": {"algorithm": algorithm, key: "key"}}})
    )
    with pytest.raises(ConfigError, match=rf"^auth\.jwt\.{key}: "):
        load_config(config_file, env={})


# --- trusted header -------------------------------------------------------------------


async def test_trusted_header_with_the_service_key_names_the_user(trusted: Harness) -> None:
    response, (forwarded,) = await send(trusted, bearer(SERVICE_KEY, **{"X-Gateway-User": "bob"}))
    assert response.status_code == 200, response.text
    assert_forwarded_as(forwarded, "bob", SERVICE_KEY)
    assert (await trusted.storage.get_user("bob")).plan == "free"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("make_headers", "pattern"),
    [
        pytest.param(lambda h, u: {"X-Gateway-User": u}, r"missing service key", id="no-key"),
        pytest.param(
            lambda h, u: bearer("svc-wrong", **{"X-Gateway-User": u}),
            r"invalid service key",
            id="wrong-key",
        ),
        pytest.param(
            lambda h, u: bearer(h.key, **{"X-Gateway-User": u}),
            r"invalid service key",
            id="a-gateway-key",
        ),
        pytest.param(
            lambda h, u: bearer(SERVICE_KEY), r"missing X-Gateway-User header", id="no-header"
        ),
        pytest.param(
            lambda h, u: bearer(SERVICE_KEY, **{"X-Gateway-User": ""}),
            r"missing X-Gateway-User header",
            id="blank-header",
        ),
    ],
)
async def test_trusted_header_refusals(
    trusted: Harness, make_headers: Callable[[Harness, str], dict[str, str]], pattern: str
) -> None:
    user = new_user()
    response, forwarded = await send(trusted, make_headers(trusted, user))
    assert_unauthorized(response, pattern)
    assert forwarded == []
    assert await trusted.storage.get_user(user) is None


@pytest.mark.parametrize("path", ["/v1/chat-messages", "/v1/usage"])
async def test_a_request_naming_two_users_is_refused_unsent(trusted: Harness, path: str) -> None:
    """Attack: the service key with two X-Gateway-User headers. A proxy, log or
    rate limiter in front of the gateway may judge the request by the first user;
    the gateway read the last one and charged it. Refused, nothing forwarded, no
    user made, on the proxy and on /v1/usage alike."""
    first, second = new_user(), new_user()
    headers = [
        ("Authorization", f"Bearer {SERVICE_KEY}"),
        ("X-Gateway-User", first),
        ("X-Gateway-User", second),
    ]
    assert trusted.fake is not None
    seen = len(trusted.fake.requests)
    async with httpx.AsyncClient(base_url=trusted.url, timeout=10) as client:
        if path == "/v1/usage":
            response = await client.get(path, headers=headers)
        else:
            response = await client.post(path, json=CHAT, headers=headers)
    assert response.status_code == 400, response.text
    assert "More than one x-gateway-user header" in response.text
    assert trusted.fake.requests[seen:] == []
    assert await trusted.storage.get_user(first) is None
    assert await trusted.storage.get_user(second) is None


async def test_usage_shows_the_non_ascii_user_the_proxy_charged(trusted: Harness) -> None:
    """The attack: ``dũng`` asks /v1/usage, which read the header as latin-1 text and
    re-encoded it, so it answered for (and created) ``dÅ©ng``. Both entry points must
    name the same user from the same bytes."""
    user = f"dũng-{secrets.token_hex(3)}"
    phantom = user.encode().decode("latin-1")  # what the second decoding made of it
    assert phantom != user
    headers = {"Authorization": f"Bearer {SERVICE_KEY}", "X-Gateway-User": user.encode()}
    assert trusted.fake is not None
    seen = len(trusted.fake.requests)
    async with httpx.AsyncClient(base_url=trusted.url, timeout=10) as client:
        charged = await client.post("/v1/chat-messages", json=CHAT, headers=headers)
        assert charged.status_code == 200, charged.text
        (forwarded,) = trusted.fake.requests[seen:]
        assert_forwarded_as(forwarded, user, SERVICE_KEY)
        usage = await client.get("/v1/usage", headers=headers)
        daily = await client.get("/v1/usage/daily", params={"days": 1}, headers=headers)
    assert usage.status_code == 200, usage.text
    assert usage.json()["user"] == user
    assert usage.json()["today"]["queries"] == 1  # the query the proxy admitted
    assert daily.status_code == 200 and daily.json()["user"] == user
    assert daily.json()["data"][-1]["queries"] == 1
    assert await trusted.storage.get_user(user) is not None
    assert await trusted.storage.get_user(phantom) is None  # no phantom user row


@pytest.mark.parametrize("path", ["/v1/chat-messages", "/v1/usage"])
async def test_a_user_header_that_is_not_utf8_is_refused_everywhere(
    trusted: Harness, path: str
) -> None:
    """Replacing bad bytes would make ``caf\\xe9`` and ``caf\\xe8`` one user: refused."""
    headers = {"Authorization": f"Bearer {SERVICE_KEY}", "X-Gateway-User": b"caf\xe9"}
    async with httpx.AsyncClient(base_url=trusted.url, timeout=10) as client:
        if path == "/v1/usage":
            response = await client.get(path, headers=headers)
        else:
            response = await client.post(path, json=CHAT, headers=headers)
    assert_unauthorized(response, r"X-Gateway-User header: the user id must be UTF-8")
    assert await trusted.storage.get_user("caf\ufffd") is None


@pytest.mark.parametrize(
    "disguise",
    [
        pytest.param(lambda user: user + "\u00a0", id="trailing-no-break-space"),
        pytest.param(lambda user: "\u3000" + user, id="leading-ideographic-space"),
        pytest.param(lambda user: user + "\u2028", id="trailing-line-separator"),
        pytest.param(lambda user: user + "\u0085", id="trailing-NEL"),
        pytest.param(lambda user: user[:2] + "\u0085" + user[2:], id="C1-control-inside"),
        # Invisible, not whitespace to Python (review 4, R4-3): JavaScript's trim
        # takes U+FEFF, and a backend that strips zero-widths takes the others.
        pytest.param(lambda user: user + "\ufeff", id="trailing-BOM"),
        pytest.param(lambda user: "\ufeff" + user, id="leading-BOM"),
        pytest.param(lambda user: user + "\u200b", id="trailing-zero-width-space"),
        pytest.param(lambda user: user + "\u2060", id="trailing-word-joiner"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat-messages", "/v1/usage", "/v1/conversations"])
async def test_a_user_id_with_unicode_whitespace_at_an_end_is_refused_not_trimmed(
    trusted: Harness, disguise: Callable[[str], str], path: str
) -> None:
    """Attack (review 3, #1): ``alice\\xa0`` is another account at the operator's
    backend (which trims only ASCII), sent with the service key. `str.strip` made
    it ``alice``: the attacker read alice's usage and conversations and was charged
    to her. Refused, nothing forwarded, no user made."""
    victim = new_user()
    attacker = disguise(victim)
    headers = {"Authorization": f"Bearer {SERVICE_KEY}", "X-Gateway-User": attacker.encode()}
    method = "POST" if path == "/v1/chat-messages" else "GET"
    response, forwarded = await send(trusted, headers, method=method, path=path)
    assert_unauthorized(response, r"Invalid X-Gateway-User header\.")
    assert forwarded == []
    assert await trusted.storage.get_user(victim) is None
    assert await trusted.storage.get_user(attacker) is None


async def test_only_the_spaces_and_tabs_http_allows_around_a_user_header_are_trimmed() -> None:
    """(httpx will not send them; a server's parser usually trims them first.)"""
    assert header_user_id(b" \talice\t ") == "alice"
    assert header_user_id("alice\u00a0".encode()) == "alice\u00a0"  # refused after
    assert not valid_user_id("alice\u00a0") and not valid_user_id("\u3000alice")
    assert valid_user_id("alice\u00a0smith") and valid_user_id("d\u0169ng")
    assert valid_user_id("al\u200bice")  # inside, it is as distinct everywhere
    # A subdivision flag ends with a format character nothing trims, CANCEL TAG
    # (review 5, R5-8): an id ending with one stays valid.
    scotland = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
    assert valid_user_id("hamish" + scotland)


async def test_api_key_mode_ignores_and_drops_the_user_header(api_key: Harness) -> None:
    response, (forwarded,) = await send(api_key, api_key.auth(**{"X-Gateway-User": "mallory"}))
    assert response.status_code == 200, response.text
    assert_forwarded_as(forwarded, USER, api_key.key, "mallory")
    assert await api_key.storage.get_user("mallory") is None
