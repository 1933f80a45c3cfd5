"""Mounts and model routing (issue 23): which named upstream a request goes to,
as pure logic (no I/O).

Each upstream is served at a mount, the path prefix clients use (``/v1``,
``/support/v1``). Several upstreams of one kind may share a mount; a request
goes to the first of them, in the file's order, whose ``models`` globs match
the model the request names (an upstream without ``models`` serves every model;
a request that names none goes to the mount's first upstream; one for a stored
answer's object, to the upstream the ledger says gave it - gateway/proxy.py). When that one
fails before any byte of the answer was relayed, its ``fallbacks`` are tried in
order - each fallback's own fallbacks right after it - skipping any that do not
serve the model, and trying each upstream at most once per request.

What is refused at start-up (`check_upstreams`, each message naming the key):
a name that cannot appear in a path, a mount that is not a clean path or that
would shadow one of the gateway's own paths (`RESERVED_TOP`, `OWN_UNDER_V1`),
a mount nested in another, two kinds on one mount (their routes could collide),
``models`` on a kind whose requests name no model (Dify), a shared mount of such
a kind, and a fallback that does not exist or is of another kind.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.allowlist import AllowList

__all__ = [
    "MODEL_KINDS",
    "OWN_UNDER_V1",
    "RESERVED_TOP",
    "Mount",
    "RoutingTable",
    "UpstreamRoute",
    "check_upstreams",
]

# The first path segments of the gateway's own endpoints (gateway/app.py): a mount
# under one of them would take its requests, or be taken by it.
# tests/test_mounts.py checks this against the app's routes.
RESERVED_TOP: Final = frozenset({"admin", "dashboard", "healthz", "readyz", "metrics", "widget.js"})
# The gateway's own endpoints under /v1 (the user's usage API): served by the
# gateway also when an upstream is mounted at /v1; no mount may hold them otherwise.
OWN_UNDER_V1: Final = frozenset({"/v1/usage", "/v1/usage/daily"})
# The kinds whose requests name a model (``Upstream.routed_model``), so upstreams
# of them can share a mount and set ``models``.
MODEL_KINDS: Final = frozenset({"openai", "anthropic"})

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")
_SEGMENT: Final = re.compile(r"[A-Za-z0-9._~-]+\Z")


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    """What routing knows of one named upstream."""

    name: str
    kind: str
    mount: str
    models: tuple[str, ...] = ()  # globs; empty: every model
    fallbacks: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()  # upstream.allow rules
    key: str = ""  # its table in the file ("upstream", "upstreams.NAME"), for messages

    def serves(self, model: str | None) -> bool:
        """Whether a request naming ``model`` (None: none) may go here."""
        if model is None or not self.models:
            return True
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.models)


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount: its path, its kind, and its upstreams in the file's order."""

    path: str
    kind: str
    upstreams: tuple[str, ...]
    allow: AllowList  # the allow-lists of its upstreams together (default deny)
    # The attempts of every request when there is nothing to choose - one upstream,
    # serving every model, without fallbacks (a single [upstream]) - else None.
    direct: tuple[str, ...] | None = None

    @property
    def shared(self) -> bool:
        return len(self.upstreams) > 1


def _always(name: str) -> bool:
    return True


def _direct(members: list[UpstreamRoute]) -> tuple[str, ...] | None:
    (only, *others) = members
    return None if others or only.models or only.fallbacks else (only.name,)


