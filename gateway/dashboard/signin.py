"""Signing in and out, and the checks around every signed-in handler.

`signed_in` turns a handler that takes a `Page` into an endpoint. It answers 404
when no admin token is configured, sends a browser without a valid session to the
sign-in form, and refuses a POST that comes from another origin or lacks its
session's CSRF token. `login` checks the admin token and sets the session cookie
(see `gateway.dashboard.session`); its wrong guesses are throttled per client with
the admin API's (`gateway.admin.check_secret`).
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.admin import check_secret
from gateway.dashboard.formats import NumberFormat, number_format
from gateway.dashboard.render import Html, document, forbidden, message, not_found, render
from gateway.dashboard.session import (
    COOKIE,
    csrf_token,
    new_session,
    safe_next,
    same_origin,
    session_key,
    session_valid,
)
from gateway.errors import GatewayError
from gateway.services import Services

_MAX_FORM_BYTES: Final = 16 * 1024

# --- requests ---------------------------------------------------------------------


def base_path(request: Request) -> str:
    # Where the dashboard is mounted ("/dashboard"), including any proxy root path.
    return str(request.scope.get("root_path", "")).rstrip("/")


async def read_form(request: Request) -> dict[str, str] | None:
    """An urlencoded form body (the first value of each field); None when too large."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return None
    form: dict[str, str] = {}
    for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        form.setdefault(name, value)
    return form


# --- signed-in handlers -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    """What a signed-in handler works with."""

    request: Request
    gateway: Services  # what the pages use (gateway/services.py)
    base: str
    csrf: str
    numbers: NumberFormat
    form: Mapping[str, str] = field(default_factory=dict)

    def document(
        self, title: str, body: Html, *, script: bool = False, status: int = 200
    ) -> HTMLResponse:
        return document(self.base, title, body, csrf=self.csrf, script=script, status=status)

    def csrf_field(self) -> Html:
        return render('<input type="hidden" name="csrf" value="{csrf}">', csrf=self.csrf)


Handler = Callable[[Page], Awaitable[Response]]


def signed_in(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Sign-in, origin and CSRF checks around a page or form handler."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        gateway: Services = request.app.state.services
        token = gateway.config.admin.token
        if not token:
            return not_found()
        base = base_path(request)
        post = request.method == "POST"
        if post and not same_origin(request.headers):
            return forbidden(base)
        key = session_key(token)
        session = request.cookies.get(COOKIE, "")
        if not session_valid(key, session, now=gateway.clock.now().timestamp()):
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            target = safe_next(back if not post else None, base)
            return RedirectResponse(f"{base}/login?{urlencode({'next': target})}", 303)
        csrf = csrf_token(key, session)
        form: Mapping[str, str] = {}
        if post:
            parsed = await read_form(request)
            if parsed is None:
                return message(base, "Too large", "The form is too large.", status=413)
            if not hmac.compare_digest(parsed.get("csrf", "").encode(), csrf.encode()):
                return forbidden(base)
            form = parsed
        page = Page(
            request=request,
            gateway=gateway,
            base=base,
            csrf=csrf,
            numbers=number_format(gateway.config.dashboard.locale),
            form=form,
        )
        try:
            return await handler(page)
        except GatewayError as exc:
            title = "Not found" if exc.status == 404 else "Could not do that"
            return message(base, title, exc.message, status=exc.status, csrf=csrf)

    return endpoint


# --- sign-in and sign-out ---------------------------------------------------------

_LOGIN = """<section class="card login">
<h1>Sign in</h1>
{error}<form method="post" action="{base}/login">
<input type="hidden" name="next" value="{next}">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>
</section>
"""


async def login(request: Request) -> Response:
    gateway: Services = request.app.state.services
    token = gateway.config.admin.token
    if not token:
        return not_found()
    base = base_path(request)
    now = gateway.clock.now().timestamp()
    key = session_key(token)
    if request.method != "POST":
        target = safe_next(request.query_params.get("next"), base)
        if session_valid(key, request.cookies.get(COOKIE, ""), now=now):
            return RedirectResponse(target, 303)
        return document(base, "Sign in", render(_LOGIN, base=base, next=target, error=""))
    if not same_origin(request.headers):
        return forbidden(base)
    form = await read_form(request)
    if form is None:
        return message(base, "Too large", "The form is too large.", status=413)
    target = safe_next(form.get("next"), base)
    # The admin API's check: wrong guesses from this address add up there too.
    check = check_secret(request, gateway, form.get("token") or None, (token,))
    if check.retry_after is not None:
        error = render(
            '<p class="notice error" role="alert">Too many wrong tokens from this address. '
            "Try again in {seconds} seconds.</p>\n",
            seconds=str(check.retry_after),
        )
        body = render(_LOGIN, base=base, next=target, error=error)
        refused = document(base, "Sign in", body, status=429)
        refused.headers["retry-after"] = str(check.retry_after)
        return refused
    if not check.accepted:
        error = Html('<p class="notice error" role="alert">That is not the admin token.</p>\n')
        body = render(_LOGIN, base=base, next=target, error=error)
        return document(base, "Sign in", body, status=401)
    settings = gateway.config.dashboard
    response = RedirectResponse(target, 303)
    response.set_cookie(
        COOKIE,
        new_session(key, now=now, hours=settings.session_hours),
        max_age=int(settings.session_hours * 3600),
        path=base or "/",
        secure=settings.secure_cookie,
        httponly=True,
        samesite="strict",
    )
    return response


@signed_in
async def logout(page: Page) -> Response:
    response = RedirectResponse(f"{page.base}/login", 303)
    response.delete_cookie(
        COOKIE,
        path=page.base or "/",
        secure=page.gateway.config.dashboard.secure_cookie,
        httponly=True,
        samesite="strict",
    )
    return response
