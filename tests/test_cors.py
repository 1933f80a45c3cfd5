"""CORS for pages on other origins (issue 25; gateway/cors.py, docs/widget.md).

The policy by tables of cases against the middleware alone; then the gateway over
real sockets (preflights, refusals, upstream headers, reload); then a real
Chromium on a page of another origin, reading what a chat page needs to read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_config
from gateway.cors import EXPOSED, Cors
from gateway.errors import ConfigError
from tests.browser import IN_BROWSER, require_chromium, site
from tests.fakes.dify import FakeDify
from tests.harness import UPSTREAM_KEY, running_gateway
from tests.servers import read_body

APP = "https://app.example.com"
OTHER = "https://evil.example"


def cors(**settings: Any) -> Any:
    return parse_config({"cors": settings}, env={}).cors


# --- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("https://app.example.com/", "https://app.example.com"),
        ("HTTPS://App.Example.COM", "https://app.example.com"),  # as browsers serialise it
        ("https://app.example.com:443", "https://app.example.com"),  # the default port
        ("http://localhost:80", "http://localhost"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("https://app.example.com:8443", "https://app.example.com:8443"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("*", "*"),
    ],
)
def test_allowed_origins_are_stored_as_browsers_send_them(given: str, stored: str) -> None:
    assert cors(allow_origins=[given]).allow_origins == (stored,)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"allow_origins": ["app.example.com"]}, "cors.allow_origins[0]: 'app.example.com'"),
        ({"allow_origins": ["ftp://app.example.com"]}, "expected http:// or https://"),
        ({"allow_origins": ["https://app.example.com/chat"]}, "nothing more"),
        ({"allow_origins": ["https://app.example.com?x=1"]}, "nothing more"),
        ({"allow_origins": ["https://user@app.example.com"]}, "nothing more"),
        ({"allow_origins": ["https://*.example.com"]}, "patterns are not supported"),
        ({"allow_origins": ["null"]}, '"null" cannot be allowed'),
        ({"allow_origins": [" https://app.example.com"]}, "is not an origin"),
        ({"allow_origins": ["https://app.example.com:99999"]}, "invalid port"),
        ({"allow_origins": ["*"], "allow_credentials": True}, '"*" cannot be used with'),
        ({"allow_headers": ["*"]}, "cors.allow_headers[0]: expected a header name"),
        ({"allow_headers": ["X Bad"]}, "cors.allow_headers[0]"),
        ({"max_age": -1}, "cors.max_age: expected a number >= 0"),
        ({"allow_origin": [APP]}, "cors.allow_origin: unknown key (did you mean 'allow_origins'?"),
    ],
)
def test_a_bad_cors_setting_refuses_to_start(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cors(**settings)
    assert message in str(info.value)


# --- the middleware, by tables ---------------------------------------------------------

UPSTREAM_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-credentials", b"true"),
    (b"access-control-expose-headers", b"X-Dify-Secret"),
]


class Inner:
    """The app behind the middleware: answers with the given headers, records calls."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": list(self.headers)})
        await send({"type": "http.response.body", "body": b"{}"})


async def call(
    settings: dict[str, Any],
    *,
    method: str = "GET",
    path: str = "/v1/usage",
    headers: list[tuple[bytes, bytes]] | None = None,
    answer: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, list[tuple[bytes, bytes]], int]:
    """Status, response headers and how often the inner app was called."""
    config = cors(**settings)
    inner = Inner(answer if answer is not None else [(b"content-type", b"application/json")])
    middleware = Cors(
        inner, config=lambda: config, error_body=lambda s, c, m: f'{{"code":"{c}"}}'.encode()
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or []}
    await middleware(scope, receive, send)
    start = sent[0]
    return start["status"], start["headers"], inner.calls


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def origin(value: str) -> tuple[bytes, bytes]:
    return (b"origin", value.encode())


PREFLIGHT = [(b"access-control-request-method", b"POST")]
ALLOWED = {"allow_origins": [APP]}


