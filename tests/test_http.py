"""The proxy's pure HTTP helpers, as tables, and the one upstream error mapping."""

from __future__ import annotations

import re

import aiohttp
import httpx
import pytest

from gateway.errors import BadRequest
from gateway.http import (
    canonical_path,
    connection_tokens,
    is_json,
    request_headers,
    response_headers,
    with_param,
)
from gateway.upstream_client import timeout_phase
from gateway.upstreams.transforms import DropEvents


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/chat-messages", "/chat-messages"),
        ("/messages/a b/suggested", "/messages/a%20b/suggested"),
        ("/files/100%", "/files/100%25"),
        ("/conversations/c1/", "/conversations/c1/"),
        ("/x:y@z!$&'()*+,;=-._~", "/x:y@z!$&'()*+,;=-._~"),
        ("/ü", "/%C3%BC"),
        ("/a..b/.c", "/a..b/.c"),
    ],
)
def test_canonical_path(path: str, expected: str) -> None:
    assert canonical_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/a?b",
        "/a#b",
        "/a\\b",
        "/a\x00",
        "/a\x1f",
        "/a\x7f",
        "//a",
        "/a//b",
        "/./a",
        "/a/..",
        "/a/../b",
    ],
)
def test_canonical_path_refuses(path: str) -> None:
    with pytest.raises(BadRequest):
        canonical_path(path)


@pytest.mark.parametrize(
    ("query", "add", "expected"),
    [
        (b"", True, b"user=alice"),
        (b"", False, b""),
        (b"limit=20", True, b"limit=20&user=alice"),
        (b"limit=20", False, b"limit=20"),
        (b"user=victim", False, b"user=alice"),
        (b"%75ser=victim", False, b"user=alice"),
        (b"%75%73%65%72=victim", False, b"user=alice"),
        (b"US%65R=victim", False, b"US%65R=victim"),  # names are case-sensitive
        (b"user", False, b"user=alice"),  # a name without a value is still a name
        (b"user=a&user=b&x=1", False, b"x=1&user=alice"),
        (b"a=%2B&b=c+d&&user=v", False, b"a=%2B&b=c+d&user=alice"),  # kept byte for byte
        (b"us+er=v", False, b"us+er=v"),  # "+" decodes to a space: another name
        (b"user+=v", False, b"user+=v"),
        (b"x=user%3Dv", False, b"x=user%3Dv"),  # a value, not a name
    ],
)
def test_with_param(query: bytes, add: bool, expected: bytes) -> None:
    assert with_param(query, "user", "alice", add=add) == expected


def test_with_param_escapes_the_value() -> None:
    assert with_param(b"", "user", "a&b=c d/é") == b"user=a%26b%3Dc%20d%2F%C3%A9"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([(b"Content-Type", b"a/b")], [(b"content-type", b"a/b")]),
        ([(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")], [(b"x-a", b"1")]),
        ([(b"X-Request-Id", b"up")], []),
        (
            [(b"Connection", b"X-Private, keep-alive"), (b"X-Private", b"1"), (b"X-B", b"2")],
            [(b"x-b", b"2")],
        ),
        ([(b"Keep-Alive", b"timeout=5"), (b"Upgrade", b"h2c")], []),
    ],
)
def test_response_headers(
    raw: list[tuple[bytes, bytes]], expected: list[tuple[bytes, bytes]]
) -> None:
    assert response_headers(raw) == expected


def test_connection_tokens() -> None:
    assert connection_tokens(b" Close , X-A,,") == frozenset({b"close", b"x-a"})


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        (b"application/json", True),
        (b"application/vnd.api+json", True),
        (b"application/merge-patch+json", True),
        (b"text/json", False),
        (b"application/jsonp", False),
        (b"multipart/form-data", False),
    ],
)
def test_is_json(media_type: bytes, expected: bool) -> None:
    assert is_json(media_type) == expected


