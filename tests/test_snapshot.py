"""A request's view of an upstream (`gateway.snapshot.Target`): what it sends
there, and what it never shows (review 8)."""

from __future__ import annotations

from typing import Any

from gateway.config import parse_config
from gateway.snapshot import Target, build_snapshot

KEY = "sk-operator-key-123456"
SECRET = "pk-portkey-secret-7f3a"


def _target(**table: Any) -> Target:
    upstream = {
        "kind": "openai",
        "url": "https://router.example/v1",
        "api_key_env": "K",
        "mount": "/v1",
        **table,
    }
    config = parse_config({"upstreams": {"router": upstream}}, env={"K": KEY, "S": SECRET})
    return build_snapshot(config, None).targets["router"]  # type: ignore[arg-type]


def test_a_client_header_in_another_spelling_of_an_operators_underscored_name_is_dropped() -> None:
    # R8-1. The operator's header is spelled with underscores (a token: allowed
    # at load). A server reading headers as CGI variables takes the client's
    # x-tenant for it (both HTTP_X_TENANT); gunicorn >= 22 and nginx drop the
    # underscored one, leaving the client's value alone in its place.
    target = _target(headers={"x_tenant": "acme", "x-org_id": "org-operator"})
    sent = target.request_headers(
        [
            (b"x-tenant", b"victim"),
            (b"x_org-id", b"org-victim"),
            (b"x-org-id", b"org-victim-2"),
            (b"accept", b"*/*"),
        ]
    )
    cgi = [
        (name.replace(b"-", b"_"), value)
        for name, value in sent
        if name.replace(b"-", b"_") in (b"x_tenant", b"x_org_id")
    ]
    assert sorted(cgi) == [(b"x_org_id", b"org-operator"), (b"x_tenant", b"acme")]
    assert (b"accept", b"*/*") in sent
    # A CORS preflight (no credentials) drops them too.
    preflight = target.client_headers([(b"x-tenant", b"victim"), (b"x_org-id", b"org-victim")])
    assert preflight == []


def test_a_targets_repr_never_shows_the_key_nor_a_headers_env_secret() -> None:
    # R8-5. UpstreamConfig keeps api_key and header_secrets out of its repr;
    # Target.credentials holds both again, as bytes, in the default repr (and
    # so does a Snapshot's, through its targets).
    target = _target(headers_env={"x-portkey-api-key": "S"})
    assert KEY not in repr(target) and SECRET not in repr(target)


def test_a_client_header_spelled_with_dots_for_an_operators_name_is_dropped() -> None:
    # lighttpd makes x.tenant and x-tenant one CGI variable (HTTP_X_TENANT):
    # the client's is dropped where the operator sets the header.
    target = _target(headers={"x-tenant": "acme"})
    sent = target.request_headers([(b"x.tenant", b"victim"), (b"accept", b"*/*")])
    assert (b"x.tenant", b"victim") not in sent and (b"x-tenant", b"acme") in sent
