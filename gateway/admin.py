"""The admin API under /admin (JSON). (The end user's own usage API, /v1/usage,
is gateway/usage_api.py.)

Admin requests carry ``Authorization: Bearer <admin token>`` (compared in constant
time; a client's wrong guesses are throttled, gateway/throttle.py). With no admin
token configured the admin surface does not exist: 404.
Errors use the same body shape as every other refusal of the gateway.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, cast
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from gateway.alerts import alert_dict
from gateway.config import LIMIT_NAMES, is_override_name
from gateway.error_response import render_error
from gateway.errors import (
    BadRequest,
    GatewayError,
    NotFound,
    StorageError,
    TooManyAttempts,
    Unauthorized,
)
from gateway.export import Dataset, Format, encode, rows
from gateway.http import bearer_token
from gateway.reports import daily_dict, lifetime_dict
from gateway.throttle import Check, SecretGuard

if TYPE_CHECKING:
    from gateway.services import Services

MAX_PAGE = 500
MAX_DAYS = 366
_SORTS = ("id", "lifetime_tokens", "tokens_today")


def services(request: Request) -> Services:
    """What the gateway's own endpoints use (gateway/services.py)."""
    found: Services = request.app.state.services
    return found


def json_response(gw: Services, data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def error_response(gw: Services, exc: GatewayError, *, realm: str = "admin") -> Response:
    return render_error(exc, gw.error_body, realm=realm).starlette()


# Set on a dashboard request handed to the admin API (gateway/dashboard/exports.py):
# it was signed in with a session, not a guess, so it is not throttled (the token
# it carries is still compared). A client cannot set scope keys.
SIGNED_IN: Final = "gateway.signed_in"


def peer(request: Request) -> str:
    """The client's address as the server reports it: the TCP peer, or behind a
    proxy in uvicorn's FORWARDED_ALLOW_IPS the X-Forwarded-For client."""
    return request.client.host if request.client else ""


def _secret_guard(request: Request, gw: Services) -> SecretGuard:
    # One per app (per process), kept on the app's state: the admin API, the
    # dashboard's sign-in and /metrics share it, so the guesses add up.
    state = request.app.state
    guard: SecretGuard | None = getattr(state, "secret_guard", None)
    if guard is None:
        guard = state.secret_guard = SecretGuard(clock=lambda: gw.clock.now().timestamp())
    return guard


def check_secret(
    request: Request, gw: Services, presented: str | None, secrets: tuple[str, ...]
) -> Check:
    """``presented`` judged against ``secrets``, wrong guesses throttled per client."""
    admin = gw.config.admin
    return _secret_guard(request, gw).check(
        peer(request),
        presented,
        secrets,
        limit=admin.max_failures,
        window=admin.failure_window,
        throttle=request.scope.get(SIGNED_IN) is not True,
    )


def too_many_attempts(retry_after: int) -> TooManyAttempts:
    return TooManyAttempts(
        f"Too many wrong tokens from this address; try again in {retry_after} seconds.",
        headers=[(b"retry-after", str(retry_after).encode())],
    )


def token_refusal(
    request: Request,
    gw: Services,
    secrets: tuple[str, ...],
    *,
    realm: str = "admin",
    message: str = "A valid admin token is required.",
) -> Response | None:
    """None when the request's bearer token is one of ``secrets``; else the 401, or
    the 429 of a client that has guessed too often (its token not even looked at)."""
    authorization = request.headers.get("authorization", "").encode("latin-1") or None
    check = check_secret(request, gw, bearer_token(authorization), secrets)
    if check.retry_after is not None:
        return error_response(gw, too_many_attempts(check.retry_after), realm=realm)
    if not check.accepted:
        return error_response(gw, Unauthorized(message), realm=realm)
    return None


def _admin(handler: Any) -> Any:
    """Guard an admin endpoint: off without a token, 401 without the right one, 429
    after too many wrong ones, gateway errors rendered in the error shape."""

    async def guarded(request: Request) -> Response:
        gw = services(request)
        if not gw.config.admin.token:
            return Response(status_code=404)
        refusal = token_refusal(request, gw, (gw.config.admin.token,))
        if refusal is not None:
            return refusal
        try:
            response: Response = await handler(request, gw)
            return response
        except GatewayError as exc:
            return error_response(gw, exc)

    guarded.__name__ = handler.__name__
    guarded.__doc__ = handler.__doc__
    return guarded


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {raw!r}.") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}: expected {low} to {high}, got {value}.")
    return value


