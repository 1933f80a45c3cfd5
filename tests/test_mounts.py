"""Mounts and model routing (issue 23, gateway/mounts.py): pure logic, by tables."""

from __future__ import annotations

import re

import pytest
from starlette.routing import Mount as StarletteMount
from starlette.routing import Route as StarletteRoute

from gateway.app import create_app
from gateway.config import parse_config
from gateway.mounts import (
    OWN_UNDER_V1,
    RESERVED_TOP,
    RoutingTable,
    UpstreamRoute,
    check_upstreams,
    mount_problem,
)


def up(name: str, mount: str = "", kind: str = "openai", **kw: object) -> UpstreamRoute:
    return UpstreamRoute(
        name,
        kind,
        mount or f"/{name}/v1",
        key=f"upstreams.{name}",
        **kw,  # type: ignore[arg-type]
    )


SHARED = RoutingTable(
    [
        up("hosted", "/v1", models=("gpt-*", "o3*"), fallbacks=("backup",)),
        up("local", "/v1", models=("llama-*",), fallbacks=("hosted",)),
        up("anything", "/v1"),
        up("backup", "/backup/v1", models=("gpt-4o*",), fallbacks=("hosted", "spare")),
        up("spare", "/spare/v1"),
    ]
)


@pytest.mark.parametrize(
    ("path", "mount", "below"),
    [
        ("/v1/chat/completions", "/v1", "/chat/completions"),
        ("/backup/v1/models", "/backup/v1", "/models"),
        ("/backup/v1/", "/backup/v1", "/"),
        ("/v1", None, None),  # the mount itself names no route
        ("/v10/chat", None, None),
        ("/backup/v2/models", None, None),
        ("/admin/users", None, None),
    ],
)
def test_find_a_mount(path: str, mount: str | None, below: str | None) -> None:
    found = SHARED.find(path)
    if mount is None:
        assert found is None
    else:
        assert found is not None
        assert (found[0].path, found[1]) == (mount, below)


def test_own_paths_under_v1_are_not_proxied() -> None:
    assert not SHARED.is_proxied("/v1/usage")
    assert not SHARED.is_proxied("/v1/usage/daily")
    assert SHARED.is_proxied("/v1/usage/other")  # not the gateway's: the upstream's
    assert SHARED.is_proxied("/v1/chat/completions")


@pytest.mark.parametrize(
    ("model", "first"),
    [
        ("gpt-4o-mini", "hosted"),
        ("o3-mini", "hosted"),
        ("llama-3.1-8b", "local"),
        ("mistral-large", "anything"),  # no models: serves every model
        ("GPT-4o", "anything"),  # globs are case-sensitive, as the plan allow-lists
        (None, "hosted"),  # a request naming no model goes to the mount's first
    ],
)
def test_first_upstream_in_file_order_whose_models_match(model: str | None, first: str) -> None:
    (mount,) = [m for m in SHARED.mounts if m.path == "/v1"]
    assert SHARED.first(mount, model) == first


def test_no_upstream_serves_the_model() -> None:
    table = RoutingTable([up("a", "/v1", models=("gpt-*",)), up("b", "/v1", models=("o3*",))])
    assert table.first(table.mounts[0], "llama-3") is None


@pytest.mark.parametrize(
    ("first", "model", "attempts"),
    [
        # hosted, then its fallback backup, then backup's own (hosted: tried already;
        # spare: serves everything)
        ("hosted", "gpt-4o", ("hosted", "backup", "spare")),
        # backup serves gpt-4o* only: skipped for another model, its fallbacks are not
        ("hosted", "gpt-3.5-turbo", ("hosted", "spare")),
        # a cycle (local -> hosted -> backup -> hosted ...) tries each once
        ("local", "llama-3", ("local", "spare")),
        ("local", None, ("local", "hosted", "backup", "spare")),
        ("spare", "x", ("spare",)),
    ],
)
def test_fallbacks_depth_first_each_once_serving_the_model(
    first: str, model: str | None, attempts: tuple[str, ...]
) -> None:
    assert SHARED.attempts(first, model) == attempts


def test_allowed_rules_out_upstreams() -> None:
    (mount,) = [m for m in SHARED.mounts if m.path == "/v1"]
    allowed = {"anything", "spare"}.__contains__
    assert SHARED.first(mount, "gpt-4o", allowed=allowed) == "anything"
    assert SHARED.attempts("hosted", "gpt-4o", allowed=allowed) == ("hosted", "spare")


def test_allow_lists_per_upstream_and_per_mount() -> None:
    table = RoutingTable(
        [up("a", "/v1", allow=("GET /files/*",)), up("b", "/v1", allow=("GET /batches",))]
    )
    mount = table.mounts[0]
    assert mount.allow.allows("GET", "/files/f1") and mount.allow.allows("GET", "/batches")
    assert table.allows("a", "GET", "/files/f1") and not table.allows("b", "GET", "/files/f1")


