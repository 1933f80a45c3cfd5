"""The admin dashboard at /dashboard: a users table and a page per user
(docs/admin.md, "The dashboard").

Mounted by the app as ``Mount("/dashboard", routes=dashboard.routes)``; every
handler finds what it uses at ``request.app.state.services`` (gateway/services.py).
With no admin token configured the dashboard answers 404, like the admin API. The tables are complete
without JavaScript; the 30-day chart is drawn by ``static/dashboard.js``. Nothing
is loaded from another origin (the Content-Security-Policy says so too).

- `session`: the signed session cookie, the CSRF token, origin checks (pure)
- `signin`: signing in and out, and the checks around every signed-in handler
- `formats`: numbers and money for ``dashboard.locale`` (pure)
- `render`: HTML escaping, the page layout, the standard responses
- `users_table`, `user_page`, `teams_page`, `alerts_page`, `exports`: the pages and
  what they link to
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.dashboard.alerts_page import alerts
from gateway.dashboard.exports import export
from gateway.dashboard.render import not_found
from gateway.dashboard.session import COOKIE
from gateway.dashboard.signin import login, logout
from gateway.dashboard.teams_page import change_team_plan, team, teams
from gateway.dashboard.user_page import change_plan, change_team, create_key, revoke_key, user
from gateway.dashboard.users_table import users
from gateway.services import Services
from gateway.types import Receive, Scope, Send


class _Static:
    """The dashboard's CSS and JS, absent like the rest of it when no admin token is set."""

    def __init__(self) -> None:
        self.files = StaticFiles(packages=[("gateway", "static")])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Services = scope["app"].state.services
        response = self.files if gateway.config.admin.token else not_found()
        await response(scope, receive, send)


# Relative to the mount point: the app mounts them with Mount("/dashboard", routes=routes).
# POST routes come first: a user id may contain "/", so the user page's path pattern
# would match their paths too.
routes: list[BaseRoute] = [
    Route("/", users, methods=["GET"], name="dashboard_users"),
    Route("/alerts", alerts, methods=["GET"], name="dashboard_alerts"),
    Route("/login", login, methods=["GET", "POST"], name="dashboard_login"),
    Route("/logout", logout, methods=["POST"], name="dashboard_logout"),
    Route(
        "/users/{user_id:path}/keys/{key_id}/revoke",
        revoke_key,
        methods=["POST"],
        name="dashboard_revoke_key",
    ),
    Route("/users/{user_id:path}/keys", create_key, methods=["POST"], name="dashboard_create_key"),
    Route("/users/{user_id:path}/plan", change_plan, methods=["POST"], name="dashboard_plan"),
    Route("/users/{user_id:path}/team", change_team, methods=["POST"], name="dashboard_team"),
    Route("/teams", teams, methods=["GET"], name="dashboard_teams"),
    Route(
        "/teams/{team_id:path}/plan", change_team_plan, methods=["POST"], name="dashboard_team_plan"
    ),
    Route("/teams/{team_id:path}", team, methods=["GET"], name="dashboard_team"),
    Route("/users/{user_id:path}", user, methods=["GET"], name="dashboard_user"),
    Route("/export/events", export("events"), methods=["GET"], name="dashboard_export_events"),
    Route("/export/daily", export("daily"), methods=["GET"], name="dashboard_export_daily"),
    Mount("/static", app=_Static(), name="dashboard_static"),
]

__all__ = ["COOKIE", "routes"]
