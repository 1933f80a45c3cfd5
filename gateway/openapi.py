"""The OpenAPI 3.1 document of the admin API (served at /admin/openapi.json).

Written out by hand so that it says what the API promises; a test checks that it
names exactly the routes `gateway.admin.admin_routes` serves.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.config import LIMIT_NAMES

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Invalid parameters",
        401: "Missing or wrong admin token",
        404: "No such user, team, key or limit",
        409: "A team of that id exists already",
        429: "Too many wrong admin tokens from this address; see Retry-After",
    }
    if 401 in codes:
        # Every endpoint that takes the token throttles wrong guesses (docs/admin.md).
        codes = (*codes, 429)
    return {str(code): _json(_ERROR, text[code]) for code in codes}


_USER_ID = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "description": "The user's id, percent-encoded: an id may hold '/' (%2F).",
    "schema": {"type": "string"},
}
_TEAM_ID = {"name": "team_id", "in": "path", "required": True, "schema": {"type": "string"}}
_DAYS = {
    "name": "days",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 366, "default": 30},
}
_PLAN_BODY = {
    "required": True,
    **_json(
        {"type": "object", "required": ["plan"], "properties": {"plan": {"type": "string"}}},
        "The plan",
    ),
}
_LIMIT_BODY = {
    "required": True,
    **_json(
        {
            "type": "object",
            "required": ["value"],
            "properties": {
                "value": {"type": ["number", "boolean", "null"], "description": "null: unlimited"}
            },
        },
        "The new limit",
    ),
}
_LIMIT = {
    "name": "name",
    "in": "path",
    "required": True,
    # A plan key, or limits.NAME for a [[plans.NAME.limits]] entry.
    "schema": {"anyOf": [{"enum": list(LIMIT_NAMES)}, {"type": "string", "pattern": "^limits\\."}]},
}
_EXPORT_PARAMS = [
    {
        "name": "from",
        "in": "query",
        "schema": {"type": "string", "format": "date"},
        "description": "First day (default: 29 days ago)",
    },
    {
        "name": "to",
        "in": "query",
        "schema": {"type": "string", "format": "date"},
        "description": "Last day, inclusive (default: today)",
    },
    {"name": "user", "in": "query", "schema": {"type": "string"}, "description": "Only this user"},
    {
        "name": "format",
        "in": "query",
        "schema": {"type": "string", "enum": ["csv", "json"], "default": "csv"},
    },
]
_EXPORT_BODY = {
    "description": "Rows, streamed (CSV with a header line, or a JSON array)",
    "content": {
        "text/csv": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
    },
}
_DAY = {
    "type": "object",
    "properties": {
        name: {"type": "string"} if name in ("day", "cost", "currency") else {"type": "integer"}
        for name in (
            "day",
            "queries",
            "advanced_rag",
            "web_searches",
            "uploads",
            "upload_bytes",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost",
            "currency",
        )
    },
}
_LIFETIME = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "cost": {"type": "string", "description": "Exact decimal"},
        "currency": {"type": "string", "description": "ISO 4217 code of cost"},
    },
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gateway admin API",
            "version": __version__,
            "description": "Users, plans, overrides, keys and usage exports. "
            "Authorise with `Authorization: Bearer <admin token>`.",
        },
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Alert": {
                    "type": "object",
                    "properties": {
                        "user_id": {"type": "string"},
                        "limit": {
                            "type": "string",
                            "enum": [
                                "queries_per_day",
                                "tokens_per_day",
                                "tokens_per_month",
                                "web_searches_per_day",
                            ],
                        },
                        "period": {"type": "string"},
                        "threshold": {"type": "integer"},
                        "limit_value": {"type": "integer"},
                        "used": {"type": "integer"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "deliveries": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "channel": {"type": "string", "enum": ["webhook", "email"]},
                                    "status": {
                                        "type": "string",
                                        "enum": ["pending", "delivered", "failed"],
                                    },
                                    "attempts": {"type": "integer"},
                                    "last_error": {"type": ["string", "null"]},
                                    "delivered_at": {
                                        "type": ["string", "null"],
                                        "format": "date-time",
                                    },
                                },
                            },
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["code", "message", "status"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "status": {"type": "integer"},
                    },
                },
                "Day": _DAY,
                "Lifetime": _LIFETIME,
            },
        },
        "security": [{"adminToken": []}],
        "paths": {
            "/admin/users": {
                "get": {
                    "operationId": "listUsers",
                    "summary": "Users with their plan, lifetime and today's usage",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 500,
                                "default": 50,
                            },
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0, "default": 0},
                        },
                        {
                            "name": "sort",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": ["id", "lifetime_tokens", "tokens_today"],
                                "default": "id",
                            },
                        },
                        {
                            "name": "order",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["asc", "desc"], "default": "asc"},
                        },
                        {"name": "plan", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "search",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Ids containing this text (case-insensitive)",
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "total": {"type": "integer"},
                                    "limit": {"type": "integer"},
                                    "offset": {"type": "integer"},
                                    "data": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "id": {"type": "string"},
                                                "plan": {"type": "string"},
                                                "team": {
                                                    "type": ["string", "null"],
                                                    "description": "The user's team; null: none",
                                                },
                                                "created_at": {
                                                    "type": "string",
                                                    "format": "date-time",
                                                },
                                                "lifetime": {
                                                    "$ref": "#/components/schemas/Lifetime"
                                                },
                                                "today": {"$ref": "#/components/schemas/Day"},
                                            },
                                        },
                                    },
                                },
                            },
                            "A page of users",
                        ),
                        **_errors(400, 401),
                    },
                }
            },
            "/admin/users/{user_id}": {
                "get": {
                    "operationId": "getUser",
                    "summary": "One user: plan, overrides, limits (the plan keys and each [[plans.NAME.limits]] entry, the team's too: used, limit, remaining, resets_at; money as decimal strings) and usage (this month per model and per upstream), keys, daily history",
                    "parameters": [
                        _USER_ID,
                        {
                            "name": "days",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 366,
                                "default": 30,
                            },
                        },
                    ],
                    "responses": {
                        "200": _json({"type": "object"}, "The user"),
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/admin/users/{user_id}/plan": {
                "put": {
                    "operationId": "setPlan",
                    "summary": "Move a user to another plan",
                    "parameters": [_USER_ID],
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "required": ["plan"],
                                "properties": {"plan": {"type": "string"}},
                            },
                            "The plan",
                        ),
                    },
                    "responses": {
                        "200": _json({"type": "object"}, "Done"),
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/admin/users/{user_id}/limits/{name}": {
                "put": {
                    "operationId": "setLimit",
                    "summary": "Override one plan limit for a user",
                    "parameters": [_USER_ID, _LIMIT],
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "required": ["value"],
                                "properties": {
                                    "value": {
                                        "type": ["number", "boolean", "null"],
                                        "description": "null: unlimited",
                                    }
                                },
                            },
                            "The new limit",
                        ),
                    },
                    "responses": {
                        "200": _json({"type": "object"}, "Done"),
                        **_errors(400, 401, 404),
                    },
                },
                "delete": {
                    "operationId": "clearLimit",
                    "summary": "Remove a per-user override",
                    "parameters": [_USER_ID, _LIMIT],
                    "responses": {"200": _json({"type": "object"}, "Done"), **_errors(401, 404)},
                },
            },
            "/admin/users/{user_id}/team": {
                "put": {
                    "operationId": "setUserTeam",
                    "summary": "Put a user in a team, or (null) in none",
                    "parameters": [_USER_ID],
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "required": ["team"],
                                "properties": {"team": {"type": ["string", "null"]}},
                            },
                            "The team",
                        ),
                    },
                    "responses": {
                        "200": _json({"type": "object"}, "Done"),
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/admin/teams": {
                "get": {
                    "operationId": "listTeams",
                    "summary": "Every team with its plan, member count and today's usage (members summed)",
                    "responses": {
                        "200": _json({"type": "object"}, "The teams"),
                        **_errors(401),
                    },
                },
                "post": {
                    "operationId": "createTeam",
                    "summary": "Create a team on a plan",
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "required": ["id", "plan"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "plan": {"type": "string"},
                                },
                            },
                            "The team",
                        ),
                    },
                    "responses": {
                        "201": _json({"type": "object"}, "Created"),
                        **_errors(400, 401, 409),
                    },
                },
            },
            "/admin/teams/{team_id}": {
                "get": {
                    "operationId": "getTeam",
                    "summary": "One team: plan, overrides, limits (the plan keys and each [[plans.NAME.limits]] entry) and usage (members summed; this month per upstream), members, daily history",
                    "parameters": [_TEAM_ID, _DAYS],
                    "responses": {
                        "200": _json({"type": "object"}, "The team"),
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/admin/teams/{team_id}/plan": {
                "put": {
                    "operationId": "setTeamPlan",
                    "summary": "Move a team to another plan",
                    "parameters": [_TEAM_ID],
                    "requestBody": _PLAN_BODY,
                    "responses": {
                        "200": _json({"type": "object"}, "Done"),
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/admin/teams/{team_id}/limits/{name}": {
                "put": {
                    "operationId": "setTeamLimit",
                    "summary": "Override one plan limit for a team",
                    "parameters": [_TEAM_ID, _LIMIT],
                    "requestBody": _LIMIT_BODY,
                    "responses": {
                        "200": _json({"type": "object"}, "Done"),
                        **_errors(400, 401, 404),
                    },
                },
                "delete": {
                    "operationId": "clearTeamLimit",
                    "summary": "Remove a per-team override",
                    "parameters": [_TEAM_ID, _LIMIT],
                    "responses": {"200": _json({"type": "object"}, "Done"), **_errors(401, 404)},
                },
            },
            "/admin/users/{user_id}/keys": {
                "post": {
                    "operationId": "createKey",
                    "summary": "Create a gateway key for a user (the secret is returned once)",
                    "parameters": [_USER_ID],
                    "requestBody": {
                        "required": False,
                        **_json(
                            {"type": "object", "properties": {"name": {"type": "string"}}},
                            "A label",
                        ),
                    },
                    "responses": {
                        "201": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string"},
                                    "user_id": {"type": "string"},
                                    "name": {"type": "string"},
                                    "prefix": {"type": "string"},
                                    "created_at": {"type": "string", "format": "date-time"},
                                    "key": {
                                        "type": "string",
                                        "description": "The secret, shown only here",
                                    },
                                },
                            },
                            "The new key",
                        ),
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/admin/keys/{key_id}": {
                "delete": {
                    "operationId": "revokeKey",
                    "summary": "Revoke a key",
                    "parameters": [
                        {
                            "name": "key_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": _json({"type": "object"}, "Revoked"), **_errors(401, 404)},
                }
            },
            "/admin/alerts": {
                "get": {
                    "operationId": "listAlerts",
                    "summary": "Threshold crossings, newest first, with their deliveries",
                    "parameters": [
                        {"name": "user", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "data": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Alert"},
                                    }
                                },
                            },
                            "Alerts",
                        ),
                        **_errors(400, 401),
                    },
                }
            },
            "/admin/export/events": {
                "get": {
                    "operationId": "exportEvents",
                    "summary": "The usage ledger for a date range, streamed",
                    "parameters": _EXPORT_PARAMS,
                    "responses": {"200": _EXPORT_BODY, **_errors(400, 401)},
                }
            },
            "/admin/export/daily": {
                "get": {
                    "operationId": "exportDaily",
                    "summary": "Daily rows for a date range, streamed",
                    "parameters": _EXPORT_PARAMS,
                    "responses": {"200": _EXPORT_BODY, **_errors(400, 401)},
                }
            },
            "/admin/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI document")},
                }
            },
        },
    }
