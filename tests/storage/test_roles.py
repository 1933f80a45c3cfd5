"""The storage interface split by role (issue 22): each method of `Storage` is
declared by exactly one role, `Storage` declares none of its own, and each
backend implements every role. (That a component reaches only its roles is
proved by `mypy --strict`, which CI runs.)"""

from __future__ import annotations

import inspect

import pytest

from gateway import storage
from gateway.storage import (
    Accounting,
    Directory,
    DirectoryReads,
    Health,
    Lifecycle,
    Outbox,
    Ownership,
    PausedForms,
    ReportReads,
    Storage,
)
from gateway.storage.postgres import PostgresStorage
from gateway.storage.sqlite import SQLiteStorage

ROLES: tuple[type, ...] = (
    Health,
    Lifecycle,
    DirectoryReads,
    Directory,
    Accounting,
    Outbox,
    ReportReads,
    Ownership,
    PausedForms,
)


def _declared(protocol: type) -> set[str]:
    """The methods a Protocol declares itself (not those it inherits)."""
    return {
        name
        for name, value in vars(protocol).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }


def test_each_method_is_declared_by_one_role() -> None:
    owner: dict[str, str] = {}
    for role in ROLES:
        for name in _declared(role):
            assert name not in owner, f"{name} is in both {owner[name]} and {role.__name__}"
            owner[name] = role.__name__
    # Storage is the union and nothing more: a new method goes in a role.
    assert _declared(Storage) == set()
    assert set(ROLES) <= set(Storage.__mro__)
    assert {name for name in dir(Storage) if not name.startswith("_")} == set(owner)


def test_the_package_exports_every_role() -> None:
    for role in ROLES:
        assert role.__name__ in storage.__all__
        assert getattr(storage, role.__name__) is role


@pytest.mark.parametrize("backend", [SQLiteStorage, PostgresStorage])
@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.__name__)
def test_each_backend_implements_each_role(backend: type, role: type) -> None:
    for name in _declared(role):
        method = getattr(backend, name, None)
        assert callable(method), f"{backend.__name__} lacks {role.__name__}.{name}"
        declared = inspect.signature(getattr(role, name))
        implemented = inspect.signature(method)
        assert list(implemented.parameters) == list(declared.parameters), (
            f"{backend.__name__}.{name}{implemented} != {role.__name__}.{name}{declared}"
        )
