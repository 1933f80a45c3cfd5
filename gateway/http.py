"""Pure HTTP helpers for the proxy: paths, query strings and header filters.

No I/O and no state (sans-io): each function takes bytes or strings and returns
them, so each is tested exhaustively with tables (tests/test_http.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote_plus

from gateway.errors import BadRequest

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1: connection-specific fields are not forwarded.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Response headers the gateway sets itself rather than passing on. The server in
# front of the gateway (uvicorn) adds its own `date` (and, unless turned off,
# `server`): the upstream's would make two, and RFC 9110 6.6.1 allows one Date.
_SERVER_SET: Final = frozenset({b"date", b"server"})
# Response headers that describe the operator's account, not the answer: whose
# it is (OpenAI's organization and project, Anthropic's organization and
# workspace), and the account's rate limits - OpenAI's x-ratelimit-*, Anthropic's
# anthropic-ratelimit-* and anthropic-priority-*, counted over every user's
# traffic, which any user could watch. The gateway's own X-RateLimit-* (the
# caller's limit) are added after these are dropped. Nothing a client needs to
# retry goes: retry-after, retry-after-ms, x-should-retry and request-id stay.
_ACCOUNT_RESPONSE: Final = frozenset(
    {
        b"openai-organization",
        b"openai-project",
        b"anthropic-organization-id",
        b"anthropic-workspace-id",
    }
)
_ACCOUNT_RESPONSE_PREFIXES: Final = (
    b"x-ratelimit-",
    b"anthropic-ratelimit-",
    b"anthropic-priority-",
)
# The headers of the LLM routers an operator may put between the gateway and the
# provider, by family: LiteLLM (x-litellm-*), Portkey (x-portkey-*), Helicone
# (helicone-*), Cloudflare AI Gateway (cf-aig-*). In a request, each family has
# headers that choose what the gateway decides or the operator configured:
# whose call it is (x-litellm-end-user-id and x-litellm-customer-id, read
# before the body's user; helicone-user-id), which key, stored key or provider
# it uses (x-litellm-api-key, x-portkey-virtual-key, x-portkey-provider,
# x-portkey-config), where the operator's key is sent (x-portkey-custom-host,
# helicone-target-url), its cost, budget and rate limits (cf-aig-custom-cost,
# helicone-ratelimit-policy), whether it is logged (cf-aig-collect-log), its
# routing (x-litellm-tags), retries and timeouts. None of them is a client's to
# choose: the whole families are dropped (the operator's, such as Portkey's key
# and provider, are an upstream's `headers`: `gateway.snapshot.Target`). In a
# response they tell of the router
# and the operator's key there (x-litellm-key-spend, x-litellm-model-api-base;
# LiteLLM's llm_provider-* repeat the provider's own headers, account ones
# included): dropped too.
_ROUTER_PREFIXES: Final = (b"x-litellm-", b"x-portkey-", b"helicone-", b"cf-aig-")
_DROP_RESPONSE: Final = HOP_BY_HOP | {b"x-request-id"} | _SERVER_SET | _ACCOUNT_RESPONSE
_DROP_RESPONSE_PREFIXES: Final = (
    *_ACCOUNT_RESPONSE_PREFIXES,
    *_ROUTER_PREFIXES,
    b"llm_provider-",
)

# Characters a path segment may carry unescaped (RFC 3986 pchar, minus "%": any
# percent sign in the decoded path is data and must be escaped again).
_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"
_UNSAFE_PATH_CHARS: Final = re.compile(r"[?#\\\x00-\x1f\x7f]")
# "//" anywhere but a final "/" is fine; "." and ".." as whole segments are not.
_UNSAFE_PATH_SEGMENT: Final = re.compile(r"//|/\.\.?(?=/|$)")
# A path ``quote`` would return as it is: only what it never escapes (its
# letters, digits and "_.-~") and _PATH_SAFE.
_QUOTED_AS_IS: Final = re.compile(r"[A-Za-z0-9_.\-~/:@!$&'()*+,;=]*")


def canonical_path(path: str) -> str:
    """The decoded request path, checked and re-escaped for the upstream URL.

    The route is decided on this path, so the upstream must receive exactly this
    path and nothing it could read differently: a decoded ``?`` or ``#`` would
    end the path early, a ``.`` or ``..`` segment would be resolved to another
    endpoint, and an empty segment or a control character is read differently by
    different servers. Such paths are refused.
    """
    if _UNSAFE_PATH_CHARS.search(path):
        raise BadRequest("The request path contains characters that are not allowed.")
    if _UNSAFE_PATH_SEGMENT.search(path):
        raise BadRequest("The request path must not contain empty, '.' or '..' segments.")
    if _QUOTED_AS_IS.fullmatch(path):
        return path  # (the usual path: quote's encoding and scan not needed, issue 24)
    return quote(path, safe=_PATH_SAFE)


def _param_name(pair: bytes) -> str:
    """A query (or form) pair's name as the upstream's parser reads it: ``+`` is a
    space and percent escapes are decoded."""
    return unquote_plus(pair.split(b"=", 1)[0].decode("latin-1"))


def with_param(query: bytes, name: str, value: str, *, add: bool = True) -> bytes:
    """``query`` (or a urlencoded form body) with every pair named ``name`` replaced
    by one ``name=value``.

    Names are compared decoded (``%75ser`` and ``us%65r`` are ``user``), so no
    spelling of the name slips past. The other pairs are kept byte for byte
    (re-encoding them could change what they mean). With ``add`` False the pair
    is only written when the query already named it.
    """
    pairs = [pair for pair in query.split(b"&") if pair]
    kept = [pair for pair in pairs if _param_name(pair) != name]
    if not add and len(kept) == len(pairs):
        return query
    kept.append(f"{name}={quote(value, safe='')}".encode())
    return b"&".join(kept)


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Header names listed in a Connection header: hop-by-hop too (RFC 9110 7.6.1)."""
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def response_headers(raw: Headers) -> Headers:
    """An upstream response's headers as the client gets them: lower-cased names,
    without hop-by-hop fields (listed in Connection or always), ``x-request-id``,
    and what describes the operator's account or router (`_ACCOUNT_RESPONSE`,
    `_ROUTER_PREFIXES`)."""
    listed: frozenset[bytes] = frozenset()
    for name, value in raw:
        if name.lower() == b"connection":
            listed = connection_tokens(value)
    kept: Headers = []
    for name, value in raw:
        name = name.lower()
        if name in _DROP_RESPONSE or name in listed or name.startswith(_DROP_RESPONSE_PREFIXES):
            continue
        kept.append((name, value))
    return kept


