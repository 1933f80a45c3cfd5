from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.auth import Authenticator, bearer_token
from gateway.config import AuthConfig
from gateway.errors import Unauthorized
from gateway.keys import new_key
from gateway.storage import Storage


class Ticker:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc", "abc"),
        (b"bearer abc", "abc"),
        (b"BEARER   abc  ", "abc"),
        (b"Basic abc", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"", None),
        (None, None),
    ],
)
def test_bearer_token(header: bytes | None, token: str | None) -> None:
    assert bearer_token(header) == token


async def test_key_lookups_are_cached_for_the_ttl(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    key = new_key()
    await storage.create_key(
        "alice", key_id=key.id, key_hash=key.hash, prefix=key.prefix, name="", now=datetime.now(UTC)
    )
    clock = Ticker()
    auth = Authenticator(storage, AuthConfig(key_cache_ttl=30), clock=clock)
    header = f"Bearer {key.secret}".encode()
    assert (await auth.authenticate(header)).user_id == "alice"

    # Revoked by another process: this one still trusts its cache until the TTL...
    await storage.revoke_key(key.id, now=datetime.now(UTC))
    clock.now = 29.0
    assert (await auth.authenticate(header)).user_id == "alice"
    # ...and not after it.
    clock.now = 31.0
    with pytest.raises(Unauthorized, match="revoked"):
        await auth.authenticate(header)


async def test_forget_key_takes_effect_at_once(storage: Storage) -> None:
    await storage.ensure_user("alice", plan="free")
    key = new_key()
    await storage.create_key(
        "alice", key_id=key.id, key_hash=key.hash, prefix=key.prefix, name="", now=datetime.now(UTC)
    )
    auth = Authenticator(storage, AuthConfig(key_cache_ttl=300))
    header = f"Bearer {key.secret}".encode()
    await auth.authenticate(header)
    await storage.revoke_key(key.id, now=datetime.now(UTC))
    auth.forget_key(key.id)
    with pytest.raises(Unauthorized, match="revoked"):
        await auth.authenticate(header)


async def test_unknown_keys_are_not_cached(storage: Storage) -> None:
    auth = Authenticator(storage, AuthConfig(key_cache_ttl=300))
    key = new_key()
    header = f"Bearer {key.secret}".encode()
    with pytest.raises(Unauthorized, match="Invalid gateway key"):
        await auth.authenticate(header)
    await storage.ensure_user("bob", plan="free")
    await storage.create_key(
        "bob", key_id=key.id, key_hash=key.hash, prefix=key.prefix, name="", now=datetime.now(UTC)
    )
    assert (await auth.authenticate(header)).user_id == "bob"  # a new key works at once
