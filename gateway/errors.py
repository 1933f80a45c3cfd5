"""The gateway's exceptions: one tree, each class knowing its HTTP status and code.

    GatewayError
    ├── ConfigError                 invalid configuration (start-up, reload, CLI)
    ├── StorageError                the database failed or cannot be reached (503)
    │   └── RecordRefused            a usage record it refuses for what it holds
    ├── ClockError                  this machine's clock is far from the database's (start-up)
    ├── NotFound                    a user or key that does not exist (404)
    ├── ClientError                 the caller's request is refused (4xx)
    │   ├── Unauthorized             missing or bad credential (401)
    │   ├── Forbidden                feature not in the user's plan (403)
    │   ├── PayloadTooLarge          body or upload over a limit (413)
    │   ├── BadRequest               malformed request (400)
    │   ├── Conflict                 a record that already exists, e.g. a team (409)
    │   ├── QuotaExceeded            a plan limit is reached (429)
    │   └── TooManyAttempts          too many wrong admin tokens from one client (429)
    └── UpstreamError               the upstream failed before answering
        ├── UpstreamUnavailable      connect error (502)
        ├── UpstreamTimeout          timeout before the first byte (504)
        └── UpstreamBroken           the body ended abnormally (mid-answer)

A missing row is not an outage: `NotFound` is deliberately not a `StorageError`,
so no caller that fails open (or retries) on a database failure does so for it.

Foreign exceptions are mapped to these at one boundary each: httpx, aiohttp and
anyio errors in `gateway.upstream_client` (inside the response body's stream, so
no reader has to ask), asyncpg and sqlite3 errors in their storage backends.
Every refusal the gateway makes is rendered in the upstream's own error shape (see
`Upstream.error_body`), so frontends show it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        key: str | None = None,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        # Extra response headers for the refusal (Retry-After, X-RateLimit-*).
        self.headers = headers or []
        # The message's code in gateway/messages.py and its fields, so the refusal
        # can be sent in the user's language; without a key the English message is
        # recognised by its text.
        self.key = key
        self.fields: Mapping[str, object] = fields or {}


class ConfigError(GatewayError):
    """A configuration file or value that cannot be used; the message is one line."""

    code = "invalid_config"


class StorageError(GatewayError):
    status = 503
    code = "storage_unavailable"


class RecordRefused(StorageError):
    """The database refuses a usage record for what it holds (its user is gone, a
    value it cannot store or index): writing it again would fail again, so it is
    set aside (``<spool>.rejected``), not retried or taken for an outage."""


class ClockError(GatewayError):
    """The gateway's clock is further from the database's than
    ``database.max_clock_offset`` allows (gateway/skew.py): the gateway does not start."""

    code = "clock_offset"


# What a client is told of any storage failure: the driver's own text names the
# database's address, user or name (logged instead, for the operator).
STORAGE_UNAVAILABLE: Final = "The usage database is unavailable; try again shortly."


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class ClientError(GatewayError):
    status = 400
    code = "invalid_param"


class BadRequest(ClientError):
    pass


class Conflict(ClientError):
    status = 409
    code = "conflict"


class Unauthorized(ClientError):
    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    status = 403
    code = "feature_not_in_plan"


class PayloadTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class QuotaExceeded(ClientError):
    status = 429
    code = "quota_exceeded"


class TooManyAttempts(ClientError):
    status = 429
    code = "too_many_attempts"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"

    def __init__(self, message: str, *, phase: str = "connect") -> None:
        super().__init__(message)
        # "connect": the request never reached the upstream; "read": it did, and
        # the upstream may be answering (and billing) still.
        self.phase = phase


class UpstreamBroken(UpstreamError):
    """The upstream body ended abnormally after the response began."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out