def _choice(request: Request, name: str, choices: tuple[str, ...], default: str) -> str:
    value = request.query_params.get(name, default)
    if value not in choices:
        raise BadRequest(f"{name}: expected one of {', '.join(choices)}, got {value!r}.")
    return value


def _date(request: Request, name: str, default: date) -> date:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected a date as YYYY-MM-DD, got {raw!r}.") from None


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


# --- endpoints --------------------------------------------------------------------


@_admin
async def list_users(request: Request, gw: Services) -> Response:
    """Users with their plan, lifetime and today's usage; paginated, sortable."""
    limit = int_param(request, "limit", 50, 1, MAX_PAGE)
    offset = int_param(request, "offset", 0, 0, 10**9)
    sort = cast(
        Literal["id", "lifetime_tokens", "tokens_today"], _choice(request, "sort", _SORTS, "id")
    )
    order = _choice(request, "order", ("asc", "desc"), "asc")
    plan = request.query_params.get("plan") or None
    search = request.query_params.get("search") or None
    summaries = await gw.storage.list_users(
        day=gw.today(),
        plan=plan,
        search=search,
        sort=sort,
        descending=order == "desc",
        limit=limit,
        offset=offset,
    )
    total = await gw.storage.count_users(plan=plan, search=search)
    data = [
        {
            "id": s.user.id,
            "plan": s.user.plan,
            "team": s.user.team,
            "created_at": s.user.created_at.isoformat(),
            "lifetime": lifetime_dict(s.user, gw.currency),
            "today": daily_dict(s.today, gw.currency),
        }
        for s in summaries
    ]
    return json_response(gw, {"total": total, "limit": limit, "offset": offset, "data": data})


@_admin
async def list_alerts(request: Request, gw: Services) -> Response:
    """Threshold crossings, newest first, with how their deliveries went."""
    limit = int_param(request, "limit", 100, 1, MAX_PAGE)
    user_id = request.query_params.get("user") or None
    alerts = await gw.storage.list_alerts(user_id=user_id, limit=limit)
    return json_response(gw, {"data": [alert_dict(a) for a in alerts]})


@_admin
async def get_user(request: Request, gw: Services) -> Response:
    """One user: plan, overrides, limits and usage, keys, daily history."""
    days = int_param(request, "days", 30, 1, MAX_DAYS)
    return json_response(gw, await gw.reports.detail(request.path_params["user_id"], days=days))


@_admin
async def set_plan(request: Request, gw: Services) -> Response:
    """Move a user to another plan."""
    user_id = request.path_params["user_id"]
    plan = (await _json_body(request)).get("plan")
    if not isinstance(plan, str):
        raise BadRequest("plan: expected the name of a configured plan.")
    await gw.accounts.set_plan(user_id, plan)
    return json_response(gw, {"id": user_id, "plan": plan})


def _limit_name(request: Request) -> str:
    name: str = request.path_params["name"]
    if not is_override_name(name):
        raise NotFound(
            f"No limit named {name!r} (limits: {', '.join(LIMIT_NAMES)}, "
            "or limits.NAME for a [[plans.NAME.limits]] entry)."
        )
    return name


@_admin
async def set_limit(request: Request, gw: Services) -> Response:
    """Override one plan limit for a user (`{"value": N}`; null is unlimited)."""
    user_id, name = request.path_params["user_id"], _limit_name(request)
    body = await _json_body(request)
    if "value" not in body:
        raise BadRequest(
            "value: required (a number, null for unlimited, or a boolean for advanced_rag)."
        )
    value = await gw.accounts.set_override(user_id, name, body["value"])
    return json_response(gw, {"id": user_id, "name": name, "value": value})


