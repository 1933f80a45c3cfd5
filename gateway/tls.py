"""The TLS context of the gateway's outgoing clients: one per process.

httpx builds a new context for each client it makes, loading the whole CA
bundle (about 40 ms of CPU, on the event loop) even for a client that only
speaks plain HTTP; `gateway serve` makes one client per upstream at start, plus
the alerts' webhook client. The contexts of one CA source are alike, so one is
made per source and shared. Shared safely: the gateway's clients speak HTTP/1.1
only, so the one setting a client writes on the context (ALPN, "http/1.1") is
the same for all of them.
"""

from __future__ import annotations

import os
import ssl

import httpx

_contexts: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def client_context() -> ssl.SSLContext:
    """httpx's verifying default context (certifi's CA bundle, or the one
    $SSL_CERT_FILE or $SSL_CERT_DIR names, as httpx reads them), made once per
    CA source."""
    source = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    context = _contexts.get(source)
    if context is None:
        context = _contexts[source] = httpx.create_ssl_context()
    return context
