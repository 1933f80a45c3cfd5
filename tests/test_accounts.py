"""The one set of rules for plans, overrides and keys that every surface applies."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway.accounts import effective_plan, issue_key, parse_override, parse_override_text
from gateway.config import parse_config
from gateway.errors import BadRequest
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
