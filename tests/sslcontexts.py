"""httpx's `create_ssl_context`, building each context of the default arguments
once per process (`tests/conftest.py` patches the pytest process with it, and
`tests/forkserver.py` its server, before the fork, for the `gateway serve`
children). No pytest import: the fork server loads this module."""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any


def shared(create: Any) -> Any:
    """``create`` (an httpx ``create_ssl_context``), building each context of the
    default arguments once. Every httpx client builds an SSL context by loading the
    whole CA bundle (about 25 ms of CPU) even when it only speaks plain HTTP to
    127.0.0.1; the contexts of one set of arguments are alike. Which bundle that
    is comes from SSL_CERT_FILE or SSL_CERT_DIR when ``trust_env`` (read at each
    call): they are part of the key, for a process whose environment says
    otherwise."""

    @functools.cache
    def default(verify: bool, trust_env: bool, where: tuple[str | None, ...]) -> ssl.SSLContext:
        context: ssl.SSLContext = create(verify=verify, trust_env=trust_env)
        return context

    def shared_create(
        verify: ssl.SSLContext | str | bool = True, cert: Any = None, trust_env: bool = True
    ) -> ssl.SSLContext:
        if isinstance(verify, bool) and cert is None:
            where = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
            return default(verify, trust_env, where if trust_env else ())
        context: ssl.SSLContext = create(verify=verify, cert=cert, trust_env=trust_env)
        return context

    return shared_create
