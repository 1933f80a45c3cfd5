"""CSV and JSON exports from the dashboard, served by the admin API.

The user page links to /dashboard/export/events and /dashboard/export/daily; a
signed-in request there is handed, inside the same app, to the admin API's
streaming export endpoint, with the admin token added.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import SIGNED_IN
from gateway.dashboard.signin import Page, signed_in
from gateway.types import Receive, Scope, Send


class _AdminExport(Response):
    """Hands a signed-in request to the admin API's export endpoint, which streams the
    file. A link cannot carry the admin API's bearer token, and the session cookie is
    scoped to the dashboard; the parameters and output are the admin API's own."""

    def __init__(self, dataset: str, token: str) -> None:
        super().__init__()
        self.dataset, self.token = dataset, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = str(scope.get("app_root_path", ""))
        path = f"{root}/admin/export/{self.dataset}"
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"authorization", b"cookie")]
        headers.append((b"authorization", f"Bearer {self.token}".encode()))
        inner = {k: v for k, v in scope.items() if k not in ("path_params", "endpoint", "route")}
        inner.update(path=path, raw_path=path.encode(), root_path=root, headers=headers)
        # Signed in with a session: the admin API does not throttle this request.
        inner[SIGNED_IN] = True
        await scope["app"](inner, receive, send)


def export(dataset: Literal["events", "daily"]) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint for one dataset, behind the dashboard's sign-in."""

    async def handler(page: Page) -> Response:
        return _AdminExport(dataset, page.gateway.config.admin.token)

    handler.__name__ = f"export_{dataset}"
    return signed_in(handler)