# An upstream key found in an error's body is passed on as this (`KeyMask`).
_MASK: Final = b"***"
# A shorter key is not masked: "test" or "EMPTY" (a local server's) would be
# masked in every word that holds it, and a key that short keeps nothing secret.
_SHORTEST_MASKED: Final = 8


# JSON's short escapes (RFC 8259 7), a key's character may be written as.
_SHORT_ESCAPES: Final = {
    '"': b'\\"',
    "\\": b"\\\\",
    "/": b"\\/",
    "\b": b"\\b",
    "\f": b"\\f",
    "\n": b"\\n",
    "\r": b"\\r",
    "\t": b"\\t",
}


def _spelled(key: str) -> tuple[bytes, int]:
    """A key's pattern: the key as it is, or quoted JSON-escaped character by
    character (some encoders write '/' as \\/, .NET every '+' as \\u002B, others
    every non-ASCII character as \\uXXXX: a client's JSON parser gives the key
    back whole); and its longest match. The two are alternatives, not one
    pattern with a choice per character: inside JSON a backslash or a quote is
    always escaped, so no spelling of one character is the start of another's,
    and a body of near-misses is read in linear time (a raw backslash that was
    also the start of ``\\\\`` made a key of backslashes take exponential time:
    review 7, R7-3)."""
    parts: list[bytes] = []
    escaped_longest = 0
    for char in key:
        raw = char.encode()
        if char.isascii() and char.isalnum():
            parts.append(raw)
            escaped_longest += 1
            continue
        spellings = [_u_escaped(char)]
        short = _SHORT_ESCAPES.get(char)
        if short is not None:
            spellings.append(short)
        if not _always_escaped(char):
            spellings.append(raw)
        parts.append(b"(?:" + b"|".join(re.escape(w) for w in spellings) + b")")
        escaped_longest += max(len(w) for w in spellings)
    # The \\u escapes' hex digits in either case.
    escaped = re.sub(rb"\\\\u([0-9a-f]{4})", _either_case, b"".join(parts))
    as_is = key.encode()
    pattern = re.escape(as_is) + b"|" + escaped
    return pattern, max(len(as_is), escaped_longest)


def _always_escaped(char: str) -> bool:
    """A character JSON always escapes in a string (RFC 8259 7)."""
    return char in '"\\' or ord(char) < 0x20


def _u_escaped(char: str) -> bytes:
    """``char`` as JSON's \\uXXXX escape (a surrogate pair past the BMP), lower-case hex."""
    units = char.encode("utf-16-be")
    return b"".join(
        b"\\u%04x" % int.from_bytes(units[i : i + 2], "big") for i in range(0, len(units), 2)
    )


