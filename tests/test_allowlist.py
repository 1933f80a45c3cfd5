"""upstream.allow rules: "METHOD /path-glob", matched as the dialects route paths."""

from __future__ import annotations

import pytest

from gateway.allowlist import AllowList, parse_rule


@pytest.mark.parametrize(
    ("rule", "method", "path", "allowed"),
    [
        ("GET /files/*/preview", "GET", "/files/f1/preview", True),
        ("GET /files/*/preview", "GET", "/files/f1/preview/", True),
        ("GET /files/*/preview", "POST", "/files/f1/preview", False),
        # * stays within one segment.
        ("GET /files/*/preview", "GET", "/files/a/b/preview", False),
        ("GET /files/*", "GET", "/files", False),
        ("POST /x*y", "POST", "/xaay", True),
        ("POST /x*y", "POST", "/x/y", False),
        # ** spans segments, and matches the segment before it alone.
        ("* /apps/annotations/**", "DELETE", "/apps/annotations/a1", True),
        ("* /apps/annotations/**", "PUT", "/apps/annotations", True),
        ("* /apps/annotations/**", "GET", "/apps/annotations/a/b/c", True),
        ("* /apps/annotations/**", "GET", "/apps/annotationsX", False),
        ("GET /**", "GET", "/anything/at/all", True),
        ("GET /**", "GET", "/", True),
        # A leading ** may match no segment at all.
        ("GET /**/preview", "GET", "/preview", True),
        ("GET /**/preview", "GET", "/files/f1/preview", True),
        ("GET /**/preview", "GET", "/xpreview", False),
        ("GET /a/**/b", "GET", "/a/b", True),
        ("GET /a/**/b", "GET", "/a/x/y/b", True),
        ("GET /a/**/b", "GET", "/ab", False),
        ("GET /", "GET", "/", True),
        ("GET /", "GET", "/x", False),
        # Literal characters are literal, not regular-expression syntax.
        ("GET /a.b", "GET", "/axb", False),
        ("GET /a.b", "GET", "/a.b", True),
    ],
)
def test_rules(rule: str, method: str, path: str, allowed: bool) -> None:
    assert AllowList([rule]).allows(method, path) is allowed


def test_an_empty_list_allows_nothing() -> None:
    rules = AllowList([])
    assert not rules and not rules.allows("GET", "/")


@pytest.mark.parametrize(
    "rule",
    ["get /x", "GET x", "GET", "GET /a b", "GET /a/**b", "GET /a//b", "FETCH /x", "GET /a?b"],
)
def test_malformed_rules(rule: str) -> None:
    with pytest.raises(ValueError, match=r"expected|bad path segment"):
        parse_rule(rule)
