"""The one set of rules for plans, overrides and keys that every surface applies."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway.accounts import (
    Accounts,
    UnknownPlan,
    effective_plan,
    issue_key,
    parse_override,
    parse_override_text,
)
from gateway.config import parse_config
from gateway.errors import BadRequest, NotFound
from gateway.keys import hash_key
from gateway.storage import Storage, User


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("queries_per_day", 5, 5),
        ("queries_per_day", 5.0, 5),
        ("queries_per_day", 0, 0),
        ("queries_per_day", None, None),
        ("file_size_mb", 2.5, 2.5),
        ("advanced_rag", False, False),
        ("advanced_rag", True, True),
    ],
)
def test_parse_override(name: str, value: object, expected: object) -> None:
    parsed = parse_override(name, value)
    assert parsed == expected and type(parsed) is type(expected)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("queries_per_day", -1),
        ("queries_per_day", 1.5),
        ("queries_per_day", "5"),  # JSON gives numbers as numbers
        ("queries_per_day", True),
        ("file_size_mb", float("nan")),
        ("file_size_mb", float("inf")),
        ("advanced_rag", 1),
        ("advanced_rag", None),
        ("bogus", 1),
    ],
)
def test_parse_override_refuses(name: str, value: object) -> None:
    with pytest.raises(BadRequest):
        parse_override(name, value)


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("tokens_per_day", "5000", 5000),
        ("tokens_per_day", " Unlimited ", None),
        ("tokens_per_day", "none", None),
        ("file_size_mb", "2.5", 2.5),
        ("advanced_rag", "yes", True),
        ("advanced_rag", "OFF", False),
    ],
)
def test_parse_override_text(name: str, raw: str, expected: object) -> None:
    assert parse_override_text(name, raw) == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("tokens_per_day", "-3"),
        ("tokens_per_day", "1.5"),
        ("tokens_per_day", "lots"),
        ("file_size_mb", "nan"),
        ("file_size_mb", "inf"),
        ("advanced_rag", "maybe"),
        ("bogus", "1"),
    ],
)
def test_parse_override_text_refuses_as_json_would(name: str, raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_override_text(name, raw)


def test_effective_plan() -> None:
    config = parse_config({"plans": {"free": {"queries_per_day": 10, "tokens_per_day": 100}}})
    user = User(
        id="u",
        plan="free",
        overrides={"queries_per_day": None, "unknown": 3},
        lifetime_prompt_tokens=0,
        lifetime_completion_tokens=0,
        lifetime_tokens=0,
        lifetime_cost=Decimal(0),
        created_at=datetime.now(UTC),
    )
    plan = effective_plan(config, user)
    assert (plan.name, plan.queries_per_day, plan.tokens_per_day) == ("free", None, 100)


async def test_issue_key_stores_only_the_hash(storage: Storage) -> None:
    await storage.ensure_user("u", plan="free")
    record, secret = await issue_key(storage, "u", name="laptop", now=datetime.now(UTC))
    found = await storage.find_key(hash_key(secret))
    assert found is not None and found.id == record.id
    assert (record.user_id, record.name) == ("u", "laptop")
    assert secret not in repr(record)


class Forgotten:
    """Records what the operations tell a running gateway's caches to forget."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.keys: list[str] = []

    def forget_user(self, user_id: str) -> None:
        self.users.append(user_id)

    def forget_key(self, key_id: str) -> None:
        self.keys.append(key_id)


def _accounts(storage: Storage, caches: Forgotten) -> Accounts:
    config = parse_config({"plans": {"free": {}, "pro": {"queries_per_day": 5}}})
    return Accounts(storage, config=lambda: config, caches=caches)


async def test_accounts_change_the_rows_and_forget_the_cached_ones(storage: Storage) -> None:
    caches = Forgotten()
    accounts = _accounts(storage, caches)
    assert await accounts.add_user("ann") is None
    existing = await accounts.add_user("ann", plan="pro")
    assert existing is not None and existing.plan == "free"  # there already: unchanged

    await accounts.set_plan("ann", "pro")
    assert await accounts.set_override("ann", "queries_per_day", 7.0) == 7
    user = await storage.get_user("ann")
    assert user is not None and user.plan == "pro" and user.overrides == {"queries_per_day": 7}
    await accounts.clear_override("ann", "queries_per_day")
    user = await storage.get_user("ann")
    assert user is not None and user.overrides == {}
    assert caches.users == ["ann", "ann", "ann"]

    record, secret = await accounts.create_key("ann", name="laptop")
    assert (await storage.find_key(hash_key(secret))) is not None
    revoked = await accounts.revoke_key(record.id)
    assert revoked.revoked_at is not None and caches.keys == [record.id]


async def test_accounts_refuse_before_changing_anything(storage: Storage) -> None:
    caches = Forgotten()
    accounts = _accounts(storage, caches)
    await accounts.add_user("ann")
    with pytest.raises(UnknownPlan) as refused:
        await accounts.set_plan("ann", "gold")
    assert refused.value.message == "No plan named 'gold' (plans: free, pro)."
    assert refused.value.status == 400
    with pytest.raises(UnknownPlan):
        await accounts.add_user("bob", plan="gold")
    with pytest.raises(BadRequest):
        await accounts.set_override("ann", "queries_per_day", -1)
    with pytest.raises(NotFound, match="No user 'bob'"):
        await accounts.create_key("bob")
    assert await storage.get_user("bob") is None
    record, _ = await accounts.create_key("bob", create_user=True)
    user = await storage.get_user("bob")
    assert record.user_id == "bob" and user is not None and user.plan == "free"
    user = await storage.get_user("ann")
    assert user is not None and user.plan == "free" and caches.users == []
