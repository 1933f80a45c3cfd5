"""HTML for the dashboard: escaping, the page layout and the standard responses.

Templates are ``str.format`` strings filled by `render`, which escapes every value
that is not already `Html`, so a user id like ``<script>`` prints as text. Every
page carries the same headers: never stored by a cache, and a
Content-Security-Policy that allows nothing from another origin. The stylesheet
and script URLs carry a hash of the files.
"""

from __future__ import annotations

import hashlib
import html
import importlib.resources
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote

from starlette.responses import HTMLResponse, PlainTextResponse, Response

# --- escaping ---------------------------------------------------------------------


class Html(str):
    """Text that is already HTML: inserted into templates unchanged."""

    __slots__ = ()


def escape(value: object) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def render(template: str, /, **values: object) -> Html:
    """``template`` with each ``{name}`` replaced by its value, escaped unless it is Html."""
    return Html(template.format_map({name: escape(value) for name, value in values.items()}))


def concat(parts: Iterable[Html]) -> Html:
    return Html("".join(parts))


# --- the layout and the standard responses ----------------------------------------

_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def _static_version() -> str:
    # Computed once: a new release changes the URLs, so browsers never mix old and new.
    digest = hashlib.sha256()
    folder = importlib.resources.files("gateway") / "static"
    for name in ("dashboard.css", "dashboard.js"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


_VERSION: Final = _static_version()

_LAYOUT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title} · Gateway admin</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{base}/static/dashboard.css?v={version}">
{script}</head>
<body>
<header class="top">
<a class="brand" href="{base}/">Gateway <span>admin</span></a>
{nav}</header>
<main>
{body}</main>
</body>
</html>
"""

_NAV = """<nav>
<a href="{base}/">Users</a>
<a href="{base}/teams">Teams</a>
<a href="{base}/alerts">Alerts</a>
<form method="post" action="{base}/logout">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit" class="link">Sign out</button>
</form>
</nav>
"""

_SCRIPT = '<script src="{base}/static/dashboard.js?v={version}" defer></script>\n'


def document(
    base: str,
    title: str,
    body: Html,
    *,
    csrf: str | None = None,
    script: bool = False,
    status: int = 200,
) -> HTMLResponse:
    page = render(
        _LAYOUT,
        title=title,
        base=base,
        version=_VERSION,
        script=render(_SCRIPT, base=base, version=_VERSION) if script else Html(""),
        nav=render(_NAV, base=base, csrf=csrf) if csrf is not None else Html(""),
        body=body,
    )
    return HTMLResponse(page, status_code=status, headers=_HEADERS)


def not_found() -> Response:
    # The same answer as for any unknown path: the admin surface is off.
    return PlainTextResponse("Not Found", status_code=404)


def message(base: str, title: str, text: str, *, status: int, csrf: str | None = None) -> Response:
    body = render('<h1>{title}</h1>\n<p class="notice error">{text}</p>\n', title=title, text=text)
    return document(base, title, body, csrf=csrf, status=status)


def forbidden(base: str) -> Response:
    return message(
        base,
        "Refused",
        "This form came from another site or has expired. Reload the page and try again.",
        status=403,
    )


# --- pieces shared by the pages ---------------------------------------------------


def badge(text: str, value: int) -> Html:
    """A count that stands out (the token counts), dimmed when it is zero."""
    return render(
        '<span class="{cls}">{text}</span>', cls="badge" if value else "badge zero", text=text
    )


def options(values: Iterable[tuple[str, str]], selected: str) -> Html:
    return concat(
        render(
            '<option value="{value}"{sel}>{label}</option>',
            value=value,
            label=label,
            sel=Html(" selected") if value == selected else Html(""),
        )
        for value, label in values
    )


def user_path(base: str, user_id: str) -> str:
    # Quoted whole: a user id may contain "/" (the route takes a path parameter).
    return f"{base}/users/{quote(user_id, safe='')}"


def team_path(base: str, team_id: str) -> str:
    return f"{base}/teams/{quote(team_id, safe='')}"
