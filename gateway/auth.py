"""Who is asking: the end user behind a request.

Per-user gateway keys, sent as ``Authorization: Bearer gwk_...``. Lookups are
cached in-process for ``auth.key_cache_ttl`` seconds; `forget_key` drops an entry
at once (a revoke in this process), other processes see a revoke within the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.config import AuthConfig
from gateway.errors import Unauthorized
from gateway.keys import hash_key
from gateway.storage import ApiKey, Storage, User

_MAX_CACHED = 100_000
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    key_id: str | None = None


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class _TTLCache(Generic[K, V]):
    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= _MAX_CACHED:
            # Crude but bounded: a full cache starts over rather than growing.
            self._entries.clear()
        self._entries[key] = (self._clock() + self.ttl, value)

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class Authenticator:
    def __init__(
        self, storage: Storage, config: AuthConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._storage = storage
        self._keys: _TTLCache[str, ApiKey] = _TTLCache(config.key_cache_ttl, clock)

    async def authenticate(self, authorization: bytes | None) -> Identity:
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("Missing gateway key: send 'Authorization: Bearer <your key>'.")
        digest = hash_key(token)
        key = self._keys.get(digest)
        if key is None:
            key = await self._storage.find_key(digest)
            if key is None:
                raise Unauthorized("Invalid gateway key.")
            self._keys.put(digest, key)
        if key.revoked_at is not None:
            raise Unauthorized("This gateway key has been revoked.")
        return Identity(user_id=key.user_id, key_id=key.id)

    def forget_key(self, key_id: str) -> None:
        """Drop a key from the cache (after revoking it in this process)."""
        for digest, (_, key) in list(self._keys._entries.items()):
            if key.id == key_id:
                self._keys.pop(digest)


class UserDirectory:
    """Users by id, cached like keys; plan changes made here invalidate at once."""

    def __init__(
        self, storage: Storage, *, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._storage = storage
        self._users: _TTLCache[str, User] = _TTLCache(ttl, clock)

    async def get(self, user_id: str, *, default_plan: str) -> User:
        user = self._users.get(user_id)
        if user is None:
            user = await self._storage.ensure_user(user_id, plan=default_plan)
            self._users.put(user_id, user)
        return user

    def forget(self, user_id: str) -> None:
        self._users.pop(user_id)