@pytest.mark.parametrize(
    ("sent", "allowed"),
    [
        (APP, True),
        ("http://app.example.com", False),  # another scheme
        ("https://app.example.com:8443", False),  # another port
        ("https://app.example.com.evil.example", False),  # the allowed one as a prefix
        ("https://evil-app.example.com", False),
        ("https://evilapp.example.com", False),  # the allowed one as a suffix
        ("https://example.com", False),  # a parent domain
        ("https://sub.app.example.com", False),  # a subdomain
        ("https://app.example.co", False),  # a prefix of the allowed one
        ("https://app.example.com/", False),  # browsers never send a path
        ("HTTPS://APP.EXAMPLE.COM", False),  # nor capitals: compared exactly
        ("null", False),
        ("", False),
    ],
)
async def test_origins_are_compared_exactly(sent: str, allowed: bool) -> None:
    status, headers, _ = await call(ALLOWED, headers=[origin(sent)])
    assert status == 200
    assert values(headers, b"access-control-allow-origin") == ([sent.encode()] if allowed else [])
    # A preflight from it is answered by the gateway alone, yes or no.
    status, headers, calls = await call(
        ALLOWED, method="OPTIONS", headers=[origin(sent), *PREFLIGHT]
    )
    assert (status, calls) == ((204, 0) if allowed else (403, 0))
    assert values(headers, b"access-control-allow-origin") == ([sent.encode()] if allowed else [])


async def test_an_allowed_origin_reads_the_answer_and_its_rate_limit_headers() -> None:
    status, headers, calls = await call(ALLOWED, headers=[origin(APP)])
    assert (status, calls) == (200, 1)
    assert values(headers, b"access-control-allow-origin") == [APP.encode()]
    (exposed,) = values(headers, b"access-control-expose-headers")
    assert exposed.decode().split(", ") == list(EXPOSED)
    for name in ("X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After", "X-Request-Id"):
        assert name in exposed.decode()
    assert values(headers, b"vary") == [b"Origin"]
    assert values(headers, b"access-control-allow-credentials") == []  # off by default


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (APP, [APP.encode()]),  # ours replaces the upstream's "*": one header, not two
        (OTHER, []),  # the upstream would have allowed it; the operator's policy did not
        (None, []),  # not a CORS request
    ],
)
async def test_the_upstream_cors_headers_are_replaced(
    sent: str | None, expected: list[bytes]
) -> None:
    answer = [(b"content-type", b"text/event-stream"), *UPSTREAM_CORS]
    _, headers, _ = await call(
        ALLOWED, path="/v1/chat-messages", headers=[origin(sent)] if sent else [], answer=answer
    )
    assert values(headers, b"access-control-allow-origin") == expected
    assert values(headers, b"access-control-allow-credentials") == []
    assert b"X-Dify-Secret" not in b"".join(values(headers, b"access-control-expose-headers"))
    assert values(headers, b"content-type") == [b"text/event-stream"]


async def test_without_cors_settings_nothing_changes() -> None:
    answer = [(b"content-type", b"application/json"), *UPSTREAM_CORS]
    status, headers, calls = await call(
        {}, path="/v1/chat-messages", headers=[origin(APP)], answer=answer
    )
    assert headers == answer and calls == 1
    # Preflights go on to the proxy, which forwards them to the upstream (docs/proxy.md).
    status, headers, calls = await call(
        {}, method="OPTIONS", path="/v1/chat-messages", headers=[origin(APP), *PREFLIGHT]
    )
    assert (status, calls) == (200, 1) and values(headers, b"access-control-allow-origin") == []


async def test_a_preflight_is_answered_with_the_policy() -> None:
    settings = {**ALLOWED, "max_age": 120, "allow_headers": ["Authorization", "Content-Type"]}
    status, headers, calls = await call(
        settings, method="OPTIONS", headers=[origin(APP), *PREFLIGHT]
    )
    assert (status, calls) == (204, 0)
    assert dict(headers) == {
        b"access-control-allow-origin": APP.encode(),
        b"access-control-allow-methods": b"GET, POST, PUT, PATCH, DELETE",
        b"access-control-allow-headers": b"Authorization, Content-Type",
        b"access-control-max-age": b"120",
        b"vary": b"Origin",
        b"content-length": b"0",
    }