def _either_case(match: re.Match[bytes]) -> bytes:
    digits = b"".join(
        b"[%s%s]" % (d.lower(), d.upper()) if d.isalpha() else d
        for d in (bytes([c]) for c in match.group(1))
    )
    return b"\\\\u" + digits


class KeyMask:
    """The operator's upstream keys, masked in a body the upstream wrote: some
    OpenAI-compatible servers and proxies quote the key they were sent in an
    auth or budget error, and the key must never reach a client. A key is
    found as it is and JSON-escaped (`_spelled`).

    `whole` masks a body read whole; `feed` and `end` a body passed on as it
    comes, holding back the last bytes of each chunk that may begin a key its
    next chunk ends. False when there is no key to mask.
    """

    __slots__ = ("_held", "_keep", "_pattern")

    def __init__(self, keys: Iterable[str]) -> None:
        # Longest first: a key that begins another is not masked in its place.
        found = sorted({key for key in keys if len(key) >= _SHORTEST_MASKED}, key=len, reverse=True)
        spelled = [_spelled(key) for key in found]
        self._pattern = re.compile(b"|".join(p for p, _ in spelled)) if found else None
        self._keep = max(n for _, n in spelled) - 1 if found else 0
        self._held = b""

    def __bool__(self) -> bool:
        return self._pattern is not None

    def whole(self, body: bytes) -> bytes:
        return body if self._pattern is None else self._pattern.sub(_MASK, body)

    def feed(self, chunk: bytes) -> bytes:
        """What can be passed on of a body's next chunk, masked."""
        if self._pattern is None:
            return chunk
        data = self._held + chunk
        # A key begun in the last bytes may end in the next chunk: they wait
        # for it. So does a key found there, which may begin a longer one
        # (review5 R5-4): the next feed (or `end`) reads it again, whole.
        safe = len(data) - self._keep
        out = bytearray()
        start = 0
        cut = None
        for match in self._pattern.finditer(data):
            if match.end() > safe:
                cut = max(start, min(match.start(), safe))
                break
            out += data[start : match.start()]
            out += _MASK
            start = match.end()
        if cut is None:
            cut = max(start, safe)
        out += data[start:cut]
        self._held = data[cut:]
        return bytes(out)

    def end(self) -> bytes:
        """The bytes held back at the body's end, masked."""
        held, self._held = self._held, b""
        return self.whole(held)


def is_json(media_type: bytes) -> bool:
    """JSON as Werkzeug's `get_json` (which Dify uses) takes it: application/json or
    any application/*+json."""
    return media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
    )


# Headers that choose the account the operator's key acts for: who is billed,
# and whose files, vector stores, assistants and workspace objects the call
# reaches (OpenAI's organization and project; Anthropic's workspace, and the
# user profile a call is attributed - and may be billed - to). The operator's
# choice, set per upstream (`Upstream.upstream_credentials`), never a
# client's: dropped from every request, whatever its dialect.
_ACCOUNT_HEADERS: Final = frozenset(
    {
        b"openai-organization",
        b"openai-project",
        b"anthropic-workspace-id",
        b"anthropic-user-profile-id",
    }
)
# The other headers that carry an API key: a client's is never forwarded with
# the operator's. A router reads them in its own order: LiteLLM takes Azure's
# api-key before Anthropic's x-api-key, so behind an Anthropic upstream (whose
# key goes in x-api-key, with no Authorization) a client's api-key was the key
# it authenticated.
_KEY_HEADERS: Final = frozenset(
    {b"x-api-key", b"api-key", b"x-goog-api-key", b"ocp-apim-subscription-key"}
)
# Request headers the gateway sets itself rather than forwarding (x-request-id:
# the gateway's own, unique; a client's could name the upstream's answer), and
# the client's cookies: the gateway reads none, and a browser sends a frontend's
# session cookies (same site, or a parent domain's) to the gateway's /v1 too -
# never to the provider, a third party.
_DROP_REQUEST: Final = (
    HOP_BY_HOP
    | _ACCOUNT_HEADERS
    | _KEY_HEADERS
    | {
        b"host",
        b"authorization",
        b"content-length",
        b"accept-encoding",
        b"x-request-id",
        b"cookie",
    }
)


def cgi_spelling(name: bytes) -> bytes:
    """A lower-case header name as a server reading headers as CGI variables
    tells it apart: "-" for "_" (WSGI's environ, PHP: HTTP_X_TENANT for x-tenant
    and x_tenant alike), and for any other character but a letter or a digit
    (lighttpd: x.tenant too)."""
    return name if is_dashed(name) else _NOT_DASHED.sub(b"-", name)


def is_dashed(name: bytes) -> bool:
    """Whether a lower-case header name holds letters, digits and "-" only:
    every server reads it as it is."""
    return name.replace(b"-", b"").isalnum()


