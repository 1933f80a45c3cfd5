"""The one place an error response is rendered.

Every error the gateway answers itself - the proxy's refusals and failures, the
admin and usage APIs', /metrics', the request limits' (408, 431), the CORS
preflight refusal and the server's own refusals of a head (request_limits/protocol.py) - is
built here: a body in a dialect's error shape (``Upstream.error_body``) and one
set of headers, sent as ASGI messages, as a Starlette response or as raw
HTTP/1.1 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.responses import Response

from gateway.errors import GatewayError, StorageError, Unauthorized, UpstreamError
from gateway.types import Send

__all__ = ["ErrorBody", "ErrorResponse", "render", "render_error"]

# A dialect's error shape: (status, code, message) -> the JSON body.
ErrorBody = Callable[[int, str, str], bytes]
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    status: int
    headers: Headers
    body: bytes

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})

    def starlette(self) -> Response:
        response = Response(self.body, status_code=self.status)
        response.raw_headers = list(self.headers)
        return response

    def http11(self, reason: bytes) -> bytes:
        """The whole response on the wire, for a server protocol (no ASGI yet)."""
        head = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers)
        status = str(self.status).encode()
        return b"HTTP/1.1 " + status + b" " + reason + b"\r\n" + head + b"\r\n" + self.body


def render(
    error_body: ErrorBody,
    status: int,
    code: str,
    message: str,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    request_id: str | None = None,
    language: str | None = None,
    realm: str | None = None,
    close: bool = False,
) -> ErrorResponse:
    """An error answer: the body in ``error_body``'s shape; ``headers`` (Retry-After,
    rate limits, CORS) after the request id; ``realm`` adds the challenge of a 401;
    ``close`` ends the connection (what follows on it cannot be trusted)."""
    body = error_body(status, code, message)
    out: Headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if request_id is not None:
        out.append((b"x-request-id", request_id.encode()))
    out.extend(headers)
    if language is not None:
        out.append((b"content-language", language.encode()))
    if realm is not None:
        out.append((b"www-authenticate", f'Bearer realm="{realm}"'.encode()))
    if close:
        out.append((b"connection", b"close"))
    return ErrorResponse(status, out, body)


def render_error(
    exc: GatewayError,
    error_body: ErrorBody,
    *,
    message: str | None = None,
    realm: str,
    request_id: str | None = None,
    language: str | None = None,
    outage_retry_after: bytes | None = None,
) -> ErrorResponse:
    """A `GatewayError` answered: its status, code, headers and (unless the caller
    translated it) message; a 401 carries ``realm``'s challenge; with
    ``outage_retry_after`` a database or upstream failure says when to retry."""
    response = render(
        error_body,
        exc.status,
        exc.code,
        exc.message if message is None else message,
        headers=exc.headers,
        request_id=request_id,
        language=language,
        realm=realm if isinstance(exc, Unauthorized) else None,
    )
    if (
        outage_retry_after is not None
        and isinstance(exc, StorageError | UpstreamError)
        and not any(k == b"retry-after" for k, _ in exc.headers)
    ):
        response.headers.append((b"retry-after", outage_retry_after))
    return response