async def test_a_refused_preflight_says_why_to_a_person_but_not_to_the_page() -> None:
    status, headers, calls = await call(
        ALLOWED, method="OPTIONS", headers=[origin(OTHER), *PREFLIGHT]
    )
    assert (status, calls) == (403, 0)
    assert values(headers, b"access-control-allow-origin") == []
    assert values(headers, b"content-type") == [b"application/json"]


@pytest.mark.parametrize(
    ("method", "headers", "forwarded"),
    [
        ("OPTIONS", [origin(APP)], True),  # no Access-Control-Request-Method: not a preflight
        ("OPTIONS", PREFLIGHT, True),  # no Origin: not from a browser
        ("GET", [origin(APP), *PREFLIGHT], True),  # a preflight is an OPTIONS
        ("OPTIONS", [origin(APP), origin(APP), *PREFLIGHT], False),  # two Origins: refused
    ],
)
async def test_only_real_preflights_are_answered_here(
    method: str, headers: list[tuple[bytes, bytes]], forwarded: bool
) -> None:
    status, _, calls = await call(ALLOWED, method=method, headers=headers)
    assert calls == int(forwarded)
    if not forwarded:
        assert status == 403


@pytest.mark.parametrize(
    ("path", "covered"),
    [
        ("/v1/usage", True),
        ("/v1/usage/daily", True),
        ("/v1/chat-messages", True),
        ("/widget.js", True),
        ("/admin/users", False),  # for servers, not pages
        ("/dashboard/", False),  # same-origin
        ("/metrics", False),
        ("/healthz", False),
        ("/v1", False),
    ],
)
async def test_cors_covers_the_api_and_the_widget_only(path: str, covered: bool) -> None:
    _, headers, _ = await call(ALLOWED, path=path, headers=[origin(APP)])
    assert bool(values(headers, b"access-control-allow-origin")) is covered
    status, _, calls = await call(
        ALLOWED, method="OPTIONS", path=path, headers=[origin(APP), *PREFLIGHT]
    )
    assert calls == int(not covered)


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        ([], [b"Origin"]),
        ([(b"vary", b"Accept-Encoding")], [b"Accept-Encoding, Origin"]),
        ([(b"Vary", b"origin")], [b"origin"]),
        ([(b"vary", b"*")], [b"*"]),
    ],
)
async def test_vary_names_origin_once(
    vary: list[tuple[bytes, bytes]], expected: list[bytes]
) -> None:
    _, headers, _ = await call(ALLOWED, headers=[origin(OTHER)], answer=vary)
    assert values(headers, b"vary") == expected


async def test_a_wildcard_allows_every_origin_without_credentials() -> None:
    _, headers, _ = await call({"allow_origins": ["*"]}, headers=[origin(OTHER)])
    assert values(headers, b"access-control-allow-origin") == [b"*"]
    assert values(headers, b"vary") == []  # the same answer for every origin


async def test_credentials_when_asked_for() -> None:
    settings = {**ALLOWED, "allow_credentials": True}
    _, headers, _ = await call(settings, headers=[origin(APP)])
    assert values(headers, b"access-control-allow-credentials") == [b"true"]
    assert values(headers, b"access-control-allow-origin") == [APP.encode()]
    _, headers, _ = await call(settings, method="OPTIONS", headers=[origin(APP), *PREFLIGHT])
    assert values(headers, b"access-control-allow-credentials") == [b"true"]


# --- the gateway over real sockets ---------------------------------------------------

ONE_A_DAY = {"plans": {"free": {"queries_per_day": 1}}, "cors": {"allow_origins": [APP]}}
CHAT = {"query": "hi", "inputs": {}, "response_mode": "streaming", "user": "x"}