def test_request_headers_split() -> None:
    split = request_headers(
        [
            (b"host", b"gw"),
            (b"authorization", b"Bearer k"),
            (b"x-user", b"bob"),
            (b"connection", b"x-hop"),
            (b"x-hop", b"1"),
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", b"12"),
            (b"accept-encoding", b"gzip"),
            (b"x-custom", b"kept"),
            (b"access-control-request-method", b"POST"),
        ],
        b"x-user",
    )
    assert split.forward == [
        (b"content-type", b"application/json; charset=utf-8"),
        (b"x-custom", b"kept"),
        (b"access-control-request-method", b"POST"),
    ]
    assert split.authorization == b"Bearer k" and split.user_header == b"bob"
    assert split.content_length == 12 and split.accept_encoding == b"gzip"
    assert split.media_type == b"application/json" and split.preflight


def test_request_headers_drop_the_account_a_client_names() -> None:
    # Who the operator's key bills and whose objects it reaches is the
    # operator's choice (the upstream's table), in every dialect.
    split = request_headers(
        [
            (b"openai-organization", b"org-victim"),
            (b"openai-project", b"proj-victim"),
            (b"anthropic-workspace-id", b"wrkspc_victim"),
            (b"anthropic-user-profile-id", b"uprof_victim"),
            (b"openai-beta", b"assistants=v2"),
            (b"anthropic-version", b"2023-06-01"),
        ],
        b"x-user",
        b"x-api-key",
    )
    assert split.forward == [
        (b"openai-beta", b"assistants=v2"),
        (b"anthropic-version", b"2023-06-01"),
    ]


@pytest.mark.parametrize(
    "raw",
    [
        [(b"content-type", b"a/b"), (b"content-type", b"c/d")],
        [(b"content-length", b"twelve")],
    ],
)
def test_request_headers_refuse_ambiguity(raw: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadRequest):
        request_headers(raw, b"x-user")


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectTimeout("t"), "connect"),
        (httpx.PoolTimeout("t"), "connect"),
        (httpx.ReadTimeout("t"), "read"),
        (TimeoutError(), "read"),
        (httpx.ConnectError("refused"), None),
        (httpx.RemoteProtocolError("broken"), None),
        # httpx-aiohttp reports every aiohttp connection error as ConnectTimeout.
        (_caused(httpx.ConnectTimeout("t"), aiohttp.ClientConnectionError("refused")), None),
        (_caused(httpx.ConnectTimeout("t"), aiohttp.ServerTimeoutError("slow")), "read"),
        (_caused(httpx.ConnectTimeout("t"), aiohttp.ConnectionTimeoutError("slow")), "connect"),
    ],
)
def test_timeout_phase(exc: BaseException, expected: str | None) -> None:
    assert timeout_phase(exc) == expected


def _dropping_usage() -> DropEvents:
    return DropEvents(lambda event: b'"usage"' in event)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"data: a\n\ndata: b\n\n"], b"data: a\n\ndata: b\n\n"),
        ([b'data: a\n\ndata: {"usage":1}\n\ndata: [DONE]\n\n'], b"data: a\n\ndata: [DONE]\n\n"),
        ([b'data: {"us', b'age":1}\n', b"\ndata: b\r\n\r\n"], b"data: b\r\n\r\n"),
        ([b"data: a\r\r", b'data: {"usage":1}\r\r'], b"data: a\r\r"),
        ([b": ping\n\ndata: a"], b": ping\n\ndata: a"),  # the incomplete rest, at the end
        ([b'data: {"usage":1}'], b""),
        # CRLF is one line ending: a two-line event is dropped whole, not line by line.
        ([b'data: a\r\ndata: {"usage":1}\r\n\r\ndata: b\r\n\r\n'], b"data: b\r\n\r\n"),
        # A CR at the end of a chunk may be half of a CRLF.
        ([b"data: a\r", b"\n\r\n", b'data: {"usage":1}\r', b"\n\r\n"], b"data: a\r\n\r\n"),
    ],
)
def test_drop_events(chunks: list[bytes], expected: bytes) -> None:
    transform = _dropping_usage()
    out = b"".join(transform.feed(chunk) for chunk in chunks) + transform.flush()
    assert out == expected


def test_drop_events_passes_a_run_with_nothing_to_drop_as_it_is() -> None:
    transform = DropEvents(
        lambda event: b'"usage"' in event,
        marks=lambda run: [m.start() for m in re.finditer(rb'"usage"', run)],
    )
    chunk = b"data: a\n\ndata: b\n\n"
    assert transform.feed(chunk) is chunk
    assert transform.feed(b'data: {"usage":1}\n\ndata: c\n\n') == b"data: c\n\n"