_NOT_DASHED: Final = re.compile(rb"[^a-z0-9-]")


def _dropped_as_cgi_reads(name: bytes, user_header: bytes, key_header: bytes | None) -> bool:
    """A name with underscores (or dots...) that a server reading headers as
    CGI variables takes for one the gateway reads or drops (`cgi_spelling`):
    dropped too, or a router behind such a server would read
    ``x_litellm_end_user_id`` as the header the gateway drops."""
    dashed = cgi_spelling(name)
    return (
        dashed in _DROP_REQUEST
        or dashed.startswith(_ROUTER_PREFIXES)
        or dashed in (user_header, key_header, b"content-type")
    )


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    """A client request's headers, split into what is forwarded and what the
    gateway reads itself."""

    forward: Headers  # to send upstream as they are (the gateway adds its own)
    authorization: bytes | None = None
    # The client's key in the dialect's own header (Anthropic's x-api-key), never
    # forwarded: the gateway sends the upstream the operator's key instead.
    api_key: bytes | None = None
    user_header: bytes | None = None  # the trusted user header, never forwarded
    content_type: bytes = b""
    content_length: int | None = None
    accept_encoding: bytes | None = None
    preflight: bool = False  # carries Access-Control-Request-Method

    @property
    def credential(self) -> bytes | None:
        """The client's credential: its Authorization header, else the key it sent
        in the dialect's own header (Anthropic's SDKs send ``x-api-key``), read as
        the bearer token it stands for."""
        if self.authorization is not None or self.api_key is None:
            return self.authorization
        return b"Bearer " + self.api_key

    @property
    def media_type(self) -> bytes:
        return self.content_type.split(b";", 1)[0].strip().lower()


_OWS: Final = " \t"


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    # Trimmed of HTTP's own whitespace only (RFC 9110 5.5: SP, HTAB): str.strip
    # also takes NBSP and NEL, and a key followed by any run of them was the
    # same key under endless spellings (review-auth A3).
    scheme, _, token = authorization.decode("latin-1").strip(_OWS).partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip(_OWS) or None


def request_headers(
    raw: Headers, user_header: bytes, key_header: bytes | None = None
) -> RequestHeaders:
    """Split ASGI request headers (names already lower case); refuses a request
    whose headers could be read two ways (two Content-Types, a bad Content-Length).
    ``key_header`` names the dialect's own key header (``x-api-key``), if any."""
    authorization = user = accept_encoding = api_key = None
    content_type = b""
    content_length: int | None = None
    listed: frozenset[bytes] = frozenset()
    preflight = False
    forward: Headers = []
    for name, value in raw:
        if name == user_header:
            if user is not None:
                # Which user would be charged here, and which one judged in front?
                raise BadRequest(f"More than one {name.decode('latin-1')} header.")
            user = value
            continue
        if name == key_header:
            if api_key is not None:
                raise BadRequest(f"More than one {name.decode('latin-1')} header.")
            api_key = value
            continue
        if name in _DROP_REQUEST:
            if name == b"authorization":
                if authorization is not None:
                    # Which one would be read here, and which one in front of it?
                    raise BadRequest("More than one Authorization header.")
                authorization = value
            elif name == b"connection":
                listed = connection_tokens(value)
            elif name == b"accept-encoding":
                accept_encoding = value
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    raise BadRequest("Invalid Content-Length header.") from None
            continue
        if name.startswith(_ROUTER_PREFIXES):
            continue  # a router's: whose call it is, its key, provider, budget...
        if not is_dashed(name) and _dropped_as_cgi_reads(name, user_header, key_header):
            continue
        if name == b"content-type":
            if content_type:
                # Which one would the upstream read? Refuse rather than guess.
                raise BadRequest("More than one Content-Type header.")
            content_type = value
        elif name == b"access-control-request-method":
            preflight = True
        forward.append((name, value))
    if listed:
        forward = [(name, value) for name, value in forward if name not in listed]
    if (
        api_key is not None
        and authorization is not None
        and bearer_token(authorization) != api_key.decode("latin-1").strip(_OWS)
    ):
        # Two credentials: whichever one were read, a proxy, log or rate limiter
        # in front of the gateway may have judged the caller by the other.
        header = (key_header or b"").decode("latin-1")
        raise BadRequest(
            f"The Authorization and {header} headers carry different credentials: "
            "send the gateway key in one of them."
        )
    return RequestHeaders(
        forward,
        authorization=authorization,
        api_key=api_key,
        user_header=user,
        content_type=content_type,
        content_length=content_length,
        accept_encoding=accept_encoding,
        preflight=preflight,
    )