class CorsUpstream:
    """An upstream with Dify's permissive CORS (flask-cors echoing any origin); records calls."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await read_body(receive)
        self.methods.append(scope["method"])
        echoed = dict(scope["headers"]).get(b"origin", b"*")
        headers = [
            (b"content-type", b"application/json"),
            (b"access-control-allow-origin", echoed),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"vary", b"Origin"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


async def test_the_usage_api_answers_a_preflight_and_a_cross_origin_call(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url, settings=ONE_A_DAY) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            for path in ("/v1/usage", "/v1/usage/daily"):
                preflight = await client.options(
                    path,
                    headers={
                        "Origin": APP,
                        "Access-Control-Request-Method": "GET",
                        "Access-Control-Request-Headers": "authorization",
                    },
                )
                assert preflight.status_code == 204  # today: 405
                assert preflight.headers["access-control-allow-origin"] == APP
                assert "Authorization" in preflight.headers["access-control-allow-headers"]
                usage = await client.get(path, headers=h.auth(Origin=APP))
                assert usage.status_code == 200
                assert usage.headers["access-control-allow-origin"] == APP
            refused = await client.get("/v1/usage", headers={"Origin": APP})
            assert refused.status_code == 401
            assert refused.headers["access-control-allow-origin"] == APP


async def test_a_refusal_at_the_limit_can_be_read_by_an_allowed_page(sqlite_url: str) -> None:
    async with running_gateway(sqlite_url, settings=ONE_A_DAY) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            first = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth(Origin=APP))
            assert first.status_code == 200
            assert first.headers.get_list("access-control-allow-origin") == [APP]
            refused = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth(Origin=APP))
            await h.probes.wait_finished(2)
    assert refused.status_code == 429
    assert refused.headers.get_list("access-control-allow-origin") == [APP]
    exposed = refused.headers["access-control-expose-headers"]
    for name in ("X-RateLimit-Remaining", "Retry-After", "X-Request-Id"):
        assert name in exposed and refused.headers[name]
    assert refused.headers["vary"] == "Origin"


async def test_the_gateway_answers_proxied_preflights_itself(sqlite_url: str) -> None:
    upstream = CorsUpstream()
    async with running_gateway(sqlite_url, upstream=upstream, settings=ONE_A_DAY) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            asked = {"Access-Control-Request-Method": "POST"}
            allowed = await client.options("/v1/chat-messages", headers={"Origin": APP, **asked})
            refused = await client.options("/v1/chat-messages", headers={"Origin": OTHER, **asked})
            # Answers: the gateway's one Access-Control-Allow-Origin, or none.
            mine = await client.get("/v1/parameters", headers=h.auth(Origin=APP))
            theirs = await client.get("/v1/parameters", headers=h.auth(Origin=OTHER))
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == APP
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    assert upstream.methods == ["GET", "GET"]  # no OPTIONS reached it
    assert mine.headers.get_list("access-control-allow-origin") == [APP]
    assert "GET, POST, OPTIONS" not in mine.headers.get("access-control-allow-methods", "")
    assert theirs.headers.get_list("access-control-allow-origin") == []
    assert mine.headers.get_list("vary") == theirs.headers.get_list("vary") == ["Origin"]


async def test_without_cors_the_upstream_policy_stands(sqlite_url: str) -> None:
    upstream = CorsUpstream()
    async with running_gateway(sqlite_url, upstream=upstream) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            asked = {"Origin": OTHER, "Access-Control-Request-Method": "POST"}
            preflight = await client.options("/v1/chat-messages", headers=asked)
            usage = await client.options("/v1/usage", headers=asked)
    assert preflight.status_code == 200 and upstream.methods == ["OPTIONS"]
    assert preflight.headers["access-control-allow-origin"] == OTHER  # the upstream's
    assert usage.status_code == 405  # the gateway's own routes stay closed to other origins


async def test_the_request_limits_refusals_carry_cors_too(sqlite_url: str) -> None:
    settings = {**ONE_A_DAY, "server": {"max_headers": 5}}
    async with running_gateway(sqlite_url, settings=settings) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            extra = {f"X-Pad-{i}": "x" for i in range(6)}
            refused = await client.get("/v1/usage", headers=h.auth(Origin=APP, **extra))
    assert refused.status_code == 431
    assert refused.headers["access-control-allow-origin"] == APP


async def test_a_reload_turns_cors_on(tmp_path: Path, sqlite_url: str) -> None:
    path = tmp_path / "gateway.toml"
    async with running_gateway(sqlite_url, config_file=path) as h:
        async with httpx.AsyncClient(base_url=h.url) as client:
            before = await client.get("/v1/usage", headers=h.auth(Origin=APP))
            with path.open("a") as file:
                file.write(f'\n[cors]\nallow_origins = ["{APP}"]\n')
            assert await h.gateway.reload()
            after = await client.get("/v1/usage", headers=h.auth(Origin=APP))
    assert "access-control-allow-origin" not in before.headers
    assert after.headers["access-control-allow-origin"] == APP


# --- in a real browser -----------------------------------------------------------------

PAGE_SCRIPT = """
async ({gateway, key}) => {
  const chat = () => fetch(gateway + "/v1/chat-messages", {
    method: "POST",
    headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
    body: JSON.stringify({query: "hi", inputs: {}, response_mode: "streaming", user: "x"}),
  });
  const out = {};
  try {
    const answered = await chat();
    out.answered = {status: answered.status, remaining: answered.headers.get("X-RateLimit-Remaining"),
                    body: await answered.text()};
    await chat();
    const refused = await chat();
    out.refused = {status: refused.status, body: await refused.json(),
                   remaining: refused.headers.get("X-RateLimit-Remaining"),
                   resource: refused.headers.get("X-RateLimit-Resource"),
                   retryAfter: refused.headers.get("Retry-After"),
                   requestId: refused.headers.get("X-Request-Id")};
  } catch (error) {
    out.chatError = String(error);
  }
  try {
    const usage = await fetch(gateway + "/v1/usage", {headers: {"Authorization": "Bearer " + key}});
    out.usage = {status: usage.status, body: await usage.json()};
  } catch (error) {
    out.usageError = String(error);
  }
  return out;
}
"""


@IN_BROWSER
async def test_a_page_on_another_origin_in_chromium(sqlite_url: str, browser: Any) -> None:
    """A chat page on an allowed origin streams, reads the refusal at its limit and the
    remaining count, and reads /v1/usage; a page on another origin fails as browsers
    make it fail, and nothing of its requests reaches the upstream."""
    require_chromium()
    fake = FakeDify(api_key=UPSTREAM_KEY)
    async with site() as allowed, site() as other:
        settings = {
            "plans": {"free": {"queries_per_day": 2}},
            "cors": {"allow_origins": [allowed.url]},
        }
        async with running_gateway(sqlite_url, fake=fake, settings=settings) as h:
            page = await browser.new_page()
            await page.goto(allowed.url + "/")
            seen = await page.evaluate(PAGE_SCRIPT, {"gateway": h.url, "key": h.key})
            # Today: {"chatError": "TypeError: Failed to fetch", "usageError": ...}.
            assert "chatError" not in seen and "usageError" not in seen, seen
            await h.probes.wait_finished(3)
            answers = len(fake.requests)

            stranger = await browser.new_page()
            await stranger.goto(other.url + "/")
            failed = await stranger.evaluate(PAGE_SCRIPT, {"gateway": h.url, "key": h.key})
            events = await h.events()

    assert seen["answered"]["status"] == 200
    assert seen["answered"]["remaining"] == "1"
    assert "message_end" in seen["answered"]["body"]  # streamed through
    refused = seen["refused"]
    assert refused["status"] == 429
    assert refused["body"]["code"] == "daily_query_limit"
    assert "2 questions" in refused["body"]["message"]  # the message a page can show
    assert refused["remaining"] == "0" and refused["resource"] == "queries_per_day"
    assert int(refused["retryAfter"]) > 0 and refused["requestId"]
    assert seen["usage"]["status"] == 200
    assert seen["usage"]["body"]["limits"]["queries_per_day"]["remaining"] == 0

    assert failed == {
        "chatError": "TypeError: Failed to fetch",
        "usageError": "TypeError: Failed to fetch",
    }
    assert len(fake.requests) == answers == 2  # the stranger's requests never left the browser
    assert len(events) == 2
