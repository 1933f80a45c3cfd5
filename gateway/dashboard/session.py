"""The dashboard's session cookie, CSRF token and origin checks (pure, no I/O).

- Signing in sets a stateless session cookie: an expiry time and a nonce, signed
  with HMAC-SHA256 under a key derived from the admin token, so rotating the token
  ends every session.
- Each state-changing POST carries a CSRF token (an HMAC of the session value) and
  must not come from another origin (the ``Origin`` header, when sent, names this
  host): OWASP's "signed double-submit" and "verify the origin" defences.
- After signing in, the browser goes back only to a path inside the dashboard.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final
from urllib.parse import urlsplit

from starlette.datastructures import Headers

COOKIE: Final = "gateway_dashboard"


def session_key(admin_token: str) -> bytes:
    # A key of its own rather than the token: a cookie never reveals anything the
    # admin API would accept, and a new token invalidates every cookie.
    return hmac.new(admin_token.encode(), b"gateway dashboard session v1", hashlib.sha256).digest()


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()


def new_session(key: bytes, *, now: float, hours: float) -> str:
    expires = str(int(now + hours * 3600))
    nonce = secrets.token_urlsafe(12)
    return f"{expires}.{nonce}.{_mac(key, 'session', expires, nonce)}"


def session_valid(key: bytes, value: str, *, now: float) -> bool:
    expires, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    # isascii: str.isdigit() also accepts digits that int() refuses ("²").
    if not (expires.isascii() and expires.isdigit() and len(expires) < 16 and nonce and mac):
        return False
    good = hmac.compare_digest(mac.encode(), _mac(key, "session", expires, nonce).encode())
    return good and int(expires) > now


def csrf_token(key: bytes, session: str) -> str:
    return _mac(key, "csrf", session)


def same_origin(headers: Headers) -> bool:
    """False when the browser says the request comes from another origin."""
    origin = headers.get("origin")
    if origin is None:
        # Older browsers omit Origin on same-origin form posts; Fetch Metadata still tells.
        return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    host = headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc.lower() == host.lower()


def safe_next(value: str | None, base: str) -> str:
    """Where to go after signing in: a path inside the dashboard, nothing else."""
    if (
        value
        and value.startswith(base + "/")
        and "//" not in value
        and "\\" not in value
        and all(32 < ord(c) < 127 for c in value)
    ):
        return value
    return base + "/"
