"""Who is asking: the end user behind a request.

Three modes (``auth.mode``), each a credential in ``Authorization: Bearer``:

- ``api_key``: per-user gateway keys (``gwk_...``). Lookups are cached in-process
  for ``auth.key_cache_ttl`` seconds, across configuration reloads; `forget_key`
  drops an entry at once (a revoke in this process), other processes see a revoke
  within the TTL.
- ``jwt``: a token signed by the operator's identity provider; ``sub`` (or the
  configured claim) is the user. Only the one configured algorithm is accepted,
  which refuses ``alg: none`` and HS/RS confusion (RFC 8725 section 3.1).
- ``trusted_header``: a backend that already authenticated its user sends the
  gateway's service key plus the user's id in a header. Without the service key
  the header means nothing.

Every failure is an `Unauthorized` whose message says what was wrong without
echoing any secret.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from gateway.config import AuthConfig, JWTConfig
from gateway.errors import Unauthorized
from gateway.http import bearer_token
from gateway.keys import hash_key
from gateway.storage import ApiKey, Directory, DirectoryReads, Team, User

if TYPE_CHECKING:
    import jwt

_MAX_CACHED = 100_000
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    key_id: str | None = None
    plan: str | None = None  # a plan named by the credential, when the operator allows it


def valid_user_id(user: str) -> bool:
    """1 to 255 characters; no control characters (C0, DEL and C1) nor line or
    paragraph separators (a user id goes into query strings, form fields and
    logs), and no whitespace of any kind, nor an invisible format character
    (a zero-width space, a byte order mark), at either end: something on the way
    (the operator's backend, a database, the upstream; JavaScript's ``trim``
    takes U+FEFF) may trim it, and ``alice\xa0`` would become ``alice``."""
    return (
        0 < len(user) <= 255
        and not _trimmable(user[0])
        and not _trimmable(user[-1])
        and not any(ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029" for c in user)
    )


# The invisible characters something may trim, beside whitespace: JavaScript's
# trim takes U+FEFF, and "zero-width" stripping the others. Not every format
# character: a subdivision flag (Scotland's, Wales') ends with one, CANCEL TAG,
# that nothing trims, and an id ending with one is as distinct everywhere.
_INVISIBLE_ENDS: Final = frozenset("\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\ufeff")


def _trimmable(char: str) -> bool:
    """Whitespace, or an invisible character a trim may take (`_INVISIBLE_ENDS`)."""
    return char.isspace() or char in _INVISIBLE_ENDS


def header_user_id(value: bytes | None) -> str:
    """The user id a trusted user header names: its raw bytes as UTF-8, with the
    spaces and tabs HTTP allows around a header's value trimmed (RFC 9110 5.5),
    nothing else: `str.strip` would trim any Unicode whitespace, and make
    ``alice\xa0``, another account at the operator's backend, ``alice``
    (`valid_user_id` refuses an id that still starts or ends with whitespace).

    The one decoding of the header, for every entry point (the proxy and
    /v1/usage both hand it the raw bytes of the ASGI scope): a second reading, as
    latin-1 text re-encoded, would make ``dũng`` someone else (issue 20). Bytes
    that are not UTF-8 raise `UnicodeDecodeError` rather than being replaced:
    replacement would give ``caf\xe9`` and ``caf\xe8`` the same id.
    """
    return (value or b"").decode("utf-8").strip(" \t")


class _TTLCache(Generic[K, V]):
    def __init__(
        self,
        ttl: float,
        clock: Callable[[], float],
        entries: dict[K, tuple[float, V]] | None = None,
        forgotten: list[int] | None = None,
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {} if entries is None else entries
        # How many times anything was forgotten (shared, like the entries): a value
        # read from the database while a forget happened may be the row as it was
        # before the change, and is not cached (`put`'s ``mark``).
        self._forgotten: list[int] = [0] if forgotten is None else forgotten

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        # Past its expiry, or put under a longer ttl than the one now in force.
        if not now <= entry[0] <= now + self.ttl:
            del self._entries[key]
            return None
        return entry[1]

    def mark(self) -> int:
        """Taken before a database read; given to `put` with what it read."""
        return self._forgotten[0]

    def put(self, key: K, value: V, *, mark: int | None = None) -> None:
        if self.ttl <= 0:
            return
        if mark is not None and mark != self._forgotten[0]:
            return  # a change was made while it was read: the next request reads again
        if len(self._entries) >= _MAX_CACHED:
            # Crude but bounded: a full cache starts over rather than growing.
            self._entries.clear()
        self._entries[key] = (self._clock() + self.ttl, value)

    def pop(self, key: K) -> None:
        self.forgetting()
        self._entries.pop(key, None)

    def forgetting(self) -> None:
        """A row behind the cache changed: what is being read now is not cached."""
        self._forgotten[0] += 1

    def sharing(self, ttl: float) -> _TTLCache[K, V]:
        """A cache with this one's entries and a new ``ttl``: an entry is never
        kept longer than the new ttl allows (a lowered ttl, or 0, takes effect at once)."""
        return _TTLCache(ttl, self._clock, self._entries, self._forgotten)

    def clear(self) -> None:
        self._entries.clear()


class Authenticator:
    def __init__(
        self,
        storage: DirectoryReads,
        config: AuthConfig,
        *,
        plans: Mapping[str, object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        previous: Authenticator | None = None,
    ) -> None:
        self._storage = storage
        self._config = config
        self._plans = plans or {}
        # A reload keeps the cached keys (issue 25): keys live in the database, not
        # the configuration, so a reload cannot have changed one, and emptying the
        # cache would make every request need the database - during an outage, 503
        # for everyone. Only the lifetime of entries cached from now on changes.
        self._keys: _TTLCache[str, ApiKey] = (
            previous._keys.sharing(config.key_cache_ttl)
            if previous is not None
            else _TTLCache(config.key_cache_ttl, clock)
        )
        self._jwt = _JWTVerifier(config.jwt) if config.mode == "jwt" else None
        self._service_key = config.trusted_header.service_key.encode()

    async def authenticate(
        self, authorization: bytes | None, user_header: bytes | None = None
    ) -> Identity:
        token = bearer_token(authorization)
        mode = self._config.mode
        if mode == "jwt":
            if token is None:
                raise Unauthorized("Missing token: send 'Authorization: Bearer <token>'.")
            assert self._jwt is not None
            identity = self._jwt.verify(token)
            if identity.plan is not None and identity.plan not in self._plans:
                identity = Identity(user_id=identity.user_id)  # an unknown plan is ignored
            return identity
        if mode == "trusted_header":
            return self._trusted(token, user_header)
        return await self._api_key(token)

    async def _api_key(self, token: str | None) -> Identity:
        if token is None:
            raise Unauthorized("Missing gateway key: send 'Authorization: Bearer <your key>'.")
        digest = hash_key(token)
        key = self._keys.get(digest)
        if key is None:
            mark = self._keys.mark()
            key = await self._storage.find_key(digest)
            if key is None:
                raise Unauthorized("Invalid gateway key.")
            self._keys.put(digest, key, mark=mark)
        if key.revoked_at is not None:
            raise Unauthorized("This gateway key has been revoked.")
        return Identity(user_id=key.user_id, key_id=key.id)

    def _trusted(self, token: str | None, user_header: bytes | None) -> Identity:
        name = self._config.trusted_header.user_header
        if token is None:
            raise Unauthorized("Missing service key: send 'Authorization: Bearer <service key>'.")
        # Constant-time comparison: the service key is a shared secret.
        if not hmac.compare_digest(token.encode(), self._service_key):
            raise Unauthorized("Invalid service key.")
        try:
            user = header_user_id(user_header)
        except UnicodeDecodeError:
            raise Unauthorized(f"Invalid {name} header: the user id must be UTF-8.") from None
        if not user:
            raise Unauthorized(f"Missing {name} header naming the end user.")
        if not valid_user_id(user):
            raise Unauthorized(f"Invalid {name} header.")
        return Identity(user_id=user)

    def forget_key(self, key_id: str) -> None:
        """Drop a key from the cache (after revoking it in this process); a lookup
        under way does not put it back."""
        self._keys.forgetting()
        for digest, (_, key) in list(self._keys._entries.items()):
            if key.id == key_id:
                self._keys.pop(digest)


@functools.cache
def _jwt_errors() -> tuple[tuple[type[Exception], str], ...]:
    """What a refused token is told, by PyJWT's exception."""
    import jwt

    return (
        (jwt.ExpiredSignatureError, "Token has expired."),
        (jwt.ImmatureSignatureError, "Token is not yet valid."),
        (jwt.InvalidAudienceError, "Token audience is not accepted."),
        (jwt.InvalidIssuerError, "Token issuer is not accepted."),
        (jwt.InvalidSignatureError, "Token signature is invalid."),
        (jwt.InvalidAlgorithmError, "Token algorithm is not accepted."),
    )