class RoutingTable:
    """The mounts and the upstreams behind them, in the file's order."""

    __slots__ = ("_allow", "_mounts", "_prefixes", "upstreams")

    def __init__(self, upstreams: Sequence[UpstreamRoute]) -> None:
        self.upstreams: Mapping[str, UpstreamRoute] = {u.name: u for u in upstreams}
        self._allow = {u.name: AllowList(u.allow) for u in upstreams}
        paths: dict[str, list[UpstreamRoute]] = {}
        for upstream in upstreams:
            paths.setdefault(upstream.mount, []).append(upstream)
        self._mounts = tuple(
            Mount(
                path,
                members[0].kind,
                tuple(m.name for m in members),
                AllowList(rule for m in members for rule in m.allow),
                direct=_direct(members),
            )
            for path, members in paths.items()
        )
        # Matched as "mount/" against the request path: no mount is inside another.
        self._prefixes = tuple((mount.path + "/", mount) for mount in self._mounts)

    @property
    def mounts(self) -> tuple[Mount, ...]:
        return self._mounts

    def find(self, path: str) -> tuple[Mount, str] | None:
        """The mount a request path is under, and the path below it ("/chat/completions")."""
        for prefix, mount in self._prefixes:
            if path.startswith(prefix):
                return mount, path[len(prefix) - 1 :]
        return None

    def is_proxied(self, path: str) -> bool:
        """Whether the proxy takes this path (the gateway's own under /v1 excepted)."""
        return path not in OWN_UNDER_V1 and self.find(path) is not None

    def allows(self, name: str, method: str, path: str) -> bool:
        """Whether upstream ``name``'s own allow-list forwards this request."""
        return self._allow[name].allows(method, path)

    def first(
        self, mount: Mount, model: str | None, *, allowed: Callable[[str], bool] = _always
    ) -> str | None:
        """The upstream of ``mount`` a request naming ``model`` goes to, or None
        when none serves it; ``allowed`` may rule upstreams out (by name)."""
        for name in mount.upstreams:
            if self.upstreams[name].serves(model) and allowed(name):
                return name
        return None

    def attempts(
        self, first: str, model: str | None, *, allowed: Callable[[str], bool] = _always
    ) -> tuple[str, ...]:
        """The upstreams to try, in order: ``first``, then its fallbacks depth
        first (a fallback's own fallbacks right after it), each at most once,
        those that do not serve ``model`` (or are not ``allowed``) left out."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            upstream = self.upstreams[name]
            if name == first or (upstream.serves(model) and allowed(name)):
                order.append(name)
            for fallback in upstream.fallbacks:
                visit(fallback)

        visit(first)
        return tuple(order)


def mount_problem(mount: str) -> str | None:
    """Why ``mount`` cannot be a mount, or None when it can."""
    if not mount.startswith("/") or mount.endswith("/"):
        return (
            f"expected a path such as '/support/v1' (a leading '/', no trailing '/'), got {mount!r}"
        )
    segments = mount[1:].split("/")
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT.match(segment):
            return (
                f"bad path segment {segment!r} in {mount!r} (letters, digits, '.', '_', '~', '-')"
            )
    if segments[0] in RESERVED_TOP:
        return f"{mount!r} would shadow the gateway's own /{segments[0]}"
    for own in sorted(OWN_UNDER_V1):
        if mount == "/v1":
            break  # the gateway keeps these under a /v1 mount (gateway/app.py)
        if own == mount or own.startswith(mount + "/") or mount.startswith(own + "/"):
            return f"{mount!r} would shadow the gateway's own {own}"
    return None


def check_upstreams(upstreams: Sequence[UpstreamRoute]) -> None:
    """Refuse a set of upstreams that cannot be routed (see the module docstring);
    raises ValueError with a one-line message naming the key."""
    by_name = {u.name: u for u in upstreams}
    for upstream in upstreams:
        key = upstream.key
        if not _NAME.match(upstream.name):
            raise ValueError(
                f"{key}: an upstream's name is letters, digits, '_' and '-' "
                f"(it is part of its default mount, /NAME/v1), got {upstream.name!r}"
            )
        problem = mount_problem(upstream.mount)
        if problem is not None:
            raise ValueError(f"{key}.mount: {problem}")
        if upstream.models and upstream.kind not in MODEL_KINDS:
            raise ValueError(
                f"{key}.models: a {upstream.kind} upstream's requests name no model "
                "(the app fixes its own), so it cannot route by model"
            )
        for index, glob in enumerate(upstream.models):
            if not glob or glob != glob.strip():
                raise ValueError(
                    f"{key}.models[{index}]: expected a model name or glob such as "
                    f'"gpt-4o*", got {glob!r}'
                )
        for index, name in enumerate(upstream.fallbacks):
            target = by_name.get(name)
            if target is None:
                known = ", ".join(by_name)
                raise ValueError(
                    f"{key}.fallbacks[{index}]: no upstream named {name!r} (expected one of: {known})"
                )
            if target.kind != upstream.kind:
                raise ValueError(
                    f"{key}.fallbacks[{index}]: {name!r} is a {target.kind} upstream; "
                    f"a {upstream.kind} upstream falls back to its own kind only"
                )
    seen: dict[str, UpstreamRoute] = {}
    for upstream in upstreams:
        key, mount = upstream.key, upstream.mount
        other = seen.get(mount)
        if other is not None:
            if other.kind != upstream.kind:
                raise ValueError(
                    f"{key}.mount: {mount!r} is the mount of the {other.kind} upstream "
                    f"{other.name!r}; one mount serves one kind"
                )
            if upstream.kind not in MODEL_KINDS:
                raise ValueError(
                    f"{key}.mount: {mount!r} is the mount of {other.name!r}; {upstream.kind} "
                    "upstreams cannot share a mount (their requests name no model to route by)"
                )
            continue
        for path, holder in seen.items():
            if mount.startswith(path + "/") or path.startswith(mount + "/"):
                raise ValueError(
                    f"{key}.mount: {mount!r} and the mount {path!r} of {holder.name!r} "
                    "are inside one another"
                )
        seen[mount] = upstream
