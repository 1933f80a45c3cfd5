"""gateway/error_response.py: the one renderer of the gateway's own error answers,
pinned byte for byte for each path that uses it (the proxy, the admin and usage
APIs, the request limits, the CORS preflight, the server's refusal of a head)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from gateway.error_response import render, render_error
from gateway.errors import QuotaExceeded, StorageError, Unauthorized, UpstreamUnavailable
from gateway.request_limits.checks import send_refusal
from gateway.upstreams.dify import DifyUpstream


def _dify(status: int, code: str, message: str) -> bytes:
    return DifyUpstream.error_body(None, status, code, message)  # type: ignore[arg-type]


async def _sent(response: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        messages.append(message)

    await response.send(send)
    return messages


async def test_the_proxy_path_headers_in_order() -> None:
    exc = QuotaExceeded("Daily limit reached.", headers=[(b"retry-after", b"60")])
    response = render_error(
        exc, _dify, message="Hết lượt.", realm="api", request_id="r-1", language="vi"
    )
    body = _dify(429, "quota_exceeded", "Hết lượt.")
    assert response.status == 429 and response.body == body
    assert response.headers == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", b"r-1"),
        (b"retry-after", b"60"),
        (b"content-language", b"vi"),
    ]
    start, end = await _sent(response)
    assert start == {"type": "http.response.start", "status": 429, "headers": response.headers}
    assert end == {"type": "http.response.body", "body": body}


def test_a_401_carries_its_realms_challenge() -> None:
    response = render_error(
        Unauthorized("No key."), _dify, realm="api", request_id="r", language="en"
    )
    assert response.headers[-1] == (b"www-authenticate", b'Bearer realm="api"')


def test_an_outage_says_when_to_retry_once() -> None:
    for exc in (StorageError("down"), UpstreamUnavailable("gone")):
        response = render_error(exc, _dify, realm="api", outage_retry_after=b"5")
        assert response.headers[-1] == (b"retry-after", b"5")
    own = StorageError("down", headers=[(b"retry-after", b"30")])
    response = render_error(own, _dify, realm="api", outage_retry_after=b"5")
    assert [v for k, v in response.headers if k == b"retry-after"] == [b"30"]
    # Without outage_retry_after (the admin API), none is added.
    assert b"retry-after" not in dict(
        render_error(StorageError("down"), _dify, realm="admin").headers
    )


def test_the_admin_path_is_the_response_it_was() -> None:
    exc = Unauthorized("A valid admin token is required.", headers=[(b"x-extra", b"1")])
    error_body = _dify
    response = render_error(exc, error_body, realm="admin").starlette()
    # What admin.error_response built before the renderer.
    before = Response(
        error_body(401, "unauthorized", exc.message),
        status_code=401,
        media_type="application/json",
        headers={"x-extra": "1", "www-authenticate": 'Bearer realm="admin"'},
    )
    assert response.status_code == before.status_code and response.body == before.body
    assert sorted(response.raw_headers) == sorted(before.raw_headers)


async def test_the_request_limits_path_closes_the_connection() -> None:
    messages: list[Any] = []

    async def send(message: Any) -> None:
        messages.append(message)

    await send_refusal(send, _dify, 408, "request_timeout", "Too slow.")
    body = _dify(408, "request_timeout", "Too slow.")
    assert messages[0]["headers"] == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    assert messages[1]["body"] == body


def test_the_server_path_is_the_bytes_it_wrote_before() -> None:
    body = _dify(503, "too_many_connections", "Busy.")
    before = (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"retry-after: 5\r\n"
        b"connection: close\r\n\r\n" + body
    )
    after = render(
        _dify, 503, "too_many_connections", "Busy.", headers=[(b"retry-after", b"5")], close=True
    ).http11(b"Service Unavailable")
    assert after == before
    body = _dify(431, "headers_too_large", "Big.")
    assert render(_dify, 431, "headers_too_large", "Big.", close=True).http11(
        b"Request Header Fields Too Large"
    ) == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )


def test_the_cors_path_keeps_the_policys_headers() -> None:
    vary = [(b"vary", b"Origin")]
    response = render(_dify, 403, "origin_not_allowed", "No.", headers=vary)
    assert set(response.headers) == {
        (b"vary", b"Origin"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(response.body)).encode()),
    }