@_admin
async def clear_limit(request: Request, gw: Services) -> Response:
    """Remove a per-user override: the plan's limit applies again."""
    user_id, name = request.path_params["user_id"], _limit_name(request)
    await gw.accounts.clear_override(user_id, name)
    return json_response(gw, {"id": user_id, "name": name, "value": "plan"})


# --- teams (issue 21) ---


@_admin
async def list_teams(request: Request, gw: Services) -> Response:
    """Every team: its plan, member count and today's usage (members summed)."""
    data = [
        {
            "id": summary.team.id,
            "plan": summary.team.plan,
            "overrides": dict(summary.team.overrides),
            "members": summary.members,
            "created_at": summary.team.created_at.isoformat(),
            "today": daily_dict(summary.today, gw.currency),
        }
        for summary in await gw.storage.list_teams(day=gw.today())
    ]
    return json_response(gw, {"data": data})


@_admin
async def create_team(request: Request, gw: Services) -> Response:
    """Create a team on a plan (`{"id": "acme", "plan": "pro"}`); 409 if it exists."""
    body = await _json_body(request)
    team_id, plan = body.get("id"), body.get("plan")
    if not isinstance(team_id, str):
        raise BadRequest("id: expected the team's id.")
    if not isinstance(plan, str):
        raise BadRequest("plan: expected the name of a configured plan.")
    team = await gw.accounts.create_team(team_id, plan=plan)
    return json_response(
        gw,
        {"id": team.id, "plan": team.plan, "created_at": team.created_at.isoformat()},
        status=201,
    )


@_admin
async def get_team(request: Request, gw: Services) -> Response:
    """One team: plan, overrides, limits and usage (members summed), members, daily history."""
    days = int_param(request, "days", 30, 1, MAX_DAYS)
    return json_response(gw, await gw.reports.team(request.path_params["team_id"], days=days))


@_admin
async def set_team_plan(request: Request, gw: Services) -> Response:
    """Move a team to another plan."""
    team_id = request.path_params["team_id"]
    plan = (await _json_body(request)).get("plan")
    if not isinstance(plan, str):
        raise BadRequest("plan: expected the name of a configured plan.")
    await gw.accounts.set_team_plan(team_id, plan)
    return json_response(gw, {"id": team_id, "plan": plan})


@_admin
async def set_team_limit(request: Request, gw: Services) -> Response:
    """Override one plan limit for a team (`{"value": N}`; null is unlimited)."""
    team_id, name = request.path_params["team_id"], _limit_name(request)
    body = await _json_body(request)
    if "value" not in body:
        raise BadRequest(
            "value: required (a number, null for unlimited, or a boolean for advanced_rag)."
        )
    value = await gw.accounts.set_team_override(team_id, name, body["value"])
    return json_response(gw, {"id": team_id, "name": name, "value": value})


@_admin
async def clear_team_limit(request: Request, gw: Services) -> Response:
    """Remove a per-team override: the team's plan's limit applies again."""
    team_id, name = request.path_params["team_id"], _limit_name(request)
    await gw.accounts.clear_team_override(team_id, name)
    return json_response(gw, {"id": team_id, "name": name, "value": "plan"})


@_admin
async def set_user_team(request: Request, gw: Services) -> Response:
    """Put a user in a team (`{"team": "acme"}`), or in none (`{"team": null}`)."""
    user_id = request.path_params["user_id"]
    body = await _json_body(request)
    if "team" not in body or not isinstance(body["team"], str | None):
        raise BadRequest("team: required (a team's id, or null for none).")
    await gw.accounts.set_team(user_id, body["team"])
    return json_response(gw, {"id": user_id, "team": body["team"]})