class _JWTVerifier:
    """PyJWT (and the cryptography it loads, ~40 ms of a process's start) is
    imported by a gateway that verifies tokens, not by every process that imports
    this module: the CLI's commands, the workers of a gateway on keys."""

    def __init__(self, config: JWTConfig) -> None:
        import jwt

        self._config = config
        self._key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        if config.algorithm == "HS256":
            self._key = config.secret
        elif config.jwks_file:
            self._jwks = jwt.PyJWKSet.from_json(config.key_text)
        else:
            self._key = config.key_text

    def verify(self, token: str) -> Identity:
        import jwt

        config = self._config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthorized("Token is malformed.") from None
        alg = header.get("alg")
        if alg != config.algorithm:
            # Checked before anything else: `none` and a symmetric algorithm keyed
            # with our public key are the classic forgeries.
            raise Unauthorized(f"Token algorithm {str(alg)[:16]!r} is not accepted.")
        key = self._key if self._jwks is None else self._jwk(header.get("kid"))
        required = [config.user_claim] + (["exp"] if config.require_exp else [])
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[config.algorithm],
                audience=config.audience or None,
                issuer=config.issuer or None,
                leeway=config.leeway,
                # The audience is checked even when none is configured: a token
                # that names one (an access token of another API of the same
                # identity provider, an ID token of another client or project
                # on shared signing keys) is then refused (review-auth A2).
                options={"require": required},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"Token has no {exc.claim!r} claim.") from None
        except jwt.InvalidTokenError as exc:
            for kind, message in _jwt_errors():
                if isinstance(exc, kind):
                    raise Unauthorized(message) from None
            raise Unauthorized("Token is invalid.") from None
        user = claims.get(config.user_claim)
        if not isinstance(user, str) or not valid_user_id(user):
            raise Unauthorized(f"Token claim {config.user_claim!r} is not a user id.")
        plan = claims.get(config.plan_claim) if config.plan_claim else None
        return Identity(user_id=user, plan=plan if isinstance(plan, str) else None)

    def _jwk(self, kid: object) -> Any:
        assert self._jwks is not None
        keys = self._jwks.keys
        if kid is None and len(keys) == 1:
            return keys[0]
        for candidate in keys:
            if candidate.key_id == kid:
                return candidate
        raise Unauthorized("Token key id is not known.")


