"""CORS for browser frontends on other origins: the operator's ``[cors]`` policy.

A chat page on another origin calls /v1 with a bearer token. Without CORS
headers on the gateway's own answers the browser hides them from the page: a
refusal at a limit becomes ``TypeError: Failed to fetch``, the ``X-RateLimit-*``
headers cannot be read, and /v1/usage cannot be called at all (docs/widget.md,
issue 25). With ``cors.allow_origins`` set, this middleware owns CORS for the
browser-facing surface (/v1 and /widget.js):

- preflights (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
  are answered here, for the gateway's routes and the proxied ones alike: 204 for
  an allowed origin, 403 otherwise. They are not forwarded, so one policy, the
  operator's, decides.
- every other answer loses the upstream's ``Access-Control-*`` headers; for an
  allowed origin the gateway's are put in their place (one
  ``Access-Control-Allow-Origin`` per response, never two), with
  ``Access-Control-Expose-Headers`` naming the headers a page needs to read.
- origins are compared exactly as browsers serialise them (scheme, host, port):
  no patterns, no substrings (the classic mistake is ``endswith``).

Without ``cors.allow_origins`` it does nothing: proxied preflights and the
upstream's CORS headers pass as before (docs/proxy.md).

The policy is pure (`Policy`, table-tested in tests/test_cors.py); `Cors` is the
plain ASGI callable around the app. It reads the configuration on every request,
so a reload takes effect at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from gateway.error_response import ErrorBody, render
from gateway.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.config import CorsConfig

Headers = list[tuple[bytes, bytes]]

# Headers a page must be able to read that are not CORS-safelisted (Fetch spec,
# "CORS-safelisted response-header name"). Each is named: "*" is not honoured for
# requests with credentials, and the names are what the gateway sends.
EXPOSED: Final = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Used",
    "X-RateLimit-Reset",
    "X-RateLimit-Resource",
    "Retry-After",
    "X-Request-Id",
)
# What a preflight may ask for: the methods Dify's service API uses.
METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def covered(path: str) -> bool:
    """The browser-facing surface: the API (proxied and the gateway's own usage
    endpoints) and the widget. The admin API, the dashboard and /metrics are not
    for pages on other origins and get no CORS headers."""
    return path.startswith("/v1/") or path == "/widget.js"


def normalise_origin(text: str) -> str:
    """An origin from the configuration as a browser serialises it in ``Origin``
    (lower-case scheme and host, no default port, no path), or ValueError."""
    if text == "*":
        return text
    if text.strip() != text or not text:
        raise ValueError(f"{text!r} is not an origin")
    if text == "null":
        # Sandboxed frames and file: pages all send "null": allowing it allows them all.
        raise ValueError('"null" cannot be allowed (every sandboxed page sends it)')
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{text!r}: expected http:// or https:// and a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{text!r}: an origin is a scheme, a host and a port, nothing more")
    host = parts.hostname or ""
    if not host or "*" in host:
        raise ValueError(f"{text!r}: expected one exact host (patterns are not supported)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r}: invalid port") from None
    if ":" in host:  # IPv6, written in brackets
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True, slots=True)
class Policy:
    """``[cors]`` compiled to what goes on the wire."""

    origins: frozenset[bytes]
    wildcard: bool
    credentials: bool
    allow_headers: bytes
    max_age: bytes

    @classmethod
    def of(cls, config: CorsConfig) -> Policy:
        return cls(
            origins=frozenset(o.encode() for o in config.allow_origins if o != "*"),
            wildcard="*" in config.allow_origins,
            credentials=config.allow_credentials,
            allow_headers=", ".join(config.allow_headers).encode(),
            max_age=str(config.max_age).encode(),
        )

    @property
    def enabled(self) -> bool:
        return self.wildcard or bool(self.origins)

    def allows(self, origin: bytes | None) -> bool:
        return origin is not None and (self.wildcard or origin in self.origins)

    def _allow_origin(self, origin: bytes) -> Headers:
        # With a wildcard (never with credentials: refused at load) the answer is
        # the same for every origin; otherwise it names the origin and varies by it.
        headers = [(b"access-control-allow-origin", b"*" if self.wildcard else origin)]
        if self.credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def preflight(self, origin: bytes | None) -> tuple[int, Headers]:
        """The status and CORS headers of the answer to a preflight."""
        if not self.allows(origin):
            return 403, self._vary([])
        assert origin is not None
        headers = self._allow_origin(origin)
        headers += [
            (b"access-control-allow-methods", _METHODS),
            (b"access-control-allow-headers", self.allow_headers),
            (b"access-control-max-age", self.max_age),
        ]
        return 204, self._vary(headers)

    def response(self, origin: bytes | None, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
        """An answer's headers: the upstream's CORS headers out, the gateway's in
        (for an allowed origin), and ``Vary: Origin`` for caches."""
        out = [(k, v) for k, v in headers if not k.lower().startswith(b"access-control-")]
        if self.allows(origin):
            assert origin is not None
            out += self._allow_origin(origin)
            out.append((b"access-control-expose-headers", _EXPOSED))
        return self._vary(out)

    def _vary(self, headers: Headers) -> Headers:
        if self.wildcard:
            return headers
        for index, (name, value) in enumerate(headers):
            if name.lower() == b"vary":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if not tokens & {b"origin", b"*"}:
                    headers[index] = (name, value + b", Origin")
                return headers
        headers.append((b"vary", b"Origin"))
        return headers


_EXPOSED: Final = ", ".join(EXPOSED).encode()
_METHODS: Final = ", ".join(METHODS).encode()


def request_origin(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
    """The request's ``Origin`` (None if absent, or sent more than once: then no
    single origin can be allowed) and whether it asks a preflight's question."""
    origins = []
    asks = False
    for name, value in headers:
        if name == b"origin":
            origins.append(value)
        elif name == b"access-control-request-method":
            asks = True
    return (origins[0] if len(origins) == 1 else None), asks and bool(origins)


class Cors:
    """The ASGI middleware applying ``[cors]`` around the gateway (wired in app.py)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: Callable[[], CorsConfig],
        error_body: ErrorBody,
        covered: Callable[[str], bool] = covered,
    ) -> None:
        self.app = app
        self._config = config
        # The browser-facing paths; the app adds its upstreams' mounts (issue 23).
        self._covered = covered
        self._error_body = error_body
        self._compiled: tuple[CorsConfig, Policy] | None = None

    def policy(self) -> Policy:
        config = self._config()
        compiled = self._compiled
        if compiled is None or compiled[0] is not config:
            # Compiled once per configuration (a reload swaps the object).
            compiled = self._compiled = (config, Policy.of(config))
        return compiled[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._covered(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        policy = self.policy()
        if not policy.enabled:
            await self.app(scope, receive, send)
            return
        origin, preflight = request_origin(scope["headers"])
        if preflight and scope["method"] == "OPTIONS":
            await self._answer_preflight(policy, origin, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": policy.response(origin, message["headers"])}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _answer_preflight(self, policy: Policy, origin: bytes | None, send: Send) -> None:
        status, headers = policy.preflight(origin)
        if status != 204:
            # The page cannot read it (no Access-Control-Allow-Origin): the browser
            # reports a network error, as it must. The body is for people with curl.
            refusal = render(
                self._error_body,
                status,
                "origin_not_allowed",
                "This origin is not allowed to call the gateway.",
                headers=headers,
            )
            await refusal.send(send)
            return
        headers.append((b"content-length", b"0"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
