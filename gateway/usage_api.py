"""The end user's own usage API: ``GET /v1/usage`` and ``GET /v1/usage/daily``.

Called with the same credential the user chats with (a gateway key, or the
trusted header), read as the proxy reads it, so it reports the user the proxy
charges: also from ``x-api-key`` when an upstream's clients send their key there
(Anthropic's, at any mount), where two keys that disagree are refused. The
answers are never to be kept by a cache (``Cache-Control: no-store``). What it reports comes from gateway/reports.py; refusals have the
body shape of every other refusal of the gateway (realm "api").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.admin import MAX_DAYS, error_response, int_param, json_response, services
from gateway.errors import STORAGE_UNAVAILABLE, GatewayError, StorageError
from gateway.http import request_headers
from gateway.reports import daily_dict

if TYPE_CHECKING:
    from gateway.services import Services
    from gateway.snapshot import Snapshot

log = logging.getLogger("gateway.usage_api")

__all__ = ["usage_routes"]


def _key_header(snap: Snapshot) -> bytes | None:
    """The header, besides Authorization, a caller may send its gateway key in
    here: the one a configured upstream's clients send it in at their mount
    (Anthropic's ``x-api-key``), wherever that upstream is mounted - its SDK's
    users call /v1/usage with the key as they chat. None when no upstream's
    clients use one: then no intermediary in front of the gateway has reason to
    treat any other header as a credential, and none is read."""
    for dialect in snap.dialects.values():
        if dialect.key_header is not None:
            return dialect.key_header
    return None


async def _end_user(request: Request, gw: Services) -> str:
    # The credential and the trusted user header read from the raw headers as the
    # proxy reads them (the same function, then the same decoding in
    # gateway/auth.py), so /v1/usage reports the user the proxy charges.
    snap = gw.snapshot
    key_header = _key_header(snap)
    headers = request_headers(request.scope["headers"], snap.user_header, key_header)
    return await snap.identify(headers.credential, headers.user_header)


def _private(response: Response) -> Response:
    """One user's figures, never stored by a cache on the way: HTTP caches keep
    no response to a request with Authorization (RFC 9111 3.5), but know
    nothing of a key sent in ``x-api-key``."""
    response.headers["cache-control"] = "no-store"
    return response


def _unavailable(gw: Services, exc: StorageError) -> Response:
    """A storage failure told without the driver's words, which name the database's
    address, user or name to any caller (a bearer token of any kind reaches the
    key lookup); logged for the operator."""
    log.warning("/v1/usage: %s", exc.message)
    return error_response(gw, StorageError(STORAGE_UNAVAILABLE), realm="api")


async def my_usage(request: Request) -> Response:
    """What the caller has used and has left, per limit of their plan."""
    gw = services(request)
    try:
        user_id = await _end_user(request, gw)
        # Fresh from storage: the in-process user cache holds plans, not counters.
        return _private(json_response(gw, await gw.reports.usage(await gw.reports.user(user_id))))
    except StorageError as exc:
        return _unavailable(gw, exc)
    except GatewayError as exc:
        return error_response(gw, exc, realm="api")


async def my_daily_usage(request: Request) -> Response:
    """The caller's usage per local day, for a chart (`?days=30`, at most 366)."""
    gw = services(request)
    try:
        user_id = await _end_user(request, gw)
        days = int_param(request, "days", 30, 1, MAX_DAYS)
        daily = await gw.reports.daily(user_id, days)
        return _private(
            json_response(
                gw,
                {
                    "user": user_id,
                    "days": days,
                    "currency": gw.currency,
                    "data": [daily_dict(r, gw.currency) for r in daily],
                },
            )
        )
    except StorageError as exc:
        return _unavailable(gw, exc)
    except GatewayError as exc:
        return error_response(gw, exc, realm="api")


usage_routes: list[BaseRoute] = [
    Route("/v1/usage", my_usage, methods=["GET"]),
    Route("/v1/usage/daily", my_daily_usage, methods=["GET"]),
]