class UserDirectory:
    """Users by id, cached like keys; plan changes made here invalidate at once."""

    def __init__(
        self,
        storage: Directory,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        previous: UserDirectory | None = None,
    ) -> None:
        self._storage = storage
        # Kept across reloads, as the keys are: a user's plan name and overrides are
        # rows of the database; the plans they name are read from the new
        # configuration at each request.
        self._users: _TTLCache[str, User] = (
            previous._users.sharing(ttl) if previous is not None else _TTLCache(ttl, clock)
        )

    async def get(self, user_id: str, *, default_plan: str) -> User:
        """The user, created on the default plan if the gateway has not seen them."""
        user = self._users.get(user_id)
        if user is None:
            mark = self._users.mark()
            user = await self._storage.ensure_user(user_id, plan=default_plan)
            self._users.put(user_id, user, mark=mark)
        return user

    async def resolve(self, identity: Identity, *, default_plan: str, create: bool) -> User:
        """The user behind a token or trusted header: created on first use, or
        refused, as configured; a plan the credential names is applied."""
        mark = self._users.mark()
        user = self._users.get(identity.user_id)
        cached = user is not None
        if user is None:
            if create:
                user = await self._storage.ensure_user(
                    identity.user_id, plan=identity.plan or default_plan
                )
            else:
                found = await self._storage.get_user(identity.user_id)
                if found is None:
                    raise Unauthorized("Unknown user.")
                user = found
        plan = identity.plan
        changed = plan is not None and plan != user.plan
        if plan is not None and changed:
            await self._storage.set_plan(user.id, plan)
            user = dataclasses.replace(user, plan=plan)
        if changed or not cached:
            # Only what was read or written now: a hit put back would start its
            # TTL again at every request, and a change made by another process
            # (a plan, a team, a suspension) would never reach a user who keeps
            # asking (review-auth A1).
            self._users.put(user.id, user, mark=mark)
        return user

    def forget(self, user_id: str) -> None:
        self._users.pop(user_id)


class TeamDirectory:
    """Teams by id (issue 21), cached like users; changes made through the
    gateway invalidate at once, other replicas' within the TTL."""

    def __init__(
        self,
        storage: DirectoryReads,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        previous: TeamDirectory | None = None,
    ) -> None:
        self._storage = storage
        self._teams: _TTLCache[str, Team] = (
            previous._teams.sharing(ttl) if previous is not None else _TTLCache(ttl, clock)
        )

    async def get(self, team_id: str) -> Team | None:
        team = self._teams.get(team_id)
        if team is None:
            mark = self._teams.mark()
            team = await self._storage.get_team(team_id)
            if team is not None:
                self._teams.put(team_id, team, mark=mark)
        return team

    def forget(self, team_id: str) -> None:
        self._teams.pop(team_id)
