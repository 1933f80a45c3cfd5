"""The one boundary where httpx (and aiohttp beneath it) errors become gateway errors.

The proxy asks this module to open, read and stop upstream requests and sees only
`gateway.errors` exceptions: `UpstreamTimeout` (with the phase it happened in),
`UpstreamUnavailable`, `UpstreamBroken` for a body that ended abnormally, and
the request body's own failures (a client gone, a malformed or oversized upload).
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import httpx

from gateway.bodies import BodyFailure, ClientGone
from gateway.errors import (
    BadRequest,
    PayloadTooLarge,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.multipart import MultipartError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

log = logging.getLogger("gateway.proxy")

Headers = list[tuple[bytes, bytes]]

# What the transport raises: httpx's own errors, and TimeoutError from a deadline.
_TRANSPORT_ERRORS = (httpx.HTTPError, TimeoutError)


def timeout_phase(exc: BaseException) -> Literal["connect", "read"] | None:
    """For an upstream failure: "connect" or "read" if it was a timeout (504) and
    in which phase, None if it was a refusal or a broken connection (502)."""
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        # httpx-aiohttp maps every aiohttp connection error, "connection refused"
        # included, to httpx.ConnectTimeout; the original exception tells the truth
        # (aiohttp's timeouts subclass TimeoutError; its connect timeouts say so).
        if not isinstance(cause, TimeoutError):
            return None
        return "connect" if "Connect" in type(cause).__name__ else "read"
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return "connect"
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "read"
    return None


class _Reading:
    """``with client.reading():`` around a loop over a response body maps its
    errors once per body, not once per chunk."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, _TRANSPORT_ERRORS):
            raise UpstreamBroken(
                "The upstream connection was lost.", timed_out=timeout_phase(exc) is not None
            ) from exc


_READING = _Reading()

# Parsed upstream URLs kept (answers go to a handful; the bound covers query
# strings that name users).
_MAX_URLS = 1024


class UpstreamClient:
    """The shared httpx client, as the proxy uses it."""

    __slots__ = ("_client", "_urls")

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client
        # httpx parses (and checks, and re-quotes) a URL string on every request:
        # a tenth of the cost of building one. httpx.URL objects are immutable.
        self._urls: dict[str, httpx.URL] = {}

    @property
    def streaming_timeout(self) -> httpx.Timeout:
        return self._client.timeout

    def reading(self) -> _Reading:
        return _READING

    async def open(
        self,
        method: str,
        url: str,
        *,
        headers: Headers,
        content: bytes | AsyncIterator[bytes] | None,
        timeout: httpx.Timeout,
        failure: BodyFailure,
    ) -> httpx.Response:
        """Send a request; the response's headers are read, its body is not."""
        client = self._client
        try:
            request = client.build_request(
                method, self._url(url), headers=headers, content=content, timeout=timeout
            )
            return await client.send(request, stream=True)
        except (
            *_TRANSPORT_ERRORS,
            httpx.InvalidURL,
            ClientGone,
            MultipartError,
            PayloadTooLarge,
        ) as exc:
            # The transport wraps what the request body raised: the body's own
            # record says what really happened.
            error = failure.error
            if isinstance(error, MultipartError):
                raise BadRequest(f"Malformed multipart body: {error}") from exc
            if isinstance(error, ClientGone | PayloadTooLarge):
                raise error from exc
            if isinstance(exc, httpx.InvalidURL):
                raise BadRequest("The request URL is not valid.") from exc
            phase = timeout_phase(exc)
            if phase is not None:
                raise UpstreamTimeout("The upstream did not answer in time.", phase=phase) from exc
            raise UpstreamUnavailable("The upstream service is unreachable.") from exc

    def _url(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = httpx.URL(url)  # raises httpx.InvalidURL, mapped by the caller
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    async def request(
        self, method: str, url: str, *, headers: Headers, content: bytes | None = None
    ) -> httpx.Response:
        """A small request read whole (a CORS preflight, a stop call)."""
        try:
            return await self._client.request(method, url, headers=headers, content=content)
        except _TRANSPORT_ERRORS as exc:
            raise UpstreamUnavailable("The upstream service is unreachable.") from exc