@_admin
async def create_key(request: Request, gw: Services) -> Response:
    """Create a key for a user; the secret is in this response only."""
    user_id = request.path_params["user_id"]
    name = (await _json_body(request)).get("name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise BadRequest("name: expected a string of at most 200 characters.")
    record, secret = await gw.accounts.create_key(user_id, name=name)
    return json_response(
        gw,
        {
            "id": record.id,
            "user_id": record.user_id,
            "name": record.name,
            "prefix": record.prefix,
            "created_at": record.created_at.isoformat(),
            "key": secret,
        },
        status=201,
    )


@_admin
async def revoke_key(request: Request, gw: Services) -> Response:
    """Revoke a key; it stops working at once in this process."""
    key = await gw.accounts.revoke_key(request.path_params["key_id"])
    assert key.revoked_at is not None
    return json_response(
        gw, {"id": key.id, "user_id": key.user_id, "revoked_at": key.revoked_at.isoformat()}
    )


def _export(dataset: Dataset) -> Any:
    async def export(request: Request, gw: Services) -> Response:
        today = gw.today()
        start = _date(request, "from", today - timedelta(days=29))
        end = _date(request, "to", today)
        if end < start:
            raise BadRequest("to: must not be before from.")
        fmt = cast(Format, _choice(request, "format", ("csv", "json"), "csv"))
        user_id = request.query_params.get("user") or None
        columns, source = rows(
            gw.storage, dataset, start, end, user_id=user_id, currency=gw.currency
        )
        media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
        filename = f"{dataset}-{start.isoformat()}-{end.isoformat()}{'-' + user_id if user_id else ''}.{fmt}"
        # An ASCII name for every client, and the whole name (a user id in any
        # script) as RFC 6266's filename*: a header holds Latin-1 only, and a
        # letter past it failed the export (500; review-auth A4).
        safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-._" else "_" for c in filename)
        disposition = (
            f"attachment; filename=\"{safe}\"; filename*=UTF-8''{quote(filename, safe='')}"
        )
        return StreamingResponse(
            _guarded_stream(encode(columns, source, fmt)),
            media_type=media,
            headers={"content-disposition": disposition},
        )

    export.__name__ = f"export_{dataset}"
    export.__doc__ = f"Export the {'ledger' if dataset == 'events' else 'daily rows'} for a date range, streamed."
    return _admin(export)


async def _guarded_stream(chunks: Any) -> Any:
    # Headers are sent by now: a storage failure can only cut the body short,
    # which the missing closing bracket / short CSV makes visible.
    try:
        async for chunk in chunks:
            yield chunk
    except StorageError:
        return


async def openapi(request: Request) -> Response:
    gw = services(request)
    if not gw.config.admin.token:
        return Response(status_code=404)
    from gateway.openapi import document

    return json_response(gw, document())


admin_routes: list[BaseRoute] = [
    Route("/users", list_users, methods=["GET"]),
    Route("/users/{user_id:path}", get_user, methods=["GET"]),
    Route("/users/{user_id:path}/plan", set_plan, methods=["PUT"]),
    Route("/users/{user_id:path}/limits/{name}", set_limit, methods=["PUT"]),
    Route("/users/{user_id:path}/limits/{name}", clear_limit, methods=["DELETE"]),
    Route("/users/{user_id:path}/team", set_user_team, methods=["PUT"]),
    Route("/users/{user_id:path}/keys", create_key, methods=["POST"]),
    Route("/teams", list_teams, methods=["GET"]),
    Route("/teams", create_team, methods=["POST"]),
    Route("/teams/{team_id}", get_team, methods=["GET"]),
    Route("/teams/{team_id}/plan", set_team_plan, methods=["PUT"]),
    Route("/teams/{team_id}/limits/{name}", set_team_limit, methods=["PUT"]),
    Route("/teams/{team_id}/limits/{name}", clear_team_limit, methods=["DELETE"]),
    Route("/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/alerts", list_alerts, methods=["GET"]),
    Route("/export/events", _export("events"), methods=["GET"]),
    Route("/export/daily", _export("daily"), methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
