"""The operator's allow-list (``upstream.allow``): routes forwarded although the
dialect refuses them (default deny, issue 20), unmetered, at the operator's risk.

Each rule is ``"METHOD /path-glob"``: an upper-case method (or ``*`` for any) and
a path relative to the API base, where ``*`` matches within one path segment
and ``**`` matches any number of whole segments. ``"GET /files/*/preview"``,
``"* /apps/annotations/**"``. docs/configuration.md and docs/security.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["AllowList", "AllowRule", "parse_rule"]

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "*"})
_SEGMENT: Final = re.compile(r"[A-Za-z0-9._~!$&'()+,;=:@%*-]*")


@dataclass(frozen=True, slots=True)
class AllowRule:
    method: str
    pattern: re.Pattern[str]
    text: str

    def allows(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and bool(self.pattern.fullmatch(path))


def parse_rule(text: str) -> AllowRule:
    """One rule; raises ValueError saying what is wrong."""
    method, _, glob = text.strip().partition(" ")
    glob = glob.strip()
    if method not in _METHODS:
        raise ValueError(
            f"{text!r}: expected 'METHOD /path', with METHOD one of {', '.join(sorted(_METHODS))}"
        )
    if not glob.startswith("/") or " " in glob:
        raise ValueError(f"{text!r}: expected a path starting with '/' after the method")
    segments = glob.strip("/").split("/") if glob.strip("/") else []
    # Paths are matched without surrounding slashes, as the dialects route them.
    # "**" is any number of segments, none included: after a segment it adds
    # "/x" pieces; leading, it adds "x/" pieces; alone, it is any path.
    regex = ""
    after_segment = False
    for segment in segments:
        if segment == "**":
            regex += "(?:/[^/]+)*" if after_segment else "(?:[^/]+/)*"
            continue
        if not segment or "**" in segment or not _SEGMENT.fullmatch(segment):
            raise ValueError(f"{text!r}: bad path segment {segment!r}")
        piece = "[^/]*".join(re.escape(p) for p in segment.split("*"))
        regex += ("/" if after_segment else "") + piece
        after_segment = True
    if segments and not after_segment:  # only "**": any path at all
        regex = "(?:[^/]+(?:/[^/]+)*)?"
    return AllowRule(method, re.compile(regex), text)


class AllowList:
    """The rules of ``upstream.allow``, matched against a request's method and path."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[str]) -> None:
        self._rules = tuple(parse_rule(rule) for rule in rules)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def allows(self, method: str, path: str) -> bool:
        key = path.strip("/")
        return any(rule.allows(method, key) for rule in self._rules)