@pytest.mark.parametrize(
    ("mount", "problem"),
    [
        ("/v1", None),
        ("/support/v1", None),
        ("/a.b/c_d/v1", None),
        ("support/v1", "a leading '/'"),
        ("/support/v1/", "no trailing '/'"),
        ("/", "a leading '/'"),
        ("/a//v1", "bad path segment ''"),
        ("/../v1", "bad path segment '..'"),
        ("/sup port/v1", "bad path segment 'sup port'"),
        ("/admin/v1", "would shadow the gateway's own /admin"),
        ("/admin", "would shadow the gateway's own /admin"),
        ("/dashboard/v1", "would shadow the gateway's own /dashboard"),
        ("/metrics/v1", "would shadow the gateway's own /metrics"),
        ("/healthz/v1", "would shadow the gateway's own /healthz"),
        ("/readyz", "would shadow the gateway's own /readyz"),
        ("/widget.js/v1", "would shadow the gateway's own /widget.js"),
        ("/v1/usage", "would shadow the gateway's own /v1/usage"),
        ("/v1/usage/daily/x", "would shadow the gateway's own /v1/usage"),
        ("/v1/usage/x", "would shadow the gateway's own /v1/usage"),
    ],
)
def test_mount_problems(mount: str, problem: str | None) -> None:
    found = mount_problem(mount)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_reserved_paths_cover_every_route_of_the_gateway() -> None:
    """Every endpoint of the app's own site is under a reserved first segment or
    is one of the reserved /v1 paths: a route added to app.py without a reservation
    could be shadowed by a mount."""
    app = create_app(parse_config({}, env={}))
    for route in app.site.routes:
        assert isinstance(route, StarletteRoute | StarletteMount)
        path = route.path
        first = path.strip("/").split("/")[0]
        assert first in RESERVED_TOP or path in OWN_UNDER_V1, path
    # and each reservation is a real route (none stale)
    tops = {r.path.strip("/").split("/")[0] for r in app.site.routes}  # type: ignore[attr-defined]
    assert tops >= RESERVED_TOP
    assert {r.path for r in app.site.routes} >= OWN_UNDER_V1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("upstreams", "message"),
    [
        ([up("my app")], "upstreams.my app: an upstream's name is letters, digits"),
        ([up("admin")], "upstreams.admin.mount: '/admin/v1' would shadow the gateway's own /admin"),
        ([up("a", models=("gpt-4o", " x"))], "upstreams.a.models[1]: expected a model name"),
        ([up("d", kind="dify", models=("x",))], "upstreams.d.models: a dify upstream's requests"),
        ([up("a", fallbacks=("b",))], "upstreams.a.fallbacks[0]: no upstream named 'b'"),
        (
            [up("a", fallbacks=("d",)), up("d", kind="anthropic")],
            "upstreams.a.fallbacks[0]: 'd' is a anthropic upstream",
        ),
        (
            [up("a", "/v1"), up("b", "/v1", kind="anthropic")],
            "upstreams.b.mount: '/v1' is the mount of the openai upstream 'a'; one mount serves one kind",
        ),
        (
            [up("a", "/x/v1", kind="dify"), up("b", "/x/v1", kind="dify")],
            "upstreams.b.mount: '/x/v1' is the mount of 'a'; dify upstreams cannot share",
        ),
        (
            [up("a", "/v1"), up("b", "/v1/b")],
            "upstreams.b.mount: '/v1/b' and the mount '/v1' of 'a' are inside one another",
        ),
        (
            [up("b", "/v1/b"), up("a", "/v1")],
            "upstreams.a.mount: '/v1' and the mount '/v1/b' of 'b' are inside one another",
        ),
    ],
)
def test_check_upstreams_refuses_naming_the_key(
    upstreams: list[UpstreamRoute], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_upstreams(upstreams)


def test_check_upstreams_accepts_shared_mounts_and_cycles() -> None:
    check_upstreams(
        [
            up("a", "/v1", models=("gpt-*",), fallbacks=("b",)),
            up("b", "/v1", fallbacks=("a",)),
            up("c", kind="anthropic"),
            up("d", kind="dify"),
        ]
    )


def test_a_mount_with_nothing_to_choose_is_direct() -> None:
    table = RoutingTable(
        [
            up("default", "/v1", kind="dify"),
            up("a", "/a/v1", models=("gpt-*",)),
            up("b", "/b/v1", fallbacks=("c",)),
            up("c", "/c/v1"),
            up("d", "/d/v1"),
            up("e", "/d/v1"),
        ]
    )
    assert {m.path: m.direct for m in table.mounts} == {
        "/v1": ("default",),
        "/a/v1": None,
        "/b/v1": None,
        "/c/v1": ("c",),
        "/d/v1": None,
    }
