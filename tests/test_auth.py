from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from gateway.auth import Authenticator, TeamDirectory, UserDirectory, bearer_token
from gateway.config import AuthConfig
from gateway.errors import Unauthorized
from gateway.keys import new_key
from gateway.storage import ApiKey, Storage, Team, User


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


async def test_a_revoke_during_a_key_lookup_is_not_undone_by_that_lookup(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a leaked key is used again and again while an admin revokes it. A
    request whose key lookup read the row before the revoke must not put that
    row into the cache after the revoke's forget_key: the key would then work
    for the whole key_cache_ttl."""
    await storage.ensure_user("alice", plan="free")
    key = new_key()
    await storage.create_key(
        "alice", key_id=key.id, key_hash=key.hash, prefix=key.prefix, name="", now=datetime.now(UTC)
    )
    auth = Authenticator(storage, AuthConfig(key_cache_ttl=300))
    header = f"Bearer {key.secret}".encode()
    read, resume = asyncio.Event(), asyncio.Event()
    find_key = storage.find_key

    async def slow_find_key(key_hash: str) -> ApiKey | None:
        found = await find_key(key_hash)  # the row as it was: not yet revoked
        read.set()
        await resume.wait()
        return found

    monkeypatch.setattr(storage, "find_key", slow_find_key)
    racing = asyncio.create_task(auth.authenticate(header))
    await read.wait()
    # The admin's revoke (gateway/accounts.py): the row, then this process's cache.
    await storage.revoke_key(key.id, now=datetime.now(UTC))
    auth.forget_key(key.id)
    resume.set()
    assert (await racing).user_id == "alice"  # read before the revoke: let through
    monkeypatch.setattr(storage, "find_key", find_key)
    with pytest.raises(Unauthorized, match="revoked"):
        await auth.authenticate(header)


async def test_a_plan_change_during_a_user_lookup_is_not_undone_by_that_lookup(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user read from the database while an admin moves them to another plan
    must not be cached after the change's forget: their requests would be
    admitted under the old plan for the whole key_cache_ttl."""
    await storage.ensure_user("alice", plan="pro")
    users = UserDirectory(storage, ttl=300)
    read, resume = asyncio.Event(), asyncio.Event()
    ensure_user = storage.ensure_user

    async def slow_ensure_user(user_id: str, *, plan: str) -> User:
        found = await ensure_user(user_id, plan=plan)  # the row as it was: still "pro"
        read.set()
        await resume.wait()
        return found

    monkeypatch.setattr(storage, "ensure_user", slow_ensure_user)
    racing = asyncio.create_task(users.get("alice", default_plan="free"))
    await read.wait()
    # The admin's plan change (gateway/accounts.py): the row, then this process's cache.
    await storage.set_plan("alice", "free")
    users.forget("alice")
    resume.set()
    assert (await racing).plan == "pro"  # read before the change
    monkeypatch.setattr(storage, "ensure_user", ensure_user)
    assert (await users.get("alice", default_plan="free")).plan == "free"


async def test_a_team_plan_change_during_a_team_lookup_is_not_undone_by_that_lookup(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for users: a team read while an admin moves it to another plan is not
    cached after the change's forget."""
    await storage.create_team("acme", plan="pro", now=datetime.now(UTC))
    teams = TeamDirectory(storage, ttl=300)
    read, resume = asyncio.Event(), asyncio.Event()
    get_team = storage.get_team

    async def slow_get_team(team_id: str) -> Team | None:
        found = await get_team(team_id)  # the row as it was: still "pro"
        read.set()
        await resume.wait()
        return found

    monkeypatch.setattr(storage, "get_team", slow_get_team)
    racing = asyncio.create_task(teams.get("acme"))
    await read.wait()
    await storage.set_team_plan("acme", "free")
    teams.forget("acme")
    resume.set()
    before = await racing
    assert before is not None and before.plan == "pro"  # read before the change
    monkeypatch.setattr(storage, "get_team", get_team)
    after = await teams.get("acme")
    assert after is not None and after.plan == "free"
